"""C2SP signed notes, checkpoints and cosignatures.

The PeterNeumann / EnochRoot keys, note and signatures are the fixed vectors of
golang.org/x/mod/sumdb/note (note_test.go). Ed25519 is deterministic, so matching them byte for
byte means every Go-ecosystem verifier and witness reads our checkpoints.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput, TeleledgerError
from teleledger.ledger.log.note import (
    AmbiguousKey,
    Checkpoint,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    FutureCosignature,
    InvalidSignature,
    MalformedCheckpoint,
    MalformedKey,
    MalformedNote,
    NoteError,
    OriginMismatch,
    UnverifiedNote,
    append_signature_lines,
    cosign,
    cosignature_message,
    key_id,
    open_checkpoint,
    open_note,
    parse_note,
    parse_verifier_key,
    sign_note,
    verify_cosignature,
)

PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgK"
    "vqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGw"
    "nWLox33WWd1RvMc+QQ=\n"
)

# Our own fixed keys (seeds 0..31 and 32..63), derived once and pinned as known answers.
LOG_NAME = "teleledger.example/log"
LOG_SEED = bytes(range(32))
LOG_VKEY = "teleledger.example/log+e2161ec9+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"
LOG_SKEY = "PRIVATE+KEY+teleledger.example/log+e2161ec9+AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
WITNESS_NAME = "witness.example/w1"
WITNESS_SEED = bytes(range(32, 64))
WITNESS_VKEY = "witness.example/w1+20324abe+BCmsuuFBvMrwsi4alNNNC8c2HlJtC/4SyJeUvJMilm3X"
ROOT_8 = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
BODY_8 = "teleledger.example/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
COSIG_8_AT_1700000000 = (
    "— witness.example/w1 IDJKvgAAAABlU/EApEBgkEONTDj+/Z43ghKRCl61SZ+tgqVv+HrE60FOUQKyXyiMxyZ3"
    "obWRhoJHrQ1OdoVpDyE1MopfDQuCtlA9BQ==\n"
)


def log_signer() -> Ed25519Signer:
    return Ed25519Signer.from_seed(LOG_NAME, LOG_SEED)


def witness_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(WITNESS_SEED)


def witness_verifier() -> CosignatureVerifier:
    return CosignatureVerifier(WITNESS_NAME, witness_key().public_key())


# --------------------------------------------------------------------------- keys


def test_go_reference_keys_parse_and_round_trip_exactly():
    signer = Ed25519Signer.from_skey(PETER_SKEY)
    verifier = parse_verifier_key(PETER_VKEY)
    assert isinstance(verifier, Ed25519Verifier)
    assert signer.name == verifier.name == "PeterNeumann"
    assert signer.key_id == verifier.key_id == 0xC74F20A3
    assert signer.skey == PETER_SKEY
    assert signer.verifier().vkey == PETER_VKEY == verifier.vkey


def test_our_fixed_seed_gives_the_pinned_key_id_and_key_strings():
    signer = log_signer()
    public = signer.verifier().public_key
    by_hand = hashlib.sha256(LOG_NAME.encode() + b"\n\x01" + public).digest()[:4]
    assert signer.key_id == int.from_bytes(by_hand, "big") == 0xE2161EC9
    assert signer.verifier().vkey == LOG_VKEY
    material = base64.b64encode(b"\x01" + public).decode()
    assert LOG_VKEY == f"{LOG_NAME}+{by_hand.hex()}+{material}"
    assert signer.skey == LOG_SKEY
    assert Ed25519Signer.from_skey(LOG_SKEY).verifier() == signer.verifier()
    assert parse_verifier_key(LOG_VKEY) == signer.verifier()


def test_a_generated_key_uses_the_injected_randomness():
    signer = Ed25519Signer.generate(LOG_NAME, random_bytes=lambda n: LOG_SEED[:n])
    assert signer.skey == LOG_SKEY
    assert "AQAB" not in repr(signer)  # the seed never shows up in logs


def test_every_mangling_of_a_verifier_key_is_rejected():
    # Ported from note_test.go TestNewVerifier: every proper substring and every
    # single-character increment must fail.
    for i in range(len(PETER_VKEY) + 1):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                with pytest.raises(MalformedKey):
                    parse_verifier_key(PETER_VKEY[i:j])
    for i in range(len(PETER_VKEY)):
        mangled = PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        with pytest.raises(MalformedKey):
            parse_verifier_key(mangled)
    # Wrong key length and unknown algorithm, each with a matching key ID.
    with pytest.raises(MalformedKey):
        parse_verifier_key("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(MalformedKey):
        parse_verifier_key("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_every_mangling_of_a_signer_key_is_rejected():
    for i in range(len(PETER_SKEY) + 1):
        for j in range(i + 1, len(PETER_SKEY) + 1, 3):
            if (i, j) != (0, len(PETER_SKEY)):
                with pytest.raises(MalformedKey):
                    Ed25519Signer.from_skey(PETER_SKEY[i:j])
    for i in range(len(PETER_SKEY)):
        mangled = PETER_SKEY[:i] + chr(ord(PETER_SKEY[i]) + 1) + PETER_SKEY[i + 1 :]
        with pytest.raises(MalformedKey):
            Ed25519Signer.from_skey(mangled)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there", "nbsp\u00a0x"])
def test_key_names_with_spaces_or_plus_are_refused(name):
    with pytest.raises(MalformedKey):
        Ed25519Verifier(name, bytes(32))


def test_the_cosignature_key_id_uses_signature_type_4():
    cosigner = witness_verifier()
    public = cosigner.public_key
    assert cosigner.key_id == key_id(WITNESS_NAME, 0x04, public)
    assert cosigner.key_id != Ed25519Verifier(WITNESS_NAME, public).key_id
    assert cosigner.vkey == WITNESS_VKEY
    assert parse_verifier_key(WITNESS_VKEY) == cosigner
    assert CosignatureVerifier.from_vkey(WITNESS_VKEY) == cosigner
    with pytest.raises(MalformedKey):
        Ed25519Verifier.from_vkey(WITNESS_VKEY)


# --------------------------------------------------------------------------- notes


def test_signing_the_go_example_reproduces_the_go_note_byte_for_byte():
    assert sign_note(TEXT, [Ed25519Signer.from_skey(PETER_SKEY)]) == TEXT + "\n" + PETER_SIG


def test_opening_a_note_returns_the_text_and_only_the_verified_signatures():
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG

    body, sigs = open_note(note, [peter])
    assert body == TEXT
    assert [(s.name, s.key_id) for s in sigs] == [("PeterNeumann", 0xC74F20A3)]
    assert sigs[0].line == PETER_SIG

    _, sigs = open_note(note.encode(), [peter, enoch])
    assert [s.name for s in sigs] == ["PeterNeumann", "EnochRoot"]

    # The unknown key's line is kept (not dropped from the note), just not trusted.
    assert [s.line for s in parse_note(note).signatures] == [PETER_SIG, ENOCH_SIG]


def test_a_note_signed_only_by_unknown_keys_is_unverified_and_keeps_their_lines():
    with pytest.raises(UnverifiedNote) as caught:
        open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])
    assert [s.name for s in caught.value.signatures] == ["PeterNeumann", "EnochRoot"]


def test_a_key_sharing_only_the_name_or_only_the_id_is_unknown_not_invalid():
    peter = parse_verifier_key(PETER_VKEY)
    same_id_other_name = TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "PeterNeuman")
    with pytest.raises(UnverifiedNote):
        open_note(same_id_other_name, [peter])


def test_a_bad_signature_from_a_known_key_rejects_the_whole_note():
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(InvalidSignature) as caught:
        open_note(TEXT + "\n" + bad + ENOCH_SIG, [peter, enoch])
    assert str(caught.value) == "invalid signature for key PeterNeumann+c74f20a3"


def test_repeated_lines_are_ignored_and_ambiguous_verifiers_refused():
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    enoch_bad = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    note = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_bad
    _, sigs = open_note(note, [peter])
    assert [s.name for s in sigs] == ["PeterNeumann"]


    class Collider:
        """Another verifier claiming EnochRoot's name and key ID (a 32-bit ID collides easily)."""

        name, key_id = "EnochRoot", 0xAF0CFE78

        def verify(self, message, signature):
            return True

    with pytest.raises(AmbiguousKey):
        open_note(TEXT + "\n" + ENOCH_SIG, [enoch, peter, Collider()])
    open_note(TEXT + "\n" + PETER_SIG, [enoch, peter, Collider()])  # unused ambiguity is fine


