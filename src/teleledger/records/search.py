"""FHIR search → SQL over the index tables.

Each ``Condition`` of a ``ParsedSearch`` becomes ``res_id IN (subquery)``; values inside one
condition are OR-ed, conditions are AND-ed (FHIR search semantics). Where the index cannot
answer exactly — blind-indexed patient strings searched with ``:contains``, birth dates
(indexed only to the year) — the condition is left to an exact post-filter that runs on the
decrypted candidates with the same reference semantics the pure ``fhir.query.matches`` defines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Dialect,
    String,
    and_,
    bindparam,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.sql.elements import TextClause

from teleledger.core.crypto import KeyedHash
from teleledger.core.errors import InvalidInput
from teleledger.fhir import query as fq
from teleledger.policy import model as pm
from teleledger.records.care_tables import care_relationships
from teleledger.records.index import LABEL_PARAM, MAX_PREFIX, token_hashes
from teleledger.storage import tables as t

#: a column (or column expression) of string values: resource types, ids, patient ids
Col = ColumnElement[str]

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


#: the search parameters holding a message's participants (``policy.model.outside_thread``)
THREAD_PARAMS = ("sender", "recipient")


def in_thread_clause(practitioner_id: str, type_col: Col, id_col: Col) -> ColumnElement[bool]:
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
    """Patient ids with an Encounter, Appointment or CareTeam that names this practitioner
    (``records.care_tables``: a walk of the primary key)."""
    c = care_relationships.c
    return select(c.patient_id).where(c.practitioner_id == practitioner_id)


def visibility_clause(vis: Visibility, type_col: Col, id_col: Col, *, hinted: bool = False) -> ColumnElement[bool]:
    """SQL restriction for rows (type_col, id_col) under ``vis``.

    "Patient data" means exactly what the policy means by it: a resource in at least one
    patient's compartment (it has ``resource_compartments`` rows). Everything else (directory
    entries, a practitioner's Schedule) is visible to whoever may search the type at all.

    ``hinted`` (``consented`` only; for ``SqlSearch.visibility``, which renders it as text): the
    clause names a patient and what the filter says about them through the text parameters of
    ``hint_parameters``; see ``_consented_clause``.
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
        return or_(public, _consented_clause(vis.consented, vis.label_hash, type_col, id_col, hinted=hinted))
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


_EMPTY = literal_column("''")  # written in, not a parameter: see ``_rendered``


def _rule_clause(rule: pm.RowRule, label_hash: Callable[[str], str], type_col: Col, id_col: Col) -> ColumnElement[bool]:
    """One ``policy.model`` row rule as SQL over the row's type and its label rows (the mapping
    the ``RowRule`` comment in ``policy.model`` gives)."""
    tok = t.idx_token

    def labelled(extra=None):  # type: ignore[no-untyped-def]
        # correlated with the row however deep the rule sits (inside the compartment subquery).
        # ``param || ''`` and ``code_h || ''``: not index columns then, so both engines probe the
        # row's own few index rows (``ix_token_res``) instead of walking every row of the type
        # carrying the label (``ix_token_code``, which matches more columns, is what they chose)
        q = (select(literal(1)).where(tok.c.res_type == type_col, tok.c.res_id == id_col,
                                      (tok.c.param + _EMPTY) == LABEL_PARAM)
             .correlate_except(tok))
        return exists(q if extra is None else q.where(extra))

    if isinstance(rule, pm.TypeIn):
        return type_col.in_(sorted(rule.types)) if rule.types else false()
    code = tok.c.code_h + _EMPTY
    if isinstance(rule, pm.AnyLabel):
        hashes = [label_hash(label) for label in sorted(rule.labels)]
        return labelled(code.in_(hashes)) if hashes else false()
    if isinstance(rule, pm.OnlyLabels):
        hashes = [label_hash(label) for label in sorted(rule.labels)]
        return and_(labelled(), not_(labelled(code.not_in(hashes)))) if hashes else false()
    if isinstance(rule, pm.Not):
        return not_(_rule_clause(rule.rule, label_hash, type_col, id_col))
    if isinstance(rule, pm.AllOf):
        return and_(true(), *[_rule_clause(r, label_hash, type_col, id_col) for r in rule.rules])
    if isinstance(rule, pm.AnyOf):
        return or_(false(), *[_rule_clause(r, label_hash, type_col, id_col) for r in rule.rules])
    raise TypeError(f"not a row rule: {rule!r}")  # pragma: no cover - programming error


