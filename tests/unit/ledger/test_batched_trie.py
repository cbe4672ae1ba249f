"""``BatchedTrie`` against py-trie's ``HexaryTrie``: same root hashes and reads after any sequence
of inserts, overwrites and deletes (Hypothesis), and py-evm's block-list tries."""

from __future__ import annotations

import pytest
from eth.db.trie import _make_trie_root_and_nodes
from hypothesis import given, settings
from hypothesis import strategies as st
from trie import HexaryTrie
from trie.constants import BLANK_NODE_HASH
from trie.exceptions import MissingTrieNode

from teleledger.ledger.chain import trie as batched
from teleledger.ledger.chain.trie import BatchedTrie, trie_root_and_nodes

# keys of one trie have one length (Ethereum's tries are prefix-free: storage and account keys
# are 32-byte hashes, list keys are RLP-encoded indexes); few distinct nibbles force shared paths
_KEY_LENGTHS = st.sampled_from([1, 2, 3, 32])
_VALUES = st.one_of(st.just(b""), st.binary(min_size=1, max_size=3), st.binary(min_size=30, max_size=50))


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[bytes], list[list[tuple[bytes, bytes | None]]]]:
    length = draw(_KEY_LENGTHS)
    alphabet = draw(st.sampled_from([b"\x00\x01\x10", bytes(range(256))]))
    key = st.lists(st.sampled_from(list(alphabet)), min_size=length, max_size=length).map(bytes)
    keys = draw(st.lists(key, min_size=1, max_size=40, unique=True))
    op = st.tuples(st.sampled_from(keys), st.one_of(st.none(), _VALUES))  # None: del
    return keys, draw(st.lists(st.lists(op, max_size=30), min_size=1, max_size=5))


@settings(max_examples=300, deadline=None)
@given(_batches(), st.booleans())
def test_roots_and_reads_match_py_trie_after_any_batch_of_writes_and_deletes(batches, cold_cache) -> None:
    keys, rounds = batches
    reference, mine = HexaryTrie({}, prune=True), BatchedTrie({})
    for ops in rounds:
        for key, value in ops:
            if value is None:
                del reference[key]
                del mine[key]
            else:
                reference[key] = value
                mine[key] = value
        for key in keys:  # pending writes are visible before the root is computed
            assert mine[key] == reference[key]
        if cold_cache:
            batched._nodes.clear()
        assert mine.root_hash == reference.root_hash
        reopened = BatchedTrie(mine.db, mine.root_hash)  # from the written nodes alone
        for key in keys:
            assert reopened[key] == reference[key]
            assert (key in reopened) == (key in reference)


@pytest.mark.parametrize("count", [0, 1, 2, 16, 17, 128, 129, 300])
def test_block_list_tries_match_py_evms(count: int) -> None:
    items = tuple(bytes([i % 256]) * (1 + i % 70) for i in range(count))
    root, nodes = trie_root_and_nodes(items)
    expected_root, _ = _make_trie_root_and_nodes(items)
    assert root == expected_root
    reopened = BatchedTrie(nodes, root)
    import rlp

    assert [reopened[rlp.encode(i)] for i in range(count)] == list(items)


def test_the_empty_trie_has_the_blank_root_and_deleting_everything_returns_to_it() -> None:
    trie = BatchedTrie({})
    assert trie.root_hash == BLANK_NODE_HASH
    trie[b"\x01" * 32] = b"x"
    trie[b"\x02" * 32] = b"y"
    assert trie.root_hash != BLANK_NODE_HASH
    del trie[b"\x01" * 32]
    trie[b"\x02" * 32] = b""
    assert trie.root_hash == BLANK_NODE_HASH
    assert trie[b"\x01" * 32] == b""


def test_a_node_missing_from_the_database_is_reported_not_read_as_empty() -> None:
    trie = BatchedTrie({})
    for i in range(20):
        trie[bytes([i]) * 32] = b"v" * 40
    root = trie.root_hash
    batched._nodes.clear()
    partial = dict(trie.db)
    partial.pop(root)
    with pytest.raises(MissingTrieNode):
        BatchedTrie(partial, root)[b"\x03" * 32]


def test_squashed_writes_that_raise_are_dropped_and_moving_the_root_drops_unapplied_writes() -> None:
    trie = BatchedTrie({})
    trie[b"\x01" * 32] = b"kept"
    with pytest.raises(RuntimeError), trie.squash_changes() as squashed:
        squashed[b"\x02" * 32] = b"dropped"
        raise RuntimeError("the block failed")
    assert trie[b"\x02" * 32] == b""
    root = trie.root_hash
    reference = HexaryTrie({})
    reference[b"\x01" * 32] = b"kept"
    assert root == reference.root_hash
    trie[b"\x03" * 32] = b"unapplied"
    trie.root_hash = root
    assert trie[b"\x03" * 32] == b"" and trie.root_hash == root
