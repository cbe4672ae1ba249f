"""The in-memory consent state the decision point decides from, in microseconds.

The chain is the authority on which consents are granted and revoked (ConsentRegistry); the
chain indexer projects its events here through ``apply_grant`` / ``apply_revoke``, with the
parsed Consent (``policy.consent.parse_consent``) the grant refers to. Break-glass claims are
recorded here too (``claim_break_glass``). ``ConsentIndex`` then implements the ``Grants`` and
``ConsentSearch`` protocols of ``policy.model``:

* ``grant(principal, request)`` → ``Decision`` or None, for ``decide``;
* ``search_view(principal)`` → ``ConsentView``, for ``decide.search_filter``.

State and ordering
------------------
The unit of grant and revoke is (consent id, grantee ref), as on chain (where the key is
patient pseudonym, grantee, provision hash). Each event carries ``chain_ref`` — any totally
ordered value, in practice ``(block number, log index)`` — and only an event newer than the last
one applied to that unit changes it: replays are no-ops, an old grant arriving after a newer
revoke is ignored (a revoke always wins over an earlier grant), and at an equal ``chain_ref`` a
revoke wins. A consent is in force for a grantee while granted, inside the grant's
``[valid_from, valid_until)`` (epoch seconds or aware datetimes; None or ``valid_until == 0``:
open, as on chain) and inside the consent's own period.

How ``grant`` decides
---------------------
Let the *refs* be ``principal.actor_refs`` (a practitioner's ``Practitioner/<id>`` included)
plus ``ANYONE``. For each patient in the request's compartment, every consent in force indexed
under one of the refs is evaluated as ``policy.consent`` defines (root match; nested exceptions;
deny wins among siblings and across consents). A deny gives ``consent-deny`` (the root denies) or
``consent-deny-exception`` (a nested provision denies); a permit gives ``consent-permit``; the
``basis`` is ``Consent/<id>``. Several patients: any deny wins; a permit needs every patient.

Break-glass: a practitioner whose purpose is ETREAT (or BTG, ERTREAT) and who holds an active
claim for every patient concerned gets ``break-glass`` (basis ``break-glass/<claim id>``) —
unless a consent already permits, in which case the permit is the basis. It overrides a
patient's deny: that is what break-glass is for, and why it is time-limited (default 4 hours)
and flagged BTG in the audit. An expired claim gives ``break-glass-expired`` only when no
consent decides.

Hot path (``bench/bench_policy.py``; figures in ``bench/RESULTS.md``): besides the per-patient
layout (for ``search_view`` and resources of several patients), the consents are laid out per
grantee ref — a "lane": ref → patient → compiled consents — and again without the consents whose
root names sensitivity labels, which never apply to a resource without labels, as most are.
``grant`` reads the ANYONE lane and one lane per actor ref for the patient (and, for an
emergency purpose, the practitioner's claim): a few look-ups in dicts that stay in the CPU
cache, and nothing more when none holds a consent. Only then does it read the clock and compare
floats and test membership in frozensets prepared when the grant was applied (the root's actor
test is left out: a consent is granted only to actors its root names). It allocates nothing but
Python's own frames and a set iterator, and its Decisions are built once per consent and claim.
``search_view`` is heavier (it visits every patient whose consents name the principal or
anyone), so its results are cached until the index changes or the clock reaches the next instant
at which a consent or claim it looked at starts or ends.

Writers (the indexer thread, the break-glass use case) hold a lock. A patient's entry and a
practitioner's claims are replaced as a whole; the lanes cannot be, so writers make an epoch
odd while they change them, and a reader that found consents while the epoch was odd or moved
reads the lanes again under the lock. Readers thus never lock in the common case and never see
half an update. Time comes from the injected ``now`` callable.

Pure core: no I/O, and nothing here is ever logged (break-glass reasons may contain PHI).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from teleledger.core.errors import InvalidInput
from teleledger.policy.consent import (
    ACTION_COVERS,
    ACTOR_TYPES,
    ANYONE,
    EMERGENCY_PURPOSES,
    ConsentRules,
    Provision,
    covered_purposes,
)
from teleledger.policy.model import (
    ALWAYS,
    DEFAULT_POLICY,
    EMPTY_CONSENT_VIEW,
    NEVER,
    REASON_BREAK_GLASS,
    REASON_BREAK_GLASS_EXPIRED,
    REASON_CONSENT_DENY,
    REASON_CONSENT_DENY_EXCEPTION,
    REASON_CONSENT_PERMIT,
    AccessRequest,
    AllOf,
    AnyLabel,
    AnyOf,
    ConsentView,
    Decision,
    DefaultPolicy,
    Not,
    OnlyLabels,
    Principal,
    RowRule,
    TypeIn,
)

__all__ = [
    "BreakGlassClaim",
    "ChainRef",
    "ConsentIndex",
    "MAX_BREAK_GLASS_TTL",
    "MIN_BREAK_GLASS_REASON",
    "may_claim_break_glass",
]

#: orders chain events: any totally ordered value, in practice (block number, log index)
ChainRef = Any

MIN_BREAK_GLASS_REASON: Final = 10
MAX_BREAK_GLASS_REASON: Final = 2000
MAX_BREAK_GLASS_TTL: Final = timedelta(hours=24)
_INF: Final = float("inf")

_MAX_CACHED_VIEWS: Final = 4096
_PatientState = dict[str, tuple["_Grant", ...]]  # grantee ref (or ANYONE) → consents in force
_NO_STATE: Final[_PatientState] = {}
_PERMIT: Final = 1
_DENY: Final = 2
_DENY_EXCEPTION: Final = 3


def _ts(value: float | int | datetime, what: str) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidInput(f"{what} must be an aware datetime (with a time zone)")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be epoch seconds or an aware datetime")
    return float(value)


# -- compiled provision trees ---------------------------------------------------------------


_SHARED_SETS: dict[frozenset[str], frozenset[str]] = {}


def _shared(values: frozenset[str]) -> frozenset[str] | None:
    """One instance per distinct condition set (None for "any"): thousands of consents name the
    same few purposes, labels, types and actions, and shared sets stay in the CPU cache. Only for
    sets drawn from those fixed vocabularies, so the table stays small."""
    if not values:
        return None
    return _SHARED_SETS.setdefault(values, values)


class _Node:
    """A provision with its conditions as frozensets (None = any) and its period as floats."""

    __slots__ = ("actions", "actors", "children", "end", "labels", "permit", "purposes", "start", "types")

    def __init__(self, p: Provision, *, root: bool) -> None:
        self.permit = p.permit
        self.actors = p.actors or None  # not shared: actor sets are per consent, without bound
        self.actions = _shared(frozenset().union(*(ACTION_COVERS[a] for a in p.actions)))
        self.purposes = _shared(covered_purposes(p.purposes) if p.purposes else frozenset())
        self.types = _shared(p.classes)
        self.labels = _shared(p.labels)
        # the root's period is folded into the grant's window
        self.start = -_INF if root else p.period.start_ts
        self.end = _INF if root else p.period.end_ts
        self.children = tuple(_Node(c, root=False) for c in p.exceptions)


def _node_times(n: _Node) -> Iterable[float]:
    for c in n.children:
        yield c.start
        yield c.end
        yield from _node_times(c)


def _match(n: _Node, refs: frozenset[str], action: str, purpose: str, rtype: str, labels: frozenset[str],
           now: float) -> bool:
    if now < n.start or now >= n.end:
        return False
    s = n.actions
    if s is not None and action not in s:
        return False
    s = n.purposes
    if s is not None and purpose not in s:
        return False
    s = n.types
    if s is not None and rtype not in s:
        return False
    s = n.labels
    if s is not None:
        if n.permit:
            if not labels or not labels <= s:
                return False
        elif s.isdisjoint(labels):
            return False
    s = n.actors
    return s is None or not s.isdisjoint(refs)


def _outcome(n: _Node, nested: bool, refs: frozenset[str], action: str, purpose: str, rtype: str,
             labels: frozenset[str], now: float) -> int:
    """The verdict of a matching provision: its own type unless a matching exception overrides.

    The children's match is ``_match`` inlined: this runs for every consent with exceptions
    that applies to a request, and a call per child cost as much as the rest of the scan."""
    matched = False
    for c in n.children:
        if now < c.start or now >= c.end:
            continue
        s = c.actions
        if s is not None and action not in s:
            continue
        s = c.purposes
        if s is not None and purpose not in s:
            continue
        s = c.types
        if s is not None and rtype not in s:
            continue
        s = c.labels
        if s is not None:
            if c.permit:
                if not labels or not labels <= s:
                    continue
            elif s.isdisjoint(labels):
                continue
        s = c.actors
        if s is not None and s.isdisjoint(refs):
            continue
        if c.children:
            r = _outcome(c, True, refs, action, purpose, rtype, labels, now)
            if r != _PERMIT:
                return r  # deny wins among siblings
        elif not c.permit:
            return _DENY_EXCEPTION  # deny wins among siblings
        matched = True
    if matched or n.permit:
        return _PERMIT
    return _DENY_EXCEPTION if nested else _DENY


class _Grant:
    """One consent in force for the grantees it was granted to, with its prebuilt Decisions."""

    # The root provision's conditions are copied onto the grant so that the hot path touches one
    # object per consent rather than two (not its actors: a grant is found by them, see _scan);
    # slots are laid out in this order, the hot ones first, and ``timed`` spares reading two float
    # objects for open-ended grants.
    __slots__ = ("timed", "actions", "purposes", "types", "labels", "permits", "kids", "start", "end",
                 "permit", "deny", "deny_exception", "root", "consent_id", "boundaries")

    def __init__(self, consent_id: str, rules: ConsentRules, valid_from: float, valid_until: float) -> None:
        self.consent_id = consent_id
        root = self.root = _Node(rules.provision, root=True)
        self.start = max(valid_from, rules.period.start_ts)
        self.end = min(valid_until, rules.period.end_ts)
        self.timed = self.start > -_INF or self.end < _INF
        self.actions, self.purposes, self.types = root.actions, root.purposes, root.types
        self.labels, self.permits = root.labels, root.permit
        self.kids = root.children
        #: every instant at which this consent's answers can change (for the search-view cache)
        times = (self.start, self.end, *_node_times(self.root))
        self.boundaries = tuple(sorted({t for t in times if -_INF < t < _INF}))
        # a FHIR id has no "/": an id with one is already a reference (a delegation, policy.delegates)
        basis = consent_id if "/" in consent_id else f"Consent/{consent_id}"
        self.permit = Decision(True, REASON_CONSENT_PERMIT, "A consent of the patient permits this access.", basis)
        self.deny = Decision(False, REASON_CONSENT_DENY, "A consent of the patient denies this access.", basis)
        self.deny_exception = Decision(
            False, REASON_CONSENT_DENY_EXCEPTION, "An exception in a consent of the patient denies this access.", basis
        )


def _scan(grants: tuple[_Grant, ...], refs: frozenset[str], action: str, purpose: str, rtype: str,
          labels: frozenset[str], now: float) -> Decision | None:
    """The verdict of these consents: deny if one denies, else permit if one permits, else None.

    ``grants`` must have been looked up under one of ``refs`` or ``ANYONE`` (as ``grant`` and
    ``_verdict`` do): a consent is granted only to actors its root names, or to ANYONE when it
    names none (``apply_grant``), so the root's actor condition holds and is not tested again."""
    permit = None
    for g in grants:
        if g.timed and (now < g.start or now >= g.end):
            continue
        # _match of the root, inlined (the hot path); its period is the grant's window above
        s = g.actions
        if s is not None and action not in s:
            continue
        s = g.purposes
        if s is not None and purpose not in s:
            continue
        s = g.types
        if s is not None and rtype not in s:
            continue
        s = g.labels
        if s is not None:
            if g.permits:
                if not labels or not labels <= s:
                    continue
            elif s.isdisjoint(labels):
                continue
        if not g.kids:
            if not g.permits:
                return g.deny
            if permit is None:
                permit = g.permit
            continue
        r = _outcome(g.root, False, refs, action, purpose, rtype, labels, now)
        if r == _PERMIT:
            if permit is None:
                permit = g.permit
        else:
            return g.deny if r == _DENY else g.deny_exception
    return permit


