"""The video visit room through HTTP and WebSocket, on SQLite and PostgreSQL.

The ``visit`` fixture builds, with a trusted service token, Dr Doc and Dr Other, patients Alice
and Bob, an account for each, and a booked Appointment of Alice with Dr Doc that started five
minutes ago. Tests speak as those people through the app's own endpoints (the signaling socket
through Starlette's test client) and check what is stored through ``node.records``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from starlette.websockets import WebSocketDisconnect

from teleledger.demo import system_principal
from teleledger.storage import tables as t
from teleledger.visits.rooms import encounter_id_for
from teleledger.web.api.signaling import visit_rooms
from tests.integration.helpers import create, patient, service_headers

PASSWORD = "correct horse 1"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(40)
SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


class Clock:
    """The rooms' clock, moved by the tests."""

    def __init__(self) -> None:
        self.t = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.t


@dataclass
class Visit:
    client: object
    node: object
    service: dict
    clock: Clock
    ids: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, dict] = field(default_factory=dict)

    def login(self, username: str) -> dict:
        if username not in self.tokens:
            r = self.client.post("/auth/token", data={"grant_type": "password", "username": username,  # type: ignore[attr-defined]
                                                      "password": PASSWORD})
            assert r.status_code == 200, r.text
            self.tokens[username] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        return self.tokens[username]

    def post(self, username: str, path: str, **kw):  # type: ignore[no-untyped-def]
        return self.client.post(path, headers={**self.login(username), **kw.pop("headers", {})}, **kw)  # type: ignore[attr-defined]

    def get(self, username: str, path: str):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers=self.login(username))  # type: ignore[attr-defined]

    def socket(self, username: str, appointment: str | None = None):  # type: ignore[no-untyped-def]
        return self.client.websocket_connect(f"/visits/{appointment or self.appt}/ws",  # type: ignore[attr-defined]
                                             headers=self.login(username))

    @property
    def appt(self) -> str:
        return self.ids["appt"]

    def appointment(self, *, start: timedelta = timedelta(minutes=-5), length: timedelta = timedelta(minutes=30),
                    patient_key: str = "alice", doctors: tuple[str, ...] = ("doc",), status: str = "booked") -> str:
        begin = self.clock.t + start
        body = {
            "resourceType": "Appointment", "status": status,
            "start": begin.isoformat().replace("+00:00", "Z"), "end": (begin + length).isoformat().replace("+00:00", "Z"),
            "participant": [{"actor": {"reference": f"Patient/{self.ids[patient_key]}"}, "status": "accepted"},
                            *({"actor": {"reference": f"Practitioner/{self.ids[d]}"}, "status": "accepted"}
                              for d in doctors)],
        }
        return create(self.client, self.service, body)["id"]

    def read(self, res_type: str, res_id: str) -> dict:
        return self.node.records.read(system_principal(), res_type, res_id).body  # type: ignore[attr-defined]

    def communications(self) -> list[dict]:
        bundle = self.node.records.search(system_principal(), "Communication",  # type: ignore[attr-defined]
                                          [("patient", f"Patient/{self.ids['alice']}"), ("_count", "100")])
        return [e["resource"] for e in bundle.get("entry", [])]

    def denials(self, reason: str) -> list:
        with self.node.engine.connect() as conn:  # type: ignore[attr-defined]
            return conn.execute(select(t.access_events.c.actor, t.access_events.c.patient_id)
                                .where(t.access_events.c.outcome == "denied", t.access_events.c.reason == reason)).all()


@pytest.fixture
def visit(client, node) -> Visit:  # type: ignore[no-untyped-def]
    clock = Clock()
    v = Visit(client, node, service_headers(client, node), clock)
    visit_rooms(client.app).now = clock
    for key, family in (("doc", "Doc"), ("other_doc", "Other")):
        v.ids[key] = create(client, v.service, {"resourceType": "Practitioner", "name": [{"family": family, "given": ["Dana"]}]})["id"]
        node.accounts.create_user(username=key, password=PASSWORD, role="practitioner",
                                  practitioner=f"Practitioner/{v.ids[key]}")
    for key in ("alice", "bob"):
        v.ids[key] = create(client, v.service, patient(family=key.title(), given=key.title()))["id"]
        node.accounts.create_user(username=key, password=PASSWORD, role="patient", patient=f"Patient/{v.ids[key]}")
    v.ids["appt"] = v.appointment()
    return v


