"""ParticipantRegistry: consortium quorum governance and organization membership.

Each test runs inside ``boa.env.anchor()`` so state never leaks between tests; revert reasons
are asserted exactly; a Hypothesis state machine checks that only an organization's admins
change its membership and that on-chain roles always equal a plain-Python model.
"""

from __future__ import annotations

import pytest

boa = pytest.importorskip("boa", reason="titanoboa (boa) is not installed: contract tests need it")

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from teleledger.ledger.chain import (  # noqa: E402
    ALL_ROLES,
    ROLE_OPERATOR,
    ROLE_ORG_ADMIN,
    ROLE_PHARMACIST,
    ROLE_PRACTITIONER,
    source_path,
)

ORG_A = b"A".rjust(32, b"\x00")
ORG_B = b"B".rjust(32, b"\x00")
_DEPLOYER = None


def deployer():
    global _DEPLOYER
    if _DEPLOYER is None:
        _DEPLOYER = boa.load_partial(str(source_path("ParticipantRegistry")))
    return _DEPLOYER


def event_names(contract) -> list[str]:
    return [type(e).__name__ for e in contract.get_logs()]


@pytest.fixture(scope="module")
def admins():
    return [boa.env.generate_address(f"consortium-admin-{i}") for i in range(3)]


@pytest.fixture(scope="module")
def registry(admins):
    return deployer().deploy(admins, 2)


@pytest.fixture(autouse=True)
def isolated():
    with boa.env.anchor():
        yield


def admit(registry, admins, org, org_admin):
    for admin in admins[: registry.quorum()]:
        with boa.env.prank(admin):
            registry.approve_organization(org, org_admin)


def test_role_constants_match_python(registry):
    assert registry.ROLE_ORG_ADMIN() == ROLE_ORG_ADMIN
    assert registry.ROLE_OPERATOR() == ROLE_OPERATOR
    assert registry.ALL_ROLES() == ALL_ROLES


@pytest.mark.parametrize(
    ("admins_n", "quorum", "reason"),
    [(0, 1, "participants: no admins"), (2, 0, "participants: bad quorum"), (2, 3, "participants: bad quorum")],
)
def test_constructor_refuses_a_quorum_the_admins_cannot_meet(admins_n, quorum, reason):
    addresses = [boa.env.generate_address() for _ in range(admins_n)]
    with boa.reverts(reason):
        deployer().deploy(addresses, quorum)


def test_constructor_refuses_duplicate_admins():
    a = boa.env.generate_address()
    with boa.reverts("participants: duplicate admin"):
        deployer().deploy([a, a], 1)


def test_an_organization_is_admitted_only_when_the_quorum_approves(registry, admins):
    org_admin = boa.env.generate_address()
    with boa.env.prank(admins[0]):
        assert registry.approve_organization(ORG_A, org_admin) is False
    assert event_names(registry) == ["ProposalApproved"]
    assert not registry.is_organization(ORG_A)
    with boa.env.prank(admins[1]):
        assert registry.approve_organization(ORG_A, org_admin) is True
    assert event_names(registry) == ["ProposalApproved", "OrganizationAdded", "MemberRolesSet"]
    assert registry.is_organization(ORG_A)
    assert registry.has_role(ORG_A, org_admin, ROLE_ORG_ADMIN)
    assert registry.org_admin_count(ORG_A) == 1


def test_a_consortium_admin_approves_once(registry, admins):
    org_admin = boa.env.generate_address()
    with boa.env.prank(admins[0]):
        registry.approve_organization(ORG_A, org_admin)
        with boa.reverts("participants: already approved"):
            registry.approve_organization(ORG_A, org_admin)


def test_only_consortium_admins_approve(registry):
    with boa.env.prank(boa.env.generate_address()), boa.reverts("participants: not a consortium admin"):
        registry.approve_organization(ORG_A, boa.env.generate_address())


