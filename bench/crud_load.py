"""CRUD load benchmark: teleledger against a minimal unsecured baseline and against itself with
its transparency log switched off, in one session.

    .venv/bin/python bench/crud_load.py [--duration 20] [--users 32] [--rounds 2] [--warmup 3] [--workers 1]
                                        [--servers baseline,teleledger,teleledger-nolog] [--no-chain]
                                        [--tmpdir /dev/shm]

A Python port of the public FHIR-server CRUD load scenario. Each of ``--users`` concurrent
virtual users holds one HTTP/1.1 keep-alive connection and loops over one *iteration*:

* for Patient, Location, Organization, Practitioner, Encounter, Observation, MedicationRequest,
  Claim and ExplanationOfBenefit, in that order: create (POST), read (GET), update (PUT with a
  changed element); the clinical and financial resources reference the Patient, Practitioner,
  Organization, Location and Encounter created earlier in the same iteration;
* then delete (DELETE) the nine in reverse order, so no reference ever points at a deleted
  resource (a server that checks referential integrity would otherwise refuse the deletes).

That is 36 requests per iteration: 9 each of create, read, update and delete.

The script starts the servers itself as subprocesses on free loopback ports and stops them on
exit (also on Ctrl-C or an error):

* ``baseline``: ``bench/baseline_server.py`` (FastAPI + SQLite storing raw JSON, no auth, no
  validation) with the same uvicorn and SQLite settings as teleledger;
* ``teleledger`` (``teleledger serve``) with a fresh temporary ``TELELEDGER_HOME``, a random
  master key, no demo data, its embedded chain as ``make run`` has it (``--no-chain``: without),
  a ``system/*.cruds`` backend client and a client-credentials token;
* ``teleledger-nolog`` (``bench/teleledger_nolog_server.py``): the same, in a home of its own,
  with the transparency log taken out (no change entries, no access entries in the log, no
  sequencer; the ``access_events`` rows stay — see that module), for the log's overhead
  (issue 3: log on / log off >= 0.85x). ``--servers`` picks which of the three run.

Before measuring it creates, reads, updates and deletes each of the nine resources once on each
server and stops with the OperationOutcome if anything is refused, then warms each server up.
Measured runs alternate (baseline, teleledger, teleledger-nolog, baseline, ...) so that noise
from other processes on the machine hits all of them. A request counts as an error when the
answer is not 2xx or the connection fails. Latency is measured per request with ``time.perf_counter`` in the
load generator (raw asyncio sockets on uvloop, cheap enough not to be the bottleneck: its own CPU
use is reported next to the servers').

Targets: teleledger >= 0.7x the baseline's requests/s, >= 1,000 requests/s, log on / log off
>= 0.85x, zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import orjson
from rich.bar import Bar
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret-0123456789"
TARGET_RATIO, TARGET_RPS = 0.7, 1_000
#: teleledger with the log / without it (issue 3)
TARGET_LOG_RATIO = 0.85
SERVERS = ("baseline", "teleledger", "teleledger-nolog")
TYPES = ("Patient", "Location", "Organization", "Practitioner", "Encounter", "Observation", "MedicationRequest",
         "Claim", "ExplanationOfBenefit")
OPS = ("create", "read", "update", "delete")
MAX_ERROR_SAMPLES = 5

# wide enough for the tables when the output is piped to a file
console = Console() if sys.stdout.isatty() else Console(width=140)


# ---- the resources ----------------------------------------------------------------------------

def _ref(refs: dict[str, str], rt: str) -> dict:
    return {"reference": f"{rt}/{refs[rt]}"}


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def new_resource(rt: str, refs: dict[str, str], tag: str) -> dict:
    """A small, valid R4 resource of type ``rt``; ``refs`` maps types created earlier to their ids."""
    if rt == "Patient":
        return {"resourceType": "Patient", "active": True,
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.3.25", "value": f"bench-{tag}"}],
                "name": [{"use": "official", "family": "Bench", "given": ["Vu", tag]}],
                "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}],
                "gender": "female", "birthDate": "1984-03-07",
                "address": [{"line": ["1 Load St"], "city": "Springfield", "state": "MA", "postalCode": "01101"}]}
    if rt == "Location":
        return {"resourceType": "Location", "status": "active", "name": f"Bench clinic {tag}",
                "address": {"line": ["2 Clinic Rd"], "city": "Springfield", "state": "MA", "postalCode": "01101"}}
    if rt == "Organization":
        return {"resourceType": "Organization", "active": True, "name": f"Bench Health {tag}",
                "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:org-{tag}"}],
                "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")]}
    if rt == "Practitioner":
        return {"resourceType": "Practitioner", "active": True,
                "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi",
                                "value": f"99{abs(hash(tag)) % 10**8:08d}"}],
                "name": [{"family": "Doe", "given": ["Jane"], "prefix": ["Dr."]}], "gender": "female"}
    if rt == "Encounter":
        return {"resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [_cc("http://snomed.info/sct", "185349003", "Encounter for check up")],
                "subject": _ref(refs, "Patient"),
                "participant": [{"individual": _ref(refs, "Practitioner")}],
                "period": {"start": "2024-05-02T09:00:00+00:00", "end": "2024-05-02T09:30:00+00:00"},
                "location": [{"location": _ref(refs, "Location")}],
                "serviceProvider": _ref(refs, "Organization")}
    if rt == "Observation":
        return {"resourceType": "Observation", "status": "final",
                "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs",
                                 "Vital signs")],
                "code": _cc("http://loinc.org", "8867-4", "Heart rate"),
                "subject": _ref(refs, "Patient"), "encounter": _ref(refs, "Encounter"),
                "effectiveDateTime": "2024-05-02T09:10:00+00:00", "issued": "2024-05-02T09:10:00.000+00:00",
                "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    if rt == "MedicationRequest":
        return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "medicationCodeableConcept": _cc("http://www.nlm.nih.gov/research/umls/rxnorm", "314076",
                                                 "lisinopril 10 MG Oral Tablet"),
                "subject": _ref(refs, "Patient"), "encounter": _ref(refs, "Encounter"),
                "authoredOn": "2024-05-02T09:20:00+00:00", "requester": _ref(refs, "Practitioner"),
                "dosageInstruction": [{"sequence": 1, "text": "one tablet by mouth once a day"}]}
    if rt == "Claim":
        return {"resourceType": "Claim", "status": "active",
                "type": _cc("http://terminology.hl7.org/CodeSystem/claim-type", "professional", "Professional"),
                "use": "claim", "patient": _ref(refs, "Patient"),
                "billablePeriod": {"start": "2024-05-02T09:00:00+00:00", "end": "2024-05-02T09:30:00+00:00"},
                "created": "2024-05-02T09:30:00+00:00", "provider": _ref(refs, "Organization"),
                "priority": _cc("http://terminology.hl7.org/CodeSystem/processpriority", "normal", "Normal"),
                "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Bench Mutual"}}],
                "item": [{"sequence": 1, "productOrService": _cc("http://snomed.info/sct", "185349003",
                                                                  "Encounter for check up"),
                          "encounter": [_ref(refs, "Encounter")],
                          "net": {"value": 125.0, "currency": "USD"}}],
                "total": {"value": 125.0, "currency": "USD"}}
    if rt == "ExplanationOfBenefit":
        return {"resourceType": "ExplanationOfBenefit", "status": "active",
                "type": _cc("http://terminology.hl7.org/CodeSystem/claim-type", "professional", "Professional"),
                "use": "claim", "patient": _ref(refs, "Patient"),
                "billablePeriod": {"start": "2024-05-02T09:00:00+00:00", "end": "2024-05-02T09:30:00+00:00"},
                "created": "2024-05-02T09:30:00+00:00", "insurer": {"display": "Bench Mutual"},
                "provider": _ref(refs, "Practitioner"), "claim": _ref(refs, "Claim"), "outcome": "complete",
                "insurance": [{"focal": True, "coverage": {"display": "Bench Mutual"}}],
                "item": [{"sequence": 1, "productOrService": _cc("http://snomed.info/sct", "185349003",
                                                                  "Encounter for check up"),
                          "encounter": [_ref(refs, "Encounter")]}],
                "total": [{"category": _cc("http://terminology.hl7.org/CodeSystem/adjudication", "submitted",
                                           "Submitted Amount"), "amount": {"value": 125.0, "currency": "USD"}}]}
    raise ValueError(rt)


def changed(resource: dict) -> dict:
    """The resource with one element changed, as a client's update would send it."""
    rt, out = resource["resourceType"], dict(resource)
    if rt in ("Patient", "Practitioner", "Organization"):
        out["active"] = False
    elif rt == "Location":
        out["status"] = "inactive"
    elif rt == "Encounter":
        out["period"] = {**out["period"], "end": "2024-05-02T09:45:00+00:00"}
    elif rt == "Observation":
        out["valueQuantity"] = {**out["valueQuantity"], "value": 74}
    elif rt == "MedicationRequest":
        out["status"] = "completed"
    elif rt in ("Claim", "ExplanationOfBenefit"):
        out["status"] = "cancelled"
    return out


