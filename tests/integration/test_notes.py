"""Signed clinical notes through HTTP, on SQLite and PostgreSQL: drafts stay out of the record,
signing writes the Composition and its Provenance together, only the encounter's practitioner
signs, amendments keep earlier versions readable, and every signature verifies."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from teleledger.ledger.log.storage import log_leaves, log_queue
from teleledger.visits.notes import note_id
from tests.integration.clinic import FHIR, Clinic, build_clinic, encounter
from tests.integration.helpers import create

NOTE = {"subjective": "Headache for three days, worse at night.", "objective": "Alert, afebrile on video.",
        "assessment": "Tension-type headache.", "plan": "Rest, fluids, paracetamol as needed."}


@pytest.fixture
def clinic(client, node) -> Clinic:  # type: ignore[no-untyped-def]
    return build_clinic(client, node)


def note_path(c: Clinic, key: str = "visit") -> str:
    return f"/api/encounters/{c.ids[key]}/note"


def search(c: Clinic, username: str, query: str) -> dict:
    r = c.get(username, f"/fhir/{query}")
    assert r.status_code == 200, r.text
    return r.json()


def sign(c: Clinic, body: dict | None = None, *, who: str = "doc", key: str = "visit"):  # type: ignore[no-untyped-def]
    return c.post(who, note_path(c, key) + "/sign", body)


def in_log(c: Clinic, leaf: bytes) -> bool:
    with c.node.engine.connect() as conn:
        return bool(conn.execute(select(log_leaves.c.idx).where(log_leaves.c.leaf == leaf)).first()
                    or conn.execute(select(log_queue.c.id).where(log_queue.c.leaf == leaf)).first())


def test_a_draft_is_invisible_to_the_patient_and_sealed_at_rest(clinic):
    r = clinic.post("doc", note_path(clinic), NOTE)
    assert r.status_code == 200, r.text
    draft = r.json()["draft"]
    assert draft["sections"] == NOTE and draft["amends"] is None
    assert clinic.get("doc", note_path(clinic)).json()["draft"]["sections"]["plan"] == NOTE["plan"]

    # not in the record: no search, no $everything, no direct read, for the patient or anyone
    assert search(clinic, "alice", "Composition").get("total") == 0
    everything = search(clinic, "alice", f"Patient/{clinic.ids['alice']}/$everything")
    assert {e["resource"]["resourceType"] for e in everything["entry"]} & {"Composition", "Provenance"} == set()
    assert clinic.count("Composition") == 0 and clinic.count("Provenance") == 0
    # only its author sees it: the patient, a colleague with a care relationship and the
    # other patient are refused
    for other in ("alice", "colleague", "bob"):
        assert clinic.get(other, note_path(clinic)).status_code == 403, other
    # encrypted at rest with the patient's key: the database holds no note text
    (row,) = clinic.drafts()
    assert row.patient_id == clinic.ids["alice"] and b"Headache" not in bytes(row.body)


def test_signing_makes_the_note_readable_by_the_patient_with_a_verified_signature(clinic):
    clinic.post("doc", note_path(clinic), NOTE)
    r = sign(clinic)
    assert r.status_code == 201, r.text
    comp, prov = r.json()["composition"], r.json()["provenance"]
    assert comp["id"] == note_id(clinic.ids["visit"], clinic.ids["doc"])
    assert comp["status"] == "final" and comp["meta"]["versionId"] == "1"
    assert comp["type"]["coding"][0]["code"] == "11506-3"
    assert [s["title"] for s in comp["section"]] == ["Subjective", "Objective", "Assessment", "Plan"]
    assert comp["encounter"] == {"reference": f"Encounter/{clinic.ids['visit']}"}
    assert prov["target"] == [{"reference": f"Composition/{comp['id']}/_history/1"}]
    assert prov["signature"][0]["who"]["identifier"]["value"] == clinic.address_of("doc")
    assert clinic.drafts() == []  # the draft went in the same commit

    found = search(clinic, "alice", f"Composition?patient={clinic.ids['alice']}")
    assert found["total"] == 1 and found["entry"][0]["resource"]["section"][3]["text"]["div"].count("paracetamol")
    assert search(clinic, "alice", f"Provenance?target=Composition/{comp['id']}")["total"] == 1
    v = clinic.get("alice", f"/api/compositions/{comp['id']}/verify")
    assert v.status_code == 200, v.text
    got = v.json()
    assert (got["verified"], got["address"], got["practitioner"], got["composition"], got["sigFormat"]) == (
        True, clinic.address_of("doc"), f"Practitioner/{clinic.ids['doc']}",
        f"Composition/{comp['id']}/_history/1", "application/eth-personal-sign")
    # the Composition version's change entry (a keyed hash of its content) is in the transparency log
    with clinic.node.engine.connect() as conn:
        stored = clinic.node.records.store.vread(conn, "Composition", comp["id"], 1)
    assert in_log(clinic, clinic.node.auditor.change_entry(stored))


def test_another_practitioner_or_the_patient_cannot_sign_and_nothing_is_stored(clinic):
    clinic.post("doc", note_path(clinic), NOTE)
    for who, reason in (("colleague", "not-encounter-practitioner"), ("alice", "not-encounter-practitioner"),
                        ("stranger", "no-relationship")):
        r = sign(clinic, NOTE, who=who)
        assert r.status_code == 403, (who, r.text)
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "forbidden"
        assert reason in outcome["issue"][0]["diagnostics"]
    assert clinic.denials("not-encounter-practitioner") == 2  # refusals are audited
    assert clinic.count("Composition") == 0 and clinic.count("Provenance") == 0
    # the author's draft is untouched
    assert clinic.get("doc", note_path(clinic)).json()["draft"]["sections"] == NOTE
    # nor may they write a draft of someone else's encounter
    assert clinic.post("colleague", note_path(clinic), NOTE).status_code == 403
    assert len(clinic.drafts()) == 1


def test_an_amendment_is_a_new_version_and_the_first_stays_readable(clinic):
    first = sign(clinic, NOTE).json()["composition"]
    cid = first["id"]
    # editing the signed note makes a draft that amends version 1
    changed = {**NOTE, "plan": "Rest, fluids, ibuprofen 400 mg as needed; review in one week."}
    draft = clinic.post("doc", note_path(clinic), changed).json()["draft"]
    assert draft["amends"] == f"Composition/{cid}/_history/1"
    assert search(clinic, "alice", f"Composition/{cid}")["meta"]["versionId"] == "1"  # the draft is not shared

    r = sign(clinic)
    assert r.status_code == 201, r.text
    second = r.json()["composition"]
    assert (second["id"], second["meta"]["versionId"], second["status"]) == (cid, "2", "amended")
    assert r.json()["provenance"]["activity"]["coding"][0]["code"] == "UPDATE"

    old = clinic.get("alice", f"/fhir/Composition/{cid}/_history/1")
    assert old.status_code == 200 and "paracetamol" in old.json()["section"][3]["text"]["div"]
    assert search(clinic, "alice", f"Composition/{cid}/_history")["total"] == 2
    assert search(clinic, "alice", f"Provenance?target=Composition/{cid}")["total"] == 2
    for version in ("1", "2"):
        v = clinic.get("alice", f"/api/compositions/{cid}/verify?version={version}").json()
        assert v["verified"] and v["composition"] == f"Composition/{cid}/_history/{version}"
    # a stranger to the patient reads neither version
    assert clinic.get("bob", f"/fhir/Composition/{cid}/_history/1").status_code == 403


def test_signing_an_unchanged_note_again_is_refused(clinic):
    sign(clinic, NOTE)
    r = sign(clinic, NOTE)
    assert r.status_code == 400 and "unchanged since version 1" in r.json()["issue"][0]["diagnostics"]
    assert clinic.count("Provenance") == 1


def test_an_amendment_started_before_another_version_was_written_is_a_conflict(clinic):
    comp = sign(clinic, NOTE).json()["composition"]
    clinic.post("doc", note_path(clinic), {**NOTE, "plan": "Amended plan."})
    # a new version lands meanwhile (here: through the FHIR API, unsigned)
    sneaky = {**comp, "title": "Progress note (edited)"}
    assert clinic.client.put(f"/fhir/Composition/{comp['id']}", json=sneaky,
                             headers={**clinic.auth("doc"), **FHIR}).status_code == 200
    r = sign(clinic)
    assert r.status_code == 409, r.text
    assert "version 2" in r.json()["issue"][0]["diagnostics"] and "from version 1" in r.json()["issue"][0]["diagnostics"]
    assert len(clinic.drafts()) == 1 and clinic.count("Provenance") == 1
    # and the unsigned version 2 does not verify
    v = clinic.get("alice", f"/api/compositions/{comp['id']}/verify").json()
    assert v["verified"] is False and "no signature" in v["reason"]


def test_a_signature_by_a_key_that_is_not_the_practitioners_does_not_verify(clinic):
    comp = sign(clinic, NOTE).json()["composition"]
    # the account's key is replaced (e.g. imported from elsewhere): the old signature no longer
    # recovers to a key of the practitioner's account
    other = clinic.node.keystore.export_json("user:stranger", "pw", scrypt_n=2)
    clinic.node.keystore.import_json("user:doc", other, "pw", replace=True)
    v = clinic.get("alice", f"/api/compositions/{comp['id']}/verify").json()
    assert v["verified"] is False and "not a key of Practitioner/" in v["reason"]


def test_conditions_and_vitals_are_recorded_as_the_practitioner_on_the_encounter(clinic):
    base = f"/api/encounters/{clinic.ids['visit']}"
    r = clinic.post("doc", f"{base}/conditions", {"text": "Tension-type headache", "snomed": "398057008"})
    assert r.status_code == 201, r.text
    cond = r.json()
    assert cond["clinicalStatus"]["coding"][0]["code"] == "active"
    assert cond["recorder"] == {"reference": f"Practitioner/{clinic.ids['doc']}"}
    r = clinic.post("doc", f"{base}/vitals", {"systolic": 128, "diastolic": 82, "heart_rate": "71",
                                              "temperature": "37.2"})
    assert r.status_code == 201, r.text
    assert len(r.json()["observations"]) == 3
    obs = search(clinic, "alice", f"Observation?encounter=Encounter/{clinic.ids['visit']}&category=vital-signs")
    assert obs["total"] == 3
    assert search(clinic, "alice", f"Condition?encounter=Encounter/{clinic.ids['visit']}")["total"] == 1
    # refused input stores nothing
    before = clinic.count("Observation")
    bad = clinic.post("doc", f"{base}/vitals", {"systolic": 128, "heart_rate": 71})
    assert bad.status_code == 400 and "needs both" in bad.json()["issue"][0]["diagnostics"]
    assert clinic.post("colleague", f"{base}/vitals", {"heart_rate": 71}).status_code == 403
    assert clinic.count("Observation") == before


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"plan": "   "}, 400, "the note is empty"),
    ({"plan": "x" * 20_001}, 413, "at most 20,000"),
    ({"plan": "ok", "diagnosis": "x"}, 400, "unknown field(s) diagnosis"),
    ({"plan": "ok", "type": "99999-9"}, 400, "note type must be one of"),
    ({"plan": 42}, 400, "must be text"),
])
def test_bad_note_input_is_a_clear_operation_outcome_and_stores_nothing(clinic, body, status, text):
    r = sign(clinic, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert text in r.json()["issue"][0]["diagnostics"]
    assert clinic.count("Composition") == 0 and clinic.drafts() == []


def test_signing_without_a_draft_or_on_a_cancelled_or_unknown_encounter_is_refused(clinic):
    assert sign(clinic).status_code == 404
    cancelled = create(clinic.client, clinic.service, encounter(clinic.ids["alice"], clinic.ids["doc"],
                                                                status="cancelled"))["id"]
    r = clinic.post("doc", f"/api/encounters/{cancelled}/note/sign", NOTE)
    assert r.status_code == 422 and "'cancelled'" in r.json()["issue"][0]["diagnostics"]
    assert clinic.post("doc", "/api/encounters/no-such-encounter/note/sign", NOTE).status_code == 404
    assert clinic.client.post(note_path(clinic) + "/sign", json=NOTE).status_code == 401
    assert clinic.count("Composition") == 0


def test_the_verify_endpoint_follows_the_read_policy(clinic):
    comp = sign(clinic, NOTE).json()["composition"]
    assert clinic.get("bob", f"/api/compositions/{comp['id']}/verify").status_code == 403
    assert clinic.get("stranger", f"/api/compositions/{comp['id']}/verify").status_code == 403
    assert clinic.get("alice", f"/api/compositions/{comp['id']}/verify?version=7").status_code == 404
    assert clinic.get("alice", f"/api/compositions/{comp['id']}/verify?version=x").status_code == 400


# ---- the pages ------------------------------------------------------------------------------------


def sign_in(c: Clinic, username: str) -> None:
    c.client.cookies.clear()
    r = c.client.post("/login", data={"username": username, "password": "correct horse 1"}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_the_note_page_saves_signs_and_shows_a_refusal_with_the_text_kept(clinic):
    path = f"/console/encounters/{clinic.ids['visit']}/note"
    sign_in(clinic, "colleague")
    r = clinic.client.post(path, data={**NOTE, "action": "sign"}, follow_redirects=False)
    assert r.status_code == 403
    assert "You cannot open this page" in r.text or "Only the practitioner of this encounter" in r.text
    assert clinic.count("Composition") == 0

    sign_in(clinic, "doc")
    page = clinic.client.get(path)
    assert page.status_code == 200 and "Liddell" in page.text and 'name="subjective"' in page.text
    r = clinic.client.post(path, data={**NOTE, "action": "save"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"{path}?done=saved"
    # an over-long section: the page again, 413, the practitioner's text still in the form
    long_plan = "Plan: " + "x" * 20_001
    r = clinic.client.post(path, data={**NOTE, "plan": long_plan, "action": "sign"})
    assert r.status_code == 413 and 'role="alert"' in r.text and "at most 20,000" in r.text
    assert NOTE["subjective"] in r.text and clinic.count("Composition") == 0
    r = clinic.client.post(path, data={**NOTE, "action": "sign"}, follow_redirects=True)
    assert r.status_code == 200 and "Note signed" in r.text and "Version 1" in r.text
    assert clinic.count("Composition") == 1


def test_my_notes_shows_the_signed_note_with_its_verified_signature(clinic):
    sign(clinic, NOTE)
    sign_in(clinic, "alice")
    r = clinic.client.get("/portal/notes")
    assert r.status_code == 200
    assert "Signature verified — signed by Dr Dana Doc" in r.text and clinic.address_of("doc") in r.text
    assert "Tension-type headache." in r.text
    # nobody else's notes, and nothing for another patient
    sign_in(clinic, "bob")
    assert "There are no signed notes" in clinic.client.get("/portal/notes").text


def test_a_draft_with_markup_is_shown_as_text_never_as_html(clinic):
    sign(clinic, {"plan": "<script>alert('x')</script> & <b>bold</b>"})
    sign_in(clinic, "alice")
    text = clinic.client.get("/portal/notes").text
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text


def test_the_provenance_of_a_note_is_in_the_patients_compartment_only(clinic):
    comp = sign(clinic, NOTE).json()["composition"]
    assert search(clinic, "alice", "Provenance")["total"] == 1
    assert search(clinic, "bob", "Provenance")["total"] == 0
    prov = search(clinic, "alice", "Provenance")["entry"][0]["resource"]
    assert clinic.get("bob", f"/fhir/Provenance/{prov['id']}").status_code == 403
    assert base64.b64decode(prov["signature"][0]["data"])[64] in (27, 28)
    assert comp["id"] in prov["target"][0]["reference"]
