"""Organizations as grantees, and break-glass for the privacy officer, end to end on a real node
with the embedded chain (SQLite and PostgreSQL).

A patient's Consent naming ``Organization/<pharmacy>`` reaches the pharmacists linked to that
organization (exactly the types, labels, purpose and period it permits) and nobody of another
organization; a payer's grant is for payment, which is what a payer's requests are for by
default; a grant to a clinic reaches its practitioners. A practitioner's break-glass claim is
listed, with its reason, to the privacy officer of the claimant's organization only, the reason
being kept sealed under the patient's data key; the patient gets a notification in the portal.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from teleledger.identity.scopes import ROLE_SCOPE_SETS
from teleledger.policy.consent_tables import break_glass_claims
from teleledger.policy.model import Principal
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.clinic import encounter
from tests.integration.helpers import create, observation, patient, service_headers
from tests.integration.test_consent import Clinic

PASSWORD = "correct horse 1"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
TYPES = "http://hl7.org/fhir/resource-types"
ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
PHARMACY_TYPE = [{"coding": [{"system": "http://snomed.info/sct", "code": "264372000", "display": "Pharmacy"}]}]
REASON = "unconscious on arrival, allergy status unknown"


def consent(patient_id: str, grantee: str, classes: list[str], purpose: str = "TREAT", **extra: Any) -> dict:
    return {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "provision": {
            "type": "permit",
            "actor": [{"reference": {"reference": grantee},
                       "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]}}],
            "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
            "purpose": [{"system": ACT_REASON, "code": purpose}],
            "class": [{"system": TYPES, "code": c} for c in classes], **extra},
    }


def medication_request(patient_id: str, practitioner_id: str) -> dict:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                      "code": "314076", "display": "lisinopril 10 MG"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "requester": {"reference": f"Practitioner/{practitioner_id}"}}


class World(Clinic):
    """Alice (treated by Dr Doc of the clinic) and Bob; two pharmacies, a payer, two clinics;
    an account per person, each linked to their organization."""

    def search(self, username: str, query: str, purpose: str | None = None) -> tuple[int, list[str]]:
        return self.search_ids(username, query, purpose)

    def principal(self, username: str) -> Principal:
        """The principal a token of this account speaks for (for use cases called directly)."""
        account = self.node.accounts.get_by_username(username)
        refs = frozenset({f"Organization/{account.organization_id}"} if account.organization_id else ())
        return Principal(account.id, account.role, ROLE_SCOPE_SETS[account.role], account.patient_id,
                         account.practitioner_id, actor_refs=refs)

    def browser(self, username: str) -> TestClient:
        page = TestClient(self.client.app)  # its own cookie jar
        r = page.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
        assert r.status_code == 303, r.text
        return page

    def access_events(self, username: str) -> list[tuple[str, str, str | None, str]]:
        """(purpose, reason, patient id, outcome) of this account's access events."""
        account = self.node.accounts.get_by_username(username)
        with self.node.engine.connect() as conn:
            rows = conn.execute(select(t.access_events.c.purpose, t.access_events.c.reason,
                                       t.access_events.c.patient_id, t.access_events.c.outcome)
                                .where(t.access_events.c.actor == account.id)).all()
        return [tuple(r) for r in rows]


