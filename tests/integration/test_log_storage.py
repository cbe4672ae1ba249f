"""The stored transparency log against real databases: a SQLite file, and PostgreSQL when
``TELELEDGER_TEST_POSTGRES_URL`` is set (visible skip otherwise).

Tables come from ``metadata.create_all`` here; the Alembic migration for them is the lead's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import OperationalError

from teleledger.core.errors import InvalidInput, NotFound
from teleledger.ledger.log import merkle
from teleledger.ledger.log.entry import encode_access, encode_change
from teleledger.ledger.log.merkle import CompactRange, leaf_hash, root_from_leaves
from teleledger.ledger.log.note import (
    CosignatureVerifier,
    Ed25519Signer,
    FutureCosignature,
    InvalidSignature,
    UnverifiedNote,
    cosign,
    open_checkpoint,
    open_note,
)
from teleledger.ledger.log.service import Sequencer, TransparencyLog
from teleledger.ledger.log.storage import (
    SEQUENCER_LOCK,
    LogCorrupted,
    log_checkpoints,
    log_leaves,
    log_nodes,
    log_queue,
    log_state,
)
from teleledger.storage.db import UnitOfWork, make_engine
from teleledger.storage.tables import metadata, node_meta
from tests.conftest import database_url

ORIGIN = "teleledger.test/log"
SIGNER = Ed25519Signer.from_seed(ORIGIN, bytes(range(32)))
WITNESS_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
WITNESS = CosignatureVerifier("witness.example", WITNESS_KEY.public_key())
T0 = 1_750_000_000_000_000  # µs


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:  # ``backend`` (sqlite | postgres) is tests/conftest.py's
    return database_url(backend, tmp_path)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    eng = make_engine(url)
    metadata.create_all(eng)
    yield eng
    eng.dispose()


class Clock:
    """µs clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def log(engine: Engine) -> Iterator[TransparencyLog]:
    tlog = TransparencyLog(engine, SIGNER, witnesses=[WITNESS], clock=Clock())
    yield tlog
    tlog.close()


def entry(i: int) -> bytes:
    if i % 3 == 2:
        return encode_access(timestamp_us=T0 + i, actor=f"u-{i}", role="practitioner", action="read",
                             purpose="TREAT", outcome="allowed", reason="care-team",
                             patient_pseudonym=bytes([i % 256]) * 32,
                             references=[f"Observation/o-{i}/_history/1"])
    return encode_change(timestamp_us=T0 + i, method="create", resource_type="Observation",
                         resource_id=f"o-{i}", version=1, content_hmac=bytes([i % 256]) * 32)


def append_committed(engine: Engine, log: TransparencyLog, entries: list[bytes]) -> None:
    for e in entries:
        with UnitOfWork(engine) as uow:
            log.append(uow.c, e)
            uow.commit()


def stored_leaves(engine: Engine) -> list[tuple[int, bytes, bytes]]:
    with engine.connect() as c:
        return [(int(i), bytes(leaf), bytes(h)) for i, leaf, h in c.execute(
            select(log_leaves.c.idx, log_leaves.c.leaf, log_leaves.c.leaf_hash).order_by(log_leaves.c.idx))]


def stored_state(engine: Engine) -> tuple[int, bytes]:
    with engine.connect() as c:
        row = c.execute(select(log_state.c.size, log_state.c.root_hash)).one()
    return int(row[0]), bytes(row[1])


# --------------------------------------------------------------------------- append


def test_an_entry_appended_in_a_rolled_back_transaction_leaves_nothing(engine: Engine, log: TransparencyLog) -> None:
    with pytest.raises(RuntimeError, match="the change failed"):
        with UnitOfWork(engine) as uow:
            uow.c.execute(node_meta.insert().values(key="the-change", value=b"x"))
            log.append(uow.c, entry(0))
            raise RuntimeError("the change failed")
    with UnitOfWork(engine) as uow:  # left without commit(): rolled back as well
        log.append(uow.c, entry(1))
    assert log.queue_length() == 0
    assert log.integrate() == 0
    assert log.tree_size() == 0
    with engine.connect() as c:
        assert c.execute(select(node_meta)).all() == []
        assert c.execute(select(log_leaves)).all() == []


