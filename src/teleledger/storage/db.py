"""Database engines, migrations and the unit of work.

SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` for every unit of work, so two writers never
deadlock on a lock upgrade and a reader never blocks a writer; PostgreSQL runs at READ COMMITTED
with row locks where a use case needs them. Nothing here is created at import time.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError

from teleledger.core.errors import ConfigurationError, InvalidInput, TeleledgerError
from teleledger.storage import tables

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0002"


class StorageUnavailable(TeleledgerError):
    status = 503
    issue_code = "transient"


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL") -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=16,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # let SQLAlchemy not manage BEGIN: we issue BEGIN IMMEDIATE ourselves (see below)
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (kill -9); FULL also survives
            # power loss at one fsync per commit (TELELEDGER_SQLITE_SYNCHRONOUS=FULL)
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)
    raise ConfigurationError(f"unsupported database URL scheme in {url.split(':', 1)[0]!r}: use sqlite or postgresql")


class UnitOfWork:
    """One database transaction. Leaving the ``with`` block without ``commit()`` rolls back."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.conn: Connection | None = None
        self._tx = None
        self._after_commit: list = []

    def __enter__(self) -> UnitOfWork:
        try:
            self.conn = self._engine.connect()
            self._tx = self.conn.begin()
        except OperationalError as exc:
            if self.conn is not None:
                self.conn.close()
            raise StorageUnavailable("the database is not reachable; try again shortly") from exc
        return self

    @property
    def c(self) -> Connection:
        assert self.conn is not None, "unit of work used outside its with block"
        return self.conn

    def after_commit(self, fn) -> None:  # type: ignore[no-untyped-def]
        self._after_commit.append(fn)

    def commit(self) -> None:
        assert self._tx is not None
        self._tx.commit()
        self._tx = None
        callbacks, self._after_commit = self._after_commit, []
        for fn in callbacks:
            fn()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self._tx is not None:
                self._tx.rollback()
        finally:
            assert self.conn is not None
            self.conn.close()
            self.conn = None
        if isinstance(exc, DataError):
            # a value the database cannot hold (NUL in text, number out of range): the client's input
            raise InvalidInput("a value in the request cannot be stored (out of range or invalid characters)") from exc
        if isinstance(exc, OperationalError) and "locked" not in str(exc.orig).lower():
            raise StorageUnavailable("the database is not reachable; try again shortly") from exc


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
