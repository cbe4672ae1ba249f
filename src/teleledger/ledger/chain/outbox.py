"""The chain outbox: chain writes recorded with the change that needs them, sent exactly once.

A use case that needs a chain write calls ``enqueue(conn, ...)`` inside its own unit of work, so
the write commits with the change or not at all (a rolled-back change leaves no row, a
committed one is never lost: a chain outage only delays it). ``OutboxWorker`` drains the rows.

Life of a row (``chain_outbox``, see ``storage``)::

    pending ──sign──▶ sent ──receipt, `confirmations` deep──▶ done
       ▲  (nonce, tx_hash, raw committed      └──receipt status 0──▶ failed (revert reason kept;
       │   BEFORE the first send_raw)                                 never retried)
       └── NonceConflict (another tx took the nonce and ours is not on chain): re-signed

Exactly one transaction per row, whatever crashes:

* A row's raw transaction is signed and **committed before it is sent**. After a crash (kill -9
  between the commit and ``send_raw``, or after it) the worker sends the *same* bytes again;
  ``send_raw`` is idempotent, so the chain holds at most one transaction per row, and the
  nonce makes a second, different one impossible.
* A row is re-signed only when its nonce was consumed by another transaction *and* its own
  transaction has no receipt: that transaction can then never be included.
* Nonces: the next nonce is ``max(chain's pending nonce, highest nonce stored in the outbox + 1)``,
  so rows signed but not yet sent (by this or a crashed process) are never reused.
* One worker per database signs for a sender at a time: on PostgreSQL a session advisory lock
  per sender (``pg_try_advisory_lock``) held for the whole round — another process skips that
  sender; on SQLite the signing transaction holds the database's write lock (``BEGIN
  IMMEDIATE``), which serializes nonce assignment across processes, and two processes that
  re-send the same stored bytes still make one transaction.

Chain outage (``ChainUnavailable``): rows stay pending/sent, ``attempts`` grows and
``next_attempt_at`` backs off exponentially with jitter; the API that enqueues keeps working.
An external node that forgets a transaction (restart, reorg) gets the same bytes again after
``resend_after`` seconds; a reorg that drops an included transaction clears its block number.

Errors reach callers only through ``wait``: ``ChainRevert`` with the contract's reason for a
failed row, ``ChainUnavailable`` when it is not confirmed in time. Rows never hold PHI (the
callers' arguments are pseudonyms and hashes); this module never logs arguments or keys.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from eth_keys import keys
from sqlalchemy import Connection, Engine, event, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from teleledger.core.errors import Conflict, InvalidInput, NotFound, TeleledgerError
from teleledger.ledger.chain import CONTRACT_NAMES
from teleledger.ledger.chain.background import BackgroundThread
from teleledger.ledger.chain.client import (
    ChainClient,
    ChainRevert,
    ChainUnavailable,
    InvalidTransaction,
    NonceConflict,
    contract_abi,
)
from teleledger.ledger.chain.storage import chain_outbox, decode_args, encode_args
from teleledger.storage.db import UnitOfWork

__all__ = ["OutboxEntry", "OutboxWorker", "enqueue", "entry", "wait"]

log = logging.getLogger("teleledger.chain.outbox")

#: set on a connection that enqueued; its commit turns it into _COMMITTED, and the connection's
#: return to the pool — after the driver's COMMIT, which the "commit" event precedes — wakes the worker
_ENQUEUED = "teleledger.chain_outbox.enqueued"
_COMMITTED = "teleledger.chain_outbox.committed"
_OPEN = ("pending", "sent")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class OutboxEntry:
    """One outbox row as callers see it (no raw bytes)."""

    id: int
    kind: str
    key: str
    contract: str
    fn: str
    args: list[Any]
    sender: str
    status: str
    attempts: int
    nonce: int | None
    tx_hash: str | None
    block_number: int | None
    error: str | None
    created: int
    updated: int


def _entry(row: Any) -> OutboxEntry:
    return OutboxEntry(
        id=int(row.id), kind=row.kind, key=row.idempotency_key, contract=row.contract, fn=row.fn,
        args=decode_args(row.args), sender=row.sender, status=row.status, attempts=int(row.attempts),
        nonce=None if row.nonce is None else int(row.nonce), tx_hash=row.tx_hash,
        block_number=None if row.block_number is None else int(row.block_number), error=row.error,
        created=int(row.created), updated=int(row.updated),
    )


_ENTRY_COLUMNS = [c for c in chain_outbox.c if c.name != "raw_tx"]


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(chain_outbox)


# --------------------------------------------------------------------------- enqueue


def enqueue(conn: Connection, *, kind: str, key: str, contract: str, fn: str, args: list[Any] | tuple[Any, ...],
            sender: str) -> bool:
    """Record the chain write ``contract.fn(*args)`` signed by keystore key ``sender``, in the
    caller's transaction (``uow.c``); True when a row was added, False when ``key`` was already
    recorded with the same call (idempotent). The same key for a *different* call is a
    ``Conflict``; arguments the ABI cannot encode are ``InvalidInput`` — both raised here, in the
    caller's transaction, rather than discovered by the worker later."""
    if contract not in CONTRACT_NAMES:
        raise InvalidInput(f"unknown contract {contract!r}; expected one of {', '.join(CONTRACT_NAMES)}")
    if not key or len(key) > 200:
        raise InvalidInput("an outbox idempotency key must be 1 to 200 characters")
    if not kind or len(kind) > 32:
        raise InvalidInput("an outbox kind must be 1 to 32 characters")
    args = list(args)
    try:
        contract_abi(contract).encode_call(fn, tuple(args))
        encoded = encode_args(args)
    except Exception as exc:  # eth_abi's EncodingError family, TypeError: the caller's arguments
        raise InvalidInput(f"cannot encode {contract}.{fn} with these arguments: {exc}") from exc
    now = _now_us()
    # a dict, not keywords: ``values()`` has a parameter called ``fn`` of its own
    stmt = (_insert(conn).values({
        "kind": kind, "idempotency_key": key, "contract": contract, "fn": fn, "args": encoded, "sender": sender,
        "status": "pending", "attempts": 0, "next_attempt_at": now, "created": now, "updated": now})
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(chain_outbox.c.id))
    if conn.execute(stmt).first() is not None:
        conn.info[_ENQUEUED] = True
        return True
    row = conn.execute(select(chain_outbox.c.contract, chain_outbox.c.fn, chain_outbox.c.args, chain_outbox.c.sender)
                       .where(chain_outbox.c.idempotency_key == key)).one()
    if (row.contract, row.fn, row.sender) != (contract, fn, sender) or decode_args(row.args) != decode_args(encoded):
        raise Conflict(f"the chain write {key!r} is already recorded for a different call")
    return False


