"""Group commit on a SQLite file (storage.group_commit): concurrent units share commits, each
unit is acknowledged only once durable, a failing unit is rolled back alone, a failing commit
fails exactly its group — all on a real database file, read back through other connections."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from sqlalchemy import text

from teleledger.storage import group_commit
from teleledger.storage.db import (
    StorageUnavailable,
    UnitOfWork,
    WriteLockBusy,
    make_engine,
    on_this_loop,
    write_lock_released,
)


@pytest.fixture()
def db(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "group.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
        c.execute(text("INSERT INTO parent (id) VALUES (1)"))
        # a deferred foreign key is checked at COMMIT: a way to make a real shared commit fail
        c.execute(text("CREATE TABLE item (id INTEGER PRIMARY KEY, who TEXT NOT NULL, parent INTEGER "
                       "REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"))
    yield engine, path
    engine.dispose()


def committed(path, who: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """What another connection — another process, say — sees: only committed rows."""
    other = sqlite3.connect(path)
    try:
        if who is None:
            return [r[0] for r in other.execute("SELECT who FROM item ORDER BY who")]
        return [r[0] for r in other.execute("SELECT who FROM item WHERE who = ?", (who,))]
    finally:
        other.close()


def insert(engine, who: str, parent: int = 1) -> None:  # type: ignore[no-untyped-def]
    with UnitOfWork(engine) as uow:
        uow.c.execute(text("INSERT INTO item (who, parent) VALUES (:w, :p)"), {"w": who, "p": parent})
        uow.commit()


def test_threads_share_commits_and_each_is_durable_when_acknowledged(db) -> None:  # type: ignore[no-untyped-def]
    engine, path = db
    group = group_commit.group_of(engine)
    assert group is not None
    not_durable: list[str] = []
    start = threading.Barrier(32)

    def writer(k: int) -> None:
        start.wait()
        for i in range(40):
            who = f"t{k:02d}-{i:02d}"
            insert(engine, who)
            if committed(path, who) != [who]:
                not_durable.append(who)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not_durable == []
    assert len(committed(path)) == 32 * 40
    assert group.committed_units == 32 * 40
    assert group.commits <= group.committed_units


def test_units_queued_behind_a_unit_join_its_group_and_one_commit_stores_them_all(db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(group_commit, "MAX_AGE_S", 60.0)  # the group stays open while we hold it
    engine, path = db
    group = group_commit.group_of(engine)
    assert group is not None
    holding, release = threading.Event(), threading.Event()
    durable: dict[str, bool] = {}

    def first() -> None:
        with UnitOfWork(engine) as uow:
            uow.c.execute(text("INSERT INTO item (who, parent) VALUES ('first', 1)"))
            holding.set()
            release.wait(5)
            uow.commit()
        durable["first"] = committed(path, "first") == ["first"]

    def queued(k: int) -> None:
        insert(engine, f"q{k:02d}")
        durable[f"q{k:02d}"] = committed(path, f"q{k:02d}") == [f"q{k:02d}"]

    head = threading.Thread(target=first)
    head.start()
    assert holding.wait(5)
    before = group.commits
    others = [threading.Thread(target=queued, args=(k,)) for k in range(16)]
    for t in others:
        t.start()
    while group._queued < 16:  # noqa: SLF001 - wait until all sixteen queue on the lock
        threading.Event().wait(0.005)
    release.set()
    for t in [head, *others]:
        t.join()
    assert group.commits - before == 1
    assert durable == {"first": True, **{f"q{k:02d}": True for k in range(16)}}


def test_a_failing_unit_is_rolled_back_alone(db) -> None:  # type: ignore[no-untyped-def]
    engine, path = db
    errors: list[str] = []
    start = threading.Barrier(16)

    def writer(k: int) -> None:
        start.wait()
        for i in range(20):
            try:
                with UnitOfWork(engine) as uow:
                    uow.c.execute(text("INSERT INTO item (who, parent) VALUES (:w, 1)"), {"w": f"w{k:02d}-{i:02d}"})
                    if i % 5 == 0:
                        raise ValueError("refused")
                    uow.commit()
            except ValueError:
                errors.append(f"w{k:02d}-{i:02d}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = set(committed(path))
    assert len(errors) == 16 * 4
    assert stored.isdisjoint(errors)
    assert len(stored) == 16 * 16


def test_a_failed_shared_commit_fails_its_whole_group_and_nothing_else(db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Members queued behind a unit whose write breaks a deferred constraint share its
    commit: all of them get a clear error, none of their rows is stored, and the next unit
    works normally."""
    monkeypatch.setattr(group_commit, "MAX_AGE_S", 60.0)  # the group stays open while we hold it
    engine, path = db
    group = group_commit.group_of(engine)
    assert group is not None
    holding = threading.Event()
    release = threading.Event()
    outcomes: dict[str, str] = {}

    def bad() -> None:
        try:
            with UnitOfWork(engine) as uow:
                uow.c.execute(text("INSERT INTO item (who, parent) VALUES ('bad', 99)"))
                holding.set()
                release.wait(5)  # the others queue behind us meanwhile
                uow.commit()
            outcomes["bad"] = "stored"
        except StorageUnavailable:
            outcomes["bad"] = "failed"

    def good(k: int) -> None:
        try:
            insert(engine, f"g{k}")
            outcomes[f"g{k}"] = "stored"
        except StorageUnavailable:
            outcomes[f"g{k}"] = "failed"

    first = threading.Thread(target=bad)
    first.start()
    assert holding.wait(5)
    others = [threading.Thread(target=good, args=(k,)) for k in range(6)]
    for t in others:
        t.start()
    while group._queued < 6:  # noqa: SLF001 - wait until all six queue on the lock
        threading.Event().wait(0.005)
    release.set()
    first.join()
    for t in others:
        t.join()
    # all six queued behind the bad unit, joined its group and shared its failed commit
    assert outcomes == {"bad": "failed", **{f"g{k}": "failed" for k in range(6)}}
    assert committed(path) == []
    insert(engine, "after")
    assert committed(path, "after") == ["after"]


