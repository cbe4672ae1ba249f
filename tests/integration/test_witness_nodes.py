"""Two real nodes on loopback: node B's operator witnesses node A's log with ``teleledger witness``.

A stores B's cosignatures and serves its checkpoint with them; the log grows and is witnessed
again (consistency checked); a forked log — same origin, A's real signing key, other entries —
served by a stub is refused with "fork detected", as are a shrunk tree and a bad signature.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import (
    Checkpoint,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    open_checkpoint,
    parse_note,
    sign_note,
    verify_cosignature,
)

TELELEDGER = [sys.executable, "-m", "teleledger.cli"]
# ``teleledger witness`` is registered in cli.py by ``cli_witness.register``; the shim registers
# it itself when that has not happened, so this test runs either way
WITNESS = [sys.executable, "-c",
           "from teleledger.cli import app\n"
           "from teleledger.cli_witness import register\n"
           "if not any(g.name == 'witness' for g in app.registered_groups): register(app)\n"
           "app(prog_name='teleledger')", "witness"]
SECRET = "service-secret-0123456789"
WAIT = 60.0  # seconds, upper bound of every wait in this file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(home: Path, name: str, master: bytes, **extra: str) -> dict:
    return {**os.environ, "TELELEDGER_HOME": str(home), "TELELEDGER_NODE_NAME": name,
            "TELELEDGER_MASTER_KEY": base64.b64encode(master).decode(), "TELELEDGER_ENVIRONMENT": "test",
            "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_PASSWORD_HASHING": "fast",
            "TELELEDGER_DATABASE_URL": "", **extra}


def run(cmd: list[str], env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=WAIT)


def wait_until(what: str, check: Callable[[], object]) -> object:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def checkpoint_size(base: str) -> int:
    r = httpx.get(f"{base}/ledger/checkpoint", timeout=5)
    return Checkpoint.parse(parse_note(r.text).body).size if r.status_code == 200 else 0


def settled_checkpoint(base: str, at_least: int) -> int:
    """Wait until the node's checkpoint covers ``at_least`` entries and stops moving (the
    sequencer signs ≤ 1 s after new entries), so the witness and the test see the same one."""
    seen: list[int] = []

    def settled() -> int:
        seen.append(checkpoint_size(base))
        if len(seen) >= 8 and seen[-1] >= at_least and len(set(seen[-8:])) == 1:
            return seen[-1]
        return 0

    return int(wait_until(f"a settled checkpoint of size >= {at_least} at {base}", settled))


class Node:
    def __init__(self, home: Path, env: dict) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.home.parent / f"{self.home.name}.log", "ab")  # noqa: SIM115 - kept by Popen
        self.proc = subprocess.Popen([*TELELEDGER, "serve", "--port", str(self.port)], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(f"{self.base} to start",
                   lambda: self.proc.poll() is None
                   and httpx.get(f"{self.base}/fhir/metadata", timeout=2).status_code == 200
                   or (self.proc.poll() is not None and pytest.fail(f"{self.base} exited")))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def headers(self) -> dict:
        tok = httpx.post(f"{self.base}/auth/token", data={
            "grant_type": "client_credentials", "client_id": "svc", "client_secret": SECRET}, timeout=10)
        assert tok.status_code == 200, tok.text
        return {"Authorization": f"Bearer {tok.json()['access_token']}",
                "Content-Type": "application/fhir+json"}

    def create_patients(self, n: int) -> None:
        h = self.headers()
        for i in range(n):
            r = httpx.post(f"{self.base}/fhir/Patient", headers=h, timeout=30,
                           json={"resourceType": "Patient", "gender": "female", "birthDate": f"19{50 + i}-01-01"})
            assert r.status_code == 201, r.text


@pytest.fixture
def nodes(tmp_path) -> Iterator[tuple[Node, Node, dict]]:
    home_a, home_b = tmp_path / "node-a", tmp_path / "node-b"
    env_b = node_env(home_b, "node-b.test", b"b" * 32)
    # node B's operator creates the witness key and hands its verifier key to node A's operator
    r = run(WITNESS, env_b, "key")
    assert r.returncode == 0, r.stderr
    witness_vkey = r.stdout.strip()
    key_file = home_b / "witness" / "witness.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert run(WITNESS, env_b, "key").stdout.strip() == witness_vkey  # stable across runs
    a = Node(home_a, node_env(home_a, "node-a.test", b"a" * 32, TELELEDGER_WITNESS_KEYS=witness_vkey))
    b = Node(home_b, env_b)
    for node in (a, b):
        r = run(TELELEDGER, node.env, "clients", "create", "--client-id", "svc", "--secret", SECRET,
                "--scope", "system/*.cruds")
        assert r.returncode == 0, r.stderr
    try:
        a.start()
        b.start()
        yield a, b, {"env": env_b, "vkey": witness_vkey}
    finally:
        a.stop()
        b.stop()


def cosignature_of(note: str, witness: CosignatureVerifier) -> str:
    lines = [s.line for s in parse_note(note).signatures
             if (s.name, s.key_id) == (witness.name, witness.key_id)]
    assert len(lines) == 1, note
    return lines[0]


def witness_state(env: dict) -> dict:
    return json.loads((Path(env["TELELEDGER_HOME"]) / "witness" / "state.json").read_text())["logs"]


class StubLog:
    """A tiny HTTP log that serves a given checkpoint note and consistency proofs."""

    def __init__(self) -> None:
        self.note = ""
        self.proof: Callable[[int, int], list[bytes]] = lambda a, b: []
        self.posted: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                if url.path == "/ledger/checkpoint":
                    self._send(200, stub.note.encode(), "text/plain; charset=utf-8")
                elif url.path == "/ledger/proof/consistency":
                    q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
                    path = stub.proof(q["first"], q["second"])
                    body = {"consistency": [base64.b64encode(h).decode() for h in path]}
                    self._send(200, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                stub.posted.append(self.rfile.read(length).decode())
                self._send(201, b"stored\n", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubLog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def forked_log(signer: Ed25519Signer, size: int) -> tuple[str, Callable[[int, int], list[bytes]]]:
    """A log with ``signer``'s origin and key but entries of its own: a signed note and proofs."""
    store, compact = merkle.MemoryNodeStore(), merkle.CompactRange()
    store.put_nodes(compact.extend(merkle.leaf_hash(b"forked entry %d" % i) for i in range(size)))
    note = sign_note(Checkpoint(signer.name, size, compact.root()).to_body(), [signer])
    return note, lambda first, second: merkle.consistency_proof(first, second, store)


