"""A faster opcode loop for the embedded chain's py-evm: same EVM, fewer Python calls per opcode.

Why this is hand-written: py-evm's ``BaseComputation.apply_computation`` runs every opcode
through a generator (``CodeStream.__iter__``), an ``Opcode.__call__``, two gas-meter methods
with a debug-log check, and stack methods that build tuples and validate every push — several
Python calls for an ``ADD``. A consent grant executes ≈ 560 opcodes, and that loop was the
largest single cost of the embedded chain (``bench/RESULTS.md``, "Chain"). No maintained library
runs EVM bytecode faster inside a Python process on py-evm's state, so this module replaces
only the loop, for the opcodes contracts execute most, and leaves everything else to py-evm.

How it stays py-evm: ``FastComputation`` is the Cancun computation with one method overridden.
For each opcode of py-evm's own table whose logic it recognises (``_FAST``: the same logic
function, at the constant gas cost of that table) it does the work inline on the stack's list:
PUSH/DUP/SWAP/POP, JUMP/JUMPI/JUMPDEST/STOP, arithmetic, comparison and bit operations,
MLOAD/MSTORE, CALLDATALOAD, SHA3 and the memory copies (memory growth charged by py-evm's
formula). Every other opcode — SLOAD, SSTORE, CALL, LOG, RETURN, REVERT, … — is py-evm's own
function, called with the program counter and gas meter brought up to date first. An inline
opcode either completes or changes nothing: its operands are read before anything is popped,
and whenever it meets anything but the plain case (too little gas, too few or too many stack
items, a jump to a non-JUMPDEST, memory beyond ``_MEMORY_LIMIT``) it hands that same opcode to
py-evm, which charges and raises exactly as it always does (same exception, same message).

Invariant: every stack item is an ``int`` while this loop runs (py-evm allows ``int`` or
``bytes``; both mean the same 256-bit word). Inline opcodes push ints, and after a py-evm
opcode the one item it may have pushed is converted.

Per-code analysis (valid jump destinations, PUSH immediates) is computed once per distinct
bytecode and cached (``_analysis``); py-evm recomputes jump validity per call frame. The
ecrecover precompile and transaction senders go to libsecp256k1 directly (``recover_signer``).

This module must never change what a transaction does: same gas, state, logs, output, errors
(``tests/chain/test_fast_interpreter.py`` mines the same blocks with py-evm's own VM and
compares). With py-evm's DEBUG2 logging on, py-evm's loop runs, so per-opcode traces remain.
"""

from __future__ import annotations

import threading
from typing import Any

import coincurve
from eth.constants import (
    GAS_COPY,
    GAS_ECRECOVER,
    GAS_MEMORY,
    GAS_MEMORY_QUADRATIC_DENOMINATOR,
    GAS_SHA3WORD,
    SECPK1_N,
)
from eth.exceptions import Halt
from eth.vm.computation import NO_RESULT
from eth.vm.forks.cancun.computation import CancunComputation
from eth.vm.forks.cancun.state import CancunState
from eth.vm.logic import arithmetic, comparison, context, duplication, flow, memory, sha3, stack, swap
from eth.vm.logic.invalid import InvalidOpcode
from eth.vm.opcode import _FastOpcode
from eth_hash.auto import keccak

from teleledger.ledger.chain.trie import BatchedAccountDB

__all__ = ["FastComputation", "FastState", "recover_signer"]

_JUMPDEST = 0x5B
_PUSH0, _PUSH32 = 0x5F, 0x7F
_MAX = 2**256 - 1
#: PUSH32 at the end of the code may read 32 bytes past it: pad with STOP (0x00), which is also
#: what py-evm executes when the program counter runs off the end
_PAD = bytes(33)
#: distinct bytecodes whose analysis is kept; cleared (not evicted one by one) when full, so
#: concurrent chains in one process need no lock around it
_CACHE_ENTRIES = 64

# kinds: what the loop does inline for an opcode; 0 = py-evm's own function
(_SLOW, _PUSH, _MSTORE, _MLOAD, _JUMPDEST_K, _JUMP, _JUMPI, _POP, _DUP, _SWAP, _ADD, _ISZERO,
 _SHR, _SHL, _OR, _AND, _XOR, _LT, _GT, _EQ, _SUB, _NOT, _CALLDATALOAD, _STOP, _MUL, _DIV, _MOD,
 _SHA3, _MCOPY, _CALLDATACOPY, _CODECOPY) = range(31)
#: memory the loop grows itself; beyond it py-evm's path runs (and runs out of gas: 32 MiB of
#: memory costs over 2**31 gas)
_MEMORY_LIMIT = 2**25

