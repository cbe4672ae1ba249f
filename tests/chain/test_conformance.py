"""One chain conformance suite, run against every ChainClient backend.

    embedded   the in-process py-evm chain in a temporary directory (always)
    hardhat    a real Hardhat node at $TELELEDGER_TEST_CHAIN_URL (started by .ci/hardhat.sh);
               skipped visibly when unset, a failure when TELELEDGER_REQUIRE_CHAIN=1
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_keys import keys

from teleledger.ledger.chain import CONTRACT_NAMES, ROLE_OPERATOR, ROLE_ORG_ADMIN
from teleledger.ledger.chain.client import (
    ChainClient,
    ChainMisconfigured,
    ChainRevert,
    ChainUnavailable,
)
from teleledger.ledger.chain.deploy import check_deployment, deploy_all
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.rpc import JsonRpcChain

CHAIN_URL = os.environ.get("TELELEDGER_TEST_CHAIN_URL", "")
REQUIRE_CHAIN = os.environ.get("TELELEDGER_REQUIRE_CHAIN") == "1"
HARDHAT_CHAIN_ID = 31337
EMBEDDED_CHAIN_ID = 1337
# Hardhat's dev account #0: unlocked on every Hardhat node; funds each test's fresh signer
HARDHAT_FUNDER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ORG = b"org-1".ljust(32, b"\0")


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert "error" not in answer, answer
    return answer["result"]


class Backend:
    def __init__(self, name: str, client: ChainClient, expected_chain_id: int, reopen_wrong_id: Any) -> None:
        self.name = name
        self.client = client
        self.expected_chain_id = expected_chain_id
        self.reopen_wrong_id = reopen_wrong_id


@pytest.fixture(params=["embedded", "hardhat"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        authority = keys.PrivateKey(os.urandom(32))
        client = EmbeddedChain(tmp_path / "chain", authority, chain_id=EMBEDDED_CHAIN_ID)

        def reopen_wrong_id() -> None:
            client.close()
            EmbeddedChain(tmp_path / "chain", authority, chain_id=EMBEDDED_CHAIN_ID + 1)

        yield Backend("embedded", client, EMBEDDED_CHAIN_ID, reopen_wrong_id)
        client.close()
        return
    if not CHAIN_URL:
        if REQUIRE_CHAIN:
            pytest.fail("TELELEDGER_REQUIRE_CHAIN=1 but TELELEDGER_TEST_CHAIN_URL is unset; run .ci/hardhat.sh")
        pytest.skip("no Hardhat node: set TELELEDGER_TEST_CHAIN_URL (eval \"$(.ci/hardhat.sh)\")")
    client = JsonRpcChain(CHAIN_URL, HARDHAT_CHAIN_ID)
    yield Backend("hardhat", client, HARDHAT_CHAIN_ID, lambda: JsonRpcChain(CHAIN_URL, HARDHAT_CHAIN_ID + 1))
    client.close()


@pytest.fixture
def signer(backend: Backend) -> keys.PrivateKey:
    """A fresh operator key; on Hardhat it is funded from dev account #0 (gas is free embedded)."""
    key = keys.PrivateKey(os.urandom(32))
    if backend.name == "hardhat":
        tx = {"from": HARDHAT_FUNDER, "to": key.public_key.to_checksum_address(), "value": hex(10**20)}
        _rpc(CHAIN_URL, "eth_sendTransaction", [tx])
    return key


@pytest.fixture
def deployed(backend: Backend, signer: keys.PrivateKey) -> dict[str, str]:
    return deploy_all(backend.client, signer, [signer.public_key.to_checksum_address()], 1)


def _make_operator(client: ChainClient, addresses: dict[str, str], key: keys.PrivateKey) -> None:
    me = key.public_key.to_checksum_address()
    registry = addresses["ParticipantRegistry"]
    client.transact(registry, "ParticipantRegistry", "approve_organization", ORG, me, sender=key)
    client.transact(registry, "ParticipantRegistry", "set_member_roles", ORG, me, ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)


