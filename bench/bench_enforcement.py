"""FHIR read and search throughput with access-policy enforcement on and off, in one run.

    .venv/bin/python bench/bench_enforcement.py [--duration 15] [--rounds 3] [--users 16]
                                                [--patients 1500] [--seed 5] [--chain]

Issue 5, point 8: FHIR read/search throughput with enforcement on vs off in the same run
(target >= 0.9x).

The node: ``teleledger`` as ``teleledger serve`` runs it (``bootstrap.build``, ``create_app``,
one uvicorn worker on loopback), in a subprocess this script starts on a fresh
``TELELEDGER_HOME`` (SQLite, random master key). Before it serves, that process imports the
bundled Synthea sample (``samples/synthea-10``) and ``--patients`` generated patients through
``Importer`` as ``teleledger import`` does (each: an Encounter, three Observations — one in eight
a PHQ-9 score, which ``policy.sensitivity`` labels mental health — a Condition and a
MedicationRequest), creates two accounts, and fills the node's ``ConsentIndex`` the way the
chain indexer does (FHIR Consent JSON through ``parse_consent``, then ``apply_grant`` /
``apply_revoke``): per patient 3–6 grants to pharmacies, payers, research studies, named
practitioners and a delegate (half with nested deny exceptions for labelled data, one in ten
expired, one in twenty revoked), and for a third of the patients a "no mental-health data to
anyone" deny — thousands of grants. The chain runtime is off by default: reads do not use it, and
its in-process block sealing stalls the event loop now and then, noise for both modes alike
(``--chain`` keeps it on).

Who reads, with password-grant Bearer tokens as a clinic's app and a pharmacy's app would:

* a practitioner (linked to the Synthea practitioner with the most patients; member of
  Organization/clinic-1) with care relationships to those patients and to a fifth of the
  generated ones, and consents naming them from others: reads (``GET /fhir/{type}/{id}``) of
  their Encounters, Conditions, Observations and MedicationRequests, and ``{type}?patient={id}``
  searches;
* a pharmacist of Organization/pharmacy-1: reads of the MedicationRequests of patients whose
  consent permits pharmacy-1, and ``MedicationRequest?patient={id}`` searches.

Only requests that enforcement allows are replayed (the pre-flight drops the others), so both
modes do the same work but the policy's; the pre-flight also counts the rows each search returns
in each mode, which differ only where a patient's deny hides labelled data.

Enforcement off: the same server process, node and requests, with the decision point replaced in
this benchmark's server process only. ``teleledger.records.service`` reaches the policy through
one module reference, ``policy``: ``policy.decide`` for every resource a request touches and
``policy.search_filter`` for every search. The stand-in answers "allowed" and ``All`` (no row
restriction, so no care-team or consent clauses in the SQL and no re-check of the rows). The
switch is a route this script adds to its own server (``PUT /bench/enforcement``); teleledger
has no setting for it and must never have one. What both modes keep: authentication, the
``AccessRequest`` with the resource's sensitivity labels, the audit row and log entry of every
access.

Rounds alternate on and off, the order flipping every round; each run is ``--duration`` seconds
of ``--users`` keep-alive connections (3 practitioner apps to 1 pharmacy app), each looping over
its own shuffled copy of the requests. Reported per mode and per kind (read, search):
requests/s, p50/p99 latency, the server process's CPU-ms per request (from /proc), and the ratio
on / off with the verdict on the target. Before it serves, the server process also replays every
request once per mode (twice) straight through ``node.records``, no HTTP, and reports the CPU-ms
per request by who and kind: where enforcement's cost lies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from rich.bar import Bar
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# the HTTP client, server process helpers and machine description of the CRUD benchmark
from crud_load import HOST, Http, Server, free_port, machine, percentile, start, teleledger_env, wait_until_answering

TARGET_RATIO = 0.9
BENCH_DIR = Path(__file__).resolve().parent
SYNTHEA = BENCH_DIR.parent / "samples" / "synthea-10"
PASSWORD = "bench-enforcement-pass"
KINDS = ("read", "search")
MODES = ("on", "off")
DAY = 86_400.0

console = Console() if sys.stdout.isatty() else Console(width=130)


# ==== the server process =========================================================================
# Runs as ``bench_enforcement.py --serve``: sets the node up, writes the plan (accounts and the
# requests to replay) next to it, then serves until terminated.

class EnforcementOff:
    """Stands in for the ``teleledger.policy.decide`` module inside ``records.service``: every
    resource allowed, every search unrestricted; anything else is the real module's."""

    def __init__(self, real: Any) -> None:
        from teleledger.policy.model import All, Decision

        self._real = real
        self._allowed = Decision(True, "enforcement-off", "Benchmark: the access policy is switched off.")
        self._all = All()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def decide(self, *args: Any, **kwargs: Any) -> Any:
        return self._allowed

    def search_filter(self, *args: Any, **kwargs: Any) -> Any:
        return self._all


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _ref(rt: str, rid: str) -> dict:
    return {"reference": f"{rt}/{rid}"}


