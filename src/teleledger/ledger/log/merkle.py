"""RFC 9162 Merkle tree math: hashing, compact ranges, proofs and their verification.

This module is pure: it imports only the standard library and ``teleledger.core.errors``. It
never touches a database, a clock or the network. Storage hands it perfect-subtree hashes
through the ``NodeReader`` protocol and gets back the new nodes to store from ``CompactRange``.

Byte formats (RFC 9162 §2.1.1, the same as RFC 6962 §2.1; every hash is 32 bytes of SHA-256)
---------------------------------------------------------------------------------------------

    leaf hash    = SHA-256(0x00 || leaf bytes)
    node hash    = SHA-256(0x01 || left child hash (32 bytes) || right child hash (32 bytes))
    empty tree   = SHA-256("")  = e3b0c442...7852b855

The tree head MTH(D[0:n]) of n > 1 leaves splits at k, the largest power of two strictly
smaller than n:  MTH(D[0:n]) = node_hash(MTH(D[0:k]), MTH(D[k:n])).  No leaf is ever duplicated
to fill a level: a tree of 5 leaves is node(node(node(l0, l1), node(l2, l3)), l4).

Storage model: perfect subtrees, keyed by (level, index)
--------------------------------------------------------

The log stores the hash of every *perfect* subtree, i.e. of every complete binary subtree:

    node (level, index) covers leaves [index * 2**level, (index + 1) * 2**level)
    level 0 holds the leaf hashes; node (l + 1, i) = node_hash((l, 2i), (l, 2i + 1))

A node exists once all of its leaves exist and never changes afterwards, so the store is
append-only. Nodes on the ragged right edge of a tree whose size is not a power of two are
*ephemeral*: they depend on the tree size and are never stored. Every ephemeral node over
leaves [start, size) is the fold, right to left, of the perfect subtrees given by the binary
decomposition of size - start (largest first):

    [8, 13)  =  (2, 2) covering [8, 12)  +  (0, 12) covering [12, 13)
    hash     =  node_hash(node(2, 2), node(0, 12))

Proofs are therefore computed from stored perfect-subtree hashes only, never by rebuilding the
tree: ``inclusion_proof_nodes`` / ``consistency_proof_nodes`` name, for every proof element,
the perfect-subtree keys that fold into it; ``inclusion_proof`` / ``consistency_proof`` fetch
all of them with one ``NodeReader.get_nodes`` call (one database round trip) and fold.

The right edge of a tree of size n (the roots of the perfect subtrees given by the binary
decomposition of n, largest first) is a ``CompactRange``, as in transparency-dev/merkle's
``compact`` package: appending a leaf merges equal-sized subtrees and reports every perfect
node that became complete, which is exactly what the caller must store.

Proof formats (RFC 9162 §2.1.3 and §2.1.4)
------------------------------------------

An inclusion proof (audit path) for leaf ``index`` in a tree of ``size`` leaves is the list of
sibling hashes from the leaf up to the root. A consistency proof from ``first`` to ``second``
is SUBPROOF(first, D[0:second], true) of RFC 9162 §2.1.4.1: bottom-up, it starts with the
root of the largest perfect subtree ending at ``first`` unless ``first`` is a power of two.
Both are verified exactly as RFC 9162 §2.1.3.2 and §2.1.4.2 describe.

Errors
------

    TeleledgerError
    └── ProofError                 422  a proof, root or request that does not check out
        ├── OutOfRange             400  the question itself is impossible (also InvalidInput)
        │   ├── IndexOutOfRange         leaf index >= tree size, negative, or empty tree
        │   └── SizesOutOfOrder         first > second: a log never shrinks
        ├── MalformedHash          400  a hash that is not 32 bytes (also InvalidInput)
        ├── ProofLengthError            the proof has the wrong number of hashes
        ├── RootMismatch                the proof folds to another root (expected, computed)
        └── MissingNodes           500  the node store lacks perfect-subtree hashes it must have
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from teleledger.core.errors import InvalidInput, TeleledgerError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "IndexOutOfRange",
    "MalformedHash",
    "MemoryNodeStore",
    "MissingNodes",
    "NodeKey",
    "NodeReader",
    "OutOfRange",
    "ProofError",
    "ProofLengthError",
    "RootMismatch",
    "SizesOutOfOrder",
    "compact_range_keys",
    "consistency_proof",
    "consistency_proof_nodes",
    "inclusion_proof",
    "inclusion_proof_nodes",
    "is_consistent",
    "is_included",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion_proof",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256
_NODE_STATE = _sha256(_NODE_PREFIX)

#: MTH({}) = SHA-256 of the empty string.
EMPTY_ROOT: bytes = _sha256(b"").digest()

#: (level, index) of a perfect subtree; see the module docstring.
NodeKey = tuple[int, int]


# --------------------------------------------------------------------------- errors


class ProofError(TeleledgerError):
    """A Merkle proof, root or proof request that does not check out."""

    status = 422
    issue_code = "processing"


class OutOfRange(ProofError, InvalidInput):
    """The question cannot be asked of any honest log (bad index or sizes)."""

    status = 400
    issue_code = "invalid"


class IndexOutOfRange(OutOfRange):
    def __init__(self, index: int, size: int) -> None:
        super().__init__(f"leaf index {index} is out of range for a tree of size {size}")
        self.index = index
        self.size = size


class SizesOutOfOrder(OutOfRange):
    def __init__(self, first: int, second: int) -> None:
        if first < 0 or second < 0:
            message = f"tree sizes must not be negative (first={first}, second={second})"
        else:
            message = f"first tree size {first} is larger than second tree size {second}"
        super().__init__(message)
        self.first = first
        self.second = second


class MalformedHash(ProofError, InvalidInput):
    status = 400
    issue_code = "invalid"

    def __init__(self, what: str, length: int) -> None:
        super().__init__(f"{what} is {length} bytes, expected a {HASH_SIZE}-byte SHA-256 hash")
        self.what = what
        self.length = length


class ProofLengthError(ProofError):
    def __init__(self, expected: int, got: int, *, what: str = "proof") -> None:
        super().__init__(f"{what} has {got} hashes, expected {expected}")
        self.expected = expected
        self.got = got


class RootMismatch(ProofError):
    def __init__(self, expected: bytes, computed: bytes, *, what: str = "root") -> None:
        super().__init__(f"{what} mismatch: expected {expected.hex()}, computed {computed.hex()}")
        self.expected = expected
        self.computed = computed


class MissingNodes(ProofError):
    """The node store does not hold perfect-subtree hashes it should (a server-side fault)."""

    status = 500
    issue_code = "exception"

    def __init__(self, keys: Iterable[NodeKey]) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(f"({lv}, {ix})" for lv, ix in self.keys[:8])
        more = f" and {len(self.keys) - 8} more" if len(self.keys) > 8 else ""
        super().__init__(f"node store is missing perfect-subtree hashes {shown}{more}")


# --------------------------------------------------------------------------- hashing


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Reference MTH of RFC 9162 §2.1.1 over already-hashed leaves (tests and offline tools).

    Recursive on purpose, to stay a line-by-line transcription of the RFC; the log itself
    uses ``CompactRange``.
    """
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
    return node_hash(root_from_leaves(leaf_hashes[:k]), root_from_leaves(leaf_hashes[k:]))


