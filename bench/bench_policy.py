"""Micro-benchmark of the policy decision point deciding from the in-memory consent index.

    .venv/bin/python bench/bench_policy.py [--patients 5000] [--decisions 2000000] [--seed 5] [--by-outcome]

Builds a realistic ``ConsentIndex`` the way the chain indexer fills it: every consent is FHIR
Consent JSON read by ``parse_consent`` and applied with ``apply_grant`` (some later revoked with
``apply_revoke``). Per patient: 3–6 grants to pharmacies, payers, research studies, named
practitioners and a delegate; half of the permits carry nested deny exceptions (mental-health,
HIV or substance-use data; genetic reports); a third of the patients deny mental-health data to
anyone; one grant in ten has already expired. Practitioners have care relationships with a
few hundred patients each, and some hold break-glass claims.

The request mix (prebuilt, replayed in a loop): practitioners with and without a care
relationship (some with purpose ETREAT), pharmacists, payers, researchers and delegates, on
random patients and resource types, 15% of the resources carrying sensitivity labels.

Measured on one core (the process pins itself to one CPU where the OS allows), plain CPython:

* ``decide(principal, request, care, index)`` — the decision the store asks for every access;
* ``index.grant(principal, request)`` alone;
* baseline, same loop, same run: ``decide(principal, request, care)`` without the index, i.e.
  the pre-consent rules (care relationship only; consent roles always "needs-consent").

and, for scale, how long ``search_filter`` takes to build a principal's consent view. With
``--by-outcome``, each (role, outcome) of the mix is also timed as a loop of its own — where the
time goes when the figures move.

Target: >= 500,000 decisions/s from the index on one core.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from teleledger.policy.consent import parse_consent

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from teleledger.identity.scopes import ROLE_SCOPE_SETS
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.decide import decide, search_filter
from teleledger.policy.model import AccessRequest, Principal

TARGET_DECISIONS_PER_S = 500_000
NOW = time.time()  # the index runs on the real clock, as in production; consents are dated around now
HOUR = 3600.0

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"

N_PRACTITIONERS = 200
N_PHARMACIES = 20
N_PAYERS = 10
N_STUDIES = 10

CLINICAL_TYPES = ("Observation", "Condition", "MedicationRequest", "DocumentReference", "Procedure", "Encounter")
ROLE_TYPES = {
    "pharmacist": ("MedicationRequest", "MedicationDispense"),
    "payer": ("Claim", "Coverage", "ExplanationOfBenefit", "Encounter"),
    "researcher": ("ResearchSubject",),
    "patient": CLINICAL_TYPES,
    "practitioner": CLINICAL_TYPES,
}
LABEL_SETS = (frozenset({"PSY"}), frozenset({"HIV"}), frozenset({"ETH", "PSY"}), frozenset({"SEX"}),
              frozenset({"GDIS"}))


class Care:
    """Care relationships as the store's per-request cache holds them: a set lookup."""

    def __init__(self, pairs: set[tuple[str, str]]) -> None:
        self.pairs = pairs

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in self.pairs


def _consent(cid: str, patient: str, actor: str | None, *, scope: str = "patient-privacy",
             purposes: Sequence[str] = (), nested: Sequence[dict] = (), kind: str = "permit",
             data: dict | None = None) -> dict:
    provision: dict = {"type": kind, **(data or {})}
    if actor is not None:
        provision["actor"] = [{"reference": {"reference": actor}}]
    if purposes:
        provision["purpose"] = [{"system": ACT_REASON, "code": p} for p in purposes]
    if nested:
        provision["provision"] = list(nested)
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": scope}]},
        "patient": {"reference": f"Patient/{patient}"},
        "provision": provision,
    }


def _labels(*codes: str) -> dict:
    return {"securityLabel": [{"system": ACT_CODE, "code": c} for c in codes]}


EXCEPTIONS = (
    _labels("PSY"),
    _labels("HIV", "ETH"),
    {"class": [{"system": TYPES_SYSTEM, "code": "DocumentReference"}], **_labels("PSY")},
    {"class": [{"system": TYPES_SYSTEM, "code": "DiagnosticReport"}], **_labels("GDIS")},
)


