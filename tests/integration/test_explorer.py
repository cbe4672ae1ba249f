"""The admin chain explorer on SQLite and PostgreSQL: the service reads blocks, decoded calls and
events, anchors beside the log's checkpoints and the outbox; the page is for admins only."""

from __future__ import annotations

import pytest

from teleledger.ledger.chain import explorer
from tests.conftest import database_url, make_settings
from tests.integration.helpers import create, patient, service_headers

PASSWORD = "correct-horse-battery"


@pytest.fixture
def settings(tmp_path, backend):  # type: ignore[no-untyped-def]
    """These nodes run the embedded chain (the shared fixture's nodes have none)."""
    return make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True)


@pytest.fixture
def chain(client, node):  # type: ignore[no-untyped-def]
    """The node's chain runtime, driven by hand: the app started its background threads
    (``client``), stopped here so that each test decides when rows are sent and indexed."""
    runtime = node.chain
    assert runtime is not None and runtime.active
    runtime.stop()
    return runtime


def _anchor_one_checkpoint(client, node, chain) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """Write a record (so the log grows), sign a checkpoint, anchor it on chain and index it."""
    create(client, service_headers(client, node), patient())
    checkpoint = node.log.flush()
    assert checkpoint is not None
    key = chain.anchorer.anchor_latest()
    assert key is not None
    chain.worker.drain_once()
    entry = chain.wait(key, timeout=30)
    chain.indexer.poll_until_caught_up()
    return entry.tx_hash, checkpoint.size


def test_the_overview_decodes_the_anchor_call_and_event_and_matches_it_with_the_logs_checkpoint(client, node, chain):
    tx_hash, size = _anchor_one_checkpoint(client, node, chain)
    view = explorer.overview(chain.client, chain.addresses, node.engine, log_origin=node.log.origin)

    assert view.chain_error is None
    assert view.head == chain.client.block_number() and view.blocks[0].number == view.head
    assert [b.number for b in view.blocks] == list(range(view.head, max(-1, view.head - 10), -1))
    assert view.blocks[0].sealer == chain.authority
    tx = next(t for t in view.transactions if t.hash == tx_hash)
    assert tx.status == "success" and tx.sender == chain.authority
    assert tx.call is not None and (tx.call.contract, tx.call.function) == ("AnchorRegistry", "anchor")
    args = dict(tx.call.args)
    assert args["origin"] == node.log.origin and args["tree_size"] == str(size)
    (event,) = tx.events
    assert (event.name, event.contract) == ("CheckpointAnchored", "AnchorRegistry")
    assert dict(event.args)["tree_size"] == str(size)

    (anchor,) = view.anchors
    assert (anchor.tree_size, anchor.origin, anchor.verdict, anchor.tx_hash) == (size, node.log.origin, "match",
                                                                                 tx_hash)
    assert anchor.checkpoint is not None and anchor.checkpoint.startswith(f"{node.log.origin}\n{size}\n")
    assert view.indexed_to is not None and view.indexed_to >= anchor.block_number

    counts = dict(view.outbox_counts)
    assert counts["done"] >= 1 and set(counts) >= {"pending", "sent", "done", "failed"}
    row = next(r for r in view.outbox if r.tx_hash == tx_hash)
    assert (row.kind, row.call, row.status) == ("anchor", "AnchorRegistry.anchor", "done")


def test_an_anchor_whose_root_differs_from_the_signed_checkpoint_reads_as_a_mismatch(client, node, chain):
    from sqlalchemy import update

    from teleledger.ledger.log.storage import log_checkpoints
    from teleledger.storage.db import UnitOfWork

    _, size = _anchor_one_checkpoint(client, node, chain)
    with UnitOfWork(node.engine) as uow:  # the log's stored root no longer is what was anchored
        uow.c.execute(update(log_checkpoints).where(log_checkpoints.c.size == size).values(root_hash=b"\x00" * 32))
        uow.commit()
    (anchor,) = explorer.overview(chain.client, chain.addresses, node.engine, log_origin=node.log.origin).anchors
    assert anchor.verdict == "mismatch"
    # another organization's log is not compared with ours at all
    (other,) = explorer.overview(chain.client, chain.addresses, node.engine, log_origin="other.example").anchors
    assert other.verdict == "other log" and other.checkpoint is None


