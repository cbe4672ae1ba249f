"""``teleledger verify``: re-derive everything the node's trust rests on and name what was tampered.

The check reads one consistent snapshot of the database (a deferred ``BEGIN`` on SQLite — WAL
readers never block writers —, ``REPEATABLE READ, READ ONLY`` on PostgreSQL) and never writes.
It streams every table once, in bounded chunks, so memory grows only with the number of change
entries (one small tuple each) and access entries (one 32-byte hash each).

What is checked, in order
-------------------------

1. **Log leaves** (``log_leaves``, idx order): indexes are 0, 1, 2 … without gaps; each
   ``leaf_hash`` is SHA-256(0x00 ‖ leaf); each change entry decodes strictly (an access entry
   is proven well-formed when an ``access_events`` row re-encodes to exactly its bytes, and
   decoded strictly only when none does — two thirds of the decoding work saved).
   When a row's two columns disagree, an inclusion proof from the stored nodes against the
   first signed checkpoint that covers the leaf tells which column still matches the signed
   tree, so the finding says which one was altered and the tree is rebuilt from the authentic
   hash (one tampered byte gives one finding, not a cascade).
2. **Tree nodes** (``log_nodes``): the tree is rebuilt with ``merkle.CompactRange`` from the leaf
   hashes, and every perfect subtree it completes is compared with its stored row (mismatch,
   missing); rows the tree does not have are reported too.
3. **Checkpoints** (``log_checkpoints``): each stored note must verify with the log's key for the
   log's origin, be byte-for-byte in canonical form (base64 tolerates altered padding bits),
   name its own row's size, and commit to the root recomputed at that size; the
   ``root_hash`` column must equal it as well. Consecutive checkpoints are then consistent by
   construction: every root is MTH of a prefix of one and the same leaf sequence, so a
   consistency proof between any two of them would verify; no proof is computed. A checkpoint
   whose signed root the stored leaves do not reproduce (the log once signed other entries, or
   more of them) is ``checkpoint-inconsistent``. ``log_state`` must hold the leaf count and the
   root at that size.
4. **Resource versions** (``resource_versions``): each body is opened with the store's key ring
   (AES-GCM; the additional data binds it to ``Type/id/_history/version``, so an altered or
   moved row fails to open), and HMAC(log key, canonical JSON) is compared with the content
   hash of its change entry — from the tree, or from ``log_queue`` when not yet integrated. A
   delete marker has no body; its method and timestamp are compared. A version whose data key
   row is absent was crypto-shredded: reported as information (``Report.info``), not tampering.
   Change entries left without a version row afterwards are ``logged-version-missing``.
5. **Current pointers** (``resources``): each row points at the latest stored version, with the
   right ``deleted`` flag and ``last_updated``; version rows without a ``resources`` row too.
6. **Access events** (``access_events``): each row re-encodes (with the log key) to exactly its
   ``leaf_hash`` and that leaf is in the log or the queue; access entries of the log that no
   row mirrors are reported (a deleted audit record).
7. **Chain anchors** (when the caller passes the anchors of this log's origin, read from the
   AnchorRegistry contract — ``ledger.chain.anchoring.chain_anchors``): each anchored (tree
   size, root) must be a stored checkpoint whose signed note commits to that root, and the
   log as stored now must extend it: a consistency proof from the anchored size to the
   recomputed tree, built from the stored nodes, must verify against the anchored root. An
   anchor beyond the stored tree means leaves were removed — even when the rest of the log was
   rewritten consistently, which no check of the database alone can see.

Finding kinds (``Finding.kind``; ``table`` and ``key`` name the row)
--------------------------------------------------------------------

    log_leaves         leaf-hash-mismatch, leaf-missing, leaf-extra, entry-malformed, entry-duplicate
    log_queue          entry-malformed, entry-duplicate
    log_nodes          node-mismatch, node-missing, node-extra
    log_checkpoints    checkpoint-signature, checkpoint-root, checkpoint-inconsistent
    log_state          state-missing, state-size, state-root
    resource_versions  version-undecryptable, version-hash, version-metadata, version-unlogged,
                       logged-version-missing
    resources          current-pointer
    data_keys          data-key-missing (the node key), data-key-undecryptable
    access_events      access-event-altered, access-event-unlogged, access-event-missing
    AnchorRegistry     anchor-unmatched, anchor-root, anchor-inconsistent  (key: "#index size=N")

Limits: a ``key_id`` rewritten to a patient key that does not exist looks like shredding (it is
listed in ``Report.info``, with its count of versions, for a human to confirm); witness
cosignatures (``log_cosignatures``) are not checked, the witnesses' keys not being known here.

This module reads through the node's engine and keys; it must never write, flush the log, or
print entry bytes or resource content (findings name rows, never PHI).
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    FromClause,
    Row,
    Select,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.pool import NullPool

from teleledger.core.crypto import DecryptionError
from teleledger.core.errors import TeleledgerError
from teleledger.ledger.chain.anchoring import AnchoredCheckpoint
from teleledger.ledger.log import entry as log_entry
from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import Checkpoint, NoteError, open_checkpoint, parse_note
from teleledger.ledger.log.storage import (
    SqlNodeReader,
    log_checkpoints,
    log_leaves,
    log_nodes,
    log_queue,
    log_state,
)
from teleledger.records.keys import NODE_KEY, KeyShredded
from teleledger.storage import tables as t
from teleledger.storage.db import sqlite_pragmas

if TYPE_CHECKING:  # the node is only used, never built, here
    from teleledger.bootstrap import Node

__all__ = ["Finding", "Progress", "Report", "verify_node"]

#: ``progress(phase, done, total)``; phases: "leaves", "versions", "access events".
Progress = Callable[[str, int, int], None]

CHUNK = 20_000
#: rows located one by one for a mass finding (e.g. every access event deleted); then a count
MAX_LOCATED = 1000
_sha256 = hashlib.sha256
_ACCESS_HEADER = bytes([log_entry.FORMAT_VERSION, log_entry.ACCESS])
_KEY_ID = re.compile(r"node|p\.[A-Za-z0-9.\-]{1,64}")


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that does not check out: what (``kind``), where (``table`` and ``key``, the
    row's primary key as text), and why (``detail``: expected versus found)."""

    kind: str
    table: str
    key: str
    detail: str