def test_a_change_and_its_entry_commit_together(engine: Engine, log: TransparencyLog) -> None:
    with UnitOfWork(engine) as uow:
        uow.c.execute(node_meta.insert().values(key="the-change", value=b"x"))
        log.append(uow.c, entry(0))
        uow.commit()
    assert log.queue_length() == 1
    assert log.flush() is not None
    assert stored_leaves(engine)[0][1] == entry(0)
    assert log.queue_length() == 0


def test_append_refuses_bytes_that_are_not_a_log_entry(engine: Engine, log: TransparencyLog) -> None:
    with UnitOfWork(engine) as uow:
        with pytest.raises(InvalidInput):
            log.append(uow.c, b"Jane Doe, born 1970-01-01")
        with pytest.raises(InvalidInput):
            log.append_many(uow.c, [entry(0), entry(1) + b"\x00"])
        uow.commit()
    assert log.queue_length() == 0


# --------------------------------------------------------------------------- integrate


def test_integrate_assigns_contiguous_indexes_in_queue_order(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(25)]
    append_committed(engine, log, entries)
    assert [log.integrate(max_batch=7) for _ in range(5)] == [7, 7, 7, 4, 0]
    rows = stored_leaves(engine)
    assert [i for i, _, _ in rows] == list(range(25))
    assert [leaf for _, leaf, _ in rows] == entries
    assert all(h == leaf_hash(leaf) for _, leaf, h in rows)
    assert log.tree_size() == 25
    assert log.queue_length() == 0


def test_the_stored_root_equals_the_reference_root_of_all_leaf_hashes(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(70)]
    hashes = [leaf_hash(e) for e in entries]
    done = 0
    for batch in (1, 1, 2, 5, 8, 13, 21, 19):  # ragged sizes hit every right-edge shape
        with UnitOfWork(engine) as uow:
            log.append_many(uow.c, entries[done:done + batch])
            uow.commit()
        assert log.integrate() == batch
        done += batch
        assert stored_state(engine) == (done, root_from_leaves(hashes[:done]))


def test_log_nodes_hold_exactly_the_perfect_subtrees_above_the_leaves(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(45)]
    with UnitOfWork(engine) as uow:
        log.append_many(uow.c, entries)
        uow.commit()
    log.integrate(max_batch=16)
    log.integrate(max_batch=16)
    log.integrate(max_batch=16)
    expected = {(lv, ix): h for lv, ix, h in CompactRange().extend(leaf_hash(e) for e in entries) if lv}
    with engine.connect() as c:
        got = {(int(lv), int(ix)): bytes(h) for lv, ix, h in c.execute(select(log_nodes))}
    assert got == expected


def test_a_second_log_instance_rereads_the_tree_another_one_grew(
    url: str, engine: Engine, log: TransparencyLog
) -> None:
    other_engine = make_engine(url)  # as if another process on the same database
    other = TransparencyLog(other_engine, SIGNER)
    try:
        entries = [entry(i) for i in range(30)]
        hashes = [leaf_hash(e) for e in entries]
        for n, (writer, step) in enumerate([(log, 3), (other, 5), (log, 7), (other, 1), (log, 14)]):
            start = sum((3, 5, 7, 1, 14)[:n])
            append_committed(engine, writer, entries[start:start + step])
            assert writer.integrate() == step
            assert stored_state(engine) == (start + step, root_from_leaves(hashes[:start + step]))
    finally:
        other.close()
        other_engine.dispose()


def test_integrate_refuses_to_extend_a_tree_whose_nodes_do_not_match_its_state(engine: Engine, url: str) -> None:
    first = TransparencyLog(engine, SIGNER)
    append_committed(engine, first, [entry(i) for i in range(6)])
    first.integrate()
    with engine.begin() as c:
        c.execute(update(log_nodes).where(log_nodes.c.level == 2, log_nodes.c.idx == 0).values(hash=b"\x00" * 32))
    fresh = TransparencyLog(engine, SIGNER)  # no cached right edge: must read the tampered node
    append_committed(engine, fresh, [entry(6)])
    with pytest.raises(LogCorrupted, match="stored nodes fold to"):
        fresh.integrate()
    assert fresh.queue_length() == 1  # rolled back: the entry stays queued


