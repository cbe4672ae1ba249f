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

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_access_log_page import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    WAIT_MS,
    _browser_or_skip,
    _cli,
    _free_port,
    _wait_for,
)

TELELEDGER = [sys.executable, "-m", "teleledger.cli"]
SECRET = "service-secret-0123456789"
PASSWORD = "correct-horse-battery"


@dataclass
class Site:
    base: str
    log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _browser_or_skip()
    tmp = tmp_path_factory.mktemp("e2e-explorer")
    env = {**os.environ, "TELELEDGER_HOME": str(tmp / "home"),
           "TELELEDGER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_PASSWORD_HASHING": "fast",
           "TELELEDGER_CHAIN_ENABLED": "true", "TELELEDGER_ANCHOR_INTERVAL_SECONDS": "1"}
    for name in ("TELELEDGER_DATABASE_URL", "TELELEDGER_BASE_URL", "TELELEDGER_CHAIN_URL"):
        env.pop(name, None)
    _cli(env, "clients", "create", "--client-id", "svc", "--secret", SECRET, "--scope", "system/*.cruds")
    _cli(env, "users", "create", "--role", "admin", "--username", "ops", "--password", PASSWORD)
    _cli(env, "users", "create", "--role", "researcher", "--username", "rita", "--password", PASSWORD)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([*TELELEDGER, "serve", "--port", str(port)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_for("the server to start", lambda: httpx.get(f"{base}/fhir/metadata", timeout=2).status_code == 200,
                  90, log)
        tok = httpx.post(f"{base}/auth/token", data={"grant_type": "client_credentials", "client_id": "svc",
                                                     "client_secret": SECRET}, timeout=10).json()["access_token"]
        r = httpx.post(f"{base}/fhir/Organization", json={"resourceType": "Organization", "name": "Acme Clinic"},
                       headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"},
                       timeout=10)
        assert r.status_code == 201, r.text
        yield Site(base, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
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


def sign_in(page, site: Site, username: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{site.base}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{site.base}/portal")


def test_an_admin_sees_the_anchor_transaction_decoded_and_matched_with_the_logs_checkpoint(page, site):
    from playwright.sync_api import expect

    sign_in(page, site, "ops")
    page.get_by_role("link", name="Chain explorer").click()
    page.wait_for_url(f"{site.base}/admin/chain")
    expect(page.get_by_role("heading", level=1)).to_have_text("Chain explorer")

    anchors = page.locator('tr.anchor-row[data-verdict="match"]')
    # the anchorer runs every second and the indexer follows: reload until the anchor is shown
    _wait_for("an anchored checkpoint on the explorer page",
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

    sign_in(page, site, "rita")
    expect(page.get_by_role("link", name="Chain explorer")).to_have_count(0)
    response = page.goto(f"{site.base}/admin/chain")
    assert response is not None and response.status == 403
    expect(page.get_by_role("alert")).to_contain_text("Only administrators may open the node's admin pages.")
    page.screenshot(path=str(ARTIFACTS / "chain-explorer-forbidden.png"), full_page=True)


def test_a_signed_out_visitor_is_sent_to_sign_in(page, site):
    page.goto(f"{site.base}/admin/chain")
    assert page.url == f"{site.base}/login?next=/admin/chain"
