"""Secure messaging through HTTP, on SQLite and PostgreSQL: threads between a patient and their
care team as Communications, attachments with limits, unread counts, participants only."""

from __future__ import annotations

import base64

import pytest

from tests.integration.clinic import Clinic, build_clinic

PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def clinic(client, node) -> Clinic:  # type: ignore[no-untyped-def]
    return build_clinic(client, node)


def attachment(data: bytes, content_type: str = "application/pdf", title: str = "results.pdf") -> dict:
    return {"contentType": content_type, "data": base64.b64encode(data).decode(), "title": title}


def start(c: Clinic, who: str = "alice", **body: object):  # type: ignore[no-untyped-def]
    payload = {"subject": "Headache is back", "text": "Since yesterday evening.", **body}
    if who == "alice" and "practitioners" not in body and "patient" not in body:
        payload["practitioners"] = [c.ids["doc"]]
    return c.post(who, "/api/messages", payload)


def unread(c: Clinic, who: str) -> int:
    r = c.get(who, "/api/messages/unread")
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_a_patient_writes_to_her_practitioner_who_reads_and_answers(clinic):
    r = start(clinic, attachment=attachment(PDF))
    assert r.status_code == 201, r.text
    msg = r.json()
    thread = msg["thread"]
    assert msg["sender"] == f"Patient/{clinic.ids['alice']}"
    assert msg["recipients"] == [f"Practitioner/{clinic.ids['doc']}"]
    assert msg["attachment"] == {"title": "results.pdf", "contentType": "application/pdf", "size": len(PDF)}

    assert unread(clinic, "doc") == 1 and unread(clinic, "alice") == 0
    listed = clinic.get("doc", "/api/messages").json()
    assert listed["unread"] == 1
    assert [(t["id"], t["topic"], t["unread"], t["messages"]) for t in listed["threads"]] == [
        (thread, "Headache is back", 1, 1)]
    # reading through the API does not mark it read; marking does
    got = clinic.get("doc", f"/api/messages/{thread}").json()
    assert got["messages"][0]["text"] == "Since yesterday evening." and got["messages"][0]["unread"] is True
    assert clinic.post("doc", f"/api/messages/{thread}/read").json() == {"marked": 1}
    assert unread(clinic, "doc") == 0

    r = clinic.post("doc", f"/api/messages/{thread}/replies", {"text": "Please book a visit for tomorrow."})
    assert r.status_code == 201, r.text
    assert r.json()["inResponseTo"] == msg["id"] and r.json()["recipients"] == [f"Patient/{clinic.ids['alice']}"]
    assert unread(clinic, "alice") == 1
    thread_view = clinic.get("alice", f"/api/messages/{thread}").json()
    assert [m["text"] for m in thread_view["messages"]] == ["Since yesterday evening.",
                                                            "Please book a visit for tomorrow."]
    # the file comes back byte for byte, as a download
    dl = clinic.get("doc", f"/api/messages/attachments/{msg['id']}")
    assert dl.status_code == 200 and dl.content == PDF
    assert dl.headers["content-type"] == "application/pdf" and dl.headers["content-disposition"].startswith("attachment")

    # stored as FHIR Communications in Alice's record
    bundle = clinic.get("alice", "/fhir/Communication").json()
    assert bundle["total"] == 2
    comm = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == msg["id"])
    assert comm["subject"] == {"reference": f"Patient/{clinic.ids['alice']}"}
    assert comm["topic"]["coding"][0]["code"] == thread and comm["category"][0]["coding"][0]["code"] == "secure-message"