def test_concurrent_integrators_never_duplicate_or_skip_an_index(url: str, engine: Engine) -> None:
    """Two engines (two "processes") × (2 appenders + 2 integrators) each, all at once."""
    engines = [engine, make_engine(url)]
    logs = [TransparencyLog(e, SIGNER, max_batch=17) for e in engines]
    per_appender = 60
    errors: list[BaseException] = []
    appended: list[bytes] = []
    lock = threading.Lock()
    appenders_done = threading.Event()

    def appender(k: int, e: Engine, tlog: TransparencyLog) -> None:
        try:
            for i in range(per_appender):
                leaf = entry(k * 1000 + i)
                with UnitOfWork(e) as uow:
                    tlog.append(uow.c, leaf)
                    uow.commit()
                with lock:
                    appended.append(leaf)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def integrator(tlog: TransparencyLog) -> None:
        try:
            while not appenders_done.is_set():
                tlog.integrate()
            tlog.integrate()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    appenders = [threading.Thread(target=appender, args=(k, engines[k % 2], logs[k % 2])) for k in range(4)]
    integrators = [threading.Thread(target=integrator, args=(logs[k % 2],)) for k in range(4)]
    for t in appenders + integrators:
        t.start()
    for t in appenders:
        t.join(120)
    appenders_done.set()
    for t in integrators:
        t.join(120)
    try:
        assert errors == []
        logs[0].flush()
        rows = stored_leaves(engine)
        assert [i for i, _, _ in rows] == list(range(4 * per_appender))
        assert sorted(leaf for _, leaf, _ in rows) == sorted(appended)
        assert stored_state(engine) == (len(rows), root_from_leaves([h for _, _, h in rows]))
        assert logs[1].queue_length() == 0
    finally:
        for tlog in logs:
            tlog.close()
        engines[1].dispose()


def test_integrate_waits_while_another_sequencer_holds_the_lock(
    backend: str, engine: Engine, log: TransparencyLog
) -> None:
    """The other sequencer is simulated by a transaction holding what integrate must take:
    the advisory lock on PostgreSQL, the write lock (BEGIN IMMEDIATE) on SQLite."""
    append_committed(engine, log, [entry(0), entry(1)])
    done: list[int] = []
    with UnitOfWork(engine) as other:
        if backend == "postgres":
            other.c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SEQUENCER_LOCK})
        else:
            other.c.execute(select(log_state)).all()
        worker = threading.Thread(target=lambda: done.append(log.integrate()))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and done == []  # blocked behind the other sequencer
    worker.join(30)
    assert done == [2]
    assert log.tree_size() == 2


# --------------------------------------------------------------------------- checkpoints


def test_an_empty_log_has_no_checkpoint(log: TransparencyLog) -> None:
    assert log.checkpoint() is None
    with pytest.raises(NotFound, match="no checkpoint yet"):
        log.latest_checkpoint()


def test_checkpoint_is_signed_and_opens_with_the_log_verifier(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(11)]
    append_committed(engine, log, entries)
    stored = log.flush()
    assert stored is not None and stored.size == 11
    checkpoint, signatures = open_checkpoint(log.latest_checkpoint(), [log.verifier], origin=ORIGIN)
    assert checkpoint.size == 11
    assert checkpoint.root_hash == root_from_leaves([leaf_hash(e) for e in entries])
    assert [s.name for s in signatures] == [ORIGIN]
    assert log.public_key == SIGNER.verifier().vkey
    stranger = Ed25519Signer.from_seed(ORIGIN, b"\x07" * 32).verifier()
    with pytest.raises(UnverifiedNote):
        open_checkpoint(log.latest_checkpoint(), [stranger])


