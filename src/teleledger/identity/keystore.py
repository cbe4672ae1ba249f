"""The node's encrypted keystore of secp256k1 keys: one per account, organization and node role.

Every account (``user:<username>``), organization (``org:<name>``) and the node itself
(``node:authority``: the embedded chain's sealer, the relayer and operator of chain writes) has
a secp256k1 key here. Patients never need a wallet: the platform signs their EIP-712 consent
actions with their custodial key and relays them; a patient who brings a wallet signs the same
typed data instead. Keys leave and enter only as standard Ethereum keystore v3 JSON
(``export_json`` / ``import_json``, scrypt-protected, readable by geth, MetaMask, eth-account).

Storage: table ``keystore`` (on ``teleledger.storage.tables.metadata``; migration 0004)::

    key_id    String(160) PK     "node:authority", "user:<username>", "org:<name>"
    address   String(42)         checksummed address of the key (indexed, not unique: an
                                 imported key may deliberately serve two ids)
    sealed    LargeBinary        0x01 ‖ nonce(12) ‖ AES-256-GCM(K, nonce, private key, aad=key_id)
    created   BigInteger         µs since the epoch, UTC

where ``K = master.derive("teleledger keystore v1")`` (HKDF-SHA-256, ``core.crypto``). The key id
is the associated data, so a sealed key copied onto another id fails to open instead of letting
one account sign as another. ``address`` is derived again from the opened key whenever a key is
used; the column serves listings and look-ups by address.

Creation is idempotent across processes: insert ``ON CONFLICT DO NOTHING`` then re-read, so two
processes creating the same id at once end up with the one key that won.

Errors::

    TeleledgerError
    ├── InvalidInput
    │   └── KeystoreError    400  bad key id, wrong password, malformed or altered keystore JSON
    ├── NotFound             404  no key under that id (``create=False``)
    ├── Conflict             409  importing over an existing key without ``replace=True``
    └── DecryptionError      500  a sealed row does not open (other master key, tampered row)

This module must never log, print or put into an error message any private key, password or
derived secret.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_keys import keys
from sqlalchemy import BigInteger, Column, Connection, Engine, Index, LargeBinary, String, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.core.crypto import MasterKey, open_sealed, seal, secret_file
from teleledger.core.errors import Conflict, InvalidInput, NotFound
from teleledger.storage.db import UnitOfWork
from teleledger.storage.tables import metadata

__all__ = [
    "KEY_PURPOSE",
    "NODE_AUTHORITY",
    "STANDARD_SCRYPT_N",
    "Keystore",
    "KeystoreError",
    "keystore",
    "legacy_authority_file",
]

log = logging.getLogger("teleledger.keystore")

NODE_AUTHORITY = "node:authority"
#: HKDF ``info`` of the sealing key; a new version means a new key (and a re-seal migration)
KEY_PURPOSE = "teleledger keystore v1"
#: geth's "standard" scrypt cost (N=2^18, r=8, p=1: 256 MiB, ~0.6 s): the export default
STANDARD_SCRYPT_N = 1 << 18
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_KEY_ID = re.compile(r"^(node|user|org):[A-Za-z0-9._@:+-]{1,150}$")

# Imported files choose their own KDF cost. Bounded so that a hostile file cannot make the
# node allocate gigabytes or spin for minutes; geth's standard (256 MiB, N*r*p = 2^21) and
# light (N=2^12, p=6) settings and eth-account's pbkdf2 default (c=2^18) are well inside.
_MAX_SCRYPT_MEMORY = 1 << 30  # 128 * N * r bytes
_MAX_SCRYPT_WORK = 1 << 24  # N * r * p
_MAX_PBKDF2_ROUNDS = 10_000_000

keystore = Table(
    "keystore",
    metadata,
    Column("key_id", String(160), primary_key=True),
    Column("address", String(42), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("created", BigInteger, nullable=False),
    Index("ix_keystore_address", "address"),
)


class KeystoreError(InvalidInput):
    """A key id, password or keystore file the keystore cannot accept; the message says which."""


def legacy_authority_file(home: Path | str) -> Path:
    """Where ``teleledger chain`` kept the authority key before the keystore (0600, base64)."""
    return Path(home) / "chain" / "authority.key"


def _check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeystoreError(
            "key id must be node:<name>, user:<username> or org:<name> (letters, digits and . _ @ : + -), "
            f"found {str(key_id)[:80]!r}")
    return key_id


def _new_key() -> keys.PrivateKey:
    while True:  # a uniform scalar in [1, n-1]; a retry happens with probability ~2^-128
        raw = secrets.token_bytes(32)
        if 0 < int.from_bytes(raw, "big") < _SECP256K1_N:
            return keys.PrivateKey(raw)


def _address(key: keys.PrivateKey) -> str:
    return key.public_key.to_checksum_address()


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(keystore)


def _kdf_param(params: dict, name: str) -> int:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeystoreError(f"not a standard Ethereum keystore (v3) file: kdfparams.{name} must be a positive integer")
    return value


def _check_v3(data: Any) -> dict:
    """Shape and cost checks before any KDF runs: a clear error instead of a library's KeyError,
    and no unbounded work for a file that asks for it."""
    def bad(what: str) -> KeystoreError:
        return KeystoreError(f"not a standard Ethereum keystore (v3) file: {what}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("version") != 3:
        raise bad(f"expected version 3, found {str(data.get('version'))[:20]!r}")
    crypto = data.get("crypto", data.get("Crypto"))
    if not isinstance(crypto, dict):
        raise bad("no crypto object")
    for name in ("ciphertext", "mac"):
        if not isinstance(crypto.get(name), str):
            raise bad(f"crypto.{name} must be a hex string")
    if crypto.get("cipher") != "aes-128-ctr":
        raise bad("cipher must be aes-128-ctr")
    if not isinstance(crypto.get("cipherparams"), dict) or not isinstance(crypto["cipherparams"].get("iv"), str):
        raise bad("cipherparams.iv must be a hex string")
    params = crypto.get("kdfparams")
    if not isinstance(params, dict) or not isinstance(params.get("salt"), str):
        raise bad("kdfparams with a hex salt are required")
    if _kdf_param(params, "dklen") != 32:
        raise bad("kdfparams.dklen must be 32")
    kdf = crypto.get("kdf")
    if kdf == "scrypt":
        n, r, p = (_kdf_param(params, k) for k in ("n", "r", "p"))
        if n & (n - 1) or n < 2:
            raise bad("kdfparams.n must be a power of two")
        if 128 * n * r > _MAX_SCRYPT_MEMORY or n * r * p > _MAX_SCRYPT_WORK:
            raise bad(f"scrypt parameters too costly (n={n}, r={r}, p={p}); re-export with standard settings")
    elif kdf == "pbkdf2":
        if params.get("prf") != "hmac-sha256":
            raise bad("pbkdf2 prf must be hmac-sha256")
        if _kdf_param(params, "c") > _MAX_PBKDF2_ROUNDS:
            raise bad("pbkdf2 iteration count too high; re-export with standard settings")
    else:
        raise bad("kdf must be scrypt or pbkdf2")
    return data


def _decrypt(data: dict, password: str) -> keys.PrivateKey:
    from eth_account import Account

    try:
        raw = bytes(Account.decrypt(data, password))
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise KeystoreError("wrong password for this keystore file (or the file was altered)") from None
        raise KeystoreError("not a standard Ethereum keystore (v3) file: a field is not valid hex") from None
    except Exception:  # noqa: BLE001 - anything else from an untrusted file is a malformed file
        raise KeystoreError("not a standard Ethereum keystore (v3) file: it cannot be decoded") from None
    # ``from None`` above: the library's exception context holds the file's fields, and a
    # traceback of a password-derived value is exactly what this module must never print
    if len(raw) != 32 or not 0 < int.from_bytes(raw, "big") < _SECP256K1_N:
        raise KeystoreError("the keystore file decrypts to something that is not a secp256k1 private key")
    key = keys.PrivateKey(raw)
    stated = data.get("address")
    if stated is not None:
        if not isinstance(stated, str) or stated.lower().removeprefix("0x") != _address(key)[2:].lower():
            raise KeystoreError("the keystore file's address does not match its key: the file was altered")
    return key


class Keystore:
    """secp256k1 keys sealed under the master key (see the module docstring).

    ``legacy_authority`` is the 0600 file ``teleledger chain`` used before this keystore: when
    the keystore has no ``node:authority`` yet and the file exists, its key is imported, so an
    existing embedded chain keeps its sealer.
    """

    def __init__(self, engine: Engine, master: MasterKey, *, legacy_authority: Path | None = None) -> None:
        self.engine = engine
        self._aead = AESGCM(master.derive(KEY_PURPOSE))
        self._legacy_authority = legacy_authority

    # --- reading and creating -------------------------------------------------------------------

    def key(self, key_id: str, *, create: bool = True) -> keys.PrivateKey:
        """The private key stored under ``key_id``; created (once, across processes) when absent
        and ``create``, ``NotFound`` otherwise."""
        _check_key_id(key_id)
        with UnitOfWork(self.engine) as uow:
            sealed = self._sealed(uow.c, key_id)
        if sealed is None:
            if key_id == NODE_AUTHORITY and self._adopt_legacy_authority():
                return self.key(key_id, create=False)
            if not create:
                raise NotFound(f"no key {key_id!r} in the keystore")
            with UnitOfWork(self.engine) as uow:
                self.ensure_in(uow.c, key_id)
                sealed = self._sealed(uow.c, key_id)
                uow.commit()
        assert sealed is not None
        return self._open(key_id, sealed)

    def address(self, key_id: str) -> str:
        """The checksummed address of ``key_id``'s key (created if absent)."""
        return _address(self.key(key_id))

    def key_ids(self) -> list[tuple[str, str]]:
        """Every (key id, address), sorted by key id. Addresses as stored, not re-derived."""
        with UnitOfWork(self.engine) as uow:
            rows = uow.c.execute(select(keystore.c.key_id, keystore.c.address).order_by(keystore.c.key_id)).all()
        return [(r.key_id, r.address) for r in rows]

    def ensure_in(self, conn: Connection, key_id: str) -> str:
        """Create ``key_id``'s key inside the caller's transaction unless it exists; its address.

        For use cases that create an owner and its key together (``Accounts.create_user``): the
        key commits with the owner or not at all."""
        _check_key_id(key_id)
        key = _new_key()
        conn.execute(_insert(conn).values(key_id=key_id, address=_address(key), sealed=self._seal(key_id, key),
                                          created=time.time_ns() // 1000)
                     .on_conflict_do_nothing(index_elements=["key_id"]))
        stored = conn.execute(select(keystore.c.address).where(keystore.c.key_id == key_id)).scalar_one()
        return str(stored)

    # --- export and import ----------------------------------------------------------------------

    def export_json(self, key_id: str, password: str, *, scrypt_n: int = STANDARD_SCRYPT_N) -> dict:
        """``key_id``'s key as standard Ethereum keystore v3 JSON (scrypt, r=8, p=1).

        ``scrypt_n`` below the standard 2^18 makes the file cheaper to brute-force: only for
        tests and for passwords that are long random strings."""
        from eth_account import Account

        if not isinstance(password, str) or not password:
            raise KeystoreError("an export needs a non-empty password")
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > STANDARD_SCRYPT_N:
            raise KeystoreError(f"scrypt_n must be a power of two from 2 to {STANDARD_SCRYPT_N}")
        key = self.key(key_id, create=False)
        return dict(Account.encrypt(key.to_bytes(), password, kdf="scrypt", iterations=scrypt_n))

    def import_json(self, key_id: str, keystore_json: dict | str, password: str, *, replace: bool = False) -> str:
        """Store the key of a keystore v3 file under ``key_id``; its checksummed address.

        Importing the key already stored there changes nothing; another key needs ``replace``."""
        _check_key_id(key_id)
        if isinstance(keystore_json, (str, bytes)):
            try:
                keystore_json = json.loads(keystore_json)
            except (ValueError, UnicodeDecodeError):
                raise KeystoreError("not a standard Ethereum keystore (v3) file: not JSON") from None
        if not isinstance(password, str):
            raise KeystoreError("the password must be text")
        key = _decrypt(_check_v3(keystore_json), password)
        address = self._store(key_id, key, replace=replace)
        log.info("imported a key into the keystore as %s (address %s)", key_id, address)
        return address

    # --- internals ------------------------------------------------------------------------------

    def _seal(self, key_id: str, key: keys.PrivateKey) -> bytes:
        return seal(self._aead, key.to_bytes(), key_id.encode())

    def _open(self, key_id: str, sealed: bytes) -> keys.PrivateKey:
        return keys.PrivateKey(open_sealed(self._aead, sealed, key_id.encode(), what=f"keystore entry {key_id}"))

    @staticmethod
    def _sealed(conn: Connection, key_id: str) -> bytes | None:
        value = conn.execute(select(keystore.c.sealed).where(keystore.c.key_id == key_id)).scalar()
        return None if value is None else bytes(value)

    def _store(self, key_id: str, key: keys.PrivateKey, *, replace: bool) -> str:
        address = _address(key)
        with UnitOfWork(self.engine) as uow:
            conn = uow.c
            conn.execute(_insert(conn).values(key_id=key_id, address=address, sealed=self._seal(key_id, key),
                                              created=time.time_ns() // 1000)
                         .on_conflict_do_nothing(index_elements=["key_id"]))
            current = self._open(key_id, self._sealed(conn, key_id) or b"")
            if current.to_bytes() != key.to_bytes():
                if not replace:
                    raise Conflict(f"the keystore already holds another key as {key_id!r} "
                                   f"(address {_address(current)}); import with replace to overwrite it")
                conn.execute(update(keystore).where(keystore.c.key_id == key_id)
                             .values(address=address, sealed=self._seal(key_id, key)))
            uow.commit()
        return address

    def _adopt_legacy_authority(self) -> bool:
        """Import the pre-keystore authority key file when there is one; True when imported
        (or when another process just did)."""
        path = self._legacy_authority
        if path is None or not path.exists():
            return False
        raw = secret_file(path, create=False, what="chain authority key")
        key = keys.PrivateKey(raw)
        with UnitOfWork(self.engine) as uow:
            # DO NOTHING: a concurrent process adopting the same file wins with the same key
            uow.c.execute(_insert(uow.c).values(key_id=NODE_AUTHORITY, address=_address(key),
                                                sealed=self._seal(NODE_AUTHORITY, key),
                                                created=time.time_ns() // 1000)
                          .on_conflict_do_nothing(index_elements=["key_id"]))
            uow.commit()
        log.warning("imported the chain authority key from %s into the encrypted keystore; once you have a "
                    "backup (teleledger keys export %s) the file can be deleted", path, NODE_AUTHORITY)
        return True
