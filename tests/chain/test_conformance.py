"""One chain conformance suite, run against every ChainClient backend.

    embedded   the in-process py-evm chain in a temporary directory (always)
    hardhat    a real Hardhat node at $TELELEDGER_TEST_CHAIN_URL (started by .ci/hardhat.sh);
               skipped visibly when unset, a failure when TELELEDGER_REQUIRE_CHAIN=1
"""

from __future__ import annotations

import json
import os
import time
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
    InvalidTransaction,
    NonceConflict,
    Receipt,
    SignedTx,
    decode_call,
    sign_transaction,
)
from teleledger.ledger.chain.deploy import check_deployment, deploy_all
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.rpc import JsonRpcChain

CHAIN_URL = os.environ.get("TELELEDGER_TEST_CHAIN_URL", "")
REQUIRE_CHAIN = os.environ.get("TELELEDGER_REQUIRE_CHAIN") == "1"
HARDHAT_CHAIN_ID = 31337
EMBEDDED_CHAIN_ID = 1337
#: what each test's fresh signer gets on Hardhat (gas there costs ~0.002 ETH per transaction)
HARDHAT_TEST_BALANCE = 10**19
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
    """A fresh operator key; on Hardhat it gets a balance (gas is free embedded).

    ``hardhat_setBalance`` rather than a transfer from a dev account: transfers drain the dev
    accounts of a long-running node that several suites share, run after run.
    """
    key = keys.PrivateKey(os.urandom(32))
    if backend.name == "hardhat":
        _rpc(CHAIN_URL, "hardhat_setBalance", [key.public_key.to_checksum_address(), hex(HARDHAT_TEST_BALANCE)])
    return key


@pytest.fixture
def deployed(backend: Backend, signer: keys.PrivateKey) -> dict[str, str]:
    return deploy_all(backend.client, signer, [signer.public_key.to_checksum_address()], 1)


def _make_operator(client: ChainClient, addresses: dict[str, str], key: keys.PrivateKey) -> None:
    me = key.public_key.to_checksum_address()
    registry = addresses["ParticipantRegistry"]
    client.transact(registry, "ParticipantRegistry", "approve_organization", ORG, me, sender=key)
    client.transact(registry, "ParticipantRegistry", "set_member_roles", ORG, me, ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)


def _included(client: ChainClient, tx_hash: str, timeout: float = 10.0) -> Receipt:
    """The receipt once the transaction is included (an external node may take a moment)."""
    deadline = time.monotonic() + timeout
    while (receipt := client.receipt(tx_hash)) is None:
        assert time.monotonic() < deadline, f"{tx_hash} was not included within {timeout} s"
        time.sleep(0.05)
    return receipt


def _anchor(client: ChainClient, addresses: dict[str, str], key: keys.PrivateKey, nonce: int, size: int) -> SignedTx:
    return client.sign(addresses["AnchorRegistry"], "AnchorRegistry", "anchor", ORG, "example.org/log", size,
                       size.to_bytes(32, "big"), sender=key, nonce=nonce)


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
        # the signature of a transact-signed transaction recovers its sender
        tx = client.get_transaction(receipt.tx_hash)
        assert tx is not None and (tx.sender, tx.to) == (signer.public_key.to_checksum_address(), anchors)
        assert client.receipt(receipt.tx_hash) == receipt

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


