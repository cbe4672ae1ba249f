"""Chain benchmark: committed consent grants per second, embedded chain against a Hardhat node.

    .venv/bin/python bench/bench_chain.py [--grants 2000] [--callers 8] [--batch 50]
        [--hardhat-url URL] [--py-evm-baseline] [--dir DIR]

The same workload runs through the same ``ChainClient`` code against each backend, in one run:

* the embedded chain (``EmbeddedChain``: in-process py-evm, SQLite ``synchronous=FULL``, one
  transaction per block) in a fresh directory (``--dir``, default a temporary one);
* a Hardhat node over JSON-RPC (``JsonRpcChain``) at ``--hardhat-url`` or
  ``$TELELEDGER_TEST_CHAIN_URL``. Without one the script says so and reports the embedded
  figures alone (no ratio). Hardhat automines one block per transaction, so a run adds about
  4 x ``--grants`` blocks to that node: point it at a throwaway node, not at one that test
  suites share (code that reads logs from block 0 in bounded steps slows down as it grows);
* with ``--py-evm-baseline``, the embedded chain once more on py-evm's own interpreter and tries
  (``EmbeddedChain(fast_evm=False)``, "embedded-py-evm"): the before/after of
  ``ledger.chain.interpreter`` and ``ledger.chain.trie`` measured in the same run.

Workload: ``ConsentRegistry.grant_by_sig`` — a relayer submits a patient's EIP-712 signed
consent grant, the contract checks the signature (``ecrecover``), consumes the patient's nonce,
stores the grant and logs ``ConsentGranted``. Set-up (not timed): deploy the contracts, make the
operator an OPERATOR of an organization, bind one patient pseudonym per grant (the operator's
``bind_patient`` with the patient's signature), and have every patient sign its grant — the
patients' wallets' work, not the platform's. Timed, in two modes:

1. ``transact``: ``--callers`` threads, each with its own relayer key, call
   ``client.transact(...)``; a grant counts when ``transact`` returned its receipt (embedded:
   the block is committed; Hardhat: mined).
2. ``send_raw``: one worker, as the outbox worker does it, signs ``--batch`` grants with
   explicit nonces (``client.sign``), submits them with ``client.send_raw`` and counts them when
   ``client.receipt`` has each one.

Every grant must end with status 1 and ``is_active`` true (checked on a sample), and the number
of ``ConsentGranted`` events must equal the number of grants; otherwise the run fails.
Reported: grants/s (wall clock), CPU seconds of this process (for Hardhat that is the client
only: the node runs in its own process), blocks and transactions per block, and the
embedded/Hardhat ratio per mode. On a shared machine the wall-clock rate follows the load; CPU
milliseconds per grant of the embedded chain (the whole node is this process) moves far less.
Targets: embedded >= 300 grants/s; >= 2x Hardhat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_keys import keys
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN, eip712
from teleledger.ledger.chain.client import ChainClient
from teleledger.ledger.chain.deploy import deploy_all
from teleledger.ledger.chain.embedded import EmbeddedChain
from teleledger.ledger.chain.rpc import JsonRpcChain

console = Console(width=130)
ORG = b"bench-org".ljust(32, b"\0")
GRANTEE = b"bench-grantee".ljust(32, b"\0")
PROVISION = bytes.fromhex("cc" * 32)
FAR = 2**40
#: balance given to each benchmark key on Hardhat (``hardhat_setBalance``: drains no dev account)
HARDHAT_BALANCE = 10**21
MODES = ("transact", "send_raw")


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                    refresh_per_second=2)  # rendering competes with the measured code for the CPU


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    return {"cpus": str(len(os.sched_getaffinity(0))), "cpu": model, "memory": memory,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "sqlite": sqlite3.sqlite_version, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _json_rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def _sig(key: keys.PrivateKey, message: eip712.Message, chain_id: int, contract: str) -> tuple[int, bytes, bytes]:
    signature = key.sign_msg_hash(eip712.digest(message, chain_id=chain_id, verifying_contract=contract))
    return signature.v + 27, signature.r.to_bytes(32, "big"), signature.s.to_bytes(32, "big")


@dataclass
class Result:
    backend: str
    mode: str
    grants: int
    seconds: float
    cpu: float
    blocks: int

    @property
    def rate(self) -> float:
        return self.grants / self.seconds if self.seconds else 0.0


class World:
    """Contracts, an operator, relayers and pre-signed grants on one backend (set-up, not timed)."""

    def __init__(self, name: str, client: ChainClient, args: argparse.Namespace, fund: Any) -> None:
        self.name = name
        self.client = client
        self.operator = keys.PrivateKey(os.urandom(32))
        self.relayers = [keys.PrivateKey(os.urandom(32)) for _ in range(args.callers + 1)]
        for key in [self.operator, *self.relayers]:
            fund(key.public_key.to_checksum_address())
        me = self.operator.public_key.to_checksum_address()
        addresses = deploy_all(client, self.operator, [me], 1)
        self.consent = addresses["ConsentRegistry"]
        registry = addresses["ParticipantRegistry"]
        client.transact(registry, "ParticipantRegistry", "approve_organization", ORG, me, sender=self.operator)
        client.transact(registry, "ParticipantRegistry", "set_member_roles", ORG, me, ROLE_ORG_ADMIN | ROLE_OPERATOR,
                        sender=self.operator)
        self.chain_id = client.chain_id()
        self.grants: dict[str, list[tuple[Any, ...]]] = {}
        self._next_pseudonym = random.getrandbits(64) << 64

    def prepare(self, mode: str, count: int, batch: int, bar: Progress) -> None:
        """Bind ``count`` fresh patients and have each sign one grant for ``mode``."""
        task = bar.add_task(f"{self.name}: bind patients for {mode}", total=count)
        me = self.operator.public_key.to_checksum_address()
        grants = []
        nonce = self.client.nonce(me)
        pending: list[bytes] = []
        hashes: list[str] = []
        for i in range(count):
            self._next_pseudonym += 1
            pseudonym = self._next_pseudonym.to_bytes(32, "big")
            patient = keys.PrivateKey(os.urandom(32))
            address = patient.public_key.to_checksum_address()
            bind = eip712.BindPatient(pseudonym=pseudonym, signer=address, nonce=0, deadline=FAR)
            signed = self.client.sign(self.consent, "ConsentRegistry", "bind_patient", ORG, pseudonym, address, FAR,
                                      *_sig(patient, bind, self.chain_id, self.consent), sender=self.operator,
                                      nonce=nonce + i)
            pending.append(signed.raw)
            hashes.append(signed.tx_hash)
            grant = eip712.GrantConsent(pseudonym=pseudonym, grantee=GRANTEE, provision_hash=PROVISION, valid_from=0,
                                        valid_until=0, nonce=1, deadline=FAR)
            grants.append((pseudonym, GRANTEE, PROVISION, 0, 0, FAR, *_sig(patient, grant, self.chain_id, self.consent)))
            if len(pending) == batch or i == count - 1:
                self.client.send_raw(pending)
                bar.advance(task, len(pending))
                pending = []
        for tx_hash in hashes:
            receipt = _wait_receipt(self.client, tx_hash)
            if receipt.status != 1:
                raise SystemExit(f"{self.name}: binding failed: {receipt.error}")
        self.grants[mode] = grants

    def run(self, mode: str, args: argparse.Namespace, bar: Progress) -> Result:
        grants = self.grants[mode]
        task = bar.add_task(f"{self.name}: {mode}", total=len(grants))
        first_block = self.client.block_number() + 1
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if mode == "transact":
            self._run_transact(grants, args.callers, lambda n: bar.advance(task, n))
        else:
            self._run_send_raw(grants, args.batch, lambda n: bar.advance(task, n))
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        last_block = self.client.block_number()
        self._check(grants, first_block, last_block)
        return Result(self.name, mode, len(grants), elapsed, cpu, last_block - first_block + 1)

    def _run_transact(self, grants: list[tuple[Any, ...]], callers: int, advance: Any) -> None:
        work = iter(grants)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def caller(relayer: keys.PrivateKey) -> None:
            try:
                while True:
                    with lock:
                        grant = next(work, None)
                    if grant is None:
                        return
                    receipt = self.client.transact(self.consent, "ConsentRegistry", "grant_by_sig", *grant,
                                                   sender=relayer)
                    assert receipt.status == 1
                    advance(1)
            except BaseException as exc:  # reported after the threads end
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(relayer,)) for relayer in self.relayers[:callers]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"{self.name}: transact failed: {errors[0]!r}")

    def _run_send_raw(self, grants: list[tuple[Any, ...]], batch: int, advance: Any) -> None:
        relayer = self.relayers[-1]
        nonce = self.client.nonce(relayer.public_key.to_checksum_address())
        for start in range(0, len(grants), batch):
            signed = [self.client.sign(self.consent, "ConsentRegistry", "grant_by_sig", *grant, sender=relayer,
                                       nonce=nonce + start + i)
                      for i, grant in enumerate(grants[start:start + batch])]
            self.client.send_raw([s.raw for s in signed])
            for s in signed:  # committed = the receipt is there
                receipt = _wait_receipt(self.client, s.tx_hash)
                if receipt.status != 1:
                    raise SystemExit(f"{self.name}: a grant failed: {receipt.error}")
            advance(len(signed))

    def _check(self, grants: list[tuple[Any, ...]], first_block: int, last_block: int) -> None:
        events = [e for e in self.client.get_logs(self.consent, first_block, last_block) if e.name == "ConsentGranted"]
        if len(events) != len(grants):
            raise SystemExit(f"{self.name}: {len(events)} ConsentGranted events for {len(grants)} grants")
        for grant in random.sample(grants, min(20, len(grants))):
            if not self.client.call(self.consent, "ConsentRegistry", "is_active", grant[0], GRANTEE, PROVISION):
                raise SystemExit(f"{self.name}: a committed grant is not active")


def _wait_receipt(client: ChainClient, tx_hash: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while (receipt := client.receipt(tx_hash)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{tx_hash} was not included within {timeout} s")
        time.sleep(0.01)
    return receipt


def hardhat_client(url: str) -> tuple[JsonRpcChain | None, str]:
    """The Hardhat client, or None and why not."""
    if not url:
        return None, "no Hardhat node: give --hardhat-url or set TELELEDGER_TEST_CHAIN_URL"
    try:
        return JsonRpcChain(url), ""
    except Exception as exc:  # reported, the embedded figures still stand
        return None, f"the Hardhat node at {url} does not answer ({exc})"


def bars(results: list[Result]) -> Table:
    """A text bar chart of grants/s, one bar per backend and mode."""
    top = max((r.rate for r in results), default=1.0) or 1.0
    table = Table(title="committed grants/s", show_header=False, box=None)
    for r in results:
        width = max(1, round(40 * r.rate / top))
        colour = {"embedded": "green", "hardhat": "cyan"}.get(r.backend, "yellow")
        table.add_row(f"{r.backend} {r.mode}", f"[{colour}]{'█' * width}[/] {r.rate:,.0f}")
    return table


def report(results: list[Result], args: argparse.Namespace, info: dict[str, str], hardhat_note: str) -> None:
    table = Table(title=f"Chain — consent grants (grant_by_sig), {args.callers} transact callers, "
                        f"send_raw batches of {args.batch}")
    for column in ("backend", "mode", "grants", "seconds", "grants/s", "CPU s (this process)", "CPU ms/grant",
                   "blocks", "tx/block"):
        table.add_column(column, justify="right" if column not in ("backend", "mode") else "left")
    for r in results:
        table.add_row(r.backend, r.mode, f"{r.grants:,}", f"{r.seconds:.2f}", f"{r.rate:,.1f}", f"{r.cpu:.2f}",
                      f"{1000 * r.cpu / r.grants:.2f}", f"{r.blocks:,}", f"{r.grants / max(r.blocks, 1):.1f}")
    console.print(table)
    console.print(bars(results))
    by = {(r.backend, r.mode): r for r in results}
    lines = []
    for mode in MODES:
        emb = by.get(("embedded", mode))
        hh = by.get(("hardhat", mode))
        if emb is None:
            continue
        target = "met" if emb.rate >= 300 else "NOT met"
        line = f"{mode}: embedded {emb.rate:,.1f} grants/s (target >= 300: {target})"
        if hh is not None:
            ratio = emb.rate / hh.rate if hh.rate else float("inf")
            line += f"; Hardhat {hh.rate:,.1f}/s; ratio {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})"
        reference = by.get(("embedded-py-evm", mode))
        if reference is not None:
            cpu = (emb.cpu / emb.grants) / (reference.cpu / reference.grants)
            line += (f"; on py-evm's own interpreter {reference.rate:,.1f}/s "
                     f"(x{emb.rate / reference.rate:.2f} grants/s, x{cpu:.2f} CPU per grant)")
        lines.append(line)
    if hardhat_note:
        lines.append(f"[yellow]{hardhat_note}: no ratio measured[/]")
    for line in lines:
        console.print(line)
    console.print(f"[dim]machine: {info['cpus']} CPUs ({info['cpu']}), {info['memory']}, {info['python']}, "
                  f"SQLite {info['sqlite']}, load average before: {info['load']}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grants", type=int, default=2000, help="grants per backend and mode")
    parser.add_argument("--callers", type=int, default=8, help="concurrent transact callers")
    parser.add_argument("--batch", type=int, default=50, help="transactions per send_raw call")
    parser.add_argument("--hardhat-url", default=os.environ.get("TELELEDGER_TEST_CHAIN_URL", ""),
                        help="Hardhat JSON-RPC URL (default $TELELEDGER_TEST_CHAIN_URL)")
    parser.add_argument("--hardhat-grants", type=int, default=None,
                        help="grants per mode on Hardhat (default: --grants)")
    parser.add_argument("--py-evm-baseline", action="store_true",
                        help="also run the embedded chain on py-evm's own interpreter and tries (before/after)")
    parser.add_argument("--dir", type=Path, default=None, help="embedded chain directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)

    info = machine()
    console.print(f"[bold]teleledger chain benchmark[/] — {info['cpus']} CPUs, {info['python']}, load {info['load']}")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="teleledger-bench-chain-"))
    if args.dir is not None and any(args.dir.iterdir() if args.dir.exists() else ()):
        raise SystemExit(f"{args.dir} is not empty: the benchmark needs a fresh chain directory")
    hardhat, hardhat_note = hardhat_client(args.hardhat_url)
    if hardhat_note:
        console.print(f"[yellow]{hardhat_note} — measuring the embedded chain only[/]")

    results: list[Result] = []
    embedded = EmbeddedChain(workdir / "chain", keys.PrivateKey(os.urandom(32)))
    reference = (EmbeddedChain(workdir / "chain-py-evm", keys.PrivateKey(os.urandom(32)), fast_evm=False)
                 if args.py_evm_baseline else None)
    try:
        backends: list[tuple[str, ChainClient, Any, int]] = [("embedded", embedded, lambda address: None, args.grants)]
        if reference is not None:
            backends.append(("embedded-py-evm", reference, lambda address: None, args.grants))
        if hardhat is not None:
            url = args.hardhat_url

            def fund(address: str) -> None:
                _json_rpc(url, "hardhat_setBalance", [address, hex(HARDHAT_BALANCE)])

            backends.append(("hardhat", hardhat, fund, args.hardhat_grants or args.grants))
        with progress() as bar:
            worlds = [(World(name, client, args, fund), count) for name, client, fund, count in backends]
            for world, count in worlds:
                for mode in MODES:
                    world.prepare(mode, count, args.batch, bar)
            for mode in MODES:  # backends alternate within a mode: same machine state for both
                for world, _ in worlds:
                    results.append(world.run(mode, args, bar))
    finally:
        embedded.close()
        if reference is not None:
            reference.close()
        if hardhat is not None:
            hardhat.close()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args, info, hardhat_note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
