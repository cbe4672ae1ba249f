"""RFC 9162 Merkle math: known answers, properties over many tree shapes, and tampering.

Known answers are the RFC 6962 reference vectors shared by transparency-dev/merkle
(proof/verify_test.go) and Go's certificate-transparency: a log that disagrees with them
proves nothing to anybody else.
"""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput, TeleledgerError
from teleledger.ledger.log.merkle import (
    EMPTY_ROOT,
    CompactRange,
    IndexOutOfRange,
    MalformedHash,
    MemoryNodeStore,
    MissingNodes,
    ProofError,
    ProofLengthError,
    RootMismatch,
    SizesOutOfOrder,
    compact_range_keys,
    consistency_proof,
    consistency_proof_nodes,
    inclusion_proof,
    inclusion_proof_nodes,
    is_consistent,
    is_included,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

h = bytes.fromhex

# --------------------------------------------------------------------------- reference vectors

RFC6962_LEAVES = [
    h(""),
    h("00"),
    h("10"),
    h("2021"),
    h("3031"),
    h("40414243"),
    h("5051525354555657"),
    h("606162636465666768696a6b6c6d6e6f"),
]

RFC6962_ROOTS = [  # index = tree size
    h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]

# (leaf index, tree size, audit path); the Go file numbers leaves from 1, these from 0.
RFC6962_INCLUSION = [
    (0, 8, [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]),
    (5, 8, [
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
    (2, 3, [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    ]),
    (1, 5, [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]),
    (0, 1, []),
]

RFC6962_CONSISTENCY = [  # (first, second, proof)
    (1, 1, []),
    (1, 8, [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]),
    (6, 8, [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
    (2, 5, [
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]),
    (6, 7, [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]),
]

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


# --------------------------------------------------------------------------- helpers


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) transcribed from RFC 9162 §2.1.3.1 (rebuilds subtrees: tests only)."""
    n = len(leaves)
    if n <= 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return ref_path(m, leaves[:k]) + [root_from_leaves(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [root_from_leaves(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) transcribed from RFC 9162 §2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if b else [root_from_leaves(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return ref_subproof(m, leaves[:k], b) + [root_from_leaves(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [root_from_leaves(leaves[:k])]


class CountingReader:
    """A NodeReader that records every batch and refuses nodes outside the tree asked about."""

    def __init__(self, store: MemoryNodeStore, size: int) -> None:
        self.store = store
        self.size = size
        self.calls: list[list[tuple[int, int]]] = []

    def get_nodes(self, keys):
        self.calls.append(list(keys))
        for level, index in keys:
            assert (index + 1) << level <= self.size, f"ephemeral node ({level}, {index}) read"
        return self.store.get_nodes(keys)


def synthetic_leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@cache
def big_log(n: int = 400) -> tuple[list[bytes], MemoryNodeStore, list[bytes]]:
    """Leaves, a node store built only through CompactRange, and the root at every size."""
    leaves = synthetic_leaves(n)
    store = MemoryNodeStore()
    compact = CompactRange()
    roots = [compact.root()]
    for leaf in leaves:
        store.put_nodes(compact.append(leaf))
        roots.append(compact.root())
    return leaves, store, roots


def rfc6962_store() -> tuple[list[bytes], MemoryNodeStore]:
    leaves = [leaf_hash(d) for d in RFC6962_LEAVES]
    store = MemoryNodeStore()
    store.put_nodes(CompactRange().extend(leaves))
    return leaves, store


# --------------------------------------------------------------------------- known answers


def test_hashing_uses_the_rfc6962_domain_separation_prefixes():
    assert EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()


@pytest.mark.parametrize("size", range(9))
def test_reference_roots_match_rfc6962_vectors_for_every_size_up_to_eight(size):
    leaves = [leaf_hash(d) for d in RFC6962_LEAVES[:size]]
    assert root_from_leaves(leaves).hex() == RFC6962_ROOTS[size].hex()
    compact = CompactRange()
    compact.extend(leaves)
    assert compact.root().hex() == RFC6962_ROOTS[size].hex()


@pytest.mark.parametrize(("index", "size", "expected"), RFC6962_INCLUSION)
def test_inclusion_proofs_from_stored_nodes_match_the_reference_vectors(index, size, expected):
    leaves, store = rfc6962_store()
    proof = inclusion_proof(index, size, store)
    assert [p.hex() for p in proof] == [p.hex() for p in expected]
    verify_inclusion(leaves[index], index, size, expected, RFC6962_ROOTS[size])


@pytest.mark.parametrize(("first", "second", "expected"), RFC6962_CONSISTENCY)
def test_consistency_proofs_from_stored_nodes_match_the_reference_vectors(first, second, expected):
    _, store = rfc6962_store()
    proof = consistency_proof(first, second, store)
    assert [p.hex() for p in proof] == [p.hex() for p in expected]
    verify_consistency(first, second, RFC6962_ROOTS[first], RFC6962_ROOTS[second], expected)


def test_proof_nodes_name_ephemeral_right_edge_nodes_as_folds_of_perfect_subtrees():
    # Tree of 7: leaf 0's path is leaf 1, node [2,4), and the ephemeral node [4,7).
    assert inclusion_proof_nodes(0, 7) == [[(0, 1)], [(1, 1)], [(1, 2), (0, 6)]]
    # Tree of 5: the last leaf sits alone on the right edge, one level up.
    assert inclusion_proof_nodes(4, 5) == [[(2, 0)]]
    # 6 -> 8: the perfect subtree [4,6), then its path in the tree of 8.
    assert consistency_proof_nodes(6, 8) == [[(1, 2)], [(1, 3)], [(2, 0)]]
    # 4 -> 8: first is a power of two, so the old root is not repeated.
    assert consistency_proof_nodes(4, 8) == [[(2, 1)]]
    assert consistency_proof_nodes(0, 8) == consistency_proof_nodes(8, 8) == []


def test_compact_range_keys_are_the_binary_decomposition_of_the_size():
    assert compact_range_keys(0) == []
    assert compact_range_keys(13) == [(3, 0), (2, 2), (0, 12)]
    assert compact_range_keys(16) == [(4, 0)]


# --------------------------------------------------------------------------- storage behaviour


def test_a_proof_reads_the_node_store_once_and_only_perfect_subtrees_inside_the_tree():
    leaves, store, roots = big_log()
    for size in (1, 2, 7, 100, 255, 256, 257, 399):
        for index in {0, size // 3, size - 1}:
            reader = CountingReader(store, size)
            proof = inclusion_proof(index, size, reader)
            assert len(reader.calls) == (1 if proof else 0)
            verify_inclusion(leaves[index], index, size, proof, roots[size])
        for first in {1, size // 2, size - 1} - {0}:
            reader = CountingReader(store, size)
            proof = consistency_proof(first, size, reader)
            assert len(reader.calls) <= 1
            verify_consistency(first, size, roots[first], roots[size], proof)


def test_proofs_for_a_tree_larger_than_the_store_fail_with_missing_nodes():
    _, store, _ = big_log()
    with pytest.raises(MissingNodes) as caught:
        inclusion_proof(3, 1000, store)
    assert caught.value.status == 500
    assert "missing" in str(caught.value)
    with pytest.raises(MissingNodes):
        consistency_proof(10, 1000, store)
    with pytest.raises(MissingNodes):
        CompactRange.from_nodes(1000, store)


def test_append_reports_exactly_the_perfect_subtrees_that_became_complete():
    compact = CompactRange()
    leaves = synthetic_leaves(8)
    assert [(lv, ix) for lv, ix, _ in compact.append(leaves[0])] == [(0, 0)]
    assert [(lv, ix) for lv, ix, _ in compact.append(leaves[1])] == [(0, 1), (1, 0)]
    assert [(lv, ix) for lv, ix, _ in compact.append(leaves[2])] == [(0, 2)]
    new = compact.append(leaves[3])
    assert [(lv, ix) for lv, ix, _ in new] == [(0, 3), (1, 1), (2, 0)]
    assert new[-1][2] == root_from_leaves(leaves[:4])


def test_the_store_holds_every_perfect_subtree_hash_and_nothing_else():
    leaves, store, _ = big_log()
    n = len(leaves)
    expected = {
        (level, index)
        for level in range(n.bit_length())
        for index in range(n >> level)
    }
    assert set(store.nodes) == expected
    for level, index in [(0, 17), (3, 5), (5, 2), (8, 0)]:
        span = leaves[index << level : (index + 1) << level]
        assert store.nodes[(level, index)] == root_from_leaves(span)


def test_compact_range_rejects_inconsistent_state_and_bad_hashes():
    with pytest.raises(ValueError):
        CompactRange(3, [SOME_HASH])
    with pytest.raises(MalformedHash):
        CompactRange().append(b"short")
    with pytest.raises(ProofError):
        CompactRange(-1, [])


# --------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=1, max_value=400))
def test_every_inclusion_and_consistency_proof_of_a_random_size_verifies(size):
    leaves, store, roots = big_log()
    root = root_from_leaves(leaves[:size])
    assert roots[size] == root
    for index in range(size):
        proof = inclusion_proof(index, size, store)
        verify_inclusion(leaves[index], index, size, proof, root)
    for first in range(size + 1):
        proof = consistency_proof(first, size, store)
        verify_consistency(first, size, roots[first], root, proof)


def test_every_proof_in_every_tree_up_to_64_leaves_verifies():
    leaves, store, roots = big_log()
    for size in range(1, 65):
        for index in range(size):
            assert is_included(leaves[index], index, size, inclusion_proof(index, size, store), roots[size])
        for first in range(size + 1):
            assert is_consistent(first, size, roots[first], roots[size], consistency_proof(first, size, store))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.integers(min_value=1, max_value=300))
def test_proofs_from_perfect_subtrees_equal_the_rfc_recursive_definitions(data, size):
    leaves, store, _ = big_log()
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    first = data.draw(st.integers(min_value=1, max_value=size), label="first")
    assert inclusion_proof(index, size, store) == ref_path(index, leaves[:size])
    expected = ref_subproof(first, leaves[:size], True)
    assert consistency_proof(first, size, store) == expected


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.binary(max_size=40), max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_extend_in_batches_equals_appending_one_leaf_at_a_time(data, cuts):
    leaves = [leaf_hash(d) for d in data]
    one_by_one = CompactRange()
    nodes_one = [node for leaf in leaves for node in one_by_one.append(leaf)]

    batched = CompactRange()
    nodes_batched = []
    bounds = sorted({0, len(leaves), *(c for c in cuts if c <= len(leaves))})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        nodes_batched.extend(batched.extend(leaves[lo:hi]))

    assert batched == one_by_one
    assert nodes_batched == nodes_one
    assert batched.size == len(leaves)
    assert batched.root() == root_from_leaves(leaves)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=400))
def test_a_compact_range_rebuilt_from_stored_nodes_has_the_same_root(size):
    leaves, store, roots = big_log()
    from_reader = CompactRange.from_nodes(size, store)
    from_callable = CompactRange.from_nodes(size, lambda level, index: store.nodes[(level, index)])
    assert from_reader == from_callable
    assert from_reader.size == size
    assert from_reader.root() == roots[size] == root_from_leaves(leaves[:size])
    # ...and it keeps growing into the same tree.
    if size < len(leaves):
        from_reader.append(leaves[size])
        assert from_reader.root() == roots[size + 1]


# --------------------------------------------------------------------------- tampering: inclusion


def known_inclusion():
    index, size, proof = RFC6962_INCLUSION[1]  # leaf 5 of 8
    return leaf_hash(RFC6962_LEAVES[index]), index, size, proof, RFC6962_ROOTS[size]


def test_a_wrong_leaf_fails_with_root_mismatch_naming_both_roots():
    leaf, index, size, proof, root = known_inclusion()
    with pytest.raises(RootMismatch) as caught:
        verify_inclusion(leaf_hash(b"wrong"), index, size, proof, root)
    err = caught.value
    assert err.expected == root and err.computed != root
    assert root.hex() in str(err) and err.computed.hex() in str(err)


def test_a_wrong_index_fails_with_root_mismatch():
    leaf, index, size, proof, root = known_inclusion()
    for wrong in (index - 1, index + 1, index ^ 2):
        with pytest.raises(RootMismatch):
            verify_inclusion(leaf, wrong, size, proof, root)


def test_a_wrong_tree_size_fails():
    leaf, index, size, proof, root = known_inclusion()
    # (A smaller size whose tree has the same shape along this path, e.g. 7 for leaf 5 of 8,
    # folds to the same root: a tree size is authenticated by the signed checkpoint, not here.)
    for wrong_size in (size * 2, size // 2, size * 4 + 1):
        with pytest.raises((RootMismatch, ProofLengthError, IndexOutOfRange)):
            verify_inclusion(leaf, index, wrong_size, proof, root)


def test_a_truncated_inclusion_proof_fails_with_proof_length_error():
    leaf, index, size, proof, root = known_inclusion()
    with pytest.raises(ProofLengthError) as caught:
        verify_inclusion(leaf, index, size, proof[:-1], root)
    assert (caught.value.expected, caught.value.got) == (3, 2)


def test_an_extended_inclusion_proof_fails_with_proof_length_error():
    leaf, index, size, proof, root = known_inclusion()
    for longer in (proof + [root], [root] + proof, proof + [SOME_HASH], proof[:1] + [SOME_HASH] + proof[1:]):
        with pytest.raises(ProofLengthError):
            verify_inclusion(leaf, index, size, longer, root)


@pytest.mark.parametrize("position", range(3))
@pytest.mark.parametrize("bit", [0, 3, 255])
def test_a_flipped_bit_in_an_inclusion_proof_element_fails_with_root_mismatch(position, bit):
    leaf, index, size, proof, root = known_inclusion()
    tampered = [bytearray(p) for p in proof]
    tampered[position][bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RootMismatch):
        verify_inclusion(leaf, index, size, [bytes(p) for p in tampered], root)


def test_a_proof_element_of_the_wrong_length_fails_with_malformed_hash():
    leaf, index, size, proof, root = known_inclusion()
    with pytest.raises(MalformedHash):
        verify_inclusion(leaf, index, size, [proof[0][:31], *proof[1:]], root)
    with pytest.raises(MalformedHash):
        verify_inclusion(b"WrongLeaf", index, size, proof, root)
    with pytest.raises(MalformedHash):
        verify_inclusion(leaf, index, size, proof, b"")


def test_the_empty_tree_root_or_a_random_root_does_not_verify():
    leaf, index, size, proof, _ = known_inclusion()
    for root in (EMPTY_ROOT, SOME_HASH):
        assert not is_included(leaf, index, size, proof, root)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (2, 1), (8, 8), (-1, 8)])
def test_an_index_outside_the_tree_is_rejected_before_hashing(index, size):
    with pytest.raises(IndexOutOfRange) as caught:
        verify_inclusion(SOME_HASH, index, size, [], EMPTY_ROOT)
    assert isinstance(caught.value, InvalidInput) and caught.value.status == 400
    with pytest.raises(IndexOutOfRange):
        inclusion_proof_nodes(index, size)


def test_a_single_leaf_tree_has_an_empty_proof_and_its_root_is_the_leaf():
    leaf = leaf_hash(b"data")
    verify_inclusion(leaf, 0, 1, [], leaf)
    assert root_from_inclusion_proof(leaf, 0, 1, []) == leaf
    with pytest.raises(RootMismatch):
        verify_inclusion(leaf, 0, 1, [], SOME_HASH)


def test_every_reference_vector_survives_the_transparency_dev_corruption_probes():
    for index, size, proof in RFC6962_INCLUSION:
        if not proof:
            continue
        leaf, root = leaf_hash(RFC6962_LEAVES[index]), RFC6962_ROOTS[size]
        probes = [
            (index - 1, size, root, leaf, proof),
            (index + 1, size, root, leaf, proof),
            (index ^ 2, size, root, leaf, proof),
            (index, size * 2, root, leaf, proof),
            (index, size // 2, root, leaf, proof),
            (index, size, root, b"WrongLeaf", proof),
            (index, size, EMPTY_ROOT, leaf, proof),
            (index, size, SOME_HASH, leaf, proof),
            (index, size, root, leaf, [*proof, b""]),
            (index, size, root, leaf, [*proof, root]),
            (index, size, root, leaf, [b"", *proof]),
            (index, size, root, leaf, [root, *proof]),
            (index, size, root, leaf, proof[:-1]),
        ]
        for i, p, r, lf, pr in probes:
            assert not is_included(lf, i, p, pr, r), (index, size, i, p)


# --------------------------------------------------------------------------- tampering: consistency


def known_consistency():
    first, second, proof = RFC6962_CONSISTENCY[2]  # 6 -> 8
    return first, second, RFC6962_ROOTS[first], RFC6962_ROOTS[second], proof


def test_swapped_roots_fail_consistency_with_root_mismatch():
    first, second, r1, r2, proof = known_consistency()
    with pytest.raises(RootMismatch) as caught:
        verify_consistency(first, second, r2, r1, proof)
    assert caught.value.expected == r2
    assert "first root" in str(caught.value)


def test_a_wrong_second_root_fails_consistency_naming_the_second_root():
    first, second, r1, _, proof = known_consistency()
    with pytest.raises(RootMismatch) as caught:
        verify_consistency(first, second, r1, SOME_HASH, proof)
    assert caught.value.expected == SOME_HASH
    assert "second root" in str(caught.value)


def test_first_larger_than_second_is_rejected_as_sizes_out_of_order():
    with pytest.raises(SizesOutOfOrder) as caught:
        verify_consistency(8, 6, RFC6962_ROOTS[8], RFC6962_ROOTS[6], [])
    assert "8" in str(caught.value) and "6" in str(caught.value)
    assert isinstance(caught.value, InvalidInput)
    with pytest.raises(SizesOutOfOrder):
        consistency_proof_nodes(2, 1)
    with pytest.raises(SizesOutOfOrder):
        verify_consistency(-1, 3, EMPTY_ROOT, EMPTY_ROOT, [])


def test_a_truncated_or_extended_consistency_proof_fails_with_proof_length_error():
    first, second, r1, r2, proof = known_consistency()
    for bad in (proof[:-1], [], [*proof, r1], [r2, *proof], [proof[0], *proof]):
        with pytest.raises(ProofLengthError):
            verify_consistency(first, second, r1, r2, bad)


@pytest.mark.parametrize("position", range(3))
def test_a_flipped_bit_in_a_consistency_proof_element_fails_with_root_mismatch(position):
    first, second, r1, r2, proof = known_consistency()
    tampered = list(proof)
    tampered[position] = bytes([tampered[position][0] ^ 16]) + tampered[position][1:]
    with pytest.raises(RootMismatch):
        verify_consistency(first, second, r1, r2, tampered)


def test_wrong_sizes_do_not_verify_a_consistency_proof():
    first, second, r1, r2, proof = known_consistency()
    for f, s in [(first - 1, second), (first + 1, second), (first ^ 2, second), (first, second * 2), (first, second // 2)]:
        assert not is_consistent(f, s, r1, r2, proof), (f, s)


def test_trivial_consistency_needs_an_empty_proof_and_matching_roots():
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, RFC6962_ROOTS[5], [])
    verify_consistency(3, 3, RFC6962_ROOTS[3], RFC6962_ROOTS[3], [])
    with pytest.raises(RootMismatch):
        verify_consistency(3, 3, RFC6962_ROOTS[3], RFC6962_ROOTS[4], [])
    with pytest.raises(RootMismatch):
        verify_consistency(0, 5, SOME_HASH, RFC6962_ROOTS[5], [])
    with pytest.raises(ProofLengthError):
        verify_consistency(0, 1, EMPTY_ROOT, RFC6962_ROOTS[1], [EMPTY_ROOT])
    with pytest.raises(ProofLengthError):
        verify_consistency(1, 1, RFC6962_ROOTS[1], RFC6962_ROOTS[1], [EMPTY_ROOT])
    with pytest.raises(MalformedHash):
        verify_consistency(1, 2, b"WrongRoot", RFC6962_ROOTS[2], [SOME_HASH])


def test_all_proof_errors_belong_to_the_teleledger_error_tree():
    for cls in (RootMismatch, ProofLengthError, IndexOutOfRange, SizesOutOfOrder, MalformedHash, MissingNodes):
        assert issubclass(cls, ProofError) and issubclass(cls, TeleledgerError)
