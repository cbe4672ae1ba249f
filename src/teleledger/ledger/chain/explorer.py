"""What the admin chain explorer shows: recent blocks, their transactions decoded against the
contracts' ABIs, checkpoint anchors beside the log's own checkpoints, and the outbox queue.

``runtime_overview(runtime, log_origin=...)`` (the node's ``ChainRuntime``) and
``overview(client, addresses, engine)`` read everything for one page view and return plain
frozen dataclasses of display-ready strings; the web layer only renders them. Chain reads go
through the ``ChainClient`` interface (embedded and external alike); anchors come from the
indexer's projection (``chain_events``), the checkpoints they commit to from the log's table
(``log_checkpoints``), the queue from ``chain_outbox``.

What is shown is what is public on the chain anyway (addresses, pseudonyms, hashes, block
data) plus the outbox's operational columns. Outbox *arguments* are never read: a row's
arguments are for the worker, and the page has no need to show them. This module must never
read keys, never write, and never let a chain outage become an error page: a chain that does
not answer is reported in ``ChainOverview.chain_error`` and the database half still shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.client import ChainClient, Event, decode_call
from teleledger.ledger.chain.storage import STATUSES, chain_cursor, chain_events, chain_outbox, decode_args
from teleledger.ledger.log.storage import log_checkpoints
from teleledger.storage.db import UnitOfWork

__all__ = [
    "AnchorRow",
    "BlockRow",
    "CallRow",
    "ChainOverview",
    "EventRow",
    "OutboxRow",
    "TxRow",
    "display",
    "overview",
    "STANDBY",
    "runtime_overview",
]

ANCHOR_EVENT = "CheckpointAnchored"
#: why a standby process (see ``runtime``) shows no blocks
STANDBY = ("this process does not hold the embedded chain: another process of this node does, and sends the "
           "chain writes recorded here; reload the page to be served by that process")


@dataclass(frozen=True)
class BlockRow:
    number: int
    hash: str
    time: str  # ISO 8601, UTC
    sealer: str
    tx_count: int


@dataclass(frozen=True)
class CallRow:
    """A decoded contract call; ``args`` are (name, display value) pairs in ABI order."""

    contract: str
    function: str
    args: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class EventRow:
    name: str  # "unknown event" when no known ABI declares it
    contract: str
    args: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TxRow:
    hash: str
    block_number: int | None
    sender: str
    to: str  # address, or "contract creation"
    call: CallRow | None  # None: a creation, or calldata no known ABI decodes
    status: str  # "success" | "reverted" | "pending"
    error: str | None
    events: tuple[EventRow, ...]
    created_contract: str | None = None


@dataclass(frozen=True)
class AnchorRow:
    block_number: int
    tx_hash: str
    origin: str
    tree_size: int
    root_hash: str  # hex, as anchored on chain
    index: int
    #: the log's signed checkpoint of that size (its body), None when this log has none
    checkpoint: str | None
    #: "match" (the chain holds the root this log signed), "mismatch", or "other log"
    verdict: str


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str
    call: str  # "Contract.function", never its arguments
    status: str
    attempts: int
    tx_hash: str | None
    block_number: int | None
    error: str | None
    updated: str


@dataclass(frozen=True)
class ChainOverview:
    mode: str
    chain_id: int | None
    head: int | None
    contracts: tuple[tuple[str, str], ...]
    blocks: tuple[BlockRow, ...]
    transactions: tuple[TxRow, ...]
    anchors: tuple[AnchorRow, ...]
    indexed_to: int | None  # the indexer's cursor: anchors up to this block are shown
    outbox_counts: tuple[tuple[str, int], ...]  # every status, in life-cycle order
    outbox: tuple[OutboxRow, ...]
    chain_error: str | None = None
    #: "active", or "standby" for a process that records chain writes another process sends
    role: str = "active"
    #: "enabled", or why this node cannot anchor (not an operator of its organization)
    anchoring: str = "enabled"


def display(value: Any) -> str:
    """One argument or event value as text: bytes as 0x-hex, lists bracketed, the rest as is."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(display(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pairs(args: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), display(v)) for k, v in args.items())


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _utc_us(micros: int) -> str:
    return _utc(micros / 1_000_000)


def _event_row(event: Event, names: Mapping[str, str]) -> EventRow:
    return EventRow(event.name or "unknown event", names.get(event.address, event.address), _pairs(event.args))


def _tx_row(client: ChainClient, tx_hash: str, names: Mapping[str, str]) -> TxRow:
    tx = client.get_transaction(tx_hash)
    receipt = client.receipt(tx_hash)
    if tx is None:  # the node forgot it between the block read and now (external node, reorg)
        return TxRow(tx_hash, None, "", "", None, "unknown", None, ())
    call = None
    decoded = decode_call(names.get(tx.to), tx.input) if tx.to else None  # a creation has no call
    if decoded is not None:
        call = CallRow(decoded[0], decoded[1], _pairs(decoded[2]))
    if receipt is None:
        status, error, events, created = "pending", None, (), None
    else:
        status = "success" if receipt.status == 1 else "reverted"
        error = receipt.error
        events = tuple(_event_row(e, names) for e in receipt.events)
        created = receipt.contract_address
        if created is not None:
            created = f"{names[created]} at {created}" if created in names else created
    return TxRow(tx.hash, tx.block_number, tx.sender, tx.to or "contract creation", call, status, error, events,
                 created)


