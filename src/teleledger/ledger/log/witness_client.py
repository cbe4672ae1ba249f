"""The witness's HTTP side: fetch a teleledger node's checkpoint and proofs, post cosignatures.

One round (``witness_once``)::

    GET  {log}/ledger/checkpoint                              signed note (text/plain)
    GET  {log}/ledger/proof/consistency?first=M&second=N      {"consistency": [base64, ...]}
         (only when the tree grew from a size M > 0 this witness verified)
    POST {log}/ledger/cosignature?size=N                      one cosignature line (text/plain)

``follow`` repeats rounds every ``interval`` seconds. Transport errors and 5xx answers are
retried a bounded number of times with exponential backoff; a 4xx answer is not retried. The
verification itself — and every refusal — is ``Witness.observe``'s; nothing here decides
whether a checkpoint is good.

Errors (beside ``WitnessRefusal`` from ``witness``)::

    TeleledgerError
    └── WitnessError
        └── LogUnreachable         the log did not answer, or answered with an error
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from teleledger.ledger.log.note import Checkpoint, parse_note
from teleledger.ledger.log.witness import Witness, WitnessError, WitnessRefusal

__all__ = ["Cosigned", "LogUnreachable", "follow", "witness_once"]

USER_AGENT = "teleledger-witness"


class LogUnreachable(WitnessError):
    status = 502
    issue_code = "transient"


@dataclass(frozen=True, slots=True)
class Cosigned:
    """One round's outcome: the checkpoint size cosigned and what the log did with the line."""

    size: int
    line: str
    #: "stored" (201), "already stored" (200) or "unchanged" (the note already carried our line)
    outcome: str


def _detail(response: httpx.Response) -> str:
    """The OperationOutcome diagnostics of an error answer, or the start of its body."""
    try:
        issues = response.json().get("issue") or [{}]
        text = issues[0].get("diagnostics") or issues[0].get("details", {}).get("text")
    except (ValueError, AttributeError, TypeError):
        text = None
    return text or response.text[:200].strip() or response.reason_phrase


class _Log:
    def __init__(self, base: str, client: httpx.Client, *, retries: int,
                 backoff: float, sleep: Callable[[float], None]) -> None:
        self.base = base.rstrip("/")
        self._client = client
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        url = f"{self.base}{path}"
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = self._client.request(method, url, **kwargs)  # type: ignore[arg-type]
            except httpx.HTTPError as exc:
                if last:
                    raise LogUnreachable(f"{method} {url} failed after {attempt + 1} attempts: "
                                         f"{type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500 or last:
                    raise LogUnreachable(f"{method} {url} answered {response.status_code}: "
                                         f"{_detail(response)}")
            self._sleep(self._backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def checkpoint(self) -> str:
        return self.request("GET", "/ledger/checkpoint").text

    def consistency(self, first: int, second: int) -> list[bytes]:
        response = self.request("GET", "/ledger/proof/consistency",
                                params={"first": first, "second": second})
        try:
            return [base64.b64decode(h, validate=True) for h in response.json()["consistency"]]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            # a log that cannot produce a proof is refused like one whose proof fails
            raise WitnessRefusal(f"the log's consistency proof from {first} to {second} is "
                                 f"malformed: {exc}") from exc

    def post_cosignature(self, size: int, line: str) -> int:
        response = self.request("POST", "/ledger/cosignature", params={"size": size},
                                content=line.encode("utf-8"),
                                headers={"Content-Type": "text/plain; charset=utf-8"})
        return response.status_code


def _already_cosigned(note: str, witness: Witness) -> bool:
    ours = (witness.verifier.name, witness.verifier.key_id)
    return any((s.name, s.key_id) == ours for s in parse_note(note).signatures)


def witness_once(log: _Log, witness: Witness) -> Cosigned:
    note = log.checkpoint()
    line = witness.observe(note, log.consistency)
    size = Checkpoint.parse(parse_note(note).body).size
    if _already_cosigned(note, witness):
        return Cosigned(size, line, "unchanged")
    status = log.post_cosignature(size, line)
    return Cosigned(size, line, "stored" if status == 201 else "already stored")


def follow(
    log_url: str,
    witness: Witness,
    *,
    once: bool = False,
    interval: float = 5.0,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 10.0,
    report: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
    client: httpx.Client | None = None,
) -> Cosigned | None:
    """Witness the log at ``log_url``.

    With ``once``: one round; returns its ``Cosigned`` and raises ``WitnessRefusal`` or
    ``LogUnreachable``. Without: a round every ``interval`` seconds (``rounds`` of them, or
    forever); refusals and unreachable logs are reported through ``report`` and the witness
    keeps following — a forked log stays refused, because the state is not moved by a refusal.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    own = client is None
    http = client or httpx.Client(timeout=timeout, headers={"User-Agent": USER_AGENT})
    log = _Log(log_url, http, retries=retries, backoff=backoff, sleep=sleep)
    try:
        if once:
            return witness_once(log, witness)
        done = 0
        last_message = None
        while rounds is None or done < rounds:
            try:
                result = witness_once(log, witness)
            except WitnessError as exc:
                kind = "refused" if isinstance(exc, WitnessRefusal) else "error"
                message = f"{kind}: {exc.message}"
            else:
                message = f"cosigned {log.base} checkpoint of size {result.size}"
                if result.outcome != "unchanged":
                    message += f" ({result.outcome})"
            if message != last_message:  # a log that stays forked or idle is reported once
                report(message)
                last_message = message
            done += 1
            if rounds is None or done < rounds:
                sleep(interval)
        return None
    finally:
        if own:
            http.close()