def hint_parameters(f: pm.Consented, patient_id: str) -> dict[str, object]:
    """The values of a hinted clause's parameters (``_consented_clause``) for one patient:
    the patient, and whether they are in the filter's break-glass set and in each deny and
    permit group."""
    out: dict[str, object] = {"consent_hint": patient_id, "consent_g": patient_id in f.break_glass}
    out.update({f"consent_d{i}": patient_id in ps for i, (ps, _) in enumerate(f.denies)})
    out.update({f"consent_p{i}": patient_id in ps for i, (ps, _) in enumerate(f.permits)})
    return out


def _allowed(f: pm.Consented, p: Col, label_hash: Callable[[str], str], type_col: Col, id_col: Col, *,
             hinted: bool) -> ColumnElement[bool]:
    """Whether compartment patient ``p`` allows the row (``Consented``: break-glass, or no deny
    and care or a permit). ``hinted``: ``p`` is the hinted patient, whose membership of
    break-glass and of each group is a parameter (``hint_parameters``) the database tests before
    the group's rule, and whose care relationship is one primary-key probe rather than the
    practitioner's whole list of patients."""

    def groups(kind: str, gs: pm.PatientGroups) -> ColumnElement[bool]:
        return or_(false(), *[and_(literal_column(f":consent_{kind}{i}") if hinted else p.in_(sorted(ps)),
                                   _rule_clause(rule, label_hash, type_col, id_col))
                              for i, (ps, rule) in enumerate(gs)])

    if f.care_team_of is None:
        care = false()
    elif hinted:
        c = care_relationships.c
        care = exists(select(literal(1)).where(c.practitioner_id == f.care_team_of, c.patient_id == p))
    else:
        care = p.in_(care_patients_subquery(f.care_team_of))
    if not f.break_glass:
        glass = false()
    else:
        glass = literal_column(":consent_g") if hinted else p.in_(sorted(f.break_glass))
    allowed = or_(glass, and_(not_(groups("d", f.denies)), or_(care, groups("p", f.permits))))
    if f.practitioner_id is not None:
        # a message the practitioner takes no part in: only the patients' permits reach it
        member = in_thread_clause(f.practitioner_id, type_col, id_col)
        allowed = or_(and_(member, allowed),
                      and_(not_(member), not_(groups("d", f.denies)), groups("p", f.permits)))
    return allowed


def _consented_clause(f: pm.Consented, label_hash: Callable[[str], str], type_col: Col, id_col: Col, *,
                      hinted: bool = False) -> ColumnElement[bool]:
    """``Consented`` (policy.model) for rows in a compartment: the patient's own record, or no
    compartment patient who is not allowed (``_allowed``).

    ``hinted``: the compartment rows of the patient named by ``:consent_hint`` are judged by
    ``_allowed(hinted=True)``, the others by the whole filter as without a hint; the same rows
    pass. A search that names one patient (``patient_hint``) thereby never makes the database
    build the filter's lists of hundreds of patients for that patient's rows, and the statement
    text is the same for every patient (``SqlSearch.visibility``)."""
    comp = t.resource_compartments
    other = comp.alias("consent_comp")
    p = other.c.patient_id
    allowed = _allowed(f, p, label_hash, type_col, id_col, hinted=False)
    if hinted:
        hint = literal_column(":consent_hint")
        # an OR of two exclusive branches rather than a CASE: inside WHERE, AND/OR are evaluated
        # lazily (SQLite only there: a CASE arm is a value, every sub-query of it runs)
        allowed = or_(and_(p == hint, _allowed(f, p, label_hash, type_col, id_col, hinted=True)),
                      and_(p != hint, allowed))
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


#: what a value must look like to be written into a cached statement as a literal: FHIR ids
#: and type names, search-parameter names, hex digests (no quote, backslash or colon)
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
#: rendered visibility clauses kept per ``SqlSearch``; the consent index caches few views
_MAX_RENDERED = 256


def _plain(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, (bool, int)):
        return True
    return isinstance(value, str) and _PLAIN_VALUE.match(value) is not None