class TestChainConformance:
    def test_the_chain_id_is_the_configured_one(self, backend: Backend) -> None:
        assert backend.client.chain_id() == backend.expected_chain_id

    def test_deploy_all_puts_every_contract_on_chain(self, backend: Backend, deployed: dict[str, str]) -> None:
        assert list(deployed) == list(CONTRACT_NAMES)
        check_deployment(backend.client, deployed, chain_id=backend.expected_chain_id)
        participants = deployed["ParticipantRegistry"]
        assert backend.client.call(deployed["AnchorRegistry"], "AnchorRegistry", "PARTICIPANTS") == participants

    def test_a_transaction_changes_state_and_get_logs_decodes_its_event(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        _make_operator(client, deployed, signer)
        anchors = deployed["AnchorRegistry"]
        receipt = client.transact(anchors, "AnchorRegistry", "anchor", ORG, "example.org/log", 7, b"\x11" * 32, sender=signer)

        assert receipt.status == 1
        assert client.call(anchors, "AnchorRegistry", "latest", "example.org/log")[:2] == (7, b"\x11" * 32)
        events = client.get_logs(anchors, receipt.block_number, receipt.block_number)
        assert [e.name for e in events] == ["CheckpointAnchored"]
        (event,) = events
        assert event.args["origin"] == "example.org/log"
        assert event.args["tree_size"] == 7
        assert event.args["by"] == signer.public_key.to_checksum_address()
        assert event.tx_hash == receipt.tx_hash
        assert receipt.events == (event,)

    def test_a_revert_surfaces_the_contracts_exact_reason(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        _make_operator(client, deployed, signer)
        anchors = deployed["AnchorRegistry"]
        client.transact(anchors, "AnchorRegistry", "anchor", ORG, "o", 5, b"\x01" * 32, sender=signer)
        with pytest.raises(ChainRevert) as caught:
            client.transact(anchors, "AnchorRegistry", "anchor", ORG, "o", 5, b"\x02" * 32, sender=signer)
        assert caught.value.reason == "anchors: tree size must increase"
        assert caught.value.status == 409
        # the client keeps working after a revert (nonces stay in step)
        client.transact(anchors, "AnchorRegistry", "anchor", ORG, "o", 6, b"\x03" * 32, sender=signer)

    def test_a_reverting_call_surfaces_the_reason(self, backend: Backend, deployed: dict[str, str]) -> None:
        with pytest.raises(ChainRevert) as caught:
            backend.client.call(deployed["AnchorRegistry"], "AnchorRegistry", "checkpoint_at", "nowhere", 0)
        assert caught.value.reason == "anchors: no such checkpoint"

    def test_block_numbers_advance_and_blocks_are_readable(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        before = client.block_number()
        receipt = client.transact(deployed["ParticipantRegistry"], "ParticipantRegistry", "approve_organization",
                                  ORG, signer.public_key.to_checksum_address(), sender=signer)
        assert receipt.block_number > before
        assert client.block_number() >= receipt.block_number
        block = client.get_block(receipt.block_number)
        assert receipt.tx_hash in block.tx_hashes
        assert client.get_block(receipt.block_number - 1).hash == block.parent_hash

    def test_a_wrong_chain_id_is_reported_as_misconfiguration(self, backend: Backend) -> None:
        with pytest.raises(ChainMisconfigured, match="chain id"):
            backend.reopen_wrong_id()

    def test_missing_contract_code_is_reported_with_what_to_do(self, backend: Backend, deployed: dict[str, str]) -> None:
        broken = dict(deployed, AnchorRegistry="0x" + "ab" * 20)
        with pytest.raises(ChainMisconfigured, match="AnchorRegistry: no code at .*teleledger chain deploy"):
            check_deployment(backend.client, broken)


def test_an_unreachable_node_raises_chain_unavailable() -> None:
    with pytest.raises(ChainUnavailable, match="does not answer"):
        JsonRpcChain("http://127.0.0.1:9", timeout=2)
