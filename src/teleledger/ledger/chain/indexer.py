"""The chain indexer: contract events projected into SQL, resumable, idempotent, reorg-aware.

``Indexer.poll()`` reads the logs of the known contracts from the block after its cursor up to
the newest block with ``confirmations`` confirmations — a block counts as its own first
confirmation, so with ``confirmations = 1`` the head block itself is indexed and with ``n`` the
indexer stays ``n - 1`` blocks behind the head (the same rule as ``OutboxWorker``'s "done").
It stores them in ``chain_events`` and moves ``chain_cursor`` in ONE transaction, in which the
projectors registered with ``on(event_name, fn)`` run too: ``fn(conn, event)`` sees each new
event exactly once (a replayed range inserts nothing — ``ON CONFLICT DO NOTHING`` — and calls
no projector), and what it writes commits with the cursor or not at all.

Reorgs (chains whose head can be replaced: Clique, proof of work, a Hardhat ``evm_revert``):
each poll first compares the stored hash of the cursor block with the chain's. When they differ,
it walks back through ``chain_blocks`` (the hash of every block a poll ended on) to the newest
block the chain still has, deletes the events above it, calls the ``on_rollback(fn(conn,
fork_block))`` hooks so projections drop what they derived from them, and moves the cursor back
— all in one transaction; the next poll reads the new branch. A reorg deeper than the stored
blocks re-reads from ``start_block``. Within a poll, the hashes of the cursor block and of the
last block are read again after the logs: a reorg during the read makes the poll store
nothing. With ``confirmations`` at least the depth of the chain's reorgs (Besu/QBFT has
immediate finality: 1), nothing a projector saw is ever undone.

Several processes may poll one database: on PostgreSQL the store transaction takes an
advisory lock and the cursor only moves from the value this poll started from (compare and
set); on SQLite the write lock serializes them the same way.

This module never writes to the chain, and logs only counts and block numbers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.background import BackgroundThread
from teleledger.ledger.chain.client import ChainClient, ChainUnavailable, Event
from teleledger.ledger.chain.storage import chain_blocks, chain_cursor, chain_events, decode_args, encode_args
from teleledger.storage.db import UnitOfWork

__all__ = ["INDEXER_LOCK", "Indexer", "Projector", "RollbackHook", "StoredEvent", "events"]

log = logging.getLogger("teleledger.chain.indexer")

#: pg_advisory_xact_lock key of the indexer's store transaction
INDEXER_LOCK = 7403_0001
#: events inserted per statement (bounded by SQLite's host-parameter limit)
_INSERT_CHUNK = 500

Projector = Callable[[Connection, Event], None]
RollbackHook = Callable[[Connection, int], None]


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class StoredEvent:
    """A row of ``chain_events``: an ``Event`` plus the contract name it came from."""

    block_number: int
    log_index: int
    tx_hash: str
    contract: str
    address: str
    name: str | None
    args: dict[str, Any]


def events(conn: Connection, name: str | None = None, *, contract: str | None = None,
           from_block: int = 0) -> list[StoredEvent]:
    """Stored events (of ``name`` / ``contract`` when given) in chain order."""
    stmt = select(chain_events).where(chain_events.c.block_number >= from_block)
    if name is not None:
        stmt = stmt.where(chain_events.c.name == name)
    if contract is not None:
        stmt = stmt.where(chain_events.c.contract == contract)
    rows = conn.execute(stmt.order_by(chain_events.c.block_number, chain_events.c.log_index)).all()
    return [StoredEvent(int(r.block_number), int(r.log_index), r.tx_hash, r.contract, r.address, r.name,
                        decode_args(r.args)) for r in rows]


class Indexer(BackgroundThread):
    """See the module docstring. ``addresses``: contract name -> address (only these are read);
    ``start_block``: the first block that can hold their events (their deployment);
    ``max_blocks``: most blocks one poll reads; ``keep_blocks``: how far back block hashes are
    kept for reorg detection."""

    def __init__(
        self,
        engine: Engine,
        client: ChainClient,
        addresses: dict[str, str],
        confirmations: int = 1,
        *,
        name: str = "events",
        start_block: int = 0,
        poll_interval: float = 0.5,
        max_blocks: int = 2000,
        keep_blocks: int = 4096,
    ) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1 (a block confirms itself)")
        self.engine = engine
        self.client = client
        self.addresses = dict(addresses)
        self._contract_of = {a.lower(): n for n, a in addresses.items()}
        self.confirmations = confirmations
        self.name = name
        self.start_block = start_block
        self.poll_interval = poll_interval
        self.max_blocks = max_blocks
        self.keep_blocks = keep_blocks
        self._projectors: dict[str, list[Projector]] = defaultdict(list)
        self._rollback_hooks: list[RollbackHook] = []
        self._lock = threading.Lock()
        self._init_thread("teleledger-chain-indexer", "the indexer")
        self.failures = 0
        self.last_error: str | None = None
        self.reorgs = 0

    # ------------------------------------------------------------------ projectors

    def on(self, event_name: str, fn: Projector) -> None:
        """Run ``fn(conn, event)`` for each new ``event_name`` event, in the store transaction."""
        self._projectors[event_name].append(fn)

    def on_rollback(self, fn: RollbackHook) -> None:
        """Run ``fn(conn, fork_block)`` when a reorg removes the events above ``fork_block``."""
        self._rollback_hooks.append(fn)

    # ------------------------------------------------------------------ reading

    def cursor(self) -> tuple[int, str] | None:
        """(block number, block hash) of the last indexed block; None before the first poll."""
        with self.engine.connect() as conn:
            row = conn.execute(select(chain_cursor.c.block_number, chain_cursor.c.block_hash)
                               .where(chain_cursor.c.name == self.name)).first()
        return None if row is None else (int(row[0]), row[1])

    # ------------------------------------------------------------------ polling

    def poll(self) -> int:
        """Index what is confirmed beyond the cursor (one step of at most ``max_blocks``);
        returns how many new events were stored. Raises ``ChainUnavailable`` when the node does
        not answer (nothing is stored)."""
        with self._lock:
            return self._poll()

    def poll_until_caught_up(self, *, max_polls: int = 1000) -> int:
        """``poll`` until the cursor reaches the confirmed head (tests, catch-up at start)."""
        total = 0
        for _ in range(max_polls):
            before = self.cursor()
            total += self.poll()
            after = self.cursor()
            if after == before or (after is not None and after[0] >= self._target()):
                break
        return total

    def _target(self) -> int:
        return self.client.block_number() - self.confirmations + 1

    def _poll(self) -> int:
        client = self.client
        head = client.block_number()
        target = head - self.confirmations + 1
        cursor = self.cursor()
        # a chain now shorter than the cursor (the branch was abandoned) is a reorg too
        if cursor is not None and (cursor[0] > head or client.get_block(cursor[0]).hash != cursor[1]):
            self._rollback(cursor)
            return 0
        after = self.start_block - 1 if cursor is None else cursor[0]
        if target <= after:
            return 0
        upto = min(target, after + self.max_blocks)
        last = client.get_block(upto)
        found: list[Event] = []
        for address in self.addresses.values():
            found.extend(client.get_logs(address, after + 1, upto))
        found.sort(key=lambda e: (e.block_number, e.log_index))
        # the branch must not have moved while we read it
        if client.get_block(upto).hash != last.hash or (
                cursor is not None and client.get_block(cursor[0]).hash != cursor[1]):
            log.info("the chain reorganized during an indexer poll; reading again")
            return 0
        return self._store(cursor, upto, last.hash, found)

    def _store(self, cursor: tuple[int, str] | None, upto: int, upto_hash: str, found: list[Event]) -> int:
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            if c.dialect.name == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": INDEXER_LOCK})
            if not self._move_cursor(c, cursor, upto, upto_hash):
                return 0  # another indexer got there first; its transaction holds these events
            new = self._insert_events(c, found)
            for event in new:
                for fn in self._projectors.get(event.name or "", ()):
                    fn(c, event)
            ins = (postgresql.insert if c.dialect.name == "postgresql" else sqlite.insert)(chain_blocks)
            c.execute(ins.values(number=upto, hash=upto_hash).on_conflict_do_update(
                index_elements=["number"], set_={"hash": upto_hash}))
            c.execute(delete(chain_blocks).where(chain_blocks.c.number < upto - self.keep_blocks))
            uow.commit()
        if new:
            log.debug("indexed %d events up to block %d", len(new), upto)
        return len(new)

    def _move_cursor(self, c: Connection, cursor: tuple[int, str] | None, number: int, block_hash: str) -> bool:
        values = {"block_number": number, "block_hash": block_hash, "updated": _now_us()}
        if cursor is None:
            ins = (postgresql.insert if c.dialect.name == "postgresql" else sqlite.insert)(chain_cursor)
            return c.execute(ins.values(name=self.name, **values).on_conflict_do_nothing()
                             .returning(chain_cursor.c.name)).first() is not None
        moved = c.execute(update(chain_cursor).where(
            chain_cursor.c.name == self.name, chain_cursor.c.block_number == cursor[0],
            chain_cursor.c.block_hash == cursor[1]).values(**values)).rowcount
        return moved == 1

    def _insert_events(self, c: Connection, found: list[Event]) -> list[Event]:
        """Insert ``found``; the ones that were not stored yet (in chain order)."""
        if not found:
            return []
        ins = postgresql.insert if c.dialect.name == "postgresql" else sqlite.insert
        inserted: set[tuple[int, int]] = set()
        for i in range(0, len(found), _INSERT_CHUNK):
            chunk = found[i:i + _INSERT_CHUNK]
            rows = [{"block_number": e.block_number, "log_index": e.log_index, "tx_hash": e.tx_hash,
                     "contract": self._contract_of.get(e.address.lower(), "?"), "address": e.address,
                     "name": e.name, "args": encode_args(e.args)} for e in chunk]
            stmt = (ins(chain_events).values(rows).on_conflict_do_nothing()
                    .returning(chain_events.c.block_number, chain_events.c.log_index))
            inserted.update((int(b), int(i)) for b, i in c.execute(stmt))
        return [e for e in found if (e.block_number, e.log_index) in inserted]

    # ------------------------------------------------------------------ reorgs

    def _fork_point(self, cursor: tuple[int, str]) -> tuple[int, str] | None:
        """The newest stored block the chain still has (None: none of them)."""
        with self.engine.connect() as conn:
            stored = conn.execute(select(chain_blocks.c.number, chain_blocks.c.hash)
                                  .where(chain_blocks.c.number <= cursor[0])
                                  .order_by(chain_blocks.c.number.desc())).all()
        head = self.client.block_number()
        for number, block_hash in stored:
            number = int(number)
            if number <= head and self.client.get_block(number).hash == block_hash:
                return number, block_hash
        return None

    def _rollback(self, cursor: tuple[int, str]) -> None:
        fork = self._fork_point(cursor)
        fork_block = self.start_block - 1 if fork is None else fork[0]
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            if c.dialect.name == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": INDEXER_LOCK})
            current = c.execute(select(chain_cursor.c.block_number, chain_cursor.c.block_hash)
                                .where(chain_cursor.c.name == self.name)).first()
            if current is None or (int(current[0]), current[1]) != cursor:
                return  # another indexer already dealt with it
            removed = c.execute(delete(chain_events).where(chain_events.c.block_number > fork_block)).rowcount
            c.execute(delete(chain_blocks).where(chain_blocks.c.number > fork_block))
            for fn in self._rollback_hooks:
                fn(c, fork_block)
            if fork is None:
                c.execute(delete(chain_cursor).where(chain_cursor.c.name == self.name))
            else:
                c.execute(update(chain_cursor).where(chain_cursor.c.name == self.name)
                          .values(block_number=fork[0], block_hash=fork[1], updated=_now_us()))
            uow.commit()
        self.reorgs += 1
        log.warning("chain reorganization: block %d changed; %d events above block %d rolled back",
                    cursor[0], removed, fork_block)

    # ------------------------------------------------------------------ background thread

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.poll_interval
            try:
                stored = self.poll()
                self.failures = 0
                self.last_error = None
                if stored and self.cursor_behind():
                    delay = 0.0
            except ChainUnavailable as exc:
                self.failures += 1
                self.last_error = exc.message
                delay = min(30.0, self.poll_interval * 2 ** min(self.failures, 6))
                log.warning("the indexer waits for the chain (%s)", exc.message)
            except Exception as exc:  # never let the thread die
                self.failures += 1
                self.last_error = type(exc).__name__
                delay = min(30.0, self.poll_interval * 2 ** min(self.failures, 6))
                log.error("indexer poll failed (%s)", exc.message if isinstance(exc, TeleledgerError)
                          else type(exc).__name__)
            if delay:
                self._stop.wait(delay)

    def cursor_behind(self) -> bool:
        cursor = self.cursor()
        try:
            return cursor is None or cursor[0] < self._target()
        except ChainUnavailable:
            return False

