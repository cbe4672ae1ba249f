"""Who reviews break-glass claims: the privacy officer (an admin linked to the claimant's
organization), and nobody else."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.decide import review_break_glass
from teleledger.policy.model import Principal


def who(role: str, *orgs: str) -> Principal:
    scopes = ROLE_SCOPE_SETS.get(role, ScopeSet.parse("system/*.cruds"))
    return Principal(f"acct-{role}", role, scopes, "p-1" if role == "patient" else None,  # type: ignore[arg-type]
                     "dr-1" if role == "practitioner" else None,
                     actor_refs=frozenset(f"Organization/{o}" for o in orgs))


def test_an_admin_linked_to_the_claimants_organization_reviews_its_claims():
    decision = review_break_glass(who("admin", "clinic"), organization_id="clinic")
    assert (decision.allowed, decision.reason) == (True, "privacy-officer")


def test_an_admin_of_another_organization_is_refused():
    decision = review_break_glass(who("admin", "other"), organization_id="clinic")
    assert (decision.allowed, decision.reason) == (False, "not-this-organization")


def test_a_claim_made_by_nobodys_member_is_reviewed_by_no_organization():
    assert review_break_glass(who("admin", "clinic"), organization_id=None).reason == "not-this-organization"


def test_an_admin_linked_to_no_organization_is_told_so():
    decision = review_break_glass(who("admin"), organization_id="clinic")
    assert (decision.allowed, decision.reason) == (False, "no-linked-organization")
    assert "not linked to an organization" in decision.detail


@pytest.mark.parametrize("role", ["patient", "practitioner", "pharmacist", "payer", "researcher", "service"])
def test_every_other_role_is_refused_even_as_a_member_of_the_organization(role):
    decision = review_break_glass(who(role, "clinic"), organization_id="clinic")
    assert (decision.allowed, decision.reason) == (False, "not-a-privacy-officer")