@dataclass(slots=True)
class Report:
    """What ``verify_node`` found (``findings``: tampering or damage, in the order found) and
    what it checked (the counters)."""

    findings: list[Finding] = field(default_factory=list)
    #: not tampering: crypto-shredded keys (one entry per key id) and similar notes
    info: list[Finding] = field(default_factory=list)
    entries: int = 0  # log leaves checked
    queued: int = 0  # log_queue entries decoded
    nodes: int = 0  # stored perfect subtrees compared
    checkpoints: int = 0
    versions: int = 0
    resources: int = 0
    access_events: int = 0
    anchors: int = 0  # chain anchors checked
    tree_size: int = 0
    root_hash: bytes = merkle.EMPTY_ROOT
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> Counter[str]:
        return Counter(f.kind for f in self.findings)


@dataclass(slots=True)
class _Logged:
    """A change entry, by reference, until its version row is seen."""

    at: int  # leaf index, or -1 - log_queue id for an entry not yet integrated
    timestamp_us: int
    method: str
    content_hmac: bytes

    @property
    def where(self) -> str:
        return " ".join(_entry_row(self.at))


def _entry_row(at: int) -> tuple[str, str]:
    """(table, row key) of the entry at ``at``: a leaf index, or -1 - a ``log_queue`` id."""
    return ("log_leaves", f"idx={at}") if at >= 0 else ("log_queue", f"id={-1 - at}")


def verify_node(node: Node, *, progress: Progress | None = None,
                clock: Callable[[], float] = time.perf_counter, chunk: int = CHUNK,
                anchors: Sequence[AnchoredCheckpoint] | None = None) -> Report:
    """Check the node's database end to end (see the module docstring); never raises for what
    it finds — every problem is a ``Finding`` in the report. ``anchors``: the chain's anchors of
    this log's origin, read *before* the call (so every checkpoint they name is already in the
    snapshot); None skips step 7."""
    started = clock()
    with _snapshot(node.engine) as conn:
        run = _Run(node, conn, progress or _no_progress, chunk)
        run.log()
        if anchors is not None:
            run.anchored(anchors)
        run.queue()
        run.versions()
        run.current_pointers()
        run.access_events()
    run.report.elapsed = clock() - started
    return run.report


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


# an altered byte may leave a TEXT column invalid UTF-8: read it (and report the row) rather
# than let the driver abort the whole run (str(), not a lambda: no Python frame per value)
_lenient_text = functools.partial(str, encoding="utf-8", errors="surrogateescape")