def log_signer_of(node: Node) -> Ed25519Signer:
    """Node A's real checkpoint-signing key, read (sealed) from its database while it is down."""
    from teleledger.bootstrap import _node_secret, load_master_key
    from teleledger.config import Settings
    from teleledger.storage.db import make_engine

    settings = Settings(home=node.home, master_key=node.env["TELELEDGER_MASTER_KEY"], environment="test",
                        node_name="node-a.test")
    engine = make_engine(settings.sqlalchemy_url)
    try:
        seed = _node_secret(engine, load_master_key(settings), "log-signing-key")
    finally:
        engine.dispose()
    return Ed25519Signer.from_seed("node-a.test", seed)


def test_a_witness_cosigns_a_growing_log_and_refuses_a_fork_of_it(nodes):
    a, b, wit = nodes
    env_b, witness = wit["env"], CosignatureVerifier.from_vkey(wit["vkey"])
    log_vkey = httpx.get(f"{a.base}/ledger/public-key", timeout=5).text.strip()
    log_key = Ed25519Verifier.from_vkey(log_vkey)
    assert log_key.name == "node-a.test"

    # 1. A has entries and a checkpoint; B's operator witnesses it once
    a.create_patients(3)
    size1 = settled_checkpoint(a.base, 3)
    r = run(WITNESS, env_b, "--log", a.base, "--log-key", log_vkey, "--once")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint of size {size1} (stored)" in r.stdout
    note = httpx.get(f"{a.base}/ledger/checkpoint", timeout=5).text
    checkpoint, _ = open_checkpoint(note, [log_key], origin="node-a.test")
    assert checkpoint.size == size1
    line = cosignature_of(note, witness)
    verify_cosignature(checkpoint.to_body(), line, witness, not_after=int(time.time()) + 5)
    assert witness_state(env_b)["node-a.test"]["size"] == size1
    # the same checkpoint again: nothing new to store
    r = run(WITNESS, env_b, "--log", a.base, "--log-key", log_vkey, "--once")
    assert r.returncode == 0 and "(unchanged)" in r.stdout, r.stderr

    # 2. the log grows; the witness checks consistency from size1 and cosigns the new head
    a.create_patients(4)
    size2 = settled_checkpoint(a.base, size1 + 4)
    r = run(WITNESS, env_b, "--log", a.base, "--log-key", log_vkey, "--once")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint of size {size2} (stored)" in r.stdout
    note2 = httpx.get(f"{a.base}/ledger/checkpoint", timeout=5).text
    checkpoint2, _ = open_checkpoint(note2, [log_key], origin="node-a.test")
    assert checkpoint2.size == size2 > size1
    verify_cosignature(checkpoint2.to_body(), cosignature_of(note2, witness), witness)
    state = witness_state(env_b)["node-a.test"]
    assert state == {"size": size2, "root": base64.b64encode(checkpoint2.root_hash).decode()}

    # 3. node B, which trusts no witness, and node A refuse what they should, as OperationOutcomes
    post = lambda base, size, body: httpx.post(  # noqa: E731
        f"{base}/ledger/cosignature", params={"size": size}, content=body,
        headers={"Content-Type": "text/plain"}, timeout=5)
    assert post(a.base, size2, line).status_code == 400  # size1's line does not sign size2
    assert post(a.base, size2, cosignature_of(note2, witness)).status_code == 200  # already stored
    assert post(a.base, 10**9, line).status_code == 404
    r = post(a.base, size2, "not a signature line")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = post(b.base, checkpoint_size(b.base) or 1, line)
    assert r.status_code in (403, 404) and r.json()["resourceType"] == "OperationOutcome"

    # 4. a witness A's operator never configured is turned away with a clear message
    stranger = {**env_b, "TELELEDGER_HOME": str(b.home.parent / "stranger")}
    r = run(WITNESS, stranger, "--log", a.base, "--log-key", log_vkey, "--once")
    assert r.returncode == 1 and "403" in r.stderr and "not one this log accepts" in r.stderr, r.stderr

    # 5. A stops; a fork signed with A's real key (same origin, other entries) is refused
    a.stop()
    signer = log_signer_of(a)
    assert signer.verifier().vkey == log_vkey
    with StubLog() as stub:
        stub.note, stub.proof = forked_log(signer, size2 + 5)
        r = run(WITNESS, env_b, "--log", stub.base, "--log-key", log_vkey, "--once")
        assert r.returncode == 3, r.stderr
        reason = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(reason) == 1 and reason[0].startswith("error: refused: fork detected"), r.stderr
        assert f"size {size2 + 5}" in reason[0] and f"size {size2} " in reason[0]

        stub.note, stub.proof = forked_log(signer, size2)  # same size, other root
        r = run(WITNESS, env_b, "--log", stub.base, "--log-key", log_vkey, "--once")
        assert r.returncode == 3 and "same size, different root" in r.stderr, r.stderr

        stub.note, _ = forked_log(signer, size1)  # smaller tree
        r = run(WITNESS, env_b, "--log", stub.base, "--log-key", log_vkey, "--once")
        assert r.returncode == 3 and f"shrank from {size2} to {size1}" in r.stderr, r.stderr

        impostor = Ed25519Signer.from_seed("node-a.test", b"\x07" * 32)
        stub.note, stub.proof = forked_log(impostor, size2 + 5)
        r = run(WITNESS, env_b, "--log", stub.base, "--log-key", log_vkey, "--once")
        assert r.returncode == 3 and "refused: bad signature" in r.stderr, r.stderr

        # without --once the witness keeps following and reports the fork
        stub.note, stub.proof = forked_log(signer, size2 + 9)
        proc = subprocess.Popen([*WITNESS, "--log", stub.base, "--log-key", log_vkey, "--interval", "0.2"],
                                env=env_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=20)
        assert "refused: fork detected" in out, (out, err)
        assert stub.posted == []  # no cosignature ever left the witness for any of these
    assert witness_state(env_b)["node-a.test"] == state  # refusals never move the state
