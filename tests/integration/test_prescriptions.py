"""E-prescriptions through the FHIR API on a real node and a real chain (SQLite and PostgreSQL,
the embedded chain; and two nodes on one Hardhat node).

The clinic: Dr Doc (``doc``) sees Alice (``alice``); ``pharm`` is a pharmacist of the node's own
organization, ``pharm2`` of a second pharmacy organization registered on the same embedded
chain (on the embedded chain the node's authority is the consortium admin, so a second
organization on the same node stands in for another pharmacy; the Hardhat test runs a real
second node with its own home and database), ``rogue`` claims a pharmacy the chain never
admitted.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from eth_keys import keys
from sqlalchemy import func, select

from teleledger.ledger.chain import ROLE_ORG_ADMIN, ROLE_OPERATOR, ROLE_PHARMACIST
from teleledger.ledger.chain.anchoring import org_id
from teleledger.ledger.chain.deploy import addresses_path, deploy_all, save_addresses
from teleledger.ledger.chain.rpc import JsonRpcChain
from teleledger.ledger.chain.storage import chain_outbox
from teleledger.policy.model import Principal
from teleledger.prescriptions import token as rxtoken
from teleledger.prescriptions.service import TOKEN_EXTENSION, TOKEN_HEADER, PrescriptionService
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.clinic import encounter
from tests.integration.helpers import FHIR, create, patient, service_headers
from tests.integration.test_chain_support import fund, hardhat_url

PASSWORD = "correct horse 1"
SECOND_PHARMACY = "pharmacy-two"


def _future(days: int = 30) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).date().isoformat()


def medication_request(patient_id: str, *, quantity: Any = 10, refills: Any = 1, until: str | None = None,
                       **extra: Any) -> dict:
    return {
        "resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "197361", "display": "Amlodipine 5 MG Oral Tablet"}]},
        "dosageInstruction": [{"text": "1 tablet by mouth once daily"}],
        "dispenseRequest": {"quantity": {"value": quantity, "unit": "tablet"}, "numberOfRepeatsAllowed": refills,
                            "validityPeriod": {"end": until or _future()}},
        "substitution": {"allowedBoolean": False},
        **extra,
    }


class Rx:
    """One node's clinic, spoken to through its FHIR API."""

    def __init__(self, client: Any, node: Any) -> None:
        self.client = client
        self.node = node
        self.service = PrescriptionService.for_node(node)
        self._tokens: dict[str, dict] = {}
        self.ids: dict[str, str] = {}

    def auth(self, username: str) -> dict:
        if username not in self._tokens:
            r = self.client.post("/auth/token", data={"grant_type": "password", "username": username,
                                                     "password": PASSWORD})
            assert r.status_code == 200, r.text
            self._tokens[username] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        return self._tokens[username]

    def principal(self, username: str) -> Principal:
        token = self.auth(username)["Authorization"].split()[1]
        return Principal.from_claims(self.node.verifier.verify(token))

    def issue(self, username: str = "doc", **kw: Any):  # type: ignore[no-untyped-def]
        return self.client.post("/fhir/MedicationRequest", json=medication_request(self.ids["alice"], **kw),
                                headers={**self.auth(username), **FHIR})

    def dispense(self, username: str, quantity: Any, *, token: str | None = None, rx_id: str | None = None,
                 via: str = "header"):  # type: ignore[no-untyped-def]
        body: dict = {"resourceType": "MedicationDispense", "status": "completed",
                      "medicationCodeableConcept": {"text": "as prescribed"},
                      "quantity": {"value": quantity}}
        if rx_id:
            body["authorizingPrescription"] = [{"reference": f"MedicationRequest/{rx_id}"}]
        headers = {**self.auth(username), **FHIR}
        if token and via == "header":
            headers[TOKEN_HEADER] = token
        elif token:
            body["extension"] = [{"url": TOKEN_EXTENSION, "valueString": token}]
        return self.client.post("/fhir/MedicationDispense", json=body, headers=headers)

    def counts(self) -> tuple[int, int]:
        """(MedicationDispense resources, chain outbox rows) stored at this node."""
        with self.node.engine.connect() as conn:
            md = conn.execute(select(func.count()).select_from(t.resources)
                              .where(t.resources.c.res_type == "MedicationDispense")).scalar_one()
            rows = conn.execute(select(func.count()).select_from(chain_outbox)).scalar_one()
        return int(md), int(rows)

    def chain_events(self) -> int:
        client = self.node.chain.client
        return len(client.get_logs(self.node.chain.addresses["PrescriptionRegistry"], 0))

    def rx_status(self, rx_id: str) -> str:
        r = self.client.get(f"/fhir/MedicationRequest/{rx_id}", headers=self.auth("doc"))
        assert r.status_code == 200, r.text
        return r.json()["status"]


