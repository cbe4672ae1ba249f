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
written in ONE SQLite transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) and ``transact`` /
``send_raw`` return only after that commit. A ``kill -9`` therefore never loses an acknowledged
transaction and never leaves half a block: an interrupted transaction is rolled back by SQLite,
and reopening restores the last committed head. py-evm's writes for a block are buffered in
memory (``SQLiteKV``) and reach SQLite in one ``executemany`` inside that same transaction; a
block that fails is discarded with its buffer.

Sealing (proof of authority, single sealer): the block's ``coinbase`` is the authority address
and the signature over the block hash lives in ``seals`` (the Cancun header's ``extraData`` is
limited to 32 bytes, too small for a 65-byte Clique-style seal). Gas is free (base fee 0, gas
price 0) so relayed senders need no balance. One sealer thread per chain builds the blocks:
``transact`` and ``send_raw`` callers queue their transactions and wait; the sealer takes
everything queued (after a few milliseconds at most for callers it just answered, see
``_gather``) into one block — group commit, one fsync per block — and answers each caller after
the commit. Block timestamps are ``max(now, parent)``: several blocks may share a second (like Hardhat's
``allowBlocksWithSameTimestamp``), because the usual ``parent + 1`` rule would either cap the chain
at one block per second or run its clock ahead of the wall clock, and contracts compare
``block.timestamp`` with signature deadlines.

``send_raw`` takes a list all or nothing: every transaction of the list that the chain does not
already hold goes into the same block, or — when one of them cannot be included (a nonce another
transaction used: ``NonceConflict``; a nonce gap, wrong chain id or bad signature:
``InvalidTransaction``) — none does. The embedded chain keeps no pool, so a transaction is either
included or refused, never pending.

A transaction that reverts is still included (its nonce is used, ``status`` 0), exactly as on an
external node; ``transact`` then raises ``ChainRevert`` with the contract's reason, ``receipt``
carries it in ``error``. Signature recovery goes through eth_keys, which uses libsecp256k1
(coincurve) when installed — once per transaction (``_SealingLegacyTransaction``).

Throughput (``bench/bench_chain.py``) is bound by py-evm's Python code, not by SQLite. The
chain runs py-evm's Cancun VM with two of its hot spots replaced, results unchanged: the opcode
loop, the ecrecover precompile and sender recovery (``interpreter``), and the Merkle Patricia
tries — account, storage, transactions, receipts — written once per block instead of once per
key (``trie``). ``EmbeddedChain(fast_evm=False)`` runs py-evm's own code instead (the
reference the benchmark and ``tests/chain/test_fast_interpreter.py`` compare with). Besides:
py-evm's writes are buffered per block and committed values cached in memory (``SQLiteKV``);
blocks are built by ``_mine`` without ``mine_all``'s re-validation and read-back;
per-transaction work py-evm does twice or needlessly is skipped (``AuthorityVM``,
``_SealingLegacyTransaction``).

This module must never acknowledge a transaction before its block is committed, and never write
outside the one transaction of the block being sealed (opening a new chain is the genesis block).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rlp
from eth import constants
from eth.chains.base import MiningChain
from eth.db.atomic import AtomicDB
from eth.db.backends.base import BaseDB
from eth.vm.forks.cancun import CancunVM
from eth.vm.forks.cancun.state import CancunState
from eth.vm.forks.cancun.transactions import CancunLegacyTransaction, CancunTransactionBuilder
from eth.vm.spoof import SpoofTransaction
from eth_keys import keys
from eth_keys.exceptions import BadSignature
from eth_utils import keccak, to_canonical_address, to_checksum_address

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.client import (
    Block,
    ChainMisconfigured,
    ChainRevert,
    ChainUnavailable,
    Event,
    InvalidTransaction,
    NonceConflict,
    Receipt,
    SignedTx,
    Transaction,
    contract_abi,
    decode_event,
    private_key,
    revert_reason,
    sign_transaction,
)
from teleledger.ledger.chain.interpreter import FastState, recover_signer
from teleledger.ledger.chain.trie import trie_root_and_nodes