@pytest.fixture
def world(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            w = World(client, node)
            svc = service_headers(client, node)
            ids = w.ids
            for key, name, types in (
                    ("pharmacy", "Main Street Pharmacy", PHARMACY_TYPE),
                    ("pharmacy2", "Harbour Pharmacy", PHARMACY_TYPE),
                    ("payer", "Acme Health Insurance", [{"coding": [{"system": ORG_TYPE, "code": "pay"}]}]),
                    ("clinic", "Riverside Clinic", [{"coding": [{"system": ORG_TYPE, "code": "prov"}]}]),
                    ("clinic2", "Hilltop Hospital", [{"coding": [{"system": ORG_TYPE, "code": "prov"}]}])):
                ids[key] = create(client, svc, {"resourceType": "Organization", "name": name, "type": types})["id"]
            ids["alice"] = create(client, svc, patient(family="Liddell", given="Alice"))["id"]
            ids["bob"] = create(client, svc, patient(family="Builder", given="Bob"))["id"]
            for key in ("doc", "rita", "sam"):
                ids[key] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": key.title()}]})["id"]
            ids["visit"] = create(client, svc, encounter(ids["alice"], ids["doc"]))["id"]
            ids["rx"] = create(client, svc, medication_request(ids["alice"], ids["doc"]))["id"]
            ids["rx_bob"] = create(client, svc, medication_request(ids["bob"], ids["doc"]))["id"]
            ids["obs"] = create(client, svc, observation(ids["alice"]))["id"]
            accounts = {
                "alice": ("patient", {"patient": f"Patient/{ids['alice']}"}),
                "bob": ("patient", {"patient": f"Patient/{ids['bob']}"}),
                "pharm": ("pharmacist", {"organization": f"Organization/{ids['pharmacy']}"}),
                "pharm2": ("pharmacist", {"organization": f"Organization/{ids['pharmacy2']}"}),
                "payer": ("payer", {"organization": f"Organization/{ids['payer']}"}),
                "doc": ("practitioner", {"practitioner": f"Practitioner/{ids['doc']}",
                                         "organization": f"Organization/{ids['clinic']}"}),
                "rita": ("practitioner", {"practitioner": f"Practitioner/{ids['rita']}",
                                          "organization": f"Organization/{ids['clinic']}"}),
                "sam": ("practitioner", {"practitioner": f"Practitioner/{ids['sam']}",
                                         "organization": f"Organization/{ids['clinic2']}"}),
                "officer": ("admin", {"organization": f"Organization/{ids['clinic']}"}),
                "officer2": ("admin", {"organization": f"Organization/{ids['clinic2']}"}),
                "root": ("admin", {}),
            }
            for username, (role, links) in accounts.items():
                node.accounts.create_user(username=username, password=PASSWORD, role=role, **links)
            yield w
    finally:
        node.close()


# ---- organizations as grantees -------------------------------------------------------------------


def test_a_pharmacy_grant_lets_its_pharmacists_read_the_prescriptions_it_covers_and_nobody_elses(world):
    w, a = world, world.ids
    assert w.get("pharm", f"MedicationRequest/{a['rx']}").status_code == 403
    assert w.search("pharm", "MedicationRequest") == (0, [])

    w.grant("alice", consent(a["alice"], f"Organization/{a['pharmacy']}", ["MedicationRequest"]))

    assert w.get("pharm", f"MedicationRequest/{a['rx']}").status_code == 200
    assert w.get("pharm", f"MedicationRequest/{a['rx_bob']}").status_code == 403  # another patient
    assert w.get("pharm", f"Patient/{a['alice']}").status_code == 403  # a type the consent leaves out
    assert w.get("pharm", f"Observation/{a['obs']}").status_code == 403
    assert w.search("pharm", "MedicationRequest") == (1, [f"MedicationRequest/{a['rx']}"])
    # _include follows the consent: the prescriber (directory) comes along, the Patient does not
    total, ids = w.search("pharm", "MedicationRequest?_include=MedicationRequest:patient"
                                   "&_include=MedicationRequest:requester")
    assert total == 1 and ids == sorted([f"MedicationRequest/{a['rx']}", f"Practitioner/{a['doc']}"])
    assert w.get("pharm", f"Patient/{a['alice']}/$everything").status_code == 403
    assert ("TREAT", "consent-permit:Consent/", a["alice"], "allowed") in [
        (p, r[:len("consent-permit:Consent/")], pid, o) for p, r, pid, o in w.access_events("pharm")]

    # a pharmacist of another pharmacy gets nothing
    assert w.get("pharm2", f"MedicationRequest/{a['rx']}").status_code == 403
    assert w.search("pharm2", "MedicationRequest") == (0, [])
    assert w.search("pharm2", f"MedicationRequest?subject=Patient/{a['alice']}&_summary=count")[0] == 0


def test_everything_for_a_pharmacy_holds_only_what_the_consent_permits(world):
    w, a = world, world.ids
    w.grant("alice", consent(a["alice"], f"Organization/{a['pharmacy']}", ["Patient", "MedicationRequest"]))
    r = w.get("pharm", f"Patient/{a['alice']}/$everything")
    assert r.status_code == 200, r.text
    got = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]}
    assert {f"Patient/{a['alice']}", f"MedicationRequest/{a['rx']}"} <= got
    assert f"Observation/{a['obs']}" not in got and f"Encounter/{a['visit']}" not in got
    assert w.get("pharm2", f"Patient/{a['alice']}/$everything").status_code == 403


