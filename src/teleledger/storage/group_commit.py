"""Group commit for a SQLite file: concurrent units of work share one transaction and one commit.

SQLite has one writer at a time, so the units of work of a process run one after another in
any case; what each of them used to pay on its own was the ``BEGIN IMMEDIATE`` / ``COMMIT`` pair
(a WAL append and, with ``synchronous=FULL``, an fsync) and, with many threads, SQLite's busy
handler, which sleeps 1, 2, 5 … 100 ms between attempts and so serves waiters neither fairly
nor promptly. Here the process's writers queue on one in-process lock instead, and run on one
shared connection:

* the first unit to arrive opens the transaction (``BEGIN IMMEDIATE``); each unit runs inside a
  ``SAVEPOINT`` of it, so a unit that fails is rolled back alone (``ROLLBACK TO``) and a unit
  that succeeds is released into the transaction;
* a unit that succeeded while others are queued behind it hands the lock on and waits; the
  unit that finds nobody queued (or the group already ``MAX_MEMBERS`` strong or
  ``MAX_AGE_S`` old) commits for the whole group and wakes it. Every unit's ``commit()``
  therefore returns only when its work is durable, as before — only the commit is shared;
* if that commit fails, every member of the group gets the error (nothing of theirs was
  stored, as with a failed commit of their own);
* a transaction on any other connection of the engine (``engine.connect()`` reads,
  ``engine.begin()``) takes the same lock first, commits a pending group, and keeps the lock
  until its transaction ends, so in-process writers never wait in SQLite's busy handler;
  other processes still do (the CLI beside a running server), as before.

Units see what earlier members of their group wrote before it is committed; they run one
after another on one connection, so the outcome is that of running them serially, and they
succeed or fail with the group. Readers on other connections see a group when it commits.

Not used on PostgreSQL, which shares WAL flushes between concurrent commits itself (its
``commit_delay`` / ``commit_siblings``), nor on in-memory SQLite. Written here because
SQLAlchemy and the sqlite3 module offer no group commit; the logic is the classic
leader/follower scheme of database engines, kept small.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import weakref
from typing import Any, cast

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import OperationalError

#: a group commits when it has this many members, even with more units queued
MAX_MEMBERS = 256
#: … or when it has been open this long (bounds the wait of its first member)
MAX_AGE_S = 0.010
#: how long a queued unit waits for the lock, or a member for its group's commit
WAIT_S = 60.0
#: between attempts at ``BEGIN IMMEDIATE`` while another process holds SQLite's lock
_POLL_S = 0.0002
_SAVEPOINT = "teleledger_unit"
HOLD = "teleledger_group_hold"


class GroupCommitError(Exception):
    """The commit shared by a group failed after this unit's work had joined it: the unit's
    work is not stored."""


class NestedUnitOfWork(RuntimeError):
    """A thread already inside a transaction on this database opened another one on it: on
    SQLite that transaction would wait for itself."""


class _Group:
    __slots__ = ("done", "members", "started", "error", "futures", "scheduled")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.members = 0
        self.started = time.monotonic()
        self.error: BaseException | None = None
        # members on an event loop awaiting the commit: (loop, future)
        self.futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.scheduled = False  # a loop callback will try to commit it


#: objects that cache what they read inside a transaction (``forget_uncommitted()``): if a
#: group's commit fails they may hold what a rolled-back member wrote, so they forget it all
_CACHES: weakref.WeakSet[Any] = weakref.WeakSet()


def forget_on_failure(cache: Any) -> None:
    """Register ``cache``: its ``forget_uncommitted()`` runs whenever a group's commit fails."""
    _CACHES.add(cache)


