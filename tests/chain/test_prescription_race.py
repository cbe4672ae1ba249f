"""Two pharmacies dispense the last of a prescription at the same instant: exactly one wins.

The contract itself settles the race (the chain orders the two transactions; the second finds
nothing left), so the loser gets ``ChainRevert`` with the contract's exact reason and the chain
records one dispense. Runs on every ChainClient backend, like test_conformance.py:

    embedded   the in-process py-evm chain in a temporary directory (always)
    hardhat    a real Hardhat node at $TELELEDGER_TEST_CHAIN_URL (started by .ci/hardhat.sh);
               skipped visibly when unset, a failure when TELELEDGER_REQUIRE_CHAIN=1
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_keys import keys

from teleledger.ledger.chain import ROLE_ORG_ADMIN, ROLE_PHARMACIST, ROLE_PRACTITIONER
from teleledger.ledger.chain.client import ChainClient, ChainRevert, Receipt
from teleledger.ledger.chain.deploy import deploy_all
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.rpc import JsonRpcChain

CHAIN_URL = os.environ.get("TELELEDGER_TEST_CHAIN_URL", "")
REQUIRE_CHAIN = os.environ.get("TELELEDGER_REQUIRE_CHAIN") == "1"
HARDHAT_CHAIN_ID = 31337
EMBEDDED_CHAIN_ID = 1337
# Hardhat's dev account #0: unlocked on every Hardhat node; funds each test's fresh keys
HARDHAT_FUNDER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
CLINIC = b"race-clinic".ljust(32, b"\0")
PHARMACY_A = b"race-pharmacy-a".ljust(32, b"\0")
PHARMACY_B = b"race-pharmacy-b".ljust(32, b"\0")
PATIENT = hashlib.sha256(b"pseudonym of a patient").digest()
RX = "PrescriptionRegistry"
# the fields of PrescriptionRegistry.status(), in ABI order
STATUS_FIELDS = (
    "exists", "prescriber", "prescriber_org", "patient_pseudonym", "quantity_per_fill", "refills",
    "expiry", "issued_at", "fills_completed", "dispensed_in_fill", "refills_remaining",
    "total_dispensed", "remaining", "cancelled", "expired", "completed",
)


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert "error" not in answer, answer
    return answer["result"]


@pytest.fixture(params=["embedded", "hardhat"])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChainClient]:
    if request.param == "embedded":
        client: ChainClient = EmbeddedChain(tmp_path / "chain", keys.PrivateKey(os.urandom(32)), chain_id=EMBEDDED_CHAIN_ID)
    else:
        if not CHAIN_URL:
            if REQUIRE_CHAIN:
                pytest.fail("TELELEDGER_REQUIRE_CHAIN=1 but TELELEDGER_TEST_CHAIN_URL is unset; run .ci/hardhat.sh")
            pytest.skip("no Hardhat node: set TELELEDGER_TEST_CHAIN_URL (eval \"$(.ci/hardhat.sh)\")")
        client = JsonRpcChain(CHAIN_URL, HARDHAT_CHAIN_ID)
    yield client
    client.close()


def fresh_key(client: ChainClient) -> keys.PrivateKey:
    """A new key; on Hardhat funded from dev account #0 (gas is free on the embedded chain)."""
    key = keys.PrivateKey(os.urandom(32))
    if client.mode == "external":
        # set, not transfer: a suite's transfers would drain the dev account
        _rpc(CHAIN_URL, "hardhat_setBalance", [key.public_key.to_checksum_address(), hex(10**20)])
    return key


@dataclass
class World:
    client: ChainClient
    registry: str
    doctor: keys.PrivateKey
    pharmacists: dict[bytes, keys.PrivateKey]

    def status(self, rx_hash: bytes) -> dict[str, Any]:
        return dict(zip(STATUS_FIELDS, self.client.call(self.registry, RX, "status", rx_hash), strict=True))

    def issue(self, rx_hash: bytes, *, quantity: int, refills: int) -> None:
        now = self.client.get_block(self.client.block_number()).timestamp
        self.client.transact(self.registry, RX, "issue", rx_hash, CLINIC, PATIENT, quantity, refills,
                             now + 86_400, sender=self.doctor)

    def dispense(self, rx_hash: bytes, pharmacy: bytes, quantity: int, ref: bytes) -> Receipt:
        return self.client.transact(self.registry, RX, "dispense", rx_hash, pharmacy, quantity, ref,
                                    sender=self.pharmacists[pharmacy])