def test_an_organization_is_admitted_once(registry, admins):
    admit(registry, admins, ORG_A, boa.env.generate_address())
    with boa.env.prank(admins[2]), boa.reverts("participants: organization exists"):
        registry.approve_organization(ORG_A, boa.env.generate_address())


def test_approvals_for_another_first_admin_do_not_add_up(registry, admins):
    with boa.env.prank(admins[0]):
        registry.approve_organization(ORG_A, boa.env.generate_address())
    with boa.env.prank(admins[1]):
        assert registry.approve_organization(ORG_A, boa.env.generate_address()) is False
    assert not registry.is_organization(ORG_A)


def test_organization_admin_sets_member_roles(registry, admins):
    org_admin, doctor = boa.env.generate_address(), boa.env.generate_address()
    admit(registry, admins, ORG_A, org_admin)
    with boa.env.prank(org_admin):
        registry.set_member_roles(ORG_A, doctor, ROLE_PRACTITIONER | ROLE_PHARMACIST)
    (log,) = registry.get_logs()
    assert (log.org, log.account, log.roles, log.by) == (ORG_A, doctor, 3, org_admin)
    assert registry.has_role(ORG_A, doctor, ROLE_PRACTITIONER)
    assert not registry.has_role(ORG_A, doctor, ROLE_ORG_ADMIN)
    assert not registry.has_role(ORG_B, doctor, ROLE_PRACTITIONER)
    assert registry.is_member(ORG_A, doctor)
    with boa.env.prank(org_admin):
        registry.set_member_roles(ORG_A, doctor, 0)
    assert not registry.is_member(ORG_A, doctor)


def test_a_member_who_is_not_an_organization_admin_cannot_change_roles(registry, admins):
    org_admin, doctor = boa.env.generate_address(), boa.env.generate_address()
    admit(registry, admins, ORG_A, org_admin)
    with boa.env.prank(org_admin):
        registry.set_member_roles(ORG_A, doctor, ROLE_PRACTITIONER)
    with boa.env.prank(doctor), boa.reverts("participants: not an organization admin"):
        registry.set_member_roles(ORG_A, doctor, ALL_ROLES)


def test_the_admin_of_one_organization_cannot_act_for_another(registry, admins):
    admin_a, admin_b = boa.env.generate_address(), boa.env.generate_address()
    admit(registry, admins, ORG_A, admin_a)
    admit(registry, admins, ORG_B, admin_b)
    with boa.env.prank(admin_a), boa.reverts("participants: not an organization admin"):
        registry.set_member_roles(ORG_B, admin_a, ROLE_OPERATOR)


def test_member_roles_need_a_known_organization_and_known_roles(registry, admins):
    org_admin = boa.env.generate_address()
    admit(registry, admins, ORG_A, org_admin)
    with boa.env.prank(org_admin):
        with boa.reverts("participants: unknown organization"):
            registry.set_member_roles(ORG_B, org_admin, ROLE_PRACTITIONER)
        with boa.reverts("participants: unknown role"):
            registry.set_member_roles(ORG_A, boa.env.generate_address(), 64)


def test_the_last_organization_admin_cannot_step_down(registry, admins):
    org_admin, second = boa.env.generate_address(), boa.env.generate_address()
    admit(registry, admins, ORG_A, org_admin)
    with boa.env.prank(org_admin):
        with boa.reverts("participants: last organization admin"):
            registry.set_member_roles(ORG_A, org_admin, ROLE_PRACTITIONER)
        registry.set_member_roles(ORG_A, second, ROLE_ORG_ADMIN)
        registry.set_member_roles(ORG_A, org_admin, ROLE_PRACTITIONER)
    assert registry.org_admin_count(ORG_A) == 1


def test_changing_the_admin_set_voids_pending_proposals(registry, admins):
    newcomer, org_admin = boa.env.generate_address(), boa.env.generate_address()
    with boa.env.prank(admins[0]):
        registry.approve_organization(ORG_A, org_admin)
    for admin in admins[:2]:
        with boa.env.prank(admin):
            registry.approve_add_admin(newcomer)
    assert registry.is_admin(newcomer) and registry.admin_count() == 4 and registry.epoch() == 1
    with boa.env.prank(admins[1]):
        assert registry.approve_organization(ORG_A, org_admin) is False  # admins[0]'s approval was voided


