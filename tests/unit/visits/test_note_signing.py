"""The signed-note byte format: canonical JSON, SHA-256, EIP-191 personal_sign, and the checks of
``verify_note`` (known answers, and the cases that must fail)."""

from __future__ import annotations

import base64
import copy
import hashlib

import pytest
from eth_keys import keys
from eth_utils import keccak

from teleledger.fhir.compartment import patient_ids
from teleledger.fhir.validation import validate
from teleledger.records.store import Stored
from teleledger.visits.notes import (
    SIG_FORMAT,
    SIGNER_ADDRESS_SYSTEM,
    NoteSignatureInvalid,
    SoapNote,
    Vitals,
    build_composition,
    canonical_bytes,
    div_to_text,
    note_digest,
    note_id,
    provenance_for,
    sign_note,
    text_to_div,
    verify_note,
)

# the private key of the eth-account documentation examples: a public test key, never a real one
KEY = keys.PrivateKey(bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"))
ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
OTHER = keys.PrivateKey(b"\x11" * 32)

SMALL = {"resourceType": "Composition", "title": "Progress note", "status": "final", "id": "x",
         "meta": {"versionId": "1"}, "text": {"status": "generated", "div": "<div>derived</div>"}}
SMALL_CANONICAL = b'{"resourceType":"Composition","status":"final","title":"Progress note"}'
SMALL_DIGEST = "33f32ea2dcfc2a44f4d93b1585046ec1a8261a7ca73d07d87c38373c700df1cd"
SMALL_SIGNATURE = ("b51ef74618d1d66cdc72975f852034fcd3ebd35dfa040b33eb0089d3672b3b26"
                   "6b6b8e8bf82a91741a0d99d7f87cae6a1f7c2ac20b715ce73d0a644749860c361c")


def note(**sections: str) -> SoapNote:
    return SoapNote(**{"subjective": "Headache for 3 days, worse at night.", "plan": "Rest & fluids.", **sections})


def signed_version(version: int = 1, **sections: str) -> dict:
    comp = build_composition(composition_id="c1", patient_id="p1", encounter_id="e1", practitioner_id="d1",
                             note=note(**sections), note_type="11506-3", status="final" if version == 1 else "amended",
                             date="2024-06-01T10:30:00.000Z")
    return {**comp, "meta": {"versionId": str(version), "lastUpdated": "2024-06-01T10:30:00.000Z"}}


def provenance(comp: dict, key: keys.PrivateKey = KEY, *, address: str | None = None) -> dict:
    stored = Stored("Composition", comp["id"], int(comp["meta"]["versionId"]), 0, "create", comp)
    return provenance_for(stored, sign_note(comp, key), practitioner_id="d1",
                          address=address or key.public_key.to_checksum_address(), patient_id="p1",
                          recorded="2024-06-01T10:30:00.000Z", amendment=False)


# ---- canonical form ----------------------------------------------------------------------------


def test_the_canonical_form_sorts_keys_drops_id_meta_and_text_and_has_no_whitespace():
    assert canonical_bytes(SMALL) == SMALL_CANONICAL
    reordered = dict(reversed(list(SMALL.items())))
    assert canonical_bytes(reordered) == SMALL_CANONICAL
    assert canonical_bytes({**SMALL, "id": "other", "meta": {"versionId": "9"}}) == SMALL_CANONICAL


def test_the_canonical_form_keeps_non_ascii_text_as_utf8_and_refuses_nan():
    assert canonical_bytes({"title": "Fièvre 38,5 °C"}) == '{"title":"Fièvre 38,5 °C"}'.encode()
    with pytest.raises(Exception, match="canonical form"):
        canonical_bytes({"x": float("nan")})


def test_the_digest_is_sha256_of_the_canonical_bytes():
    assert note_digest(SMALL).hex() == SMALL_DIGEST == hashlib.sha256(SMALL_CANONICAL).hexdigest()


def test_every_section_narrative_is_part_of_what_is_signed():
    assert note_digest(signed_version()) != note_digest(signed_version(plan="Rest and fluids."))


# ---- signature -------------------------------------------------------------------------------------


def test_the_signature_is_a_deterministic_known_answer_for_a_fixed_key():
    assert KEY.public_key.to_checksum_address() == ADDRESS
    assert sign_note(SMALL, KEY).hex() == SMALL_SIGNATURE


def test_the_signature_is_eip191_personal_sign_over_the_32_byte_digest():
    # built by hand from EIP-191, without eth_account: 0x19 "Ethereum Signed Message:\n32" ‖ digest
    message = b"\x19Ethereum Signed Message:\n32" + bytes.fromhex(SMALL_DIGEST)
    raw = bytes.fromhex(SMALL_SIGNATURE)
    assert raw[64] in (27, 28)
    sig = keys.Signature(vrs=(raw[64] - 27, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")))
    assert sig.recover_public_key_from_msg_hash(keccak(message)).to_checksum_address() == ADDRESS


def test_a_signed_note_verifies_to_its_signers_address():
    comp = signed_version()
    prov = provenance(comp)
    assert verify_note(comp, prov) == ADDRESS
    sig = prov["signature"][0]
    assert sig["sigFormat"] == SIG_FORMAT == "application/eth-personal-sign"
    assert sig["type"][0]["code"] == "1.2.840.10065.1.12.1.1"
    assert sig["who"] == {"reference": "Practitioner/d1",
                          "identifier": {"system": SIGNER_ADDRESS_SYSTEM, "value": ADDRESS}}
    assert prov["target"] == [{"reference": "Composition/c1/_history/1"}]
    assert len(base64.b64decode(sig["data"])) == 65


def test_a_composition_changed_after_signing_fails_verification():
    comp = signed_version()
    prov = provenance(comp)
    tampered = copy.deepcopy(comp)
    tampered["section"][0]["text"]["div"] = text_to_div("No headache.")
    with pytest.raises(NoteSignatureInvalid, match=f"expected the stated signer {ADDRESS}: the note was changed"):
        verify_note(tampered, prov)
    moved = {**comp, "subject": {"reference": "Patient/p2"}}  # the same note filed under another patient
    with pytest.raises(NoteSignatureInvalid, match="recovers to 0x"):
        verify_note(moved, prov)


def test_a_note_signed_by_another_key_than_the_stated_signer_fails():
    comp = signed_version()
    with pytest.raises(NoteSignatureInvalid, match=f"expected the stated signer {ADDRESS}"):
        verify_note(comp, provenance(comp, OTHER, address=ADDRESS))
    # signed and stated consistently by the other key: the signature is sound, and it is the
    # service's job to say that this address is not the practitioner's (NotesService.verify)
    assert verify_note(comp, provenance(comp, OTHER)) == OTHER.public_key.to_checksum_address()


def test_a_provenance_of_another_version_does_not_verify_this_one():
    v1, v2 = signed_version(1), signed_version(2, plan="Rest, fluids, paracetamol.")
    with pytest.raises(NoteSignatureInvalid, match="targets Composition/c1/_history/1, not Composition/c1/_history/2"):
        verify_note(v2, provenance(v1))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(data="not base64!"), "not base64"),
    (lambda s: s.update(data=base64.b64encode(b"\x01" * 64).decode()), "65 bytes"),
    (lambda s: s.update(data=base64.b64encode(b"\x00" * 65).decode()), "not a valid secp256k1 signature"),
    (lambda s: s.update(sigFormat="application/jose"), "no author's signature"),
    (lambda s: s["who"].pop("identifier"), "names no signer address"),
])
def test_a_malformed_signature_is_a_clear_verification_failure(change, message):
    comp = signed_version()
    prov = provenance(comp)
    change(prov["signature"][0])
    with pytest.raises(NoteSignatureInvalid, match=message) as caught:
        verify_note(comp, prov)
    assert caught.value.status == 422