def build(n_patients: int, rnd: random.Random, progress: Progress) -> tuple[ConsentIndex, Care, dict[str, int]]:
    index = ConsentIndex(now=time.time)
    counts: Counter[str] = Counter()
    block = 0
    task = progress.add_task("building the consent index", total=n_patients)
    care: set[tuple[str, str]] = set()
    for i in range(n_patients):
        patient = f"pat-{i}"
        grants: list[tuple[str, str, list[str]]] = []  # (grantee, scope, purposes)
        for _ in range(rnd.randint(3, 6)):
            kind = rnd.choice(("pharmacy", "payer", "study", "practitioner", "practitioner", "delegate"))
            if kind == "pharmacy":
                grants.append((f"Organization/pharmacy-{rnd.randrange(N_PHARMACIES)}", "patient-privacy", ["TREAT"]))
            elif kind == "payer":
                grants.append((f"Organization/payer-{rnd.randrange(N_PAYERS)}", "patient-privacy", ["HPAYMT"]))
            elif kind == "study":
                grants.append((f"ResearchStudy/rs-{rnd.randrange(N_STUDIES)}", "research", []))
            elif kind == "practitioner":
                grants.append((f"Practitioner/d{rnd.randrange(N_PRACTITIONERS)}", "patient-privacy", []))
            else:
                grants.append((f"RelatedPerson/rp-{i}", "patient-privacy", []))
        for j, (grantee, scope, purposes) in enumerate(grants):
            cid = f"c-{i}-{j}"
            nested = [rnd.choice(EXCEPTIONS)] if rnd.random() < 0.5 else []
            rules = parse_consent(_consent(cid, patient, grantee, scope=scope, purposes=purposes, nested=nested))
            expired = rnd.random() < 0.1
            block += 1
            index.apply_grant(cid, patient, [grantee], rules,
                              NOW - 90 * 24 * HOUR, NOW - HOUR if expired else None, (block, 0))
            counts["grants"] += 1
            counts["grants with deny exceptions"] += bool(nested)
            counts["expired grants"] += expired
            if rnd.random() < 0.05:
                block += 1
                index.apply_revoke(cid, patient, [grantee], (block, 0))
                counts["revoked grants"] += 1
        if rnd.random() < 1 / 3:
            cid = f"no-mh-{i}"
            block += 1
            rules = parse_consent(_consent(cid, patient, None, kind="deny", data=_labels("PSY")))
            index.apply_grant(cid, patient, ["*"], rules, None, None, (block, 0))
            counts["'no mental health to anyone' denies"] += 1
        for _ in range(rnd.randint(1, 3)):  # this patient's treating practitioners
            care.add((f"d{rnd.randrange(N_PRACTITIONERS)}", patient))
        progress.advance(task)
    for k in range(N_PRACTITIONERS // 4):  # a few open break-glass claims
        index.claim_break_glass(f"d{k}", f"pat-{rnd.randrange(n_patients)}", "unconscious in the ER, no history",
                                NOW - HOUR, 4 * HOUR)
        counts["break-glass claims"] += 1
    counts["care relationships"] = len(care)
    return index, Care(care), dict(counts)


def _principal(role: str, *, refs: frozenset[str] = frozenset(), practitioner_id: str | None = None,
               patient_id: str | None = None, purpose: str = "TREAT") -> Principal:
    return Principal(f"acct-{role}", role, ROLE_SCOPE_SETS[role], patient_id, practitioner_id,  # type: ignore[arg-type]
                     purpose, actor_refs=refs)


def workload(n: int, n_patients: int, care: Care, rnd: random.Random) -> list[tuple[Principal, AccessRequest]]:
    """``n`` (principal, request) pairs in the mix of the module docstring."""
    doctors = [_principal("practitioner", practitioner_id=f"d{k}", refs=frozenset({f"Organization/clinic-{k % 7}"}))
               for k in range(N_PRACTITIONERS)]
    er_doctors = [_principal("practitioner", practitioner_id=f"d{k}", purpose="ETREAT") for k in range(N_PRACTITIONERS)]
    pharmacists = [_principal("pharmacist", refs=frozenset({f"Organization/pharmacy-{k}"})) for k in range(N_PHARMACIES)]
    payers = [_principal("payer", refs=frozenset({f"Organization/payer-{k}"}), purpose="HPAYMT") for k in range(N_PAYERS)]
    researchers = [_principal("researcher", refs=frozenset({f"ResearchStudy/rs-{k}"}), purpose="HRESCH")
                   for k in range(N_STUDIES)]
    treated: dict[str, list[str]] = {}
    for d, p in care.pairs:
        treated.setdefault(d, []).append(p)
    out: list[tuple[Principal, AccessRequest]] = []
    for _ in range(n):
        roll = rnd.random()
        if roll < 0.45:  # practitioners, mostly about their own patients
            k = rnd.randrange(N_PRACTITIONERS)
            who = er_doctors[k] if rnd.random() < 0.05 else doctors[k]
            mine = treated.get(f"d{k}")
            patient = rnd.choice(mine) if mine and rnd.random() < 0.7 else f"pat-{rnd.randrange(n_patients)}"
        elif roll < 0.65:
            who, patient = rnd.choice(pharmacists), f"pat-{rnd.randrange(n_patients)}"
        elif roll < 0.80:
            who, patient = rnd.choice(payers), f"pat-{rnd.randrange(n_patients)}"
        elif roll < 0.90:
            who, patient = rnd.choice(researchers), f"pat-{rnd.randrange(n_patients)}"
        else:  # delegates, usually about the patient they stand in for
            i = rnd.randrange(n_patients)
            who = _principal("patient", patient_id=f"self-{i}", refs=frozenset({f"RelatedPerson/rp-{i}"}))
            patient = f"pat-{i}" if rnd.random() < 0.8 else f"pat-{rnd.randrange(n_patients)}"
        rtype = rnd.choice(ROLE_TYPES[who.role])
        labels = rnd.choice(LABEL_SETS) if rnd.random() < 0.15 else frozenset()
        action = rnd.choice(("read", "read", "read", "search", "vread", "history"))
        out.append((who, AccessRequest(action, rtype, frozenset({patient}), labels=labels)))  # type: ignore[arg-type]
    return out


def run(label: str, fn: Callable[[Principal, AccessRequest], object], pairs: list[tuple[Principal, AccessRequest]],
        total: int, progress: Progress) -> tuple[float, float]:
    """Replay ``pairs`` until ``total`` calls; returns (calls/s wall, calls/s CPU)."""
    task = progress.add_task(label, total=total)
    rounds = max(1, total // len(pairs))
    wall = cpu = 0.0
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for principal, request in pairs:
            fn(principal, request)
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        progress.advance(task, len(pairs))
    calls = rounds * len(pairs)
    return calls / wall, calls / cpu


def outcome_table(pairs: list[tuple[Principal, AccessRequest]], care: Care, index: ConsentIndex) -> Table:
    """CPU µs per decision for each (role, outcome) of the mix, replayed as a loop of its own.

    A group's requests lie scattered in memory among the others', so every figure here includes
    more cache misses than the same requests cost inside the full loop: compare the columns of
    one row, not rows with the loops above."""
    groups: dict[tuple[str, str], list[tuple[Principal, AccessRequest]]] = {}
    for p, r in pairs:
        groups.setdefault((p.role, decide(p, r, care, index).reason), []).append((p, r))

    def cpu_us(fn: Callable[[Principal, AccessRequest], object], group: list[tuple[Principal, AccessRequest]]) -> float:
        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            for p, r in group:
                fn(p, r)
            best = min(best, time.process_time() - c0)
        return 1e6 * best / len(group)

    table = Table(title="per outcome, CPU µs per decision (best of 3 loops over the group)")
    for col in ("role", "outcome", "share", "decide + index", "baseline", "index.grant"):
        table.add_column(col, justify="left" if col in ("role", "outcome") else "right")
    for (role, reason), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        table.add_row(role, reason, f"{len(group) / len(pairs):.1%}",
                      f"{cpu_us(lambda p, r: decide(p, r, care, index), group):.2f}",
                      f"{cpu_us(lambda p, r: decide(p, r, care), group):.2f}", f"{cpu_us(index.grant, group):.2f}")
    return table


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}; {os.cpu_count()} CPUs; Python {platform.python_version()} "
            f"({platform.python_implementation()}); load average {load}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=5000)
    ap.add_argument("--decisions", type=int, default=2_000_000)
    ap.add_argument("--workload", type=int, default=200_000, help="distinct (principal, request) pairs replayed")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--by-outcome", action="store_true",
                    help="also time each (role, outcome) of the mix on its own, with and without the index")
    args = ap.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)  # whole tables when piped to a file
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
        pinned = "pinned to one CPU"
    else:  # pragma: no cover - not Linux
        pinned = "not pinned (no sched_setaffinity)"
    rnd = random.Random(args.seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        t0 = time.perf_counter()
        index, care, counts = build(args.patients, rnd, progress)
        built = time.perf_counter() - t0
        pairs = workload(args.workload, args.patients, care, rnd)
        outcomes = Counter(decide(p, r, care, index).reason for p, r in pairs)
        # baseline and index runs alternate twice, so that load changes hit both
        base1 = run("baseline: decide, care relationship only", lambda p, r: decide(p, r, care), pairs,
                    args.decisions, progress)
        idx1 = run("decide with the consent index", lambda p, r: decide(p, r, care, index), pairs,
                   args.decisions, progress)
        base2 = run("baseline again", lambda p, r: decide(p, r, care), pairs, args.decisions, progress)
        idx2 = run("decide with the consent index again", lambda p, r: decide(p, r, care, index), pairs,
                   args.decisions, progress)
        grant = run("index.grant alone", index.grant, pairs, args.decisions, progress)
    views: dict[str, tuple[float, float]] = {}
    for name, who in {
        "pharmacist (one pharmacy)": _principal("pharmacist", refs=frozenset({"Organization/pharmacy-0"})),
        "practitioner (care team + every deny to anyone)": _principal("practitioner", practitioner_id="d1"),
    }.items():
        t = time.perf_counter()
        search_filter(who, index)  # builds the view
        cold = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(1000):
            search_filter(who, index)  # served from the view cache
        views[name] = (cold, (time.perf_counter() - t) / 1000)

    by_outcome = outcome_table(pairs, care, index) if args.by_outcome else None
    base = max(base1[1], base2[1])
    with_index = max(idx1[1], idx2[1])
    console.print(f"machine: {machine()}; {pinned}")
    console.print(f"index: {args.patients:,} patients, built in {built:.1f} s — "
                  + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
    table = Table(title="policy decisions on one core (CPU time)")
    for col in ("loop", "decisions/s (CPU)", "decisions/s (wall)", "µs each (CPU)"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    for name, (wall, cpu) in (("baseline (care only)", base1), ("baseline again", base2),
                              ("decide + consent index", idx1), ("decide + consent index again", idx2),
                              ("index.grant alone", grant)):
        table.add_row(name, f"{cpu:,.0f}", f"{wall:,.0f}", f"{1e6 / cpu:.2f}")
    console.print(table)
    console.print(f"ratio decide+index / baseline (best of two each): {with_index / base:.2f}×")
    total = sum(outcomes.values())
    console.print("outcomes of the workload: " + ", ".join(
        f"{reason} {100 * n / total:.1f}%" for reason, n in outcomes.most_common()))
    for name, (cold, warm) in views.items():
        console.print(f"search_filter for a {name}: {cold * 1e3:.1f} ms to build, {warm * 1e6:.1f} µs cached")
    if by_outcome is not None:
        console.print(by_outcome)
    met = with_index >= TARGET_DECISIONS_PER_S
    console.print(f"target >= {TARGET_DECISIONS_PER_S:,} decisions/s from the index: "
                  f"{'[green]met[/green]' if met else '[red]not met[/red]'} ({with_index:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
