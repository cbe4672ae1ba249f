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
from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.core.crypto import MasterKey, new_data_key
from teleledger.core.errors import TeleledgerError
from teleledger.storage import tables

NODE_KEY = "node"


class KeyShredded(TeleledgerError):
    """The data key of this record was destroyed: the record is erased."""

    status = 410
    issue_code = "deleted"


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
        wrapped = conn.execute(select(tables.data_keys.c.wrapped).where(tables.data_keys.c.key_id == key_id)).scalar()
        if wrapped is None:
            raw = new_data_key()
            values = {"key_id": key_id, "wrapped": self._master.wrap(raw, key_id=key_id), "created": int(time.time())}
            # two processes may create the same patient's key at once: the first insert wins and
            # the loser re-reads it, so a patient never ends up with two keys
            dialect = conn.dialect.name
            ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(tables.data_keys)
            conn.execute(ins.values(**values).on_conflict_do_nothing(index_elements=["key_id"]))
            wrapped = conn.execute(
                select(tables.data_keys.c.wrapped).where(tables.data_keys.c.key_id == key_id)
            ).scalar_one()
            if wrapped != values["wrapped"]:
                raw = self._master.unwrap(wrapped, key_id=key_id)
            # do not cache a key created in a transaction that may still roll back
            return AESGCM(raw)
        return self._remember(key_id, AESGCM(self._master.unwrap(wrapped, key_id=key_id)))

    def for_read(self, conn: Connection, key_id: str) -> AESGCM:
        aead = self._cache.get(key_id)
        if aead is not None:
            return aead
        wrapped = conn.execute(select(tables.data_keys.c.wrapped).where(tables.data_keys.c.key_id == key_id)).scalar()
        if wrapped is None:
            raise KeyShredded("this record was erased (its data key no longer exists)")
        return self._remember(key_id, AESGCM(self._master.unwrap(wrapped, key_id=key_id)))
