"""The signaling hub (teleledger.visits.signaling.Hub), without a web server."""

from __future__ import annotations

import asyncio
import json

import pytest

from teleledger.visits.signaling import Close, Connection, Hub, RoomRefused

PATIENT, DOCTOR, OTHER_DOCTOR, STRANGER = "Patient/p1", "Practitioner/d1", "Practitioner/d2", "Patient/p2"
PARTICIPANTS = frozenset({PATIENT, DOCTOR})
SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host", "sdpMid": "0",
             "sdpMLineIndex": 0, "usernameFragment": "abcd"}


def drain(conn: Connection) -> list[dict | Close]:
    """Everything queued for a connection, JSON frames decoded."""
    out: list[dict | Close] = []
    while not conn.outbox.empty():
        item = conn.outbox.get_nowait()
        out.append(item if isinstance(item, Close) else json.loads(item))
    return out


def frames(conn: Connection) -> list[dict]:
    return [f for f in drain(conn) if isinstance(f, dict)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def room(hub: Hub, *, admitted: bool = True, room_id: str = "appt-1") -> tuple[Connection, Connection]:
    patient = hub.join(room_id, member=PATIENT, role="patient", participants=PARTICIPANTS, admitted=admitted)
    doctor = hub.join(room_id, member=DOCTOR, role="practitioner", participants=PARTICIPANTS, admitted=admitted)
    drain(patient), drain(doctor)
    return patient, doctor


def test_joining_welcomes_the_newcomer_and_tells_the_one_already_there():
    hub = Hub()
    patient = hub.join("appt-1", member=PATIENT, role="patient", participants=PARTICIPANTS)
    assert frames(patient) == [{"type": "welcome", "you": "patient", "admitted": False, "peers": []}]
    doctor = hub.join("appt-1", member=DOCTOR, role="practitioner", participants=PARTICIPANTS)
    assert frames(doctor) == [{"type": "welcome", "you": "practitioner", "admitted": False, "peers": ["patient"]}]
    assert frames(patient) == [{"type": "peer-joined", "role": "practitioner"}]
    assert hub.occupants("appt-1") == ["patient", "practitioner"]


def test_an_offer_is_relayed_to_the_other_participant_only_with_the_sender_stamped():
    hub = Hub()
    patient, doctor = room(hub)
    _, other_doctor = room(hub, room_id="appt-2")  # a second visit must hear nothing of the first
    hub.receive(doctor, json.dumps({"type": "offer", "sdp": SDP, "fresh": True, "id": "m1"}))
    assert frames(patient) == [{"type": "offer", "sdp": SDP, "fresh": True, "id": "m1", "from": "practitioner"}]
    assert frames(doctor) == []
    assert frames(other_doctor) == []
    hub.receive(patient, json.dumps({"type": "answer", "sdp": SDP}))
    hub.receive(patient, json.dumps({"type": "ice-candidate", "candidate": CANDIDATE}))
    hub.receive(patient, json.dumps({"type": "ice-candidate", "candidate": None}))
    assert frames(doctor) == [
        {"type": "answer", "sdp": SDP, "from": "patient"},
        {"type": "ice-candidate", "candidate": CANDIDATE, "from": "patient"},
        {"type": "ice-candidate", "candidate": None, "from": "patient"},
    ]


def test_a_forged_from_and_smuggled_fields_are_dropped():
    hub = Hub()
    patient, doctor = room(hub)
    hub.receive(patient, json.dumps({"type": "media", "camera": False, "microphone": True, "from": "practitioner",
                                     "role": "practitioner", "admitted": True, "html": "<script>"}))
    assert frames(doctor) == [{"type": "media", "camera": False, "microphone": True, "from": "patient"}]
    hub.receive(patient, json.dumps({"type": "ice-candidate", "candidate": {**CANDIDATE, "evil": 1}}))
    assert frames(doctor)[0]["candidate"] == CANDIDATE


@pytest.mark.parametrize("raw, code", [
    ("{not json", "malformed"),
    ("[1, 2]", "malformed"),
    (b'{"type": "offer"}', "malformed"),
    ('{"sdp": "x"}', "unknown-type"),
    ('{"type": "launch-missiles"}', "unknown-type"),
    ('{"type": "offer"}', "invalid-field"),
    ('{"type": "offer", "sdp": ""}', "invalid-field"),
    ('{"type": "offer", "sdp": 42}', "invalid-field"),
    ('{"type": "offer", "sdp": "v=0", "fresh": "yes"}', "invalid-field"),
    ('{"type": "answer", "sdp": "' + "a" * 60_001 + '"}', "invalid-field"),
    ('{"type": "ice-candidate", "candidate": "candidate:1"}', "invalid-field"),
    ('{"type": "ice-candidate"}', "invalid-field"),
    ('{"type": "ice-candidate", "candidate": {"candidate": "' + "c" * 1025 + '", "sdpMid": "0"}}', "invalid-field"),
    ('{"type": "ice-candidate", "candidate": {"candidate": "candidate:1", "sdpMLineIndex": -1}}', "invalid-field"),
    ('{"type": "ice-candidate", "candidate": {"candidate": "candidate:1", "sdpMLineIndex": true}}', "invalid-field"),
    ('{"type": "ice-candidate", "candidate": {"candidate": "candidate:1"}}', "invalid-field"),
    ('{"type": "media", "camera": 1, "microphone": true}', "invalid-field"),
    ('{"type": "typing", "id": ""}', "invalid-field"),
    ('{"type": "typing", "id": "' + "i" * 65 + '"}', "invalid-field"),
    ('{"type": "typing", "pad": "' + "x" * 70_000 + '"}', "too-large"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_a_bad_frame_gets_an_error_frame_relays_nothing_and_keeps_the_connection(raw, code):
    hub = Hub()
    patient, doctor = room(hub)
    hub.receive(patient, raw)
    (error,) = frames(patient)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    assert drain(doctor) == []
    assert patient.open
    # the same connection still works
    hub.receive(patient, json.dumps({"type": "typing"}))
    assert frames(doctor) == [{"type": "typing", "from": "patient"}]


def test_an_error_frame_never_echoes_what_was_sent():
    hub = Hub()
    patient, _ = room(hub)
    hub.receive(patient, json.dumps({"type": "<img src=x onerror=alert(1)>" * 3}))
    (error,) = frames(patient)
    assert error["code"] == "unknown-type"
    assert "<img" not in error["message"]


def test_media_negotiation_waits_for_admission_but_ping_does_not():
    hub = Hub()
    patient, doctor = room(hub, admitted=False)
    hub.receive(patient, json.dumps({"type": "ready", "id": "r1"}))
    assert frames(patient) == [{"type": "error", "code": "not-admitted",
                                "message": "the practitioner has not admitted the patient yet", "id": "r1"}]
    assert frames(doctor) == []
    hub.receive(patient, json.dumps({"type": "ping", "id": "p1"}))
    assert frames(patient) == [{"type": "pong", "id": "p1"}]
    hub.admit("appt-1", "enc-1")
    assert frames(patient) == [{"type": "admitted", "encounter": "enc-1"}]
    assert frames(doctor) == [{"type": "admitted", "encounter": "enc-1"}]
    hub.receive(patient, json.dumps({"type": "ready"}))
    assert frames(doctor) == [{"type": "ready", "from": "patient"}]


def test_a_third_participant_is_refused_and_so_is_a_second_practitioner():
    hub = Hub()
    room(hub)
    with pytest.raises(RoomRefused, match="not a participant"):
        hub.join("appt-1", member=STRANGER, role="patient", participants=PARTICIPANTS)
    three = PARTICIPANTS | {OTHER_DOCTOR}
    with pytest.raises(RoomRefused, match="another practitioner"):
        hub.join("appt-1", member=OTHER_DOCTOR, role="practitioner", participants=three)
    assert hub.occupants("appt-1") == ["patient", "practitioner"]


def test_the_same_participant_connecting_again_takes_over_and_the_old_socket_is_closed():
    hub = Hub()
    patient, doctor = room(hub)
    again = hub.join("appt-1", member=PATIENT, role="patient", participants=PARTICIPANTS, admitted=True)
    assert drain(patient)[-1] == Close(4409, "replaced by a newer connection of the same participant")
    assert not patient.open
    assert frames(again) == [{"type": "welcome", "you": "patient", "admitted": True, "peers": ["practitioner"]}]
    assert frames(doctor) == [{"type": "peer-joined", "role": "patient"}]
    # frames from the replaced socket are ignored; its late leave does not evict the new one
    hub.receive(patient, json.dumps({"type": "typing"}))
    hub.leave(patient)
    assert frames(doctor) == []
    hub.receive(again, json.dumps({"type": "typing"}))
    assert frames(doctor) == [{"type": "typing", "from": "patient"}]


def test_nobody_to_relay_to_is_an_error_frame():
    hub = Hub()
    patient = hub.join("appt-1", member=PATIENT, role="patient", participants=PARTICIPANTS, admitted=True)
    drain(patient)
    hub.receive(patient, json.dumps({"type": "ready"}))
    assert frames(patient)[0]["code"] == "no-peer"


def test_leaving_tells_the_other_and_the_last_to_leave_removes_the_room():
    hub = Hub()
    patient, doctor = room(hub)
    assert hub.room_count() == 1
    hub.leave(patient)
    assert frames(doctor) == [{"type": "peer-left", "role": "patient"}]
    assert hub.room_count() == 1
    hub.leave(doctor)
    assert hub.room_count() == 0
    assert hub.occupants("appt-1") == []
    # a new room under the same id starts from scratch (not admitted)
    fresh = hub.join("appt-1", member=PATIENT, role="patient", participants=PARTICIPANTS)
    assert frames(fresh)[0]["admitted"] is False


def test_ending_the_visit_tells_both_closes_both_and_forgets_the_room():
    hub = Hub()
    patient, doctor = room(hub)
    hub.end("appt-1", {"encounter": "enc-1", "minutes": 12.5})
    for conn in (patient, doctor):
        assert drain(conn) == [{"type": "ended", "encounter": "enc-1", "minutes": 12.5},
                               Close(1000, "the visit has ended")]
        assert not conn.open
    assert hub.room_count() == 0
    hub.leave(patient), hub.leave(doctor)  # the web layer's cleanup after the close is harmless


def test_chat_events_go_to_both_participants():
    hub = Hub()
    patient, doctor = room(hub)
    hub.publish("appt-1", {"type": "chat", "message": {"id": "c1", "from": "patient", "text": "hello"}})
    assert frames(patient) == frames(doctor) == [{"type": "chat", "message": {"id": "c1", "from": "patient",
                                                                               "text": "hello"}}]
    hub.publish("no-such-room", {"type": "chat"})  # nobody there: nothing happens


def test_a_flood_is_rate_limited_and_the_bucket_refills_with_time():
    clock = Clock()
    hub = Hub(rate=10, burst=5, clock=clock)
    patient, doctor = room(hub)
    for _ in range(8):
        hub.receive(patient, '{"type": "typing"}')
    assert len(frames(doctor)) == 5
    assert [f["code"] for f in frames(patient)] == ["rate-limited"] * 3
    clock.t += 0.5  # five more tokens
    for _ in range(5):
        hub.receive(patient, '{"type": "typing"}')
    assert len(frames(doctor)) == 5


def test_a_receiver_that_stops_reading_is_disconnected_instead_of_piling_up_messages():
    hub = Hub(outbox_size=4, rate=1e9, burst=10**9)
    patient, doctor = room(hub)
    for _ in range(5):  # four fill the practitioner's outbox, the fifth overflows it
        hub.receive(patient, '{"type": "typing"}')
    assert not doctor.open
    assert drain(doctor)[-1] == Close(4429, "too many messages waiting: reconnect")
    assert frames(patient)[0] == {"type": "peer-left", "role": "practitioner"}


def test_the_hub_runs_on_an_event_loop_with_connections_read_by_tasks():
    async def scenario() -> list[str]:
        hub = Hub()
        patient, doctor = room(hub)
        got: list[str] = []

        async def reader() -> None:
            while True:
                item = await doctor.next()
                if isinstance(item, Close):
                    return
                got.append(json.loads(item)["type"])

        task = asyncio.create_task(reader())
        hub.receive(patient, '{"type": "ready"}')
        hub.receive(patient, json.dumps({"type": "answer", "sdp": SDP}))
        await asyncio.sleep(0)
        hub.end("appt-1", {"encounter": "e"})
        await asyncio.wait_for(task, 1)
        return got

    assert asyncio.run(scenario()) == ["ready", "answer", "ended"]


def test_someone_reconnecting_after_admission_is_told_the_visits_encounter():
    hub = Hub()
    patient, doctor = room(hub, admitted=False)
    hub.admit("appt-1", "enc-7")
    drain(patient)
    again = hub.join("appt-1", member=PATIENT, role="patient", participants=PARTICIPANTS)
    assert frames(again)[0] == {"type": "welcome", "you": "patient", "admitted": True, "peers": ["practitioner"],
                                "encounter": "enc-7"}