DEFAULT_CHAIN_ID = 1337
#: per-transaction gas limit; gas is free here, the limit only bounds runaway code
TX_GAS = 15_000_000
#: large enough that a batch never hits the block gas limit
BLOCK_GAS_LIMIT = TX_GAS * 4096
DB_FILE = "chain.sqlite3"
#: longest a sealer waits for more transactions to join its block (see ``_gather``)
GATHER_SECONDS = 0.005
GATHER_STEP_SECONDS = 0.0005
#: committed key-value pairs kept in memory (≈ 40 MB at most): trie nodes are content-addressed,
#: so a cached node never goes stale, and the few mutable keys (canonical head, number -> hash)
#: are written only through this object — one process owns a chain directory at a time
KV_CACHE_ENTRIES = 65_536

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
    """Cancun, except that a block may share its parent's timestamp (see the module docstring).

    Two per-transaction steps py-evm spends on work this chain does not need are skipped: the
    blob-gas header update (the chain takes legacy transactions only, which carry no blobs;
    each update is a header copy) and ``validate_receipt``, which re-checks that the receipt
    py-evm itself just built lists its logs in its own bloom filter (a keccak per topic).
    Execution and tries are py-evm's, made faster by ``interpreter`` and ``trie``.
    """

    _state_class = FastState

    @classmethod
    def validate_header(cls, header: Any, parent_header: Any) -> None:
        if parent_header is not None and header.timestamp == parent_header.timestamp:
            # every other rule still applies: validate as if one second had passed
            header = header.copy(timestamp=header.timestamp + 1)
        super().validate_header(header, parent_header)

    def increment_blob_gas_used(self, old_header: Any, transaction: Any) -> Any:
        if transaction.type_id is None:  # legacy: no blobs
            return old_header
        return super().increment_blob_gas_used(old_header, transaction)

    @classmethod
    def validate_receipt(cls, receipt: Any) -> None:
        return None

    def set_block_transactions_and_withdrawals(
        self, base_block: Any, new_header: Any, transactions: Any, receipts: Any, withdrawals: Any = None,
    ) -> Any:
        """py-evm's method with its transaction and receipt tries built by ``trie.trie_root_and_nodes``
        (each node encoded and hashed once, instead of once per inserted item)."""
        if withdrawals:  # never on this chain; py-evm's own path keeps it exact if it ever were
            return super().set_block_transactions_and_withdrawals(base_block, new_header, transactions, receipts,
                                                                  withdrawals)
        tx_root, tx_nodes = trie_root_and_nodes(tx.encode() for tx in transactions)
        self.chaindb.persist_trie_data_dict(tx_nodes)
        receipt_root, receipt_nodes = trie_root_and_nodes(r.encode() for r in receipts)
        self.chaindb.persist_trie_data_dict(receipt_nodes)
        return base_block.copy(
            transactions=transactions,
            header=new_header.copy(transaction_root=tx_root, receipt_root=receipt_root),
        )


class ReferenceAuthorityVM(AuthorityVM):
    """``AuthorityVM`` on py-evm's own opcode loop, precompiles and tries (no ``interpreter``, no
    ``trie`` inside the VM): the reference to compare with (``EmbeddedChain(fast_evm=False)``)."""

    _state_class = CancunState
    set_block_transactions_and_withdrawals = CancunVM.set_block_transactions_and_withdrawals


class _SealingLegacyTransaction(CancunLegacyTransaction):
    """A legacy transaction as the sealer handles it: hashed once, its signer recovered once.

    py-evm recomputes ``hash`` (an RLP encoding and a keccak) on every access, and its signature
    check recovers the signer and then verifies the signature against it — on top of the
    recovery behind ``sender``. Recovering the signer already proves the signature valid
    (libsecp256k1 refuses to recover from an invalid one), so the check is the recovery,
    done once and cached; and it calls libsecp256k1 directly (``interpreter.recover_signer``).
    """

    @cached_property
    def hash(self) -> bytes:  # type: ignore[override]
        return keccak(rlp.encode(self))

    def check_signature_validity(self) -> None:
        self.sender  # noqa: B018 - recovers (raises on a bad signature) and caches

    def get_sender(self) -> bytes:
        signer = recover_signer(keccak(self.get_message_for_signing()), self.y_parity, self.r, self.s)
        if signer is None:
            raise BadSignature("the transaction signature does not recover a key")
        return signer


