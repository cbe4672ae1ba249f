"""The consent index's fast path against a straightforward reference evaluation.

``ConsentIndex.grant`` is written for speed (``bench/bench_policy.py``): consents laid out per
grantee ref ("lanes"), a second set of lanes without the consents that only concern labelled
data, the root's actor test left out, nested exceptions matched inline, an epoch check instead
of per-patient snapshots. This file states the same meaning the plain way — every consent of
the patient granted to one of the principal's refs or to anyone, in force at the instant, its
provision tree walked as ``policy.consent`` defines it, break-glass claims on top — and checks
on random histories of grants, revocations, updates, break-glass claims and clock moves that
both give the same answer, to ``grant`` and through ``decide``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.identity.scopes import ScopeSet
from teleledger.policy.consent import ACTION_COVERS, ANYONE, EMERGENCY_PURPOSES, ConsentRules, Period, Provision
from teleledger.policy.consent import covered_purposes
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.decide import decide
from teleledger.policy.model import AccessRequest, Decision, Principal

T0 = 1_750_000_000.0
HOUR = 3600.0
PATIENTS = ("pat-1", "pat-2")
# few of each, so that random consents, grantees and requests meet often
REFS = ("Organization/pharmacy-1", "Organization/clinic-1", "Practitioner/d1", "RelatedPerson/rp-1")
TYPES = ("Observation", "Condition", "MedicationRequest", "Communication")
LABELS = ("PSY", "HIV", "SEX")
PURPOSES = ("TREAT", "ETREAT", "BTG", "HPAYMT", "HRESCH", "PATRQT")
INSTANTS = (T0 - 2 * HOUR, T0 - HOUR, T0, T0 + 0.5 * HOUR, T0 + HOUR, T0 + 3 * HOUR)


class Clock:
    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


# -- the reference ----------------------------------------------------------------------------


def _in_force(start: float, end: float, at: float) -> bool:
    return start <= at < end


def _matches(p: Provision, window: tuple[float, float], refs: frozenset[str], action: str, purpose: str,
             rtype: str, labels: frozenset[str], at: float) -> bool:
    """A provision applies to the request: every condition it states holds (``policy.consent``)."""
    if not _in_force(*window, at):
        return False
    if p.actions and action not in frozenset().union(*(ACTION_COVERS[a] for a in p.actions)):
        return False
    if p.purposes and purpose not in covered_purposes(p.purposes):
        return False
    if p.classes and rtype not in p.classes:
        return False
    if p.labels:
        if p.permit and not (labels and labels <= p.labels):  # a permit covers data carrying only its labels
            return False
        if not p.permit and not labels & p.labels:  # a deny covers data carrying any of them
            return False
    return not p.actors or bool(p.actors & refs)


def _verdict(p: Provision, nested: bool, refs: frozenset[str], action: str, purpose: str, rtype: str,
             labels: frozenset[str], at: float) -> str:
    """A matching provision's verdict: its own type, unless matching exceptions say otherwise
    (then deny if one of them denies, else permit)."""
    kids = [_verdict(c, True, refs, action, purpose, rtype, labels, at) for c in p.exceptions
            if _matches(c, (c.period.start_ts, c.period.end_ts), refs, action, purpose, rtype, labels, at)]
    if kids:
        return next((k for k in kids if k != "permit"), "permit")
    if p.permit:
        return "permit"
    return "deny-exception" if nested else "deny"


@dataclass
class Reference:
    """The consent state as the events left it, evaluated from scratch on every question."""

    clock: Clock
    #: (consent id, grantee ref) → (patient, rules, window start, window end); None once revoked
    state: dict[tuple[str, str], tuple[str, ConsentRules, float, float] | None] = field(default_factory=dict)
    #: (practitioner, patient) → (claim id, started, expires)
    claims: dict[tuple[str, str], tuple[str, float, float]] = field(default_factory=dict)

    def consents(self, patient: str, ref: str) -> list[tuple[str, ConsentRules, float, float]]:
        """The patient's consents granted to ``ref``, by consent id."""
        return [(cid, v[1], v[2], v[3]) for (cid, r), v in sorted(self.state.items())
                if r == ref and v is not None and v[0] == patient]

    def scan(self, found: list[tuple[str, ConsentRules, float, float]], refs: frozenset[str], action: str,
             purpose: str, rtype: str, labels: frozenset[str]) -> tuple[bool, str, str] | None:
        at = self.clock.at
        permit = None
        for cid, rules, start, end in found:
            root = rules.provision
            window = (max(start, root.period.start_ts), min(end, root.period.end_ts))
            if not _matches(root, window, refs, action, purpose, rtype, labels, at):
                continue
            v = _verdict(root, False, refs, action, purpose, rtype, labels, at)
            if v != "permit":
                return (False, f"consent-{v}", f"Consent/{cid}")
            permit = permit or (True, "consent-permit", f"Consent/{cid}")
        return permit

    def glass(self, principal: Principal, patient: str) -> tuple[bool, str, str] | None:
        claim = self.claims.get((principal.practitioner_id, patient))  # type: ignore[arg-type]
        if claim is None:
            return None
        claim_id, started, expires = claim
        if _in_force(started, expires, self.clock.at):
            return (True, "break-glass", f"break-glass/{claim_id}")
        return (False, "break-glass-expired", f"break-glass/{claim_id}")

    def grant(self, principal: Principal, request: AccessRequest) -> tuple[bool, str, str] | None:
        refs, purpose = principal.actor_refs, principal.purpose
        args = (refs, request.action, purpose, request.resource_type, request.labels)
        emergency = principal.practitioner_id is not None and purpose in EMERGENCY_PURPOSES
        patients = request.patient_ids
        if not patients:
            return None
        if len(patients) == 1:
            (patient,) = patients
            found = self.consents(patient, ANYONE) + [c for ref in refs for c in self.consents(patient, ref)]
            glass = self.glass(principal, patient) if emergency else None
            d = self.scan(found, *args)
            if d is None:
                return glass
            if d[0]:
                return d
            return glass if glass is not None and glass[0] else d
        # several patients: break-glass needs an active claim for each, a permit each patient's
        # consent, and any deny wins
        glass = None
        if emergency:
            for patient in patients:
                one = self.glass(principal, patient)
                if one is None or not one[0]:
                    glass = one
                    break
                glass = glass or one
        permit, complete = None, True
        for patient in patients:
            d = self.scan([c for ref in refs for c in self.consents(patient, ref)] + self.consents(patient, ANYONE),
                          *args)
            if d is None:
                complete = False
            elif not d[0]:
                return glass if glass is not None and glass[0] else d
            else:
                permit = permit or d
        return permit if complete and permit is not None else glass