class TestSignedTransactions:
    """The crash-safe write path: ``nonce`` → ``sign`` → ``send_raw`` → ``receipt``."""

    def test_a_signed_transaction_sent_raw_is_included_with_its_events(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        _make_operator(client, deployed, signer)
        me = signer.public_key.to_checksum_address()
        nonce = client.nonce(me)
        signed = _anchor(client, deployed, signer, nonce, 7)
        assert (signed.sender, signed.nonce) == (me, nonce)

        assert client.send_raw([signed.raw]) == [signed.tx_hash]
        receipt = _included(client, signed.tx_hash)

        assert (receipt.tx_hash, receipt.status, receipt.error) == (signed.tx_hash, 1, None)
        assert [e.name for e in receipt.events] == ["CheckpointAnchored"]
        assert receipt.events[0].args["tree_size"] == 7
        assert client.call(deployed["AnchorRegistry"], "AnchorRegistry", "latest", "example.org/log")[0] == 7
        assert signed.tx_hash in client.get_block(receipt.block_number).tx_hashes

    def test_sending_the_same_raw_transaction_twice_makes_one_transaction(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        _make_operator(client, deployed, signer)
        me = signer.public_key.to_checksum_address()
        nonce = client.nonce(me)
        signed = _anchor(client, deployed, signer, nonce, 3)

        first = client.send_raw([signed.raw])
        receipt = _included(client, signed.tx_hash)
        again = client.send_raw([signed.raw])  # e.g. a worker that crashed before recording the send
        twice_in_one_list = client.send_raw([signed.raw, signed.raw])

        assert first == again == [signed.tx_hash] and twice_in_one_list == [signed.tx_hash] * 2
        assert client.nonce(me) == nonce + 1
        assert client.receipt(signed.tx_hash) == receipt
        assert client.get_block(receipt.block_number).tx_hashes.count(signed.tx_hash) == 1

    def test_an_unknown_hash_has_no_receipt_and_no_transaction(self, backend: Backend) -> None:
        unknown = "0x" + os.urandom(32).hex()
        assert backend.client.receipt(unknown) is None
        assert backend.client.get_transaction(unknown) is None

    def test_a_failed_transaction_is_included_and_its_receipt_carries_the_revert_reason(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        me = signer.public_key.to_checksum_address()
        nonce = client.nonce(me)
        signed = _anchor(client, deployed, signer, nonce, 1)  # signer is not an operator yet

        assert client.send_raw([signed.raw]) == [signed.tx_hash]
        receipt = _included(client, signed.tx_hash)

        assert receipt.status == 0
        assert receipt.error == "anchors: not an operator of the organization"
        assert receipt.events == ()
        assert client.nonce(me) == nonce + 1  # a failed transaction still uses its nonce

    def test_nonce_counts_every_transaction_of_the_sender(
        self, backend: Backend, signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        me = signer.public_key.to_checksum_address()
        assert client.nonce(me) == 0
        addresses = deploy_all(client, signer, [me], 1)
        assert client.nonce(me) == len(CONTRACT_NAMES)
        _make_operator(client, addresses, signer)
        nonce = client.nonce(me)
        assert nonce == len(CONTRACT_NAMES) + 2
        batch = [_anchor(client, addresses, signer, nonce + i, 10 + i) for i in range(3)]
        client.send_raw([s.raw for s in batch])
        assert [_included(client, s.tx_hash).status for s in batch] == [1, 1, 1]
        assert client.nonce(me) == nonce + 3
        # transact keeps counting after nonces used through send_raw
        client.transact(addresses["AnchorRegistry"], "AnchorRegistry", "anchor", ORG, "example.org/log", 20,
                        b"\x20" * 32, sender=signer)
        assert client.nonce(me) == nonce + 4

    def test_get_transaction_and_decode_call_name_the_function_and_its_arguments(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        me = signer.public_key.to_checksum_address()
        registry = deployed["ParticipantRegistry"]
        nonce = client.nonce(me)
        signed = client.sign(registry, "ParticipantRegistry", "approve_organization", ORG, me.lower(),
                             sender=signer, nonce=nonce)
        client.send_raw([signed.raw])
        receipt = _included(client, signed.tx_hash)

        tx = client.get_transaction(signed.tx_hash)
        assert tx is not None
        assert (tx.hash, tx.sender, tx.to, tx.nonce, tx.block_number) == (
            signed.tx_hash, me, registry, nonce, receipt.block_number)
        expected = ("ParticipantRegistry", "approve_organization", {"org": ORG, "org_admin": me})
        assert decode_call("ParticipantRegistry", tx.input) == expected
        assert decode_call(None, tx.input) == expected  # found by its selector among every ABI
        assert decode_call("AnchorRegistry", tx.input) == expected  # a wrong hint is only tried first
        assert decode_call(None, b"\xde\xad\xbe\xef" + bytes(64)) is None
        assert decode_call("ParticipantRegistry", b"") is None

    def test_a_different_transaction_with_a_used_nonce_is_a_nonce_conflict(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        _make_operator(client, deployed, signer)
        me = signer.public_key.to_checksum_address()
        nonce = client.nonce(me)
        first = _anchor(client, deployed, signer, nonce, 5)
        client.send_raw([first.raw])
        _included(client, first.tx_hash)
        other = _anchor(client, deployed, signer, nonce, 6)

        with pytest.raises(NonceConflict) as caught:
            client.send_raw([other.raw])

        assert (caught.value.sender, caught.value.nonce, caught.value.tx_hash) == (me, nonce, other.tx_hash)
        assert caught.value.status == 409
        assert "already used by a different transaction" in str(caught.value)
        assert client.get_transaction(other.tx_hash) is None
        assert client.nonce(me) == nonce + 1

    def test_a_transaction_signed_for_another_chain_is_refused(
        self, backend: Backend, deployed: dict[str, str], signer: keys.PrivateKey
    ) -> None:
        client = backend.client
        me = signer.public_key.to_checksum_address()
        foreign = sign_transaction(signer, chain_id=client.chain_id() + 1, nonce=client.nonce(me), gas_price=0,
                                   gas=100_000, to=deployed["AnchorRegistry"], data=b"")
        with pytest.raises(InvalidTransaction, match=f"signed for chain id {client.chain_id() + 1}, this chain is {client.chain_id()}"):
            client.send_raw([foreign.raw])
        with pytest.raises(InvalidTransaction):
            client.send_raw([b"\xc0not a transaction"])
        assert client.get_transaction(foreign.tx_hash) is None


def test_an_unreachable_node_raises_chain_unavailable() -> None:
    with pytest.raises(ChainUnavailable, match="does not answer"):
        JsonRpcChain("http://127.0.0.1:9", timeout=2)
