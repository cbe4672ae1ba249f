"""FHIR search → SQL over the index tables.

Each ``Condition`` of a ``ParsedSearch`` becomes ``res_id IN (subquery)``; values inside one
condition are OR-ed, conditions are AND-ed (FHIR search semantics). Where the index cannot
answer exactly — blind-indexed patient strings searched with ``:contains``, birth dates
(indexed only to the year) — the condition is left to an exact post-filter that runs on the
decrypted candidates with the same reference semantics the pure ``fhir.query.matches`` defines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, exists, false, func, literal, not_, or_, select, true

from teleledger.core.crypto import KeyedHash
from teleledger.core.errors import InvalidInput
from teleledger.fhir import query as fq
from teleledger.policy import model as pm
from teleledger.records.index import LABEL_PARAM, MAX_PREFIX, token_hashes
from teleledger.storage import tables as t

R = t.resources


@dataclass(frozen=True)
class Visibility:
    """What the caller may see, as the policy decided it (the store only applies it).

    kind: "all" | "compartments" (patient_ids) | "care_team" (practitioner_id) | "public" | "nothing"
    | "consented" (``consented``: the policy's ``Consented`` filter; ``label_hash`` turns a
    sensitivity label into the keyed hash its ``idx_token`` rows hold)
    """

    kind: str
    patient_ids: frozenset[str] = frozenset()
    practitioner_id: str | None = None
    consented: pm.Consented | None = None
    label_hash: Callable[[str], str] | None = None


CARE_TYPES = ("Encounter", "Appointment", "CareTeam")
CARE_PARAMS = ("practitioner", "participant", "actor")
#: the search parameters holding a message's participants (``policy.model.outside_thread``)
THREAD_PARAMS = ("sender", "recipient")


def in_thread_clause(practitioner_id: str, type_col, id_col) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
    """The negation of ``policy.model.outside_thread`` over the index: the row is not a message
    (``THREAD_TYPES``), or names no sender or recipient, or names ``Practitioner/<id>`` as one."""
    ref = t.idx_reference

    def named(extra=None):  # type: ignore[no-untyped-def]
        q = (select(literal(1)).where(ref.c.res_type == type_col, ref.c.res_id == id_col,
                                      ref.c.param.in_(THREAD_PARAMS)).correlate_except(ref))
        return exists(q if extra is None else q.where(extra))

    return or_(
        type_col.not_in(sorted(pm.THREAD_TYPES)),
        not_(named()),
        named(and_(ref.c.target_type == "Practitioner", ref.c.target_id == practitioner_id)),
    )


def care_patients_subquery(practitioner_id: str):  # type: ignore[no-untyped-def]
    """Patient ids with an Encounter, Appointment or CareTeam that names this practitioner."""
    ref, comp = t.idx_reference, t.resource_compartments
    return (
        select(comp.c.patient_id)
        .select_from(ref.join(comp, and_(comp.c.res_type == ref.c.res_type, comp.c.res_id == ref.c.res_id)))
        .where(
            ref.c.res_type.in_(CARE_TYPES),
            ref.c.param.in_(CARE_PARAMS),
            ref.c.target_type == "Practitioner",
            ref.c.target_id == practitioner_id,
        )
    )


def visibility_clause(vis: Visibility, type_col, id_col) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
    """SQL restriction for rows (type_col, id_col) under ``vis``.

    "Patient data" means exactly what the policy means by it: a resource in at least one
    patient's compartment (it has ``resource_compartments`` rows). Everything else (directory
    entries, a practitioner's Schedule) is visible to whoever may search the type at all.
    """
    comp = t.resource_compartments
    if vis.kind == "all":
        return true()
    if vis.kind == "nothing":
        return false()
    public = ~exists(select(literal(1)).where(comp.c.res_type == type_col, comp.c.res_id == id_col))
    if vis.kind == "public":
        return public
    if vis.kind == "compartments":
        patients = select(literal(1)).where(
            comp.c.res_type == type_col, comp.c.res_id == id_col, comp.c.patient_id.in_(sorted(vis.patient_ids))
        )
    elif vis.kind == "consented":
        assert vis.consented is not None and vis.label_hash is not None
        return or_(public, _consented_clause(vis.consented, vis.label_hash, type_col, id_col))
    elif vis.kind == "care_team":
        assert vis.practitioner_id is not None
        patients = select(literal(1)).where(
            comp.c.res_type == type_col,
            comp.c.res_id == id_col,
            comp.c.patient_id.in_(care_patients_subquery(vis.practitioner_id)),
        )
        # a care relationship does not reach the messages the practitioner takes no part in
        return or_(public, and_(exists(patients), in_thread_clause(vis.practitioner_id, type_col, id_col)))
    else:  # pragma: no cover - programming error
        raise ValueError(vis.kind)
    return or_(public, exists(patients))


def _rule_clause(rule: pm.RowRule, label_hash: Callable[[str], str], type_col, id_col) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
    """One ``policy.model`` row rule as SQL over the row's type and its label rows (the mapping
    the ``RowRule`` comment in ``policy.model`` gives)."""
    tok = t.idx_token

    def labelled(extra=None):  # type: ignore[no-untyped-def]
        # correlated with the row however deep the rule sits (inside the compartment subquery)
        q = (select(literal(1)).where(tok.c.res_type == type_col, tok.c.res_id == id_col, tok.c.param == LABEL_PARAM)
             .correlate_except(tok))
        return exists(q if extra is None else q.where(extra))

    if isinstance(rule, pm.TypeIn):
        return type_col.in_(sorted(rule.types)) if rule.types else false()
    if isinstance(rule, pm.AnyLabel):
        hashes = [label_hash(label) for label in sorted(rule.labels)]
        return labelled(tok.c.code_h.in_(hashes)) if hashes else false()
    if isinstance(rule, pm.OnlyLabels):
        hashes = [label_hash(label) for label in sorted(rule.labels)]
        return and_(labelled(), not_(labelled(tok.c.code_h.not_in(hashes)))) if hashes else false()
    if isinstance(rule, pm.Not):
        return not_(_rule_clause(rule.rule, label_hash, type_col, id_col))
    if isinstance(rule, pm.AllOf):
        return and_(true(), *[_rule_clause(r, label_hash, type_col, id_col) for r in rule.rules])
    if isinstance(rule, pm.AnyOf):
        return or_(false(), *[_rule_clause(r, label_hash, type_col, id_col) for r in rule.rules])
    raise TypeError(f"not a row rule: {rule!r}")  # pragma: no cover - programming error


def _consented_clause(f: pm.Consented, label_hash: Callable[[str], str], type_col, id_col) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
    """``Consented`` (policy.model) for rows in a compartment: the patient's own record, or no
    compartment patient who is not allowed (break-glass, or no deny and care or a permit)."""
    comp = t.resource_compartments
    other = comp.alias("consent_comp")
    p = other.c.patient_id

    def groups(gs: pm.PatientGroups) -> ColumnElement[bool]:
        return or_(false(), *[and_(p.in_(sorted(ps)), _rule_clause(rule, label_hash, type_col, id_col))
                              for ps, rule in gs])

    care = p.in_(care_patients_subquery(f.care_team_of)) if f.care_team_of is not None else false()
    glass = p.in_(sorted(f.break_glass)) if f.break_glass else false()
    allowed = or_(glass, and_(not_(groups(f.denies)), or_(care, groups(f.permits))))
    if f.practitioner_id is not None:
        # a message the practitioner takes no part in: only the patients' permits reach it
        member = in_thread_clause(f.practitioner_id, type_col, id_col)
        allowed = or_(and_(member, allowed),
                      and_(not_(member), not_(groups(f.denies)), groups(f.permits)))
    everyone = not_(exists(select(literal(1)).where(other.c.res_type == type_col, other.c.res_id == id_col,
                                                    not_(allowed))))
    if f.own_patient_id is None:
        return everyone
    own = exists(select(literal(1)).where(comp.c.res_type == type_col, comp.c.res_id == id_col,
                                          comp.c.patient_id == f.own_patient_id))
    return or_(own, everyone)


@dataclass
class Plan:
    where: list[ColumnElement[bool]] = field(default_factory=list)
    post: list[fq.Condition] = field(default_factory=list)
    order_by: list = field(default_factory=list)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _date_clause(low_col, high_col, v) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
    eq = and_(low_col >= v.low, high_col <= v.high)
    return {
        "eq": eq,
        "ne": not_(eq),
        "gt": high_col > v.high,
        "lt": low_col < v.low,
        "ge": or_(high_col > v.high, eq),
        "le": or_(low_col < v.low, eq),
        "sa": low_col > v.high,
        "eb": high_col < v.low,
    }[v.prefix]


class SqlSearch:
    def __init__(self, index_hash: KeyedHash) -> None:
        self.h = index_hash

    def plan(self, ps: fq.ParsedSearch) -> Plan:
        plan = Plan()
        rt = ps.resource_type
        for cond in ps.conditions:
            clause = self._condition(rt, cond)
            if clause is None:
                plan.post.append(cond)
            else:
                plan.where.append(clause)
        plan.order_by = self._order(rt, ps)
        return plan

    def _ids(self, table, rt: str, param: str, value_clause) -> ColumnElement[bool]:  # type: ignore[no-untyped-def]
        sub = select(table.c.res_id).where(table.c.res_type == rt, table.c.param == param, value_clause)
        return R.c.res_id.in_(sub)

    def _condition(self, rt: str, cond: fq.Condition) -> ColumnElement[bool] | None:
        if cond.name == "_id":
            ids = [v.code if isinstance(v, fq.TokenValue) else getattr(v, "raw", getattr(v, "id", v)) for v in cond.values]
            clause = R.c.res_id.in_([str(i) for i in ids])
            return not_(clause) if cond.modifier == "not" else clause
        if cond.name == "_lastUpdated":
            return or_(*[_date_clause(R.c.last_updated, R.c.last_updated, v) for v in cond.values])
        param = cond.param
        assert param is not None
        if cond.modifier == "missing":
            table = self._table_for(param)
            present = R.c.res_id.in_(select(table.c.res_id).where(table.c.res_type == rt, table.c.param == param.name))
            want_missing = any(str(getattr(v, "raw", getattr(v, "code", v))).lower() == "true" for v in cond.values)
            return not_(present) if want_missing else present
        kind = param.type
        if kind == "token":
            tok = t.idx_token
            ors = []
            for v in cond.values:
                if v.code is None:  # "system|": any code in the system
                    ors.append(tok.c.sys_h == self.h.digest("s", v.system or ""))
                elif v.system_given:
                    ors.append(tok.c.sys_code_h == token_hashes(self.h, v.system, v.code)[2])
                else:
                    ors.append(tok.c.code_h == self.h.digest("c", v.code))
            clause = self._ids(tok, rt, param.name, or_(*ors))
            return not_(clause) if cond.modifier == "not" else clause
        if kind == "string":
            if param.phi:
                if cond.modifier == "contains":
                    return None
                terms = []
                for v in cond.values:
                    if cond.modifier == "exact":
                        terms.append(self.h.digest("e", v.raw))
                    else:
                        norm = fq.normalize_string(v.raw)
                        if len(norm) > MAX_PREFIX:
                            return None
                        terms.append(self.h.digest("p", norm))
                return self._ids(t.idx_string_hash, rt, param.name, t.idx_string_hash.c.term_h.in_(terms))
            st = t.idx_string
            ors = []
            for v in cond.values:
                if cond.modifier == "exact":
                    ors.append(st.c.exact == v.raw)
                elif cond.modifier == "contains":
                    ors.append(st.c.norm.like("%" + _like_escape(fq.normalize_string(v.raw)) + "%", escape="\\"))
                else:
                    ors.append(st.c.norm.like(_like_escape(fq.normalize_string(v.raw)) + "%", escape="\\"))
            return self._ids(st, rt, param.name, or_(*ors))
        if kind == "date":
            if param.phi:
                return None  # the index holds only the year: match exactly after decryption
            d = t.idx_date
            return self._ids(d, rt, param.name, or_(*[_date_clause(d.c.low, d.c.high, v) for v in cond.values]))
        if kind == "reference":
            ref = t.idx_reference
            ors = []
            for v in cond.values:
                c = ref.c.target_id == v.id
                if v.type:
                    c = and_(c, ref.c.target_type == v.type)
                ors.append(c)
            return self._ids(ref, rt, param.name, or_(*ors))
        if kind == "quantity":
            q = t.idx_quantity
            ors = []
            for v in cond.values:
                val = q.c.value
                c = {
                    "eq": and_(val >= float(v.low), val < float(v.high)),
                    "ne": or_(val < float(v.low), val >= float(v.high)),
                    "gt": val > float(v.value),
                    "lt": val < float(v.value),
                    "ge": val >= float(v.value),
                    "le": val <= float(v.value),
                    "sa": val > float(v.value),
                    "eb": val < float(v.value),
                }.get(v.prefix)
                if c is None:
                    raise InvalidInput(f"prefix {v.prefix!r} is not supported for quantity parameter {param.name}")
                if v.system:
                    c = and_(c, q.c.system == v.system)
                if v.code:
                    c = and_(c, q.c.code == v.code)
                ors.append(c)
            return self._ids(q, rt, param.name, or_(*ors))
        raise InvalidInput(f"search parameter {param.name} of type {kind} is not supported yet")

    @staticmethod
    def _table_for(param):  # type: ignore[no-untyped-def]
        return {
            "token": t.idx_token,
            "string": t.idx_string_hash if param.phi else t.idx_string,
            "date": t.idx_date,
            "reference": t.idx_reference,
            "quantity": t.idx_quantity,
        }.get(param.type, t.idx_token)

    def _order(self, rt: str, ps: fq.ParsedSearch) -> list:
        order = []
        for name, desc in ps.sort:
            if name == "_lastUpdated":
                col = R.c.last_updated
            elif name == "_id":
                col = R.c.res_id
            else:
                from teleledger.fhir.searchparams import params_for

                param = params_for(rt).get(name)
                if param is None:
                    raise InvalidInput(f"cannot sort {rt} by unknown parameter {name}")
                if param.type == "date" and not param.phi:
                    d = t.idx_date
                    agg = func.max(d.c.high) if desc else func.min(d.c.low)
                    col = (
                        select(agg)
                        .where(d.c.res_type == rt, d.c.res_id == R.c.res_id, d.c.param == name)
                        .scalar_subquery()
                    )
                elif param.type == "string" and not param.phi:
                    s = t.idx_string
                    col = (
                        select(func.min(s.c.norm))
                        .where(s.c.res_type == rt, s.c.res_id == R.c.res_id, s.c.param == name)
                        .scalar_subquery()
                    )
                elif param.type == "quantity":
                    q = t.idx_quantity
                    col = (
                        select(func.min(q.c.value))
                        .where(q.c.res_type == rt, q.c.res_id == R.c.res_id, q.c.param == name)
                        .scalar_subquery()
                    )
                else:
                    raise InvalidInput(
                        f"sorting by {name} is not supported: values of this parameter are stored as keyed hashes "
                        "or have no order (sort by a date, a non-patient string, a quantity, _id or _lastUpdated)"
                    )
            order.append(col.desc() if desc else col.asc())
        order.append(R.c.res_id.asc())  # stable paging
        return order


PostFilter = Callable[[dict], bool]
