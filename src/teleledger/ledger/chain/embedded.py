"""The embedded chain: an in-process py-evm (Cancun) persisted in one SQLite file.

It is the default chain of a single node and implements ``client.ChainClient`` exactly like
``rpc.JsonRpcChain``, so nothing else can tell them apart.

Storage (``<path>/chain.sqlite3``, WAL, ``synchronous=FULL``):

    kv(k BLOB PRIMARY KEY, v BLOB)   py-evm's key-value database (trie nodes, headers, blocks,
                                     receipts, canonical head) behind ``eth.db.atomic.AtomicDB``
    txs(hash, block, idx, status, gas_used, contract_address, error)   receipt index
    logs(block, log_index, tx_hash, address, topics, data)             log index for get_logs
    seals(number, hash, signature)   the authority's 65-byte secp256k1 signature over each block hash
    meta(k, v)                       chain_id and authority address, checked on reopen

Durability: every sealed block — its state, header, body, receipts, log index and seal — is
written in ONE SQLite transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) and ``transact`` returns
only after that commit. A ``kill -9`` therefore never loses an acknowledged transaction and never
leaves half a block: an interrupted transaction is rolled back by SQLite, and reopening restores
the last committed head.

Sealing (proof of authority, single sealer): the block's ``coinbase`` is the authority address
and the signature over the block hash lives in ``seals`` (the Cancun header's ``extraData`` is
limited to 32 bytes, too small for a 65-byte Clique-style seal). Gas is free (base fee 0, gas
price 0) so relayed senders need no balance; a block is sealed per batch: concurrent
``transact`` calls queue their transactions and whichever caller gets the seal lock next seals
everything queued into one block (group commit, one fsync per block). Block timestamps are
``max(now, parent)``: several blocks may share a second (like Hardhat's
``allowBlocksWithSameTimestamp``), because the usual ``parent + 1`` rule would either cap the chain
at one block per second or run its clock ahead of the wall clock, and contracts compare
``block.timestamp`` with signature deadlines.

A transaction that reverts is still included (its nonce is used, ``status`` 0), exactly as on an
external node; ``transact`` then raises ``ChainRevert`` with the contract's reason.
Signature recovery goes through eth_keys, which uses libsecp256k1 (coincurve) when installed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth import constants
from eth.chains.base import MiningChain
from eth.db.atomic import AtomicDB
from eth.db.backends.base import BaseDB
from eth.vm.forks.cancun import CancunVM
from eth.vm.spoof import SpoofTransaction
from eth_keys import keys
from eth_utils import to_canonical_address, to_checksum_address

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.client import (
    Block,
    ChainMisconfigured,
    ChainRevert,
    Event,
    Receipt,
    contract_abi,
    decode_event,
    private_key,
    revert_reason,
)

DEFAULT_CHAIN_ID = 1337
#: per-transaction gas limit; gas is free here, the limit only bounds runaway code
TX_GAS = 15_000_000
#: large enough that a batch never hits the block gas limit
BLOCK_GAS_LIMIT = TX_GAS * 4096
DB_FILE = "chain.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seals (number INTEGER PRIMARY KEY, hash BLOB NOT NULL, signature BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS txs (hash BLOB PRIMARY KEY, block INTEGER NOT NULL, idx INTEGER NOT NULL,
    status INTEGER NOT NULL, gas_used INTEGER NOT NULL, contract_address BLOB, error TEXT);
CREATE TABLE IF NOT EXISTS logs (block INTEGER NOT NULL, log_index INTEGER NOT NULL, tx_hash BLOB NOT NULL,
    address BLOB NOT NULL, topics BLOB NOT NULL, data BLOB NOT NULL, PRIMARY KEY (block, log_index));
CREATE INDEX IF NOT EXISTS logs_by_address ON logs (address, block);
"""


class AuthorityVM(CancunVM):
    """Cancun, except that a block may share its parent's timestamp (see the module docstring)."""

    @classmethod
    def validate_header(cls, header: Any, parent_header: Any) -> None:
        if parent_header is not None and header.timestamp == parent_header.timestamp:
            # every other rule still applies: validate as if one second had passed
            header = header.copy(timestamp=header.timestamp + 1)
        super().validate_header(header, parent_header)