class GroupCommit:
    """The shared transaction of one engine (one per process and SQLite file)."""

    def __init__(self, engine: Engine, *, timeout_s: float = 30.0) -> None:
        self._engine_ref = weakref.ref(engine)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._mutex = threading.Lock()
        self._queued = 0
        self._owner: int | None = None
        self._conn: Connection | None = None
        self._pid = os.getpid()
        self._group: _Group | None = None
        self._savepoint = False  # whether the unit holding the lock runs in a savepoint
        # event-loop callers told the lock was busy, waiting for its release: (loop, future)
        self._free_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        #: shared commits made, and the units they made durable (their ratio: the group size)
        self.commits = 0
        self.committed_units = 0

    # ------------------------------------------------------------------ the lock

    def acquire(self, *, fail_fast: bool) -> None:
        """Take the process's write lock; ``fail_fast``: raise ``LockBusy`` instead of waiting."""
        me = threading.get_ident()
        if self._owner == me:
            raise NestedUnitOfWork(
                "a transaction was opened on this SQLite database by a thread already inside one")
        if fail_fast:
            if not self._lock.acquire(blocking=False):
                raise LockBusy
        else:
            with self._mutex:
                self._queued += 1
            try:
                if not self._lock.acquire(timeout=WAIT_S):
                    raise OperationalError("group commit lock", None,
                                           sqlite3.OperationalError("database is locked"))
            finally:
                with self._mutex:
                    self._queued -= 1
        self._owner = me

    def release(self) -> None:
        self._owner = None
        self._lock.release()
        if self._free_waiters:
            with self._mutex:
                waiters, self._free_waiters = self._free_waiters, []
            _wake(waiters, None)

    def when_free(self, timeout_s: float) -> asyncio.Future[None]:
        """A future of the running loop that completes when the lock is next released, or
        after ``timeout_s`` (a busy database may be another process's doing: nobody here
        would release anything). Lets requests on the loop wait for a thread's unit without
        polling — and then all run in the same turn of the loop, in one group."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._mutex:
            self._free_waiters.append((loop, future))
        if not self._lock.locked():  # released before we were listed
            _settle(future, None)
        else:
            loop.call_later(timeout_s, _settle, future, None)
        return future

    def _nobody_waiting(self) -> bool:
        with self._mutex:
            return self._queued == 0

    # ------------------------------------------------------------------ members

    def connection(self) -> Connection:
        """The shared connection (lock held); opened on first use, and again after a fork."""
        if self._conn is None or self._pid != os.getpid():
            engine = self._engine_ref()
            assert engine is not None, "engine gone"
            self._conn = engine.connect()
            self._conn.info[_GROUP_CONNECTION] = True
            self._pid = os.getpid()
            self._group = None
        return self._conn

    def join(self, *, fail_fast: bool) -> Connection:
        """Begin a unit (lock held): open the group's transaction if none is open, then a
        savepoint for this unit. On error the caller releases the lock.

        The first unit of a group needs no savepoint — if it fails, the whole transaction
        holds nothing else and is rolled back — which spares the uncontended case (the CLI,
        an import, a quiet server) SQLite's statement journal: a copy of every page the unit
        changes, which for a large import would be as large as the import."""
        conn = self.connection()
        if self._group is None:
            self._begin_immediate(conn, fail_fast=fail_fast)
            self._group = _Group()
            self._savepoint = False
            return conn
        driver = _driver(conn)
        driver.execute(f"SAVEPOINT {_SAVEPOINT}")
        self._savepoint = True
        return conn

    def _begin_immediate(self, conn: Connection, *, fail_fast: bool) -> None:
        """``BEGIN IMMEDIATE`` on the shared connection. In-process writers are queued on the
        lock already, so a busy database here is another process, or a connection of this one
        finishing its commit: poll briefly instead of sleeping in SQLite's busy handler
        (``fail_fast``: raise ``LockBusy`` at once)."""
        driver = _driver(conn)
        deadline = time.monotonic() + self._timeout_s
        conn.info[_BEGUN_BY_GROUP] = True
        try:
            while True:
                try:
                    driver.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    text = str(exc)
                    if "locked" not in text and "busy" not in text:
                        raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
                    if fail_fast:
                        raise LockBusy from None
                    if time.monotonic() > deadline:
                        raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
                    time.sleep(_POLL_S)
            conn.begin()  # SQLAlchemy's bookkeeping; the listener sees the flag and issues nothing
        finally:
            conn.info.pop(_BEGUN_BY_GROUP, None)

    def leave(self, *, succeeded: bool, fail_fast: bool, defer: bool = False) -> _Group | None:
        """End a unit (lock held; released here). ``succeeded``: release its savepoint into
        the group and return once the group's commit made it durable (``GroupCommitError`` if that
        commit failed); otherwise roll the unit back alone. ``fail_fast`` (the event loop)
        never blocks waiting for others: it commits the group itself — unless ``defer``: then
        a successful unit returns its still open group, and its caller awaits ``durable``."""
        conn = self._conn
        group = self._group
        assert conn is not None and group is not None
        driver = _driver(conn)
        mine = False
        try:
            if succeeded:
                if self._savepoint:
                    driver.execute(f"RELEASE {_SAVEPOINT}")
                group.members += 1
                mine = True
            elif not self._savepoint:
                # the group's first unit: nothing else is in the transaction, roll it all back
                assert group.members == 0
                self._end_group(group, None)
                self.release()
                return None
            elif driver.in_transaction:
                driver.execute(f"ROLLBACK TO {_SAVEPOINT}")
                driver.execute(f"RELEASE {_SAVEPOINT}")
        except BaseException as exc:
            self._end_group(group, exc)
            self.release()
            raise
        if not driver.in_transaction:
            # SQLite rolled the whole transaction back (disk full, I/O error): the group is lost
            lost = OperationalError("COMMIT", None, sqlite3.OperationalError(
                "the transaction was rolled back by the database"))
            self._end_group(group, lost)
            self.release()
            if mine:
                raise GroupCommitError from lost
            return None
        full = group.members >= MAX_MEMBERS or time.monotonic() - group.started >= MAX_AGE_S
        if mine and defer and not full:
            self.release()
            return group
        lead = fail_fast or full or group.members == 0 or self._nobody_waiting()
        if not lead:
            self.release()
            if mine:
                self._await(group)
            return None
        self._commit_group(group)
        self.release()
        if mine and group.error is not None:
            raise GroupCommitError from group.error
        return None

    # ------------------------------------------------------------------ event-loop members

    def durable(self, group: _Group) -> asyncio.Future[None]:
        """A future (of the running loop) that completes when ``group`` has committed, or
        fails with ``GroupCommitError``. Schedules a commit attempt for when the loop has run the
        callbacks already ready — the other requests of this turn of the loop join first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._mutex:
            if not group.done.is_set():
                group.futures.append((loop, future))
                schedule = not group.scheduled
                group.scheduled = True
            else:
                _settle(future, group.error)
                return future
        if schedule:
            loop.call_soon(self._commit_from_loop, group)
        return future

    def _commit_from_loop(self, group: _Group) -> None:
        if group.done.is_set():
            return
        try:
            self.acquire(fail_fast=True)
        except LockBusy:
            return  # a thread is in a unit: it, or the last one queued behind it, commits
        try:
            if self._group is group:
                self._commit_group(group)
        finally:
            self.release()

    def commit_pending(self) -> None:
        """Commit a group left open by members waiting for it (lock held) — before a
        transaction on another connection of this process needs SQLite's lock."""
        group = self._group
        if group is not None:
            self._commit_group(group)

    def _commit_group(self, group: _Group) -> None:
        assert self._conn is not None
        if group.members == 0:
            self._end_group(group, None)
            return
        try:
            self._conn.commit()
        except BaseException as exc:  # noqa: BLE001 - every member hears of it
            self._end_group(group, exc)
            return
        self.commits += 1
        self.committed_units += group.members
        self._end_group(group, None)

    def _end_group(self, group: _Group, error: BaseException | None) -> None:
        conn = self._conn
        if error is not None or group.members == 0:
            group.error = error
            try:
                if conn is not None:
                    conn.rollback()
            except Exception:  # noqa: BLE001 - the connection is discarded below
                self._discard()
        if error is not None:
            self._discard()
        self._group = None
        with self._mutex:
            group.done.set()
            futures, group.futures = group.futures, []
        if error is not None and group.members:
            for cache in list(_CACHES):
                cache.forget_uncommitted()
        _wake(futures, error)

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def _await(self, group: _Group) -> None:
        if not group.done.wait(WAIT_S):
            raise GroupCommitError("the group's commit did not happen in time")
        if group.error is not None:
            raise GroupCommitError from group.error

    def close(self) -> None:
        """The engine is being disposed: give back the shared connection."""
        with self._lock:
            if self._group is not None:
                self._commit_group(self._group)
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()