# ---- the resources ---------------------------------------------------------------------------------


def test_the_composition_and_provenance_are_valid_fhir_in_the_patients_compartment():
    comp = signed_version()
    prov = provenance(comp)
    assert validate(comp) == "Composition" and validate(prov) == "Provenance"
    assert patient_ids(comp) == {"p1"}
    assert patient_ids(prov) == {"p1"}  # through the R5 Provenance.patient extension
    assert [s["title"] for s in comp["section"]] == ["Subjective", "Plan"]  # empty sections are left out
    assert [s["code"]["coding"][0]["code"] for s in comp["section"]] == ["61150-9", "18776-5"]
    assert comp["type"]["coding"][0] == {"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}


def test_the_note_id_is_one_per_encounter_and_author():
    assert note_id("e1", "d1") == note_id("e1", "d1")
    assert len({note_id("e1", "d1"), note_id("e1", "d2"), note_id("e2", "d1")}) == 3
    assert len(note_id("e" * 64, "d" * 64)) == 36


def test_note_text_becomes_escaped_narrative_and_comes_back_unchanged():
    text = "Pain <script>alert(1)</script> & fever\nsince Monday\n\nSecond paragraph"
    div = text_to_div(text)
    assert "<script>" not in div and "&lt;script&gt;" in div
    assert div == ('<div xmlns="http://www.w3.org/1999/xhtml"><p>Pain &lt;script&gt;alert(1)&lt;/script&gt; '
                   "&amp; fever<br/>since Monday</p><p>Second paragraph</p></div>")
    assert div_to_text(div) == text
    assert SoapNote.from_composition(signed_version()) == note()


def test_section_text_is_normalised_and_limited():
    assert SoapNote.of({"plan": "  Rest.  \r\nFluids.\r\n\r\n"}).plan == "Rest.\nFluids."
    assert SoapNote.of({}).is_empty()
    with pytest.raises(Exception, match="at most 20,000") as caught:
        SoapNote.of({"plan": "x" * 20_001})
    assert caught.value.status == 413


def test_vitals_become_loinc_coded_ucum_observations():
    obs = Vitals.of({"systolic": "128", "diastolic": "82", "heart_rate": "71", "temperature": "37,8",
                     "weight": ""}).observations(patient_id="p1", encounter_id="e1", effective="2024-06-01T10:00:00Z")
    assert [o["code"]["coding"][0]["code"] for o in obs] == ["85354-9", "8867-4", "8310-5"]
    bp = obs[0]
    assert [(c["code"]["coding"][0]["code"], c["valueQuantity"]["value"], c["valueQuantity"]["code"])
            for c in bp["component"]] == [("8480-6", 128, "mm[Hg]"), ("8462-4", 82, "mm[Hg]")]
    assert obs[2]["valueQuantity"] == {"value": 37.8, "unit": "Cel", "system": "http://unitsofmeasure.org",
                                       "code": "Cel"}
    assert all(validate(o) == "Observation" and o["category"][0]["coding"][0]["code"] == "vital-signs" for o in obs)


@pytest.mark.parametrize(("values", "message"), [
    ({"systolic": "128"}, "needs both"), ({"heart_rate": "fast"}, "heart rate must be a number"),
    ({"temperature": "98.6"}, "between 30 and 45 Cel"), ({}, "at least one vital sign"),
])
def test_implausible_or_incomplete_vitals_are_refused_by_name(values, message):
    with pytest.raises(Exception, match=message) as caught:
        Vitals.of(values)
    assert caught.value.status == 400
