"""Benchmark of the stored transparency log on SQLite (teleledger.ledger.log.service).

    .venv/bin/python bench/bench_log.py [--dir DIR] [--appenders 64] [--duration 10]
        [--batch 1000] [--batched 200000] [--leaves 10000000] [--samples 20000]
        [--synchronous NORMAL|FULL] [--skip-big]

Three measurements, each on a fresh SQLite file made by ``storage.db.make_engine`` (WAL,
``BEGIN IMMEDIATE`` per transaction, ``synchronous=NORMAL`` unless told otherwise):

1. Individually acknowledged durable appends: ``--appenders`` threads, each appending one entry
   per unit of work and committing it (the real path of a FHIR write), for ``--duration``
   seconds, while a ``Sequencer`` integrates every 50 ms and checkpoints every second. Reports
   appends/s, commit latency p50/p99, and checks at the end that every acknowledged entry is
   in the tree under a signed checkpoint whose root matches ``root_from_leaves``.
2. Batched appends: ``--batch`` entries per transaction (``append_many``), ``--batched`` in
   all, then ``integrate`` — appends/s and integration leaves/s separately.
3. Proof latency on a big log: ``--leaves`` leaves (10 million by default) are bulk-loaded
   straight into ``log_leaves`` / ``log_nodes`` (nodes computed by ``CompactRange``, exactly what
   ``integrate`` stores), then inclusion proofs by index and by hash and consistency proofs are
   served by ``TransparencyLog`` from SQL for random arguments: p50/p99 per proof, every proof
   verified against the signed checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import shutil
import sqlite3
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

from teleledger.ledger.log import merkle

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import Engine, func, select

from teleledger.ledger.log.entry import encode_access, encode_change
from teleledger.ledger.log.note import Ed25519Signer, open_checkpoint
from teleledger.ledger.log.service import Sequencer, TransparencyLog
from teleledger.ledger.log import storage as log_storage
from teleledger.ledger.log.storage import log_checkpoints, log_leaves
from teleledger.storage.db import UnitOfWork, make_engine
from teleledger.storage.tables import metadata

console = Console()
SIGNER = Ed25519Signer.from_seed("bench.teleledger.localhost", b"\x42" * 32)
_T0 = 1_750_000_000_000_000


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def make_entry(rng: random.Random, i: int) -> bytes:
    """A realistic mix: 2 access entries for every change entry, ids shaped like UUIDs."""
    rid = f"{rng.getrandbits(128):032x}"
    rid = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}"
    if i % 3 == 0:
        return encode_change(timestamp_us=_T0 + i, method="update", resource_type="Observation",
                             resource_id=rid, version=1 + i % 7, content_hmac=rng.randbytes(32))
    return encode_access(timestamp_us=_T0 + i, actor=f"u-{i % 5000}", role="practitioner",
                         action="read", purpose="TREAT", outcome="allowed", reason="care-team",
                         patient_pseudonym=rng.randbytes(32),
                         references=[f"Observation/{rid}/_history/{1 + i % 7}"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fresh_engine(directory: Path, name: str, synchronous: str) -> tuple[Engine, Path]:
    path = directory / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{path}", sqlite_synchronous=synchronous)
    metadata.create_all(engine)
    return engine, path


def check_tree(engine: Engine, log: TransparencyLog, expected: int) -> tuple[int, int]:
    """Every acknowledged entry is in the tree; the signed root is the reference root."""
    with engine.connect() as c:
        hashes = [bytes(h) for h in c.execute(select(log_leaves.c.leaf_hash).order_by(log_leaves.c.idx)).scalars()]
        checkpoints = int(c.execute(select(func.count()).select_from(log_checkpoints)).scalar_one())
    checkpoint, _ = open_checkpoint(log.latest_checkpoint(), [log.verifier])
    assert len(hashes) == expected == checkpoint.size, (len(hashes), expected, checkpoint.size)
    assert checkpoint.root_hash == merkle.root_from_leaves(hashes), "signed root mismatch"
    return checkpoint.size, checkpoints


# --------------------------------------------------------------------------- 1. concurrent


class FifoLock:
    """A first-come, first-served lock: whoever waits longest gets it next."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # ownership is handed over by __exit__

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