def test_event_loop_requests_share_one_commit_and_wait_for_it(db) -> None:  # type: ignore[no-untyped-def]
    engine, path = db
    group = group_commit.group_of(engine)
    assert group is not None
    before = group.commits

    async def request(k: int) -> list[str]:
        await on_this_loop(insert, engine, f"r{k:03d}")
        return committed(path, f"r{k:03d}")  # acknowledged: must be durable now

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(request(k) for k in range(100)))

    seen = asyncio.run(main())
    assert seen == [[f"r{k:03d}"] for k in range(100)]
    assert group.commits - before < 20, group.commits - before


def test_event_loop_request_whose_group_fails_gets_a_clear_error(db) -> None:  # type: ignore[no-untyped-def]
    engine, path = db

    async def main() -> list[object]:
        return await asyncio.gather(on_this_loop(insert, engine, "ok-1"), on_this_loop(insert, engine, "bad", 99),
                                    on_this_loop(insert, engine, "ok-2"), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, StorageUnavailable) for r in results), results
    assert committed(path) == []
    asyncio.run(on_this_loop(insert, engine, "later"))
    assert committed(path) == ["later"]


def test_a_unit_inside_a_unit_is_refused_not_hung(db) -> None:  # type: ignore[no-untyped-def]
    engine, path = db
    with UnitOfWork(engine) as uow:
        uow.c.execute(text("INSERT INTO item (who, parent) VALUES ('outer', 1)"))
        with pytest.raises(group_commit.NestedUnitOfWork):
            UnitOfWork(engine).__enter__()
        uow.commit()
    assert committed(path) == ["outer"]


def test_other_connections_of_the_process_queue_on_the_same_lock(db) -> None:  # type: ignore[no-untyped-def]
    """``engine.connect()`` transactions run between groups, never inside one: 8 readers and
    16 writers at once all finish, and every reader's count is one a commit produced."""
    engine, path = db
    counts: list[int] = []
    start = threading.Barrier(24)

    def writer(k: int) -> None:
        start.wait()
        for i in range(30):
            insert(engine, f"x{k:02d}-{i:02d}")

    def reader() -> None:
        start.wait()
        for _ in range(30):
            with engine.connect() as c:
                counts.append(int(c.execute(text("SELECT count(*) FROM item")).scalar_one()))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    threads += [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(committed(path)) == 16 * 30
    assert len(counts) == 8 * 30 and max(counts) <= 16 * 30


def test_a_request_on_the_loop_is_woken_when_a_threads_unit_releases_the_lock(db) -> None:  # type: ignore[no-untyped-def]
    """Told ``WriteLockBusy``, a request waits for the release itself — not for its timeout."""
    engine, path = db
    group = group_commit.group_of(engine)
    assert group is not None
    inside = threading.Event()
    finish = threading.Event()

    def slow() -> None:
        with UnitOfWork(engine) as uow:
            uow.c.execute(text("INSERT INTO item (who, parent) VALUES ('slow', 1)"))
            inside.set()
            finish.wait(10)
            uow.commit()

    worker = threading.Thread(target=slow)
    worker.start()
    assert inside.wait(5)

    async def main() -> str:
        with pytest.raises(WriteLockBusy):
            await on_this_loop(insert, engine, "busy")
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.05, finish.set)
        await write_lock_released(engine, 30.0)  # a timeout the test would notice
        waited = loop.time() - started
        await on_this_loop(insert, engine, "after")
        return f"{waited:.0f}"

    assert asyncio.run(main()) == "0"  # well under a second: woken by the release
    worker.join()
    assert committed(path) == ["after", "slow"]
