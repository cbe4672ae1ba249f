"""Real processes: the CLI, and several servers sharing one database."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import SAMPLES, database_url

TELELEDGER = [sys.executable, "-m", "teleledger.cli"]


def env_for(home: Path, url: str) -> dict:
    return {**os.environ, "TELELEDGER_HOME": str(home), "TELELEDGER_DATABASE_URL": url,
            "TELELEDGER_MASTER_KEY": base64.b64encode(b"m" * 32).decode(), "TELELEDGER_PASSWORD_HASHING": "fast",
            "TELELEDGER_ENVIRONMENT": "test", "TELELEDGER_DEMO_DATA": "false"}


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TELELEDGER, *args], env=env, capture_output=True, text=True, timeout=180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_import_then_users_create_links_an_account_to_an_imported_patient(tmp_path):
    env = env_for(tmp_path / "home", f"sqlite:///{tmp_path / 'cli.db'}")
    r = run(env, "import", str(SAMPLES / "Organization.000.ndjson"))
    assert r.returncode == 0, r.stderr
    assert "imported 43 resources" in r.stderr
    r = run(env, "users", "create", "--role", "patient", "--username", "pat", "--password", "long-enough-pw",
            "--patient", "Patient/does-not-exist")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run(env, "users", "create", "--role", "wizard", "--username", "w", "--password", "long-enough-pw")
    assert r.returncode != 0 and "unknown role" in r.stderr
    r = run(env, "users", "create", "--role", "admin", "--username", "boss", "--password", "long-enough-pw")
    assert r.returncode == 0 and "created admin account boss" in r.stdout
    r = run(env, "users", "create", "--role", "admin", "--username", "boss", "--password", "long-enough-pw")
    assert r.returncode != 0 and "taken" in r.stderr


def test_cli_import_of_a_missing_or_cut_file_fails_cleanly(tmp_path):
    env = env_for(tmp_path / "home", f"sqlite:///{tmp_path / 'cli.db'}")
    r = run(env, "import", str(tmp_path / "nothing-here"))
    assert r.returncode != 0 and "neither a file nor a folder" in r.stderr and "Traceback" not in r.stderr
    cut = tmp_path / "Patient.000.ndjson"
    cut.write_bytes((SAMPLES / "Patient.000.ndjson").read_bytes()[:5000])
    r = run(env, "import", str(cut))
    assert r.returncode != 0 and "line 2" in r.stderr and "Traceback" not in r.stderr


def test_production_refuses_demo_data_and_a_missing_master_key(tmp_path):
    env = {**env_for(tmp_path / "home", f"sqlite:///{tmp_path / 'p.db'}"), "TELELEDGER_ENVIRONMENT": "production",
           "TELELEDGER_PASSWORD_HASHING": "default", "TELELEDGER_MASTER_KEY": ""}
    r = run({**env, "TELELEDGER_DEMO_DATA": "true"}, "demo")
    assert r.returncode != 0 and "DEMO_DATA" in r.stderr
    r = run(env, "users", "create", "--role", "admin", "--username", "boss", "--password", "long-enough-pw")
    assert r.returncode != 0 and "master key" in r.stderr


def test_a_database_that_is_not_teleledgers_is_refused(tmp_path):
    import sqlite3

    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    r = run(env_for(tmp_path / "home", f"sqlite:///{db}"), "demo")
    assert r.returncode != 0 and "not a teleledger database" in r.stderr


@pytest.fixture
def two_servers(tmp_path, backend):  # type: ignore[no-untyped-def]
    url = database_url(backend, tmp_path)
    # behind a load balancer every process has the same public URL (the token issuer)
    env = {**env_for(tmp_path / "home", url), "TELELEDGER_BASE_URL": "http://fhir.example.test"}
    assert run(env, "clients", "create", "--client-id", "svc", "--secret", "service-secret-0123456789",
               "--scope", "system/*.cruds").returncode == 0
    procs, bases = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen([*TELELEDGER, "serve", "--port", str(port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        bases.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60
        for base in bases:
            while True:
                try:
                    if httpx.get(f"{base}/fhir/metadata", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "server did not start"
                time.sleep(0.2)
        tok = httpx.post(f"{bases[0]}/auth/token", data={"grant_type": "client_credentials", "client_id": "svc",
                                                         "client_secret": "service-secret-0123456789"}).json()
        yield bases, {"Authorization": f"Bearer {tok['access_token']}", "Content-Type": "application/fhir+json"}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


def test_two_server_processes_share_one_database_and_one_version_history(two_servers):
    bases, h = two_servers
    # a token issued by one process is accepted by the other (the signing key lives in the database)
    created = httpx.post(f"{bases[0]}/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=h)
    assert created.status_code == 201
    pid = created.json()["id"]
    assert httpx.get(f"{bases[1]}/fhir/Patient/{pid}", headers=h).status_code == 200

    def put(i: int) -> int:
        body = {"resourceType": "Patient", "id": pid, "gender": "female" if i % 2 else "other"}
        return httpx.put(f"{bases[i % 2]}/fhir/Patient/{pid}", json=body,
                         headers={**h, "If-Match": 'W/"1"'}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(put, range(8)))
    # exactly one writer of version 1 wins; every other one is told its version is stale
    assert sorted(statuses) == [200] + [412] * 7
    hist = httpx.get(f"{bases[1]}/fhir/Patient/{pid}/_history", headers=h).json()
    assert hist["total"] == 2

    def create(i: int) -> int:
        return httpx.post(f"{bases[i % 2]}/fhir/Organization", json={"resourceType": "Organization", "name": f"O{i}"},
                          headers=h, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(create, range(40))) == {201}
    total = httpx.get(f"{bases[0]}/fhir/Organization?_summary=count", headers=h).json()["total"]
    assert total == 40
