"""Sensitivity labels of FHIR resources (teleledger.policy.sensitivity)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.policy.sensitivity import (
    ACTCODE_SYSTEM,
    LABELS,
    LOINC_LABELS,
    SECURITY_CODE_LABELS,
    SNOMED_LABELS,
    classify,
    icd10_labels,
    normalize_label,
)

ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def condition(system: str, code: str, **extra) -> dict:
    return {"resourceType": "Condition", "code": {"coding": [{"system": system, "code": code}]}, **extra}


def secured(*codes: str, system: str = ACTCODE_SYSTEM) -> dict:
    return {
        "resourceType": "DocumentReference",
        "meta": {"security": [{"system": system, "code": c} for c in codes]},
    }


# -- meta.security --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("PSY", "PSY"),
        ("MH", "PSY"),
        ("BH", "PSY"),
        ("PSYTHPN", "PSY"),
        ("HIV", "HIV"),
        ("ETH", "ETH"),
        ("SUD", "ETH"),
        ("OPIOIDUD", "ETH"),
        ("GDIS", "GDIS"),
        ("SEX", "SEX"),
        ("STD", "SEX"),
        ("PREGNANT", "SEX"),
    ],
)
def test_a_v3_sensitivity_code_in_meta_security_gives_its_canonical_label(code, label):
    assert classify(secured(code)) == {label}


def test_security_codes_without_the_v3_actcode_system_are_ignored():
    assert classify(secured("HIV", system="http://example.org/codes")) == frozenset()
    assert classify({"resourceType": "Observation", "meta": {"security": [{"code": "HIV"}]}}) == frozenset()


def test_confidentiality_codes_and_other_sensitivities_give_no_label():
    confidentiality = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    assert classify(secured("R", "V", system=confidentiality)) == frozenset()
    assert classify(secured("SDV", "TBOO", "MST")) == frozenset()


def test_several_security_codes_give_several_labels():
    assert classify(secured("HIV", "MH", "R")) == {"HIV", "PSY"}


def test_normalize_label_folds_aliases_and_rejects_unknown_codes():
    assert normalize_label("MH") == "PSY"
    assert normalize_label("ETHUD") == "ETH"
    assert normalize_label("R") is None


# -- clinical codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "labels"),
    [
        ("F32.9", {"PSY"}),
        ("F329", {"PSY"}),
        ("f41.1", {"PSY"}),
        ("F10.20", {"PSY", "ETH"}),
        ("F19", {"PSY", "ETH"}),
        ("F20", {"PSY"}),
        ("B20", {"HIV"}),
        ("B24", {"HIV"}),
        ("B25.0", set()),
        ("Z21", {"HIV"}),
        ("R75", {"HIV"}),
        ("O98.7", {"HIV", "SEX"}),
        ("O80", {"SEX"}),
        ("O9A.1", {"SEX"}),
        ("Z30.0", {"SEX"}),
        ("Z39.2", {"SEX"}),
        ("Z40", set()),
        ("A54.9", {"SEX"}),
        ("A49", set()),
        ("N97.9", {"SEX"}),
        ("Q90.9", {"GDIS"}),
        ("Q89", set()),
        ("Z15.01", {"GDIS"}),
        ("I10", set()),
        ("F", set()),
    ],
)
def test_icd10_ranges_give_the_documented_labels(code, labels):
    assert icd10_labels(code) == labels


@pytest.mark.parametrize("system", [ICD10, ICD10CM])
def test_a_condition_coded_in_icd10_or_icd10cm_is_labelled(system):
    assert classify(condition(system, "F33.1")) == {"PSY"}


def test_an_hiv_test_observation_is_labelled_hiv():
    obs = {"resourceType": "Observation", "code": {"coding": [{"system": LOINC, "code": "56888-1"}]}}
    assert classify(obs) == {"HIV"}


def test_a_genetics_report_is_labelled_by_its_category_or_its_loinc_code():
    report = {
        "resourceType": "DiagnosticReport",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "GE"}]}],
        "code": {"coding": [{"system": LOINC, "code": "11502-2"}]},
    }
    assert classify(report) == {"GDIS"}
    panel = {"resourceType": "Observation", "code": {"coding": [{"system": LOINC, "code": "81247-9"}]}}
    assert classify(panel) == {"GDIS"}


def test_synthea_style_conditions_and_procedures_are_labelled_from_snomed():
    assert classify(condition(SNOMED, "72892002")) == {"SEX"}  # Normal pregnancy
    assert classify(condition(SNOMED, "80583007")) == {"PSY"}  # Severe anxiety (panic)
    procedure = {"resourceType": "Procedure", "code": {"coding": [{"system": SNOMED, "code": "713106006"}]}}
    assert classify(procedure) == {"ETH"}  # Screening for drug abuse
    assert classify(condition(SNOMED, "160903007")) == frozenset()  # Full-time employment


def test_reason_codes_count_too():
    request = {
        "resourceType": "MedicationRequest",
        "reasonCode": [{"coding": [{"system": ICD10, "code": "B20"}]}],
    }
    assert classify(request) == {"HIV"}


def test_labels_from_security_and_codes_are_combined():
    resource = condition(ICD10, "F32.1", meta={"security": [{"system": ACTCODE_SYSTEM, "code": "ETH"}]})
    assert classify(resource) == {"PSY", "ETH"}


def test_an_ordinary_resource_has_no_label():
    assert classify({"resourceType": "Observation", "code": {"coding": [{"system": LOINC, "code": "8867-4"}]}}) == (
        frozenset()
    )
    assert classify({"resourceType": "Patient"}) == frozenset()


def test_malformed_elements_are_skipped_not_fatal():
    odd = {
        "resourceType": "Observation",
        "meta": {"security": "PSY"},
        "code": {"coding": "B20"},
        "category": [None, {"coding": [None, {"system": ICD10}]}],
    }
    assert classify(odd) == frozenset()


def test_every_table_maps_only_to_canonical_labels():
    assert set(SECURITY_CODE_LABELS.values()) == LABELS
    for table in (LOINC_LABELS, SNOMED_LABELS):
        for labels in table.values():
            assert labels and labels <= LABELS


@given(st.text(max_size=8))
def test_icd10_labels_never_fail_and_stay_canonical(code):
    assert icd10_labels(code) <= LABELS
