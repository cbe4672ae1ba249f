"""What only the embedded chain promises about ``send_raw``, and the shared signing format.

The embedded chain keeps no transaction pool: a ``send_raw`` list goes into one sealed block
whole, or is refused whole. Transactions are signed by ``client.sign_transaction``, whose bytes
must be exactly eth-account's (the reference encoder) for the same fields.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from eth_account import Account
from eth_keys import keys

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN
from teleledger.ledger.chain.client import (
    ChainUnavailable,
    InvalidTransaction,
    NonceConflict,
    decode_transaction,
    sign_transaction,
)
from teleledger.ledger.chain.deploy import deploy_all
from teleledger.ledger.chain.embedded import EmbeddedChain, _Call, _Raws

ORG = b"org-1".ljust(32, b"\0")
LOG = "example.org/log"


@pytest.fixture
def key() -> keys.PrivateKey:
    return keys.PrivateKey(os.urandom(32))


@pytest.fixture
def chain(tmp_path: Path, key: keys.PrivateKey):
    client = EmbeddedChain(tmp_path / "chain", key)
    yield client
    client.close()


@pytest.fixture
def anchors(chain: EmbeddedChain, key: keys.PrivateKey) -> str:
    me = key.public_key.to_checksum_address()
    addresses = deploy_all(chain, key, [me], 1)
    registry = addresses["ParticipantRegistry"]
    chain.transact(registry, "ParticipantRegistry", "approve_organization", ORG, me, sender=key)
    chain.transact(registry, "ParticipantRegistry", "set_member_roles", ORG, me, ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)
    return addresses["AnchorRegistry"]


def _anchor(chain: EmbeddedChain, anchors: str, key: keys.PrivateKey, nonce: int, size: int):
    return chain.sign(anchors, "AnchorRegistry", "anchor", ORG, LOG, size, size.to_bytes(32, "big"),
                      sender=key, nonce=nonce)


def test_a_send_raw_list_is_sealed_into_one_block(chain: EmbeddedChain, anchors: str, key: keys.PrivateKey) -> None:
    nonce = chain.nonce(key.public_key.to_checksum_address())
    signed = [_anchor(chain, anchors, key, nonce + i, i + 1) for i in range(5)]
    head = chain.block_number()

    assert chain.send_raw([s.raw for s in signed]) == [s.tx_hash for s in signed]

    assert chain.block_number() == head + 1
    assert chain.get_block(head + 1).tx_hashes == tuple(s.tx_hash for s in signed)
    assert [chain.receipt(s.tx_hash).status for s in signed] == [1] * 5  # type: ignore[union-attr]


def test_a_list_holding_one_conflicting_transaction_is_refused_whole(
    chain: EmbeddedChain, anchors: str, key: keys.PrivateKey
) -> None:
    me = key.public_key.to_checksum_address()
    nonce = chain.nonce(me)
    chain.send_raw([_anchor(chain, anchors, key, nonce, 1).raw])
    fresh = _anchor(chain, anchors, key, nonce + 1, 2)
    conflicting = _anchor(chain, anchors, key, nonce, 3)
    head = chain.block_number()

    with pytest.raises(NonceConflict) as caught:
        chain.send_raw([fresh.raw, conflicting.raw])

    assert caught.value.next_nonce == nonce + 1
    assert chain.block_number() == head
    assert chain.receipt(fresh.tx_hash) is None  # all or nothing
    assert chain.send_raw([fresh.raw]) == [fresh.tx_hash]  # and it is fine on its own


def test_a_nonce_gap_is_refused_because_nothing_can_wait_in_a_pool(
    chain: EmbeddedChain, anchors: str, key: keys.PrivateKey
) -> None:
    nonce = chain.nonce(key.public_key.to_checksum_address())
    ahead = _anchor(chain, anchors, key, nonce + 1, 1)
    with pytest.raises(InvalidTransaction, match=f"nonce {nonce + 1} .* leaves a gap: the chain expects {nonce}"):
        chain.send_raw([ahead.raw])
    # with the missing one before it, in the same list, both go in
    missing = _anchor(chain, anchors, key, nonce, 1)
    chain.send_raw([missing.raw, _anchor(chain, anchors, key, nonce + 1, 2).raw])
    assert chain.nonce(key.public_key.to_checksum_address()) == nonce + 2


def test_a_block_py_evm_refuses_leaves_the_other_submissions_of_the_batch_sealed(
    chain: EmbeddedChain, anchors: str, key: keys.PrivateKey
) -> None:
    # a sender with no balance cannot pay a non-zero gas price: py-evm refuses the whole block,
    # the chain re-seals each submission of the batch on its own
    broke = keys.PrivateKey(os.urandom(32))
    unpayable = sign_transaction(broke, chain_id=chain.chain_id(), nonce=0, gas_price=10**9, gas=100_000,
                                 to=anchors, data=b"")
    me = key.public_key.to_checksum_address()
    good = _anchor(chain, anchors, key, chain.nonce(me), 1)
    call = _Call(key, bytes.fromhex(anchors[2:]), b"")
    batch = [_Raws([chain._decode(unpayable.raw)]), _Raws([chain._decode(good.raw)]), call]
    head = chain.block_number()

    with chain._lock:
        chain._seal(batch)

    with pytest.raises(InvalidTransaction, match="refused the transaction"):
        batch[0].future.result()
    assert batch[1].future.result() == [good.tx_hash]
    assert call.future.exception() is not None  # AnchorRegistry has no fallback: a revert
    assert chain.receipt(unpayable.tx_hash) is None
    assert chain.receipt(good.tx_hash).status == 1  # type: ignore[union-attr]
    assert chain.block_number() > head


def test_concurrent_transact_and_send_raw_callers_all_land(
    chain: EmbeddedChain, anchors: str, key: keys.PrivateKey
) -> None:
    others = [keys.PrivateKey(os.urandom(32)) for _ in range(4)]
    registry_calls: list[str] = []
    errors: list[BaseException] = []

    def raw_sender(k: keys.PrivateKey) -> None:
        try:
            me = k.public_key.to_checksum_address()
            for _ in range(5):
                n = chain.nonce(me)
                # anchoring without the operator role reverts: still included, nonce used
                s = chain.sign(anchors, "AnchorRegistry", "anchor", ORG, LOG, 1, b"\x01" * 32, sender=k, nonce=n)
                assert chain.send_raw([s.raw]) == [s.tx_hash]
                registry_calls.append(s.tx_hash)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    def transactor(offset: int) -> None:
        try:
            for i in range(5):
                chain.transact(anchors, "AnchorRegistry", "anchor", ORG, f"log-{offset}", i + 1, b"\x02" * 32, sender=key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=raw_sender, args=(k,)) for k in others]
    threads += [threading.Thread(target=transactor, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(registry_calls) == 20
    assert all(chain.receipt(h).error == "anchors: not an operator of the organization" for h in registry_calls)  # type: ignore[union-attr]
    assert [chain.nonce(k.public_key.to_checksum_address()) for k in others] == [5] * 4


def test_signed_bytes_equal_eth_accounts_for_the_same_fields() -> None:
    secret = bytes(range(1, 33))
    for to, data in (("0x" + "11" * 20, b"\xab" * 70), (None, b"\x60\x00")):
        ours = sign_transaction(secret, chain_id=1337, nonce=9, gas_price=7, gas=123_456, to=to, data=data)
        fields = {"nonce": 9, "gasPrice": 7, "gas": 123_456, "value": 0, "data": data, "chainId": 1337}
        if to:
            fields["to"] = to
        reference = Account.sign_transaction(fields, secret)
        assert ours.raw == bytes(reference.raw_transaction)
        assert ours.tx_hash == "0x" + bytes(reference.hash).hex()
        assert ours.sender == Account.from_key(secret).address


def test_decoding_recovers_the_sender_and_refuses_tampered_or_foreign_bytes() -> None:
    secret = bytes(range(1, 33))
    signed = sign_transaction(secret, chain_id=1337, nonce=3, gas_price=0, gas=50_000, to="0x" + "22" * 20, data=b"x")
    decoded = decode_transaction(signed.raw, chain_id=1337)
    assert (decoded.sender, decoded.nonce, decoded.data, decoded.tx_hash) == (signed.sender, 3, b"x", signed.tx_hash)

    tampered = signed.raw.replace(b"x", b"y")
    assert decode_transaction(tampered, chain_id=1337).sender != signed.sender  # another (unfunded) signer
    with pytest.raises(InvalidTransaction, match="signed for chain id 1337, this chain is 1"):
        decode_transaction(signed.raw, chain_id=1)
    with pytest.raises(InvalidTransaction, match="typed transactions are not accepted"):
        decode_transaction(b"\x02" + signed.raw, chain_id=1337)
    with pytest.raises(InvalidTransaction, match="not valid RLP"):
        decode_transaction(signed.raw[:-3], chain_id=1337)


def test_a_closed_chain_refuses_new_transactions_and_reopens_with_everything_acknowledged(
    tmp_path: Path, key: keys.PrivateKey
) -> None:
    chain = EmbeddedChain(tmp_path / "chain", key)
    me = key.public_key.to_checksum_address()
    registry = chain.deploy("ParticipantRegistry", [me], 1, sender=key)
    chain.close()
    chain.close()  # idempotent

    with pytest.raises(ChainUnavailable, match="closed"):
        chain.transact(registry, "ParticipantRegistry", "approve_organization", ORG, me, sender=key)

    reopened = EmbeddedChain(tmp_path / "chain", key)
    assert reopened.get_code(registry) != b""
    assert reopened.nonce(me) == 1
    reopened.close()
