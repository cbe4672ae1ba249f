"""Secure-message threads and in-visit chat are their participants' through /fhir too, on SQLite
and PostgreSQL: Dr Colleague cares for Alice but is not in her thread with Dr Doc, so no read,
vread, history, search, count, include or $everything shows her those Communications, while the
rest of Alice's record stays open to her (policy rule "not-a-thread-participant")."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from teleledger.visits.rooms import Visit, chat_communication
from tests.integration.clinic import Clinic, build_clinic
from tests.integration.helpers import create, observation


@pytest.fixture
def clinic(client, node) -> Clinic:  # type: ignore[no-untyped-def]
    c = build_clinic(client, node)
    r = c.post("alice", "/api/messages", {"subject": "Headache is back", "text": "Since yesterday evening.",
                                          "practitioners": [c.ids["doc"]]})
    assert r.status_code == 201, r.text
    c.ids["message"] = r.json()["id"]
    c.ids["observation"] = create(client, c.service, observation(c.ids["alice"]))["id"]
    return c


def ids(bundle: dict, rtype: str = "Communication") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == rtype}


def test_the_participant_practitioner_and_the_patient_read_and_search_the_thread(clinic):
    msg = clinic.ids["message"]
    for who in ("doc", "alice"):
        assert clinic.get(who, f"/fhir/Communication/{msg}").status_code == 200
        assert clinic.get(who, f"/fhir/Communication/{msg}/_history/1").status_code == 200
        bundle = clinic.get(who, "/fhir/Communication", params={"subject": f"Patient/{clinic.ids['alice']}"}).json()
        assert bundle["total"] == 1 and ids(bundle) == {msg}


def test_a_caring_practitioner_outside_the_thread_cannot_read_vread_or_list_its_history(clinic):
    msg = clinic.ids["message"]
    for path in (f"/fhir/Communication/{msg}", f"/fhir/Communication/{msg}/_history/1",
                 f"/fhir/Communication/{msg}/_history"):
        r = clinic.get("colleague", path)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["resourceType"] == "OperationOutcome" and "not-a-thread-participant" in r.text
    assert clinic.denials("not-a-thread-participant") == 3
    history = clinic.get("colleague", "/fhir/Communication/_history").json()
    assert history["total"] == 0 and not history.get("entry")


def test_searches_neither_return_nor_count_the_thread_for_a_non_participant(clinic):
    alice = clinic.ids["alice"]
    for params in ({}, {"subject": f"Patient/{alice}"}, {"_summary": "count"}, {"_count": "1"}):
        bundle = clinic.get("colleague", "/fhir/Communication", params=params).json()
        assert bundle["total"] == 0 and not ids(bundle), params
    rev = clinic.get("colleague", "/fhir/Patient",
                     params={"_id": alice, "_revinclude": "Communication:subject"}).json()
    assert ids(rev, "Patient") == {alice} and not ids(rev)
    everything = clinic.get("colleague", f"/fhir/Patient/{alice}/$everything").json()
    assert not ids(everything) and clinic.ids["observation"] in ids(everything, "Observation")
    # the participant's $everything and _revinclude do carry it
    assert ids(clinic.get("doc", f"/fhir/Patient/{alice}/$everything").json()) == {clinic.ids["message"]}
    assert ids(clinic.get("doc", "/fhir/Patient", params={"_id": alice,
                                                         "_revinclude": "Communication:subject"}).json())


def test_the_non_participant_still_sees_the_rest_of_the_patients_record(clinic):
    obs = clinic.ids["observation"]
    assert clinic.get("colleague", f"/fhir/Observation/{obs}").status_code == 200
    bundle = clinic.get("colleague", "/fhir/Observation", params={"subject": f"Patient/{clinic.ids['alice']}"}).json()
    assert bundle["total"] == 1 and ids(bundle, "Observation") == {obs}


def test_a_non_participant_cannot_write_a_message_into_someone_elses_thread(clinic):
    alice, doc = clinic.ids["alice"], clinic.ids["doc"]
    forged = {"resourceType": "Communication", "status": "completed", "subject": {"reference": f"Patient/{alice}"},
              "sender": {"reference": f"Practitioner/{doc}"}, "recipient": [{"reference": f"Patient/{alice}"}],
              "payload": [{"contentString": "Not really from Dr Doc"}]}
    r = clinic.client.post("/fhir/Communication", json=forged,
                           headers={**clinic.auth("colleague"), "Content-Type": "application/fhir+json"})
    assert r.status_code == 403 and "not-a-thread-participant" in r.text
    assert clinic.count("Communication") == 1


def test_in_visit_chat_follows_the_same_rule(clinic):
    alice, doc = clinic.ids["alice"], clinic.ids["doc"]
    now = datetime(2024, 6, 1, 10, 5, tzinfo=timezone.utc)
    visit = Visit("appt-1", 1, "arrived", alice, frozenset({doc}), now - timedelta(minutes=5),
                  now + timedelta(minutes=25))
    chat = create(clinic.client, clinic.service,
                  chat_communication(visit, clinic.ids["visit"], f"Practitioner/{doc}", "How are you feeling?", now))
    assert {r["reference"] for r in chat["recipient"]} == {f"Patient/{alice}"}
    assert clinic.get("doc", f"/fhir/Communication/{chat['id']}").status_code == 200
    assert clinic.get("alice", f"/fhir/Communication/{chat['id']}").status_code == 200
    assert clinic.get("colleague", f"/fhir/Communication/{chat['id']}").status_code == 403
    by_encounter = clinic.get("colleague", "/fhir/Communication",
                              params={"encounter": f"Encounter/{clinic.ids['visit']}"}).json()
    assert by_encounter["total"] == 0
    assert clinic.get("doc", "/fhir/Communication",
                      params={"encounter": f"Encounter/{clinic.ids['visit']}"}).json()["total"] == 1
