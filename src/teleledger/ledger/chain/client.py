"""The one chain client interface, its errors, and the ABI plumbing both backends share.

Nothing outside ``ledger.chain`` may know whether it talks to the embedded py-evm chain
(``embedded.EmbeddedChain``) or to an external JSON-RPC node (``rpc.JsonRpcChain``): both
implement ``ChainClient`` and raise only the errors below, never a web3 or py-evm exception.

    TeleledgerError
    ├── ChainUnavailable     503  the node does not answer (or a receipt never came)
    ├── ChainRevert          409  the contract refused; ``reason`` is its revert string
    └── ChainMisconfigured        (ConfigurationError) wrong chain id, no code at an address

Transactions are signed here, by the client, as legacy EIP-155 transactions (chain id in the
signature) so any node works without unlocked accounts; ``sender`` is an ``eth_keys``
``PrivateKey``, a local account object (``eth_account``'s ``LocalAccount``: anything with a
``.key``), or 32 raw key bytes.

This module must not import web3 or py-evm: it is the shared vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_keys import keys
from eth_utils import keccak, to_checksum_address

from teleledger.core.errors import ConfigurationError, Conflict, TeleledgerError
from teleledger.ledger.chain import CONTRACT_NAMES, load_artifact


class ChainUnavailable(TeleledgerError):
    """The chain node cannot be reached, or did not include a transaction in time."""

    status = 503
    issue_code = "transient"


class ChainRevert(Conflict):
    """A contract call or transaction reverted; ``reason`` is the contract's own message."""

    def __init__(self, reason: str, *, expression: str | None = None) -> None:
        self.reason = reason
        super().__init__(f"the chain refused: {reason}", expression=expression)


