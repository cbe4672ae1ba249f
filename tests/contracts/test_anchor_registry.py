"""AnchorRegistry: checkpoints per origin, anchored only by an organization's operators.

Snapshot/revert isolation per test, exact revert reasons, and a Hypothesis state machine for the
invariant that the anchors of one origin never go backwards in tree size.
"""

from __future__ import annotations

import hashlib

import pytest

boa = pytest.importorskip("boa", reason="titanoboa (boa) is not installed: contract tests need it")

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_PRACTITIONER, source_path  # noqa: E402

ORG_A = b"A".rjust(32, b"\x00")
ORG_B = b"B".rjust(32, b"\x00")
ORIGIN = "teleledger.example/log"
_DEPLOYERS: dict[str, object] = {}


def deployer(name):
    if name not in _DEPLOYERS:
        _DEPLOYERS[name] = boa.load_partial(str(source_path(name)))
    return _DEPLOYERS[name]


def root(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def deploy_world():
    """Registry with ORG_A and ORG_B, each with an operator and a practitioner."""
    admin = boa.env.generate_address()
    participants = deployer("ParticipantRegistry").deploy([admin], 1)
    people = {}
    for org, tag in ((ORG_A, "a"), (ORG_B, "b")):
        org_admin = boa.env.generate_address()
        with boa.env.prank(admin):
            participants.approve_organization(org, org_admin)
        people[f"op_{tag}"], people[f"doc_{tag}"] = boa.env.generate_address(), boa.env.generate_address()
        with boa.env.prank(org_admin):
            participants.set_member_roles(org, people[f"op_{tag}"], ROLE_OPERATOR)
            participants.set_member_roles(org, people[f"doc_{tag}"], ROLE_PRACTITIONER)
    anchors = deployer("AnchorRegistry").deploy(participants.address)
    return participants, anchors, people


@pytest.fixture(scope="module")
def world():
    return deploy_world()


@pytest.fixture(autouse=True)
def isolated():
    with boa.env.anchor():
        yield


def test_an_operator_anchors_a_checkpoint_and_an_event_says_so(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]):
        assert anchors.anchor(ORG_A, ORIGIN, 10, root(10)) == 0
    (log,) = anchors.get_logs()
    assert type(log).__name__ == "CheckpointAnchored"
    assert (log.org, log.origin, log.tree_size, log.root_hash, log.index, log.by) == (
        ORG_A, ORIGIN, 10, root(10), 0, people["op_a"],
    )
    assert log.origin_hash == anchors.origin_hash(ORIGIN)
    latest = anchors.latest(ORIGIN)
    assert (latest.tree_size, latest.root_hash, latest.anchored_at) == (10, root(10), boa.env.timestamp)
    assert anchors.origin_owner(anchors.origin_hash(ORIGIN)) == ORG_A


def test_every_anchor_is_kept_in_order(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]):
        for size in (1, 5, 9):
            anchors.anchor(ORG_A, ORIGIN, size, root(size))
    assert anchors.anchor_count(anchors.origin_hash(ORIGIN)) == 3
    assert [anchors.checkpoint_at(ORIGIN, i).tree_size for i in range(3)] == [1, 5, 9]
    with boa.reverts("anchors: no such checkpoint"):
        anchors.checkpoint_at(ORIGIN, 3)


def test_an_unknown_origin_has_an_empty_latest_checkpoint(world):
    _, anchors, _ = world
    assert anchors.latest("nobody/log").tree_size == 0


@pytest.mark.parametrize("who", ["doc_a", "op_b", "stranger"])
def test_only_an_operator_of_the_organization_anchors_for_it(world, who):
    _, anchors, people = world
    sender = people.get(who) or boa.env.generate_address()
    with boa.env.prank(sender), boa.reverts("anchors: not an operator of the organization"):
        anchors.anchor(ORG_A, ORIGIN, 1, root(1))


