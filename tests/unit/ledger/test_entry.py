"""Log entry byte formats: known answers, round trips, and every way a decoder must say no."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.crypto import KeyedHash
from teleledger.core.errors import InvalidInput
from teleledger.ledger.log.entry import (
    ACTIONS,
    AccessEntry,
    ChangeEntry,
    MalformedEntry,
    canonical_json,
    content_hmac,
    decode,
    encode_access,
    encode_change,
    patient_pseudonym,
    version_reference,
)

HMAC = bytes(range(32))
PSEUDO = bytes(range(100, 132))
UUID = "0b9d5a3e-4c1f-4d8e-9a43-2f6d1c7e8b90"


def change(**overrides: object) -> bytes:
    values: dict = dict(timestamp_us=1_700_000_000_000_000, method="update",
                        resource_type="Observation", resource_id=UUID, version=3,
                        content_hmac=HMAC)
    values.update(overrides)
    return encode_change(**values)


def access(**overrides: object) -> bytes:
    values: dict = dict(timestamp_us=1_700_000_000_000_001, actor="u-42", role="practitioner",
                        action="search", purpose="TREAT", outcome="allowed", reason="care-team",
                        patient_pseudonym=PSEUDO,
                        references=[f"Observation/{UUID}/_history/3", "Patient/p1/_history/1"])
    values.update(overrides)
    return encode_access(**values)


# --------------------------------------------------------------------------- known answers


def test_a_change_entry_has_exactly_the_documented_bytes() -> None:
    got = encode_change(timestamp_us=0x0102030405060708, method="create", resource_type="Patient",
                        resource_id="abc", version=1, content_hmac=HMAC)
    expected = (
        bytes.fromhex("01" "01" "0102030405060708" "01")
        + bytes.fromhex("0007") + b"Patient"
        + bytes.fromhex("0003") + b"abc"
        + bytes.fromhex("00000001")
        + bytes.fromhex("20") + HMAC
    )
    assert got == expected


def test_an_access_entry_has_exactly_the_documented_bytes() -> None:
    got = encode_access(timestamp_us=5, actor="a", role="patient", action="ui", purpose="BTG",
                        outcome="denied", reason="", patient_pseudonym=b"",
                        references=["Patient/x/_history/2"])
    expected = (
        bytes.fromhex("01" "02" "0000000000000005")
        + bytes.fromhex("0001") + b"a"
        + bytes.fromhex("0007") + b"patient"
        + bytes.fromhex("0b")
        + bytes.fromhex("0003") + b"BTG"
        + bytes.fromhex("02")
        + bytes.fromhex("0000")
        + bytes.fromhex("00")
        + bytes.fromhex("00000001")
        + bytes.fromhex("0014") + b"Patient/x/_history/2"
    )
    assert got == expected


def test_a_delete_carries_no_content_hmac() -> None:
    raw = change(method="delete", content_hmac=b"")
    entry = decode(raw)
    assert isinstance(entry, ChangeEntry) and entry.content_hmac == b"" and raw[-1] == 0


# --------------------------------------------------------------------------- round trips


def test_a_change_entry_round_trips() -> None:
    entry = decode(change())
    assert entry == ChangeEntry(1_700_000_000_000_000, "update", "Observation", UUID, 3, HMAC)
    assert entry.encode() == change()
    assert entry.reference == f"Observation/{UUID}/_history/3"


def test_an_access_entry_round_trips() -> None:
    entry = decode(access())
    assert isinstance(entry, AccessEntry)
    assert entry.references == (f"Observation/{UUID}/_history/3", "Patient/p1/_history/1")
    assert (entry.actor, entry.role, entry.action, entry.purpose, entry.outcome, entry.reason) == (
        "u-42", "practitioner", "search", "TREAT", "allowed", "care-team")
    assert entry.patient_pseudonym == PSEUDO
    assert entry.encode() == access()


_ids = st.from_regex(r"[A-Za-z0-9.\-]{1,64}", fullmatch=True)
_types = st.from_regex(r"[A-Z][A-Za-z]{0,63}", fullmatch=True)
_tokens = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}", fullmatch=True)
_refs = st.builds(version_reference, _types, _ids, st.integers(1, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(0, 2**63 - 1), method=st.sampled_from(["create", "update", "delete"]),
       rtype=_types, rid=_ids, version=st.integers(1, 2**32 - 1),
       digest=st.binary(min_size=32, max_size=32))
def test_every_valid_change_entry_round_trips(  # type: ignore[no-untyped-def]
    ts, method, rtype, rid, version, digest
) -> None:
    digest = b"" if method == "delete" else digest
    raw = encode_change(timestamp_us=ts, method=method, resource_type=rtype, resource_id=rid,
                        version=version, content_hmac=digest)
    assert decode(raw).encode() == raw
    assert decode(raw) == ChangeEntry(ts, method, rtype, rid, version, digest)


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(0, 2**63 - 1), actor=_tokens, role=_tokens, action=st.sampled_from(sorted(ACTIONS)),
       purpose=st.from_regex(r"[A-Z][A-Z0-9_\-]{0,63}", fullmatch=True),
       outcome=st.sampled_from(["allowed", "denied"]), reason=st.one_of(st.just(""), _tokens),
       pseudo=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
       refs=st.lists(_refs, max_size=20))
def test_every_valid_access_entry_round_trips(  # type: ignore[no-untyped-def]
    ts, actor, role, action, purpose, outcome, reason, pseudo, refs
) -> None:
    raw = encode_access(timestamp_us=ts, actor=actor, role=role, action=action, purpose=purpose,
                        outcome=outcome, reason=reason, patient_pseudonym=pseudo, references=refs)
    entry = decode(raw)
    assert entry.encode() == raw
    assert entry == AccessEntry(ts, actor, role, action, purpose, outcome, reason, pseudo, tuple(refs))


# --------------------------------------------------------------------------- decoder rejections


@pytest.mark.parametrize("raw", [change(), access()], ids=["change", "access"])
def test_every_truncation_of_an_entry_is_rejected(raw: bytes) -> None:
    for cut in range(len(raw)):
        with pytest.raises(MalformedEntry):
            decode(raw[:cut])


@pytest.mark.parametrize("raw", [change(), access()], ids=["change", "access"])
def test_trailing_bytes_are_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedEntry, match="1 trailing bytes"):
        decode(raw + b"\x00")


def _patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_patched(change(), 0, b"\x02"), "unknown entry format version 0x02"),
        (_patched(change(), 0, b"\x00"), "unknown entry format version 0x00"),
        (_patched(change(), 1, b"\x03"), "unknown entry kind 0x03"),
        (_patched(change(), 10, b"\x04"), "unknown method code 0x04"),
        (_patched(change(), 2, b"\x80"), "timestamp"),
        (change()[:-33] + b"\x1f" + HMAC[:31], "content_hmac is 31 bytes, expected 32"),
        (change(method="delete", content_hmac=b"")[:-1] + b"\x20" + HMAC, "expected 0"),
        (_patched(change(), 13, b"patient"), "resource type"),
        (_patched(change(), 13, b"\xff"), "not valid UTF-8"),
    ],
    ids=["version-2", "version-0", "kind", "method", "timestamp-sign", "short-hmac",
         "delete-with-hmac", "lowercase-type", "bad-utf8"],
)
def test_malformed_change_entries_are_rejected(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedEntry, match=message):
        decode(raw)


def test_malformed_access_entries_are_rejected() -> None:
    raw = access()
    action_at = 10 + 2 + len("u-42") + 2 + len("practitioner")
    with pytest.raises(MalformedEntry, match="unknown action code 0x0c"):
        decode(_patched(raw, action_at, b"\x0c"))
    outcome_at = action_at + 1 + 2 + len("TREAT")
    with pytest.raises(MalformedEntry, match="unknown outcome code 0x00"):
        decode(_patched(raw, outcome_at, b"\x00"))
    # a reference count the remaining bytes cannot hold is refused before allocating anything
    short = access(references=[])
    with pytest.raises(MalformedEntry, match="4294967295 references announced"):
        decode(short[:-4] + b"\xff\xff\xff\xff")
    # a 31-byte pseudonym
    bad = encode_access(timestamp_us=1, actor="a", role="r", action="read", purpose="TREAT",
                        outcome="allowed", references=[])
    bad = bad[:-5] + b"\x1f" + bytes(31) + b"\x00\x00\x00\x00"
    with pytest.raises(MalformedEntry, match="patient pseudonym is 31 bytes"):
        decode(bad)


def test_a_malformed_entry_is_an_invalid_input_error() -> None:
    with pytest.raises(InvalidInput):
        decode(b"")
    with pytest.raises(MalformedEntry, match="an entry is bytes"):
        decode("not bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encoder rejections


@pytest.mark.parametrize(
    ("kind", "overrides", "message"),
    [
        ("change", {"method": "patch"}, "method must be one of"),
        ("change", {"resource_type": "observation"}, "resource type"),
        ("change", {"resource_id": "Jane Doe"}, "resource id"),
        ("change", {"version": 0}, "version must be in"),
        ("change", {"version": True}, "version must be in"),
        ("change", {"timestamp_us": -1}, "timestamp"),
        ("change", {"content_hmac": b""}, "content_hmac is 0 bytes, expected 32"),
        ("change", {"method": "delete"}, "content_hmac is 32 bytes, expected 0"),
        ("access", {"actor": "Jane Doe"}, "actor"),
        ("access", {"actor": ""}, "actor"),
        ("access", {"role": "nurse practitioner"}, "role"),
        ("access", {"action": "peek"}, "action must be one of"),
        ("access", {"purpose": "treat"}, "purpose of use"),
        ("access", {"outcome": "maybe"}, "outcome must be one of"),
        ("access", {"reason": "because the patient asked"}, "reason"),
        ("access", {"patient_pseudonym": b"p1"}, "patient pseudonym is 2 bytes"),
        ("access", {"references": ["Patient/p1"]}, "reference"),
        ("access", {"references": "Patient/p1/_history/1"}, "not one string"),
        ("access", {"references": ["Patient/p1/_history/0"]}, "reference"),
        ("access", {"references": ["Patient/p1/_history/9999999999"]}, "above 2\\*\\*32-1"),
    ],
)
def test_values_that_could_carry_free_text_or_break_the_format_are_refused(
    kind: str, overrides: dict, message: str
) -> None:
    with pytest.raises(MalformedEntry, match=message):
        (change if kind == "change" else access)(**overrides)


# --------------------------------------------------------------------------- keyed hashes


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_utf8() -> None:
    resource = {"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Zoë"]}], "active": True,
                "id": "p1", "meta": {"versionId": "2"}}
    assert canonical_json(resource) == (
        '{"active":true,"id":"p1","meta":{"versionId":"2"},"name":[{"family":"Müller","given":["Zoë"]}],'
        '"resourceType":"Patient"}'
    ).encode("utf-8")
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), "\ud800"])
def test_canonical_json_refuses_what_json_cannot_say_exactly(value: object) -> None:
    with pytest.raises(MalformedEntry):
        canonical_json({"x": value})


def test_content_hmac_and_patient_pseudonym_are_hmac_sha256_under_the_log_key() -> None:
    key = b"L" * 32
    resource = {"resourceType": "Patient", "id": "p1"}
    assert content_hmac(KeyedHash(key), resource) == hmac.new(
        key, b'{"id":"p1","resourceType":"Patient"}', hashlib.sha256).digest()
    assert patient_pseudonym(KeyedHash(key), "p1") == hmac.new(key, b"Patient/p1", hashlib.sha256).digest()
    assert patient_pseudonym(KeyedHash(key), "p1") != patient_pseudonym(KeyedHash(b"M" * 32), "p1")
    with pytest.raises(MalformedEntry):
        patient_pseudonym(KeyedHash(key), "Jane Doe")
