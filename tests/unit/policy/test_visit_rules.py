"""Who is in a visit's room (teleledger.policy.decide.join_visit / host_visit)."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.decide import host_visit, join_visit
from teleledger.policy.model import Principal

PATIENTS = frozenset({"pat-1"})
PRACTITIONERS = frozenset({"prac-1"})


def who(role: str, *, patient_id: str | None = None, practitioner_id: str | None = None) -> Principal:
    scopes = ScopeSet.parse("system/*.cruds") if role == "service" else ROLE_SCOPE_SETS[role]
    return Principal(f"acct-{role}", role, scopes, patient_id, practitioner_id)  # type: ignore[arg-type]


def test_the_patient_of_the_visit_may_join_but_not_host_it():
    me = who("patient", patient_id="pat-1")
    joined = join_visit(me, patients=PATIENTS, practitioners=PRACTITIONERS)
    assert (joined.allowed, joined.reason) == (True, "visit-patient")
    hosted = host_visit(me, patients=PATIENTS, practitioners=PRACTITIONERS)
    assert (hosted.allowed, hosted.reason) == (False, "only-practitioner-hosts")


def test_the_practitioner_of_the_visit_may_join_and_host_it():
    me = who("practitioner", practitioner_id="prac-1")
    assert join_visit(me, patients=PATIENTS, practitioners=PRACTITIONERS).reason == "visit-practitioner"
    hosted = host_visit(me, patients=PATIENTS, practitioners=PRACTITIONERS)
    assert (hosted.allowed, hosted.reason) == (True, "visit-host")


@pytest.mark.parametrize("principal", [
    who("patient", patient_id="pat-2"),  # another patient
    who("patient"),  # an account linked to no Patient
    who("practitioner", practitioner_id="prac-2"),  # a colleague, even one with a care relationship
    who("practitioner"),
    who("admin"),
    who("pharmacist"),
    who("service"),
    # ids that match the other role's participant must not count
    who("practitioner", practitioner_id="pat-1"),
    who("patient", patient_id="prac-1"),
], ids=["other-patient", "unlinked-patient", "other-practitioner", "unlinked-practitioner", "admin",
        "pharmacist", "service", "practitioner-with-patient-id", "patient-with-practitioner-id"])
def test_nobody_else_may_join_or_host_a_visit(principal):
    for rule in (join_visit, host_visit):
        d = rule(principal, patients=PATIENTS, practitioners=PRACTITIONERS)
        assert (d.allowed, d.reason) == (False, "not-a-visit-participant")
        assert "Only the patient and the practitioner" in d.detail


def test_a_service_with_every_system_scope_is_still_not_a_participant():
    # scopes open the FHIR API, not somebody's consultation room
    d = join_visit(who("service"), patients=PATIENTS, practitioners=PRACTITIONERS)
    assert not d.allowed


def test_an_appointment_without_participants_lets_nobody_in():
    for p in (who("patient", patient_id="pat-1"), who("practitioner", practitioner_id="prac-1")):
        assert not join_visit(p, patients=frozenset(), practitioners=frozenset()).allowed
