"""The node-side rows of delegation (``policy.service.ConsentService.set_delegate``): which
RelatedPerson (and which account, by its chain address) a patient asked to act for them, what
they last signed, and what ConsentRegistry last said about it (its ``DelegateSet`` event).

``requested`` is what the patient's newest SetDelegate signature asks (enable or remove);
``on_chain`` / ``block_number`` / ``log_index`` / ``tx_hash`` are those of the newest DelegateSet
event the indexer projected for (pseudonym, address), None until the first. A delegation is in
force when both say enabled (``policy.delegates.delegation_status``).

Never PHI: ids the database holds already, a pseudonym, an address and chain positions.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, String, Table, UniqueConstraint

from teleledger.storage.tables import metadata

__all__ = ["consent_delegates"]

#: one row per (patient, RelatedPerson) the patient ever designated; re-designation reuses it
consent_delegates = Table(
    "consent_delegates", metadata,
    #: the delegation's id; the ConsentIndex knows it as ``Delegation/<id>`` (``policy.delegates``)
    Column("delegation_id", String(32), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("related_person_id", String(64), nullable=False),
    #: the delegate's account (users.id) and its keystore address, the one set on chain
    Column("account_id", String(64), nullable=False),
    Column("address", String(42), nullable=False),  # lower-case 0x hex
    Column("pseudonym", String(66), nullable=False),
    Column("requested", Boolean, nullable=False),
    #: the outbox row of the newest SetDelegate signature (``chain_outbox.idempotency_key``)
    Column("outbox_key", String(200), nullable=False),
    Column("on_chain", Boolean, nullable=True),
    Column("block_number", BigInteger, nullable=True),
    Column("log_index", Integer, nullable=True),
    Column("tx_hash", String(66), nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("patient_id", "related_person_id", name="uq_consent_delegates_patient_rp"),
    Index("ix_consent_delegates_chain_key", "pseudonym", "address"),
    Index("ix_consent_delegates_account", "account_id"),
)