def test_a_consent_whose_period_has_ended_gives_the_pharmacy_nothing(world):
    w, a = world, world.ids
    w.grant("alice", consent(a["alice"], f"Organization/{a['pharmacy']}", ["MedicationRequest"],
                             period={"start": "2020-01-01", "end": "2020-12-31"}))
    assert w.get("pharm", f"MedicationRequest/{a['rx']}").status_code == 403
    assert w.search("pharm", "MedicationRequest") == (0, [])


def test_a_payer_grant_is_for_payment_and_a_payers_requests_are_for_payment_by_default(world):
    w, a = world, world.ids
    w.grant("alice", consent(a["alice"], f"Organization/{a['payer']}", ["Encounter"], purpose="HPAYMT"))

    assert w.get("payer", f"Encounter/{a['visit']}").status_code == 200  # no header: HPAYMT
    assert w.search("payer", "Encounter") == (1, [f"Encounter/{a['visit']}"])
    # the same payer asking for treatment is not what the patient agreed to
    assert w.get("payer", f"Encounter/{a['visit']}", purpose="TREAT").status_code == 403
    assert w.search("payer", "Encounter", purpose="TREAT") == (0, [])
    # a specialization of payment is covered
    assert w.get("payer", f"Encounter/{a['visit']}", purpose="CLMATTCH").status_code == 200
    purposes = {p for p, r, _, o in w.access_events("payer") if o == "allowed" and r.startswith("consent-permit")}
    assert purposes == {"HPAYMT", "CLMATTCH"}
    # nobody else reaches it: not a pharmacist, not the clinic's doctor under another purpose
    assert w.get("pharm", f"Encounter/{a['visit']}").status_code == 403
    assert w.get("rita", f"Encounter/{a['visit']}", purpose="HPAYMT").status_code == 403


def test_an_unknown_purpose_of_use_is_a_400_outcome_not_a_silent_default(world):
    w, a = world, world.ids
    r = w.get("payer", f"Encounter/{a['visit']}", purpose="SHOPPING")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert "purpose of use" in r.json()["issue"][0]["diagnostics"]


def test_a_grant_to_the_clinic_reaches_its_practitioners_and_no_other_clinics(world):
    w, a = world, world.ids
    assert w.get("rita", f"Observation/{a['obs']}").status_code == 403  # no care relationship
    w.grant("alice", consent(a["alice"], f"Organization/{a['clinic']}", ["Observation"]))

    assert w.get("rita", f"Observation/{a['obs']}").status_code == 200
    assert w.search("rita", "Observation") == (1, [f"Observation/{a['obs']}"])
    assert w.get("rita", f"Encounter/{a['visit']}").status_code == 403  # not covered
    assert w.get("sam", f"Observation/{a['obs']}").status_code == 403
    assert w.search("sam", "Observation") == (0, [])


def test_the_portal_offers_pharmacies_payers_and_clinics_by_name_and_kind_and_grants_for_the_right_purpose(world):
    w, a = world, world.ids
    page = w.browser("alice")
    r = page.get("/portal/consents")
    assert r.status_code == 200, r.text
    assert '<optgroup label="Pharmacies">' in r.text and '<optgroup label="Payers (health insurance)">' in r.text
    assert f'<option value="Organization/{a["pharmacy"]}">Main Street Pharmacy (pharmacy, for your care)</option>' \
        in r.text
    assert f'<option value="Organization/{a["payer"]}">Acme Health Insurance (payer, for payment)</option>' in r.text
    assert f'value="Organization/{a["clinic"]}">Riverside Clinic (clinic or hospital, for your care)' in r.text

    r = page.post("/portal/consents", data={"actor": f"Organization/{a['payer']}", "class": ["Encounter"]},
                  follow_redirects=False)
    assert r.status_code == 303, r.text
    w.settle()
    [row] = w.node.consent_service.grants_of(a["alice"])
    assert row.grantee_ref == f"Organization/{a['payer']}"
    assert w.get("payer", f"Encounter/{a['visit']}").status_code == 200
    assert w.get("payer", f"Encounter/{a['visit']}", purpose="TREAT").status_code == 403
    assert "Acme Health Insurance" in page.get("/portal/consents").text

    # an organization that does not exist is refused with a message, and nothing is recorded
    r = page.post("/portal/consents", data={"actor": "Organization/nowhere"})
    assert r.status_code == 400 and 'role="alert"' in r.text and "not a known organization" in r.text
    assert len(w.node.consent_service.grants_of(a["alice"])) == 1


