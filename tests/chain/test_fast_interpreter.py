"""The embedded chain's faster py-evm (``interpreter.FastComputation``, ``trie.BatchedTrie``) against
py-evm's own Cancun VM: the same transactions, block by block, must give the same blocks (so the
same state, transaction and receipt roots, gas and log blooms), receipts, outputs, revert data
and errors.

Two py-evm chains start from one genesis (hand-assembled contracts that drive every opcode the
fast loop does inline, through its plain and its edge cases) and mine the same signed
transactions with the same timestamps — the four consortium contracts' deployment and calls
that succeed, revert and run out of gas, then the hand-assembled contracts: one with the
embedded chain's ``AuthorityVM``, one with py-evm's stock ``CancunVM``. py-evm's
``mine_block`` also re-validates each fast block's transaction root with its own trie code.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth import constants
from eth._utils.address import generate_contract_address
from eth.chains.base import MiningChain
from eth.db.atomic import AtomicDB
from eth.vm.forks.cancun import CancunVM
from eth_keys import keys

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_ORG_ADMIN, eip712
from teleledger.ledger.chain.client import contract_abi, sign_transaction
from teleledger.ledger.chain.embedded import AuthorityVM
from teleledger.ledger.chain.interpreter import FastComputation

CHAIN_ID = 1337
GENESIS_TIME = 1_700_000_000
ORG = b"org-1".ljust(32, b"\0")
GRANTEE = b"grantee".ljust(32, b"\0")
PROVISION = b"\xcc" * 32
FAR = 2**40
MAX = 2**256 - 1
EDGES = [0, 1, 2, 31, 32, 255, 256, 257, 2**64, 2**255, MAX - 1, MAX]


# --- a tiny assembler for the opcode contracts ------------------------------------------------------

OPS = {
    "STOP": 0x00, "ADD": 0x01, "MUL": 0x02, "SUB": 0x03, "LT": 0x10, "GT": 0x11, "EQ": 0x14, "ISZERO": 0x15,
    "AND": 0x16, "OR": 0x17, "XOR": 0x18, "NOT": 0x19, "SHL": 0x1B, "SHR": 0x1C, "CALLDATALOAD": 0x35,
    "CALLDATASIZE": 0x36, "POP": 0x50, "MLOAD": 0x51, "MSTORE": 0x52, "JUMP": 0x56, "JUMPI": 0x57, "PC": 0x58,
    "MSIZE": 0x59, "GAS": 0x5A, "JUMPDEST": 0x5B, "RETURN": 0xF3, "REVERT": 0xFD, "INVALID": 0xFE,
    "DIV": 0x04, "MOD": 0x06, "SHA3": 0x20, "CALLDATACOPY": 0x37, "CODECOPY": 0x39, "MCOPY": 0x5E,
    **{f"DUP{n}": 0x7F + n for n in range(1, 17)}, **{f"SWAP{n}": 0x8F + n for n in range(1, 17)},
}


def asm(*items: Any) -> bytes:
    """Mnemonics; ints are pushed with the shortest PUSH (PUSH0 for 0); ``("raw", bytes)`` as is."""
    out = bytearray()
    for item in items:
        if isinstance(item, tuple):
            out += item[1]
        elif isinstance(item, int):
            if item == 0:
                out.append(0x5F)
            else:
                size = (item.bit_length() + 7) // 8
                out += bytes([0x5F + size]) + item.to_bytes(size, "big")
        else:
            out.append(OPS[item])
    return bytes(out)


BINARY = ("ADD", "MUL", "SUB", "LT", "GT", "EQ", "AND", "OR", "XOR", "SHL", "SHR")


def push2(n: int) -> tuple[str, bytes]:
    return ("raw", b"\x61" + n.to_bytes(2, "big"))


def _arith_code(*, grown: bool) -> bytes:
    """calldata (a, b): every inline binary op as (a op b) and (b op a), each result also checked
    to be a 256-bit word, unary ops, DUP16/SWAP16, CALLDATALOAD at several offsets, jumps; the
    results go to memory word by word, which is returned. ``grown``: memory is grown to its final
    size first, so the stores are the loop's own MSTOREs rather than py-evm's growing ones."""
    body: list[Any] = []
    words = 0

    def store() -> None:
        nonlocal words
        body.extend([words * 32, "MSTORE"])
        words += 1

    for op in BINARY:
        for first, second in ((32, 0), (0, 32)):  # a (top) op b, then b (top) op a
            body.extend([first, "CALLDATALOAD", second, "CALLDATALOAD", op, "DUP1", MAX, "LT"]); store(); store()
    for op in ("ISZERO", "NOT"):
        body.extend([0, "CALLDATALOAD", op]); store()
    for offset in (0, 1, 31, 60, 64, 2**255, MAX):
        body.extend([offset, "CALLDATALOAD"]); store()
    body.extend([*range(1, 17), "DUP16", "SWAP16", "SWAP1", "DUP2"]); store()
    body.extend(["POP"] * 17)
    body.extend([0, "MLOAD", 1, "ADD", 5, "MLOAD", "ADD", "PC", "ADD", "MSIZE", "ADD"]); store()
    prefix = [0, words * 32, "MSTORE"] if grown else []  # one word past the results: MSIZE shows it
    # JUMPI not taken, JUMPI taken over an INVALID, then RETURN
    target = len(asm(*prefix, *body, 0, 0, "JUMPI", 1, push2(0), "JUMPI", "INVALID"))
    body.extend([0, 0, "JUMPI", 1, push2(target), "JUMPI", "INVALID", "JUMPDEST", words * 32, 0, "RETURN"])
    return asm(*prefix, *body)


def _loop_code() -> bytes:
    """calldata n: n rounds of DUP/SWAP/ADD/SUB, memory and a backwards JUMP; returns n + ... + 1."""
    head = [0, "CALLDATALOAD", 0]  # stack: n, acc
    loop = len(asm(*head))

    def body(end: int) -> list[Any]:
        return [
            "JUMPDEST", "DUP2", "ISZERO", push2(end), "JUMPI",
            "DUP2", "ADD", 0x20, "MSTORE", 0x20, "MLOAD",  # acc += n, through memory
            "SWAP1", 1, "SWAP1", "SUB", "SWAP1",  # n -= 1
            push2(loop), "JUMP",
        ]

    end = len(asm(*head, *body(0)))
    return asm(*head, *body(end), "JUMPDEST", 0, "MSTORE", 32, 0, "RETURN")


#: one contract each: errors, and the edges where an inline opcode must hand over to py-evm
ERROR_CODES: dict[str, bytes] = {
    "jump to a non-jumpdest": asm(3, "JUMP", "STOP", "STOP"),
    "jump into push data": asm(4, "JUMP", ("raw", bytes([0x60, 0x5B])), "STOP"),
    "jumpi into push data": asm(1, 6, "JUMPI", ("raw", bytes([0x60, 0x5B])), "STOP"),
    "jump past the code": asm(0xFFFF, "JUMP"),
    "add with one item": asm(1, "ADD"),
    "mstore with one item": asm(1, "MSTORE"),
    "mload with nothing": asm("MLOAD"),
    "dup2 with one item": asm(1, "DUP2"),
    "swap1 with one item": asm(1, "SWAP1"),
    "pop with nothing": asm("POP"),
    "iszero with nothing": asm("ISZERO"),
    "jumpi with one item": asm(1, "JUMPI"),
    "calldataload with nothing": asm("CALLDATALOAD"),
    "stack overflow": asm("JUMPDEST", 1, 0, "JUMP"),
    "invalid opcode": asm(1, "INVALID"),
    "unassigned opcode": asm(1, ("raw", b"\x0c")),
    "huge memory offset": asm(MAX, "MLOAD"),
    "huge mstore offset": asm(1, 2**64, "MSTORE"),
    "revert with data": asm(0xDEAD, 0, "MSTORE", 32, 0, "REVERT"),
    "truncated push at the end": asm(1, ("raw", bytes([0x62, 0xAB]))),
    "falls off the end": asm(1, 2, "ADD"),
    "endless loop": asm("JUMPDEST", 0, "JUMP"),
    "unaligned memory growth": asm(1, 0, "MSTORE", 2, 1, "MSTORE", 1, "MLOAD", 33, "MLOAD", "ADD", "MSIZE", "ADD",
                                   0, "MSTORE", 32, 0, "RETURN"),
    "a full stack": asm(*([0] * 1024), "STOP"),
    "hashing and copying": asm(
        32, 64, 0, "MCOPY",  # the source lies past the end of memory: grows to cover it
        "CALLDATASIZE", 0, 0, "CALLDATACOPY",  # grows memory
        40, 0, "SHA3", 200, "MSTORE",  # grows again
        50, 3, 64, "CODECOPY", 45, 7, 100, "MCOPY", 45, 120, 90, "MCOPY",  # overlapping both ways
        0, MAX, MAX, "MCOPY", 0, MAX, "SHA3", 232, "MSTORE", 0, MAX, 0, "CALLDATACOPY", 0, 0, MAX, "CODECOPY",
        0, 5000, "SHA3", 0, 0, 5000, "MCOPY", 0, 0, 5000, "CALLDATACOPY", 0, 0, 5000, "CODECOPY",  # size 0: no growth
        64, 2**40, 500, "CALLDATACOPY", 64, 2**40, 600, "CODECOPY",  # past the end: zeros
        7, 100, "DIV", 264, "MSTORE", 0, 100, "DIV", 296, "MSTORE", 7, 100, "MOD", 328, "MSTORE",
        0, 100, "MOD", 360, "MSTORE", "MSIZE", 392, "MSTORE", 700, 0, "RETURN",
    ),
    "sha3 of too much memory": asm(2**24, 0, "SHA3"),
    "sha3 far out": asm(32, 2**40, "SHA3"),
    "mcopy far out": asm(32, 0, 2**30, "MCOPY"),
    "calldatacopy with two items": asm(1, 2, "CALLDATACOPY"),
    "sha3 with one item": asm(1, "SHA3"),
    "one push too many": asm(*([0] * 1025)),
    "one dup too many": asm(*([0] * 1024), "DUP1"),
}


def _contract(n: int) -> bytes:
    return (0xC0DE0000 + n).to_bytes(20, "big")


ARITH = _contract(1)
LOOP = _contract(2)
ARITH_GROWING = _contract(3)
ERRORS = {name: _contract(100 + i) for i, name in enumerate(ERROR_CODES)}


# --- the two chains ---------------------------------------------------------------------------------


class StockVM(CancunVM):
    """py-evm's own Cancun VM, untouched."""