#: (py-evm logic function, kind): an opcode is done inline only when the fork's table maps it to
#: exactly this logic at a constant gas cost
_FAST: dict[Any, int] = {
    flow.stop: _STOP, flow.jump: _JUMP, flow.jumpi: _JUMPI, flow.jumpdest: _JUMPDEST_K, stack.pop: _POP,
    memory.mstore: _MSTORE, memory.mload: _MLOAD, context.calldataload: _CALLDATALOAD,
    arithmetic.add: _ADD, arithmetic.sub: _SUB, arithmetic.mul: _MUL, arithmetic.shl: _SHL, arithmetic.shr: _SHR,
    arithmetic.div: _DIV, arithmetic.mod: _MOD, sha3.sha3: _SHA3, memory.mcopy: _MCOPY,
    context.calldatacopy: _CALLDATACOPY, context.codecopy: _CODECOPY,
    comparison.iszero: _ISZERO, comparison.or_op: _OR, comparison.and_op: _AND, comparison.xor: _XOR,
    comparison.lt: _LT, comparison.gt: _GT, comparison.eq: _EQ, comparison.not_op: _NOT,
    stack.push0: _PUSH,
    **{getattr(stack, f"push{n}"): _PUSH for n in range(1, 33)},
    **{getattr(duplication, f"dup{n}"): _DUP for n in range(1, 17)},
    **{getattr(swap, f"swap{n}"): _SWAP for n in range(1, 17)},
}


def _dispatch_table(opcodes: dict[int, Any]) -> tuple[list[int], list[int]]:
    """(kind, gas cost) per opcode byte, from a fork's opcode table (unrecognised: ``_SLOW``)."""
    kinds, costs = [_SLOW] * 256, [0] * 256
    for op, fn in opcodes.items():
        if type(fn) is _FastOpcode and fn.logic_fn in _FAST:
            kinds[op], costs[op] = _FAST[fn.logic_fn], fn.gas_cost
    return kinds, costs


class _Slow(Exception):
    """Raised inside the loop (before anything changed) to hand the opcode to py-evm."""


