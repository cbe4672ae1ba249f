"""Messages are their participants' (teleledger.policy.decide rule 6b, "not-a-thread-participant"):
a practitioner who cares for the patient but is neither sender nor recipient of a Communication
reads it only through a consent permit, and every search filter agrees with ``decide``."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ScopeSet
from teleledger.policy.consent import ANYONE, ConsentRules, Provision
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.decide import decide, search_filter
from teleledger.policy.model import AccessRequest, CareTeamOf, Consented, Principal, matches, outside_thread

T0 = 1_750_000_000.0


class Care:
    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = set(pairs)

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in self.pairs


def practitioner(pid: str, purpose: str = "TREAT") -> Principal:
    return Principal(f"acct-{pid}", "practitioner", ScopeSet.parse("user/*.cruds"), None, pid, purpose)


A, B = practitioner("a"), practitioner("b")
PATIENT = Principal("acct-p", "patient", ScopeSet.parse("patient/*.cruds"), "p1", None)
CARE = Care(("a", "p1"), ("b", "p1"))
THREAD = frozenset({"Patient/p1", "Practitioner/a"})
TO_B = Provision("permit", actors=frozenset({"Practitioner/b"}))


def message(action: str = "read", *, participants: frozenset[str] = THREAD, rtype: str = "Communication",
            patients: tuple[str, ...] = ("p1",)) -> AccessRequest:
    return AccessRequest(action, rtype, frozenset(patients), participants=participants)  # type: ignore[arg-type]


def rules(provision: Provision, patient: str = "p1") -> ConsentRules:
    return ConsentRules(None, patient, "patient-privacy", "active", None, provision)


@pytest.fixture
def index() -> ConsentIndex:
    return ConsentIndex(now=lambda: T0)


@pytest.mark.parametrize("action", ["read", "vread", "history", "update", "delete"])
def test_a_participant_practitioner_reads_and_writes_the_message_through_the_care_relationship(action):
    d = decide(A, message(action), CARE)
    assert (d.allowed, d.reason) == (True, "care-relationship")


@pytest.mark.parametrize("action", ["read", "vread", "history", "create", "update", "delete"])
def test_a_caring_practitioner_outside_the_thread_is_refused_with_its_own_reason(action):
    d = decide(B, message(action), CARE)
    assert (d.allowed, d.reason) == (False, "not-a-thread-participant")
    assert "sender and recipients" in d.detail


def test_the_patient_of_the_thread_reads_it():
    assert decide(PATIENT, message(), CARE).reason == "own-compartment"


def test_a_message_naming_nobody_and_other_types_keep_the_care_relationship_rule():
    assert decide(B, message(participants=frozenset()), CARE).reason == "care-relationship"
    assert decide(B, message(rtype="Observation"), CARE).reason == "care-relationship"


def test_a_practitioner_without_care_and_outside_the_thread_is_still_refused():
    d = decide(practitioner("c"), message(), CARE)
    assert (d.allowed, d.reason) == (False, "not-a-thread-participant")


def test_a_consent_permit_covering_communication_lets_a_non_participant_read(index):
    index.apply_grant("c1", "p1", ["Practitioner/b"],
                      rules(Provision("permit", actors=frozenset({"Practitioner/b"}),
                                      classes=frozenset({"Communication"}))), None, None, (1, 0))
    d = decide(B, message(), CARE, index)
    assert (d.allowed, d.reason, d.basis) == (True, "consent-permit", "Consent/c1")
    # a permit for other types does not reach messages
    other = ConsentIndex(now=lambda: T0)
    other.apply_grant("c1", "p1", ["Practitioner/b"],
                      rules(Provision("permit", actors=frozenset({"Practitioner/b"}),
                                      classes=frozenset({"Observation"}))), None, None, (1, 0))
    assert decide(B, message(), CARE, other).reason == "not-a-thread-participant"


def test_a_patients_deny_is_named_and_break_glass_does_not_open_a_thread(index):
    index.apply_grant("c1", "p1", [ANYONE], rules(Provision("deny")), None, None, (1, 0))
    assert decide(B, message(), CARE, index).reason == "consent-deny"
    glass = ConsentIndex(now=lambda: T0)
    glass.claim_break_glass("b", "p1", "unconscious patient in the ER", T0, 3600)
    er = practitioner("b", purpose="ETREAT")
    assert decide(er, message(rtype="Observation"), CARE, glass).reason == "break-glass"
    assert decide(er, message(), CARE, glass).reason == "not-a-thread-participant"


def test_a_message_of_two_patients_needs_a_permit_from_each(index):
    both = message(patients=("p1", "p2"))
    care = Care(("b", "p1"), ("b", "p2"))
    index.apply_grant("c1", "p1", ["Practitioner/b"], rules(TO_B), None, None, (1, 0))
    assert decide(B, both, care, index).reason == "not-a-thread-participant"
    index.apply_grant("c2", "p2", ["Practitioner/b"], rules(TO_B, "p2"), None, None, (1, 0))
    assert decide(B, both, care, index).reason == "consent-permit"


def test_outside_thread_names_exactly_the_messages_a_practitioner_takes_no_part_in():
    assert outside_thread("b", "Communication", THREAD)
    assert not outside_thread("a", "Communication", THREAD)
    assert not outside_thread("b", "Communication", frozenset())
    assert not outside_thread("b", "Observation", THREAD)


def test_the_care_team_search_filter_hides_the_messages_decide_refuses():
    f = search_filter(B)
    assert f == CareTeamOf("b")
    assert not matches(f, {"p1"}, "Communication", care=CARE, participants=THREAD)
    assert matches(search_filter(A), {"p1"}, "Communication", care=CARE, participants=THREAD)
    assert matches(f, {"p1"}, "Communication", care=CARE, participants=frozenset())
    assert matches(f, {"p1"}, "Observation", care=CARE, participants=THREAD)


@pytest.mark.parametrize("grant", ["permit-communication", "permit-observation", "deny", "break-glass"])
def test_the_consented_search_filter_agrees_with_decide_on_messages(index, grant):
    if grant == "break-glass":
        index.claim_break_glass("b", "p1", "unconscious patient in the ER", T0, 3600)
        who = practitioner("b", purpose="ETREAT")
    else:
        who = B
        provision = Provision("deny", actors=TO_B.actors) if grant == "deny" else Provision(
            "permit", actors=TO_B.actors, classes=frozenset({"Communication" if grant == "permit-communication" else "Observation"}))
        index.apply_grant("c1", "p1", ["Practitioner/b"], rules(provision), None, None, (1, 0))
    f = search_filter(who, index)
    assert isinstance(f, Consented) and f.practitioner_id == "b"
    for rtype, participants in (("Communication", THREAD), ("Communication", frozenset()), ("Observation", THREAD)):
        decided = decide(who, message(rtype=rtype, participants=participants, action="read"), CARE, index).allowed
        assert matches(f, {"p1"}, rtype, care=CARE, participants=participants) == decided, (rtype, participants)
