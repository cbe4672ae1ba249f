"""Database engines, migrations and the unit of work.

SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` for every unit of work, so two writers never
deadlock on a lock upgrade and a reader never blocks a writer; PostgreSQL runs at READ COMMITTED
with row locks where a use case needs them. Nothing here is created at import time.

``run`` / ``run_many`` execute a fixed SQL text on the unit of work's own driver connection,
below SQLAlchemy: the hot paths of the record store issue a dozen short statements per request,
and SQLAlchemy's per-statement work (cache key, parameter processing, result set-up) cost
several times what SQLite needs to run them. Driver errors are translated to SQLAlchemy's
exception classes, so ``UnitOfWork`` reports them exactly as it reports any other.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, SQLAlchemyError

from teleledger.core.errors import ConfigurationError, InvalidInput, TeleledgerError
from teleledger.storage import group_commit, tables

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0012"

#: WAL pages between SQLite's automatic checkpoints. A checkpoint runs inside the commit that
#: crosses the mark, fsyncs the WAL and the database, and holds up the event loop meanwhile
#: (instance interactions run there); at ~23 pages a write, SQLite's default of 1,000 meant
#: a checkpoint every ~40 writes. Durability is unchanged: a commit is durable in the WAL.
WAL_AUTOCHECKPOINT_PAGES = 4000


class StorageUnavailable(TeleledgerError):
    status = 503
    issue_code = "transient"


class WriteLockBusy(Exception):  # noqa: N818 - not an error: a signal to the caller of fail_fast
    """SQLite's write lock was held elsewhere when a unit of work under ``fail_fast`` began.

    Deliberately not a ``TeleledgerError``: no use case may catch it; it unwinds to whoever
    entered ``fail_fast``, before anything was read or written.
    """


# set by ``fail_fast``: [True] until the first unit of work of the block has begun
_FAIL_FAST: ContextVar[list[bool] | None] = ContextVar("teleledger_fail_fast", default=None)


# set by ``on_this_loop``: units that commit there leave their group open and are listed here
_DEFERRED: ContextVar[list[tuple[Any, Any, list]] | None] = ContextVar("teleledger_deferred", default=None)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Inside the block, the *first* unit of work to begin on SQLite raises ``WriteLockBusy``
    instead of waiting when another connection holds the write lock; later ones wait as usual
    (the first may have committed: repeating the block would repeat it)."""
    token = _FAIL_FAST.set([True])
    try:
        yield
    finally:
        _FAIL_FAST.reset(token)


