"""Delegates end to end on a real node and the embedded chain (SQLite and PostgreSQL): a patient
designates a RelatedPerson of theirs that an account signs in as; the patient's SetDelegate
signature reaches ConsentRegistry through the outbox; the DelegateSet event, projected back, lets
the delegate read the patient's record (traceably, under the patient's own denies) and grant and
revoke consents for them, signed with the delegate's own key; removal stops both; bad input
records nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_keys import keys
from sqlalchemy import func, select

from teleledger.ledger.chain import eip712
from teleledger.ledger.chain.client import decode_call
from teleledger.ledger.chain.indexer import events as chain_events
from teleledger.ledger.chain.storage import chain_outbox, decode_args
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.consent_tables import consent_grants, consent_patients
from teleledger.policy.delegate_tables import consent_delegates
from teleledger.policy.service import ConsentService
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.clinic import encounter
from tests.integration.helpers import create, observation, patient, service_headers
from tests.integration.test_consent import ACT_CODE, PASSWORD, Clinic, actor, consent, deny_label, permit_observations


def labelled(obs: dict, label: str) -> dict:
    obs["meta"] = {"security": [{"system": ACT_CODE, "code": label}]}
    return obs


def related_person(patient_id: str, family: str, given: str) -> dict:
    return {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{patient_id}"},
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                          "code": "MTH"}]}],
            "name": [{"family": family, "given": [given]}]}


class Family(Clinic):
    def delegate(self, username: str, rp: str, enabled: bool = True) -> Any:
        return self.client.post("/api/consent/delegates", json={"relatedPerson": f"RelatedPerson/{rp}",
                                                                "enabled": enabled}, headers=self.auth(username))

    def delegations(self, username: str) -> dict:
        r = self.client.get("/api/consent/delegates", headers=self.auth(username))
        assert r.status_code == 200, r.text
        return r.json()

    def designate(self, rp: str) -> dict:
        r = self.delegate("alice", rp)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "pending"
        self.settle()
        [row] = [d for d in self.delegations("alice")["delegates"] if d["relatedPerson"] == f"RelatedPerson/{rp}"]
        assert row["status"] == "active", row
        return row

    def state(self) -> tuple[int, int, int, int, int]:
        """(Consent resources, outbox rows, consent grant rows, delegations, bound patients)."""
        with self.node.engine.connect() as conn:
            count = [conn.execute(select(func.count()).select_from(table)).scalar_one()
                     for table in (chain_outbox, consent_grants, consent_delegates, consent_patients)]
            consents = conn.execute(select(func.count()).select_from(t.resources)
                                    .where(t.resources.c.res_type == "Consent")).scalar_one()
        return int(consents), *(int(n) for n in count)  # type: ignore[return-value]

    def address(self, username: str) -> str:
        return self.node.keystore.address(f"user:{username}").lower()


@pytest.fixture
def family(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            f = Family(client, node)
            svc = service_headers(client, node)
            ids = f.ids
            ids["alice"] = create(client, svc, patient(family="Liddell", given="Alice", birth="2010-05-04"))["id"]
            ids["bob"] = create(client, svc, patient(family="Builder", given="Bob"))["id"]
            ids["doc"] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})["id"]
            ids["rita"] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Rita"}]})["id"]
            create(client, svc, encounter(ids["alice"], ids["doc"]))
            ids["obs"] = create(client, svc, observation(ids["alice"]))["id"]
            ids["obs_sex"] = create(client, svc, labelled(observation(ids["alice"], code="45331-1", value=1), "SEX"))["id"]
            ids["obs_psy"] = create(client, svc, labelled(observation(ids["alice"], code="44249-1", value=12), "PSY"))["id"]
            ids["obs_bob"] = create(client, svc, observation(ids["bob"]))["id"]
            ids["mum"] = create(client, svc, related_person(ids["alice"], "Liddell", "Lorina"))["id"]
            ids["aunt"] = create(client, svc, related_person(ids["alice"], "Liddell", "Edith"))["id"]  # no account
            ids["self"] = create(client, svc, related_person(ids["alice"], "Liddell", "Alice"))["id"]
            ids["bobs_mum"] = create(client, svc, related_person(ids["bob"], "Builder", "Wendy"))["id"]
            accounts = {"alice": {"patient": f"Patient/{ids['alice']}"}, "bob": {"patient": f"Patient/{ids['bob']}"},
                        "mum": {"related_person": f"RelatedPerson/{ids['mum']}"},
                        "wendy": {"related_person": f"RelatedPerson/{ids['bobs_mum']}"},
                        # alice's second account, as a RelatedPerson of herself: still alice
                        "alice2": {"patient": f"Patient/{ids['alice']}", "related_person": f"RelatedPerson/{ids['self']}"}}
            for name, link in accounts.items():
                node.accounts.create_user(username=name, password=PASSWORD, role="patient", **link)
            for name in ("doc", "rita"):
                node.accounts.create_user(username=name, password=PASSWORD, role="practitioner",
                                          practitioner=f"Practitioner/{ids[name]}")
            yield f
    finally:
        node.close()


def test_a_designated_delegate_reads_the_patients_record_traceably_to_the_delegate_set_transaction(family):
    f, a = family, family.ids
    assert f.get("mum", f"Observation/{a['obs']}").status_code == 403
    assert f.search_ids("mum", f"Observation?subject=Patient/{a['alice']}") == (0, [])

    row = f.designate(a["mum"])
    assert row["address"] == f.address("mum")
    with f.node.engine.connect() as conn:
        [event] = chain_events(conn, "DelegateSet")
    assert (event.args["delegate"].lower(), event.args["enabled"]) == (f.address("mum"), True)
    assert bytes(event.args["pseudonym"]) == f.node.consent_service.pseudonym(a["alice"])
    assert (row["tx"], row["block"]) == (event.tx_hash, event.block_number)

    assert f.get("mum", f"Observation/{a['obs']}").status_code == 200
    assert f.get("mum", f"Observation/{a['obs_bob']}").status_code == 403  # only the patient who designated
    total, ids = f.search_ids("mum", f"Observation?subject=Patient/{a['alice']}")
    assert (total, len(ids)) == (3, 3)
    basis = f"consent-permit:{row['delegation']}"
    assert row["delegation"].startswith("Delegation/")
    assert ("TREAT", basis) in f.access_reasons("mum")

    # the patient traces the access to their signed delegation and its chain transaction
    r = f.client.get(f"/api/consent/explain/{f.access_event_id('mum', basis)}", headers=f.auth("alice"))
    assert r.status_code == 200, r.text
    why = r.json()
    assert (why["rule"], why["basis"], why["delegate"]) == ("consent-permit", row["delegation"],
                                                             f"RelatedPerson/{a['mum']}")
    assert [(c["event"], c["enabled"], c["tx"], c["block"]) for c in why["chain"]] == [
        ("DelegateSet", True, event.tx_hash, event.block_number)]
    assert why["contract"] == f.node.chain.addresses["ConsentRegistry"]

    # each side lists the delegation
    assert [(d["patient"], d["status"], d["display"]) for d in f.delegations("mum")["actingFor"]] == [
        (f"Patient/{a['alice']}", "active", "Alice Liddell")]
    assert f.delegations("mum")["delegates"] == []
    assert [(d["relatedPerson"], d["display"]) for d in f.delegations("alice")["delegates"]] == [
        (f"RelatedPerson/{a['mum']}", "Lorina Liddell")]
    assert f.delegations("alice")["actingFor"] == []

    # designating again changes nothing: no second signature
    before = f.state()
    assert f.delegate("alice", a["mum"]).json()["status"] == "active"
    assert f.state() == before

    # a process starting up rebuilds the delegation from the stored chain events
    fresh = ConsentIndex()
    ConsentService(engine=f.node.engine, records=f.node.records, keystore=None, chain=None, index=fresh,
                   auditor=None, pseudonym_key=b"k" * 32, grantee_key=b"k" * 32).rebuild()
    assert (row["delegation"], f"RelatedPerson/{a['mum']}") in fresh.in_force(a["alice"])


def test_what_the_patient_denies_to_anyone_or_to_the_delegate_stays_hidden_from_the_delegate(family):
    f, a = family, family.ids
    f.designate(a["mum"])
    assert f.get("mum", f"Observation/{a['obs_sex']}").status_code == 200
    to_anyone = f.grant("alice", consent(a["alice"], deny_label("SEX")))
    to_mum = f.grant("alice", consent(a["alice"], {**deny_label("PSY"), "actor": [actor(f"RelatedPerson/{a['mum']}")]}))

    assert f.get("mum", f"Observation/{a['obs']}").status_code == 200
    for hidden in ("obs_sex", "obs_psy"):
        assert f.get("mum", f"Observation/{a[hidden]}").status_code == 403, hidden
        assert f.get("mum", f"Observation/{a[hidden]}/_history/1").status_code == 403, hidden
    assert f.search_ids("mum", f"Observation?subject=Patient/{a['alice']}") == (1, [f"Observation/{a['obs']}"])
    assert f.search_ids("mum", "Observation?_summary=count")[0] == 1
    assert f.search_ids("mum", "Observation?_count=1&_offset=1") == (1, [])
    # the deny to the delegate alone leaves the care team alone; the deny to anyone does not
    assert f.get("doc", f"Observation/{a['obs_psy']}").status_code == 200
    assert f.get("doc", f"Observation/{a['obs_sex']}").status_code == 403
    assert f.get("alice", f"Observation/{a['obs_sex']}").status_code == 200

    # and the delegate cannot undo those denies: nothing is stored or enqueued
    before = f.state()
    for consent_id in (to_anyone, to_mum):
        r = f.client.delete(f"/fhir/Consent/{consent_id}", headers=f.auth("mum"))
        assert r.status_code == 403 and "only the patient" in r.json()["issue"][0]["diagnostics"], r.text
        body = {**consent(a["alice"], deny_label("ETH")), "id": consent_id}
        assert f.client.put(f"/fhir/Consent/{consent_id}", json=body, headers=f.auth("mum")).status_code == 403
    assert f.state() == before


def _recover(args: list, message_args: dict, nonce: int, chain_id: int, contract: str) -> str:
    v, r, s = args[-3:]
    message = eip712.GrantConsent(**message_args, nonce=nonce, deadline=args[5])
    digest = eip712.digest(message, chain_id=chain_id, verifying_contract=contract)
    signature = keys.Signature(vrs=(v - 27, int.from_bytes(r, "big"), int.from_bytes(s, "big")))
    return signature.recover_public_key_from_msg_hash(digest).to_checksum_address().lower()


def test_a_delegate_grants_and_revokes_a_consent_for_the_patient_signed_with_their_own_key(family):
    f, a = family, family.ids
    f.designate(a["mum"])
    assert f.get("rita", f"Observation/{a['obs']}").status_code == 403

    consent_id = f.grant("mum", consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}")))
    assert f.get("rita", f"Observation/{a['obs']}").status_code == 200

    # the outbox row relays the delegate's signature, and so did the transaction on chain
    with f.node.engine.connect() as conn:
        rows = conn.execute(select(chain_outbox).where(chain_outbox.c.kind == "consent").order_by(chain_outbox.c.id)).all()
        [granted] = chain_events(conn, "ConsentGranted")
    assert [r.fn for r in rows] == ["bind_patient", "set_delegate_by_sig", "grant_by_sig"]
    grant_row = rows[2]
    assert grant_row.status == "done" and grant_row.tx_hash == granted.tx_hash
    args = decode_args(grant_row.args)
    service, chain = f.node.consent_service, f.node.chain
    assert args[:3] == [service.pseudonym(a["alice"]), service.grantee_hash(f"Practitioner/{a['rita']}"),
                        bytes(granted.args["provision_hash"])]
    terms = {"pseudonym": args[0], "grantee": args[1], "provision_hash": args[2], "valid_from": args[3],
             "valid_until": args[4]}
    # nonces: 0 bound the patient, 1 designated the delegate, 2 is this grant
    chain_id, registry = chain.client.chain_id(), chain.addresses["ConsentRegistry"]
    assert _recover(args, terms, 2, chain_id, registry) == f.address("mum") != f.address("alice")
    tx = chain.client.get_transaction(granted.tx_hash)
    _, fn, call = decode_call("ConsentRegistry", tx.input)
    on_chain = [call[k] for k in ("pseudonym", "grantee", "provision_hash", "valid_from", "valid_until", "deadline",
                                  "v", "r", "s")]
    assert fn == "grant_by_sig" and _recover(on_chain, terms, 2, chain_id, registry) == f.address("mum")

    r = f.client.delete(f"/fhir/Consent/{consent_id}", headers=f.auth("mum"))
    assert r.status_code == 204, r.text
    f.settle()
    assert f.get("rita", f"Observation/{a['obs']}").status_code == 403
    with f.node.engine.connect() as conn:
        assert [e.name for e in chain_events(conn, contract="ConsentRegistry")][-1] == "ConsentRevoked"


def test_a_removed_delegate_loses_the_record_and_cannot_sign_anything_more(family):
    f, a = family, family.ids
    f.designate(a["mum"])
    consent_id = f.grant("mum", consent(a["alice"], permit_observations(f"Practitioner/{a['rita']}")))

    r = f.delegate("alice", a["mum"], enabled=False)
    assert r.status_code == 200 and r.json()["status"] == "pending" and r.json()["enabled"] is False
    # while the removal waits for the chain the delegate can no longer sign: nothing stored or enqueued
    before = f.state()
    body = consent(a["alice"], permit_observations(f"Practitioner/{a['doc']}"))
    r = f.client.post("/fhir/Consent", json=body, headers=f.auth("mum"))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome", r.text
    assert f.state() == before

    f.settle()
    assert [d["status"] for d in f.delegations("alice")["delegates"]] == ["removed"]
    with f.node.engine.connect() as conn:
        assert [e.args["enabled"] for e in chain_events(conn, "DelegateSet")] == [True, False]
    assert f.get("mum", f"Observation/{a['obs']}").status_code == 403
    assert f.search_ids("mum", f"Observation?subject=Patient/{a['alice']}") == (0, [])
    before = f.state()
    for r in (f.client.post("/fhir/Consent", json=body, headers=f.auth("mum")),
              f.client.put(f"/fhir/Consent/{consent_id}", json={**body, "id": consent_id}, headers=f.auth("mum")),
              f.client.delete(f"/fhir/Consent/{consent_id}", headers=f.auth("mum"))):
        assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome", r.text
    assert f.state() == before
    assert f.get("rita", f"Observation/{a['obs']}").status_code == 200  # what the delegate granted stands

    # removing again is refused; adding again works
    assert f.delegate("alice", a["mum"], enabled=False).status_code == 404
    assert f.designate(a["mum"])["status"] == "active"
    assert f.get("mum", f"Observation/{a['obs']}").status_code == 200


def test_each_bad_designation_gets_a_4xx_outcome_and_nothing_is_recorded(family):
    f, a = family, family.ids
    f.designate(a["mum"])
    before = f.state()
    bad = {
        "another patient's RelatedPerson": ("alice", {"relatedPerson": f"RelatedPerson/{a['bobs_mum']}", "enabled": True}, 400),
        "a RelatedPerson without an account": ("alice", {"relatedPerson": f"RelatedPerson/{a['aunt']}", "enabled": True}, 400),
        "a RelatedPerson that does not exist": ("alice", {"relatedPerson": "RelatedPerson/nobody", "enabled": True}, 400),
        "the patient as their own delegate": ("alice", {"relatedPerson": f"RelatedPerson/{a['self']}", "enabled": True}, 400),
        "not a RelatedPerson reference": ("alice", {"relatedPerson": f"Patient/{a['bob']}", "enabled": True}, 400),
        "enabled is not a boolean": ("alice", {"relatedPerson": f"RelatedPerson/{a['aunt']}", "enabled": "yes"}, 400),
        "removing someone who does not act for the patient": (
            "alice", {"relatedPerson": f"RelatedPerson/{a['aunt']}", "enabled": False}, 404),
        "a delegate designating further delegates": ("mum", {"relatedPerson": f"RelatedPerson/{a['aunt']}", "enabled": True}, 403),
        "a delegate removing themselves": ("mum", {"relatedPerson": f"RelatedPerson/{a['mum']}", "enabled": False}, 403),
        "another patient": ("bob", {"relatedPerson": f"RelatedPerson/{a['mum']}", "enabled": True}, 400),
        "a practitioner": ("doc", {"relatedPerson": f"RelatedPerson/{a['mum']}", "enabled": True}, 403),
    }
    for what, (who, body, status) in bad.items():
        r = f.client.post("/api/consent/delegates", json=body, headers=f.auth(who))
        assert r.status_code == status, (what, r.status_code, r.text)
        assert r.json()["resourceType"] == "OperationOutcome", what
        assert "Traceback" not in r.text
    r = f.client.post("/api/consent/delegates", content=b"{not json", headers=f.auth("alice"))
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert f.client.get("/api/consent/delegates", headers=f.auth("doc")).status_code == 403
    assert f.state() == before
    # a delegate of another patient gets nothing of this one
    assert f.get("wendy", f"Observation/{a['obs']}").status_code == 403


def test_the_portal_adds_a_delegate_who_then_manages_the_patients_consents_and_is_removed(family):
    from fastapi.testclient import TestClient

    f, a = family, family.ids

    def browser(username: str) -> TestClient:
        page = TestClient(f.client.app)  # its own cookie jar
        r = page.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
        assert r.status_code == 303, r.text
        return page

    alice, mum = browser("alice"), browser("mum")
    r = alice.get("/portal/consents")
    assert r.status_code == 200 and "People who can act for me" in r.text and "Nobody acts for you." in r.text
    # only RelatedPersons of alice who have an account, and not alice herself
    assert f'value="RelatedPerson/{a["mum"]}"' in r.text
    assert f'value="RelatedPerson/{a["aunt"]}"' not in r.text and f'value="RelatedPerson/{a["self"]}"' not in r.text
    r = mum.get("/portal/consents")
    assert r.status_code == 200 and "Nobody has chosen you" in r.text
    # a delegate without a record of their own is offered no "my record" pages
    assert ">People I act for</a>" in r.text and 'href="/portal/notes"' not in r.text
    assert 'href="/visits/book"' not in r.text and 'href="/portal/access-log"' not in r.text
    home = alice.get("/portal").text
    assert ">Who can see my record</a>" in home and 'href="/portal/notes"' in home

    r = alice.post("/portal/consents/delegates", data={"relatedPerson": f"RelatedPerson/{a['mum']}", "enabled": "true"},
                   follow_redirects=False)
    assert r.status_code == 303, r.text
    r = alice.get("/portal/consents")  # the chain may already have recorded it
    assert "Lorina Liddell" in r.text and ('class="delegate-status">waiting for the chain<' in r.text
                                           or 'class="delegate-status">can act for you<' in r.text)
    f.settle()
    r = alice.get("/portal/consents")
    assert "Lorina Liddell" in r.text and 'class="delegate-status">can act for you<' in r.text

    r = mum.get("/portal/consents")
    assert f'href="/portal/consents/for/{a["alice"]}"' in r.text and "Alice Liddell" in r.text
    r = mum.get(f"/portal/consents/for/{a['alice']}")
    assert r.status_code == 200 and "Who can see Alice Liddell's record" in r.text
    assert f'action="/portal/consents/for/{a["alice"]}"' in r.text and "People who can act for me" not in r.text
    r = mum.post(f"/portal/consents/for/{a['alice']}", data={"actor": f"Practitioner/{a['rita']}",
                                                             "class": ["Observation"]}, follow_redirects=False)
    assert r.status_code == 303, r.text
    f.settle()
    assert f.get("rita", f"Observation/{a['obs']}").status_code == 200
    assert "in force" in mum.get(f"/portal/consents/for/{a['alice']}").text
    assert "in force" in alice.get("/portal/consents").text  # the patient sees what was granted for them
    # a bad form is shown again with the reason, and records nothing
    before = f.state()
    r = mum.post(f"/portal/consents/for/{a['alice']}", data={"actor": f"Practitioner/{a['rita']}",
                                                             "start": "2030-01-01", "end": "2029-01-01"})
    assert r.status_code == 400 and 'role="alert"' in r.text
    assert f.state() == before
    # nobody else opens alice's page
    assert browser("wendy").get(f"/portal/consents/for/{a['alice']}").status_code == 403
    assert browser("bob").get(f"/portal/consents/for/{a['alice']}").status_code == 403

    r = alice.post("/portal/consents/delegates", data={"relatedPerson": f"RelatedPerson/{a['mum']}", "enabled": "false"},
                   follow_redirects=False)
    assert r.status_code == 303, r.text
    f.settle()
    assert 'class="delegate-status">removed<' in alice.get("/portal/consents").text
    assert mum.get(f"/portal/consents/for/{a['alice']}").status_code == 403
    # a refused portal form says why and records nothing
    before = f.state()
    r = alice.post("/portal/consents/delegates", data={"relatedPerson": f"RelatedPerson/{a['bobs_mum']}",
                                                       "enabled": "true"})
    assert r.status_code == 400 and 'role="alert"' in r.text and "not a person related to you" in r.text
    assert f.state() == before