ORGANIZATIONS = {"clinic-1": ("Bench Clinic", "prov"), **{f"pharmacy-{k}": (f"Bench Pharmacy {k}", "prov")
                                                          for k in range(1, 6)},
                 **{f"payer-{k}": (f"Bench Mutual {k}", "pay") for k in range(1, 4)}}
STUDIES = [f"rs-{k}" for k in range(1, 4)]


def generated_patient(i: int, doctor: str, other: str, rnd: random.Random) -> dict[str, list[dict]]:
    """The resources of generated patient ``i``: type → resources. The Encounter names ``doctor``
    for a fifth of them (a care relationship), ``other`` for the rest."""
    pid = f"gen-{i:05d}"
    enc = f"gen-enc-{i:05d}"
    prac = doctor if rnd.random() < 0.2 else other
    out: dict[str, list[dict]] = {
        "Patient": [{"resourceType": "Patient", "id": pid, "active": True,
                     "identifier": [{"system": "urn:teleledger:bench:patient", "value": pid}],
                     "name": [{"use": "official", "family": f"Bench{i}", "given": ["Pat"]}],
                     "gender": "female" if i % 2 else "male", "birthDate": f"19{40 + i % 60:02d}-03-07"}],
        "Encounter": [{"resourceType": "Encounter", "id": enc, "status": "finished",
                       "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                       "type": [_cc("http://snomed.info/sct", "185349003", "Encounter for check up")],
                       "subject": _ref("Patient", pid), "participant": [{"individual": _ref("Practitioner", prac)}],
                       "period": {"start": "2025-05-02T09:00:00+00:00", "end": "2025-05-02T09:30:00+00:00"},
                       "serviceProvider": _ref("Organization", "clinic-1")}],
        "Observation": [],
        "Condition": [{"resourceType": "Condition", "id": f"gen-cond-{i:05d}",
                       "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active",
                                             "Active"),
                       "code": _cc("http://snomed.info/sct", "59621000", "Essential hypertension (disorder)"),
                       "subject": _ref("Patient", pid), "encounter": _ref("Encounter", enc),
                       "onsetDateTime": "2025-05-02T09:10:00+00:00"}],
        "MedicationRequest": [{"resourceType": "MedicationRequest", "id": f"gen-mr-{i:05d}", "status": "active",
                               "intent": "order",
                               "medicationCodeableConcept": _cc("http://www.nlm.nih.gov/research/umls/rxnorm",
                                                                "314076", "lisinopril 10 MG Oral Tablet"),
                               "subject": _ref("Patient", pid), "encounter": _ref("Encounter", enc),
                               "authoredOn": "2025-05-02T09:20:00+00:00", "requester": _ref("Practitioner", prac),
                               "dosageInstruction": [{"sequence": 1, "text": "one tablet by mouth once a day"}]}],
    }
    for j in range(3):
        phq = rnd.random() < 1 / 8
        code = (_cc("http://loinc.org", "44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score")
                if phq else _cc("http://loinc.org", "8867-4", "Heart rate"))
        out["Observation"].append({
            "resourceType": "Observation", "id": f"gen-obs-{i:05d}-{j}", "status": "final",
            "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category",
                             "survey" if phq else "vital-signs", "Survey" if phq else "Vital signs")],
            "code": code, "subject": _ref("Patient", pid), "encounter": _ref("Encounter", enc),
            "effectiveDateTime": f"2025-05-02T09:1{j}:00+00:00",
            "valueQuantity": ({"value": 11, "unit": "{score}", "system": "http://unitsofmeasure.org",
                               "code": "{score}"} if phq else
                              {"value": 64 + j, "unit": "/min", "system": "http://unitsofmeasure.org",
                               "code": "/min"})})
    return out


