"""The embedded chain survives reopening and ``kill -9``: every acknowledged transaction stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from eth_keys import keys

from teleledger.ledger.chain.embedded import EmbeddedChain

ORG_PREFIX = b"org-"


def _org(i: int) -> bytes:
    return (ORG_PREFIX + str(i).encode()).ljust(32, b"\0")


def test_state_and_head_survive_reopening(tmp_path: Path) -> None:
    key = keys.PrivateKey(os.urandom(32))
    me = key.public_key.to_checksum_address()
    chain = EmbeddedChain(tmp_path, key)
    registry = chain.deploy("ParticipantRegistry", [me], 1, sender=key)
    chain.transact(registry, "ParticipantRegistry", "approve_organization", _org(1), me, sender=key)
    head, head_hash = chain.block_number(), chain.get_block(chain.block_number()).hash
    chain.close()

    reopened = EmbeddedChain(tmp_path, key)
    assert reopened.block_number() == head
    assert reopened.get_block(head).hash == head_hash
    assert reopened.call(registry, "ParticipantRegistry", "is_organization", _org(1)) is True
    assert [e.name for e in reopened.get_logs(registry, head, head)][:2] == ["ProposalApproved", "OrganizationAdded"]
    # and it keeps sealing on top of the restored head
    receipt = reopened.transact(registry, "ParticipantRegistry", "approve_organization", _org(2), me, sender=key)
    assert receipt.block_number == head + 1
    # every block is sealed by the authority
    seal = keys.Signature(reopened.seal_of(head + 1))
    block_hash = bytes.fromhex(reopened.get_block(head + 1).hash[2:])
    assert seal.recover_public_key_from_msg_hash(block_hash) == key.public_key
    assert reopened.get_block(head + 1).miner == me
    reopened.close()


CHILD = textwrap.dedent(
    """
    import sys, threading
    from eth_keys import keys
    from teleledger.ledger.chain.embedded import EmbeddedChain

    path, key_hex = sys.argv[1], sys.argv[2]
    key = keys.PrivateKey(bytes.fromhex(key_hex))
    me = key.public_key.to_checksum_address()
    chain = EmbeddedChain(path, key)
    registry = chain.deploy("ParticipantRegistry", [me], 1, sender=key)
    print("registry", registry, flush=True)
    lock = threading.Lock()

    def worker(start):
        i = start
        while True:
            chain.transact(registry, "ParticipantRegistry", "approve_organization",
                           (b"org-" + str(i).encode()).ljust(32, b"\\0"), me, sender=key)
            with lock:
                print("acked", i, flush=True)  # only after the receipt: the block is durable
            i += 4

    for t in range(4):  # concurrent callers, so blocks carry batches
        threading.Thread(target=worker, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


def test_every_acknowledged_transaction_survives_kill_9(tmp_path: Path) -> None:
    key = keys.PrivateKey(os.urandom(32))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), key.to_bytes().hex()],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    registry = child.stdout.readline().split()[1]
    acked: list[int] = []
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if line.startswith("acked"):
            acked.append(int(line.split()[1]))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # lines already written before the kill are acknowledgements too
    acked += [int(line.split()[1]) for line in child.stdout.read().splitlines() if line.startswith("acked")]
    assert len(acked) >= 60

    chain = EmbeddedChain(tmp_path, key)
    missing = [i for i in acked if not chain.call(registry, "ParticipantRegistry", "is_organization", _org(i))]
    assert missing == []
    # the head is a whole, readable block and the chain goes on from it
    head = chain.block_number()
    assert chain.get_block(head).number == head
    me = key.public_key.to_checksum_address()
    assert chain.transact(registry, "ParticipantRegistry", "approve_organization", _org(10**6), me, sender=key).block_number == head + 1
    chain.close()
