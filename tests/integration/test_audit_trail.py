"""Every change and every access lands in the transparency log, readable as AuditEvents with proofs."""

from __future__ import annotations

import base64
import hashlib

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import func, select

from teleledger.ledger.log import entry as log_entry
from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import open_checkpoint
from teleledger.ledger.log.storage import log_leaves, log_queue
from tests.integration.helpers import create, observation, patient, service_headers, token

PW = "long-enough-password"


@pytest.fixture
def world(client, node):  # type: ignore[no-untyped-def]
    svc = service_headers(client, node)
    alice = create(client, svc, patient(family="Alice"))
    bob = create(client, svc, patient(family="Bob"))
    doc = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})
    obs = create(client, svc, observation(alice["id"]))
    node.accounts.create_user(username="alice", password=PW, role="patient", patient=f"Patient/{alice['id']}")
    node.accounts.create_user(username="bob", password=PW, role="patient", patient=f"Patient/{bob['id']}")
    node.accounts.create_user(username="doc", password=PW, role="practitioner", practitioner=f"Practitioner/{doc['id']}")
    node.accounts.create_user(username="admin", password=PW, role="admin")
    return {"svc": svc, "alice": alice, "bob": bob, "obs": obs, "client": client, "node": node}


def events(client, headers, query: str = "") -> list[dict]:  # type: ignore[no-untyped-def]
    r = client.get(f"/fhir/AuditEvent?_count=200{query}", headers=headers)
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def test_every_write_appends_a_change_entry_with_the_keyed_hash_of_the_stored_version(world):
    node = world["node"]
    node.log.flush()
    with node.engine.connect() as conn:
        leaves = [log_entry.decode(row.leaf) for row in conn.execute(select(log_leaves.c.leaf))]
    changes = {(e.resource_type, e.resource_id, e.version): e for e in leaves if isinstance(e, log_entry.ChangeEntry)}
    obs = world["obs"]
    entry = changes[("Observation", obs["id"], 1)]
    assert entry.content_hmac == log_entry.content_hmac(node.auditor.key, obs)
    # the log holds no PHI: the family names never appear in any leaf
    with node.engine.connect() as conn:
        raw = b"".join(row.leaf for row in conn.execute(select(log_leaves.c.leaf)))
    assert b"Alice" not in raw and b"Bob" not in raw


def test_a_patient_read_is_an_audit_event_in_their_own_list_with_who_what_and_why(world):
    client = world["client"]
    alice_h = token(client, "alice", PW)
    assert client.get(f"/fhir/Observation/{world['obs']['id']}", headers=alice_h).status_code == 200
    mine = events(client, alice_h)
    reads = [e for e in mine if e["subtype"][0]["code"] == "read"]
    assert reads, mine
    ev = reads[0]
    AuditEvent.model_validate(ev)  # a valid FHIR AuditEvent
    refs = {x["what"]["reference"] for x in ev["entity"]}
    assert f"Patient/{world['alice']['id']}" in refs and f"Observation/{world['obs']['id']}/_history/1" in refs
    assert ev["agent"][0]["who"]["reference"] == f"Patient/{world['alice']['id']}"
    assert ev["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT" and ev["outcome"] == "0"
    # Alice never sees Bob's events
    assert all(e.get("entity", [{}])[0].get("what", {}).get("reference") != f"Patient/{world['bob']['id']}" for e in mine)


def test_a_denied_attempt_is_recorded_and_shown_to_the_patient_it_concerned(world):
    client = world["client"]
    bob_h = token(client, "bob", PW)
    assert client.get(f"/fhir/Observation/{world['obs']['id']}", headers=bob_h).status_code == 403
    alice_events = events(client, token(client, "alice", PW))
    denied = [e for e in alice_events if e["outcome"] == "4"]
    assert len(denied) == 1
    assert denied[0]["outcomeDesc"] == "not-own-compartment"
    assert denied[0]["agent"][0]["who"]["reference"] == f"Patient/{world['bob']['id']}"
    # searchable by outcome
    only_denied = events(client, token(client, "alice", PW), "&outcome=4")
    assert [e["id"] for e in only_denied] == [denied[0]["id"]]


def test_search_hits_and_includes_are_each_recorded(world):
    client, alice = world["client"], world["alice"]
    svc = world["svc"]
    r = client.get(f"/fhir/Observation?patient={alice['id']}&_include=Observation:patient", headers=svc)
    assert r.status_code == 200
    admin_events = events(client, token(client, "admin", PW), f"&patient={alice['id']}&subtype=search")
    refs = {x["what"]["reference"] for x in admin_events[0]["entity"]}
    assert f"Observation/{world['obs']['id']}/_history/1" in refs and f"Patient/{alice['id']}/_history/1" in refs


def test_practitioners_see_only_their_own_actions_and_admins_see_all(world):
    client = world["client"]
    doc_h = token(client, "doc", PW)
    client.get(f"/fhir/Patient/{world['alice']['id']}", headers=doc_h)  # denied: no relationship
    mine = events(client, doc_h)
    assert mine and all(e["agent"][0]["who"]["reference"].startswith("Practitioner/") for e in mine)
    everyone = events(client, token(client, "admin", PW))
    assert len(everyone) > len(mine)


def test_audit_events_cannot_be_written_by_clients(world):
    client, svc = world["client"], world["svc"]
    r = client.post("/fhir/AuditEvent", json={"resourceType": "AuditEvent"}, headers=svc)
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"


def test_an_audit_event_is_provably_in_the_signed_log(world):
    client, node = world["client"], world["node"]
    alice_h = token(client, "alice", PW)
    client.get(f"/fhir/Patient/{world['alice']['id']}", headers=alice_h)
    node.log.flush()
    ev = events(client, alice_h)[0]
    leaf_hash = base64.b64decode(ev["extension"][0]["valueBase64Binary"])
    note = client.get("/ledger/checkpoint").text
    checkpoint = open_checkpoint(note, [node.log.verifier])[0]
    proof = client.get("/ledger/proof/inclusion", params={"hash": base64.b64encode(leaf_hash).decode(),
                                                          "tree_size": checkpoint.size}).json()
    path = [base64.b64decode(p) for p in proof["audit_path"]]
    merkle.verify_inclusion(leaf_hash, proof["leaf_index"], checkpoint.size, path, checkpoint.root_hash)
    # and the leaf is exactly the access entry the AuditEvent describes
    leaf = base64.b64decode(client.get("/ledger/entries", params={"start": proof["leaf_index"],
                                                                  "end": proof["leaf_index"] + 1}
                                       ).json()["entries"][0]["leaf_input"])
    assert hashlib.sha256(b"\x00" + leaf).digest() == leaf_hash
    decoded = log_entry.decode(leaf)
    assert decoded.action == "read" and decoded.outcome == "allowed"


def test_a_rolled_back_transaction_leaves_no_log_entry(world):
    client, node, svc = world["client"], world["node"], world["svc"]
    node.log.flush()
    with node.engine.connect() as conn:
        before = (conn.execute(select(func.count()).select_from(log_queue)).scalar_one(), node.log.tree_size())
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(family="Ghost"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "birthDate": "nope"}, "request": {"method": "POST", "url": "Patient"}},
    ]}
    assert client.post("/fhir", json=bundle, headers=svc).status_code == 400
    with node.engine.connect() as conn:
        after = (conn.execute(select(func.count()).select_from(log_queue)).scalar_one(), node.log.tree_size())
    assert after == before
