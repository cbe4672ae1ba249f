"""Signed clinical notes: SOAP drafts, signing into a FHIR Composition + Provenance, amendments,
verification, and the Conditions and vital signs recorded beside a note.

Lifecycle
---------

* A **draft** belongs to one encounter and one author (``note_drafts``, sealed with the patient's
  data key). It never enters the FHIR store, so it is nobody's record yet: not in any search,
  not in ``$everything``, visible to its author only (``policy.own_note_draft``).
* **Signing** writes, in ONE unit of work, the ``Composition`` (status ``final``; LOINC type
  11506-3 progress note or 34109-9 note; subject, encounter, author, legal attester; sections
  Subjective 61150-9, Objective 61149-1, Assessment 51848-0, Plan 18776-5 as narrative) and a
  ``Provenance`` carrying the practitioner's signature over it, and deletes the draft. Only a
  practitioner of the encounter may sign (``policy.note_author``); anyone else gets a 403 and
  nothing is stored. The store's change entry puts a keyed hash of the Composition version
  into the transparency log in that same commit.
* **Amending**: editing a signed note makes a new draft from it; signing that draft updates the
  same Composition (a new version, status ``amended``) with a new Provenance. Earlier versions
  stay readable through vread/_history to whoever may read the note.

One Composition per (encounter, author): its id is ``note_id(encounter, practitioner)``, a
UUIDv5, so a second signing of the same encounter's note can only ever be an amendment and two
concurrent first signings meet on the primary key instead of making two notes.

The signature (byte format)
---------------------------

1. canonical bytes = UTF-8 of ``json.dumps(c, sort_keys=True, separators=(",", ":"),
   ensure_ascii=False, allow_nan=False)`` where ``c`` is the Composition without its top-level
   ``id``, ``meta`` and ``text`` (server-assigned or derived; everything clinical, including
   every section's narrative, is signed). Keys sort by code point; FHIR element names are ASCII.
2. digest = SHA-256(canonical bytes), 32 bytes.
3. signature = secp256k1 ECDSA (RFC 6979 nonces) over Keccak-256 of the EIP-191 "personal_sign"
   message ``0x19 ‖ "Ethereum Signed Message:\\n32" ‖ digest`` (``eth_account.messages
   .encode_defunct(primitive=digest)``), 65 bytes ``r ‖ s ‖ v`` with v ∈ {27, 28}: any Ethereum
   wallet or library can check it.

The Provenance that carries it::

    target    Composition/<id>/_history/<version>   (binds the signature to that version)
    recorded  when it was signed; activity CREATE (first signature) or UPDATE (amendment)
    agent     type author, who Practitioner/<id>
    signature type urn:iso-astm:E1762-95:2013 1.2.840.10065.1.12.1.1 (author's signature),
              when, who = Practitioner/<id> with identifier {system SIGNER_ADDRESS_SYSTEM,
              value <checksummed address>}, targetFormat application/fhir+json,
              sigFormat ``application/eth-personal-sign`` (this module's name for step 3),
              data = base64(65-byte signature)
    extension http://hl7.org/fhir/5.0/StructureDefinition/extension-Provenance.patient: the R5
              element carried in R4, so the Provenance is in the patient's compartment

``verify_note(composition, provenance)`` recovers the signer's address and refuses a signature
that does not recover to the address the Provenance states, or a Provenance that targets another
version. ``NotesService.verify`` then checks that address is the one the keystore holds for the
practitioner's account (``user:<username>``).

This module never speaks HTTP, never logs note text, and decides nothing about access itself:
the records service applies ``teleledger.policy`` to every resource, and the rules it cannot
see (authorship, drafts) are asked of ``teleledger.policy`` here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from html.parser import HTMLParser
from typing import Any, Final, Protocol

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys import keys as eth_keys
from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from teleledger.core.crypto import open_sealed, seal
from teleledger.core.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
)
from teleledger.fhir import searchparams as sp
from teleledger.policy import decide as policy
from teleledger.policy.model import Decision, Principal
from teleledger.records.keys import key_id_for
from teleledger.records.service import AccessDenied, RecordsService
from teleledger.records.store import Stored, instant
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork
from teleledger.visits.notes_tables import note_drafts

__all__ = [
    "AuditDenials",
    "NOTE_TYPES",
    "SECTIONS",
    "SIG_FORMAT",
    "SIGNER_ADDRESS_SYSTEM",
    "Draft",
    "NotePage",
    "NoteSignatureInvalid",
    "NotesService",
    "SignedNote",
    "SoapNote",
    "Verification",
    "Vitals",
    "build_composition",
    "canonical_bytes",
    "div_to_text",
    "note_digest",
    "note_id",
    "provenance_for",
    "sign_note",
    "text_to_div",
    "verify_note",
]

LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
SNOMED: Final = "http://snomed.info/sct"
XHTML_NS: Final = "http://www.w3.org/1999/xhtml"

#: Composition.type: LOINC code → title
NOTE_TYPES: Final[dict[str, str]] = {"11506-3": "Progress note", "34109-9": "Note"}
DEFAULT_NOTE_TYPE: Final = "11506-3"
#: SOAP sections in order: (field name, title, LOINC code, LOINC display)
SECTIONS: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("subjective", "Subjective", "61150-9", "Subjective Narrative"),
    ("objective", "Objective", "61149-1", "Objective Narrative"),
    ("assessment", "Assessment", "51848-0", "Assessment note"),
    ("plan", "Plan", "18776-5", "Plan of care note"),
)
_SECTION_BY_CODE: Final = {code: name for name, _, code, _ in SECTIONS}
MAX_SECTION_CHARS: Final = 20_000

SIG_TYPE: Final = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1",
                   "display": "Author's Signature"}
#: Signature.sigFormat of an EIP-191 personal_sign over the note digest (see the module docstring)
SIG_FORMAT: Final = "application/eth-personal-sign"
#: Identifier.system of the signer's Ethereum address (EIP-55 checksummed) in Signature.who
SIGNER_ADDRESS_SYSTEM: Final = "urn:teleledger:ethereum-address"
PROVENANCE_PATIENT_EXT: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Provenance.patient"
_DATA_OPERATION: Final = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

#: encounters a note may be written for: the visit has begun (or is over), it was not cancelled
NOTE_ENCOUNTER_STATUSES: Final = frozenset({"arrived", "triaged", "in-progress", "onleave", "finished"})
_NOTE_NAMESPACE: Final = uuid.UUID("5b0e3c1e-6f3a-4c55-9d1f-0c6a2f4e8b71")
_CANONICAL_DROP: Final = ("id", "meta", "text")


class NoteSignatureInvalid(Unprocessable):
    """A note's signature does not verify; the message says what was expected and what was found."""


