"""C2SP signed notes, tlog checkpoints and tlog cosignatures (Ed25519).

Specifications implemented, byte for byte compatible with golang.org/x/mod/sumdb/note and the
transparency-dev / sigsum ecosystem:

* https://c2sp.org/signed-note       — the note format, key IDs and verifier keys
* https://c2sp.org/tlog-checkpoint   — the checkpoint body a log signs
* https://c2sp.org/tlog-cosignature  — v1 timestamped Ed25519 witness cosignatures

This module is pure: it imports the standard library, ``cryptography`` and
``teleledger.core.errors`` only. It never reads a clock or a key file: keys, seeds and
timestamps are passed in.

Byte formats
------------

Signed note (UTF-8, no ASCII control character other than U+000A)::

    <text, ending in "\\n">            the signed message is exactly these bytes
    "\\n"                              one blank line (the *last* blank line of the note)
    "— " <key name> " " base64(key ID (4 bytes, big-endian) || signature) "\\n"   (1+ times)

``—`` is EM DASH U+2014 (bytes E2 80 94) followed by one space. Key names are non-empty and
contain neither Unicode spaces nor ``+``.

Key ID (uint32, big-endian)::

    key ID = SHA-256(key name || 0x0A || signature type || public key)[:4]
    signature type 0x01 = Ed25519 note signature, 0x04 = cosignature/v1 (Ed25519)

Key strings (as ``note.NewVerifier`` / ``note.NewSigner`` parse them; hex is 8 lowercase
digits)::

    verifier key  <name>+<hex key ID>+base64(type || 32-byte Ed25519 public key)
    signer key    PRIVATE+KEY+<name>+<hex key ID>+base64(type || 32-byte Ed25519 seed)

Checkpoint body (tlog-checkpoint), every line ending in "\\n"::

    <origin>                  non-empty
    <tree size>               ASCII decimal, no sign, no leading zero (except "0"), < 2**64
    base64(<32-byte root>)    standard base64 with padding, canonical
    <extension line>...       optional, each non-empty

Cosignature v1 (tlog-cosignature), a note signature line whose payload is::

    key ID (4) || timestamp (8 bytes, big-endian, POSIX seconds) || Ed25519 signature (64)

over the message ``"cosignature/v1\\ntime <timestamp in decimal>\\n" || checkpoint body``.

Errors
------

    TeleledgerError
    └── NoteError                  422  a note, key or signature that does not check out
        ├── MalformedNote          400  not a syntactically valid signed note (also InvalidInput)
        │   └── MalformedCheckpoint     the note text is not a valid checkpoint body
        ├── MalformedKey           400  a bad verifier/signer key string or key material
        ├── UnverifiedNote              no known key signed the note (unknown lines are kept)
        ├── InvalidSignature            a known key's signature does not verify
        ├── AmbiguousKey                two configured verifiers share a name and key ID
        ├── OriginMismatch              the checkpoint is for another log
        └── FutureCosignature           a cosignature timestamp later than the allowed time
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from teleledger.core.errors import InvalidInput, TeleledgerError

__all__ = [
    "COSIGNATURE_V1",
    "ED25519",
    "AmbiguousKey",
    "Checkpoint",
    "CosignatureVerifier",
    "Ed25519Signer",
    "Ed25519Verifier",
    "FutureCosignature",
    "InvalidSignature",
    "MalformedCheckpoint",
    "MalformedKey",
    "MalformedNote",
    "NoteError",
    "NoteSignature",
    "OriginMismatch",
    "ParsedNote",
    "Signer",
    "UnverifiedNote",
    "Verifier",
    "append_signature_lines",
    "cosign",
    "cosignature_message",
    "is_valid_key_name",
    "key_id",
    "open_checkpoint",
    "open_note",
    "parse_note",
    "parse_verifier_key",
    "sign_note",
    "verify_cosignature",
]

#: Signature type bytes (c2sp.org/signed-note#signature-types).
ED25519 = 0x01
COSIGNATURE_V1 = 0x04

#: Go's note.Open refuses more; the spec requires accepting at least 16.
MAX_SIGNATURES = 100
_MAX_TIMESTAMP = 2**63 - 1
_MAX_TREE_SIZE = 2**64 - 1
_ROOT_SIZE = 32

_SIG_PREFIX = "— "  # U+2014 EM DASH, U+0020 SPACE
_PRIVATE_PREFIX = "PRIVATE+KEY+"
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


# --------------------------------------------------------------------------- errors


class NoteError(TeleledgerError):
    """A signed note, checkpoint, key or signature that does not check out."""

    status = 422
    issue_code = "processing"


class MalformedNote(NoteError, InvalidInput):
    status = 400
    issue_code = "invalid"


class MalformedCheckpoint(MalformedNote):
    pass


class MalformedKey(NoteError, InvalidInput):
    status = 400
    issue_code = "invalid"


class UnverifiedNote(NoteError):
    def __init__(self, signatures: Sequence[NoteSignature]) -> None:
        names = ", ".join(f"{s.name}+{s.key_id:08x}" for s in signatures) or "none"
        super().__init__(f"note has no signature from a known key (signed by: {names})")
        #: The well-formed signature lines from unknown keys, kept for the caller.
        self.signatures = list(signatures)


class InvalidSignature(NoteError):
    def __init__(self, name: str, key_id: int) -> None:
        super().__init__(f"invalid signature for key {name}+{key_id:08x}")
        self.name = name
        self.key_id = key_id


class AmbiguousKey(NoteError):
    def __init__(self, name: str, key_id: int) -> None:
        super().__init__(f"more than one verifier configured for key {name}+{key_id:08x}")
        self.name = name
        self.key_id = key_id


class OriginMismatch(NoteError):
    def __init__(self, expected: str, found: str) -> None:
        super().__init__(f"checkpoint origin is {found!r}, expected {expected!r}")
        self.expected = expected
        self.found = found


class FutureCosignature(NoteError):
    def __init__(self, timestamp: int, not_after: int) -> None:
        super().__init__(f"cosignature time {timestamp} is later than {not_after}")
        self.timestamp = timestamp
        self.not_after = not_after


# --------------------------------------------------------------------------- keys


def is_valid_key_name(name: str) -> bool:
    """Non-empty, no Unicode space, no ``+`` (c2sp.org/signed-note#format)."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name) and (
        _CONTROL.search(name) is None
    )


