"""JWT access tokens: issuing, verifying, and publishing the verification keys (JWKS).

Format (RFC 9068-style JWT access token, RFC 8037 EdDSA):

* header ``{"alg": "EdDSA", "typ": "at+jwt", "kid": <key id>}``, where the key id is the first
  8 bytes of SHA-256 over the 32-byte raw Ed25519 public key, as 16 lower-case hex digits;
* claims ``iss aud sub iat nbf exp jti scope role`` always, and ``patient`` (a Patient id),
  ``fhirUser`` (``Practitioner/abc``) and ``client_id`` when known. ``iat = nbf``; times are
  integer seconds since the epoch; ``scope`` is the canonical text of a ``ScopeSet``.

Verification accepts only ``alg = EdDSA`` with one of the configured public keys chosen by
``kid``, so ``alg: none``, HMAC with the public key as secret and other algorithm-confusion
forgeries are refused before any cryptography runs. Time is checked against the injected clock,
never the system clock. Every failure is ``Unauthenticated`` with a short message saying which
check failed; messages never contain the token or any claim value.

Key rotation: issue with the new key, keep the old public key in the verifier (and the JWKS)
until the last token it signed has expired (``ttl`` + leeway), then drop it.

A verifier remembers the claims of the tokens it verified (bounded, keyed by the exact token
text): everything but time follows from the signed bytes alone, so a repeat presentation skips
the parsing and the signature check and is only judged again against the clock (``exp`` and
``nbf``), exactly as a first one would be. Failures are never remembered.

This module must never perform I/O, read the system clock, or log tokens.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, cast

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from teleledger.core.errors import ConfigurationError, InvalidInput, Unauthenticated
from teleledger.identity.scopes import ROLES, Role, ScopeSet

__all__ = [
    "ALGORITHM",
    "TOKEN_TYPE",
    "Claims",
    "IssuedToken",
    "TokenIssuer",
    "TokenVerifier",
    "jwks",
    "key_id",
]

ALGORITHM: Final[str] = "EdDSA"
TOKEN_TYPE: Final[str] = "at+jwt"
#: Far above any token we issue; refuses to parse megabytes of attacker-supplied text.
_MAX_TOKEN_LENGTH: Final[int] = 8192
#: Verified tokens remembered per verifier (least recently used dropped first).
_CACHE_SIZE: Final[int] = 4096


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The ``kid`` of a key: SHA-256 of the raw public key, first 8 bytes, hex."""
    return hashlib.sha256(_raw(public_key)).digest()[:8].hex()


def jwks(public_keys: Sequence[Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    """The JSON Web Key Set (RFC 7517, OKP keys per RFC 8037) for ``/.well-known/jwks.json``."""
    return {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64url(_raw(key)),
                "kid": key_id(key),
                "alg": ALGORITHM,
                "use": "sig",
            }
            for key in _check_public_keys(public_keys)
        ]
    }


def _check_public_keys(public_keys: Sequence[Ed25519PublicKey]) -> Sequence[Ed25519PublicKey]:
    for key in public_keys:
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigurationError("token verification keys must be Ed25519 public keys")
    return public_keys


def _epoch(moment: datetime) -> int:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the clock must return timezone-aware datetimes")
    return int(moment.timestamp())