def gated_unit_of_work(gate: FifoLock) -> type[UnitOfWork]:
    """A UnitOfWork that queues on ``gate`` before BEGIN IMMEDIATE and leaves it after COMMIT or
    ROLLBACK — the change proposed for ``storage.db`` on SQLite, modelled here."""

    class Gated(UnitOfWork):
        def __enter__(self) -> UnitOfWork:
            gate.__enter__()
            try:
                return super().__enter__()
            except BaseException:
                gate.__exit__()
                raise

        def __exit__(self, *exc: object) -> None:
            try:
                super().__exit__(*exc)  # type: ignore[arg-type]
            finally:
                gate.__exit__()

    return Gated


def bench_concurrent(directory: Path, appenders: int, duration: float, synchronous: str,
                     *, writer_lock: bool = False) -> dict:
    """``writer_lock``: every unit of work — the writers' and the sequencer's — queues on one
    in-process FIFO lock before ``BEGIN IMMEDIATE`` instead of polling SQLite's busy handler,
    which sleeps 1, 2, 5 … 100 ms between attempts and starves the single sequencer thread."""
    engine, _ = fresh_engine(directory, "concurrent.db", synchronous)
    log = TransparencyLog(engine, SIGNER)
    latencies: list[list[float]] = [[] for _ in range(appenders)]
    stop = threading.Event()
    errors: list[str] = []
    uow_class = gated_unit_of_work(FifoLock()) if writer_lock else UnitOfWork
    saved = log_storage.UnitOfWork
    log_storage.UnitOfWork = uow_class  # the sequencer's transactions queue on the gate too

    def appender(k: int) -> None:
        rng = random.Random(k)
        mine = latencies[k]
        i = k
        try:
            while not stop.is_set():
                leaf = make_entry(rng, i)
                started = time.perf_counter()
                with uow_class(engine) as uow:
                    log.append(uow.c, leaf)
                    uow.commit()
                mine.append(time.perf_counter() - started)
                i += appenders
        except Exception as exc:  # noqa: BLE001 - reported in the table
            errors.append(type(exc).__name__)

    rounds: list[float] = []

    class TimedSequencer(Sequencer):
        def run_once(self) -> int:
            started = time.perf_counter()
            try:
                return super().run_once()
            finally:
                rounds.append(time.perf_counter() - started)

    sequencer = TimedSequencer(log, interval=0.05, checkpoint_interval=1.0)
    sequencer.start()
    threads = [threading.Thread(target=appender, args=(k,)) for k in range(appenders)]
    with progress() as bar:
        task = bar.add_task(f"{appenders} writers, 1 commit per append", total=int(duration * 10))
        started = time.perf_counter()
        for t in threads:
            t.start()
        while (elapsed := time.perf_counter() - started) < duration:
            time.sleep(0.1)
            bar.update(task, completed=int(elapsed * 10),
                       description=f"{appenders} writers: {sum(map(len, latencies)):,} acked")
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        bar.update(task, completed=int(duration * 10))
    lag_started = time.perf_counter()
    sequencer.stop()
    behind = log.queue_length()
    log.flush()  # what the sequencer had not integrated yet when the writers stopped
    lag = time.perf_counter() - lag_started
    log_storage.UnitOfWork = saved
    all_lat = [x for per in latencies for x in per]
    size, checkpoints = check_tree(engine, log, len(all_lat))
    log.close()
    engine.dispose()
    return {"acked": len(all_lat), "seconds": elapsed, "rate": len(all_lat) / elapsed,
            "p50": pct(all_lat, 0.50), "p99": pct(all_lat, 0.99), "size": size,
            "checkpoints": checkpoints, "drain": lag, "behind": behind, "errors": errors,
            "rounds": rounds}


# --------------------------------------------------------------------------- 2. batched