def _rendered(clause: ColumnElement[bool], dialect: Dialect, *,
              hint: pm.Consented | None = None) -> ColumnElement[bool] | None:
    """``clause`` (over ``resources`` rows) as SQL text with its values written in, so a search
    reuses it as it is: building a consent view's clause and expanding its ``IN`` lists of
    hundreds of patient ids into bound parameters cost more than running the statement.

    Rendered by SQLAlchemy itself (``literal_binds``) inside a select over ``resources``, so the
    sub-queries correlate with the row exactly as they do in the search's own statement. Only
    values that cannot need quoting are written in (``_PLAIN_VALUE``): None when another value
    occurs. ``hint``: the clause is hinted (``_consented_clause``) for this filter; its
    ``:consent_…`` names become the text's parameters."""
    probe = select(literal(1)).select_from(R)
    stmt = probe.where(clause)
    if not all(_plain(v) for v in stmt.compile(dialect=dialect).params.values()):
        return None
    literal_binds = {"literal_binds": True}
    head = f"{probe.compile(dialect=dialect, compile_kwargs=literal_binds)} \nWHERE "
    sql = str(stmt.compile(dialect=dialect, compile_kwargs=literal_binds))
    if not sql.startswith(head):  # pragma: no cover - a SQLAlchemy that renders differently
        return None
    sql = f"({sql[len(head):]})"
    if hint is None:
        return literal_column(sql)
    # ``text`` finds exactly the ``:consent_…`` names: no other colon is in the text (plain
    # values, no casts). A group whose rule is FALSE leaves no name behind; the search passes
    # all of ``hint_parameters`` when it executes and the statement takes those it names.
    names = [name for name in hint_parameters(hint, "") if name != "consent_hint" and re.search(rf":{name}\b", sql)]
    return text(sql).bindparams(bindparam("consent_hint", type_=String),
                                *[bindparam(name, type_=Boolean) for name in names])


def patient_hint(ps: fq.ParsedSearch) -> str | None:
    """The one patient a search names by reference (``patient=X``, ``subject=Patient/X``), if
    any: most rows it can return are in that patient's compartment. Only a hint for
    ``SqlSearch.visibility``: a wrong one changes how fast, never what, a search returns."""
    for cond in ps.conditions:
        if (cond.param is not None and cond.param.type == "reference" and cond.modifier != "missing"
                and len(cond.values) == 1 and isinstance(cond.values[0], fq.ReferenceValue)
                and cond.values[0].type in (None, "Patient")):
            return cond.values[0].id
    return None


class SqlSearch:
    def __init__(self, index_hash: KeyedHash) -> None:
        self.h = index_hash
        self._visibility: dict[tuple, ColumnElement[bool]] = {}

    def visibility(self, vis: Visibility, dialect: Dialect, *,
                   patient: str | None = None) -> tuple[ColumnElement[bool], dict[str, object]]:
        """``visibility_clause(vis, R.c.res_type, R.c.res_id)`` and the parameters to execute it
        with, built and rendered once per (filter, dialect): the consent index hands out the same
        view until consents change, so every search of a principal reuses the SQL of the first
        (``_rendered``). The key is the filter's value (frozen, hashed by content), so two views
        with equal content share it and a changed view never meets a stale entry.
        ``vis.label_hash`` must hash with this search's key (``RecordsService`` passes its own).

        ``patient`` (``patient_hint``), for a consent filter: the hinted clause, whose text is the
        same for every patient and whose parameters say what the filter holds for this one."""
        if vis.kind in ("all", "nothing", "public"):
            return visibility_clause(vis, R.c.res_type, R.c.res_id), {}
        key = (vis.kind, vis.patient_ids, vis.practitioner_id, vis.consented, dialect.name)
        if vis.kind == "consented" and patient is not None:
            assert vis.consented is not None
            hinted = (*key, "hinted")
            hit = self._visibility.get(hinted)
            if hit is None:
                clause = visibility_clause(vis, R.c.res_type, R.c.res_id, hinted=True)
                rendered = _rendered(clause, dialect, hint=vis.consented)
                hit = self._remember(hinted, self._general(key, vis, dialect) if rendered is None else rendered)
            if isinstance(hit, TextClause):
                return hit, hint_parameters(vis.consented, patient)
            return hit, {}
        return self._general(key, vis, dialect), {}

    def _general(self, key: tuple, vis: Visibility, dialect: Dialect) -> ColumnElement[bool]:
        hit = self._visibility.get(key)
        if hit is None:
            clause = visibility_clause(vis, R.c.res_type, R.c.res_id)
            rendered = _rendered(clause, dialect)
            hit = self._remember(key, clause if rendered is None else rendered)
        return hit

    def _remember(self, key: tuple, clause: ColumnElement[bool]) -> ColumnElement[bool]:
        if len(self._visibility) >= _MAX_RENDERED:
            self._visibility.clear()
        self._visibility[key] = clause
        return clause

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