# ---- break-glass for the privacy officer -----------------------------------------------------------


def claim(w: World, username: str, patient_id: str, reason: str = REASON) -> str:
    r = w.client.post("/api/break-glass", json={"patient": f"Patient/{patient_id}", "reason": reason},
                      headers=w.auth(username))
    assert r.status_code == 201, r.text
    return r.json()["claim_id"]


def test_the_privacy_officer_of_the_claimants_organization_reviews_its_claims_with_their_reasons(world):
    w, a = world, world.ids
    # an expired claim first, then an active one: the list is newest first
    old = w.node.consent_service.break_glass(w.principal("rita"), a["alice"], "earlier emergency, now over",
                                             ttl=timedelta(milliseconds=1))
    time.sleep(0.01)
    active = claim(w, "rita", a["bob"])
    other = claim(w, "sam", a["alice"], "another clinic's emergency here")

    r = w.client.get("/api/break-glass", headers=w.auth("officer"))
    assert r.status_code == 200, r.text
    claims = r.json()["claims"]
    assert [c["claim_id"] for c in claims] == [active, old.claim_id]
    first, second = claims
    assert first == {**first, "practitioner": f"Practitioner/{a['rita']}", "practitioner_name": "Rita",
                     "patient": f"Patient/{a['bob']}", "organization": f"Organization/{a['clinic']}",
                     "status": "active", "reason": REASON}
    assert first["started"].endswith("Z") and first["expires"] > first["started"]
    assert (second["status"], second["reason"]) == ("expired", "earlier emergency, now over")
    # reading the list is an access event for each patient concerned
    reviews = {(pid, r_) for p, r_, pid, o in w.access_events("officer") if o == "allowed"}
    assert reviews == {(a["alice"], "privacy-officer"), (a["bob"], "privacy-officer")}

    # the other clinic's officer sees only theirs
    r = w.client.get("/api/break-glass", headers=w.auth("officer2"))
    assert r.status_code == 200 and [c["claim_id"] for c in r.json()["claims"]] == [other]


@pytest.mark.parametrize("username", ["rita", "alice", "pharm", "root"])
def test_anyone_but_a_privacy_officer_gets_403_from_the_review_list(world, username):
    w, a = world, world.ids
    claim(w, "rita", a["bob"])
    r = w.client.get("/api/break-glass", headers=w.auth(username))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert REASON not in r.text


def test_the_claim_row_keeps_the_organization_and_a_sealed_reason_never_the_reason_in_clear(world):
    from teleledger.core.crypto import open_sealed
    from teleledger.records.keys import key_id_for

    w, a = world, world.ids
    claim_id = claim(w, "rita", a["bob"])
    with w.node.engine.connect() as conn:
        row = conn.execute(select(break_glass_claims).where(break_glass_claims.c.claim_id == claim_id)).one()
        raw = b"".join(bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else str(v).encode() for v in row)
        assert row.organization_id == a["clinic"]
        assert REASON.encode() not in raw and b"unconscious" not in raw
        # sealed under the patient's own data key, bound to the claim
        key = w.node.records.store.keys.for_read(conn, key_id_for({a["bob"]}))
        aad = f"break-glass/{claim_id}/reason".encode()
        assert open_sealed(key, bytes(row.reason_sealed), aad, what="reason").decode() == REASON
        with pytest.raises(Exception):
            open_sealed(key, bytes(row.reason_sealed), b"break-glass/another/reason", what="reason")
        # nor anywhere in the access events or the log
        events = b"".join(str(tuple(r)).encode() for r in conn.execute(select(t.access_events)))
    assert b"unconscious" not in events