@pytest.mark.parametrize(
    "note",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG.replace("— ", "-- "),
        TEXT + "\n" + PETER_SIG.replace("=\n", "\n"),
        TEXT + "\n" + "— PeterNeumann AAAA\n",
        TEXT.replace("\n", "\r\n") + "\n" + PETER_SIG,
        TEXT + "\n" + PETER_SIG * 101,
    ],
)
def test_malformed_notes_are_rejected_as_malformed(note):
    with pytest.raises(MalformedNote):
        open_note(note, [parse_verifier_key(PETER_VKEY)])


def test_a_note_that_is_not_utf8_is_malformed():
    with pytest.raises(MalformedNote):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [parse_verifier_key(PETER_VKEY)])


def test_note_text_may_contain_blank_lines_the_last_one_separates_signatures():
    text = "para one\n\npara two\n"
    note = sign_note(text, [log_signer()])
    assert open_note(note, [log_signer().verifier()])[0] == text


@pytest.mark.parametrize("body", ["", "no newline", "tab\there\n", "nul\x00\n"])
def test_sign_note_refuses_text_that_could_not_be_opened(body):
    with pytest.raises(MalformedNote):
        sign_note(body, [log_signer()])


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_body_has_origin_size_and_base64_root_lines():
    checkpoint = Checkpoint(LOG_NAME, 8, ROOT_8)
    assert checkpoint.to_body() == BODY_8
    assert Checkpoint.parse(BODY_8) == checkpoint
    with_ext = Checkpoint(LOG_NAME, 8, ROOT_8, ("ext one", "ext two"))
    assert with_ext.to_body() == BODY_8 + "ext one\next two\n"
    assert Checkpoint.parse(with_ext.to_body()) == with_ext
    assert Checkpoint.parse(Checkpoint("o", 0, bytes(32)).to_body()).size == 0


