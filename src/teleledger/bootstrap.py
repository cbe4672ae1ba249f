"""The only place that picks concrete backends and wires the node together.

``build(settings)`` opens (and on first start initialises) ``TELELEDGER_HOME``: the master key,
the database schema, and the node's signing keys, which are kept in the database sealed under
the master key so that several processes on one PostgreSQL share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.config import Settings
from teleledger.core.errors import ConfigurationError, TeleledgerError
from teleledger.core.crypto import KeyedHash, LocalMasterKey, MasterKey, new_data_key, open_sealed, seal
from teleledger.identity.accounts import Accounts
from teleledger.identity.keystore import NODE_AUTHORITY, Keystore, legacy_authority_file
from teleledger.identity.passwords import Hasher
from teleledger.identity.tokens import TokenIssuer, TokenVerifier
from teleledger.ledger.chain.runtime import ChainRuntime, open_runtime
from teleledger.ledger.log.note import CosignatureVerifier, Ed25519Signer
from teleledger.ledger.log.service import TransparencyLog
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.model import DefaultPolicy
from teleledger.policy.service import ConsentService
from teleledger.records.audit import Auditor
from teleledger.records.audit_events import AuditEventService
from teleledger.records.bundles import BundleProcessor
from teleledger.records.keys import KeyRing
from teleledger.records.research_export import research_export
from teleledger.records.search import SqlSearch
from teleledger.records.service import RecordsService
from teleledger.records.service import Settings as RecordsSettings
from teleledger.records.store import ResourceStore
from teleledger.storage import tables as t
from teleledger.visits.scheduling import Scheduling
from teleledger.storage.db import get_meta, make_engine, migrate, schema_state


@dataclass
class Node:
    settings: Settings
    engine: Engine
    master: MasterKey
    records: RecordsService
    bundles: BundleProcessor
    accounts: Accounts
    issuer: TokenIssuer
    verifier: TokenVerifier
    node_key: Ed25519PrivateKey
    log: TransparencyLog
    auditor: Auditor
    audit_events: AuditEventService
    keystore: Keystore
    #: the chain (outbox worker, indexer, anchoring); None when TELELEDGER_CHAIN_ENABLED=false
    chain: ChainRuntime | None = None
    #: the consent state every access decision consults (projected from the chain)
    consents: ConsentIndex | None = None
    #: granting, revoking and break-glass (``policy.service``)
    consent_service: ConsentService | None = None
    #: availability, booking, cancelling (``visits.scheduling``); built here so its write guard
    #: (no path may book around the slot-booking row) covers every writer, imports included
    scheduling: Scheduling | None = None

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
        self.log.close()
        self.engine.dispose()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def load_master_key(settings: Settings) -> MasterKey:
    if settings.master_key:
        return LocalMasterKey.from_base64(settings.master_key)
    return LocalMasterKey.from_file(settings.home / "master.key", create=settings.environment != "production")


def _node_secret(engine: Engine, master: MasterKey, name: str) -> bytes:
    """A 32-byte node secret stored sealed in ``node_meta`` (created once, shared by processes)."""
    aead = AESGCM(master.derive("teleledger node-meta v1"))
    with engine.begin() as conn:
        sealed = get_meta(conn, name)
        if sealed is None:
            ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(t.node_meta)
            conn.execute(ins.values(key=name, value=seal(aead, new_data_key(), name.encode()))
                         .on_conflict_do_nothing(index_elements=["key"]))
            sealed = get_meta(conn, name)
    assert sealed is not None
    return open_sealed(aead, sealed, name.encode(), what=f"node secret {name}")


def _keystore(settings: Settings, engine: Engine, master: MasterKey, *, writable: bool = True) -> Keystore:
    # the authority key file of earlier versions becomes node:authority, so an existing embedded
    # chain keeps its sealer; asked for here so that happens at start, before any other use
    # (not by a read-only opening such as ``teleledger verify``, which must write nothing)
    keystore = Keystore(engine, master, legacy_authority=legacy_authority_file(settings.home))
    if writable:
        keystore.key(NODE_AUTHORITY)
    return keystore


@contextmanager
def open_keystore(settings: Settings) -> Iterator[Keystore]:
    """The node's keystore alone (master key, database, schema), without building the node:
    for commands that only need keys (``teleledger keys``, ``teleledger chain``)."""
    settings.check()
    settings.home.mkdir(parents=True, exist_ok=True)
    master = load_master_key(settings)
    engine = make_engine(settings.sqlalchemy_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        schema_state(engine)
        migrate(engine)
        yield _keystore(settings, engine, master)
    finally:
        engine.dispose()


def _witnesses(settings: Settings) -> list[CosignatureVerifier]:
    out = []
    for key in filter(None, (k.strip() for k in settings.witness_keys.split(","))):
        try:
            out.append(CosignatureVerifier.from_vkey(key))
        except TeleledgerError as exc:
            raise ConfigurationError(f"TELELEDGER_WITNESS_KEYS: {exc.message}") from exc
    return out


def build(settings: Settings, *, migrate_schema: bool = True) -> Node:
    settings.check()
    settings.home.mkdir(parents=True, exist_ok=True)
    master = load_master_key(settings)
    engine = make_engine(settings.sqlalchemy_url, sqlite_synchronous=settings.sqlite_synchronous)
    if migrate_schema:
        schema_state(engine)  # refuses a foreign or newer database before touching it
        migrate(engine)
    node_key = Ed25519PrivateKey.from_private_bytes(_node_secret(engine, master, "node-signing-key"))
    index_hash = KeyedHash(master.derive("teleledger search-index v1"))
    # the log's signing key and HMAC key are node secrets too: every process signs as the same node
    log_signer = Ed25519Signer.from_seed(settings.node_name, _node_secret(engine, master, "log-signing-key"))
    log = TransparencyLog(engine, log_signer, witnesses=_witnesses(settings))
    auditor = Auditor(log, KeyedHash(master.derive("teleledger log v1")))
    store = ResourceStore(KeyRing(master), index_hash, on_change=auditor.changes)
    records = RecordsService(
        engine, store, SqlSearch(index_hash),
        RecordsSettings(base_url=settings.public_url, default_count=settings.default_page_size,
                        max_count=settings.max_page_size),
        auditor=auditor,
    )
    hasher = Hasher.for_tests() if settings.password_hashing == "fast" else Hasher()
    issuer = TokenIssuer(node_key, issuer=settings.public_url, audience=settings.public_url + "/fhir",
                         ttl=timedelta(seconds=settings.token_ttl_seconds), now=_utcnow)
    verifier = TokenVerifier([node_key.public_key()], issuer=settings.public_url,
                             audience=settings.public_url + "/fhir", now=_utcnow)
    keystore = _keystore(settings, engine, master, writable=migrate_schema)
    # start-up checks of the chain (wrong chain id, unreachable node, missing contracts) happen here
    chain = open_runtime(settings, engine, keystore, log) if settings.chain_enabled else None
    consents = ConsentIndex()
    records.grants = consents
    consent_service = ConsentService(
        engine=engine, records=records, keystore=keystore, chain=chain, index=consents, auditor=auditor,
        pseudonym_key=master.derive("teleledger consent patient pseudonym v1"),
        grantee_key=master.derive("teleledger consent grantee v1"),
        default=DefaultPolicy(break_glass_ttl=timedelta(hours=settings.break_glass_hours)),
    )
    if migrate_schema:
        if chain is not None:
            chain.follower.skip_to_end()  # before the rebuild: what is stored after it, the follower applies
        consent_service.rebuild()  # the consent state from the chain events stored so far
    node = Node(settings, engine, master, records, BundleProcessor(records), Accounts(engine, hasher, keystore=keystore),
                issuer, verifier, node_key, log, auditor,
                AuditEventService(engine, base_url=settings.public_url, observer=settings.node_name,
                                  default_count=settings.default_page_size, max_count=settings.max_page_size),
                keystore=keystore, chain=chain, consents=consents, consent_service=consent_service,
                scheduling=Scheduling(records, engine))
    # the research export service, built here so its write guard (only admins and services edit a
    # study's member list) covers every writer, imports included
    research_export(node)
    return node
