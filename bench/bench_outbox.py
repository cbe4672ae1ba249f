"""Benchmark of the chain outbox and the indexer on the embedded chain (teleledger.ledger.chain).

    .venv/bin/python bench/bench_outbox.py [--dir DIR] [--postgres URL] [--rows 300]
        [--producers 8] [--burst 100]

A real node (``bootstrap.build``) with its embedded py-evm chain, on a fresh SQLite file (or the
PostgreSQL database given with ``--postgres``: its schema is dropped), confirmations = 1, the
outbox worker in its background thread exactly as ``teleledger serve`` runs it.

1. Latency, one write at a time: an ``AnchorRegistry.anchor`` row is enqueued and committed,
   then the caller waits (polling every ms) until the worker marked it done. p50/p99 of
   commit → confirmed, against the baseline of the same call made synchronously with
   ``client.transact`` (sign, seal a block, receipt) in the same run.
2. Throughput under concurrency: ``--producers`` threads each commit ``--burst`` rows as fast as
   they can; rows confirmed per second from the first commit to the last confirmation, and
   rows per block (the worker sends what is due as one batch, the embedded chain seals it as
   one block).
3. Indexer: a fresh indexer reads every event of the run from block 0 (``poll_until_caught_up``,
   storing into ``chain_events`` and running one projector): events/s, against the baseline of
   the bare ``get_logs`` reads of the same range.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import create_engine, text

from teleledger.bootstrap import build
from teleledger.config import Settings
from teleledger.ledger.chain.anchoring import org_id
from teleledger.ledger.chain.indexer import Indexer
from teleledger.ledger.chain.outbox import enqueue, wait
from teleledger.storage.db import UnitOfWork

console = Console()
ORIGIN_OUTBOX = "bench-outbox.example/log"
ORIGIN_DIRECT = "bench-direct.example/log"


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (its public schema is DROPPED)")
    parser.add_argument("--rows", type=int, default=300, help="rows in the one-at-a-time latency run")
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--burst", type=int, default=100, help="rows per producer in the throughput run")
    args = parser.parse_args()

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="teleledger-bench-outbox-"))
    if args.postgres:
        engine = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    settings = Settings(environment="test", home=workdir / "home", database_url=args.postgres,
                        master_key=base64.b64encode(os.urandom(32)).decode(), demo_data=False,
                        password_hashing="fast", chain_enabled=True, chain_poll_interval=0.5,
                        anchor_interval_seconds=3600)
    node = build(settings)
    rt = node.chain
    assert rt is not None and rt.worker is not None and rt.client is not None
    org = org_id(settings.node_name)
    key = node.keystore.key("node:authority")
    registry = rt.addresses["AnchorRegistry"]
    console.print(f"[bold]machine[/]: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}; "
                  f"database {'PostgreSQL' if args.postgres else 'SQLite file'} in {workdir}")

    def enqueue_row(origin: str, size: int) -> str:
        k = f"bench:{origin}:{size}"
        with UnitOfWork(node.engine) as uow:
            enqueue(uow.c, kind="anchor", key=k, contract="AnchorRegistry", fn="anchor",
                    args=[org, origin, size, size.to_bytes(32, "big")], sender="node:authority")
            uow.commit()
        return k

    # 1. latency --------------------------------------------------------------------------------
    direct: list[float] = []
    queued: list[float] = []
    rt.worker.start()
    try:
        with progress() as bars:
            task = bars.add_task("one at a time", total=2 * args.rows)
            for i in range(1, args.rows + 1):  # alternate baseline and outbox: same noise for both
                t0 = time.perf_counter()
                rt.client.transact(registry, "AnchorRegistry", "anchor", org, ORIGIN_DIRECT, i, i.to_bytes(32, "big"),
                                   sender=key)
                direct.append(time.perf_counter() - t0)
                bars.advance(task)
                k = enqueue_row(ORIGIN_OUTBOX, i)
                t1 = time.perf_counter()
                wait(node.engine, k, 30, poll=0.001)
                queued.append(time.perf_counter() - t1)
                bars.advance(task)

        # 2. throughput -------------------------------------------------------------------------
        head_before = rt.client.block_number()
        keys: list[list[str]] = [[] for _ in range(args.producers)]
        total = args.producers * args.burst
        started = time.perf_counter()

        def produce(p: int) -> None:
            origin = f"bench-burst-{p}.example/log"
            for i in range(1, args.burst + 1):
                keys[p].append(enqueue_row(origin, i))

        with progress() as bars:
            task = bars.add_task(f"{args.producers} producers", total=total)
            threads = [threading.Thread(target=produce, args=(p,)) for p in range(args.producers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for p in range(args.producers):  # the worker drains while the producers commit
                for k in keys[p]:
                    wait(node.engine, k, 60, poll=0.001)
                    bars.advance(task)
        elapsed = time.perf_counter() - started
        blocks = rt.client.block_number() - head_before
    finally:
        rt.worker.stop()

    # 3. indexer --------------------------------------------------------------------------------
    head = rt.client.block_number()
    t0 = time.perf_counter()
    raw = sum(len(rt.client.get_logs(a, 0, head)) for a in rt.addresses.values())
    read_only = time.perf_counter() - t0
    indexer = Indexer(node.engine, rt.client, rt.addresses, 1, name="bench", max_blocks=500)
    projected = [0]
    indexer.on("CheckpointAnchored", lambda conn, e: projected.__setitem__(0, projected[0] + 1))
    t0 = time.perf_counter()
    stored = _catch_up(indexer)
    indexing = time.perf_counter() - t0

    table = Table(title="chain outbox and indexer (embedded chain, confirmations = 1)")
    for col in ("measurement", "baseline", "outbox / indexer", "ratio"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    table.add_row("one write, p50 ms (baseline: client.transact)", f"{pct(direct, 50) * 1e3:.1f}",
                  f"{pct(queued, 50) * 1e3:.1f}", f"{pct(queued, 50) / pct(direct, 50):.2f}×")
    table.add_row("one write, p99 ms", f"{pct(direct, 99) * 1e3:.1f}", f"{pct(queued, 99) * 1e3:.1f}",
                  f"{pct(queued, 99) / pct(direct, 99):.2f}×")
    table.add_row("one write at a time, writes/s", f"{len(direct) / sum(direct):.0f}",
                  f"{len(queued) / sum(queued):.0f}", "")
    table.add_row(f"{args.producers} producers: rows confirmed/s", "", f"{total / elapsed:.0f}",
                  f"{total / max(blocks, 1):.1f} rows/block")
    table.add_row("indexer events/s (baseline: get_logs only)", f"{raw / read_only:.0f}",
                  f"{stored / indexing:.0f}", f"{(stored / indexing) / (raw / read_only):.2f}×")
    console.print(table)
    console.print(f"{stored} events indexed ({projected[0]} projected), {raw} read by get_logs, head block {head}; "
                  f"load average after {os.getloadavg()[0]:.2f}")
    node.close()


def _catch_up(indexer: Indexer) -> int:
    total = 0
    with progress() as bars:
        head = indexer.client.block_number()
        task = bars.add_task("indexer from block 0", total=head)
        while True:
            total += indexer.poll()
            cursor = indexer.cursor()
            bars.update(task, completed=cursor[0] if cursor else 0)
            if cursor is not None and cursor[0] >= head:
                return total


if __name__ == "__main__":
    main()
