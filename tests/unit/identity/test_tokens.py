"""Access tokens: issue, verify, reject forgeries, rotate keys, publish JWKS (teleledger.identity.tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from teleledger.core.errors import ConfigurationError, Unauthenticated
from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.identity.tokens import Claims, TokenIssuer, TokenVerifier, jwks, key_id

ISS = "https://teleledger.example/auth"
AUD = "https://teleledger.example/fhir"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
TTL = timedelta(minutes=15)


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _seed_key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return _seed_key(1)


@pytest.fixture
def issuer(key, clock) -> TokenIssuer:
    return TokenIssuer(key, ISS, AUD, TTL, clock, new_jti=lambda: "jti-1")


@pytest.fixture
def verifier(key, clock) -> TokenVerifier:
    return TokenVerifier([key.public_key()], ISS, AUD, clock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(token: str) -> tuple[dict, dict, str]:
    head, body, sig = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(body))), sig


def _raw_token(header: dict, payload: dict, signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}.{_b64(signature)}"


def _reject(verifier: TokenVerifier, token: str, fragment: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(token)
    assert fragment in raised.value.message
    assert raised.value.status == 401
    return raised.value


def _patient_token(issuer: TokenIssuer) -> str:
    return issuer.issue(
        "acct-7", "patient", ROLE_SCOPE_SETS["patient"], patient="pat-7", fhir_user="Patient/pat-7", client_id="app"
    ).access_token


# -- round trip -----------------------------------------------------------------------------


def test_issued_token_verifies_back_to_the_same_claims(issuer, verifier):
    issued = issuer.issue(
        "acct-7", "patient", ROLE_SCOPE_SETS["patient"], patient="pat-7", fhir_user="Patient/pat-7", client_id="app"
    )
    assert issued.expires_in == 900
    assert issued.scope == str(ROLE_SCOPE_SETS["patient"])
    assert issued.patient == "pat-7"
    assert issued.jti == "jti-1"
    assert verifier.verify(issued.access_token) == Claims(
        issuer=ISS,
        audience=AUD,
        subject="acct-7",
        issued_at=T0,
        not_before=T0,
        expires_at=T0 + TTL,
        jti="jti-1",
        scopes=ROLE_SCOPE_SETS["patient"],
        role="patient",
        patient="pat-7",
        fhir_user="Patient/pat-7",
        client_id="app",
    )


def test_token_header_names_eddsa_the_access_token_type_and_the_key(issuer, key):
    header, payload, _ = _segments(_patient_token(issuer))
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": key_id(key.public_key())}
    assert payload["iat"] == payload["nbf"] == int(T0.timestamp())
    assert payload["exp"] == int((T0 + TTL).timestamp())


def test_absent_optional_claims_are_left_out_of_the_token(issuer, verifier):
    token = issuer.issue("svc-1", "service", ScopeSet.parse("system/Patient.rs")).access_token
    _, payload, _ = _segments(token)
    assert not {"patient", "fhirUser", "client_id"} & payload.keys()
    claims = verifier.verify(token)
    assert (claims.patient, claims.fhir_user, claims.client_id) == (None, None, None)


def test_default_jti_is_random(key, clock):
    issuer = TokenIssuer(key, ISS, AUD, TTL, clock)
    jtis = {issuer.issue("a", "practitioner", ScopeSet.empty()).jti for _ in range(20)}
    assert len(jtis) == 20


def test_key_id_is_the_first_eight_bytes_of_sha256_of_the_raw_public_key(key):
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_issuing_for_an_unknown_role_is_a_programming_error(issuer):
    with pytest.raises(ValueError):
        issuer.issue("a", "superuser", ScopeSet.empty())  # type: ignore[arg-type]


def test_a_naive_clock_is_refused_rather_than_read_as_local_time(key):
    issuer = TokenIssuer(key, ISS, AUD, TTL, lambda: datetime(2025, 3, 1, 12, 0))
    with pytest.raises(ValueError):
        issuer.issue("a", "practitioner", ScopeSet.empty())


# -- time -----------------------------------------------------------------------------------


def test_token_is_accepted_until_expiry_plus_leeway(issuer, verifier, clock):
    token = _patient_token(issuer)
    clock.at = T0 + TTL + timedelta(seconds=29)
    assert verifier.verify(token).subject == "acct-7"


def test_expired_token_is_rejected_as_expired(issuer, verifier, clock):
    token = _patient_token(issuer)
    clock.at = T0 + TTL + timedelta(seconds=30)
    _reject(verifier, token, "expired")


def test_token_from_the_near_future_is_accepted_within_leeway(issuer, verifier, clock):
    token = _patient_token(issuer)
    clock.at = T0 - timedelta(seconds=30)
    assert verifier.verify(token).subject == "acct-7"


def test_token_not_yet_valid_is_rejected_as_such(issuer, verifier, clock):
    token = _patient_token(issuer)
    clock.at = T0 - timedelta(seconds=31)
    _reject(verifier, token, "not yet valid")


def test_verifier_uses_the_injected_clock_not_the_system_clock(key):
    long_ago = Clock(datetime(2001, 1, 1, tzinfo=timezone.utc))
    token = TokenIssuer(key, ISS, AUD, TTL, long_ago).issue("a", "admin", ScopeSet.empty()).access_token
    assert TokenVerifier([key.public_key()], ISS, AUD, long_ago).verify(token).subject == "a"


# -- issuer and audience --------------------------------------------------------------------


def test_token_for_another_audience_is_rejected(issuer, key, clock):
    verifier = TokenVerifier([key.public_key()], ISS, "https://other.example/fhir", clock)
    _reject(verifier, _patient_token(issuer), "audience")


def test_token_from_another_issuer_is_rejected(issuer, key, clock):
    verifier = TokenVerifier([key.public_key()], "https://evil.example", AUD, clock)
    _reject(verifier, _patient_token(issuer), "issuer")


def test_audience_list_containing_ours_is_accepted(key, verifier):
    payload = _segments(_patient_token(TokenIssuer(key, ISS, AUD, TTL, Clock())))[1]
    payload["aud"] = ["https://x.example", AUD]
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key()), "typ": "at+jwt"})
    assert verifier.verify(token).audience == AUD


# -- tampering and forgeries ----------------------------------------------------------------


def test_tampered_payload_fails_the_signature_check(issuer, verifier):
    head, _, sig = _patient_token(issuer).split(".")
    _, payload, _ = _segments(_patient_token(issuer))
    payload["role"] = "admin"
    forged = f"{head}.{_b64(json.dumps(payload).encode())}.{sig}"
    _reject(verifier, forged, "signature is invalid")


def test_tampered_signature_is_rejected(issuer, verifier):
    head, body, sig = _patient_token(issuer).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    _reject(verifier, f"{head}.{body}.{_b64(bytes(raw))}", "signature is invalid")


def test_alg_none_forgery_is_rejected(issuer, verifier, key):
    _, payload, _ = _segments(_patient_token(issuer))
    forged = _raw_token({"alg": "none", "typ": "at+jwt", "kid": key_id(key.public_key())}, payload)
    _reject(verifier, forged, "algorithm is not accepted")


@pytest.mark.parametrize("secret_form", ["raw", "pem"])
def test_hs256_forgery_keyed_with_the_public_key_is_rejected(issuer, verifier, key, secret_form):
    public = key.public_key()
    secret = (
        public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        if secret_form == "raw"
        else public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    _, payload, _ = _segments(_patient_token(issuer))
    header = {"alg": "HS256", "typ": "at+jwt", "kid": key_id(public)}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    _reject(verifier, f"{signing_input}.{_b64(signature)}", "algorithm is not accepted")


def test_token_signed_by_an_unknown_key_is_rejected(verifier, clock):
    stranger = TokenIssuer(_seed_key(9), ISS, AUD, TTL, clock)
    _reject(verifier, _patient_token(stranger), "signing key is unknown")


def test_token_signed_by_another_key_under_our_kid_fails_the_signature_check(verifier, key, clock):
    _, payload, _ = _segments(_patient_token(TokenIssuer(key, ISS, AUD, TTL, clock)))
    headers = {"kid": key_id(key.public_key()), "typ": "at+jwt"}
    forged = jwt.encode(payload, _seed_key(9), algorithm="EdDSA", headers=headers)
    _reject(verifier, forged, "signature is invalid")


def test_token_without_kid_is_rejected(verifier, key, issuer):
    _, payload, _ = _segments(_patient_token(issuer))
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"typ": "at+jwt"})
    _reject(verifier, token, "signing key is unknown")


def test_jwt_that_is_not_an_access_token_is_rejected(verifier, key, issuer):
    _, payload, _ = _segments(_patient_token(issuer))
    id_token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key())})
    _reject(verifier, id_token, "not an access token")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"role": "superuser"}, "role"),
        ({"scope": "patient/Observation.sr"}, "scope"),
        ({"scope": 42}, "scope"),
        ({"exp": "tomorrow"}, "times"),
        ({"sub": ""}, "malformed"),
        ({"patient": ["a", "b"]}, "malformed"),
    ],
)
def test_validly_signed_token_with_malformed_claims_is_rejected(verifier, key, issuer, change, fragment):
    _, payload, _ = _segments(_patient_token(issuer))
    payload.update(change)
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key()), "typ": "at+jwt"})
    _reject(verifier, token, fragment)


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30", "x" * 10_000, "Bearer abc.def.ghi"],
)
def test_garbage_is_rejected_as_malformed(verifier, garbage):
    _reject(verifier, garbage, "malformed")


def test_rejection_messages_never_echo_the_token(issuer, verifier, clock):
    token = _patient_token(issuer)
    clock.at = T0 + timedelta(days=1)
    error = _reject(verifier, token, "expired")
    for part in token.split("."):
        assert part not in str(error)
    assert "pat-7" not in str(error)


# -- key rotation and JWKS ------------------------------------------------------------------


def test_verifier_with_old_and_new_keys_accepts_tokens_from_both(clock):
    old, new = _seed_key(1), _seed_key(2)
    verifier = TokenVerifier([new.public_key(), old.public_key()], ISS, AUD, clock)
    for signing_key in (old, new):
        token = TokenIssuer(signing_key, ISS, AUD, TTL, clock).issue("a", "practitioner", ScopeSet.empty())
        assert verifier.verify(token.access_token).subject == "a"


def test_after_rotation_tokens_of_the_retired_key_are_rejected(clock):
    old, new = _seed_key(1), _seed_key(2)
    token = TokenIssuer(old, ISS, AUD, TTL, clock).issue("a", "practitioner", ScopeSet.empty()).access_token
    _reject(TokenVerifier([new.public_key()], ISS, AUD, clock), token, "signing key is unknown")


def test_jwks_lists_each_public_key_as_an_okp_ed25519_jwk():
    keys = [_seed_key(1).public_key(), _seed_key(2).public_key()]
    document = jwks(keys)
    assert [set(jwk) for jwk in document["keys"]] == [{"kty", "crv", "x", "kid", "alg", "use"}] * 2
    for jwk, public in zip(document["keys"], keys, strict=True):
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
        assert jwk["kid"] == key_id(public)
        assert "=" not in jwk["x"]
        assert base64.urlsafe_b64decode(jwk["x"] + "=") == public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert json.loads(json.dumps(document)) == document


def test_a_third_party_can_verify_our_token_from_the_jwks_alone(issuer, key):
    token = _patient_token(issuer)
    (jwk,) = jwks([key.public_key()])["keys"]
    public = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, public, algorithms=["EdDSA"], audience=AUD, options={"verify_exp": False})
    assert claims["sub"] == "acct-7"


# -- configuration --------------------------------------------------------------------------


def test_verifier_without_keys_is_a_configuration_error(clock):
    with pytest.raises(ConfigurationError):
        TokenVerifier([], ISS, AUD, clock)


def test_non_ed25519_keys_are_a_configuration_error(clock, key):
    with pytest.raises(ConfigurationError):
        TokenVerifier([b"secret"], ISS, AUD, clock)  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        TokenIssuer(key.public_key(), ISS, AUD, TTL, clock)  # type: ignore[arg-type]
