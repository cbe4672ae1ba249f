"""The FHIR record use cases: each one opens a unit of work, asks the policy decision point,
calls the store, and commits once.

This module never speaks HTTP: it takes plain values (a principal, a resource dict, query
items) and returns stored resources or Bundles as dicts, raising ``TeleledgerError``s that the
web layer turns into OperationOutcomes. Authorization is decided only by
``teleledger.policy.decide``; this module applies the decision (deny → 403, see ``_deny``; an id
that never existed is 404, while that a version is missing or that a resource was deleted is told
only to those who may read it, see ``_deny_unreadable``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import Connection, Engine, and_, exists, func, literal, select

from teleledger.core.errors import (
    AccessDenied,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    TeleledgerError,
)
from teleledger.fhir import compartment
from teleledger.fhir import query as fq
from teleledger.fhir import searchparams as sp
from teleledger.fhir.outcome import outcome
from teleledger.fhir.validation import validate
from teleledger.policy import decide as policy
from teleledger.policy.model import (
    NO_GRANTS,
    THREAD_TYPES,
    AccessRequest,
    CareTeamOf,
    Consented,
    Decision,
    Grants,
    Principal,
)
from teleledger.policy.model import matches as filter_matches
from teleledger.policy.sensitivity import classify
from teleledger.records.search import (
    THREAD_PARAMS,
    R,
    SqlSearch,
    Visibility,
    patient_hint,
)
from teleledger.records.audit import Auditor, Touched, touched
from teleledger.records.care_tables import CARE_PARAMS, CARE_TYPES, SqlCareRelationships, pairs_of
from teleledger.records.care_tables import apply as apply_care_changes
from teleledger.records.index import label_hashes
from teleledger.records.store import ResourceStore, Stored, instant
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

# a search whose exact match needs decryption may scan at most this many candidates
MAX_POST_FILTER = 20_000

#: ``guard(conn, principal, res_type, res_id, before, after)``: see ``RecordsService.add_write_guard``
WriteGuard = Callable[[Connection, Principal, str, str | None, dict | None, dict | None], None]


def _basis(decision: Decision | None) -> str:
    """What an allowed access event records beyond "allowed": the consent or break-glass claim
    it rests on (``break-glass`` marks a BTG access), nothing for the fixed rules."""
    if decision is None or decision.basis is None:
        return ""
    return f"{decision.reason}:{decision.basis}"[:64]  # the width of access_events.reason


_LOG_ACTIONS = {"create", "read", "vread", "update", "delete", "search", "history", "everything", "import", "export"}


def audited(fn):  # type: ignore[no-untyped-def]
    """Record a denied attempt in the log after the failed transaction has rolled back."""

    @functools.wraps(fn)
    def wrapper(self, principal, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(self, principal, *args, **kwargs)
        except AccessDenied as exc:
            self.record_denial(principal, exc)
            raise

    return wrapper


def participants_of(resource_type: str, body: dict | None) -> frozenset[str]:
    """A message's sender and recipients as FHIR references (``AccessRequest.participants``),
    read through the same extraction the index stores them with, so that the search's SQL
    (``records.search.in_thread_clause``) and the decision see the same participants."""
    if body is None or resource_type not in THREAD_TYPES:
        return frozenset()
    return frozenset(f"{e.type}/{e.id}" if e.type else e.id for e in sp.extract(body)
                     if isinstance(e, sp.ReferenceEntry) and e.param in THREAD_PARAMS)


@dataclass
class Settings:
    base_url: str
    default_count: int = 50
    max_count: int = 1000


def visibility_for(principal: Principal, grants: Grants = NO_GRANTS,
                   label_hash: Callable[[str], str] | None = None) -> Visibility:
    f = policy.search_filter(principal, grants)  # type: ignore[arg-type]
    name = type(f).__name__
    if isinstance(f, Consented):
        return Visibility("consented", consented=f, label_hash=label_hash)
    if name == "All":
        return Visibility("all")
    if name == "Compartments":
        return Visibility("compartments", patient_ids=frozenset(f.patient_ids))
    if name == "CareTeamOf":
        return Visibility("care_team", practitioner_id=f.practitioner_id)
    if name == "PublicOnly":
        return Visibility("public")
    return Visibility("nothing")


class RecordsService:
    def __init__(self, engine: Engine, store: ResourceStore, search: SqlSearch, settings: Settings, *,
                 auditor: Auditor | None = None) -> None:
        self.engine = engine
        self.store = store
        self.sql = search
        self.settings = settings
        self.auditor = auditor
        self._guards: dict[str, dict[str, WriteGuard]] = {}
        #: the consent state every decision consults (``policy.consent_index.ConsentIndex``, set
        #: by ``bootstrap``); the default knows no consents
        self.grants: Grants = NO_GRANTS
        #: the care-relationship answers of each open transaction, shared by all the decisions a
        #: request makes (a search's rows, a Bundle's entries); gone with the connection
        self._care: weakref.WeakKeyDictionary[Connection, SqlCareRelationships] = weakref.WeakKeyDictionary()
        # ``care_relationships`` is derived from the store's writes as the search index is: the
        # store's change hook is the one place every write path (this service, imports,
        # prescriptions) passes through, inside the writer's transaction
        downstream = store.on_change

        def on_change(conn: Connection, stored: list[Stored]) -> None:
            self._care_changed(conn, stored)
            if downstream is not None:
                downstream(conn, stored)

        store.on_change = on_change

    def _care_for(self, conn: Connection) -> SqlCareRelationships:
        care = self._care.get(conn)
        if care is None:
            care = self._care[conn] = SqlCareRelationships(conn)
        return care

    def _care_changed(self, conn: Connection, stored: list[Stored]) -> None:
        """Keep ``care_relationships`` in step with versions just written (``care_tables.apply``)."""
        changes = []
        for s in stored:
            if s.res_type not in CARE_TYPES:
                continue
            old: frozenset = frozenset()
            if s.version > 1:
                # the previous version's pairs, which this write may have removed (its index rows
                # are gone already); a delete marker before it establishes nothing
                try:
                    old = pairs_of(s.res_type, self.store.vread(conn, s.res_type, s.res_id, s.version - 1).body)
                except (NotFound, Gone):
                    pass
            changes.append((old, pairs_of(s.res_type, s.body)))
        if changes and apply_care_changes(conn, changes):
            care = self._care.get(conn)
            if care is not None:
                care.forget()

    def _label_hash(self, label: str) -> str:
        return label_hashes(self.sql.h, label)[0]

    def visibility(self, principal: Principal) -> Visibility:
        """What ``principal``'s searches may return, as the policy decided it, for the store."""
        return visibility_for(principal, self.grants, self._label_hash)

    # ---- write guards -----------------------------------------------------------------------

    def add_write_guard(self, name: str, resource_types: Iterable[str], guard: WriteGuard) -> None:
        """Let another package keep an invariant over writes that the policy cannot judge from
        the resource alone (``visits.scheduling``: an Appointment holding a Slot must be the one
        that Slot's booking row names, so no write path can book around the guarantee against
        double booking).

        The guard runs for every create, update and delete of ``resource_types`` through this
        service (FHIR API, Bundles, imports through ``check_write_in``, other use cases) inside the
        writer's unit of work, after the policy allowed the write and before the store makes it:
        ``before`` is the current content (None for a create, or when unknown on import),
        ``after`` the new content (None for a delete), ``res_id`` None when the store will pick
        the id. Raising a ``TeleledgerError`` refuses the write. Registering a name again
        replaces that guard."""
        for rt in resource_types:
            self._guards.setdefault(rt, {})[name] = guard

    def _guard(self, c: Connection, principal: Principal, res_type: str, res_id: str | None,
               before: dict | None, after: dict | None) -> None:
        guards = self._guards.get(res_type)
        if guards:
            for guard in guards.values():
                guard(c, principal, res_type, res_id, before, after)

    # ---- authorization ----------------------------------------------------------------------

    def _decide(self, conn: Connection, principal: Principal, action: str, resource_type: str, patients, *,
                establishes_care: bool = False, practitioners: frozenset[str] = frozenset(),
                body: dict | None = None) -> Decision:  # type: ignore[no-untyped-def]
        # the resource's sensitivity labels, so a consent about mental-health or HIV data decides
        labels = classify(body) if body is not None and patients else frozenset()
        req = AccessRequest(action=action, resource_type=resource_type, patient_ids=frozenset(patients),
                            establishes_care=establishes_care, practitioner_ids=practitioners, labels=labels,
                            participants=participants_of(resource_type, body))
        return policy.decide(principal, req, self._care_for(conn), self.grants)

    def _decide_on(self, conn: Connection, principal: Principal, action: str, s: Stored) -> Decision:
        body = s.body or {}
        return self._decide(conn, principal, action, s.res_type, compartment.patient_ids(body), body=body)

    @staticmethod
    def _deny(decision: Decision, what: str, *, action: str = "read", patients=frozenset()) -> None:  # type: ignore[no-untyped-def]
        if not decision.allowed:
            # 403 with the rule, never with data: the reason names a rule, not a patient
            raise AccessDenied(f"access to {what} denied: {decision.detail} ({decision.reason})",
                               action=action if action in _LOG_ACTIONS else "read", reason=decision.reason,
                               patients=frozenset(patients))

    def record_denial(self, principal: Principal, exc: AccessDenied) -> None:
        if self.auditor is None:
            return
        with UnitOfWork(self.engine) as uow:
            self.auditor.access(uow.c, principal, exc.action, [], outcome="denied", reason=exc.reason,
                                patients=exc.patients)
            uow.commit()

    def _accessed(self, c: Connection, principal: Principal, action: str, stored_list, *,  # type: ignore[no-untyped-def]
                  patients=(), decision: Decision | None = None) -> None:  # type: ignore[no-untyped-def]
        if self.auditor is not None:
            self.auditor.access(c, principal, action, touched(stored_list), patients=patients,
                                reason=_basis(decision))

    def _establishes_care(self, principal: Principal, resource: dict) -> bool:
        if resource.get("resourceType") not in CARE_TYPES or not principal.practitioner_id:
            return False
        for entry in sp.extract(resource):
            if (
                isinstance(entry, sp.ReferenceEntry)
                and entry.param in CARE_PARAMS
                and entry.type == "Practitioner"
                and entry.id == principal.practitioner_id
            ):
                return True
        return False

    def check_write_in(self, conn: Connection, principal: Principal, action: str, resource: dict) -> None:
        self._check_write(conn, principal, action, resource)
        self._guard(conn, principal, resource["resourceType"], resource.get("id"), None, resource)

    @staticmethod
    def _owning_practitioners(resource: dict) -> frozenset[str]:
        """Practitioners a directory entry belongs to (their own Practitioner, Role, Schedule)."""
        rt = resource.get("resourceType")
        if rt == "Practitioner" and isinstance(resource.get("id"), str):
            return frozenset({resource["id"]})
        if rt not in ("PractitionerRole", "Schedule"):
            return frozenset()
        return frozenset(e.id for e in sp.extract(resource) if isinstance(e, sp.ReferenceEntry)
                         and e.type == "Practitioner" and e.param in ("practitioner", "actor"))

    def _check_write(self, conn: Connection, principal: Principal, action: str, resource: dict) -> None:
        rt = resource["resourceType"]
        patients = compartment.patient_ids(resource)
        d = self._decide(conn, principal, action, rt, patients, establishes_care=self._establishes_care(principal, resource),
                         practitioners=self._owning_practitioners(resource), body=resource)
        self._deny(d, f"{action} {rt}", action=action, patients=patients)

    # ---- instance interactions --------------------------------------------------------------

    @audited
    def create(self, principal: Principal, resource: object, *, if_none_exist: str | None = None,
               raw: bytes | None = None) -> tuple[Stored, bool]:
        """create / conditional create (https://hl7.org/fhir/R4/http.html#create, #ccreate).

        ``raw``: the JSON text ``resource`` was parsed from, when there is one (validating the
        text is faster than validating the dict)."""
        validate(resource, raw=raw)  # before the transaction: it needs no lock
        with UnitOfWork(self.engine) as uow:
            result = self.create_in(uow.c, principal, resource, if_none_exist=if_none_exist, validated=True)
            uow.commit()
        return result

    def create_in(self, c: Connection, principal: Principal, resource: object, *,
                  if_none_exist: str | None = None, res_id: str | None = None,
                  validated: bool = False) -> tuple[Stored, bool]:
        rt = resource["resourceType"] if validated else validate(resource)  # type: ignore[index]
        assert isinstance(resource, dict)
        if if_none_exist:
            matches = self._conditional_matches(c, principal, rt, if_none_exist)
            if len(matches) > 1:
                raise PreconditionFailed(f"If-None-Exist matched {len(matches)} {rt} resources; it must match at most one")
            if matches:
                self._accessed(c, principal, "read", matches[:1])
                return matches[0], False
        self._check_write(c, principal, "create", resource)
        self._guard(c, principal, rt, res_id, None, resource)
        resource = dict(resource)
        resource.pop("id", None)
        stored = self.store.create(c, resource, res_id=res_id)
        self._accessed(c, principal, "create", [stored])
        return stored, True

    @audited
    def read(self, principal: Principal, res_type: str, res_id: str) -> Stored:
        """read (https://hl7.org/fhir/R4/http.html#read)."""
        with UnitOfWork(self.engine) as uow:
            stored = self.read_in(uow.c, principal, res_type, res_id)
            uow.commit()
        return stored

    @audited
    def vread(self, principal: Principal, res_type: str, res_id: str, version: int) -> Stored:
        """vread (https://hl7.org/fhir/R4/http.html#vread)."""
        with UnitOfWork(self.engine) as uow:
            try:
                stored = self.store.vread(uow.c, res_type, res_id, version)
            except (NotFound, Gone):
                self._deny_unreadable(uow.c, principal, "vread", res_type, res_id)
                raise
            d = self._check_read(uow.c, principal, "vread", stored)
            self._accessed(uow.c, principal, "vread", [stored], decision=d)
            uow.commit()
        return stored

    def _deny_unreadable(self, conn: Connection, principal: Principal, action: str, res_type: str,
                         res_id: str) -> None:
        """Before a 404 or 410 about a resource that exists: that a version is missing or the
        resource was deleted is for its readers to learn (a version count or a deletion is a fact
        about the patient too), so a principal who may not read its last content gets the 403 a
        read would give. A resource that never existed stays 404: ids are random."""
        cur = self.store.current(conn, res_type, res_id)
        if cur is None:
            return
        body = cur.body
        if body is None and cur.version > 1:  # deleted: judged on the content it deleted
            try:
                body = self.store.vread(conn, res_type, res_id, cur.version - 1).body
            except TeleledgerError:
                body = None
        if body is None:
            return
        patients = compartment.patient_ids(body)
        self._deny(self._decide(conn, principal, action, res_type, patients, body=body), f"{res_type}/{res_id}",
                   action=action, patients=patients)

    def _check_read(self, conn: Connection, principal: Principal, action: str, stored: Stored, *,
                    log_action: str | None = None) -> Decision:
        assert stored.body is not None
        patients = compartment.patient_ids(stored.body)
        d = self._decide(conn, principal, action, stored.res_type, patients, body=stored.body)
        self._deny(d, f"{stored.res_type}/{stored.res_id}", action=log_action or action, patients=patients)
        return d

    @audited
    def update(self, principal: Principal, res_type: str, res_id: str, resource: object, *,
               if_match: int | None = None, raw: bytes | None = None) -> tuple[Stored, bool]:
        """update / create-on-update (https://hl7.org/fhir/R4/http.html#update); ``raw`` as for
        ``create``."""
        validate(resource, expected_type=res_type, raw=raw)  # before the transaction
        with UnitOfWork(self.engine) as uow:
            result = self.update_in(uow.c, principal, res_type, res_id, resource, if_match=if_match,
                                    validated=True)
            uow.commit()
        return result

    def update_in(self, c: Connection, principal: Principal, res_type: str, res_id: str, resource: object, *,
                  if_match: int | None = None, validated: bool = False) -> tuple[Stored, bool]:
        if not validated:
            validate(resource, expected_type=res_type)
        assert isinstance(resource, dict)
        if resource.get("id") != res_id:
            raise InvalidInput(f"the body's id {resource.get('id')!r} does not match {res_id!r} in the URL")
        current = self.store.current(c, res_type, res_id, for_update=True)
        if current is not None and current.body is not None:
            # both the old and the new content must be writable by this principal
            self._check_write(c, principal, "update", current.body)
        self._check_write(c, principal, "update", resource)
        self._guard(c, principal, res_type, res_id, current.body if current is not None else None, resource)
        stored, created = self.store.update(c, dict(resource), res_id, if_match=if_match, current=current)
        self._accessed(c, principal, "create" if created else "update", [stored])
        return stored, created

    @audited
    def delete(self, principal: Principal, res_type: str, res_id: str) -> Stored | None:
        """delete (https://hl7.org/fhir/R4/http.html#delete); deleting twice is not an error."""
        with UnitOfWork(self.engine) as uow:
            stored = self.delete_in(uow.c, principal, res_type, res_id)
            uow.commit()
        return stored

    def delete_in(self, c: Connection, principal: Principal, res_type: str, res_id: str) -> Stored | None:
        patients: frozenset[str] = frozenset()
        current = self.store.current(c, res_type, res_id, for_update=True)
        if current is not None and current.body is not None:
            self._check_write(c, principal, "delete", current.body)
            self._guard(c, principal, res_type, res_id, current.body, None)
            patients = compartment.patient_ids(current.body)
        else:
            self._deny(self._decide(c, principal, "delete", res_type, frozenset()), f"delete {res_type}",
                       action="delete")
        stored = self.store.delete(c, res_type, res_id, current=current)
        if stored is not None and self.auditor is not None:
            self.auditor.access(c, principal, "delete",
                                [Touched(res_type, res_id, stored.version, patients)])
        return stored

    def exists(self, res_type: str, res_id: str) -> bool:
        with UnitOfWork(self.engine) as uow:
            return self.store.exists(uow.c, res_type, res_id)

    def read_in(self, c: Connection, principal: Principal, res_type: str, res_id: str) -> Stored:
        try:
            stored = self.store.read(c, res_type, res_id)
        except Gone:
            self._deny_unreadable(c, principal, "read", res_type, res_id)
            raise
        d = self._check_read(c, principal, "read", stored)
        self._accessed(c, principal, "read", [stored], decision=d)
        return stored

    # ---- search -----------------------------------------------------------------------------

    def resolve_conditional(self, conn: Connection, principal: Principal, ref: str) -> str:
        """``Type?criteria`` → ``Type/id`` of the one resource it matches (Bundles, imports):
        https://hl7.org/fhir/R4/http.html#trules (conditional references)."""
        rt, _, query = ref.partition("?")
        matches = self._conditional_matches(conn, principal, rt, query)
        if len(matches) != 1:
            raise PreconditionFailed(f"conditional reference {ref} matched {len(matches)} resources; "
                                     "it must match exactly one")
        return f"{rt}/{matches[0].res_id}"

    def search_in(self, c: Connection, principal: Principal, res_type: str,
                  items: Sequence[tuple[str, str]]) -> list[Stored]:
        """The current resources a search matches (one page: ``_count``, at most ``max_count``),
        inside the caller's unit of work, for use cases that must read and write in one
        transaction; recorded as a search like ``search``. No Bundle, no includes."""
        ps = fq.parse_search(res_type, items, strict=True, max_count=self.settings.max_count,
                             default_count=self.settings.default_count)
        count = ps.count if ps.count is not None else self.settings.default_count
        _, page, _ = self._run_search(c, principal, ps, limit=count, offset=ps.offset)
        self._accessed(c, principal, "search", page)
        return page

    def _conditional_matches(self, conn: Connection, principal: Principal, rt: str, query: str) -> list[Stored]:
        if not isinstance(query, str):
            raise InvalidInput("ifNoneExist must be a search query string such as identifier=system|value")
        items = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not items:
            raise InvalidInput(f"empty conditional criteria for {rt}")
        ps = fq.parse_search(rt, items, strict=True, max_count=self.settings.max_count)
        _, page, _ = self._run_search(conn, principal, ps, limit=2, offset=0)
        return page

    def _run_search(self, conn: Connection, principal: Principal, ps: fq.ParsedSearch, *, limit: int,
                    offset: int) -> tuple[int, list[Stored], bool]:
        d = self._decide(conn, principal, "search", ps.resource_type, frozenset())
        self._deny(d, f"search {ps.resource_type}", action="search")
        vis = self.visibility(principal)
        plan = self.sql.plan(ps)
        visible, params = self.sql.visibility(vis, conn.dialect, patient=patient_hint(ps))
        where = [R.c.res_type == ps.resource_type, R.c.deleted.is_(False), *plan.where, visible]
        if not plan.post:
            total = conn.execute(select(func.count()).select_from(R).where(*where), params).scalar_one()
            if limit == 0:
                return total, [], False
            ids = conn.execute(select(R.c.res_id).where(*where).order_by(*plan.order_by).limit(limit).offset(offset),
                               params).scalars().all()
            loaded = self.store.load_current(conn, [(ps.resource_type, i) for i in ids])
            page = [loaded[(ps.resource_type, i)] for i in ids if (ps.resource_type, i) in loaded]
            return total, self._recheck(conn, vis, page), False
        ids = conn.execute(select(R.c.res_id).where(*where).order_by(*plan.order_by).limit(MAX_POST_FILTER + 1),
                           params).scalars().all()
        if len(ids) > MAX_POST_FILTER:
            raise PayloadTooLarge(
                f"this search must be matched after decryption and has over {MAX_POST_FILTER} candidates; "
                "narrow it with another parameter"
            )
        loaded = self.store.load_current(conn, [(ps.resource_type, i) for i in ids])
        matched = [s for i in ids if (s := loaded.get((ps.resource_type, i))) and self._post_ok(s.body, plan.post)]
        matched = self._recheck(conn, vis, matched)
        return len(matched), matched[offset : offset + limit], True

    def _recheck(self, conn: Connection, vis: Visibility, rows: list[Stored]) -> list[Stored]:
        """Every row a consent-filtered search returns, and every message a care-team search
        returns, checked again with the policy's pure definition of the filter
        (``policy.model.matches``): the SQL of ``visibility_clause`` is an optimization of it,
        never the last word."""
        if vis.consented is not None:
            f: Consented | CareTeamOf = vis.consented
        elif vis.kind == "care_team" and vis.practitioner_id is not None:
            if not any(s.res_type in THREAD_TYPES for s in rows):
                return rows
            f = CareTeamOf(vis.practitioner_id)
        else:
            return rows
        care = self._care_for(conn)
        return [s for s in rows if s.body is not None and filter_matches(
            f, compartment.patient_ids(s.body), s.res_type, classify(s.body), care=care,
            participants=participants_of(s.res_type, s.body))]

    @staticmethod
    def _post_ok(body: dict | None, conds: Sequence[fq.Condition]) -> bool:
        if body is None:
            return False
        entries = sp.extract(body)
        for cond in conds:
            assert cond.param is not None
            mine = [e for e in entries if e.param == cond.param.name]
            if not any(fq.matches(e, v, cond.modifier) for e in mine for v in cond.values):
                return False
        return True

    @audited
    def search(self, principal: Principal, res_type: str, items: Sequence[tuple[str, str]], *,
               strict: bool = False) -> dict:
        """search (https://hl7.org/fhir/R4/search.html) → a searchset Bundle."""
        ps = fq.parse_search(res_type, items, strict=strict, max_count=self.settings.max_count,
                             default_count=self.settings.default_count)
        count = ps.count if ps.count is not None else self.settings.default_count
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            limit = 0 if ps.summary == "count" else count
            total, page, _ = self._run_search(c, principal, ps, limit=limit, offset=ps.offset)
            entries = [self._entry(s, "match", ps.elements) for s in page]
            included = self._includes(c, principal, ps, page) if page and (ps.include or ps.revinclude) else []
            entries += [self._entry(s, "include") for s in included]
            # every hit and every included resource is a disclosure, recorded per patient
            self._accessed(c, principal, "search", page + included)
            uow.commit()
        bundle: dict = {"resourceType": "Bundle", "type": "searchset"}
        if ps.total != "none":
            bundle["total"] = total
        bundle["link"] = self._links(res_type, items, ps.offset, count, total, ps.summary == "count")
        if ps.unknown:
            entries.append({
                "resource": outcome("warning", "not-supported",
                                    f"unknown search parameters ignored: {', '.join(ps.unknown)}"),
                "search": {"mode": "outcome"},
            })
        bundle["entry"] = entries
        if not entries:
            del bundle["entry"]
        return bundle

    def _includes(self, conn: Connection, principal: Principal, ps: fq.ParsedSearch, page: list[Stored]) -> list[Stored]:
        ref = t.idx_reference
        keys: list[tuple[str, str]] = []
        page_ids = [s.res_id for s in page]
        for inc in ps.include:
            q = select(ref.c.target_type, ref.c.target_id).where(
                ref.c.res_type == ps.resource_type, ref.c.param == inc.param, ref.c.res_id.in_(page_ids)
            )
            if inc.target_type:
                q = q.where(ref.c.target_type == inc.target_type)
            keys += [(tt, ti) for tt, ti in conn.execute(q) if tt]
        for inc in ps.revinclude:
            q = select(ref.c.res_type, ref.c.res_id).where(
                ref.c.res_type == inc.source_type,
                ref.c.param == inc.param,
                ref.c.target_id.in_(page_ids),
                ref.c.target_type.in_([ps.resource_type, ""]),
            )
            keys += list(conn.execute(q).tuples())
        seen = {(s.res_type, s.res_id) for s in page}
        wanted = [k for k in dict.fromkeys(keys) if k not in seen]
        loaded = self.store.load_current(conn, wanted)
        out = []
        for key in wanted:
            s = loaded.get(key)
            if s is None:
                continue
            # every included resource passes the same decision point as a direct read
            if self._decide_on(conn, principal, "read", s).allowed:
                out.append(s)
        return out

    def _entry(self, s: Stored, mode: str, elements: Sequence[str] = ()) -> dict:
        body = s.body
        if elements and body is not None:
            keep = {"resourceType", "id", "meta", *elements}
            body = {k: v for k, v in body.items() if k in keep}
            meta = dict(body.get("meta") or {})
            meta["tag"] = [*meta.get("tag", []), {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                                                  "code": "SUBSETTED"}]
            body["meta"] = meta
        return {"fullUrl": f"{self.settings.base_url}/fhir/{s.res_type}/{s.res_id}", "resource": body,
                "search": {"mode": mode}}

    def _links(self, path: str, items: Sequence[tuple[str, str]], offset: int, count: int, total: int,
               summary_count: bool) -> list[dict]:
        base = [(k, v) for k, v in items if k not in ("_offset", "_count")]

        count = max(count, 1)  # _count=0 asks for the total only; links still page by one

        def url(off: int) -> str:
            return f"{self.settings.base_url}/fhir/{path}?" + urlencode([*base, ("_count", str(count)), ("_offset", str(off))])

        links = [{"relation": "self", "url": url(offset)}]
        if summary_count:
            return links
        links.append({"relation": "first", "url": url(0)})
        if offset + count < total:
            links.append({"relation": "next", "url": url(offset + count)})
        if offset > 0:
            links.append({"relation": "previous", "url": url(max(0, offset - count))})
        last = max(0, ((total - 1) // count) * count) if total else 0
        links.append({"relation": "last", "url": url(last)})
        return links

    # ---- history ----------------------------------------------------------------------------

    @audited
    def history(self, principal: Principal, res_type: str, res_id: str | None, items: Sequence[tuple[str, str]]) -> dict:
        """history (https://hl7.org/fhir/R4/http.html#history), instance and type level."""
        params = dict(items)
        try:
            count = min(int(params.get("_count", self.settings.default_count)), self.settings.max_count)
            offset = int(params.get("_offset", 0))
            if count < 0 or offset < 0 or offset > fq.MAX_OFFSET:
                raise ValueError
        except ValueError:
            raise InvalidInput(f"_count and _offset must be non-negative integers (_offset up to {fq.MAX_OFFSET})") from None
        since = None
        if "_since" in params:
            since = fq.date_range(params["_since"])[0]
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            if res_id is not None:
                cur = self.store._current(c, res_type, res_id)
                if cur is None:
                    raise NotFound(f"{res_type}/{res_id} is not known")
                _, versions = self.store.history(c, res_type, res_id, since=since, count=MAX_POST_FILTER, offset=0)
                readable = self._readable_versions(c, principal, versions)
                if versions and not readable:
                    latest = next((v for v in versions if v.body is not None), None)
                    patients = compartment.patient_ids(latest.body) if latest and latest.body else frozenset()
                    self._deny(self._decide(c, principal, "history", res_type, patients,
                                            body=latest.body if latest else None),
                               f"{res_type}/{res_id}", action="history", patients=patients)
                total, versions = len(readable), readable[offset : offset + count]
            else:
                self._deny(self._decide(c, principal, "history", res_type, frozenset()), f"history of {res_type}",
                           action="history")
                vis = self.visibility(principal)
                if vis.kind == "all":
                    total, versions = self.store.history(c, res_type, None, since=since, count=count, offset=offset)
                else:
                    # a resource may have moved between compartments: every version is judged on its
                    # own content, so an old version filed under another patient never shows
                    n, candidates = self.store.history(c, res_type, None, since=since, count=MAX_POST_FILTER + 1,
                                                       offset=0)
                    if n > MAX_POST_FILTER:
                        raise PayloadTooLarge(f"more than {MAX_POST_FILTER} versions to check; narrow with _since")
                    readable = self._readable_versions(c, principal, candidates)
                    total, versions = len(readable), readable[offset : offset + count]
            self._accessed(c, principal, "history", [v for v in versions if v.body is not None])
            uow.commit()
        entries = []
        for v in versions:
            e: dict = {"fullUrl": f"{self.settings.base_url}/fhir/{v.res_type}/{v.res_id}"}
            if v.body is not None:
                e["resource"] = v.body
            method = {"create": "POST", "update": "PUT", "delete": "DELETE"}[v.method]
            e["request"] = {"method": method, "url": f"{v.res_type}" + ("" if method == "POST" else f"/{v.res_id}")}
            e["response"] = {"status": {"create": "201 Created", "update": "200 OK", "delete": "204 No Content"}[v.method],
                             "etag": f'W/"{v.version}"', "lastModified": instant(v.last_updated)}
            entries.append(e)
        path = f"{res_type}/{res_id}/_history" if res_id else f"{res_type}/_history"
        return {"resourceType": "Bundle", "type": "history", "total": total,
                "link": self._links(path, items, offset, max(count, 1), total, False), "entry": entries}

    def _readable_versions(self, c: Connection, principal: Principal, versions: list[Stored]) -> list[Stored]:
        """The versions this principal may read, each judged on its own content (a delete marker
        on the content of the version it deleted)."""
        out = []
        for v in versions:
            body = v.body
            if body is None and v.version > 1:
                try:
                    body = self.store.vread(c, v.res_type, v.res_id, v.version - 1).body
                except TeleledgerError:
                    body = None
            if body is None:
                continue
            if self._decide(c, principal, "vread", v.res_type, compartment.patient_ids(body), body=body).allowed:
                out.append(v)
        return out

    # ---- $everything ------------------------------------------------------------------------

    @audited
    def everything(self, principal: Principal, patient_id: str, items: Sequence[tuple[str, str]] = ()) -> dict:
        """Patient/[id]/$everything (https://hl7.org/fhir/R4/patient-operation-everything.html)."""
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            patient = self.store.read(c, "Patient", patient_id)
            self._check_read(c, principal, "read", patient, log_action="everything")
            comp = t.resource_compartments
            keys = [tuple(r) for r in c.execute(
                select(comp.c.res_type, comp.c.res_id).where(comp.c.patient_id == patient_id)
                .order_by(comp.c.res_type, comp.c.res_id)
            )]
            loaded = self.store.load_current(c, keys)  # type: ignore[arg-type]
            out = [patient] + [s for k, s in loaded.items() if k != ("Patient", patient_id)]
            allowed = [s for s in out if self._decide_on(c, principal, "read", s).allowed]
            # the practitioners, organizations and locations they reference, as the spec allows:
            # only those the resources shown reference, or a directory entry would tell what a
            # hidden resource is about (a psychiatrist named only by a hidden observation)
            ref = t.idx_reference
            rows = c.execute(select(ref.c.res_type, ref.c.res_id, ref.c.target_type, ref.c.target_id).where(
                ref.c.target_type.in_(["Practitioner", "Organization", "Location"]),
                exists(select(literal(1)).where(and_(comp.c.patient_id == patient_id,
                                                     comp.c.res_type == ref.c.res_type,
                                                     comp.c.res_id == ref.c.res_id))),
            ))
            shown = {(s.res_type, s.res_id) for s in allowed}
            named = list(dict.fromkeys((tt, ti) for rt, ri, tt, ti in rows if (rt, ri) in shown))
            extra = self.store.load_current(c, named)
            allowed += [s for s in extra.values() if self._decide_on(c, principal, "read", s).allowed]
            self._accessed(c, principal, "everything", allowed)
            uow.commit()
        return {"resourceType": "Bundle", "type": "searchset", "total": len(allowed),
                "entry": [self._entry(s, "match") for s in allowed]}
