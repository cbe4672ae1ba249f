"""``TransparencyLog``: the one object the rest of teleledger uses to write to and read from the
log, and the ``Sequencer`` thread that turns queued entries into a signed tree.

Writing is two steps, as in Trillian:

1. ``log.append(conn, entry)`` inside the caller's unit of work — the entry commits with the
   change it records, or not at all;
2. ``log.integrate()`` (the ``Sequencer`` calls it every ~50 ms) gives queued entries their
   leaf indexes and stores the new Merkle nodes; ``log.checkpoint()`` (at least once a second
   while the tree grows) signs a C2SP checkpoint of the new tree head.

Reading (proofs, entries, checkpoints) answers public, unauthenticated requests: inputs are
validated here (``InvalidInput`` → 400, ``NotFound`` → 404), and reads go through a read-only
pool of their own that never takes SQLite's write lock (``storage.read_only_engine``); the
sequencer has its own small pool too (``storage.sequencer_engine``), so 64 busy writers do not
starve it. ``close()`` disposes both.

Nothing here logs entry bytes, and the sequencer logs only error class names: SQLAlchemy
error messages carry statement parameters, which would be leaf bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from teleledger.core.errors import InvalidInput, NotFound, TeleledgerError
from teleledger.ledger.log import entry as entry_format
from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import (
    Checkpoint,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    UnverifiedNote,
    parse_note,
    verify_cosignature,
)
from teleledger.ledger.log.storage import (
    SqlLogStore,
    SqlNodeReader,
    StoredCheckpoint,
    read_only_engine,
    sequencer_engine,
)
from teleledger.storage.db import UnitOfWork

__all__ = ["ConsistencyProof", "InclusionProof", "Sequencer", "TransparencyLog"]

log = logging.getLogger("teleledger.ledger.log")

#: Largest number of entries one ``entries()`` call returns (RFC 6962 §4.6 lets logs cap it).
MAX_ENTRIES_PER_CALL = 1000
#: A cosignature may be this far in the future of our clock (witness clock skew), seconds.
COSIGNATURE_CLOCK_SKEW = 300
_MAX_INDEX = 2**63 - 1


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Audit path of leaf ``leaf_index`` in the tree of ``tree_size`` leaves (RFC 9162 §2.1.3)."""

    leaf_index: int
    tree_size: int
    audit_path: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """Proof that the tree of ``first`` leaves is a prefix of the one of ``second`` (§2.1.4)."""

    first: int
    second: int
    path: tuple[bytes, ...]


def _index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= _MAX_INDEX:
        raise InvalidInput(f"{name} must be between 0 and 2**63-1, got {value}")
    return value


