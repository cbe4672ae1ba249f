"""De-identification of FHIR resources for research export (HIPAA Safe Harbor, with date shifting).

A study gets a key of its own (``StudyKeys.for_study``), derived from the node's research key
and the study id. Everything below is a function of that key, so:

* pseudonymous ids are **stable within a study** (the same patient, encounter or practitioner
  always gets the same pseudonym in every export to that study, so longitudinal analysis works)
  and **unlinkable across studies** (two studies' pseudonyms of one patient are two unrelated
  HMAC outputs);
* every date of a patient's data moves by the same **per-patient offset** (whole days, never
  zero, within ±365), so intervals between a patient's events are preserved while calendar dates
  are not; the offset differs between studies.

What is removed — the 18 Safe Harbor identifiers of 45 CFR 164.514(b)(2), as they appear in FHIR:

===========================================  ==============================================
identifier (164.514(b)(2)(i))                 FHIR elements
===========================================  ==============================================
(A) names                                     ``name`` (HumanName, and any other ``name``)
(B) geography smaller than a state            ``address`` keeps only ``state`` and ``country``;
                                              ``postalCode``, ``city``, ``district``, ``line``
                                              and geolocation extensions go
(C) dates (except year) of the individual     every date/dateTime/instant is shifted (see
                                              above); an age over 89 removes ``birthDate``
                                              and marks the resource ``AGE_OVER_89``
(D–G) phone, fax, e-mail                      ``telecom``
(H–K, N, R) SSN, MRN, plan, account,           every ``identifier`` (the Patient gets one
certificate/licence, other unique numbers      study pseudonym identifier instead)
(L–M) vehicle and device identifiers          ``udiCarrier``, ``serialNumber``, ``lotNumber``,
                                              ``distinctIdentifier``
(N–O) URLs, IP addresses                      attachment ``url``; absolute references
(P–Q) biometrics, full-face photographs       ``photo``; attachment ``data``
free text that may carry any of the above     narrative ``text``, ``note``, reference
                                              ``display``, ``comment``, ``description``,
                                              identifying extensions (mother's maiden name,
                                              birth place)
===========================================  ==============================================

Codes, values, units and statuses stay: they are the research data. What this module must
never do: keep an element it does not understand *because* it does not understand it where
the element is free text — the lists above are the whole rule and tests pin them.
It is pure: no I/O, no database; callers choose what to export (policy decides who may).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

__all__ = ["AGE_OVER_89", "Deidentifier", "StudyKeys", "shift_date"]

#: meta.security code set on a resource whose birthDate was removed because the age is over 89
AGE_OVER_89 = "AGE_OVER_89"
_TELELEDGER_SECURITY = "https://teleledger.dev/fhir/CodeSystem/deidentification"
_PSEUDONYM_SYSTEM = "https://teleledger.dev/fhir/NamingSystem/study-pseudonym"

#: elements dropped wherever they appear
_DROP = frozenset({
    "name", "telecom", "identifier", "photo", "contact", "text", "note", "comment", "description",
    "udiCarrier", "serialNumber", "lotNumber", "distinctIdentifier", "link", "communication",
})
#: address parts kept (Safe Harbor allows the state)
_ADDRESS_KEEP = frozenset({"state", "country", "use", "type"})
#: attachment parts kept: the kind of document, never its content or location
_ATTACHMENT_DROP = frozenset({"data", "url", "title", "hash"})
#: extensions that carry identifiers or geography finer than a state
_EXTENSION_DROP = (
    "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
    "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
    "http://hl7.org/fhir/StructureDefinition/geolocation",
    "http://hl7.org/fhir/StructureDefinition/humanname-",
)

_FULL_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?$")
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?$")
#: keys whose year or year-month values are dates (a bare "2106" elsewhere is a code)
_DATE_KEYS = re.compile(r"(Date|DateTime|Instant|Period|date|issued|start|end|recorded|authoredOn|created|"
                        r"sent|received|lastUpdated|timestamp|occurrence|onset|abatement)$")
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


@dataclass(frozen=True)
class StudyKeys:
    """The node's research key; one derived key per study."""

    research_key: bytes

    def for_study(self, study_id: str) -> bytes:
        return hmac.new(self.research_key, b"teleledger study v1\x00" + study_id.encode(), hashlib.sha256).digest()


