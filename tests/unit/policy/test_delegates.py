"""Delegation rules (teleledger.policy.delegates) and what a delegation amounts to in the consent
state: the delegate's reads and searches of the patient's record, under the patient's own denies."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS
from teleledger.policy.consent import ANYONE, ConsentRules, Provision
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.decide import decide, search_filter
from teleledger.policy.delegates import (
    acts_for_someone,
    delegation_ref,
    delegation_rules,
    delegation_status,
    may_designate,
    may_manage_consents,
    related_person_of,
)
from teleledger.policy.model import AccessRequest, Consented, Principal, matches

RP = "RelatedPerson/mum"


def who(role: str = "patient", *, patient: str | None = None, refs=()) -> Principal:
    return Principal(f"acct-{role}-{patient}", role, ROLE_SCOPE_SETS[role], patient,  # type: ignore[arg-type]
                     "d1" if role == "practitioner" else None, actor_refs=frozenset(refs))


ALICE = who(patient="alice")
MUM = who(refs={RP})  # a delegate with no record of their own
MUM_ALSO_PATIENT = who(patient="lorina", refs={RP})
DOCTOR = who("practitioner")


class NoCare:
    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return False


def req(patient: str = "alice", *, action: str = "read", rtype: str = "Observation", labels=()) -> AccessRequest:
    return AccessRequest(action, rtype, frozenset({patient}), labels=frozenset(labels))  # type: ignore[arg-type]


@pytest.fixture
def index() -> ConsentIndex:
    index = ConsentIndex(now=lambda: 1_750_000_000.0)
    index.apply_grant(delegation_ref("d1"), "alice", [RP], delegation_rules("d1", "alice", "mum"), None, None, (5, 0))
    return index


def deny(label: str, *, actors=()) -> ConsentRules:
    return ConsentRules(None, "alice", "patient-privacy", "active", None,
                        Provision("deny", actors=frozenset(actors), labels=frozenset({label})))


# ---- who designates, who manages ---------------------------------------------------------------

@pytest.mark.parametrize(("principal", "patient", "reason"), [
    (ALICE, None, "own-delegates"),
    (ALICE, "alice", "own-delegates"),
    (MUM, None, "delegate-cannot-designate"),
    (MUM, "alice", "delegate-cannot-designate"),
    (MUM_ALSO_PATIENT, None, "own-delegates"),  # for their own record
    (MUM_ALSO_PATIENT, "alice", "delegate-cannot-designate"),
    (ALICE, "bob", "not-the-patient"),
    (DOCTOR, "alice", "not-the-patient"),
    (who("admin"), None, "not-the-patient"),
])
def test_only_the_patient_designates_delegates(principal, patient, reason):
    d = may_designate(principal, patient)
    assert (d.allowed, d.reason) == (reason == "own-delegates", reason)


@pytest.mark.parametrize(("principal", "active", "reason"), [
    (ALICE, False, "own-consent"),
    (MUM, True, "delegate-for-patient"),
    (MUM, False, "not-an-active-delegate"),
    (MUM_ALSO_PATIENT, True, "delegate-for-patient"),
    (who(patient="bob"), True, "not-the-patient"),  # "active" is about a delegation it does not have
    (DOCTOR, True, "not-the-patient"),
])
def test_the_patient_or_an_active_delegate_manages_the_patients_consents(principal, active, reason):
    d = may_manage_consents(principal, "alice", active_delegate=active)
    assert (d.allowed, d.reason) == (reason in ("own-consent", "delegate-for-patient"), reason)


def _rules(provision: Provision) -> ConsentRules:
    return ConsentRules("c1", "alice", "patient-privacy", "active", None, provision)


@pytest.mark.parametrize(("provision", "kept"), [
    (Provision("deny", labels=frozenset({"SEX"})), True),  # from anyone
    (Provision("deny", actors=frozenset({RP})), True),
    (Provision("deny", actors=frozenset({"RelatedPerson/dad"})), False),
    (Provision("permit", actors=frozenset({"Practitioner/d1"})), False),
    (Provision("permit", exceptions=(Provision("deny", labels=frozenset({"PSY"})),)), True),
    # a deny nested under a permit for someone else applies only to them
    (Provision("permit", actors=frozenset({"Practitioner/d1"}), exceptions=(Provision("deny"),)), False),
    (Provision("permit", actors=frozenset({RP}), exceptions=(Provision("deny", labels=frozenset({"SEX"})),)), True),
])
def test_a_consent_keeps_something_from_the_delegate_when_one_of_its_denies_can_reach_them(provision, kept):
    from teleledger.policy.delegates import keeps_from

    assert keeps_from(_rules(provision), RP) is kept


def test_a_delegate_changes_the_patients_consents_but_not_those_that_keep_something_from_them():
    from teleledger.policy.delegates import may_change_consent

    grant = _rules(Provision("permit", actors=frozenset({"Practitioner/d1"})))
    teen = _rules(Provision("deny", labels=frozenset({"SEX"})))
    assert may_change_consent(MUM, grant, active_delegate=True).reason == "delegate-for-patient"
    assert may_change_consent(MUM, teen, active_delegate=True).reason == "consent-keeps-from-delegate"
    assert may_change_consent(MUM, teen, active_delegate=False).reason == "not-an-active-delegate"
    assert may_change_consent(ALICE, teen, active_delegate=False).reason == "own-consent"


def test_a_delegation_is_active_only_when_the_request_and_the_chain_agree():
    assert [delegation_status(req, chain) for req, chain in
            ((True, None), (True, True), (True, False), (False, True), (False, False), (False, None))] == [
        "pending", "active", "pending", "pending", "removed", "pending"]


def test_who_acts_for_someone_is_read_from_the_principals_related_person():
    assert related_person_of(MUM) == "mum" and related_person_of(ALICE) is None
    assert acts_for_someone(MUM).allowed and not acts_for_someone(ALICE).allowed
    assert not acts_for_someone(who("practitioner", refs={"Organization/o1"})).allowed


# ---- what a delegation opens ---------------------------------------------------------------------

def test_a_delegation_lets_the_delegate_read_search_and_write_the_patients_record_with_a_traceable_basis(index):
    # what a patient's token allows: reads of the record, writes of Consents (and visits, messages)
    for action, rtype in (("read", "Observation"), ("search", "Observation"), ("create", "Consent"),
                          ("update", "Consent"), ("delete", "Consent")):
        d = decide(MUM, req(action=action, rtype=rtype), NoCare(), index)
        assert (d.allowed, d.reason, d.basis) == (True, "consent-permit", "Delegation/d1"), action
    assert decide(MUM, req(action="update"), NoCare(), index).reason == "scope-denied"
    assert decide(MUM, req("bob"), NoCare(), index).reason == "no-linked-patient"
    # nobody else gains from it: the RelatedPerson is the only grantee
    assert decide(who(patient="bob"), req(), NoCare(), index).reason == "not-own-compartment"
    assert index.in_force("alice") == [("Delegation/d1", RP)]


@pytest.mark.parametrize("actors", [(), (RP,)], ids=["deny to anyone", "deny to the delegate"])
def test_the_patients_deny_of_a_label_keeps_it_from_the_delegate_in_reads_and_searches(index, actors):
    index.apply_grant("c-teen", "alice", list(actors) or [ANYONE], deny("SEX", actors=actors), None, None, (6, 0))
    assert decide(MUM, req(labels={"SEX"}), NoCare(), index).reason == "consent-deny"
    assert decide(MUM, req(labels={"PSY"}), NoCare(), index).allowed
    f = search_filter(MUM, index)
    assert isinstance(f, Consented)
    assert matches(f, {"alice"}, "Observation") and not matches(f, {"alice"}, "Observation", frozenset({"SEX"}))
    assert not matches(f, {"bob"}, "Observation")


def test_a_removed_delegation_opens_nothing_and_a_replayed_grant_does_not_bring_it_back(index):
    index.apply_revoke(delegation_ref("d1"), "alice", [RP], (7, 0))
    assert decide(MUM, req(), NoCare(), index).reason == "no-linked-patient"
    index.apply_grant(delegation_ref("d1"), "alice", [RP], delegation_rules("d1", "alice", "mum"), None, None, (5, 0))
    assert decide(MUM, req(), NoCare(), index).reason == "no-linked-patient"
    index.apply_grant(delegation_ref("d1"), "alice", [RP], delegation_rules("d1", "alice", "mum"), None, None, (8, 0))
    assert decide(MUM, req(), NoCare(), index).reason == "consent-permit"
