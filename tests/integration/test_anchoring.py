"""Checkpoint anchoring end to end: the log's checkpoints reach AnchorRegistry on an interval,
``teleledger verify`` checks them against the log (and catches what only the chain can), and a
kill -9 of a real server never loses an acknowledged anchor nor sends one twice."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, delete, select, update
from typer.testing import CliRunner

from teleledger import cli_verify
from teleledger.bootstrap import build
from teleledger.demo import system_principal
from teleledger.ledger.chain.anchoring import Anchorer, anchored_checkpoints, chain_anchors
from teleledger.ledger.chain.deploy import addresses_path, load_addresses
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.outbox import entry
from teleledger.ledger.chain.storage import chain_outbox, decode_args
from teleledger.ledger.log import entry as log_entry
from teleledger.ledger.log.storage import log_checkpoints, log_cosignatures, log_leaves, log_nodes, log_state
from teleledger.records.verify import verify_node
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.helpers import patient
from tests.integration.test_chain_support import AUTHORITY, chain_node, org_of  # noqa: F401  (fixture)


def grow(node: Any, n: int = 2) -> int:
    """Create ``n`` patients and sign a checkpoint; the new tree size."""
    for i in range(n):
        node.records.create(system_principal(), patient(family=f"Anchor{i}"))
    checkpoint = node.log.flush()
    assert checkpoint is not None
    return checkpoint.size


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the anchorer


def test_a_checkpoint_is_anchored_once_per_interval_and_only_when_the_log_grew(chain_node) -> None:
    clock = Clock()
    anchorer = Anchorer(chain_node.engine, chain_node.log.origin, org_of(chain_node), interval=60, clock=clock)
    assert anchorer.tick() is None  # no checkpoint yet
    size = grow(chain_node)
    clock.now += 60
    assert anchorer.tick() == f"anchor:{size}"
    bigger = grow(chain_node)
    clock.now += 30
    assert anchorer.tick() is None  # grew, but the interval has not passed
    clock.now += 30
    assert anchorer.tick() == f"anchor:{bigger}"
    clock.now += 60
    assert anchorer.tick() is None  # interval passed, log did not grow
    row = entry(chain_node.engine, f"anchor:{bigger}")
    assert (row.contract, row.fn, row.sender, row.status) == ("AnchorRegistry", "anchor", AUTHORITY, "pending")
    assert row.args == [org_of(chain_node), chain_node.log.origin, bigger, row.args[3]]
    with chain_node.engine.connect() as conn:
        root = conn.execute(select(log_checkpoints.c.root_hash).where(log_checkpoints.c.size == bigger)).scalar_one()
    assert row.args[3] == bytes(root)


def test_anchors_reach_the_chain_in_the_background_and_verify_checks_them(chain_node) -> None:
    rt = chain_node.chain
    rt.anchorer.interval = 0.1
    rt.start()
    try:
        first = grow(chain_node)
        second = grow(chain_node)
        deadline = time.monotonic() + 20
        while True:
            with chain_node.engine.connect() as conn:
                indexed = anchored_checkpoints(conn, chain_node.log.origin)
            if indexed and indexed[-1].tree_size == second:
                break
            assert time.monotonic() < deadline, f"not anchored: {indexed}, status {rt.status()}"
            time.sleep(0.05)
    finally:
        rt.stop()
    assert first <= second and all(a.tree_size <= second for a in indexed)
    on_chain = chain_anchors(rt.client, rt.addresses, chain_node.log.origin)
    assert [(a.tree_size, a.root_hash) for a in on_chain] == [(a.tree_size, a.root_hash) for a in indexed]
    status = rt.status()
    assert status["last_anchor"]["tree_size"] == second and status["outbox"]["failed"] == 0
    report = verify_node(chain_node, anchors=on_chain)
    assert report.findings == [] and report.anchors == len(on_chain) >= 1


def _anchor_everything(node: Any) -> list[Any]:
    """Anchor the latest checkpoint and wait for it; the chain's anchors."""
    rt = node.chain
    key = rt.anchorer.anchor_latest()
    assert key is not None
    rt.worker.drain_once()
    assert entry(node.engine, key).status == "done"
    return chain_anchors(rt.client, rt.addresses, node.log.origin)


def test_verify_fails_when_an_anchored_checkpoint_row_is_removed(chain_node) -> None:
    grow(chain_node)
    anchored = grow(chain_node)
    anchors = _anchor_everything(chain_node)
    grow(chain_node)  # the log moves on after the anchor
    with chain_node.engine.begin() as conn:
        conn.execute(delete(log_cosignatures).where(log_cosignatures.c.size == anchored))
        conn.execute(delete(log_checkpoints).where(log_checkpoints.c.size == anchored))
    assert verify_node(chain_node).findings == []  # the database alone looks fine ...
    report = verify_node(chain_node, anchors=anchors)  # ... the chain remembers
    assert [(f.kind, f.table, f.key) for f in report.findings] == [
        ("anchor-unmatched", "AnchorRegistry", f"#0 size={anchored}")]


