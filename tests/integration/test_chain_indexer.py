"""The chain indexer on real databases and real chains: events projected once, in the store
transaction, resumed from the cursor, idempotent on replay, held back by confirmations, and
rolled back on a reorg (a real one, made with Hardhat's evm_snapshot / evm_revert)."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, delete, func, select, text

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN
from teleledger.ledger.chain.client import Event
from teleledger.ledger.chain.deploy import deploy_all
from teleledger.ledger.chain.indexer import Indexer, events
from teleledger.ledger.chain.rpc import JsonRpcChain
from teleledger.ledger.chain.storage import chain_cursor, chain_events
from tests.integration.test_chain_support import (
    AUTHORITY,
    chain_node,  # noqa: F401  (fixture)
    enqueue_anchor,
    fund,
    hardhat_url,
    org_of,
    rpc,
)


def anchor_now(node, size: int, origin: str = "idx.example/log") -> None:  # type: ignore[no-untyped-def]
    """One anchor transaction, sealed at once (one block)."""
    rt = node.chain
    rt.client.transact(rt.addresses["AnchorRegistry"], "AnchorRegistry", "anchor", org_of(node), origin, size,
                       size.to_bytes(32, "big"), sender=node.keystore.key(AUTHORITY))


def stored_count(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(chain_events)).scalar_one())


def test_the_indexer_stores_every_event_of_the_known_contracts_once_and_projects_it(chain_node) -> None:
    rt = chain_node.chain
    projected: list[Event] = []
    rt.indexer.on("CheckpointAnchored", lambda conn, e: projected.append(e))
    for size in (1, 2, 3):
        anchor_now(chain_node, size)
    assert rt.indexer.poll_until_caught_up() >= 3  # plus the start-up registration's events
    with chain_node.engine.connect() as conn:
        anchored = events(conn, "CheckpointAnchored")
        registration = events(conn, "MemberRolesSet", contract="ParticipantRegistry")
    assert [e.args["tree_size"] for e in anchored] == [1, 2, 3]
    assert [e.args["tree_size"] for e in projected] == [1, 2, 3]
    assert {e.contract for e in anchored} == {"AnchorRegistry"} and registration
    assert anchored[0].args["root_hash"] == (1).to_bytes(32, "big")  # bytes survive the JSON column
    assert rt.indexer.cursor()[0] == rt.client.block_number()


def test_replaying_an_indexed_range_stores_nothing_twice_and_projects_nothing_again(chain_node) -> None:
    rt = chain_node.chain
    calls: list[int] = []
    rt.indexer.on("CheckpointAnchored", lambda conn, e: calls.append(e.block_number))
    for size in (1, 2):
        anchor_now(chain_node, size)
    rt.indexer.poll_until_caught_up()
    before = stored_count(chain_node.engine)
    with chain_node.engine.begin() as conn:  # forget the position: the next poll re-reads everything
        conn.execute(delete(chain_cursor))
    assert rt.indexer.poll_until_caught_up() == 0
    assert stored_count(chain_node.engine) == before and len(calls) == 2


def test_a_new_indexer_resumes_from_the_stored_cursor(chain_node) -> None:
    rt = chain_node.chain
    anchor_now(chain_node, 1)
    rt.indexer.poll_until_caught_up()
    cursor = rt.indexer.cursor()
    anchor_now(chain_node, 2)
    seen: list[int] = []
    restarted = Indexer(chain_node.engine, rt.client, rt.addresses, 1)  # another process, later
    restarted.on("CheckpointAnchored", lambda conn, e: seen.append(e.args["tree_size"]))
    assert restarted.poll() == 1 and seen == [2]
    assert restarted.cursor()[0] == cursor[0] + 1


def test_confirmations_keep_the_indexer_that_many_blocks_minus_one_behind_the_head(chain_node) -> None:
    rt = chain_node.chain
    indexer = Indexer(chain_node.engine, rt.client, rt.addresses, 3)
    anchor_now(chain_node, 1)
    head = rt.client.block_number()
    indexer.poll_until_caught_up()
    assert indexer.cursor()[0] == head - 2
    with chain_node.engine.connect() as conn:
        assert events(conn, "CheckpointAnchored") == []
    anchor_now(chain_node, 2)
    anchor_now(chain_node, 3)  # the block of anchor 1 now has three confirmations
    indexer.poll_until_caught_up()
    with chain_node.engine.connect() as conn:
        assert [e.args["tree_size"] for e in events(conn, "CheckpointAnchored")] == [1]


def test_a_failing_projector_rolls_back_the_events_and_the_cursor_with_it(chain_node) -> None:
    rt = chain_node.chain
    rt.indexer.poll_until_caught_up()
    cursor, before = rt.indexer.cursor(), stored_count(chain_node.engine)

    def boom(conn: Connection, event: Event) -> None:
        conn.execute(text("SELECT 1"))
        raise RuntimeError("projector bug")

    rt.indexer.on("CheckpointAnchored", boom)
    anchor_now(chain_node, 1)
    with pytest.raises(RuntimeError, match="projector bug"):
        rt.indexer.poll()
    assert rt.indexer.cursor() == cursor and stored_count(chain_node.engine) == before


def test_an_outbox_write_appears_through_the_indexer_once_the_worker_confirms_it(chain_node) -> None:
    rt = chain_node.chain
    key = enqueue_anchor(chain_node, 7, origin="flow.example/log")
    rt.worker.drain_once()
    rt.indexer.poll_until_caught_up()
    with chain_node.engine.connect() as conn:
        (event,) = [e for e in events(conn, "CheckpointAnchored") if e.args["origin"] == "flow.example/log"]
    assert event.tx_hash == rt.worker.wait(key, 1).tx_hash


# --------------------------------------------------------------------------- a real reorg (Hardhat)


def test_a_reorg_on_hardhat_rolls_back_the_orphaned_events_and_indexes_the_new_branch(node) -> None:
    url = hardhat_url()
    key = node.keystore.key(AUTHORITY)
    me = key.public_key.to_checksum_address()
    fund(url, me)
    client = JsonRpcChain(url)
    addresses = deploy_all(client, key, [me], 1)
    registry = addresses["ParticipantRegistry"]
    client.transact(registry, "ParticipantRegistry", "approve_organization", org_of(node), me, sender=key)
    client.transact(registry, "ParticipantRegistry", "set_member_roles", org_of(node), me,
                    ROLE_ORG_ADMIN | ROLE_OPERATOR, sender=key)
    indexer = Indexer(node.engine, client, addresses, 1, start_block=client.block_number() - 5)
    projected: dict[int, bytes] = {}
    rollbacks: list[int] = []
    indexer.on("CheckpointAnchored", lambda conn, e: projected.__setitem__(e.args["tree_size"], e.args["root_hash"]))

    def forget(conn: Connection, fork_block: int) -> None:
        rollbacks.append(fork_block)
        for size in [s for s in projected if s >= 1]:
            projected.pop(size)

    indexer.on_rollback(forget)
    indexer.poll_until_caught_up()
    fork = client.block_number()
    snapshot = rpc(url, "evm_snapshot", [])
    client.transact(addresses["AnchorRegistry"], "AnchorRegistry", "anchor", org_of(node), "reorg.example/log", 1,
                    b"\xaa" * 32, sender=key)
    indexer.poll_until_caught_up()
    assert projected == {1: b"\xaa" * 32}
    orphan = indexer.cursor()

    assert rpc(url, "evm_revert", [snapshot]) is True
    client.close()
    client = JsonRpcChain(url)  # its local nonce counter belongs to the abandoned branch
    indexer.client = client
    assert client.block_number() < orphan[0]  # the indexed block is gone for now
    indexer.poll()
    assert rollbacks == [fork] and projected == {} and indexer.cursor()[0] == fork
    client.transact(addresses["AnchorRegistry"], "AnchorRegistry", "anchor", org_of(node), "reorg.example/log", 1,
                    b"\xbb" * 32, sender=key)
    rpc(url, "evm_mine", [])
    assert client.get_block(orphan[0]).hash != orphan[1]  # same height, another block

    indexer.poll_until_caught_up()
    assert rollbacks == [fork] and indexer.reorgs == 1
    assert projected == {1: b"\xbb" * 32}
    with node.engine.connect() as conn:
        anchored = [e for e in events(conn, "CheckpointAnchored") if e.args["origin"] == "reorg.example/log"]
    assert [e.args["root_hash"] for e in anchored] == [b"\xbb" * 32]
    assert indexer.cursor() == (client.block_number(), client.get_block(client.block_number()).hash)
    client.close()
