"""A whole video visit in a real browser against a real server process.

A server is started with ``teleledger serve`` on an empty node; a service creates a patient and
a practitioner (and their accounts) and books an Appointment that starts now. Chromium, with a
fake camera and microphone (``--use-fake-device-for-media-stream``, permission granted by
``--use-fake-ui-for-media-stream``), opens the room twice in two browser contexts: the patient
waits, the practitioner sees her waiting and admits her, both RTCPeerConnections reach
``connected`` and decode video frames from the other side (``getStats``), a chat message goes
each way, the patient's signaling socket drops and reconnects, a forbidden file is refused with
a clear message, and the practitioner ends the visit.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, WAIT_MS, browser_or_skip, chromium, serve

MEDIA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
CONNECT_MS = 30_000  # ICE + DTLS on a loaded machine


@dataclass
class Site:
    base: str
    appointment: str
    patient_id: str
    practitioner_id: str
    service: dict
    log: Path

    def room(self) -> str:
        return f"{self.base}/visits/{self.appointment}/room"


def _instant(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-visit"), TELELEDGER_MAX_ATTACHMENT_BYTES="65536") as server:
        create = server.create
        alice = create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                        "gender": "female", "birthDate": "1990-05-04"})
        doctor = create({"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"],
                                                                   "prefix": ["Dr"]}]})
        bob = create({"resourceType": "Patient", "name": [{"family": "Builder", "given": ["Bob"]}],
                      "gender": "male", "birthDate": "1985-01-02"})
        server.cli("users", "create", "--role", "patient", "--username", "alice", "--password", PASSWORD,
                   "--patient", f"Patient/{alice}")
        server.cli("users", "create", "--role", "patient", "--username", "bob", "--password", PASSWORD,
                   "--patient", f"Patient/{bob}")
        server.cli("users", "create", "--role", "practitioner", "--username", "drsmith", "--password", PASSWORD,
                   "--practitioner", f"Practitioner/{doctor}")
        now = datetime.now(timezone.utc)
        appointment = create({
            "resourceType": "Appointment", "status": "booked",
            "start": _instant(now - timedelta(minutes=1)), "end": _instant(now + timedelta(minutes=29)),
            "participant": [{"actor": {"reference": f"Patient/{alice}"}, "status": "accepted"},
                            {"actor": {"reference": f"Practitioner/{doctor}"}, "status": "accepted"}],
        })
        yield Site(server.base, appointment, alice, doctor, server.svc, server.log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium(MEDIA_ARGS) as b:
        yield b


class Person:
    """One browser context signed in as one person, with the page's JavaScript errors kept."""

    def __init__(self, browser, site: Site, username: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB",
                                           timezone_id="Europe/Paris")
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(f"{site.base}/login")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(PASSWORD)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(f"{site.base}/portal")

    def state(self) -> dict:
        return self.page.evaluate("window.teleledgerVisit.state()")

    def frames_decoded(self) -> int:
        return self.page.evaluate("""async () => {
            const pc = window.teleledgerVisit.pc;
            if (!pc) return 0;
            let frames = 0;
            (await pc.getStats()).forEach(r => {
                if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
            });
            return frames;
        }""")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"JavaScript errors on the page: {self.errors}"


def _poll(what: str, check, timeout_ms: int = CONNECT_MS, people: tuple[Person, ...] = ()):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            states = [p.state() for p in people]
            raise AssertionError(f"timed out waiting for {what}; room states: {states}")
        time.sleep(0.25)


