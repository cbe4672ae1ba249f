"""The node's chain at run time: client, contracts, outbox worker, indexer and anchorer, checked at start.

``open_runtime(settings, engine, keystore, log)`` is called by ``bootstrap.build`` when
``TELELEDGER_CHAIN_ENABLED`` (the default). It refuses to start — ``ConfigurationError`` saying
what to do — rather than run against the wrong chain:

* **external** (``TELELEDGER_CHAIN_URL`` set): the node must answer (else: start it or fix the
  URL), the contracts recorded in ``<home>/chain/contracts.json`` must exist (else: run
  ``teleledger chain deploy``), on the chain id they were recorded on, with this version's code.
  Joining the consortium is the consortium admins' decision: when the node's authority is not
  an operator of its organization yet, the node starts, anchoring waits, and ``status()`` says so.
* **embedded** (no URL): the in-process chain in ``<home>/chain`` is created on first start,
  the contracts deployed (consortium admin = the node's authority key ``node:authority``,
  quorum 1, recorded in ``contracts.json``; contracts added by a later version are deployed
  beside them), and the node's organization (``org_id(TELELEDGER_CHAIN_ORG or node_name)``)
  registered with the authority as organization admin and operator, so it may anchor.
* both: the database remembers the chain its outbox belongs to (chain id and genesis hash in
  ``node_meta``); another chain is refused, since stored transactions are only valid on theirs.

One process per home holds the embedded chain (an exclusive lock on ``<home>/chain/runtime.lock``;
the kernel releases it when the process dies, even by kill -9). Another process on the same home
— a second ``teleledger serve``, a CLI command while the server runs — gets a *standby* runtime:
it records chain writes in the outbox (the holder sends them) and has no client, and it watches
the lock: when the holder is gone (stopped, or killed) the standby takes the chain over and runs
the outbox worker, indexer and anchorer itself (``ChainRuntime.take_over``). Every process, active
or standby, runs an ``EventFollower`` that keeps in-memory projections (the consent index) current
with the events any process indexed. External chains have no such limit: every process is active, and the outbox and
indexer coordinate through the database.

``start()``/``stop()`` run the background threads (the web app's lifespan calls them);
``status()`` is a JSON-ready dict for an admin page. Nothing here holds PHI or logs keys.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.core.errors import ConfigurationError, NotFound
from teleledger.ledger.chain import CONTRACT_NAMES, ROLE_OPERATOR, ROLE_ORG_ADMIN
from teleledger.ledger.chain.anchoring import (
    MAX_ORIGIN,
    AnchoredCheckpoint,
    Anchorer,
    anchored_checkpoints,
    chain_anchors,
    org_id,
)
from teleledger.ledger.chain.client import ChainClient, ChainRevert, ChainUnavailable
from teleledger.ledger.chain.deploy import (
    TAKE_PARTICIPANTS,
    addresses_path,
    check_deployment,
    deploy_all,
    load_addresses,
    recorded_deployment_block,
    save_addresses,
)
from teleledger.ledger.chain.follower import EventFollower
from teleledger.ledger.chain.background import BackgroundThread
from teleledger.ledger.chain.indexer import Indexer, Projector
from teleledger.ledger.chain.outbox import OutboxEntry, OutboxWorker, wait
from teleledger.ledger.chain.storage import chain_outbox
from teleledger.storage import tables as t

__all__ = ["AUTHORITY_KEY_ID", "ChainRuntime", "open_chain_client", "open_runtime", "read_anchors"]

log = logging.getLogger("teleledger.chain")

AUTHORITY_KEY_ID = "node:authority"
LOCK_FILE = "runtime.lock"
#: how often a standby checks whether the embedded chain's holder is gone (seconds)
TAKEOVER_INTERVAL = 1.0
#: node_meta key: "<chain id>:<genesis block hash>" of the chain this database's outbox targets
CHAIN_IDENTITY = "chain-identity"


class _HomeLock:
    """An exclusive, non-blocking ``flock`` on ``<home>/chain/runtime.lock``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            return
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class _Takeover(BackgroundThread):
    """A standby's watch on the embedded chain's home lock: when the holder is gone (stopped or
    killed, the kernel released its lock), this process takes the chain over."""

    def __init__(self, runtime: ChainRuntime, interval: float = TAKEOVER_INTERVAL) -> None:
        self.runtime = runtime
        self.interval = interval
        self._init_thread("chain-takeover", "the standby's chain takeover watch")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.runtime.take_over():
                    return
            except Exception:  # the chain could not be opened now: keep standing by, try again
                log.exception("taking over the embedded chain failed; still on standby")