def test_a_queued_write_shows_as_pending_without_its_arguments(client, node, chain):
    create(client, service_headers(client, node), patient())
    node.log.flush()
    key = chain.anchorer.anchor_latest()
    view = explorer.overview(chain.client, chain.addresses, node.engine, log_origin=node.log.origin)
    assert dict(view.outbox_counts)["pending"] == 1
    (row,) = [r for r in view.outbox if r.status == "pending"]
    assert (row.kind, row.call, row.tx_hash) == ("anchor", "AnchorRegistry.anchor", None)
    assert not hasattr(row, "args")
    assert key == f"anchor:{node.log.tree_size()}"


# ---- the page -----------------------------------------------------------------------------------


def _sign_in(client, username: str) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/login", data={"username": username, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_an_admin_sees_blocks_decoded_calls_anchors_and_the_outbox(client, node, chain):
    tx_hash, size = _anchor_one_checkpoint(client, node, chain)
    node.accounts.create_user(username="root-admin", password=PASSWORD, role="admin")
    _sign_in(client, "root-admin")
    r = client.get("/admin/chain")
    assert r.status_code == 200, r.text
    html = r.text
    assert 'href="/admin/chain" aria-current="page"' in html  # the nav link, for admins
    assert "<caption" in html and 'scope="col"' in html
    assert f'data-hash="{tx_hash}"' in html
    assert "AnchorRegistry.anchor" in html and "CheckpointAnchored" in html
    assert f'data-size="{size}" data-verdict="match"' in html
    assert 'class="outbox-row" data-status="done"' in html
    assert r.headers["cache-control"] == "no-store"


def test_the_explorer_sends_a_signed_out_visitor_to_sign_in_and_refuses_other_roles(client, node):
    r = client.get("/admin/chain", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/admin/chain"
    node.accounts.create_user(username="alice", password=PASSWORD, role="patient", patient="Patient/p-1")
    _sign_in(client, "alice")
    r = client.get("/admin/chain")
    assert r.status_code == 403
    assert "Only administrators may open the node&#39;s admin pages." in r.text
    assert "signed in as a patient" in r.text
    assert 'href="/admin/chain"' not in r.text  # no nav link for a patient


def test_without_a_chain_the_explorer_says_the_chain_is_disabled(tmp_path, backend):
    from fastapi.testclient import TestClient

    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    n = build(make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=False))
    try:
        assert getattr(n, "chain", None) is None
        n.accounts.create_user(username="root-admin", password=PASSWORD, role="admin")
        with TestClient(create_app(n), raise_server_exceptions=False) as c:
            _sign_in(c, "root-admin")
            r = c.get("/admin/chain")
        assert r.status_code == 200
        assert 'id="chain-disabled"' in r.text and "The chain is disabled" in r.text
    finally:
        n.close()


def test_a_standby_process_shows_the_database_half_and_says_why_blocks_are_missing(client, node, chain):
    from teleledger.bootstrap import build

    _, size = _anchor_one_checkpoint(client, node, chain)
    second = build(node.settings)  # the same home: the embedded chain is held by the first node
    try:
        assert second.chain is not None and not second.chain.active
        view = explorer.runtime_overview(second.chain, log_origin=second.log.origin)
    finally:
        second.close()
    assert view.role == "standby" and view.chain_error == explorer.STANDBY
    assert view.blocks == () and view.transactions == () and view.head is None
    assert [(a.tree_size, a.verdict) for a in view.anchors] == [(size, "match")]
    assert dict(view.outbox_counts)["done"] == 1


class _ChainNode:
    """A JSON-RPC endpoint on a local port that answers two questions and can be switched off:
    enough for ``JsonRpcChain`` to connect, then lose its node."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                req = json.loads(self.rfile.read(int(self.headers["content-length"])))
                result = {"eth_chainId": "0x7a69", "eth_gasPrice": "0x0"}.get(req["method"])
                body = json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_a_chain_that_stops_answering_is_reported_on_the_page_data_not_raised(node):
    from teleledger.ledger.chain.rpc import JsonRpcChain

    rpc = _ChainNode()
    client = JsonRpcChain(rpc.url, timeout=2)
    rpc.stop()
    try:
        view = explorer.overview(client, {}, node.engine, log_origin=node.log.origin)
    finally:
        client.close()
    assert view.chain_error is not None and "does not answer" in view.chain_error
    assert view.blocks == () and view.head is None
    assert dict(view.outbox_counts) == {"pending": 0, "sent": 0, "done": 0, "failed": 0}
