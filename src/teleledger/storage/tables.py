"""SQL tables (SQLAlchemy Core). The Alembic migrations in ``storage/migrations`` create exactly these.

What is stored in clear, and why (the README repeats this for operators):

* resource type, server-assigned id (a random UUID), version number, timestamps of the
  *server* (lastUpdated) — needed to route, version and page; they identify no one.
* the patient-compartment link (``resource_compartments``: resource → Patient id): needed to
  enforce "a patient sees only their own record" in SQL; the Patient id is a random UUID.
* reference index (``idx_reference``): resource ids only.
* date index (``idx_date``): clinical timestamps as integer ranges, because range search and
  sorting need order; *birth dates* are coarsened to the year here and matched exactly after
  decryption.
* quantity index (``idx_quantity``): numeric values with their unit codes (range search).
* strings of non-patient resources (organization, location, practitioner names) for
  ``:contains`` and sorting (``idx_string``).

Everything else is either encrypted (``resource_versions.body``: AES-256-GCM under the
patient's data key) or a keyed hash (``idx_token``: every token — identifiers, codes, telecom;
``idx_string_hash``: names and addresses of patients), so the database file alone reveals no
identifier, name or birth date.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# the current version of every resource (one row per logical resource)
resources = Table(
    "resources",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("last_updated", BigInteger, nullable=False),  # µs since epoch, UTC
    Index("ix_resources_type_updated", "res_type", "last_updated"),
)

# every version ever written; bodies sealed under the owning patient's data key
resource_versions = Table(
    "resource_versions",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # create | update | delete
    Column("key_id", String(80), nullable=False),
    Column("body", LargeBinary, nullable=True),  # NULL for a delete marker
    Index("ix_versions_type_updated", "res_type", "last_updated"),
)

# one data key per patient (crypto-shredding = deleting the row) plus one for non-patient data
data_keys = Table(
    "data_keys",
    metadata,
    Column("key_id", String(80), primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created", BigInteger, nullable=False),
)

resource_compartments = Table(
    "resource_compartments",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
    Index("ix_compartment_patient", "patient_id", "res_type"),
)

idx_token = Table(
    "idx_token",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("code_h", String(32), nullable=False),  # HMAC(code)
    Column("sys_h", String(32), nullable=False),  # HMAC(system) ("" system hashes too)
    Column("sys_code_h", String(32), nullable=False),  # HMAC(system, code)
    Index("ix_token_code", "res_type", "param", "code_h"),
    Index("ix_token_syscode", "res_type", "param", "sys_code_h"),
    Index("ix_token_res", "res_type", "res_id"),
)

idx_string = Table(
    "idx_string",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("norm", String(255), nullable=False),  # normalized (accents dropped, casefolded)
    Column("exact", Text, nullable=False),
    Index("ix_string_norm", "res_type", "param", "norm"),
    Index("ix_string_res", "res_type", "res_id"),
)

# blind index for patient-identifying strings: HMAC of the exact value and of every prefix
idx_string_hash = Table(
    "idx_string_hash",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("term_h", String(32), nullable=False),
    Index("ix_stringh_term", "res_type", "param", "term_h"),
    Index("ix_stringh_res", "res_type", "res_id"),
)

idx_date = Table(
    "idx_date",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    Index("ix_date_low", "res_type", "param", "low"),
    Index("ix_date_res", "res_type", "res_id"),
)

idx_reference = Table(
    "idx_reference",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=False),  # "" when the reference has no type
    Column("target_id", String(64), nullable=False),
    Index("ix_ref_target", "res_type", "param", "target_id"),
    Index("ix_ref_rev", "target_type", "target_id"),
    Index("ix_ref_res", "res_type", "res_id"),
)

idx_quantity = Table(
    "idx_quantity",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=False),
    Column("code", String(64), nullable=False),
    Index("ix_qty_value", "res_type", "param", "value"),
    Index("ix_qty_res", "res_type", "res_id"),
)

INDEX_TABLES = (idx_token, idx_string, idx_string_hash, idx_date, idx_reference, idx_quantity)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("practitioner_id", String(64), nullable=True),
    #: the Organization a member acts for (pharmacy, payer, clinic, research organization)
    Column("organization_id", String(64), nullable=True),
    #: the RelatedPerson a delegate (parent, guardian, caregiver) acts as
    Column("related_person_id", String(64), nullable=True),
    Column("active", Boolean, nullable=False, default=True),
    Column("created", BigInteger, nullable=False),
)

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("secret_hash", String(255), nullable=False),
    Column("scopes", Text, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created", BigInteger, nullable=False),
)

# node-wide singletons (schema marker, node keys sealed under the master key)
node_meta = Table(
    "node_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

# one row per access to patient data (allowed or denied), mirrored by an access entry in the
# transparency log (``leaf_hash``); served as FHIR AuditEvent resources. No PHI: ids and codes.
access_events = Table(
    "access_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("recorded", BigInteger, nullable=False),  # µs since epoch, UTC
    Column("actor", String(160), nullable=False),
    Column("role", String(32), nullable=False),
    Column("fhir_user", String(160), nullable=True),
    Column("action", String(16), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("outcome", String(8), nullable=False),  # allowed | denied
    Column("reason", String(64), nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("refs", Text, nullable=False),  # space-separated Type/id/_history/version
    Column("leaf_hash", LargeBinary, nullable=False),
    Index("ix_access_patient", "patient_id", "recorded"),
    Index("ix_access_actor", "actor", "recorded"),
    Index("ix_access_recorded", "recorded"),
)
