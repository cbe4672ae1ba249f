"""Patient-controlled consent end to end on a real node and the embedded chain (SQLite and
PostgreSQL): a patient's FHIR Consent is signed (EIP-712), recorded in ConsentRegistry through the
outbox, projected back by the indexer into the ConsentIndex, and enforced on read, search,
``_include``/``_revinclude`` and ``$everything``; break-glass; bad input records nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.storage import chain_outbox
from teleledger.policy.consent_tables import consent_grants
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.clinic import encounter
from tests.integration.helpers import FHIR, create, observation, patient, service_headers

PASSWORD = "correct horse 1"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
TYPES = "http://hl7.org/fhir/resource-types"


def consent(patient_id: str, provision: dict, *, status: str = "active") -> dict:
    return {
        "resourceType": "Consent", "status": status,
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "provision": provision,
    }


def actor(ref: str) -> dict:
    return {"reference": {"reference": ref}, "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]}}


def permit_observations(who: str, **extra: Any) -> dict:
    return {"type": "permit", "actor": [actor(who)],
            "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
            "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
            "class": [{"system": TYPES, "code": "Observation"}], **extra}


def deny_label(label: str) -> dict:
    return {"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": label}]}


def _cli(settings: Any, *args: str) -> Any:
    from typer.testing import CliRunner

    from teleledger.cli import app

    env = {"TELELEDGER_HOME": str(settings.home), "TELELEDGER_DATABASE_URL": settings.database_url,
           "TELELEDGER_MASTER_KEY": settings.master_key, "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_PASSWORD_HASHING": "fast", "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_CHAIN_URL": ""}
    return CliRunner().invoke(app, ["consent", *args], env=env)


class Clinic:
    def __init__(self, client: Any, node: Any) -> None:
        self.client, self.node = client, node
        self.ids: dict[str, str] = {}
        self._auth: dict[str, dict] = {}

    def auth(self, username: str, purpose: str | None = None) -> dict:
        if username not in self._auth:
            r = self.client.post("/auth/token", data={"grant_type": "password", "username": username,
                                                     "password": PASSWORD})
            assert r.status_code == 200, r.text
            self._auth[username] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        headers = {**self._auth[username], **FHIR}
        if purpose:
            headers["X-Purpose-Of-Use"] = purpose
        return headers

    def get(self, username: str, path: str, purpose: str | None = None) -> Any:
        return self.client.get(f"/fhir/{path}", headers=self.auth(username, purpose))

    def search_ids(self, username: str, query: str, purpose: str | None = None) -> tuple[int, list[str]]:
        r = self.get(username, query, purpose)
        assert r.status_code == 200, r.text
        body = r.json()
        return body.get("total"), sorted(f"{e['resource']['resourceType']}/{e['resource']['id']}"
                                          for e in body.get("entry", []) if e["search"]["mode"] != "outcome")

    def settle(self) -> None:
        """Until every chain write is confirmed and the indexer has projected it."""
        with self.node.engine.connect() as conn:
            keys = conn.execute(select(chain_outbox.c.idempotency_key)).scalars().all()
        for key in keys:
            self.node.chain.wait(key, timeout=30)
        self.node.chain.indexer.poll_until_caught_up()

    def grant(self, username: str, resource: dict) -> str:
        r = self.client.post("/fhir/Consent", json=resource, headers=self.auth(username))
        assert r.status_code == 201, r.text
        self.settle()
        return r.json()["id"]

    def counts(self) -> tuple[int, int, int]:
        """(Consent resources, outbox rows, consent grant rows) at the node."""
        with self.node.engine.connect() as conn:
            consents = conn.execute(select(func.count()).select_from(t.resources)
                                    .where(t.resources.c.res_type == "Consent")).scalar_one()
            rows = conn.execute(select(func.count()).select_from(chain_outbox)).scalar_one()
            grants = conn.execute(select(func.count()).select_from(consent_grants)).scalar_one()
        return int(consents), int(rows), int(grants)

    def access_event_id(self, username: str, reason: str) -> int:
        account = self.node.accounts.get_by_username(username)
        with self.node.engine.connect() as conn:
            return int(conn.execute(select(t.access_events.c.id).where(t.access_events.c.actor == account.id,
                                                                       t.access_events.c.reason == reason)
                                    .limit(1)).scalar_one())

    def access_reasons(self, username: str) -> list[tuple[str, str]]:
        account = self.node.accounts.get_by_username(username)
        with self.node.engine.connect() as conn:
            rows = conn.execute(select(t.access_events.c.purpose, t.access_events.c.reason)
                                .where(t.access_events.c.actor == account.id)).all()
        return [(p, r) for p, r in rows]


@pytest.fixture
def clinic(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            c = Clinic(client, node)
            svc = service_headers(client, node)
            c.ids["alice"] = create(client, svc, patient(family="Liddell", given="Alice"))["id"]
            c.ids["bob"] = create(client, svc, patient(family="Builder", given="Bob"))["id"]
            c.ids["doc"] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})["id"]
            c.ids["rita"] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Rita"}]})["id"]
            create(client, svc, encounter(c.ids["alice"], c.ids["doc"]))
            c.ids["obs"] = create(client, svc, observation(c.ids["alice"]))["id"]
            mh = observation(c.ids["alice"], code="44249-1", value=12)
            mh["meta"] = {"security": [{"system": ACT_CODE, "code": "PSY"}]}
            c.ids["obs_mh"] = create(client, svc, mh)["id"]
            c.ids["cond"] = create(client, svc, {"resourceType": "Condition",
                                                 "subject": {"reference": f"Patient/{c.ids['alice']}"},
                                                 "code": {"text": "hypertension"}})["id"]
            c.ids["obs_bob"] = create(client, svc, observation(c.ids["bob"]))["id"]
            for name, kind, ref in (("alice", "patient", "alice"), ("bob", "patient", "bob"),
                                    ("doc", "practitioner", "doc"), ("rita", "practitioner", "rita")):
                link = {"patient": f"Patient/{c.ids[ref]}"} if kind == "patient" else \
                    {"practitioner": f"Practitioner/{c.ids[ref]}"}
                node.accounts.create_user(username=name, password=PASSWORD, role=kind, **link)
            yield c
    finally:
        node.close()


def test_a_grant_lets_a_practitioner_read_and_search_only_the_observations_it_covers_until_revoked(clinic):
    c, a = clinic, clinic.ids
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403
    assert c.search_ids("rita", f"Observation?subject=Patient/{a['alice']}") == (0, [])

    consent_id = c.grant("alice", consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}",
                                                                          provision=[deny_label("PSY")])))

    assert c.get("rita", f"Observation/{a['obs']}").status_code == 200
    assert c.get("rita", f"Observation/{a['obs_mh']}").status_code == 403  # the deny exception
    assert c.get("rita", f"Condition/{a['cond']}").status_code == 403  # another type
    assert c.get("rita", f"Observation/{a['obs_bob']}").status_code == 403  # another patient
    assert c.search_ids("rita", "Observation") == (1, [f"Observation/{a['obs']}"])
    assert c.search_ids("rita", "Observation?_summary=count")[0] == 1
    assert c.search_ids("rita", "Condition") == (0, [])
    assert c.search_ids("rita", "Observation?_count=1&_offset=1") == (1, [])
    assert ("TREAT", f"consent-permit:Consent/{consent_id}") in c.access_reasons("rita")
    # the patient traces the access to the consent and the chain transaction that granted it
    event_id = c.access_event_id("rita", f"consent-permit:Consent/{consent_id}")
    r = c.client.get(f"/api/consent/explain/{event_id}", headers=c.auth("alice"))
    assert r.status_code == 200, r.text
    why = r.json()
    assert why["rule"] == "consent-permit" and why["basis"] == f"Consent/{consent_id}"
    [granted] = why["chain"]
    assert granted["event"] == "ConsentGranted" and granted["grantee"] == f"Practitioner/{a['rita']}"
    with c.node.engine.connect() as conn:
        [event] = chain_events(conn, "ConsentGranted")
    assert (granted["tx"], granted["block"]) == (event.tx_hash, event.block_number)
    assert c.client.get(f"/api/consent/explain/{event_id}", headers=c.auth("bob")).status_code == 403
    # and the operator from the command line
    result = _cli(c.node.settings, "explain", str(event_id))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chain"][0]["tx"] == event.tx_hash
    result = _cli(c.node.settings, "explain", "999999")
    assert result.exit_code == 1 and "not known" in result.output

    r = c.client.delete(f"/fhir/Consent/{consent_id}", headers=c.auth("alice"))
    assert r.status_code == 204, r.text
    c.settle()
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403
    assert c.search_ids("rita", "Observation") == (0, [])


def test_a_consent_made_inactive_by_put_stops_access_after_the_indexer_catches_up(clinic):
    c, a = clinic, clinic.ids
    body = consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}"))
    consent_id = c.grant("alice", body)
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 200
    r = c.client.put(f"/fhir/Consent/{consent_id}", json={**body, "id": consent_id, "status": "inactive"},
                     headers=c.auth("alice"))
    assert r.status_code == 200, r.text
    c.settle()
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403


def test_a_deny_for_a_sensitivity_label_hides_those_rows_from_a_treating_practitioner_everywhere(clinic):
    c, a = clinic, clinic.ids
    # before: the care relationship shows both observations
    assert c.search_ids("doc", f"Observation?subject=Patient/{a['alice']}")[0] == 2
    c.grant("alice", consent(a["alice"], deny_label("PSY")))

    assert c.get("doc", f"Observation/{a['obs']}").status_code == 200
    assert c.get("doc", f"Observation/{a['obs_mh']}").status_code == 403
    assert c.get("doc", f"Observation/{a['obs_mh']}/_history/1").status_code == 403
    assert c.search_ids("doc", f"Observation?subject=Patient/{a['alice']}") == (1, [f"Observation/{a['obs']}"])
    assert c.search_ids("doc", "Observation?_summary=count")[0] == 1
    total, ids = c.search_ids("doc", f"Patient?_id={a['alice']}&_revinclude=Observation:subject")
    assert f"Observation/{a['obs_mh']}" not in ids and f"Observation/{a['obs']}" in ids
    r = c.get("doc", f"Patient/{a['alice']}/$everything")
    assert r.status_code == 200, r.text
    everything = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]}
    assert f"Observation/{a['obs_mh']}" not in everything and f"Condition/{a['cond']}" in everything
    # the patient still sees their own record
    assert c.get("alice", f"Observation/{a['obs_mh']}").status_code == 200


def test_a_consent_whose_period_has_ended_gives_no_access(clinic):
    c, a = clinic, clinic.ids
    c.grant("alice", consent(a["alice"], permit_observations(
        f"Practitioner/{a['rita']}", period={"start": "2020-01-01", "end": "2020-12-31"})))
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403
    assert c.search_ids("rita", "Observation") == (0, [])


def test_break_glass_allows_emergency_reads_audited_as_btg_until_it_expires(clinic):
    c, a = clinic, clinic.ids
    assert c.get("rita", f"Observation/{a['obs']}", "ETREAT").status_code == 403
    r = c.client.post("/api/break-glass", json={"patient": f"Patient/{a['alice']}", "reason": "unconscious in ER"},
                      headers=c.auth("rita"))
    assert r.status_code == 201, r.text
    claim_id = r.json()["claim_id"]
    assert c.get("rita", f"Observation/{a['obs']}", "ETREAT").status_code == 200
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403  # only for the emergency purpose
    assert c.search_ids("rita", "Observation", "ETREAT")[0] == 2
    reasons = c.access_reasons("rita")
    assert ("BTG", f"break-glass-claim:break-glass/{claim_id}") in reasons
    assert ("ETREAT", f"break-glass:break-glass/{claim_id}") in reasons
    assert [n["claim_id"] for n in c.node.consent_service.claims_for_patient(a["alice"])] == [claim_id]
    # expired: the same claim started long ago
    c.node.consents.claim_break_glass(a["rita"], a["alice"], "unconscious in ER", time.time() - 7200, 3600,
                                      claim_id=claim_id)
    assert c.get("rita", f"Observation/{a['obs']}", "ETREAT").status_code == 403
    # a patient cannot claim break-glass; a short reason is refused
    assert c.client.post("/api/break-glass", json={"patient": a["bob"], "reason": "unconscious in ER"},
                         headers=c.auth("alice")).status_code == 403
    assert c.client.post("/api/break-glass", json={"patient": a["bob"], "reason": "x"},
                         headers=c.auth("rita")).status_code == 400


def test_only_the_patient_can_grant_and_a_refused_grant_records_nothing(clinic):
    c, a = clinic, clinic.ids
    before = c.counts()
    body = consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}"))
    for who in ("doc", "bob", "rita"):
        r = c.client.post("/fhir/Consent", json=body, headers=c.auth(who))
        assert r.status_code == 403, (who, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    assert c.counts() == before
    # ... but each attempt is in the log as a denied access: another patient's on Alice's record
    with c.node.engine.connect() as conn:
        denied = conn.execute(select(t.access_events.c.actor, t.access_events.c.action, t.access_events.c.patient_id,
                                     t.access_events.c.reason)
                              .where(t.access_events.c.outcome == "denied")).all()
    bob, doc = c.node.accounts.get_by_username("bob").id, c.node.accounts.get_by_username("doc").id
    assert (bob, "create", a["alice"]) in {(r.actor, r.action, r.patient_id) for r in denied}
    assert (doc, "create", None, "not-patient-or-delegate") in {tuple(r) for r in denied}


def test_each_bad_consent_gets_a_4xx_outcome_and_nothing_is_recorded(clinic):
    c, a = clinic, clinic.ids
    before = c.counts()
    rita = f"Practitioner/{a['rita']}"
    bad = {
        "period ends before it starts": permit_observations(rita, period={"start": "2025-06-01", "end": "2025-01-01"}),
        "unknown actor": permit_observations("Practitioner/nobody-here"),
        "contradictory provisions": {"type": "permit", "provision": [
            {"type": "permit", "actor": [actor(rita)]},
            {"type": "deny", "actor": [actor(rita)]}]},
        "unsupported data element": {**permit_observations(rita), "data": [{"meaning": "instance",
                                                                             "reference": {"reference": "X/1"}}]},
    }
    for what, provision in bad.items():
        r = c.client.post("/fhir/Consent", json=consent(a["alice"], provision), headers=c.auth("alice"))
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert r.json()["resourceType"] == "OperationOutcome", what
    r = c.client.post("/fhir/Consent", content=b"{not json", headers=c.auth("alice"))
    assert r.status_code == 400
    assert c.counts() == before


def test_the_chain_holds_only_pseudonyms_and_hashes(clinic):
    c, a = clinic, clinic.ids
    c.grant("alice", consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}")))
    with c.node.engine.connect() as conn:
        granted = [e for e in chain_events(conn, "ConsentGranted")]
    assert len(granted) == 1
    args = granted[0].args
    service = c.node.consent_service
    assert bytes(args["pseudonym"]) == service.pseudonym(a["alice"])
    assert bytes(args["grantee"]) == service.grantee_hash(f"Practitioner/{a['rita']}")
    raw = repr(args).encode() + b"".join(bytes(v) for v in args.values() if isinstance(v, bytes | bytearray))
    for secret in (a["alice"], a["rita"], "Liddell", "Patient/"):
        assert secret.encode() not in raw


def test_the_portal_page_grants_shows_and_revokes_access_and_lists_break_glass(clinic):
    from fastapi.testclient import TestClient

    c, a = clinic, clinic.ids
    page = TestClient(c.client.app)  # its own cookie jar: the patient's browser
    r = page.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = page.get("/portal/consents")
    assert r.status_code == 200 and "Give permission" in r.text
    assert f'value="Practitioner/{a["rita"]}"' in r.text and "Rita" in r.text

    r = page.post("/portal/consents", data={"actor": f"Practitioner/{a['rita']}", "class": ["Observation"],
                                            "exclude": ["PSY"], "end": "2099-12-31"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    c.settle()
    r = page.get("/portal/consents")
    assert "in force" in r.text and "Observation except PSY" in r.text and "2100-01-01" in r.text
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 200
    assert c.get("rita", f"Observation/{a['obs_mh']}").status_code == 403

    # a bad form is shown again with the reason, and records nothing
    before = c.counts()
    r = page.post("/portal/consents", data={"actor": f"Practitioner/{a['rita']}", "start": "2030-01-01",
                                            "end": "2029-01-01"})
    assert r.status_code == 400 and 'role="alert"' in r.text and "period" in r.text
    assert c.counts() == before

    consent_id = c.node.consent_service.grants_of(a["alice"])[0].consent_id
    r = page.post(f"/portal/consents/{consent_id}/revoke", follow_redirects=False)
    assert r.status_code == 303, r.text
    c.settle()
    assert c.get("rita", f"Observation/{a['obs']}").status_code == 403
    assert "revoked" in page.get("/portal/consents").text

    c.client.post("/api/break-glass", json={"patient": a["alice"], "reason": "unconscious in ER"},
                  headers=c.auth("rita"))
    assert "claimed emergency access" in page.get("/portal/consents").text
    # other roles are turned away
    doc = TestClient(c.client.app)
    doc.post("/login", data={"username": "doc", "password": PASSWORD}, follow_redirects=False)
    assert doc.get("/portal/consents").status_code == 403


# ---- the SQL of a consent-filtered search is exactly the policy's pure definition ------------------

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

from teleledger.demo import system_principal  # noqa: E402
from teleledger.policy import model as pm  # noqa: E402
from teleledger.policy.sensitivity import classify  # noqa: E402
from teleledger.fhir import compartment  # noqa: E402
from teleledger.records.care_tables import SqlCareRelationships  # noqa: E402
from teleledger.records.search import R, Visibility, visibility_clause  # noqa: E402

_LABELS = ("PSY", "HIV", "ETH")
_TYPES = ("Observation", "Condition")
_rules = st.recursive(
    st.one_of(st.builds(pm.TypeIn, st.frozensets(st.sampled_from(_TYPES))),
              st.builds(pm.AnyLabel, st.frozensets(st.sampled_from(_LABELS))),
              st.builds(pm.OnlyLabels, st.frozensets(st.sampled_from(_LABELS)))),
    lambda inner: st.one_of(st.builds(pm.Not, inner),
                            st.builds(pm.AllOf, st.tuples(inner, inner)),
                            st.builds(pm.AnyOf, st.tuples(inner, inner))),
    max_leaves=4,
)


@pytest.fixture
def labelled(node):  # type: ignore[no-untyped-def]
    """Two patients, each with an Observation and a Condition per label combination."""
    svc = system_principal()
    ids = [node.records.create(svc, patient(family=f"P{i}"))[0].res_id for i in range(2)]
    for pid in ids:
        for labels in ((), ("PSY",), ("HIV",), ("PSY", "HIV"), ("ETH",)):
            meta = {"security": [{"system": ACT_CODE, "code": code} for code in labels]} if labels else None
            obs = observation(pid)
            cond = {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"}, "code": {"text": "x"}}
            for r in (obs, cond):
                if meta:
                    r["meta"] = meta
                node.records.create(svc, r)
    # rows in both compartments (performer Patient/p2), and a care relationship with p1 only
    for labels in ((), ("PSY",)):
        shared = {**observation(ids[0]), "performer": [{"reference": f"Patient/{ids[1]}"}]}
        if labels:
            shared["meta"] = {"security": [{"system": ACT_CODE, "code": code} for code in labels]}
        node.records.create(svc, shared)
    node.records.create(svc, encounter(ids[0], "care-doc"))
    return node, ids


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(permit=_rules, deny=_rules, glass=st.booleans(), own=st.booleans(), care=st.booleans(),
       thread=st.booleans())
def test_the_sql_of_a_consent_filter_returns_exactly_the_rows_the_pure_filter_allows(labelled, permit, deny,
                                                                                     glass, own, care, thread):
    """Also through the store's cached, rendered clause (``SqlSearch.visibility``) with and
    without a patient hint, a hint naming either patient, and one naming nobody."""
    node, (p1, p2) = labelled
    f = pm.Consented(own_patient_id=p2 if own else None, break_glass=frozenset({p2}) if glass else frozenset(),
                     permits=((frozenset({p1, p2}), permit),), denies=((frozenset({p1}), deny),),
                     care_team_of="care-doc" if care else None, practitioner_id="care-doc" if thread else None)
    vis = Visibility("consented", consented=f, label_hash=node.records._label_hash)
    rows = select(R.c.res_type, R.c.res_id).where(R.c.res_type.in_(_TYPES), R.c.deleted.is_(False))
    with node.engine.connect() as conn:
        got = {"built": set(conn.execute(rows.where(visibility_clause(vis, R.c.res_type, R.c.res_id))).tuples())}
        for hint in (None, p1, p2, "nobody"):
            clause, params = node.records.sql.visibility(vis, conn.dialect, patient=hint)
            got[f"cached, hint {hint}"] = set(conn.execute(rows.where(clause), params).tuples())
        loaded = node.records.store.load_current(conn, [tuple(k) for k in conn.execute(
            select(R.c.res_type, R.c.res_id).where(R.c.res_type.in_(_TYPES))).tuples()])
        want = {k for k, s in loaded.items()
                if pm.matches(f, compartment.patient_ids(s.body), s.res_type, classify(s.body),
                              care=SqlCareRelationships(conn))}
    assert got == {k: want for k in got}
