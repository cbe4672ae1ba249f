"""Every process's view of the indexed chain events: in-memory projections kept current.

The ``Indexer`` calls its projectors only for events it inserts itself, exactly once across all
processes — right for projections that live in the database. A projection that lives in memory
(the consent index every access decision reads) must see every event in EVERY process: the one
that indexed it, the other server processes on the same PostgreSQL, and a standby process
without a chain client. ``EventFollower`` gives them that: it tails the stored ``chain_events``
in chain order from where it last was and calls ``on(event_name, fn)`` handlers — the same
``fn(conn, event)`` signature as indexer projectors, on a read connection — with each new event, and the ``every_poll`` hooks after each poll (for state a projection keeps in its own
tables, such as break-glass claims).

Handlers must be idempotent (the indexing process may also have applied the event through an
indexer projector, which keeps its own updates synchronous): the consent index orders updates
by their chain position and ignores what it has already seen.

Reorgs: when the indexer rolls events back, the last event the follower applied is gone (or
another transaction sits at its position); the follower then calls the ``on_reset`` hooks
(which rebuild their projection from what is stored) and continues from the new end.

Reads only; never writes to the database or the chain, and logs only positions and counts.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from teleledger.ledger.chain.background import BackgroundThread
from teleledger.ledger.chain.indexer import StoredEvent
from teleledger.ledger.chain.storage import chain_events, decode_args

__all__ = ["EventFollower"]

log = logging.getLogger("teleledger.chain.follower")

#: events read per query
_BATCH = 1000


class EventFollower(BackgroundThread):
    """See the module docstring."""

    def __init__(self, engine: Engine, *, poll_interval: float = 0.5) -> None:
        self.engine = engine
        self.poll_interval = poll_interval
        self._handlers: dict[str, list[Callable[[Any, StoredEvent], None]]] = defaultdict(list)
        self._every_poll: list[Callable[[], None]] = []
        self._on_reset: list[Callable[[], None]] = []
        #: (block, log index, tx hash) of the last event seen; None = nothing seen yet
        self._position: tuple[int, int, str] | None = None
        #: ``skip_to_end`` ran: the position is meaningful even when no event was stored yet
        self.positioned = False
        self._init_thread("chain-follower", "the chain event follower")

    def on(self, event_name: str, fn: Callable[[Any, StoredEvent], None]) -> None:
        self._handlers[event_name].append(fn)

    def every_poll(self, fn: Callable[[], None]) -> None:
        self._every_poll.append(fn)

    def on_reset(self, fn: Callable[[], None]) -> None:
        self._on_reset.append(fn)

    def skip_to_end(self) -> None:
        """Start after the events stored now (their projection was just rebuilt from them)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(chain_events.c.block_number, chain_events.c.log_index, chain_events.c.tx_hash)
                               .order_by(chain_events.c.block_number.desc(), chain_events.c.log_index.desc())
                               .limit(1)).first()
        self._position = None if row is None else (int(row[0]), int(row[1]), row[2])
        self.positioned = True

    def poll(self) -> int:
        """Apply the events stored since the last poll; returns how many were handed out."""
        handed = 0
        with self.engine.connect() as conn:
            rolled_back = self._position is not None and not self._still_there(conn, self._position)
            while not rolled_back:
                stmt = select(chain_events)
                if self._position is not None:
                    block, index, _ = self._position
                    stmt = stmt.where(or_(chain_events.c.block_number > block,
                                          and_(chain_events.c.block_number == block, chain_events.c.log_index > index)))
                rows = conn.execute(stmt.order_by(chain_events.c.block_number, chain_events.c.log_index)
                                    .limit(_BATCH)).all()
                for r in rows:
                    event = StoredEvent(int(r.block_number), int(r.log_index), r.tx_hash, r.contract, r.address,
                                        r.name, decode_args(r.args))
                    for fn in self._handlers.get(r.name or "", ()):
                        fn(conn, event)
                    self._position = (event.block_number, event.log_index, event.tx_hash)
                    handed += 1
                if len(rows) < _BATCH:
                    break
        if rolled_back:
            assert self._position is not None
            log.info("stored chain events were rolled back past block %s: rebuilding", self._position[0])
            for reset in self._on_reset:
                reset()
            self.skip_to_end()
        for hook in self._every_poll:
            hook()
        return handed

    @staticmethod
    def _still_there(conn: Any, position: tuple[int, int, str]) -> bool:
        block, index, tx_hash = position
        stored = conn.execute(select(chain_events.c.tx_hash).where(chain_events.c.block_number == block,
                                                                   chain_events.c.log_index == index)).scalar()
        return stored == tx_hash

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # a database hiccup must not end the thread; the next poll retries
                # the kind only: a traceback's values could come from projected records
                log.error("chain event follower poll failed (%s)", type(exc).__name__)
            self._stop.wait(self.poll_interval)