def _lenient(dbapi_conn) -> None:  # type: ignore[no-untyped-def]
    dbapi_conn.text_factory = _lenient_text


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only connection holding one snapshot for the whole run."""
    if engine.dialect.name == "sqlite" and str(engine.url.database or "") not in ("", ":memory:"):
        reads = create_engine(engine.url, poolclass=NullPool,
                              connect_args={"check_same_thread": False, "timeout": 30})

        # we issue BEGIN ourselves: DEFERRED, not IMMEDIATE; tampered text must still decode
        sqlite_pragmas(reads, query_only=True, configure=_lenient)

        try:
            with reads.connect() as conn:
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("ROLLBACK")
        finally:
            reads.dispose()
        return
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            yield conn
            conn.rollback()
        return
    with engine.connect() as conn:  # in-memory SQLite (tests): the engine's own connection
        yield conn
        conn.rollback()


def _stream(conn: Connection, stmt: Select[Any], size: int) -> Iterator[Sequence[Row[Any]]]:
    """Rows in partitions of ``size``; a server-side cursor on PostgreSQL. (Statement options:
    ``Connection.execution_options`` would stick to every later query on the connection.)"""
    return conn.execute(stmt.execution_options(stream_results=True, yield_per=size)).partitions()


def _count(conn: Connection, table: FromClause) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


class _Run:
    def __init__(self, node: Node, conn: Connection, progress: Progress, chunk: int) -> None:
        self.node = node
        self.c = conn
        self.progress = progress
        self.chunk = chunk
        self.report = Report()
        self.log_key = node.auditor.key
        self.verifier = node.log.verifier
        self.origin = node.log.origin
        # change entries by "Type/id/_history/version", popped as version rows are seen
        self.logged: dict[str, _Logged] = {}
        # leaf hashes of access entries in the tree; the hash of any repeat in ``access_dupes``
        self.access: set[bytes] = set()
        self.access_dupes: Counter[bytes] = Counter()
        self.queued_hashes: set[bytes] = set()
        # authentic leaf hash → idx, for leaves whose bytes were altered (their entries are lost,
        # but a version or access row that hashes to one of them is still proven intact)
        self.altered: dict[bytes, int] = {}
        self.anchors: list[tuple[int, bytes, str]] | None = None
        self.pseudonyms: dict[str, bytes] = {}

    def find(self, kind: str, table: str, key: str, detail: str) -> None:
        self.report.findings.append(Finding(kind, table, key, detail))

    # ------------------------------------------------------------------ the log

    def log(self) -> None:
        c = self.c
        state = c.execute(select(log_state.c.size, log_state.c.root_hash)
                          .where(log_state.c.id == 1)).first()
        state_size = None if state is None else int(state[0])
        total = _count(c, log_leaves)
        self.progress("leaves", 0, total)
        compact = merkle.CompactRange()
        broken_at: int | None = None  # first missing leaf: no tree beyond it
        expected = 0
        state_root: bytes | None = merkle.EMPTY_ROOT if state_size == 0 else None
        self._checkpoints_upto(0, 0, {0: merkle.EMPTY_ROOT})
        stmt = select(log_leaves.c.idx, log_leaves.c.leaf, log_leaves.c.leaf_hash).order_by(log_leaves.c.idx)
        sha = _sha256
        access = self.access
        for rows in _stream(c, stmt, self.chunk):
            first = expected
            computed: dict[tuple[int, int], bytes] = {}
            roots: dict[int, bytes] = {}
            last = int(rows[-1][0])
            wanted = set(c.execute(select(log_checkpoints.c.size).where(
                log_checkpoints.c.size > first, log_checkpoints.c.size <= last + 1)).scalars())
            for idx, leaf, stored in rows:
                idx = int(idx)
                if idx != expected:
                    if idx < expected:
                        self.find("leaf-extra", "log_leaves", f"idx={idx}",
                                  "a leaf index below the tree's contiguous range")
                        continue
                    gap = "" if idx == expected + 1 else f"..{idx - 1}"
                    self.find("leaf-missing", "log_leaves", f"idx={expected}{gap}",
                              f"no row for leaf index {expected}{gap}: the tree cannot be rebuilt "
                              "past it")
                    if broken_at is None:
                        broken_at = expected
                leaf = bytes(leaf)
                digest = sha(b"\x00" + leaf).digest()
                authentic = True
                if digest != stored:
                    digest, authentic = self._leaf_mismatch(idx, digest, bytes(stored))
                if broken_at is None:
                    new = compact.append(digest)
                    if len(new) > 1:
                        for level, index, node in new[1:]:
                            computed[(level, index)] = node
                    size = idx + 1
                    if size in wanted:
                        roots[size] = compact.root()
                    if size == state_size:
                        state_root = compact.root()
                expected = idx + 1
                if not authentic:
                    self.altered[digest] = idx
                elif leaf[:2] == _ACCESS_HEADER:
                    # not decoded here: the access_events row that re-encodes to exactly these
                    # bytes proves them well-formed; leftovers are decoded at the end
                    if digest in access:
                        self.access_dupes[digest] += 1
                    else:
                        access.add(digest)
                else:
                    self._register(leaf, digest, idx)
            self._compare_nodes(computed)
            self._checkpoints_upto(first, last + 1, roots, broken_at=broken_at)
            self.report.entries += len(rows)
            self.progress("leaves", self.report.entries, total)

        n = expected
        self.report.tree_size = n if broken_at is None else broken_at
        self.report.root_hash = compact.root()
        self._extra_nodes(n)
        self._checkpoints_beyond(n)
        if state is None:
            if n:
                self.find("state-missing", "log_state", "id=1",
                          f"no log_state row, but {n} leaves are stored")
        else:
            root = bytes(state[1])
            if state_size != n:
                self.find("state-size", "log_state", "id=1",
                          f"log_state.size = {state_size}, but log_leaves holds {n} leaves")
            if state_root is not None and root != state_root:
                self.find("state-root", "log_state", "id=1",
                          f"log_state.root_hash = {root.hex()}, the leaves give "
                          f"{state_root.hex()} at size {state_size}")

    def _register(self, leaf: bytes, digest: bytes, at: int) -> None:
        """Remember a change entry by reference (an access entry by hash); ``at``: a leaf
        index, or -1 - a ``log_queue`` id."""
        try:
            entry = log_entry.decode(leaf)
        except log_entry.MalformedEntry as exc:
            self.find("entry-malformed", *_entry_row(at), exc.message)
            return
        if isinstance(entry, log_entry.AccessEntry):
            (self.queued_hashes if at < 0 else self.access).add(digest)
            return
        ref = entry.reference
        previous = self.logged.get(ref)
        if previous is not None:
            self.find("entry-duplicate", *_entry_row(at),
                      f"a second change entry for {ref} (the first is at {previous.where})")
            return
        self.logged[ref] = _Logged(at, entry.timestamp_us, entry.method, entry.content_hmac)

    def _leaf_mismatch(self, idx: int, digest: bytes, stored: bytes) -> tuple[bytes, bool]:
        """Which column of a leaf row whose hash and bytes disagree still matches the signed
        tree; returns (hash to build the tree from, whether the leaf bytes are authentic)."""
        key = f"idx={idx}"
        anchor = self._anchor(idx)
        if anchor is not None:
            size, root, what = anchor
            try:
                proof = merkle.inclusion_proof(idx, size, SqlNodeReader(self.c))
            except merkle.ProofError:
                proof = None
            if proof is not None:
                if merkle.is_included(digest, idx, size, proof, root):
                    self.find("leaf-hash-mismatch", "log_leaves", key,
                              f"the leaf_hash column was altered: stored leaf_hash ≠ "
                              f"SHA-256(0x00‖leaf), and the leaf bytes are in {what}")
                    return digest, True
                if merkle.is_included(stored, idx, size, proof, root):
                    self.find("leaf-hash-mismatch", "log_leaves", key,
                              f"the leaf bytes were altered: stored leaf_hash ≠ "
                              f"SHA-256(0x00‖leaf), and the stored leaf_hash is in {what}")
                    return stored, False
        self.find("leaf-hash-mismatch", "log_leaves", key,
                  "stored leaf_hash ≠ SHA-256(0x00‖leaf), and neither is provably in a signed "
                  "tree head")
        return digest, True

    def _anchor(self, idx: int) -> tuple[int, bytes, str] | None:
        """A trusted (size > idx, root): the first checkpoint covering ``idx`` whose note
        verifies, else ``log_state`` (unsigned)."""
        if self.anchors is None:
            self.anchors = []
            rows = self.c.execute(select(log_checkpoints.c.size, log_checkpoints.c.note)
                                  .order_by(log_checkpoints.c.size))
            for size, note in rows:
                signed = self._open(note)
                if signed is not None and signed.size == int(size):
                    self.anchors.append((signed.size, signed.root_hash,
                                         f"the signed checkpoint of size {signed.size}"))
            state = self.c.execute(select(log_state.c.size, log_state.c.root_hash)).first()
            if state is not None:
                self.anchors.append((int(state[0]), bytes(state[1]), "log_state (unsigned)"))
        for anchor in self.anchors:
            if anchor[0] > idx:
                return anchor
        return None

    def _open(self, note: str) -> Checkpoint | None:
        try:
            checkpoint, _ = open_checkpoint(note, [self.verifier], origin=self.origin)
        except (NoteError, ValueError, UnicodeError):
            return None
        return checkpoint

    def _compare_nodes(self, computed: dict[tuple[int, int], bytes]) -> None:
        if not computed:
            return
        spans: dict[int, list[int]] = {}
        for level, index in computed:
            span = spans.setdefault(level, [index, index])
            if index < span[0]:
                span[0] = index
            elif index > span[1]:
                span[1] = index
        groups, params = [], {}
        for g, (level, (lo, hi)) in enumerate(sorted(spans.items())):
            groups.append(f"(level = :l{g} AND idx >= :lo{g} AND idx <= :hi{g})")
            params.update({f"l{g}": level, f"lo{g}": lo, f"hi{g}": hi})
        seen = 0
        for level, index, digest in self.c.execute(
                text(f"SELECT level, idx, hash FROM log_nodes WHERE {' OR '.join(groups)}"), params):
            want = computed.pop((int(level), int(index)), None)
            if want is None:
                continue
            seen += 1
            if bytes(digest) != want:
                self.find("node-mismatch", "log_nodes", f"level={level} idx={index}",
                          f"stored hash {bytes(digest).hex()} ≠ {want.hex()} recomputed from "
                          f"leaves [{int(index) << int(level)}, {(int(index) + 1) << int(level)})")
        self.report.nodes += seen
        for level, index in sorted(computed):
            self.find("node-missing", "log_nodes", f"level={level} idx={index}",
                      "no row for this perfect subtree of the stored leaves")

    def _extra_nodes(self, n: int) -> None:
        expected = sum(n >> level for level in range(1, n.bit_length()))
        if _count(self.c, log_nodes) == expected + 0 and self.report.nodes == expected:
            return
        # rows for subtrees the leaves do not complete (or of impossible levels)
        for level, index in self.c.execute(select(log_nodes.c.level, log_nodes.c.idx)
                                           .order_by(log_nodes.c.level, log_nodes.c.idx)):
            level, index = int(level), int(index)
            if level < 1 or level > 62 or index < 0 or (index + 1) << level > n:
                self.find("node-extra", "log_nodes", f"level={level} idx={index}",
                          f"a stored node for a subtree the {n} stored leaves do not complete")

    # ------------------------------------------------------------------ checkpoints

    def _checkpoints_upto(self, low: int, high: int, roots: dict[int, bytes], *,
                          broken_at: int | None = None) -> None:
        """Check the checkpoints of sizes in (low, high] (size 0 when ``high`` is 0)."""
        cond = (log_checkpoints.c.size <= 0) if high == 0 else (
            (log_checkpoints.c.size > low) & (log_checkpoints.c.size <= high))
        rows = self.c.execute(select(log_checkpoints.c.size, log_checkpoints.c.root_hash,
                                     log_checkpoints.c.note).where(cond)
                              .order_by(log_checkpoints.c.size))
        for size, root_hash, note in rows:
            size = int(size)
            computed = roots.get(size) if broken_at is None or size <= broken_at else None
            self._checkpoint(size, bytes(root_hash), note, computed)

    def _checkpoints_beyond(self, n: int) -> None:
        rows = self.c.execute(select(log_checkpoints.c.size, log_checkpoints.c.root_hash,
                                     log_checkpoints.c.note).where(log_checkpoints.c.size > n)
                              .order_by(log_checkpoints.c.size))
        for size, root_hash, note in rows:
            signed = self._checkpoint(int(size), bytes(root_hash), note, None)
            if signed is not None:
                self.find("checkpoint-inconsistent", "log_checkpoints", f"size={size}",
                          f"the log signed a tree of {size} leaves, only {n} are stored: "
                          "leaves were removed")

    def _checkpoint(self, size: int, root_hash: bytes, note: str,
                    computed: bytes | None) -> Checkpoint | None:
        self.report.checkpoints += 1
        key = f"size={size}"
        signed = None
        try:
            signed, _ = open_checkpoint(note, [self.verifier], origin=self.origin)
            parsed = parse_note(note)
            canonical = parsed.body + "\n" + "".join(sig.line for sig in parsed.signatures)
            if canonical != note:
                signed = None
                self.find("checkpoint-signature", "log_checkpoints", key,
                          "the note verifies but is not byte-for-byte what the log signed "
                          "(a signature line was re-encoded)")
        except (NoteError, ValueError, UnicodeError) as exc:
            message = exc.message if isinstance(exc, TeleledgerError) else str(exc)
            self.find("checkpoint-signature", "log_checkpoints", key,
                      f"the note does not verify with the log key {self.verifier.name}: {message}")
        if signed is not None and signed.size != size:
            self.find("checkpoint-signature", "log_checkpoints", key,
                      f"the signed note is for tree size {signed.size}, stored under size {size}")
            signed = None
        if computed is None:
            return signed
        signed_root = None if signed is None else signed.root_hash
        if root_hash != computed:
            if signed_root == root_hash:
                self.find("checkpoint-inconsistent", "log_checkpoints", key,
                          f"the log signed root {root_hash.hex()} for {size} leaves; the stored "
                          f"leaves give {computed.hex()}: leaves before {size} were rewritten")
            else:
                self.find("checkpoint-root", "log_checkpoints", key,
                          f"root_hash column {root_hash.hex()} ≠ {computed.hex()} recomputed from "
                          "the leaves" + (" and in the signed note" if signed_root == computed else ""))
        if signed_root is not None and signed_root != computed and signed_root != root_hash:
            self.find("checkpoint-inconsistent", "log_checkpoints", key,
                      f"the log signed root {signed_root.hex()} for {size} leaves; the stored "
                      f"leaves give {computed.hex()}")
        return signed

    # ------------------------------------------------------------------ chain anchors

    def anchored(self, anchors: Sequence[AnchoredCheckpoint]) -> None:
        """Step 7: every anchor is a signed checkpoint the stored log still extends."""
        size_now, root_now = self.report.tree_size, self.report.root_hash
        for anchor in anchors:
            self.report.anchors += 1
            key = f"#{anchor.index} size={anchor.tree_size}"
            what = f"the chain anchors tree size {anchor.tree_size} with root {anchor.root_hash.hex()}"
            row = self.c.execute(select(log_checkpoints.c.note).where(
                log_checkpoints.c.size == anchor.tree_size)).first()
            signed = None if row is None else self._open(row.note)
            if signed is None or signed.size != anchor.tree_size:
                self.find("anchor-unmatched", "AnchorRegistry", key,
                          f"{what}, but the log holds no checkpoint of that size whose signature verifies")
            elif signed.root_hash != anchor.root_hash:
                self.find("anchor-root", "AnchorRegistry", key,
                          f"{what}, but the log's signed checkpoint of that size has root "
                          f"{signed.root_hash.hex()}")
            if anchor.tree_size > size_now:
                self.find("anchor-inconsistent", "AnchorRegistry", key,
                          f"{what}, but the stored log rebuilds only {size_now} leaves: leaves were removed")
                continue
            try:
                proof = merkle.consistency_proof(anchor.tree_size, size_now, SqlNodeReader(self.c))
                merkle.verify_consistency(anchor.tree_size, size_now, anchor.root_hash, root_now, proof)
            except merkle.ProofError as exc:
                self.find("anchor-inconsistent", "AnchorRegistry", key,
                          f"{what}; the stored log (size {size_now}, root {root_now.hex()}) is not consistent "
                          f"with it: {exc.message}")

    # ------------------------------------------------------------------ queue

    def queue(self) -> None:
        stmt = select(log_queue.c.id, log_queue.c.leaf).order_by(log_queue.c.id)
        for rows in _stream(self.c, stmt, self.chunk):
            for qid, leaf in rows:
                leaf = bytes(leaf)
                self._register(leaf, _sha256(b"\x00" + leaf).digest(), -1 - int(qid))
            self.report.queued += len(rows)

    # ------------------------------------------------------------------ resource versions

    def versions(self) -> None:
        v = t.resource_versions
        total = _count(self.c, v)
        self.progress("versions", 0, total)
        shredded: Counter[str] = Counter()
        broken_keys: set[str] = set()
        # key rows of this snapshot: the key ring's cache may still hold a key shredded since
        present = set(self.c.execute(select(t.data_keys.c.key_id)).scalars())
        stmt = select(v.c.res_type, v.c.res_id, v.c.version, v.c.last_updated, v.c.method,
                      v.c.key_id, v.c.body).order_by(v.c.res_type, v.c.res_id, v.c.version)
        for rows in _stream(self.c, stmt, max(1, self.chunk // 10)):
            for row in rows:
                ref = f"{row.res_type}/{row.res_id}/_history/{row.version}"
                logged = self.logged.pop(ref, None)
                mac = b"" if row.body is None else self._content_hmac(ref, row, present, shredded,
                                                                      broken_keys)
                self._compare_version(ref, row, logged, mac)
            self.report.versions += len(rows)
            self.progress("versions", self.report.versions, total)
        for key_id, n in sorted(shredded.items()):
            self.report.info.append(Finding(
                "shredded", "data_keys", f"key_id={key_id}",
                f"{n} resource versions are erased (data key destroyed); their log entries remain"))
        for ref, logged in self.logged.items():
            self.find("logged-version-missing", "resource_versions", ref,
                      f"the change entry at {logged.where} has no version row")
        self.logged.clear()

    def _content_hmac(self, ref: str, row: Row[Any], present: set[str], shredded: Counter[str],
                      broken_keys: set[str]) -> bytes | None:
        """HMAC(log key, canonical JSON) of a version's body; None when it cannot be known
        (shredded, or undecryptable — reported here)."""
        key_id = row.key_id
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            self.find("version-undecryptable", "resource_versions", ref, "key_id is not a data key id")
            return None
        if key_id in broken_keys:
            return None
        if key_id not in present:
            if key_id != NODE_KEY:
                shredded[key_id] += 1
                return None
            broken_keys.add(key_id)
            self.find("data-key-missing", "data_keys", f"key_id={key_id}",
                      "the node's data key is gone (it is never shredded)")
            return None
        store = self.node.records.store
        try:
            store.keys.for_read(self.c, key_id)
        except (DecryptionError, KeyShredded):
            broken_keys.add(key_id)
            self.find("data-key-undecryptable", "data_keys", f"key_id={key_id}",
                      "the wrapped data key does not open with the master key")
            return None
        try:
            body = store._decode(self.c, row).body
        except (DecryptionError, UnicodeError):
            self.find("version-undecryptable", "resource_versions", ref,
                      "AES-GCM authentication failed: the ciphertext was altered or the row was "
                      "moved from another resource or version")
            return None
        except ValueError:  # orjson: decrypted, authentic, yet not JSON — not written by the store
            self.find("version-undecryptable", "resource_versions", ref, "the decrypted body is not JSON")
            return None
        try:
            return log_entry.content_hmac(self.log_key, body)
        except log_entry.MalformedEntry as exc:
            self.find("version-hash", "resource_versions", ref, exc.message)
            return None

    def _compare_version(self, ref: str, row: Row[Any], logged: _Logged | None,
                         mac: bytes | None) -> None:
        if logged is None:
            if mac is not None and self._in_altered_leaf(row, mac):
                return  # intact: its entry is a leaf whose bytes were altered (reported there)
            self.find("version-unlogged", "resource_versions", ref,
                      "no change entry in the log or its queue for this version")
            return
        if row.method != logged.method or row.last_updated != logged.timestamp_us:
            self.find("version-metadata", "resource_versions", ref,
                      f"method/last_updated {row.method}/{row.last_updated} ≠ "
                      f"{logged.method}/{logged.timestamp_us} in the change entry at {logged.where}")
        if mac is not None and mac != logged.content_hmac:
            what = ("the row has no body but its change entry logs content" if not mac else
                    "the change entry logs a deletion but the row has a body" if not logged.content_hmac
                    else "content differs from its logged change entry")
            self.find("version-hash", "resource_versions", ref, f"{what} ({logged.where})")

    def _in_altered_leaf(self, row: Row[Any], mac: bytes) -> bool:
        if not self.altered:
            return False
        try:
            leaf = log_entry.encode_change(timestamp_us=row.last_updated, method=row.method,
                                           resource_type=row.res_type, resource_id=row.res_id,
                                           version=row.version, content_hmac=mac)
        except log_entry.MalformedEntry:
            return False
        return _sha256(b"\x00" + leaf).digest() in self.altered

    # ------------------------------------------------------------------ current pointers

    def current_pointers(self) -> None:
        r, v = t.resources, t.resource_versions
        latest = (select(v.c.res_type, v.c.res_id, func.max(v.c.version).label("latest"))
                  .group_by(v.c.res_type, v.c.res_id).subquery())
        pointed = v.alias("pointed")
        stmt = (select(r.c.res_type, r.c.res_id, r.c.version, r.c.deleted, r.c.last_updated,
                       latest.c.latest, pointed.c.method, pointed.c.last_updated.label("v_updated"))
                .select_from(
                    r.outerjoin(latest, (latest.c.res_type == r.c.res_type)
                                & (latest.c.res_id == r.c.res_id))
                    .outerjoin(pointed, (pointed.c.res_type == r.c.res_type)
                               & (pointed.c.res_id == r.c.res_id) & (pointed.c.version == r.c.version))))
        for rows in _stream(self.c, stmt, self.chunk):
            for row in rows:
                key = f"{row.res_type}/{row.res_id}"
                if row.latest is None:
                    self.find("current-pointer", "resources", key, "no stored version at all")
                elif row.method is None:
                    self.find("current-pointer", "resources", key,
                              f"resources.version = {row.version}, a version that does not exist "
                              f"(latest stored: {row.latest})")
                elif row.version != row.latest:
                    self.find("current-pointer", "resources", key,
                              f"resources.version = {row.version}, but the latest stored version "
                              f"is {row.latest}")
                elif bool(row.deleted) != (row.method == "delete"):
                    self.find("current-pointer", "resources", key,
                              f"resources.deleted = {bool(row.deleted)}, but version {row.version} "
                              f"is a {row.method}")
                elif row.last_updated != row.v_updated:
                    self.find("current-pointer", "resources", key,
                              f"resources.last_updated = {row.last_updated} ≠ {row.v_updated} of "
                              f"version {row.version}")
            self.report.resources += len(rows)
        orphans = (select(v.c.res_type, v.c.res_id).distinct()
                   .select_from(v.outerjoin(r, (r.c.res_type == v.c.res_type) & (r.c.res_id == v.c.res_id)))
                   .where(r.c.res_id.is_(None)))
        for res_type, res_id in self.c.execute(orphans):
            self.find("current-pointer", "resources", f"{res_type}/{res_id}",
                      "versions are stored but the resources row is missing")

    # ------------------------------------------------------------------ access events

    def access_events(self) -> None:
        a = t.access_events
        total = _count(self.c, a)
        self.progress("access events", 0, total)
        stmt = select(a.c.id, a.c.recorded, a.c.actor, a.c.role, a.c.action, a.c.purpose,
                      a.c.outcome, a.c.reason, a.c.patient_id, a.c.refs, a.c.leaf_hash).order_by(a.c.id)
        for rows in _stream(self.c, stmt, self.chunk):
            for row in rows:
                self._access_event(row)
            self.report.access_events += len(rows)
            self.progress("access events", self.report.access_events, total)
        missing = list(self.access) + [h for h, n in self.access_dupes.items() for _ in range(n)]
        self.access.clear()
        located = sorted(self._leaf_of(digest) for digest in missing[:MAX_LOCATED])
        for idx, leaf in located:
            if idx is None:  # its leaf_hash column was altered too (reported with the leaf)
                continue
            try:
                log_entry.decode(leaf)
            except log_entry.MalformedEntry as exc:
                self.find("entry-malformed", "log_leaves", f"idx={idx}", exc.message)
                continue
            self.find("access-event-missing", "access_events", f"leaf idx={idx}",
                      f"the access entry at log_leaves idx={idx} has no access_events row "
                      "(an audit record was deleted)")
        if len(missing) > MAX_LOCATED:
            self.find("access-event-missing", "access_events", "…",
                      f"{len(missing) - MAX_LOCATED} more access entries have no access_events row")

    def _access_event(self, row: Row[Any]) -> None:
        key = f"id={row.id}"
        stored = bytes(row.leaf_hash)
        try:
            leaf = log_entry.encode_access(
                timestamp_us=row.recorded, actor=row.actor, role=row.role, action=row.action,
                purpose=row.purpose, outcome=row.outcome, reason=row.reason,
                patient_pseudonym=self._pseudonym(row.patient_id) if row.patient_id else b"",
                references=row.refs.split())
            digest = _sha256(b"\x00" + leaf).digest()
        except (log_entry.MalformedEntry, AttributeError, TypeError) as exc:
            digest = None
            self.find("access-event-altered", "access_events", key,
                      f"the row cannot be an access entry: {getattr(exc, 'message', exc)}")
        if digest is not None and digest != stored:
            self.find("access-event-altered", "access_events", key,
                      "the row's fields do not re-encode to its leaf_hash")
        for candidate in (digest, stored):
            if candidate is None:
                continue
            if self._take_access(candidate):
                return
        self.find("access-event-unlogged", "access_events", key,
                  "its access entry is neither in the log nor in its queue")

    def _pseudonym(self, patient_id: str) -> bytes:
        pseudonym = self.pseudonyms.get(patient_id)
        if pseudonym is None:
            if len(self.pseudonyms) >= 100_000:
                self.pseudonyms.clear()
            pseudonym = self.pseudonyms[patient_id] = log_entry.patient_pseudonym(self.log_key, patient_id)
        return pseudonym

    def _take_access(self, digest: bytes) -> bool:
        if digest in self.access:
            if self.access_dupes.get(digest):
                self.access_dupes[digest] -= 1
            else:
                self.access.discard(digest)
            return True
        return digest in self.queued_hashes or digest in self.altered

    def _leaf_of(self, digest: bytes) -> tuple[int, bytes] | tuple[None, None]:
        """(idx, leaf) of the first leaf with this hash, found through the leaf_hash index."""
        for idx, leaf in self.c.execute(select(log_leaves.c.idx, log_leaves.c.leaf)
                                        .where(log_leaves.c.leaf_hash == digest)
                                        .order_by(log_leaves.c.idx)):
            if _sha256(b"\x00" + bytes(leaf)).digest() == digest:
                return int(idx), bytes(leaf)
        return None, None
