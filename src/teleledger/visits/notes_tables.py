"""The two tables of clinical notes and secure messaging (migration 0006 creates exactly these).

Integers are µs since the epoch, UTC. Ids are FHIR resource ids (random UUIDs) and FHIR
references; nothing here is clinical content except ``note_drafts.body``, which is sealed.

    note_drafts      id (PK), encounter_id, author, patient_id, composition_id, base_version,
                     body, created, updated; unique (encounter_id, author)
                     one unsigned note per encounter and author. A draft is not part of the
                     record, so it never enters the FHIR store; ``body`` is the draft's JSON
                     sealed with the PATIENT's data key (``records.keys``: AES-256-GCM, aad =
                     ``note-draft/Encounter/<encounter_id>/Practitioner/<author>``), so erasing
                     the patient (destroying their key) erases their drafts too.
                     ``composition_id``/``base_version``: the signed Composition an amendment
                     draft was started from, and its version then (a stale amendment is refused).

    message_reads    (reader, communication_id) (PK), thread_id, patient_id, sent, read_at
                     one row per participant of each secure message: ``reader`` is the
                     participant's FHIR reference (``Patient/…``, ``Practitioner/…``: the
                     recipients of a Communication are FHIR references, not accounts), the
                     sender's own row is born read. ``read_at`` NULL = unread. Unread counts and
                     a person's thread list come from here without decrypting any message; the
                     messages themselves are always loaded through the records service (policy
                     and audit).

This module must never hold unsealed note text.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Table, UniqueConstraint

from teleledger.storage.tables import metadata

note_drafts = Table(
    "note_drafts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("encounter_id", String(64), nullable=False),
    Column("author", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("composition_id", String(64), nullable=True),
    Column("base_version", Integer, nullable=True),
    Column("body", LargeBinary, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("encounter_id", "author", name="uq_note_drafts_encounter_author"),
    Index("ix_note_drafts_patient", "patient_id"),
)

message_reads = Table(
    "message_reads",
    metadata,
    Column("reader", String(160), primary_key=True),
    Column("communication_id", String(64), primary_key=True),
    Column("thread_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("sent", BigInteger, nullable=False),
    Column("read_at", BigInteger, nullable=True),
    Index("ix_message_reads_reader_thread", "reader", "thread_id"),
    Index("ix_message_reads_thread", "thread_id"),
    Index("ix_message_reads_patient", "patient_id"),
)
