"""Consent state in every process of a node: a second process on the same database (here a
standby on the same home, as a second ``teleledger serve`` would be) enforces a grant, its
revocation and a break-glass claim that the first process made and indexed (SQLite and
PostgreSQL, embedded chain; the second process's event follower runs as in a server)."""

from __future__ import annotations

import time
from collections.abc import Callable

from teleledger.bootstrap import build
from tests.conftest import database_url, make_settings
from tests.integration.helpers import create, observation, patient, service_headers
from tests.integration.test_consent import Clinic, consent, permit_observations

PASSWORD = "correct horse 1"


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_second_process_follows_grants_revocations_and_break_glass_claims_of_the_first(tmp_path, backend):
    from fastapi.testclient import TestClient

    from teleledger.web.app import create_app

    settings = make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True, chain_poll_interval=0.05)
    first = build(settings)
    second = build(settings)  # the same database and home: standby for the embedded chain
    try:
        assert not second.chain.active
        with TestClient(create_app(first), raise_server_exceptions=False) as one, \
                TestClient(create_app(second), raise_server_exceptions=False) as two:
            c, other = Clinic(one, first), Clinic(two, second)
            svc = service_headers(one, first)
            alice = create(one, svc, patient(family="Liddell", given="Alice"))["id"]
            rita = create(one, svc, {"resourceType": "Practitioner", "name": [{"family": "Rita"}]})["id"]
            obs = create(one, svc, observation(alice))["id"]
            first.accounts.create_user(username="alice", password=PASSWORD, role="patient", patient=f"Patient/{alice}")
            first.accounts.create_user(username="rita", password=PASSWORD, role="practitioner",
                                       practitioner=f"Practitioner/{rita}")

            def status_at(clinic: Clinic, purpose: str | None = None) -> int:
                return clinic.get("rita", f"Observation/{obs}", purpose).status_code

            assert status_at(other) == 403
            consent_id = c.grant("alice", consent(alice, permit_observations(f"Practitioner/{rita}")))
            assert status_at(c) == 200
            assert eventually(lambda: status_at(other) == 200)  # followed from the stored events

            r = one.delete(f"/fhir/Consent/{consent_id}", headers=c.auth("alice"))
            assert r.status_code in (200, 204), r.text
            c.settle()
            assert status_at(c) == 403
            assert eventually(lambda: status_at(other) == 403)  # the revocation reaches it too

            assert status_at(other, "ETREAT") == 403
            r = one.post("/api/break-glass", json={"patient": alice, "reason": "unconscious in the ER, no ID"},
                         headers=c.auth("rita"))
            assert r.status_code == 201, r.text
            assert status_at(c, "ETREAT") == 200
            assert eventually(lambda: status_at(other, "ETREAT") == 200)  # a claim made in the first process
    finally:
        second.close()
        first.close()
