"""Visit scheduling end to end over HTTP on SQLite and PostgreSQL: publish availability, find
practitioners, book, cancel, reschedule, the Appointment state machine, bad input, the FHIR API
unable to book around the guarantee, and real concurrent bookings of one slot.

The scheduling service of each app gets a controlled clock (``Scheduling(now=...)``): slots are
in January 2030 and "now" is whatever a test sets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from teleledger.core.errors import Conflict
from teleledger.demo import system_principal
from teleledger.visits.scheduling import TAKEN, Scheduling
from teleledger.visits.tables import slot_bookings
from teleledger.web.app import create_app

from .helpers import FHIR, create, patient, service_headers, token

PASSWORD = "correct-horse-battery"
UTC = timezone.utc
MONDAY_0700_BERLIN = datetime(2030, 1, 7, 6, 0, tzinfo=UTC)
MORNINGS = {d: {"start": "09:00", "end": "12:00", "breaks": []} for d in ("mon", "tue", "wed", "thu", "fri")}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    client: TestClient
    node: object
    clock: Clock
    svc: dict
    doctor_id: str
    other_doctor_id: str
    alice_id: str
    bob_id: str
    doctor: dict
    other_doctor: dict
    alice: dict
    bob: dict


def use_clock(app, node, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    app.state.scheduling = Scheduling(node.records, node.engine, now=clock)


@pytest.fixture
def world(client, node) -> World:  # type: ignore[no-untyped-def]
    clock = Clock(MONDAY_0700_BERLIN)
    use_clock(client.app, node, clock)
    svc = service_headers(client, node)
    doctor = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"],
                                                                             "prefix": ["Dr."]}],
                                  "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234"}]})
    other = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Jones", "given": ["Ann"]}]})
    alice = create(client, svc, patient("Liddell", "Alice"))
    bob = create(client, svc, patient("Builder", "Bob"))
    accounts = node.accounts
    accounts.create_user(username="drsmith", password=PASSWORD, role="practitioner",
                         practitioner=f"Practitioner/{doctor['id']}")
    accounts.create_user(username="drjones", password=PASSWORD, role="practitioner",
                         practitioner=f"Practitioner/{other['id']}")
    accounts.create_user(username="alice", password=PASSWORD, role="patient", patient=f"Patient/{alice['id']}")
    accounts.create_user(username="bob", password=PASSWORD, role="patient", patient=f"Patient/{bob['id']}")
    return World(client, node, clock, svc, doctor["id"], other["id"], alice["id"], bob["id"],
                 token(client, "drsmith", PASSWORD), token(client, "drjones", PASSWORD),
                 token(client, "alice", PASSWORD), token(client, "bob", PASSWORD))


def publish(w: World, days: dict = MORNINGS, *, minutes: int = 20, weeks: int = 1, who: dict | None = None,
            practitioner: str | None = None, expect: int = 200) -> dict:
    body = {"timezone": "Europe/Berlin", "visit_minutes": minutes, "weeks": weeks, "days": days}
    if practitioner:
        body["practitioner"] = practitioner
    r = w.client.post("/api/visits/availability", json=body, headers=who or w.doctor)
    assert r.status_code == expect, r.text
    return r.json()


def free_slots(w: World, who: dict | None = None, practitioner: str | None = None) -> list[dict]:
    r = w.client.get("/api/visits/slots", params={"practitioner": practitioner or w.doctor_id, "days": 14},
                     headers=who or w.alice)
    assert r.status_code == 200, r.text
    return r.json()["slots"]


def book(w: World, slot_id: str, who: dict | None = None, **extra: str):  # type: ignore[no-untyped-def]
    return w.client.post("/api/visits/appointments", json={"slot": slot_id, **extra}, headers=who or w.alice)


def fhir_search(w: World, rt: str, **params: str) -> list[dict]:
    r = w.client.get(f"/fhir/{rt}", params={**params, "_count": "1000"}, headers=w.svc)
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", []) if e["resource"]["resourceType"] == rt]


def slot(w: World, slot_id: str) -> dict:
    r = w.client.get(f"/fhir/Slot/{slot_id}", headers=w.svc)
    assert r.status_code == 200, r.text
    return r.json()


def bookings(w: World) -> list[tuple]:
    with w.node.engine.connect() as conn:  # type: ignore[attr-defined]
        return [tuple(r) for r in conn.execute(select(slot_bookings.c.slot_id, slot_bookings.c.appointment_id,
                                                      slot_bookings.c.patient_id).order_by(slot_bookings.c.slot_id))]


def outcome_text(r) -> str:  # type: ignore[no-untyped-def]
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(i.get("diagnostics", "") for i in body["issue"])


def state(w: World) -> tuple:
    """Everything a failed request must leave unchanged."""
    appts = sorted((a["id"], a["meta"]["versionId"], a["status"]) for a in fhir_search(w, "Appointment"))
    slots = sorted((s["id"], s["meta"]["versionId"], s["status"]) for s in fhir_search(w, "Slot"))
    return appts, slots, bookings(w)


# ---- publishing ----------------------------------------------------------------------------------


def test_a_practitioner_publishes_availability_and_publishing_again_creates_no_duplicate_slots(world):
    w = world
    first = publish(w)
    assert (first["created"], first["removed"], first["kept"]) == (45, 0, 0)  # 5 mornings × 9 visits
    again = publish(w)
    assert (again["created"], again["removed"], again["kept"]) == (0, 0, 45)
    slots = fhir_search(w, "Slot", schedule=f"Schedule/{first['schedule_id']}")
    assert len(slots) == 45 and {s["status"] for s in slots} == {"free"}
    assert min(s["start"] for s in slots) == "2030-01-07T08:00:00Z"  # 09:00 in Berlin (UTC+1)
    schedule = w.client.get(f"/fhir/Schedule/{first['schedule_id']}", headers=w.svc).json()
    assert schedule["actor"][0]["reference"] == f"Practitioner/{w.doctor_id}"
    stored = w.client.get("/api/visits/availability", headers=w.doctor).json()
    assert stored["published"] and stored["days"]["mon"] == {"start": "09:00", "end": "12:00", "breaks": []}
    assert (stored["timezone"], stored["visit_minutes"]) == ("Europe/Berlin", 20)


def test_new_hours_withdraw_free_slots_but_keep_booked_ones_and_never_overlap_them(world):
    w = world
    publish(w)
    nine = free_slots(w)[0]
    assert book(w, nine["id"]).status_code == 201
    # Monday now from 09:10 with 30-minute visits: the booked 09:00-09:20 stays, 09:10 is not offered
    days = {**MORNINGS, "mon": {"start": "09:10", "end": "11:10", "breaks": []}}
    result = publish(w, days, minutes=30)
    monday = [s for s in fhir_search(w, "Slot") if s["start"].startswith("2030-01-07")]
    starts = sorted((s["start"], s["status"]) for s in monday)
    assert starts == [("2030-01-07T08:00:00Z", "busy"), ("2030-01-07T08:40:00Z", "free"),
                      ("2030-01-07T09:10:00Z", "free"), ("2030-01-07T09:40:00Z", "free")]
    assert result["removed"] > 0 and slot(w, nine["id"])["status"] == "busy"


def test_a_practitioner_publishes_only_their_own_availability(world):
    w = world
    r = w.client.post("/api/visits/availability", json={"timezone": "UTC", "visit_minutes": 20, "days": MORNINGS,
                                                         "practitioner": w.other_doctor_id}, headers=w.doctor)
    assert r.status_code == 403 and "not-own-availability" in outcome_text(r)
    r = w.client.post("/api/visits/availability", json={"timezone": "UTC", "visit_minutes": 20, "days": MORNINGS},
                      headers=w.alice)
    assert r.status_code == 400  # a patient has no practitioner of their own to publish for
    assert fhir_search(w, "Slot") == [] and fhir_search(w, "Schedule") == []


@pytest.mark.parametrize(("body", "message"), [
    ({"timezone": "Mars/Olympus", "visit_minutes": 20, "days": MORNINGS}, "not an IANA time zone"),
    ({"timezone": "UTC", "visit_minutes": 2, "days": MORNINGS}, "visit length"),
    ({"timezone": "UTC", "visit_minutes": 20, "days": {"tue": {"start": "17:00", "end": "09:00"}}},
     "Tuesday: working hours 17:00-09:00 end before they start"),
    ({"timezone": "UTC", "visit_minutes": 20, "days": {"wed": {"start": "09:00", "end": "12:00",
                                                                "breaks": ["11:00-13:00"]}}},
     "Wednesday: break 11:00-13:00 is outside the working hours"),
    ({"timezone": "UTC", "visit_minutes": 20, "weeks": 40, "days": MORNINGS}, "1 to 12 weeks"),
    ({"timezone": "UTC", "days": MORNINGS}, "visit_minutes"),
])
def test_bad_availability_is_a_400_operation_outcome_naming_the_problem(world, body, message):
    r = world.client.post("/api/visits/availability", json=body, headers=world.doctor)
    assert r.status_code == 400, r.text
    assert message in outcome_text(r)
    assert fhir_search(world, "Slot") == []


# ---- finding -------------------------------------------------------------------------------------


def test_patients_find_practitioners_by_name_or_specialty(world):
    w = world
    publish(w)
    # one role names its practitioner by reference, the other (as Synthea does) by NPI identifier
    create(w.client, w.svc, {"resourceType": "PractitionerRole", "practitioner": {"reference": f"Practitioner/{w.other_doctor_id}"},
                             "specialty": [{"coding": [{"system": "http://nucc.org/provider-taxonomy",
                                                        "code": "207RC0000X", "display": "Cardiovascular Disease Physician"}],
                                            "text": "Cardiology"}]})
    create(w.client, w.svc, {"resourceType": "PractitionerRole",
                             "practitioner": {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234"}},
                             "specialty": [{"coding": [{"system": "http://nucc.org/provider-taxonomy", "code": "208D00000X",
                                                        "display": "General Practice Physician"}],
                                            "text": "General Practice Physician"}]})

    def find(**params: str) -> list[dict]:
        r = w.client.get("/api/visits/practitioners", params=params, headers=w.alice)
        assert r.status_code == 200, r.text
        return r.json()["practitioners"]

    everyone = find()
    assert [p["name"] for p in everyone] == ["Dr. Jo Smith", "Ann Jones"]  # bookable first
    assert everyone[0]["bookable"] and everyone[0]["timezone"] == "Europe/Berlin" and not everyone[1]["bookable"]
    assert [p["id"] for p in find(q="smi")] == [w.doctor_id]
    assert [p["id"] for p in find(specialty="cardio")] == [w.other_doctor_id]
    assert [p["id"] for p in find(specialty="208D00000X")] == [w.doctor_id]
    assert find(specialty="general practice")[0]["specialties"] == ["General Practice Physician"]
    assert find(q="smith", specialty="cardiology") == []
    specialties = w.client.get("/api/visits/practitioners", headers=w.alice).json()["specialties"]
    assert specialties == ["Cardiology", "General Practice Physician"]


# ---- booking -------------------------------------------------------------------------------------


def test_a_patient_books_a_free_slot_and_both_sides_see_the_visit(world):
    w = world
    publish(w)
    chosen = free_slots(w)[3]
    r = book(w, chosen["id"])
    assert r.status_code == 201, r.text
    appt = r.json()
    assert r.headers["location"].endswith(f"/fhir/Appointment/{appt['id']}/_history/1")
    assert appt["status"] == "booked" and appt["slot"] == [{"reference": f"Slot/{chosen['id']}"}]
    assert (appt["start"], appt["end"]) == ("2030-01-07T09:00:00Z", "2030-01-07T09:20:00Z")
    actors = {p["actor"]["reference"] for p in appt["participant"]}
    assert actors == {f"Patient/{w.alice_id}", f"Practitioner/{w.doctor_id}"}
    assert slot(w, chosen["id"])["status"] == "busy"
    assert bookings(w) == [(chosen["id"], appt["id"], w.alice_id)]
    assert chosen["id"] not in {s["id"] for s in free_slots(w)}

    mine = w.client.get("/api/visits/appointments", headers=w.alice).json()["visits"]
    assert [(v["id"], v["practitioner_name"], v["room"]) for v in mine] == [
        (appt["id"], "Dr. Jo Smith", f"/visits/{appt['id']}/room")]
    theirs = w.client.get("/api/visits/appointments", headers=w.doctor).json()["visits"]
    assert [(v["id"], v["patient_name"]) for v in theirs] == [(appt["id"], "Alice Liddell")]
    assert w.client.get("/api/visits/appointments", headers=w.bob).json()["visits"] == []
    # the booking made a care relationship: the doctor may now read Alice's record
    assert w.client.get(f"/fhir/Patient/{w.alice_id}", headers=w.doctor).status_code == 200


def test_booking_a_taken_past_or_unknown_slot_is_refused_and_changes_nothing(world):
    w = world
    publish(w)
    slots = free_slots(w)
    assert book(w, slots[0]["id"]).status_code == 201
    before = state(w)

    taken = book(w, slots[0]["id"], who=w.bob)
    assert taken.status_code == 409 and "already booked" in outcome_text(taken)
    w.clock.now = datetime(2030, 1, 7, 10, 0, tzinfo=UTC)  # 11:00 in Berlin: slots[1] (09:20) is over
    past = book(w, slots[1]["id"], who=w.bob)
    assert past.status_code == 400 and "in the past" in outcome_text(past)
    unknown = book(w, "no-such-slot", who=w.bob)
    assert unknown.status_code == 404 and "does not exist or was withdrawn" in outcome_text(unknown)
    malformed = book(w, "../Patient/x", who=w.bob)
    assert malformed.status_code == 404
    empty = w.client.post("/api/visits/appointments", json={}, headers=w.bob)
    assert empty.status_code == 400 and "slot" in outcome_text(empty)
    assert state(w) == before


def test_a_withdrawn_slot_reads_as_unknown(world):
    w = world
    publish(w)
    first = free_slots(w)[0]
    assert w.client.delete(f"/fhir/Slot/{first['id']}", headers=w.svc).status_code == 204
    r = book(w, first["id"])
    assert r.status_code == 404 and "withdrawn" in outcome_text(r)


def test_a_patient_cannot_book_for_another_patient_and_the_attempt_is_audited(world):
    w = world
    publish(w)
    before = state(w)
    r = book(w, free_slots(w)[0]["id"], who=w.alice, patient=w.bob_id)
    assert r.status_code == 403 and "book-for-yourself" in outcome_text(r)
    assert state(w) == before
    events = w.client.get("/fhir/AuditEvent", params={"patient": w.bob_id, "outcome": "4"}, headers=w.bob).json()
    assert any("book-for-yourself" in e["resource"].get("outcomeDesc", "") for e in events.get("entry", []))
    # nor may a practitioner book for a patient
    r = book(w, free_slots(w)[0]["id"], who=w.doctor, patient=w.alice_id)
    assert r.status_code == 403 and "patients-book" in outcome_text(r)


def test_cancelling_frees_the_slot_for_someone_else(world):
    w = world
    publish(w)
    first = free_slots(w)[0]
    appt = book(w, first["id"]).json()
    r = w.client.post(f"/api/visits/appointments/{appt['id']}/cancel", headers=w.alice)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["cancelationReason"]["coding"][0]["code"] == "pat"
    assert slot(w, first["id"])["status"] == "free" and bookings(w) == []
    again = book(w, first["id"], who=w.bob)
    assert again.status_code == 201
    # cancelling twice: the state machine says no, nothing changes
    before = state(w)
    twice = w.client.post(f"/api/visits/appointments/{appt['id']}/cancel", headers=w.alice)
    assert twice.status_code == 409 and "cannot become cancelled" in outcome_text(twice)
    # nor may another patient cancel Bob's visit
    other = w.client.post(f"/api/visits/appointments/{again.json()['id']}/cancel", headers=w.alice)
    assert other.status_code == 403
    assert state(w) == before


def test_a_visit_that_has_begun_can_no_longer_be_cancelled(world):
    w = world
    publish(w)
    appt = book(w, free_slots(w)[0]["id"]).json()
    w.clock.now = datetime(2030, 1, 7, 8, 5, tzinfo=UTC)
    r = w.client.post(f"/api/visits/appointments/{appt['id']}/cancel", headers=w.alice)
    assert r.status_code == 400 and "already begun" in outcome_text(r)


def test_rescheduling_moves_the_visit_atomically(world):
    w = world
    publish(w)
    slots = free_slots(w)
    appt = book(w, slots[0]["id"]).json()
    r = w.client.post(f"/api/visits/appointments/{appt['id']}/reschedule", json={"slot": slots[5]["id"]},
                      headers=w.alice)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["slot"] == [{"reference": f"Slot/{slots[5]['id']}"}] and new["status"] == "booked"
    old = w.client.get(f"/fhir/Appointment/{appt['id']}", headers=w.alice).json()
    assert old["status"] == "cancelled" and old["cancelationReason"]["text"] == "rescheduled"
    assert (slot(w, slots[0]["id"])["status"], slot(w, slots[5]["id"])["status"]) == ("free", "busy")
    assert bookings(w) == [(slots[5]["id"], new["id"], w.alice_id)]

    # a taken new slot leaves the visit exactly as it was
    assert book(w, slots[6]["id"], who=w.bob).status_code == 201
    before = state(w)
    taken = w.client.post(f"/api/visits/appointments/{new['id']}/reschedule", json={"slot": slots[6]["id"]},
                          headers=w.alice)
    assert taken.status_code == 409
    same = w.client.post(f"/api/visits/appointments/{new['id']}/reschedule", json={"slot": slots[5]["id"]},
                         headers=w.alice)
    assert same.status_code == 409 and "already has this slot" in outcome_text(same)
    bobs = w.client.post(f"/api/visits/appointments/{new['id']}/reschedule", json={"slot": slots[7]["id"]},
                         headers=w.bob)
    assert bobs.status_code == 403
    assert state(w) == before


def test_appointment_status_follows_the_documented_state_machine(world):
    w = world
    publish(w)
    appt = book(w, free_slots(w)[0]["id"]).json()

    def status(value: str, who: dict):  # type: ignore[no-untyped-def]
        return w.client.post(f"/api/visits/appointments/{appt['id']}/status", json={"status": value}, headers=who)

    assert status("arrived", w.alice).status_code == 403  # the patient only cancels
    assert status("arrived", w.other_doctor).status_code == 403  # not this visit's practitioner
    early = status("noshow", w.doctor)
    assert early.status_code == 400 and "not begun" in outcome_text(early)
    assert status("bogus", w.doctor).status_code == 400
    assert status("arrived", w.doctor).json()["status"] == "arrived"
    assert status("booked", w.doctor).status_code == 409
    assert status("fulfilled", w.doctor).json()["status"] == "fulfilled"
    final = status("cancelled", w.doctor)
    assert final.status_code == 409 and "none: it is final" in outcome_text(final)
    assert len(bookings(w)) == 1  # a fulfilled visit keeps its slot


def test_a_no_show_releases_the_slot(world):
    w = world
    publish(w)
    first = free_slots(w)[0]
    appt = book(w, first["id"]).json()
    w.clock.now = datetime(2030, 1, 7, 8, 15, tzinfo=UTC)
    r = w.client.post(f"/api/visits/appointments/{appt['id']}/status", json={"status": "noshow"}, headers=w.doctor)
    assert r.status_code == 200 and r.json()["status"] == "noshow"
    assert bookings(w) == [] and slot(w, first["id"])["status"] == "free"


# ---- the FHIR API cannot go around it ----------------------------------------------------------


def test_the_fhir_api_cannot_book_or_free_a_slot_around_the_booking_service(world):
    w = world
    publish(w)
    slots = free_slots(w)
    appt = book(w, slots[0]["id"]).json()
    before = state(w)

    sneaky = {"resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{slots[1]['id']}"}],
              "start": slots[1]["start"], "end": slots[1]["end"],
              "participant": [{"actor": {"reference": f"Patient/{w.bob_id}"}, "status": "accepted"}]}
    r = w.client.post("/fhir/Appointment", json=sneaky, headers={**w.bob, **FHIR})
    assert r.status_code == 422 and "POST /api/visits/appointments" in outcome_text(r)
    double = {**sneaky, "slot": [{"reference": f"Slot/{slots[0]['id']}"}]}
    assert w.client.post("/fhir/Appointment", json=double, headers=w.svc).status_code == 422
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": double, "request": {"method": "POST", "url": "Appointment"}}]}
    assert w.client.post("/fhir", json=bundle, headers=w.svc).status_code == 422

    cancelled = {**appt, "status": "cancelled"}
    r = w.client.put(f"/fhir/Appointment/{appt['id']}", json=cancelled, headers={**w.alice, **FHIR})
    assert r.status_code == 422 and f"/api/visits/appointments/{appt['id']}/cancel" in outcome_text(r)
    moved = {**appt, "slot": [{"reference": f"Slot/{slots[2]['id']}"}]}
    assert w.client.put(f"/fhir/Appointment/{appt['id']}", json=moved, headers=w.svc).status_code == 422
    assert w.client.delete(f"/fhir/Appointment/{appt['id']}", headers=w.svc).status_code == 422

    taken = slot(w, slots[0]["id"])
    r = w.client.put(f"/fhir/Slot/{taken['id']}", json={**taken, "status": "free"}, headers=w.svc)
    assert r.status_code == 409 and "booked" in outcome_text(r)
    assert w.client.delete(f"/fhir/Slot/{taken['id']}", headers=w.svc).status_code == 409
    assert state(w) == before

    # an Appointment without a Slot stays an ordinary FHIR resource; a free Slot may be blocked
    plain = {**sneaky}
    del plain["slot"]
    assert w.client.post("/fhir/Appointment", json=plain, headers={**w.bob, **FHIR}).status_code == 201
    free = slot(w, slots[3]["id"])
    assert w.client.put(f"/fhir/Slot/{free['id']}", json={**free, "status": "busy-unavailable"},
                        headers=w.svc).status_code == 200
    blocked = book(w, free["id"], who=w.bob)
    assert blocked.status_code == 409


def test_a_fhir_status_change_follows_the_state_machine_and_the_policy(world):
    w = world
    publish(w)
    appt = book(w, free_slots(w)[0]["id"]).json()
    arrived = {**appt, "status": "arrived"}
    r = w.client.put(f"/fhir/Appointment/{appt['id']}", json=arrived, headers={**w.alice, **FHIR})
    assert r.status_code == 403 and "patient-only-cancels" in outcome_text(r)
    r = w.client.put(f"/fhir/Appointment/{appt['id']}", json=arrived, headers={**w.doctor, **FHIR})
    assert r.status_code == 200 and r.json()["status"] == "arrived"
    back = {**r.json(), "status": "booked"}
    assert w.client.put(f"/fhir/Appointment/{appt['id']}", json=back, headers={**w.doctor, **FHIR}).status_code == 409


# ---- concurrency ---------------------------------------------------------------------------------


def test_two_patients_booking_one_slot_at_the_same_instant_get_exactly_one_201_and_one_409(world, node):
    """Two apps on one node, each with its own event loop and worker threads, released together
    by a barrier: the two bookings are real concurrent transactions in the database."""
    w = world
    publish(w)
    with TestClient(create_app(node, sequencer=False), raise_server_exceptions=False) as second:
        use_clock(second.app, node, w.clock)
        use_clock(w.client.app, node, w.clock)
        for round_ in range(6):
            target = free_slots(w)[round_]
            barrier = threading.Barrier(2)
            results: dict[str, object] = {}

            def attempt(name: str, client: TestClient, headers: dict) -> None:
                barrier.wait(timeout=10)
                results[name] = client.post("/api/visits/appointments", json={"slot": target["id"]}, headers=headers)

            threads = [threading.Thread(target=attempt, args=("alice", w.client, w.alice)),
                       threading.Thread(target=attempt, args=("bob", second, w.bob))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            codes = sorted(r.status_code for r in results.values())  # type: ignore[attr-defined]
            assert codes == [201, 409], [r.text for r in results.values()]  # type: ignore[attr-defined]
            loser = next(r for r in results.values() if r.status_code == 409)  # type: ignore[attr-defined]
            assert "taken" in outcome_text(loser) or "already booked" in outcome_text(loser)
            holders = fhir_search(w, "Appointment", slot=f"Slot/{target['id']}")
            assert len(holders) == 1 and holders[0]["status"] == "booked"
            assert slot(w, target["id"])["status"] == "busy"
            winner = w.alice_id if results["alice"].status_code == 201 else w.bob_id  # type: ignore[attr-defined]
            assert [b for b in bookings(w) if b[0] == target["id"]] == [(target["id"], holders[0]["id"], winner)]
    with node.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(slot_bookings)).scalar() == 6


def test_when_both_transactions_see_the_slot_free_the_database_lets_only_one_commit(world, node, backend):
    """The race staged on purpose: both bookings read the Slot as free before either inserts its
    booking row. Only the primary key of slot_bookings stands between them."""
    if backend == "sqlite":
        pytest.skip("SQLite serializes writers at BEGIN IMMEDIATE: two bookings cannot both be inside "
                    "their transaction, so this interleaving cannot be staged there")
    w = world
    publish(w)
    target = free_slots(w)[0]["id"]
    sched = Scheduling(node.records, node.engine, now=w.clock)
    barrier = threading.Barrier(2)
    original = node.records.read_in

    def read_then_wait(c, principal, res_type, res_id):  # type: ignore[no-untyped-def]
        stored = original(c, principal, res_type, res_id)
        if res_type == "Slot" and res_id == target:
            barrier.wait(timeout=10)  # both have read "free" now
        return stored

    node.records.read_in = read_then_wait
    outcomes: dict[str, object] = {}

    def attempt(patient_id: str) -> None:
        principal = system_principal()
        try:
            outcomes[patient_id] = sched.book(principal, target, patient_id=patient_id)
        except Conflict as exc:
            outcomes[patient_id] = exc

    try:
        threads = [threading.Thread(target=attempt, args=(p,)) for p in (w.alice_id, w.bob_id)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        del node.records.read_in
    errors = [o for o in outcomes.values() if isinstance(o, Conflict)]
    assert len(outcomes) == 2 and len(errors) == 1 and errors[0].message == TAKEN
    assert len(fhir_search(w, "Appointment", slot=f"Slot/{target}")) == 1
    assert len(bookings(w)) == 1 and slot(w, target)["status"] == "busy"


def test_the_slot_bookings_table_itself_refuses_a_second_booking_of_a_slot(node):
    """The guarantee is the database's, not the service's: a second row for one Slot is refused
    by the table whoever writes it."""
    from sqlalchemy.exc import IntegrityError

    row = {"slot_id": "slot-1", "appointment_id": "appt-1", "patient_id": "pat-1", "booked": 1}
    with node.engine.begin() as conn:
        conn.execute(slot_bookings.insert().values(**row))
    with pytest.raises(IntegrityError), node.engine.begin() as conn:
        conn.execute(slot_bookings.insert().values(**{**row, "appointment_id": "appt-2", "patient_id": "pat-2"}))
    with pytest.raises(IntegrityError), node.engine.begin() as conn:  # one Appointment, one Slot
        conn.execute(slot_bookings.insert().values(**{**row, "slot_id": "slot-2"}))
    with node.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(slot_bookings)).scalar() == 1


# ---- pages ---------------------------------------------------------------------------------------


def sign_in(client: TestClient, username: str) -> None:
    client.cookies.clear()
    r = client.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_the_booking_pages_work_without_javascript_and_show_why_a_booking_failed(world):
    w = world
    c = w.client
    sign_in(c, "drsmith")
    form = {"visit_minutes": "20", "timezone": "Europe/Berlin", "weeks": "1",
            **{f"{d}_{k}": v for d in ("mon", "tue") for k, v in (("on", "1"), ("start", "09:00"), ("end", "10:00"),
                                                                  ("breaks", ""))}}
    r = c.post("/visits/availability", data=form)
    assert r.status_code == 200 and "6 new free times" in r.text
    bad = c.post("/visits/availability", data={**form, "tue_breaks": "09:30-11:00"})
    assert bad.status_code == 400 and "Tuesday: break 09:30-11:00 is outside the working hours" in bad.text
    assert c.get("/visits/availability").text.count('checked') == 2

    sign_in(c, "alice")
    assert c.get("/visits/availability").status_code == 403
    found = c.get("/visits/book", params={"q": "smith"})
    assert found.status_code == 200 and f'href="/visits/book/{w.doctor_id}"' in found.text
    times = c.get(f"/visits/book/{w.doctor_id}")
    assert times.status_code == 200 and "Europe/Berlin" in times.text and ">09:20<" in times.text
    first = free_slots(w)[0]["id"]
    confirm = c.get("/visits/confirm", params={"slot": first})
    assert confirm.status_code == 200 and "Confirm booking" in confirm.text and "Monday 7 January 2030" in confirm.text
    booked = c.post("/visits/book", data={"slot": first}, follow_redirects=False)
    assert (booked.status_code, booked.headers["location"]) == (303, "/visits/mine?notice=booked")
    mine = c.get("/visits/mine?notice=booked")
    assert "Your visit is booked." in mine.text and "Dr. Jo Smith" in mine.text
    assert "/visits/" in mine.text and "/room" in mine.text

    sign_in(c, "bob")
    again = c.post("/visits/book", data={"slot": first})
    assert again.status_code == 409 and "already booked" in again.text and 'role="alert"' in again.text
    missing = c.post("/visits/book", data={"slot": "no-such-slot"})
    assert missing.status_code == 404 and "does not exist or was withdrawn" in missing.text

    sign_in(c, "drsmith")
    upcoming = c.get("/visits/upcoming")
    assert upcoming.status_code == 200 and "Alice Liddell" in upcoming.text


def test_the_portal_reminds_both_sides_of_visits_within_24_hours(world):
    w = world
    publish(w, weeks=1)
    slots = free_slots(w)
    soon = book(w, slots[0]["id"]).json()  # Monday 09:00, two hours from now
    later = book(w, slots[-1]["id"]).json()  # Friday
    c = w.client
    sign_in(c, "alice")
    page = c.get("/portal")
    assert page.status_code == 200
    assert f'data-appointment-id="{soon["id"]}"' in page.text and f'data-appointment-id="{later["id"]}"' not in page.text
    assert "Reminder:" in page.text and "Dr. Jo Smith" in page.text and "in 2 hours" in page.text
    sign_in(c, "drsmith")
    page = c.get("/portal")
    assert f'data-appointment-id="{soon["id"]}"' in page.text and "Alice Liddell" in page.text
    sign_in(c, "bob")
    assert "No visits in the next 24 hours." in c.get("/portal").text


def test_a_patient_reschedules_and_cancels_through_the_pages(world):
    w = world
    publish(w)
    slots = free_slots(w)
    appt = book(w, slots[0]["id"]).json()
    c = w.client
    sign_in(c, "alice")
    pick = c.get(f"/visits/{appt['id']}/reschedule", follow_redirects=False)
    assert (pick.status_code, pick.headers["location"]) == (303, f"/visits/book/{w.doctor_id}?reschedule={appt['id']}")
    times = c.get(pick.headers["location"])
    assert f'name="reschedule" value="{appt["id"]}"' in times.text
    confirm = c.get("/visits/confirm", params={"slot": slots[4]["id"], "reschedule": appt["id"]})
    assert "Move my visit to this time" in confirm.text and f'action="/visits/{appt["id"]}/reschedule"' in confirm.text
    moved = c.post(f"/visits/{appt['id']}/reschedule", data={"slot": slots[4]["id"]}, follow_redirects=False)
    assert (moved.status_code, moved.headers["location"]) == (303, "/visits/mine?notice=rescheduled")
    (visit,) = w.client.get("/api/visits/appointments", headers=w.alice).json()["visits"]
    assert visit["slot_id"] == slots[4]["id"]

    sign_in(c, "bob")
    refused = c.post(f"/visits/{visit['id']}/cancel")
    assert refused.status_code == 403 and 'role="alert"' in refused.text
    sign_in(c, "alice")
    done = c.post(f"/visits/{visit['id']}/cancel", follow_redirects=False)
    assert (done.status_code, done.headers["location"]) == (303, "/visits/mine?notice=cancelled")
    page = c.get("/visits/mine?notice=cancelled")
    assert "The visit was cancelled" in page.text and "You have no upcoming visits." in page.text
    assert bookings(w) == []