def test_an_unknown_organization_cannot_anchor(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]), boa.reverts("anchors: not an operator of the organization"):
        anchors.anchor(b"Z".rjust(32, b"\x00"), ORIGIN, 1, root(1))


@pytest.mark.parametrize("size", [10, 9, 0])
def test_tree_size_must_increase(world, size):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]):
        anchors.anchor(ORG_A, ORIGIN, 10, root(10))
        with boa.reverts("anchors: tree size must increase"):
            anchors.anchor(ORG_A, ORIGIN, size, root(size))


def test_a_second_root_for_an_anchored_size_is_refused(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]):
        anchors.anchor(ORG_A, ORIGIN, 10, root(10))
        with boa.reverts("anchors: tree size must increase"):
            anchors.anchor(ORG_A, ORIGIN, 10, root(11))


def test_an_origin_belongs_to_the_organization_that_anchored_it_first(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]):
        anchors.anchor(ORG_A, ORIGIN, 10, root(10))
    with boa.env.prank(people["op_b"]), boa.reverts("anchors: origin belongs to another organization"):
        anchors.anchor(ORG_B, ORIGIN, 11, root(11))


def test_the_origin_must_not_be_empty(world):
    _, anchors, people = world
    with boa.env.prank(people["op_a"]), boa.reverts("anchors: empty origin"):
        anchors.anchor(ORG_A, "", 1, root(1))


# ---- stateful: anchors of one origin never go backwards ------------------------------------------

ORIGINS = ["a.example/log", "b.example/log"]
ACTORS = ["op_a", "op_b", "doc_a", "stranger"]


class AnchorMachine(RuleBasedStateMachine):
    @initialize()
    def deploy(self):
        self._anchor = boa.env.anchor()
        self._anchor.__enter__()
        self.participants, self.anchors, self.people = deploy_world()
        self.people["stranger"] = boa.env.generate_address()
        self.history: dict[str, list[int]] = {o: [] for o in ORIGINS}
        self.owner: dict[str, bytes] = {}

    def teardown(self):
        if hasattr(self, "_anchor"):
            self._anchor.__exit__(None, None, None)

    @rule(
        actor=st.sampled_from(ACTORS), org=st.sampled_from([ORG_A, ORG_B]),
        origin=st.sampled_from(ORIGINS), size=st.integers(0, 40),
    )
    def anchor(self, actor, org, origin, size):
        sender = self.people[actor]
        is_operator = actor == {ORG_A: "op_a", ORG_B: "op_b"}[org]
        seen = self.history[origin]
        with boa.env.prank(sender):
            if not is_operator:
                with boa.reverts("anchors: not an operator of the organization"):
                    self.anchors.anchor(org, origin, size, root(size))
            elif origin in self.owner and self.owner[origin] != org:
                with boa.reverts("anchors: origin belongs to another organization"):
                    self.anchors.anchor(org, origin, size, root(size))
            elif seen and size <= seen[-1]:
                with boa.reverts("anchors: tree size must increase"):
                    self.anchors.anchor(org, origin, size, root(size))
            else:
                assert self.anchors.anchor(org, origin, size, root(size)) == len(seen)
                seen.append(size)
                self.owner.setdefault(origin, org)

    @rule(seconds=st.integers(1, 3600))
    def time_passes(self, seconds):
        boa.env.time_travel(seconds=seconds)

    @invariant()
    def tree_sizes_never_go_backwards(self):
        if not hasattr(self, "anchors"):
            return
        for origin in ORIGINS:
            n = self.anchors.anchor_count(self.anchors.origin_hash(origin))
            sizes = [self.anchors.checkpoint_at(origin, i).tree_size for i in range(n)]
            assert sizes == self.history[origin]
            assert all(a < b for a, b in zip(sizes, sizes[1:]))
            assert self.anchors.latest(origin).tree_size == (sizes[-1] if sizes else 0)


AnchorMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_anchors_of_one_origin_never_go_backwards = AnchorMachine.TestCase
