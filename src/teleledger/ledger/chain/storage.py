"""The chain's SQL tables: the outbox of chain writes, and the indexer's projection of chain events.

Tables (on ``teleledger.storage.tables.metadata``; times are µs since the epoch, UTC)
-------------------------------------------------------------------------------------

    chain_outbox    one row per chain write a committed change needs (``outbox.enqueue``)
                    id (PK, autoincrement: the order rows of one sender are signed in)
                    kind             what it is for ("anchor", "consent", ...), for status pages
                    idempotency_key  UNIQUE: the same key never makes a second row (or a second tx)
                    contract, fn     contract name (``CONTRACT_NAMES``) and function
                    args             JSON of the call's arguments (``encode_args``)
                    sender           keystore key id of the signer ("node:authority")
                    status           pending → sent → done, or failed (reverted: never retried)
                    attempts         consecutive failed submission attempts (the backoff grows with them)
                    next_attempt_at  µs; not retried before
                    nonce, tx_hash, raw_tx   set together, committed BEFORE the first send
                    block_number     block that included the tx (cleared again by a reorg)
                    error            last error: the revert reason of a failed row, or why a
                                     pending/sent row waits (never a key, never PHI)
                    created, updated
    chain_cursor    name (PK, "events"), block_number, block_hash, updated
                    the indexer's position: every block <= block_number is projected
    chain_blocks    number (PK), hash: recent blocks the indexer processed (for reorg detection)
    chain_events    (block_number, log_index) PK, tx_hash, contract (name), address, name,
                    args (JSON, ``encode_args``): every log of the known contracts

``args`` JSON: a list (or object) where byte strings are ``{"$b": "<hex>"}`` and tuples are lists,
so bytes32 and string arguments survive the round trip distinctly; integers of any size stay
JSON integers. The module holds no logic beyond the codec: it must never talk to a chain.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from teleledger.storage.tables import metadata

__all__ = [
    "STATUSES",
    "chain_blocks",
    "chain_cursor",
    "chain_events",
    "chain_outbox",
    "decode_args",
    "encode_args",
]

# BIGINT on PostgreSQL; INTEGER on SQLite so that the primary key is the rowid
_BigId = BigInteger().with_variant(Integer(), "sqlite")

STATUSES = ("pending", "sent", "done", "failed")

chain_outbox = Table(
    "chain_outbox",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    Column("contract", String(64), nullable=False),
    Column("fn", String(64), nullable=False),
    Column("args", Text, nullable=False),
    Column("sender", String(160), nullable=False),
    Column("status", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("nonce", BigInteger, nullable=True),
    Column("tx_hash", String(66), nullable=True),
    Column("raw_tx", LargeBinary, nullable=True),
    Column("block_number", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    sqlite_autoincrement=True,  # ids never reused: they order a sender's writes
)
# the worker's scan: a sender's open rows in id order
Index("ix_chain_outbox_open", chain_outbox.c.status, chain_outbox.c.sender, chain_outbox.c.id)
Index("ix_chain_outbox_kind", chain_outbox.c.kind, chain_outbox.c.id)

chain_cursor = Table(
    "chain_cursor",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("block_number", BigInteger, nullable=False),
    Column("block_hash", String(66), nullable=False),
    Column("updated", BigInteger, nullable=False),
)

chain_blocks = Table(
    "chain_blocks",
    metadata,
    Column("number", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(66), nullable=False),
)

chain_events = Table(
    "chain_events",
    metadata,
    Column("block_number", BigInteger, primary_key=True, autoincrement=False),
    Column("log_index", Integer, primary_key=True, autoincrement=False),
    Column("tx_hash", String(66), nullable=False),
    Column("contract", String(64), nullable=False),
    Column("address", String(42), nullable=False),
    Column("name", String(64), nullable=True),  # None: no known ABI declares the log's topic
    Column("args", Text, nullable=False),
)
Index("ix_chain_events_name", chain_events.c.name, chain_events.c.block_number)


# --------------------------------------------------------------------------- args codec

_BYTES = "$b"


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES: bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        if _BYTES in value:
            raise TypeError(f"an argument object may not use the reserved key {_BYTES!r}")
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot store a chain argument of type {type(value).__name__}")


def _typed(value: Any) -> Any:
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_BYTES}:
            return bytes.fromhex(value[_BYTES])
        return {k: _typed(v) for k, v in value.items()}
    return value


def encode_args(args: Any) -> str:
    """JSON of call arguments / event args, bytes as ``{"$b": hex}`` (see the module docstring)."""
    return json.dumps(_plain(args), separators=(",", ":"), sort_keys=True)


def decode_args(text: str) -> Any:
    """The inverse of ``encode_args`` (tuples come back as lists, which the ABI encoder takes)."""
    return _typed(json.loads(text))
