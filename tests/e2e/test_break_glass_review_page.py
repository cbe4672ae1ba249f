"""Break-glass in a real browser against a real server process: the privacy officer's review page
and the patient's notification.

Two clinics, each with a practitioner and a privacy officer (an admin linked to the clinic). Both
practitioners claim emergency access to Alice's record through the API. Chromium signs in as the
first clinic's officer, follows the "Break-glass review" link and finds exactly their clinic's
claim, highlighted as active, with its written reason; the other clinic's officer finds only
theirs; the practitioner gets the 403 page. Alice sees a banner on her portal home naming both
practitioners, marks it as seen, and it is gone.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, browser_or_skip, chromium, open_page, serve, sign_in

REASON = "found unresponsive, needs her medication list"
OTHER_REASON = "ambulance handover, allergies unknown"


@dataclass
class Site:
    base: str
    claim: str  # the first clinic's claim
    other_claim: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-break-glass"), TELELEDGER_CHAIN_ENABLED="false") as server:
        prov = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}]
        clinic = server.create({"resourceType": "Organization", "name": "Riverside Clinic", "type": prov})
        clinic2 = server.create({"resourceType": "Organization", "name": "Hilltop Hospital", "type": prov})
        alice = server.create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                               "gender": "female", "birthDate": "1990-05-04"})
        rita = server.create({"resourceType": "Practitioner", "name": [{"family": "Rivers", "given": ["Rita"]}]})
        sam = server.create({"resourceType": "Practitioner", "name": [{"family": "Hill", "given": ["Sam"]}]})
        users = (("patient", "alice", "--patient", f"Patient/{alice}"),
                 ("practitioner", "rita", "--practitioner", f"Practitioner/{rita}", "--organization",
                  f"Organization/{clinic}"),
                 ("practitioner", "sam", "--practitioner", f"Practitioner/{sam}", "--organization",
                  f"Organization/{clinic2}"),
                 ("admin", "officer", "--organization", f"Organization/{clinic}"),
                 ("admin", "officer2", "--organization", f"Organization/{clinic2}"))
        for role, username, *links in users:
            server.cli("users", "create", "--role", role, "--username", username, "--password", PASSWORD, *links)
        claims = []
        for username, reason in (("rita", REASON), ("sam", OTHER_REASON)):
            r = httpx.post(f"{server.base}/api/break-glass", json={"patient": f"Patient/{alice}", "reason": reason},
                           headers=server.token(username), timeout=30)
            assert r.status_code == 201, r.text
            claims.append(r.json()["claim_id"])
        yield Site(server.base, claims[0], claims[1])


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    with open_page(browser) as p:
        yield p


def test_the_privacy_officer_finds_their_clinics_claim_highlighted_with_its_reason(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "officer")
    page.get_by_role("link", name="Break-glass review").click()
    page.wait_for_url(f"{site.base}/console/break-glass")
    expect(page.get_by_role("heading", level=1)).to_have_text("Break-glass review")
    table = page.get_by_role("table", name="Break-glass claims by members of your organization")
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row).to_have_attribute("data-claim-id", site.claim)
    expect(row).to_have_class("claim-row claim-active")
    expect(row).to_contain_text("Rita Rivers")
    expect(row.locator("td.claim-reason")).to_have_text(REASON)
    expect(row.get_by_text("active", exact=True)).to_be_visible()
    # highlighted: the active row's cells are not the plain table background
    highlighted = row.locator("td").first.evaluate("td => getComputedStyle(td).backgroundColor")
    plain = table.locator("thead th").first.evaluate("th => getComputedStyle(th).backgroundColor")
    assert highlighted not in ("rgba(0, 0, 0, 0)", plain), highlighted
    expect(page.get_by_text(OTHER_REASON)).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "break-glass-review.png"), full_page=True)


def test_another_clinics_officer_sees_only_their_own_clinics_claim(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "officer2")
    page.goto(f"{site.base}/console/break-glass")
    rows = page.locator("#claims tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-claim-id", site.other_claim)
    expect(page.get_by_text(REASON)).to_have_count(0)


def test_a_practitioner_gets_the_403_page_and_no_review_link(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "rita")
    expect(page.get_by_role("link", name="Break-glass review")).to_have_count(0)
    response = page.goto(f"{site.base}/console/break-glass")
    assert response is not None and response.status == 403
    expect(page.get_by_role("alert")).to_contain_text("privacy officer")
    expect(page.get_by_text(REASON)).to_have_count(0)


def test_the_patient_sees_a_banner_for_the_claims_until_she_marks_it_as_seen(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "alice")
    banner = page.locator("#break-glass-banner")
    expect(banner).to_be_visible()
    expect(banner.locator("li.btg-banner-item")).to_have_count(2)
    expect(banner).to_contain_text("Rita Rivers claimed emergency (break-glass) access")
    expect(banner).to_contain_text("Sam Hill claimed emergency (break-glass) access")
    page.screenshot(path=str(ARTIFACTS / "break-glass-banner.png"), full_page=True)
    banner.get_by_role("button", name="Mark as seen").click()
    page.wait_for_url(f"{site.base}/portal")
    expect(page.locator("#break-glass-banner")).to_have_count(0)
    # still listed where all claims are
    page.goto(f"{site.base}/portal/consents")
    expect(page.locator("li.btg-notice")).to_have_count(2)