# --------------------------------------------------------------------------- storage protocol


@runtime_checkable
class NodeReader(Protocol):
    """Batch read of stored perfect-subtree hashes.

    Implementations return a mapping holding every requested key they have; absent keys are
    simply left out (the caller raises ``MissingNodes``). One call should be one round trip.
    """

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]: ...


class MemoryNodeStore:
    """A dict-backed ``NodeReader`` for tests, benchmarks and offline verification tools."""

    def __init__(self) -> None:
        self.nodes: dict[NodeKey, bytes] = {}

    def put_nodes(self, nodes: Iterable[tuple[int, int, bytes]]) -> None:
        store = self.nodes
        for level, index, digest in nodes:
            store[(level, index)] = digest

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        store = self.nodes
        return {key: store[key] for key in keys if key in store}


def _fetch(reader: NodeReader, keys: Iterable[NodeKey]) -> Mapping[NodeKey, bytes]:
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return {}
    got = reader.get_nodes(wanted)
    missing = [key for key in wanted if key not in got]
    if missing:
        raise MissingNodes(missing)
    return got


# --------------------------------------------------------------------------- compact range


def _decompose(start: int, end: int) -> list[NodeKey]:
    """Perfect subtrees covering [start, end), largest first, for ``start`` aligned to a power
    of two larger than ``end - start`` (the shape of every right-edge range in RFC 9162)."""
    keys: list[NodeKey] = []
    count = end - start
    while count:
        level = count.bit_length() - 1
        keys.append((level, start >> level))
        start += 1 << level
        count -= 1 << level
    return keys


def compact_range_keys(size: int) -> list[NodeKey]:
    """Keys of the perfect subtrees that make up the right edge of a tree of ``size`` leaves."""
    if size < 0:
        raise OutOfRange(f"tree size must not be negative, got {size}")
    return _decompose(0, size)


