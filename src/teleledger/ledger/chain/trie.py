"""Batched writes to Ethereum's Merkle Patricia trie, for the embedded chain's py-evm.

py-evm keeps the accounts, every contract's storage, and each block's transactions and receipts
in ``trie.HexaryTrie``s. That trie applies each write on its own: it walks from the root,
decodes every node on the path, re-encodes and re-hashes all of them, and keeps reference
counts for pruning — per key. At the end of a block py-evm writes every changed account and
storage slot that way, so the nodes near the root are encoded and hashed once per key, and
each node read is RLP-decoded again. For the embedded chain that was about a third of a
consent grant's CPU (``bench/RESULTS.md``, "Chain").

``BatchedTrie`` is the same trie with the writes deferred: ``t[key] = value`` only records the
write; reading ``root_hash`` applies all recorded writes to an in-memory copy of the touched
paths and then encodes and hashes each changed node once. Decoded nodes are cached by hash
(nodes are content-addressed, so a cached node can never be stale). No library offers a
batched MPT update over py-evm's node database, hence this module.

It computes exactly the trie of the Yellow Paper (Appendix D), as ``HexaryTrie`` does:
nodes are ``[hex-prefix path, value]`` (leaf), ``[hex-prefix path, child]`` (extension) or 17
items (branch); a child whose RLP is shorter than 32 bytes is embedded, any other is referred
to by its keccak; the root is always stored under its hash. Nibble paths are handled as hex
strings (``key.hex()``), which CPython slices and compares fast. Unlike ``HexaryTrie`` it does
not prune superseded nodes from the database it writes to — py-evm does not delete them from
disk either (``StorageLookup.commit_to`` skips deletes).

``BatchedAccountDB`` puts py-evm's account and storage tries on it (the block-list tries are
``trie_root_and_nodes``, used by ``embedded.AuthorityVM``). Keys of one trie must be
prefix-free, as in every Ethereum trie (32-byte hashes; RLP-encoded indexes).

``tests/unit/ledger/test_batched_trie.py`` checks roots and reads against ``HexaryTrie`` over
random inserts, overwrites and deletes; ``tests/chain/test_fast_interpreter.py`` whole blocks
against py-evm's own VM. This module must never change a root hash: any difference from
``HexaryTrie`` would fork the chain from every other Ethereum client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import rlp
from eth.constants import BLANK_ROOT_HASH
from eth.db.accesslog import KeyAccessLoggerDB
from eth.db.account import AccountDB
from eth.db.batch import BatchDB
from eth.db.cache import CacheDB
from eth.db.hash_trie import HashTrie
from eth.db.journal import JournalDB
from eth.db.storage import AccountStorageDB, StorageLookup
from eth_hash.auto import keccak
from rlp.codec import encode_raw
from trie.constants import BLANK_NODE_HASH
from trie.exceptions import MissingTrieNode

__all__ = ["BatchedAccountDB", "BatchedTrie", "trie_root_and_nodes"]

_BLANK = b""
#: marks "the key was not in this subtree" while deleting (nothing to rewrite)
_UNCHANGED: Any = object()
_HEX = {c: i for i, c in enumerate("0123456789abcdef")}
_CHARS = "0123456789abcdef"
#: decoded nodes kept (hash -> node; a branch node is ~1 kB in memory); cleared, not evicted one by
#: one, when full
_NODE_CACHE_ENTRIES = 32_768
_nodes: dict[bytes, list[Any]] = {}


def _hp(path: str, leaf: bool) -> bytes:
    """Hex-prefix encoding of a nibble path (Yellow Paper, Appendix C)."""
    flag = 2 if leaf else 0
    if len(path) % 2:
        return bytes.fromhex(_CHARS[flag + 1] + path)
    return bytes.fromhex(_CHARS[flag] + "0" + path)


def _unhp(encoded: bytes) -> tuple[str, bool]:
    """The nibble path and leaf flag of a hex-prefix encoded path."""
    text = encoded.hex()
    flag = _HEX[text[0]]
    return (text[1:] if flag & 1 else text[2:]), flag >= 2


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchedTrie:
    """A Merkle Patricia trie over a key-value ``db`` whose writes apply when ``root_hash`` is read.

    The subset of ``HexaryTrie``'s interface py-evm's account and storage databases use:
    ``t[key]`` (``b""`` when absent), ``t[key] = value`` (``b""`` deletes), ``del t[key]``,
    ``key in t``, ``root_hash`` (settable: moves to another root, dropping unapplied writes, as
    setting ``HexaryTrie.root_hash`` discards what was written), ``squash_changes()``.
    """

    __slots__ = ("db", "_root_hash", "_pending")

    def __init__(self, db: MutableMapping[bytes, bytes], root_hash: bytes = BLANK_NODE_HASH) -> None:
        self.db = db
        self._root_hash = root_hash
        self._pending: dict[bytes, bytes] = {}

    # --- HexaryTrie's interface -----------------------------------------------------------------

    def __getitem__(self, key: bytes) -> bytes:
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        return self._get(key)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._pending[key] = value

    def __delitem__(self, key: bytes) -> None:
        self._pending[key] = _BLANK

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self[key] != _BLANK

    @property
    def root_hash(self) -> bytes:
        if self._pending:
            self._apply()
        return self._root_hash

    @root_hash.setter
    def root_hash(self, value: bytes) -> None:
        self._pending = {}
        self._root_hash = value

    @contextlib.contextmanager
    def squash_changes(self) -> Iterator[BatchedTrie]:
        """``HexaryTrie.squash_changes``: writes inside apply together, or not at all if it raises.
        Here every write is batched already, so it only has to drop the writes of a failed block."""
        before = dict(self._pending)
        try:
            yield self
        except BaseException:
            self._pending = before
            raise

    # --- reading --------------------------------------------------------------------------------

    def _load(self, ref: bytes, key: bytes) -> Any:
        """The decoded node a 32-byte hash refers to (``b""`` for the empty trie's root)."""
        node = _nodes.get(ref)
        if node is not None:
            return node
        if ref == BLANK_NODE_HASH:
            return _BLANK
        try:
            encoded = self.db[ref]
        except KeyError:
            raise MissingTrieNode(ref, self._root_hash, key) from None
        node = rlp.decode(encoded)
        _remember(ref, node)
        return node

    def _get(self, key: bytes) -> bytes:
        path = key.hex()
        node: Any = self._root_hash
        while True:
            if type(node) is bytes:
                if node == _BLANK:
                    return _BLANK
                node = self._load(node, key)
                if node == _BLANK:
                    return _BLANK
            if len(node) == 17:
                if not path:
                    return node[16]
                node, path = node[_HEX[path[0]]], path[1:]
                continue
            nibbles, leaf = _unhp(node[0])
            if leaf:
                return node[1] if nibbles == path else _BLANK
            if not path.startswith(nibbles):
                return _BLANK
            node, path = node[1], path[len(nibbles):]

    # --- writing --------------------------------------------------------------------------------

    def _apply(self) -> None:
        pending, self._pending = self._pending, {}
        root: Any = self._root_hash
        for key, value in pending.items():
            if value:
                root = self._put(root, key.hex(), value, key)
            else:
                removed = self._remove(root, key.hex(), key)
                if removed is not _UNCHANGED:
                    root = removed
        self._root_hash = self._commit_root(root)

    def _resolve(self, node: Any, key: bytes) -> Any:
        return self._load(node, key) if type(node) is bytes and node else node

    def _put(self, node: Any, path: str, value: bytes, key: bytes) -> Any:
        node = self._resolve(node, key)
        if node == _BLANK:
            return [_hp(path, True), value]
        if len(node) == 17:
            new = list(node)
            if path:
                i = _HEX[path[0]]
                new[i] = self._put(node[i], path[1:], value, key)
            else:
                new[16] = value
            return new
        nibbles, leaf = _unhp(node[0])
        if leaf and nibbles == path:
            return [node[0], value]
        n = _common(nibbles, path)
        if not leaf and n == len(nibbles):
            return [node[0], self._put(node[1], path[n:], value, key)]
        # the paths part at nibble n: a branch there holds the old node's rest and the new leaf
        branch: list[Any] = [_BLANK] * 17
        rest = nibbles[n:]
        if leaf:
            if rest:
                branch[_HEX[rest[0]]] = [_hp(rest[1:], True), node[1]]
            else:
                branch[16] = node[1]
        elif len(rest) == 1:
            branch[_HEX[rest[0]]] = node[1]
        else:
            branch[_HEX[rest[0]]] = [_hp(rest[1:], False), node[1]]
        new_rest = path[n:]
        if new_rest:
            branch[_HEX[new_rest[0]]] = [_hp(new_rest[1:], True), value]
        else:
            branch[16] = value
        return [_hp(path[:n], False), branch] if n else branch

    def _remove(self, node: Any, path: str, key: bytes) -> Any:
        node = self._resolve(node, key)
        if node == _BLANK:
            return _UNCHANGED
        if len(node) == 17:
            new = list(node)
            if path:
                i = _HEX[path[0]]
                child = self._remove(node[i], path[1:], key)
                if child is _UNCHANGED:
                    return _UNCHANGED
                new[i] = child
            elif node[16] == _BLANK:
                return _UNCHANGED
            else:
                new[16] = _BLANK
            return self._collapse(new, key)
        nibbles, leaf = _unhp(node[0])
        if leaf:
            return _BLANK if nibbles == path else _UNCHANGED
        if not path.startswith(nibbles):
            return _UNCHANGED
        child = self._remove(node[1], path[len(nibbles):], key)
        if child is _UNCHANGED:
            return _UNCHANGED
        return self._extend(nibbles, child, key)

    def _collapse(self, branch: list[Any], key: bytes) -> Any:
        """A branch that lost an entry, in canonical form (a branch needs two entries)."""
        used = [i for i in range(16) if branch[i] != _BLANK]
        if branch[16] != _BLANK:
            return branch if used else [_hp("", True), branch[16]]
        if len(used) > 1:
            return branch
        if not used:
            return _BLANK
        return self._extend(_CHARS[used[0]], branch[used[0]], key)

    def _extend(self, prefix: str, child: Any, key: bytes) -> Any:
        """``prefix`` in front of ``child``: an extension, or merged into a leaf/extension child."""
        node = self._resolve(child, key)
        if node == _BLANK:
            return _BLANK
        if len(node) == 17:
            return [_hp(prefix, False), child]
        nibbles, leaf = _unhp(node[0])
        return [_hp(prefix + nibbles, leaf), node[1]]

    def _commit(self, node: list[Any]) -> Any:
        """Encode ``node`` and its new descendants; its reference (hash, or itself when embedded)."""
        if len(node) == 17:
            items = [self._commit(c) if type(c) is list else c for c in node[:16]]
            items.append(node[16])
        else:
            child = node[1]
            items = [node[0], self._commit(child) if type(child) is list else child]
        encoded = encode_raw(items)
        if len(encoded) < 32:
            return items
        digest = keccak(encoded)
        self.db[digest] = encoded
        _remember(digest, items)
        return digest

    def _commit_root(self, root: Any) -> bytes:
        if type(root) is bytes:
            return root or BLANK_NODE_HASH  # unchanged hash, or the empty trie
        ref = self._commit(root)
        if type(ref) is bytes:
            return ref
        encoded = encode_raw(ref)  # a small root is still stored under its hash
        digest = keccak(encoded)
        self.db[digest] = encoded
        _remember(digest, ref)
        return digest


def _remember(digest: bytes, node: list[Any]) -> None:
    if len(_nodes) >= _NODE_CACHE_ENTRIES:
        _nodes.clear()
    _nodes[digest] = node


def trie_root_and_nodes(encoded_items: Iterable[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
    """Root and nodes of the trie of a block's list (transactions, receipts): key ``rlp(index)``.

    What py-evm's ``eth.db.trie.make_trie_root_and_nodes`` returns for the same items.
    """
    nodes: dict[bytes, bytes] = {}
    trie = BatchedTrie(nodes)
    for index, item in enumerate(encoded_items):
        trie[rlp.encode(index)] = item
    return trie.root_hash, nodes


# --- py-evm's account and storage tries on BatchedTrie -------------------------------------------
# py-evm builds its tries by name inside three classes (AccountDB -> AccountStorageDB ->
# StorageLookup -> HexaryTrie); each override below rebuilds py-evm's own pipe of databases with
# that one name changed. Everything else (journals, caches, checkpoints, account deletion) is
# py-evm's own.


class _BatchedStorageLookup(StorageLookup):
    def _get_write_trie(self) -> Any:
        if self._trie_nodes_batch is None:
            self._trie_nodes_batch = BatchDB(self._db, read_through_deletes=True)
        if self._write_trie is None:
            self._write_trie = BatchedTrie(self._trie_nodes_batch, self._starting_root_hash)
        return self._write_trie

    def _get_read_trie(self) -> Any:
        if self._write_trie is not None:
            return self._write_trie
        return BatchedTrie(self._db, self._starting_root_hash)


class _BatchedAccountStorageDB(AccountStorageDB):
    def __init__(self, db: Any, storage_root: bytes, address: bytes) -> None:
        super().__init__(db, storage_root, address)
        # the same pipe as py-evm's (lookup -> cache -> locked changes -> journal), on our lookup
        self._storage_lookup = _BatchedStorageLookup(db, storage_root, address)
        self._storage_cache = CacheDB(self._storage_lookup)
        self._locked_changes = JournalDB(self._storage_cache)
        self._journal_storage = JournalDB(self._locked_changes)


class BatchedAccountDB(AccountDB):
    """py-evm's ``AccountDB`` whose account trie and contracts' storage tries are ``BatchedTrie``."""

    def __init__(self, db: Any, state_root: bytes = BLANK_ROOT_HASH) -> None:
        super().__init__(db, state_root)
        # py-evm's pipe: _batchtrie -> _trie -> _trie_logger -> _trie_cache -> _journaltrie
        self._trie = HashTrie(BatchedTrie(self._batchtrie, state_root))
        self._trie_logger = KeyAccessLoggerDB(self._trie, log_missing_keys=False)
        self._trie_cache = CacheDB(self._trie_logger)
        self._journaltrie = JournalDB(self._trie_cache)

    def _get_address_store(self, address: Any) -> Any:
        if address in self._account_stores:
            return self._account_stores[address]
        store = _BatchedAccountStorageDB(self._raw_store_db, self._get_storage_root(address), address)
        self._account_stores[address] = store
        return store
