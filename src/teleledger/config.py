"""One typed settings object for the whole node, read from ``TELELEDGER_*`` environment variables.

Nothing here opens a file or a connection: ``Settings`` is plain data, validated at start-up by
``Settings.check()``. Unsafe defaults are refused outside development (``environment`` other
than ``development``): a master key must come from the environment or a key file that already
exists, never be created silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from teleledger.core.errors import ConfigurationError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TELELEDGER_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    home: Path = Path("./var")
    #: SQLAlchemy URL; empty = SQLite file ``teleledger.db`` in ``home``.
    database_url: str = ""
    #: base64 of 32 bytes; empty = key file ``master.key`` in ``home`` (created with 0600 in development).
    master_key: str = ""
    #: origin line of this node's checkpoints and the issuer of its tokens
    node_name: str = "teleledger.localhost"
    #: public URL of this node; empty = http://HOST:PORT
    base_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    #: largest request body accepted, bytes (413 above)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    default_page_size: int = Field(default=50, ge=1, le=1000)
    max_page_size: int = Field(default=1000, ge=1, le=10000)
    token_ttl_seconds: int = Field(default=3600, ge=60)
    #: argon2 cost: "default" (RFC 9106 low-memory) or "fast" (tests only)
    password_hashing: Literal["default", "fast"] = "default"
    demo_data: bool = True
    samples_dir: Path | None = None
    workers: int = Field(default=1, ge=1, le=64)
    #: record use cases running at once per process; 0 = 1 on SQLite (its one write lock
    #: serializes them anyway), 16 on PostgreSQL (the size of the connection pool)
    db_threads: int = Field(default=0, ge=0, le=256)
    #: SQLite durability: NORMAL (WAL) survives a process crash / kill -9; FULL also survives
    #: power loss, at one fsync per commit
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    #: an external Ethereum JSON-RPC node; empty = the embedded chain in ``home/chain``
    chain_url: str = ""
    #: false = no chain at all: no anchoring, and features that need the chain say so
    chain_enabled: bool = True
    #: a chain write is done, and a block indexed, once its block has this many confirmations
    #: counting itself (1 = included; raise it on chains whose head can be replaced)
    chain_confirmations: int = Field(default=1, ge=1, le=1000)
    #: seconds between anchors of the log's latest checkpoint on chain (only when the log grew)
    anchor_interval_seconds: float = Field(default=60.0, gt=0)
    #: seconds between rounds of the chain outbox worker and the indexer when idle
    chain_poll_interval: float = Field(default=0.5, gt=0, le=60)
    #: this node's organization on chain; empty = node_name (as bytes32: see ledger.chain.anchoring.org_id)
    chain_org: str = ""
    #: how long a practitioner's break-the-glass (emergency) access lasts, hours
    break_glass_hours: float = Field(default=4, gt=0, le=24)
    #: witnesses whose cosignatures this node accepts: comma-separated C2SP verifier keys
    #: (``name+hexid+base64(0x04 || ed25519 public key)``)
    witness_keys: str = ""
    #: ICE servers handed to the browsers of a video visit: a JSON list of RTCIceServer objects
    #: (``[{"urls": "stun:TURN-HOST:3478"}, {"urls": ["turn:TURN-HOST:3478?transport=udp"]}]``).
    #: Empty list = host candidates only (enough on one machine or one LAN); see docs/coturn.md.
    ice_servers: str = "[]"
    #: coturn's ``static-auth-secret`` (``use-auth-secret``): with it, every ``turn:``/``turns:`` entry
    #: of ``ice_servers`` without a username gets short-lived credentials minted per visit
    turn_secret: str = ""
    turn_credential_ttl_seconds: int = Field(default=6 * 3600, ge=60, le=7 * 86400)
    #: a visit's room opens this many minutes before its start ...
    visit_join_early_minutes: int = Field(default=15, ge=0, le=24 * 60)
    #: ... and refuses new joins this many minutes after its planned end, unless it is running
    visit_join_grace_minutes: int = Field(default=30, ge=0, le=24 * 60)
    #: largest file shared in a visit (bytes of the file itself, before base64)
    max_attachment_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    @field_validator("ice_servers")
    @classmethod
    def _ice_servers_are_rtc_ice_servers(cls, value: str) -> str:
        parse_ice_servers(value)
        return value

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'teleledger.db').resolve()}"

    @property
    def public_url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def record_threads(self) -> int:
        return self.db_threads or (1 if self.is_sqlite else 16)

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    def check(self) -> None:
        """Refuse configurations that would be unsafe for real patients."""
        if self.environment == "production":
            if self.password_hashing != "default":
                raise ConfigurationError("TELELEDGER_PASSWORD_HASHING=fast is for tests only")
            if self.demo_data:
                raise ConfigurationError(
                    "demo accounts have published passwords: set TELELEDGER_DEMO_DATA=false in production"
                )
            if not self.master_key and not (self.home / "master.key").exists():
                raise ConfigurationError(
                    "no master key: set TELELEDGER_MASTER_KEY (base64, 32 bytes) or provision "
                    f"{self.home / 'master.key'} before starting in production"
                )


_ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def parse_ice_servers(text: str) -> list[dict]:
    """``TELELEDGER_ICE_SERVERS`` as a list of RTCIceServer dicts (https://www.w3.org/TR/webrtc/#rtciceserver-dictionary);
    ``ValueError`` naming the first thing wrong."""
    try:
        servers = json.loads(text or "[]")
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(servers, list):
        raise ValueError('expected a JSON list such as [{"urls": "stun:TURN-HOST:3478"}]')
    for i, server in enumerate(servers):
        if not isinstance(server, dict) or "urls" not in server:
            raise ValueError(f"entry {i} must be an object with \"urls\"")
        urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
        if not urls or not all(isinstance(u, str) and u.startswith(_ICE_SCHEMES) for u in urls):
            raise ValueError(f"entry {i}: every url must start with stun:, stuns:, turn: or turns:")
        extra = set(server) - {"urls", "username", "credential"}
        if extra or not all(isinstance(server.get(k, ""), str) for k in ("username", "credential")):
            raise ValueError(f"entry {i}: only urls, username and credential (strings) are allowed")
    return servers