def test_verify_fails_when_a_checkpoint_root_no_longer_matches_its_anchor(chain_node) -> None:
    anchored = grow(chain_node)
    anchors = _anchor_everything(chain_node)
    other = grow(chain_node)
    with chain_node.engine.begin() as conn:  # swap in another signed note: valid signature, other root
        note = conn.execute(select(log_checkpoints.c.note).where(log_checkpoints.c.size == other)).scalar_one()
        forged = note.replace(f"\n{other}\n", f"\n{anchored}\n", 1)
        conn.execute(update(log_checkpoints).where(log_checkpoints.c.size == anchored).values(note=forged))
    kinds = {(f.kind, f.table) for f in verify_node(chain_node, anchors=anchors).findings}
    assert ("anchor-unmatched", "AnchorRegistry") in kinds  # a note edited this way no longer verifies
    assert ("checkpoint-signature", "log_checkpoints") in kinds


def test_a_log_rolled_back_consistently_is_caught_only_by_its_anchor(chain_node) -> None:
    """An insider deletes a patient and every trace of it — versions, pointer, access records,
    leaves, tree nodes, checkpoint, tree head — so that what remains is a perfectly consistent,
    properly signed shorter log. Only the anchor on chain still knows the longer tree."""
    kept = grow(chain_node)
    anchored = grow(chain_node, 1)
    anchors = _anchor_everything(chain_node)
    engine = chain_node.engine
    with engine.begin() as conn:
        leaves = conn.execute(select(log_leaves.c.leaf, log_leaves.c.leaf_hash)
                              .where(log_leaves.c.idx >= kept)).all()
        for leaf, digest in leaves:
            decoded = log_entry.decode(bytes(leaf))
            if isinstance(decoded, log_entry.AccessEntry):
                conn.execute(delete(t.access_events).where(t.access_events.c.leaf_hash == bytes(digest)))
                continue
            res_type, res_id = decoded.reference.split("/")[:2]
            for table in (t.resource_versions, t.resources):
                conn.execute(delete(table).where(table.c.res_type == res_type, table.c.res_id == res_id))
        conn.execute(delete(log_leaves).where(log_leaves.c.idx >= kept))
        for level, idx in conn.execute(select(log_nodes.c.level, log_nodes.c.idx)).all():
            if (int(idx) + 1) << int(level) > kept:
                conn.execute(delete(log_nodes).where(log_nodes.c.level == level, log_nodes.c.idx == idx))
        conn.execute(delete(log_cosignatures).where(log_cosignatures.c.size > kept))
        conn.execute(delete(log_checkpoints).where(log_checkpoints.c.size > kept))
        root = conn.execute(select(log_checkpoints.c.root_hash).where(log_checkpoints.c.size == kept)).scalar_one()
        conn.execute(update(log_state).values(size=kept, root_hash=root))
    assert verify_node(chain_node).findings == []
    findings = verify_node(chain_node, anchors=anchors).findings
    assert {(f.kind, f.key) for f in findings} == {("anchor-unmatched", f"#0 size={anchored}"),
                                                   ("anchor-inconsistent", f"#0 size={anchored}")}
    assert "leaves were removed" in next(f.detail for f in findings if f.kind == "anchor-inconsistent")


# --------------------------------------------------------------------------- the command


def _cli_env(settings: Any) -> dict[str, str]:
    return {"TELELEDGER_HOME": str(settings.home), "TELELEDGER_DATABASE_URL": settings.database_url,
            "TELELEDGER_MASTER_KEY": settings.master_key, "TELELEDGER_ENVIRONMENT": "test",
            "TELELEDGER_DEMO_DATA": "false", "COLUMNS": "250"}


def _verify_command(settings: Any) -> Any:
    import typer

    app = typer.Typer()
    app.callback()(lambda: None)
    cli_verify.register(app)
    return CliRunner().invoke(app, ["verify"], env=_cli_env(settings))