def test_patient_waits_practitioner_admits_video_flows_both_ways_chat_both_ways_and_the_visit_ends(browser, site):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    patient = Person(browser, site, "alice")
    doctor = Person(browser, site, "drsmith")
    try:
        # the patient waits
        patient.page.goto(site.room())
        expect(patient.page.get_by_role("heading", name="You are in the waiting room")).to_be_visible()
        expect(patient.page.locator("#counterpart")).to_have_text("Dr Jo Smith")
        expect(patient.page.locator("#room-status")).to_contain_text("Waiting for the visit to start")
        expect(patient.page.locator("#call")).to_be_hidden()
        expect(patient.page.locator("#chat-form")).to_be_hidden()
        expect(patient.page.locator("#chat-closed")).to_have_text("Chat and files open when the visit starts.")
        patient.page.screenshot(path=str(ARTIFACTS / "visit-waiting-room-patient.png"), full_page=True)

        # the practitioner sees her waiting and admits her
        doctor.page.goto(site.room())
        admit = doctor.page.get_by_role("button", name="Admit Alice Liddell")
        expect(doctor.page.locator("#waiting-text")).to_have_text("Alice Liddell is waiting.")
        expect(admit).to_be_enabled()
        expect(doctor.page.get_by_role("heading", name="Prescribe")).to_be_visible()
        expect(doctor.page.get_by_role("link", name="Write visit note")).to_be_hidden()
        doctor.page.screenshot(path=str(ARTIFACTS / "visit-waiting-room-practitioner.png"), full_page=True)
        admit.click()

        # both peer connections connect and decode the other side's video
        for person in (patient, doctor):
            _poll("both RTCPeerConnections to reach connected",
                  lambda p=person: p.state()["connection"] == "connected", people=(patient, doctor))
        for person in (patient, doctor):
            _poll("video frames from the other side", lambda p=person: p.frames_decoded() > 0, people=(patient, doctor))
        expect(patient.page.locator("#waiting-room")).to_be_hidden()
        expect(patient.page.locator("#call")).to_be_visible()
        encounter = doctor.state()["encounter"]
        note = doctor.page.get_by_role("link", name="Write visit note")
        expect(note).to_have_attribute("href", f"/console/encounters/{encounter}/note")

        # the connection-quality indicator says how good the call is in words
        expect(patient.page.locator("#quality-text")).to_contain_text("Connection: good", timeout=CONNECT_MS)
        assert patient.page.locator("#quality").get_attribute("data-quality") == "good"

        # camera and microphone toggles are real toggle buttons, and the other side is told
        camera = patient.page.get_by_role("button", name="Camera off")
        expect(camera).to_have_attribute("aria-pressed", "false")
        camera.click()
        expect(camera).to_have_attribute("aria-pressed", "true")
        assert patient.page.evaluate("document.getElementById('local-video').srcObject.getVideoTracks()[0].enabled") \
            is False
        expect(doctor.page.locator("#remote-media")).to_have_text("(camera off)")
        camera.click()
        expect(doctor.page.locator("#remote-media")).to_have_text("")

        # a chat message each way, through the keyboard on one side and the button on the other
        patient.page.get_by_role("textbox", name="Message").fill("Hello doctor, the rash is better")
        patient.page.get_by_role("textbox", name="Message").press("Enter")
        expect(doctor.page.locator("#chat-log li.theirs")).to_contain_text("Hello doctor, the rash is better")
        doctor.page.get_by_role("textbox", name="Message").fill("Good. Keep the cream on for a week.")
        doctor.page.get_by_role("button", name="Send").click()
        expect(patient.page.locator("#chat-log li.theirs")).to_contain_text("Keep the cream on for a week.")
        expect(patient.page.locator("#chat-log li")).to_have_count(2)
        patient.page.screenshot(path=str(ARTIFACTS / "visit-live-patient.png"), full_page=True)
        doctor.page.screenshot(path=str(ARTIFACTS / "visit-live-practitioner.png"), full_page=True)
        patient.page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
        too_wide = patient.page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 5)""")
        assert patient.page.evaluate("document.documentElement.scrollWidth") <= 391, f"wider than a phone: {too_wide}"
        patient.page.screenshot(path=str(ARTIFACTS / "visit-live-patient-phone.png"), full_page=True)
        patient.page.set_viewport_size({"width": 1280, "height": 900})

        # the patient's signaling socket drops: it reconnects by itself, the call stays up, chat works
        patient.page.evaluate("window.teleledgerVisit.ws.close(4000, 'simulated network drop')")
        expect(patient.page.locator("#room-status")).to_contain_text("Reconnecting")
        _poll("the socket to reconnect", lambda: patient.state()["signaling"] == 1, people=(patient,))
        expect(patient.page.locator("#room-status")).to_contain_text("Connected to the visit")
        assert patient.state()["connection"] == "connected"
        patient.page.get_by_role("textbox", name="Message").fill("Still here after the drop")
        patient.page.get_by_role("button", name="Send").click()
        expect(doctor.page.locator("#chat-log")).to_contain_text("Still here after the drop")
        expect(patient.page.locator("#chat-log li")).to_have_count(3)  # no duplicates after the re-sync

        # a file that claims to be a PNG but is not: a clear message, nothing shared
        patient.page.get_by_label("Share a file").set_input_files(
            {"name": "scan.png", "mimeType": "image/png", "buffer": b"<html>not a png</html>"})
        patient.page.get_by_role("button", name="Share file").click()
        expect(patient.page.locator("#chat-error")).to_contain_text("The file was not shared")
        expect(patient.page.locator("#chat-error")).to_contain_text("but its content is not")
        # one that is too large is refused before it is sent
        patient.page.get_by_label("Share a file").set_input_files(
            {"name": "big.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-" + bytes(70_000)})
        patient.page.get_by_role("button", name="Share file").click()
        expect(patient.page.locator("#chat-error")).to_contain_text("files may be at most 64 KB")
        patient.page.screenshot(path=str(ARTIFACTS / "visit-file-refused.png"), full_page=True)
        # and a real one goes through
        patient.page.get_by_label("Share a file").set_input_files(
            {"name": "readings.txt", "mimeType": "text/plain", "buffer": b"120/80 this morning"})
        patient.page.get_by_role("button", name="Share file").click()
        expect(doctor.page.get_by_role("link", name="readings.txt")).to_be_visible()

        # the practitioner ends the visit (after confirming); both see it end
        expect(doctor.page.locator("#end-confirm")).to_be_hidden()
        doctor.page.get_by_role("button", name="End visit").click()
        expect(doctor.page.get_by_role("button", name="Keep going")).to_be_focused()
        doctor.page.get_by_role("button", name="End now").click()
        for person in (doctor, patient):
            expect(person.page.get_by_role("heading", name="The visit has ended")).to_be_visible()
            expect(person.page.locator("#call")).to_be_hidden()
        expect(patient.page.locator("#ended-text")).to_contain_text("It lasted")
        doctor.page.screenshot(path=str(ARTIFACTS / "visit-ended-practitioner.png"), full_page=True)

        enc = httpx.get(f"{site.base}/fhir/Encounter/{encounter}", headers=site.service, timeout=10).json()
        assert enc["status"] == "finished" and enc["class"]["code"] == "VR"
        assert enc["length"]["unit"] == "min" and enc["length"]["value"] > 0
        appt = httpx.get(f"{site.base}/fhir/Appointment/{site.appointment}", headers=site.service, timeout=10).json()
        assert appt["status"] == "fulfilled"
        comms = httpx.get(f"{site.base}/fhir/Communication", params={"encounter": f"Encounter/{encounter}"},
                          headers=site.service, timeout=10).json()
        assert comms["total"] == 4  # three messages and one file; the refused files left nothing
    finally:
        patient.close()
        doctor.close()


def test_another_patient_gets_a_clear_refusal_page_and_cannot_open_the_socket(browser, site):
    from playwright.sync_api import expect

    bob = Person(browser, site, "bob")
    try:
        response = bob.page.goto(site.room())
        assert response is not None and response.status == 403
        expect(bob.page.get_by_role("heading", level=1)).to_have_text("You cannot open this page")
        expect(bob.page.get_by_role("alert")).to_contain_text("denied")
        closed = bob.page.evaluate("""(url) => new Promise(resolve => {
            const ws = new WebSocket(url);
            ws.onclose = (ev) => resolve({code: ev.code, reason: ev.reason});
        })""", site.room().replace("http", "ws").replace("/room", "/ws"))
        assert closed["code"] == 4403, closed
        bob.page.screenshot(path=str(ARTIFACTS / "visit-refused-stranger.png"), full_page=True)
    finally:
        bob.close()
