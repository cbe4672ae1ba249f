"""Per-patient data keys: created on first write for a patient, wrapped by the master key.

Key ids: ``p.<patient id>`` for a patient's compartment, ``node`` for data that belongs to no
patient (organizations, practitioners, schedules). Erasing a patient = deleting their row in
``data_keys`` (crypto-shredding): their resource versions become unreadable while every hash in
the transparency log stays verifiable.
"""

from __future__ import annotations

import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection

from teleledger.core.crypto import MasterKey, new_data_key
from teleledger.core.errors import TeleledgerError
from teleledger.storage import group_commit
from teleledger.storage.db import run

NODE_KEY = "node"


class KeyShredded(TeleledgerError):
    """The data key of this record was destroyed: the record is erased."""

    status = 410
    issue_code = "deleted"


# fixed SQL on the driver (``storage.db.run``): every new patient's first write creates a key,
# and SQLAlchemy's statement machinery cost several times what these statements need
_SELECT_KEY = "SELECT wrapped FROM data_keys WHERE key_id = ?"
_INSERT_KEY = "INSERT INTO data_keys (key_id, wrapped, created) VALUES (?, ?, ?) ON CONFLICT (key_id) DO NOTHING"


def _wrapped(conn: Connection, key_id: str) -> bytes | None:
    row = run(conn, _SELECT_KEY, (key_id,)).fetchone()
    return None if row is None else bytes(row[0])


def key_id_for(patient_ids: frozenset[str] | set[str]) -> str:
    # a resource in several compartments (rare: e.g. an Appointment of two patients) is sealed
    # under the first patient's key; erasing either patient then needs the other key too — documented.
    if not patient_ids:
        return NODE_KEY
    return "p." + min(patient_ids)


class KeyRing:
    """Caches unwrapped data keys (as AESGCM objects); keys are immutable, so the cache is safe
    across processes sharing one database."""

    def __init__(self, master: MasterKey, *, max_cached: int = 50_000) -> None:
        self._master = master
        self._cache: dict[str, AESGCM] = {}
        self._lock = threading.Lock()
        self._max = max_cached
        # under group commit a key read here may be one another member of the group created:
        # if the group's commit fails, forget everything rather than keep a key never stored
        group_commit.forget_on_failure(self)

    def forget_uncommitted(self) -> None:
        with self._lock:
            self._cache.clear()

    def _remember(self, key_id: str, aead: AESGCM) -> AESGCM:
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key_id] = aead
        return aead

    def for_write(self, conn: Connection, key_id: str) -> AESGCM:
        """The key to seal with, creating it inside the caller's transaction when new."""
        aead = self._cache.get(key_id)
        if aead is not None:
            return aead
        wrapped = _wrapped(conn, key_id)
        if wrapped is None:
            raw = new_data_key()
            mine = self._master.wrap(raw, key_id=key_id)
            # two processes may create the same patient's key at once: the first insert wins and
            # the loser re-reads it, so a patient never ends up with two keys
            run(conn, _INSERT_KEY, (key_id, mine, int(time.time())))
            wrapped = _wrapped(conn, key_id)
            assert wrapped is not None, "the data key vanished inside its own transaction"
            if wrapped != mine:
                raw = self._master.unwrap(wrapped, key_id=key_id)
            # do not cache a key created in a transaction that may still roll back
            return AESGCM(raw)
        return self._remember(key_id, AESGCM(self._master.unwrap(wrapped, key_id=key_id)))

    def for_read(self, conn: Connection, key_id: str) -> AESGCM:
        aead = self._cache.get(key_id)
        if aead is not None:
            return aead
        wrapped = _wrapped(conn, key_id)
        if wrapped is None:
            raise KeyShredded("this record was erased (its data key no longer exists)")
        return self._remember(key_id, AESGCM(self._master.unwrap(wrapped, key_id=key_id)))