def _chain_part(client: ChainClient, names: Mapping[str, str], *, blocks: int,
                transactions: int) -> tuple[int, int, list[BlockRow], list[TxRow]]:
    chain_id = client.chain_id()
    head = client.block_number()
    block_rows: list[BlockRow] = []
    tx_rows: list[TxRow] = []
    for number in range(head, max(-1, head - blocks), -1):
        block = client.get_block(number)
        block_rows.append(BlockRow(block.number, block.hash, _utc(block.timestamp), block.miner,
                                   len(block.tx_hashes)))
        for tx_hash in block.tx_hashes:
            if len(tx_rows) < transactions:
                tx_rows.append(_tx_row(client, tx_hash, names))
    return chain_id, head, block_rows, tx_rows


def _verdict(origin: str, root_hex: str, stored: Any | None, log_origin: str | None) -> str:
    if log_origin is not None and origin != log_origin:
        return "other log"
    if stored is None:
        return "no such checkpoint"
    return "match" if bytes(stored.root_hash).hex() == root_hex else "mismatch"


def _anchors(conn: Any, *, limit: int, log_origin: str | None) -> tuple[list[AnchorRow], int | None]:
    rows = conn.execute(
        select(chain_events.c.block_number, chain_events.c.tx_hash, chain_events.c.args)
        .where(chain_events.c.contract == "AnchorRegistry", chain_events.c.name == ANCHOR_EVENT)
        .order_by(chain_events.c.block_number.desc(), chain_events.c.log_index.desc())
        .limit(limit)
    ).all()
    decoded = [(r.block_number, r.tx_hash, decode_args(r.args)) for r in rows]
    sizes = {int(a.get("tree_size", -1)) for _, _, a in decoded}
    stored = {
        c.size: c
        for c in conn.execute(select(log_checkpoints.c.size, log_checkpoints.c.root_hash, log_checkpoints.c.note)
                              .where(log_checkpoints.c.size.in_(sizes))).all()
    } if sizes else {}
    out = []
    for block_number, tx_hash, args in decoded:
        origin = str(args.get("origin", ""))
        size = int(args.get("tree_size", -1))
        root = display(args.get("root_hash", b"")).removeprefix("0x")
        own = stored.get(size) if log_origin is None or origin == log_origin else None
        note = own.note if own is not None else None
        out.append(AnchorRow(int(block_number), tx_hash, origin, size, root, int(args.get("index", -1)),
                             note, _verdict(origin, root, own, log_origin)))
    cursor = conn.execute(select(chain_cursor.c.block_number).where(chain_cursor.c.name == "events")).scalar()
    return out, None if cursor is None else int(cursor)


def _outbox(conn: Any, *, limit: int) -> tuple[list[tuple[str, int]], list[OutboxRow]]:
    counts = dict(conn.execute(select(chain_outbox.c.status, func.count()).group_by(chain_outbox.c.status)).all())
    ordered = [(s, int(counts.pop(s, 0))) for s in STATUSES] + sorted((str(k), int(v)) for k, v in counts.items())
    # the columns named here are all the page may show: ``args`` and ``raw_tx`` are never read
    rows = conn.execute(
        select(chain_outbox.c.id, chain_outbox.c.kind, chain_outbox.c.contract, chain_outbox.c.fn,
               chain_outbox.c.status, chain_outbox.c.attempts, chain_outbox.c.tx_hash, chain_outbox.c.block_number,
               chain_outbox.c.error, chain_outbox.c.updated)
        .order_by(chain_outbox.c.id.desc()).limit(limit)
    ).all()
    return ordered, [OutboxRow(int(r.id), r.kind, f"{r.contract}.{r.fn}", r.status, int(r.attempts or 0), r.tx_hash,
                               r.block_number, r.error, _utc_us(int(r.updated))) for r in rows]


def runtime_overview(runtime: Any, *, log_origin: str | None = None, **limits: int) -> ChainOverview:
    """``overview`` of the node's ``ChainRuntime``: its client (none on a standby process, whose
    page then shows the database half), deployment, engine and anchoring state."""
    view = overview(runtime.client, runtime.addresses, runtime.engine, log_origin=log_origin,
                    mode=runtime.mode, **limits)
    return replace(view, role="active" if runtime.active else "standby",
                   anchoring="enabled" if runtime.registration_error is None else runtime.registration_error)


def overview(client: ChainClient | None, addresses: Mapping[str, str], engine: Engine, *,
             log_origin: str | None = None, mode: str | None = None, blocks: int = 10, transactions: int = 25,
             anchors: int = 20, outbox_rows: int = 25) -> ChainOverview:
    """One page of the explorer. ``addresses`` maps contract name → address (the deployment);
    ``log_origin`` is this node's log origin, so anchors of other organizations' logs are told
    apart from a mismatch. Without a ``client`` only the database half is read."""
    names = {address: name for name, address in addresses.items()}
    chain_error = None
    chain_id = head = None
    block_rows: Sequence[BlockRow] = ()
    tx_rows: Sequence[TxRow] = ()
    if client is None:
        chain_error = STANDBY
    else:
        try:
            chain_id, head, block_rows, tx_rows = _chain_part(client, names, blocks=blocks,
                                                              transactions=transactions)
        except TeleledgerError as exc:  # unreachable (ChainUnavailable), misconfigured, refusing: say so
            chain_error = exc.message
    try:
        with UnitOfWork(engine) as uow:
            anchor_rows, indexed_to = _anchors(uow.c, limit=anchors, log_origin=log_origin)
            counts, queue = _outbox(uow.c, limit=outbox_rows)
    except SQLAlchemyError as exc:  # pragma: no cover - the database answered the sign-in a moment ago
        raise TeleledgerError("the chain tables cannot be read") from exc
    return ChainOverview(mode or getattr(client, "mode", "unknown"), chain_id, head, tuple(sorted(addresses.items())),
                         tuple(block_rows), tuple(tx_rows), tuple(anchor_rows), indexed_to, tuple(counts),
                         tuple(queue), chain_error)
