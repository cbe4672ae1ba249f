"""The admin chain explorer in a real browser against a real server process with the embedded chain.

``teleledger serve`` starts on an empty node: the embedded chain is created, the contracts are
deployed and the node's organization registered (transactions the explorer decodes). A service
writes a record, so the log grows, and the anchorer (every second here) anchors its checkpoint.
Chromium signs in as an admin, follows the "Chain explorer" link and finds the anchor
transaction decoded (``AnchorRegistry.anchor`` with its ``CheckpointAnchored`` event) and the
anchor matched with the log's own checkpoint; a researcher gets the 403 page and no link.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, browser_or_skip, chromium, open_page, serve, sign_in, wait_for


@dataclass
class Site:
    base: str
    log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    with serve(tmp_path_factory.mktemp("e2e-explorer"), TELELEDGER_CHAIN_ENABLED="true",
               TELELEDGER_ANCHOR_INTERVAL_SECONDS="1") as server:
        server.cli("users", "create", "--role", "admin", "--username", "ops", "--password", PASSWORD)
        server.cli("users", "create", "--role", "researcher", "--username", "rita", "--password", PASSWORD)
        server.create({"resourceType": "Organization", "name": "Acme Clinic"})
        yield Site(server.base, server.log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    with open_page(browser) as p:
        yield p


def test_an_admin_sees_the_anchor_transaction_decoded_and_matched_with_the_logs_checkpoint(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "ops")
    page.get_by_role("link", name="Chain explorer").click()
    page.wait_for_url(f"{site.base}/admin/chain")
    expect(page.get_by_role("heading", level=1)).to_have_text("Chain explorer")

    anchors = page.locator('tr.anchor-row[data-verdict="match"]')
    # the anchorer runs every second and the indexer follows: reload until the anchor is shown
    wait_for("an anchored checkpoint on the explorer page",
              lambda: page.reload() and anchors.count() > 0, 30, site.log)

    blocks = page.get_by_role("table", name="The latest")
    expect(blocks.locator("tbody tr.block-row").first).to_be_visible()
    assert blocks.locator("tbody tr.block-row").count() >= 2
    anchor_tx = page.locator("tr.tx-row").filter(has=page.locator(".call-name", has_text="AnchorRegistry.anchor"))
    expect(anchor_tx.first).to_be_visible()
    expect(anchor_tx.first.locator(".event-name")).to_have_text("CheckpointAnchored")
    expect(anchor_tx.first.locator("dl.args").first).to_contain_text("tree_size")
    expect(anchor_tx.first).to_contain_text("success")
    # the organization's registration at start-up, decoded too
    expect(page.locator(".call-name", has_text="ParticipantRegistry.set_member_roles").first).to_be_visible()
    expect(anchors.first.locator("pre.note")).to_contain_text("teleledger.localhost")
    expect(page.locator('#outbox-counts dd[data-status="done"]')).not_to_have_text("0")
    expect(page.locator('tr.outbox-row[data-status="done"]').first).to_contain_text("AnchorRegistry.anchor")
    for table_id in ("blocks", "transactions", "anchors", "outbox"):
        assert page.locator(f"#{table_id} caption").count() == 1, table_id
    page.screenshot(path=str(ARTIFACTS / "chain-explorer.png"), full_page=True)


def test_a_researcher_gets_the_403_page_and_no_explorer_link(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "rita")
    expect(page.get_by_role("link", name="Chain explorer")).to_have_count(0)
    response = page.goto(f"{site.base}/admin/chain")
    assert response is not None and response.status == 403
    expect(page.get_by_role("alert")).to_contain_text("Only administrators may open the node's admin pages.")
    page.screenshot(path=str(ARTIFACTS / "chain-explorer-forbidden.png"), full_page=True)


def test_a_signed_out_visitor_is_sent_to_sign_in(page, site):
    page.goto(f"{site.base}/admin/chain")
    assert page.url == f"{site.base}/login?next=/admin/chain"
