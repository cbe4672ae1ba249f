"""The prescription token: sign, verify, and every way a tampered token must fail."""

from __future__ import annotations

import base64
import json

import pytest
from eth_keys import keys

from teleledger.prescriptions.token import (
    InvalidToken,
    content_from_request,
    make_token,
    qr_svg,
    rx_hash,
    verify_token,
)

KEY = keys.PrivateKey(b"\x11" * 32)
OTHER = keys.PrivateKey(b"\x22" * 32)
REGISTRY = "0x" + "ab" * 20
REQUEST = {
    "resourceType": "MedicationRequest", "id": "rx1", "status": "active", "intent": "order",
    "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                              "code": "197361", "display": "amlodipine 5 MG Oral Tablet"}]},
    "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Practitioner/d1"},
    "authoredOn": "2026-11-25",
    "dosageInstruction": [{"text": "1 tablet daily"}],
    "dispenseRequest": {"quantity": {"value": 30, "unit": "tablet"}, "numberOfRepeatsAllowed": 2,
                        "validityPeriod": {"start": "2026-11-25", "end": "2027-05-25"}},
    "substitution": {"allowedBoolean": False},
}


def _token(**kw):  # type: ignore[no-untyped-def]
    return make_token(content_from_request(REQUEST), KEY, issuer="clinic.example", chain_id=1337,
                      registry=REGISTRY, **kw)


def _tamper(token: str, change) -> str:  # type: ignore[no-untyped-def]
    prefix, body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    change(payload)
    new = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"{prefix}.{new}.{sig}"


def test_a_signed_token_verifies_and_names_its_signer() -> None:
    token, claims = _token()
    got = verify_token(token)
    assert got.signer == KEY.public_key.to_checksum_address()
    assert got.rx_hash == claims.rx_hash == rx_hash(got.content, got.salt)
    assert (got.quantity, got.refills) == (30, 2)
    assert got.content["medication"]["code"] == "197361" and got.content["substitution"] is False


def test_an_altered_quantity_changes_the_hash_and_the_recovered_signer() -> None:
    token, claims = _token()
    forged = verify_token(_tamper(token, lambda p: p["content"]["quantity"].update(value=300)))
    assert forged.rx_hash != claims.rx_hash
    assert forged.signer != KEY.public_key.to_checksum_address()


def test_a_token_signed_by_another_key_names_that_key() -> None:
    token, _ = make_token(content_from_request(REQUEST), OTHER, issuer="x", chain_id=1337, registry=REGISTRY)
    assert verify_token(token).signer == OTHER.public_key.to_checksum_address()


def test_the_salt_hides_the_content_from_the_chain() -> None:
    content = content_from_request(REQUEST)
    assert rx_hash(content, b"a" * 16) != rx_hash(content, b"b" * 16)


@pytest.mark.parametrize("bad", ["", "hello", "TLRX1.x", "TLRX1.!!!.???", "TLRX1." + "A" * 5000 + ".x",
                                 "TLRX1.e30.AAAA"])
def test_garbage_is_an_invalid_token_not_a_crash(bad: str) -> None:
    with pytest.raises(InvalidToken):
        verify_token(bad)


def test_a_changed_expiry_is_refused() -> None:
    token, _ = _token()
    with pytest.raises(InvalidToken, match="expiry"):
        verify_token(_tamper(token, lambda p: p.update(expiry=p["expiry"] + 86400)))


def test_a_prescription_without_quantity_or_validity_cannot_be_signed() -> None:
    no_qty = {**REQUEST, "dispenseRequest": {"validityPeriod": {"end": "2027-01-01"}}}
    with pytest.raises(Exception, match="quantity"):
        make_token(content_from_request(no_qty), KEY, issuer="x", chain_id=1, registry=REGISTRY)
    no_end = {**REQUEST, "dispenseRequest": {"quantity": {"value": 10}}}
    with pytest.raises(Exception, match="validityPeriod"):
        make_token(content_from_request(no_end), KEY, issuer="x", chain_id=1, registry=REGISTRY)


def test_the_qr_image_is_an_svg() -> None:
    token, _ = _token()
    svg = qr_svg(token)
    assert svg.startswith("<svg") and "Prescription code" in svg