def refused(ctx) -> WebSocketDisconnect:  # type: ignore[no-untyped-def]
    """Open a socket that the server is expected to close at once; the close it sent."""
    with pytest.raises(WebSocketDisconnect) as caught:
        with ctx as ws:
            ws.receive_json()
    return caught.value


def admit(v: Visit) -> dict:
    r = v.post("doc", f"/api/visits/{v.appt}/admit")
    assert r.status_code == 200, r.text
    return r.json()


# ---- admission and the Encounter -----------------------------------------------------------


def test_admitting_the_patient_starts_a_virtual_encounter_and_marks_the_appointment_arrived(visit):
    enc = admit(visit)
    assert enc["resourceType"] == "Encounter" and enc["id"] == encounter_id_for(visit.appt)
    assert enc["status"] == "in-progress"
    assert enc["class"] == {"system": ACT_CODE, "code": "VR", "display": "virtual"}
    assert enc["subject"] == {"reference": f"Patient/{visit.ids['alice']}"}
    assert enc["appointment"] == [{"reference": f"Appointment/{visit.appt}"}]
    assert enc["participant"][0]["individual"] == {"reference": f"Practitioner/{visit.ids['doc']}"}
    assert enc["participant"][0]["type"][0]["coding"][0]["code"] == "PPRF"
    assert datetime.fromisoformat(enc["period"]["start"].replace("Z", "+00:00")) == visit.clock.t
    assert "end" not in enc["period"]
    assert visit.read("Encounter", enc["id"]) == enc
    assert visit.read("Appointment", visit.appt)["status"] == "arrived"
    # the patient sees the same Encounter through the FHIR API: it is in her record
    r = visit.get("alice", f"/fhir/Encounter/{enc['id']}")
    assert r.status_code == 200 and r.json()["class"]["code"] == "VR"
    state = visit.get("alice", f"/api/visits/{visit.appt}").json()
    assert (state["state"], state["you"], state["encounter"]) == ("in-progress", "patient", enc["id"])


def test_admitting_twice_is_a_conflict_and_leaves_one_encounter(visit):
    admit(visit)
    again = visit.post("doc", f"/api/visits/{visit.appt}/admit")
    assert again.status_code == 409
    assert again.json()["resourceType"] == "OperationOutcome"
    assert "already been admitted" in again.json()["issue"][0]["diagnostics"]
    bundle = visit.node.records.search(system_principal(), "Encounter", [("patient", visit.ids["alice"])])
    assert bundle["total"] == 1


def test_ending_the_visit_finishes_the_encounter_with_its_length_and_fulfils_the_appointment(visit):
    started = admit(visit)["period"]["start"]
    visit.clock.t += timedelta(minutes=12, seconds=30)
    r = visit.post("doc", f"/api/visits/{visit.appt}/end")
    assert r.status_code == 200, r.text
    enc = r.json()
    assert enc["status"] == "finished"
    assert enc["period"]["start"] == started
    assert datetime.fromisoformat(enc["period"]["end"].replace("Z", "+00:00")) == visit.clock.t
    assert enc["length"] == {"value": 12.5, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}
    assert visit.read("Encounter", enc["id"]) == enc
    assert visit.read("Appointment", visit.appt)["status"] == "fulfilled"
    # and the room is closed: no second end, no joining
    assert visit.post("doc", f"/api/visits/{visit.appt}/end").status_code == 409
    closed = refused(visit.socket("alice"))
    assert closed.code == 4403 and "has ended" in closed.reason