@contextmanager
def embedded_chain_lock(settings: Any) -> Iterator[str | None]:
    """For a command that opens the chain itself (``teleledger chain``): hold the embedded
    chain's home lock while it runs. Yields None when the command may open the chain (it holds
    the lock, or the chain is external), else the process id of the server that holds it — two
    processes must never seal blocks on one embedded chain."""
    if settings.chain_url:
        yield None
        return
    lock = _HomeLock(Path(settings.home) / "chain")
    try:
        yield None if lock.held else lock.holder()
    finally:
        lock.release()


def open_chain_client(settings: Any, keystore: Any) -> ChainClient:
    """The configured client alone (no checks, no deployment): external when
    ``settings.chain_url``, else the embedded chain in ``<home>/chain`` sealed by the authority key."""
    if settings.chain_url:
        from teleledger.ledger.chain.rpc import JsonRpcChain

        try:
            return JsonRpcChain(settings.chain_url)
        except ChainUnavailable as exc:
            raise ConfigurationError(
                f"the chain node at {settings.chain_url} does not answer: start it, or fix "
                f"TELELEDGER_CHAIN_URL (or set TELELEDGER_CHAIN_ENABLED=false to run without a chain) "
                f"[{exc.message}]") from exc
    from teleledger.ledger.chain.embedded import DEFAULT_CHAIN_ID, EmbeddedChain

    return EmbeddedChain(Path(settings.home) / "chain", keystore.key(AUTHORITY_KEY_ID), chain_id=DEFAULT_CHAIN_ID)


