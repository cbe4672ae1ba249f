"""The event follower: every process sees every stored chain event once, in chain order, and
rebuilds when the events it applied were rolled back (SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import delete

from teleledger.ledger.chain.follower import EventFollower
from teleledger.ledger.chain.storage import chain_events, encode_args


def store(engine, block: int, index: int, name: str, tx: str, **args: object) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(chain_events.insert().values(block_number=block, log_index=index, tx_hash=tx,
                                                  contract="ConsentRegistry", address="0x" + "11" * 20, name=name,
                                                  args=encode_args(args)))


def test_events_stored_by_any_process_reach_every_follower_once_in_chain_order(node) -> None:
    engine = node.engine
    store(engine, 5, 0, "ConsentGranted", "0xa", n=1)
    first, second = EventFollower(engine), EventFollower(engine)
    first.skip_to_end()  # started after event 1 was projected at build time
    seen: dict[str, list[tuple[int, int, object]]] = {"first": [], "second": []}
    first.on("ConsentGranted", lambda conn, e: seen["first"].append((e.block_number, e.log_index, e.args["n"])))
    first.on("ConsentRevoked", lambda conn, e: seen["first"].append((e.block_number, e.log_index, e.args["n"])))
    second.on("ConsentRevoked", lambda conn, e: seen["second"].append((e.block_number, e.log_index, e.args["n"])))
    store(engine, 7, 1, "ConsentRevoked", "0xc", n=3)
    store(engine, 7, 0, "ConsentGranted", "0xb", n=2)
    store(engine, 6, 0, "Unrelated", "0xd", n=9)
    assert first.poll() == 3 and second.poll() == 4
    assert seen["first"] == [(7, 0, 2), (7, 1, 3)]
    assert seen["second"] == [(7, 1, 3)]
    assert first.poll() == 0 and second.poll() == 0  # nothing twice
    store(engine, 8, 0, "ConsentRevoked", "0xe", n=4)
    assert first.poll() == 1 and seen["first"][-1] == (8, 0, 4)


def test_a_rollback_of_applied_events_makes_the_follower_rebuild_and_continue_after_the_new_end(node) -> None:
    engine = node.engine
    follower = EventFollower(engine)
    resets: list[int] = []
    applied: list[str] = []
    follower.on_reset(lambda: resets.append(1))
    follower.on("ConsentGranted", lambda conn, e: applied.append(e.tx_hash))
    store(engine, 3, 0, "ConsentGranted", "0x1")
    store(engine, 4, 0, "ConsentGranted", "0x2")
    assert follower.poll() == 2
    with engine.begin() as conn:  # the indexer rolled block 4 back and stored the new branch
        conn.execute(delete(chain_events).where(chain_events.c.block_number >= 4))
    store(engine, 4, 0, "ConsentGranted", "0x2b")
    assert follower.poll() == 0 and resets == [1]  # rebuilt from the stored events instead
    store(engine, 5, 0, "ConsentGranted", "0x3")
    assert follower.poll() == 1 and applied == ["0x1", "0x2", "0x3"]
