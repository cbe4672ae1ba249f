"""An external Ethereum JSON-RPC node (Besu/QBFT, geth/Clique, Hardhat) as a ``ChainClient``.

The only module that imports web3. Every web3/requests exception is translated here into
``ChainUnavailable``, ``ChainRevert`` or ``ChainMisconfigured`` (see ``client``).

Transactions are legacy EIP-155 transactions signed locally (no unlocked accounts needed), with
the node's ``eth_gasPrice`` (0 on free-gas permissioned networks) and a gas limit from
``eth_estimateGas`` — which also surfaces a revert before anything is sent. A transaction that
reverts anyway once mined is replayed with ``eth_call`` at its block to recover the reason.
Nonces are tracked locally per sender so concurrent callers do not collide.

``sign`` talks to no node, so it cannot estimate: it uses a fixed gas limit (``sign_gas``,
generous for every teleledger contract call; unused gas costs nothing) and twice the gas price
the node last suggested (read at start and on every ``nonce()``), so a transaction signed now
still pays enough when a worker sends it later. ``send_raw`` is idempotent: whatever error the
node gives for a transaction, if the node knows that transaction hash afterwards it was taken
(Hardhat's automine answers a reverting transaction with an error although it mined it).
Proof-of-authority ``extraData`` (longer than 32 bytes) is accepted via web3's
``ExtraDataToPOAMiddleware``.
"""

from __future__ import annotations

import threading
from typing import Any

from eth_utils import to_checksum_address

from teleledger.ledger.chain.client import (
    Block,
    ChainMisconfigured,
    ChainRevert,
    ChainUnavailable,
    Event,
    InvalidTransaction,
    NonceConflict,
    Receipt,
    SignedTx,
    Transaction,
    contract_abi,
    decode_event,
    decode_transaction,
    private_key,
    revert_reason,
    sign_transaction,
)

#: gas estimates get this head-room (a node's estimate can be a hair short after state changes)
GAS_MARGIN = 1.2
#: gas limit of ``sign``ed transactions: several times what any teleledger contract call needs
#: (a consent grant by signature uses ~100k), far below any block gas limit
SIGN_GAS = 2_000_000
#: ``sign`` pays this multiple of the node's last suggested gas price (base fees move)
SIGN_GAS_PRICE_FACTOR = 2


def _hex_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return b""


