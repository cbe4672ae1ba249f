"""The transparency log in SQL: tables, the sequencer's integrate step, checkpoints and reads.

Trillian's design: an entry is *queued* inside the caller's transaction (so a change and its
log entry commit together or not at all) and *sequenced* later, in one place at a time, by
``SqlLogStore.integrate``. The Merkle math lives in ``merkle``; this module only moves hashes
between it and the database. It must never log or print entry bytes.

Tables (all on ``teleledger.storage.tables.metadata``; integers are µs since the epoch, UTC)
-------------------------------------------------------------------------------------------

    log_queue         id (autoincrement PK), leaf (bytes), queued (µs)
                      entries committed but not yet in the tree; ``append`` inserts here
    log_state         id (PK, always 1), size, root_hash (32 bytes), updated (µs)
                      the one row holding the tree size and root: reading the size is O(1);
                      absent until the first integration (= size 0, empty root)
    log_leaves        idx (PK), leaf (bytes), leaf_hash (32 bytes, indexed)
                      leaf ``idx`` of the tree; ``leaf_hash`` = SHA-256(0x00 || leaf)
    log_nodes         (level, idx) (PK), hash (32 bytes)              -- WITHOUT ROWID on SQLite
                      every perfect subtree of level >= 1 (see ``merkle``); level 0 is not
                      duplicated here: the node (0, i) is ``log_leaves.leaf_hash`` of leaf i
    log_checkpoints   size (PK), root_hash, note (the signed note text), created (µs)
                      one signed C2SP checkpoint per tree size the log committed to
    log_cosignatures  (size → log_checkpoints, witness_name) (PK), line, created (µs)
                      verified witness cosignature lines (tlog-cosignature) per checkpoint

Every row is insert-only except ``log_state`` (updated once per integration) and
``log_queue`` (rows deleted when they are sequenced).

Concurrency
-----------

``integrate`` runs in one transaction that first takes the sequencer lock: on PostgreSQL the
transaction-scoped advisory lock ``SEQUENCER_LOCK``; on SQLite the ``BEGIN IMMEDIATE`` of
every unit of work already serializes writers. Under the lock it reads ``log_state``, takes
queued rows in id order with one ``DELETE … RETURNING`` (so exactly the rows it read are
removed, even if a row with a lower id commits meanwhile on PostgreSQL), assigns contiguous
indexes from the current size and bulk-inserts leaves and nodes. The ``log_state`` update
insists on the size it read, and ``log_leaves.idx`` is a primary key: two sequencers that
somehow raced would fail and roll back, never duplicate or skip an index.

The compact range (right edge of the tree) is cached in memory keyed by (size, root) and
re-read from ``log_nodes`` whenever ``log_state`` says otherwise, because several processes
may integrate into one database. Before signing a checkpoint the stored root is re-derived
from the stored nodes and proven consistent with the previous checkpoint (``LogCorrupted``
otherwise): the log never signs a fork of what it signed before.

Connections
-----------

Appends use the caller's connection. The sequencer and the public read paths get pools of
their own (``sequencer_engine``, ``read_only_engine``), so that neither waits behind — nor
takes connections or locks from — the application's writers: on SQLite reads never take the
write lock and the sequencer polls for it instead of sleeping in SQLite's busy handler; on
PostgreSQL both get small separate pools (reads in read-only sessions).

Errors
------

    TeleledgerError
    ├── LogCorrupted        500  stored state and stored nodes disagree; nothing is signed
    └── SequencerConflict   500  log_state changed under the sequencer lock (rolled back)
"""

from __future__ import annotations

import sqlite3
import threading
import time
from functools import lru_cache
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import TextClause

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.log import merkle
from teleledger.ledger.log.merkle import EMPTY_ROOT, CompactRange, NodeKey
from teleledger.ledger.log.note import Checkpoint, Signer, append_signature_lines, sign_note
from teleledger.storage import group_commit
from teleledger.storage.db import UnitOfWork, run_many, sqlite_pragmas
from teleledger.storage.tables import metadata

__all__ = [
    "CHECKPOINT_LOCK",
    "SEQUENCER_LOCK",
    "LogCorrupted",
    "SequencerConflict",
    "SqlLogStore",
    "SqlNodeReader",
    "StoredCheckpoint",
    "log_checkpoints",
    "log_cosignatures",
    "log_leaves",
    "log_nodes",
    "log_queue",
    "log_state",
    "read_only_engine",
    "sequencer_engine",
]