def synthea_facts() -> tuple[list[str], dict[str, dict[str, list[str]]], dict[str, set[str]]]:
    """From the sample's files: its patients; per patient, type → resource ids; per practitioner
    id, the patients whose Encounters name them (the sample names practitioners by NPI)."""
    npi: dict[str, str] = {}
    for line in (SYNTHEA / "Practitioner.000.ndjson").read_bytes().splitlines():
        r = orjson.loads(line)
        for ident in r.get("identifier", []):
            npi[f"{ident['system']}|{ident['value']}"] = r["id"]
    patients = [orjson.loads(line)["id"] for line in (SYNTHEA / "Patient.000.ndjson").read_bytes().splitlines()]
    by_patient: dict[str, dict[str, list[str]]] = {p: {} for p in patients}
    treats: dict[str, set[str]] = {}
    for rt in ("Encounter", "Condition", "MedicationRequest", "Procedure"):
        for line in (SYNTHEA / f"{rt}.000.ndjson").read_bytes().splitlines():
            r = orjson.loads(line)
            patient = r.get("subject", {}).get("reference", "").removeprefix("Patient/")
            if patient not in by_patient:
                continue
            by_patient[patient].setdefault(rt, []).append(r["id"])
            for part in r.get("participant", []) if rt == "Encounter" else ():
                ref = part.get("individual", {}).get("reference", "")
                if ref.startswith("Practitioner?identifier=") and ref.split("=", 1)[1] in npi:
                    treats.setdefault(npi[ref.split("=", 1)[1]], set()).add(patient)
    return patients, by_patient, treats


def consent_events(patients: Sequence[str], practitioners: Sequence[str], rnd: random.Random,
                   now: float) -> list[dict]:
    """The consent history of ``patients`` as the chain indexer would project it (module docstring);
    grantee kinds and exceptions as in ``bench_policy.py``."""
    from bench_policy import EXCEPTIONS, _consent, _labels

    events: list[dict] = []
    for i, patient in enumerate(patients):
        for j in range(rnd.randint(3, 6)):
            kind = rnd.choice(("pharmacy", "payer", "study", "practitioner", "practitioner", "delegate"))
            scope, purposes = "patient-privacy", []
            if kind == "pharmacy":
                grantee, purposes = f"Organization/pharmacy-{rnd.randint(1, 5)}", ["TREAT"]
            elif kind == "payer":
                grantee, purposes = f"Organization/payer-{rnd.randint(1, 3)}", ["HPAYMT"]
            elif kind == "study":
                grantee, scope = f"ResearchStudy/{rnd.choice(STUDIES)}", "research"
            elif kind == "practitioner":
                grantee = f"Practitioner/{rnd.choice(practitioners)}"
            else:
                grantee = f"RelatedPerson/rp-{i}"
            cid = f"bench-{i}-{j}"
            nested = [rnd.choice(EXCEPTIONS)] if rnd.random() < 0.5 else []
            expired = rnd.random() < 0.1
            events.append({"consent": _consent(cid, patient, grantee, scope=scope, purposes=purposes, nested=nested),
                           "grantee": grantee, "from": now - 90 * DAY, "until": now - 3600 if expired else None,
                           "revoked": rnd.random() < 0.05})
        if rnd.random() < 1 / 3:
            events.append({"consent": _consent(f"bench-no-mh-{i}", patient, None, kind="deny", data=_labels("PSY")),
                           "grantee": "*", "from": None, "until": None, "revoked": False})
    return events