def test_ending_a_visit_nobody_was_admitted_to_is_a_conflict_and_changes_nothing(visit):
    r = visit.post("doc", f"/api/visits/{visit.appt}/end")
    assert r.status_code == 409
    assert "not been admitted" in r.json()["issue"][0]["diagnostics"]
    assert visit.read("Appointment", visit.appt)["status"] == "booked"


def test_the_patient_cannot_admit_herself_or_end_the_visit_and_the_refusal_is_audited(visit):
    for action in ("admit", "end"):
        r = visit.post("alice", f"/api/visits/{visit.appt}/{action}")
        assert r.status_code == 403
        assert r.json()["resourceType"] == "OperationOutcome"
        assert "only-practitioner-hosts" in r.json()["issue"][0]["diagnostics"]
    assert visit.read("Appointment", visit.appt)["status"] == "booked"
    assert len(visit.denials("only-practitioner-hosts")) == 2


# ---- who may come in, and when --------------------------------------------------------------


def test_someone_elses_visit_is_refused_on_the_api_the_socket_and_the_page(visit):
    # Bob is another patient; Dr Other has no part in this visit
    for who in ("bob", "other_doc"):
        r = visit.get(who, f"/api/visits/{visit.appt}")
        assert r.status_code == 403, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        closed = refused(visit.socket(who))
        assert closed.code == 4403, (who, closed.reason)
        assert closed.reason
    assert visit.post("other_doc", f"/api/visits/{visit.appt}/admit").status_code == 403
    assert visit.read("Appointment", visit.appt)["status"] == "booked"


def test_a_colleague_who_cares_for_the_patient_still_cannot_join_her_visit(visit):
    # Dr Other treated Alice before (an Encounter), so the records policy lets him read the
    # Appointment; the room's own rule still keeps him out, and says so in the audit trail
    create(visit.client, visit.service, {
        "resourceType": "Encounter", "status": "finished", "class": {"system": ACT_CODE, "code": "AMB"},
        "subject": {"reference": f"Patient/{visit.ids['alice']}"},
        "participant": [{"individual": {"reference": f"Practitioner/{visit.ids['other_doc']}"}}]})
    assert visit.get("other_doc", f"/fhir/Appointment/{visit.appt}").status_code == 200
    r = visit.get("other_doc", f"/api/visits/{visit.appt}")
    assert r.status_code == 403
    assert "not-a-visit-participant" in r.json()["issue"][0]["diagnostics"]
    closed = refused(visit.socket("other_doc"))
    assert closed.code == 4403 and "Only the patient and the practitioner" in closed.reason
    denials = visit.denials("not-a-visit-participant")
    assert len(denials) == 2 and all(d.patient_id == visit.ids["alice"] for d in denials)


def test_a_visit_that_has_not_started_is_refused_with_the_time_it_opens(visit):
    later = visit.appointment(start=timedelta(hours=2))
    closed = refused(visit.socket("alice", later))
    assert closed.code == 4403 and "has not started yet" in closed.reason
    r = visit.post("doc", f"/api/visits/{later}/admit")
    assert r.status_code == 403 and "has not started yet" in r.json()["issue"][0]["diagnostics"]
    assert visit.get("alice", f"/api/visits/{later}").json()["state"] == "not-open"
    # fifteen minutes before the start, the room opens
    visit.clock.t += timedelta(hours=1, minutes=46)
    with visit.socket("alice", later) as ws:
        assert ws.receive_json()["type"] == "welcome"


