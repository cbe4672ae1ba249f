"""SQLite instance interactions run on the event loop and wait there for a busy write lock
(teleledger.web.deps.in_place, teleledger.storage.db.fail_fast)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import text

from teleledger.storage import group_commit
from teleledger.storage.db import UnitOfWork, WriteLockBusy, fail_fast
from tests.integration.helpers import create, patient, service_headers


@pytest.fixture
def sqlite_only(backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("the write lock and fail_fast are SQLite's")


def _hold_write_lock(node) -> sqlite3.Connection:  # type: ignore[no-untyped-def]
    other = sqlite3.connect(node.engine.url.database, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_the_first_unit_of_work_under_fail_fast_refuses_to_wait(sqlite_only, node):  # type: ignore[no-untyped-def]
    other = _hold_write_lock(node)
    try:
        with pytest.raises(WriteLockBusy), fail_fast():
            with UnitOfWork(node.engine):
                pytest.fail("began although another connection holds the write lock")
    finally:
        other.execute("COMMIT")
    with fail_fast():
        for _ in range(2):
            with UnitOfWork(node.engine) as uow:
                uow.c.execute(text("SELECT 1"))
                uow.commit()
    # nothing leaked: the only connection out is the one the group commit keeps
    assert group_commit.group_of(node.engine) is not None
    assert node.engine.pool.checkedout() == 1


def test_a_write_waits_for_a_lock_held_elsewhere_and_then_succeeds(sqlite_only, node, client):  # type: ignore[no-untyped-def]
    headers = service_headers(client, node)
    other = _hold_write_lock(node)
    # held longer than LOCK_POLL_SECONDS: the request polls on the loop, then waits in a thread
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        made = create(client, headers, patient())
    finally:
        release.join()
    assert time.monotonic() - started >= 0.25
    assert client.get(f"/fhir/Patient/{made['id']}", headers=headers).json()["id"] == made["id"]