class SigningKeys(Protocol):
    """Where a practitioner's secp256k1 key lives (``identity.keystore.Keystore``)."""

    def key(self, key_id: str, *, create: bool = True) -> eth_keys.PrivateKey: ...


# ---- the pure part: canonical form, signature, narrative ---------------------------------------


def note_id(encounter_id: str, practitioner_id: str) -> str:
    """The Composition id of ``practitioner_id``'s note on ``encounter_id`` (UUIDv5, 36 chars)."""
    return str(uuid.uuid5(_NOTE_NAMESPACE, f"Encounter/{encounter_id}|Practitioner/{practitioner_id}"))


def canonical_bytes(composition: Mapping[str, Any]) -> bytes:
    """Step 1 of the module docstring."""
    body = {k: v for k, v in composition.items() if k not in _CANONICAL_DROP}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the Composition cannot be put in canonical form: {exc.__class__.__name__}") from None
    return text.encode("utf-8")


def note_digest(composition: Mapping[str, Any]) -> bytes:
    """Step 2: SHA-256 of the canonical bytes."""
    return hashlib.sha256(canonical_bytes(composition)).digest()


def sign_note(composition: Mapping[str, Any], key: eth_keys.PrivateKey) -> bytes:
    """Step 3: the 65-byte EIP-191 personal_sign signature of the note digest."""
    signed = Account.sign_message(encode_defunct(primitive=note_digest(composition)), private_key=key.to_bytes())
    return bytes(signed.signature)


def _recover(composition: Mapping[str, Any], signature: bytes) -> str:
    if len(signature) != 65:
        raise NoteSignatureInvalid(f"a signature is 65 bytes (r ‖ s ‖ v), found {len(signature)}")
    try:
        return str(Account.recover_message(encode_defunct(primitive=note_digest(composition)), signature=signature))
    except Exception:  # noqa: BLE001 - eth_keys raises several types for a malformed signature
        raise NoteSignatureInvalid("the signature bytes are not a valid secp256k1 signature") from None


def _coding_matches(codings: Any, wanted: Mapping[str, str]) -> bool:
    return isinstance(codings, list) and any(
        isinstance(c, dict) and c.get("system") == wanted["system"] and c.get("code") == wanted["code"] for c in codings)


def _version_ref(composition: Mapping[str, Any]) -> str | None:
    cid = composition.get("id")
    version = (composition.get("meta") or {}).get("versionId")
    return f"Composition/{cid}/_history/{version}" if cid and version else None


