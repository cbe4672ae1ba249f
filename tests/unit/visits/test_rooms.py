"""The pure core of the visit room (teleledger.visits.rooms): no database, no web server."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta, timezone

import pytest

from teleledger.core.errors import InvalidInput, PayloadTooLarge, Unprocessable
from teleledger.fhir.validation import ID_PATTERN, validate
from teleledger.visits.rooms import (
    JoinWindow,
    chat_communication,
    clean_text,
    clean_title,
    encounter_id_for,
    file_communication,
    finished_encounter,
    ice_servers_for,
    message_view,
    new_encounter,
    turn_credentials,
    visit_from_appointment,
)

START = datetime(2026, 3, 29, 9, 0, tzinfo=timezone.utc)


def appointment(status: str = "booked", **extra: object) -> dict:
    return {"resourceType": "Appointment", "id": "appt-1", "status": status,
            "start": "2026-03-29T09:00:00Z", "end": "2026-03-29T11:30:00+02:00",  # 09:30 UTC
            "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"},
                            {"actor": {"reference": "Practitioner/d1"}, "status": "accepted"},
                            {"actor": {"reference": "Location/room-3"}, "status": "accepted"}],
            **extra}


def test_an_appointment_becomes_a_visit_of_one_patient_and_its_practitioners():
    visit = visit_from_appointment(appointment(), version=3)
    assert (visit.appointment_id, visit.version, visit.patient_id) == ("appt-1", 3, "p1")
    assert visit.practitioner_ids == frozenset({"d1"})
    assert visit.start == START and visit.end == START + timedelta(minutes=30)
    assert visit.members == frozenset({"Patient/p1", "Practitioner/d1"})


@pytest.mark.parametrize("change, words", [
    ({"participant": [{"actor": {"reference": "Practitioner/d1"}}]}, "exactly one patient"),
    ({"participant": [{"actor": {"reference": "Patient/p1"}}, {"actor": {"reference": "Patient/p2"}},
                      {"actor": {"reference": "Practitioner/d1"}}]}, "names 2 patients"),
    ({"participant": [{"actor": {"reference": "Patient/p1"}}]}, "0 practitioners"),
    ({"start": None}, "no start time"),
    ({"end": "tomorrow"}, "is not a date-time"),
    ({"end": "2026-03-29T08:00:00Z"}, "ends before it starts"),
])
def test_an_appointment_that_cannot_be_a_video_visit_is_unprocessable(change, words):
    with pytest.raises(Unprocessable, match=words):
        visit_from_appointment({**appointment(), **change})


def test_the_room_opens_early_and_closes_after_a_grace_period_unless_the_visit_runs():
    window = JoinWindow(early=timedelta(minutes=15), grace=timedelta(minutes=30))
    visit = visit_from_appointment(appointment())
    state, message = window.state(visit, START - timedelta(minutes=16))
    assert state == "not-open"
    assert message == ("This visit has not started yet: it starts at 2026-03-29 09:00 UTC, and the room opens "
                       "at 2026-03-29 08:45 UTC.")
    assert window.state(visit, START - timedelta(minutes=15))[0] == "waiting"
    assert window.state(visit, START + timedelta(minutes=60))[0] == "waiting"
    assert window.state(visit, START + timedelta(minutes=61))[0] == "closed"
    running = visit_from_appointment(appointment("arrived"))
    assert window.state(running, START + timedelta(hours=5))[0] == "in-progress"
    assert window.state(visit_from_appointment(appointment("fulfilled")), START)[0] == "ended"
    assert window.state(visit_from_appointment(appointment("cancelled")), START) == ("closed",
                                                                                    "This visit was cancelled.")
    assert "'proposed'" in window.state(visit_from_appointment(appointment("proposed")), START)[1]


def test_each_visit_has_its_own_stable_encounter_id_that_is_a_valid_fhir_id():
    assert encounter_id_for("appt-1") == encounter_id_for("appt-1")
    assert encounter_id_for("appt-1") != encounter_id_for("appt-2")
    assert ID_PATTERN.fullmatch(encounter_id_for("x" * 64))


def test_the_encounter_starts_virtual_and_in_progress_and_ends_with_its_length_in_minutes():
    visit = visit_from_appointment(appointment(participant=[
        {"actor": {"reference": "Patient/p1"}}, {"actor": {"reference": "Practitioner/d1"}},
        {"actor": {"reference": "Practitioner/d2"}}]))
    enc = new_encounter(visit, host="d2", now=START + timedelta(seconds=3))
    validate(enc)
    assert enc["class"]["code"] == "VR" and enc["status"] == "in-progress"
    assert enc["period"] == {"start": "2026-03-29T09:00:03.000Z"}
    assert [(p["individual"]["reference"], p["type"][0]["coding"][0]["code"]) for p in enc["participant"]] == [
        ("Practitioner/d2", "PPRF"), ("Practitioner/d1", "PART")]
    done = finished_encounter(enc, now=START + timedelta(minutes=20, seconds=3))
    validate(done)
    assert done["status"] == "finished"
    assert done["period"] == {"start": "2026-03-29T09:00:03.000Z", "end": "2026-03-29T09:20:03.000Z"}
    assert done["length"]["value"] == 20.0 and done["length"]["code"] == "min"
    # a clock that stepped back never gives a negative length or an end before the start
    odd = finished_encounter(enc, now=START)
    assert odd["length"]["value"] == 0.0 and odd["period"]["end"] == odd["period"]["start"]


def test_chat_text_is_cleaned_and_bounded():
    assert clean_text("  hello\r\nthere\x07  ") == "hello\nthere"
    with pytest.raises(InvalidInput, match="empty"):
        clean_text(" \x00 ")
    with pytest.raises(InvalidInput):
        clean_text(42)
    with pytest.raises(PayloadTooLarge, match="at most 4000"):
        clean_text("x" * 4001)
    assert len(clean_text("é" * 4000)) == 4000


def test_a_file_name_loses_its_directories_and_control_characters():
    assert clean_title("C:\\Users\\me\\scan.pdf") == "scan.pdf"
    assert clean_title("../../etc/passwd") == "passwd"
    assert clean_title("a\x00b\nc.txt") == "abc.txt"
    assert clean_title(None) == clean_title("") == clean_title("dir/") == "file"
    assert len(clean_title("n" * 500)) == 200


def test_messages_are_communications_and_their_view_never_carries_file_bytes():
    visit = visit_from_appointment(appointment())
    text = chat_communication(visit, "enc-1", "Practitioner/d1", "Take it twice a day", START)
    validate(text)
    assert text["recipient"] == [{"reference": "Patient/p1"}]
    data = b"%PDF-1.7 letter"
    doc = file_communication(visit, "enc-1", "Patient/p1", title="letter.pdf", content_type="application/pdf",
                             data=data, now=START)
    validate(doc)
    att = doc["payload"][0]["contentAttachment"]
    assert att["size"] == len(data) and base64.b64decode(att["data"]) == data
    assert att["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
    view = message_view({**doc, "id": "c9"}, "appt-1")
    assert view == {"id": "c9", "from": "patient", "sent": "2026-03-29T09:00:00.000Z",
                    "file": {"title": "letter.pdf", "contentType": "application/pdf", "size": len(data),
                             "url": "/api/visits/appt-1/files/c9"}}
    assert message_view({**text, "id": "c8"}, "appt-1")["text"] == "Take it twice a day"


def test_turn_credentials_follow_coturns_shared_secret_scheme():
    username, credential = turn_credentials("s3cret", "acct-1", now=1_700_000_000, ttl=3600)
    assert username == "1700003600:acct-1"
    assert credential == base64.b64encode(hmac.new(b"s3cret", b"1700003600:acct-1", "sha1").digest()).decode()


def test_only_turn_entries_without_a_username_get_minted_credentials():
    servers = [{"urls": "stun:turn-host:3478"}, {"urls": ["turn:turn-host:3478", "turns:turn-host:5349"]},
               {"urls": "turn:other-host:3478", "username": "static", "credential": "pw"}]
    out = ice_servers_for(servers, user="acct-1", secret="s3cret", now=1_700_000_000, ttl=60)
    assert out[0] == servers[0] and out[2] == servers[2]
    assert out[1]["username"] == "1700000060:acct-1" and out[1]["credential"]
    assert ice_servers_for(servers, user="acct-1", secret="", now=0, ttl=60) == servers
