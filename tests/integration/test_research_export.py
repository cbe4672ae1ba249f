"""Research sharing end to end on a real node and the embedded chain (SQLite and PostgreSQL): a
patient opts in with a research Consent naming a ResearchStudy, a member researcher exports the
study's data de-identified as NDJSON (API and CLI), the reads are audited with purpose HRESCH,
and opting out (revoking) empties the next export. Non-members and other roles get 403."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from teleledger.policy.research import MEMBER_EXTENSION
from teleledger.policy.service import build_consent
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.helpers import create, observation, patient, service_headers
from tests.integration.test_consent import PASSWORD, Clinic

MRN = "MRN-7731-ALICE"


def study(ident_title: str, member_ids: list[str]) -> dict:
    return {"resourceType": "ResearchStudy", "status": "active", "title": ident_title,
            "extension": [{"url": MEMBER_EXTENSION, "valueString": m} for m in member_ids]}


@pytest.fixture
def research(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            c = Clinic(client, node)
            svc = service_headers(client, node)
            c.svc = svc  # type: ignore[attr-defined]
            alice = patient(family="Liddell", given="Alice",
                            identifier=[{"system": "urn:mrn", "value": MRN}])
            c.ids["alice"] = create(client, svc, alice)["id"]
            c.ids["bob"] = create(client, svc, patient(family="Builder", given="Bob"))["id"]
            c.ids["obs1"] = create(client, svc, observation(c.ids["alice"], value=71,
                                                            when="2024-03-01T10:00:00Z"))["id"]
            c.ids["obs2"] = create(client, svc, observation(c.ids["alice"], value=88,
                                                            when="2024-06-15T08:30:00Z"))["id"]
            c.ids["cond"] = create(client, svc, {"resourceType": "Condition",
                                                 "subject": {"reference": f"Patient/{c.ids['alice']}"},
                                                 "code": {"text": "hypertension"},
                                                 "onsetDateTime": "2023-11-20"})["id"]
            c.ids["obs_bob"] = create(client, svc, observation(c.ids["bob"], value=60))["id"]
            for name, role in (("alice", "patient"), ("bob", "patient"), ("rex", "researcher"),
                               ("rhea", "researcher")):
                link = {"patient": f"Patient/{c.ids[name]}"} if role == "patient" else {}
                c.ids[f"acct_{name}"] = node.accounts.create_user(username=name, password=PASSWORD, role=role,
                                                                  **link).id
            c.ids["S"] = create(client, svc, study("Heart rate study", [c.ids["acct_rex"]]))["id"]
            c.ids["S2"] = create(client, svc, study("Another study", [c.ids["acct_rex"]]))["id"]
            yield c
    finally:
        node.close()


def export(c: Clinic, username: str, study_id: str) -> Any:
    return c.client.get(f"/api/research/{study_id}/export", headers=c.auth(username))


def lines(r: Any) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def opt_in(c: Clinic, study_id: str, classes: list[str]) -> str:
    return c.grant("alice", build_consent(c.ids["alice"], f"ResearchStudy/{study_id}", classes, [], None, None))


def days(shifted: str, original: str) -> int:
    return (date.fromisoformat(shifted[:10]) - date.fromisoformat(original[:10])).days


def test_an_opted_in_patients_data_is_exported_de_identified_and_opting_out_stops_it(research):
    c, a = research, research.ids
    assert lines(export(c, "rex", a["S"])) == []  # nobody has opted in yet
    consent_id = opt_in(c, a["S"], ["Observation", "Condition"])

    r = export(c, "rex", a["S"])
    out = lines(r)
    assert [x["resourceType"] for x in out] == ["Condition", "Observation", "Observation"]  # type order
    for secret in (a["alice"], a["bob"], "Liddell", "Alice", MRN, a["obs1"], a["obs2"], a["cond"], a["obs_bob"]):
        assert secret not in r.text
    # one constant, non-zero shift for every date of the patient
    by_value = {x["valueQuantity"]["value"]: x for x in out if x["resourceType"] == "Observation"}
    assert set(by_value) == {71, 88}  # Bob's observation is not there
    shift = days(by_value[71]["effectiveDateTime"], "2024-03-01")
    assert shift != 0
    assert days(by_value[88]["effectiveDateTime"], "2024-06-15") == shift
    assert days(out[0]["onsetDateTime"], "2023-11-20") == shift
    assert by_value[71]["effectiveDateTime"].endswith("T10:00:00Z")
    subjects = {x["subject"]["reference"] for x in out}
    assert len(subjects) == 1  # one pseudonym for the patient, stable within the export

    # stable across exports to the same study; unlinkable to another study's
    assert lines(export(c, "rex", a["S"])) == out
    opt_in(c, a["S2"], ["Observation"])
    other = lines(export(c, "rex", a["S2"]))
    assert [x["resourceType"] for x in other] == ["Observation", "Observation"]
    assert {x["subject"]["reference"] for x in other}.isdisjoint(subjects)

    # every read was an audited export with purpose HRESCH
    with c.node.engine.connect() as conn:
        rows = conn.execute(select(t.access_events.c.action, t.access_events.c.purpose, t.access_events.c.patient_id)
                            .where(t.access_events.c.actor == a["acct_rex"])).all()
    assert rows and {(action, purpose) for action, purpose, _ in rows} == {("export", "HRESCH")}
    # (the first, empty export is on record too, naming no patient)
    assert {p for _, _, p in rows} == {a["alice"], None}

    # opting out: the next export has nothing of hers
    assert c.client.delete(f"/fhir/Consent/{consent_id}", headers=c.auth("alice")).status_code in (200, 204)
    c.settle()
    assert lines(export(c, "rex", a["S"])) == []


def test_only_a_researcher_on_the_study_may_export_and_only_an_admin_changes_its_members(research):
    c, a = research, research.ids
    opt_in(c, a["S"], ["Observation"])
    assert export(c, "rhea", a["S"]).status_code == 403  # a researcher not on the study
    assert export(c, "alice", a["S"]).status_code == 403  # not a researcher
    assert export(c, "rex", "no-such-study").status_code == 403  # same answer: no probing
    assert export(c, "rex", "bad%20id").status_code == 400
    assert c.client.get(f"/api/research/{a['S']}/export").status_code == 401
    # a researcher may edit the study, but not put herself on it
    r = c.client.get(f"/fhir/ResearchStudy/{a['S']}", headers=c.auth("rhea"))
    assert r.status_code == 200, r.text
    forged = r.json()
    forged["extension"].append({"url": MEMBER_EXTENSION, "valueString": a["acct_rhea"]})
    r = c.client.put(f"/fhir/ResearchStudy/{a['S']}", json=forged, headers=c.auth("rhea"))
    assert r.status_code == 403, r.text
    assert export(c, "rhea", a["S"]).status_code == 403
    # the operator's service account may
    r = c.client.put(f"/fhir/ResearchStudy/{a['S']}", json=forged, headers=c.svc)
    assert r.status_code == 200, r.text
    assert len(lines(export(c, "rhea", a["S"]))) == 2  # her two observations


def test_the_cli_writes_one_ndjson_file_per_type_and_refuses_a_non_member(research, tmp_path):
    from typer.testing import CliRunner

    from teleledger.cli import app

    c, a = research, research.ids
    opt_in(c, a["S"], ["Observation", "Condition"])
    s = c.node.settings
    env = {"TELELEDGER_HOME": str(s.home), "TELELEDGER_DATABASE_URL": s.database_url,
           "TELELEDGER_MASTER_KEY": s.master_key, "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_PASSWORD_HASHING": "fast", "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_URL": "",
           "TELELEDGER_CHAIN_ENABLED": "true"}
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["research", "export", a["S"], "--as", "rex", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["Condition.ndjson", "Observation.ndjson"]
    api = export(c, "rex", a["S"]).text
    assert (out / "Condition.ndjson").read_text() + (out / "Observation.ndjson").read_text() == api
    result = CliRunner().invoke(app, ["research", "export", a["S"], "--as", "rhea", "--out", str(out)], env=env)
    assert result.exit_code == 1 and "only a researcher on the study" in result.output
