"""Micro-benchmark of the transparency-log Merkle math (teleledger.ledger.log.merkle).

    python bench/bench_proofs.py [--leaves 1048576] [--samples 50000] [--seed 9162]

Builds an in-memory node store of 2**20 leaves through ``CompactRange`` (exactly the nodes the
SQL store will hold), then measures on one core (plain CPython, one thread):

* inclusion-proof generation from the store (one ``get_nodes`` batch per proof) and
  verification (RFC 9162 §2.1.3.2) for random leaves, in a tree of 2**20 leaves and in a
  ragged tree of 1,000,000 leaves (right-edge nodes folded from perfect subtrees);
* the same for consistency proofs between random tree sizes;
* a baseline: bare ``hashlib.sha256(65 bytes).digest()`` calls, as many as the verifications
  hashed, in the same process. The ratio says how close verification gets to pure hashing.

Target: >= 80,000 inclusion-proof verifications/s for trees around 1M leaves.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import random
import ssl
import time
from collections.abc import Sequence

from teleledger.ledger.log import merkle

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

TARGET_VERIFICATIONS_PER_S = 80_000


class LevelStore:
    """Node store as one bytearray per level: 32 bytes per node, ~64 MiB for 2**20 leaves.

    ``CompactRange.append`` completes the nodes of each level in index order, so storing is an
    append; reading is a slice. It implements ``merkle.NodeReader``.
    """

    def __init__(self) -> None:
        self.levels: list[bytearray] = []

    def put_nodes(self, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        levels = self.levels
        for level, index, digest in nodes:
            while len(levels) <= level:
                levels.append(bytearray())
            row = levels[level]
            if len(row) != index * 32:
                raise AssertionError(f"node ({level}, {index}) stored out of order")
            row += digest

    def get_nodes(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        levels = self.levels
        out = {}
        for level, index in keys:
            if level < len(levels):
                row = levels[level]
                start = index * 32
                if start + 32 <= len(row):
                    out[(level, index)] = bytes(row[start : start + 32])
        return out


def build(n: int, console: Console) -> tuple[LevelStore, list[bytes], float]:
    store = LevelStore()
    compact = merkle.CompactRange()
    leaves: list[bytes] = []
    chunk = 8192
    leaf_hash = merkle.leaf_hash
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]building node store"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("build", total=n)
        for lo in range(0, n, chunk):
            batch = [leaf_hash(b"teleledger bench leaf %d" % i) for i in range(lo, min(n, lo + chunk))]
            leaves.extend(batch)
            store.put_nodes(compact.extend(batch))
            progress.update(task, advance=len(batch))
    elapsed = time.perf_counter() - start
    if compact.root() != merkle.CompactRange.from_nodes(n, store).root():
        raise AssertionError("the store does not reproduce the compact range's root")
    return store, leaves, elapsed


def best_of(repeats: int, fn) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_inclusion(store, leaves, size, samples, rng):  # noqa: ANN001, ANN201
    root = merkle.CompactRange.from_nodes(size, store).root()
    indices = [rng.randrange(size) for _ in range(samples)]
    proofs: list[list[bytes]] = []

    def generate() -> None:
        proofs.clear()
        for i in indices:
            proofs.append(merkle.inclusion_proof(i, size, store))

    gen_time = best_of(2, generate)
    cases = [(leaves[i], i, proof) for i, proof in zip(indices, proofs, strict=True)]
    verify_inclusion = merkle.verify_inclusion

    def verify() -> None:
        for leaf, i, proof in cases:
            verify_inclusion(leaf, i, size, proof, root)

    verify_time = best_of(3, verify)
    hashes = sum(len(p) for p in proofs)
    return gen_time, verify_time, hashes


def bench_consistency(store, size, samples, rng):  # noqa: ANN001, ANN201
    roots: dict[int, bytes] = {}

    def root_at(n: int) -> bytes:
        if n not in roots:
            roots[n] = merkle.CompactRange.from_nodes(n, store).root()
        return roots[n]

    pairs = []
    for _ in range(samples):
        a, b = sorted((rng.randrange(1, size + 1), rng.randrange(1, size + 1)))
        pairs.append((a, b))
    for a, b in pairs:
        root_at(a), root_at(b)
    proofs: list[list[bytes]] = []

    def generate() -> None:
        proofs.clear()
        for a, b in pairs:
            proofs.append(merkle.consistency_proof(a, b, store))

    gen_time = best_of(2, generate)
    cases = [(a, b, roots[a], roots[b], p) for (a, b), p in zip(pairs, proofs, strict=True)]
    verify_consistency = merkle.verify_consistency

    def verify() -> None:
        for a, b, ra, rb, p in cases:
            verify_consistency(a, b, ra, rb, p)

    verify_time = best_of(3, verify)
    # Upper bound: the RFC loop hashes twice per element where the old root is rebuilt too.
    hashes = sum(len(p) for p in proofs) * 2
    return gen_time, verify_time, hashes


def bare_sha256(count: int) -> float:
    sha = hashlib.sha256
    block = b"\x01" + bytes(64)

    def run() -> None:
        for _ in range(count):
            sha(block).digest()

    return best_of(3, run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1 << 20)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=9162)
    args = parser.parse_args(argv)

    console = Console()
    console.print(
        f"[bold]teleledger Merkle proof benchmark[/] — CPython {platform.python_version()}, "
        f"{platform.machine()}, one thread, {ssl.OPENSSL_VERSION} behind hashlib"
    )
    store, leaves, build_time = build(args.leaves, console)
    rng = random.Random(args.seed)

    table = Table(title=f"{args.leaves:,}-leaf node store, {args.samples:,} random samples per row")
    table.add_column("operation")
    table.add_column("tree size", justify="right")
    table.add_column("per second", justify="right")
    table.add_column("µs", justify="right")
    table.add_column("hashes", justify="right")
    table.add_column("time vs bare sha256", justify="right")

    table.add_row(
        "append leaf + store nodes", f"{args.leaves:,}",
        f"{args.leaves / build_time:,.0f}", f"{build_time / args.leaves * 1e6:.2f}", "~2", "",
    )

    verdicts = []
    sizes = [args.leaves]
    if args.leaves > 1_000_000:
        sizes.append(1_000_000)
    for size in sizes:
        gen, ver, hashes = bench_inclusion(store, leaves, size, args.samples, rng)
        base = bare_sha256(hashes)
        per_s = args.samples / ver
        verdicts.append((size, per_s))
        table.add_row(
            "inclusion: generate", f"{size:,}",
            f"{args.samples / gen:,.0f}", f"{gen / args.samples * 1e6:.2f}", "", "",
        )
        table.add_row(
            "[bold]inclusion: verify[/]", f"{size:,}", f"[bold]{per_s:,.0f}[/]",
            f"{ver / args.samples * 1e6:.2f}", f"{hashes / args.samples:.1f}",
            f"{ver / base:.2f}×",
        )

    gen, ver, hashes = bench_consistency(store, args.leaves, args.samples // 5, rng)
    n = args.samples // 5
    table.add_row(
        "consistency: generate", f"≤ {args.leaves:,}", f"{n / gen:,.0f}",
        f"{gen / n * 1e6:.2f}", "", "",
    )
    table.add_row(
        "consistency: verify", f"≤ {args.leaves:,}", f"{n / ver:,.0f}",
        f"{ver / n * 1e6:.2f}", f"≤ {hashes / n:.1f}", "",
    )
    console.print(table)

    baseline = bare_sha256(1_000_000)
    console.print(
        f"bare hashlib.sha256(65 bytes).digest(): {1_000_000 / baseline:,.0f} hashes/s, i.e. "
        f"{1_000_000 / baseline / 20:,.0f} twenty-hash proofs/s if hashing were all there was"
    )
    ok = all(per_s >= TARGET_VERIFICATIONS_PER_S for _, per_s in verdicts)
    for size, per_s in verdicts:
        mark = "[green]meets[/]" if per_s >= TARGET_VERIFICATIONS_PER_S else "[red]misses[/]"
        console.print(
            f"tree of {size:,}: {per_s:,.0f} inclusion verifications/s {mark} the "
            f"{TARGET_VERIFICATIONS_PER_S:,}/s target"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