def bench_batched(directory: Path, batch: int, total: int, synchronous: str) -> dict:
    engine, _ = fresh_engine(directory, "batched.db", synchronous)
    log = TransparencyLog(engine, SIGNER)
    rng = random.Random(2)
    leaves = [make_entry(rng, i) for i in range(total)]
    with progress() as bar:
        task = bar.add_task(f"append, {batch} per transaction", total=total)
        started = time.perf_counter()
        for at in range(0, total, batch):
            with UnitOfWork(engine) as uow:
                log.append_many(uow.c, leaves[at:at + batch])
                uow.commit()
            bar.update(task, advance=min(batch, total - at))
        append_s = time.perf_counter() - started
        task = bar.add_task("integrate (max_batch 50,000)", total=total)
        started = time.perf_counter()
        while n := log.integrate():
            bar.update(task, advance=n)
        log.checkpoint()
        integrate_s = time.perf_counter() - started
    check_tree(engine, log, total)
    log.close()
    engine.dispose()
    return {"total": total, "append_rate": total / append_s, "integrate_rate": total / integrate_s,
            "end_to_end": total / (append_s + integrate_s)}


# --------------------------------------------------------------------------- 3. big log


def build_big_log(path: Path, leaves: int) -> tuple[float, int]:
    """Bulk-load ``leaves`` leaves and their perfect-subtree nodes straight into SQLite."""
    engine = make_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")  # a bulk load that fails is simply redone
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-2000000")
    db.execute("DROP INDEX ix_log_leaves_hash")  # built once at the end, from sorted keys
    compact = merkle.CompactRange()
    sha256 = merkle.leaf_hash
    # Leaves: one access-entry template whose timestamp and pseudonym vary per leaf, so that
    # every leaf hash differs (generating 10M full entries would dominate the load time).
    template = bytearray(make_entry(random.Random(3), 1))
    chunk = 200_000
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("bulk-load leaves + nodes", total=leaves)
        for lo in range(0, leaves, chunk):
            hi = min(leaves, lo + chunk)
            leaf_rows = []
            node_rows = []
            append = compact.append
            for i in range(lo, hi):
                struct.pack_into(">Q", template, 2, _T0 + i)
                leaf = bytes(template)
                digest = sha256(leaf)
                leaf_rows.append((i, leaf, digest))
                for level, index, node in append(digest):
                    if level:
                        node_rows.append((level, index, node))
            db.execute("BEGIN")
            db.executemany("INSERT INTO log_leaves (idx, leaf, leaf_hash) VALUES (?, ?, ?)", leaf_rows)
            db.executemany("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", node_rows)
            db.execute("COMMIT")
            bar.update(task, advance=hi - lo)
        task = bar.add_task("index log_leaves.leaf_hash", total=1)
        db.execute("CREATE INDEX ix_log_leaves_hash ON log_leaves (leaf_hash)")
        bar.update(task, advance=1)
    db.execute("INSERT INTO log_state (id, size, root_hash, updated) VALUES (1, ?, ?, ?)",
               (compact.size, compact.root(), _T0))
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    return time.perf_counter() - started, path.stat().st_size