class ChainMisconfigured(ConfigurationError):
    """The configured chain is not the one expected (chain id, contract code)."""


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A decoded contract log. ``name`` is None when no known contract ABI declares ``topic0``."""

    name: str | None
    args: dict[str, Any]
    address: str
    block_number: int
    tx_hash: str
    log_index: int


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    status: int
    gas_used: int
    contract_address: str | None = None
    events: tuple[Event, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Block:
    number: int
    hash: str
    parent_hash: str
    timestamp: int
    #: the sealer: the embedded chain's authority address; an external node's coinbase/miner
    miner: str
    tx_hashes: tuple[str, ...]


@runtime_checkable
class ChainClient(Protocol):
    """What the rest of teleledger may ask of a chain. Addresses are checksummed strings."""

    mode: str  # "embedded" | "external"

    def chain_id(self) -> int: ...

    def block_number(self) -> int: ...

    def deploy(self, name: str, *args: Any, sender: Any) -> str: ...

    def transact(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any) -> Receipt: ...

    def call(self, address: str, abi_name: str, fn: str, *args: Any) -> Any: ...

    def get_logs(self, address: str | None, from_block: int, to_block: int | None = None) -> list[Event]: ...

    def get_block(self, number: int) -> Block: ...

    def get_code(self, address: str) -> bytes: ...

    def close(self) -> None: ...


# --- keys ---------------------------------------------------------------------------------------


def private_key(sender: Any) -> keys.PrivateKey:
    """Normalize a signer (eth_keys key, eth_account LocalAccount, or 32 bytes) to a PrivateKey."""
    if isinstance(sender, keys.PrivateKey):
        return sender
    raw = getattr(sender, "key", sender)
    if isinstance(raw, str):
        raw = bytes.fromhex(raw.removeprefix("0x"))
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 32:
        return keys.PrivateKey(bytes(raw))
    raise TypeError("sender must be an eth_keys PrivateKey, a local account, or 32 key bytes")


def address_of(sender: Any) -> str:
    return private_key(sender).public_key.to_checksum_address()


# --- ABI ----------------------------------------------------------------------------------------


def _type_of(entry: dict[str, Any]) -> str:
    t = entry["type"]
    if t.startswith("tuple"):
        inner = ",".join(_type_of(c) for c in entry["components"])
        return f"({inner}){t[len('tuple'):]}"
    return t


class ContractAbi:
    """Function encoding and event decoding for one contract artifact."""

    def __init__(self, name: str) -> None:
        self.name = name
        artifact = load_artifact(name)
        self.abi: list[dict[str, Any]] = artifact["abi"]
        self.bytecode = bytes.fromhex(artifact["bytecode"].removeprefix("0x"))
        self.runtime = bytes.fromhex(artifact["bytecode_runtime"].removeprefix("0x"))
        self._functions: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[bytes, dict[str, Any]] = {}
        self.constructor_types: list[str] = []
        for entry in self.abi:
            if entry["type"] == "function":
                self._functions.setdefault(entry["name"], []).append(entry)
            elif entry["type"] == "event":
                sig = f"{entry['name']}({','.join(_type_of(i) for i in entry['inputs'])})"
                self.events[keccak(text=sig)] = entry
            elif entry["type"] == "constructor":
                self.constructor_types = [_type_of(i) for i in entry["inputs"]]

    def function(self, fn: str, nargs: int) -> dict[str, Any]:
        for entry in self._functions.get(fn, []):
            if len(entry["inputs"]) == nargs:
                return entry
        known = ", ".join(sorted(self._functions))
        raise TypeError(f"{self.name} has no function {fn} taking {nargs} arguments (functions: {known})")

    def encode_call(self, fn: str, args: tuple[Any, ...]) -> bytes:
        entry = self.function(fn, len(args))
        types = [_type_of(i) for i in entry["inputs"]]
        selector = keccak(text=f"{fn}({','.join(types)})")[:4]
        return selector + abi_encode(types, list(args))

    def decode_result(self, fn: str, nargs: int, data: bytes) -> Any:
        outputs = self.function(fn, nargs)["outputs"]
        values = tuple(
            to_checksum_address(v) if o["type"] == "address" else v
            for o, v in zip(outputs, abi_decode([_type_of(o) for o in outputs], data))
        )
        return values[0] if len(values) == 1 else values

    def encode_deploy(self, args: tuple[Any, ...]) -> bytes:
        return self.bytecode + abi_encode(self.constructor_types, list(args))


_ABIS: dict[str, ContractAbi] = {}


def contract_abi(name: str) -> ContractAbi:
    if name not in _ABIS:
        _ABIS[name] = ContractAbi(name)
    return _ABIS[name]


def _all_events() -> dict[bytes, dict[str, Any]]:
    merged: dict[bytes, dict[str, Any]] = {}
    for name in CONTRACT_NAMES:
        merged.update(contract_abi(name).events)
    return merged


def decode_event(
    address: bytes | str, topics: list[bytes], data: bytes, *, block_number: int, tx_hash: str, log_index: int
) -> Event:
    """Decode a raw log by ``topic0`` against every known contract's events."""
    addr = to_checksum_address(address)
    entry = _all_events().get(topics[0]) if topics else None
    if entry is None:
        args: dict[str, Any] = {"topics": ["0x" + t.hex() for t in topics], "data": "0x" + data.hex()}
        return Event(None, args, addr, block_number, tx_hash, log_index)
    indexed = [i for i in entry["inputs"] if i["indexed"]]
    plain = [i for i in entry["inputs"] if not i["indexed"]]
    args = {}
    for inp, topic in zip(indexed, topics[1:]):
        t = _type_of(inp)
        # dynamic indexed values are stored as their hash; keep the hash
        args[inp["name"]] = topic if t in ("string", "bytes") or t.endswith("]") or t.startswith("(") else abi_decode([t], topic)[0]
    for inp, value in zip(plain, abi_decode([_type_of(i) for i in plain], data)):
        args[inp["name"]] = value
    for inp in entry["inputs"]:
        if inp["type"] == "address" and isinstance(args.get(inp["name"]), str):
            args[inp["name"]] = to_checksum_address(args[inp["name"]])
    return Event(entry["name"], args, addr, block_number, tx_hash, log_index)


_ERROR_SELECTOR = keccak(text="Error(string)")[:4]
_PANIC_SELECTOR = keccak(text="Panic(uint256)")[:4]


def revert_reason(data: bytes | None) -> str:
    """The human reason inside revert data (``Error(string)``); a description otherwise."""
    if not data:
        return "reverted without a reason"
    if data[:4] == _ERROR_SELECTOR:
        try:
            return str(abi_decode(["string"], data[4:])[0])
        except Exception:  # malformed payload: report it rather than crash
            return "reverted with a malformed reason 0x" + data.hex()
    if data[:4] == _PANIC_SELECTOR:
        return f"panic 0x{abi_decode(['uint256'], data[4:])[0]:02x}"
    return "reverted with data 0x" + data.hex()


def create_address(sender: str, nonce: int) -> str:
    import rlp

    return to_checksum_address(keccak(rlp.encode([bytes.fromhex(sender[2:]), nonce]))[12:])
