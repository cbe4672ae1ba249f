"""The e-prescription rules of ``policy.decide``: who may dispense, cancel and share."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPES, ScopeSet
from teleledger.policy import decide as policy
from teleledger.policy.model import Principal


def who(role: str, *, subject: str = "acct-1", patient_id: str | None = None,
        practitioner_id: str | None = None) -> Principal:
    scopes = ScopeSet.parse(ROLE_SCOPES.get(role, "system/*.cruds"))
    return Principal(subject=subject, role=role, scopes=scopes, patient_id=patient_id,  # type: ignore[arg-type]
                     practitioner_id=practitioner_id)


def test_a_pharmacist_with_a_token_verified_against_the_chain_may_dispense() -> None:
    d = policy.dispense_prescription(who("pharmacist"), token_verified=True)
    assert (d.allowed, d.reason) == (True, "verified-prescription")


def test_a_pharmacist_without_a_verified_token_may_not_dispense() -> None:
    d = policy.dispense_prescription(who("pharmacist"), token_verified=False)
    assert (d.allowed, d.reason) == (False, "prescription-not-verified")


@pytest.mark.parametrize("role", ["patient", "practitioner", "payer", "researcher", "admin", "service"])
def test_no_other_role_dispenses_even_with_a_verified_token(role: str) -> None:
    d = policy.dispense_prescription(who(role), token_verified=True)
    assert (d.allowed, d.reason) == (False, "not-a-pharmacist")


def test_only_the_issuing_practitioner_account_cancels() -> None:
    assert policy.cancel_prescription(who("practitioner", subject="a", practitioner_id="p"),
                                      prescriber_account="a").allowed
    other = policy.cancel_prescription(who("practitioner", subject="b", practitioner_id="q"), prescriber_account="a")
    assert (other.allowed, other.reason) == (False, "not-own-prescription")
    assert not policy.cancel_prescription(who("admin", subject="a"), prescriber_account="a").allowed


def test_only_the_prescriptions_patient_sends_it_to_a_pharmacy() -> None:
    assert policy.share_prescription(who("patient", patient_id="p1"), patient_id="p1").allowed
    assert not policy.share_prescription(who("patient", patient_id="p2"), patient_id="p1").allowed
    assert not policy.share_prescription(who("practitioner", practitioner_id="x"), patient_id="p1").allowed
