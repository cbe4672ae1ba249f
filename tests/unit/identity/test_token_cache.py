"""The verifier's cache of verified tokens (teleledger.identity.tokens.TokenVerifier): a repeat
presentation skips parsing and the signature check, never the clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from teleledger.core.errors import Unauthenticated
from teleledger.identity.scopes import ScopeSet
from teleledger.identity.tokens import TokenIssuer, TokenVerifier

ISS, AUD = "https://teleledger.example/auth", "https://teleledger.example/fhir"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def setup():  # type: ignore[no-untyped-def]
    key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    clock = Clock()
    issuer = TokenIssuer(key, ISS, AUD, timedelta(minutes=15), clock)
    verifier = TokenVerifier([key.public_key()], ISS, AUD, clock, cache_size=2)
    token = issuer.issue("svc", "service", ScopeSet.parse("system/*.cruds")).access_token
    return clock, issuer, verifier, token


def test_a_token_seen_before_is_not_parsed_again(setup, monkeypatch):  # type: ignore[no-untyped-def]
    clock, _, verifier, token = setup
    first = verifier.verify(token)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("decoded a cached token again"))
    assert verifier.verify(token) == first


def test_a_cached_token_still_expires(setup):  # type: ignore[no-untyped-def]
    clock, _, verifier, token = setup
    verifier.verify(token)
    clock.at = T0 + timedelta(minutes=15, seconds=30)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)


def test_a_cached_token_is_judged_against_the_clock_for_not_before_too(setup):  # type: ignore[no-untyped-def]
    clock, _, verifier, token = setup
    verifier.verify(token)
    clock.at = T0 - timedelta(minutes=5)  # the clock stepped back
    with pytest.raises(Unauthenticated, match="not yet valid"):
        verifier.verify(token)


def test_a_tampered_copy_of_a_cached_token_is_still_refused(setup):  # type: ignore[no-untyped-def]
    _, _, verifier, token = setup
    verifier.verify(token)
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)


def test_the_cache_is_bounded(setup):  # type: ignore[no-untyped-def]
    _, issuer, verifier, _ = setup
    for i in range(5):
        verifier.verify(issuer.issue(f"svc{i}", "service", ScopeSet.parse("system/*.cruds")).access_token)
    assert len(verifier._cache) == 2