def _verdict(by_ref: dict[str, tuple[_Grant, ...]], refs: frozenset[str], action: str, purpose: str,
             rtype: str, labels: frozenset[str], now: float) -> Decision | None:
    permit = None
    for ref in refs:
        grants = by_ref.get(ref)
        if grants is not None:
            d = _scan(grants, refs, action, purpose, rtype, labels, now)
            if d is not None:
                if not d.allowed:
                    return d
                if permit is None:
                    permit = d
    grants = by_ref.get(ANYONE)
    if grants is not None:
        d = _scan(grants, refs, action, purpose, rtype, labels, now)
        if d is not None:
            if not d.allowed:
                return d
            if permit is None:
                permit = d
    return permit


# -- row rules for search (the same meaning as _match/_outcome, as formulas) ------------------


def _all(*rules: RowRule) -> RowRule:
    out: list[RowRule] = []
    for r in rules:
        if isinstance(r, AnyOf) and not r.rules:
            return NEVER
        for part in r.rules if isinstance(r, AllOf) else (r,):
            if part not in out:
                out.append(part)
    return ALWAYS if not out else out[0] if len(out) == 1 else AllOf(tuple(out))


def _any(*rules: RowRule) -> RowRule:
    out: list[RowRule] = []
    for r in rules:
        if isinstance(r, AllOf) and not r.rules:
            return ALWAYS
        for part in r.rules if isinstance(r, AnyOf) else (r,):
            if part not in out:
                out.append(part)
    return NEVER if not out else out[0] if len(out) == 1 else AnyOf(tuple(out))


