"""The scheduling tables (SQLAlchemy Core, on ``teleledger.storage.tables.metadata``).

Migration ``0005_visit_scheduling`` creates exactly these.

``slot_bookings`` is the database-level guarantee against double booking: one row per booked
Slot, its primary key the Slot id. A booking inserts the row in the same transaction as the
Appointment and the Slot's change to busy, so of two bookings of one Slot, however close, the
database lets exactly one commit (SQLite: writers are serialized by ``BEGIN IMMEDIATE`` and the
second finds the row; PostgreSQL: the second insert waits on the first's uncommitted key and
then fails with a unique violation). Cancelling deletes the row in the transaction that frees
the Slot. ``appointment_id`` is unique too: an Appointment holds at most one booking.

Stored in clear, and why: Slot, Appointment and Patient ids (random UUIDs; the same links are
in the search index already) and the booking time. No names, no clinical content.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, String, Table

from teleledger.storage.tables import metadata

slot_bookings = Table(
    "slot_bookings",
    metadata,
    Column("slot_id", String(64), primary_key=True),
    Column("appointment_id", String(64), nullable=False, unique=True),
    Column("patient_id", String(64), nullable=False),
    Column("booked", BigInteger, nullable=False),  # µs since epoch, UTC
    Index("ix_slot_bookings_patient", "patient_id"),
)
