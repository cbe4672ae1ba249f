"""The patient's "who accessed my record" page in a real browser against a real server process.

A server is started with ``teleledger serve`` on an empty node; a service creates two patients
and a practitioner, reads one patient (under two purposes of use) and the other patient's
account tries to read it and is refused. Then Chromium signs in as the patient, reads the table
and presses "Verify all": verify.js checks the checkpoint's Ed25519 signature and every
inclusion proof in the browser, with no help from the page.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, WAIT_MS, browser_or_skip, chromium, serve, sign_in, wait_for

DENIED = re.compile(r"\bdenied\b")


@dataclass
class Site:
    base: str
    patient_id: str
    other_patient_id: str
    events: list[dict]  # the patient's AuditEvents, newest first, as the API returns them
    checkpoint_size: int
    log: Path


def _checkpoint_size(base: str) -> int:
    r = httpx.get(f"{base}/ledger/checkpoint", timeout=5)
    return int(r.text.split("\n")[1]) if r.status_code == 200 else -1


def _all_in_checkpoint(base: str, events: list[dict]) -> int | None:
    size = _checkpoint_size(base)
    if size <= 0:
        return None
    for ev in events:
        leaf = ev["extension"][0]["valueBase64Binary"]
        r = httpx.get(f"{base}/ledger/proof/inclusion", params={"hash": leaf, "tree_size": size}, timeout=5)
        if r.status_code != 200:
            return None
    return size


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e")) as server:
        base, svc, log, create = server.base, server.svc, server.log, server.create
        alice = create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                        "gender": "female", "birthDate": "1990-05-04"})
        bob = create({"resourceType": "Patient", "name": [{"family": "Builder", "given": ["Bob"]}],
                      "gender": "male", "birthDate": "1985-01-02"})
        doctor = create({"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"]}]})
        server.cli("users", "create", "--role", "patient", "--username", "alice", "--password", PASSWORD,
             "--patient", f"Patient/{alice}")
        server.cli("users", "create", "--role", "patient", "--username", "bob", "--password", PASSWORD,
             "--patient", f"Patient/{bob}")
        server.cli("users", "create", "--role", "practitioner", "--username", "drsmith", "--password", PASSWORD,
             "--practitioner", f"Practitioner/{doctor}")

        # the accesses alice will see: the service reads her record twice (two purposes of use),
        # bob tries to and is refused
        assert httpx.get(f"{base}/fhir/Patient/{alice}", headers=svc, timeout=10).status_code == 200
        assert httpx.get(f"{base}/fhir/Patient/{alice}", headers={**svc, "X-Purpose-Of-Use": "HPAYMT"},
                         timeout=10).status_code == 200
        bob_tok = httpx.post(f"{base}/auth/token", data={"grant_type": "password", "username": "bob",
                                                         "password": PASSWORD}, timeout=10).json()["access_token"]
        denied = httpx.get(f"{base}/fhir/Patient/{alice}", headers={"Authorization": f"Bearer {bob_tok}"}, timeout=10)
        assert denied.status_code == 403, denied.text

        alice_tok = httpx.post(f"{base}/auth/token", data={"grant_type": "password", "username": "alice",
                                                           "password": PASSWORD}, timeout=10).json()["access_token"]
        bundle = httpx.get(f"{base}/fhir/AuditEvent", params={"_count": "200"},
                           headers={"Authorization": f"Bearer {alice_tok}"}, timeout=10).json()
        events = [e["resource"] for e in bundle.get("entry", [])]
        assert len(events) >= 4, bundle  # her record's creation, two reads, one refusal
        # checkpoints are signed every second; wait until one holds every event on the page
        time.sleep(1.5)
        size = wait_for("a checkpoint holding every access", lambda: _all_in_checkpoint(base, events), 20, log)
        yield Site(base, alice, bob, events, size, log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB", timezone_id="Europe/Paris")
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield p
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def open_access_log(page, site: Site) -> None:  # type: ignore[no-untyped-def]
    sign_in(page, site.base, "alice", landing=None)
    assert page.url == f"{site.base}/portal"
    page.get_by_role("link", name="See who accessed my record").click()
    page.wait_for_url(f"{site.base}/portal/access-log")


def rows(page):  # type: ignore[no-untyped-def]
    return page.locator("tr.access-row")


def row_for(page, event: dict):  # type: ignore[no-untyped-def]
    return page.locator(f'tr.access-row[data-event-id="{event["id"]}"]')


def press_verify_all_with_the_keyboard(page) -> None:  # type: ignore[no-untyped-def]
    page.locator("body").focus()
    for _ in range(40):  # bounded: the button is within the first few tab stops after the table
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "verify-all":
            break
    else:
        raise AssertionError("the Verify all button cannot be reached with the Tab key")
    page.keyboard.press("Enter")


def test_patient_sees_every_access_to_her_record_and_verifies_each_against_the_signed_checkpoint(page, site):
    from playwright.sync_api import expect

    open_access_log(page, site)
    n = len(site.events)
    expect(rows(page)).to_have_count(n)
    assert page.locator("tr.access-row").evaluate_all("rs => rs.every(r => r.dataset.leafHash.length === 44)")

    reads = [e for e in site.events if e["subtype"][0]["code"] == "read" and e["outcome"] == "0"]
    payment = next(e for e in reads if e["purposeOfEvent"][0]["coding"][0]["code"] == "HPAYMT")
    treat = next(e for e in reads if e["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT")
    refused = next(e for e in site.events if e["outcome"] == "4")
    for event, purpose, label in ((payment, "HPAYMT", "payment"), (treat, "TREAT", "treatment")):
        row = row_for(page, event)
        expect(row.locator("td.who .who-name")).to_have_text("service svc")
        expect(row.locator("td.who .role")).to_have_text("service")
        expect(row.locator("td.organization")).to_have_text("—")
        expect(row.locator("td.action")).to_contain_text("read")
        expect(row.locator("td.purpose")).to_contain_text(purpose)
        expect(row.locator("td.purpose")).to_contain_text(label)
        expect(row.locator("td.outcome")).to_contain_text("allowed")
        expect(row).not_to_have_class(DENIED)
    row = row_for(page, refused)
    expect(row).to_have_class(DENIED)
    expect(row.locator("td.who .who-name")).to_have_text(f"Patient/{site.other_patient_id}")
    expect(row.locator("td.who .role")).to_have_text("patient")
    expect(row.locator("td.outcome")).to_contain_text("denied")
    # the time is shown in the browser's time zone, the UTC instant stays in the markup
    when = row.locator("time")
    assert when.get_attribute("datetime") == refused["recorded"]
    assert "UTC" not in when.inner_text() and "UTC" in (when.get_attribute("title") or "")

    press_verify_all_with_the_keyboard(page)
    summary = page.locator("#verify-summary")
    expect(summary).to_contain_text(f"{n} of {n} accesses verified against checkpoint size", timeout=WAIT_MS)
    expect(page.locator('tr.access-row[data-proof="verified"]')).to_have_count(n)
    expect(row.locator("td.proof")).to_contain_text("✓ verified")
    expect(page.locator("#signature-text")).to_contain_text("signature verified")  # Chromium has Ed25519
    expect(page.locator("#log-key")).to_contain_text(httpx.get(f"{site.base}/ledger/public-key").text.strip())
    assert summary.get_attribute("aria-live") == "polite"
    page.screenshot(path=str(ARTIFACTS / "access-log-verified.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: rows become cards, nothing overflows
    too_wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
        .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 5)""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 391, f"wider than a phone: {too_wide}"
    page.screenshot(path=str(ARTIFACTS / "access-log-phone.png"), full_page=True)


def test_a_tampered_audit_path_fails_that_row_and_a_missing_proof_reads_as_pending(page, site):
    from playwright.sync_api import expect

    refused = next(e for e in site.events if e["outcome"] == "4")
    newest = site.events[0] if site.events[0] is not refused else site.events[1]
    tampered_leaf = refused["extension"][0]["valueBase64Binary"]
    missing_leaf = newest["extension"][0]["valueBase64Binary"]

    def meddle(route, request) -> None:  # type: ignore[no-untyped-def]
        from urllib.parse import parse_qs, urlparse

        leaf = parse_qs(urlparse(request.url).query)["hash"][0]
        if leaf == missing_leaf:  # as if the entry were newer than the checkpoint
            route.fulfill(status=404, content_type="application/fhir+json",
                          body='{"resourceType":"OperationOutcome","issue":[]}')
            return
        response = route.fetch()
        proof = response.json()
        if leaf == tampered_leaf:
            first = bytearray(base64.b64decode(proof["audit_path"][0]))
            first[0] ^= 0x01
            proof["audit_path"][0] = base64.b64encode(bytes(first)).decode()
        route.fulfill(response=response, json=proof)

    open_access_log(page, site)
    page.route("**/ledger/proof/inclusion*", meddle)
    n = len(site.events)
    page.get_by_role("button", name="Verify all").click()
    summary = page.locator("#verify-summary")
    expect(summary).to_contain_text(f"{n - 2} of {n} accesses verified", timeout=WAIT_MS)
    expect(summary).to_contain_text("1 failed")
    expect(summary).to_contain_text("1 pending")
    bad = row_for(page, refused).locator("td.proof")
    expect(bad).to_have_attribute("data-state", "failed")
    expect(bad).to_contain_text("✗ failed")
    expect(bad).to_contain_text("root mismatch")
    pending = row_for(page, newest).locator("td.proof")
    expect(pending).to_have_attribute("data-state", "pending")
    expect(pending).to_contain_text("pending — will be in the next checkpoint (≤ 1 s)")
    page.screenshot(path=str(ARTIFACTS / "access-log-tampered-proof.png"), full_page=True)

    # the log itself was never wrong: without the meddling, pressing again verifies everything
    page.unroute("**/ledger/proof/inclusion*")
    page.get_by_role("button", name="Verify all").click()
    expect(summary).to_contain_text(f"{n} of {n} accesses verified", timeout=WAIT_MS)


def test_a_wrong_password_shows_an_error_and_sets_no_cookie(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "alice", "not-the-password", landing=None)
    assert page.url.startswith(f"{site.base}/login")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("do not match an account")
    expect(page.get_by_label("Password")).to_be_focused()
    assert page.context.cookies() == []
    page.screenshot(path=str(ARTIFACTS / "login-wrong-password.png"), full_page=True)
    # an unknown user reads exactly the same
    sign_in(page, site.base, "nobody-here", "not-the-password", landing=None)
    expect(page.get_by_role("alert")).to_have_text(alert.inner_text())


def test_signing_in_sets_a_strict_http_only_cookie_and_signing_out_clears_it(page, site):
    sign_in(page, site.base, "alice", landing=None)
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == ("tl_session", True,
                                                                                      "Strict", "/")
    assert page.evaluate("document.cookie") == ""  # no script can read the token
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{site.base}/")
    assert page.context.cookies() == []


def test_the_access_log_sends_a_signed_out_or_tampered_session_to_the_sign_in_page(page, site):
    page.goto(f"{site.base}/portal/access-log")
    assert page.url == f"{site.base}/login?next=/portal/access-log"
    page.context.add_cookies([{"name": "tl_session", "value": "eyJhbGciOiJFZERTQSJ9.e30.AAAA",
                               "url": site.base}])
    page.goto(f"{site.base}/portal/access-log")
    assert page.url.startswith(f"{site.base}/login")
    # signing in from there comes back to the access log
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{site.base}/portal/access-log")


def test_a_practitioner_gets_a_clear_403_page_for_the_access_log(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "drsmith", landing=None)
    assert page.url == f"{site.base}/portal"
    expect(page.get_by_role("link", name="Who accessed my record")).to_have_count(0)
    response = page.goto(f"{site.base}/portal/access-log")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("You cannot open this page")
    expect(page.get_by_role("alert")).to_contain_text("signed in as a practitioner")
    expect(page.locator("tr.access-row")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "access-log-forbidden.png"), full_page=True)