def _terms(rule: RowRule) -> tuple[RowRule, ...]:
    """The disjuncts of ``rule`` (none for NEVER)."""
    return rule.rules if isinstance(rule, AnyOf) else (rule,)


def _not(rule: RowRule) -> RowRule:
    if isinstance(rule, AllOf) and not rule.rules:
        return NEVER
    if isinstance(rule, AnyOf) and not rule.rules:
        return ALWAYS
    return rule.rule if isinstance(rule, Not) else Not(rule)


def _static(n: _Node, refs: frozenset[str], action: str, purpose: str, now: float) -> bool:
    """The conditions of ``n`` that do not depend on the row."""
    return (
        n.start <= now < n.end
        and (n.actions is None or action in n.actions)
        and (n.purposes is None or purpose in n.purposes)
        and (n.actors is None or not n.actors.isdisjoint(refs))
    )


def _row_condition(n: _Node) -> RowRule:
    types = TypeIn(n.types) if n.types is not None else ALWAYS
    if n.labels is None:
        return types
    return _all(types, OnlyLabels(n.labels) if n.permit else AnyLabel(n.labels))


def _permits(n: _Node, refs: frozenset[str], action: str, purpose: str, now: float) -> RowRule:
    """The rows for which a matching ``n`` yields permit (``_outcome`` as a formula)."""
    kids = [c for c in n.children if _static(c, refs, action, purpose, now)]
    denied_by_kid = _any(*(_all(_row_condition(c), _not(_permits(c, refs, action, purpose, now))) for c in kids))
    some_kid = _any(*(_row_condition(c) for c in kids))
    return _all(_not(denied_by_kid), _any(ALWAYS if n.permit else NEVER, some_kid))