# ---- a tiny HTTP/1.1 keep-alive client ------------------------------------------------------------

class Http:
    """One keep-alive connection. Cheaper per request than httpx by an order of magnitude,
    so that on two cores the generator does not steal the server's CPU."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self._head = f"Host: {HOST}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        self.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None,
                      content_type: str = "application/fhir+json") -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\n{self._head}"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length, chunked, close = 0, False, False
        for line in raw.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        else:
            data = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data


# ---- the scenario --------------------------------------------------------------------------------

@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(what)

    def merge(self, other: Stats) -> None:
        for op in OPS:
            self.latencies[op] += other.latencies[op]
        self.errors += other.errors
        self.error_samples += other.error_samples[: MAX_ERROR_SAMPLES - len(self.error_samples)]


class Rejected(Exception):
    """A server refused a step of the scenario during the pre-flight check."""


class Deadline(Exception):
    """The measured window is over: the user stops before sending another request."""


async def iteration(http: Http, tag: str, stats: Stats, deadline: float, *, strict: bool = False) -> None:
    """One pass of the scenario. With ``strict`` (pre-flight) any refusal raises ``Rejected``."""
    clock = time.perf_counter

    async def call(op: str, method: str, path: str, body: bytes | None, ok: tuple[int, ...]) -> bytes | None:
        if clock() >= deadline:
            raise Deadline
        t0 = clock()
        try:
            status, data = await http.request(method, path, body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            http.close()
            stats.latencies[op].append(clock() - t0)
            stats.error(f"{method} {path}: {type(exc).__name__}: {exc}")
            if strict:
                raise Rejected(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            return None
        stats.latencies[op].append(clock() - t0)
        if 200 <= status < 300 and status in ok:
            return data
        text = data.decode(errors="replace")
        stats.error(f"{method} {path} -> {status}: {text[:400]}")
        if strict:
            raise Rejected(f"{method} {path} answered {status} (expected {'/'.join(map(str, ok))}):\n{text}")
        return None

    refs: dict[str, str] = {}
    try:
        for rt in TYPES:
            resource = new_resource(rt, refs, tag)
            data = await call("create", "POST", f"/fhir/{rt}", orjson.dumps(resource), (201,))
            if data is None:
                if rt in ("Patient", "Practitioner", "Organization", "Location", "Encounter", "Claim"):
                    break  # later resources would reference it
                continue
            created = orjson.loads(data)
            res_id = refs[rt] = created["id"]
            path = f"/fhir/{rt}/{res_id}"
            read = await call("read", "GET", path, None, (200,))
            if strict and read is not None and orjson.loads(read).get("id") != res_id:
                raise Rejected(f"GET {path} returned another resource: {read[:400]!r}")
            await call("update", "PUT", path, orjson.dumps(changed({**resource, "id": res_id})), (200,))
    finally:
        # delete what this iteration created even when it stopped early (but not after the deadline)
        for rt in reversed(TYPES):
            if rt in refs:
                with contextlib.suppress(Deadline):
                    await call("delete", "DELETE", f"/fhir/{rt}/{refs[rt]}", None, (200, 204))


@dataclass
class Window:
    """The measured time window, set when every user is connected."""

    deadline: float = float("inf")


async def virtual_user(port: int, headers: dict[str, str], user: int, stats: Stats, window: Window,
                       ready: asyncio.Event, connected: list[int]) -> None:
    http = Http(port, headers)
    await http.connect()
    connected.append(user)
    await ready.wait()
    n = 0
    try:
        while time.perf_counter() < window.deadline:
            n += 1
            with contextlib.suppress(Deadline):
                await iteration(http, f"u{user}i{n}", stats, window.deadline)
    finally:
        http.close()


# ---- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """utime + stime of the server process and of its worker processes (``--workers``)."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.proc.pid))

    def disk_bytes(self) -> float:
        """Bytes the server's processes caused to be written to storage (``write_bytes`` of
        /proc/PID/io: the database, its WAL and checkpoints); NaN where the kernel does not say."""
        return sum(_disk_bytes(pid) for pid in _process_tree(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _disk_bytes(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return float(line.split(":", 1)[1])
    except OSError:
        pass
    return float("nan")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's worker processes are children of the supervisor)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start(name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(name, port, proc, log)


async def wait_until_answering(server: Server, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.proc.returncode} while starting:\n"
                             f"{_log_tail(server.log)}")
        http = Http(server.port, {})
        try:
            await http.request("GET", "/fhir/metadata")
            return
        except (OSError, asyncio.IncompleteReadError):
            if time.monotonic() > give_up:
                raise SystemExit(f"{server.name} did not answer on port {server.port} within {timeout:.0f} s:\n"
                                 f"{_log_tail(server.log)}") from None
            await asyncio.sleep(0.2)
        finally:
            http.close()


def teleledger_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELELEDGER_")}
    env.update(TELELEDGER_HOME=str(home), TELELEDGER_DEMO_DATA="false", TELELEDGER_PASSWORD_HASHING="fast",
               TELELEDGER_ENVIRONMENT="test", TELELEDGER_MASTER_KEY=base64.b64encode(os.urandom(32)).decode())
    return env


def teleledger_command() -> list[str]:
    exe = Path(sys.executable).with_name("teleledger")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from teleledger.cli import main; main()"]


def start_teleledger(workdir: Path, workers: int, *, log: bool = True, chain: bool = True) -> Server:
    """``teleledger serve``, or with ``log=False`` the same node without its transparency log
    (``bench/teleledger_nolog_server.py``); each in a fresh home of its own. ``chain=False``:
    without the embedded chain (``TELELEDGER_CHAIN_ENABLED=false``), whose threads share the
    process."""
    name = "teleledger" if log else "teleledger-nolog"
    home = workdir / f"{name}-home"
    env = teleledger_env(home)
    env["TELELEDGER_WORKERS"] = str(workers)
    env["TELELEDGER_CHAIN_ENABLED"] = "true" if chain else "false"
    made = subprocess.run([*teleledger_command(), "clients", "create", "--client-id", CLIENT_ID, "--secret",
                           CLIENT_SECRET, "--scope", "system/*.cruds"], env=env, capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"teleledger clients create failed ({made.returncode}):\n{made.stdout}{made.stderr}")
    port = free_port()
    if log:
        argv = [*teleledger_command(), "serve", "--host", HOST, "--port", str(port)]
    else:
        argv = [sys.executable, str(BENCH_DIR / "teleledger_nolog_server.py"), "--host", HOST, "--port", str(port),
                "--workers", str(workers)]
    return start(name, argv, env, port, workdir)


def start_baseline(workdir: Path, workers: int) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "baseline_server.py"), "--host", HOST, "--port", str(port),
            "--db", str(workdir / "baseline.db"), "--workers", str(workers)]
    return start("baseline", argv, dict(os.environ), port, workdir)


