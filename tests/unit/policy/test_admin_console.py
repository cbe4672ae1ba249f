"""The admin console rule: only accounts with the admin role open the node's admin pages."""

from __future__ import annotations

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.decide import admin_console
from teleledger.policy.model import Principal


def test_an_admin_may_open_the_admin_console():
    decision = admin_console(Principal("acct-admin", "admin", ROLE_SCOPE_SETS["admin"], None, None))
    assert (decision.allowed, decision.reason) == (True, "admin-console")


@pytest.mark.parametrize("role", ["patient", "practitioner", "pharmacist", "payer", "researcher", "service"])
def test_every_other_role_is_refused_the_admin_console_with_a_reason(role):
    scopes = ROLE_SCOPE_SETS.get(role, ScopeSet.parse("system/*.cruds"))
    decision = admin_console(Principal(f"acct-{role}", role, scopes, "p-1" if role == "patient" else None,  # type: ignore[arg-type]
                                       "dr-1" if role == "practitioner" else None))
    assert (decision.allowed, decision.reason) == (False, "not-an-admin")
    assert "Only administrators" in decision.detail


def test_an_unknown_role_is_refused_the_admin_console():
    assert not admin_console(Principal("x", "root", ScopeSet.parse("user/*.cruds"), None, None)).allowed  # type: ignore[arg-type]