def _chain(vm_class: type, funded: list[bytes]) -> Any:
    genesis_state = {
        address: {"balance": 0, "nonce": 0, "code": code, "storage": {}}
        for address, code in [(ARITH, _arith_code(grown=True)), (ARITH_GROWING, _arith_code(grown=False)),
                              (LOOP, _loop_code()),
                              *((ERRORS[name], code) for name, code in ERROR_CODES.items())]
    }
    for address in funded:
        genesis_state[address] = {"balance": 10**20, "nonce": 0, "code": b"", "storage": {}}
    chain_class = MiningChain.configure(
        __name__=f"Test{vm_class.__name__}", vm_configuration=((constants.GENESIS_BLOCK_NUMBER, vm_class),),
        chain_id=CHAIN_ID,
    )
    return chain_class.from_genesis(
        AtomicDB(),
        {"difficulty": 0, "gas_limit": 30_000_000 * 64, "timestamp": GENESIS_TIME, "coinbase": b"\x11" * 20,
         "base_fee_per_gas": 0, "nonce": b"\x00" * 8},
        genesis_state,
    )


def _mine(chain: Any, txs: list[Any], timestamp: int) -> Any:
    # the header the transactions execute under carries the timestamp (mine_all's keyword only
    # stamps the sealed header, and the default is the wall clock: different for the two chains)
    chain.header = chain.header.copy(timestamp=timestamp)
    return chain.mine_all(txs)