#: pg_advisory_xact_lock keys ("9162" for RFC 9162); migrations use 7401.
SEQUENCER_LOCK = 9162_0001
CHECKPOINT_LOCK = 9162_0002

# BIGINT on PostgreSQL; INTEGER on SQLite so that the primary key is the rowid (no extra index)
_BigId = BigInteger().with_variant(Integer(), "sqlite")

log_queue = Table(
    "log_queue",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("leaf", LargeBinary, nullable=False),
    Column("queued", BigInteger, nullable=False),
    sqlite_autoincrement=True,  # ids never reused after the queue drains: easier to trace
)

log_state = Table(
    "log_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("root_hash", LargeBinary, nullable=False),
    Column("updated", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="ck_log_state_singleton"),
)

log_leaves = Table(
    "log_leaves",
    metadata,
    Column("idx", _BigId, primary_key=True, autoincrement=False),
    Column("leaf", LargeBinary, nullable=False),
    Column("leaf_hash", LargeBinary, nullable=False),
    Index("ix_log_leaves_hash", "leaf_hash"),
)

log_nodes = Table(
    "log_nodes",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

log_checkpoints = Table(
    "log_checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary, nullable=False),
    Column("note", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
)

log_cosignatures = Table(
    "log_cosignatures",
    metadata,
    Column("size", BigInteger, ForeignKey("log_checkpoints.size"), primary_key=True,
           autoincrement=False),
    Column("witness_name", String(255), primary_key=True),
    Column("line", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
)


# Statements run on every append, proof or sequencer round, built once (they are immutable).
_APPEND = insert(log_queue).values(leaf=bindparam("leaf"), queued=bindparam("queued"))
_STATE = select(log_state.c.size, log_state.c.root_hash).where(log_state.c.id == 1)
_HAS_QUEUED = select(exists().select_from(log_queue))
_LAST_CHECKPOINT_SIZE = select(func.max(log_checkpoints.c.size))
_APPEND_SQL = "INSERT INTO log_queue (leaf, queued) VALUES (?, ?)"
#: batches up to this size are queued with plain inserts, larger ones with ``_bulk_insert``
_SMALL_BATCH = 16
_LEAF_INDEX = select(func.min(log_leaves.c.idx)).where(
    log_leaves.c.leaf_hash == bindparam("leaf_hash"), log_leaves.c.idx < bindparam("tree_size"))


class LogCorrupted(TeleledgerError):
    """The stored tree head does not follow from the stored nodes: refuse to sign anything."""

    status = 500
    issue_code = "exception"


class SequencerConflict(TeleledgerError):
    """``log_state`` moved while this sequencer held the lock: a second, unlocked writer."""

    status = 500
    issue_code = "exception"


def _now_us() -> int:
    return time.time_ns() // 1000


def _sqlite_file(engine: Engine) -> bool:
    url = engine.url
    database = str(url.database or "")
    return url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and (
        not database.startswith("file:"))


def read_only_engine(engine: Engine) -> Engine:
    """An engine for the log's read paths (public, unauthenticated proof endpoints), so that
    however hard they are hammered they neither take connections from the application's pool
    nor hold its locks.

    On a SQLite file: a second small pool on the same file whose connections run each SELECT
    as its own WAL snapshot (no ``BEGIN IMMEDIATE``, so a reader never takes the write lock
    and cannot stall appends) and are ``query_only``. On PostgreSQL: a small pool of
    ``default_transaction_read_only`` sessions. In-memory SQLite: ``engine`` itself. The
    caller disposes an engine this created.
    """
    if engine.dialect.name == "postgresql":
        return create_engine(engine.url, pool_size=4, max_overflow=8, pool_pre_ping=True,
                             connect_args={"options": "-c default_transaction_read_only=on"})
    if not _sqlite_file(engine):
        return engine
    reads = create_engine(engine.url, connect_args={"check_same_thread": False, "timeout": 30},
                          pool_size=8, max_overflow=8)

    sqlite_pragmas(reads, query_only=True)

    return reads


def sequencer_engine(engine: Engine, *, poll: float = 0.0005, timeout: float = 30.0) -> Engine:
    """An engine for the sequencer's own transactions (integrate, checkpoint, cosignatures).

    On a SQLite file under group commit (every engine ``storage.db.make_engine`` makes): the
    main engine itself — the sequencer's transactions queue on the process's write lock and
    join groups like every other writer, which is fair without polling. On any other SQLite
    file engine: one or two connections to the same file, with the main engine's
    ``synchronous`` level, that take the write lock by retrying ``BEGIN IMMEDIATE`` every
    ``poll`` seconds. SQLite's busy handler — what every other writer waits in — sleeps 1, 2,
    5 … 100 ms between attempts, so under a few dozen writers the single sequencer thread was
    starved for the whole of a 10 s benchmark; polling gives its short, periodic transactions
    the lock between two writers instead.

    On PostgreSQL: a pool of two connections of its own, so that the sequencer never waits
    behind application threads for a connection of the main pool (with 64 writers on a pool of
    32 it was starved there). In-memory SQLite: ``engine`` itself.
    """
    if engine.dialect.name == "postgresql":
        return create_engine(engine.url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    if not _sqlite_file(engine) or group_commit.group_of(engine) is not None:
        # under group commit the sequencer queues on the process's write lock like every
        # other writer (its transactions join the group), which is fair without polling
        return engine
    probe = engine.raw_connection()  # a pooled DBAPI connection: no SQLAlchemy BEGIN
    try:
        cur = probe.driver_connection.cursor()  # type: ignore[union-attr]
        synchronous = int(cur.execute("PRAGMA synchronous").fetchone()[0])
        cur.close()
    finally:
        probe.close()
    writes = create_engine(engine.url, connect_args={"check_same_thread": False, "timeout": 0},
                           pool_size=2, max_overflow=2)

    sqlite_pragmas(writes, synchronous=synchronous, busy_timeout_ms=0)  # we poll below instead

    @event.listens_for(writes, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        driver = conn.connection.driver_connection
        deadline = time.monotonic() + timeout
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    # the SQLAlchemy error, so that UnitOfWork reports StorageUnavailable
                    raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
                time.sleep(poll)

    return writes


# --------------------------------------------------------------------------- node reads


class SqlNodeReader:
    """``merkle.NodeReader`` over ``log_leaves`` (level 0) and ``log_nodes`` (level >= 1).

    ``get_nodes`` is one statement, one round trip: the leaves by primary key ``UNION ALL``
    the nodes by ``(level = ? AND idx IN (…)) OR …`` — one group per level, which SQLite runs
    as a MULTI-INDEX OR and PostgreSQL as a BitmapOr of primary-key probes (a row-value
    ``(level, idx) IN (VALUES …)`` makes SQLite scan the table). The SQL text depends only on
    the shape of the request, so it is built once per shape (building SQLAlchemy expressions
    per proof cost more than running the query).
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        leaves: list[int] = []
        levels: dict[int, list[int]] = {}
        for level, idx in keys:
            if level == 0:
                leaves.append(idx)
            else:
                levels.setdefault(level, []).append(idx)
        if not leaves and not levels:
            return {}
        groups = sorted(levels.items())
        params: dict[str, int] = {f"a{i}": idx for i, idx in enumerate(leaves)}
        for g, (level, ids) in enumerate(groups):
            params[f"l{g}"] = level
            params.update((f"n{g}_{i}", idx) for i, idx in enumerate(ids))
        stmt = _nodes_query(len(leaves), tuple(len(ids) for _, ids in groups))
        return {(int(level), int(idx)): bytes(digest)
                for level, idx, digest in self._conn.execute(stmt, params)}


@lru_cache(maxsize=4096)
def _nodes_query(leaf_count: int, group_sizes: tuple[int, ...]) -> TextClause:
    parts = []
    if leaf_count:
        binds = ", ".join(f":a{i}" for i in range(leaf_count))
        parts.append(f"SELECT 0 AS level, idx, leaf_hash AS hash FROM log_leaves WHERE idx IN ({binds})")
    if group_sizes:
        ors = " OR ".join(
            f"(level = :l{g} AND idx IN ({', '.join(f':n{g}_{i}' for i in range(n))}))"
            for g, n in enumerate(group_sizes)
        )
        parts.append(f"SELECT level, idx, hash FROM log_nodes WHERE {ors}")
    return text(" UNION ALL ".join(parts))


def _bulk_insert(conn: Connection, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Insert many rows below SQLAlchemy: its per-row parameter processing costs more than the
    inserts. PostgreSQL: ``COPY … FROM STDIN`` on the transaction's own connection; SQLite:
    the driver's ``executemany``."""
    if not rows:
        return
    names = ", ".join(columns)
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
    else:
        marks = ", ".join("?" for _ in columns)
        run_many(conn, f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A checkpoint the log signed, with the witness cosignature lines stored for it."""

    size: int
    root_hash: bytes
    note: str
    created: int
    cosignatures: tuple[str, ...] = ()

    @property
    def body(self) -> str:
        """The checkpoint body (the note text without signature lines)."""
        return self.note[: self.note.rindex("\n\n") + 1]

    @property
    def text(self) -> str:
        """The signed note followed by every stored cosignature line."""
        return append_signature_lines(self.note, self.cosignatures) if self.cosignatures else self.note


# --------------------------------------------------------------------------- the store


class SqlLogStore:
    """SQL side of the log. Stateless but for the compact-range cache; thread-safe."""

    def __init__(self, *, clock: Callable[[], int] = _now_us) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, bytes, CompactRange] | None = None

    # ---- queue (in the caller's transaction)

    def append(self, conn: Connection, entry: bytes) -> None:
        """Queue one leaf in the caller's transaction: it is durable when the caller commits."""
        conn.execute(_APPEND, {"leaf": entry, "queued": self._clock()})

    def append_many(self, conn: Connection, entries: Sequence[bytes]) -> None:
        now = self._clock()
        rows = [(bytes(e), now) for e in entries]
        if len(rows) <= _SMALL_BATCH:
            # a request's one or two entries: a plain insert beats setting up a COPY
            run_many(conn, _APPEND_SQL, rows)
        else:
            _bulk_insert(conn, "log_queue", ("leaf", "queued"), rows)

    # ---- reads

    @staticmethod
    def state(conn: Connection) -> tuple[int, bytes]:
        """(tree size, root hash); (0, empty root) before the first integration."""
        row = conn.execute(_STATE).first()
        return (0, EMPTY_ROOT) if row is None else (int(row[0]), bytes(row[1]))

    @staticmethod
    def has_queued(conn: Connection) -> bool:
        return bool(conn.execute(_HAS_QUEUED).scalar())

    @staticmethod
    def queue_length(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(log_queue)).scalar_one())

    @staticmethod
    def leaf_index(conn: Connection, leaf_hash: bytes, tree_size: int) -> int | None:
        """Lowest index < ``tree_size`` of a leaf with this hash, or None."""
        value = conn.execute(_LEAF_INDEX, {"leaf_hash": leaf_hash, "tree_size": tree_size}).scalar()
        return None if value is None else int(value)

    @staticmethod
    def leaves(conn: Connection, start: int, end: int) -> list[bytes]:
        rows = conn.execute(
            select(log_leaves.c.idx, log_leaves.c.leaf)
            .where(log_leaves.c.idx >= start, log_leaves.c.idx < end)
            .order_by(log_leaves.c.idx)
        ).all()
        if len(rows) != end - start or (rows and int(rows[0][0]) != start):
            raise LogCorrupted(f"leaves [{start}, {end}) are not all stored")
        return [bytes(leaf) for _, leaf in rows]

    # ---- sequencing

    def _compact_range(self, conn: Connection, size: int, root: bytes) -> CompactRange:
        with self._lock:
            cached = self._cached
        if cached is not None and cached[0] == size and cached[1] == root:
            return cached[2].copy()
        compact = CompactRange.from_nodes(size, SqlNodeReader(conn))
        if compact.root() != root:
            raise LogCorrupted(
                f"log_state says the root of size {size} is {root.hex()}, "
                f"its stored nodes fold to {compact.root().hex()}"
            )
        return compact

    def integrate(self, engine: Engine, *, max_batch: int = 50_000) -> int:
        """Sequence up to ``max_batch`` queued entries in one transaction; return how many."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        with UnitOfWork(engine) as uow:
            c = uow.c
            if c.dialect.name == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEQUENCER_LOCK})
            taken = c.execute(
                delete(log_queue)
                .where(log_queue.c.id.in_(
                    select(log_queue.c.id).order_by(log_queue.c.id).limit(max_batch)))
                .returning(log_queue.c.id, log_queue.c.leaf)
            ).all()
            if not taken:
                return 0
            taken.sort(key=lambda row: row[0])  # RETURNING order is unspecified
            row = c.execute(_STATE).first()
            size, root = (0, EMPTY_ROOT) if row is None else (int(row[0]), bytes(row[1]))
            compact = self._compact_range(c, size, root)

            leaf_rows: list[tuple[int, bytes, bytes]] = []
            node_rows: list[tuple[int, int, bytes]] = []
            idx = size
            for _, leaf in taken:
                leaf = bytes(leaf)
                digest = merkle.leaf_hash(leaf)
                leaf_rows.append((idx, leaf, digest))
                for level, index, node in compact.append(digest):
                    if level:
                        node_rows.append((level, index, node))
                idx += 1
            _bulk_insert(c, "log_leaves", ("idx", "leaf", "leaf_hash"), leaf_rows)
            _bulk_insert(c, "log_nodes", ("level", "idx", "hash"), node_rows)

            new_root = compact.root()
            values = {"size": compact.size, "root_hash": new_root, "updated": self._clock()}
            if row is None:
                c.execute(insert(log_state).values(id=1, **values))
            else:
                moved = c.execute(update(log_state)
                                  .where(log_state.c.id == 1, log_state.c.size == size)
                                  .values(**values)).rowcount
                if moved != 1:
                    raise SequencerConflict(
                        f"log_state moved from size {size} under the sequencer lock"
                    )
            uow.commit()
        with self._lock:
            self._cached = (compact.size, new_root, compact)
        return len(taken)

    # ---- checkpoints

    @staticmethod
    def last_checkpoint_size(conn: Connection) -> int | None:
        value = conn.execute(_LAST_CHECKPOINT_SIZE).scalar()
        return None if value is None else int(value)

    def checkpoint(
        self, engine: Engine, signer: Signer, origin: str, now: int
    ) -> StoredCheckpoint | None:
        """Sign and store a checkpoint of the current tree if it grew since the last one.

        Before signing, the stored root is checked against the stored nodes and, when there
        is an earlier checkpoint, a consistency proof from it is verified: the log never signs
        a head that does not extend what it already signed. ``now`` is µs (``created``).
        """
        with UnitOfWork(engine) as uow:
            c = uow.c
            if c.dialect.name == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHECKPOINT_LOCK})
            size, root = self.state(c)
            previous = c.execute(
                select(log_checkpoints.c.size, log_checkpoints.c.root_hash)
                .order_by(log_checkpoints.c.size.desc()).limit(1)
            ).first()
            if size == 0 or (previous is not None and size <= int(previous[0])):
                return None
            reader = SqlNodeReader(c)
            try:
                folded = CompactRange.from_nodes(size, reader).root()
                if folded != root:
                    raise merkle.RootMismatch(root, folded, what="stored root")
                if previous is not None:
                    old_size, old_root = int(previous[0]), bytes(previous[1])
                    proof = merkle.consistency_proof(old_size, size, reader)
                    merkle.verify_consistency(old_size, size, old_root, root, proof)
            except merkle.ProofError as exc:
                raise LogCorrupted(f"refusing to sign a checkpoint of size {size}: {exc}") from exc
            note = sign_note(Checkpoint(origin, size, root).to_body(), [signer])
            c.execute(insert(log_checkpoints).values(size=size, root_hash=root, note=note,
                                                     created=now))
            uow.commit()
        return StoredCheckpoint(size, root, note, now)

    @staticmethod
    def _with_cosignatures(conn: Connection, row: Mapping | None) -> StoredCheckpoint | None:
        if row is None:
            return None
        lines = conn.execute(
            select(log_cosignatures.c.line).where(log_cosignatures.c.size == row["size"])
            .order_by(log_cosignatures.c.witness_name)
        ).scalars().all()
        return StoredCheckpoint(int(row["size"]), bytes(row["root_hash"]), row["note"],
                                int(row["created"]), tuple(lines))

    def latest_checkpoint(self, conn: Connection) -> StoredCheckpoint | None:
        row = conn.execute(select(log_checkpoints).order_by(log_checkpoints.c.size.desc())
                           .limit(1)).mappings().first()
        return self._with_cosignatures(conn, row)

    def checkpoint_at(self, conn: Connection, size: int) -> StoredCheckpoint | None:
        row = conn.execute(select(log_checkpoints).where(log_checkpoints.c.size == size)
                           ).mappings().first()
        return self._with_cosignatures(conn, row)

    @staticmethod
    def store_cosignature(conn: Connection, size: int, witness_name: str, line: str,
                          created: int) -> bool:
        """Store a (verified) cosignature line; False when this witness already cosigned."""
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = (dialect.insert(log_cosignatures)
                .values(size=size, witness_name=witness_name, line=line, created=created)
                .on_conflict_do_nothing()
                .returning(log_cosignatures.c.size))  # rowcount is not reliable for upserts
        return conn.execute(stmt).first() is not None