def _fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of consecutive perfect subtrees given largest first: fold right to left."""
    digest = hashes[-1]
    for i in range(len(hashes) - 2, -1, -1):
        digest = _sha256(_NODE_PREFIX + hashes[i] + digest).digest()
    return digest


class CompactRange:
    """The right edge of a tree of ``size`` leaves: one perfect-subtree root per set bit of
    ``size``, largest (leftmost) first. Enough to append leaves and compute the root."""

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise OutOfRange(f"tree size must not be negative, got {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a compact range of size {size} has {size.bit_count()} hashes, got {len(hashes)}"
            )
        for digest in hashes:
            if len(digest) != HASH_SIZE:
                raise MalformedHash("compact range hash", len(digest))
        self._size = size
        self._hashes = list(hashes)

    @classmethod
    def from_nodes(
        cls, size: int, get_node: NodeReader | Callable[[int, int], bytes]
    ) -> CompactRange:
        """Rebuild the right edge of a tree of ``size`` leaves from stored perfect subtrees.

        ``get_node`` is a ``NodeReader`` (one batch call) or a ``(level, index) -> hash``
        callable.
        """
        keys = compact_range_keys(size)
        if isinstance(get_node, NodeReader):
            got = _fetch(get_node, keys)
            return cls(size, [got[key] for key in keys])
        return cls(size, [get_node(level, index) for level, index in keys])

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        """The perfect-subtree roots, largest first (a copy)."""
        return list(self._hashes)

    def keys(self) -> list[NodeKey]:
        return compact_range_keys(self._size)

    def copy(self) -> CompactRange:
        clone = CompactRange.__new__(CompactRange)
        clone._size = self._size
        clone._hashes = list(self._hashes)
        return clone

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return every perfect subtree that became complete, as
        ``(level, index, hash)``, bottom-up (the leaf itself first)."""
        if len(leaf_hash) != HASH_SIZE:
            raise MalformedHash("leaf hash", len(leaf_hash))
        hashes = self._hashes
        index = self._size
        digest = leaf_hash
        level = 0
        new = [(0, index, digest)]
        while index & 1:
            digest = _sha256(_NODE_PREFIX + hashes.pop() + digest).digest()
            index >>= 1
            level += 1
            new.append((level, index, digest))
        hashes.append(digest)
        self._size += 1
        return new

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[tuple[int, int, bytes]]:
        """Append many leaf hashes; return all new perfect subtrees in creation order."""
        new: list[tuple[int, int, bytes]] = []
        for leaf in leaf_hashes:
            new.extend(self.append(leaf))
        return new

    def root(self) -> bytes:
        """MTH of the tree of ``size`` leaves."""
        if not self._hashes:
            return EMPTY_ROOT
        return _fold(self._hashes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()[:16]}…)"


# --------------------------------------------------------------------------- proof generation


def _path_nodes(level: int, index: int, size: int) -> list[list[NodeKey]]:
    """Siblings of perfect node (level, index) up to the root of a tree of ``size`` leaves.

    At each level the sibling is either a stored perfect subtree, absent (the node is on the
    right edge and RFC 9162 does not duplicate it), or an ephemeral right-edge node folded
    from the perfect subtrees of [sibling start, size).
    """
    path: list[list[NodeKey]] = []
    top = (size - 1).bit_length()  # levels below the root
    while level < top:
        sibling = index ^ 1
        start = sibling << level
        if start < size:
            end = start + (1 << level)
            if end <= size:
                path.append([(level, sibling)])
            else:
                path.append(_decompose(start, size))
        index >>= 1
        level += 1
    return path


def inclusion_proof_nodes(index: int, size: int) -> list[list[NodeKey]]:
    """For each element of the audit path of leaf ``index`` in a tree of ``size`` leaves, the
    perfect-subtree keys (largest first) whose hashes fold into it. Bottom-up, like the proof."""
    if not 0 <= index < size:
        raise IndexOutOfRange(index, size)
    return _path_nodes(0, index, size)


def consistency_proof_nodes(first: int, second: int) -> list[list[NodeKey]]:
    """For each element of the consistency proof from ``first`` to ``second`` leaves, the
    perfect-subtree keys whose hashes fold into it.

    The proof is SUBPROOF(first, D[0:second], true) of RFC 9162 §2.1.4.1: the largest perfect
    subtree ending at ``first`` (left out when ``first`` is a power of two, since the verifier
    already holds it as the old root), then that subtree's audit path in the new tree.
    """
    if first < 0 or second < 0 or first > second:
        raise SizesOutOfOrder(first, second)
    if first == 0 or first == second:
        return []
    level = (first & -first).bit_length() - 1  # trailing zeros of first
    index = (first - 1) >> level
    path = _path_nodes(level, index, second)
    if index == 0:  # first is a power of two
        return path
    return [[(level, index)], *path]


def _materialize(groups: list[list[NodeKey]], reader: NodeReader) -> list[bytes]:
    got = _fetch(reader, (key for group in groups for key in group))
    return [
        got[group[0]] if len(group) == 1 else _fold([got[key] for key in group])
        for group in groups
    ]


