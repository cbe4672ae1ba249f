"""Benchmark of ``teleledger verify`` (``teleledger.records.verify.verify_node``) on a big SQLite node.

    .venv/bin/python bench/bench_verify.py [--entries 1000000] [--dir DIR] [--keep]

Builds a real node (``bootstrap.build``) in a fresh SQLite file and fills it the way a busy node
would, but in bulk: for every three log entries, one resource version (a small Observation sealed
under one of 1,000 patients' data keys, with its ``resources`` row) and its change entry, then two
access entries disclosing it, each mirrored by an ``access_events`` row — exactly the bytes
``Auditor`` writes. Entries are queued in ``log_queue`` and sequenced by ``TransparencyLog.integrate``
in batches of 60,000, with a signed checkpoint after each batch (the real sequencer path).

Then it times ``verify_node`` (rich progress bars per phase), checks the report is clean, and
prints entries/s and the time projected for 1,000,000 entries (target: ≤ 60 s), from wall-clock
time and from CPU time (the latter is what counts on a shared, busy machine).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from teleledger.bootstrap import build
from teleledger.config import Settings
from teleledger.core.crypto import seal
from teleledger.ledger.log import entry as log_entry
from teleledger.records.store import Stored, instant
from teleledger.records.verify import verify_node
from teleledger.storage.db import UnitOfWork

console = Console()
T0 = 1_750_000_000_000_000  # µs
PATIENTS = 1_000
BATCH = 60_000  # a multiple of 3: every batch starts with a change entry


def bars() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def observation(res_id: str, patient: str, i: int, now: int) -> dict:
    return {
        "resourceType": "Observation", "id": res_id, "status": "final",
        "meta": {"versionId": "1", "lastUpdated": instant(now)},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-03-01T10:00:00Z",
        "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org",
                          "code": "/min"},
    }


def fill(node, entries: int) -> None:  # type: ignore[no-untyped-def]
    """Bulk-write ``entries`` log entries (1 change : 2 access) with their rows; sequence them."""
    store, auditor = node.records.store, node.auditor
    patients = [f"{0xB0000000 + p:08x}-0000-4000-8000-{p:012x}" for p in range(PATIENTS)]
    with UnitOfWork(node.engine) as uow:  # create the data keys, as first writes would
        aeads = {p: store.keys.for_write(uow.c, f"p.{p}") for p in patients}
        uow.commit()
    done = 0
    with bars() as progress:
        write = progress.add_task("write rows", total=entries)
        integrate = progress.add_task("integrate", total=entries)
        while done < entries:
            n = min(BATCH, entries - done)
            versions, current, events, leaves = [], [], [], []
            for j in range(done, done + n):
                now = T0 + j
                if j % 3 == 0:
                    patient = patients[(j // 3) % PATIENTS]
                    res_id = f"{j:08x}-0000-4000-8000-{j:012x}"
                    body = observation(res_id, patient, j, now)
                    ref = f"Observation/{res_id}/_history/1"
                    versions.append(("Observation", res_id, 1, now, "create", f"p.{patient}",
                                     seal(aeads[patient], orjson.dumps(body), ref.encode())))
                    current.append(("Observation", res_id, 1, 0, now))
                    stored = Stored("Observation", res_id, 1, now, "create", body)
                    leaves.append(auditor.change_entry(stored))
                else:
                    actor = f"user:{j % 97:04d}"
                    leaf = log_entry.encode_access(
                        timestamp_us=now, actor=actor, role="practitioner", action="read", purpose="TREAT",
                        outcome="allowed", reason="care-team",
                        patient_pseudonym=log_entry.patient_pseudonym(auditor.key, patient), references=[ref])
                    leaves.append(leaf)
                    events.append((now, actor, "practitioner", None, "read", "TREAT", "allowed", "care-team",
                                   patient, ref, hashlib.sha256(b"\x00" + leaf).digest()))
            with UnitOfWork(node.engine) as uow:
                c = uow.c
                c.exec_driver_sql("INSERT INTO resource_versions (res_type, res_id, version, last_updated, "
                                  "method, key_id, body) VALUES (?, ?, ?, ?, ?, ?, ?)", versions)
                c.exec_driver_sql("INSERT INTO resources (res_type, res_id, version, deleted, last_updated) "
                                  "VALUES (?, ?, ?, ?, ?)", current)
                c.exec_driver_sql("INSERT INTO access_events (recorded, actor, role, fhir_user, action, "
                                  "purpose, outcome, reason, patient_id, refs, leaf_hash) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
                c.exec_driver_sql("INSERT INTO log_queue (leaf, queued) VALUES (?, ?)",
                                  [(leaf, T0) for leaf in leaves])
                uow.commit()
            done += n
            progress.update(write, completed=done)
            while node.log.integrate(max_batch=BATCH):
                pass
            node.log.checkpoint()
            progress.update(integrate, completed=done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the node (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    settings = Settings(environment="test", home=home, master_key=base64.b64encode(b"b" * 32).decode(),
                        password_hashing="fast", demo_data=False, base_url="http://bench")
    node = build(settings)
    try:
        started = time.perf_counter()
        fill(node, args.entries)
        built = time.perf_counter() - started
        size_mb = (home / "teleledger.db").stat().st_size / 1e6
        console.print(f"built {args.entries:,} entries in {built:.1f} s ({size_mb:,.0f} MB database)")

        tasks: dict[str, TaskID] = {}
        with bars() as progress:
            def report_progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(phase, total=total)
                progress.update(tasks[phase], completed=done, total=total)

            cpu = time.process_time()
            report = verify_node(node, progress=report_progress)
            cpu = time.process_time() - cpu
        if report.findings:
            console.print(report.findings[:20])
            raise SystemExit(f"verify found {len(report.findings)} problems in a clean database")

        rate = report.entries / report.elapsed
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table = Table(title=f"teleledger verify — {platform.python_implementation()} "
                            f"{platform.python_version()}, {os.cpu_count()} CPUs, SQLite")
        for col in ("log entries", "resource versions", "access events", "checkpoints", "elapsed",
                    "CPU", "entries/s", "projected for 1M", "peak RSS"):
            table.add_column(col, justify="right")
        table.add_row(f"{report.entries:,}", f"{report.versions:,}", f"{report.access_events:,}",
                      f"{report.checkpoints:,}", f"{report.elapsed:.1f} s", f"{cpu:.1f} s", f"{rate:,.0f}",
                      f"{report.elapsed * 1_000_000 / report.entries:.1f} s", f"{peak_mb:,.0f} MB")
        console.print(table)
        # SQLite runs in this process: CPU time is what the run costs on an otherwise idle machine
        console.print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
                      f"projected from CPU time: {cpu * 1_000_000 / report.entries:.1f} s for 1M entries")
    finally:
        node.log.close()
        node.close()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            console.print(f"kept {home}")


if __name__ == "__main__":
    main()