class _SealingTransactionBuilder(CancunTransactionBuilder):
    legacy_signed = _SealingLegacyTransaction


_DELETED = None


class SQLiteKV(BaseDB):
    """py-evm's ``BaseDB`` over the ``kv`` table, buffering the writes of the block being sealed.

    Between ``begin()`` and ``flush()`` writes stay in memory (reads see them); ``flush()`` sends
    them in one ``executemany`` into the caller's open SQLite transaction; ``committed()`` moves
    them into the read cache once that transaction committed, ``discard()`` drops them when it
    did not. A write outside ``begin()`` is a bug (it would commit on its own) and raises.
    """

    def __init__(self, conn: sqlite3.Connection, *, cache_entries: int = KV_CACHE_ENTRIES) -> None:
        self._conn = conn
        self._pending: dict[bytes, bytes | None] | None = None
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_entries = cache_entries

    def begin(self) -> None:
        self._pending = {}

    def flush(self) -> None:
        assert self._pending is not None, "flush() outside begin()"
        writes = [(k, v) for k, v in self._pending.items() if v is not _DELETED]
        deletes = [(k,) for k, v in self._pending.items() if v is _DELETED]
        if writes:
            self._conn.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", writes)
        if deletes:
            self._conn.executemany("DELETE FROM kv WHERE k = ?", deletes)

    def committed(self) -> None:
        pending, self._pending = self._pending or {}, None
        for k, v in pending.items():
            if v is _DELETED:
                self._cache.pop(k, None)
            else:
                self._remember(k, v)

    def discard(self) -> None:
        self._pending = None

    def _remember(self, key: bytes, value: bytes) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def __getitem__(self, key: bytes) -> bytes:
        if self._pending is not None and key in self._pending:
            value = self._pending[key]
            if value is _DELETED:
                raise KeyError(key)
            return value
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        value = bytes(row[0])
        self._remember(key, value)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._writing()[key] = bytes(value)

    def __delitem__(self, key: bytes) -> None:
        pending = self._writing()
        if not self._exists(key):
            raise KeyError(key)
        pending[key] = _DELETED

    def _writing(self) -> dict[bytes, bytes | None]:
        if self._pending is None:
            raise TeleledgerError("the embedded chain wrote outside a block's transaction (a bug)")
        return self._pending

    def _exists(self, key: bytes) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True


@dataclass
class _Call:
    """A ``transact``/``deploy``: signed at sealing time with the sender's next nonce."""

    key: keys.PrivateKey
    to: bytes  # b"" for a contract creation
    data: bytes
    future: Future[Receipt] = field(default_factory=Future)


@dataclass
class _Raws:
    """A ``send_raw`` list: py-evm transactions decoded from the caller's signed bytes."""

    txs: list[Any]
    future: Future[list[str]] = field(default_factory=Future)


def _topic_bytes(topic: int) -> bytes:
    return topic.to_bytes(32, "big")


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