def _memory_cost(size: int, end: int) -> int:
    """Gas to grow memory of ``size`` bytes (a multiple of 32) to cover ``end`` bytes: the
    difference of py-evm's ``memory_gas_cost`` (3 per word plus words² / 512)."""
    new, old = (end + 31) // 32, size // 32
    return (new * GAS_MEMORY + new * new // GAS_MEMORY_QUADRATIC_DENOMINATOR) - (
        old * GAS_MEMORY + old * old // GAS_MEMORY_QUADRATIC_DENOMINATOR)


def _grow(memory_: Any, start: int, size: int, end: int, cost: int, gas: int) -> int:
    """Grow memory to cover ``end`` for an opcode of base ``cost``: the cost with growth, or
    ``_Slow`` (py-evm's own opcode then charges and raises) past the limit or the gas left.
    Only on growth, so the plain case of MLOAD/MSTORE/copies stays inline."""
    if end > _MEMORY_LIMIT:
        raise _Slow
    cost += _memory_cost(len(memory_._bytes), end)
    if cost > gas:
        raise _Slow
    memory_.extend(start, size)
    return cost


class _Analysis:
    """What the loop needs to know about one bytecode, computed once."""

    __slots__ = ("code", "jumpdests", "immediates")

    def __init__(self, raw: bytes) -> None:
        self.code = raw + _PAD
        jumpdests = set()
        immediates: dict[int, int] = {}  # pc of a PUSH -> its value (right-padded like py-evm's read)
        code, pc, end = self.code, 0, len(raw)
        while pc < end:
            op = code[pc]
            if _PUSH0 <= op <= _PUSH32:
                size = op - _PUSH0
                immediates[pc] = int.from_bytes(code[pc + 1:pc + 1 + size], "big")
                pc += size + 1
                continue
            if op == _JUMPDEST:
                jumpdests.add(pc)
            pc += 1
        self.jumpdests = frozenset(jumpdests)
        self.immediates = immediates


_analyses: dict[bytes, _Analysis] = {}
_analyses_lock = threading.Lock()


def _analysis(raw: bytes) -> _Analysis:
    found = _analyses.get(raw)
    if found is None:
        found = _Analysis(raw)
        with _analyses_lock:
            if len(_analyses) >= _CACHE_ENTRIES:
                _analyses.clear()
            _analyses[raw] = found
    return found


_ECRECOVER_ADDRESS = (1).to_bytes(20, "big")


def recover_signer(message_hash: bytes, y_parity: int, r: int, s: int) -> bytes | None:
    """The address whose key made the secp256k1 signature (r, s, y) over ``message_hash``; None
    when there is none (values out of range, or libsecp256k1 cannot recover a key).

    The recovery eth_keys does with its coincurve backend, which py-evm calls for transaction
    senders and for ecrecover, without eth_keys' ``Signature`` and ``PublicKey`` objects: their
    validation costs three times the libsecp256k1 call itself.
    """
    if not (0 <= r < SECPK1_N and 0 <= s < SECPK1_N and y_parity in (0, 1)):
        return None
    try:
        public_key = coincurve.PublicKey.from_signature_and_message(
            r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((y_parity,)), message_hash, hasher=None
        ).format(compressed=False)[1:]
    except Exception:  # noqa: BLE001 - eth_keys turns every coincurve error into BadSignature too
        return None
    return keccak(public_key)[12:]


def _ecrecover(computation: Any) -> Any:
    """The ecrecover precompile (0x01), py-evm's ``eth.precompiles.ecrecover`` step for step, with
    ``recover_signer``: same gas, same output, and — like py-evm — an empty output for a
    malformed or unrecoverable signature."""
    computation.consume_gas(GAS_ECRECOVER, reason="ECRecover Precompile")
    data = computation.msg.data_as_bytes.ljust(128, b"\0")
    v = int.from_bytes(data[32:64], "big")
    if v not in (27, 28):
        return computation
    signer = recover_signer(data[:32], v - 27, int.from_bytes(data[64:96], "big"), int.from_bytes(data[96:128], "big"))
    if signer is not None:
        computation.output = bytes(12) + signer
    return computation


class FastComputation(CancunComputation):
    """Cancun's computation with the opcode loop of this module (see the module docstring)."""

    _precompiles = {**CancunComputation.get_precompiles(), _ECRECOVER_ADDRESS: _ecrecover}

    @classmethod
    def apply_computation(cls, state: Any, message: Any, transaction_context: Any,
                          parent_computation: Any = None) -> Any:
        if cls.logger.show_debug2:  # py-evm's loop logs every opcode; keep that for debugging
            return super().apply_computation(state, message, transaction_context, parent_computation)
        with cls(state, message, transaction_context) as computation:
            # the preamble is py-evm's BaseComputation.apply_computation, unchanged
            if computation.is_origin_computation:
                computation.contracts_created = []
                if message.is_create:
                    cls.consume_initcode_gas_cost(computation)
            if parent_computation is not None:
                computation.contracts_created = parent_computation.contracts_created
            if message.is_create:
                computation.contracts_created.append(message.storage_address)
            precompile = computation.precompiles.get(message.code_address, NO_RESULT)
            if precompile is not NO_RESULT:
                if not message.is_delegation:
                    precompile(computation)
                return computation
            table = cls.__dict__.get("_dispatch")  # per class: a subclass may change the opcodes
            if table is None:
                table = _dispatch_table(cls.opcodes)
                setattr(cls, "_dispatch", table)
            _run(computation, *table)
        return computation


def _run(computation: Any, kinds: list[int], costs: list[int]) -> None:  # noqa: C901 - one loop on purpose
    stream = computation.code
    analysis = _analysis(stream._raw_code_bytes)
    code, jumpdests, immediates = analysis.code, analysis.jumpdests, analysis.immediates
    values = computation._stack.values
    push, pop = values.append, values.pop
    meter = computation._gas_meter
    memory_ = computation._memory  # its bytearray may be replaced when it grows: read it per use
    opcodes = computation.opcodes
    calldata = None
    gas = meter.gas_remaining
    pc = stream.program_counter
    while True:
        op = code[pc]
        kind = kinds[op]
        cost = costs[op]
        if cost <= gas:
            try:
                if kind == _PUSH:
                    if len(values) < 1024:
                        push(immediates[pc])
                        gas -= cost
                        pc += op - 0x5E  # the opcode byte and its op - 0x5F immediate bytes
                        continue
                elif kind == _MSTORE:
                    start, value = values[-1], values[-2]
                    end = start + 32
                    if end > len(memory_._bytes):
                        cost = _grow(memory_, start, 32, end, cost, gas)
                    memory_._bytes[start:end] = value.to_bytes(32, "big")
                    del values[-2:]
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _MLOAD:
                    start = values[-1]
                    end = start + 32
                    if end > len(memory_._bytes):
                        cost = _grow(memory_, start, 32, end, cost, gas)
                    values[-1] = int.from_bytes(memory_._bytes[start:end], "big")
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _JUMPDEST_K:
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _DUP:
                    n = op - 0x7F  # DUP1 is 0x80
                    if len(values) < 1024:
                        push(values[-n])
                        gas -= cost
                        pc += 1
                        continue
                elif kind == _JUMP:
                    dest = values[-1]
                    if dest in jumpdests:
                        pop()
                        gas -= cost
                        pc = dest
                        continue
                elif kind == _JUMPI:
                    dest, condition = values[-1], values[-2]
                    if not condition:
                        del values[-2:]
                        gas -= cost
                        pc += 1
                        continue
                    if dest in jumpdests:
                        del values[-2:]
                        gas -= cost
                        pc = dest
                        continue
                elif kind == _POP:
                    if values:
                        pop()
                        gas -= cost
                        pc += 1
                        continue
                elif kind == _SWAP:
                    n = op - 0x8E  # SWAP1 exchanges [-1] and [-2]
                    other = values[-n]
                    values[-n] = values[-1]
                    values[-1] = other
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _STOP:
                    break
                elif kind == _ISZERO:
                    values[-1] = 0 if values[-1] else 1
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _NOT:
                    values[-1] = _MAX - values[-1]
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _CALLDATALOAD:
                    start = values[-1]
                    if calldata is None:
                        calldata = computation.msg.data_as_bytes
                    # a slice clamps any start, however large, as py-evm's own slice does
                    values[-1] = int.from_bytes(calldata[start:start + 32].ljust(32, b"\0"), "big")
                    gas -= cost
                    pc += 1
                    continue
                elif kind == _SHA3 or kind >= _MCOPY:
                    # memory in, memory out: (SHA3: offset, size) (copies: destination, source, size)
                    if kind == _SHA3:
                        start, size = values[-1], values[-2]
                        end = start + size
                        cost += GAS_SHA3WORD * ((size + 31) // 32)
                    else:
                        start, source, size = values[-1], values[-2], values[-3]
                        end = (max(start, source) if kind == _MCOPY else start) + size
                        cost += GAS_COPY * ((size + 31) // 32)
                    if size and end > len(memory_._bytes):
                        cost = _grow(memory_, max(start, source) if kind == _MCOPY else start, size, end, cost, gas)
                    elif cost > gas:
                        raise _Slow
                    buf = memory_._bytes
                    if kind == _SHA3:
                        del values[-1]
                        values[-1] = int.from_bytes(keccak(bytes(buf[start:end])), "big")
                    else:
                        del values[-3:]
                        if size:
                            if kind == _MCOPY:
                                buf[start:start + size] = buf[source:source + size]
                            elif kind == _CALLDATACOPY:
                                if calldata is None:
                                    calldata = computation.msg.data_as_bytes
                                buf[start:start + size] = calldata[source:source + size].ljust(size, b"\0")
                            else:
                                chunk = stream._raw_code_bytes[source:source + size]
                                buf[start:start + size] = chunk.ljust(size, b"\0")
                    gas -= cost
                    pc += 1
                    continue
                elif kind != _SLOW:
                    # binary operations: a = top, b = second, as py-evm's stack_pop_ints(2) returns them
                    a, b = values[-1], values[-2]
                    if kind == _ADD:
                        r = (a + b) & _MAX
                    elif kind == _SHR:
                        r = b >> a if a < 256 else 0
                    elif kind == _SHL:
                        r = (b << a) & _MAX if a < 256 else 0
                    elif kind == _OR:
                        r = a | b
                    elif kind == _AND:
                        r = a & b
                    elif kind == _XOR:
                        r = a ^ b
                    elif kind == _LT:
                        r = 1 if a < b else 0
                    elif kind == _GT:
                        r = 1 if a > b else 0
                    elif kind == _EQ:
                        r = 1 if a == b else 0
                    elif kind == _SUB:
                        r = (a - b) & _MAX
                    elif kind == _MUL:
                        r = (a * b) & _MAX
                    elif kind == _DIV:
                        r = a // b if b else 0
                    else:  # _MOD
                        r = a % b if b else 0
                    del values[-1]
                    values[-1] = r
                    gas -= cost
                    pc += 1
                    continue
            except (IndexError, KeyError, _Slow):
                pass  # too few stack items, or not the plain case; nothing was changed yet
        # py-evm's own opcode, with the program counter and gas it expects
        stream.program_counter = pc + 1
        meter.gas_remaining = gas
        opcode_fn = opcodes.get(op)
        if opcode_fn is None:
            opcode_fn = InvalidOpcode(op)
        try:
            opcode_fn(computation=computation)
        except Halt:
            return  # py-evm's opcode left the gas meter up to date
        pc = stream.program_counter
        gas = meter.gas_remaining
        if values and type(values[-1]) is bytes:
            values[-1] = int.from_bytes(values[-1], "big")
    stream.program_counter = pc + 1
    meter.gas_remaining = gas


class FastState(CancunState):
    """Cancun state whose messages run on ``FastComputation`` and whose account and storage
    tries are written in batches (``trie.BatchedAccountDB``)."""

    computation_class = FastComputation
    account_db_class = BatchedAccountDB
