"""What the transparency log records: the byte formats of its two entry kinds.

Every leaf of the log is one entry in the format below; the Merkle tree hashes exactly these
bytes (leaf hash = SHA-256(0x00 || entry), see ``merkle``). An entry never holds PHI: only
server-assigned random ids, pseudonymous account ids, codes, and keyed hashes (HMAC-SHA-256
under the node's *log key*, a key derived from the master key for this purpose alone). The
encoder refuses free text: every string field is restricted to the character set of the
identifier or code it carries, so a name or a note cannot slip in by mistake.

Format version 0x01
-------------------

All integers are unsigned and big-endian. ``str16`` is a 2-byte length n followed by n bytes
of UTF-8; ``bytes8`` is a 1-byte length n followed by n bytes.

Header (both kinds):

    ======  =======  ==========================================================
    offset  size     field
    ======  =======  ==========================================================
    0       1        format version, 0x01
    1       1        kind: 0x01 change, 0x02 access
    2       8        timestamp: microseconds since 1970-01-01T00:00:00Z (< 2**63)
    ======  =======  ==========================================================

Change (kind 0x01) — one per resource version written, in the transaction that writes it:

    ===============  ======  ==============================================================
    field            size    value
    ===============  ======  ==============================================================
    method           1       0x01 create, 0x02 update, 0x03 delete
    resource type    str16   FHIR type name, ``[A-Z][A-Za-z]{0,63}``
    resource id      str16   FHIR id, ``[A-Za-z0-9.-]{1,64}``
    version          4       version number, >= 1
    content_hmac     bytes8  32 bytes: HMAC-SHA-256(log key, canonical_json(resource version));
                             0 bytes for a delete (and only for a delete)
    ===============  ======  ==============================================================

``canonical_json`` is what is hashed: the resource version exactly as stored (with its
``meta.versionId`` and ``meta.lastUpdated``), serialized as
``json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False).encode("utf-8")`` — keys sorted, no insignificant whitespace, UTF-8. Anyone
holding the log key and the resource can recompute it; nobody else learns anything from it.

Access (kind 0x02) — one per access decision (allowed or denied):

    =================  ======  ============================================================
    field              size    value
    =================  ======  ============================================================
    actor              str16   pseudonymous account id (token characters, 1..128)
    role               str16   role of the actor (token characters, 1..128)
    action             1       0x01 read, 0x02 vread, 0x03 search, 0x04 history,
                               0x05 everything, 0x06 import, 0x07 export, 0x08 create,
                               0x09 update, 0x0a delete, 0x0b ui
    purpose of use     str16   HL7 v3 ActReason code, ``[A-Z][A-Z0-9_-]{0,63}`` (TREAT, BTG…)
    outcome            1       0x01 allowed, 0x02 denied
    reason             str16   reason code of the decision (token characters, may be empty)
    patient pseudonym  bytes8  32 bytes: HMAC-SHA-256(log key, "Patient/" || patient id);
                               0 bytes when the access concerns no single patient
    reference count    4       number of references that follow
    references         str16*  ``Type/id/_history/version`` of every resource disclosed
    =================  ======  ============================================================

Token characters are ``[A-Za-z0-9]`` first, then ``[A-Za-z0-9._:@/-]``. The patient
pseudonym's message starts with ``Patient/`` and a canonical JSON object with ``{``, so the two
keyed hashes never collide.

Decoding is strict: an unknown version or kind, an unknown code, a field out of its range or
character set, a truncated field or trailing bytes are all ``MalformedEntry`` (an
``InvalidInput``), so every accepted entry re-encodes to exactly the same bytes.

This module is pure (standard library and ``teleledger.core.errors`` only). It must never be
handed a patient's name, birth date, identifier or any free text.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from teleledger.core.errors import InvalidInput

__all__ = [
    "ACCESS",
    "ACTIONS",
    "CHANGE",
    "FORMAT_VERSION",
    "METHODS",
    "OUTCOMES",
    "AccessEntry",
    "ChangeEntry",
    "MalformedEntry",
    "canonical_json",
    "content_hmac",
    "decode",
    "encode_access",
    "encode_change",
    "patient_pseudonym",
    "version_reference",
]

FORMAT_VERSION = 0x01
CHANGE = 0x01
ACCESS = 0x02
HMAC_SIZE = 32

Method = Literal["create", "update", "delete"]
Action = Literal[
    "read", "vread", "search", "history", "everything", "import", "export",
    "create", "update", "delete", "ui",
]
Outcome = Literal["allowed", "denied"]

METHODS: dict[str, int] = {"create": 0x01, "update": 0x02, "delete": 0x03}
ACTIONS: dict[str, int] = {
    "read": 0x01, "vread": 0x02, "search": 0x03, "history": 0x04, "everything": 0x05,
    "import": 0x06, "export": 0x07, "create": 0x08, "update": 0x09, "delete": 0x0A, "ui": 0x0B,
}
OUTCOMES: dict[str, int] = {"allowed": 0x01, "denied": 0x02}
_METHOD_NAMES = {v: k for k, v in METHODS.items()}
_ACTION_NAMES = {v: k for k, v in ACTIONS.items()}
_OUTCOME_NAMES = {v: k for k, v in OUTCOMES.items()}

_MAX_TIMESTAMP = 2**63 - 1
_MAX_VERSION = 2**32 - 1
_MAX_REFERENCES = 2**32 - 1

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_RESOURCE_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}")
_PURPOSE = re.compile(r"[A-Z][A-Z0-9_\-]{0,63}")
_REFERENCE = re.compile(r"([A-Z][A-Za-z]{0,63})/([A-Za-z0-9.\-]{1,64})/_history/([1-9][0-9]{0,9})")

_HEADER = struct.Struct(">BBQ")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class MalformedEntry(InvalidInput):
    """Bytes that are not a valid log entry, or values that cannot be encoded as one."""


class _Mac(Protocol):
    """Anything that computes HMAC-SHA-256 under the log key (``core.crypto.KeyedHash``)."""

    def raw(self, data: bytes) -> bytes: ...


# --------------------------------------------------------------------------- hashing helpers


def canonical_json(resource: Mapping[str, Any]) -> bytes:
    """The bytes ``content_hmac`` covers: sorted keys, no whitespace, UTF-8 (see module doc)."""
    try:
        text = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # NaN/Infinity, non-JSON values, lone surrogates
        raise MalformedEntry(f"resource cannot be canonicalized as JSON: {exc}") from exc


def content_hmac(log_key: _Mac, resource: Mapping[str, Any]) -> bytes:
    """HMAC-SHA-256(log key, canonical_json(resource)) for a change entry."""
    return log_key.raw(canonical_json(resource))


def patient_pseudonym(log_key: _Mac, patient_id: str) -> bytes:
    """HMAC-SHA-256(log key, "Patient/" || patient id) for an access entry."""
    if not _RESOURCE_ID.fullmatch(patient_id):
        raise MalformedEntry(f"patient id {patient_id!r} is not a FHIR id")
    return log_key.raw(b"Patient/" + patient_id.encode("ascii"))


def version_reference(resource_type: str, resource_id: str, version: int) -> str:
    """``Type/id/_history/version``, the form access entries list disclosed resources in."""
    ref = f"{resource_type}/{resource_id}/_history/{version}"
    _check_reference(ref)
    return ref


# --------------------------------------------------------------------------- entries


def _check_timestamp(ts: int) -> None:
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= _MAX_TIMESTAMP:
        raise MalformedEntry(f"timestamp must be microseconds in 0..2**63-1, got {ts!r}")


def _check(pattern: re.Pattern[str], value: object, what: str, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str):
        raise MalformedEntry(f"{what} must be a string, got {type(value).__name__}")
    if empty_ok and value == "":
        return
    if not pattern.fullmatch(value):
        raise MalformedEntry(f"{what} {value!r} does not match {pattern.pattern}")


def _check_reference(ref: object) -> None:
    _check(_REFERENCE, ref, "reference")
    assert isinstance(ref, str)
    if int(ref.rsplit("/", 1)[1]) > _MAX_VERSION:
        raise MalformedEntry(f"reference {ref!r} has a version above 2**32-1")


def _check_hmac(value: object, what: str, *, present: bool) -> None:
    if not isinstance(value, bytes | bytearray):
        raise MalformedEntry(f"{what} must be bytes, got {type(value).__name__}")
    expected = HMAC_SIZE if present else 0
    if len(value) != expected:
        raise MalformedEntry(f"{what} is {len(value)} bytes, expected {expected}")


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """A resource version was written (created, updated or deleted)."""

    timestamp_us: int
    method: Method
    resource_type: str
    resource_id: str
    version: int
    content_hmac: bytes

    def __post_init__(self) -> None:
        _check_timestamp(self.timestamp_us)
        if self.method not in METHODS:
            raise MalformedEntry(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        _check(_RESOURCE_TYPE, self.resource_type, "resource type")
        _check(_RESOURCE_ID, self.resource_id, "resource id")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or not (
            1 <= self.version <= _MAX_VERSION
        ):
            raise MalformedEntry(f"version must be in 1..2**32-1, got {self.version!r}")
        _check_hmac(self.content_hmac, "content_hmac", present=self.method != "delete")
        object.__setattr__(self, "content_hmac", bytes(self.content_hmac))

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.resource_id}/_history/{self.version}"

    def encode(self) -> bytes:
        out = bytearray(_HEADER.pack(FORMAT_VERSION, CHANGE, self.timestamp_us))
        out += _U8.pack(METHODS[self.method])
        _put_str(out, self.resource_type)
        _put_str(out, self.resource_id)
        out += _U32.pack(self.version)
        out += _U8.pack(len(self.content_hmac)) + self.content_hmac
        return bytes(out)


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """Someone asked to see or change data; the decision and what was disclosed."""

    timestamp_us: int
    actor: str
    role: str
    action: Action
    purpose: str
    outcome: Outcome
    reason: str
    patient_pseudonym: bytes
    references: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_timestamp(self.timestamp_us)
        _check(_TOKEN, self.actor, "actor")
        _check(_TOKEN, self.role, "role")
        if self.action not in ACTIONS:
            raise MalformedEntry(f"action must be one of {sorted(ACTIONS)}, got {self.action!r}")
        _check(_PURPOSE, self.purpose, "purpose of use")
        if self.outcome not in OUTCOMES:
            raise MalformedEntry(f"outcome must be one of {sorted(OUTCOMES)}, got {self.outcome!r}")
        _check(_TOKEN, self.reason, "reason", empty_ok=True)
        if not isinstance(self.patient_pseudonym, bytes | bytearray):
            raise MalformedEntry("patient pseudonym must be bytes")
        _check_hmac(self.patient_pseudonym, "patient pseudonym",
                    present=len(self.patient_pseudonym) != 0)
        object.__setattr__(self, "patient_pseudonym", bytes(self.patient_pseudonym))
        if isinstance(self.references, str):
            raise MalformedEntry("references must be a sequence of strings, not one string")
        refs = tuple(self.references)
        if len(refs) > _MAX_REFERENCES:
            raise MalformedEntry(f"{len(refs)} references do not fit in one entry")
        for ref in refs:
            _check_reference(ref)
        object.__setattr__(self, "references", refs)

    def encode(self) -> bytes:
        out = bytearray(_HEADER.pack(FORMAT_VERSION, ACCESS, self.timestamp_us))
        _put_str(out, self.actor)
        _put_str(out, self.role)
        out += _U8.pack(ACTIONS[self.action])
        _put_str(out, self.purpose)
        out += _U8.pack(OUTCOMES[self.outcome])
        _put_str(out, self.reason)
        out += _U8.pack(len(self.patient_pseudonym)) + self.patient_pseudonym
        out += _U32.pack(len(self.references))
        for ref in self.references:
            _put_str(out, ref)
        return bytes(out)


def encode_change(
    *,
    timestamp_us: int,
    method: Method,
    resource_type: str,
    resource_id: str,
    version: int,
    content_hmac: bytes,
) -> bytes:
    """The leaf bytes of a change entry (layout in the module docstring)."""
    return ChangeEntry(timestamp_us, method, resource_type, resource_id, version,
                       content_hmac).encode()


def encode_access(
    *,
    timestamp_us: int,
    actor: str,
    role: str,
    action: Action,
    purpose: str,
    outcome: Outcome,
    reason: str = "",
    patient_pseudonym: bytes = b"",
    references: Iterable[str] = (),
) -> bytes:
    """The leaf bytes of an access entry (layout in the module docstring)."""
    if isinstance(references, str):
        raise MalformedEntry("references must be a sequence of strings, not one string")
    return AccessEntry(timestamp_us, actor, role, action, purpose, outcome, reason,
                       patient_pseudonym, tuple(references)).encode()


# --------------------------------------------------------------------------- decoding


def _put_str(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:  # unreachable through the field patterns; kept as the format's limit
        raise MalformedEntry(f"string field of {len(raw)} bytes exceeds 65535")
    out += _U16.pack(len(raw)) + raw


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise MalformedEntry(
                f"entry truncated in {what} at byte {self.pos}: "
                f"needs {n} bytes, {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def string(self, what: str) -> str:
        (n,) = _U16.unpack(self.take(2, f"length of {what}"))
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEntry(f"{what} at byte {self.pos - n} is not valid UTF-8") from exc

    def short_bytes(self, what: str) -> bytes:
        n = self.u8(f"length of {what}")
        return self.take(n, what)

    def code(self, names: dict[int, str], what: str) -> Any:
        at = self.pos
        value = self.u8(what)
        if value not in names:
            raise MalformedEntry(f"unknown {what} code {value:#04x} at byte {at}")
        return names[value]


def decode(data: bytes) -> ChangeEntry | AccessEntry:
    """Parse leaf bytes strictly; ``MalformedEntry`` for anything ``encode`` would not produce."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEntry(f"an entry is bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    version = r.u8("format version")
    if version != FORMAT_VERSION:
        raise MalformedEntry(f"unknown entry format version {version:#04x}, expected 0x01")
    kind = r.u8("kind")
    (timestamp,) = struct.unpack(">Q", r.take(8, "timestamp"))
    entry: ChangeEntry | AccessEntry
    if kind == CHANGE:
        method = r.code(_METHOD_NAMES, "method")
        resource_type = r.string("resource type")
        resource_id = r.string("resource id")
        res_version = r.u32("version")
        digest = r.short_bytes("content_hmac")
        entry = ChangeEntry(timestamp, method, resource_type, resource_id, res_version, digest)
    elif kind == ACCESS:
        actor = r.string("actor")
        role = r.string("role")
        action = r.code(_ACTION_NAMES, "action")
        purpose = r.string("purpose of use")
        outcome = r.code(_OUTCOME_NAMES, "outcome")
        reason = r.string("reason")
        pseudonym = r.short_bytes("patient pseudonym")
        count = r.u32("reference count")
        # each reference takes at least 2 bytes: refuse a count the data cannot hold before
        # allocating anything for it
        if count * 2 > len(r.data) - r.pos:
            raise MalformedEntry(
                f"entry truncated: {count} references announced, {len(r.data) - r.pos} bytes left"
            )
        refs = tuple(r.string(f"reference {i}") for i in range(count))
        entry = AccessEntry(timestamp, actor, role, action, purpose, outcome, reason, pseudonym,
                            refs)
    else:
        raise MalformedEntry(f"unknown entry kind {kind:#04x}, expected 0x01 change or 0x02 access")
    if r.pos != len(r.data):
        raise MalformedEntry(f"{len(r.data) - r.pos} trailing bytes after the entry")
    return entry
