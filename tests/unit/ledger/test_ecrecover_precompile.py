"""The embedded chain's ecrecover precompile and sender recovery (``interpreter.recover_signer``,
libsecp256k1 called directly) against py-evm's own ecrecover, on valid, high-s, malformed and
truncated inputs: same output, same gas."""

from __future__ import annotations

import random

import pytest
from eth.constants import SECPK1_N
from eth.precompiles.ecrecover import ecrecover as py_evm_ecrecover
from eth_keys import keys

from teleledger.ledger.chain.interpreter import _ecrecover, recover_signer


class _Message:
    def __init__(self, data: bytes) -> None:
        self.data_as_bytes = data


class _Computation:
    """The three things a precompile touches: its input, its output, the gas it charges."""

    def __init__(self, data: bytes) -> None:
        self.msg = _Message(data)
        self.output = b""
        self.gas = 0

    def consume_gas(self, amount: int, reason: str) -> None:
        self.gas += amount


def _inputs() -> list[bytes]:
    rng = random.Random(7)
    signed = []
    for _ in range(20):
        key, digest = keys.PrivateKey(rng.randbytes(32)), rng.randbytes(32)
        sig = key.sign_msg_hash(digest)
        v, r, s = (sig.v + 27).to_bytes(32, "big"), sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")
        signed += [digest + v + r + s, digest + v + r + (SECPK1_N - sig.s).to_bytes(32, "big")]  # low and high s
    base = signed[0]
    word = lambda n: n.to_bytes(32, "big")  # noqa: E731
    return signed + [
        b"", base[:40], base[:100], base + b"trailing bytes",
        base[:32] + word(29) + base[64:], base[:32] + word(2**255 + 27) + base[64:],  # v out of range
        base[:64] + word(0) + base[96:], base[:64] + word(SECPK1_N) + base[96:],  # r = 0, r = n
        base[:96] + word(0), base[:96] + word(SECPK1_N - 1), base[:96] + word(2**256 - 1),
        rng.randbytes(128), base[:32] + b"\x01" + base[33:],
    ]


@pytest.mark.parametrize("data", _inputs())
def test_the_precompile_answers_exactly_as_py_evms(data: bytes) -> None:
    theirs, mine = _Computation(data), _Computation(data)
    py_evm_ecrecover(theirs)
    _ecrecover(mine)
    assert (mine.output, mine.gas) == (theirs.output, theirs.gas)


def test_recover_signer_finds_the_signing_address_and_nothing_for_a_bad_signature() -> None:
    key = keys.PrivateKey(bytes(range(1, 33)))
    digest = bytes(32)
    sig = key.sign_msg_hash(digest)
    assert recover_signer(digest, sig.v, sig.r, sig.s) == key.public_key.to_canonical_address()
    assert recover_signer(digest, sig.v, 0, sig.s) is None
    assert recover_signer(digest, 2, sig.r, sig.s) is None