# -- break-glass -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakGlassClaim:
    """A practitioner's time-limited emergency access to one patient. ``reason`` is free text
    the practitioner wrote: it may contain PHI, so it goes to the access event, never to logs."""

    claim_id: str
    practitioner_id: str
    patient_id: str
    reason: str
    started_at: float
    expires_at: float
    allowed: Decision
    expired: Decision

    def active_at(self, at: float) -> bool:
        return self.started_at <= at < self.expires_at


_MAY_CLAIM: Final = Decision(
    True, "break-glass-claim", "A practitioner may claim emergency access with a written reason."
)
_CLAIM_DISABLED: Final = Decision(False, "break-glass-disabled", "This organization does not allow break-glass access.")
_CLAIM_PRACTITIONERS_ONLY: Final = Decision(
    False, "break-glass-practitioners-only", "Only practitioners may claim emergency access."
)
_CLAIM_UNLINKED: Final = Decision(
    False, "no-linked-practitioner", "The practitioner account is not linked to a Practitioner resource."
)


def may_claim_break_glass(principal: Principal, default: DefaultPolicy = DEFAULT_POLICY) -> Decision:
    """May this principal claim break-glass access at all? A practitioner linked to a Practitioner
    resource, when the organization's default policy allows break-glass ("break-glass-claim");
    otherwise "break-glass-disabled", "break-glass-practitioners-only" or "no-linked-practitioner"."""
    if principal.role != "practitioner":
        return _CLAIM_PRACTITIONERS_ONLY
    if principal.practitioner_id is None:
        return _CLAIM_UNLINKED
    return _MAY_CLAIM if default.break_glass else _CLAIM_DISABLED


# -- the index ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    patient_id: str
    granted: bool
    chain_ref: Any
    grant: _Grant | None


