"""Safe Harbor de-identification of real Synthea records (records.deidentify)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.records.deidentify import AGE_OVER_89, Deidentifier, StudyKeys, shift_date

SAMPLES = Path(__file__).resolve().parents[3] / "samples" / "synthea-10"
KEYS = StudyKeys(b"r" * 32)


def _load(resource_type: str) -> list[dict]:
    path = SAMPLES / f"{resource_type}.000.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _strings(value) -> list[str]:  # type: ignore[no-untyped-def]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.fixture
def study_a() -> Deidentifier:
    return Deidentifier(KEYS.for_study("study-a"), today=lambda: date(2026, 11, 25))


def test_no_identifying_value_of_a_synthea_patient_survives(study_a: Deidentifier) -> None:
    for patient in _load("Patient"):
        out = study_a.resource(patient["id"], patient)
        text = json.dumps(out)
        identifying = [n for name in patient.get("name", []) for n in [name.get("family", "")] + name.get("given", [])]
        identifying += [t["value"] for t in patient.get("telecom", [])]
        identifying += [i["value"] for i in patient.get("identifier", [])]
        identifying += [a.get("city", "") for a in patient.get("address", [])]
        identifying += [a.get("postalCode", "") for a in patient.get("address", []) if a.get("postalCode")]
        identifying += [line for a in patient.get("address", []) for line in a.get("line", [])]
        identifying.append(patient["id"])
        for value in filter(None, identifying):
            assert value not in text, f"{value!r} survived de-identification"
        assert "text" not in out and "telecom" not in out and "name" not in out
        assert all(set(a) <= {"state", "country", "use", "type"} for a in out.get("address", []))
        assert out["identifier"] == [{"system": "https://teleledger.dev/fhir/NamingSystem/study-pseudonym",
                                      "value": out["id"]}]


def test_codes_and_values_stay_because_they_are_the_research_data(study_a: Deidentifier) -> None:
    condition = _load("Condition")[0]
    patient_id = condition["subject"]["reference"].split("/")[-1].removeprefix("urn:uuid:")
    out = study_a.resource(patient_id, condition)
    assert out["code"]["coding"][0]["code"] == condition["code"]["coding"][0]["code"]
    assert out["clinicalStatus"] == condition["clinicalStatus"]


def test_every_date_of_one_patient_moves_by_the_same_offset(study_a: Deidentifier) -> None:
    encounter = _load("Encounter")[0]
    out = study_a.resource("p1", encounter)
    days = study_a.offset_days("p1")
    assert days != 0 and -365 <= days <= 365
    assert out["period"]["start"] == shift_date(encounter["period"]["start"], days)
    before = date.fromisoformat(encounter["period"]["start"][:10])
    after = date.fromisoformat(out["period"]["start"][:10])
    assert (after - before).days == days


def test_pseudonyms_are_stable_within_a_study_and_unlinkable_across_studies(study_a: Deidentifier) -> None:
    study_b = Deidentifier(KEYS.for_study("study-b"))
    assert study_a.pseudonym("Patient", "123") == Deidentifier(KEYS.for_study("study-a")).pseudonym("Patient", "123")
    assert study_a.pseudonym("Patient", "123") != study_b.pseudonym("Patient", "123")
    assert study_a.pseudonym("Patient", "123") != study_a.pseudonym("Patient", "124")
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/123", "display": "Jane Doe"}}
    out = study_a.resource("123", obs)
    assert out["subject"] == {"reference": f"Patient/{study_a.pseudonym('Patient', '123')}"}


def test_absolute_and_conditional_references_are_dropped(study_a: Deidentifier) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "https://other.example/fhir/Patient/9"},
           "performer": [{"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999"}]}
    out = study_a.resource("9", obs)
    assert "subject" not in out and "performer" not in out


def test_a_patient_over_89_loses_the_birth_date(study_a: Deidentifier) -> None:
    old = {"resourceType": "Patient", "id": "old", "birthDate": "1930-01-01", "gender": "male"}
    out = study_a.resource("old", old)
    assert "birthDate" not in out
    assert {"system": "https://teleledger.dev/fhir/CodeSystem/deidentification", "code": AGE_OVER_89} \
        in out["meta"]["security"]
    young = study_a.resource("young", {"resourceType": "Patient", "id": "young", "birthDate": "1990-06-15"})
    assert young["birthDate"] != "1990-06-15" and len(young["birthDate"]) == 10


def test_documents_lose_their_content_and_keep_their_kind(study_a: Deidentifier) -> None:
    doc = _load("DocumentReference")[0]
    out = study_a.resource("p", doc)
    for content in out.get("content", []):
        attachment = content.get("attachment", {})
        assert "data" not in attachment and "url" not in attachment
        assert attachment.get("contentType")


def test_device_identifiers_are_removed(study_a: Deidentifier) -> None:
    for device in _load("Device")[:5]:
        out = study_a.resource("p", device)
        strings = _strings(out)
        for field in ("serialNumber", "lotNumber", "distinctIdentifier"):
            if device.get(field):
                assert device[field] not in strings
        assert "udiCarrier" not in out


def test_year_like_codes_are_not_taken_for_dates(study_a: Deidentifier) -> None:
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "urn:x", "code": "2106"}]}, "issued": "2020"}
    out = study_a.resource("p", obs)
    assert out["code"]["coding"][0]["code"] == "2106"
    assert out["issued"] == shift_date("2020", study_a.offset_days("p"))


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 1, 1)), st.integers(-365, 365))
def test_shifting_a_date_keeps_its_precision(d: date, days: int) -> None:
    assert date.fromisoformat(shift_date(d.isoformat(), days)) == d + __import__("datetime").timedelta(days=days)
    assert len(shift_date(d.isoformat()[:7], days)) == 7
    assert shift_date(d.isoformat() + "T10:00:00+02:00", days).endswith("T10:00:00+02:00")