async def authorize(server: Server) -> None:
    http = Http(server.port, {})
    try:
        form = urlencode({"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
        status, data = await http.request("POST", "/auth/token", form.encode(), "application/x-www-form-urlencoded")
    finally:
        http.close()
    if status != 200:
        raise SystemExit(f"POST /auth/token answered {status}: {data.decode(errors='replace')}")
    server.headers["Authorization"] = f"Bearer {orjson.loads(data)['access_token']}"


async def preflight(server: Server) -> None:
    http = Http(server.port, server.headers)
    try:
        await iteration(http, "preflight", Stats(), float("inf"), strict=True)
    except Rejected as exc:
        console.print(f"[bold red]{server.name} refused the scenario[/] (fix the resource in bench/crud_load.py "
                      f"or the server):\n{exc}")
        raise SystemExit(1) from None
    finally:
        http.close()


# ---- runs ----------------------------------------------------------------------------------------

@dataclass
class Run:
    server: str
    stats: Stats
    elapsed: float
    server_cpu: float
    client_cpu: float
    server_disk: float = float("nan")

    @property
    def rps(self) -> float:
        return self.stats.requests / self.elapsed


async def run_load(server: Server, users: int, duration: float, label: str, *, show: bool = True) -> Run:
    stats, window, ready, connected = Stats(), Window(), asyncio.Event(), []
    tasks = [asyncio.create_task(virtual_user(server.port, server.headers, i, stats, window, ready, connected))
             for i in range(users)]
    try:
        # connect every user first, so that connection set-up is not measured
        while len(connected) < users:
            failed = [t for t in tasks if t.done()]
            if failed:
                failed[0].result()
            await asyncio.sleep(0.001)
        cpu_server, cpu_client, disk = server.cpu_seconds(), time.process_time(), server.disk_bytes()
        t0 = time.perf_counter()
        window.deadline = t0 + duration
        ready.set()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[rps]:>7.0f} req/s  {task.fields[errors]} errors"),
                            console=console, disable=not show)
        with progress:
            bar = progress.add_task(label, total=duration, rps=0.0, errors=0)
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.25)
                now = time.perf_counter() - t0
                progress.update(bar, completed=min(now, duration), rps=stats.requests / now, errors=stats.errors)
            elapsed = time.perf_counter() - t0
            progress.update(bar, completed=duration, rps=stats.requests / elapsed, errors=stats.errors)
        for t in tasks:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
    return Run(server.name, stats, elapsed, server.cpu_seconds() - cpu_server, time.process_time() - cpu_client,
               server.disk_bytes() - disk)