def verify_note(composition: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """The checksummed address that signed ``composition``, per its ``provenance``.

    Raises ``NoteSignatureInvalid`` when the Provenance does not target this Composition version
    (when the Composition carries its id and version), carries no author's signature in
    ``SIG_FORMAT``, or when the signature does not recover to the address the Provenance states:
    a Composition changed after signing recovers to some other address."""
    if provenance.get("resourceType") != "Provenance":
        raise NoteSignatureInvalid("expected a Provenance resource")
    ref = _version_ref(composition)
    targets = [x.get("reference") for x in provenance.get("target") or [] if isinstance(x, dict)]
    if ref is not None and ref not in targets:
        raise NoteSignatureInvalid(f"the Provenance targets {', '.join(map(str, targets)) or 'nothing'}, "
                                   f"not {ref}")
    sig = next((s for s in provenance.get("signature") or []
                if isinstance(s, dict) and s.get("sigFormat") == SIG_FORMAT and _coding_matches(s.get("type"), SIG_TYPE)),
               None)
    if sig is None:
        raise NoteSignatureInvalid(f"the Provenance carries no author's signature in {SIG_FORMAT}")
    try:
        raw = base64.b64decode(str(sig.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise NoteSignatureInvalid("Signature.data is not base64") from None
    recovered = _recover(composition, raw)
    stated = ((sig.get("who") or {}).get("identifier") or {})
    if stated.get("system") != SIGNER_ADDRESS_SYSTEM or not isinstance(stated.get("value"), str):
        raise NoteSignatureInvalid("Signature.who names no signer address")
    if stated["value"].lower() != recovered.lower():
        raise NoteSignatureInvalid(f"the signature recovers to {recovered}, expected the stated signer "
                                   f"{stated['value']}: the note was changed after signing or signed by another key")
    return recovered


def provenance_for(composition: Stored, signature: bytes, *, practitioner_id: str, address: str, patient_id: str,
                   recorded: str, amendment: bool) -> dict:
    """The Provenance of one signed Composition version (shape in the module docstring)."""
    who = {"reference": f"Practitioner/{practitioner_id}"}
    return {
        "resourceType": "Provenance",
        "extension": [{"url": PROVENANCE_PATIENT_EXT, "valueReference": {"reference": f"Patient/{patient_id}"}}],
        "target": [{"reference": f"Composition/{composition.res_id}/_history/{composition.version}"}],
        "recorded": recorded,
        "activity": {"coding": [{"system": _DATA_OPERATION, "code": "UPDATE" if amendment else "CREATE"}]},
        "agent": [{"type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
                   "who": who}],
        "signature": [{
            "type": [SIG_TYPE],
            "when": recorded,
            "who": {**who, "identifier": {"system": SIGNER_ADDRESS_SYSTEM, "value": address}},
            "targetFormat": "application/fhir+json",
            "sigFormat": SIG_FORMAT,
            "data": base64.b64encode(signature).decode("ascii"),
        }],
    }


def text_to_div(text: str) -> str:
    """Plain text → a FHIR XHTML narrative div: paragraphs at blank lines, ``<br/>`` at line
    breaks, every character escaped (the note's text never becomes markup)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    inner = "".join("<p>" + "<br/>".join(html.escape(line, quote=False) for line in p.split("\n")) + "</p>"
                    for p in paragraphs)
    return f'<div xmlns="{XHTML_NS}">{inner}</div>'


class _TextOf(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:  # type: ignore[type-arg]
        if tag == "br":
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:  # type: ignore[type-arg]
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def div_to_text(div: str) -> str:
    """A narrative div → its plain text (the inverse of ``text_to_div``). Pages show this, never
    the div itself: a Composition written through the FHIR API could hold any markup."""
    parser = _TextOf()
    parser.feed(div or "")
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()


def _clean(text: object, name: str) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidInput(f"the {name} section must be text", expression=name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    if "\x00" in text:
        raise InvalidInput(f"the {name} section holds a NUL character", expression=name)
    if len(text) > MAX_SECTION_CHARS:
        raise PayloadTooLarge(f"the {name} section has {len(text):,} characters; at most {MAX_SECTION_CHARS:,}",
                              expression=name)
    return text


@dataclass(frozen=True)
class SoapNote:
    """The four narrative sections of a note, as plain text."""

    subjective: str = ""
    objective: str = ""
    assessment: str = ""
    plan: str = ""

    @classmethod
    def of(cls, values: Mapping[str, object]) -> SoapNote:
        """From form or JSON fields; normalises line ends and trailing blanks, enforces the limits."""
        return cls(**{name: _clean(values.get(name), name) for name, _, _, _ in SECTIONS})

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name, _, _, _ in SECTIONS)

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name, _, _, _ in SECTIONS}

    @classmethod
    def from_composition(cls, composition: Mapping[str, Any]) -> SoapNote:
        found: dict[str, str] = {}
        for section in composition.get("section") or []:
            codes = [c.get("code") for c in (section.get("code") or {}).get("coding", []) if isinstance(c, dict)]
            name = next((_SECTION_BY_CODE[c] for c in codes if c in _SECTION_BY_CODE), None)
            if name is not None:
                found[name] = div_to_text((section.get("text") or {}).get("div", ""))
        return cls(**found)


def check_note_type(code: object) -> str:
    if code is None or code == "":
        return DEFAULT_NOTE_TYPE
    if code not in NOTE_TYPES:
        raise InvalidInput(f"note type must be one of {', '.join(f'{c} ({n})' for c, n in NOTE_TYPES.items())}",
                           expression="type")
    return str(code)


def build_composition(*, composition_id: str, patient_id: str, encounter_id: str, practitioner_id: str,
                      note: SoapNote, note_type: str, status: str, date: str) -> dict:
    """The Composition of a signed note (empty sections are left out: FHIR's cmp-1 wants each
    section to hold something)."""
    title = NOTE_TYPES[note_type]
    author = {"reference": f"Practitioner/{practitioner_id}"}
    return {
        "resourceType": "Composition",
        "id": composition_id,
        "status": status,
        "type": {"coding": [{"system": LOINC, "code": note_type, "display": title}], "text": title},
        "subject": {"reference": f"Patient/{patient_id}"},
        "encounter": {"reference": f"Encounter/{encounter_id}"},
        "date": date,
        "author": [author],
        "title": title,
        "attester": [{"mode": "legal", "time": date, "party": author}],
        "section": [
            {"title": heading, "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
             "text": {"status": "additional", "div": text_to_div(getattr(note, name))}}
            for name, heading, code, display in SECTIONS if getattr(note, name)
        ],
    }


# ---- vital signs and conditions ------------------------------------------------------------------

#: vital sign → (LOINC code, display, UCUM unit, lowest, highest plausible value)
VITALS: Final[dict[str, tuple[str, str, str, Decimal, Decimal]]] = {
    "heart_rate": ("8867-4", "Heart rate", "/min", Decimal(20), Decimal(300)),
    "temperature": ("8310-5", "Body temperature", "Cel", Decimal(30), Decimal(45)),
    "weight": ("29463-7", "Body weight", "kg", Decimal("0.5"), Decimal(500)),
}
BP_PANEL: Final = ("85354-9", "Blood pressure panel with all children optional")
BP_PARTS: Final = {"systolic": ("8480-6", "Systolic blood pressure", Decimal(40), Decimal(300)),
                   "diastolic": ("8462-4", "Diastolic blood pressure", Decimal(20), Decimal(200))}
_VITAL_LABELS: Final = {"systolic": "systolic blood pressure", "diastolic": "diastolic blood pressure",
                        "heart_rate": "heart rate", "temperature": "temperature", "weight": "weight"}
CLINICAL_STATUSES: Final = ("active", "recurrence", "relapse", "inactive", "remission", "resolved")


def _number(raw: object, name: str, low: Decimal, high: Decimal, unit: str) -> Decimal | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = Decimal(str(raw).strip().replace(",", "."))
    except InvalidOperation:
        raise InvalidInput(f"{_VITAL_LABELS[name]} must be a number, got {str(raw)[:20]!r}", expression=name) from None
    if not value.is_finite() or not low <= value <= high:
        raise InvalidInput(f"{_VITAL_LABELS[name]} must be between {low} and {high} {unit}", expression=name)
    return value


def _json_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


@dataclass(frozen=True)
class Vitals:
    """Vital signs a patient reports (any may be absent; blood pressure needs both numbers)."""

    systolic: Decimal | None = None
    diastolic: Decimal | None = None
    heart_rate: Decimal | None = None
    temperature: Decimal | None = None
    weight: Decimal | None = None

    @classmethod
    def of(cls, values: Mapping[str, object]) -> Vitals:
        got: dict[str, Decimal | None] = {}
        for name, (low, high) in (("systolic", BP_PARTS["systolic"][2:]), ("diastolic", BP_PARTS["diastolic"][2:])):
            got[name] = _number(values.get(name), name, low, high, "mm[Hg]")
        for name, (_, _, unit, low, high) in VITALS.items():
            got[name] = _number(values.get(name), name, low, high, unit)
        if (got["systolic"] is None) != (got["diastolic"] is None):
            raise InvalidInput("blood pressure needs both the systolic and the diastolic value",
                               expression="systolic" if got["systolic"] is None else "diastolic")
        vitals = cls(**got)
        if all(v is None for v in got.values()):
            raise InvalidInput("enter at least one vital sign")
        return vitals

    def observations(self, *, patient_id: str, encounter_id: str, effective: str) -> list[dict]:
        base = {
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs", "display": "Vital Signs"}]}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "encounter": {"reference": f"Encounter/{encounter_id}"},
            "effectiveDateTime": effective,
            # the patient measured it: reported by the patient, recorded by the practitioner
            "performer": [{"reference": f"Patient/{patient_id}"}],
        }

        def quantity(value: Decimal, unit: str) -> dict:
            return {"value": _json_number(value), "unit": unit, "system": UCUM, "code": unit}

        out = []
        if self.systolic is not None and self.diastolic is not None:
            out.append({**base, "code": {"coding": [{"system": LOINC, "code": BP_PANEL[0], "display": BP_PANEL[1]}],
                                         "text": "Blood pressure"},
                        "component": [{"code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                                       "valueQuantity": quantity(getattr(self, name), "mm[Hg]")}
                                      for name, (code, display, _, _) in BP_PARTS.items()]})
        for name, (code, display, unit, _, _) in VITALS.items():
            value = getattr(self, name)
            if value is not None:
                out.append({**base, "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                                             "text": display},
                            "valueQuantity": quantity(value, unit)})
        return out


@dataclass(frozen=True)
class ConditionInput:
    text: str
    snomed: str | None
    clinical_status: str

    @classmethod
    def of(cls, values: Mapping[str, object]) -> ConditionInput:
        text = str(values.get("text") or "").strip()
        snomed = str(values.get("snomed") or "").strip() or None
        status = str(values.get("clinical_status") or "active").strip()
        if not text and not snomed:
            raise InvalidInput("name the condition (text) or give its SNOMED CT code", expression="text")
        if len(text) > 500:
            raise PayloadTooLarge("the condition's text has more than 500 characters", expression="text")
        if snomed is not None and not re.fullmatch(r"[1-9][0-9]{5,17}", snomed):
            raise InvalidInput("a SNOMED CT code is 6 to 18 digits", expression="snomed")
        if status not in CLINICAL_STATUSES:
            raise InvalidInput(f"clinical status must be one of {', '.join(CLINICAL_STATUSES)}",
                               expression="clinical_status")
        return cls(text, snomed, status)

    def resource(self, *, patient_id: str, encounter_id: str, practitioner_id: str, recorded: str) -> dict:
        code: dict = {}
        if self.snomed:
            code["coding"] = [{"system": SNOMED, "code": self.snomed}]
        if self.text:
            code["text"] = self.text
        return {
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": self.clinical_status}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                      "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
            "code": code,
            "subject": {"reference": f"Patient/{patient_id}"},
            "encounter": {"reference": f"Encounter/{encounter_id}"},
            "recordedDate": recorded,
            "recorder": {"reference": f"Practitioner/{practitioner_id}"},
            "asserter": {"reference": f"Practitioner/{practitioner_id}"},
        }


# ---- the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    encounter_id: str
    author: str  # Practitioner id
    patient_id: str
    note: SoapNote
    note_type: str
    composition_id: str | None  # the signed note an amendment draft was started from
    base_version: int | None
    updated: str  # FHIR instant

    def as_json(self) -> dict:
        return {"encounter": f"Encounter/{self.encounter_id}", "author": f"Practitioner/{self.author}",
                "type": self.note_type, "sections": self.note.as_dict(), "updated": self.updated,
                "amends": (f"Composition/{self.composition_id}/_history/{self.base_version}"
                           if self.composition_id else None)}


@dataclass(frozen=True)
class SignedNote:
    composition: dict
    provenance: dict


@dataclass(frozen=True)
class Verification:
    """What a reader is told about one signed Composition version."""

    verified: bool
    reason: str
    composition: str  # Composition/<id>/_history/<version>
    practitioner: str | None = None  # Practitioner/<id> named by the signature
    address: str | None = None  # the address the signature recovers to
    signed_at: str | None = None
    provenance: str | None = None

    def as_json(self) -> dict:
        return {"verified": self.verified, "reason": self.reason, "composition": self.composition,
                "practitioner": self.practitioner, "address": self.address, "signedAt": self.signed_at,
                "provenance": self.provenance, "sigFormat": SIG_FORMAT}


@dataclass
class NotePage:
    """Everything the clinician's note page shows for one encounter."""

    encounter: dict
    patient: dict | None
    draft: Draft | None
    form: SoapNote
    note_type: str
    current: dict | None
    versions: list[dict] = field(default_factory=list)
    conditions: list[dict] = field(default_factory=list)
    vitals: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _EncounterFacts:
    encounter: dict
    patient_id: str
    practitioners: frozenset[str]


def _now_us() -> int:
    return time.time_ns() // 1000


def _refs(values: Any, rtype: str) -> list[str]:
    out = []
    for v in values if isinstance(values, list) else [values]:
        ref = (v or {}).get("reference") if isinstance(v, dict) else None
        if isinstance(ref, str):
            try:
                parsed = sp.parse_reference(ref)
            except ValueError:
                parsed = None
            if parsed is not None and parsed[0] == rtype:
                out.append(parsed[1])
    return out


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(note_drafts)


class NotesService:
    """The clinical-note use cases; each opens its unit(s) of work and commits once.

    ``keys``: the node's keystore (``Keystore``); a practitioner signs with ``user:<username>``.
    On SQLite one unit of work holds the database's write lock, so the keystore (which opens
    its own) is asked before a unit of work begins, never inside one.
    """

    def __init__(self, engine: Engine, records: RecordsService, keys: SigningKeys, *,
                 clock: Callable[[], int] = _now_us) -> None:
        self.engine = engine
        self.records = records
        self.keys = keys
        self.clock = clock

    # ---- drafts -----------------------------------------------------------------------------

    def save_draft(self, principal: Principal, encounter_id: str, note: SoapNote, *,
                   note_type: str = DEFAULT_NOTE_TYPE) -> Draft:
        """Create or replace the principal's draft for the encounter. When their note on it is
        already signed, the draft is an amendment of the current version."""
        note_type = check_note_type(note_type)
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                facts = self._authorize(uow.c, principal, encounter_id, action="create")
                draft = self._write_draft(uow.c, principal, facts, note, note_type)
                uow.commit()
        return draft

    def draft(self, principal: Principal, encounter_id: str) -> Draft | None:
        """The principal's own draft for this encounter, or None."""
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                facts = self._authorize(uow.c, principal, encounter_id, action="read")
                draft = self._read_draft(uow.c, principal, facts)
                uow.commit()
        return draft

    def discard_draft(self, principal: Principal, encounter_id: str) -> bool:
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                facts = self._authorize(uow.c, principal, encounter_id, action="delete")
                gone = self._delete_draft(uow.c, principal, facts)
                uow.commit()
        return gone

    # ---- signing ----------------------------------------------------------------------------

    def sign(self, principal: Principal, encounter_id: str, note: SoapNote | None = None, *,
             note_type: str | None = None) -> SignedNote:
        """Sign the principal's draft (or ``note``, saved and signed at once): the Composition
        version and its Provenance in one unit of work, the draft gone in the same commit."""
        key = self._signing_key(principal)
        try:
            with self._denials(principal):
                with UnitOfWork(self.engine) as uow:
                    signed = self._sign_in(uow.c, principal, encounter_id, note, note_type, key)
                    uow.commit()
        except IntegrityError:
            # two first signings of one note at once (no draft row to lock): the primary key of
            # the Composition let one through; the other is told, and stored nothing
            raise Conflict("this note was signed elsewhere at the same moment; reload it and amend it if needed") from None
        return signed

    def _sign_in(self, c: Connection, principal: Principal, encounter_id: str, note: SoapNote | None,
                 note_type: str | None, key: eth_keys.PrivateKey | None) -> SignedNote:
        facts = self._authorize(c, principal, encounter_id, action="create")
        assert principal.practitioner_id is not None  # note_author allowed it
        draft = self._read_draft(c, principal, facts, for_update=True)
        if note is None:
            if draft is None:
                raise NotFound("there is no draft of this note to sign; write the note first")
            note = draft.note
        note_type = check_note_type(note_type or (draft.note_type if draft else None))
        if note.is_empty():
            raise InvalidInput("the note is empty: write at least one section before signing")
        if key is None:
            raise Unprocessable("your account has no signing key; ask an administrator to create it")
        nid = note_id(encounter_id, principal.practitioner_id)
        current = self.records.store.current(c, "Composition", nid, for_update=True)
        amending = current is not None and current.body is not None
        if amending:
            assert current is not None
            self._check_amendment(current, facts, principal.practitioner_id, draft, note, note_type)
        when = instant(self.clock())
        composition = build_composition(
            composition_id=nid, patient_id=facts.patient_id, encounter_id=encounter_id,
            practitioner_id=principal.practitioner_id, note=note, note_type=note_type,
            status="amended" if amending else "final", date=when)
        signature = sign_note(composition, key)
        stored, _ = self.records.update_in(c, principal, "Composition", nid, composition)
        assert stored.body is not None and canonical_bytes(stored.body) == canonical_bytes(composition), \
            "the store changed the signed content"
        provenance = provenance_for(stored, signature, practitioner_id=principal.practitioner_id,
                                    address=key.public_key.to_checksum_address(), patient_id=facts.patient_id,
                                    recorded=when, amendment=amending)
        prov, _ = self.records.create_in(c, principal, provenance)
        self._delete_draft(c, principal, facts)
        assert prov.body is not None
        return SignedNote(stored.body, prov.body)

    def _check_amendment(self, current: Stored, facts: _EncounterFacts, practitioner_id: str, draft: Draft | None,
                         note: SoapNote, note_type: str) -> None:
        body = current.body or {}
        if (_refs(body.get("encounter"), "Encounter") != [facts.encounter["id"]]
                or practitioner_id not in _refs(body.get("author"), "Practitioner")):
            raise Conflict(f"Composition/{current.res_id} exists but is not this practitioner's note on this "
                           "encounter; it cannot be amended from here")
        if draft is not None and draft.base_version is not None and draft.base_version != current.version:
            raise Conflict(f"the note was signed again (version {current.version}) after this amendment was started "
                           f"from version {draft.base_version}; reload the note and make the change again")
        same_type = any(c.get("code") == note_type for c in (body.get("type") or {}).get("coding", []))
        if same_type and SoapNote.from_composition(body) == note:
            raise InvalidInput(f"the note is unchanged since version {current.version}; change it before signing "
                               "an amendment")

    # ---- reading ----------------------------------------------------------------------------

    def note_page(self, principal: Principal, encounter_id: str) -> NotePage:
        """The clinician's page: the encounter, their draft (or the signed note to amend), every
        signed version, and the Conditions and vital signs recorded on this encounter."""
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                c = uow.c
                facts = self._authorize(c, principal, encounter_id, action="read")
                draft = self._read_draft(c, principal, facts)
                patient = self.records.read_in(c, principal, "Patient", facts.patient_id).body
                uow.commit()
        assert principal.practitioner_id is not None
        nid = note_id(encounter_id, principal.practitioner_id)
        versions = self.versions(principal, nid)
        current = versions[0] if versions else None
        if draft is not None:
            form, note_type = draft.note, draft.note_type
        elif current is not None:
            form = SoapNote.from_composition(current)
            note_type = next((c.get("code") for c in current.get("type", {}).get("coding", [])
                              if c.get("code") in NOTE_TYPES), DEFAULT_NOTE_TYPE)
        else:
            form, note_type = SoapNote(), DEFAULT_NOTE_TYPE
        query = [("encounter", f"Encounter/{encounter_id}"), ("_count", "100")]
        conditions = self._entries(self.records.search(principal, "Condition", query))
        vitals = self._entries(self.records.search(principal, "Observation", [*query, ("category", "vital-signs")]))
        return NotePage(facts.encounter, patient, draft, form, note_type, current, versions, conditions, vitals)

    def versions(self, principal: Principal, composition_id: str) -> list[dict]:
        """Every signed version of a note, newest first ([] when it was never signed)."""
        if not self.records.exists("Composition", composition_id):
            return []
        bundle = self.records.history(principal, "Composition", composition_id, [("_count", "100")])
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]

    @staticmethod
    def _entries(bundle: dict) -> list[dict]:
        return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]

    def patient_notes(self, principal: Principal) -> list[tuple[dict, Verification]]:
        """The signed notes in the principal's own record (patients: "My notes"), newest first,
        each with the verification of its current version."""
        if principal.patient_id is None:
            raise Forbidden("only a patient account has its own notes")
        query = [("patient", principal.patient_id), ("_sort", "-date"), ("_count", "200")]
        notes = self._entries(self.records.search(principal, "Composition", query))
        if not notes:
            return []
        provenances = self._entries(self.records.search(
            principal, "Provenance", [("patient", principal.patient_id), ("_count", "1000")]))
        known: dict[str, list[str]] = {}
        return [(n, self._verify_with(n, provenances, known)) for n in notes]

    def composition(self, principal: Principal, composition_id: str, version: int | None = None) -> dict:
        """One Composition version through the records service (policy + audit)."""
        stored = (self.records.read(principal, "Composition", composition_id) if version is None
                  else self.records.vread(principal, "Composition", composition_id, version))
        assert stored.body is not None
        return stored.body

    def verify(self, principal: Principal, composition_id: str, version: int | None = None) -> Verification:
        """Is this Composition version signed by the practitioner its signature names, with the
        key the keystore holds for them? Reads go through the records service (policy + audit)."""
        composition = self.composition(principal, composition_id, version)
        provenances = self._entries(self.records.search(
            principal, "Provenance", [("target", f"Composition/{composition_id}"), ("_count", "1000")]))
        return self._verify_with(composition, provenances)

    def _verify_with(self, composition: dict, provenances: list[dict],
                     known: dict[str, list[str]] | None = None) -> Verification:
        ref = _version_ref(composition) or f"Composition/{composition.get('id')}"
        mine = [p for p in provenances if ref in [x.get("reference") for x in p.get("target", [])]]
        if not mine:
            return Verification(False, "no signature (Provenance) was recorded for this version", ref)
        last: Verification | None = None
        for prov in mine:
            sig = next((s for s in prov.get("signature", []) if s.get("sigFormat") == SIG_FORMAT), {})
            who = (sig.get("who") or {}).get("reference")
            practitioner = who if isinstance(who, str) and who.startswith("Practitioner/") else None
            base = dict(composition=ref, practitioner=practitioner, signed_at=sig.get("when"),
                        provenance=f"Provenance/{prov.get('id')}")
            try:
                address = verify_note(composition, prov)
            except NoteSignatureInvalid as exc:
                last = Verification(False, exc.message, **base)  # type: ignore[arg-type]
                continue
            if practitioner is None:
                last = Verification(False, "the signature names no practitioner", address=address, **base)  # type: ignore[arg-type]
                continue
            cache = known if known is not None else {}
            if practitioner not in cache:
                cache[practitioner] = self._addresses_of(practitioner.removeprefix("Practitioner/"))
            if address.lower() not in {a.lower() for a in cache[practitioner]}:
                last = Verification(False, f"signed by {address}, which is not a key of {practitioner}'s account",
                                    address=address, **base)  # type: ignore[arg-type]
                continue
            return Verification(True, f"signed by {practitioner}", address=address, **base)  # type: ignore[arg-type]
        assert last is not None
        return last

    # ---- Conditions and vital signs -----------------------------------------------------------

    def record_condition(self, principal: Principal, encounter_id: str, condition: ConditionInput) -> dict:
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                facts = self._authorize(uow.c, principal, encounter_id, action="create")
                assert principal.practitioner_id is not None
                resource = condition.resource(patient_id=facts.patient_id, encounter_id=encounter_id,
                                              practitioner_id=principal.practitioner_id,
                                              recorded=instant(self.clock()))
                stored, _ = self.records.create_in(uow.c, principal, resource)
                uow.commit()
        assert stored.body is not None
        return stored.body

    def record_vitals(self, principal: Principal, encounter_id: str, vitals: Vitals) -> list[dict]:
        """One Observation per vital sign (blood pressure as one panel), all in one commit."""
        with self._denials(principal):
            with UnitOfWork(self.engine) as uow:
                facts = self._authorize(uow.c, principal, encounter_id, action="create")
                out = []
                for obs in vitals.observations(patient_id=facts.patient_id, encounter_id=encounter_id,
                                               effective=instant(self.clock())):
                    stored, _ = self.records.create_in(uow.c, principal, obs)
                    out.append(stored.body)
                uow.commit()
        return out

    # ---- internals --------------------------------------------------------------------------

    def _denials(self, principal: Principal) -> AuditDenials:
        return AuditDenials(self.records, principal)

    def _authorize(self, c: Connection, principal: Principal, encounter_id: str, *, action: str) -> _EncounterFacts:
        """Read the encounter as the principal (records policy + audit), then ask the policy
        whether they are its practitioner; the note's rules need the encounter's facts."""
        encounter = self.records.read_in(c, principal, "Encounter", encounter_id).body
        assert encounter is not None
        patients = _refs(encounter.get("subject"), "Patient")
        practitioners = frozenset(_refs([p.get("individual") for p in encounter.get("participant", [])
                                         if isinstance(p, dict)], "Practitioner"))
        decision = policy.note_author(principal, encounter_practitioners=practitioners)
        self._deny(decision, f"the note of Encounter/{encounter_id}", action, frozenset(patients))
        if len(patients) != 1:
            raise Unprocessable(f"Encounter/{encounter_id} has no Patient subject: a note needs one patient")
        if encounter.get("status") not in NOTE_ENCOUNTER_STATUSES:
            raise Unprocessable(f"Encounter/{encounter_id} is {encounter.get('status')!r}: notes are written for "
                                f"encounters that have begun ({', '.join(sorted(NOTE_ENCOUNTER_STATUSES))})")
        return _EncounterFacts(encounter, patients[0], practitioners)

    @staticmethod
    def _deny(decision: Decision, what: str, action: str, patients: frozenset[str]) -> None:
        if not decision.allowed:
            raise AccessDenied(f"{what}: {decision.detail} ({decision.reason})", action=action,
                               reason=decision.reason, patients=patients)

    def _aead(self, c: Connection, patient_id: str, *, write: bool) -> AESGCM:
        ring = self.records.store.keys
        key_id = key_id_for({patient_id})
        return ring.for_write(c, key_id) if write else ring.for_read(c, key_id)

    @staticmethod
    def _aad(encounter_id: str, author: str) -> bytes:
        return f"note-draft/Encounter/{encounter_id}/Practitioner/{author}".encode()

    def _read_draft(self, c: Connection, principal: Principal, facts: _EncounterFacts, *,
                    for_update: bool = False) -> Draft | None:
        encounter_id = facts.encounter["id"]
        q = select(note_drafts).where(note_drafts.c.encounter_id == encounter_id,
                                      note_drafts.c.author == principal.practitioner_id)
        row = c.execute(q.with_for_update() if for_update else q).first()
        if row is None:
            return None
        self._deny(policy.own_note_draft(principal, author=row.author), "this note draft", "read",
                   frozenset({row.patient_id}))
        plain = open_sealed(self._aead(c, row.patient_id, write=False), bytes(row.body),
                            self._aad(encounter_id, row.author), what="note draft")
        data = orjson.loads(plain)
        return Draft(encounter_id, row.author, row.patient_id, SoapNote(**data["sections"]), data["type"],
                     row.composition_id, row.base_version, instant(row.updated))

    def _write_draft(self, c: Connection, principal: Principal, facts: _EncounterFacts, note: SoapNote,
                     note_type: str) -> Draft:
        assert principal.practitioner_id is not None
        author, encounter_id = principal.practitioner_id, facts.encounter["id"]
        nid = note_id(encounter_id, author)
        current = self.records.store.current(c, "Composition", nid)  # its version only: no content is read
        signed = current is not None and current.body is not None
        now = self.clock()
        plain = orjson.dumps({"type": note_type, "sections": note.as_dict()})
        body = seal(self._aead(c, facts.patient_id, write=True), plain, self._aad(encounter_id, author))
        ins = _insert(c).values(
            id=str(uuid.uuid4()), encounter_id=encounter_id, author=author, patient_id=facts.patient_id,
            composition_id=nid if signed else None, base_version=current.version if signed and current else None,
            body=body, created=now, updated=now)
        # the amendment's base stays the version the first save of this draft saw
        c.execute(ins.on_conflict_do_update(index_elements=["encounter_id", "author"],
                                            set_={"body": ins.excluded.body, "updated": ins.excluded.updated}))
        row = c.execute(select(note_drafts.c.composition_id, note_drafts.c.base_version)
                        .where(note_drafts.c.encounter_id == encounter_id, note_drafts.c.author == author)).one()
        return Draft(encounter_id, author, facts.patient_id, note, note_type, row.composition_id, row.base_version,
                     instant(now))

    @staticmethod
    def _delete_draft(c: Connection, principal: Principal, facts: _EncounterFacts) -> bool:
        gone = c.execute(delete(note_drafts).where(note_drafts.c.encounter_id == facts.encounter["id"],
                                                   note_drafts.c.author == principal.practitioner_id))
        return bool(gone.rowcount)

    def _usernames(self, *, account_id: str | None = None, practitioner_id: str | None = None) -> list[str]:
        users = t.users
        q = select(users.c.username).where(users.c.active.is_(True))
        if account_id is not None:
            q = q.where(users.c.id == account_id)
        if practitioner_id is not None:
            q = q.where(users.c.practitioner_id == practitioner_id, users.c.role == "practitioner")
        with UnitOfWork(self.engine) as uow:
            return [str(u) for u in uow.c.execute(q).scalars()]

    def _signing_key(self, principal: Principal) -> eth_keys.PrivateKey | None:
        """The principal's own key (before any unit of work: the keystore opens its own). Only a
        linked practitioner account has one worth fetching; the policy decides the rest."""
        if principal.role != "practitioner" or principal.practitioner_id is None:
            return None
        names = self._usernames(account_id=principal.subject)
        if not names:
            return None
        return self.keys.key(f"user:{names[0]}")

    def _addresses_of(self, practitioner_id: str) -> list[str]:
        out = []
        for name in self._usernames(practitioner_id=practitioner_id):
            try:
                out.append(self.keys.key(f"user:{name}", create=False).public_key.to_checksum_address())
            except NotFound:
                continue
        return out


class AuditDenials:
    """``with AuditDenials(records, principal): with UnitOfWork(...): ...`` records a policy
    denial (``AccessDenied``) in the transparency log after the failed unit of work rolled back,
    as ``records.service.audited`` does for the records use cases; the error still propagates."""

    def __init__(self, records: RecordsService, principal: Principal) -> None:
        self.records, self.principal = records, principal

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if isinstance(exc, AccessDenied):
            self.records.record_denial(self.principal, exc)