@settings(max_examples=100, deadline=None)
@given(
    origin=st.text(st.characters(min_codepoint=0x20, exclude_characters="\n"), min_size=1, max_size=40),
    size=st.integers(min_value=0, max_value=2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(st.characters(min_codepoint=0x20, exclude_characters="\n"), min_size=1, max_size=20),
        max_size=3,
    ),
)
def test_any_valid_checkpoint_survives_a_body_round_trip(origin, size, root, extensions):
    checkpoint = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.parse(checkpoint.to_body()) == checkpoint


ROOT_B64 = "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="


@pytest.mark.parametrize(
    "body",
    [
        f"log\n8\n{ROOT_B64}",  # no trailing newline
        f"log\n8\n{ROOT_B64}\n\n",  # empty extension line
        "log\n8\n",  # missing root line
        f"\n8\n{ROOT_B64}\n",  # empty origin
        f"log\n08\n{ROOT_B64}\n",  # leading zero
        f"log\n-1\n{ROOT_B64}\n",
        f"log\n+8\n{ROOT_B64}\n",
        f"log\n 8\n{ROOT_B64}\n",
        f"log\n8 \n{ROOT_B64}\n",
        f"log\n1_000\n{ROOT_B64}\n",
        f"log\n\u0668\n{ROOT_B64}\n",  # ARABIC-INDIC DIGIT EIGHT: int() would accept it
        f"log\n0x8\n{ROOT_B64}\n",
        f"log\n{2**64}\n{ROOT_B64}\n",
        f"log\n\n{ROOT_B64}\n",
        "log\n8\nnot base64!\n",
        f"log\n8\n{ROOT_B64[:-1]}\n",  # bad padding
        f"log\n8\n{base64.b64encode(bytes(31)).decode()}\n",  # 31-byte hash
        f"log\n8\n{base64.b64encode(bytes(33)).decode()}\n",
        f"log\n8\n{ROOT_B64[:-2]}h=\n",  # non-zero padding bits: not the canonical encoding
        f"log\n8\n{ROOT_B64}\r\n",
        f"log\n8\n{ROOT_B64.rstrip('=')}\n",
    ],
)
def test_checkpoint_parsing_is_strict(body):
    with pytest.raises(MalformedCheckpoint):
        Checkpoint.parse(body)


def test_constructing_an_invalid_checkpoint_fails_early():
    for args in [("", 1, ROOT_8), ("a\nb", 1, ROOT_8), ("o", -1, ROOT_8), ("o", 2**64, ROOT_8), ("o", 1, ROOT_8[:31])]:
        with pytest.raises(MalformedCheckpoint):
            Checkpoint(*args)
    with pytest.raises(MalformedCheckpoint):
        Checkpoint("o", 1, ROOT_8, ("",))


def test_a_signed_checkpoint_opens_with_the_log_key():
    note = sign_note(BODY_8, [log_signer()])
    checkpoint, sigs = open_checkpoint(note, [parse_verifier_key(LOG_VKEY)], origin=LOG_NAME)
    assert checkpoint == Checkpoint(LOG_NAME, 8, ROOT_8)
    assert [s.key_id for s in sigs] == [0xE2161EC9]


def test_a_checkpoint_signed_by_another_key_is_unverified():
    impostor = Ed25519Signer.from_seed(LOG_NAME, bytes(32))  # same name, other key
    note = sign_note(BODY_8, [impostor])
    with pytest.raises(UnverifiedNote):
        open_checkpoint(note, [parse_verifier_key(LOG_VKEY)])


def test_an_altered_checkpoint_body_fails_signature_verification():
    note = sign_note(BODY_8, [log_signer()])
    forged = note.replace("\n8\n", "\n9\n", 1)
    with pytest.raises(InvalidSignature):
        open_checkpoint(forged, [parse_verifier_key(LOG_VKEY)])
    other_root = note.replace("Xcna", "Xcnb", 1)
    with pytest.raises(InvalidSignature):
        open_checkpoint(other_root, [parse_verifier_key(LOG_VKEY)])


