"""Import benchmark: resources/s for the Synthea sample through the ``teleledger import`` code path.

    python bench/bench_import.py [--repeat 3] [--samples samples/synthea-10]

Each repetition builds a node on a fresh temporary ``TELELEDGER_HOME`` (SQLite, random master
key; building it is not timed) and times ``Importer(node.records, system_principal()).run(path)``
exactly as ``teleledger import`` runs it: validation with the FHIR models, conditional reference
resolution, policy check, per-patient encryption, search index, one transaction per file.
Besides wall-clock resources/s it reports resources per CPU-second (this process plus the
importer's child processes, if any): on a machine shared with other processes that figure moves
far less than the wall-clock one.

Baseline, in the same process and interleaved with the repetitions: the time to ``orjson.loads``
every line and ``json.dumps`` the result (parse + serialise, nothing stored). The ratio says how
many times a bare JSON round-trip the import costs, which is steadier than the absolute rate on
a machine shared with other processes.

Target: >= 3,000 resources/s (median of the repetitions).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from teleledger.bootstrap import build
from teleledger.config import Settings
from teleledger.demo import system_principal
from teleledger.records.importer import Importer, count_lines, ordered_files

TARGET_PER_S = 3_000
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "synthea-10"

console = Console() if sys.stdout.isatty() else Console(width=120)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (the importer's validator)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def import_once(path: Path, total: int, label: str) -> tuple[int, float, float]:
    home = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        # explicit values: TELELEDGER_* variables of the caller's shell must not pick another database
        settings = Settings(home=home, database_url="", environment="test", demo_data=False,
                            password_hashing="fast", master_key=base64.b64encode(os.urandom(32)).decode())
        node = build(settings)
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                task = progress.add_task(label, total=total)
                started, cpu = time.perf_counter(), _cpu()
                report = Importer(node.records, system_principal()).run(
                    path, progress=lambda n: progress.advance(task, n))
                elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
        finally:
            node.close()
        return report.resources, elapsed, cpu
    finally:
        shutil.rmtree(home, ignore_errors=True)


def json_round_trip(path: Path) -> tuple[int, float]:
    lines = [line for f in ordered_files(path) if f.suffix == ".ndjson"
             for line in f.read_bytes().splitlines() if line.strip()]
    started = time.perf_counter()
    for line in lines:
        json.dumps(orjson.loads(line))
    return len(lines), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, each on a fresh home (default 3)")
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="a folder of NDJSON files or a Bundle")
    args = parser.parse_args(argv)

    files = ordered_files(args.samples)
    total = sum(count_lines(f) for f in files)
    size = sum(f.stat().st_size for f in files)
    console.print(f"{args.samples}: {len(files)} files, {total:,} resources, {size / 2**20:.1f} MiB")

    runs, base = [], []
    for i in range(args.repeat):  # interleaved, so that noise from other processes hits both
        base.append(json_round_trip(args.samples))
        runs.append(import_once(args.samples, total, f"import {i + 1}/{args.repeat}"))

    table = Table(title=f"import of {args.samples.name} ({total:,} resources), fresh home each time")
    for col in ("run", "resources", "seconds", "resources/s", "CPU s", "resources/CPU-s", "JSON round-trip s",
                "JSON round-trip /s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for i, ((n, s, c), (bn, bs)) in enumerate(zip(runs, base, strict=True), start=1):
        table.add_row(str(i), f"{n:,}", f"{s:.2f}", f"{n / s:,.0f}", f"{c:.2f}", f"{n / c:,.0f}", f"{bs:.3f}",
                      f"{bn / bs:,.0f}")
    rate = statistics.median(n / s for n, s, _ in runs)
    cpu_rate = statistics.median(n / c for n, _, c in runs)
    base_rate = statistics.median(n / s for n, s in base)
    table.add_section()
    table.add_row("median", "", "", f"{rate:,.0f}", "", f"{cpu_rate:,.0f}", "", f"{base_rate:,.0f}", style="bold")
    console.print(table)

    imported = {n for n, _, _ in runs}
    ok = rate >= TARGET_PER_S and imported == {total}
    console.print(f"import costs {base_rate / rate:.0f}x a bare orjson.loads + json.dumps of every line")
    if imported != {total}:
        console.print(f"[red]imported {sorted(imported)} resources, expected {total}")
    console.print(f"{'[green]PASS' if rate >= TARGET_PER_S else '[red]FAIL'}[/] {rate:,.0f} resources/s "
                  f"(target >= {TARGET_PER_S:,})")
    console.print(f"machine: {len(os.sched_getaffinity(0))} CPUs ({cpu_model()}), Python {platform.python_version()}, "
                  f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                  "(the machine may be shared with other processes)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