def shift_date(value: str, days: int) -> str:
    """Shift a FHIR date/dateTime/instant by ``days``, keeping its precision and time zone."""
    m = _FULL_DATE.match(value)
    if m:
        d = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
        return d.isoformat() + (m[4] or "")
    m = _PARTIAL_DATE.match(value)
    if m:
        # a year or year-month keeps its precision: shift its first day and truncate
        d = date(int(m[1]), int(m[2] or 1), 1) + timedelta(days=days)
        return f"{d.year:04d}" if m[2] is None else f"{d.year:04d}-{d.month:02d}"
    raise ValueError(f"not a FHIR date: {value!r}")


class Deidentifier:
    """Turns one patient's resources into their de-identified form for one study."""

    def __init__(self, study_key: bytes, *, today: Callable[[], date] = date.today) -> None:
        self._key = study_key
        self._today = today

    def pseudonym(self, resource_type: str, resource_id: str) -> str:
        digest = hmac.new(self._key, f"id\x00{resource_type}/{resource_id}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:20]).decode().lower().rstrip("=")

    def offset_days(self, patient_id: str) -> int:
        """The patient's date shift in this study: whole days in [-365, -1] ∪ [1, 365]."""
        n = int.from_bytes(hmac.new(self._key, f"shift\x00{patient_id}".encode(), hashlib.sha256).digest()[:4], "big")
        days = n % 730 + 1  # 1..730
        return days if days <= 365 else 365 - days  # 1..365 or -1..-365

    def resources(self, patient_id: str, resources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for resource in resources:
            yield self.resource(patient_id, resource)

    def resource(self, patient_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        """A de-identified deep copy of ``resource`` (a resource of patient ``patient_id``)."""
        days = self.offset_days(patient_id)
        rtype = resource["resourceType"]
        out = self._walk(resource, days, key="")
        out["resourceType"] = rtype
        if "id" in resource:
            out["id"] = self.pseudonym(rtype, str(resource["id"]))
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k in ("profile", "security")}
        out.pop("meta", None)
        if rtype == "Patient":
            out["identifier"] = [{"system": _PSEUDONYM_SYSTEM, "value": out.get("id", "")}]
            if self._over_89(resource):
                out.pop("birthDate", None)
                meta.setdefault("security", []).append({"system": _TELELEDGER_SECURITY, "code": AGE_OVER_89})
        if meta:
            out["meta"] = meta
        return out

    # -- internals ----------------------------------------------------------------------------

    def _over_89(self, patient: dict[str, Any]) -> bool:
        birth = patient.get("birthDate")
        if not isinstance(birth, str) or not _FULL_DATE.match(birth) and not _PARTIAL_DATE.match(birth):
            return False
        year = int(birth[:4])
        month, day = (int(birth[5:7]), int(birth[8:10])) if len(birth) >= 10 else (1, 1)
        end = self._today()
        deceased = patient.get("deceasedDateTime")
        if isinstance(deceased, str) and _FULL_DATE.match(deceased):
            end = datetime.fromisoformat(deceased[:10]).date()
        age = end.year - year - ((end.month, end.day) < (month, day))
        return age > 89

    def _walk(self, value: Any, days: int, *, key: str) -> Any:
        if isinstance(value, dict):
            return self._object(value, days, key=key)
        if isinstance(value, list):
            items = (self._walk(v, days, key=key) for v in value)
            return [v for v in items if v is not None and v != {}]
        if isinstance(value, str):
            if _FULL_DATE.match(value) or (_PARTIAL_DATE.match(value) and _DATE_KEYS.search(key)):
                return shift_date(value, days)
        return value

    def _object(self, obj: dict[str, Any], days: int, *, key: str) -> dict[str, Any] | None:
        url = obj.get("url")
        if key in ("extension", "modifierExtension") and isinstance(url, str) and url.startswith(_EXTENSION_DROP):
            return None
        if key == "address" or key.endswith("Address"):
            return {k: v for k, v in obj.items() if k in _ADDRESS_KEEP} or None
        out: dict[str, Any] = {}
        is_attachment = "contentType" in obj and ("data" in obj or "url" in obj)
        for k, v in obj.items():
            if k in _DROP or k.startswith("_") or (is_attachment and k in _ATTACHMENT_DROP):
                continue
            if k == "display" and "reference" in obj:
                continue
            if k == "reference" and isinstance(v, str):
                ref = self._reference(v)
                if ref is not None:
                    out[k] = ref
                continue
            walked = self._walk(v, days, key=k)
            if walked is not None and walked != {} and walked != []:
                out[k] = walked
        return out or None

    def _reference(self, ref: str) -> str | None:
        m = _REFERENCE.match(ref)
        if not m:
            return None  # absolute URLs, conditional and contained references could identify
        return f"{m[1]}/{self.pseudonym(m[1], m[2])}"