class ChainRuntime:
    """See the module docstring. ``active`` is False for a standby runtime (no client)."""

    def __init__(self, *, settings: Any, engine: Engine, keystore: Any, origin: str, org: bytes,
                 client: ChainClient | None = None, addresses: dict[str, str] | None = None,
                 authority: str | None = None, lock: _HomeLock | None = None, owns_client: bool = True,
                 registration_error: str | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.keystore = keystore
        self.origin = origin
        self.org = org
        self.addresses = dict(addresses or {})
        self.authority = authority
        self.registration_error = registration_error
        self._lock = lock
        self._owns_client = owns_client
        self.client = None
        self.worker: OutboxWorker | None = None
        self.indexer: Indexer | None = None
        self.anchorer: Anchorer | None = None
        #: indexer projectors, kept to attach them to an indexer a standby creates when it takes over
        self._projectors: list[tuple[str, Projector]] = []
        #: in-memory projections of the stored events, in every process (active or standby)
        self.follower = EventFollower(engine, poll_interval=settings.chain_poll_interval)
        self._takeover = _Takeover(self) if lock is not None and client is None else None
        if client is not None:
            self._attach(client)
        self._started = False

    def _attach(self, client: ChainClient) -> None:
        """Build the parts that need a client; ``client`` is set last, so that a request thread
        that sees ``active`` also sees the worker and the indexer."""
        settings, engine = self.settings, self.engine
        confirmations = settings.chain_confirmations
        poll = settings.chain_poll_interval
        self.worker = OutboxWorker(engine, client, self.keystore, self.addresses, confirmations, poll_interval=poll)
        self.indexer = Indexer(engine, client, self.addresses, confirmations, poll_interval=poll,
                               start_block=recorded_deployment_block(addresses_path(settings.home)))
        for name, fn in self._projectors:
            self.indexer.on(name, fn)
        self.anchorer = Anchorer(engine, self.origin, self.org, sender=AUTHORITY_KEY_ID,
                                 interval=settings.anchor_interval_seconds,
                                 on_enqueued=lambda _key: self.worker.kick() if self.worker else None)
        self.client = client

    def on(self, event_name: str, fn: Projector) -> None:
        """Register an indexer projector (database projections: runs once, in the process that
        indexes the event); it is attached to the indexer of a standby that takes over too."""
        self._projectors.append((event_name, fn))
        if self.indexer is not None:
            self.indexer.on(event_name, fn)

    def take_over(self) -> bool:
        """A standby tries once to become the holder of the embedded chain (the holder stopped,
        perhaps killed): take its home lock, open and check the chain, start the background
        work. True when this process holds the chain now."""
        if self.active:
            return True
        assert self._lock is not None
        lock = _HomeLock(self._lock.path.parent)
        if not lock.held:
            return False
        try:
            client, addresses, authority, registration_error = _prepare(self.settings, self.engine, self.keystore,
                                                                        self.org, None)
        except BaseException:
            lock.release()
            raise
        self._lock.release()
        self._lock = lock
        self.addresses.clear()
        self.addresses.update(addresses)
        self.authority, self.registration_error = authority, registration_error
        self._attach(client)
        log.warning("this process took over the embedded chain of %s", self.settings.home)
        if self._started:
            self._start_active()
        return True

    @property
    def active(self) -> bool:
        return self.client is not None

    @property
    def mode(self) -> str:
        if self.client is not None:
            return self.client.mode
        return "external" if self.settings.chain_url else "embedded"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run the event follower (every process) and, when active, the outbox worker, the indexer
        and the anchorer in background threads."""
        if self._started:
            return
        if not self.follower.positioned:
            self.follower.skip_to_end()  # what is stored now was projected when the node was built
        self.follower.start()
        self._started = True
        if self.active:
            self._start_active()
        elif self._takeover is not None:
            self._takeover.start()

    def _start_active(self) -> None:
        assert self.worker and self.indexer and self.anchorer
        self.worker.start()
        self.indexer.start()
        if self.registration_error is None:
            self.anchorer.start()

    def stop(self) -> None:
        for part in (self._takeover, self.anchorer, self.indexer, self.worker, self.follower):
            if part is not None:
                part.stop()
        self._started = False

    def close(self) -> None:
        self.stop()
        if self.client is not None and self._owns_client:
            self.client.close()
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ use

    def wait(self, key: str, timeout: float = 30.0) -> OutboxEntry:
        """Until the outbox row ``key`` is done (see ``outbox.wait``)."""
        return wait(self.engine, key, timeout, kick=self.worker.kick if self.worker else None)

    def status(self) -> dict[str, Any]:
        """What an admin page shows: mode, head, outbox counts, indexer cursor, last anchor."""
        out: dict[str, Any] = {
            "mode": self.mode, "role": "active" if self.active else "standby",
            "org": "0x" + self.org.hex(), "origin": self.origin, "authority": self.authority,
            "contracts": self.addresses, "anchor_interval_seconds": self.settings.anchor_interval_seconds,
            "confirmations": self.settings.chain_confirmations,
            "anchoring": "enabled" if self.registration_error is None else self.registration_error,
        }
        if not self.active:
            holder = self._lock.holder() if self._lock is not None else "?"
            out["standby_reason"] = (f"the embedded chain of this home is held by process {holder}; this "
                                     "process records chain writes for it to send")
        else:
            assert self.client is not None
            try:
                out.update(chain_id=self.client.chain_id(), head=self.client.block_number(), reachable=True)
            except ChainUnavailable as exc:
                out.update(reachable=False, error=exc.message)
        with self.engine.connect() as conn:
            counts = dict.fromkeys(("pending", "sent", "done", "failed"), 0)
            counts.update({s: int(n) for s, n in conn.execute(
                select(chain_outbox.c.status, func.count()).group_by(chain_outbox.c.status)).all()})
            out["outbox"] = counts
            failed = conn.execute(select(chain_outbox.c.idempotency_key, chain_outbox.c.error)
                                  .where(chain_outbox.c.status == "failed")
                                  .order_by(chain_outbox.c.id.desc()).limit(5)).all()
            out["outbox_failed"] = [{"key": k, "error": e} for k, e in failed]
            waiting = conn.execute(select(chain_outbox.c.error).where(chain_outbox.c.status.in_(("pending", "sent")),
                                                                     chain_outbox.c.error.is_not(None))
                                   .order_by(chain_outbox.c.id).limit(1)).scalar()
            out["outbox_waiting_because"] = waiting
            anchors = anchored_checkpoints(conn, self.origin)
        if self.indexer is not None:
            cursor = self.indexer.cursor()
            out["indexer"] = None if cursor is None else {"block": cursor[0], "hash": cursor[1]}
        last = anchors[-1] if anchors else None
        out["last_anchor"] = None if last is None else {
            "index": last.index, "tree_size": last.tree_size, "root_hash": last.root_hash.hex(),
            "block": last.block_number, "tx_hash": last.tx_hash}
        return out


# --------------------------------------------------------------------------- start-up


def open_runtime(settings: Any, engine: Engine, keystore: Any, log_: Any, *,
                 client: ChainClient | None = None) -> ChainRuntime:
    """Check (and in embedded mode prepare) the chain, and wire the runtime; see the module
    docstring. ``client``: use this one instead of opening the configured chain (tests)."""
    origin = log_.origin
    if len(origin.encode("utf-8")) > MAX_ORIGIN:
        raise ConfigurationError(f"the log origin {origin!r} is longer than the {MAX_ORIGIN} bytes AnchorRegistry "
                                 "accepts: choose a shorter TELELEDGER_NODE_NAME")
    org = org_id(settings.chain_org or settings.node_name)
    home_chain = Path(settings.home) / "chain"
    lock = None
    if not settings.chain_url and client is None:
        lock = _HomeLock(home_chain)
        if not lock.held:
            log.warning("the embedded chain of %s is held by process %s: this process runs on standby",
                        settings.home, lock.holder())
            _, addresses = load_addresses(addresses_path(settings.home))
            return ChainRuntime(settings=settings, engine=engine, keystore=keystore, origin=origin, org=org,
                                addresses=addresses, lock=lock)
    owns = client is None
    try:
        client, addresses, authority, registration_error = _prepare(settings, engine, keystore, org, client)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return ChainRuntime(settings=settings, engine=engine, keystore=keystore, origin=origin, org=org, client=client,
                        addresses=addresses, authority=authority, lock=lock, owns_client=owns,
                        registration_error=registration_error)


def _prepare(settings: Any, engine: Engine, keystore: Any, org: bytes,
             client: ChainClient | None) -> tuple[ChainClient, dict[str, str], str, str | None]:
    """Open (unless given) and check the chain, deploying and registering on an embedded one:
    (client, contract addresses, authority address, why anchoring is off or None)."""
    owns = client is None
    try:
        key = keystore.key(AUTHORITY_KEY_ID)
        authority = key.public_key.to_checksum_address()
        if client is None:
            client = open_chain_client(settings, keystore)
        try:
            addresses = _contracts(settings, client, key, authority)
            _check_identity(engine, client)
            registration_error = _registration(settings, client, addresses, org, key, authority)
        except ChainUnavailable as exc:
            raise ConfigurationError(
                f"the chain node does not answer: {exc.message}; start it, fix TELELEDGER_CHAIN_URL, or set "
                "TELELEDGER_CHAIN_ENABLED=false") from exc
    except BaseException:
        if owns and client is not None:
            client.close()
        raise
    if registration_error:
        log.warning("anchoring is off: %s", registration_error)
    return client, addresses, authority, registration_error


def _contracts(settings: Any, client: ChainClient, key: Any, authority: str) -> dict[str, str]:
    path = addresses_path(settings.home)
    recorded_chain_id, addresses = load_addresses(path)
    if client.mode == "external":
        if not addresses:
            raise ConfigurationError(
                f"no contract addresses are recorded for the chain at {settings.chain_url} (expected {path}): run "
                "`teleledger chain deploy` once for a new consortium, or copy the consortium's contracts.json there")
        check_deployment(client, addresses, chain_id=recorded_chain_id)  # ChainMisconfigured says what to do
        return addresses
    if not addresses:
        first_block = client.block_number()
        addresses = deploy_all(client, key, [authority], 1)
        save_addresses(path, client.chain_id(), addresses, deployed_block=first_block)
        log.info("deployed the consortium contracts on the embedded chain")
        return addresses
    missing = [n for n in CONTRACT_NAMES if n not in addresses]
    if missing and "ParticipantRegistry" in addresses:
        for name in missing:  # contracts a newer version added: deployed beside the others
            if name in TAKE_PARTICIPANTS:
                addresses[name] = client.deploy(name, addresses["ParticipantRegistry"], sender=key)
        save_addresses(path, client.chain_id(), addresses)
    check_deployment(client, addresses, chain_id=recorded_chain_id)
    return addresses


def _check_identity(engine: Engine, client: ChainClient) -> None:
    identity = f"{client.chain_id()}:{client.get_block(0).hash}".encode()
    with engine.begin() as conn:
        ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(t.node_meta)
        conn.execute(ins.values(key=CHAIN_IDENTITY, value=identity).on_conflict_do_nothing(index_elements=["key"]))
        stored = bytes(conn.execute(select(t.node_meta.c.value).where(t.node_meta.c.key == CHAIN_IDENTITY)).scalar_one())
    if stored != identity:
        chain_id, genesis = stored.decode().split(":", 1)
        raise ConfigurationError(
            f"this database's chain writes belong to chain {chain_id} (genesis {genesis}), but the configured chain "
            f"is {identity.decode()}: point TELELEDGER_CHAIN_URL (or TELELEDGER_HOME, for an embedded chain) at "
            "the chain this database was used with")


def _registration(settings: Any, client: ChainClient, addresses: dict[str, str], org: bytes, key: Any,
                  authority: str) -> str | None:
    """Make the authority an operator of ``org``; None when it may anchor, else why not (for
    ``status()``). On the embedded chain the node is the consortium and approves its own
    organization; on an external chain only the consortium admins can, after which the
    authority (its organization admin) gives itself the operator role here."""
    registry = addresses["ParticipantRegistry"]

    def has(role: int) -> bool:
        return bool(client.call(registry, "ParticipantRegistry", "has_role", org, authority, role))

    if has(ROLE_OPERATOR):
        return None
    where = f"organization 0x{org.hex()} on the {client.mode} chain"
    try:
        if not client.call(registry, "ParticipantRegistry", "is_organization", org):
            if client.mode == "external":
                return (f"{where} is not approved yet: ask the consortium admins to approve it with the authority "
                        f"{authority} as its admin, then restart the node")
            client.transact(registry, "ParticipantRegistry", "approve_organization", org, authority, sender=key)
        if not has(ROLE_ORG_ADMIN):
            return (f"the authority {authority} is neither operator nor admin of {where}: ask its admins to give it "
                    "the operator role, then restart the node")
        client.transact(registry, "ParticipantRegistry", "set_member_roles", org, authority,
                        ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)
    except (ChainRevert, ChainUnavailable) as exc:  # e.g. no funds for gas on an external chain
        return f"cannot make the authority {authority} an operator of {where}: {exc.message}"
    return None


# --------------------------------------------------------------------------- verification


def read_anchors(settings: Any, keystore: Any, origin: str) -> tuple[list[AnchoredCheckpoint] | None, str | None]:
    """The chain's anchors of ``origin`` for ``teleledger verify``, read from the contract without
    writing anything (no deployment, no key, no new chain): ``(anchors, None)``, or ``(None, why)``
    when nothing can have been anchored. ``ConfigurationError`` when a configured chain cannot be
    read (the node does not answer, the contracts are not where recorded)."""
    if not settings.chain_enabled:
        return None, "the chain is disabled (TELELEDGER_CHAIN_ENABLED=false): anchors not checked"
    recorded_chain_id, addresses = load_addresses(addresses_path(settings.home))
    if not addresses:
        return None, f"no chain contracts are recorded in {addresses_path(settings.home)}: nothing was anchored"
    if not settings.chain_url:
        if not (Path(settings.home) / "chain" / "chain.sqlite3").exists():
            raise ConfigurationError(
                f"contracts are recorded in {addresses_path(settings.home)} but the embedded chain of "
                f"{settings.home} is missing: the anchors cannot be read (restore {Path(settings.home) / 'chain'})")
        try:
            keystore.key(AUTHORITY_KEY_ID, create=False)
        except NotFound:
            return None, "the keystore holds no chain authority key: this node never used its embedded chain"
    client = open_chain_client(settings, keystore)
    try:
        check_deployment(client, addresses, chain_id=recorded_chain_id)
        return chain_anchors(client, addresses, origin), None
    except ChainUnavailable as exc:
        raise ConfigurationError(f"cannot read the anchors: {exc.message}") from exc
    finally:
        client.close()
