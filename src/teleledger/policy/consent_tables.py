"""The node-side rows of patient consent (``policy.service``): what the node needs to connect a
ConsentRegistry event (pseudonym, grantee hash, provision hash) back to the Consent it came
from, the per-patient signature nonce, and break-glass claims.

Never PHI in clear beyond what the rest of the database holds already (patient and
practitioner ids); the Consent itself lives encrypted in the FHIR store, and a break-glass
reason (it may contain PHI) only sealed under the patient's data key (``reason_sealed``).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Table

from teleledger.storage.tables import metadata

#: one row per patient the node has bound on chain: their pseudonym and the next EIP-712 nonce
consent_patients = Table(
    "consent_patients", metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("pseudonym", String(66), nullable=False, unique=True),
    Column("next_nonce", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
)

#: one row per (Consent version, grantee) sent to the chain; ``status`` granted | revoked
consent_grants = Table(
    "consent_grants", metadata,
    Column("consent_id", String(64), primary_key=True),
    Column("consent_version", Integer, primary_key=True),
    Column("grantee_ref", String(200), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("pseudonym", String(66), nullable=False),
    Column("grantee_h", String(66), nullable=False),
    Column("provision_hash", String(66), nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("valid_from", BigInteger, nullable=False),
    Column("valid_until", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created", BigInteger, nullable=False),
    Index("ix_consent_grants_chain_key", "pseudonym", "grantee_h", "provision_hash"),
    Index("ix_consent_grants_patient", "patient_id"),
)

#: break-glass claims (no reason: it may contain PHI; it is in memory for the claim's life)
break_glass_claims = Table(
    "break_glass_claims", metadata,
    Column("claim_id", String(64), primary_key=True),
    Column("practitioner_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("started", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=False),
    #: the claimant's organization, whose privacy officer reviews the claim
    Column("organization_id", String(64), nullable=True),
    #: the written reason, sealed under the patient's data key (never stored or logged in clear)
    Column("reason_sealed", LargeBinary, nullable=True),
    #: when (µs) the patient dismissed the portal's notice of this claim; NULL while it is shown
    Column("seen_by_patient", BigInteger, nullable=True),
    Index("ix_break_glass_patient", "patient_id"),
    Index("ix_break_glass_organization", "organization_id"),
)