class ReferenceGrants:
    """The reference behind the ``Grants`` protocol, for ``decide``."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None:
        d = self.reference.grant(principal, request)
        return None if d is None else Decision(d[0], d[1], "", d[2])


def _answer(d: Decision | None) -> tuple[bool, str, str | None] | None:
    return None if d is None else (d.allowed, d.reason, d.basis)


# -- random histories -------------------------------------------------------------------------


def _sets(values: tuple[str, ...]) -> st.SearchStrategy[frozenset[str]]:
    # half the time "any", so that consents apply to the requests drawn
    return st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(values), min_size=1, max_size=2))


_PERIODS = st.sampled_from([Period(), Period(), Period(_at(T0 - HOUR), _at(T0 + HOUR)), Period(_at(T0), None),
                            Period(None, _at(T0 + 0.5 * HOUR))])


def _tree(depth: int) -> st.SearchStrategy[Provision]:
    kids = st.lists(_tree(depth - 1), max_size=2).map(tuple) if depth else st.just(())
    return st.builds(Provision, st.sampled_from(["permit", "permit", "deny"]), _sets(REFS),
                     _sets(("access", "collect", "correct")), _sets(PURPOSES), _sets(TYPES), _sets(LABELS),
                     _PERIODS, kids)


trees = _tree(2)
windows = st.sampled_from([(None, None), (None, None), (T0 - HOUR, None), (None, T0 + HOUR),
                           (T0 + 0.5 * HOUR, T0 + 2 * HOUR), (T0 - 2 * HOUR, 0)])
principals = st.builds(
    lambda role, own, refs, purpose: Principal(
        f"acct-{role}", role, ScopeSet.parse("patient/*.cruds" if role == "patient" else "user/*.cruds"),
        "pat-9" if role == "patient" else None, own if role == "practitioner" else None, purpose,
        actor_refs=refs),
    st.sampled_from(["practitioner", "practitioner", "pharmacist", "payer", "researcher", "patient"]),
    st.sampled_from(["d1", "d1", "d2"]),
    st.frozensets(st.sampled_from(REFS), max_size=2),
    st.sampled_from(PURPOSES),
)
requests = st.builds(
    lambda patients, rtype, labels, action: AccessRequest(action, rtype, patients, labels=labels),
    st.sampled_from([frozenset({"pat-1"}), frozenset({"pat-1"}), frozenset({"pat-2"}), frozenset(PATIENTS)]),
    st.sampled_from(TYPES),
    st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(LABELS), min_size=1, max_size=2)),
    st.sampled_from(["read", "search", "create", "update"]),
)


class Care:
    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in {("d1", "pat-1"), ("d2", "pat-2")}


def _step(data: st.DataObject, n: int, index: ConsentIndex, ref: Reference) -> None:
    """One event, applied to both: a grant (or an update of a consent's rules), a revocation, a
    break-glass claim or its early end, or the clock moving."""
    op = data.draw(st.sampled_from(["grant", "grant", "grant", "revoke", "claim", "end", "clock"]))
    k = data.draw(st.integers(0, 3))
    cid, patient = f"c{k}", PATIENTS[k % 2]  # a consent id belongs to one patient
    if op == "grant":
        tree = data.draw(trees)
        rules = ConsentRules(cid, patient, "patient-privacy", "active", None, tree)
        grantees = data.draw(st.frozensets(st.sampled_from(sorted(rules.grantees)), min_size=1))
        valid_from, valid_until = data.draw(windows)
        index.apply_grant(cid, patient, grantees, rules, valid_from, valid_until, (n, 0))
        start = float("-inf") if valid_from is None else valid_from
        end = float("inf") if valid_until in (None, 0) else valid_until
        for g in grantees:
            ref.state[(cid, g)] = (patient, rules, start, end)
    elif op == "revoke":
        granted = sorted({g for (c, g), v in ref.state.items() if c == cid and v is not None}) or [ANYONE]
        grantees = data.draw(st.one_of(st.frozensets(st.sampled_from(granted), min_size=1),
                                       st.frozensets(st.sampled_from((ANYONE, *REFS)), min_size=1)))
        index.apply_revoke(cid, patient, grantees, (n, 0))
        for g in grantees:
            ref.state[(cid, g)] = None
    elif op == "claim":
        practitioner = data.draw(st.sampled_from(["d1", "d2"]))
        ttl = data.draw(st.sampled_from([0.5 * HOUR, 2 * HOUR]))
        claim = index.claim_break_glass(practitioner, patient, "collapsed in the waiting room", ref.clock.at, ttl,
                                        claim_id=f"bg{n}")
        ref.claims[(practitioner, patient)] = (claim.claim_id, ref.clock.at, ref.clock.at + ttl)
    elif op == "end":
        practitioner = data.draw(st.sampled_from(["d1", "d2"]))
        index.end_break_glass(practitioner, patient, ref.clock.at)
        claim = ref.claims.get((practitioner, patient))
        if claim is not None and claim[2] > ref.clock.at:
            ref.claims[(practitioner, patient)] = (claim[0], claim[1], max(ref.clock.at, claim[1]))
    else:
        ref.clock.at = data.draw(st.sampled_from(INSTANTS))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_index_answers_like_the_reference_after_every_event(data):
    clock = Clock()
    index, ref = ConsentIndex(now=clock), Reference(clock)
    for n in range(1, data.draw(st.integers(1, 12)) + 1):
        _step(data, n, index, ref)
        for _ in range(3):
            principal, request = data.draw(principals), data.draw(requests)
            assert _answer(index.grant(principal, request)) == ref.grant(principal, request)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_decide_answers_the_same_with_the_index_as_with_the_reference(data):
    clock = Clock()
    index, ref = ConsentIndex(now=clock), Reference(clock)
    for n in range(1, data.draw(st.integers(1, 10)) + 1):
        _step(data, n, index, ref)
    for _ in range(10):
        principal, request = data.draw(principals), data.draw(requests)
        with_index = decide(principal, request, Care(), index)
        with_reference = decide(principal, request, Care(), ReferenceGrants(ref))
        assert _answer(with_index) == _answer(with_reference)


def test_label_only_consents_are_skipped_for_unlabelled_data_but_decide_labelled_data():
    clock = Clock()
    index = ConsentIndex(now=clock)
    pharmacist = Principal("acct-ph", "pharmacist", ScopeSet.parse("user/*.cruds"), None, None,
                           actor_refs=frozenset({"Organization/pharmacy-1"}))
    no_psy = ConsentRules("c1", "pat-1", "patient-privacy", "active", None,
                          Provision("deny", labels=frozenset({"PSY"})))
    index.apply_grant("c1", "pat-1", [ANYONE], no_psy, None, None, (1, 0))
    permit = ConsentRules("c2", "pat-1", "patient-privacy", "active", None,
                          Provision("permit", actors=frozenset({"Organization/pharmacy-1"})))
    index.apply_grant("c2", "pat-1", ["Organization/pharmacy-1"], permit, None, None, (2, 0))
    assert _answer(index.grant(pharmacist, AccessRequest("read", "Observation", frozenset({"pat-1"})))) == (
        True, "consent-permit", "Consent/c2")
    assert _answer(index.grant(pharmacist, AccessRequest("read", "Observation", frozenset({"pat-1"}),
                                                         labels=frozenset({"PSY"})))) == (
        False, "consent-deny", "Consent/c1")
    index.apply_revoke("c2", "pat-1", ["Organization/pharmacy-1"], (3, 0))
    assert index.grant(pharmacist, AccessRequest("read", "Observation", frozenset({"pat-1"}))) is None
    index.apply_revoke("c1", "pat-1", [ANYONE], (4, 0))
    assert index.grant(pharmacist, AccessRequest("read", "Observation", frozenset({"pat-1"}),
                                                 labels=frozenset({"PSY"}))) is None


def test_a_reader_racing_a_writer_reads_the_consents_again_once_the_writer_is_done():
    clock = Clock()
    index = ConsentIndex(now=clock)
    pharmacist = Principal("acct-ph", "pharmacist", ScopeSet.parse("user/*.cruds"), None, None,
                           actor_refs=frozenset({"Organization/pharmacy-1"}))
    permit = ConsentRules("c1", "pat-1", "patient-privacy", "active", None,
                          Provision("permit", actors=frozenset({"Organization/pharmacy-1"})))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], permit, None, None, (1, 0))
    request = AccessRequest("read", "Observation", frozenset({"pat-1"}))
    answers: list[Decision | None] = []
    reader = threading.Thread(target=lambda: answers.append(index.grant(pharmacist, request)))
    with index._lock:  # a writer in the middle of changing the lanes: it holds the lock, the epoch is odd
        index._epoch += 1
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and not answers  # the reader waits for the writer rather than guess
        index._epoch += 1
    reader.join(5)
    assert [_answer(a) for a in answers] == [(True, "consent-permit", "Consent/c1")]