def test_cancelled_and_unknown_visits_are_refused_with_their_own_codes(visit):
    cancelled = visit.appointment(status="cancelled")
    closed = refused(visit.socket("alice", cancelled))
    assert (closed.code, closed.reason) == (4403, "This visit was cancelled.")
    assert refused(visit.socket("alice", "no-such-visit")).code == 4404
    assert refused(visit.socket("alice", "bad id!")).code == 4404
    r = visit.get("alice", "/api/visits/no-such-visit")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_the_socket_needs_a_signed_in_participant_and_a_cookie_needs_this_sites_origin(visit):
    assert refused(visit.client.websocket_connect(f"/visits/{visit.appt}/ws")).code == 4401
    bad = refused(visit.client.websocket_connect(f"/visits/{visit.appt}/ws",
                                                 headers={"Authorization": "Bearer not-a-token"}))
    assert bad.code == 4401
    r = visit.client.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303
    # the session cookie works from the site's own page, and only from there
    with visit.client.websocket_connect(f"/visits/{visit.appt}/ws", headers={"Origin": "http://testserver"}) as ws:
        assert ws.receive_json() == {"type": "welcome", "you": "patient", "admitted": False, "peers": []}
    cross = refused(visit.client.websocket_connect(f"/visits/{visit.appt}/ws", headers={"Origin": "https://evil.test"}))
    assert cross.code == 4403
    assert visit.client.post(f"/api/visits/{visit.appt}/messages", json={"text": "hi"},
                             headers={"Origin": "https://evil.test"}).status_code == 403
    visit.client.cookies.clear()


# ---- signaling ------------------------------------------------------------------------------


def test_signaling_waits_for_admission_then_relays_between_the_two_with_the_sender_stamped(visit):
    with visit.socket("alice") as patient_ws, visit.socket("doc") as doctor_ws:
        assert patient_ws.receive_json() == {"type": "welcome", "you": "patient", "admitted": False, "peers": []}
        assert doctor_ws.receive_json() == {"type": "welcome", "you": "practitioner", "admitted": False,
                                            "peers": ["patient"]}
        assert patient_ws.receive_json() == {"type": "peer-joined", "role": "practitioner"}
        patient_ws.send_text(json.dumps({"type": "ready"}))
        assert patient_ws.receive_json()["code"] == "not-admitted"

        enc = admit(visit)
        assert patient_ws.receive_json() == {"type": "admitted", "encounter": enc["id"]}
        assert doctor_ws.receive_json() == {"type": "admitted", "encounter": enc["id"]}

        patient_ws.send_text(json.dumps({"type": "ready", "from": "practitioner"}))
        assert doctor_ws.receive_json() == {"type": "ready", "from": "patient"}
        doctor_ws.send_text(json.dumps({"type": "offer", "sdp": SDP, "fresh": True, "id": "s1"}))
        assert patient_ws.receive_json() == {"type": "offer", "sdp": SDP, "fresh": True, "id": "s1",
                                             "from": "practitioner"}
        # malformed and forged frames get an error frame; the socket stays usable
        patient_ws.send_text("{not json")
        assert patient_ws.receive_json()["code"] == "malformed"
        patient_ws.send_bytes(b"\x00\x01")
        assert patient_ws.receive_json()["code"] == "malformed"
        patient_ws.send_text(json.dumps({"type": "answer", "sdp": "x" * 70_000}))
        assert patient_ws.receive_json()["code"] == "too-large"
        patient_ws.send_text(json.dumps({"type": "admit"}))
        assert patient_ws.receive_json()["code"] == "unknown-type"
        patient_ws.send_text(json.dumps({"type": "answer", "sdp": SDP, "id": "s1"}))
        assert doctor_ws.receive_json() == {"type": "answer", "sdp": SDP, "id": "s1", "from": "patient"}

        visit.post("doc", f"/api/visits/{visit.appt}/end")
        ended = patient_ws.receive_json()
        assert ended["type"] == "ended" and ended["encounter"] == enc["id"]
        with pytest.raises(WebSocketDisconnect) as closed:
            patient_ws.receive_json()
        assert closed.value.code == 1000