def test_the_verify_command_checks_anchors_and_exits_1_after_tampering(tmp_path, backend) -> None:
    settings = make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True)
    node = build(settings)
    try:
        grow(node)
        anchored = grow(node)
        _anchor_everything(node)
        grow(node)
    finally:
        node.close()
    result = _verify_command(settings)
    assert result.exit_code == 0, result.output
    assert "1 chain anchors" in result.stdout and "OK" in result.stdout

    engine = create_engine(settings.database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(delete(log_cosignatures).where(log_cosignatures.c.size == anchored))
        conn.execute(delete(log_checkpoints).where(log_checkpoints.c.size == anchored))
    engine.dispose()
    result = _verify_command(settings)
    assert result.exit_code == 1, result.output
    assert "anchor-unmatched" in result.stdout and f"size={anchored}" in result.stdout
    assert "Traceback" not in result.output


def test_the_verify_command_exits_2_with_what_to_do_when_the_anchors_cannot_be_read(tmp_path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'v.db'}", chain_enabled=True)
    build(settings).close()
    os.remove(Path(settings.home) / "chain" / "chain.sqlite3")
    result = _verify_command(settings)
    assert result.exit_code == 2, result.output
    assert "embedded chain" in result.output and "TELELEDGER_CHAIN_ENABLED=false" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- kill -9


TELELEDGER = [sys.executable, "-m", "teleledger.cli"]
SECRET = "service-secret-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([*TELELEDGER, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/fhir/metadata", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)


def _rows(engine: Any) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {k: (s, h) for k, s, h in conn.execute(
            select(chain_outbox.c.idempotency_key, chain_outbox.c.status, chain_outbox.c.tx_hash))}


def test_kill_9_of_a_serving_node_right_after_an_anchor_commits_loses_nothing_and_sends_nothing_twice(
        tmp_path, backend) -> None:
    url = database_url(backend, tmp_path)
    home = tmp_path / "home"
    master = base64.b64encode(b"m" * 32).decode()
    env = {**os.environ, "TELELEDGER_HOME": str(home), "TELELEDGER_DATABASE_URL": url,
           "TELELEDGER_MASTER_KEY": master, "TELELEDGER_PASSWORD_HASHING": "fast", "TELELEDGER_ENVIRONMENT": "test",
           "TELELEDGER_DEMO_DATA": "false", "TELELEDGER_ANCHOR_INTERVAL_SECONDS": "0.2",
           "TELELEDGER_CHAIN_POLL_INTERVAL": "0.05"}
    created = subprocess.run([*TELELEDGER, "clients", "create", "--client-id", "svc", "--secret", SECRET,
                              "--scope", "system/*.cruds"], env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    acknowledged: set[str] = set()
    try:
        for delay in (0.0, 0.005, 0.02):  # kill at different points of sign / send / receipt
            proc, base = _serve(env)
            try:
                token = httpx.post(f"{base}/auth/token", data={
                    "grant_type": "client_credentials", "client_id": "svc", "client_secret": SECRET}).json()
                headers = {"Authorization": f"Bearer {token['access_token']}", "Content-Type": "application/fhir+json"}
                seen = set(_rows(engine))
                r = httpx.post(f"{base}/fhir/Patient", json=patient(), headers=headers, timeout=10)
                assert r.status_code == 201, r.text
                deadline = time.monotonic() + 20
                while not (new := set(_rows(engine)) - seen):  # an anchor row committed: acknowledged
                    assert time.monotonic() < deadline, "no anchor was enqueued"
                    time.sleep(0.002)
                time.sleep(delay)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=20)
            acknowledged |= new
            assert new <= set(_rows(engine))  # still there after the kill

        proc, base = _serve(env)  # the restarted node finishes what the killed ones left
        try:
            deadline = time.monotonic() + 30
            while {s for s, _ in _rows(engine).values()} != {"done"}:
                assert time.monotonic() < deadline, f"outbox not drained: {_rows(engine)}"
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    finally:
        engine.dispose()

    settings = make_settings(tmp_path, url, master_key=master, chain_enabled=False)
    node = build(settings)
    chain = EmbeddedChain(home / "chain", node.keystore.key(AUTHORITY))
    try:
        _, addresses = load_addresses(addresses_path(home))
        logs = chain.get_logs(addresses["AnchorRegistry"], 0)
        rows = _rows(node.engine)
        with node.engine.connect() as conn:
            sizes = {k: decode_args(a)[2] for k, a in conn.execute(
                select(chain_outbox.c.idempotency_key, chain_outbox.c.args))}
    finally:
        chain.close()
        node.close()
    assert acknowledged and acknowledged <= set(rows)
    anchored_sizes = [e.args["tree_size"] for e in logs]
    assert sorted(anchored_sizes) == sorted(sizes.values())  # every row on chain, none twice
    assert sorted(e.tx_hash for e in logs) == sorted(h for _, h in rows.values())
    for key in acknowledged:
        assert rows[key][0] == "done"


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the command tests read Settings from the environment: nothing of the caller's may leak in
    for name in list(os.environ):
        if name.startswith("TELELEDGER_") and name not in ("TELELEDGER_TEST_POSTGRES_URL", "TELELEDGER_TEST_CHAIN_URL",
                                                          "TELELEDGER_REQUIRE_CHAIN", "TELELEDGER_REQUIRE_POSTGRES"):
            monkeypatch.delenv(name, raising=False)