def apply_consents(index: Any, events: list[dict]) -> int:
    from teleledger.policy.consent import parse_consent

    for block, e in enumerate(events, start=1):
        cid, patient = e["consent"]["id"], e["consent"]["patient"]["reference"].removeprefix("Patient/")
        index.apply_grant(cid, patient, [e["grantee"]], parse_consent(e["consent"]), e["from"], e["until"],
                          (2 * block, 0))
        if e["revoked"]:
            index.apply_revoke(cid, patient, [e["grantee"]], (2 * block + 1, 0))
    return len(events)


def permits(events: list[dict], grantee: str, now: float) -> set[str]:
    """Patients with a granted, unexpired, unrevoked consent to ``grantee``."""
    return {e["consent"]["patient"]["reference"].removeprefix("Patient/") for e in events
            if e["grantee"] == grantee and not e["revoked"] and (e["until"] is None or e["until"] > now)}


def prepare(node: Any, n_patients: int, seed: int) -> dict:
    """Import the data, create the accounts, fill the consent index; returns the plan."""
    from teleledger.demo import system_principal
    from teleledger.records.importer import Importer, count_lines, ordered_files

    rnd = random.Random(seed)
    t0 = time.perf_counter()
    importer = Importer(node.records, system_principal())
    importer.run(SYNTHEA)
    synthea, by_patient, treats = synthea_facts()
    doctor = max(sorted(treats), key=lambda p: len(treats[p]))
    other = next(p for p in sorted(treats) if p != doctor)
    data: dict[str, list[dict]] = {"Organization": [
        {"resourceType": "Organization", "id": oid, "active": True, "name": name,
         "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", code, code)]}
        for oid, (name, code) in ORGANIZATIONS.items()]}
    generated: dict[str, dict[str, list[str]]] = {}
    care = set(treats[doctor])
    for i in range(n_patients):
        resources = generated_patient(i, doctor, other, rnd)
        pid = resources["Patient"][0]["id"]
        generated[pid] = {rt: [r["id"] for r in rs] for rt, rs in resources.items() if rt != "Patient"}
        if resources["Encounter"][0]["participant"][0]["individual"]["reference"] == f"Practitioner/{doctor}":
            care.add(pid)
        for rt, rs in resources.items():
            data.setdefault(rt, []).extend(rs)
    folder = node.settings.home / "bench-data"
    folder.mkdir(exist_ok=True)
    for rt, rs in data.items():
        (folder / f"{rt}.000.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in rs) + b"\n")
    importer.run(folder)
    imported = time.perf_counter() - t0

    node.accounts.create_user(username="bench-doctor", password=PASSWORD, role="practitioner",
                              practitioner=f"Practitioner/{doctor}", organization="Organization/clinic-1")
    node.accounts.create_user(username="bench-pharmacist", password=PASSWORD, role="pharmacist",
                              organization="Organization/pharmacy-1")

    now = time.time()
    patients = [*synthea, *generated]
    events = consent_events(patients, sorted(treats), rnd, now)
    t1 = time.perf_counter()
    apply_consents(node.consents, events)
    indexed = time.perf_counter() - t1

    resources = {**by_patient, **generated}
    consented_doctor = permits(events, f"Practitioner/{doctor}", now) - care
    pharmacy = permits(events, "Organization/pharmacy-1", now)
    doctor_requests: list[tuple[str, str]] = []
    for patient in sorted(care | consented_doctor):
        ids = resources[patient]
        for rt in ("Encounter", "Condition", "Observation", "MedicationRequest"):
            for rid in ids.get(rt, [])[:3]:
                doctor_requests.append(("read", f"/fhir/{rt}/{rid}"))
            if rt in ids:
                doctor_requests.append(("search", f"/fhir/{rt}?patient={patient}&_count=20"))
    pharmacist_requests: list[tuple[str, str]] = []
    for patient in sorted(pharmacy):
        for rid in resources[patient].get("MedicationRequest", [])[:3]:
            pharmacist_requests.append(("read", f"/fhir/MedicationRequest/{rid}"))
        if "MedicationRequest" in resources[patient]:
            pharmacist_requests.append(("search", f"/fhir/MedicationRequest?patient={patient}&_count=20"))
    return {
        "doctor": doctor,
        "patients": len(patients),
        "resources": sum(len(v) for v in data.values()) + sum(count_lines(f) for f in ordered_files(SYNTHEA)),
        "grants": len(events),
        "revoked": sum(e["revoked"] for e in events),
        "care patients": len(care),
        "patients consenting to the practitioner only": len(consented_doctor),
        "patients consenting to pharmacy-1": len(pharmacy),
        "import s": round(imported, 1),
        "consent index s": round(indexed, 2),
        "requests": {"practitioner": doctor_requests, "pharmacist": pharmacist_requests},
    }


def breakdown(node: Any, plan: dict, modes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """CPU-ms per request by who, kind and mode, straight through ``node.records`` (no HTTP): each
    request of the plan once per mode, modes alternating twice. ``modes`` maps a mode to the
    module ``records.service`` should use as its policy."""
    import teleledger.records.service as records_service
    from urllib.parse import parse_qsl, urlsplit

    from teleledger.core.errors import TeleledgerError
    from teleledger.policy.model import Principal

    principals = {
        "practitioner": Principal("bench-doctor", "practitioner", node.accounts.role_scopes("practitioner"), None,
                                  plan["doctor"], "TREAT", actor_refs=frozenset({"Organization/clinic-1"})),
        "pharmacist": Principal("bench-pharmacist", "pharmacist", node.accounts.role_scopes("pharmacist"), None,
                                None, "TREAT", actor_refs=frozenset({"Organization/pharmacy-1"})),
    }
    cpu: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for mode in (*MODES, *MODES):
        records_service.policy = modes[mode]
        for who, reqs in plan["requests"].items():
            for kind in KINDS:
                todo = [urlsplit(path) for k, path in reqs if k == kind]
                c0 = time.process_time()
                for url in todo:
                    rt, *rest = url.path.removeprefix("/fhir/").split("/")
                    try:
                        if kind == "read":
                            node.records.read(principals[who], rt, rest[0])
                        else:
                            node.records.search(principals[who], rt, parse_qsl(url.query))
                    except TeleledgerError:  # a denial costs its time too (the pre-flight drops those requests)
                        pass
                key = f"{who} {kind}"
                cpu.setdefault(key, {}).setdefault(mode, 0.0)
                cpu[key][mode] += time.process_time() - c0
                counts[key] = len(todo)
    records_service.policy = modes["on"]
    return {key: {mode: round(1000 * t / 2 / max(counts[key], 1), 3) for mode, t in by.items()}
            for key, by in cpu.items()}


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    import teleledger.records.service as records_service
    from teleledger.bootstrap import build
    from teleledger.config import Settings
    from teleledger.web.app import create_app

    node = build(Settings())
    plan = prepare(node, args.patients, args.seed)
    real = records_service.policy
    off = EnforcementOff(real)
    plan["breakdown"] = breakdown(node, plan, {"on": real, "off": off})
    app = create_app(node)

    async def enforcement(request: Request) -> PlainTextResponse:
        wanted = (await request.body()).decode().strip()
        if request.method == "PUT":
            if wanted not in MODES:
                return PlainTextResponse("send on or off", status_code=400)
            records_service.policy = real if wanted == "on" else off
        return PlainTextResponse("on" if records_service.policy is real else "off")

    app.add_route("/bench/enforcement", enforcement, methods=["GET", "PUT"])
    (node.settings.home / "plan.json").write_bytes(orjson.dumps(plan))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


# ==== the load generator =========================================================================

@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: int = 0
    samples: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def merge(self, other: Stats) -> None:
        for k in KINDS:
            self.latencies[k] += other.latencies[k]
        self.errors += other.errors
        self.samples += other.samples[: 5 - len(self.samples)]


@dataclass
class Run:
    mode: str
    stats: Stats
    elapsed: float
    server_cpu: float
    client_cpu: float
    load: float

    @property
    def rps(self) -> float:
        return self.stats.requests / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.server_cpu / max(self.stats.requests, 1)


async def token(port: int, username: str) -> str:
    http = Http(port, {})
    try:
        form = urlencode({"grant_type": "password", "username": username, "password": PASSWORD})
        status, data = await http.request("POST", "/auth/token", form.encode(), "application/x-www-form-urlencoded")
    finally:
        http.close()
    if status != 200:
        raise SystemExit(f"POST /auth/token for {username} answered {status}: {data.decode(errors='replace')}")
    return str(orjson.loads(data)["access_token"])


async def set_mode(port: int, mode: str) -> None:
    http = Http(port, {})
    try:
        status, data = await http.request("PUT", "/bench/enforcement", mode.encode(), "text/plain")
    finally:
        http.close()
    if status != 200 or data.decode() != mode:
        raise SystemExit(f"could not switch enforcement {mode}: {status} {data!r}")


def _rows(data: bytes) -> int:
    body = orjson.loads(data)
    return sum(1 for e in body.get("entry", []) if e.get("search", {}).get("mode", "match") == "match")


async def preflight(port: int, headers: dict[str, dict[str, str]],
                    requests: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """Each request once in each mode: keep those both modes answer 200; count search rows."""
    facts: dict[str, Any] = {"dropped": {}, "rows": {m: 0 for m in MODES}, "searches that differ": 0}
    answers: dict[str, dict[tuple[str, str, str], tuple[int, int]]] = {}
    total = sum(len(v) for v in requests.values())
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        for mode in MODES:
            await set_mode(port, mode)
            task = progress.add_task(f"pre-flight, enforcement {mode}", total=total)
            answers[mode] = {}
            for who, reqs in requests.items():
                http = Http(port, headers[who])
                try:
                    for kind, path in reqs:
                        status, data = await http.request("GET", path)
                        answers[mode][(who, kind, path)] = (status, _rows(data) if kind == "search" and status == 200
                                                           else 0)
                        progress.advance(task)
                finally:
                    http.close()
    kept: dict[str, list[tuple[str, str]]] = {}
    for who, reqs in requests.items():
        kept[who] = []
        for kind, path in reqs:
            on, off = answers["on"][(who, kind, path)], answers["off"][(who, kind, path)]
            if on[0] != 200 or off[0] != 200:
                key = f"{who} {kind}: on {on[0]}, off {off[0]}"
                facts["dropped"][key] = facts["dropped"].get(key, 0) + 1
                continue
            kept[who].append((kind, path))
            facts["rows"]["on"] += on[1]
            facts["rows"]["off"] += off[1]
            facts["searches that differ"] += on[1] != off[1]
    return kept, facts


async def user(port: int, headers: dict[str, str], requests: list[tuple[str, str]], stats: Stats,
               deadline: list[float], ready: asyncio.Event, connected: list[int]) -> None:
    http = Http(port, headers)
    await http.connect()
    connected.append(1)
    await ready.wait()
    clock = time.perf_counter
    try:
        while True:
            for kind, path in requests:
                if clock() >= deadline[0]:
                    return
                t0 = clock()
                try:
                    status, data = await http.request("GET", path)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    http.close()
                    status, data = 0, repr(exc).encode()
                stats.latencies[kind].append(clock() - t0)
                if status != 200:
                    stats.errors += 1
                    if len(stats.samples) < 5:
                        stats.samples.append(f"GET {path} -> {status}: {data[:200]!r}")
    finally:
        http.close()


async def run_load(server: Server, mode: str, headers: dict[str, dict[str, str]],
                   requests: dict[str, list[tuple[str, str]]], users: int, duration: float, seed: int,
                   label: str) -> Run:
    await set_mode(server.port, mode)
    rnd = random.Random(seed)
    stats = Stats()
    deadline, ready, connected = [float("inf")], asyncio.Event(), []
    tasks = []
    for u in range(users):
        who = "pharmacist" if u % 4 == 3 else "practitioner"
        mine = list(requests[who])
        rnd.shuffle(mine)
        tasks.append(asyncio.create_task(user(server.port, headers[who], mine, stats, deadline, ready, connected)))
    try:
        while len(connected) < users:
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.001)
        load = os.getloadavg()[0]
        cpu_server, cpu_client = server.cpu_seconds(), time.process_time()
        t0 = time.perf_counter()
        deadline[0] = t0 + duration
        ready.set()
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[rps]:>7.0f} req/s  {task.fields[errors]} errors"),
                      console=console) as progress:
            bar = progress.add_task(label, total=duration, rps=0.0, errors=0)
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.25)
                now = time.perf_counter() - t0
                progress.update(bar, completed=min(now, duration), rps=stats.requests / now, errors=stats.errors)
        elapsed = time.perf_counter() - t0
        for t in tasks:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
    return Run(mode, stats, elapsed, server.cpu_seconds() - cpu_server, time.process_time() - cpu_client, load)