def key_id(name: str, signature_type: int, public_key: bytes) -> int:
    """SHA-256(name || 0x0A || signature type || public key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([signature_type]) + public_key
    ).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    """Strict RFC 4648 §4 base64: alphabet and padding checked (binascii errors → ValueError)."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(str(exc)) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _raw_public(key: Ed25519PublicKey | bytes) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    raw = bytes(key)
    if len(raw) != 32:
        raise MalformedKey(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return raw


@runtime_checkable
class Verifier(Protocol):
    """Checks one key's signatures on note text (the message is the text's UTF-8 bytes)."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, message: bytes, signature: bytes) -> bool: ...


@runtime_checkable
class Signer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def sign(self, message: bytes) -> bytes: ...


class _Ed25519Key:
    """Shared by the note (0x01) and cosignature (0x04) verifiers: same key, other ID."""

    signature_type: int = ED25519
    __slots__ = ("_key", "_key_id", "_name", "_public")

    def __init__(self, name: str, public_key: Ed25519PublicKey | bytes) -> None:
        if not is_valid_key_name(name):
            raise MalformedKey(f"invalid key name {name!r}: non-empty, no spaces, no '+'")
        self._name = name
        self._public = _raw_public(public_key)
        try:
            self._key = Ed25519PublicKey.from_public_bytes(self._public)
        except ValueError as exc:
            raise MalformedKey(f"invalid Ed25519 public key: {exc}") from exc
        self._key_id = key_id(name, self.signature_type, self._public)

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public

    @property
    def vkey(self) -> str:
        """The verifier key string, as ``note.NewVerifier`` reads it."""
        material = _b64(bytes([self.signature_type]) + self._public)
        return f"{self._name}+{self._key_id:08x}+{material}"

    @classmethod
    def from_vkey(cls, vkey: str):  # noqa: ANN206 - returns the subclass it is called on
        verifier = parse_verifier_key(vkey)
        if not isinstance(verifier, cls):
            raise MalformedKey(
                f"verifier key {vkey!r} has signature type {verifier.signature_type:#04x}, "
                f"expected {cls.signature_type:#04x}"
            )
        return verifier

    def _ed25519_ok(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._key.verify(signature, message)
        except _CryptoInvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ed25519Key):
            return NotImplemented
        return (type(self), self._name, self._public) == (type(other), other._name, other._public)

    def __hash__(self) -> int:
        return hash((type(self), self._name, self._public))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vkey!r})"


class Ed25519Verifier(_Ed25519Key):
    """Verifies Ed25519 note signatures (signature type 0x01)."""

    signature_type = ED25519
    __slots__ = ()

    def verify(self, message: bytes, signature: bytes) -> bool:
        return self._ed25519_ok(message, signature)


class CosignatureVerifier(_Ed25519Key):
    """Verifies tlog-cosignature/v1 witness cosignatures (signature type 0x04).

    As a ``Verifier`` it takes the note text (a checkpoint body) and the signature payload
    after the key ID (timestamp || Ed25519 signature), so ``open_note`` accepts witnesses too.
    """

    signature_type = COSIGNATURE_V1
    __slots__ = ()

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 8 + 64:
            return False
        timestamp = int.from_bytes(signature[:8], "big")
        if timestamp > _MAX_TIMESTAMP:
            return False
        return self._ed25519_ok(_cosigned_bytes(message, timestamp), signature[8:])


def parse_verifier_key(vkey: str) -> Ed25519Verifier | CosignatureVerifier:
    """Parse ``<name>+<hex key ID>+base64(type || public key)``; type 0x01 or 0x04."""
    name, sep1, rest = vkey.partition("+")
    hex_id, sep2, material = rest.partition("+")
    if not (sep1 and sep2) or not is_valid_key_name(name) or not _HEX8.fullmatch(hex_id):
        raise MalformedKey(f"malformed verifier key {vkey!r}")
    try:
        raw = _b64decode(material)
    except ValueError as exc:
        raise MalformedKey(f"malformed verifier key {vkey!r}: {exc}") from exc
    if len(raw) != 33:
        raise MalformedKey(f"verifier key {vkey!r} does not hold a 32-byte Ed25519 key")
    cls: type[Ed25519Verifier] | type[CosignatureVerifier]
    if raw[0] == ED25519:
        cls = Ed25519Verifier
    elif raw[0] == COSIGNATURE_V1:
        cls = CosignatureVerifier
    else:
        raise MalformedKey(f"verifier key {vkey!r} has unsupported signature type {raw[0]:#04x}")
    verifier = cls(name, raw[1:])
    if verifier.key_id != int(hex_id, 16):
        raise MalformedKey(
            f"verifier key {vkey!r} names key ID {hex_id.lower()}, "
            f"its key material hashes to {verifier.key_id:08x}"
        )
    return verifier


class Ed25519Signer:
    """Signs note text with an Ed25519 key (signature type 0x01).

    The private key is injected; ``generate`` takes the randomness source explicitly.
    """

    __slots__ = ("_name", "_private", "_verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._verifier = Ed25519Verifier(name, private_key.public_key())
        self._name = name

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Ed25519Signer:
        if len(seed) != 32:
            raise MalformedKey(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(name, Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def generate(
        cls, name: str, *, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> Ed25519Signer:
        return cls.from_seed(name, random_bytes(32))

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519Signer:
        """Parse ``PRIVATE+KEY+<name>+<hex key ID>+base64(0x01 || seed)``."""
        if not skey.startswith(_PRIVATE_PREFIX):
            raise MalformedKey("malformed signer key: expected the PRIVATE+KEY+ prefix")
        name, sep1, rest = skey[len(_PRIVATE_PREFIX) :].partition("+")
        hex_id, sep2, material = rest.partition("+")
        if not (sep1 and sep2) or not is_valid_key_name(name) or not _HEX8.fullmatch(hex_id):
            raise MalformedKey("malformed signer key")
        try:
            raw = _b64decode(material)
        except ValueError as exc:
            raise MalformedKey(f"malformed signer key: {exc}") from exc
        if len(raw) != 33 or raw[0] != ED25519:
            raise MalformedKey("signer key does not hold a type 0x01 32-byte Ed25519 seed")
        signer = cls.from_seed(name, raw[1:])
        if signer.key_id != int(hex_id, 16):
            raise MalformedKey(
                f"signer key names key ID {hex_id.lower()}, "
                f"its public key hashes to {signer.key_id:08x}"
            )
        return signer

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._verifier.key_id

    @property
    def skey(self) -> str:
        """The signer key string; it holds the private seed, so treat it as a secret."""
        seed = self._private.private_bytes_raw()
        return f"{_PRIVATE_PREFIX}{self._name}+{self.key_id:08x}+{_b64(bytes([ED25519]) + seed)}"

    def verifier(self) -> Ed25519Verifier:
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:  # never print the seed
        return f"Ed25519Signer(name={self._name!r}, key_id={self.key_id:08x})"


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: key name, key ID and the signature bytes that follow the ID."""

    name: str
    key_id: int
    signature: bytes

    @property
    def line(self) -> str:
        """The signature line, ``"— <name> base64(key ID || signature)\\n"``."""
        payload = self.key_id.to_bytes(4, "big") + self.signature
        return f"{_SIG_PREFIX}{self.name} {_b64(payload)}\n"

    @property
    def timestamp(self) -> int:
        """The cosignature/v1 timestamp (only meaningful for type 0x04 signatures)."""
        if len(self.signature) != 8 + 64:
            raise MalformedNote(f"signature by {self.name} is not a cosignature/v1")
        return int.from_bytes(self.signature[:8], "big")


@dataclass(frozen=True, slots=True)
class ParsedNote:
    """A syntactically valid signed note; nothing in it is verified yet."""

    body: str
    signatures: tuple[NoteSignature, ...]


def _check_text(text: str, what: str) -> bytes:
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedNote(f"{what} is not valid UTF-8") from exc
    if _CONTROL.search(text):
        raise MalformedNote(f"{what} contains an ASCII control character other than newline")
    return encoded


def _check_body(body: str) -> bytes:
    if not body or not body.endswith("\n"):
        raise MalformedNote("note text must be non-empty and end with a newline")
    return _check_text(body, "note text")


def sign_note(body: str, signers: Sequence[Signer]) -> str:
    """Sign ``body`` with every signer: body, blank line, one signature line per signer."""
    message = _check_body(body)
    if not signers:
        raise ValueError("sign_note needs at least one signer")
    seen: set[tuple[str, int]] = set()
    lines = []
    for signer in signers:
        name, kid = signer.name, signer.key_id
        if not is_valid_key_name(name):
            raise MalformedKey(f"invalid signer name {name!r}")
        if (name, kid) in seen:
            raise ValueError(f"signer {name}+{kid:08x} given twice")
        seen.add((name, kid))
        lines.append(NoteSignature(name, kid, signer.sign(message)).line)
    return body + "\n" + "".join(lines)


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise MalformedNote(f"signature line does not start with an em dash and a space: {line!r}")
    name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not b64 or not is_valid_key_name(name):
        raise MalformedNote(f"malformed signature line {line!r}")
    try:
        payload = _b64decode(b64)
    except ValueError as exc:
        raise MalformedNote(f"signature line has invalid base64: {line!r}") from exc
    if len(payload) < 5:
        raise MalformedNote(f"signature line payload is too short: {line!r}")
    return NoteSignature(name, int.from_bytes(payload[:4], "big"), payload[4:])


def parse_note(text: str | bytes) -> ParsedNote:
    """Split a signed note into its text and signature lines, checking syntax only."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedNote("signed note is not valid UTF-8") from exc
    _check_text(text, "signed note")
    split = text.rfind("\n\n")
    if split < 0:
        raise MalformedNote("signed note has no blank line before its signatures")
    body, block = text[: split + 1], text[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNote("signed note must end with a newline-terminated signature line")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"signed note has {len(lines)} signatures, the limit is {MAX_SIGNATURES}")
    return ParsedNote(body, tuple(_parse_signature_line(line) for line in lines))


def _index(verifiers: Iterable[Verifier]) -> dict[tuple[str, int], list[Verifier]]:
    known: dict[tuple[str, int], list[Verifier]] = {}
    for verifier in verifiers:
        bucket = known.setdefault((verifier.name, verifier.key_id), [])
        if verifier not in bucket:
            bucket.append(verifier)
    return known


def open_note(
    text: str | bytes, verifiers: Iterable[Verifier]
) -> tuple[str, list[NoteSignature]]:
    """Verify a signed note; return its text and the signatures of known keys that verified.

    Follows c2sp.org/signed-note and Go's ``note.Open``: lines from unknown keys are ignored
    (they stay in ``parse_note(text).signatures``); a known key's signature that fails rejects
    the whole note (``InvalidSignature``); a repeated line by the same key is skipped; no
    verified signature at all is ``UnverifiedNote``.
    """
    parsed = parse_note(text)
    message = parsed.body.encode("utf-8")
    known = _index(verifiers)
    verified: list[NoteSignature] = []
    unknown: list[NoteSignature] = []
    seen: set[tuple[str, int]] = set()
    for sig in parsed.signatures:
        key = (sig.name, sig.key_id)
        candidates = known.get(key)
        if not candidates:
            if sig not in unknown:
                unknown.append(sig)
            continue
        if len(candidates) > 1:
            raise AmbiguousKey(sig.name, sig.key_id)
        if key in seen:
            continue
        seen.add(key)
        if not candidates[0].verify(message, sig.signature):
            raise InvalidSignature(sig.name, sig.key_id)
        verified.append(sig)
    if not verified:
        raise UnverifiedNote(unknown)
    return parsed.body, verified


def append_signature_lines(signed_note: str, lines: Iterable[str]) -> str:
    """Add signature lines (e.g. witness cosignatures) to a signed note, skipping lines it
    already has. The note's existing signatures are kept as they are."""
    parsed = parse_note(signed_note)
    present = {sig.line for sig in parsed.signatures}
    out = signed_note
    for line in lines:
        if not line.endswith("\n"):
            line += "\n"
        sig = _parse_signature_line(line[:-1])
        if sig.line not in present:
            present.add(sig.line)
            out += sig.line
    parse_note(out)  # enforce the signature-count limit on the result
    return out


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tlog-checkpoint body: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or _CONTROL.search(self.origin):
            raise MalformedCheckpoint(f"invalid checkpoint origin {self.origin!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise MalformedCheckpoint(f"checkpoint size must be an int, got {self.size!r}")
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise MalformedCheckpoint(f"checkpoint size {self.size} is outside 0..2**64-1")
        if len(self.root_hash) != _ROOT_SIZE:
            raise MalformedCheckpoint(
                f"checkpoint root hash is {len(self.root_hash)} bytes, expected {_ROOT_SIZE}"
            )
        object.__setattr__(self, "root_hash", bytes(self.root_hash))
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for line in self.extensions:
            if not line or "\n" in line or _CONTROL.search(line):
                raise MalformedCheckpoint(f"invalid checkpoint extension line {line!r}")

    def to_body(self) -> str:
        lines = [self.origin, str(self.size), _b64(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, body: str | bytes) -> Checkpoint:
        """Strictly parse a checkpoint body (the note text, final newline included)."""
        if isinstance(body, bytes | bytearray):
            try:
                body = bytes(body).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedCheckpoint("checkpoint is not valid UTF-8") from exc
        if not body.endswith("\n"):
            raise MalformedCheckpoint("checkpoint body must end with a newline")
        if _CONTROL.search(body):
            raise MalformedCheckpoint("checkpoint contains an ASCII control character")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpoint(
                f"checkpoint has {len(lines)} lines, needs origin, size and root hash"
            )
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise MalformedCheckpoint(f"checkpoint size {size_text!r} is not a canonical decimal")
        try:
            root = _b64decode(root_text)
        except ValueError as exc:
            raise MalformedCheckpoint(f"checkpoint root hash {root_text!r} is not base64") from exc
        if len(root) == _ROOT_SIZE and _b64(root) != root_text:
            raise MalformedCheckpoint(f"checkpoint root hash {root_text!r} is not canonical base64")
        return cls(origin, int(size_text), root, tuple(extensions))


def open_checkpoint(
    text: str | bytes, verifiers: Iterable[Verifier], *, origin: str | None = None
) -> tuple[Checkpoint, list[NoteSignature]]:
    """``open_note`` then ``Checkpoint.parse``; with ``origin``, also insist on that log."""
    body, signatures = open_note(text, verifiers)
    checkpoint = Checkpoint.parse(body)
    if origin is not None and checkpoint.origin != origin:
        raise OriginMismatch(origin, checkpoint.origin)
    return checkpoint, signatures


# --------------------------------------------------------------------------- cosignatures


def _cosigned_bytes(body: bytes, timestamp: int) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def cosignature_message(checkpoint_body: str, timestamp: int) -> bytes:
    """The bytes a cosignature/v1 signs: two header lines, then the checkpoint body."""
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError(f"cosignature timestamp {timestamp} is outside 0..2**63-1")
    return _cosigned_bytes(_check_body(checkpoint_body), timestamp)


def cosign(
    checkpoint_body: str, witness_key: Ed25519PrivateKey, name: str, timestamp: int
) -> str:
    """Cosign a checkpoint body as witness ``name`` at POSIX time ``timestamp``; return the
    signature line to append to the checkpoint note."""
    Checkpoint.parse(checkpoint_body)  # witnesses cosign checkpoints, nothing else
    verifier = CosignatureVerifier(name, witness_key.public_key())
    signature = witness_key.sign(cosignature_message(checkpoint_body, timestamp))
    return NoteSignature(name, verifier.key_id, timestamp.to_bytes(8, "big") + signature).line


def verify_cosignature(
    checkpoint_body: str,
    signature_line: str,
    witness: CosignatureVerifier,
    *,
    not_after: int | None = None,
) -> int:
    """Verify one cosignature line over ``checkpoint_body``; return its timestamp.

    ``not_after`` (POSIX seconds, from the caller's clock) rejects cosignatures from the future.
    """
    sig = _parse_signature_line(signature_line.removesuffix("\n"))
    if (sig.name, sig.key_id) != (witness.name, witness.key_id):
        raise UnverifiedNote([sig])  # another key's line: not this witness's statement
    if not witness.verify(_check_body(checkpoint_body), sig.signature):
        raise InvalidSignature(sig.name, sig.key_id)
    timestamp = sig.timestamp
    if not_after is not None and timestamp > not_after:
        raise FutureCosignature(timestamp, not_after)
    return timestamp