class EmbeddedChain:
    """An in-process, persistent, authority-sealed EVM chain (see the module docstring)."""

    mode = "embedded"

    def __init__(self, path: Path | str, authority_key: Any, *, chain_id: int = DEFAULT_CHAIN_ID,
                 fast_evm: bool = True) -> None:
        """``fast_evm=False`` executes on py-evm's own interpreter and tries (``ReferenceAuthorityVM``):
        the same chain, slower; the baseline ``bench/bench_chain.py --py-evm-baseline`` measures."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._authority = private_key(authority_key)
        self.authority_address = self._authority.public_key.to_checksum_address()
        self._chain_id = chain_id
        self._lock = threading.RLock()  # guards py-evm and the SQLite connection
        self._queue_lock = threading.Lock()
        self._queued = threading.Condition(self._queue_lock)  # wakes the sealer
        self._queue: list[_Call | _Raws] = []
        self._closed = False
        self._conn = sqlite3.connect(self.path / DB_FILE, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._chain_class = MiningChain.configure(
            __name__="TeleledgerEmbeddedChain",
            vm_configuration=((constants.GENESIS_BLOCK_NUMBER, AuthorityVM if fast_evm else ReferenceAuthorityVM),),
            chain_id=chain_id,
        )
        self._kv = SQLiteKV(self._conn)
        self._db = AtomicDB(self._kv)
        self._builder = _SealingTransactionBuilder
        with self._lock:
            self._open()
        self._sealer = threading.Thread(target=self._seal_loop, name=f"chain-sealer-{self.path.name}", daemon=True)
        self._sealer.start()

    # --- lifecycle ------------------------------------------------------------------------------

    def _open(self) -> None:
        meta = dict(self._conn.execute("SELECT k, v FROM meta").fetchall())
        if not meta:
            self._write_block(self._genesis)
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

    def _genesis(self) -> None:
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

    def _write_block(self, write: Any) -> Any:
        """Run ``write`` inside one SQLite transaction with py-evm's writes buffered (see the docstring)."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._kv.begin()
        try:
            result = write()
            self._kv.flush()
            self._conn.execute("COMMIT")
        except BaseException:
            self._kv.discard()
            self._conn.execute("ROLLBACK")
            raise
        self._kv.committed()
        return result

    def close(self) -> None:
        """Seal what is queued, stop the sealer, close the database. Idempotent."""
        with self._queued:
            self._closed = True
            self._queued.notify()
        if self._sealer is not threading.current_thread():
            self._sealer.join()
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
            number=h.block_number, hash=_hex(h.hash), parent_hash=_hex(h.parent_hash),
            timestamp=h.timestamp, miner=to_checksum_address(h.coinbase),
            tx_hashes=tuple(_hex(tx.hash) for tx in block.transactions),
        )

    def seal_of(self, number: int) -> bytes:
        """The authority's signature over block ``number``'s hash (verify with eth_keys)."""
        with self._lock:
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
        return [self._event_of_row(row) for row in rows]

    @staticmethod
    def _event_of_row(row: tuple[Any, ...]) -> Event:
        block, idx, tx, addr, topics, data = row
        return decode_event(
            bytes(addr), [bytes(topics[i:i + 32]) for i in range(0, len(topics), 32)], bytes(data),
            block_number=block, tx_hash=_hex(bytes(tx)), log_index=idx,
        )

    def nonce(self, address: str) -> int:
        sender = to_canonical_address(address)
        with self._lock:
            nonce = int(self._chain.get_vm().state.get_nonce(sender))
            with self._queue_lock:
                queued = list(self._queue)
        # transactions queued for the next block count as pending
        for item in queued:
            if isinstance(item, _Call):
                if item.key.public_key.to_canonical_address() == sender:
                    nonce += 1
            else:
                for tx in item.txs:
                    if tx.sender == sender and tx.nonce >= nonce:
                        nonce = tx.nonce + 1
        return nonce

    def receipt(self, tx_hash: str) -> Receipt | None:
        key = _tx_hash_bytes(tx_hash)
        with self._lock:
            row = self._conn.execute(
                "SELECT block, status, gas_used, contract_address, error FROM txs WHERE hash = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            block, status, gas_used, created, error = row
            logs = self._conn.execute(
                "SELECT block, log_index, tx_hash, address, topics, data FROM logs WHERE block = ? AND tx_hash = ?"
                " ORDER BY log_index", (block, key),
            ).fetchall()
        return Receipt(
            tx_hash=_hex(key), block_number=block, status=status, gas_used=gas_used,
            contract_address=to_checksum_address(bytes(created)) if created else None,
            events=tuple(self._event_of_row(r) for r in logs), error=error,
        )

    def get_transaction(self, tx_hash: str) -> Transaction | None:
        key = _tx_hash_bytes(tx_hash)
        with self._lock:
            row = self._conn.execute("SELECT block, idx FROM txs WHERE hash = ?", (key,)).fetchone()
            if row is None:
                return None  # never pending: the embedded chain includes or refuses at once
            tx = self._chain.get_canonical_transaction_by_index(row[0], row[1])
        return Transaction(
            hash=_hex(key), sender=to_checksum_address(tx.sender), to=to_checksum_address(tx.to) if tx.to else None,
            nonce=tx.nonce, input=bytes(tx.data), block_number=row[0],
        )

    # --- writes ---------------------------------------------------------------------------------

    def deploy(self, name: str, *args: Any, sender: Any) -> str:
        receipt = self._submit(_Call(private_key(sender), b"", contract_abi(name).encode_deploy(args)))
        assert receipt.contract_address is not None
        return receipt.contract_address

    def transact(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any) -> Receipt:
        data = contract_abi(abi_name).encode_call(fn, args)
        return self._submit(_Call(private_key(sender), to_canonical_address(address), data))

    def sign(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any, nonce: int) -> SignedTx:
        return sign_transaction(
            sender, chain_id=self._chain_id, nonce=nonce, gas_price=0, gas=TX_GAS,
            to=to_canonical_address(address), data=contract_abi(abi_name).encode_call(fn, args),
        )

    def send_raw(self, raws: list[bytes]) -> list[str]:
        if not raws:
            return []
        return self._submit(_Raws([self._decode(raw) for raw in raws]))

    def _decode(self, raw: bytes) -> Any:
        """A py-evm transaction from signed bytes, with its sender recovered; ``InvalidTransaction`` if bad."""
        raw = bytes(raw)
        if not raw or raw[0] < 0xC0:
            raise InvalidTransaction("expected an RLP-encoded legacy (EIP-155) transaction; typed transactions are not accepted")
        try:
            tx = self._builder.decode(raw)
            tx.validate()  # field ranges, intrinsic gas, and the signer's recovery (then cached)
        except Exception as exc:  # rlp/py-evm/eth_keys validation errors: the bytes are bad
            raise InvalidTransaction(f"not a valid signed transaction: {exc}") from exc
        if tx.chain_id != self._chain_id:
            found = "no chain id (pre-EIP-155)" if tx.chain_id is None else f"chain id {tx.chain_id}"
            raise InvalidTransaction(f"the transaction is signed for {found}, this chain is {self._chain_id}")
        return tx

    def _submit(self, item: Any) -> Any:
        with self._queued:
            if self._closed:
                raise ChainUnavailable(f"the embedded chain at {self.path} is closed")
            self._queue.append(item)
            self._queued.notify()
        return item.future.result()

    def _seal_loop(self) -> None:
        """The sealer thread: group commit — everything queued while it was busy makes the next block."""
        while True:
            with self._queued:
                while not self._queue and not self._closed:
                    self._queued.wait()
                if not self._queue:
                    return  # closed and drained
            self._gather()
            with self._queued:
                batch, self._queue = self._queue, []
            try:
                with self._lock:
                    self._seal(batch)
            except BaseException as exc:  # never leave a caller waiting: fail what was not answered
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc if isinstance(exc, TeleledgerError) else TeleledgerError(
                            f"the embedded chain failed to seal a block: {exc!r}"))

    def _gather(self) -> None:
        """Give callers that were just answered a moment to queue their next transaction.

        A block costs a fixed few milliseconds of CPU (cold state, state root, header, commit)
        and an fsync on top of its transactions, so more transactions per block buy far more
        throughput than the wait costs in latency. Waits while the queue keeps growing, at most
        ``GATHER_SECONDS``; sleeping hands the GIL to the callers.
        """
        deadline = time.monotonic() + GATHER_SECONDS
        seen = len(self._queue)
        while time.monotonic() < deadline:
            time.sleep(GATHER_STEP_SECONDS)
            queued = len(self._queue)
            if queued == seen:
                return
            seen = queued

    def _seal(self, batch: list[_Call | _Raws]) -> None:
        try:
            self._seal_block(batch)
        except Exception as exc:
            self._chain = self._chain_class(self._db)  # drop py-evm's view of the rolled-back block
            if len(batch) > 1:
                for item in batch:  # isolate the submission py-evm refused
                    if not item.future.done():
                        self._seal([item])
                return
            item = batch[0]
            if isinstance(exc, TeleledgerError):
                error: TeleledgerError = exc
            elif isinstance(item, _Raws):
                error = InvalidTransaction(f"the embedded chain refused the transaction: {exc}")
            else:
                error = TeleledgerError(f"the embedded chain refused the transaction: {exc}")
            if not item.future.done():
                item.future.set_exception(error)

    def _included(self, tx_hash: bytes) -> bool:
        return self._conn.execute("SELECT 1 FROM txs WHERE hash = ?", (tx_hash,)).fetchone() is not None

    def _seal_block(self, batch: list[_Call | _Raws]) -> None:
        chain = self._chain
        parent = chain.get_canonical_head()
        header = chain.header = chain.header.copy(
            gas_limit=BLOCK_GAS_LIMIT, timestamp=max(int(time.time()), parent.timestamp),
            coinbase=to_canonical_address(self.authority_address),
        )
        vm = chain.get_vm(header)  # one VM builds, checks and executes the block
        state = vm.state
        nonces: dict[bytes, int] = {}

        def next_nonce(sender: bytes) -> int:
            if sender not in nonces:
                nonces[sender] = state.get_nonce(sender)
            return nonces[sender]

        txs: list[Any] = []
        call_hashes: list[bytes] = []
        in_block: set[bytes] = set()
        accepted: list[_Call | _Raws] = []
        for item in batch:
            if isinstance(item, _Call):
                sender = item.key.public_key.to_canonical_address()
                tx = self._sign(item, next_nonce(sender))
                nonces[sender] += 1
                txs.append(tx)
                call_hashes.append(tx.hash)
                in_block.add(tx.hash)
                accepted.append(item)
                continue
            error, mine = self._admit(item.txs, next_nonce, in_block)
            if error is not None:
                item.future.set_exception(error)
                continue
            for tx in mine:
                nonces[tx.sender] = tx.nonce + 1
                in_block.add(tx.hash)
            txs.extend(mine)
            accepted.append(item)
        if not txs:
            for item in accepted:  # every transaction was already on chain
                item.future.set_result([_hex(tx.hash) for tx in item.txs])  # type: ignore[union-attr]
            return

        outcomes = self._write_block(lambda: self._mine(vm, parent, txs, call_hashes))
        # acknowledged only now, after the block is durable
        calls = iter(outcomes)
        for item in accepted:
            if isinstance(item, _Raws):
                item.future.set_result([_hex(tx.hash) for tx in item.txs])
                continue
            outcome = next(calls)
            if isinstance(outcome, Receipt):
                item.future.set_result(outcome)
            else:
                item.future.set_exception(outcome)

    def _sign(self, call: _Call, nonce: int) -> Any:
        """The py-evm transaction for a ``transact`` call, signed with ``nonce``.

        The EIP-155 signing format of ``client.sign_transaction``, built straight into py-evm's
        object (no encode/decode round trip); its signer is known, so nothing is recovered.
        """
        fields = [nonce, 0, TX_GAS, call.to, 0, call.data]
        signature = call.key.sign_msg_hash(keccak(rlp.encode(fields + [self._chain_id, 0, 0])))
        tx = _SealingLegacyTransaction(*fields, signature.v + 35 + 2 * self._chain_id, signature.r, signature.s)
        tx.__dict__["sender"] = call.key.public_key.to_canonical_address()
        return tx

    def _admit(self, offered: list[Any], next_nonce: Any, in_block: set[bytes]) -> tuple[TeleledgerError | None, list[Any]]:
        """The transactions of one ``send_raw`` list to include, or the error that refuses the list."""
        mine: list[Any] = []
        expected: dict[bytes, int] = {}
        seen: set[bytes] = set()
        for tx in offered:
            h = tx.hash
            if h in seen or h in in_block or self._included(h):
                continue  # already known: idempotent
            sender = tx.sender
            want = expected.get(sender, next_nonce(sender))
            if tx.nonce < want:
                return NonceConflict(sender=to_checksum_address(sender), nonce=tx.nonce, tx_hash=_hex(h),
                                     next_nonce=next_nonce(sender)), []
            if tx.nonce > want:
                return InvalidTransaction(
                    f"nonce {tx.nonce} of {to_checksum_address(sender)} leaves a gap: the chain expects {want} "
                    "next and the embedded chain holds no pending pool; send the missing transactions first "
                    f"(transaction {_hex(h)} was not included)"
                ), []
            expected[sender] = want + 1
            seen.add(h)
            mine.append(tx)
        return None, mine

    def _mine(self, vm: Any, parent: Any, txs: list[Any], call_hashes: list[bytes]) -> list[Receipt | ChainRevert]:
        """Execute ``txs`` into one block, index it, seal it; the outcomes of the ``transact`` calls.

        Runs inside ``_write_block``'s SQLite transaction. This is py-evm's ``MiningChain.mine_all``
        without its second passes over a block we build ourselves: ``mine_all`` validates the
        finished block twice (recomputing the transaction trie and re-reading the parent) and
        then reads the block it just stored back from the database.
        """
        header = vm.get_header()
        executed_header, receipts, computations = vm.apply_all_transactions(txs, header)
        filled = vm.set_block_transactions_and_withdrawals(vm.get_block(), executed_header, txs, receipts)
        block = vm.finalize_block(vm.pack_block(filled)).block
        vm.validate_header(block.header, parent)
        self._chain.chaindb.persist_block(block)
        self._chain.header = self._chain.create_header_from_parent(block.header)
        number = block.number
        self._conn.execute(
            "INSERT INTO seals VALUES (?, ?, ?)",
            (number, block.hash, self._authority.sign_msg_hash(block.hash).to_bytes()),
        )
        wanted = set(call_hashes)
        outcomes: dict[bytes, Receipt | ChainRevert] = {}
        tx_rows: list[tuple[Any, ...]] = []
        log_rows: list[tuple[Any, ...]] = []
        previous_gas = 0
        for idx, (tx, receipt, computation) in enumerate(zip(txs, receipts, computations)):
            gas_used = receipt.gas_used - previous_gas  # receipts carry the block's cumulative gas
            previous_gas = receipt.gas_used
            ok = not computation.is_error
            created = computation.msg.storage_address if ok and not tx.to else None
            error = None if ok else self._reason(computation)
            tx_rows.append((tx.hash, number, idx, int(ok), gas_used, created, error))
            first = len(log_rows)
            for log in receipt.logs:
                topics = b"".join(_topic_bytes(t) for t in log.topics)
                log_rows.append((number, len(log_rows), tx.hash, log.address, topics, log.data))
            if tx.hash in wanted:
                outcomes[tx.hash] = ChainRevert(error or "reverted") if not ok else Receipt(
                    _hex(tx.hash), number, 1, gas_used, to_checksum_address(created) if created else None,
                    tuple(self._event_of_row(row) for row in log_rows[first:]),
                )
        self._conn.executemany("INSERT INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)", tx_rows)
        self._conn.executemany("INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?)", log_rows)
        return [outcomes[h] for h in call_hashes]

    @staticmethod
    def _reason(computation: Any) -> str:
        error = computation.error
        data = error.args[0] if error.args and isinstance(error.args[0], bytes) else None
        if data is None and type(error).__name__ != "Revert":
            return f"{type(error).__name__}: {error}"
        return revert_reason(data)


def _tx_hash_bytes(tx_hash: str) -> bytes:
    try:
        raw = bytes.fromhex(tx_hash.removeprefix("0x"))
    except (ValueError, AttributeError) as exc:
        raise InvalidTransaction(f"a transaction hash is 32 bytes of 0x-hex, found {tx_hash!r}") from exc
    if len(raw) != 32:
        raise InvalidTransaction(f"a transaction hash is 32 bytes of 0x-hex, found {len(raw)} bytes")
    return raw


def peek_head(path: Path | str) -> tuple[int, int] | None:
    """(chain id, head block number) of the embedded chain stored in ``path``, read without
    opening it: a read-only SQLite connection, no sealer, no lock, so a CLI command can report on
    the chain a running server holds. None when no chain was created there yet."""
    from eth.db.chain import ChainDB

    db_file = Path(path) / DB_FILE
    if not db_file.exists():
        return None
    conn = sqlite3.connect(f"{db_file.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
        if not meta:
            return None
        head = ChainDB(AtomicDB(SQLiteKV(conn))).get_canonical_head()
        return int(meta["chain_id"]), int(head.block_number)
    finally:
        conn.close()