def _outcome(receipt: Any, computation: Any) -> tuple[Any, ...]:
    error = None
    if computation.is_error:
        error = (type(computation.error).__name__, str(computation.error), computation.error.args)
    return (receipt, computation.is_error, error, computation.output, computation.get_gas_used(),
            computation.get_gas_remaining(), computation.get_log_entries())


class Workload:
    """Signed transactions, block by block: the consortium contracts and the opcode contracts."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.operator = keys.PrivateKey(self.rng.randbytes(32))
        self.stranger = keys.PrivateKey(self.rng.randbytes(32))
        self.nonces: dict[bytes, int] = {}
        op = self.operator.public_key.to_canonical_address()
        self.participants = generate_contract_address(op, 0)
        self.consent = generate_contract_address(op, 1)
        self.anchors = generate_contract_address(op, 2)
        self.prescriptions = generate_contract_address(op, 3)

    def funded(self) -> list[bytes]:
        return [k.public_key.to_canonical_address() for k in (self.operator, self.stranger)]

    def tx(self, key: keys.PrivateKey, to: bytes, data: bytes, *, gas: int = 3_000_000) -> bytes:
        sender = key.public_key.to_canonical_address()
        nonce = self.nonces.get(sender, 0)
        self.nonces[sender] = nonce + 1
        return sign_transaction(key, chain_id=CHAIN_ID, nonce=nonce, gas_price=0, gas=gas, to=to, data=data).raw

    def call(self, key: keys.PrivateKey, to: bytes, abi: str, fn: str, *args: Any, gas: int = 3_000_000) -> bytes:
        return self.tx(key, to, contract_abi(abi).encode_call(fn, args), gas=gas)

    def _sig(self, key: keys.PrivateKey, message: Any) -> tuple[int, bytes, bytes]:
        signature = key.sign_msg_hash(eip712.digest(message, chain_id=CHAIN_ID, verifying_contract=self.consent))
        return signature.v + 27, signature.r.to_bytes(32, "big"), signature.s.to_bytes(32, "big")

    def blocks(self) -> list[list[bytes]]:
        op_key, op = self.operator, self.operator.public_key.to_checksum_address()
        participants = "0x" + self.participants.hex()
        deploys = [
            self.tx(op_key, b"", contract_abi("ParticipantRegistry").encode_deploy(([op], 1)), gas=14_000_000),
            *(self.tx(op_key, b"", contract_abi(name).encode_deploy((participants,)), gas=14_000_000)
              for name in ("ConsentRegistry", "AnchorRegistry", "PrescriptionRegistry")),
        ]
        setup = [
            self.call(op_key, self.participants, "ParticipantRegistry", "approve_organization", ORG, op),
            self.call(op_key, self.participants, "ParticipantRegistry", "set_member_roles", ORG, op,
                      ROLE_ORG_ADMIN | ROLE_OPERATOR),
        ]
        patients = [keys.PrivateKey(self.rng.randbytes(32)) for _ in range(6)]
        binds: list[bytes] = []
        mixed: list[bytes] = []  # grants, replays, bad signatures, revocations: in signing (nonce) order
        for i, patient in enumerate(patients):
            pseudonym = (i + 1).to_bytes(32, "big")
            address = patient.public_key.to_checksum_address()
            bind = eip712.BindPatient(pseudonym=pseudonym, signer=address, nonce=0, deadline=FAR)
            binds.append(self.call(op_key, self.consent, "ConsentRegistry", "bind_patient", ORG, pseudonym, address,
                                   FAR, *self._sig(patient, bind)))
            grant = eip712.GrantConsent(pseudonym=pseudonym, grantee=GRANTEE, provision_hash=PROVISION,
                                        valid_from=0, valid_until=0, nonce=1, deadline=FAR)
            args = (pseudonym, GRANTEE, PROVISION, 0, 0, FAR, *self._sig(patient, grant))
            mixed.append(self.call(self.stranger, self.consent, "ConsentRegistry", "grant_by_sig", *args))
            if i == 0:
                mixed += [
                    # a replay: the nonce is used (revert with the contract's reason)
                    self.call(self.stranger, self.consent, "ConsentRegistry", "grant_by_sig", *args),
                    # out of gas in the middle of the contract
                    self.call(self.stranger, self.consent, "ConsentRegistry", "grant_by_sig", *args, gas=40_000),
                ]
            if i == 1:
                wrong = (pseudonym, GRANTEE, b"\xdd" * 32, 0, 0, FAR, *args[6:])  # signature over other fields
                mixed.append(self.call(self.stranger, self.consent, "ConsentRegistry", "grant_by_sig", *wrong))
                revoke = eip712.RevokeConsent(pseudonym=pseudonym, grantee=GRANTEE, provision_hash=PROVISION,
                                              nonce=2, deadline=FAR)
                mixed.append(self.call(self.stranger, self.consent, "ConsentRegistry", "revoke_by_sig", pseudonym,
                                       GRANTEE, PROVISION, FAR, *self._sig(patient, revoke)))
        mixed += [
            self.call(op_key, self.anchors, "AnchorRegistry", "anchor", ORG, "log.example/1", 10, b"\x01" * 32),
            self.call(op_key, self.anchors, "AnchorRegistry", "anchor", ORG, "log.example/1", 12, b"\x02" * 32),
            self.call(op_key, self.anchors, "AnchorRegistry", "anchor", ORG, "log.example/1", 11, b"\x03" * 32),
            self.call(self.stranger, self.anchors, "AnchorRegistry", "anchor", ORG, "log.example/1", 20, b"\x04" * 32),
            self.tx(self.stranger, self.consent, b"\x12\x34\x56\x78"),  # no such function
            self.tx(self.stranger, self.consent, b""),  # no fallback
            self.tx(self.stranger, b"\x22" * 20, b"\x01\x02"),  # an address without code
        ]
        opcodes = []
        for a in EDGES:
            for b in self.rng.sample(EDGES, 3):
                for contract in (ARITH, ARITH_GROWING):
                    opcodes.append(self.tx(self.stranger, contract, a.to_bytes(32, "big") + b.to_bytes(32, "big")))
        opcodes.append(self.tx(self.stranger, ARITH, b"\x07" * 40))  # short calldata: CALLDATALOAD pads
        for n in (0, 1, 50):
            opcodes.append(self.tx(self.stranger, LOOP, n.to_bytes(32, "big")))
        opcodes.append(self.tx(self.stranger, LOOP, (10**6).to_bytes(32, "big"), gas=200_000))  # runs out of gas
        for name, address in ERRORS.items():
            opcodes.append(self.tx(self.stranger, address, b"\x01" * 8, gas=300_000))
        for extra in (2, 4, 7):  # intrinsic gas (64 zero bytes of calldata) and out of gas at opcode 1, 2, 3
            opcodes.append(self.tx(self.stranger, ARITH, bytes(64), gas=21_000 + 4 * 64 + extra))
        return [deploys, setup, binds, mixed, opcodes]


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fast_vm_mines_the_same_blocks_receipts_and_errors_as_py_evms_own(seed: int) -> None:
    workload = Workload(seed)
    blocks = workload.blocks()
    fast, stock = _chain(AuthorityVM, workload.funded()), _chain(StockVM, workload.funded())
    assert fast.get_vm().state.computation_class is not stock.get_vm().state.computation_class
    for number, raws in enumerate(blocks, start=1):
        outcomes = []
        for chain in (fast, stock):
            builder = chain.get_vm().get_transaction_builder()
            txs = [builder.decode(raw) for raw in raws]
            result, receipts, computations = _mine(chain, txs, GENESIS_TIME + number)
            outcomes.append((result.imported_block, [_outcome(r, c) for r, c in zip(receipts, computations)]))
        (fast_block, fast_outcomes), (stock_block, stock_outcomes) = outcomes
        for i, (mine, theirs) in enumerate(zip(fast_outcomes, stock_outcomes)):
            assert mine == theirs, f"block {number}, transaction {i}"
        assert fast_block.header == stock_block.header, f"block {number}"
        assert fast_block.hash == stock_block.hash
    # the workload reached what it was written for: successes, reverts with data, errors of each kind
    kinds = {o[2][0] if o[2] else "ok" for o in fast_outcomes}
    assert {"ok", "InvalidJumpDestination", "InvalidInstruction", "InsufficientStack", "FullStack", "OutOfGas",
            "Revert"} <= kinds
    assert any(o[2] and o[2][0] == "Revert" and o[3] for o in stock_outcomes)


def test_the_fast_loop_returns_what_the_opcodes_compute() -> None:
    """Not only equal to py-evm: the arithmetic contract's answers are the EVM's (spot checks)."""
    workload = Workload(3)
    chain = _chain(AuthorityVM, workload.funded())
    a, b = 2**255, 3
    raw = workload.tx(workload.stranger, ARITH, a.to_bytes(32, "big") + b.to_bytes(32, "big"))
    _, _, (computation,) = _mine(chain, [chain.get_vm().get_transaction_builder().decode(raw)], GENESIS_TIME + 1)
    assert not computation.is_error
    words = [int.from_bytes(computation.output[i:i + 32], "big") for i in range(0, len(computation.output), 32)]
    names = [name for op in BINARY for side in ("ab", "ba") for name in (f"{op}{side} > MAX", f"{op}{side}")]
    results = dict(zip(names, words))
    assert not any(results[name] for name in names if name.endswith("> MAX"))
    assert results["ADDab"] == a + b
    assert results["SUBba"] == (b - a) % 2**256
    assert results["MULab"] == (a * b) % 2**256
    assert results["SHLab"] == 0 and results["SHRab"] == 0  # shift by 2**255: everything shifted out
    assert results["SHLba"] == (a << 3) % 2**256 and results["SHRba"] == a >> 3
    assert results["LTab"] == 0 and results["GTab"] == 1 and results["EQab"] == 0


def test_an_opcode_whose_logic_the_loop_does_not_know_is_left_to_py_evm() -> None:
    from eth.vm.logic import arithmetic
    from eth.vm.opcode import as_opcode

    from teleledger.ledger.chain.interpreter import _SLOW, _dispatch_table

    table = {
        0x01: as_opcode(logic_fn=arithmetic.mul, mnemonic="ADD", gas_cost=7),  # ADD's byte, MUL's logic
        0x02: as_opcode(logic_fn=lambda computation: None, mnemonic="MUL", gas_cost=5),
    }
    kinds, costs = _dispatch_table(table)
    base_kinds, _ = _dispatch_table(FastComputation.opcodes)
    assert kinds[0x01] == base_kinds[0x02] and costs[0x01] == 7  # done as the logic it is, at its gas
    assert kinds[0x02] == _SLOW and kinds[0x03] == _SLOW  # unknown logic, missing opcode: py-evm's path


def test_an_embedded_chain_built_without_fast_evm_runs_py_evms_own_code(tmp_path) -> None:
    from eth.db.account import AccountDB
    from eth.vm.forks.cancun.computation import CancunComputation

    from teleledger.ledger.chain.embedded import EmbeddedChain
    from teleledger.ledger.chain.trie import BatchedAccountDB

    for fast, computation, account_db in ((True, FastComputation, BatchedAccountDB),
                                          (False, CancunComputation, AccountDB)):
        chain = EmbeddedChain(tmp_path / str(fast), keys.PrivateKey(b"\x01" * 32), fast_evm=fast)
        try:
            state = chain._chain.get_vm().state  # noqa: SLF001 - which py-evm classes run is the point
            assert state.computation_class is computation
            assert type(state._account_db) is account_db  # noqa: SLF001
        finally:
            chain.close()