def test_a_checkpoint_is_signed_only_when_the_tree_grew(engine: Engine, log: TransparencyLog) -> None:
    append_committed(engine, log, [entry(0), entry(1)])
    first = log.flush()
    assert first is not None and first.size == 2
    assert log.checkpoint() is None
    append_committed(engine, log, [entry(2)])
    assert log.checkpoint() is None  # queued is not integrated: the tree did not grow yet
    second = log.flush()
    assert second is not None and second.size == 3
    with engine.connect() as c:
        sizes = c.execute(select(log_checkpoints.c.size).order_by(log_checkpoints.c.size)).scalars()
        assert [int(size) for size in sizes] == [2, 3]


@pytest.mark.parametrize("node", [(3, 0), (2, 1)], ids=["root-of-8-vs-state", "proof-from-4"])
def test_the_log_refuses_to_sign_a_tree_that_does_not_extend_its_last_checkpoint(
    engine: Engine, log: TransparencyLog, node: tuple[int, int]
) -> None:
    append_committed(engine, log, [entry(i) for i in range(4)])
    log.flush()
    append_committed(engine, log, [entry(i) for i in range(4, 9)])
    log.integrate()
    # (3, 0) is on the right edge of size 9 (the stored root no longer follows from the nodes);
    # (2, 1) is in the consistency proof from the signed size 4 (the new tree forks from it)
    level, idx = node
    with engine.begin() as c:
        c.execute(update(log_nodes).where(log_nodes.c.level == level, log_nodes.c.idx == idx)
                  .values(hash=b"\x01" * 32))
    with pytest.raises(LogCorrupted, match="refusing to sign a checkpoint of size 9"):
        log.checkpoint()
    assert open_checkpoint(log.latest_checkpoint(), [log.verifier])[0].size == 4


