"""Who publishes availability, books visits and moves them through their states
(teleledger.policy.decide.manage_availability / book_visit / change_visit_status)."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.decide import book_visit, change_visit_status, manage_availability
from teleledger.policy.model import Principal

PATIENTS = frozenset({"pat-1"})
PRACTITIONERS = frozenset({"prac-1"})


def who(role: str, *, patient_id: str | None = None, practitioner_id: str | None = None) -> Principal:
    scopes = ScopeSet.parse("system/*.cruds") if role == "service" else ROLE_SCOPE_SETS[role]
    return Principal(f"acct-{role}", role, scopes, patient_id, practitioner_id)  # type: ignore[arg-type]


def test_a_practitioner_publishes_only_their_own_availability():
    me = who("practitioner", practitioner_id="prac-1")
    assert manage_availability(me, practitioner_id="prac-1").reason == "own-availability"
    other = manage_availability(me, practitioner_id="prac-2")
    assert (other.allowed, other.reason) == (False, "not-own-availability")


@pytest.mark.parametrize(("principal", "allowed", "reason"), [
    (who("admin"), True, "directory-editor"),
    (who("service"), True, "system-scope"),
    (who("patient", patient_id="prac-1"), False, "not-own-availability"),
    (who("practitioner"), False, "not-own-availability"),  # not linked to a Practitioner
    (who("pharmacist"), False, "not-own-availability"),
    (who("researcher"), False, "not-own-availability"),
])
def test_availability_is_published_by_the_directory_s_editors_and_nobody_else(principal, allowed, reason):
    d = manage_availability(principal, practitioner_id="prac-1")
    assert (d.allowed, d.reason) == (allowed, reason)


def test_a_patient_books_for_themselves_and_never_for_another_patient():
    me = who("patient", patient_id="pat-1")
    assert book_visit(me, patient_id="pat-1").reason == "own-booking"
    d = book_visit(me, patient_id="pat-2")
    assert (d.allowed, d.reason) == (False, "book-for-yourself")
    unlinked = book_visit(who("patient"), patient_id="pat-1")
    assert (unlinked.allowed, unlinked.reason) == (False, "no-linked-patient")


@pytest.mark.parametrize("role", ["practitioner", "admin", "pharmacist", "payer", "researcher"])
def test_other_roles_do_not_book_visits_for_patients(role):
    d = book_visit(who(role, practitioner_id="prac-1" if role == "practitioner" else None), patient_id="pat-1")
    assert (d.allowed, d.reason) == (False, "patients-book")


def test_a_trusted_backend_books_for_any_patient():
    assert book_visit(who("service"), patient_id="pat-9").reason == "system-scope"


@pytest.mark.parametrize("status", ["arrived", "fulfilled", "noshow", "booked", "entered-in-error"])
def test_the_patient_of_a_visit_may_cancel_it_but_not_move_it_to_another_state(status):
    me = who("patient", patient_id="pat-1")
    assert change_visit_status(me, status="cancelled", patients=PATIENTS, practitioners=PRACTITIONERS).allowed
    d = change_visit_status(me, status=status, patients=PATIENTS, practitioners=PRACTITIONERS)
    assert (d.allowed, d.reason) == (False, "patient-only-cancels")


def test_the_practitioner_of_a_visit_moves_it_through_its_states():
    me = who("practitioner", practitioner_id="prac-1")
    for status in ("arrived", "fulfilled", "noshow", "cancelled"):
        d = change_visit_status(me, status=status, patients=PATIENTS, practitioners=PRACTITIONERS)
        assert (d.allowed, d.reason) == (True, "visit-practitioner-status")


@pytest.mark.parametrize("principal", [
    who("patient", patient_id="pat-2"),
    who("patient"),
    who("practitioner", practitioner_id="prac-2"),  # a colleague, even with a care relationship
    who("practitioner"),
    who("admin"),
    who("payer"),
    who("practitioner", practitioner_id="pat-1"),  # an id of the other role's participant
], ids=["other-patient", "unlinked-patient", "colleague", "unlinked-practitioner", "admin", "payer",
        "practitioner-with-patient-id"])
def test_nobody_else_changes_a_visit(principal):
    d = change_visit_status(principal, status="cancelled", patients=PATIENTS, practitioners=PRACTITIONERS)
    assert (d.allowed, d.reason) == (False, "not-a-visit-party")
