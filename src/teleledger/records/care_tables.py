"""Care relationships as a fact table: which practitioner has a care relationship with which
patient, kept in step with the FHIR store so the policy's question is one primary-key lookup.

What establishes care is what it always was: a current Encounter, Appointment or CareTeam
(``CARE_TYPES``) that names ``Practitioner/<id>`` in one of its ``CARE_PARAMS`` and has the
patient in its compartment. ``care_relationships`` holds exactly those pairs. It is derived
data, like the search index it is computed from, and it is maintained in the same transaction
as every version the store writes (``maintain``, called from the store's change hook); a pair
that a write may have removed is recomputed from the resources that remain, so a practitioner
named by two Encounters keeps the relationship when one of them is deleted.

``recompute_all`` computes the table from the search index alone (migration 0012's backfill,
and the tests' reference).

This module never decides access (``teleledger.policy.decide`` does, asking
``SqlCareRelationships``) and holds no PHI beyond the patient and practitioner ids that
``resource_compartments`` and ``idx_reference`` hold already.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Column, Connection, Select, String, Table, and_, select

from teleledger.fhir import compartment
from teleledger.fhir import searchparams as sp
from teleledger.storage import tables as t
from teleledger.storage.db import run, run_many
from teleledger.storage.tables import metadata

#: the resource types whose participants have a care relationship with the patient
CARE_TYPES = ("Encounter", "Appointment", "CareTeam")
#: the search parameters of those types that name a participating practitioner
CARE_PARAMS = ("practitioner", "participant", "actor")

care_relationships = Table(
    "care_relationships", metadata,
    # practitioner first: the care check asks for one pair, the search filter for one
    # practitioner's patients; both are a walk of the primary key
    Column("practitioner_id", String(64), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)

Pair = tuple[str, str]  # (practitioner id, patient id)

_HAS = "SELECT 1 FROM care_relationships WHERE practitioner_id = ? AND patient_id = ?"
# ``DO UPDATE`` rather than ``DO NOTHING``: on PostgreSQL it locks an existing row, so a
# concurrent removal of the pair (``_LOCK`` then ``_DROP_UNLESS_SOURCED``) waits for this
# transaction and then sees the resource that sources the pair
_ADD = ("INSERT INTO care_relationships (practitioner_id, patient_id) VALUES (?, ?) "
        "ON CONFLICT (practitioner_id, patient_id) DO UPDATE SET patient_id = excluded.patient_id")
_LOCK = "SELECT 1 FROM care_relationships WHERE practitioner_id = ? AND patient_id = ? FOR UPDATE"
_IN = ", ".join(f"'{x}'" for x in CARE_TYPES)
_PARAMS_IN = ", ".join(f"'{x}'" for x in CARE_PARAMS)
# starts from the patient's compartment (``ix_compartment_patient``): a patient has a handful of
# care resources, a practitioner may be named by thousands of index rows
_DROP_UNLESS_SOURCED = (
    "DELETE FROM care_relationships WHERE practitioner_id = ? AND patient_id = ? AND NOT EXISTS ("
    "SELECT 1 FROM resource_compartments comp JOIN idx_reference ref "
    "ON ref.res_type = comp.res_type AND ref.res_id = comp.res_id "
    f"WHERE comp.patient_id = ? AND comp.res_type IN ({_IN}) AND ref.param IN ({_PARAMS_IN}) "
    "AND ref.target_type = 'Practitioner' AND ref.target_id = ?)"
)


def pairs_of(resource_type: str, body: dict | None) -> frozenset[Pair]:
    """The care relationships one resource version establishes, from the same extraction the
    search index and the compartment are built with (``records.index.build_rows``,
    ``fhir.compartment``), so the table and ``pairs_indexed_sql`` cannot disagree."""
    if body is None or resource_type not in CARE_TYPES:
        return frozenset()
    params = sp.params_for(resource_type)
    practitioners = {e.id for e in sp.extract(body) if isinstance(e, sp.ReferenceEntry)
                     and e.param in CARE_PARAMS and e.param in params and e.type == "Practitioner"}
    if not practitioners:
        return frozenset()
    patients = compartment.patient_ids(body)
    return frozenset((pr, pa) for pr in practitioners for pa in patients)


def pairs_indexed_sql() -> Select[tuple[str, str]]:
    """(practitioner id, patient id) of every care relationship, computed from the search index."""
    ref, comp = t.idx_reference, t.resource_compartments
    return (
        select(ref.c.target_id.label("practitioner_id"), comp.c.patient_id)
        .select_from(ref.join(comp, and_(comp.c.res_type == ref.c.res_type, comp.c.res_id == ref.c.res_id)))
        .where(ref.c.res_type.in_(CARE_TYPES), ref.c.param.in_(CARE_PARAMS), ref.c.target_type == "Practitioner")
        .distinct()
    )


def recompute_all(conn: Connection) -> set[Pair]:
    """Every care relationship, computed from scratch from the search index."""
    return {(r[0], r[1]) for r in conn.execute(pairs_indexed_sql())}


def stored_pairs(conn: Connection) -> set[Pair]:
    c = care_relationships.c
    return {(r[0], r[1]) for r in conn.execute(select(c.practitioner_id, c.patient_id))}


def apply(conn: Connection, changes: Iterable[tuple[frozenset[Pair], frozenset[Pair]]]) -> bool:
    """Bring the table in step with resource versions just written in this transaction (the
    index already holds the new versions): ``changes`` is (pairs of the previous version, pairs
    of the new one) per resource. A pair only the previous version had is dropped unless another
    current resource still establishes it. Returns whether anything may have changed."""
    added: set[Pair] = set()
    maybe_removed: set[Pair] = set()
    for old, new in changes:
        added |= new - old
        maybe_removed |= old - new
    maybe_removed -= added
    if added:
        run_many(conn, _ADD, sorted(added))  # sorted: concurrent writers lock rows in one order
    locking = conn.dialect.name == "postgresql"
    for pr, pa in sorted(maybe_removed):
        if locking:
            # wait for any transaction adding the pair; the DELETE's own snapshot then sees it
            run(conn, _LOCK, (pr, pa))
        run(conn, _DROP_UNLESS_SOURCED, (pr, pa, pa, pr))
    return bool(added or maybe_removed)


class SqlCareRelationships:
    """``policy.model.CareRelationships`` over ``care_relationships``, for one transaction: each
    pair is asked once (a search's rows, a Bundle's entries share the answers). ``forget`` drops
    the answers when the transaction changes the table."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._cache: dict[Pair, bool] = {}

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        key = (practitioner_id, patient_id)
        hit = self._cache.get(key)
        if hit is None:
            hit = run(self.conn, _HAS, key).fetchone() is not None
            self._cache[key] = hit
        return hit

    def forget(self) -> None:
        self._cache.clear()