def _setup_clinic(client: Any, node: Any, *, pharmacists: dict[str, str | None]) -> Rx:
    rx = Rx(client, node)
    svc = service_headers(client, node)
    rx.ids["alice"] = create(client, svc, patient(family="Liddell", given="Alice"))["id"]
    rx.ids["doc"] = create(client, svc, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})["id"]
    create(client, svc, encounter(rx.ids["alice"], rx.ids["doc"]))
    node.accounts.create_user(username="doc", password=PASSWORD, role="practitioner",
                              practitioner=f"Practitioner/{rx.ids['doc']}")
    node.accounts.create_user(username="alice", password=PASSWORD, role="patient", patient=f"Patient/{rx.ids['alice']}")
    for name, org in pharmacists.items():
        node.accounts.create_user(username=name, password=PASSWORD, role="pharmacist")
        if org:
            rx.service.assign_pharmacy(name, org)
    return rx


@pytest.fixture
def rx(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                               chain_poll_interval=0.05))
    try:
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            clinic = _setup_clinic(client, node, pharmacists={"pharm": None, "pharm2": SECOND_PHARMACY,
                                                              "rogue": "never-admitted"})
            clinic.service.register_organization(SECOND_PHARMACY)
            clinic.service.ensure_member("pharm2", ROLE_PHARMACIST, org=SECOND_PHARMACY)
            yield clinic
    finally:
        node.close()


def _issued(rx: Rx, **kw: Any) -> tuple[str, str]:
    r = rx.issue(**kw)
    assert r.status_code == 201, r.text
    body = r.json()
    token = r.headers[TOKEN_HEADER]
    assert rx.service.token_of(body) == token
    return body["id"], token


def _outcome(r: Any) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(i.get("diagnostics", "") for i in body["issue"])


# --------------------------------------------------------------------------- the happy path


def test_an_issued_prescription_verifies_and_is_dispensed_in_parts_and_refills_until_completed(rx: Rx) -> None:
    rx_id, token = _issued(rx, quantity=10, refills=1)
    assert rx.rx_status(rx_id) == "active"
    v = rx.service.verify(token)
    assert v.dispensable and v.signer_is_prescriber and v.terms_match and v.prescriber_registered
    assert (v.chain.remaining, v.chain.refills_remaining, v.dispenses) == (20, 1, [])

    first = rx.dispense("pharm", 4, token=token)
    assert first.status_code == 201, first.text
    md = first.json()
    assert md["status"] == "completed" and md["quantity"]["value"] == 4
    assert md["authorizingPrescription"] == [{"reference": f"MedicationRequest/{rx_id}"}]
    assert md["subject"] == {"reference": f"Patient/{rx.ids['alice']}"}  # joins the patient's record
    assert rx.dispense("pharm", 6, rx_id=rx_id).status_code == 201  # the rest of fill 1, by reference alone
    assert rx.rx_status(rx_id) == "active"
    assert rx.dispense("pharm2", 10, token=token, via="extension").status_code == 201  # the refill, elsewhere

    v = rx.service.verify(token)
    assert (v.chain.remaining, v.chain.completed) == (0, True)
    assert [(d.pharmacy, d.quantity, d.fill_number) for d in v.dispenses] == [
        (rx.node.settings.node_name, 4, 1), (rx.node.settings.node_name, 6, 1), (SECOND_PHARMACY, 10, 2)]
    assert rx.rx_status(rx_id) == "completed"
    again = rx.dispense("pharm", 1, token=token)
    assert again.status_code == 409 and "fully dispensed" in _outcome(again)