class SQLiteKV(BaseDB):
    """py-evm's ``BaseDB`` over the ``kv`` table of an open SQLite connection.

    Writes join whatever SQLite transaction the connection has open (the sealer's); the
    connection runs in autocommit mode otherwise.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getitem__(self, key: bytes) -> bytes:
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    def __delitem__(self, key: bytes) -> None:
        if self._conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def _exists(self, key: bytes) -> bool:
        return self._conn.execute("SELECT 1 FROM kv WHERE k = ?", (key,)).fetchone() is not None


@dataclass
class _Pending:
    key: keys.PrivateKey
    to: bytes  # b"" for a contract creation
    data: bytes
    future: Future[Receipt]


def _topic_bytes(topic: int) -> bytes:
    return topic.to_bytes(32, "big")


class EmbeddedChain:
    """An in-process, persistent, authority-sealed EVM chain (see the module docstring)."""

    mode = "embedded"

    def __init__(self, path: Path | str, authority_key: Any, *, chain_id: int = DEFAULT_CHAIN_ID) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._authority = private_key(authority_key)
        self.authority_address = self._authority.public_key.to_checksum_address()
        self._chain_id = chain_id
        self._lock = threading.RLock()  # guards py-evm and the SQLite connection
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._conn = sqlite3.connect(self.path / DB_FILE, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._chain_class = MiningChain.configure(
            __name__="TeleledgerEmbeddedChain", vm_configuration=((constants.GENESIS_BLOCK_NUMBER, AuthorityVM),),
            chain_id=chain_id,
        )
        self._db = AtomicDB(SQLiteKV(self._conn))
        with self._lock:
            self._open()

    # --- lifecycle ------------------------------------------------------------------------------

    def _open(self) -> None:
        meta = dict(self._conn.execute("SELECT k, v FROM meta").fetchall())
        if not meta:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._chain = self._chain_class.from_genesis(
                    self._db,
                    {
                        "difficulty": 0,
                        "gas_limit": BLOCK_GAS_LIMIT,
                        "timestamp": int(time.time()),
                        "coinbase": to_canonical_address(self.authority_address),
                        "base_fee_per_gas": 0,
                        "nonce": b"\x00" * 8,
                    },
                    {},
                )
                genesis = self._chain.get_canonical_head()
                self._conn.execute(
                    "INSERT INTO seals VALUES (?, ?, ?)",
                    (0, genesis.hash, self._authority.sign_msg_hash(genesis.hash).to_bytes()),
                )
                self._conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("chain_id", str(self._chain_id)), ("authority", self.authority_address)],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return
        if int(meta["chain_id"]) != self._chain_id:
            raise ChainMisconfigured(
                f"the embedded chain at {self.path} has chain id {meta['chain_id']}, expected {self._chain_id}; "
                "use the chain id it was created with or move the directory aside to start a new chain"
            )
        if meta["authority"] != self.authority_address:
            raise ChainMisconfigured(
                f"the embedded chain at {self.path} is sealed by {meta['authority']}, but the configured "
                f"authority key is {self.authority_address}; restore the original authority.key"
            )
        self._chain = self._chain_class(self._db)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- reads ----------------------------------------------------------------------------------

    def chain_id(self) -> int:
        return self._chain_id

    def block_number(self) -> int:
        with self._lock:
            return int(self._chain.get_canonical_head().block_number)

    def get_code(self, address: str) -> bytes:
        with self._lock:
            return bytes(self._chain.get_vm().state.get_code(to_canonical_address(address)))

    def get_block(self, number: int) -> Block:
        with self._lock:
            block = self._chain.get_canonical_block_by_number(number)
        h = block.header
        return Block(
            number=h.block_number, hash="0x" + h.hash.hex(), parent_hash="0x" + h.parent_hash.hex(),
            timestamp=h.timestamp, miner=to_checksum_address(h.coinbase),
            tx_hashes=tuple("0x" + tx.hash.hex() for tx in block.transactions),
        )

    def seal_of(self, number: int) -> bytes:
        """The authority's signature over block ``number``'s hash (verify with eth_keys)."""
        row = self._conn.execute("SELECT signature FROM seals WHERE number = ?", (number,)).fetchone()
        if row is None:
            raise TeleledgerError(f"no sealed block {number}")
        return bytes(row[0])

    def call(self, address: str, abi_name: str, fn: str, *args: Any) -> Any:
        abi = contract_abi(abi_name)
        data = abi.encode_call(fn, args)
        with self._lock:
            vm = self._chain.get_vm()
            unsigned = vm.get_transaction_builder().create_unsigned_transaction(
                nonce=0, gas_price=0, gas=TX_GAS, to=to_canonical_address(address), value=0, data=data
            )
            tx = SpoofTransaction(unsigned, from_=constants.ZERO_ADDRESS)
            with vm.in_costless_state() as state:
                computation = state.costless_execute_transaction(tx)
        if computation.is_error:
            raise ChainRevert(self._reason(computation))
        return abi.decode_result(fn, len(args), computation.output)

    def get_logs(self, address: str | None, from_block: int, to_block: int | None = None) -> list[Event]:
        sql = "SELECT block, log_index, tx_hash, address, topics, data FROM logs WHERE block >= ?"
        params: list[Any] = [from_block]
        if to_block is not None:
            sql += " AND block <= ?"
            params.append(to_block)
        if address is not None:
            sql += " AND address = ?"
            params.append(to_canonical_address(address))
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY block, log_index", params).fetchall()
        return [
            decode_event(
                bytes(addr), [bytes(topics[i:i + 32]) for i in range(0, len(topics), 32)], bytes(data),
                block_number=block, tx_hash="0x" + bytes(tx).hex(), log_index=idx,
            )
            for block, idx, tx, addr, topics, data in rows
        ]

    # --- writes ---------------------------------------------------------------------------------

    def deploy(self, name: str, *args: Any, sender: Any) -> str:
        receipt = self._submit(private_key(sender), b"", contract_abi(name).encode_deploy(args))
        assert receipt.contract_address is not None
        return receipt.contract_address

    def transact(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any) -> Receipt:
        data = contract_abi(abi_name).encode_call(fn, args)
        return self._submit(private_key(sender), to_canonical_address(address), data)

    def _submit(self, key: keys.PrivateKey, to: bytes, data: bytes) -> Receipt:
        pending = _Pending(key, to, data, Future())
        with self._queue_lock:
            self._queue.append(pending)
        # group commit: whoever holds the lock next seals everything queued, ours included
        with self._lock:
            if not pending.future.done():
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._seal(batch)
        return pending.future.result()

    def _seal(self, batch: list[_Pending]) -> None:
        try:
            self._seal_block(batch)
        except Exception as exc:
            self._chain = self._chain_class(self._db)  # drop py-evm's view of the rolled-back block
            if len(batch) > 1:
                for item in batch:  # isolate the transaction py-evm refused
                    self._seal([item])
                return
            error = exc if isinstance(exc, TeleledgerError) else TeleledgerError(
                f"the embedded chain refused the transaction: {exc}")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)

    def _seal_block(self, batch: list[_Pending]) -> None:
        chain = self._chain
        parent = chain.get_canonical_head()
        chain.header = chain.header.copy(
            gas_limit=BLOCK_GAS_LIMIT, timestamp=max(int(time.time()), parent.timestamp),
            coinbase=to_canonical_address(self.authority_address),
        )
        vm = chain.get_vm()
        builder = vm.get_transaction_builder()
        nonces: dict[bytes, int] = {}
        txs = []
        for item in batch:
            sender = item.key.public_key.to_canonical_address()
            if sender not in nonces:
                nonces[sender] = vm.state.get_nonce(sender)
            unsigned = builder.create_unsigned_transaction(
                nonce=nonces[sender], gas_price=0, gas=TX_GAS, to=item.to, value=0, data=item.data
            )
            nonces[sender] += 1
            txs.append(unsigned.as_signed_transaction(item.key, chain_id=self._chain_id))

        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result, receipts, computations = chain.mine_all(txs)
            block = result.imported_block
            number = block.number
            self._conn.execute(
                "INSERT INTO seals VALUES (?, ?, ?)",
                (number, block.hash, self._authority.sign_msg_hash(block.hash).to_bytes()),
            )
            outcomes: list[Receipt | ChainRevert] = []
            previous_gas = 0
            log_index = 0
            for idx, (tx, receipt, computation) in enumerate(zip(txs, receipts, computations)):
                gas_used = receipt.gas_used - previous_gas
                previous_gas = receipt.gas_used
                tx_hash = "0x" + tx.hash.hex()
                ok = not computation.is_error
                created = None
                if ok and not tx.to:
                    created = to_checksum_address(computation.msg.storage_address)
                error = None if ok else self._reason(computation)
                self._conn.execute(
                    "INSERT INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tx.hash, number, idx, int(ok), gas_used,
                     to_canonical_address(created) if created else None, error),
                )
                events = []
                for log in receipt.logs:
                    topics = [_topic_bytes(t) for t in log.topics]
                    self._conn.execute(
                        "INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?)",
                        (number, log_index, tx.hash, log.address, b"".join(topics), log.data),
                    )
                    events.append(decode_event(log.address, topics, log.data, block_number=number,
                                               tx_hash=tx_hash, log_index=log_index))
                    log_index += 1
                outcomes.append(
                    Receipt(tx_hash, number, int(ok), gas_used, created, tuple(events)) if ok
                    else ChainRevert(error or "reverted")
                )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        # acknowledged only now, after the block is durable
        for item, outcome in zip(batch, outcomes):
            if isinstance(outcome, Receipt):
                item.future.set_result(outcome)
            else:
                item.future.set_exception(outcome)

    @staticmethod
    def _reason(computation: Any) -> str:
        error = computation.error
        data = error.args[0] if error.args and isinstance(error.args[0], bytes) else None
        if data is None and type(error).__name__ != "Revert":
            return f"{type(error).__name__}: {error}"
        return revert_reason(data)