@pytest.fixture
def world(chain: ChainClient) -> World:
    """A clinic with a doctor and two pharmacies with a pharmacist each, all registered on chain."""
    operator = fresh_key(chain)
    me = operator.public_key.to_checksum_address()
    addresses = deploy_all(chain, operator, [me], 1)
    participants = addresses["ParticipantRegistry"]
    doctor, pharmacist_a, pharmacist_b = fresh_key(chain), fresh_key(chain), fresh_key(chain)
    for org, member, role in ((CLINIC, doctor, ROLE_PRACTITIONER), (PHARMACY_A, pharmacist_a, ROLE_PHARMACIST),
                              (PHARMACY_B, pharmacist_b, ROLE_PHARMACIST)):
        # the operator is the one consortium admin (quorum 1), so it admits each organization
        # with itself as the organization's first admin, who then adds the member
        chain.transact(participants, "ParticipantRegistry", "approve_organization", org, me, sender=operator)
        chain.transact(participants, "ParticipantRegistry", "set_member_roles", org,
                       member.public_key.to_checksum_address(), role, sender=operator)
        assert chain.call(participants, "ParticipantRegistry", "has_role", org, me, ROLE_ORG_ADMIN)
    return World(chain, addresses[RX], doctor, {PHARMACY_A: pharmacist_a, PHARMACY_B: pharmacist_b})


def race(world: World, rx_hash: bytes, quantity: int) -> dict[bytes, Receipt | ChainRevert]:
    """Both pharmacies call ``transact`` for ``quantity`` units at the same instant."""
    barrier = threading.Barrier(2)
    outcomes: dict[bytes, Receipt | ChainRevert] = {}
    unexpected: list[BaseException] = []

    def pharmacy(org: bytes) -> None:
        ref = hashlib.sha256(org + rx_hash).digest()
        barrier.wait(timeout=30)
        try:
            outcomes[org] = world.dispense(rx_hash, org, quantity, ref)
        except ChainRevert as exc:
            outcomes[org] = exc
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            unexpected.append(exc)

    threads = [threading.Thread(target=pharmacy, args=(org,)) for org in (PHARMACY_A, PHARMACY_B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not unexpected, unexpected
    assert set(outcomes) == {PHARMACY_A, PHARMACY_B}
    return outcomes


@pytest.mark.parametrize("round_", range(3))
def test_two_pharmacies_dispensing_the_last_refill_at_once_exactly_one_succeeds(world: World, round_: int) -> None:
    rx_hash = hashlib.sha256(b"race-rx-%d" % round_).digest()
    world.issue(rx_hash, quantity=10, refills=1)
    first = world.dispense(rx_hash, PHARMACY_A, 10, hashlib.sha256(b"first fill").digest())
    assert world.status(rx_hash)["refills_remaining"] == 1

    outcomes = race(world, rx_hash, 10)

    winners = [org for org, o in outcomes.items() if isinstance(o, Receipt)]
    losers = [org for org, o in outcomes.items() if isinstance(o, ChainRevert)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    (winner,), (loser,) = winners, losers
    refusal = outcomes[loser]
    assert isinstance(refusal, ChainRevert)
    assert refusal.reason == "prescriptions: prescription fully dispensed"
    assert refusal.status == 409

    receipt = outcomes[winner]
    assert isinstance(receipt, Receipt) and receipt.status == 1
    (event,) = receipt.events
    assert event.name == "Dispensed"
    assert (event.args["pharmacy_org"], event.args["quantity"], event.args["fill_number"], event.args["remaining"]) == (
        winner, 10, 2, 0,
    )
    status = world.status(rx_hash)
    assert (status["fills_completed"], status["total_dispensed"], status["remaining"], status["completed"]) == (2, 20, 0, True)
    assert status["refills_remaining"] == 0
    dispensed = [e for e in world.client.get_logs(world.registry, first.block_number)
                 if e.name == "Dispensed" and e.args["rx_hash"] == rx_hash]
    assert [e.args["pharmacy_org"] for e in dispensed] == [PHARMACY_A, winner]
    loser_ref = hashlib.sha256(loser + rx_hash).digest()
    assert not world.client.call(world.registry, RX, "dispense_ref_used", rx_hash, loser_ref)


def test_two_partial_fills_that_together_exceed_the_fill_leave_one_refused(world: World) -> None:
    rx_hash = hashlib.sha256(b"race-partial").digest()
    world.issue(rx_hash, quantity=10, refills=0)

    outcomes = race(world, rx_hash, 6)

    refusals = [o for o in outcomes.values() if isinstance(o, ChainRevert)]
    assert len(refusals) == 1, outcomes
    assert refusals[0].reason == "prescriptions: quantity exceeds what remains of the fill"
    status = world.status(rx_hash)
    assert (status["dispensed_in_fill"], status["total_dispensed"], status["remaining"], status["completed"]) == (6, 6, 4, False)
