"""The in-memory consent state (teleledger.policy.consent_index) and its place in decide/search_filter."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.consent import ANYONE, ConsentRules, Period, Provision
from teleledger.policy.consent_index import ConsentIndex, may_claim_break_glass
from teleledger.policy.decide import decide, search_filter
from teleledger.policy.model import (
    DEFAULT_POLICY,
    AccessRequest,
    CareTeamOf,
    Compartments,
    Consented,
    DefaultPolicy,
    Principal,
    PublicOnly,
    matches,
)

T0 = 1_750_000_000.0  # the tests' "now", epoch seconds
HOUR = 3600.0


class Clock:
    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


class Care:
    def __init__(self, pairs=()) -> None:
        self.pairs = set(pairs)

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in self.pairs


def rules(provision: Provision, patient: str = "pat-1", *, consent_id: str | None = None,
          status: str = "active") -> ConsentRules:
    return ConsentRules(consent_id, patient, "patient-privacy", status, None, provision)


def permit(**kw) -> Provision:
    return Provision("permit", **{k: frozenset(v) if isinstance(v, set | list) else v for k, v in kw.items()})


def deny(**kw) -> Provision:
    return Provision("deny", **{k: frozenset(v) if isinstance(v, set | list) else v for k, v in kw.items()})


def principal(role: str, *, refs=(), practitioner_id=None, patient_id=None, purpose="TREAT") -> Principal:
    scopes = ScopeSet.parse("patient/*.cruds") if role == "patient" else ScopeSet.parse("user/*.cruds")
    return Principal(f"acct-{role}", role, scopes, patient_id, practitioner_id, purpose,  # type: ignore[arg-type]
                     actor_refs=frozenset(refs))


PHARMACIST = principal("pharmacist", refs={"Organization/pharmacy-1"})
DOCTOR = principal("practitioner", practitioner_id="d1", refs={"Organization/clinic-1"})
ER_DOCTOR = principal("practitioner", practitioner_id="d1", purpose="ETREAT")


def req(*patients: str, action: str = "read", rtype: str = "Observation", labels=()) -> AccessRequest:
    return AccessRequest(action, rtype, frozenset(patients), labels=frozenset(labels))  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock: Clock) -> ConsentIndex:
    return ConsentIndex(now=clock)


# -- grants and revocations -----------------------------------------------------------------


def test_a_grant_to_the_pharmacy_permits_its_pharmacist_and_names_the_consent(index):
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"})), None, None, (1, 0))
    decision = index.grant(PHARMACIST, req("pat-1"))
    assert (decision.allowed, decision.reason, decision.basis) == (True, "consent-permit", "Consent/c1")
    assert index.grant(PHARMACIST, req("pat-2")) is None
    assert index.grant(principal("pharmacist", refs={"Organization/pharmacy-2"}), req("pat-1")) is None


def test_a_deny_exception_inside_a_permit_wins_for_the_data_it_names(index):
    tree = permit(actors={"Organization/pharmacy-1"}, exceptions=(deny(labels={"PSY"}),))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], rules(tree), None, None, (1, 0))
    assert index.grant(PHARMACIST, req("pat-1", labels={"PSY"})).reason == "consent-deny-exception"
    assert index.grant(PHARMACIST, req("pat-1", labels={"PSY", "HIV"})).reason == "consent-deny-exception"
    assert index.grant(PHARMACIST, req("pat-1", labels={"HIV"})).reason == "consent-permit"


def test_a_deny_to_anyone_beats_a_permit_from_another_consent(index):
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"})), None, None, (1, 0))
    index.apply_grant("c2", "pat-1", [ANYONE], rules(deny(labels={"HIV"})), None, None, (2, 0))
    d = index.grant(PHARMACIST, req("pat-1", labels={"HIV"}))
    assert (d.allowed, d.reason, d.basis) == (False, "consent-deny", "Consent/c2")
    assert index.grant(PHARMACIST, req("pat-1")).reason == "consent-permit"


@pytest.mark.parametrize("deny_first", [True, False])
def test_among_matching_sibling_provisions_deny_wins_whatever_their_order(index, deny_first):
    siblings = (deny(labels={"PSY"}), permit(labels={"PSY"}, actors={"Organization/pharmacy-1"}))
    tree = permit(actors={"Organization/pharmacy-1"}, exceptions=siblings if deny_first else siblings[::-1])
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], rules(tree), None, None, (1, 0))
    assert index.grant(PHARMACIST, req("pat-1", labels={"PSY"})).reason == "consent-deny-exception"
    f = search_filter(PHARMACIST, index)
    assert not matches(f, {"pat-1"}, "Observation", frozenset({"PSY"}))
    assert matches(f, {"pat-1"}, "Observation")


def test_an_exception_can_single_out_one_member_of_a_permitted_organization(index):
    tree = permit(actors={"Organization/clinic-1"}, exceptions=(deny(actors={"Practitioner/d1"}),))
    index.apply_grant("c1", "pat-1", ["Organization/clinic-1"], rules(tree), None, None, (1, 0))
    colleague = principal("practitioner", practitioner_id="d2", refs={"Organization/clinic-1"})
    assert index.grant(colleague, req("pat-1")).reason == "consent-permit"
    assert index.grant(DOCTOR, req("pat-1")).reason == "consent-deny-exception"


def test_permits_on_labels_cover_only_data_carrying_nothing_but_those_labels(index):
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"}, labels={"HIV"})), None, None, (1, 0))
    assert index.grant(PHARMACIST, req("pat-1", labels={"HIV"})).allowed
    assert index.grant(PHARMACIST, req("pat-1", labels={"HIV", "PSY"})) is None
    assert index.grant(PHARMACIST, req("pat-1")) is None


def test_purposes_actions_and_types_narrow_a_permit(index):
    tree = permit(actors={"Organization/pharmacy-1"}, purposes={"TREAT"}, actions={"access"},
                  classes={"MedicationRequest"})
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], rules(tree), None, None, (1, 0))
    ok = req("pat-1", rtype="MedicationRequest")
    assert index.grant(PHARMACIST, ok).allowed
    emergency = principal("pharmacist", refs={"Organization/pharmacy-1"}, purpose="ETREAT")
    assert index.grant(emergency, ok).allowed  # ETREAT is a kind of TREAT
    assert index.grant(principal("pharmacist", refs={"Organization/pharmacy-1"}, purpose="HPAYMT"), ok) is None
    assert index.grant(PHARMACIST, req("pat-1", rtype="MedicationRequest", action="create")) is None
    assert index.grant(PHARMACIST, req("pat-1", rtype="Observation")) is None


def test_a_resource_of_several_patients_needs_a_permit_from_each(index):
    for pid in ("pat-1", "pat-2"):
        index.apply_grant(f"c-{pid}", pid, ["Organization/pharmacy-1"],
                          rules(permit(actors={"Organization/pharmacy-1"}), pid), None, None, (1, 0))
    assert index.grant(PHARMACIST, req("pat-1", "pat-2")).allowed
    assert index.grant(PHARMACIST, req("pat-1", "pat-3")) is None
    index.apply_grant("c-no", "pat-2", [ANYONE], rules(deny(), "pat-2"), None, None, (2, 0))
    assert index.grant(PHARMACIST, req("pat-1", "pat-2")).reason == "consent-deny"


def test_a_revoke_removes_the_grant_and_replays_change_nothing(index):
    r = rules(permit(actors={"Organization/pharmacy-1"}))
    assert index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (1, 0))
    assert not index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (1, 0))
    assert index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (2, 0))
    assert not index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (2, 0))
    assert index.grant(PHARMACIST, req("pat-1")) is None
    assert index.in_force("pat-1") == []


def test_an_old_grant_arriving_after_a_newer_revoke_is_ignored_and_a_newer_grant_is_not(index):
    r = rules(permit(actors={"Organization/pharmacy-1"}))
    index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (5, 0))
    assert not index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (4, 9))
    assert not index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (5, 0))  # tie: revoke wins
    assert index.grant(PHARMACIST, req("pat-1")) is None
    assert index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (6, 0))
    assert index.in_force("pat-1") == [("c1", "Organization/pharmacy-1")]


def test_revoking_one_grantee_leaves_the_others(index):
    r = rules(permit(actors={"Organization/pharmacy-1", "Organization/pharmacy-2"}))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1", "Organization/pharmacy-2"], r, None, None, (1, 0))
    index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (2, 0))
    assert index.grant(PHARMACIST, req("pat-1")) is None
    assert index.grant(principal("pharmacist", refs={"Organization/pharmacy-2"}), req("pat-1")).allowed


def test_the_grant_window_and_the_consent_period_both_bound_a_consent(index, clock):
    period = Period(datetime.fromtimestamp(T0, timezone.utc), datetime.fromtimestamp(T0 + 10 * HOUR, timezone.utc))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"}, period=period)), T0 + HOUR, 0, (1, 0))
    for at, allowed in [(T0, False), (T0 + HOUR, True), (T0 + 9.99 * HOUR, True), (T0 + 10 * HOUR, False)]:
        clock.at = at
        assert (index.grant(PHARMACIST, req("pat-1")) is not None) is allowed, at


def test_a_nested_exception_applies_only_within_its_own_period(index, clock):
    later = Period(datetime.fromtimestamp(T0 + HOUR, timezone.utc), None)
    tree = permit(actors={"Organization/pharmacy-1"}, exceptions=(deny(period=later),))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], rules(tree), None, None, (1, 0))
    assert index.grant(PHARMACIST, req("pat-1")).allowed
    clock.at = T0 + 2 * HOUR
    assert index.grant(PHARMACIST, req("pat-1")).reason == "consent-deny-exception"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ix, r: ix.apply_grant("c1", "pat-1", ["Organization/elsewhere"], r, None, None, (1, 0)),
         "does not name"),
        (lambda ix, r: ix.apply_grant("c1", "pat-2", ["Organization/pharmacy-1"], r, None, None, (1, 0)),
         "another patient"),
        (lambda ix, r: ix.apply_grant("c1", "pat-1", [], r, None, None, (1, 0)), "at least one grantee"),
        (lambda ix, r: ix.apply_grant("c1", "pat-1", ["Patient/pat-1"], r, None, None, (1, 0)), "not an actor"),
        (lambda ix, r: ix.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, T0, T0 - 1, (1, 0)),
         "ends before it starts"),
        (lambda ix, r: ix.apply_grant("", "pat-1", ["Organization/pharmacy-1"], r, None, None, (1, 0)),
         "Consent id"),
    ],
)
def test_bad_grants_get_a_clear_error(index, call, message):
    with pytest.raises(InvalidInput, match=message):
        call(index, rules(permit(actors={"Organization/pharmacy-1"})))
    assert index.in_force("pat-1") == []


def test_only_active_consents_can_be_granted(index):
    with pytest.raises(InvalidInput, match="not active"):
        index.apply_grant("c1", "pat-1", [ANYONE], rules(deny(), status="inactive"), None, None, (1, 0))


def test_a_consent_id_cannot_move_to_another_patient(index):
    index.apply_grant("c1", "pat-1", [ANYONE], rules(deny()), None, None, (1, 0))
    with pytest.raises(InvalidInput, match="another patient"):
        index.apply_grant("c1", "pat-2", [ANYONE], rules(deny(), "pat-2"), None, None, (2, 0))


# -- break-glass ----------------------------------------------------------------------------


def test_break_glass_lets_an_emergency_practitioner_in_for_its_time_limit_only(index, clock):
    claim = index.claim_break_glass("d1", "pat-1", "unconscious patient in the ER", T0, timedelta(hours=4),
                                    claim_id="bg-1")
    decision = index.grant(ER_DOCTOR, req("pat-1"))
    assert (decision.allowed, decision.reason, decision.basis) == (True, "break-glass", "break-glass/bg-1")
    assert claim.expires_at == T0 + 4 * HOUR
    assert index.grant(DOCTOR, req("pat-1")) is None  # purpose TREAT does not use the claim
    assert index.grant(ER_DOCTOR, req("pat-2")) is None
    clock.at = T0 + 4 * HOUR
    assert index.grant(ER_DOCTOR, req("pat-1")).reason == "break-glass-expired"
    assert [c.claim_id for c in index.expire_break_glass()] == ["bg-1"]
    assert index.grant(ER_DOCTOR, req("pat-1")) is None


def test_break_glass_overrides_a_patients_deny_but_a_permit_stays_the_basis(index):
    index.apply_grant("c1", "pat-1", [ANYONE], rules(deny()), None, None, (1, 0))
    index.claim_break_glass("d1", "pat-1", "cardiac arrest, no history", T0, 3600)
    assert index.grant(ER_DOCTOR, req("pat-1")).reason == "break-glass"
    index.apply_grant("c2", "pat-2", ["Practitioner/d1"], rules(permit(actors={"Practitioner/d1"}), "pat-2"),
                      None, None, (1, 0))
    index.claim_break_glass("d1", "pat-2", "cardiac arrest, no history", T0, 3600)
    assert index.grant(ER_DOCTOR, req("pat-2")).reason == "consent-permit"


def test_ending_break_glass_early_stops_it(index, clock):
    index.claim_break_glass("d1", "pat-1", "stroke alert, aphasic", T0, 3600)
    clock.at = T0 + 60
    ended = index.end_break_glass("d1", "pat-1", T0 + 60)
    assert ended is not None and ended.expires_at == T0 + 60
    assert index.grant(ER_DOCTOR, req("pat-1")).reason == "break-glass-expired"


@pytest.mark.parametrize(
    ("reason", "ttl", "message"),
    [
        ("", 3600, "written reason"),
        ("   urgent   ", 3600, "written reason"),
        ("x" * 2001, 3600, "longer than"),
        ("patient collapsed in waiting room", 0, "time limit"),
        ("patient collapsed in waiting room", timedelta(hours=25), "time limit"),
    ],
)
def test_break_glass_needs_a_written_reason_and_a_sane_time_limit(index, reason, ttl, message):
    with pytest.raises(InvalidInput, match=message):
        index.claim_break_glass("d1", "pat-1", reason, T0, ttl)
    assert index.break_glass_claims("d1") == []


def test_only_a_linked_practitioner_of_an_organization_allowing_it_may_claim_break_glass():
    assert may_claim_break_glass(DOCTOR).reason == "break-glass-claim"
    assert may_claim_break_glass(DOCTOR, DefaultPolicy(break_glass=False)).reason == "break-glass-disabled"
    assert may_claim_break_glass(PHARMACIST).reason == "break-glass-practitioners-only"
    assert may_claim_break_glass(principal("practitioner")).reason == "no-linked-practitioner"


# -- inside decide --------------------------------------------------------------------------


def test_a_patient_privacy_deny_overrides_the_care_relationship(index):
    care = Care({("d1", "pat-1")})
    assert decide(DOCTOR, req("pat-1", labels={"PSY"}), care, index).reason == "care-relationship"
    index.apply_grant("c1", "pat-1", [ANYONE], rules(deny(labels={"PSY"})), None, None, (1, 0))
    decision = decide(DOCTOR, req("pat-1", labels={"PSY"}), care, index)
    assert (decision.allowed, decision.reason, decision.basis) == (False, "consent-deny", "Consent/c1")
    assert decide(DOCTOR, req("pat-1"), care, index).reason == "care-relationship"


def test_a_practitioner_without_care_needs_a_permit(index):
    assert decide(DOCTOR, req("pat-1"), Care(), index).reason == "no-relationship"
    index.apply_grant("c1", "pat-1", ["Practitioner/d1"], rules(permit(actors={"Practitioner/d1"})), None, None, (1, 0))
    assert decide(DOCTOR, req("pat-1"), Care(), index).reason == "consent-permit"


def test_the_default_policy_decides_which_purposes_the_care_relationship_covers(index):
    care = Care({("d1", "pat-1")})
    payment = principal("practitioner", practitioner_id="d1", purpose="HPAYMT")
    assert decide(payment, req("pat-1"), care, index).reason == "purpose-needs-consent"
    billing = DefaultPolicy(care_purposes=frozenset({"TREAT", "HPAYMT"}))
    assert decide(payment, req("pat-1"), care, index, default=billing).reason == "care-relationship"
    strict = DefaultPolicy(care_relationship_access=False)
    assert decide(DOCTOR, req("pat-1"), care, index, default=strict).reason == "needs-consent"


def test_a_shared_resource_may_rest_on_care_for_one_patient_and_consent_for_the_other(index):
    care = Care({("d1", "pat-1")})
    index.apply_grant("c2", "pat-2", ["Practitioner/d1"], rules(permit(actors={"Practitioner/d1"}), "pat-2"),
                      None, None, (1, 0))
    assert decide(DOCTOR, req("pat-1", "pat-2"), care, index).reason == "consent-permit"
    assert decide(DOCTOR, req("pat-1", "pat-3"), care, index).reason == "no-relationship"


def test_break_glass_in_decide_is_flagged_and_expires(index, clock):
    index.claim_break_glass("d1", "pat-1", "unresponsive, allergies unknown", T0, 3600)
    assert decide(ER_DOCTOR, req("pat-1"), Care(), index).reason == "break-glass"
    clock.at = T0 + 3600
    decision = decide(ER_DOCTOR, req("pat-1"), Care(), index)
    assert (decision.allowed, decision.reason) == (False, "break-glass-expired")
    assert decide(ER_DOCTOR, req("pat-1"), Care({("d1", "pat-1")}), index).reason == "care-relationship"


def test_search_filters_stay_as_before_while_no_consent_concerns_the_principal(index):
    assert search_filter(DOCTOR, index) == CareTeamOf("d1")
    assert search_filter(PHARMACIST, index) == PublicOnly()
    assert search_filter(principal("patient", patient_id="pat-1"), index) == Compartments(frozenset({"pat-1"}))
    payment = principal("practitioner", practitioner_id="d1", purpose="HPAYMT")
    assert search_filter(payment, index) == PublicOnly()


def test_a_consented_search_filter_lists_permits_denies_and_break_glass(index):
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"}, exceptions=(deny(labels={"PSY"}),))),
                      None, None, (1, 0))
    f = search_filter(PHARMACIST, index)
    assert isinstance(f, Consented)
    assert matches(f, {"pat-1"}, "Observation")
    assert not matches(f, {"pat-1"}, "Observation", frozenset({"PSY"}))
    assert not matches(f, {"pat-2"}, "Observation")
    assert matches(f, set(), "Organization")
    index.claim_break_glass("d1", "pat-9", "trauma bay, no ID yet", T0, 3600)
    er = search_filter(ER_DOCTOR, index)
    assert isinstance(er, Consented) and er.break_glass == {"pat-9"} and er.care_team_of == "d1"


# -- properties -----------------------------------------------------------------------------

events = st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.integers(0, 3)), min_size=1, max_size=8)


@settings(deadline=None)
@given(events, st.randoms(use_true_random=False))
def test_a_revoke_always_wins_over_an_earlier_grant(evs, rnd):
    """Whatever order the projector delivers events in, the newest decides; a tie goes to the revoke."""
    index = ConsentIndex(now=Clock())
    r = rules(permit(actors={"Organization/pharmacy-1"}))
    shuffled = list(evs)
    rnd.shuffle(shuffled)
    for is_grant, block, log in shuffled:
        if is_grant:
            index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"], r, None, None, (block, log))
        else:
            index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (block, log))
    newest = max((block, log) for _, block, log in evs)
    revoked_last = any(not g and (b, l) == newest for g, b, l in evs)
    assert (index.grant(PHARMACIST, req("pat-1")) is None) is revoked_last


_LABELS = ["PSY", "HIV", "SEX"]
_TYPES = ["Observation", "Condition", "MedicationRequest"]
_ACTORS = ["Organization/pharmacy-1", "Practitioner/d1", "RelatedPerson/rp-1", "ResearchStudy/rs-1"]
_PURPOSES = ["TREAT", "ETREAT", "HPAYMT", "HRESCH"]

small_sets = lambda values: st.frozensets(st.sampled_from(values), max_size=2)  # noqa: E731
# half the time "any", so that generated consents actually apply to generated requests
conditions = lambda values: st.one_of(  # noqa: E731
    st.just(frozenset()), st.frozensets(st.sampled_from(values), min_size=1, max_size=2)
)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


_PERIODS = [Period(), Period(), Period(), Period(_at(T0 - HOUR), _at(T0 + 0.5 * HOUR)), Period(_at(T0 + HOUR), None),
            Period(None, _at(T0 + 2 * HOUR))]


_ACTOR_SETS, _ACTION_SETS = conditions(_ACTORS), conditions(["access", "collect"])
_PURPOSE_SETS, _TYPE_SETS, _LABEL_SETS = conditions(_PURPOSES), conditions(_TYPES), conditions(_LABELS)


@functools.cache  # one strategy object per shape: building strategies is what costs in Hypothesis
def provisions(depth: int = 2, kind: str | None = None) -> st.SearchStrategy[Provision]:
    return _provisions(depth, kind)


@st.composite
def _provisions(draw, depth: int, kind: str | None) -> Provision:
    """Provision trees of any shape (the index must cope with trees parse_consent would reject)."""
    if kind == "root":  # mostly permits, so that generated requests are often allowed
        kind = draw(st.sampled_from(["permit", "permit", "permit", "deny"]))
    kind = kind or draw(st.sampled_from(["permit", "deny"]))
    period = draw(st.sampled_from(_PERIODS))
    kids = draw(st.lists(provisions(depth - 1), max_size=2)) if depth > 0 else []
    return Provision(
        kind,  # type: ignore[arg-type]
        draw(_ACTOR_SETS),
        draw(_ACTION_SETS),
        draw(_PURPOSE_SETS),
        draw(_TYPE_SETS),
        draw(_LABEL_SETS),
        period,
        tuple(kids),
    )


requests_ = st.builds(
    lambda patients, rtype, labels, action: AccessRequest(action, rtype, patients, labels=labels),
    st.frozensets(st.sampled_from(["pat-1", "pat-2"]), min_size=1, max_size=2),
    st.sampled_from(_TYPES),
    small_sets(_LABELS),
    st.sampled_from(["read", "search", "create"]),
)
principals_ = st.builds(
    lambda role, refs, purpose: principal(role, refs=refs, purpose=purpose,
                                          practitioner_id="d1" if role == "practitioner" else None,
                                          patient_id="pat-3" if role == "patient" else None),
    st.sampled_from(["practitioner", "pharmacist", "researcher", "patient"]),
    st.frozensets(st.sampled_from(_ACTORS), min_size=1, max_size=3),
    st.sampled_from(["TREAT", "TREAT", "ETREAT", "HPAYMT", "HRESCH"]),
)
times = st.sampled_from([T0 - 2 * HOUR, T0, T0 + 0.75 * HOUR, T0 + 3 * HOUR])
root_provisions = provisions(kind="root")
row_patients = st.sampled_from([frozenset({"pat-1"}), frozenset({"pat-2"}), frozenset({"pat-1", "pat-2"})])


def _index_with(clock: Clock, consents: list[tuple[str, Provision]]) -> ConsentIndex:
    index = ConsentIndex(now=clock)
    for i, (patient, tree) in enumerate(consents):
        r = rules(tree, patient)
        index.apply_grant(f"c{i}", patient, r.grantees, r, None, None, (i, 0))
    return index


@settings(deadline=None)
@given(provisions(kind="permit"), provisions(kind="deny", depth=0), requests_, principals_, times)
def test_deny_exceptions_always_win_over_the_enclosing_permit(outer, exception, request, who, at):
    tree = Provision(outer.type, outer.actors, outer.actions, outer.purposes, outer.classes, outer.labels,
                     outer.period, (*outer.exceptions, exception))
    index = _index_with(Clock(at), [(p, tree) for p in request.patient_ids])
    from teleledger.policy.consent_index import _match, _Node  # the exception's own conditions

    node = _Node(exception, root=False)
    decision = index.grant(who, request)
    if _match(node, who.actor_refs, request.action, who.purpose, request.resource_type, request.labels, at):
        assert decision is None or not decision.allowed


@settings(deadline=None)
@given(provisions(), requests_, principals_, times)
def test_nothing_outside_a_consents_period_is_allowed_or_denied_by_it(tree, request, who, at):
    index = _index_with(Clock(at), [(p, tree) for p in request.patient_ids])
    if not tree.period.contains(datetime.fromtimestamp(at, timezone.utc)):
        assert index.grant(who, request) is None


@settings(deadline=None)
@given(st.floats(1, 24 * HOUR), st.floats(0, 48 * HOUR))
def test_break_glass_never_outlives_its_ttl(ttl, later):
    clock = Clock()
    index = ConsentIndex(now=clock)
    index.claim_break_glass("d1", "pat-1", "multi-trauma, family unreachable", T0, ttl)
    clock.at = T0 + later
    decision = index.grant(ER_DOCTOR, req("pat-1"))
    assert decision is not None
    assert decision.allowed is (later < ttl)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["pat-1", "pat-2"]), root_provisions), min_size=1, max_size=3),
    st.frozensets(st.sampled_from([("d1", "pat-1"), ("d1", "pat-2")])),
    st.booleans(),
    principals_,
    row_patients,
    st.sampled_from(_TYPES),
    small_sets(_LABELS),
    times,
)
def test_the_search_filter_lets_through_exactly_the_rows_decide_allows(
    consents, care_pairs, glass, who, patients, rtype, labels, at
):
    clock = Clock(at)
    index = _index_with(clock, consents)
    if glass:
        index.claim_break_glass("d1", "pat-2", "massive bleeding, cannot consent", T0, HOUR)
    care = Care(care_pairs)
    row = AccessRequest("search", rtype, patients, labels=labels)
    allowed = decide(who, row, care, index).allowed
    assert matches(search_filter(who, index), patients, rtype, labels, care=care) is allowed


def test_a_cached_search_view_follows_revocations_and_the_clock(index, clock):
    window = Period(_at(T0 - HOUR), _at(T0 + HOUR))
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"}, period=window)), None, None, (1, 0))
    assert matches(search_filter(PHARMACIST, index), {"pat-1"}, "Observation")
    clock.at = T0 + HOUR  # the consent ends
    assert search_filter(PHARMACIST, index) == PublicOnly()
    clock.at = T0  # and, on a clock set back, is in force again
    assert matches(search_filter(PHARMACIST, index), {"pat-1"}, "Observation")
    index.apply_revoke("c1", "pat-1", ["Organization/pharmacy-1"], (2, 0))
    assert search_filter(PHARMACIST, index) == PublicOnly()


def test_a_cached_break_glass_view_ends_with_the_claim(index, clock):
    index.claim_break_glass("d1", "pat-1", "anaphylaxis, unknown allergies", T0, HOUR)
    assert search_filter(ER_DOCTOR, index).break_glass == {"pat-1"}
    clock.at = T0 + HOUR
    assert search_filter(ER_DOCTOR, index) == CareTeamOf("d1")


steps = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.sampled_from(["pat-1", "pat-2"]), st.integers(0, 3)),
        st.tuples(st.just("revoke"), st.sampled_from(["pat-1", "pat-2"]), st.integers(0, 3)),
        st.tuples(st.just("clock"), times, st.just(0)),
        st.tuples(st.just("claim"), st.sampled_from(["pat-1", "pat-2"]), st.just(0)),
    ),
    max_size=12,
)


@settings(deadline=None)
@given(st.lists(root_provisions, min_size=4, max_size=4), steps, principals_)
def test_the_cached_search_view_always_equals_a_fresh_one(trees, script, who):
    clock = Clock()
    index = ConsentIndex(now=clock)
    for n, (op, arg, k) in enumerate(script):
        if op == "grant":
            r = rules(trees[k], arg)
            index.apply_grant(f"c{k}-{arg}", arg, r.grantees, r, None, None, (n, 0))
        elif op == "revoke":
            index.apply_revoke(f"c{k}-{arg}", arg, [ANYONE, *_ACTORS], (n, 0))
        elif op == "clock":
            clock.at = arg
        else:
            index.claim_break_glass("d1", arg, "sudden collapse in clinic", clock.at, HOUR)
        assert index.search_view(who) == index._build_view(who, clock.at)[0]


def test_matches_defines_every_search_filter_variant():
    from teleledger.policy.model import ALWAYS, NEVER, All, AllOf, AnyLabel, AnyOf, Not, Nothing, OnlyLabels, TypeIn
    from teleledger.policy.model import row_matches

    care = Care({("d1", "pat-1")})
    for f in (All(), PublicOnly(), Compartments(frozenset({"pat-9"})), CareTeamOf("d1"), Consented()):
        assert matches(f, set(), "Organization")  # rows outside every compartment
    assert not matches(Nothing(), set(), "Organization")
    assert matches(All(), {"pat-2"}, "Observation") and not matches(PublicOnly(), {"pat-2"}, "Observation")
    assert matches(Compartments(frozenset({"pat-1"})), {"pat-1", "pat-2"}, "Communication")  # any one
    assert matches(CareTeamOf("d1"), {"pat-1"}, "Observation", care=care)
    assert not matches(CareTeamOf("d1"), {"pat-1", "pat-2"}, "Observation", care=care)  # every one
    assert not matches(CareTeamOf("d1"), {"pat-1"}, "Observation")  # no care answers: nobody counts
    rule = AllOf((TypeIn(frozenset({"Observation"})), Not(AnyLabel(frozenset({"PSY"})))))
    assert row_matches(rule, "Observation", frozenset()) and not row_matches(rule, "Observation", frozenset({"PSY"}))
    assert not row_matches(rule, "Condition", frozenset())
    assert row_matches(OnlyLabels(frozenset({"HIV"})), "Observation", frozenset({"HIV"}))
    assert not row_matches(OnlyLabels(frozenset({"HIV"})), "Observation", frozenset({"HIV", "PSY"}))
    assert not row_matches(OnlyLabels(frozenset({"HIV"})), "Observation", frozenset())
    assert row_matches(ALWAYS, "X", frozenset()) and not row_matches(NEVER, "X", frozenset())
    assert row_matches(AnyOf((NEVER, ALWAYS)), "X", frozenset())


def test_the_default_policy_refuses_unknown_purposes_and_silly_time_limits():
    from teleledger.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        DefaultPolicy(care_purposes=frozenset({"GOSSIP"}))
    with pytest.raises(ConfigurationError):
        DefaultPolicy(break_glass_ttl=timedelta(days=2))
    assert DEFAULT_POLICY.break_glass_ttl == timedelta(hours=4)


def test_a_delegate_reads_what_the_patient_granted_their_related_person(index):
    delegate = principal("patient", refs={"RelatedPerson/rp-1"})
    assert decide(delegate, req("pat-1"), Care(), index).reason == "no-linked-patient"
    index.apply_grant("c1", "pat-1", ["RelatedPerson/rp-1"], rules(permit(actors={"RelatedPerson/rp-1"})),
                      None, None, (1, 0))
    assert decide(delegate, req("pat-1"), Care(), index).reason == "consent-permit"
    assert decide(principal("patient", patient_id="pat-9"), req("pat-1"), Care(), index).reason == "not-own-compartment"


def test_role_scope_sets_still_bound_what_a_consent_can_open(index):
    index.apply_grant("c1", "pat-1", ["Organization/pharmacy-1"],
                      rules(permit(actors={"Organization/pharmacy-1"})), None, None, (1, 0))
    pharmacist = Principal("acct", "pharmacist", ROLE_SCOPE_SETS["pharmacist"], None, None,
                           actor_refs=frozenset({"Organization/pharmacy-1"}))
    assert decide(pharmacist, req("pat-1", rtype="MedicationRequest"), Care(), index).reason == "consent-permit"
    assert decide(pharmacist, req("pat-1", rtype="Condition"), Care(), index).reason == "scope-denied"
