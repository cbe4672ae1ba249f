"""One typed settings object for the whole node, read from ``TELELEDGER_*`` environment variables.

Nothing here opens a file or a connection: ``Settings`` is plain data, validated at start-up by
``Settings.check()``. Unsafe defaults are refused outside development (``environment`` other
than ``development``): a master key must come from the environment or a key file that already
exists, never be created silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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
    #: witnesses whose cosignatures this node accepts: comma-separated C2SP verifier keys
    #: (``name+hexid+base64(0x04 || ed25519 public key)``)
    witness_keys: str = ""

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
