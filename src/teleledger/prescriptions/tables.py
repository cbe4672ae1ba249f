"""The tables of e-prescriptions (migration 0007 creates exactly these).

Integers are µs since the epoch, UTC. Nothing here is clinical content: the prescription itself
is the MedicationRequest in the FHIR store (encrypted per patient); these rows tie it to its
chain record and keep what only the issuing node may know (the salt of the on-chain hash).

    rx_prescriptions  rx_id (PK: the MedicationRequest id), rx_hash (0x-hex, unique), salt,
                      token (the TLRX1 text the patient carries), patient_id, prescriber
                      (username of the issuing account), created
    rx_members        (username, org) (PK), roles, created: chain memberships this node asked
                      the ParticipantRegistry for (practitioner / pharmacist of an organization);
                      a pharmacist acts for the organization of their row (the node's own
                      organization when they have none)
    rx_shares         id (PK), rx_id, pharmacy (organization name), patient_id, created: the
                      pharmacies a patient chose to send a prescription to

This module must never hold PHI beyond the ids above.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Table, Text

from teleledger.storage.tables import metadata

rx_prescriptions = Table(
    "rx_prescriptions",
    metadata,
    Column("rx_id", String(64), primary_key=True),
    Column("rx_hash", String(66), nullable=False, unique=True),
    Column("salt", LargeBinary, nullable=False),
    Column("token", Text, nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("prescriber", String(128), nullable=False),
    Column("created", BigInteger, nullable=False),
    Index("ix_rx_prescriptions_patient", "patient_id"),
)

rx_members = Table(
    "rx_members",
    metadata,
    Column("username", String(128), primary_key=True),
    Column("org", String(128), primary_key=True),
    Column("roles", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
)

rx_shares = Table(
    "rx_shares",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rx_id", String(64), nullable=False),
    Column("pharmacy", String(128), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("created", BigInteger, nullable=False),
    Index("ix_rx_shares_rx", "rx_id"),
)
