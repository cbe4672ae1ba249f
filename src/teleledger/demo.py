"""Demo data for ``make run``: the Synthea sample population and one account per role.

The demo passwords are published in the README, so ``Settings.check`` refuses demo data in
production. The demo patient and practitioner are real records of the sample: the practitioner
is the one who saw the demo patient most often, so the care relationship is real data too, and
their clinic is the Organization of the sample that provided most of those visits.

Organizations: the doctor and the admin (the clinic's privacy officer, who reviews break-glass
claims) act for that clinic; the pharmacist for ``Organization/demo-pharmacy`` and the payer for
``Organization/demo-payer``, two Organizations the demo adds (typed so that the portal offers
them as a pharmacy and a payer). Every start makes sure all of this exists, links included, so an
older demo home is brought up to date.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update

from teleledger.bootstrap import Node
from teleledger.identity.scopes import ScopeSet
from teleledger.policy.model import Principal
from teleledger.records.importer import ImportReport, Importer
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork
from teleledger.visits import availability as av

DEMO_PATIENT = "6a4160eb-a793-2f86-2302-378626f46cce"
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "synthea-10"
DEMO_PHARMACY = "demo-pharmacy"
DEMO_PAYER = "demo-payer"
#: used when the sample names no provider for the doctor's visits
DEMO_CLINIC = "demo-clinic"
_ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
#: the Organizations the demo adds: a pharmacy (SNOMED CT 264372000 "Pharmacy", NUCC 3336C0003X
#: "Community/Retail Pharmacy") and a payer (organization-type "pay"); see policy.service.organization_kind
DEMO_ORGANIZATIONS: dict[str, dict] = {
    DEMO_PHARMACY: {"name": "Demo Community Pharmacy", "type": [
        {"coding": [{"system": "http://snomed.info/sct", "code": "264372000", "display": "Pharmacy"},
                    {"system": "http://nucc.org/provider-taxonomy", "code": "3336C0003X",
                     "display": "Community/Retail Pharmacy"}], "text": "Pharmacy"}]},
    DEMO_PAYER: {"name": "Demo Health Insurance", "type": [
        {"coding": [{"system": _ORG_TYPE, "code": "pay", "display": "Payer"}], "text": "Payer"}]},
}


@dataclass(frozen=True)
class DemoAccount:
    username: str
    password: str
    role: str
    link: str | None
    organization: str | None = None  # Organization/<id> the account acts for


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


def _demo_clinic(node: Node, practitioner: str) -> str:
    """The Organization that provided most of the demo patient's visits with ``practitioner``
    (``Encounter.serviceProvider``); a demo clinic when the sample names none."""
    bundle = node.records.search(system_principal(), "Encounter", [("patient", DEMO_PATIENT), ("_count", "1000")])
    seen: Counter[str] = Counter()
    for e in bundle.get("entry", []):
        r = e["resource"]
        if any((p.get("individual") or {}).get("reference") == practitioner for p in r.get("participant", [])):
            ref = (r.get("serviceProvider") or {}).get("reference", "")
            if ref.startswith("Organization/") and "?" not in ref:
                seen[ref.removeprefix("Organization/")] += 1
    if seen:
        return seen.most_common(1)[0][0]
    _ensure_organization(node, DEMO_CLINIC, {"name": "Demo Clinic", "type": [
        {"coding": [{"system": _ORG_TYPE, "code": "prov", "display": "Healthcare Provider"}]}]})
    return DEMO_CLINIC


def _ensure_organization(node: Node, org_id: str, content: dict) -> None:
    if node.records.exists("Organization", org_id):
        return  # kept as it is: an admin may have edited it
    node.records.update(system_principal(), "Organization", org_id,
                        {"resourceType": "Organization", "id": org_id, "active": True, **content})


def _link_organization(node: Node, username: str, organization: str) -> None:
    """Link an existing demo account to its Organization (a demo home made before accounts had
    organizations); ``Accounts`` creates links, it has no use case to change them."""
    org_id = organization.removeprefix("Organization/")
    with UnitOfWork(node.engine) as uow:
        uow.c.execute(update(t.users).where(t.users.c.username == username, t.users.c.organization_id.is_(None))
                      .values(organization_id=org_id))
        uow.commit()


def create_accounts(node: Node) -> list[DemoAccount]:
    doctor_ref = _demo_practitioner(node)
    clinic = f"Organization/{_demo_clinic(node, doctor_ref)}"
    for org_id, content in DEMO_ORGANIZATIONS.items():
        _ensure_organization(node, org_id, content)
    accounts = [
        DemoAccount("admin", "demo-admin-pass", "admin", None, clinic),
        DemoAccount("patient", "demo-patient-pass", "patient", f"Patient/{DEMO_PATIENT}"),
        DemoAccount("doctor", "demo-doctor-pass", "practitioner", doctor_ref, clinic),
        DemoAccount("pharmacist", "demo-pharmacist-pass", "pharmacist", None, f"Organization/{DEMO_PHARMACY}"),
        DemoAccount("payer", "demo-payer-pass", "payer", None, f"Organization/{DEMO_PAYER}"),
        DemoAccount("researcher", "demo-researcher-pass", "researcher", None),
    ]
    for a in accounts:
        existing = node.accounts.get_by_username(a.username)
        if existing is None:
            node.accounts.create_user(
                username=a.username, password=a.password, role=a.role,
                patient=a.link if a.role == "patient" else None,
                practitioner=a.link if a.role == "practitioner" else None,
                organization=a.organization,
            )
        elif a.organization is not None and existing.organization_id is None:
            _link_organization(node, a.username, a.organization)
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