def _driver(conn: Connection) -> sqlite3.Connection:
    """The shared connection's sqlite3 connection (group commit exists only on SQLite)."""
    return cast(sqlite3.Connection, conn.connection.driver_connection)


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]],
          error: BaseException | None) -> None:
    """Settle futures of event loops from whichever thread we are on (on the loop's own
    thread directly: no wake-up write to the loop's self-pipe)."""
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    for loop, future in waiters:
        if loop is here:
            _settle(future, error)
            continue
        try:
            loop.call_soon_threadsafe(_settle, future, error)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        failed = GroupCommitError("the shared commit failed")
        failed.__cause__ = error
        future.set_exception(failed)


class LockBusy(Exception):  # noqa: N818 - a signal, translated to db.WriteLockBusy
    """The lock was held when a ``fail_fast`` caller asked for it."""


_GROUP_CONNECTION = "teleledger_group_connection"
_BEGUN_BY_GROUP = "teleledger_begun_by_group"
_GROUPS: weakref.WeakKeyDictionary[Engine, GroupCommit] = weakref.WeakKeyDictionary()


def group_of(engine: Engine) -> GroupCommit | None:
    return _GROUPS.get(engine)


def is_group_connection(conn: Connection) -> bool:
    return bool(conn.info.get(_GROUP_CONNECTION))