def test_a_checkpoint_for_another_log_is_refused():
    note = sign_note(BODY_8, [log_signer()])
    with pytest.raises(OriginMismatch):
        open_checkpoint(note, [parse_verifier_key(LOG_VKEY)], origin="other.example/log")


def test_a_verified_note_that_is_not_a_checkpoint_is_malformed():
    note = sign_note("hello\n", [log_signer()])
    with pytest.raises(MalformedCheckpoint):
        open_checkpoint(note, [log_signer().verifier()])


# --------------------------------------------------------------------------- cosignatures


def test_the_spec_example_cosignature_carries_key_id_timestamp_and_signature():
    # c2sp.org/tlog-cosignature example: "— witness.example.com/w1 jWbPPwAAAABkGFDL..."
    payload = base64.b64decode(
        "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA=="
    )
    assert len(payload) == 4 + 8 + 64
    assert int.from_bytes(payload[4:12], "big") == 1679315147  # the example's "time 1679315147"


def test_the_cosigned_message_prefixes_the_body_with_the_v1_header_and_time():
    assert cosignature_message(BODY_8, 1700000000) == (
        b"cosignature/v1\ntime 1700000000\n" + BODY_8.encode()
    )


def test_cosigning_with_a_fixed_key_and_time_gives_the_pinned_line():
    line = cosign(BODY_8, witness_key(), WITNESS_NAME, 1700000000)
    assert line == COSIG_8_AT_1700000000
    payload = base64.b64decode(line.split(" ")[2])
    assert payload[:4] == (0x20324ABE).to_bytes(4, "big")
    assert payload[4:12] == (1700000000).to_bytes(8, "big")
    assert verify_cosignature(BODY_8, line, witness_verifier()) == 1700000000


def test_a_cosigned_checkpoint_opens_with_the_log_key_and_the_witness_key():
    note = sign_note(BODY_8, [log_signer()])
    note = append_signature_lines(note, [cosign(BODY_8, witness_key(), WITNESS_NAME, 1700000000)])
    log_only, sigs = open_checkpoint(note, [parse_verifier_key(LOG_VKEY)])
    assert len(sigs) == 1
    _, sigs = open_checkpoint(note, [parse_verifier_key(LOG_VKEY), parse_verifier_key(WITNESS_VKEY)])
    assert [s.name for s in sigs] == [LOG_NAME, WITNESS_NAME]
    assert sigs[1].timestamp == 1700000000
    # Adding the same cosignature twice changes nothing.
    assert append_signature_lines(note, [COSIG_8_AT_1700000000]) == note


def test_a_cosignature_over_a_different_checkpoint_fails():
    line = cosign(BODY_8, witness_key(), WITNESS_NAME, 1700000000)
    other = Checkpoint(LOG_NAME, 9, ROOT_8).to_body()
    with pytest.raises(InvalidSignature):
        verify_cosignature(other, line, witness_verifier())


def test_a_cosignature_with_a_different_time_fails():
    line = cosign(BODY_8, witness_key(), WITNESS_NAME, 1700000000)
    payload = bytearray(base64.b64decode(line.split(" ")[2]))
    payload[4:12] = (1700000001).to_bytes(8, "big")
    moved = f"— {WITNESS_NAME} {base64.b64encode(bytes(payload)).decode()}\n"
    with pytest.raises(InvalidSignature):
        verify_cosignature(BODY_8, moved, witness_verifier())


def test_a_cosignature_by_another_witness_is_not_this_witness_statement():
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    line = cosign(BODY_8, other, WITNESS_NAME, 1700000000)
    with pytest.raises(UnverifiedNote):
        verify_cosignature(BODY_8, line, witness_verifier())


def test_a_cosignature_from_the_future_is_refused_when_the_caller_gives_the_time():
    line = cosign(BODY_8, witness_key(), WITNESS_NAME, 1700000000)
    assert verify_cosignature(BODY_8, line, witness_verifier(), not_after=1700000000) == 1700000000
    with pytest.raises(FutureCosignature):
        verify_cosignature(BODY_8, line, witness_verifier(), not_after=1699999999)


def test_witnesses_only_cosign_checkpoints():
    with pytest.raises(MalformedCheckpoint):
        cosign("not a checkpoint\n", witness_key(), WITNESS_NAME, 1)


def test_note_errors_belong_to_the_teleledger_error_tree():
    for cls in (MalformedNote, MalformedCheckpoint, MalformedKey, UnverifiedNote, InvalidSignature):
        assert issubclass(cls, NoteError) and issubclass(cls, TeleledgerError)
    assert issubclass(MalformedCheckpoint, InvalidInput)
