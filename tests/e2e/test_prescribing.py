"""E-prescribing in a real browser against a real ``teleledger serve`` (embedded chain).

The doctor prescribes from the visit's encounter and sees the code and its QR image; the patient
finds it in "My prescriptions"; the pharmacist pastes the code, sees the verification (signature,
registration, chain status) and dispenses, and the history then shows the dispense.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, WAIT_MS, browser_or_skip, chromium, serve


@dataclass
class Site:
    base: str
    encounter_id: str
    log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-rx")) as server:
        alice = server.create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                               "gender": "female", "birthDate": "1990-05-04"})
        doctor = server.create({"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"]}]})
        encounter = server.create({
            "resourceType": "Encounter", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
            "subject": {"reference": f"Patient/{alice}"},
            "participant": [{"individual": {"reference": f"Practitioner/{doctor}"}}],
            "period": {"start": "2024-06-01T10:00:00Z"}})
        server.cli("users", "create", "--role", "patient", "--username", "alice", "--password", PASSWORD,
                   "--patient", f"Patient/{alice}")
        server.cli("users", "create", "--role", "practitioner", "--username", "drsmith", "--password", PASSWORD,
                   "--practitioner", f"Practitioner/{doctor}")
        server.cli("users", "create", "--role", "pharmacist", "--username", "pharma", "--password", PASSWORD)
        yield Site(server.base, encounter, server.log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


def _page_as(browser, site: Site, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="en-GB")
    context.set_default_timeout(WAIT_MS * 2)
    page = context.new_page()
    page.goto(f"{site.base}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return context, page


def test_a_doctor_prescribes_the_patient_sees_the_code_and_a_pharmacist_verifies_and_dispenses_it(browser, site):
    ARTIFACTS.mkdir(exist_ok=True)
    ctx, doc = _page_as(browser, site, "drsmith")
    try:
        doc.goto(f"{site.base}/console/prescriptions/new?encounter={site.encounter_id}")
        doc.get_by_label("Medication (RxNorm)").select_option("197361")
        doc.get_by_label("Dosage instructions").fill("1 tablet by mouth once daily")
        doc.get_by_label("Quantity per fill").fill("30")
        doc.get_by_label("Refills").fill("1")
        doc.get_by_role("button", name="Sign & issue").click()
        doc.wait_for_selector("#issued")
        token = doc.locator("#rx-token").input_value()
        assert token.startswith("TLRX1.")
        assert doc.locator("#rx-qr svg").count() == 1
        doc.screenshot(path=str(ARTIFACTS / "rx-1-doctor-issued.png"), full_page=True)
    finally:
        ctx.close()

    ctx, patient = _page_as(browser, site, "alice")
    try:
        patient.goto(f"{site.base}/portal/prescriptions")
        assert "Amlodipine" in patient.locator(".rx-item h2").first.inner_text()
        assert patient.locator(".rx-token").first.input_value() == token
        assert patient.locator(".rx-qr svg").count() == 1
        assert "60" in patient.locator(".rx-remaining").first.inner_text()
        patient.screenshot(path=str(ARTIFACTS / "rx-2-patient-portal.png"), full_page=True)
    finally:
        ctx.close()

    ctx, pharmacist = _page_as(browser, site, "pharma")
    try:
        pharmacist.goto(f"{site.base}/pharmacy")
        pharmacist.get_by_label("Paste or scan the patient's prescription code").fill(token)
        pharmacist.get_by_role("button", name="Verify").click()
        pharmacist.wait_for_selector("#verification")
        assert pharmacist.locator("#rx-signature").inner_text().startswith("valid")
        assert pharmacist.locator("#rx-state").inner_text() == "active"
        assert "registered practitioner" in pharmacist.locator("#rx-registered").inner_text()
        pharmacist.screenshot(path=str(ARTIFACTS / "rx-3-pharmacy-verified.png"), full_page=True)
        pharmacist.get_by_label("Quantity to dispense").fill("30")
        pharmacist.get_by_role("button", name="Dispense").click()
        pharmacist.wait_for_selector("#rx-done")
        assert pharmacist.locator("#rx-history tbody tr").count() == 1
        assert "30 units" in pharmacist.locator("#rx-remaining").inner_text()
        pharmacist.screenshot(path=str(ARTIFACTS / "rx-4-pharmacy-dispensed.png"), full_page=True)

        # a second try at more than the fill holds is refused with the chain's reason
        pharmacist.get_by_label("Quantity to dispense").fill("31")
        pharmacist.get_by_role("button", name="Dispense").click()
        pharmacist.wait_for_selector("#rx-error")
        assert "exceeds what remains" in pharmacist.locator("#rx-error").inner_text()
    finally:
        ctx.close()
