"""Password hashing (argon2id) and the minimum password policy.

Hashes are argon2id in PHC string form (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``), made by
argon2-cffi. Production parameters are RFC 9106's low-memory profile (argon2-cffi's default);
tests use :meth:`Hasher.for_tests`, which is cheap and must never be wired in production.
Hashes made with other parameters still verify; :meth:`Hasher.needs_rehash` tells the login
service to re-hash after a successful verification.

Passwords are NFKC-normalised before hashing and verifying (NIST SP 800-63B section 5.1.1.2),
so the same password typed on keyboards that compose accents differently still matches.

``verify`` never raises on a wrong password or a corrupt stored hash: it returns False.
Passing ``None`` as the stored hash (unknown account) verifies against a dummy hash made with the
same parameters, so that the time taken does not reveal whether an account exists.

This module must never log, store or echo a password, and must never perform I/O.
"""

from __future__ import annotations

import unicodedata
from typing import Final

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError

from teleledger.core.errors import InvalidInput

__all__ = [
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "Hasher",
    "check_password_policy",
    "hash_password",
    "needs_rehash",
    "verify_password",
]

MIN_PASSWORD_LENGTH: Final[int] = 8
#: Long enough for any passphrase (NIST asks for at least 64); bounds the work per login attempt.
MAX_PASSWORD_LENGTH: Final[int] = 1024


def _normalise(password: str) -> str:
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    return unicodedata.normalize("NFKC", password)


class Hasher:
    """argon2id with fixed parameters. ``Hasher()`` is the production profile."""

    __slots__ = ("_dummy", "_ph")

    def __init__(self, password_hasher: PasswordHasher | None = None) -> None:
        self._ph = password_hasher or PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)
        self._dummy: str | None = None

    @classmethod
    def for_tests(cls) -> Hasher:
        """Cheap parameters (1 pass, 8 MiB) so test suites stay fast. Never use in production."""
        return cls(PasswordHasher(time_cost=1, memory_cost=8 * 1024))

    def hash(self, password: str) -> str:
        return self._ph.hash(_normalise(password))

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True when ``password`` matches ``password_hash``; False otherwise, never raises for that."""
        candidate = _normalise(password)
        if password_hash is None:
            if self._dummy is None:
                self._dummy = self._ph.hash("teleledger dummy password for unknown accounts")
            self._verify(self._dummy, candidate)
            return False
        return self._verify(password_hash, candidate)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._ph.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            # VerificationError covers VerifyMismatchError; InvalidHashError a corrupt stored hash.
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters (or cannot be read at all)."""
        try:
            return self._ph.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return True


_DEFAULT: Final[Hasher] = Hasher()


def hash_password(password: str) -> str:
    """Hash with the production parameters."""
    return _DEFAULT.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Verify with the production hasher; see :meth:`Hasher.verify`."""
    return _DEFAULT.verify(password_hash, password)


def needs_rehash(password_hash: str) -> bool:
    return _DEFAULT.needs_rehash(password_hash)


def check_password_policy(password: str) -> None:
    """Raise InvalidInput unless the password meets the minimum policy.

    At least 8 characters (after NFKC normalisation), at most 1024, and not one character
    repeated. Messages never contain the password.
    """
    if not isinstance(password, str):
        raise InvalidInput("password must be a string", expression="password")
    normalised = unicodedata.normalize("NFKC", password)
    if len(normalised) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"password must be at least {MIN_PASSWORD_LENGTH} characters long", expression="password"
        )
    if len(normalised) > MAX_PASSWORD_LENGTH:
        raise InvalidInput(
            f"password must be at most {MAX_PASSWORD_LENGTH} characters long", expression="password"
        )
    if len(set(normalised)) == 1:
        raise InvalidInput("password must not be a single repeated character", expression="password")