def test_a_cosignature_from_a_known_witness_is_stored_and_served(engine: Engine, log: TransparencyLog) -> None:
    append_committed(engine, log, [entry(i) for i in range(5)])
    stored = log.flush()
    assert stored is not None
    line = cosign(stored.body, WITNESS_KEY, WITNESS.name, T0 // 1_000_000)
    assert log.add_cosignature(5, line) is True
    assert log.add_cosignature(5, line) is False  # idempotent
    served = log.latest_checkpoint()
    assert served == stored.note + line
    _, verified = open_note(served, [log.verifier, WITNESS])
    assert {s.name for s in verified} == {ORIGIN, WITNESS.name}


def test_a_cosignature_that_does_not_check_out_is_refused(engine: Engine, log: TransparencyLog) -> None:
    append_committed(engine, log, [entry(i) for i in range(3)])
    stored = log.flush()
    assert stored is not None
    stranger_key = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
    with pytest.raises(UnverifiedNote):
        log.add_cosignature(3, cosign(stored.body, stranger_key, "stranger.example", T0 // 1_000_000))
    other_body = stored.body.replace("\n3\n", "\n2\n")
    with pytest.raises(InvalidSignature):
        log.add_cosignature(3, cosign(other_body, WITNESS_KEY, WITNESS.name, T0 // 1_000_000))
    with pytest.raises(FutureCosignature):
        log.add_cosignature(3, cosign(stored.body, WITNESS_KEY, WITNESS.name, T0 // 1_000_000 + 3600))
    with pytest.raises(NotFound):
        log.add_cosignature(4, cosign(stored.body, WITNESS_KEY, WITNESS.name, T0 // 1_000_000))
    assert log.latest_checkpoint() == stored.note


# --------------------------------------------------------------------------- proofs


def test_proofs_from_sql_verify_against_the_signed_checkpoint_root(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(37)]
    hashes = [leaf_hash(e) for e in entries]
    heads: dict[int, bytes] = {}
    done = 0
    for upto in (1, 8, 13, 37):
        append_committed(engine, log, entries[done:upto])
        done = upto
        log.flush()
        checkpoint, _ = open_checkpoint(log.latest_checkpoint(), [log.verifier], origin=ORIGIN)
        assert checkpoint.size == upto
        heads[upto] = checkpoint.root_hash
    for size, root in heads.items():
        for index in range(size):
            proof = log.inclusion_proof(index, size)
            merkle.verify_inclusion(hashes[index], index, size, proof.audit_path, root)
            by_hash = log.inclusion_proof_by_hash(hashes[index], size)
            assert (by_hash.leaf_index, by_hash.audit_path) == (index, proof.audit_path)
    for first, first_root in heads.items():
        for second, second_root in heads.items():
            if first <= second:
                proof = log.consistency_proof(first, second)
                merkle.verify_consistency(first, second, first_root, second_root, proof.path)
    assert log.consistency_proof(0, 37).path == ()


def test_a_tampered_node_makes_a_served_proof_fail_verification(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(16)]
    append_committed(engine, log, entries)
    log.flush()
    checkpoint, _ = open_checkpoint(log.latest_checkpoint(), [log.verifier])
    with engine.begin() as c:
        c.execute(update(log_nodes).where(log_nodes.c.level == 3, log_nodes.c.idx == 1).values(hash=b"\x00" * 32))
    proof = log.inclusion_proof(2, 16)
    with pytest.raises(merkle.RootMismatch):
        merkle.verify_inclusion(leaf_hash(entries[2]), 2, 16, proof.audit_path, checkpoint.root_hash)


def test_proof_requests_outside_the_tree_are_invalid_input(engine: Engine, log: TransparencyLog) -> None:
    append_committed(engine, log, [entry(i) for i in range(5)])
    log.flush()
    for call, message in [
        (lambda: log.inclusion_proof(5, 5), "out of range"),
        (lambda: log.inclusion_proof(0, 6), "larger than the log's size 5"),
        (lambda: log.inclusion_proof(-1, 5), "between 0 and"),
        (lambda: log.inclusion_proof(0, 0), "out of range"),
        (lambda: log.consistency_proof(4, 3), "larger than second"),
        (lambda: log.consistency_proof(3, 6), "larger than the log's size 5"),
        (lambda: log.consistency_proof(-1, 3), "between 0 and"),
        (lambda: log.inclusion_proof_by_hash(b"\x00" * 31, 5), "expected a 32-byte"),
        (lambda: log.inclusion_proof_by_hash(leaf_hash(entry(0)), 6), "larger than the log's size"),
        (lambda: log.entries(3, 3), "smaller than end"),
        (lambda: log.entries(5, 9), "beyond the log's size 5"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            call()
    with pytest.raises(NotFound, match="no leaf with hash"):
        log.inclusion_proof_by_hash(leaf_hash(b"never logged"), 5)
    with pytest.raises(NotFound, match="no leaf with hash"):  # present, but only from index 3 on
        log.inclusion_proof_by_hash(leaf_hash(entry(3)), 3)


def test_entries_are_served_in_order_at_most_1000_at_a_time(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(1200)]
    with UnitOfWork(engine) as uow:
        log.append_many(uow.c, entries)
        uow.commit()
    log.flush()
    assert log.entries(0, 1200) == entries[:1000]
    assert log.entries(1000, 5000) == entries[1000:]
    assert log.entries(17, 20) == entries[17:20]


def test_proof_reads_on_sqlite_do_not_wait_for_the_write_lock(
    backend: str, engine: Engine, log: TransparencyLog
) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite-specific: PostgreSQL readers never block on writers")
    append_committed(engine, log, [entry(i) for i in range(9)])
    log.flush()
    result: list[object] = []
    with UnitOfWork(engine) as uow:  # holds SQLite's write lock (BEGIN IMMEDIATE) until exit
        log.append(uow.c, entry(9))
        reader = threading.Thread(target=lambda: result.append(
            (log.inclusion_proof(3, 9), log.tree_size(), log.latest_checkpoint())))
        started = time.monotonic()
        reader.start()
        reader.join(5)
        assert not reader.is_alive() and len(result) == 1
        assert time.monotonic() - started < 2
        uow.commit()


# --------------------------------------------------------------------------- sequencer


def test_the_sequencer_integrates_and_checkpoints_in_the_background(engine: Engine, log: TransparencyLog) -> None:
    entries = [entry(i) for i in range(40)]
    sequencer = Sequencer(log, interval=0.01, checkpoint_interval=0.05)
    sequencer.start()
    try:
        append_committed(engine, log, entries)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if open_checkpoint(log.latest_checkpoint(), [log.verifier])[0].size == 40:
                    break
            except NotFound:
                pass
            time.sleep(0.02)
    finally:
        sequencer.stop()
    assert not sequencer.running
    checkpoint, _ = open_checkpoint(log.latest_checkpoint(), [log.verifier])
    assert (checkpoint.size, checkpoint.root_hash) == (40, root_from_leaves([leaf_hash(e) for e in entries]))


def test_the_sequencer_keeps_signing_while_many_writers_hold_the_database_busy(
    engine: Engine, log: TransparencyLog
) -> None:
    """Under SQLite's busy handler (sleeps of up to 100 ms between attempts) a lone sequencer
    thread used to wait out every writer; it must still checkpoint about every interval."""
    stop = threading.Event()

    def writer(k: int) -> None:
        i = k
        while not stop.is_set():
            with UnitOfWork(engine) as uow:
                log.append(uow.c, entry(i))
                uow.commit()
            i += 64

    writers = [threading.Thread(target=writer, args=(k,)) for k in range(64)]
    with Sequencer(log, interval=0.02, checkpoint_interval=0.2):
        for t in writers:
            t.start()
        time.sleep(4)
        stop.set()
        for t in writers:
            t.join(60)
    with engine.connect() as c:
        signed = int(c.execute(select(func.count()).select_from(log_checkpoints)).scalar_one())
    assert signed >= 8, f"only {signed} checkpoints in 4 s at one every 0.2 s"


class FlakyLog(TransparencyLog):
    """Fails its first integrations the way a lost database connection does, with the entry in
    the driver's message (as SQLAlchemy puts statement parameters there)."""

    def __init__(self, *args: object, failures: int, secret: bytes, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.remaining = failures
        self.secret = secret

    def integrate(self, *, max_batch: int | None = None) -> int:
        if self.remaining:
            self.remaining -= 1
            raise OperationalError("INSERT INTO log_leaves ...", {"leaf": self.secret},
                                   ConnectionError(f"server closed the connection {self.secret!r}"))
        return super().integrate(max_batch=max_batch)


def test_the_sequencer_survives_database_errors_without_logging_entry_contents(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = entry(7)
    flaky = FlakyLog(engine, SIGNER, failures=3, secret=secret)
    append_committed(engine, flaky, [secret])
    caplog.set_level(logging.DEBUG, logger="teleledger")
    with Sequencer(flaky, interval=0.005, checkpoint_interval=0.01, max_backoff=0.02) as sequencer:
        deadline = time.monotonic() + 20
        while flaky.tree_size() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sequencer.running
    flaky.close()
    assert flaky.remaining == 0 and stored_leaves(engine)[0][1] == secret
    failures = [r for r in caplog.records if "round failed" in r.getMessage()]
    assert len(failures) == 3
    assert "OperationalError" in failures[0].getMessage()
    for record in caplog.records:
        text_logged = record.getMessage() + (str(record.exc_info) if record.exc_info else "")
        assert repr(secret) not in text_logged and secret.hex() not in text_logged
        assert "o-7" not in text_logged and "closed the connection" not in text_logged


def test_stopping_the_sequencer_joins_its_thread(log: TransparencyLog) -> None:
    sequencer = log.sequencer(interval=10.0)
    sequencer.start()
    with pytest.raises(RuntimeError, match="already running"):
        sequencer.start()
    started = time.monotonic()
    sequencer.stop()
    assert not sequencer.running and time.monotonic() - started < 5
    assert not [t for t in threading.enumerate() if t.name == "teleledger-sequencer"]
    sequencer.stop()  # stopping twice is harmless


def test_the_queue_table_is_empty_after_flush(engine: Engine, log: TransparencyLog) -> None:
    append_committed(engine, log, [entry(i) for i in range(3)])
    log.flush()
    with engine.connect() as c:
        assert c.execute(select(log_queue)).all() == []