def test_the_patient_reads_their_prescription_and_its_dispenses_but_a_pharmacist_cannot_read_the_record(rx: Rx) -> None:
    rx_id, token = _issued(rx)
    assert rx.dispense("pharm2", 3, token=token).status_code == 201
    mine = rx.service.mine(rx.principal("alice"))
    assert [(p.rx_id, p.token, p.chain.remaining) for p in mine] == [(rx_id, token, 17)]
    assert [(d.pharmacy, d.quantity) for d in mine[0].dispenses] == [(SECOND_PHARMACY, 3)]
    # the pharmacy verified and dispensed without any access to the prescriber's store
    assert rx.client.get(f"/fhir/MedicationRequest/{rx_id}", headers=rx.auth("pharm2")).status_code == 403


def test_the_prescriber_cancels_and_the_chain_and_the_request_say_cancelled(rx: Rx) -> None:
    rx_id, token = _issued(rx)
    with pytest.raises(Exception, match="not-own-prescription"):
        rx.service.cancel(rx.principal("alice"), rx_id)
    rx.service.cancel(rx.principal("doc"), rx_id)
    assert rx.rx_status(rx_id) == "cancelled"
    assert rx.service.verify(token).chain.cancelled
    before = rx.counts()
    r = rx.dispense("pharm", 1, token=token)
    assert r.status_code == 409 and "prescription cancelled" in _outcome(r)
    assert rx.counts() == before


# --------------------------------------------------------------------------- bad input


def _repack(token: str, *, content: dict | None = None, signature: bytes | None = None) -> str:
    _, body, sig = token.split(".")
    payload = json.loads(rxtoken._unb64(body))
    if content is not None:
        payload["content"] = content
    new_sig = rxtoken._b64(signature) if signature is not None else sig
    return rxtoken.PREFIX + rxtoken._b64(rxtoken.canonical(payload)) + "." + new_sig


@pytest.mark.parametrize("case", ["altered-quantity", "forged-signature", "unknown-to-chain", "quantity-zero",
                                  "quantity-negative", "quantity-fraction", "over-remaining",
                                  "unregistered-pharmacy", "not-a-pharmacist", "garbage-token"])
def test_bad_dispenses_are_clear_errors_and_record_nothing(rx: Rx, case: str) -> None:
    rx_id, token = _issued(rx, quantity=10, refills=0)
    claims = rxtoken.verify_token(token)
    username, quantity, expected, status = "pharm", 1, "", 0
    if case == "altered-quantity":
        content = dict(claims.content, quantity={"value": 1000, "unit": "tablet"})
        token, status, expected = _repack(token, content=content), 409, "unknown prescription"
    elif case == "forged-signature":
        stranger = keys.PrivateKey(b"\x07" * 32)
        token, forged = rxtoken.make_token(claims.content, stranger, issuer=claims.issuer,
                                           chain_id=claims.chain_id, registry=claims.registry, salt=claims.salt)
        status, expected = 400, "not signed by the prescriber"
        assert forged.rx_hash == claims.rx_hash  # the same prescription, someone else's signature
    elif case == "unknown-to-chain":
        never = dict(claims.content, id="never-issued")
        token, _ = rxtoken.make_token(never, rx.node.keystore.key("user:doc"), issuer=claims.issuer,
                                      chain_id=claims.chain_id, registry=claims.registry)
        status, expected = 409, "unknown prescription"
    elif case == "quantity-zero":
        quantity, status, expected = 0, 400, "whole number above 0"
    elif case == "quantity-negative":
        quantity, status, expected = -2, 400, "whole number above 0"
    elif case == "quantity-fraction":
        quantity, status, expected = 1.5, 400, "whole number above 0"
    elif case == "over-remaining":
        quantity, status, expected = 11, 409, "exceeds what remains"
    elif case == "unregistered-pharmacy":
        username, status, expected = "rogue", 403, "not registered"
    elif case == "not-a-pharmacist":
        username, status, expected = "doc", 0, ""
    elif case == "garbage-token":
        token, status, expected = "TLRX1.bm90.anNvbg", 400, "token"
    before, events = rx.counts(), rx.chain_events()
    r = rx.dispense(username, quantity, token=token)
    if case == "not-a-pharmacist":
        # a practitioner's MedicationDispense is not a dispense: the generic create's rules apply,
        # and without the chain nothing is taken from the prescription
        assert r.status_code in (201, 400, 403), r.text
        assert rx.service.verify(_issued_token(rx, rx_id)).chain.remaining == 10
        return
    assert r.status_code == status, r.text
    assert expected in _outcome(r)
    assert rx.counts() == before and rx.chain_events() == events
    assert rx.service.verify(_issued_token(rx, rx_id)).chain.remaining == 10