def entry(engine_or_conn: Engine | Connection, key: str) -> OutboxEntry:
    """The outbox row recorded under ``key`` (``NotFound`` when none)."""
    stmt = select(*_ENTRY_COLUMNS).where(chain_outbox.c.idempotency_key == key)
    if isinstance(engine_or_conn, Connection):
        row = engine_or_conn.execute(stmt).first()
    else:
        with engine_or_conn.connect() as conn:
            row = conn.execute(stmt).first()
    if row is None:
        raise NotFound(f"no chain write recorded under {key!r}")
    return _entry(row)


def wait(engine: Engine, key: str, timeout: float = 30.0, *, poll: float = 0.02,
         kick: Callable[[], None] | None = None) -> OutboxEntry:
    """Block until the row ``key`` is done (return it), failed (``ChainRevert`` with the
    contract's reason) or ``timeout`` seconds passed (``ChainUnavailable``, saying why it waits)."""
    deadline = time.monotonic() + timeout
    if kick is not None:
        kick()
    while True:
        current = entry(engine, key)
        if current.status == "done":
            return current
        if current.status == "failed":
            raise ChainRevert(current.error or "reverted")
        if time.monotonic() >= deadline:
            why = f": {current.error}" if current.error else ""
            raise ChainUnavailable(
                f"the chain write {key!r} is not confirmed after {timeout:g} s (status {current.status}{why}); "
                "it stays recorded and is sent when the chain answers")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- the worker