def combine(runs: list[Run], mode: str) -> Run:
    total = Stats()
    mine = [r for r in runs if r.mode == mode]
    for r in mine:
        total.merge(r.stats)
    return Run(mode, total, sum(r.elapsed for r in mine), sum(r.server_cpu for r in mine),
               sum(r.client_cpu for r in mine), max(r.load for r in mine))


def report(runs: list[Run], plan: dict, facts: dict, requests: dict[str, list[tuple[str, str]]],
           args: argparse.Namespace, before: dict[str, str]) -> bool:
    ms = 1000.0
    table = Table(title=f"FHIR reads and searches, enforcement on / off: {args.users} users, "
                        f"{args.duration:.0f} s per run")
    for col in ("run", "enforcement", "load avg", "requests", "req/s", "p50 ms", "p99 ms", "errors",
                "server CPU", "CPU ms/req", "client CPU"):
        table.add_column(col, justify="left" if col in ("run", "enforcement") else "right")

    def row(label: str, r: Run, style: str | None = None) -> None:
        lat = [x for v in r.stats.latencies.values() for x in v]
        table.add_row(label, r.mode, f"{r.load:.2f}", f"{r.stats.requests:,}", f"{r.rps:,.0f}",
                      f"{percentile(lat, 50) * ms:.1f}", f"{percentile(lat, 99) * ms:.1f}", str(r.stats.errors),
                      f"{r.server_cpu / r.elapsed:.0%}", f"{r.cpu_ms:.2f}", f"{r.client_cpu / r.elapsed:.0%}",
                      style=style)

    for i, r in enumerate(runs, start=1):
        row(str(i), r)
    table.add_section()
    totals = {mode: combine(runs, mode) for mode in MODES}
    for total in totals.values():
        row("all", total, "bold")
    console.print(table)

    kinds = Table(title="per kind (all runs): p50 / p99 ms")
    kinds.add_column("kind")
    kinds.add_column("share", justify="right")
    for mode in MODES:
        kinds.add_column(f"enforcement {mode}", justify="right")
    for kind in KINDS:
        n = totals["on"].stats.latencies[kind]
        share = len(n) / max(totals["on"].stats.requests, 1)
        cells = [f"{percentile(totals[m].stats.latencies[kind], 50) * ms:.1f} / "
                 f"{percentile(totals[m].stats.latencies[kind], 99) * ms:.1f}" for m in MODES]
        kinds.add_row(kind, f"{share:.0%}", *cells)
    console.print(kinds)

    chart = Table(title="requests/s per run", show_header=False, box=None, padding=(0, 1))
    chart.add_column(justify="right")
    chart.add_column(width=50)
    chart.add_column(justify="right")
    top = max(r.rps for r in runs)
    for i, r in enumerate(runs, start=1):
        chart.add_row(f"{i} {r.mode}", Bar(top, 0, r.rps, width=50, color="green" if r.mode == "on" else "grey50"),
                      f"{r.rps:,.0f}")
    console.print(chart)
    for t in totals.values():
        for sample in t.stats.samples:
            console.print(f"[red]enforcement {t.mode} error:[/] {sample}")

    on, off = totals["on"], totals["off"]
    ratio = on.rps / off.rps if off.rps else float("nan")
    cpu_ratio = off.cpu_ms / on.cpu_ms if on.cpu_ms else float("nan")
    # runs come in rounds of two, one per mode
    per_round = [(a.rps / b.rps if a.mode == "on" else b.rps / a.rps) for a, b in zip(runs[::2], runs[1::2])]
    console.print(f"node: {plan['patients']:,} patients, {plan['resources']:,} resources (imported in "
                  f"{plan['import s']} s), {plan['grants']:,} consent "
                  f"grants ({plan['revoked']} revoked) applied in {plan['consent index s']} s; the practitioner has "
                  f"{plan['care patients']} care patients and {plan['patients consenting to the practitioner only']} "
                  f"more consenting, pharmacy-1 {plan['patients consenting to pharmacy-1']}")
    console.print(f"requests replayed: {', '.join(f'{who} {len(r):,}' for who, r in requests.items())}; dropped "
                  f"by the pre-flight: {facts['dropped'] or 'none'}; search rows on / off "
                  f"{facts['rows']['on']:,} / {facts['rows']['off']:,} ({facts['searches that differ']} searches "
                  "differ)")
    parts = Table(title="without HTTP: CPU ms per request")
    for col in ("who and kind", "on", "off", "on - off"):
        parts.add_column(col, justify="left" if col == "who and kind" else "right")
    for key, by in plan["breakdown"].items():
        parts.add_row(key, f"{by['on']:.2f}", f"{by['off']:.2f}", f"{by['on'] - by['off']:.2f}")
    console.print(parts)
    console.print(f"enforcement costs {on.cpu_ms - off.cpu_ms:.2f} CPU-ms per request "
                  f"({on.cpu_ms:.2f} on, {off.cpu_ms:.2f} off: {cpu_ratio:.2f}x); per round on / off "
                  + ", ".join(f"{x:.2f}x" for x in per_round))
    met = ratio >= TARGET_RATIO and on.stats.errors == 0 and off.stats.errors == 0
    console.print(f"{'[green]PASS' if met else '[red]FAIL'}[/] throughput on / off = {ratio:.2f}x "
                  f"(target >= {TARGET_RATIO}x, no errors)")
    after = machine()
    console.print(f"machine: {before['cpus']} CPUs ({before['cpu']}), Python {before['python']}; load average "
                  f"{before['load']} before, {after['load']} after (the machine may be shared with other processes)")
    return met


