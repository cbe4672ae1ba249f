"""The witness core: cosign growth, refuse bad signatures, shrinking trees and forks; remember
what it verified across restarts. No network: an in-memory log hands out notes and proofs, and
``httpx.MockTransport`` stands in for a node when the HTTP follower is tested."""

from __future__ import annotations

import base64
import json
import os
import stat

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import (
    Checkpoint,
    CosignatureVerifier,
    Ed25519Signer,
    append_signature_lines,
    parse_note,
    sign_note,
    verify_cosignature,
)
from teleledger.ledger.log.witness import (
    BadCheckpoint,
    ForkDetected,
    LogShrank,
    TreeHead,
    Witness,
    WitnessRefusal,
    WitnessState,
    WitnessStateError,
)
from teleledger.ledger.log.witness_client import LogUnreachable, follow

ORIGIN = "log.example.test"
LOG_KEY = Ed25519Signer.from_seed(ORIGIN, b"\x11" * 32)
WITNESS_KEY = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)
WITNESS_NAME = "witness.example.test"
NOW = 1_750_000_000


class FakeLog:
    """A Merkle log in memory that signs checkpoints and serves consistency proofs."""

    def __init__(self, signer: Ed25519Signer = LOG_KEY, *, tag: bytes = b"") -> None:
        self.signer = signer
        self.tag = tag
        self.store = merkle.MemoryNodeStore()
        self.compact = merkle.CompactRange()
        self.proofs_asked: list[tuple[int, int]] = []

    def grow(self, n: int) -> FakeLog:
        start = self.compact.size
        leaves = [merkle.leaf_hash(self.tag + b"entry %d" % i) for i in range(start, start + n)]
        self.store.put_nodes(self.compact.extend(leaves))
        return self

    @property
    def root(self) -> bytes:
        return self.compact.root()

    def body(self) -> str:
        return Checkpoint(self.signer.name, self.compact.size, self.root).to_body()

    def note(self) -> str:
        return sign_note(self.body(), [self.signer])

    def proof(self, first: int, second: int) -> list[bytes]:
        self.proofs_asked.append((first, second))
        return merkle.consistency_proof(first, second, self.store)


@pytest.fixture
def witness(tmp_path) -> Witness:
    return Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, tmp_path / "state.json",
                   lambda: NOW)


def cosigner() -> CosignatureVerifier:
    return CosignatureVerifier(WITNESS_NAME, WITNESS_KEY.public_key())


def test_first_checkpoint_is_cosigned_and_the_cosignature_verifies(witness):
    log = FakeLog().grow(5)
    line = witness.observe(log.note(), log.proof)
    assert verify_cosignature(log.body(), line, cosigner(), not_after=NOW) == NOW
    assert log.proofs_asked == []  # nothing to be consistent with yet
    assert witness.state.last(ORIGIN) == TreeHead(5, log.root)


def test_the_cosignature_line_appends_to_the_log_note(witness):
    log = FakeLog().grow(3)
    cosigned = append_signature_lines(log.note(), [witness.observe(log.note(), log.proof)])
    assert [s.name for s in parse_note(cosigned).signatures] == [ORIGIN, WITNESS_NAME]


def test_witness_vkey_is_a_cosignature_verifier_key_a_node_can_configure(witness):
    assert CosignatureVerifier.from_vkey(witness.vkey) == cosigner()
    assert witness.vkey.startswith(f"{WITNESS_NAME}+")


def test_growth_is_cosigned_after_a_consistency_proof_from_the_last_size(witness):
    log = FakeLog().grow(5)
    witness.observe(log.note(), log.proof)
    for add in (1, 2, 8, 100):
        log.grow(add)
        line = witness.observe(log.note(), log.proof)
        verify_cosignature(log.body(), line, cosigner())
    assert log.proofs_asked == [(5, 6), (6, 8), (8, 16), (16, 116)]
    assert witness.state.last(ORIGIN) == TreeHead(116, log.root)


def test_the_same_checkpoint_again_is_cosigned_without_a_proof(witness):
    log = FakeLog().grow(7)
    witness.observe(log.note(), log.proof)
    line = witness.observe(log.note(), log.proof)
    verify_cosignature(log.body(), line, cosigner())
    assert log.proofs_asked == []


def test_the_cosignature_timestamp_comes_from_the_injected_clock(tmp_path):
    log = FakeLog().grow(2)
    w = Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, tmp_path / "s.json",
                lambda: 1234.9)
    assert verify_cosignature(log.body(), w.observe(log.note(), log.proof), cosigner()) == 1234


def test_a_checkpoint_signed_by_another_key_is_refused_as_a_bad_signature(witness):
    impostor = FakeLog(Ed25519Signer.from_seed(ORIGIN, b"\x33" * 32)).grow(4)
    with pytest.raises(BadCheckpoint, match=r"^bad signature"):
        witness.observe(impostor.note(), impostor.proof)
    assert witness.state.last(ORIGIN) is None