def test_a_third_person_is_refused_and_the_same_person_again_takes_over(visit):
    both = visit.appointment(doctors=("doc", "other_doc"))
    with visit.socket("alice", both) as patient_ws, visit.socket("doc", both) as doctor_ws:
        patient_ws.receive_json(), doctor_ws.receive_json(), patient_ws.receive_json()
        third = refused(visit.socket("other_doc", both))
        assert third.code == 4403 and "another practitioner" in third.reason
        with visit.socket("alice", both) as again:
            assert again.receive_json()["peers"] == ["practitioner"]
            with pytest.raises(WebSocketDisconnect) as replaced:
                patient_ws.receive_json()
            assert replaced.value.code == 4409
            assert doctor_ws.receive_json() == {"type": "peer-joined", "role": "patient"}


# ---- chat and files -------------------------------------------------------------------------


def test_a_chat_message_goes_both_ways_and_is_stored_as_a_communication(visit):
    enc = admit(visit)
    with visit.socket("alice") as patient_ws, visit.socket("doc") as doctor_ws:
        patient_ws.receive_json(), doctor_ws.receive_json(), patient_ws.receive_json()
        r = visit.post("alice", f"/api/visits/{visit.appt}/messages", json={"text": "I feel better today"})
        assert r.status_code == 201, r.text
        sent = r.json()
        assert (sent["from"], sent["text"]) == ("patient", "I feel better today")
        assert r.headers["location"] == f"/fhir/Communication/{sent['id']}"
        for ws in (patient_ws, doctor_ws):
            assert ws.receive_json() == {"type": "chat", "message": sent}
        reply = visit.post("doc", f"/api/visits/{visit.appt}/messages", json={"text": "Good to hear"}).json()
        for ws in (patient_ws, doctor_ws):
            assert ws.receive_json()["message"]["text"] == "Good to hear"

    comm = visit.read("Communication", sent["id"])
    assert comm["status"] == "completed"
    assert comm["subject"] == {"reference": f"Patient/{visit.ids['alice']}"}
    assert comm["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    assert comm["sender"] == {"reference": f"Patient/{visit.ids['alice']}"}
    assert comm["recipient"] == [{"reference": f"Practitioner/{visit.ids['doc']}"}]
    assert comm["payload"] == [{"contentString": "I feel better today"}]
    assert visit.read("Communication", reply["id"])["sender"] == {"reference": f"Practitioner/{visit.ids['doc']}"}
    for who in ("alice", "doc"):
        listed = visit.get(who, f"/api/visits/{visit.appt}/messages").json()["messages"]
        assert [m["text"] for m in listed] == ["I feel better today", "Good to hear"]
    assert visit.get("bob", f"/api/visits/{visit.appt}/messages").status_code == 403


def test_a_shared_file_is_stored_with_its_type_size_and_hash_and_only_the_two_can_fetch_it(visit):
    admit(visit)
    r = visit.post("doc", f"/api/visits/{visit.appt}/files", files={"file": ("../rash photo.png", PNG, "image/png")})
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["file"] == {"title": "rash photo.png", "contentType": "image/png", "size": len(PNG),
                            "url": f"/api/visits/{visit.appt}/files/{view['id']}"}
    att = visit.read("Communication", view["id"])["payload"][0]["contentAttachment"]
    assert att["contentType"] == "image/png" and att["size"] == len(PNG)
    assert base64.b64decode(att["data"]) == PNG
    assert att["hash"] == base64.b64encode(hashlib.sha1(PNG).digest()).decode()
    got = visit.get("alice", view["file"]["url"])
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"].startswith("attachment;")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert visit.get("bob", view["file"]["url"]).status_code == 403
    # the same file as JSON with base64, for API clients
    j = visit.post("alice", f"/api/visits/{visit.appt}/files",
                   json={"title": "notes.txt", "contentType": "text/plain; charset=utf-8",
                         "data": base64.b64encode("120/80 this morning".encode()).decode()})
    assert j.status_code == 201, j.text
    assert j.json()["file"]["contentType"] == "text/plain"


def test_over_limit_and_forbidden_files_and_messages_are_refused_and_nothing_is_stored(visit):
    admit(visit)
    assert visit.post("alice", f"/api/visits/{visit.appt}/messages", json={"text": "kept"}).status_code == 201
    before = visit.communications()
    limit = visit_rooms(visit.client.app).settings.max_attachment_bytes

    cases = [
        (visit.post("alice", f"/api/visits/{visit.appt}/files",
                    files={"file": ("big.png", PNG + bytes(limit), "image/png")}), 413, "at most"),
        (visit.post("alice", f"/api/visits/{visit.appt}/files",
                    files={"file": ("huge.pdf", b"%PDF-" + bytes(2 * limit), "application/pdf")}), 413, "at most"),
        (visit.post("alice", f"/api/visits/{visit.appt}/files",
                    files={"file": ("tool.exe", b"MZ\x90\x00", "application/x-msdownload")}), 415, "cannot be attached"),
        (visit.post("alice", f"/api/visits/{visit.appt}/files",
                    files={"file": ("x.png", b"<html><script>alert(1)</script>", "image/png")}), 415, "is not"),
        (visit.post("alice", f"/api/visits/{visit.appt}/files",
                    json={"title": "a", "contentType": "image/png", "data": "not base64!"}), 400, "base64"),
        (visit.post("alice", f"/api/visits/{visit.appt}/messages", json={"text": "x" * 4001}), 413, "at most 4000"),
        (visit.post("alice", f"/api/visits/{visit.appt}/messages", json={"text": "   "}), 400, "empty"),
        (visit.post("alice", f"/api/visits/{visit.appt}/messages", content=b"{oops",
                    headers={"Content-Type": "application/json"}), 400, "JSON"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert words in body["issue"][0]["diagnostics"], body
    assert visit.communications() == before
    assert [m["text"] for m in visit.get("alice", f"/api/visits/{visit.appt}/messages").json()["messages"]] == ["kept"]


def test_chat_opens_only_once_the_patient_is_admitted(visit):
    r = visit.post("alice", f"/api/visits/{visit.appt}/messages", json={"text": "hello?"})
    assert r.status_code == 409
    assert "once the practitioner has admitted" in r.json()["issue"][0]["diagnostics"]
    assert visit.communications() == []
    assert visit.get("alice", f"/api/visits/{visit.appt}/messages").json() == {"messages": []}


# ---- the page -------------------------------------------------------------------------------


def sign_in(client, username: str) -> None:  # type: ignore[no-untyped-def]
    client.cookies.clear()
    r = client.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303


def test_the_room_page_shows_the_waiting_room_to_the_patient_and_admit_to_the_practitioner(visit):
    c = visit.client
    sign_in(c, "alice")
    page = c.get(f"/visits/{visit.appt}/room")
    assert page.status_code == 200
    assert "You are in the waiting room" in page.text and 'data-role="patient"' in page.text
    assert "Dana Doc" in page.text  # who she is meeting
    assert 'id="admit"' not in page.text and "Prescribe" not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    sign_in(c, "doc")
    page = c.get(f"/visits/{visit.appt}/room")
    assert page.status_code == 200
    assert 'id="admit"' in page.text and "Admit Alice Alice" in page.text
    assert 'id="prescribe"' in page.text  # the e-prescription entry point lives in the practitioner's view
    admit(visit)
    page = c.get(f"/visits/{visit.appt}/room")
    assert f'href="/console/encounters/{encounter_id_for(visit.appt)}/note"' in page.text
    c.cookies.clear()


def test_the_room_page_refuses_strangers_and_early_comers_with_a_clear_page(visit):
    c = visit.client
    c.cookies.clear()
    r = c.get(f"/visits/{visit.appt}/room", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    sign_in(c, "bob")
    r = c.get(f"/visits/{visit.appt}/room")
    assert r.status_code == 403 and "You cannot open this page" in r.text
    later = visit.appointment(start=timedelta(hours=3))
    sign_in(c, "alice")
    r = c.get(f"/visits/{later}/room")
    assert r.status_code == 403
    assert "Your visit has not started yet" in r.text and "the room opens at" in r.text
    c.cookies.clear()
