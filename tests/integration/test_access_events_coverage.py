"""Issue 3, point 3: every access to patient data appends an access event — here the paths that
are not plain FHIR interactions: the research export (API and CLI, allowed, empty and refused),
imports (NDJSON and Bundle files), and every server-rendered page that shows patient data.

Each event is checked where it lands: the ``access_events`` row (served as an AuditEvent) and its
access entry in the transparency log, with the patient only as a keyed pseudonym. Real SQLite
and PostgreSQL, the real embedded chain where consents or prescriptions need it.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from teleledger.demo import system_principal
from teleledger.ledger.log import entry as log_entry
from teleledger.ledger.log.merkle import leaf_hash as hash_leaf
from teleledger.ledger.log.storage import log_leaves, log_queue
from teleledger.records.importer import Importer
from teleledger.records.research_export import DENIED_REASON
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.clinic import PASSWORD, Clinic, build_clinic
from tests.integration.helpers import FHIR, create, observation, patient
from tests.integration.test_consent import consent, permit_observations
from tests.integration.test_prescriptions import medication_request
from tests.integration.test_research_export import export, lines, opt_in, research  # noqa: F401 (fixture)

A = t.access_events


# ---- what was recorded -----------------------------------------------------------------------------


def access_rows(node: Any, *, after: int = 0, actor: str | None = None) -> list[Any]:
    q = select(A).where(A.c.id > after).order_by(A.c.id)
    if actor is not None:
        q = q.where(A.c.actor == actor)
    with node.engine.connect() as conn:
        return list(conn.execute(q).all())


def last_id(node: Any) -> int:
    rows = access_rows(node)
    return rows[-1].id if rows else 0


def log_entry_of(node: Any, leaf_hash: bytes) -> log_entry.AccessEntry:
    """The access entry of the log whose leaf hash an access_events row gives (queued or integrated)."""
    with node.engine.connect() as conn:
        leaves = [r.leaf for r in conn.execute(select(log_queue.c.leaf))]
        leaves += [r.leaf for r in conn.execute(select(log_leaves.c.leaf).where(log_leaves.c.leaf_hash == leaf_hash))]
    found = [e for e in (log_entry.decode(leaf) for leaf in leaves if hash_leaf(leaf) == leaf_hash)]
    assert len(found) == 1, f"no log entry with leaf hash {leaf_hash.hex()}"
    assert isinstance(found[0], log_entry.AccessEntry)
    return found[0]


def pseudonym(node: Any, patient_id: str) -> bytes:
    return log_entry.patient_pseudonym(node.auditor.key, patient_id)


def account_id(node: Any, username: str) -> str:
    return node.accounts.get_by_username(username).id


# ---- the research export ----------------------------------------------------------------------------


def test_every_exported_resource_is_an_export_event_of_its_patient_in_the_log_and_as_an_audit_event(research):
    c, a = research, research.ids
    opt_in(c, a["S"], ["Observation", "Condition"])
    rex = account_id(c.node, "rex")
    out = lines(export(c, "rex", a["S"]))
    assert len(out) == 3

    rows = access_rows(c.node, actor=rex)
    assert rows, "the export recorded nothing"
    assert {(r.action, r.purpose, r.outcome, r.patient_id, r.reason) for r in rows} == \
        {("export", "HRESCH", "allowed", a["alice"], f"study:{a['S']}")}
    exported = {f"Observation/{a['obs1']}/_history/1", f"Observation/{a['obs2']}/_history/1",
                f"Condition/{a['cond']}/_history/1"}
    recorded = [ref for r in rows for ref in r.refs.split()]
    assert sorted(recorded) == sorted(exported)  # each exported version once; Bob's observation never

    for r in rows:
        entry = log_entry_of(c.node, r.leaf_hash)
        assert (entry.action, entry.purpose, entry.outcome, entry.actor) == ("export", "HRESCH", "allowed", rex)
        assert entry.patient_pseudonym == pseudonym(c.node, a["alice"])
        assert sorted(entry.references) == sorted(r.refs.split())
        assert a["alice"].encode() not in entry.encode() and b"Liddell" not in entry.encode()

    # and Alice reads them as AuditEvents
    bundle = c.client.get("/fhir/AuditEvent?subtype=export&_count=100", headers=c.auth("alice")).json()
    events = [e["resource"] for e in bundle.get("entry", [])]
    assert events and all(e["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH" and e["outcome"] == "0"
                          for e in events)
    assert {x["what"]["reference"] for e in events for x in e["entity"]} == exported | {f"Patient/{a['alice']}"}


def test_a_refused_export_is_recorded_as_a_denied_export_and_a_malformed_one_is_not(research):
    c, a = research, research.ids
    opt_in(c, a["S"], ["Observation"])
    before = last_id(c.node)
    assert export(c, "rhea", a["S"]).status_code == 403  # a researcher not on the study
    assert export(c, "alice", a["S"]).status_code == 403  # not a researcher at all
    assert export(c, "rex", "no-such-study").status_code == 403
    rows = access_rows(c.node, after=before)
    assert [(r.actor, r.action, r.purpose, r.outcome, r.reason, r.patient_id, r.refs) for r in rows] == [
        (account_id(c.node, who), "export", "HRESCH", "denied", DENIED_REASON, None, "")
        for who in ("rhea", "alice", "rex")]
    for r in rows:
        assert log_entry_of(c.node, r.leaf_hash).outcome == "denied"

    before = last_id(c.node)
    assert export(c, "rex", "bad%20id").status_code == 400  # bad input, no access attempt
    assert access_rows(c.node, after=before) == []


def test_an_export_that_finds_nothing_is_still_recorded_once(research):
    c, a = research, research.ids
    rex = account_id(c.node, "rex")
    assert lines(export(c, "rex", a["S"])) == []  # nobody has opted in
    rows = access_rows(c.node, actor=rex)
    assert [(r.action, r.outcome, r.patient_id, r.refs) for r in rows] == [("export", "allowed", None, "")]


def test_the_cli_export_records_the_same_events_as_the_api_and_its_refusal_too(research, tmp_path):
    from typer.testing import CliRunner

    from teleledger.cli import app

    c, a = research, research.ids
    opt_in(c, a["S"], ["Observation"])
    s = c.node.settings
    env = {"TELELEDGER_HOME": str(s.home), "TELELEDGER_DATABASE_URL": s.database_url,
           "TELELEDGER_MASTER_KEY": s.master_key, "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_PASSWORD_HASHING": "fast", "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_URL": "",
           "TELELEDGER_CHAIN_ENABLED": "true"}
    before = last_id(c.node)
    result = CliRunner().invoke(app, ["research", "export", a["S"], "--as", "rex", "--out", str(tmp_path / "o")],
                                env=env)
    assert result.exit_code == 0, result.output
    rows = access_rows(c.node, after=before)
    assert {(r.action, r.purpose, r.outcome, r.patient_id) for r in rows} == \
        {("export", "HRESCH", "allowed", a["alice"])}
    assert sorted(ref for r in rows for ref in r.refs.split()) == \
        sorted([f"Observation/{a['obs1']}/_history/1", f"Observation/{a['obs2']}/_history/1"])

    before = last_id(c.node)
    result = CliRunner().invoke(app, ["research", "export", a["S"], "--as", "rhea", "--out", str(tmp_path / "p")],
                                env=env)
    assert result.exit_code == 1
    assert [(r.action, r.outcome, r.reason) for r in access_rows(c.node, after=before)] == \
        [("export", "denied", DENIED_REASON)]


# ---- imports ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ndjson", "collection Bundle"])
def test_an_import_records_one_import_event_per_patient_naming_every_version_written(node, tmp_path, kind):
    folder = tmp_path / "import"
    folder.mkdir()
    people = [{**patient("Liddell", "Alice"), "id": "imp-alice"}, {**patient("Builder", "Bob"), "id": "imp-bob"}]
    clinical = [{**observation("imp-alice"), "id": "imp-obs-a"}, {**observation("imp-bob"), "id": "imp-obs-b"},
                {"resourceType": "Organization", "id": "imp-org", "name": "Clinic"}]
    if kind == "ndjson":
        (folder / "Patient.ndjson").write_text("".join(json.dumps(r) + "\n" for r in people))
        (folder / "Observation.ndjson").write_text("".join(json.dumps(r) + "\n" for r in clinical[:2]))
        (folder / "Organization.ndjson").write_text(json.dumps(clinical[2]) + "\n")
    else:
        (folder / "bundle.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": r} for r in people + clinical]}))
    before = last_id(node)
    Importer(node.records, system_principal()).run(folder)
    rows = [r for r in access_rows(node, after=before) if r.action == "import"]
    refs: dict[str, list[str]] = {}
    for r in rows:  # one event per patient per file
        refs[r.patient_id] = sorted(refs.get(r.patient_id, []) + r.refs.split())
    assert refs == {"imp-alice": ["Observation/imp-obs-a/_history/1", "Patient/imp-alice/_history/1"],
                    "imp-bob": ["Observation/imp-obs-b/_history/1", "Patient/imp-bob/_history/1"]}
    for r in rows:
        entry = log_entry_of(node, r.leaf_hash)
        assert entry.action == "import" and entry.patient_pseudonym == pseudonym(node, r.patient_id)

    # importing the same data again writes no version, and so discloses and records nothing
    before = last_id(node)
    Importer(node.records, system_principal()).run(folder)
    assert [r for r in access_rows(node, after=before) if r.action == "import"] == []


# ---- pages --------------------------------------------------------------------------------------------

#: every GET page of the web UI, by what it shows. A new page fails
#: ``test_every_page_of_the_ui_is_classified`` until it is put here; one that shows patient data
#: goes in PATIENT_PAGES, which ``test_every_page_that_shows_patient_data_records_an_access_event``
#: opens as the person it is for.
PATIENT_PAGES: dict[str, str] = {
    "/portal": "alice",  # visit reminders
    "/portal/notes": "alice",
    "/portal/notes/{composition_id}": "alice",
    "/portal/messages": "alice",
    "/console/messages": "doc",
    "/portal/messages/{thread_id}": "alice",
    "/console/messages/{thread_id}": "doc",
    "/portal/messages/attachments/{communication_id}": "alice",
    "/portal/prescriptions": "alice",
    "/portal/consents": "alice",
    "/console/encounters/{encounter_id}/note": "doc",
    "/visits/mine": "alice",
    "/visits/upcoming": "doc",
    "/visits/{appointment_id}/room": "doc",
    "/visits/{appointment_id}/reschedule": "alice",  # reads the visit, then redirects to the slots
}
NO_PATIENT_DATA: dict[str, str] = {
    "/": "landing page",
    "/login": "sign-in form",
    "/visits": "redirect to /visits/mine or /visits/upcoming",
    "/visits/book": "the practitioner directory",
    "/visits/book/{practitioner_id}": "a practitioner's free slots",
    "/visits/confirm": "a free slot",
    "/visits/availability": "the practitioner's own working hours",
    "/console/prescriptions/new": "an empty prescribing form (the encounter id only)",
    "/pharmacy": "an empty token form (verification is a POST of the token the patient brings)",
    "/admin/chain": "blocks, transactions and anchors: hashes and pseudonyms only",
    # the record *of* accesses: reading it is not recorded, or every look would change what it shows
    "/portal/access-log": "the patient's own access events",
}
#: pages showing patient data whose access events other tests check
CHECKED_ELSEWHERE: dict[str, str] = {
    "/console/break-glass": "break-glass claims: recorded by ConsentService.break_glass_review",
}


def ui_get_paths(app: Any) -> set[str]:
    return {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or set())
            and "ui" in (getattr(r, "tags", None) or [])}


@pytest.fixture
def world(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    """The notes-and-messaging clinic on a node with its chain (prescriptions and consents need
    it): a signed note, a thread with a file, a visit now, a prescription, a consent."""
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            c = build_clinic(client, node)
            ids = c.ids
            r = c.post("doc", f"/api/encounters/{ids['visit']}/note/sign",
                       {"subjective": "Headache since Monday.", "assessment": "Tension-type headache."})
            assert r.status_code == 201, r.text
            ids["composition_id"] = r.json()["composition"]["id"]
            pdf = base64.b64encode(b"%PDF-1.7\n%%EOF\n").decode()
            r = c.post("alice", "/api/messages", {"subject": "Results", "text": "See the file.",
                                                  "practitioners": [ids["doc"]],
                                                  "attachment": {"contentType": "application/pdf", "data": pdf,
                                                                 "title": "results.pdf"}})
            assert r.status_code == 201, r.text
            ids["thread_id"], ids["communication_id"] = r.json()["thread"], r.json()["id"]
            now = datetime.now(timezone.utc).replace(microsecond=0)
            ids["appointment_id"] = create(client, c.service, {
                "resourceType": "Appointment", "status": "booked",
                "start": (now - timedelta(minutes=5)).isoformat(), "end": (now + timedelta(minutes=25)).isoformat(),
                "participant": [{"actor": {"reference": f"Patient/{ids['alice']}"}, "status": "accepted"},
                                {"actor": {"reference": f"Practitioner/{ids['doc']}"}, "status": "accepted"}]})["id"]
            ids["encounter_id"] = ids["visit"]
            r = client.post("/fhir/MedicationRequest", json=medication_request(ids["alice"]),
                            headers={**c.auth("doc"), **FHIR})
            assert r.status_code == 201, r.text
            to_doc = consent(ids["alice"], permit_observations(f"Practitioner/{ids['doc']}"))
            r = client.post("/fhir/Consent", json=to_doc, headers={**c.auth("alice"), **FHIR})
            assert r.status_code == 201, r.text
            yield c
    finally:
        node.close()


def sign_in(c: Clinic, username: str) -> None:
    c.client.cookies.clear()
    r = c.client.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_every_page_of_the_ui_is_classified(world):
    unknown = ui_get_paths(world.client.app) - set(PATIENT_PAGES) - set(NO_PATIENT_DATA) - set(CHECKED_ELSEWHERE)
    assert not unknown, (f"pages not yet classified in {__name__}: {sorted(unknown)} — does each show patient "
                         "data? Then it must record an access event (add it to PATIENT_PAGES)")


def test_every_page_that_shows_patient_data_records_an_access_event_for_that_patient(world):
    c, ids = world, world.ids
    present = ui_get_paths(c.client.app)
    for template, username in PATIENT_PAGES.items():
        if template not in present:
            continue  # classified, but not (or no longer) served
        path = template.format(**ids)
        sign_in(c, username)
        before = last_id(c.node)
        r = c.client.get(path, follow_redirects=False)
        assert r.status_code in (200, 303), f"{path}: {r.status_code} {r.text[:300]}"
        rows = access_rows(c.node, after=before, actor=account_id(c.node, username))
        shown = [r for r in rows if r.outcome == "allowed" and r.patient_id == ids["alice"] and r.refs]
        recorded = [(r.action, r.patient_id) for r in rows]
        assert shown, f"{path} showed Alice's data as {username} but recorded {recorded}"
        for row in shown:
            assert log_entry_of(c.node, row.leaf_hash).patient_pseudonym == pseudonym(c.node, ids["alice"])


def test_a_page_refused_to_someone_else_records_the_denied_attempt(world):
    c, ids = world, world.ids
    bob = account_id(c.node, "bob")
    for path in (f"/portal/notes/{ids['composition_id']}", f"/visits/{ids['appointment_id']}/room"):
        sign_in(c, "bob")
        before = last_id(c.node)
        assert c.client.get(path).status_code == 403
        rows = access_rows(c.node, after=before, actor=bob)
        assert [(r.outcome, r.patient_id) for r in rows] == [("denied", ids["alice"])], path