def test_a_tampered_checkpoint_is_refused_as_a_bad_signature(witness):
    log = FakeLog().grow(4)
    note = log.note()
    tampered = note.replace("\n4\n", "\n5\n", 1)
    assert tampered != note
    with pytest.raises(BadCheckpoint, match=r"^bad signature"):
        witness.observe(tampered, log.proof)


def test_a_corrupted_signature_is_refused_as_a_bad_signature(witness):
    log = FakeLog().grow(4)
    parsed = parse_note(log.note())
    sig = parsed.signatures[0]
    bad = bytearray(sig.signature)
    bad[0] ^= 1
    forged = parsed.body + "\n" + type(sig)(sig.name, sig.key_id, bytes(bad)).line
    with pytest.raises(BadCheckpoint, match=r"^bad signature.*invalid signature"):
        witness.observe(forged, log.proof)


def test_a_checkpoint_for_another_origin_is_refused(tmp_path):
    log = FakeLog().grow(4)
    w = Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, tmp_path / "s.json",
                lambda: NOW, origin="other.example.test")
    with pytest.raises(BadCheckpoint, match="wrong log.*other.example.test"):
        w.observe(log.note(), log.proof)


def test_garbage_is_refused_as_a_malformed_checkpoint(witness):
    with pytest.raises(BadCheckpoint, match="^malformed checkpoint"):
        witness.observe("not a note\n", lambda a, b: [])


def test_a_smaller_tree_is_refused_and_the_state_stays(witness):
    log = FakeLog().grow(5)
    old_note = log.note()
    log.grow(3)
    witness.observe(log.note(), log.proof)
    with pytest.raises(LogShrank, match="shrank from 8 to 5") as refused:
        witness.observe(old_note, log.proof)
    assert (refused.value.seen, refused.value.found) == (8, 5)
    assert witness.state.last(ORIGIN) == TreeHead(8, log.root)


def test_a_forked_root_is_refused_naming_both_sizes_and_roots(witness):
    honest = FakeLog().grow(5)
    witness.observe(honest.note(), honest.proof)
    # same key, same origin, other history: what a compromised or equivocating log serves
    fork = FakeLog(tag=b"forked ").grow(9)
    with pytest.raises(ForkDetected) as refused:
        witness.observe(fork.note(), fork.proof)
    message = refused.value.message
    assert message.startswith("fork detected:")
    assert "size 9" in message and "size 5" in message
    assert base64.b64encode(fork.root).decode() in message
    assert base64.b64encode(honest.root).decode() in message
    assert witness.state.last(ORIGIN) == TreeHead(5, honest.root)
    # and the honest log's growth is still cosigned afterwards
    honest.grow(4)
    witness.observe(honest.note(), honest.proof)


def test_a_fork_that_shares_a_prefix_is_still_refused(witness):
    honest = FakeLog().grow(6)
    witness.observe(honest.note(), honest.proof)
    fork = FakeLog().grow(4)  # the same first four leaves, then other ones
    fork.tag = b"forked "
    fork.grow(6)
    with pytest.raises(ForkDetected, match="fork detected"):
        witness.observe(fork.note(), fork.proof)


def test_same_size_with_a_different_root_is_a_fork(witness):
    honest = FakeLog().grow(5)
    witness.observe(honest.note(), honest.proof)
    fork = FakeLog(tag=b"forked ").grow(5)
    with pytest.raises(ForkDetected, match="same size, different root"):
        witness.observe(fork.note(), fork.proof)


def test_a_proof_of_the_wrong_length_is_refused_as_a_fork(witness):
    log = FakeLog().grow(5)
    witness.observe(log.note(), log.proof)
    log.grow(3)
    with pytest.raises(ForkDetected, match="consistency proof has 1 hashes"):
        witness.observe(log.note(), lambda a, b: log.proof(a, b)[:1])


def test_refusals_are_teleledger_errors(witness):
    with pytest.raises(WitnessRefusal) as refused:
        witness.observe("garbage\n", lambda a, b: [])
    assert isinstance(refused.value, TeleledgerError)


def test_state_persists_across_witness_restarts(tmp_path):
    path = tmp_path / "state.json"
    log = FakeLog().grow(10)
    Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, path, lambda: NOW).observe(
        log.note(), log.proof)
    restarted = Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, path, lambda: NOW)
    fork = FakeLog(tag=b"x").grow(12)
    with pytest.raises(ForkDetected):
        restarted.observe(fork.note(), fork.proof)
    data = json.loads(path.read_text())
    assert data == {"version": 1, "logs": {ORIGIN: {"size": 10,
                                                    "root": base64.b64encode(log.root).decode()}}}


