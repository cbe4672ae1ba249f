"""Booking throughput under contention, with zero double bookings asserted at the end.

    python bench/bench_booking.py [--clients 16] [--slots 200] [--rounds 2]
                                  [--database-url postgresql://... --reset-postgres]

A fresh node (temporary ``TELELEDGER_HOME``, random master key, no demo data; SQLite unless
``--database-url``) gets one practitioner per measured run, each with published availability
(every day 00:00-24:00, 20-minute visits, Europe/Berlin), and ``--clients`` patients with
accounts. Then ``teleledger serve`` is started as a subprocess and every patient signs in
(password grant). Each client is one HTTP/1.1 keep-alive connection (httpx) booking with its own
token through ``POST /api/visits/appointments``.

Two scenarios, alternating in each round (baseline first) so that noise on the shared machine
hits both:

* **uncontended** (the baseline): the run's ``--slots`` free slots are dealt out, each client
  books its own share; every attempt should be a 201;
* **contended**: every client walks the *same* slots in the same order and tries to book each
  one; exactly one attempt per slot may win (201), every other gets 409 "taken".

Reported per run: bookings/s (successful), attempts/s, p50/p99 latency, 201 and 409 counts, any
other answer counted as an error. At the end the script checks every run against the server
(FHIR search of each practitioner's Appointments and Slots) and the database (``slot_bookings``):
no Slot is held by two booked Appointments, every success is exactly one booked Appointment,
one busy Slot and one booking row. It exits non-zero if any double booking or error was found.

Read the ratio contended/uncontended first: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HOST = "127.0.0.1"
PASSWORD = "bench-password-0123"
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret-0123456789"
console = Console() if sys.stdout.isatty() else Console(width=120)


def machine() -> dict[str, str]:
    model, memory = platform.processor() or "unknown", "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // (1024 * 1024)} GiB"
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": str(len(os.sched_getaffinity(0))), "memory": memory,
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---- set-up, in process, before the server starts ----------------------------------------------------


@dataclass
class World:
    env: dict[str, str]
    home: Path
    practitioners: list[str]
    patients: list[str]  # usernames


def prepare(args: argparse.Namespace, tmp: Path) -> World:
    env = {**os.environ, "TELELEDGER_HOME": str(tmp / "home"), "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), "TELELEDGER_DEMO_DATA": "false",
           "TELELEDGER_PASSWORD_HASHING": "fast"}
    env.pop("TELELEDGER_BASE_URL", None)
    if args.database_url:
        env["TELELEDGER_DATABASE_URL"] = args.database_url
    else:
        env.pop("TELELEDGER_DATABASE_URL", None)
    os.environ.update({k: v for k, v in env.items() if k.startswith("TELELEDGER_")})
    if args.database_url and args.reset_postgres:
        from sqlalchemy import create_engine, text

        engine = create_engine(args.database_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()

    from teleledger.bootstrap import build
    from teleledger.config import Settings
    from teleledger.demo import system_principal
    from teleledger.visits import availability as av
    from teleledger.visits.scheduling import Scheduling

    node = build(Settings())
    try:
        svc = system_principal()
        node.accounts.create_client(client_id=CLIENT_ID, secret=CLIENT_SECRET, scopes="system/*.cruds")
        scheduling = Scheduling(node.records, node.engine)
        hours = av.weekly_hours_from_parts({d: ("00:00", "23:40", "") for d in av.WEEKDAYS}, visit_minutes=20,
                                           timezone_name="Europe/Berlin")
        practitioners = []
        for i in range(args.rounds * 2):
            stored, _ = node.records.create(svc, {"resourceType": "Practitioner",
                                                  "name": [{"family": f"Bench{i}", "given": ["Doc"]}]})
            result = scheduling.publish(svc, stored.res_id, hours, weeks=1)
            if result.created < args.slots:
                raise SystemExit(f"only {result.created} slots published; lower --slots")
            practitioners.append(stored.res_id)
        patients = []
        for i in range(args.clients):
            stored, _ = node.records.create(svc, {"resourceType": "Patient", "name": [{"family": f"Bench{i}"}],
                                                  "gender": "unknown"})
            node.accounts.create_user(username=f"patient{i}", password=PASSWORD, role="patient",
                                      patient=f"Patient/{stored.res_id}")
            patients.append(f"patient{i}")
    finally:
        node.close()
    return World(env, tmp / "home", practitioners, patients)


# ---- the load ------------------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    practitioner: str
    slots: int
    elapsed: float = 0.0
    codes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    winners: dict[str, str] = field(default_factory=dict)  # slot id → appointment id
    errors: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return sum(self.codes.values())

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def attempt(client: httpx.AsyncClient, slot_id: str, run: Run, progress, task) -> None:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    try:
        r = await client.post("/api/visits/appointments", json={"slot": slot_id})
        code = r.status_code
    except httpx.HTTPError as exc:
        code, r = 0, None
        run.errors.append(f"{type(exc).__name__}")
    run.latencies.append(time.perf_counter() - t0)
    run.codes[code] += 1
    if code == 201 and r is not None:
        if slot_id in run.winners:  # the server said yes twice for one slot
            run.errors.append(f"slot {slot_id} booked twice: {run.winners[slot_id]} and {r.json()['id']}")
        run.winners[slot_id] = r.json()["id"]
    elif code not in (201, 409) and len(run.errors) < 5 and r is not None:
        run.errors.append(f"{code}: {r.text[:200]}")
    progress.advance(task)


async def measure(base: str, tokens: list[str], slots: list[str], run: Run) -> None:
    clients = [httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {t}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=1)) for t in tokens]
    n = len(clients)
    total = len(slots) if run.scenario == "uncontended" else len(slots) * n
    with Progress(TextColumn(f"{run.scenario:12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("booking", total=total)

        async def own_share(i: int) -> None:
            for slot_id in slots[i::n]:
                await attempt(clients[i], slot_id, run, progress, task)

        async def race(i: int) -> None:
            for slot_id in slots:
                await attempt(clients[i], slot_id, run, progress, task)

        t0 = time.perf_counter()
        await asyncio.gather(*((own_share if run.scenario == "uncontended" else race)(i) for i in range(n)))
        run.elapsed = time.perf_counter() - t0
    for c in clients:
        await c.aclose()


# ---- the check -----------------------------------------------------------------------------------------


def verify(base: str, svc: dict, runs: list[Run], args: argparse.Namespace) -> list[str]:
    """Every problem found; empty means: no double booking anywhere."""
    problems = []
    for run in runs:
        appts = httpx.get(f"{base}/fhir/Appointment", params={"practitioner": run.practitioner, "_count": "1000"},
                          headers=svc, timeout=60).json().get("entry", [])
        held = Counter(ref["reference"].removeprefix("Slot/") for e in appts if e["resource"]["status"] == "booked"
                       for ref in e["resource"].get("slot", []))
        twice = [s for s, k in held.items() if k > 1]
        if twice:
            problems.append(f"{run.scenario}: slots held by two booked appointments: {twice[:5]}")
        wins = run.codes[201]
        if wins != sum(held.values()) or set(held) != set(run.winners):
            problems.append(f"{run.scenario}: {wins} bookings answered 201 but {sum(held.values())} booked "
                            "appointments exist")
        if run.scenario == "contended" and wins != run.slots:
            problems.append(f"contended: {wins} of {run.slots} slots booked (each should be won exactly once)")
        sched = httpx.get(f"{base}/api/visits/slots", params={"practitioner": run.practitioner, "days": 7},
                          headers=svc, timeout=60).json()["slots"]
        free = {s["id"] for s in sched}
        if free & set(held):
            problems.append(f"{run.scenario}: booked slots still listed as free: {sorted(free & set(held))[:5]}")
    rows = booking_rows(args)
    held_all = {s for run in runs for s in run.winners}
    if rows != {s: a for run in runs for s, a in run.winners.items()}:
        problems.append(f"slot_bookings has {len(rows)} rows for {len(held_all)} won slots, or other holders")
    return problems


def booking_rows(args: argparse.Namespace) -> dict[str, str]:
    from sqlalchemy import select

    from teleledger.config import Settings
    from teleledger.storage.db import make_engine
    from teleledger.visits.tables import slot_bookings

    engine = make_engine(Settings().sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return {s: a for s, a in conn.execute(select(slot_bookings.c.slot_id, slot_bookings.c.appointment_id))}
    finally:
        engine.dispose()


# ---- main ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slots", type=int, default=200, help="slots per measured run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: a SQLite file)")
    parser.add_argument("--reset-postgres", action="store_true", help="drop and recreate its public schema first")
    args = parser.parse_args()
    if args.database_url and not args.reset_postgres:
        parser.error("--database-url needs --reset-postgres: the benchmark starts from an empty schema")

    m = machine()
    console.print(f"[bold]machine[/]: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}, Python {m['python']}, "
                  f"SQLite {m['sqlite']}, load {m['load']}; database: "
                  f"{'PostgreSQL' if args.database_url else 'SQLite (WAL)'}")
    with tempfile.TemporaryDirectory(prefix="teleledger-bench-booking-") as tmp:
        t0 = time.perf_counter()
        world = prepare(args, Path(tmp))
        console.print(f"set-up: {len(world.practitioners)} practitioners with availability, {args.clients} "
                      f"patients, {time.perf_counter() - t0:.1f} s")
        port = free_port()
        base = f"http://{HOST}:{port}"
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "teleledger.cli", "serve", "--port", str(port)],
                                      env=world.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/fhir/metadata", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    console.print(log.read_text(errors="replace")[-2000:])
                    return 2
                time.sleep(0.2)
            svc_tok = httpx.post(f"{base}/auth/token", data={"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                                             "client_secret": CLIENT_SECRET}, timeout=10).json()
            svc = {"Authorization": f"Bearer {svc_tok['access_token']}"}
            tokens = [httpx.post(f"{base}/auth/token", data={"grant_type": "password", "username": u,
                                                             "password": PASSWORD}, timeout=30).json()["access_token"]
                      for u in world.patients]
            runs: list[Run] = []
            for i in range(args.rounds):
                for j, scenario in enumerate(("uncontended", "contended")):
                    practitioner = world.practitioners[2 * i + j]
                    listed = httpx.get(f"{base}/api/visits/slots", params={"practitioner": practitioner, "days": 7},
                                       headers=svc, timeout=60).json()["slots"]
                    slots = [s["id"] for s in listed[: args.slots]]
                    run = Run(scenario, practitioner, len(slots))
                    asyncio.run(measure(base, tokens, slots, run))
                    runs.append(run)
                    console.print(f"round {i + 1} {scenario:12} {run.codes[201] / run.elapsed:7.1f} bookings/s "
                                  f"{run.attempts / run.elapsed:7.1f} attempts/s  201×{run.codes[201]} "
                                  f"409×{run.codes[409]} other×{run.attempts - run.codes[201] - run.codes[409]}")
            problems = verify(base, svc, runs, args)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    table = Table(title=f"Booking, {args.clients} clients, {args.slots} slots per run")
    for col in ("round", "scenario", "bookings/s", "attempts/s", "p50 ms", "p99 ms", "201", "409", "errors"):
        table.add_column(col, justify="right" if col not in ("scenario",) else "left")
    for k, run in enumerate(runs):
        table.add_row(str(k // 2 + 1), run.scenario, f"{run.codes[201] / run.elapsed:.1f}",
                      f"{run.attempts / run.elapsed:.1f}", f"{run.pct(0.5):.1f}", f"{run.pct(0.99):.1f}",
                      str(run.codes[201]), str(run.codes[409]), str(run.attempts - run.codes[201] - run.codes[409]))
    console.print(table)
    base_rate = [r.codes[201] / r.elapsed for r in runs if r.scenario == "uncontended"]
    cont_rate = [r.codes[201] / r.elapsed for r in runs if r.scenario == "contended"]
    cont_attempts = [r.attempts / r.elapsed for r in runs if r.scenario == "contended"]
    console.print(f"contended/uncontended bookings/s: {sum(cont_rate) / sum(base_rate):.2f}×; contended "
                  f"attempts/s vs uncontended bookings/s: {sum(cont_attempts) / sum(base_rate):.2f}×")
    errors = [e for r in runs for e in r.errors]
    if errors:
        problems.append(f"{len(errors)} unexpected answers, e.g. {errors[:3]}")
    if problems:
        for p in problems:
            console.print(f"[bold red]FAIL[/] {p}")
        return 1
    console.print(f"[bold green]zero double bookings[/]: {sum(r.codes[201] for r in runs)} bookings checked "
                  "against the Appointments, the Slots and slot_bookings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
