"""Signed visit notes and secure messages in a real browser against a real server process.

A server is started with ``teleledger serve`` on an empty node; a service creates a patient, two
practitioners and an in-progress video Encounter of the patient with Dr Smith; the accounts are
made with ``teleledger users create`` (each gets its signing key). Chromium then:

* as Dr Smith writes the SOAP note, saves the draft and signs it; as the patient, finds it
  under "My notes" with "Signature verified — signed by Dr Jo Smith (address …)";
* as Dr Jones (another practitioner) is refused signing with a clear message;
* as the patient writes to Dr Smith with a file, and is refused a file of a forbidden type and
  one over the size limit with the text kept; as Dr Smith sees the unread badge, opens the
  thread (the badge goes) and replies; the patient then sees the reply.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, WAIT_MS, browser_or_skip, chromium, serve, sign_in

SUBJECTIVE = "Headache for three days, worse in the evening."
PLAN = "Rest, fluids, paracetamol as needed. Message me if it gets worse."


@dataclass
class Site:
    base: str
    patient_id: str
    encounter_id: str
    service: dict
    log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-notes")) as server:
        create = server.create
        alice = create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                        "gender": "female", "birthDate": "1990-05-04"})
        smith = create({"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"], "prefix": ["Dr"]}]})
        jones = create({"resourceType": "Practitioner", "name": [{"family": "Jones", "given": ["Lee"], "prefix": ["Dr"]}]})
        encounter = create({
            "resourceType": "Encounter", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR", "display": "virtual"},
            "subject": {"reference": f"Patient/{alice}"},
            "participant": [{"individual": {"reference": f"Practitioner/{smith}"}}],
            "period": {"start": "2024-06-01T10:00:00Z"},
        })
        # Dr Jones cares for Alice too (an earlier visit), but is not the practitioner of this one
        create({"resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": f"Patient/{alice}"},
                "participant": [{"individual": {"reference": f"Practitioner/{jones}"}}]})
        server.cli("users", "create", "--role", "patient", "--username", "alice", "--password", PASSWORD,
                   "--patient", f"Patient/{alice}")
        server.cli("users", "create", "--role", "practitioner", "--username", "drsmith", "--password", PASSWORD,
                   "--practitioner", f"Practitioner/{smith}")
        server.cli("users", "create", "--role", "practitioner", "--username", "drjones", "--password", PASSWORD,
                   "--practitioner", f"Practitioner/{jones}")
        yield Site(server.base, alice, encounter, server.svc, server.log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


@pytest.fixture
def new_page(browser):  # type: ignore[no-untyped-def]
    """Pages in separate browser contexts (separate sessions), checked for script errors."""
    ARTIFACTS.mkdir(exist_ok=True)
    contexts, errors = [], []

    def make(width: int = 1280, height: int = 900):  # type: ignore[no-untyped-def]
        context = browser.new_context(viewport={"width": width, "height": height}, locale="en-GB")
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        contexts.append(context)
        p = context.new_page()
        p.on("pageerror", lambda exc: errors.append(str(exc)))
        return p

    try:
        yield make
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        for context in contexts:
            context.close()


def no_horizontal_overflow(page) -> None:  # type: ignore[no-untyped-def]
    width = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width + 1, "the page is wider than the screen"


def test_the_practitioner_signs_a_note_and_the_patient_sees_it_verified(new_page, site):
    from playwright.sync_api import expect

    doc = new_page()
    sign_in(doc, site.base, "drsmith")
    note_url = f"{site.base}/console/encounters/{site.encounter_id}/note"
    doc.goto(note_url)
    expect(doc.get_by_role("heading", level=1)).to_have_text("Visit note")
    expect(doc.locator(".sub")).to_contain_text("Alice Liddell")
    doc.get_by_label("Subjective").fill(SUBJECTIVE)
    doc.get_by_label("Assessment").fill("Tension-type headache.")
    doc.get_by_label("Plan").fill(PLAN)
    doc.get_by_role("button", name="Save draft").click()
    expect(doc.get_by_role("status")).to_contain_text("Draft saved")
    expect(doc.get_by_label("Plan")).to_have_value(PLAN)  # the draft comes back into the form

    # the patient sees nothing before signing
    patient = new_page()
    sign_in(patient, site.base, "alice")
    patient.get_by_role("navigation", name="Main").get_by_role("link", name="My notes").click()
    expect(patient.locator("#no-notes")).to_be_visible()

    doc.get_by_label("Heart rate (/min)").fill("72")
    doc.get_by_label("Systolic").fill("128")
    doc.get_by_label("Diastolic").fill("82")
    doc.get_by_role("button", name="Record vital signs").click()
    expect(doc.get_by_role("status")).to_contain_text("Vital signs recorded")
    expect(doc.locator("#vitals")).to_contain_text("128/82 mm[Hg]")

    doc.get_by_role("button", name="Sign note").click()
    expect(doc.get_by_role("status")).to_contain_text("Note signed")
    expect(doc.locator("#versions")).to_contain_text("Version 1")
    doc.screenshot(path=str(ARTIFACTS / "note-signed-practitioner.png"), full_page=True)

    patient.reload()
    note = patient.locator("article.note")
    expect(note).to_have_count(1)
    signature = note.locator(".signature")
    expect(signature).to_have_attribute("data-state", "verified")
    expect(signature).to_contain_text("Signature verified — signed by Dr Jo Smith (address 0x")
    expect(note).to_contain_text(SUBJECTIVE)
    expect(note).to_contain_text(PLAN)
    # the address shown is the one the verification endpoint recovers from the signature
    cid = note.get_attribute("data-composition")
    tok = httpx.post(f"{site.base}/auth/token", data={"grant_type": "password", "username": "alice",
                                                      "password": PASSWORD}, timeout=10).json()["access_token"]
    checked = httpx.get(f"{site.base}/api/compositions/{cid}/verify",
                        headers={"Authorization": f"Bearer {tok}"}, timeout=10).json()
    assert checked["verified"] is True
    expect(signature).to_contain_text(checked["address"])
    patient.screenshot(path=str(ARTIFACTS / "note-verified-patient.png"), full_page=True)

    patient.set_viewport_size({"width": 390, "height": 844})  # a phone
    no_horizontal_overflow(patient)
    patient.screenshot(path=str(ARTIFACTS / "note-verified-phone.png"), full_page=True)


def test_another_practitioner_is_refused_signing_with_a_clear_message(new_page, site):
    from playwright.sync_api import expect

    jones = new_page()
    sign_in(jones, site.base, "drjones")
    response = jones.goto(f"{site.base}/console/encounters/{site.encounter_id}/note")
    assert response is not None and response.status == 403
    expect(jones.get_by_role("alert")).to_contain_text("Only the practitioner of this encounter may write or sign its note")
    jones.screenshot(path=str(ARTIFACTS / "note-refused-other-practitioner.png"), full_page=True)


def test_the_patient_messages_the_practitioner_who_sees_the_badge_and_replies(new_page, site):
    from playwright.sync_api import expect

    patient = new_page()
    sign_in(patient, site.base, "alice")
    patient.get_by_role("navigation", name="Main").get_by_role("link", name="Messages").click()
    patient.wait_for_url(f"{site.base}/portal/messages")
    expect(patient.get_by_label("Dr Jo Smith")).to_be_checked()
    patient.get_by_label("Subject").fill("Headache is back")
    patient.get_by_label("Message", exact=True).fill("It came back this morning. My readings are attached.")

    # a forbidden type, then a file over the limit: clear messages, the text stays in the form
    patient.get_by_label("Attach a file").set_input_files(
        {"name": "page.html", "mimeType": "text/html", "buffer": b"<html><script>alert(1)</script></html>"})
    patient.get_by_role("button", name="Send message").click()
    expect(patient.get_by_role("alert")).to_contain_text("files of type text/html cannot be attached")
    expect(patient.get_by_label("Message", exact=True)).to_have_value("It came back this morning. My readings are attached.")
    patient.screenshot(path=str(ARTIFACTS / "message-forbidden-type.png"), full_page=True)
    patient.get_by_label("Attach a file").set_input_files(
        {"name": "scan.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.7\n" + b" " * (4 * 1024 * 1024)})
    patient.get_by_role("button", name="Send message").click()
    expect(patient.get_by_role("alert")).to_contain_text("files may be at most 4.0 MB")
    expect(patient.get_by_label("Subject")).to_have_value("Headache is back")

    patient.get_by_label("Attach a file").set_input_files(
        {"name": "readings.txt", "mimeType": "text/plain", "buffer": b"BP 131/85, pulse 76\n"})
    patient.get_by_role("button", name="Send message").click()
    expect(patient.get_by_role("status")).to_contain_text("Message sent")
    expect(patient.locator("#messages")).to_contain_text("It came back this morning.")
    expect(patient.locator("#messages .attachment")).to_contain_text("readings.txt")

    doc = new_page()
    sign_in(doc, site.base, "drsmith")
    badge = doc.locator("#nav-unread")
    expect(badge).to_have_text("1 unread")
    expect(doc.locator("#notifications")).to_contain_text("1 unread message")
    doc.screenshot(path=str(ARTIFACTS / "message-unread-badge.png"), full_page=True)
    doc.locator("#nav-messages").click()
    row = doc.locator(".thread-row", has_text="Headache is back")
    expect(row.locator(".badge-unread")).to_have_text("1 unread")
    row.get_by_role("link", name="Headache is back").click()
    expect(doc.get_by_role("heading", level=1)).to_have_text("Headache is back")
    expect(doc.locator("#messages")).to_contain_text("It came back this morning.")
    expect(doc.locator("#nav-unread")).to_have_count(0)  # read now
    with doc.expect_download() as download:
        doc.get_by_role("link", name="readings.txt").click()
    assert Path(download.value.path()).read_bytes() == b"BP 131/85, pulse 76\n"
    doc.get_by_label("Message", exact=True).fill("Please book a visit for tomorrow morning.")
    doc.get_by_role("button", name="Send reply").click()
    expect(doc.get_by_role("status")).to_contain_text("Message sent")
    doc.screenshot(path=str(ARTIFACTS / "message-thread-practitioner.png"), full_page=True)

    patient.goto(f"{site.base}/portal")
    expect(patient.locator("#nav-unread")).to_have_text("1 unread")
    patient.locator("#nav-messages").click()
    patient.get_by_role("link", name="Headache is back").click()
    expect(patient.locator("#messages")).to_contain_text("Please book a visit for tomorrow morning.")
    patient.set_viewport_size({"width": 390, "height": 844})
    no_horizontal_overflow(patient)
    patient.screenshot(path=str(ARTIFACTS / "message-thread-phone.png"), full_page=True)
