"""Benchmark of the stored transparency log on SQLite (teleledger.ledger.log.service).

    .venv/bin/python bench/bench_log.py [--dir DIR] [--appenders 64] [--duration 10]
        [--batch 1000] [--batched 200000] [--leaves 10000000] [--samples 20000]
        [--synchronous NORMAL|FULL] [--skip-big]

Three measurements, each on a fresh SQLite file made by ``storage.db.make_engine`` (WAL,
group commit, ``synchronous=NORMAL`` unless told otherwise):

1. Individually acknowledged durable appends: ``--appenders`` concurrent writers, each
   appending one entry per unit of work and committing it (the path of a FHIR request's log
   entry), acknowledged only once durable, for ``--duration`` seconds, while a ``Sequencer``
   integrates every 50 ms and checkpoints every second. Twice: writers as requests on the
   event loop (how the server runs instance interactions on SQLite) and as OS threads. Reports
   appends/s, acknowledgement latency p50/p99, how many units a shared commit carried, and
   checks at the end that every acknowledged entry is in the tree under a signed checkpoint
   whose root matches ``root_from_leaves``.
2. Batched appends: ``--batch`` entries per transaction, ``--batched`` in all — the node's own
   entries (``append_own``, the import's path) and bytes from elsewhere (``append_many``, each
   decoded first) — then ``integrate``: appends/s and integration leaves/s separately.
3. Proof latency on a big log: ``--leaves`` leaves (10 million by default) are bulk-loaded
   straight into ``log_leaves`` / ``log_nodes`` (nodes computed by ``CompactRange``, exactly what
   ``integrate`` stores), then inclusion proofs by index and by hash and consistency proofs are
   served by ``TransparencyLog`` from SQL for random arguments: p50/p99 per proof, every proof
   verified against the signed checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable, Sequence
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
from sqlalchemy import Connection, Engine, func, select

from teleledger.ledger.log.entry import encode_access, encode_change
from teleledger.ledger.log.note import Ed25519Signer, open_checkpoint
from teleledger.ledger.log.service import Sequencer, TransparencyLog
from teleledger.ledger.log.storage import log_checkpoints, log_leaves
from teleledger.storage import group_commit
from teleledger.storage.db import UnitOfWork, WriteLockBusy, make_engine, on_this_loop, write_lock_released
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


def bench_concurrent(directory: Path, writers: int, duration: float, synchronous: str,
                     *, mode: str) -> dict:
    """``mode`` "loop": ``writers`` coroutines on one event loop, each unit run by
    ``storage.db.on_this_loop`` — how ``teleledger serve`` runs a FHIR instance interaction on
    SQLite (waiting for the lock's release while a thread holds it, as ``web.deps.in_place``
    does) — and the ``Sequencer``'s rounds as a task of the same loop, as ``web.app`` runs them
    on SQLite. "threads": ``writers`` OS threads, each unit in a ``UnitOfWork`` of its own — how
    searches, bundles and background workers write — with the ``Sequencer`` in a thread, as on
    PostgreSQL. Either way it integrates every 50 ms and checkpoints every second."""
    engine, _ = fresh_engine(directory, f"concurrent-{mode}.db", synchronous)
    log = TransparencyLog(engine, SIGNER)
    latencies: list[list[float]] = [[] for _ in range(writers)]
    stop = threading.Event()
    errors: list[str] = []

    def append_one(leaf: bytes) -> None:
        with UnitOfWork(engine) as uow:
            # the path of a FHIR request's entries (records.audit): entries this node encoded
            # itself, queued in the request's own unit of work
            log.append_own(uow.c, [leaf])
            uow.commit()

    def appender(k: int) -> None:
        rng = random.Random(k)
        mine = latencies[k]
        i = k
        try:
            while not stop.is_set():
                leaf = make_entry(rng, i)
                started = time.perf_counter()
                append_one(leaf)
                mine.append(time.perf_counter() - started)
                i += writers
        except Exception as exc:  # noqa: BLE001 - reported in the table
            errors.append(type(exc).__name__)

    async def request(k: int) -> None:
        rng = random.Random(k)
        mine = latencies[k]
        i = k
        try:
            while not stop.is_set():
                leaf = make_entry(rng, i)
                started = time.perf_counter()
                while True:
                    try:
                        await on_this_loop(append_one, leaf)
                        break
                    except WriteLockBusy:  # as web.deps.in_place waits
                        await write_lock_released(engine, 0.001)
                mine.append(time.perf_counter() - started)
                i += writers
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

    group = group_commit.group_of(engine)
    assert group is not None
    sequencer = TimedSequencer(log, interval=0.05, checkpoint_interval=1.0)
    if mode == "threads":
        sequencer.start()
    label = f"{writers} {'requests on the event loop' if mode == 'loop' else 'threads'}"
    with progress() as bar:
        task = bar.add_task(label, total=int(duration * 10))
        started = time.perf_counter()

        def tick() -> float:
            elapsed = time.perf_counter() - started
            bar.update(task, completed=min(int(elapsed * 10), int(duration * 10)),
                       description=f"{label}: {sum(map(len, latencies)):,} acked")
            return elapsed

        if mode == "loop":
            async def sequence() -> None:  # as web.app runs it on SQLite: a task of the loop
                while not stop.is_set():
                    await asyncio.sleep(sequencer.round())

            async def run() -> None:
                tasks = [asyncio.ensure_future(request(k)) for k in range(writers)]
                tasks.append(asyncio.ensure_future(sequence()))
                while tick() < duration:
                    await asyncio.sleep(0.1)
                stop.set()
                await asyncio.gather(*tasks)

            asyncio.run(run())
        else:
            threads = [threading.Thread(target=appender, args=(k,)) for k in range(writers)]
            for t in threads:
                t.start()
            while tick() < duration:
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join()
        elapsed = time.perf_counter() - started
    lag_started = time.perf_counter()
    if mode == "threads":
        sequencer.stop()
    behind = log.queue_length()
    log.flush()  # what the sequencer had not integrated yet when the writers stopped
    lag = time.perf_counter() - lag_started
    all_lat = [x for per in latencies for x in per]
    size, checkpoints = check_tree(engine, log, len(all_lat))
    log.close()
    engine.dispose()
    return {"acked": len(all_lat), "seconds": elapsed, "rate": len(all_lat) / elapsed,
            "p50": pct(all_lat, 0.50), "p99": pct(all_lat, 0.99), "size": size,
            "checkpoints": checkpoints, "drain": lag, "behind": behind, "errors": errors,
            "rounds": rounds, "commits": group.commits,
            "group": group.committed_units / max(1, group.commits)}


# --------------------------------------------------------------------------- 2. batched


def bench_batched(directory: Path, batch: int, total: int, synchronous: str) -> dict:
    """``append_own`` (what the import queues: entries this node encoded) and, on a second
    file, ``append_many`` (bytes from elsewhere, each decoded and checked before it is queued)."""
    engine, _ = fresh_engine(directory, "batched.db", synchronous)
    log = TransparencyLog(engine, SIGNER)
    rng = random.Random(2)
    leaves = [make_entry(rng, i) for i in range(total)]
    checked_engine, _ = fresh_engine(directory, "batched-checked.db", synchronous)
    checked_log = TransparencyLog(checked_engine, SIGNER)
    def append_all(bar: Progress, label: str, engine: Engine,
                   append: Callable[[Connection, Sequence[bytes]], None]) -> float:
        task = bar.add_task(f"{label}, {batch} per transaction", total=total)
        started = time.perf_counter()
        for at in range(0, total, batch):
            with UnitOfWork(engine) as uow:
                append(uow.c, leaves[at:at + batch])
                uow.commit()
            bar.update(task, advance=min(batch, total - at))
        return time.perf_counter() - started

    with progress() as bar:
        checked_s = append_all(bar, "append bytes from elsewhere", checked_engine, checked_log.append_many)
        checked_log.close()
        checked_engine.dispose()
        append_s = append_all(bar, "append own entries", engine, log.append_own)
        task = bar.add_task("integrate (max_batch 50,000)", total=total)
        started = time.perf_counter()
        while n := log.integrate():
            bar.update(task, advance=n)
        log.checkpoint()
        integrate_s = time.perf_counter() - started
    check_tree(engine, log, total)
    log.close()
    engine.dispose()
    return {"total": total, "append_rate": total / append_s, "checked_rate": total / checked_s,
            "integrate_rate": total / integrate_s,
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
    args = parser.parse_args()

    own_dir = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="bench-log-")) if own_dir else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]{platform.python_implementation()} {platform.python_version()} · SQLite "
                  f"{sqlite3.sqlite_version} · {os.cpu_count()} CPUs · {platform.machine()} · "
                  f"synchronous={args.synchronous} · files in {directory}[/dim]")
    try:
        one = bench_concurrent(directory, args.appenders, args.duration, args.synchronous, mode="loop")
        threads = bench_concurrent(directory, args.appenders, args.duration, args.synchronous, mode="threads")
        two = bench_batched(directory, args.batch, args.batched, args.synchronous)
        three = None if args.skip_big else bench_proofs(directory, args.leaves, args.samples)
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)

    table = Table(title="teleledger transparency log on SQLite")
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_column("detail")
    for label, run in ((f"{args.appenders} requests on the event loop", one),
                       (f"{args.appenders} threads", threads)):
        table.add_row(f"durable appends, {label}", f"{run['rate']:,.0f} /s",
                      f"{run['acked']:,} acked in {run['seconds']:.1f} s; ack p50 "
                      f"{run['p50'] * 1e3:.2f} ms, p99 {run['p99'] * 1e3:.2f} ms; "
                      f"{run['commits']:,} shared commits of {run['group']:.1f} units on average")
        table.add_row("  … sequencer", f"{run['checkpoints']} checkpoints",
                      f"{len(run['rounds'])} rounds, longest {max(run['rounds'], default=0):.2f} s; "
                      f"{run['behind']:,} still queued at stop, drained in {run['drain'] * 1e3:.0f} ms; "
                      f"all {run['size']:,} in the signed tree; errors: {run['errors'] or 'none'}")
    table.add_row("batched appends", f"{two['append_rate']:,.0f} /s",
                  f"{args.batch} per transaction, {two['total']:,} entries the node encoded (import path)")
    table.add_row("  … of bytes from elsewhere", f"{two['checked_rate']:,.0f} /s",
                  "each entry decoded and checked first (append_many)")
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
