"""The prescription token: what the patient carries to any pharmacy, and how a pharmacy checks it.

A pharmacy of another organization has no access to the prescriber's database. It has the token
(a text code, also shown as a QR image) and read access to the chain. From those two alone it
can establish what was prescribed, by whom, that it was not altered, and how much is left.

Content and hash
----------------
The prescription's *content* is the part of the MedicationRequest a pharmacist acts on, as a
JSON object with exactly these keys (absent values are ``null``)::

    id            the MedicationRequest id at the issuing node
    medication    {"system", "code", "display"} of the RxNorm coding, or {"text"} for free text
    dosage        the dosage instruction texts, in order (list of strings)
    quantity      units per fill (number), unit (string) -> {"value", "unit"}
    refills       numberOfRepeatsAllowed (int, 0 when absent)
    valid_until   dispenseRequest.validityPeriod.end (FHIR date or dateTime)
    substitution  substitution.allowedBoolean (bool, default true)
    prescriber    the requester reference (Practitioner/<id>)
    authored      authoredOn

``canonical(content)`` is its JSON with sorted keys, no whitespace, UTF-8 (RFC 8785-compatible
for these value types). The on-chain prescription hash is::

    rx_hash = keccak256("teleledger rx v1" ‖ 0x00 ‖ salt ‖ canonical(content))

with a random 16-byte ``salt`` per prescription, so the chain's hash cannot be confirmed by
guessing common prescriptions (the content is PHI; the salt lives only in the token and at the
issuing node).

Signature
---------
The prescriber signs EIP-712 typed data (https://eips.ethereum.org/EIPS/eip-712)::

    domain  {name: "TeleledgerPrescription", version: "1", chainId, verifyingContract: PrescriptionRegistry}
    Prescription(bytes32 rxHash,uint256 quantity,uint256 refills,uint64 expiry)

with their secp256k1 key from the keystore — the same key the PrescriptionRegistry knows as
the prescriber. ``quantity`` is units per fill, ``expiry`` unix seconds.

Token text
----------
``TLRX1.`` ‖ base64url(JSON payload, no padding) ‖ ``.`` ‖ base64url(65-byte signature r‖s‖v)

where the payload is ``{"v": 1, "iss": <issuing node origin>, "chain_id", "registry", "salt":
hex, "expiry": int, "content": {...}}``. Changing any byte of the content changes ``rx_hash``,
so both the signature check and the chain lookup fail.

Pure: no database, no chain client. ``verify_token`` returns what the token claims and who
signed it; checking that signer against the chain is the caller's (``prescriptions.service``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from teleledger.core.errors import InvalidInput

__all__ = [
    "PREFIX",
    "RxContent",
    "TokenClaims",
    "content_from_request",
    "make_token",
    "qr_svg",
    "rx_hash",
    "verify_token",
]

PREFIX = "TLRX1."
_HASH_TAG = b"teleledger rx v1\x00"
_MAX_TOKEN = 4096
_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Prescription": [
        {"name": "rxHash", "type": "bytes32"},
        {"name": "quantity", "type": "uint256"},
        {"name": "refills", "type": "uint256"},
        {"name": "expiry", "type": "uint64"},
    ],
}

RxContent = dict[str, Any]


class InvalidToken(InvalidInput):
    """The token is malformed, altered or not signed as it claims."""


def canonical(content: RxContent) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rx_hash(content: RxContent, salt: bytes) -> bytes:
    return keccak(_HASH_TAG + salt + canonical(content))


def content_from_request(request: dict[str, Any]) -> RxContent:
    """The content of a FHIR R4 MedicationRequest, as defined in the module docstring."""
    med = request.get("medicationCodeableConcept") or {}
    coding = next((c for c in med.get("coding", []) if c.get("code")), None)
    medication = ({"system": coding.get("system"), "code": coding["code"], "display": coding.get("display")}
                  if coding else {"text": med.get("text")})
    dispense = request.get("dispenseRequest") or {}
    qty = dispense.get("quantity") or {}
    return {
        "id": request.get("id"),
        "medication": medication,
        "dosage": [d.get("text") for d in request.get("dosageInstruction", []) if d.get("text")],
        "quantity": {"value": qty.get("value"), "unit": qty.get("unit") or qty.get("code")},
        "refills": int(dispense.get("numberOfRepeatsAllowed") or 0),
        "valid_until": (dispense.get("validityPeriod") or {}).get("end"),
        "substitution": bool((request.get("substitution") or {}).get("allowedBoolean", True)),
        "prescriber": (request.get("requester") or {}).get("reference"),
        "authored": request.get("authoredOn"),
    }


def expiry_seconds(valid_until: str | None) -> int:
    if not valid_until:
        raise InvalidInput("a prescription needs dispenseRequest.validityPeriod.end",
                           expression="MedicationRequest.dispenseRequest.validityPeriod.end")
    text = valid_until if "T" in valid_until else valid_until + "T23:59:59+00:00"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"validityPeriod.end is not a date: {valid_until!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def typed_data(digest: bytes, quantity: int, refills: int, expiry: int, *, chain_id: int,
               registry: str) -> dict[str, Any]:
    return {
        "types": _TYPES,
        "primaryType": "Prescription",
        "domain": {"name": "TeleledgerPrescription", "version": "1", "chainId": chain_id,
                   "verifyingContract": to_checksum_address(registry)},
        "message": {"rxHash": digest, "quantity": quantity, "refills": refills, "expiry": expiry},
    }


def _units(content: RxContent) -> int:
    value = (content.get("quantity") or {}).get("value")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or int(value) != value:
        raise InvalidInput("a prescription needs a whole, positive dispense quantity",
                           expression="MedicationRequest.dispenseRequest.quantity.value")
    return int(value)


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says. ``signer`` is recovered from the signature, not claimed."""

    issuer: str
    chain_id: int
    registry: str
    salt: bytes
    content: RxContent
    rx_hash: bytes
    quantity: int
    refills: int
    expiry: int
    signer: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(content: RxContent, prescriber_key: Any, *, issuer: str, chain_id: int, registry: str,
               salt: bytes | None = None) -> tuple[str, TokenClaims]:
    """Sign ``content`` with the prescriber's secp256k1 key (eth_keys PrivateKey or 32 bytes)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = rx_hash(content, salt)
    quantity, refills, expiry = _units(content), int(content.get("refills") or 0), expiry_seconds(content.get("valid_until"))
    raw_key = getattr(prescriber_key, "to_bytes", lambda: prescriber_key)()
    signed = Account.sign_message(
        encode_typed_data(full_message=typed_data(digest, quantity, refills, expiry, chain_id=chain_id, registry=registry)),
        private_key=raw_key,
    )
    payload = {"v": 1, "iss": issuer, "chain_id": chain_id, "registry": to_checksum_address(registry),
               "salt": salt.hex(), "expiry": expiry, "content": content}
    token = PREFIX + _b64(canonical(payload)) + "." + _b64(bytes(signed.signature))
    claims = TokenClaims(issuer, chain_id, to_checksum_address(registry), salt, content, digest, quantity, refills,
                         expiry, Account.from_key(raw_key).address)
    return token, claims


def verify_token(token: str) -> TokenClaims:
    """Parse a token and recover its signer; raises ``InvalidToken`` saying what is wrong."""
    token = (token or "").strip()
    if len(token) > _MAX_TOKEN:
        raise InvalidToken(f"a prescription token is at most {_MAX_TOKEN} characters")
    if not token.startswith(PREFIX) or token.count(".") != 2:
        raise InvalidToken("not a teleledger prescription token (expected TLRX1.<payload>.<signature>)")
    _, body, sig = token.split(".")
    try:
        payload = json.loads(_unb64(body))
        signature = _unb64(sig)
    except (ValueError, binascii.Error) as exc:
        raise InvalidToken("the prescription token is damaged (not base64url JSON)") from exc
    if not isinstance(payload, dict) or payload.get("v") != 1 or not isinstance(payload.get("content"), dict):
        raise InvalidToken("unsupported prescription token version or layout")
    if len(signature) != 65:
        raise InvalidToken("the token's signature must be 65 bytes")
    try:
        salt = bytes.fromhex(payload["salt"])
        chain_id, registry, issuer = int(payload["chain_id"]), to_checksum_address(payload["registry"]), str(payload["iss"])
        expiry = int(payload["expiry"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidToken(f"the prescription token lacks a valid field: {exc}") from exc
    content = payload["content"]
    quantity, refills = _units(content), int(content.get("refills") or 0)
    if expiry != expiry_seconds(content.get("valid_until")):
        raise InvalidToken("the token's expiry does not match the prescription's validity period")
    digest = rx_hash(content, salt)
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=typed_data(digest, quantity, refills, expiry, chain_id=chain_id,
                                                      registry=registry)),
            signature=signature,
        )
    except Exception as exc:  # eth_account raises several types for a bad signature
        raise InvalidToken("the token's signature is not a valid secp256k1 signature") from exc
    return TokenClaims(issuer, chain_id, registry, salt, content, digest, quantity, refills, expiry,
                       to_checksum_address(signer))


def qr_svg(token: str) -> str:
    """The token as an SVG QR code (error correction M), for the patient to show at a pharmacy."""
    import segno

    return segno.make(token, error="m", micro=False).svg_inline(scale=3, title="Prescription code")