def bench_proofs(directory: Path, leaves: int, samples: int) -> dict:
    path = directory / "big.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    build_s, db_bytes = build_big_log(path, leaves)
    engine = make_engine(f"sqlite:///{path}")
    log = TransparencyLog(engine, SIGNER)
    signed = log.checkpoint()
    assert signed is not None and signed.size == leaves
    checkpoint, _ = open_checkpoint(log.latest_checkpoint(), [log.verifier])
    root = checkpoint.root_hash
    rng = random.Random(9162)
    results: dict[str, list[float]] = {"inclusion": [], "by_hash": [], "consistency": []}
    with progress() as bar:
        task = bar.add_task("proofs from SQL", total=3 * samples)
        for _ in range(samples):
            index = rng.randrange(leaves)
            started = time.perf_counter()
            proof = log.inclusion_proof(index, leaves)
            results["inclusion"].append(time.perf_counter() - started)
            with engine.connect() as c:  # the client side: it knows the leaf it asks about
                digest = bytes(c.execute(select(log_leaves.c.leaf_hash).where(log_leaves.c.idx == index)).scalar_one())
            merkle.verify_inclusion(digest, index, leaves, proof.audit_path, root)
            bar.advance(task)
        template = bytearray(make_entry(random.Random(3), 1))  # as build_big_log made them
        for _ in range(samples):
            index = rng.randrange(leaves)
            struct.pack_into(">Q", template, 2, _T0 + index)
            digest = merkle.leaf_hash(bytes(template))
            started = time.perf_counter()
            proof = log.inclusion_proof_by_hash(digest, leaves)
            results["by_hash"].append(time.perf_counter() - started)
            assert proof.leaf_index == index
            merkle.verify_inclusion(digest, index, leaves, proof.audit_path, root)
            bar.advance(task)
        for _ in range(samples):
            first = rng.randrange(1, leaves + 1)
            started = time.perf_counter()
            proof = log.consistency_proof(first, leaves)
            results["consistency"].append(time.perf_counter() - started)
            bar.advance(task)
    log.close()
    engine.dispose()
    return {"leaves": leaves, "build_s": build_s, "db_bytes": db_bytes,
            **{f"{k}_p50": pct(v, 0.5) for k, v in results.items()},
            **{f"{k}_p99": pct(v, 0.99) for k, v in results.items()},
            **{f"{k}_mean": statistics.fmean(v) for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--appenders", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batched", type=int, default=200_000)
    parser.add_argument("--leaves", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--writer-lock", action="store_true",
                        help="also run (1) with writers queued on an in-process lock")
    args = parser.parse_args()

    own_dir = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="bench-log-")) if own_dir else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]{platform.python_implementation()} {platform.python_version()} · SQLite "
                  f"{sqlite3.sqlite_version} · {os.cpu_count()} CPUs · {platform.machine()} · "
                  f"synchronous={args.synchronous} · files in {directory}[/dim]")
    try:
        one = bench_concurrent(directory, args.appenders, args.duration, args.synchronous)
        gated = (bench_concurrent(directory, args.appenders, args.duration, args.synchronous,
                                  writer_lock=True) if args.writer_lock else None)
        two = bench_batched(directory, args.batch, args.batched, args.synchronous)
        three = None if args.skip_big else bench_proofs(directory, args.leaves, args.samples)
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)

    table = Table(title="teleledger transparency log on SQLite")
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_column("detail")
    table.add_row("durable appends, 1 commit each", f"{one['rate']:,.0f} /s",
                  f"{args.appenders} threads, {one['acked']:,} acked in {one['seconds']:.1f} s; "
                  f"commit p50 {one['p50'] * 1e3:.2f} ms, p99 {one['p99'] * 1e3:.2f} ms")
    for label, run in (("", one), (" [FIFO writer lock]", gated)):
        if run is None:
            continue
        if label:
            table.add_row(f"durable appends{label}", f"{run['rate']:,.0f} /s",
                          f"{run['acked']:,} acked in {run['seconds']:.1f} s; commit p50 "
                          f"{run['p50'] * 1e3:.2f} ms, p99 {run['p99'] * 1e3:.2f} ms")
        table.add_row("  … sequencer", f"{run['checkpoints']} checkpoints",
                      f"{len(run['rounds'])} rounds, longest {max(run['rounds'], default=0):.2f} s; "
                      f"{run['behind']:,} still queued at stop, drained in {run['drain'] * 1e3:.0f} ms; "
                      f"all {run['size']:,} in the signed tree; errors: {run['errors'] or 'none'}")
    table.add_row("batched appends", f"{two['append_rate']:,.0f} /s",
                  f"{args.batch} per transaction, {two['total']:,} entries")
    table.add_row("  … integrate", f"{two['integrate_rate']:,.0f} leaves/s",
                  f"end to end {two['end_to_end']:,.0f} /s")
    if three:
        table.add_row("big log (bulk-loaded)", f"{three['leaves']:,} leaves",
                      f"built in {three['build_s']:.0f} s, {three['db_bytes'] / 2**30:.2f} GiB")
        for kind, label in (("inclusion", "inclusion proof by index"), ("by_hash", "inclusion proof by hash"),
                            ("consistency", "consistency proof")):
            table.add_row(f"  {label}", f"p50 {three[f'{kind}_p50'] * 1e3:.3f} ms",
                          f"p99 {three[f'{kind}_p99'] * 1e3:.3f} ms, mean {three[f'{kind}_mean'] * 1e3:.3f} ms, "
                          f"{args.samples:,} samples")
    console.print(table)


if __name__ == "__main__":
    main()