def test_the_console_page_lists_the_organizations_claims_with_active_ones_highlighted(world):
    w, a = world, world.ids
    old = w.node.consent_service.break_glass(w.principal("rita"), a["alice"], "earlier emergency, now over",
                                             ttl=timedelta(milliseconds=1))
    time.sleep(0.01)
    active = claim(w, "rita", a["bob"])
    claim(w, "sam", a["alice"], "another clinic's emergency here")

    r = w.browser("officer").get("/console/break-glass")
    assert r.status_code == 200, r.text
    html = r.text
    assert html.index(f'data-claim-id="{active}"') < html.index(f'data-claim-id="{old.claim_id}"')
    assert f'class="claim-row claim-active" data-claim-id="{active}" data-status="active"' in html
    assert f'class="claim-row" data-claim-id="{old.claim_id}" data-status="expired"' in html
    assert REASON in html and "another clinic" not in html
    assert 'href="/console/break-glass" aria-current="page"' in html  # the nav link

    r = w.browser("officer2").get("/console/break-glass")
    assert r.status_code == 200 and REASON not in r.text and "another clinic&#39;s emergency here" in r.text
    for username, message in (("rita", "privacy officer"), ("alice", "privacy officer"),
                              ("root", "not linked to an organization")):
        r = w.browser(username).get("/console/break-glass")
        assert r.status_code == 403 and message in r.text and REASON not in r.text, username
    r = TestClient(w.client.app).get("/console/break-glass", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/console/break-glass"


# ---- the patient's notification --------------------------------------------------------------------


def test_a_new_claim_is_a_banner_on_the_patients_portal_until_the_patient_dismisses_it(world):
    w, a = world, world.ids
    page = w.browser("alice")
    assert 'id="break-glass-banner"' not in page.get("/portal").text

    first = claim(w, "rita", a["alice"])
    html = page.get("/portal").text
    assert 'id="break-glass-banner"' in html and f'data-claim-id="{first}"' in html
    assert "Rita claimed emergency (break-glass) access" in html
    assert 'id="break-glass-banner"' not in w.browser("bob").get("/portal").text  # not another patient's

    [notice] = w.node.consent_service.claims_for_patient(a["alice"])
    r = page.post("/portal/break-glass/seen", data={"latest": str(notice["started"])}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/portal"
    assert 'id="break-glass-banner"' not in page.get("/portal").text
    # the claim is still listed on the consent page
    assert "claimed emergency access" in page.get("/portal/consents").text

    time.sleep(0.01)
    second = claim(w, "doc", a["alice"])
    html = page.get("/portal").text
    assert f'data-claim-id="{second}"' in html and f'data-claim-id="{first}"' not in html
    # the dismissal is kept with the claim: another browser of the patient does not show it either
    other = w.browser("alice")
    html = other.get("/portal").text
    assert f'data-claim-id="{second}"' in html and f'data-claim-id="{first}"' not in html
    assert [n["seen"] for n in w.node.consent_service.claims_for_patient(a["alice"])] == [False, True]
    r = w.browser("doc").post("/portal/break-glass/seen", data={"latest": "1"})
    assert r.status_code == 403


# ---- demo data -----------------------------------------------------------------------------------


def test_the_demo_links_each_account_to_its_organization_at_every_start(node):
    from sqlalchemy import update

    from teleledger import demo
    from teleledger.policy.service import organization_kind

    demo.import_samples(node)
    first = {a.username: a for a in demo.create_accounts(node)}
    linked = {u: node.accounts.get_by_username(u).organization_id for u in first}
    clinic = linked["doctor"]
    assert linked == {"admin": clinic, "doctor": clinic, "pharmacist": demo.DEMO_PHARMACY,
                      "payer": demo.DEMO_PAYER, "patient": None, "researcher": None}
    assert clinic != demo.DEMO_CLINIC  # the sample's own provider of the doctor's visits
    svc = demo.system_principal()
    assert organization_kind(node.records.read(svc, "Organization", clinic).body) == "clinic"
    assert organization_kind(node.records.read(svc, "Organization", demo.DEMO_PHARMACY).body) == "pharmacy"
    assert organization_kind(node.records.read(svc, "Organization", demo.DEMO_PAYER).body) == "payer"

    # a home made before accounts had organizations is brought up to date; nothing is duplicated
    with node.engine.begin() as conn:
        conn.execute(update(t.users).where(t.users.c.username == "admin").values(organization_id=None))
    again = {a.username: a for a in demo.create_accounts(node)}
    assert again == first
    assert node.accounts.get_by_username("admin").organization_id == clinic
    assert node.records.read(svc, "Organization", demo.DEMO_PHARMACY).version == 1
    # the demo patient's portal offers the demo pharmacy and payer for what they are
    patient = Principal(node.accounts.get_by_username("patient").id, "patient", ROLE_SCOPE_SETS["patient"],
                        demo.DEMO_PATIENT, None)
    kinds = {g.ref: g.kind for g in node.consent_service.grantees(patient)}
    assert kinds[f"Organization/{demo.DEMO_PHARMACY}"] == "pharmacy"
    assert kinds[f"Organization/{demo.DEMO_PAYER}"] == "payer"
    assert kinds[f"Organization/{clinic}"] == "clinic"