def _issued_token(rx: Rx, rx_id: str) -> str:
    r = rx.client.get(f"/fhir/MedicationRequest/{rx_id}", headers=rx.auth("doc"))
    return rx.service.token_of(r.json())  # type: ignore[return-value]


def test_an_expired_prescription_is_refused_and_nothing_is_recorded(rx: Rx) -> None:
    until = (datetime.now(timezone.utc) + timedelta(seconds=3)).replace(microsecond=0)
    rx_id, token = _issued(rx, until=until.isoformat().replace("+00:00", "Z"))
    time.sleep(max(0.0, until.timestamp() - time.time()) + 1.5)
    rx.node.chain.client.transact(  # a block after the expiry, so the chain's clock has moved past it
        rx.node.chain.addresses["ParticipantRegistry"], "ParticipantRegistry", "set_member_roles",
        org_id(rx.node.settings.node_name), rx.node.keystore.address("node:authority"),
        ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=rx.node.keystore.key("node:authority"))
    before, events = rx.counts(), rx.chain_events()
    r = rx.dispense("pharm", 1, token=token)
    assert r.status_code == 409 and "expired" in _outcome(r), r.text
    assert rx.counts() == before and rx.chain_events() == events


@pytest.mark.parametrize("change,expected", [
    ({"quantity": 0}, "quantity per fill"), ({"quantity": 2.5}, "quantity per fill"),
    ({"refills": -1}, "refills"), ({"until": "2001-01-01"}, "in the future"),
])
def test_a_bad_prescription_is_refused_before_anything_is_stored(rx: Rx, change: dict, expected: str) -> None:
    before, events = rx.counts(), rx.chain_events()
    r = rx.issue(**change)
    assert r.status_code == 400 and expected in _outcome(r), r.text
    assert rx.counts() == before and rx.chain_events() == events


def test_a_patient_cannot_issue_a_prescription_through_the_service(rx: Rx) -> None:
    r = rx.issue(username="alice")
    assert r.status_code in (400, 403)  # the generic create's rules: not a signed prescription
    assert rx.service.mine(rx.principal("alice")) == []


# --------------------------------------------------------------------------- the race