# ---- report --------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": str(len(os.sched_getaffinity(0))), "python": platform.python_version(), "cpu": model,
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def combine(runs: list[Run], name: str) -> Run:
    total = Stats()
    mine = [r for r in runs if r.server == name]
    for r in mine:
        total.merge(r.stats)
    return Run(name, total, sum(r.elapsed for r in mine), sum(r.server_cpu for r in mine),
               sum(r.client_cpu for r in mine), sum(r.server_disk for r in mine))


def report(runs: list[Run], args: argparse.Namespace, before: dict[str, str]) -> bool:
    after = machine()
    ms = 1000.0
    names = [n for n in SERVERS if any(r.server == n for r in runs)]
    table = Table(title=f"CRUD load: {args.users} virtual users, {args.duration:.0f} s per run, "
                        f"36 requests per iteration (9 types x create/read/update/delete), "
                        f"{args.workers} worker process{'es' if args.workers > 1 else ''} per server")
    for col in ("run", "server", "requests", "req/s", "p50 ms", "p99 ms", "errors", "server CPU", "CPU ms/req",
                "disk KB/req", "client CPU"):
        table.add_column(col, justify="left" if col in ("run", "server") else "right")

    def row(label: str, r: Run, style: str | None = None) -> None:
        lat = [x for v in r.stats.latencies.values() for x in v]
        table.add_row(label, r.server, f"{r.stats.requests:,}", f"{r.rps:,.0f}", f"{percentile(lat, 50) * ms:.1f}",
                      f"{percentile(lat, 99) * ms:.1f}", str(r.stats.errors), f"{r.server_cpu / r.elapsed:.0%}",
                      f"{r.server_cpu / max(r.stats.requests, 1) * ms:.2f}",
                      f"{r.server_disk / max(r.stats.requests, 1) / 1024:.1f}", f"{r.client_cpu / r.elapsed:.0%}",
                      style=style)

    for i, r in enumerate(runs, start=1):
        row(str(i), r)
    table.add_section()
    totals = {name: combine(runs, name) for name in names}
    for total in totals.values():
        row("all", total, "bold")
    console.print(table)
    console.print("server CPU = the server's CPU time (all its processes) / wall time (100% = one core, all one "
                  "worker can use); CPU ms/req moves less than req/s when other processes share the machine; "
                  "disk KB/req = bytes the server wrote to storage (database, WAL, checkpoints) per request")

    ops = Table(title="latency per interaction (all runs), ms")
    ops.add_column("interaction")
    for name in names:
        ops.add_column(f"{name} p50", justify="right")
        ops.add_column(f"{name} p99", justify="right")
    for op in OPS:
        cells = []
        for total in totals.values():
            lat = total.stats.latencies[op]
            cells += [f"{percentile(lat, 50) * ms:.1f}", f"{percentile(lat, 99) * ms:.1f}"]
        ops.add_row(op, *cells)
    console.print(ops)

    chart = Table(title="requests/s", show_header=False, box=None, padding=(0, 1))
    chart.add_column(justify="right")
    chart.add_column(width=50)
    chart.add_column(justify="right")
    top = max(*(r.rps for r in totals.values()), TARGET_RPS)
    colors = {"baseline": "cyan", "teleledger": "magenta", "teleledger-nolog": "yellow"}
    for r in totals.values():
        chart.add_row(r.server, Bar(top, 0, r.rps, width=50, color=colors[r.server]), f"{r.rps:,.0f}")
    chart.add_row("target", Bar(top, 0, TARGET_RPS, width=50, color="grey50"), f"{TARGET_RPS:,}")
    console.print(chart)

    for r in totals.values():
        for sample in r.stats.error_samples:
            console.print(f"[red]{r.server} error:[/] {sample}")

    def ratio(a: str, b: str) -> float:
        return totals[a].rps / totals[b].rps if totals[b].rps else float("nan")

    checks = []
    base, tele, nolog = (totals.get(n) for n in SERVERS)
    if tele is not None and base is not None:
        checks.append((f"teleledger / baseline = {ratio('teleledger', 'baseline'):.2f}x",
                       ratio("teleledger", "baseline") >= TARGET_RATIO, f">= {TARGET_RATIO}x"))
    if tele is not None:
        checks.append((f"teleledger {tele.rps:,.0f} req/s", tele.rps >= TARGET_RPS, f">= {TARGET_RPS:,} req/s"))
    if tele is not None and nolog is not None:
        cpu = [t.server_cpu / max(t.stats.requests, 1) * ms for t in (tele, nolog)]
        checks.append((f"log on / log off = {ratio('teleledger', 'teleledger-nolog'):.2f}x "
                       f"(CPU ms/req {cpu[0]:.2f} / {cpu[1]:.2f}: the log costs {cpu[0] - cpu[1]:.2f} ms)",
                       ratio("teleledger", "teleledger-nolog") >= TARGET_LOG_RATIO, f">= {TARGET_LOG_RATIO}x"))
    errors = ", ".join(f"{t.server} {t.stats.errors}" for t in totals.values())
    checks.append((f"errors: {errors}", all(t.stats.errors == 0 for t in totals.values()), "0"))
    for text, ok, target in checks:
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {text} (target {target})")
    console.print(f"machine: {before['cpus']} CPUs ({before['cpu']}), Python {before['python']}; "
                  f"load average {before['load']} before, {after['load']} after "
                  "(the machine may be shared with other processes)")
    return all(ok for _, ok, _ in checks)


