"""Shared pieces of the chain test modules (no tests of its own).

    chain_node      a real node (SQLite file / PostgreSQL via ``backend``) with its embedded chain
    hardhat_url()   $TELELEDGER_TEST_CHAIN_URL, or a visible skip (a failure with TELELEDGER_REQUIRE_CHAIN=1)
    Relay           a TCP relay in front of a node, stopped and restarted for real outages
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from teleledger.ledger.chain.anchoring import org_id
from teleledger.ledger.chain.client import ChainUnavailable
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.outbox import enqueue
from teleledger.ledger.chain.storage import chain_outbox
from teleledger.storage.db import UnitOfWork
from tests.conftest import database_url, make_settings

CHAIN_URL = os.environ.get("TELELEDGER_TEST_CHAIN_URL", "")
REQUIRE_CHAIN = os.environ.get("TELELEDGER_REQUIRE_CHAIN") == "1"
# Hardhat's dev account #0: unlocked on every Hardhat node; funds the test's signers
HARDHAT_FUNDER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
AUTHORITY = "node:authority"


def hardhat_url() -> str:
    if not CHAIN_URL:
        if REQUIRE_CHAIN:
            pytest.fail("TELELEDGER_REQUIRE_CHAIN=1 but TELELEDGER_TEST_CHAIN_URL is unset; run .ci/hardhat.sh")
        pytest.skip("no Hardhat node: set TELELEDGER_TEST_CHAIN_URL (eval \"$(.ci/hardhat.sh)\")")
    return CHAIN_URL


def rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert "error" not in answer, answer
    return answer["result"]


def fund(url: str, address: str) -> None:
    # set the balance rather than transfer from a dev account: a whole suite's transfers would
    # drain it (Hardhat's dev accounts start with 10,000 ETH)
    rpc(url, "hardhat_setBalance", [address, hex(10**20)])


@pytest.fixture
def chain_node(tmp_path: Path, backend: str) -> Iterator[Any]:
    """A node whose embedded chain is deployed and whose organization may anchor; nothing runs
    in the background (tests drive the worker and the indexer by hand)."""
    from teleledger.bootstrap import build

    settings = make_settings(tmp_path, database_url(backend, tmp_path), chain_enabled=True,
                             chain_poll_interval=0.05)
    node = build(settings)
    yield node
    node.close()


def org_of(node: Any) -> bytes:
    return org_id(node.settings.chain_org or node.settings.node_name)


def enqueue_anchor(node: Any, size: int, *, origin: str = "test.example/log", root: bytes | None = None,
                   sender: str = AUTHORITY, key: str | None = None) -> str:
    """Record an AnchorRegistry.anchor call in the outbox, committed; its key."""
    key = key or f"test-anchor:{origin}:{size}"
    with UnitOfWork(node.engine) as uow:
        enqueue(uow.c, kind="anchor", key=key, contract="AnchorRegistry", fn="anchor",
                args=[org_of(node), origin, size, root or size.to_bytes(32, "big")], sender=sender)
        uow.commit()
    return key


def outbox_count(engine: Any, **where: Any) -> int:
    stmt = select(func.count()).select_from(chain_outbox)
    for column, value in where.items():
        stmt = stmt.where(chain_outbox.c[column] == value)
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


class Unreachable(EmbeddedChain):
    """The embedded chain behind a switch: while ``down``, every call that would reach a node
    raises ``ChainUnavailable`` exactly as ``JsonRpcChain`` does for a node that does not answer.
    (The real network outage is ``Relay`` in front of Hardhat; this keeps the case runnable
    without one.)"""

    down = False

    def _gate(self) -> None:
        if self.down:
            raise ChainUnavailable("the chain node at (test switch) does not answer (ConnectionRefusedError)")

    def nonce(self, address: str) -> int:
        self._gate()
        return super().nonce(address)

    def send_raw(self, raws: list[bytes]) -> list[str]:
        self._gate()
        return super().send_raw(raws)

    def receipt(self, tx_hash: str) -> Any:
        self._gate()
        return super().receipt(tx_hash)

    def block_number(self) -> int:
        self._gate()
        return super().block_number()

    def get_block(self, number: int) -> Any:
        self._gate()
        return super().get_block(number)

    def get_logs(self, address: str | None, from_block: int, to_block: int | None = None) -> Any:
        self._gate()
        return super().get_logs(address, from_block, to_block)


def reopen_switchable(node: Any) -> Unreachable:
    """Close the node's embedded chain client and reopen the same chain behind a switch."""
    runtime = node.chain
    runtime.client.close()
    client = Unreachable(Path(node.settings.home) / "chain", node.keystore.key(AUTHORITY))
    runtime.client = client
    for part in (runtime.worker, runtime.indexer):
        part.client = client
    return client


class Relay:
    """A TCP relay on a fixed loopback port to ``upstream`` (host, port): ``stop()`` refuses and
    cuts every connection (a node that went away), ``start()`` serves again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            try:  # wakes the thread blocked in accept(): close() alone leaves the port listening
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

