"""The decision points of clinical notes and secure messaging (teleledger.policy.decide)."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.decide import message_recipients, message_thread, note_author, own_note_draft
from teleledger.policy.model import Principal


class Care:
    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = set(pairs)

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in self.pairs


def who(role: str, *, patient_id: str | None = None, practitioner_id: str | None = None) -> Principal:
    scopes = ScopeSet.parse("system/*.cruds") if role == "service" else ROLE_SCOPE_SETS[role]
    return Principal(f"acct-{role}", role, scopes, patient_id, practitioner_id)  # type: ignore[arg-type]


DOC = who("practitioner", practitioner_id="d1")
COLLEAGUE = who("practitioner", practitioner_id="d2")
PATIENT = who("patient", patient_id="p1")
OTHER_PATIENT = who("patient", patient_id="p2")


def test_only_a_practitioner_of_the_encounter_may_author_its_note():
    d = note_author(DOC, encounter_practitioners=frozenset({"d1", "d3"}))
    assert (d.allowed, d.reason) == (True, "encounter-practitioner")


@pytest.mark.parametrize("principal", [
    COLLEAGUE, PATIENT, who("practitioner"), who("admin"), who("service"), who("pharmacist"),
], ids=["other-practitioner", "patient", "unlinked-practitioner", "admin", "service", "pharmacist"])
def test_anyone_else_may_not_author_the_note(principal):
    d = note_author(principal, encounter_practitioners=frozenset({"d1"}))
    assert (d.allowed, d.reason) == (False, "not-encounter-practitioner")
    assert "Only the practitioner of this encounter" in d.detail


def test_a_draft_is_visible_to_its_author_only():
    assert own_note_draft(DOC, author="d1").reason == "own-draft"
    for other in (COLLEAGUE, PATIENT, who("admin"), who("service"), who("practitioner")):
        d = own_note_draft(other, author="d1")
        assert (d.allowed, d.reason) == (False, "not-own-draft")


def test_thread_participants_are_matched_by_their_fhir_user():
    parts = frozenset({"Patient/p1", "Practitioner/d1"})
    assert message_thread(PATIENT, participants=parts).reason == "thread-participant"
    assert message_thread(DOC, participants=parts).allowed
    for outsider in (OTHER_PATIENT, COLLEAGUE, who("admin"), who("service"), who("practitioner")):
        d = message_thread(outsider, participants=parts)
        assert (d.allowed, d.reason) == (False, "not-thread-participant")


def test_a_patient_messages_only_practitioners_who_care_for_them():
    care = Care(("d1", "p1"), ("d2", "p2"))
    ok = message_recipients(PATIENT, patient_id="p1", practitioner_ids=frozenset({"d1"}), care=care)
    assert (ok.allowed, ok.reason) == (True, "message-care-team")
    for to in ({"d2"}, {"d1", "d2"}, set()):
        d = message_recipients(PATIENT, patient_id="p1", practitioner_ids=frozenset(to), care=care)
        assert (d.allowed, d.reason) == (False, "message-no-relationship")


def test_a_message_must_come_from_the_patient_or_one_of_the_practitioners():
    care = Care(("d1", "p1"), ("d2", "p1"))
    assert message_recipients(DOC, patient_id="p1", practitioner_ids=frozenset({"d1"}), care=care).allowed
    assert not message_recipients(COLLEAGUE, patient_id="p2", practitioner_ids=frozenset({"d2"}), care=care).allowed
    cases = [
        (OTHER_PATIENT, frozenset({"d1"})),  # writing about someone else's record
        (COLLEAGUE, frozenset({"d1"})),  # a practitioner not on the thread
        (who("admin"), frozenset({"d1"})), (who("service"), frozenset({"d1"})), (who("patient"), frozenset({"d1"})),
    ]
    for principal, practitioners in cases:
        d = message_recipients(principal, patient_id="p1", practitioner_ids=practitioners, care=care)
        assert (d.allowed, d.reason) == (False, "message-not-a-party"), principal
