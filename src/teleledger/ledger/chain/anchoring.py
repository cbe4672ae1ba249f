"""Checkpoint anchoring: the transparency log's signed tree heads, ordered and timestamped on chain.

Every ``interval`` seconds (``TELELEDGER_ANCHOR_INTERVAL_SECONDS``, default 60) the ``Anchorer``
looks at the log's latest signed checkpoint; when its tree size is larger than the last one it
anchored, it records ``AnchorRegistry.anchor(org, origin, tree_size, root_hash)`` in the chain
outbox under the key ``anchor:<tree size>`` — in the same transaction that read the
checkpoint, serialized across processes (PostgreSQL advisory lock ``ANCHOR_LOCK``; SQLite's
write lock), so anchors are enqueued in increasing size and never twice for one size. The
outbox worker sends them; a chain outage delays anchors, never loses one.

Reading anchors back:

* ``anchored_checkpoints(conn, origin)``: from the indexer's ``chain_events`` (fast, local);
* ``chain_anchors(client, addresses, origin)``: from the contract's own state (what
  ``teleledger verify`` trusts: it does not depend on this database).

An organization id on chain is a bytes32: ``org_id(name)`` is the name's UTF-8 bytes padded with
zeros when it fits in 32 bytes (readable in any chain explorer), else its keccak-256.

Only hashes, sizes and the log's origin (a host name) go on chain: never an entry or PHI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from eth_utils import keccak
from sqlalchemy import Connection, Engine, select, text

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.background import BackgroundThread
from teleledger.ledger.chain.client import ChainClient
from teleledger.ledger.chain.indexer import events
from teleledger.ledger.chain.outbox import enqueue
from teleledger.ledger.chain.storage import chain_outbox, decode_args
from teleledger.ledger.log.storage import log_checkpoints
from teleledger.storage.db import UnitOfWork

__all__ = ["ANCHOR_LOCK", "AnchoredCheckpoint", "Anchorer", "anchored_checkpoints", "chain_anchors", "org_id"]

log = logging.getLogger("teleledger.chain.anchoring")

#: pg_advisory_xact_lock key of the anchorer's read-and-enqueue transaction
ANCHOR_LOCK = 7403_0002
#: AnchorRegistry's MAX_ORIGIN
MAX_ORIGIN = 128
ANCHOR_KIND = "anchor"


def org_id(name: str) -> bytes:
    """The bytes32 organization id of ``name`` (see the module docstring)."""
    raw = name.encode("utf-8")
    return raw.ljust(32, b"\0") if 0 < len(raw) <= 32 else keccak(raw)


@dataclass(frozen=True)
class AnchoredCheckpoint:
    """One anchor of a log origin: its index on chain, tree size and root, and where it is."""

    index: int
    tree_size: int
    root_hash: bytes
    anchored_at: int | None = None  # block timestamp (contract state only)
    block_number: int | None = None  # indexer only
    tx_hash: str | None = None  # indexer only


def anchored_checkpoints(conn: Connection, origin: str) -> list[AnchoredCheckpoint]:
    """The anchors of ``origin`` the indexer has projected, oldest first."""
    out = []
    for e in events(conn, "CheckpointAnchored", contract="AnchorRegistry"):
        if e.args.get("origin") != origin:
            continue
        out.append(AnchoredCheckpoint(int(e.args["index"]), int(e.args["tree_size"]), bytes(e.args["root_hash"]),
                                      block_number=e.block_number, tx_hash=e.tx_hash))
    return out


def chain_anchors(client: ChainClient, addresses: dict[str, str], origin: str) -> list[AnchoredCheckpoint]:
    """Every anchor of ``origin`` as the AnchorRegistry contract holds it, oldest first."""
    registry = addresses["AnchorRegistry"]
    count = int(client.call(registry, "AnchorRegistry", "anchor_count", keccak(text=origin)))
    out = []
    for index in range(count):
        size, root, at = client.call(registry, "AnchorRegistry", "checkpoint_at", origin, index)
        out.append(AnchoredCheckpoint(index, int(size), bytes(root), anchored_at=int(at)))
    return out


def last_enqueued_size(conn: Connection) -> int:
    """The tree size of the newest anchor recorded in the outbox (0 when none)."""
    row = conn.execute(select(chain_outbox.c.args).where(chain_outbox.c.kind == ANCHOR_KIND,
                                                         chain_outbox.c.idempotency_key.like("anchor:%"))
                       .order_by(chain_outbox.c.id.desc()).limit(1)).first()
    return 0 if row is None else int(decode_args(row.args)[2])


class Anchorer(BackgroundThread):
    """Enqueues anchors of the log's checkpoints (see the module docstring).

    ``on_enqueued(key)`` is called after a commit that recorded one (the runtime wakes the
    outbox worker with it); ``clock`` is monotonic seconds, injectable for tests."""

    def __init__(
        self,
        engine: Engine,
        origin: str,
        org: bytes,
        *,
        sender: str = "node:authority",
        interval: float = 60.0,
        on_enqueued: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < len(origin.encode("utf-8")) <= MAX_ORIGIN:
            raise ValueError(f"a log origin to anchor must be 1 to {MAX_ORIGIN} bytes")
        if len(org) != 32:
            raise ValueError("an organization id is 32 bytes")
        self.engine = engine
        self.origin = origin
        self.org = org
        self.sender = sender
        self.interval = interval
        self._on_enqueued = on_enqueued
        self._clock = clock
        self._next = 0.0
        self._init_thread("teleledger-chain-anchorer", "the anchorer")
        self.last_error: str | None = None

    def tick(self) -> str | None:
        """Anchor now if the interval has passed and the log grew; the key enqueued, or None."""
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + self.interval
        return self.anchor_latest()

    def anchor_latest(self) -> str | None:
        """Enqueue an anchor of the latest checkpoint if it is beyond the last anchored size."""
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            if c.dialect.name == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ANCHOR_LOCK})
            latest = c.execute(select(log_checkpoints.c.size, log_checkpoints.c.root_hash)
                               .order_by(log_checkpoints.c.size.desc()).limit(1)).first()
            if latest is None or int(latest.size) <= last_enqueued_size(c):
                return None
            size, root = int(latest.size), bytes(latest.root_hash)
            key = f"anchor:{size}"
            enqueue(c, kind=ANCHOR_KIND, key=key, contract="AnchorRegistry", fn="anchor",
                    args=[self.org, self.origin, size, root], sender=self.sender)
            uow.commit()
        log.info("anchoring the log checkpoint of size %d", size)
        if self._on_enqueued is not None:
            self._on_enqueued(key)
        return key

    # ------------------------------------------------------------------ background thread

    def _run(self) -> None:
        # the first look comes one interval after start: a restart does not anchor at once
        self._next = self._clock() + self.interval
        while not self._stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:  # a database hiccup: try again next interval
                self.last_error = exc.message if isinstance(exc, TeleledgerError) else type(exc).__name__
                log.error("anchoring failed (%s)", self.last_error)
            self._stop.wait(max(0.01, min(self.interval, self._next - self._clock())))