def _interned(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


def _check_ref(ref: Any, where: str) -> str:
    if ref == ANYONE:
        return ref  # type: ignore[no-any-return]
    kind, _, ident = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    if kind not in ACTOR_TYPES or not ident or "/" in ident:
        raise InvalidInput(f"{where}: {ref!r} is not an actor reference (Type/id) or {ANYONE!r}")
    return ref  # type: ignore[no-any-return]


class ConsentIndex:
    """The consent and break-glass state, projected from the chain and decided from in memory."""

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], _Record] = {}
        self._patient_of_consent: dict[str, str] = {}
        self._keys_of_patient: dict[str, set[tuple[str, str]]] = {}
        #: patient → grantee ref (or ANYONE) → consents in force, replaced as a whole on every change
        self._by_patient: dict[str, _PatientState] = {}
        #: The same state turned around for ``grant``: grantee ref → patient → consents in force
        #: (a "lane"), and the same lanes holding only the consents that can match a resource
        #: without sensitivity labels (most requests), so that a request passes over the many
        #: "no mental-health data to anyone" consents without touching them. A principal's few
        #: refs pick a few lanes that stay in the CPU cache; per-patient dicts did not (at 5,000
        #: patients every decision missed the cache on them). The ANYONE lane is always there.
        self._lanes: dict[str, dict[str, tuple[_Grant, ...]]] = {ANYONE: {}}
        self._unlabelled_lanes: dict[str, dict[str, tuple[_Grant, ...]]] = {ANYONE: {}}
        self._anyone = self._lanes[ANYONE]
        self._anyone_unlabelled = self._unlabelled_lanes[ANYONE]
        #: A change touches several lanes, so readers cannot take them as one snapshot: writers
        #: make ``_epoch`` odd while they change lanes and even again after, and a reader that
        #: found consents under an odd or changed epoch reads the lanes again under the lock.
        self._epoch = 0
        #: practitioner → patient → claim (replaced as a whole on every change)
        self._claims: dict[str, dict[str, BreakGlassClaim]] = {}
        #: bumped on every change; a cached search view is valid for one version and time span
        self._version = 0
        self._views: dict[tuple[frozenset[str], str, str | None], tuple[int, float, float, ConsentView]] = {}

    # -- projection from the chain ----------------------------------------------------------

    def apply_grant(
        self,
        consent_id: str,
        patient_id: str,
        grantee_refs: Iterable[str],
        rules: ConsentRules,
        valid_from: float | int | datetime | None,
        valid_until: float | int | datetime | None,
        chain_ref: ChainRef,
    ) -> bool:
        """Record that ``consent_id`` was granted to each of ``grantee_refs`` (actor references
        the consent's root provision names, or ``ANYONE`` when it names none). Returns whether
        anything changed; an event not newer than the last one applied is ignored."""
        if not isinstance(consent_id, str) or not consent_id:
            raise InvalidInput("a grant needs the Consent id")
        if rules.patient_id != patient_id:
            raise InvalidInput(f"Consent/{consent_id} belongs to another patient than the grant names")
        if rules.consent_id is not None and rules.consent_id != consent_id:
            raise InvalidInput(f"the grant names Consent/{consent_id} but the rules are Consent/{rules.consent_id}")
        if rules.status != "active":
            raise InvalidInput(f"Consent/{consent_id} is {rules.status}, not active: it cannot be granted")
        # interned: every lane and patient entry then shares one string object per ref and patient
        refs = frozenset(_interned(_check_ref(r, "grantee")) for r in grantee_refs)
        if not refs:
            raise InvalidInput("a grant needs at least one grantee")
        patient_id = _interned(patient_id)
        unknown = refs - rules.grantees
        if unknown:
            raise InvalidInput(
                f"grant to an actor Consent/{consent_id} does not name: {', '.join(sorted(unknown))}"
            )
        start = -_INF if valid_from is None else _ts(valid_from, "valid_from")
        end = _INF if valid_until is None or valid_until == 0 else _ts(valid_until, "valid_until")
        if end <= start:
            raise InvalidInput("the grant's validity ends before it starts")
        grant = _Grant(consent_id, rules, start, end)
        with self._lock:
            self._check_patient(consent_id, patient_id)
            changed = False
            for ref in refs:
                key = (consent_id, ref)
                rec = self._records.get(key)
                if rec is not None and not rec.chain_ref < chain_ref:
                    continue  # replay, or older than what is applied (a revoke wins a tie)
                self._records[key] = _Record(patient_id, True, chain_ref, grant)
                self._keys_of_patient.setdefault(patient_id, set()).add(key)
                changed = True
            if changed:
                self._rebuild(patient_id)
                self._version += 1
            return changed

    def apply_revoke(self, consent_id: str, patient_id: str, grantee_refs: Iterable[str], chain_ref: ChainRef) -> bool:
        """Record that ``consent_id`` was revoked for each of ``grantee_refs``. Idempotent; a
        revoke may arrive before the grant it cancels (that grant is then ignored)."""
        refs = frozenset(_interned(_check_ref(r, "grantee")) for r in grantee_refs)
        if not refs:
            raise InvalidInput("a revocation needs at least one grantee")
        patient_id = _interned(patient_id)
        with self._lock:
            self._check_patient(consent_id, patient_id)
            changed = False
            for ref in refs:
                key = (consent_id, ref)
                rec = self._records.get(key)
                # older than what is applied, or a replay of the applied revoke; a revoke at the
                # position of an applied grant wins the tie
                if rec is not None and (chain_ref < rec.chain_ref or (chain_ref == rec.chain_ref and not rec.granted)):
                    continue
                self._records[key] = _Record(patient_id, False, chain_ref, None)
                self._keys_of_patient.setdefault(patient_id, set()).add(key)
                changed = True
            if changed:
                self._rebuild(patient_id)
                self._version += 1
            return changed

    def _check_patient(self, consent_id: str, patient_id: str) -> None:
        known = self._patient_of_consent.setdefault(consent_id, patient_id)
        if known != patient_id:
            raise InvalidInput(f"Consent/{consent_id} is already recorded for another patient")

    def _rebuild(self, patient_id: str) -> None:
        by_ref: dict[str, list[_Grant]] = {}
        for consent_id, ref in sorted(self._keys_of_patient.get(patient_id, ())):
            rec = self._records[(consent_id, ref)]
            if rec.granted and rec.grant is not None:
                by_ref.setdefault(ref, []).append(rec.grant)
        state = {ref: tuple(gs) for ref, gs in by_ref.items()}
        touched = self._by_patient.get(patient_id, _NO_STATE).keys() | state.keys()
        if state:
            self._by_patient[patient_id] = state
        else:
            self._by_patient.pop(patient_id, None)
        self._epoch += 1  # odd: lanes are changing
        try:
            for ref in touched:
                grants = state.get(ref, ())
                _set_lane(self._lanes, ref, patient_id, grants)
                _set_lane(self._unlabelled_lanes, ref, patient_id, tuple(g for g in grants if g.labels is None))
        finally:
            self._epoch += 1

    def _gather(self, patient_id: str, refs: frozenset[str], labelled: bool) -> tuple[_Grant, ...] | None:
        """The consents ``grant`` scans for this patient and principal, in its order: to anyone
        first, then per ref in the principal's order; read under the lock when a writer raced."""
        lanes = self._lanes if labelled else self._unlabelled_lanes
        with self._lock:
            found = lanes[ANYONE].get(patient_id)
            for ref in refs:
                lane = lanes.get(ref)
                grants = None if lane is None else lane.get(patient_id)
                if grants is not None:
                    found = grants if found is None else found + grants
        return found

    def in_force(self, patient_id: str) -> list[tuple[str, str]]:
        """(consent id, grantee ref) of the patient's granted, unrevoked consents, sorted."""
        by_ref = self._by_patient.get(patient_id, _NO_STATE)
        return sorted({(g.consent_id, ref) for ref, gs in by_ref.items() for g in gs})

    # -- break-glass --------------------------------------------------------------------------

    def claim_break_glass(
        self,
        practitioner_id: str,
        patient_id: str,
        reason: str,
        now: float | datetime,
        ttl: timedelta | float = DEFAULT_POLICY.break_glass_ttl,
        *,
        claim_id: str | None = None,
    ) -> BreakGlassClaim:
        """Record an emergency-access claim; it replaces an earlier claim for the same pair.

        The caller has asked ``may_claim_break_glass`` and passes the organization's
        ``DefaultPolicy.break_glass_ttl``. ``reason`` must be a written reason of at least
        ``MIN_BREAK_GLASS_REASON`` characters.
        """
        if not isinstance(practitioner_id, str) or not practitioner_id:
            raise InvalidInput("break-glass needs the practitioner")
        if not isinstance(patient_id, str) or not patient_id:
            raise InvalidInput("break-glass needs the patient")
        if not isinstance(reason, str) or len(reason.strip()) < MIN_BREAK_GLASS_REASON:
            raise InvalidInput(f"break-glass needs a written reason of at least {MIN_BREAK_GLASS_REASON} characters")
        if len(reason) > MAX_BREAK_GLASS_REASON:
            raise InvalidInput(f"the break-glass reason is longer than {MAX_BREAK_GLASS_REASON} characters")
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else _ts(ttl, "ttl")
        if not 0 < seconds <= MAX_BREAK_GLASS_TTL.total_seconds():
            raise InvalidInput("the break-glass time limit must be more than 0 and at most 24 hours")
        start = _ts(now, "now")
        claim_id = claim_id or uuid.uuid4().hex
        basis = f"break-glass/{claim_id}"
        claim = BreakGlassClaim(
            claim_id,
            practitioner_id,
            patient_id,
            reason.strip(),
            start,
            start + seconds,
            Decision(True, REASON_BREAK_GLASS,
                     "Emergency access under a break-glass claim (BTG): time-limited and audited.", basis),
            Decision(False, REASON_BREAK_GLASS_EXPIRED, "The break-glass claim for this patient has expired.", basis),
        )
        with self._lock:
            claims = dict(self._claims.get(practitioner_id, {}))
            claims[patient_id] = claim
            self._claims[practitioner_id] = claims
            self._version += 1
        return claim

    def end_break_glass(self, practitioner_id: str, patient_id: str, now: float | datetime) -> BreakGlassClaim | None:
        """End a claim early (the emergency is over); returns the ended claim, or None."""
        at = _ts(now, "now")
        with self._lock:
            claim = self._claims.get(practitioner_id, {}).get(patient_id)
            if claim is None or claim.expires_at <= at:
                return claim
            ended = BreakGlassClaim(claim.claim_id, claim.practitioner_id, claim.patient_id, claim.reason,
                                    claim.started_at, max(at, claim.started_at), claim.allowed, claim.expired)
            claims = dict(self._claims[practitioner_id])
            claims[patient_id] = ended
            self._claims[practitioner_id] = claims
            self._version += 1
            return ended

    def expire_break_glass(self, now: float | datetime | None = None) -> list[BreakGlassClaim]:
        """Forget claims that have run out (their access events stay in the log); returns them.
        Until forgotten, an expired claim answers "break-glass-expired"."""
        at = self._now() if now is None else _ts(now, "now")
        gone: list[BreakGlassClaim] = []
        with self._lock:
            for practitioner_id, claims in list(self._claims.items()):
                keep = {p: c for p, c in claims.items() if c.expires_at > at}
                gone.extend(c for c in claims.values() if c.expires_at <= at)
                if keep:
                    self._claims[practitioner_id] = keep
                else:
                    del self._claims[practitioner_id]
            if gone:
                self._version += 1
        return gone

    def break_glass_claims(self, practitioner_id: str) -> list[BreakGlassClaim]:
        return sorted(self._claims.get(practitioner_id, {}).values(), key=lambda c: (c.started_at, c.patient_id))

    # -- deciding -----------------------------------------------------------------------------

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None:
        """The consent state's answer for ``decide`` (module docstring); None when it has none."""
        # One patient, the common case. Every bytecode here runs for every resource a request
        # touches, so: no clock read and no argument unpacking until a consent or claim is there
        # to judge, one lane per ref, and the epoch check only when something was found.
        try:
            (patient_id,) = request.patient_ids
        except ValueError:  # no patient, or several
            return self._grant_many(principal, request) if request.patient_ids else None
        epoch = self._epoch
        labels = request.labels
        if labels:
            lanes, found = self._lanes, self._anyone.get(patient_id)
        else:
            lanes, found = self._unlabelled_lanes, self._anyone_unlabelled.get(patient_id)
        refs = principal.actor_refs
        for ref in refs:
            lane = lanes.get(ref)
            if lane is not None:
                grants = lane.get(patient_id)
                if grants is not None:  # two refs with consents of their own is rare: only then concatenate
                    found = grants if found is None else found + grants
        glass = None  # the claim, looked at only for an emergency purpose
        practitioner_id = principal.practitioner_id
        if practitioner_id is not None and self._claims and principal.purpose in EMERGENCY_PURPOSES:
            claims = self._claims.get(practitioner_id)
            claim = None if claims is None else claims.get(patient_id)
            if claim is not None:
                glass = claim.allowed if claim.started_at <= self._now() < claim.expires_at else claim.expired
        if found is None:
            # Consistent even if a writer raced: one event only adds (or only removes) one
            # consent, so lanes read half before and half after it cannot all come up empty
            # unless the state on one side of the change has nothing for this principal either.
            return glass
        if epoch & 1 or self._epoch != epoch:
            found = self._gather(patient_id, refs, bool(labels))
            if found is None:
                return glass
        d = _scan(found, refs, request.action, principal.purpose, request.resource_type, labels, self._now())
        if d is None or d.allowed:
            return d if d is not None else glass
        return glass if glass is not None and glass.allowed else d

    def _grant_many(self, principal: Principal, request: AccessRequest) -> Decision | None:
        """``grant`` for a resource in several patients' compartments: any deny wins, a permit
        needs every patient, break-glass needs an active claim for every patient."""
        patients = request.patient_ids
        now = self._now()
        purpose = principal.purpose
        glass = None
        practitioner_id = principal.practitioner_id
        if practitioner_id is not None and purpose in EMERGENCY_PURPOSES:
            claims = self._claims.get(practitioner_id)
            if claims is not None:
                for patient_id in patients:
                    claim = claims.get(patient_id)
                    if claim is None:
                        glass = None
                        break
                    if not claim.started_at <= now < claim.expires_at:
                        glass = claim.expired
                        break
                    if glass is None:
                        glass = claim.allowed
        refs = principal.actor_refs
        action, rtype, labels = request.action, request.resource_type, request.labels
        permit = None
        complete = True
        for patient_id in patients:
            state = self._by_patient.get(patient_id)
            if state is None:
                complete = False
                continue
            d = _verdict(state, refs, action, purpose, rtype, labels, now)
            if d is None:
                complete = False
            elif not d.allowed:
                return glass if glass is not None and glass.allowed else d
            elif permit is None:
                permit = d
        if complete and permit is not None:
            return permit
        return glass

    def search_view(self, principal: Principal) -> ConsentView:
        """What the consent state lets this principal's searches see (``ConsentView``), for the
        action ``search``, the principal's purpose and the current time.

        Building a view visits every patient with a consent naming the principal or anyone, so
        views are cached per (actor refs, purpose, practitioner): an entry serves until the
        index changes or the clock reaches an instant where one of the consents or claims it
        looked at starts or ends.
        """
        now = self._now()
        cache_key = (principal.actor_refs, principal.purpose, principal.practitioner_id)
        hit = self._views.get(cache_key)
        if hit is not None and hit[0] == self._version and hit[1] <= now < hit[2]:
            return hit[3]
        version = self._version  # read first: a change while building makes the entry stale at once
        view, valid_from, valid_until = self._build_view(principal, now)
        if len(self._views) >= _MAX_CACHED_VIEWS:
            self._views.clear()
        self._views[cache_key] = (version, valid_from, valid_until, view)
        return view

    def _build_view(self, principal: Principal, now: float) -> tuple[ConsentView, float, float]:
        """The view at ``now``, and the span [from, until) of instants over which it holds."""
        refs = principal.actor_refs
        purpose = principal.purpose
        practitioner_id = principal.practitioner_id
        keys = (*sorted(refs), ANYONE)
        with self._lock:
            patients: set[str] = set()
            for ref in keys:
                patients.update(self._lanes.get(ref, ()))
        valid_from, valid_until = -_INF, _INF
        by_patient = self._by_patient
        permits: dict[RowRule, set[str]] = {}
        denies: dict[RowRule, set[str]] = {}
        for patient_id in patients:
            by_ref = by_patient.get(patient_id)
            if by_ref is None:
                continue
            permit_rules: list[RowRule] = []
            deny_rules: list[RowRule] = []
            seen: set[int] = set()
            for ref in keys:
                for g in by_ref.get(ref, ()):
                    if id(g) in seen:
                        continue
                    seen.add(id(g))
                    for t in g.boundaries:
                        if t <= now:
                            valid_from = max(valid_from, t)
                        else:
                            valid_until = min(valid_until, t)
                    if not g.start <= now < g.end or not _static(g.root, refs, "search", purpose, now):
                        continue
                    applies = _row_condition(g.root)
                    yes = _permits(g.root, refs, "search", purpose, now)
                    permit_rules.append(_all(applies, yes))
                    deny_rules.append(_all(applies, _not(yes)))
            # A patient's rows are permitted (denied) where any group holding the patient matches,
            # so each term of the patient's disjunction goes to its own group: patients then share
            # the few rules consents are made of instead of one group per combination, and the
            # store's SQL has a clause per group (bench_enforcement.py's pharmacist: 14 groups became 9).
            for term in _terms(_any(*permit_rules)):
                permits.setdefault(term, set()).add(patient_id)
            for term in _terms(_any(*deny_rules)):
                denies.setdefault(term, set()).add(patient_id)
        glass: frozenset[str] = frozenset()
        if practitioner_id is not None and purpose in EMERGENCY_PURPOSES:
            claims = self._claims.get(practitioner_id, {})
            glass = frozenset(p for p, c in claims.items() if c.started_at <= now < c.expires_at)
            for c in claims.values():
                for t in (c.started_at, c.expires_at):
                    if t <= now:
                        valid_from = max(valid_from, t)
                    else:
                        valid_until = min(valid_until, t)
        if not (permits or denies or glass):
            return EMPTY_CONSENT_VIEW, valid_from, valid_until
        return ConsentView(_groups(permits), _groups(denies), glass), valid_from, valid_until


def _set_lane(lanes: dict[str, dict[str, tuple[_Grant, ...]]], ref: str, patient_id: str,
              grants: tuple[_Grant, ...]) -> None:
    """Put a patient's consents for ``ref`` into its lane (an empty lane goes, but ANYONE's)."""
    lane = lanes.get(ref)
    if grants:
        if lane is None:
            lane = lanes[ref] = {}
        lane[patient_id] = grants
    elif lane is not None:
        lane.pop(patient_id, None)
        if not lane and ref != ANYONE:
            del lanes[ref]


def _groups(by_rule: dict[RowRule, set[str]]) -> tuple[tuple[frozenset[str], RowRule], ...]:
    return tuple(sorted(((frozenset(ps), rule) for rule, ps in by_rule.items()), key=lambda g: sorted(g[0])))
