"""Workspace pages belong to one role (policy.decide.role_workspace)."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS
from teleledger.policy.decide import role_workspace
from teleledger.policy.model import Principal


def _who(role: str, *, patient: str | None = None, practitioner: str | None = None) -> Principal:
    return Principal(f"acct-{role}", role, ROLE_SCOPE_SETS[role], patient, practitioner)  # type: ignore[arg-type]


@pytest.mark.parametrize(("who", "role"), [
    (_who("pharmacist"), "pharmacist"),
    (_who("patient", patient="p-1"), "patient"),
    (_who("practitioner", practitioner="d-1"), "practitioner"),
])
def test_a_principal_opens_the_workspace_of_its_own_role(who: Principal, role: str) -> None:
    decision = role_workspace(who, role)
    assert (decision.allowed, decision.reason) == (True, "role-workspace")


@pytest.mark.parametrize(("who", "role"), [
    (_who("practitioner", practitioner="d-1"), "pharmacist"),
    (_who("admin"), "patient"),
    (_who("pharmacist"), "practitioner"),
])
def test_another_role_is_refused_with_a_reason(who: Principal, role: str) -> None:
    decision = role_workspace(who, role)
    assert (decision.allowed, decision.reason) == (False, "not-this-role")
    assert decision.detail == f"This page is for {role}s."


def test_a_patient_account_without_a_linked_record_is_refused() -> None:
    decision = role_workspace(_who("patient"), "patient")
    assert (decision.allowed, decision.reason) == (False, "no-linked-record")