async def on_this_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` — short, synchronous, using units of work — right here on the event loop,
    under ``fail_fast`` (its first unit raises ``WriteLockBusy`` instead of waiting), and
    return its result once everything it committed is durable.

    On a SQLite file the loop's requests share commits: a unit's ``commit()`` inside ``fn``
    leaves its work in the open group and returns; this coroutine then awaits the group's
    commit, which runs once the loop has served the requests already ready (they join the
    same group) — one commit for all of them, and nobody acknowledged before it.
    """
    pending: list[tuple[Any, Any, list]] = []
    token = _DEFERRED.set(pending)
    try:
        with fail_fast():
            result = fn(*args, **kwargs)
    except BaseException:
        _DEFERRED.reset(token)
        await _durable(pending, quiet=True)
        raise
    _DEFERRED.reset(token)
    await _durable(pending)
    return result


async def write_lock_released(engine: Engine, timeout_s: float) -> None:
    """After ``WriteLockBusy``: wait until this process's write lock is released (group commit
    on a SQLite file) or ``timeout_s`` has passed, whichever comes first."""
    group = group_commit.group_of(engine)
    if group is None:
        await asyncio.sleep(timeout_s)
    else:
        await group.when_free(timeout_s)


async def _durable(pending: list[tuple[Any, Any, list]], *, quiet: bool = False) -> None:
    failed: BaseException | None = None
    for group_commit_, group, callbacks in pending:
        try:
            await group_commit_.durable(group)
        except group_commit.GroupCommitError as exc:
            failed = failed or exc
            continue
        for fn in callbacks:
            fn()
    if failed is not None and not quiet:
        raise StorageUnavailable(
            "the database could not store the change (nothing was stored); try again") from failed


def sqlite_pragmas(engine: Engine, *, synchronous: str | int | None = None, query_only: bool = False,
                   busy_timeout_ms: int = 30000, wal_autocheckpoint: int | None = None,
                   configure=None) -> None:  # type: ignore[no-untyped-def]
    """Configure every new SQLite connection of ``engine``: the driver never issues BEGIN (each
    caller picks DEFERRED or IMMEDIATE itself), WAL for writers, read-only for readers.
    ``configure`` is an extra ``f(dbapi_conn)`` for a caller's own driver settings."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        if configure is not None:
            configure(dbapi_conn)
        cur = dbapi_conn.cursor()
        if query_only:
            cur.execute("PRAGMA query_only=ON")
        else:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
        if synchronous is not None:
            cur.execute(f"PRAGMA synchronous={synchronous}")
        # statement journals (a savepoint's copies of the pages it changes: group commit's
        # units) and temporary tables in memory; on disk they were ~30 KB of temp-file writes
        # per FHIR write once a unit's journal passed SQLite's 64 KiB spill threshold
        cur.execute("PRAGMA temp_store=MEMORY")
        if wal_autocheckpoint is not None:
            cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()


def _sqlite_file_url(url: str) -> bool:
    database = url.split("///", 1)[1] if "///" in url else ""
    return database not in ("", ":memory:") and not database.startswith("file:")


def _begin_immediate(conn: Connection, first: list[bool] | None) -> None:
    """``BEGIN IMMEDIATE`` on the driver (SQLAlchemy's statement machinery cost more than the
    statement); ``first``: the unfinished flag of a ``fail_fast`` block, whose first unit
    raises ``WriteLockBusy`` instead of waiting."""
    driver = conn.connection.driver_connection
    if first is None:
        try:
            driver.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(conn, "BEGIN IMMEDIATE", (), exc) from exc
        return
    first[0] = False
    driver.execute("PRAGMA busy_timeout=0")
    try:
        driver.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise WriteLockBusy from None
    finally:
        driver.execute("PRAGMA busy_timeout=30000")


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL") -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=16,
        )

        # NORMAL in WAL mode: a commit survives a process crash (kill -9); FULL also survives
        # power loss at one fsync per commit (TELELEDGER_SQLITE_SYNCHRONOUS=FULL)
        sqlite_pragmas(engine, synchronous=sqlite_synchronous, wal_autocheckpoint=WAL_AUTOCHECKPOINT_PAGES)

        group = group_commit.install(engine) if _sqlite_file_url(url) else None

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            if group_commit.begun_by_group(conn):
                return  # the group's own BEGIN IMMEDIATE, already issued
            first = _FAIL_FAST.get()
            fail_fast_first = first is not None and first[0]
            if group is not None:
                # any other transaction of this process queues on the group's lock too
                try:
                    group_commit.hold(group, conn, fail_fast=fail_fast_first)
                except group_commit.LockBusy:
                    raise WriteLockBusy from None
            try:
                _begin_immediate(conn, first if fail_fast_first else None)
            except BaseException:
                if group is not None and conn.info.pop(group_commit.HOLD, False):
                    group.release()
                raise

        return engine
    if url.startswith("postgresql"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)
    raise ConfigurationError(f"unsupported database URL scheme in {url.split(':', 1)[0]!r}: use sqlite or postgresql")


class UnitOfWork:
    """One database transaction. Leaving the ``with`` block without ``commit()`` rolls back.

    On a SQLite file the unit is a member of the process's group commit
    (``storage.group_commit``): it runs in a savepoint of a transaction shared with the units
    queued behind it, and ``commit()`` returns once the shared commit has made it durable. The
    connection is the group's: after ``commit()`` the unit has none (``c`` asserts).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.conn: Connection | None = None
        self._tx = None
        self._after_commit: list = []
        self._group: group_commit.GroupCommit | None = None

    def __enter__(self) -> UnitOfWork:
        group = group_commit.group_of(self._engine)
        if group is not None:
            self._enter_group(group)
            return self
        try:
            self.conn = self._engine.connect()
            self._tx = self.conn.begin()
        except OperationalError as exc:
            if self.conn is not None:
                self.conn.close()
            raise StorageUnavailable("the database is not reachable; try again shortly") from exc
        except BaseException:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            raise
        return self

    def _enter_group(self, group: group_commit.GroupCommit) -> None:
        first = _FAIL_FAST.get()
        fail_fast_first = first is not None and first[0]
        try:
            group.acquire(fail_fast=fail_fast_first)
        except group_commit.LockBusy:
            raise WriteLockBusy from None
        except OperationalError as exc:
            raise StorageUnavailable("the database is busy; try again shortly") from exc
        try:
            self.conn = group.join(fail_fast=fail_fast_first)
        except group_commit.LockBusy:
            group.release()
            raise WriteLockBusy from None
        except OperationalError as exc:
            group.release()
            raise StorageUnavailable("the database is not reachable; try again shortly") from exc
        except BaseException:
            group.release()
            raise
        if first is not None:
            first[0] = False
        self._group = group

    @property
    def c(self) -> Connection:
        assert self.conn is not None, "unit of work used outside its with block"
        return self.conn

    def after_commit(self, fn) -> None:  # type: ignore[no-untyped-def]
        self._after_commit.append(fn)

    def commit(self) -> None:
        group = self._group
        if group is not None:
            self._group = None
            self.conn = None
            deferred = _DEFERRED.get()
            try:
                open_group = group.leave(succeeded=True, fail_fast=_FAIL_FAST.get() is not None,
                                         defer=deferred is not None)
            except group_commit.GroupCommitError as exc:
                raise StorageUnavailable(
                    "the database could not store the change (nothing was stored); try again") from exc
            if open_group is not None:
                assert deferred is not None
                callbacks, self._after_commit = self._after_commit, []
                deferred.append((group, open_group, callbacks))  # on_this_loop awaits it
                return
        else:
            assert self._tx is not None
            self._tx.commit()
            self._tx = None
        callbacks, self._after_commit = self._after_commit, []
        for fn in callbacks:
            fn()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        group = self._group
        if group is not None:
            self._group = None
            self.conn = None
            group.leave(succeeded=False, fail_fast=_FAIL_FAST.get() is not None)
        elif self.conn is not None:
            try:
                if self._tx is not None:
                    self._tx.rollback()
            finally:
                self.conn.close()
                self.conn = None
        if isinstance(exc, DataError):
            # a value the database cannot hold (NUL in text, number out of range): the client's input
            raise InvalidInput("a value in the request cannot be stored (out of range or invalid characters)") from exc
        if isinstance(exc, OperationalError) and "locked" not in str(exc.orig).lower():
            raise StorageUnavailable("the database is not reachable; try again shortly") from exc


@lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    # psycopg's placeholder is %s; none of our statements contains a literal %
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


def _translate(conn: Connection, sql: str, params: Any, exc: Exception) -> DBAPIError:
    dialect = conn.dialect
    dbapi_conn = conn.connection.dbapi_connection
    if dialect.is_disconnect(exc, dbapi_conn, None):  # type: ignore[arg-type]
        conn.invalidate(exc)
    return DBAPIError.instance(sql, params, exc, dialect.loaded_dbapi.Error)  # type: ignore[return-value]


def run(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """Execute one statement (``?`` placeholders) on ``conn``'s driver connection; returns the
    driver cursor (``fetchone`` / ``fetchall`` / ``rowcount``)."""
    if conn.dialect.name == "postgresql":
        sql = _pyformat(sql)
    driver = conn.connection.driver_connection
    try:
        return driver.execute(sql, params)  # type: ignore[union-attr]
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _translate(conn, sql, params, exc) from exc


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``run`` for many parameter rows (one prepared statement, ``executemany``)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        sql = _pyformat(sql)
    driver = conn.connection.driver_connection
    try:
        if len(rows) == 1:
            driver.execute(sql, rows[0])  # type: ignore[union-attr]
        else:
            cur = driver.cursor()  # type: ignore[union-attr]
            try:
                cur.executemany(sql, rows)
            finally:
                cur.close()
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _translate(conn, sql, rows, exc) from exc


def migrate(engine: Engine) -> None:
    """Bring the schema to head with Alembic (idempotent; safe for concurrent starts on PostgreSQL)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # several app processes may start at once: only one migrates
            conn.execute(text("SELECT pg_advisory_xact_lock(7401)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_state(engine: Engine) -> str:
    """'empty', 'current', or raise when the database is not ours or is newer than this code."""
    try:
        names = set(inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise ConfigurationError(f"cannot open the database: {exc.__class__.__name__}") from exc
    if not names:
        return "empty"
    if "alembic_version" not in names or "resources" not in names:
        raise ConfigurationError("this database is not a teleledger database (no teleledger tables found)")
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    known = {p.stem.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("*.py")}
    if version not in known:
        raise ConfigurationError(
            f"this database has schema version {version}, newer than this teleledger ({SCHEMA_HEAD}): upgrade teleledger"
        )
    return "current"


def get_meta(conn: Connection, key: str) -> bytes | None:
    return conn.execute(select(tables.node_meta.c.value).where(tables.node_meta.c.key == key)).scalar()


def set_meta(conn: Connection, key: str, value: bytes) -> None:
    conn.execute(tables.node_meta.insert().values(key=key, value=value))