class JsonRpcChain:
    mode = "external"

    def __init__(self, url: str, expected_chain_id: int | None = None, *, timeout: float = 10.0,
                 receipt_timeout: float = 60.0, sign_gas: int = SIGN_GAS) -> None:
        from web3 import Web3
        from web3.middleware import ExtraDataToPOAMiddleware

        self.url = url
        self._receipt_timeout = receipt_timeout
        self._w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
        self._w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._nonce_lock = threading.Lock()
        self._nonces: dict[str, int] = {}
        self._sign_gas = sign_gas
        self._chain_id = self._rpc(lambda: int(self._w3.eth.chain_id))
        self._sign_gas_price = self._suggested_gas_price()
        if expected_chain_id is not None and self._chain_id != expected_chain_id:
            raise ChainMisconfigured(
                f"the node at {url} serves chain id {self._chain_id}, expected {expected_chain_id}; "
                "point TELELEDGER_CHAIN_URL at the consortium's node or fix the expected chain id"
            )

    def _rpc(self, fn: Any) -> Any:
        """Run one web3 call, translating transport failures to ``ChainUnavailable``."""
        import requests
        from web3.exceptions import ProviderConnectionError, TimeExhausted, Web3RPCError

        try:
            return fn()
        except (requests.exceptions.RequestException, ProviderConnectionError, ConnectionError, OSError) as exc:
            raise ChainUnavailable(
                f"the chain node at {self.url} does not answer ({type(exc).__name__}); "
                "check that it runs and TELELEDGER_CHAIN_URL is right"
            ) from exc
        except TimeExhausted as exc:
            raise ChainUnavailable(f"the chain node at {self.url} did not include the transaction in time") from exc
        except Web3RPCError as exc:
            raise ChainUnavailable(f"the chain node at {self.url} answered with an error: {exc}") from exc

    @staticmethod
    def _revert_of(exc: Exception) -> ChainRevert:
        data = getattr(exc, "data", None)
        if isinstance(data, dict):
            data = data.get("data")
        raw = _hex_bytes(data) if isinstance(data, (str, bytes)) else b""
        if raw:
            return ChainRevert(revert_reason(raw))
        message = str(getattr(exc, "message", None) or exc)
        return ChainRevert(message.removeprefix("execution reverted: ").removeprefix("execution reverted"))

    def close(self) -> None:
        session = getattr(self._w3.provider, "_request_session_manager", None)
        if session is not None:
            try:
                session.cache_and_return_session(self.url).close()  # type: ignore[attr-defined]
            except Exception:  # closing is best effort
                pass

    # --- reads ----------------------------------------------------------------------------------

    def chain_id(self) -> int:
        return self._chain_id

    def block_number(self) -> int:
        return int(self._rpc(lambda: self._w3.eth.block_number))

    def get_code(self, address: str) -> bytes:
        return bytes(self._rpc(lambda: self._w3.eth.get_code(to_checksum_address(address))))

    def get_block(self, number: int) -> Block:
        b = self._rpc(lambda: self._w3.eth.get_block(number))
        return Block(
            number=int(b["number"]), hash="0x" + bytes(b["hash"]).hex(), parent_hash="0x" + bytes(b["parentHash"]).hex(),
            timestamp=int(b["timestamp"]), miner=to_checksum_address(b["miner"]),
            tx_hashes=tuple("0x" + bytes(h).hex() for h in b["transactions"]),
        )

    def call(self, address: str, abi_name: str, fn: str, *args: Any) -> Any:
        abi = contract_abi(abi_name)
        tx = {"to": to_checksum_address(address), "data": "0x" + abi.encode_call(fn, args).hex()}
        return abi.decode_result(fn, len(args), self._eth_call(tx))

    def _eth_call(self, tx: dict[str, Any], block: Any = "latest") -> bytes:
        from web3.exceptions import ContractLogicError

        try:
            return bytes(self._rpc(lambda: self._w3.eth.call(tx, block)))  # type: ignore[arg-type]
        except ContractLogicError as exc:
            raise self._revert_of(exc) from exc

    def get_logs(self, address: str | None, from_block: int, to_block: int | None = None) -> list[Event]:
        query: dict[str, Any] = {"fromBlock": from_block, "toBlock": "latest" if to_block is None else to_block}
        if address is not None:
            query["address"] = to_checksum_address(address)
        raw = self._rpc(lambda: self._w3.eth.get_logs(query))  # type: ignore[arg-type]
        return [self._event(log) for log in raw]

    @staticmethod
    def _event(log: Any) -> Event:
        return decode_event(
            log["address"], [bytes(t) for t in log["topics"]], bytes(log["data"]),
            block_number=int(log["blockNumber"]), tx_hash="0x" + bytes(log["transactionHash"]).hex(),
            log_index=int(log["logIndex"]),
        )

    # --- writes ---------------------------------------------------------------------------------

    def deploy(self, name: str, *args: Any, sender: Any) -> str:
        receipt = self._send(sender, None, contract_abi(name).encode_deploy(args))
        assert receipt.contract_address is not None
        return receipt.contract_address

    def transact(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any) -> Receipt:
        return self._send(sender, to_checksum_address(address), contract_abi(abi_name).encode_call(fn, args))

    def _suggested_gas_price(self) -> int:
        return int(self._rpc(lambda: self._w3.eth.gas_price)) * SIGN_GAS_PRICE_FACTOR

    def nonce(self, address: str) -> int:
        address = to_checksum_address(address)
        count = int(self._rpc(lambda: self._w3.eth.get_transaction_count(address, "pending")))  # type: ignore[arg-type]
        self._sign_gas_price = self._suggested_gas_price()
        return count

    def sign(self, address: str, abi_name: str, fn: str, *args: Any, sender: Any, nonce: int) -> SignedTx:
        return sign_transaction(
            sender, chain_id=self._chain_id, nonce=nonce, gas_price=self._sign_gas_price, gas=self._sign_gas,
            to=to_checksum_address(address), data=contract_abi(abi_name).encode_call(fn, args),
        )

    def send_raw(self, raws: list[bytes]) -> list[str]:
        # decode them all first: a malformed list is refused before anything is sent
        txs = [decode_transaction(raw, chain_id=self._chain_id).signed() for raw in raws]
        return [self._send_one(tx) for tx in txs]

    def _send_one(self, tx: SignedTx) -> str:
        answer = self._rpc(lambda: self._w3.provider.make_request(  # type: ignore[arg-type]
            "eth_sendRawTransaction", ["0x" + tx.raw.hex()]))
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is None or self._known(tx.tx_hash):
            self._sent(tx.sender, tx.nonce)
            return tx.tx_hash
        message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
        lowered = message.lower()
        if "nonce too low" in lowered or "nonce is too low" in lowered or "already used" in lowered \
                or "replacement transaction underpriced" in lowered:
            raise NonceConflict(sender=tx.sender, nonce=tx.nonce, tx_hash=tx.tx_hash, next_nonce=self.nonce(tx.sender))
        raise InvalidTransaction(f"the chain node at {self.url} refused transaction {tx.tx_hash}: {message}")

    def _known(self, tx_hash: str) -> bool:
        return self._lookup(lambda: self._w3.eth.get_transaction(tx_hash)) is not None  # type: ignore[arg-type]

    def _lookup(self, fn: Any) -> Any:
        """``fn()``, or None when the node does not know the transaction (yet)."""
        from web3.exceptions import TransactionNotFound

        return self._rpc(lambda: _none_if(fn, TransactionNotFound))

    def _sent(self, sender: str, nonce: int) -> None:
        """Keep ``transact``'s local nonce counter ahead of nonces used through ``send_raw``."""
        with self._nonce_lock:
            if sender in self._nonces and self._nonces[sender] <= nonce:
                self._nonces[sender] = nonce + 1

    def receipt(self, tx_hash: str) -> Receipt | None:
        r = self._lookup(lambda: self._w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
        if r is None:
            return None
        block = int(r["blockNumber"])
        status = int(r["status"])
        error = None
        if status != 1:
            error = self._failure_reason(tx_hash, block, int(r["gasUsed"]))
        created = to_checksum_address(r["contractAddress"]) if r.get("contractAddress") else None
        return Receipt(
            tx_hash="0x" + bytes(r["transactionHash"]).hex(), block_number=block, status=status,
            gas_used=int(r["gasUsed"]), contract_address=created,
            events=tuple(self._event(log) for log in r["logs"]), error=error,
        )

    def _failure_reason(self, tx_hash: str, block: int, gas_used: int) -> str:
        """Why a mined transaction failed: replay it with ``eth_call`` (nodes keep no revert data).

        First at its own block (the state after it, which includes the transactions before it
        in the block; a failed transaction changed nothing), then at the block before.
        """
        tx = self._lookup(lambda: self._w3.eth.get_transaction(tx_hash))  # type: ignore[arg-type]
        if tx is None:
            return "reverted (the node no longer has the transaction to replay)"
        if gas_used >= int(tx["gas"]):
            return f"out of gas (used all {gas_used} of its gas limit)"
        replay: dict[str, Any] = {"from": tx["from"], "data": "0x" + bytes(tx["input"]).hex(),
                                  "gas": int(tx["gas"]), "value": int(tx["value"])}
        if tx.get("to"):
            replay["to"] = tx["to"]
        for at in (block, block - 1):
            try:
                self._eth_call(replay, at)
            except ChainRevert as exc:
                return exc.reason
        return "reverted (replaying it at its block succeeded, so the reason is not known)"

    def get_transaction(self, tx_hash: str) -> Transaction | None:
        tx = self._lookup(lambda: self._w3.eth.get_transaction(tx_hash))  # type: ignore[arg-type]
        if tx is None:
            return None
        number = tx.get("blockNumber")
        return Transaction(
            hash="0x" + bytes(tx["hash"]).hex(), sender=to_checksum_address(tx["from"]),
            to=to_checksum_address(tx["to"]) if tx.get("to") else None, nonce=int(tx["nonce"]),
            input=bytes(tx["input"]), block_number=int(number) if number is not None else None,
        )

    def _next_nonce(self, sender: str) -> int:
        with self._nonce_lock:
            if sender not in self._nonces:
                self._nonces[sender] = int(self._rpc(lambda: self._w3.eth.get_transaction_count(sender, "pending")))  # type: ignore[arg-type]
            nonce = self._nonces[sender]
            self._nonces[sender] = nonce + 1
            return nonce

    def _send(self, sender: Any, to: str | None, data: bytes) -> Receipt:
        from web3.exceptions import ContractLogicError

        key = private_key(sender)
        frm = key.public_key.to_checksum_address()
        probe: dict[str, Any] = {"from": frm, "data": "0x" + data.hex()}
        if to is not None:
            probe["to"] = to
        try:
            gas = int(self._rpc(lambda: self._w3.eth.estimate_gas(probe)) * GAS_MARGIN)  # type: ignore[arg-type]
        except ContractLogicError as exc:
            raise self._revert_of(exc) from exc
        signed = sign_transaction(key, chain_id=self._chain_id, nonce=self._next_nonce(frm), gas=gas, to=to, data=data,
                                  gas_price=int(self._rpc(lambda: self._w3.eth.gas_price)))
        try:
            # a concurrent caller can make the transaction revert after the estimate; Hardhat's
            # automine then answers with an error although it mined it: _send_one sorts that out
            self._send_one(signed)
        except (ChainUnavailable, NonceConflict, InvalidTransaction):
            with self._nonce_lock:  # the node may not have taken it: re-read the nonce next time
                self._nonces.pop(frm, None)
            raise
        r = self._rpc(lambda: self._w3.eth.wait_for_transaction_receipt(  # type: ignore[arg-type]
            signed.tx_hash, timeout=self._receipt_timeout))
        block = int(r["blockNumber"])
        if int(r["status"]) != 1:
            raise ChainRevert(self._failure_reason(signed.tx_hash, block, int(r["gasUsed"])))
        created = to_checksum_address(r["contractAddress"]) if r.get("contractAddress") else None
        return Receipt(
            tx_hash="0x" + bytes(r["transactionHash"]).hex(), block_number=block, status=1,
            gas_used=int(r["gasUsed"]), contract_address=created,
            events=tuple(self._event(log) for log in r["logs"]),
        )


def _none_if(fn: Any, missing: type[Exception]) -> Any:
    try:
        return fn()
    except missing:
        return None
