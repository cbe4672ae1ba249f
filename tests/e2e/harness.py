"""What every browser test needs: a real `teleledger serve` on a fresh node, and Chromium.

    with serve(tmp) as server:          # a fresh home, a service client "svc", a free port
        pid = server.create({...})      # a FHIR resource through the service client -> its id
        server.cli("users", "create", ...)
        headers = server.token("alice")  # a person's bearer header
    with chromium(extra_args) as browser: ...
    page = open_page(browser)           # a context with bounded waits; JS errors collected
    sign_in(page, server.base, "alice")

Chromium is Debian's (/usr/bin/chromium) driven by Playwright: the tests are skipped with a
reason when it is missing, and fail instead when TELELEDGER_REQUIRE_BROWSER=1 (as CI sets).
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TELELEDGER = [sys.executable, "-m", "teleledger.cli"]
SECRET = "service-secret-0123456789"
PASSWORD = "correct-horse-battery"
WAIT_MS = 15_000  # every browser wait is bounded by this


def browser_or_skip() -> None:
    reason = None
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright for Python is not installed (pip install -e '.[test]')"
    if reason is None:
        return
    if os.environ.get("TELELEDGER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TELELEDGER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"browser end-to-end tests: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; server output:\n{tail}")
        time.sleep(0.2)


@dataclass
class Server:
    base: str
    env: dict[str, str]
    log: Path
    home: Path
    svc: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> None:
        r = subprocess.run([*TELELEDGER, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"teleledger {' '.join(args[:2])} failed: {r.stderr}"

    def create(self, resource: dict[str, Any]) -> str:
        r = httpx.post(f"{self.base}/fhir/{resource['resourceType']}", json=resource, headers=self.svc, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def token(self, username: str, password: str = PASSWORD) -> dict[str, str]:
        r = httpx.post(f"{self.base}/auth/token", data={"grant_type": "password", "username": username,
                                                        "password": password}, timeout=30)
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}


def node_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh test node in ``home`` (SQLite, random master key, no demo data)."""
    env = {**os.environ, "TELELEDGER_HOME": str(home),
           "TELELEDGER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_PASSWORD_HASHING": "fast"}
    for name in ("TELELEDGER_DATABASE_URL", "TELELEDGER_BASE_URL", "TELELEDGER_CHAIN_URL", "TELELEDGER_CHAIN_ENABLED",
                 "TELELEDGER_ICE_SERVERS"):
        env.pop(name, None)  # the server under test is a fresh embedded node, whatever the caller's shell says
    env.update(extra)
    return env


@contextmanager
def serve(tmp: Path, **extra_env: str) -> Iterator[Server]:
    """``teleledger serve`` on a fresh node in ``tmp``, with a service client; stopped afterwards."""
    env = node_env(tmp / "home", **extra_env)
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}", env, tmp / "server.log", tmp / "home")
    server.cli("clients", "create", "--client-id", "svc", "--secret", SECRET, "--scope", "system/*.cruds")
    with server.log.open("wb") as out:
        proc = subprocess.Popen([*TELELEDGER, "serve", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for("the server to start",
                 lambda: httpx.get(f"{server.base}/fhir/metadata", timeout=2).status_code == 200, 60, server.log)
        tok = httpx.post(f"{server.base}/auth/token", data={"grant_type": "client_credentials", "client_id": "svc",
                                                            "client_secret": SECRET}, timeout=10).json()["access_token"]
        server.svc = {"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"}
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def chromium(extra_args: tuple[str, ...] | list[str] = ()) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args],
                                     timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser: Any, *, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A page in its own context with bounded waits; fails the test on any JavaScript error."""
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": width, "height": height}, locale="en-GB",
                                  timezone_id="Europe/Paris")
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def sign_in(page: Any, base: str, username: str, password: str = PASSWORD, *,
            landing: str | None = "/portal") -> None:
    """Sign in through the form; wait for ``landing`` (None: for whatever page comes next)."""
    page.goto(f"{base}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    if landing is None:
        page.wait_for_load_state()
    else:
        page.wait_for_url(f"{base}{landing}")