def inclusion_proof(index: int, size: int, reader: NodeReader) -> list[bytes]:
    """Audit path of leaf ``index`` in the tree of ``size`` leaves, from stored nodes."""
    return _materialize(inclusion_proof_nodes(index, size), reader)


def consistency_proof(first: int, second: int, reader: NodeReader) -> list[bytes]:
    """Consistency proof between tree sizes ``first`` and ``second``, from stored nodes."""
    return _materialize(consistency_proof_nodes(first, second), reader)


# --------------------------------------------------------------------------- verification


def _inclusion_length(index: int, size: int) -> int:
    # Levels where the paths to `index` and to the last leaf differ each need a sibling;
    # above that, the path runs along the right edge and needs one per left turn.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise MalformedHash(what, len(value))


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes:
    """Fold an audit path into the root it proves (RFC 9162 §2.1.3.2 steps 1-4)."""
    if not 0 <= index < size:
        raise IndexOutOfRange(index, size)
    if len(leaf_hash) != HASH_SIZE:
        raise MalformedHash("leaf hash", len(leaf_hash))
    expected = _inclusion_length(index, size)
    if len(proof) != expected:
        raise ProofLengthError(expected, len(proof), what="inclusion proof")

    # Hot path (tens of thousands of calls a second): copying a SHA-256 state that has
    # already absorbed 0x01 beats hashing a freshly concatenated 65-byte string.
    fresh = _NODE_STATE.copy
    fn = index
    sn = size - 1
    r = leaf_hash
    for p in proof:
        if len(p) != HASH_SIZE:
            raise MalformedHash("inclusion proof element", len(p))
        if sn == 0:  # unreachable once the length matched; kept to mirror the RFC
            raise ProofLengthError(expected, len(proof), what="inclusion proof")
        h = fresh()
        if fn & 1 or fn == sn:
            h.update(p)  # r = HASH(0x01 || p || r)
            h.update(r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            h.update(r)  # r = HASH(0x01 || r || p)
            h.update(p)
        r = h.digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofLengthError(expected, len(proof), what="inclusion proof")
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2. Returns None or raises a ``ProofError`` saying what is wrong."""
    if len(root) != HASH_SIZE:
        raise MalformedHash("root", len(root))
    computed = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if computed != root:
        raise RootMismatch(root, computed)


def is_included(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """``verify_inclusion`` as a predicate: False for every ``ProofError``."""
    try:
        verify_inclusion(leaf_hash, index, size, proof, root)
    except ProofError:
        return False
    return True


def _consistency_length(first: int, second: int) -> int:
    shift = (first & -first).bit_length() - 1
    inner = ((first - 1) ^ (second - 1)).bit_length()
    border = ((first - 1) >> inner).bit_count()
    seed = 0 if first == 1 << shift else 1
    return seed + (inner - shift) + border


def verify_consistency(
    first: int,
    second: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """RFC 9162 §2.1.4.2. Returns None or raises a ``ProofError`` saying what is wrong.

    The RFC only defines 0 < first < second. Outside it: first > second is ``SizesOutOfOrder``;
    first == second needs an empty proof and equal roots; first == 0 needs an empty proof and
    ``first_root`` must be the empty-tree root (every log is consistent with the empty tree).
    """
    if first < 0 or second < 0 or first > second:
        raise SizesOutOfOrder(first, second)
    _check_hash(first_root, "first root")
    _check_hash(second_root, "second root")
    if first == second or first == 0:
        if proof:
            raise ProofLengthError(0, len(proof), what="consistency proof")
        expected = EMPTY_ROOT if first == 0 else second_root
        if first_root != expected:
            raise RootMismatch(expected, first_root, what="first root")
        return

    expected_length = _consistency_length(first, second)
    if len(proof) != expected_length:
        raise ProofLengthError(expected_length, len(proof), what="consistency proof")
    for p in proof:
        _check_hash(p, "consistency proof element")

    sha = _sha256
    prefix = _NODE_PREFIX
    path = list(proof)
    # Step 2: the verifier already knows the old root when it is a perfect subtree.
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    # Steps 3-4.
    fn = first - 1
    sn = second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            raise ProofLengthError(expected_length, len(proof), what="consistency proof")
        if fn & 1 or fn == sn:
            fr = sha(prefix + c + fr).digest()
            sr = sha(prefix + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha(prefix + sr + c).digest()
        fn >>= 1
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise ProofLengthError(expected_length, len(proof), what="consistency proof")
    if fr != first_root:
        raise RootMismatch(first_root, fr, what="first root")
    if sr != second_root:
        raise RootMismatch(second_root, sr, what="second root")


def is_consistent(
    first: int,
    second: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """``verify_consistency`` as a predicate: False for every ``ProofError``."""
    try:
        verify_consistency(first, second, first_root, second_root, proof)
    except ProofError:
        return False
    return True
