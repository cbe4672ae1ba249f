"""Cryptographic helpers: the AES-256-GCM envelope for resources at rest, key wrapping, keyed hashes.

Byte formats (version 1):

* sealed body  = ``0x01 ‖ nonce (12 bytes) ‖ AES-256-GCM(data key, nonce, plaintext, aad)``;
  ``aad`` binds the ciphertext to where it belongs (``Type/id/_history/version``), so a row
  copied onto another resource fails to decrypt instead of silently showing the wrong data.
* wrapped key  = ``0x01 ‖ nonce (12) ‖ AES-256-GCM(master key, nonce, data key, aad=key id)``.
* keyed hashes = HMAC-SHA-256 under keys derived from the master key with HKDF-SHA-256
  (``info`` names the purpose), so the index key and the log key are independent and neither
  can decrypt anything.

The master key never leaves a ``MasterKey`` implementation: ``LocalMasterKey`` keeps it in memory
(from a 0600 key file or the environment); a KMS-backed class can implement the same two
methods. This module must never log keys or plaintext.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teleledger.core.errors import ConfigurationError, TeleledgerError

_VERSION = b"\x01"
_NONCE = 12


def secret_file(path: Path, *, create: bool, what: str, size: int = 32) -> bytes:
    """A ``size``-byte secret kept base64 in ``path`` (mode 0600): the node's master key file,
    a witness key, the chain authority key.

    Created only when ``create``, with O_EXCL so that two processes starting at once never write
    two different secrets; never overwritten; refused when others can read it.
    """
    if not path.exists():
        if not create:
            raise ConfigurationError(f"{what} file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.b64encode(secrets.token_bytes(size)).decode() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(f"{what} file {path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        raw = base64.b64decode(path.read_text("ascii").strip(), validate=True)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{what} file {path} does not hold base64") from exc
    if len(raw) != size:
        raise ConfigurationError(f"{what} file {path} must hold {size} bytes, found {len(raw)}")
    return raw


class DecryptionError(TeleledgerError):
    """A sealed value did not authenticate: wrong key, wrong place or tampered bytes."""


class MasterKey(Protocol):
    def wrap(self, data_key: bytes, *, key_id: str) -> bytes: ...
    def unwrap(self, wrapped: bytes, *, key_id: str) -> bytes: ...
    def derive(self, purpose: str) -> bytes: ...


class LocalMasterKey:
    """A 256-bit master key held in process memory."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigurationError(f"master key must be 32 bytes, found {len(key)}")
        self._aead = AESGCM(key)
        self._key = key

    @classmethod
    def from_base64(cls, text: str) -> LocalMasterKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError as exc:
            raise ConfigurationError("TELELEDGER_MASTER_KEY is not valid base64") from exc
        return cls(raw)

    @classmethod
    def from_file(cls, path: Path, *, create: bool) -> LocalMasterKey:
        """Load the key file; create it (0600, never overwritten) only when ``create``."""
        return cls(secret_file(path, create=create, what="master key"))

    def wrap(self, data_key: bytes, *, key_id: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, data_key, key_id.encode())

    def unwrap(self, wrapped: bytes, *, key_id: str) -> bytes:
        return _open(self._aead, wrapped, key_id.encode(), what=f"data key {key_id}")

    def derive(self, purpose: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(self._key)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return _VERSION + nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, sealed: bytes, aad: bytes, *, what: str) -> bytes:
    if len(sealed) < 1 + _NONCE + 16 or sealed[:1] != _VERSION:
        raise DecryptionError(f"{what}: not a sealed value (bad length or version byte)")
    try:
        return aead.decrypt(sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], aad)
    except InvalidTag as exc:
        raise DecryptionError(f"{what}: authentication failed (wrong key or tampered)") from exc


def open_sealed(aead: AESGCM, sealed: bytes, aad: bytes, *, what: str) -> bytes:
    return _open(aead, sealed, aad, what=what)


class KeyedHash:
    """HMAC-SHA-256 under one derived key; ``digest`` returns a short hex string for indexes."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        # keyed once; copying the keyed state is about twice as fast as re-keying per hash
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, *parts: str) -> str:
        # 0x1f between parts so ("ab","c") and ("a","bc") never collide
        h = self._base.copy()
        h.update("\x1f".join(parts).encode())
        return h.hexdigest()[:32]

    def raw(self, data: bytes) -> bytes:
        h = self._base.copy()
        h.update(data)
        return h.digest()