def test_state_keeps_one_tree_head_per_origin(tmp_path):
    state = WitnessState(tmp_path / "state.json")
    state.record("a.test", TreeHead(1, b"\x01" * 32))
    state.record("b.test", TreeHead(2, b"\x02" * 32))
    state.record("a.test", TreeHead(3, b"\x03" * 32))
    assert state.last("a.test") == TreeHead(3, b"\x03" * 32)
    assert state.last("b.test") == TreeHead(2, b"\x02" * 32)
    assert state.last("c.test") is None
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_state_file_is_replaced_not_rewritten_in_place(tmp_path):
    path = tmp_path / "state.json"
    state = WitnessState(path)
    state.record("a.test", TreeHead(1, b"\x01" * 32))
    before = os.stat(path).st_ino
    state.record("a.test", TreeHead(2, b"\x01" * 32))
    assert os.stat(path).st_ino != before
    assert not stat.S_IMODE(os.stat(path).st_mode) & 0o077  # mkstemp creates it 0600


@pytest.mark.parametrize("content", [
    b"{not json", b'{"version": 2, "logs": {}}', b'{"version": 1, "logs": {"a": {"size": -1, "root": ""}}}',
    b'{"version": 1, "logs": {"a": {"size": 1, "root": "AAAA"}}}', b"[]",
])
def test_an_unreadable_state_file_is_an_error_never_a_fresh_start(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    log = FakeLog().grow(3)
    w = Witness(WITNESS_NAME, WITNESS_KEY, LOG_KEY.verifier().vkey, path, lambda: NOW)
    with pytest.raises(WitnessStateError, match="refusing to forget"):
        w.observe(log.note(), log.proof)
    assert path.read_bytes() == content


# --------------------------------------------------------------------------- the HTTP follower
# httpx.MockTransport stands in for the node: no socket, no sleeping.


def node_transport(log: FakeLog, *, post_status: int = 201, fail_first: int = 0,
                   calls: list[str] | None = None) -> httpx.MockTransport:
    calls = [] if calls is None else calls
    stored: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if len(calls) <= fail_first:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/ledger/checkpoint":
            return httpx.Response(200, text=append_signature_lines(log.note(), stored))
        if request.url.path == "/ledger/proof/consistency":
            q = request.url.params
            path = log.proof(int(q["first"]), int(q["second"]))
            return httpx.Response(200, json={"consistency": [base64.b64encode(h).decode() for h in path]})
        if request.url.path == "/ledger/cosignature":
            assert request.url.params["size"] == str(log.compact.size)
            if post_status == 403:
                return httpx.Response(403, json={"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "forbidden", "diagnostics": "witness w is not one this log accepts"}]})
            stored.append(request.content.decode())
            return httpx.Response(post_status, text="cosignature stored\n")
        return httpx.Response(404)

    return httpx.MockTransport(handler)


def test_follow_once_posts_the_cosignature_and_then_sees_it_on_the_note(witness):
    log = FakeLog().grow(6)
    client = httpx.Client(transport=node_transport(log))
    first = follow("http://node.test/", witness, once=True, client=client)
    assert (first.size, first.outcome) == (6, "stored")
    verify_cosignature(log.body(), first.line, cosigner())
    assert follow("http://node.test", witness, once=True, client=client).outcome == "unchanged"


def test_follow_retries_a_bounded_number_of_times_then_says_where_it_failed(witness):
    calls: list[str] = []
    slept: list[float] = []
    client = httpx.Client(transport=node_transport(FakeLog().grow(1), fail_first=99, calls=calls))
    with pytest.raises(LogUnreachable, match=r"GET http://node.test/ledger/checkpoint failed after 4 attempts"):
        follow("http://node.test", witness, once=True, client=client, retries=3, sleep=slept.append)
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]


def test_follow_recovers_from_a_transient_error(witness):
    client = httpx.Client(transport=node_transport(FakeLog().grow(2), fail_first=1))
    assert follow("http://node.test", witness, once=True, client=client, sleep=lambda s: None).size == 2


def test_a_log_that_does_not_know_the_witness_is_reported_with_its_reason(witness):
    calls: list[str] = []
    client = httpx.Client(transport=node_transport(FakeLog().grow(2), post_status=403, calls=calls))
    with pytest.raises(LogUnreachable, match="answered 403: witness w is not one this log accepts"):
        follow("http://node.test", witness, once=True, client=client, sleep=lambda s: None)
    assert calls.count("POST /ledger/cosignature") == 1  # a 4xx is not retried


def test_following_reports_a_fork_once_and_keeps_going_without_cosigning(witness):
    honest = FakeLog().grow(5)
    witness.observe(honest.note(), honest.proof)
    fork = FakeLog(tag=b"forked ").grow(8)
    calls: list[str] = []
    reports: list[str] = []
    client = httpx.Client(transport=node_transport(fork, calls=calls))
    follow("http://node.test", witness, rounds=3, client=client, report=reports.append, sleep=lambda s: None)
    assert len(reports) == 1 and reports[0].startswith("refused: fork detected")
    assert calls.count("GET /ledger/checkpoint") == 3
    assert "POST /ledger/cosignature" not in calls
