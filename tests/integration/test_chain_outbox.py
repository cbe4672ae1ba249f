"""The chain outbox on real databases (SQLite file, PostgreSQL) and real chains (the embedded
py-evm chain; a Hardhat node when $TELELEDGER_TEST_CHAIN_URL is set): rows commit with their
change, each is sent exactly once whatever crashes or outages happen, reverts are failures
with their reason."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from teleledger.core.errors import Conflict, InvalidInput, NotFound
from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN
from teleledger.ledger.chain.client import ChainRevert, ChainUnavailable
from teleledger.ledger.chain.deploy import deploy_all
from teleledger.ledger.chain.outbox import OutboxWorker, enqueue, entry
from teleledger.ledger.chain.rpc import JsonRpcChain
from teleledger.ledger.chain.storage import chain_outbox, decode_args, encode_args
from teleledger.storage.db import UnitOfWork
from teleledger.web.app import create_app
from tests.integration.helpers import patient, service_headers
from tests.integration.test_chain_support import (
    AUTHORITY,
    Relay,
    chain_node,  # noqa: F401  (fixture)
    enqueue_anchor,
    fund,
    hardhat_url,
    org_of,
    outbox_count,
    reopen_switchable,
    rpc,
)


def worker_of(node, **options) -> OutboxWorker:  # type: ignore[no-untyped-def]
    rt = node.chain
    return OutboxWorker(node.engine, rt.client, node.keystore, rt.addresses, node.settings.chain_confirmations,
                        **options)


# --------------------------------------------------------------------------- enqueue


def test_the_args_codec_keeps_bytes_strings_and_big_integers_apart() -> None:
    args = [b"\x00" * 32, "0x00", 2**255 + 7, True, ["a", b"\x01"], {"k": b"\xff"}]
    assert decode_args(encode_args(args)) == [b"\x00" * 32, "0x00", 2**255 + 7, True, ["a", b"\x01"], {"k": b"\xff"}]
    with pytest.raises(TypeError):
        encode_args([object()])


def test_a_row_enqueued_in_a_rolled_back_transaction_leaves_nothing(chain_node) -> None:
    with UnitOfWork(chain_node.engine) as uow:
        assert enqueue(uow.c, kind="anchor", key="k-rolled-back", contract="AnchorRegistry", fn="anchor",
                       args=[org_of(chain_node), "o", 1, b"\x01" * 32], sender=AUTHORITY)
        # leaving without commit() rolls back
    with pytest.raises(NotFound):
        entry(chain_node.engine, "k-rolled-back")
    assert outbox_count(chain_node.engine) == 0


def test_a_duplicate_key_adds_no_second_row_and_a_different_call_under_it_is_a_conflict(chain_node) -> None:
    key = enqueue_anchor(chain_node, 3)
    with UnitOfWork(chain_node.engine) as uow:
        assert not enqueue(uow.c, kind="anchor", key=key, contract="AnchorRegistry", fn="anchor",
                           args=[org_of(chain_node), "test.example/log", 3, (3).to_bytes(32, "big")],
                           sender=AUTHORITY)
        with pytest.raises(Conflict):
            enqueue(uow.c, kind="anchor", key=key, contract="AnchorRegistry", fn="anchor",
                    args=[org_of(chain_node), "test.example/log", 4, (4).to_bytes(32, "big")], sender=AUTHORITY)
    assert outbox_count(chain_node.engine) == 1


def test_arguments_the_abi_cannot_encode_are_refused_in_the_callers_transaction(chain_node) -> None:
    with UnitOfWork(chain_node.engine) as uow:
        with pytest.raises(InvalidInput, match="cannot encode AnchorRegistry.anchor"):
            enqueue(uow.c, kind="anchor", key="bad", contract="AnchorRegistry", fn="anchor",
                    args=[org_of(chain_node), "o", "one", b"\x01" * 32], sender=AUTHORITY)
        with pytest.raises(InvalidInput, match="unknown contract"):
            enqueue(uow.c, kind="x", key="bad2", contract="Nope", fn="anchor", args=[], sender=AUTHORITY)
    assert outbox_count(chain_node.engine) == 0


# --------------------------------------------------------------------------- draining


def test_the_worker_drains_a_row_to_done_and_the_indexer_projects_its_event(chain_node) -> None:
    rt = chain_node.chain
    key = enqueue_anchor(chain_node, 5, root=b"\x55" * 32)
    seen = []
    rt.indexer.on("CheckpointAnchored", lambda conn, event: seen.append(event))
    rt.worker.drain_once()
    done = entry(chain_node.engine, key)
    assert done.status == "done" and done.error is None and done.attempts == 0
    receipt = rt.client.receipt(done.tx_hash)
    assert receipt is not None and receipt.status == 1 and receipt.block_number == done.block_number
    rt.indexer.poll_until_caught_up()
    assert [(e.tx_hash, e.args["tree_size"], e.args["root_hash"]) for e in seen] == [(done.tx_hash, 5, b"\x55" * 32)]
    assert rt.worker.wait(key, timeout=1).status == "done"


def test_a_reverted_call_fails_with_the_contracts_reason_and_is_never_retried(chain_node) -> None:
    rt = chain_node.chain
    # a key of this node's keystore that is no operator of any organization
    key = enqueue_anchor(chain_node, 1, sender="node:stranger")
    rt.worker.drain_once()
    failed = entry(chain_node.engine, key)
    assert failed.status == "failed"
    assert failed.error == "anchors: not an operator of the organization"
    with pytest.raises(ChainRevert) as caught:
        rt.worker.wait(key, timeout=1)
    assert caught.value.reason == "anchors: not an operator of the organization" and caught.value.status == 409
    stranger = chain_node.keystore.address("node:stranger")
    assert rt.client.nonce(stranger) == 1  # included once (status 0) ...
    rt.worker.drain_once()
    assert rt.client.nonce(stranger) == 1 and entry(chain_node.engine, key).status == "failed"  # ... never again


def test_a_row_signed_before_a_crash_is_sent_again_with_the_same_bytes_once(chain_node) -> None:
    rt = chain_node.chain
    authority = chain_node.keystore.address(AUTHORITY)
    before = rt.client.nonce(authority)
    key = enqueue_anchor(chain_node, 9)
    crashed = worker_of(chain_node)
    assert crashed.sign_pending(AUTHORITY) == 1  # committed as "sent", then the process "dies"
    signed = entry(chain_node.engine, key)
    assert signed.status == "sent" and signed.nonce == before and signed.tx_hash
    assert rt.client.receipt(signed.tx_hash) is None

    worker_of(chain_node).drain_once()  # the restarted process
    done = entry(chain_node.engine, key)
    assert (done.status, done.tx_hash, done.nonce) == ("done", signed.tx_hash, before)
    assert rt.client.nonce(authority) == before + 1
    # the bytes offered once more (a crash right after send_raw): still one transaction
    with chain_node.engine.connect() as conn:
        raw = conn.execute(select(chain_outbox.c.raw_tx).where(chain_outbox.c.idempotency_key == key)).scalar_one()
    assert rt.client.send_raw([bytes(raw)]) == [signed.tx_hash]
    assert rt.client.nonce(authority) == before + 1
    block = rt.client.get_block(done.block_number)
    assert block.tx_hashes.count(signed.tx_hash) == 1


def test_a_nonce_taken_by_another_transaction_gets_the_row_signed_afresh(chain_node) -> None:
    rt = chain_node.chain
    key = enqueue_anchor(chain_node, 11)
    worker = worker_of(chain_node)
    worker.sign_pending(AUTHORITY)
    stale = entry(chain_node.engine, key)
    # someone else uses the authority key directly (a CLI deploy, say) and takes that nonce
    rt.client.transact(rt.addresses["AnchorRegistry"], "AnchorRegistry", "anchor", org_of(chain_node),
                       "other.example/log", 1, b"\x02" * 32, sender=chain_node.keystore.key(AUTHORITY))
    worker.drain_once()  # NonceConflict: back to pending, with the reason
    redone = entry(chain_node.engine, key)
    assert redone.status == "pending" and "already used" in (redone.error or "")
    worker.drain_once()
    done = entry(chain_node.engine, key)
    assert done.status == "done" and done.tx_hash != stale.tx_hash and done.nonce == stale.nonce + 1
    assert rt.client.get_transaction(stale.tx_hash) is None


def test_confirmations_hold_a_row_at_sent_until_its_block_is_deep_enough(chain_node) -> None:
    rt = chain_node.chain
    worker = worker_of(chain_node)
    worker.confirmations = 3
    key = enqueue_anchor(chain_node, 2)
    worker.drain_once()
    first = entry(chain_node.engine, key)
    assert first.status == "sent" and first.block_number == rt.client.block_number()
    for n in (1, 2):  # each transaction seals one more block on top
        rt.client.transact(rt.addresses["ParticipantRegistry"], "ParticipantRegistry", "set_member_roles",
                           org_of(chain_node), chain_node.keystore.address(f"node:member{n}"), ROLE_OPERATOR,
                           sender=chain_node.keystore.key(AUTHORITY))
        worker.drain_once()
        assert entry(chain_node.engine, key).status == ("done" if n == 2 else "sent")


def test_two_workers_draining_one_outbox_at_once_send_each_row_exactly_once(chain_node) -> None:
    rt = chain_node.chain
    authority = chain_node.keystore.address(AUTHORITY)
    before = rt.client.nonce(authority)
    keys = [enqueue_anchor(chain_node, size, origin="race.example/log") for size in range(1, 41)]
    workers = [worker_of(chain_node, batch=7), worker_of(chain_node, batch=5)]
    errors: list[BaseException] = []

    def drain(w: OutboxWorker) -> None:
        deadline = time.monotonic() + 60
        try:  # a worker that finds the sender locked by the other skips the round at once
            while outbox_count(chain_node.engine, status="done") < 40 and time.monotonic() < deadline:
                w.drain_once()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = [entry(chain_node.engine, k) for k in keys]
    assert {r.status for r in rows} == {"done"}, [r for r in rows if r.status != "done"]
    assert sorted(r.nonce for r in rows) == list(range(before, before + 40))
    assert rt.client.nonce(authority) == before + 40
    events = rt.client.get_logs(rt.addresses["AnchorRegistry"], 0)
    sizes = [e.args["tree_size"] for e in events if e.args["origin"] == "race.example/log"]
    assert sorted(sizes) == list(range(1, 41))  # rows of one sender are sent in id order: none reverted


# --------------------------------------------------------------------------- outages


def test_during_a_chain_outage_rows_wait_the_api_keeps_working_and_each_is_sent_once_after(chain_node) -> None:
    switch = reopen_switchable(chain_node)
    worker = chain_node.chain.worker  # the app below runs it in the background too
    worker.base_backoff, worker.max_backoff = 0.2, 0.3  # 0.1 to 0.45 s with jitter
    authority = chain_node.keystore.address(AUTHORITY)
    before = switch.nonce(authority)
    switch.down = True
    keys = [enqueue_anchor(chain_node, size, origin="outage.example/log") for size in (1, 2, 3)]
    for _ in range(3):
        with pytest.raises(ChainUnavailable):
            worker.drain_once()
        assert worker.drain_once() == 0  # backed off: not even asked before next_attempt_at
        time.sleep(0.5)
    waiting = [entry(chain_node.engine, k) for k in keys]
    assert {w.status for w in waiting} == {"pending"}
    assert all(w.attempts == 3 and "waiting for the chain" in (w.error or "") for w in waiting)

    with TestClient(create_app(chain_node, sequencer=False), raise_server_exceptions=False) as client:
        r = client.post("/fhir/Patient", json=patient(), headers=service_headers(client, chain_node))
        assert r.status_code == 201, r.text  # the API does not need the chain
    with pytest.raises(ChainUnavailable, match="not confirmed after"):
        worker.wait(keys[0], timeout=0.05)

    switch.down = False
    time.sleep(0.5)  # past the backoff
    worker.drain_once()
    done = [entry(chain_node.engine, k) for k in keys]
    assert {d.status for d in done} == {"done"} and worker.failures == 0
    assert switch.nonce(authority) == before + 3
    worker.drain_once()
    assert switch.nonce(authority) == before + 3  # nothing sent twice


def test_an_outage_between_signing_and_sending_resends_the_stored_bytes(chain_node) -> None:
    switch = reopen_switchable(chain_node)
    worker = OutboxWorker(chain_node.engine, switch, chain_node.keystore, chain_node.chain.addresses, 1,
                          base_backoff=0.01, max_backoff=0.02)
    key = enqueue_anchor(chain_node, 4)
    worker.sign_pending(AUTHORITY)
    signed = entry(chain_node.engine, key)
    switch.down = True
    with pytest.raises(ChainUnavailable):
        worker.drain_once()
    assert entry(chain_node.engine, key).status == "sent"
    switch.down = False
    time.sleep(0.03)
    worker.drain_once()
    done = entry(chain_node.engine, key)
    assert (done.status, done.tx_hash) == ("done", signed.tx_hash)


def _hardhat_operator(url: str, node) -> tuple[JsonRpcChain, dict[str, str]]:  # type: ignore[no-untyped-def]
    client = JsonRpcChain(url)
    key = node.keystore.key(AUTHORITY)
    me = key.public_key.to_checksum_address()
    fund(url, me)
    addresses = deploy_all(client, key, [me], 1)
    registry = addresses["ParticipantRegistry"]
    client.transact(registry, "ParticipantRegistry", "approve_organization", org_of(node), me, sender=key)
    client.transact(registry, "ParticipantRegistry", "set_member_roles", org_of(node), me,
                    ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)
    return client, addresses


def test_a_real_node_outage_on_hardhat_delays_rows_and_sends_each_once_after_it_returns(node) -> None:
    url = hardhat_url()
    setup, addresses = _hardhat_operator(url, node)
    upstream = urlparse(url)
    relay = Relay((upstream.hostname or "127.0.0.1", upstream.port or 8545))
    relay.start()
    client = JsonRpcChain(relay.url, timeout=2)
    worker = OutboxWorker(node.engine, client, node.keystore, addresses, 1, base_backoff=0.01, max_backoff=0.05)
    authority = node.keystore.address(AUTHORITY)
    before = setup.nonce(authority)
    try:
        relay.stop()
        keys = [enqueue_anchor(node, size, origin="hardhat-outage.example/log") for size in (1, 2)]
        with pytest.raises(ChainUnavailable, match="does not answer"):
            worker.drain_once()
        assert {entry(node.engine, k).status for k in keys} == {"pending"}
        relay.start()
        time.sleep(0.06)
        worker.drain_once()  # signs, sends, and (automine) collects the receipts
        worker.drain_once()
        assert {entry(node.engine, k).status for k in keys} == {"done"}
        assert setup.nonce(authority) == before + 2
    finally:
        relay.stop()
        client.close()
        setup.close()


def test_on_hardhat_a_row_is_done_only_after_the_configured_confirmations(node) -> None:
    url = hardhat_url()
    client, addresses = _hardhat_operator(url, node)
    worker = OutboxWorker(node.engine, client, node.keystore, addresses, 2)
    try:
        key = enqueue_anchor(node, 1, origin="hardhat-confirmations.example/log")
        worker.drain_once()
        worker.drain_once()
        assert entry(node.engine, key).status == "sent"  # included, one confirmation
        rpc(url, "evm_mine", [])
        worker.drain_once()
        assert entry(node.engine, key).status == "done"
    finally:
        client.close()


def test_on_hardhat_a_revert_is_failed_with_the_contracts_reason(node) -> None:
    url = hardhat_url()
    client, addresses = _hardhat_operator(url, node)
    fund(url, node.keystore.address("node:stranger"))
    worker = OutboxWorker(node.engine, client, node.keystore, addresses, 1)
    try:
        key = enqueue_anchor(node, 1, origin="hardhat-revert.example/log", sender="node:stranger")
        worker.drain_once()
        worker.drain_once()
        failed = entry(node.engine, key)
        assert (failed.status, failed.error) == ("failed", "anchors: not an operator of the organization")
    finally:
        client.close()


def test_rows_of_a_reset_next_attempt_are_not_sent_before_it(chain_node) -> None:
    key = enqueue_anchor(chain_node, 6)
    later = time.time_ns() // 1000 + 3_600_000_000
    with chain_node.engine.begin() as conn:
        conn.execute(update(chain_outbox).where(chain_outbox.c.idempotency_key == key).values(next_attempt_at=later))
    chain_node.chain.worker.drain_once()
    assert entry(chain_node.engine, key).status == "pending"