def _lock_key(sender: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key per sender."""
    return int.from_bytes(hashlib.sha256(b"teleledger outbox " + sender.encode()).digest()[:8], "big", signed=True)


@dataclass
class _Round:
    changed: int = 0
    unavailable: ChainUnavailable | None = None


class OutboxWorker(BackgroundThread):
    """Drains ``chain_outbox`` (see the module docstring).

    ``addresses``: contract name -> address; ``confirmations``: a transaction is done when its
    block has this many confirmations, counting itself (1 = included); ``poll_interval``:
    seconds between rounds of the background thread when nothing wakes it; ``resend_after``:
    seconds before an unconfirmed transaction's bytes are offered to the node again;
    ``base_backoff``/``max_backoff``: retry delays after ``ChainUnavailable`` (doubling, ±50 %
    jitter). ``clock`` (µs) and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        engine: Engine,
        client: ChainClient,
        keystore: Any,
        addresses: dict[str, str],
        confirmations: int = 1,
        *,
        poll_interval: float = 0.5,
        batch: int = 64,
        resend_after: float = 10.0,
        base_backoff: float = 0.5,
        max_backoff: float = 30.0,
        clock: Callable[[], int] = _now_us,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1 (the including block itself)")
        self.engine = engine
        self.client = client
        self.keystore = keystore
        self.addresses = dict(addresses)
        self.confirmations = confirmations
        self.poll_interval = poll_interval
        self.batch = batch
        self.resend_after_us = int(resend_after * 1_000_000)
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._rng = rng
        self._keys: dict[str, keys.PrivateKey] = {}
        self._round_lock = threading.Lock()  # one round at a time in this process
        self._wake = threading.Event()
        self._init_thread("teleledger-chain-outbox", "the outbox worker")
        self._listening = False
        self.failures = 0  # consecutive rounds that met ChainUnavailable (health checks)
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public

    def kick(self) -> None:
        """Wake the background thread now (a row was committed, or someone waits)."""
        self._wake.set()

    def wait(self, key: str, timeout: float = 30.0) -> OutboxEntry:
        """``wait`` for ``key``, waking this worker first."""
        return wait(self.engine, key, timeout, kick=self.kick)

    def drain_once(self) -> int:
        """One round for every sender with open rows: sign, send, collect receipts. Returns how
        many rows changed state; raises ``ChainUnavailable`` when the chain did not answer (the
        rows wait, backed off)."""
        with self._round_lock:
            result = _Round()
            for sender in self._open_senders():
                with self._sender_lock(sender) as held:
                    if held:
                        self._sender_round(sender, result)
            if result.unavailable is not None:
                self.failures += 1
                self.last_error = result.unavailable.message
                raise result.unavailable
            self.failures = 0
            return result.changed

    def sign_pending(self, sender: str) -> int:
        """Step 1 alone (tests simulate a crash after it): sign due pending rows and commit them
        as ``sent`` before anything is sent. Returns how many were signed."""
        with self._round_lock, self._sender_lock(sender) as held:
            return self._sign(sender) if held else 0

    # ------------------------------------------------------------------ background thread

    def _before_start(self) -> None:
        if not self._listening:
            event.listen(self.engine, "commit", self._on_commit)
            event.listen(self.engine, "rollback", self._on_rollback)
            event.listen(self.engine, "checkin", self._on_checkin)
            self._listening = True

    def _interrupt(self) -> None:
        self._wake.set()

    def _after_stop(self) -> None:
        if self._listening:
            event.remove(self.engine, "commit", self._on_commit)
            event.remove(self.engine, "rollback", self._on_rollback)
            event.remove(self.engine, "checkin", self._on_checkin)
            self._listening = False

    @staticmethod
    def _on_commit(conn: Connection) -> None:
        # fires just BEFORE the driver's COMMIT: a worker woken now might not see the row yet
        if conn.info.pop(_ENQUEUED, False):
            conn.info[_COMMITTED] = True

    @staticmethod
    def _on_rollback(conn: Connection) -> None:
        conn.info.pop(_ENQUEUED, None)
        conn.info.pop(_COMMITTED, None)

    def _on_checkin(self, _dbapi_conn: Any, record: Any) -> None:
        # the pool record's info is the Connection.info the flags were set on
        if record.info.pop(_COMMITTED, False):
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.poll_interval
            try:
                changed = self.drain_once()
                if changed:
                    delay = 0.0  # more may be due (a batch was full, confirmations pending)
                    if self.confirmations > 1:
                        delay = self.poll_interval
            except ChainUnavailable as exc:
                delay = self._backoff(self.failures)
                log.warning("chain outbox waits for the chain (%s); retrying in %.1f s", exc.message, delay)
            except Exception as exc:  # never let the thread die: log the class, back off
                self.failures += 1
                self.last_error = type(exc).__name__
                delay = self._backoff(self.failures)
                log.error("chain outbox round failed (%s); retrying in %.1f s", _describe(exc), delay)
            if delay:
                self._wake.wait(delay)
                self._wake.clear()

    def _backoff(self, failures: int) -> float:
        base = min(self.max_backoff, self.base_backoff * (2 ** max(0, min(failures - 1, 30))))
        return base * (0.5 + self._rng())

    # ------------------------------------------------------------------ one sender

    def _open_senders(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(chain_outbox.c.sender).distinct()
                                     .where(chain_outbox.c.status.in_(_OPEN))
                                     .order_by(chain_outbox.c.sender)).scalars())

    @contextmanager
    def _sender_lock(self, sender: str) -> Iterator[bool]:
        if self.engine.dialect.name != "postgresql":
            yield True  # SQLite: the signing transaction's write lock (module docstring)
            return
        conn = self.engine.connect()
        held = False
        try:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _lock_key(sender)}).scalar())
            conn.commit()
            yield held
        finally:
            try:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(sender)})
                    conn.commit()
            except Exception:
                conn.invalidate()  # a session still holding the lock must not go back to the pool
            conn.close()

    def _key(self, sender: str) -> keys.PrivateKey:
        if sender not in self._keys:
            self._keys[sender] = self.keystore.key(sender)
        return self._keys[sender]

    def _sender_round(self, sender: str, result: _Round) -> None:
        try:
            result.changed += self._sign(sender)
            now = self._clock()
            result.changed += self._receipts(sender, self._send(sender, now), now)
        except ChainUnavailable as exc:
            result.unavailable = exc

    def _due(self, conn: Connection, sender: str, status: str, now: int) -> list[Any]:
        c = chain_outbox.c
        return conn.execute(select(chain_outbox).where(c.sender == sender, c.status == status, c.next_attempt_at <= now)
                            .order_by(c.id).limit(self.batch)).all()

    def _sign(self, sender: str) -> int:
        now = self._clock()
        with self.engine.connect() as conn:  # peek without the write lock: usually nothing is pending
            if not self._due(conn, sender, "pending", now):
                return 0
        key = self._key(sender)
        address = key.public_key.to_checksum_address()
        try:
            chain_next = self.client.nonce(address)
        except ChainUnavailable as exc:
            self._back_off(sender, "pending", exc.message)
            raise
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            rows = self._due(c, sender, "pending", now)
            stored = c.execute(select(func.max(chain_outbox.c.nonce)).where(chain_outbox.c.sender == sender)).scalar()
            nonce = max(chain_next, 0 if stored is None else int(stored) + 1)
            signed = 0
            for row in rows:
                values: dict[str, Any] = {"updated": self._clock()}
                address_of_contract = self.addresses.get(row.contract)
                if not address_of_contract:
                    values.update(error=f"no address recorded for {row.contract}: deploy it "
                                        "(`teleledger chain deploy`) and restart", next_attempt_at=now + 60_000_000)
                else:
                    try:
                        tx = self.client.sign(address_of_contract, row.contract, row.fn, *decode_args(row.args),
                                              sender=key, nonce=nonce)
                    except (TypeError, ValueError, TeleledgerError) as exc:
                        values.update(status="failed", error=f"cannot sign {row.contract}.{row.fn}: "
                                                             f"{getattr(exc, 'message', exc)}")
                    else:
                        values.update(status="sent", nonce=tx.nonce, tx_hash=tx.tx_hash, raw_tx=tx.raw,
                                      next_attempt_at=now, error=None)
                        nonce += 1
                        signed += 1
                c.execute(update(chain_outbox).where(chain_outbox.c.id == row.id, chain_outbox.c.status == "pending")
                          .values(**values))
            uow.commit()  # committed BEFORE any send: a crash from here on re-sends these bytes
        return signed

    def _send(self, sender: str, now: int) -> set[int]:
        """Offer the sender's unincluded transactions to the node; the ids offered."""
        with self.engine.connect() as conn:
            # every unincluded transaction of the sender, in nonce order, once any is due: a
            # lower nonce held back would leave a gap the embedded chain refuses
            rows = conn.execute(select(chain_outbox).where(
                chain_outbox.c.sender == sender, chain_outbox.c.status == "sent", chain_outbox.c.block_number.is_(None))
                .order_by(chain_outbox.c.nonce).limit(self.batch)).all()
        if not rows or all(r.next_attempt_at > now for r in rows):
            return set()
        try:
            self._send_rows(rows)
        except ChainUnavailable as exc:
            self._back_off(sender, "sent", exc.message, ids=[r.id for r in rows])
            raise
        return {int(r.id) for r in rows}

    def _send_rows(self, rows: list[Any]) -> None:
        """send_raw the rows' stored bytes (in nonce order); a row the node refuses is dealt
        with alone and the others are offered again (the embedded chain takes all or none)."""
        try:
            self.client.send_raw([bytes(r.raw_tx) for r in rows])
            return
        except NonceConflict as exc:
            culprit = next((r for r in rows if r.tx_hash == exc.tx_hash), rows[0] if len(rows) == 1 else None)
            if culprit is not None:
                self._nonce_conflict(culprit, exc)
                rest = [r for r in rows if r.id != culprit.id]
                if rest:
                    self._send_rows(rest)
                return
        except InvalidTransaction as exc:
            if len(rows) == 1:
                row = rows[0]
                if self.client.nonce(self._key(row.sender).public_key.to_checksum_address()) < row.nonce:
                    # a lower nonce is not on chain yet (a gap): not this transaction's fault
                    self._back_off(row.sender, "sent", exc.message, ids=[row.id])
                else:
                    self._fail(row, f"the node refused the stored transaction: {exc.message}")
                return
        for row in rows:  # which one? offer them one by one
            self._send_rows([row])

    def _nonce_conflict(self, row: Any, exc: NonceConflict) -> None:
        if self.client.receipt(row.tx_hash) is not None:
            return  # ours is on chain after all: the receipt step settles it
        with UnitOfWork(self.engine) as uow:
            # the nonce went to another transaction: ours can never be included; sign afresh
            uow.c.execute(update(chain_outbox).where(chain_outbox.c.id == row.id, chain_outbox.c.status == "sent",
                                                     chain_outbox.c.tx_hash == row.tx_hash)
                          .values(status="pending", nonce=None, tx_hash=None, raw_tx=None, block_number=None,
                                  error=exc.reason, next_attempt_at=self._clock(), updated=self._clock()))
            uow.commit()
        log.warning("chain outbox row %s is re-signed: %s", row.id, exc.reason)

    def _fail(self, row: Any, reason: str) -> None:
        """A stored transaction the node refuses for good (not a nonce question): failed; its
        nonce, never used on chain, is released for the next row."""
        with UnitOfWork(self.engine) as uow:
            uow.c.execute(update(chain_outbox).where(chain_outbox.c.id == row.id, chain_outbox.c.status == "sent")
                          .values(status="failed", error=reason, nonce=None, updated=self._clock()))
            uow.commit()

    def _receipts(self, sender: str, just_sent: set[int], now: int) -> int:
        """Settle the sender's sent rows from their receipts; rows offered this round without a
        receipt yet are not offered again before ``resend_after`` (one transaction for both)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(chain_outbox.c.id, chain_outbox.c.tx_hash, chain_outbox.c.block_number)
                                .where(chain_outbox.c.sender == sender, chain_outbox.c.status == "sent")
                                .order_by(chain_outbox.c.nonce).limit(self.batch)).all()
        if not rows:
            return 0
        head = self.client.block_number()
        changes: list[tuple[int, dict[str, Any]]] = []
        for row in rows:
            receipt = self.client.receipt(row.tx_hash)
            if receipt is None:
                if row.block_number is not None:  # a reorg dropped it: offer the bytes again now
                    changes.append((row.id, {"block_number": None, "next_attempt_at": self._clock()}))
                elif row.id in just_sent:
                    changes.append((row.id, {"next_attempt_at": now + self.resend_after_us, "attempts": 0,
                                             "error": None}))
                continue
            if receipt.status == 0:
                changes.append((row.id, {"status": "failed", "block_number": receipt.block_number,
                                         "error": receipt.error or "reverted without a reason"}))
            elif head - receipt.block_number + 1 >= self.confirmations:
                changes.append((row.id, {"status": "done", "block_number": receipt.block_number, "error": None}))
            elif row.block_number != receipt.block_number:
                changes.append((row.id, {"block_number": receipt.block_number}))
            if row.id in just_sent and changes and changes[-1][0] == row.id:
                changes[-1][1]["attempts"] = 0
        if not changes:
            return 0
        settled = 0
        with UnitOfWork(self.engine) as uow:
            for row_id, values in changes:
                uow.c.execute(update(chain_outbox).where(chain_outbox.c.id == row_id, chain_outbox.c.status == "sent")
                              .values(updated=self._clock(), **values))
                settled += values.get("status") in ("done", "failed")
            uow.commit()
        return settled

    def _back_off(self, sender: str, status: str, reason: str, *, ids: list[int] | None = None) -> None:
        """Push the due rows' next attempt out (exponential in their attempts, with jitter)."""
        now = self._clock()
        try:
            with UnitOfWork(self.engine) as uow:
                c = uow.c
                rows = self._due(c, sender, status, now) if ids is None else c.execute(
                    select(chain_outbox.c.id, chain_outbox.c.attempts).where(chain_outbox.c.id.in_(ids))).all()
                for row in rows:
                    attempts = int(row.attempts) + 1
                    delay = self._backoff(attempts)
                    c.execute(update(chain_outbox).where(chain_outbox.c.id == row.id)
                              .values(attempts=attempts, next_attempt_at=now + int(delay * 1_000_000),
                                      error=f"waiting for the chain: {reason}", updated=now))
                uow.commit()
        except TeleledgerError:  # the database is unavailable too: the rows simply stay due
            pass

    # ------------------------------------------------------------------ status

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(chain_outbox.c.status, func.count()).group_by(chain_outbox.c.status)).all()
        counts = {status: 0 for status in ("pending", "sent", "done", "failed")}
        counts.update({status: int(n) for status, n in rows})
        return counts


def _describe(exc: BaseException) -> str:
    """An error's class (and our own message): driver messages carry SQL parameters."""
    if isinstance(exc, TeleledgerError):
        return f"{type(exc).__name__}: {exc.message}"
    return type(exc).__name__