# ---- main ----------------------------------------------------------------------------------------

async def bench(args: argparse.Namespace, servers: list[Server]) -> list[Run]:
    await asyncio.gather(*(wait_until_answering(s) for s in servers))
    for server in servers:
        if server.name != "baseline":
            await authorize(server)
    for server in servers:
        await preflight(server)
    console.print(f"pre-flight: {', '.join(s.name for s in servers)} create, read, update and delete all nine "
                  "resource types")
    if args.warmup > 0:
        for server in servers:
            await run_load(server, args.users, args.warmup, f"warm-up {server.name}")
    runs = []
    for i in range(args.rounds):
        for server in servers:
            runs.append(await run_load(server, args.users, args.duration, f"run {len(runs) + 1} {server.name}"))
            for s in servers:
                if s.proc.poll() is not None:
                    raise SystemExit(f"{s.name} exited with {s.proc.returncode}:\n{_log_tail(s.log)}")
    return runs


def run_async(coro) -> list[Run]:  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured run (default 20)")
    parser.add_argument("--users", type=int, default=32, help="concurrent virtual users (default 32)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of runs, one run per server in each (default 2)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per server first (default 3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server worker processes, the same for every server (default 1)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"which servers to measure, in this order each round (default {','.join(SERVERS)})")
    parser.add_argument("--no-chain", action="store_true",
                        help="run teleledger without its embedded chain (default: with it, as `make run` does)")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where the servers' databases go (default: the system's temporary folder); "
                             "a tmpfs such as /dev/shm takes the disk out of the comparison")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, databases)")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(SERVERS))
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        parser.error(f"--servers takes distinct names among {', '.join(SERVERS)}; got {args.servers!r}")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers

    signal.signal(signal.SIGTERM, on_term)
    before = machine()
    workdir = Path(tempfile.mkdtemp(prefix="crud-load-", dir=args.tmpdir))
    servers: list[Server] = []
    try:
        for name in chosen:
            servers.append(start_baseline(workdir, args.workers) if name == "baseline"
                           else start_teleledger(workdir, args.workers, log=name == "teleledger",
                                                 chain=not args.no_chain))
        console.print(", ".join(f"{s.name} on {HOST}:{s.port}" for s in servers)
                      + f" (logs and databases in {workdir})")
        runs = run_async(bench(args, servers))
        ok = report(runs, args, before)
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("interrupted; the servers were stopped")
        sys.exit(130)
