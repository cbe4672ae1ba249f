"""EIP-712 typed data for patient-signed consent actions, hashed exactly as ConsentRegistry does.

The platform builds the message, the patient's wallet signs it (``eth_signTypedData_v4`` on
``typed_data(...)``) or the platform signs with a custodial key (``digest(...)``), and anyone
relays the signature to ``<action>_by_sig``. This module is the single Python definition of the
domain and the four types; tests check its digests against the contract's ``*_digest`` views and
against eth-account's reference ``encode_typed_data``.

Byte format (EIP-712, https://eips.ethereum.org/EIPS/eip-712)::

    digest          = keccak256(0x19 0x01 ‖ domainSeparator ‖ hashStruct(message))
    domainSeparator = keccak256(keccak256(DOMAIN_TYPE) ‖ keccak256("TeleledgerConsent")
                                ‖ keccak256("1") ‖ uint256(chainId) ‖ address(verifyingContract))
    hashStruct(m)   = keccak256(keccak256(m.TYPE) ‖ enc(field1) ‖ enc(field2) ‖ ...)

where every field is encoded as one 32-byte word: bytes32 as is, address and uintN left-padded
with zeros, bool as 0 or 1. Nonce and deadline come from the contract (``nonces(pseudonym)``) and
the caller (unix seconds); every signed action consumes the patient's nonce.

Pure: standard library plus pycryptodome's Keccak (a dependency of the vyper compiler); no
chain client, no I/O. Malformed values raise ``InvalidInput``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from Crypto.Hash import keccak as _keccak

from teleledger.core.errors import InvalidInput

DOMAIN_NAME = "TeleledgerConsent"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


def keccak256(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def _address(value: str | bytes) -> bytes:
    if isinstance(value, str):
        text = value[2:] if value[:2].lower() == "0x" else value
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise InvalidInput(f"address: expected 20 bytes of hex, found {value!r}") from exc
    else:
        raw = bytes(value)
    if len(raw) != 20:
        raise InvalidInput(f"address: expected 20 bytes, found {len(raw)}")
    return raw


def _bytes32(value: bytes | str, what: str) -> bytes:
    raw = bytes.fromhex(value[2:] if value[:2].lower() == "0x" else value) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise InvalidInput(f"{what}: expected 32 bytes, found {len(raw)}")
    return raw


def _uint(value: int, bits: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise InvalidInput(f"{what}: expected uint{bits}, found {value!r}")
    return value.to_bytes(32, "big")


def _word(solidity_type: str, value: Any, name: str) -> bytes:
    if solidity_type == "bytes32":
        return _bytes32(value, name)
    if solidity_type == "address":
        return b"\x00" * 12 + _address(value)
    if solidity_type == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(f"{name}: expected bool, found {value!r}")
        return int(value).to_bytes(32, "big")
    if solidity_type.startswith("uint"):
        return _uint(value, int(solidity_type[4:]), name)
    raise AssertionError(f"unsupported EIP-712 field type {solidity_type}")  # pragma: no cover


def domain_separator(chain_id: int, verifying_contract: str | bytes) -> bytes:
    return keccak256(
        keccak256(DOMAIN_TYPE.encode())
        + keccak256(DOMAIN_NAME.encode())
        + keccak256(DOMAIN_VERSION.encode())
        + _uint(chain_id, 256, "chainId")
        + b"\x00" * 12
        + _address(verifying_contract)
    )


@dataclass(frozen=True, kw_only=True)
class _Message:
    """One EIP-712 struct. ``FIELDS`` maps dataclass field -> (EIP-712 name, type), in order."""

    PRIMARY_TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]]

    @classmethod
    def type_string(cls) -> str:
        return f"{cls.PRIMARY_TYPE}(" + ",".join(f"{t} {n}" for _, n, t in cls.FIELDS) + ")"

    def struct_hash(self) -> bytes:
        words = b"".join(_word(t, getattr(self, attr), n) for attr, n, t in self.FIELDS)
        return keccak256(keccak256(self.type_string().encode()) + words)

    def message(self) -> dict[str, Any]:
        """The JSON ``message`` object of ``eth_signTypedData_v4`` (bytes as 0x-hex)."""
        out: dict[str, Any] = {}
        for attr, name, solidity_type in self.FIELDS:
            value = getattr(self, attr)
            if solidity_type == "bytes32":
                value = "0x" + _bytes32(value, name).hex()
            elif solidity_type == "address":
                value = "0x" + _address(value).hex()
            out[name] = value
        return out


@dataclass(frozen=True, kw_only=True)
class BindPatient(_Message):
    PRIMARY_TYPE: ClassVar[str] = "BindPatient"
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("pseudonym", "pseudonym", "bytes32"),
        ("signer", "signer", "address"),
        ("nonce", "nonce", "uint256"),
        ("deadline", "deadline", "uint256"),
    )
    pseudonym: bytes
    signer: str | bytes
    nonce: int
    deadline: int


@dataclass(frozen=True, kw_only=True)
class GrantConsent(_Message):
    PRIMARY_TYPE: ClassVar[str] = "GrantConsent"
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("pseudonym", "pseudonym", "bytes32"),
        ("grantee", "grantee", "bytes32"),
        ("provision_hash", "provisionHash", "bytes32"),
        ("valid_from", "validFrom", "uint64"),
        ("valid_until", "validUntil", "uint64"),
        ("nonce", "nonce", "uint256"),
        ("deadline", "deadline", "uint256"),
    )
    pseudonym: bytes
    grantee: bytes
    provision_hash: bytes
    valid_from: int
    valid_until: int  # exclusive; 0 = open-ended
    nonce: int
    deadline: int


@dataclass(frozen=True, kw_only=True)
class RevokeConsent(_Message):
    PRIMARY_TYPE: ClassVar[str] = "RevokeConsent"
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("pseudonym", "pseudonym", "bytes32"),
        ("grantee", "grantee", "bytes32"),
        ("provision_hash", "provisionHash", "bytes32"),
        ("nonce", "nonce", "uint256"),
        ("deadline", "deadline", "uint256"),
    )
    pseudonym: bytes
    grantee: bytes
    provision_hash: bytes
    nonce: int
    deadline: int


@dataclass(frozen=True, kw_only=True)
class SetDelegate(_Message):
    PRIMARY_TYPE: ClassVar[str] = "SetDelegate"
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("pseudonym", "pseudonym", "bytes32"),
        ("delegate", "delegate", "address"),
        ("enabled", "enabled", "bool"),
        ("nonce", "nonce", "uint256"),
        ("deadline", "deadline", "uint256"),
    )
    pseudonym: bytes
    delegate: str | bytes
    enabled: bool
    nonce: int
    deadline: int


Message = BindPatient | GrantConsent | RevokeConsent | SetDelegate


def digest(message: Message, *, chain_id: int, verifying_contract: str | bytes) -> bytes:
    """The 32 bytes the patient signs (secp256k1, no further prefix) for ``message``."""
    return keccak256(b"\x19\x01" + domain_separator(chain_id, verifying_contract) + message.struct_hash())


def typed_data(message: Message, *, chain_id: int, verifying_contract: str | bytes) -> dict[str, Any]:
    """The full ``eth_signTypedData_v4`` payload a wallet shows and signs."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            message.PRIMARY_TYPE: [{"name": n, "type": t} for _, n, t in message.FIELDS],
        },
        "primaryType": message.PRIMARY_TYPE,
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": "0x" + _address(verifying_contract).hex(),
        },
        "message": message.message(),
    }


__all__ = [
    "DOMAIN_NAME",
    "DOMAIN_TYPE",
    "DOMAIN_VERSION",
    "BindPatient",
    "GrantConsent",
    "Message",
    "RevokeConsent",
    "SetDelegate",
    "digest",
    "domain_separator",
    "keccak256",
    "typed_data",
]

# the dataclass fields and FIELDS must agree; fail at import, not at the first signature
for _cls in (BindPatient, GrantConsent, RevokeConsent, SetDelegate):
    assert [f.name for f in fields(_cls)] == [a for a, _, _ in _cls.FIELDS], _cls