class TransparencyLog:
    """The node's transparency log over one SQL database.

    ``signer`` signs checkpoints; ``origin`` is the checkpoint's first line (default: the
    signer's key name, as C2SP recommends); ``witnesses`` are the cosignature keys whose lines
    ``add_cosignature`` accepts; ``clock`` returns µs since the epoch.
    """

    def __init__(
        self,
        engine: Engine,
        signer: Ed25519Signer,
        *,
        origin: str | None = None,
        witnesses: Iterable[CosignatureVerifier] = (),
        clock: Callable[[], int] = _now_us,
        max_batch: int = 50_000,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._origin = origin if origin is not None else signer.name
        Checkpoint(self._origin, 0, merkle.EMPTY_ROOT)  # refuse a bad origin at start-up
        self._signer = signer
        self._witnesses: dict[tuple[str, int], CosignatureVerifier] = {}
        for witness in witnesses:
            self._witnesses[(witness.name, witness.key_id)] = witness
        self._clock = clock
        self.max_batch = max_batch
        self._store = SqlLogStore(clock=clock)
        self._known_size = 0
        self._engine = engine
        self._reads = read_only_engine(engine)
        self._writes = sequencer_engine(engine)

    # ------------------------------------------------------------------ identity

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def verifier(self) -> Ed25519Verifier:
        return self._signer.verifier()

    @property
    def public_key(self) -> str:
        """The verifier key string ``<name>+<hex key ID>+base64(0x01 || public key)``."""
        return self._signer.verifier().vkey

    # ------------------------------------------------------------------ writing

    def append(self, conn: Connection, entry: bytes) -> None:
        """Queue ``entry`` in the caller's transaction (``uow.c``); it is durable — and will be
        sequenced — once the caller commits, and gone if the caller rolls back.

        The bytes must decode as a log entry (``entry.decode``): the log refuses anything that
        is not one of its two PHI-free formats.
        """
        entry_format.decode(entry)
        self._store.append(conn, bytes(entry))

    def append_many(self, conn: Connection, entries: Sequence[bytes]) -> None:
        """``append`` for a batch (one multi-row insert), e.g. an import's change entries."""
        for e in entries:
            entry_format.decode(e)
        self._store.append_many(conn, [bytes(e) for e in entries])

    def append_own(self, conn: Connection, entries: Sequence[bytes]) -> None:
        """``append_many`` for entries this node has just built with ``entry.encode_change`` /
        ``entry.encode_access``: those check every field as they encode, so decoding the bytes
        again proves nothing. Bytes from anywhere else go through ``append`` / ``append_many``.
        """
        self._store.append_many(conn, entries)

    def integrate(self, *, max_batch: int | None = None) -> int:
        """Sequence up to ``max_batch`` queued entries; return how many were added."""
        with self._reads.connect() as c:  # peek first: an idle log takes no write lock
            if not self._store.has_queued(c):
                return 0
        return self._store.integrate(self._writes, max_batch=max_batch or self.max_batch)

    def checkpoint(self) -> StoredCheckpoint | None:
        """Sign and store a checkpoint if the tree grew since the last one; else None."""
        with self._reads.connect() as c:
            size, _ = self._store.state(c)
            last = self._store.last_checkpoint_size(c)
        if size == 0 or (last is not None and size <= last):
            return None
        return self._store.checkpoint(self._writes, self._signer, self._origin, self._clock())

    def flush(self) -> StoredCheckpoint | None:
        """Integrate everything committed before the call, then checkpoint (tests, CLI)."""
        while self.integrate() >= self.max_batch:
            pass
        return self.checkpoint()

    def sequencer(self, *, interval: float = 0.05, checkpoint_interval: float = 1.0) -> Sequencer:
        return Sequencer(self, interval=interval, checkpoint_interval=checkpoint_interval)

    # ------------------------------------------------------------------ checkpoints

    def tree_size(self) -> int:
        with self._reads.connect() as c:
            size = self._store.state(c)[0]
        self._known_size = max(self._known_size, size)
        return size

    def queue_length(self) -> int:
        with self._reads.connect() as c:
            return self._store.queue_length(c)

    def latest_checkpoint(self) -> str:
        """The latest signed checkpoint note followed by its stored cosignature lines."""
        with self._reads.connect() as c:
            stored = self._store.latest_checkpoint(c)
        if stored is None:
            raise NotFound("the log has no checkpoint yet")
        return stored.text

    def add_cosignature(self, size: int, line: str) -> bool:
        """Verify a witness's tlog-cosignature/v1 line over our checkpoint of ``size`` and
        store it; False if that witness had already cosigned it.

        Raises ``NotFound`` (no such checkpoint), ``MalformedNote`` (not a signature line),
        ``UnverifiedNote`` (not a configured witness), ``InvalidSignature`` and
        ``FutureCosignature``.
        """
        size = _index(size, "size")
        with self._reads.connect() as c:
            stored = self._store.checkpoint_at(c, size)
        if stored is None:
            raise NotFound(f"the log has no checkpoint of size {size}")
        line = line if line.endswith("\n") else line + "\n"
        signature = parse_note(stored.note + line).signatures[-1]
        witness = self._witnesses.get((signature.name, signature.key_id))
        if witness is None:
            raise UnverifiedNote([signature])
        now_us = self._clock()
        verify_cosignature(stored.body, line, witness,
                           not_after=now_us // 1_000_000 + COSIGNATURE_CLOCK_SKEW)
        with UnitOfWork(self._writes) as uow:
            stored_now = self._store.store_cosignature(uow.c, size, witness.name, line, now_us)
            uow.commit()
        return stored_now

    # ------------------------------------------------------------------ proofs and entries

    def _current_size(self, c: Connection, at_least: int) -> int:
        """The tree size, read only when ``at_least`` exceeds the last size seen: a log never
        shrinks, so a size once read stays a valid lower bound (saves a round trip per proof)."""
        if at_least > self._known_size:
            self._known_size = max(self._known_size, self._store.state(c)[0])
        return self._known_size

    def _check_tree_size(self, c: Connection, tree_size: int) -> None:
        current = self._current_size(c, tree_size)
        if tree_size > current:
            raise InvalidInput(f"tree size {tree_size} is larger than the log's size {current}")

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof:
        """RFC 9162 §2.1.3.1 audit path, from stored nodes in one query."""
        leaf_index = _index(leaf_index, "leaf index")
        tree_size = _index(tree_size, "tree size")
        if leaf_index >= tree_size:
            raise merkle.IndexOutOfRange(leaf_index, tree_size)
        with self._reads.connect() as c:
            self._check_tree_size(c, tree_size)
            path = merkle.inclusion_proof(leaf_index, tree_size, SqlNodeReader(c))
        return InclusionProof(leaf_index, tree_size, tuple(path))

    def inclusion_proof_by_hash(self, leaf_hash: bytes, tree_size: int) -> InclusionProof:
        """Audit path of the first leaf with this leaf hash (RFC 6962 §4.5 get-proof-by-hash)."""
        if len(leaf_hash) != merkle.HASH_SIZE:
            raise merkle.MalformedHash("leaf hash", len(leaf_hash))
        tree_size = _index(tree_size, "tree size")
        with self._reads.connect() as c:
            self._check_tree_size(c, tree_size)
            index = self._store.leaf_index(c, bytes(leaf_hash), tree_size)
            if index is None:
                raise NotFound(f"no leaf with hash {leaf_hash.hex()} in the tree of size {tree_size}")
            path = merkle.inclusion_proof(index, tree_size, SqlNodeReader(c))
        return InclusionProof(index, tree_size, tuple(path))

    def consistency_proof(self, first: int, second: int) -> ConsistencyProof:
        """RFC 9162 §2.1.4.1 consistency proof, from stored nodes in one query."""
        first = _index(first, "first")
        second = _index(second, "second")
        if first > second:
            raise merkle.SizesOutOfOrder(first, second)
        with self._reads.connect() as c:
            self._check_tree_size(c, second)
            path = merkle.consistency_proof(first, second, SqlNodeReader(c))
        return ConsistencyProof(first, second, tuple(path))

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves ``start`` to ``end`` (exclusive), at most ``MAX_ENTRIES_PER_CALL`` of them and
        never beyond the current tree; the caller asks again from ``start + len(result)``."""
        start = _index(start, "start")
        end = _index(end, "end")
        if start >= end:
            raise InvalidInput(f"start ({start}) must be smaller than end ({end})")
        with self._reads.connect() as c:
            size = self._current_size(c, end)
            if start >= size:
                raise InvalidInput(f"start {start} is beyond the log's size {size}")
            return self._store.leaves(c, start, min(end, size, start + MAX_ENTRIES_PER_CALL))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Dispose the pools this log created (the main engine is the caller's)."""
        for own in (self._reads, self._writes):
            if own is not self._engine:
                own.dispose()


def _describe(exc: BaseException) -> str:
    """An error's class names only: driver messages carry SQL parameters (= leaf bytes)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc).__name__} ({type(exc.orig).__module__}.{type(exc.orig).__name__})"
    if isinstance(exc, TeleledgerError):
        return f"{type(exc).__name__}: {exc.message}"
    return type(exc).__name__


class Sequencer:
    """Background thread: integrate every ``interval`` seconds (at once again while a full batch
    was taken), checkpoint every ``checkpoint_interval`` seconds while the tree grows.

    Survives database errors (logs the error class, backs off up to ``max_backoff`` seconds,
    retries). Several processes may each run one against the same database.
    """

    def __init__(
        self,
        log: TransparencyLog,
        *,
        interval: float = 0.05,
        checkpoint_interval: float = 1.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._log = log
        self._interval = interval
        self._checkpoint_interval = checkpoint_interval
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_checkpoint = 0.0
        self.failures = 0  # consecutive failed rounds, for health checks

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            raise RuntimeError("the sequencer is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="teleledger-sequencer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop and wait for it (it finishes the round it is in)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"the sequencer did not stop within {timeout} s")

    def __enter__(self) -> Sequencer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def run_once(self) -> int:
        """One round: integrate a batch; checkpoint if one is due. Returns entries integrated."""
        added = self._log.integrate()
        now = time.monotonic()
        if now >= self._next_checkpoint:
            self._log.checkpoint()
            self._next_checkpoint = now + self._checkpoint_interval
        return added

    def round(self) -> float:
        """One guarded round: run it, survive any error (logged by class only, backed off);
        returns how long to wait before the next. Used by the thread and by the app's
        event-loop task alike."""
        try:
            added = self.run_once()
        except Exception as exc:  # noqa: BLE001 - the sequencer must outlive any one error
            self.failures += 1
            delay = min(self._max_backoff, self._interval * 2 ** min(self.failures, 16))
            log.warning("log sequencer round failed: %s; retrying in %.2f s", _describe(exc), delay)
            return delay
        if self.failures:
            log.info("log sequencer recovered after %d failed rounds", self.failures)
        self.failures = 0
        return 0.0 if added >= self._log.max_batch else self._interval

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.round())
