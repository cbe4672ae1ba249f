"""What the records service tells the transparency log: every change and every access.

* ``changes(conn, stored)`` — one *change* entry per resource version written, appended in the
  same transaction as the version (called by ``ResourceStore`` itself, so no write path can
  skip it).
* ``access(conn, ...)`` — one *access* entry per patient whose data a request touched (and
  one for a denied attempt), with the exact versions disclosed; mirrored as a row of
  ``access_events`` that is served as a FHIR AuditEvent and shown to the patient.

Neither ever carries PHI: the log holds keyed hashes, random ids and codes (``ledger.log.entry``).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from teleledger.core.crypto import KeyedHash
from teleledger.fhir import compartment
from teleledger.ledger.log import entry as log_entry
from teleledger.ledger.log.service import TransparencyLog
from teleledger.policy.model import Principal
from teleledger.storage.db import run_many

_INSERT_ACCESS_EVENT = ("INSERT INTO access_events (recorded, actor, role, fhir_user, action, purpose, outcome, "
                        "reason, patient_id, refs, leaf_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Touched:
    """A resource version a request disclosed or changed."""

    res_type: str
    res_id: str
    version: int
    patients: frozenset[str]

    @property
    def ref(self) -> str:
        return f"{self.res_type}/{self.res_id}/_history/{self.version}"


def touched(stored_list: Iterable) -> list[Touched]:  # type: ignore[type-arg]
    return [Touched(s.res_type, s.res_id, s.version, compartment.patient_ids(s.body) if s.body else frozenset())
            for s in stored_list]


class Auditor:
    def __init__(self, log: TransparencyLog, log_key: KeyedHash, *, clock=_now_us) -> None:  # type: ignore[no-untyped-def]
        self.log = log
        self.key = log_key
        self.clock = clock

    # ---- changes ----------------------------------------------------------------------------

    def change_entry(self, stored) -> bytes:  # type: ignore[no-untyped-def]
        mac = log_entry.content_hmac(self.key, stored.body) if stored.body is not None else b""
        return log_entry.encode_change(timestamp_us=stored.last_updated, method=stored.method,
                                       resource_type=stored.res_type, resource_id=stored.res_id,
                                       version=stored.version, content_hmac=mac)

    def changes(self, conn: Connection, stored_list: Sequence) -> None:  # type: ignore[type-arg]
        if stored_list:
            self.log.append_own(conn, [self.change_entry(s) for s in stored_list])

    # ---- accesses ---------------------------------------------------------------------------

    def access(self, conn: Connection, principal: Principal, action: str, items: Sequence[Touched], *,
               outcome: str = "allowed", reason: str = "", patients: Iterable[str] = ()) -> None:
        """Record one access event per patient concerned (items grouped by compartment).

        Resources outside every compartment are not patient data and are not recorded; a request
        that touched no patient data but names patients (a denied read, an empty search in a
        patient's compartment) is recorded once per named patient; one with neither, once.
        """
        by_patient: dict[str | None, list[str]] = defaultdict(list)
        for item in items:
            for p in item.patients:
                by_patient[p].append(item.ref)
        for p in patients:
            by_patient.setdefault(p, [])
        if not by_patient and (outcome == "denied" or not items):
            by_patient[None] = []
        if not by_patient:
            return
        now = self.clock()
        fhir_user = principal.fhir_user
        rows, leaves = [], []
        for patient_id, refs in by_patient.items():
            refs = sorted(set(refs))
            leaf = log_entry.encode_access(
                timestamp_us=now, actor=principal.subject, role=principal.role, action=action,
                purpose=principal.purpose, outcome=outcome, reason=reason,
                patient_pseudonym=log_entry.patient_pseudonym(self.key, patient_id) if patient_id else b"",
                references=refs,
            )
            leaves.append(leaf)
            rows.append((now, principal.subject, principal.role, fhir_user, action, principal.purpose, outcome,
                         reason, patient_id, " ".join(refs), hashlib.sha256(b"\x00" + leaf).digest()))
        self.log.append_own(conn, leaves)
        run_many(conn, _INSERT_ACCESS_EVENT, rows)