async def bench(args: argparse.Namespace, server: Server) -> int:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as progress:
        progress.add_task(f"setting the node up: import, {args.patients:,} generated patients, accounts, consents")
        await wait_until_answering(server, timeout=args.setup_timeout)
    plan = orjson.loads((args.home / "plan.json").read_bytes())
    headers = {who: {"Authorization": f"Bearer {await token(server.port, name)}"}
               for who, name in (("practitioner", "bench-doctor"), ("pharmacist", "bench-pharmacist"))}
    requests = {who: [(str(r[0]), str(r[1])) for r in reqs] for who, reqs in plan["requests"].items()}
    requests, facts = await preflight(server.port, headers, requests)
    if not all(requests.values()):
        raise SystemExit(f"nothing left to replay after the pre-flight: {facts}")
    before = machine()
    for mode in MODES:
        await run_load(server, mode, headers, requests, args.users, args.warmup, args.seed, f"warm-up, {mode}")
    runs = []
    for i in range(args.rounds):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            runs.append(await run_load(server, mode, headers, requests, args.users, args.duration, args.seed + i,
                                       f"round {i + 1}, enforcement {mode}"))
    return 0 if report(runs, plan, facts, requests, args, before) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one run on and one off")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per mode first")
    ap.add_argument("--users", type=int, default=16, help="concurrent keep-alive connections")
    ap.add_argument("--patients", type=int, default=1500, help="generated patients besides the Synthea sample")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--chain", action="store_true", help="keep the embedded chain runtime on")
    ap.add_argument("--setup-timeout", type=float, default=900.0)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host", default=HOST, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="teleledger-bench-enforcement-"))
    args.home = workdir / "home"
    env = teleledger_env(args.home)
    env["TELELEDGER_CHAIN_ENABLED"] = "true" if args.chain else "false"
    port = free_port()
    server = start("teleledger", [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port),
                                  "--patients", str(args.patients), "--seed", str(args.seed)], env, port, workdir)
    try:
        return asyncio.run(bench(args, server))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