def _from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _new_jti() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """What the token endpoint returns (plus ``jti`` for the audit trail)."""

    access_token: str
    expires_in: int
    scope: str
    patient: str | None
    jti: str


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified content of an access token."""

    issuer: str
    audience: str
    subject: str
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    jti: str
    scopes: ScopeSet
    role: Role
    patient: str | None
    fhir_user: str | None
    client_id: str | None
    #: the Organization id the account acts for (claim ``organization``)
    organization: str | None = None
    #: the RelatedPerson id a delegate acts as (claim ``related_person``)
    related_person: str | None = None


class TokenIssuer:
    """Signs access tokens with one Ed25519 private key."""

    __slots__ = ("_audience", "_issuer", "_kid", "_new_jti", "_now", "_private_key", "_ttl")

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        issuer: str,
        audience: str,
        ttl: timedelta,
        now: Callable[[], datetime],
        *,
        new_jti: Callable[[], str] = _new_jti,
    ) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigurationError("the token signing key must be an Ed25519 private key")
        if not issuer or not audience:
            raise ConfigurationError("token issuer and audience must not be empty")
        if ttl < timedelta(seconds=1):
            raise ConfigurationError("token lifetime must be at least one second")
        self._private_key = private_key
        self._kid = key_id(private_key.public_key())
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._now = now
        self._new_jti = new_jti

    @property
    def key_id(self) -> str:
        return self._kid

    def issue(
        self,
        subject: str,
        role: Role,
        scopes: ScopeSet,
        *,
        patient: str | None = None,
        fhir_user: str | None = None,
        client_id: str | None = None,
        organization: str | None = None,
        related_person: str | None = None,
    ) -> IssuedToken:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not subject:
            raise ValueError("a token needs a subject")
        issued_at = _epoch(self._now())
        expires_in = int(self._ttl.total_seconds())
        jti = self._new_jti()
        scope = str(scopes)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + expires_in,
            "jti": jti,
            "scope": scope,
            "role": role,
        }
        if patient is not None:
            claims["patient"] = patient
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        if client_id is not None:
            claims["client_id"] = client_id
        if organization is not None:
            claims["organization"] = organization
        if related_person is not None:
            claims["related_person"] = related_person
        token = jwt.encode(
            claims,
            self._private_key,
            algorithm=ALGORITHM,
            headers={"kid": self._kid, "typ": TOKEN_TYPE},
        )
        return IssuedToken(access_token=token, expires_in=expires_in, scope=scope, patient=patient, jti=jti)


class TokenVerifier:
    """Verifies access tokens against one or more Ed25519 public keys (rotation)."""

    __slots__ = ("_audience", "_cache", "_cache_size", "_issuer", "_keys", "_leeway", "_lock", "_now")

    def __init__(
        self,
        public_keys: Sequence[Ed25519PublicKey],
        issuer: str,
        audience: str,
        now: Callable[[], datetime],
        leeway: timedelta = timedelta(seconds=30),
        *,
        cache_size: int = _CACHE_SIZE,
    ) -> None:
        if not public_keys:
            raise ConfigurationError("token verification needs at least one public key")
        self._keys = {key_id(key): key for key in _check_public_keys(public_keys)}
        self._issuer = issuer
        self._audience = audience
        self._now = now
        self._leeway = int(leeway.total_seconds())
        # token text -> (claims, nbf, exp) of a token whose signature and claims checked out
        self._cache: OrderedDict[str, tuple[Claims, int, int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def verify(self, token: str) -> Claims:
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            raise Unauthenticated("access token is malformed")
        with self._lock:
            hit = self._cache.get(token)
            if hit is not None:
                self._cache.move_to_end(token)
        if hit is not None:
            claims, nbf, exp = hit
            self._check_time(nbf, exp)
            return claims
        claims = self._verify(token)
        if self._cache_size > 0:
            entry = (claims, _epoch(claims.not_before), _epoch(claims.expires_at))
            with self._lock:
                self._cache[token] = entry
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return claims

    def _check_time(self, nbf: int, exp: int) -> None:
        now = _epoch(self._now())
        if now >= exp + self._leeway:
            raise Unauthenticated("access token has expired")
        if now + self._leeway < nbf:
            raise Unauthenticated("access token is not yet valid")

    def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("access token is malformed") from exc
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("access token algorithm is not accepted")
        if header.get("typ") != TOKEN_TYPE:
            raise Unauthenticated("token is not an access token")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("access token signing key is unknown")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                # Signature only: time, issuer and audience are checked below with our clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("access token signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("access token is malformed") from exc
        return self._claims(payload)

    def _claims(self, payload: dict[str, Any]) -> Claims:
        if payload.get("iss") != self._issuer:
            raise Unauthenticated("access token issuer is not accepted")
        aud = payload.get("aud")
        if not (aud == self._audience or (isinstance(aud, list) and self._audience in aud)):
            raise Unauthenticated("access token audience is not accepted")
        iat, nbf, exp = payload.get("iat"), payload.get("nbf"), payload.get("exp")
        if not all(type(value) is int for value in (iat, nbf, exp)):
            raise Unauthenticated("access token times are malformed")
        self._check_time(cast(int, nbf), cast(int, exp))
        subject, jti, role = payload.get("sub"), payload.get("jti"), payload.get("role")
        if not (isinstance(subject, str) and subject and isinstance(jti, str) and jti):
            raise Unauthenticated("access token claims are malformed")
        if role not in ROLES:
            raise Unauthenticated("access token role is not recognised")
        optional = {name: payload.get(name) for name in ("patient", "fhirUser", "client_id", "organization",
                                                          "related_person")}
        if any(value is not None and not isinstance(value, str) for value in optional.values()):
            raise Unauthenticated("access token claims are malformed")
        scope = payload.get("scope")
        if not isinstance(scope, str):
            raise Unauthenticated("access token scope is malformed")
        try:
            scopes = ScopeSet.parse(scope)
        except InvalidInput as exc:
            raise Unauthenticated("access token scope is malformed") from exc
        return Claims(
            issuer=self._issuer,
            audience=self._audience,
            subject=subject,
            issued_at=_from_epoch(cast(int, iat)),
            not_before=_from_epoch(cast(int, nbf)),
            expires_at=_from_epoch(cast(int, exp)),
            jti=jti,
            scopes=scopes,
            role=role,
            patient=optional["patient"],
            fhir_user=optional["fhirUser"],
            client_id=optional["client_id"],
            organization=optional["organization"],
            related_person=optional["related_person"],
        )
