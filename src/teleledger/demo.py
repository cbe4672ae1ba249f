"""Demo data for ``make run``: the Synthea sample population and one account per role.

The demo passwords are published in the README, so ``Settings.check`` refuses demo data in
production. The demo patient and practitioner are real records of the sample: the practitioner
is the one who saw the demo patient most often, so the care relationship is real data too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teleledger.bootstrap import Node
from teleledger.identity.scopes import ScopeSet
from teleledger.policy.model import Principal
from teleledger.records.importer import ImportReport, Importer
from teleledger.visits import availability as av

DEMO_PATIENT = "6a4160eb-a793-2f86-2302-378626f46cce"
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "synthea-10"


@dataclass(frozen=True)
class DemoAccount:
    username: str
    password: str
    role: str
    link: str | None


def system_principal(purpose: str = "HOPERAT") -> Principal:
    """The node acting on its own behalf (import, demo set-up): full system scopes, no patient."""
    return Principal(subject="system:teleledger", role="service", scopes=ScopeSet.parse("system/*.cruds"),
                     patient_id=None, practitioner_id=None, purpose=purpose)


def samples_dir(node: Node) -> Path:
    return node.settings.samples_dir or SAMPLES


def import_samples(node: Node, progress: Callable[[int], None] | None = None) -> ImportReport:
    return Importer(node.records, system_principal()).run(samples_dir(node), progress=progress)


def _demo_practitioner(node: Node) -> str:
    bundle = node.records.search(system_principal(), "Encounter", [("patient", DEMO_PATIENT), ("_count", "1000")])
    seen: Counter[str] = Counter()
    for e in bundle.get("entry", []):
        for part in e["resource"].get("participant", []):
            ref = (part.get("individual") or {}).get("reference", "")
            if ref.startswith("Practitioner/"):
                seen[ref] += 1
    if not seen:
        raise RuntimeError("the demo patient has no encounters with a practitioner: were the samples imported?")
    return seen.most_common(1)[0][0]


def create_accounts(node: Node) -> list[DemoAccount]:
    accounts = [
        DemoAccount("admin", "demo-admin-pass", "admin", None),
        DemoAccount("patient", "demo-patient-pass", "patient", f"Patient/{DEMO_PATIENT}"),
        DemoAccount("doctor", "demo-doctor-pass", "practitioner", _demo_practitioner(node)),
        DemoAccount("pharmacist", "demo-pharmacist-pass", "pharmacist", None),
        DemoAccount("payer", "demo-payer-pass", "payer", None),
        DemoAccount("researcher", "demo-researcher-pass", "researcher", None),
    ]
    for a in accounts:
        if node.accounts.get_by_username(a.username) is None:
            node.accounts.create_user(
                username=a.username, password=a.password, role=a.role,
                patient=a.link if a.role == "patient" else None,
                practitioner=a.link if a.role == "practitioner" else None,
            )
    _demo_chain_members(node)
    doctor = next(a for a in accounts if a.username == "doctor")
    publish_demo_availability(node, str(doctor.link).removeprefix("Practitioner/"))
    return accounts


def _demo_chain_members(node: Node) -> None:
    """The demo doctor prescribes and the demo pharmacist dispenses on the node's chain: ask the
    ParticipantRegistry for their roles (sent when the server runs; idempotent)."""
    from teleledger.ledger.chain import ROLE_PHARMACIST, ROLE_PRACTITIONER
    from teleledger.prescriptions.service import PrescriptionService

    service = PrescriptionService.for_node(node)
    service.request_member("doctor", ROLE_PRACTITIONER)
    service.request_member("pharmacist", ROLE_PHARMACIST)


def publish_demo_availability(node: Node, practitioner_id: str) -> None:
    """Give the demo doctor bookable video visits: weekdays 09:00-17:00 with a lunch break,
    20-minute visits, Europe/Berlin. At every start the hours they have (perhaps changed in
    "My availability") are published again, which keeps four weeks of free slots ahead."""
    scheduling = node.scheduling
    found = scheduling.availability(system_principal(), practitioner_id)
    if found is None:
        found = (av.weekly_hours_from_parts({d: ("09:00", "17:00", "12:00-13:00") for d in av.WEEKDAYS[:5]},
                                            visit_minutes=20, timezone_name="Europe/Berlin"), 4)
    hours, weeks = found
    scheduling.publish(system_principal(), practitioner_id, hours, weeks=weeks)