def test_another_patient_gets_nothing_of_the_thread(clinic):
    msg = start(clinic, attachment=attachment(PDF)).json()
    thread = msg["thread"]
    assert clinic.get("bob", "/api/messages").json() == {"threads": [], "unread": 0}
    assert unread(clinic, "bob") == 0
    assert clinic.get("bob", f"/api/messages/{thread}").status_code == 404
    assert clinic.post("bob", f"/api/messages/{thread}/replies", {"text": "hi"}).status_code == 404
    assert clinic.post("bob", f"/api/messages/{thread}/read").status_code == 404
    assert clinic.get("bob", "/fhir/Communication").json()["total"] == 0
    assert clinic.get("bob", f"/fhir/Communication/{msg['id']}").status_code == 403
    assert clinic.get("bob", f"/api/messages/attachments/{msg['id']}").status_code == 403
    assert clinic.count("Communication") == 1


def test_a_practitioner_outside_the_thread_cannot_read_or_answer_it(clinic):
    thread = start(clinic).json()["thread"]
    # Dr Colleague cares for Alice too, but is not in this conversation
    assert clinic.get("colleague", "/api/messages").json()["threads"] == []
    assert clinic.get("colleague", f"/api/messages/{thread}").status_code == 404
    assert clinic.post("colleague", f"/api/messages/{thread}/replies", {"text": "hi"}).status_code == 404
    assert clinic.get("stranger", f"/api/messages/{thread}").status_code == 404
    assert clinic.count("Communication") == 1


def test_a_patient_can_only_write_to_practitioners_who_care_for_her(clinic):
    r = start(clinic, practitioners=[clinic.ids["stranger"]])
    assert r.status_code == 403 and "message-no-relationship" in r.json()["issue"][0]["diagnostics"]
    r = clinic.post("bob", "/api/messages", {"subject": "x", "text": "y", "patient": clinic.ids["alice"],
                                             "practitioners": [clinic.ids["doc"]]})
    assert r.status_code == 400 and "own record" in r.json()["issue"][0]["diagnostics"]
    assert clinic.denials("message-no-relationship") == 1
    assert clinic.count("Communication") == 0 and clinic.reads() == []


def test_a_practitioner_starts_a_thread_with_a_patient_in_their_care(clinic):
    r = start(clinic, "doc", patient=clinic.ids["bob"])
    assert r.status_code == 201, r.text
    assert unread(clinic, "bob") == 1 and unread(clinic, "alice") == 0
    r = start(clinic, "stranger", patient=clinic.ids["bob"])
    assert r.status_code == 403
    assert clinic.count("Communication") == 1


@pytest.mark.parametrize(("att", "status", "text"), [
    (attachment(PDF + b" " * (4 * 1024 * 1024)), 413, "files may be at most 4.0 MB"),
    (attachment(b"<html><script>x</script></html>", "text/html", "page.html"), 415, "files of type text/html"),
    (attachment(b"<html>not a png</html>", "image/png", "photo.png"), 415, "says it is a PNG image"),
    ({"contentType": "application/pdf", "data": "%%%", "title": "x"}, 400, "not base64"),
])
def test_a_refused_attachment_is_a_clear_error_and_nothing_is_stored(clinic, att, status, text):
    thread = start(clinic).json()["thread"]
    before = (clinic.count("Communication"), len(clinic.reads()))
    r = clinic.post("alice", f"/api/messages/{thread}/replies", {"text": "see attached", "attachment": att})
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome" and text in r.json()["issue"][0]["diagnostics"]
    r = start(clinic, attachment=att)
    assert r.status_code == status, r.text
    assert (clinic.count("Communication"), len(clinic.reads())) == before
    assert unread(clinic, "doc") == 1


def test_an_overlong_or_empty_message_is_refused(clinic):
    r = start(clinic, text="x" * 10_001)
    assert r.status_code == 413 and "at most 10,000" in r.json()["issue"][0]["diagnostics"]
    r = start(clinic, text="   ")
    assert r.status_code == 400 and "write something or attach a file" in r.json()["issue"][0]["diagnostics"]
    r = start(clinic, subject="")
    assert r.status_code == 400 and "subject is empty" in r.json()["issue"][0]["diagnostics"]
    r = clinic.post("alice", "/api/messages", {"subject": "x", "text": "y", "cc": "z"})
    assert r.status_code == 400 and "unknown field(s) cc" in r.json()["issue"][0]["diagnostics"]
    assert clinic.count("Communication") == 0