def begun_by_group(conn: Connection) -> bool:
    return bool(conn.info.get(_BEGUN_BY_GROUP))


def install(engine: Engine) -> GroupCommit:
    """Put ``engine`` (a SQLite file) under group commit; the engine's own ``begin`` listener
    calls ``hold`` for transactions on its other connections."""
    group = GroupCommit(engine)
    _GROUPS[engine] = group

    def _release_hold(record_info: dict) -> None:  # type: ignore[type-arg]
        if record_info.pop(HOLD, False):
            group.release()

    @event.listens_for(engine, "commit")
    def _commit(conn):  # type: ignore[no-untyped-def]
        if not is_group_connection(conn):
            _release_hold(conn.info)

    @event.listens_for(engine, "rollback")
    def _rollback(conn):  # type: ignore[no-untyped-def]
        if not is_group_connection(conn):
            _release_hold(conn.info)

    @event.listens_for(engine.pool, "checkin")
    def _checkin(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        if record is not None:
            _release_hold(record.info)

    @event.listens_for(engine.pool, "invalidate")
    def _invalidate(_dbapi_conn, record, _exc):  # type: ignore[no-untyped-def]
        if record is not None:
            _release_hold(record.info)

    @event.listens_for(engine, "engine_disposed")
    def _disposed(_engine):  # type: ignore[no-untyped-def]
        group.close()

    return group


def hold(group: GroupCommit, conn: Connection, *, fail_fast: bool) -> None:
    """A transaction begins on a connection other than the group's: take the lock (kept until
    that transaction ends), committing any group left open."""
    group.acquire(fail_fast=fail_fast)
    try:
        group.commit_pending()
    except BaseException:
        group.release()
        raise
    conn.info[HOLD] = True
