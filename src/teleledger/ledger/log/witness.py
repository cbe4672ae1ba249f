"""A C2SP tlog witness: follow one log's checkpoints, countersign only what extends what it saw.

A witness promises one thing: it never cosigns two checkpoints of one log that are not
consistent with each other. So before cosigning (c2sp.org/tlog-cosignature, v1) it

1. opens the checkpoint with the log's verifier key (c2sp.org/signed-note), for the log's
   origin (c2sp.org/tlog-checkpoint);
2. refuses a tree smaller than the last one it verified for that origin (a log never shrinks);
3. checks an RFC 9162 §2.1.4 consistency proof from the last verified tree to the new one;
   the same size with another root is a fork too;
4. records the new (size, root) *before* handing out the cosignature line.

The first checkpoint seen for an origin is trusted as it is (there is nothing to be consistent
with yet): whoever runs a witness should start it before, or from a known-good point of, the
log's history.

This module does no network I/O and reads no clock or key file: the log's checkpoint, the proof
fetcher, the witness key and the clock are injected. Its one side effect is the state file,
replaced atomically (write a temporary file, fsync, rename, fsync the directory), so a crash
leaves either the old state or the new one, never a torn file. It must never reset or guess
state it cannot read: a witness that forgets what it saw would cosign a fork.

State file (UTF-8 JSON)::

    {"version": 1,
     "logs": {"<origin>": {"size": <tree size>, "root": "<base64 of the 32-byte root>"}}}

Errors
------

    TeleledgerError
    └── WitnessError
        ├── WitnessRefusal             the checkpoint is not cosigned; the message says why
        │   ├── BadCheckpoint          bad or missing log signature, malformed, other origin
        │   ├── LogShrank              the tree is smaller than one already verified
        │   └── ForkDetected           not consistent with the tree already verified
        └── WitnessStateError          the state file cannot be read or written
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from teleledger.core.errors import TeleledgerError
from teleledger.ledger.log import merkle
from teleledger.ledger.log.note import (
    Checkpoint,
    CosignatureVerifier,
    Ed25519Verifier,
    InvalidSignature,
    MalformedNote,
    NoteError,
    OriginMismatch,
    UnverifiedNote,
    cosign,
    open_checkpoint,
)

__all__ = [
    "BadCheckpoint",
    "ConsistencyProofFetcher",
    "ForkDetected",
    "LogShrank",
    "TreeHead",
    "Witness",
    "WitnessError",
    "WitnessRefusal",
    "WitnessState",
    "WitnessStateError",
]

_STATE_VERSION = 1

#: ``fetch(first, second)`` → the log's consistency proof between those tree sizes.
ConsistencyProofFetcher = Callable[[int, int], Sequence[bytes]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- errors


class WitnessError(TeleledgerError):
    """Something kept the witness from cosigning."""

    status = 422
    issue_code = "processing"


class WitnessRefusal(WitnessError):
    """The witness will not cosign this checkpoint; the message says why."""


class BadCheckpoint(WitnessRefusal):
    pass


class LogShrank(WitnessRefusal):
    def __init__(self, origin: str, seen: int, found: int) -> None:
        super().__init__(f"log {origin} shrank from {seen} to {found}: a checkpoint of size "
                         f"{seen} was already verified")
        self.origin = origin
        self.seen = seen
        self.found = found


class ForkDetected(WitnessRefusal):
    def __init__(self, origin: str, seen: TreeHead, found: TreeHead, reason: str) -> None:
        super().__init__(
            f"fork detected: log {origin} checkpoint of size {found.size} with root "
            f"{_b64(found.root_hash)} is not consistent with size {seen.size} with root "
            f"{_b64(seen.root_hash)} verified before ({reason})"
        )
        self.origin = origin
        self.seen = seen
        self.found = found


class WitnessStateError(WitnessError):
    status = 500
    issue_code = "exception"


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class TreeHead:
    """The last verified tree of one log."""

    size: int
    root_hash: bytes


class WitnessState:
    """The last verified tree head per log origin, in one small JSON file.

    Every ``record`` rewrites the whole file atomically. One witness process per state file:
    two processes sharing one would each keep their own view between reads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, TreeHead]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise WitnessStateError(f"cannot read witness state {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
            if data.get("version") != _STATE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            heads = {}
            for origin, head in data["logs"].items():
                root = base64.b64decode(head["root"], validate=True)
                size = head["size"]
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise ValueError(f"size {size!r} for {origin}")
                if len(root) != merkle.HASH_SIZE:
                    raise ValueError(f"root of {len(root)} bytes for {origin}")
                heads[origin] = TreeHead(size, root)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise WitnessStateError(
                f"witness state {self.path} is unreadable ({exc}); refusing to forget what was "
                "verified: repair it, or remove it to trust the logs anew"
            ) from exc
        return heads

    def last(self, origin: str) -> TreeHead | None:
        """The last tree head verified for ``origin``, or None for a log never seen."""
        return self._load().get(origin)

    def record(self, origin: str, head: TreeHead) -> None:
        heads = self._load()
        heads[origin] = head
        data = {"version": _STATE_VERSION,
                "logs": {o: {"size": h.size, "root": _b64(h.root_hash)}
                         for o, h in sorted(heads.items())}}
        encoded = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(encoded)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise WitnessStateError(f"cannot write witness state {self.path}: {exc}") from exc


# --------------------------------------------------------------------------- the witness


class Witness:
    """Cosigns one log's checkpoints as witness ``name``.

    ``signer_key`` is the witness's Ed25519 key; ``log_vkey`` the log's verifier key string
    (``<name>+<hex key ID>+base64(0x01 || public key)``); ``origin`` the log's checkpoint
    origin (default: the log key's name, as C2SP recommends and teleledger nodes do);
    ``clock`` returns POSIX seconds, for the cosignature timestamp.
    """

    def __init__(
        self,
        name: str,
        signer_key: Ed25519PrivateKey,
        log_vkey: str,
        state_path: Path,
        clock: Callable[[], float] = time.time,
        *,
        origin: str | None = None,
    ) -> None:
        self.verifier = CosignatureVerifier(name, signer_key.public_key())
        self._key = signer_key
        self.log_verifier = Ed25519Verifier.from_vkey(log_vkey)
        self.origin = origin if origin is not None else self.log_verifier.name
        self.state = WitnessState(state_path)
        self._clock = clock

    @property
    def name(self) -> str:
        return self.verifier.name

    @property
    def vkey(self) -> str:
        """The cosignature verifier key a log operator adds to ``TELELEDGER_WITNESS_KEYS``."""
        return self.verifier.vkey

    def open(self, note_text: str | bytes) -> Checkpoint:
        """Open the checkpoint with the log's key, for the log's origin, or refuse it."""
        try:
            checkpoint, _ = open_checkpoint(note_text, [self.log_verifier], origin=self.origin)
        except (InvalidSignature, UnverifiedNote) as exc:
            raise BadCheckpoint(f"bad signature: checkpoint is not signed by the log key "
                                f"{self.log_verifier.vkey} ({exc})") from exc
        except OriginMismatch as exc:
            raise BadCheckpoint(f"wrong log: {exc}") from exc
        except MalformedNote as exc:
            raise BadCheckpoint(f"malformed checkpoint: {exc}") from exc
        except NoteError as exc:
            raise BadCheckpoint(f"bad checkpoint: {exc}") from exc
        return checkpoint

    def observe(self, note_text: str | bytes, fetch_proof: ConsistencyProofFetcher) -> str:
        """Verify a checkpoint note of the log and return this witness's cosignature line for it.

        Raises ``BadCheckpoint``, ``LogShrank`` or ``ForkDetected`` (all ``WitnessRefusal``)
        and records nothing then. ``fetch_proof(first, second)`` is only called when the tree
        grew from a size above zero; whatever it raises propagates.
        """
        checkpoint = self.open(note_text)
        found = TreeHead(checkpoint.size, checkpoint.root_hash)
        seen = self.state.last(checkpoint.origin)
        if seen is not None:
            if found.size < seen.size:
                raise LogShrank(checkpoint.origin, seen.size, found.size)
            if found.size == seen.size:
                if found.root_hash != seen.root_hash:
                    raise ForkDetected(checkpoint.origin, seen, found,
                                       "same size, different root")
            else:
                proof = [] if seen.size == 0 else list(fetch_proof(seen.size, found.size))
                try:
                    merkle.verify_consistency(seen.size, found.size, seen.root_hash,
                                              found.root_hash, proof)
                except merkle.ProofError as exc:
                    raise ForkDetected(checkpoint.origin, seen, found, str(exc)) from exc
        line = cosign(checkpoint.to_body(), self._key, self.name, int(self._clock()))
        if seen != found:
            self.state.record(checkpoint.origin, found)
        return line