def test_removing_an_admin_may_not_leave_fewer_admins_than_the_quorum(registry, admins):
    for admin in admins[:2]:
        with boa.env.prank(admin):
            registry.approve_quorum(3)
    assert registry.quorum() == 3
    with boa.env.prank(admins[0]), boa.reverts("participants: would break quorum"):
        registry.approve_remove_admin(admins[2])


def test_a_removed_admin_can_no_longer_approve(registry, admins):
    for admin in admins[:2]:
        with boa.env.prank(admin):
            registry.approve_remove_admin(admins[2])
    assert event_names(registry)[-1] == "ConsortiumAdminRemoved"
    with boa.env.prank(admins[2]), boa.reverts("participants: not a consortium admin"):
        registry.approve_organization(ORG_A, admins[2])


# ---- stateful: only an organization's admins change who acts for it -----------------------------

ORGS = [ORG_A, ORG_B]


class MembershipMachine(RuleBasedStateMachine):
    """Random actors try to change random members' roles; the chain must follow the model."""

    @initialize()
    def deploy(self):
        self._anchor = boa.env.anchor()
        self._anchor.__enter__()
        self.admins = [boa.env.generate_address() for _ in range(2)]
        self.registry = deployer().deploy(self.admins, 2)
        self.actors = [boa.env.generate_address() for _ in range(4)]
        self.model: dict[tuple[bytes, str], int] = {}
        for i, org in enumerate(ORGS):
            admit(self.registry, self.admins, org, self.actors[i])
            self.model[(org, self.actors[i])] = ROLE_ORG_ADMIN

    def teardown(self):
        if hasattr(self, "_anchor"):
            self._anchor.__exit__(None, None, None)

    def _admins_of(self, org):
        return sum(1 for (o, _), r in self.model.items() if o == org and r & ROLE_ORG_ADMIN)

    @rule(
        actor=st.integers(0, 3), org=st.sampled_from(ORGS), member=st.integers(0, 3),
        roles=st.integers(0, ALL_ROLES),
    )
    def set_roles(self, actor, org, member, roles):
        sender, account = self.actors[actor], self.actors[member]
        allowed = bool(self.model.get((org, sender), 0) & ROLE_ORG_ADMIN)
        current = self.model.get((org, account), 0)
        last_admin = current & ROLE_ORG_ADMIN and not roles & ROLE_ORG_ADMIN and self._admins_of(org) == 1
        with boa.env.prank(sender):
            if not allowed:
                with boa.reverts("participants: not an organization admin"):
                    self.registry.set_member_roles(org, account, roles)
            elif last_admin:
                with boa.reverts("participants: last organization admin"):
                    self.registry.set_member_roles(org, account, roles)
            else:
                self.registry.set_member_roles(org, account, roles)
                self.model[(org, account)] = roles

    @rule(actor=st.integers(0, 3), org=st.sampled_from(ORGS))
    def outsider_or_member_approves_organization(self, actor, org):
        with boa.env.prank(self.actors[actor]), boa.reverts("participants: not a consortium admin"):
            self.registry.approve_organization(b"\x07" * 32, self.actors[actor])

    @invariant()
    def chain_roles_equal_model(self):
        if not hasattr(self, "registry"):
            return
        for org in ORGS:
            for account in self.actors:
                assert self.registry.roles_of(org, account) == self.model.get((org, account), 0)
            assert self.registry.org_admin_count(org) == self._admins_of(org) >= 1


MembershipMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_only_organization_admins_change_membership = MembershipMachine.TestCase


def test_the_tested_code_is_the_committed_artifact(registry):
    from teleledger.ledger.chain import load_artifact

    runtime = boa.env.get_code(registry.address)
    assert "0x" + runtime.hex() == load_artifact("ParticipantRegistry")["bytecode_runtime"]