def test_unread_counts_go_down_per_thread_as_threads_are_read(clinic):
    t1 = start(clinic).json()["thread"]
    t2 = start(clinic, subject="Second question").json()["thread"]
    clinic.post("alice", f"/api/messages/{t1}/replies", {"text": "And one more thing."})
    counts = clinic.get("doc", "/api/messages/unread").json()
    assert counts == {"total": 3, "threads": {t1: 2, t2: 1}}
    clinic.post("doc", f"/api/messages/{t1}/read")
    assert clinic.get("doc", "/api/messages/unread").json() == {"total": 1, "threads": {t2: 1}}
    # replying marks the thread read for the one who replies
    clinic.post("doc", f"/api/messages/{t2}/replies", {"text": "Noted."})
    assert unread(clinic, "doc") == 0 and unread(clinic, "alice") == 1


# ---- the pages ------------------------------------------------------------------------------------


def sign_in(c: Clinic, username: str) -> None:
    c.client.cookies.clear()
    r = c.client.post("/login", data={"username": username, "password": "correct horse 1"}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_the_message_pages_send_show_the_badge_and_mark_read(clinic):
    sign_in(clinic, "alice")
    page = clinic.client.get("/portal/messages")
    assert page.status_code == 200 and "Dr Dana Doc" in page.text  # her care team to write to
    r = clinic.client.post("/portal/messages", data={"subject": "Rash", "text": "A photo of it.",
                                                     "practitioners": clinic.ids["doc"]},
                           files={"file": ("rash.png", PNG, "image/png")}, follow_redirects=False)
    assert r.status_code == 303, r.text
    thread_path = r.headers["location"].split("?")[0]
    assert thread_path.startswith("/portal/messages/")

    sign_in(clinic, "doc")
    portal = clinic.client.get("/portal")
    assert 'id="nav-unread"' in portal.text and "1 unread message" in portal.text
    doc_path = thread_path.replace("/portal/", "/console/")
    assert clinic.client.get(thread_path, follow_redirects=False).headers["location"] == doc_path
    view = clinic.client.get(doc_path)
    assert view.status_code == 200 and "A photo of it." in view.text and "rash.png" in view.text
    assert 'id="nav-unread"' not in view.text  # opening the thread read it
    assert unread(clinic, "doc") == 0


def test_a_too_large_file_on_the_page_is_a_clear_message_and_the_text_is_kept(clinic):
    sign_in(clinic, "alice")
    big = PDF + b" " * (4 * 1024 * 1024)
    r = clinic.client.post("/portal/messages", data={"subject": "Scan", "text": "My scan results attached.",
                                                     "practitioners": clinic.ids["doc"]},
                           files={"file": ("scan.pdf", big, "application/pdf")})
    assert r.status_code == 413
    assert 'role="alert"' in r.text and "files may be at most 4.0 MB" in r.text
    assert "My scan results attached." in r.text and 'value="Scan"' in r.text
    r = clinic.client.post("/portal/messages", data={"subject": "Page", "text": "hi", "practitioners": clinic.ids["doc"]},
                           files={"file": ("x.html", b"<html></html>", "text/html")})
    assert r.status_code == 415 and "files of type text/html cannot be attached" in r.text
    assert clinic.count("Communication") == 0 and clinic.reads() == []


def test_a_patient_cannot_open_another_patients_thread_page(clinic):
    thread = start(clinic).json()["thread"]
    sign_in(clinic, "bob")
    r = clinic.client.get(f"/portal/messages/{thread}")
    assert r.status_code == 404 and "no such message thread" in r.text
    assert "Since yesterday evening." not in r.text