def _race(dispense_a: Any, dispense_b: Any) -> list[Any]:
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(i: int, fn: Any) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((dispense_a, dispense_b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return results


def test_two_pharmacies_dispensing_the_last_fill_at_once_one_succeeds_and_one_is_refused(rx: Rx) -> None:
    rx_id, token = _issued(rx, quantity=5, refills=0)
    results = _race(lambda: rx.dispense("pharm", 5, token=token), lambda: rx.dispense("pharm2", 5, token=token))
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 409], [r.text for r in results]
    loser = next(r for r in results if r.status_code == 409)
    assert any(reason in _outcome(loser) for reason in ("fully dispensed", "exceeds what remains"))
    v = rx.service.verify(token)
    assert v.chain.remaining == 0 and len(v.dispenses) == 1
    assert rx.rx_status(rx_id) == "completed"


# --------------------------------------------------------------------------- two nodes on Hardhat


def _hardhat_nodes(tmp_path: Path) -> tuple[Any, Any]:
    """Two nodes (own homes, own SQLite databases) on one Hardhat chain: contracts deployed by
    node A's authority as the consortium admin; organizations rx-a and rx-b admitted with each
    node's authority as its admin; every key that sends transactions funded."""
    from teleledger.bootstrap import build

    url = hardhat_url()
    nodes = []
    for name in ("rx-a", "rx-b"):
        home = tmp_path / name
        home.mkdir()
        nodes.append(make_settings(home, f"sqlite:///{home / 'db.sqlite3'}", chain_enabled=True, chain_url=url,
                                   chain_poll_interval=0.05, node_name=f"{name}.test", chain_org=name,
                                   base_url=f"http://{name}.test"))
    # keys first (a node without contracts does not start): a chain-less build makes the keystore
    for s in nodes:
        build(s.model_copy(update={"chain_enabled": False})).close()
    keyed = [build(s.model_copy(update={"chain_enabled": False})) for s in nodes]
    authorities = [n.keystore.key("node:authority") for n in keyed]
    for n in keyed:
        n.close()
    client = JsonRpcChain(url)
    try:
        for k in authorities:
            fund(url, k.public_key.to_checksum_address())
        first_block = client.block_number()  # a shared Hardhat node may be long: index from here
        addresses = deploy_all(client, authorities[0], [authorities[0].public_key.to_checksum_address()], 1)
        registry = addresses["ParticipantRegistry"]
        for s, k in zip(nodes, authorities):
            client.transact(registry, "ParticipantRegistry", "approve_organization", org_id(s.chain_org),
                            k.public_key.to_checksum_address(), sender=authorities[0])
            client.transact(registry, "ParticipantRegistry", "set_member_roles", org_id(s.chain_org),
                            k.public_key.to_checksum_address(), ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=k)
            save_addresses(addresses_path(s.home), client.chain_id(), addresses, deployed_block=first_block)
    finally:
        client.close()
    return build(nodes[0]), build(nodes[1])


@pytest.mark.parametrize("backend", ["sqlite"])
def test_on_hardhat_a_pharmacy_of_another_node_verifies_with_the_token_alone_and_wins_or_loses_the_race_cleanly(
        tmp_path: Path, backend: str) -> None:
    from fastapi.testclient import TestClient

    from teleledger.web.app import create_app

    url = hardhat_url()
    node_a, node_b = _hardhat_nodes(tmp_path)
    try:
        with TestClient(create_app(node_a), raise_server_exceptions=False) as ca, \
                TestClient(create_app(node_b), raise_server_exceptions=False) as cb:
            a = _setup_clinic(ca, node_a, pharmacists={"pharm-a": None})
            b = Rx(cb, node_b)
            node_b.accounts.create_user(username="pharm-b", password=PASSWORD, role="pharmacist")
            for n, user in ((node_a, "doc"), (node_a, "pharm-a"), (node_b, "pharm-b")):
                fund(url, n.keystore.address(f"user:{user}"))

            rx_id, token = _issued(a, quantity=10, refills=0)
            v = b.service.verify(token)  # node B has never seen this prescription: token + chain only
            assert v.dispensable and v.signer_is_prescriber and v.claims.issuer == "http://rx-a.test"
            first = b.dispense("pharm-b", 4, token=token)
            assert first.status_code == 201, first.text
            assert first.json()["authorizingPrescription"] == [
                {"reference": f"http://rx-a.test/fhir/MedicationRequest/{rx_id}"}]
            assert [(d.pharmacy, d.quantity) for d in a.service.verify(token).dispenses] == [("rx-b", 4)]

            # the last 6 units, claimed by a pharmacy of each node at the same instant
            results = _race(lambda: a.dispense("pharm-a", 6, token=token),
                            lambda: b.dispense("pharm-b", 6, token=token))
            assert sorted(r.status_code for r in results) == [201, 409], [r.text for r in results]
            loser = next(r for r in results if r.status_code == 409)
            assert any(s in _outcome(loser) for s in ("fully dispensed", "exceeds what remains"))
            assert a.service.verify(token).chain.remaining == 0
            deadline = time.monotonic() + 10
            while a.rx_status(rx_id) != "completed" and time.monotonic() < deadline:
                time.sleep(0.1)  # node A learns of node B's dispense through its indexer
            assert a.rx_status(rx_id) == "completed"
    finally:
        node_a.close()
        node_b.close()
