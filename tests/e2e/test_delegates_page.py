"""People who can act for me, in a real browser against a real server process and its embedded
chain: Alice adds her mother (a RelatedPerson with an account) on her consent page; once the
chain has recorded it, her mother signs in, finds Alice among the people she acts for, opens
Alice's consent page and gives Dr Rivers access to Alice's results; Alice removes her mother and
the page is closed to her.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, browser_or_skip, chromium, open_page, serve, sign_in

CHAIN_WAIT = 30.0  # seconds the outbox, the embedded chain and the indexer get to record a signature


@dataclass
class Site:
    base: str
    alice: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-delegates")) as server:
        alice = server.create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                               "gender": "female", "birthDate": "2010-05-04"})
        mum = server.create({"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{alice}"},
                             "name": [{"family": "Liddell", "given": ["Lorina"]}]})
        rita = server.create({"resourceType": "Practitioner", "name": [{"family": "Rivers", "given": ["Rita"]}]})
        for role, username, *links in (("patient", "alice", "--patient", f"Patient/{alice}"),
                                       ("patient", "lorina", "--related-person", f"RelatedPerson/{mum}"),
                                       ("practitioner", "rita", "--practitioner", f"Practitioner/{rita}")):
            server.cli("users", "create", "--role", role, "--username", username, "--password", PASSWORD, *links)
        yield Site(server.base, alice)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


def reload_until(page, selector: str, text: str) -> None:  # type: ignore[no-untyped-def]
    """Reload until an element ``selector`` reads ``text`` (the chain records a signature within
    about a second)."""
    deadline = time.monotonic() + CHAIN_WAIT
    while text not in [t.strip() for t in page.locator(selector).all_inner_texts()]:
        assert time.monotonic() < deadline, f"{selector} did not read {text!r} within {CHAIN_WAIT} s"
        time.sleep(0.3)
        page.reload()


def test_a_patient_adds_a_delegate_who_then_gives_access_for_her_and_is_removed(browser, site):
    from playwright.sync_api import expect

    with open_page(browser) as alice, open_page(browser) as mum:
        sign_in(alice, site.base, "alice")
        alice.goto(f"{site.base}/portal/consents")
        section = alice.locator("#delegates")
        expect(section.get_by_role("heading", name="People who can act for me")).to_be_visible()
        expect(section).to_contain_text("Nobody acts for you.")
        alice.get_by_label("Let this person act for me").select_option(label="Lorina Liddell")
        alice.get_by_role("button", name="Sign and add").click()
        expect(alice.locator("#done")).to_contain_text("once the chain has recorded it")
        reload_until(alice, ".delegate-status", "can act for you")
        expect(alice.locator(".delegate-row")).to_contain_text("Lorina Liddell")
        alice.screenshot(path=str(ARTIFACTS / "delegates-patient.png"), full_page=True)

        sign_in(mum, site.base, "lorina")
        mum.goto(f"{site.base}/portal/consents")
        expect(mum.get_by_role("heading", name="People I act for", exact=True).first).to_be_visible()
        mum.get_by_role("link", name="Alice Liddell").click()
        expect(mum.get_by_role("heading", level=1)).to_have_text("Who can see Alice Liddell's record")
        mum.get_by_label("Share with").select_option(label="Rita Rivers (practitioner, for your care)")
        mum.get_by_label("Results and vital signs").check()
        mum.get_by_role("button", name="Sign and give permission").click()
        expect(mum.locator("#done")).to_contain_text("Access granted")
        reload_until(mum, ".grant-status", "in force")
        expect(mum.locator(".grant-row")).to_contain_text("Rita Rivers")
        mum.screenshot(path=str(ARTIFACTS / "delegates-acting.png"), full_page=True)

        alice.reload()
        expect(alice.locator(".grant-row")).to_contain_text("Rita Rivers")  # granted for her, shown to her
        alice.locator(".delegate-row").get_by_role("button", name="Remove").click()
        reload_until(alice, ".delegate-status", "removed")
        response = mum.goto(f"{site.base}/portal/consents/for/{site.alice}")
        assert response is not None and response.status == 403
