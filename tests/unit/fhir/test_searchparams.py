"""Search-parameter definitions, the path evaluator and index extraction (teleledger.fhir.searchparams)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.fhir import searchparams as sp
from teleledger.fhir.searchparams import (
    MAX_US,
    MIN_US,
    DateEntry,
    NumberEntry,
    QuantityEntry,
    ReferenceEntry,
    SearchParam,
    StringEntry,
    TokenEntry,
    UriEntry,
    date_range,
    evaluate,
    extract,
    extract_param,
    normalize_string,
    params_for,
    parse_reference,
    supported_types,
)

_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "samples" / "synthea-10",
    Path("/work/shared/fhir-samples/synthea-10"),
)
SAMPLES = next((p for p in _CANDIDATES if p.is_dir()), None)


@lru_cache(maxsize=None)
def synthea(resource_type: str) -> tuple[dict, ...]:
    if SAMPLES is None:
        pytest.skip("Synthea samples not found (samples/synthea-10)")
    path = SAMPLES / f"{resource_type}.000.ndjson"
    if not path.exists():
        return ()
    with path.open() as f:
        return tuple(json.loads(line) for line in f)


def by_id(resource_type: str, rid: str) -> dict:
    return next(r for r in synthea(resource_type) if r["id"] == rid)


def us(*args: int) -> int:
    """Microseconds since the epoch of a UTC datetime given by its fields."""
    return (datetime(*args, tzinfo=timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def entries(resource: dict, param: str) -> list:
    return [e for e in extract(resource) if e.param == param]


SUMIKO = "129c6ac7-8d06-89de-ad63-0204a93e76c3"  # first Patient of the Synthea set


# ---- the path evaluator --------------------------------------------------------------------


def test_a_dotted_path_flattens_arrays_at_every_step():
    patient = by_id("Patient", SUMIKO)
    assert evaluate(patient, "Patient.name.given") == ["Sumiko254", "Larue605", "Sumiko254", "Larue605"]
    assert evaluate(patient, "Patient.name.family") == ["Medhurst46", "Cummerata161"]


def test_a_path_to_an_absent_element_yields_nothing():
    assert evaluate({"resourceType": "Patient"}, "Patient.name.given") == []
    assert evaluate({"resourceType": "Patient", "name": []}, "Patient.name.given") == []


def test_a_path_does_not_walk_through_a_primitive():
    assert evaluate({"resourceType": "Patient", "gender": "female"}, "Patient.gender.text") == []


def test_a_choice_element_matches_every_type_suffix_and_nothing_else():
    obs = {"resourceType": "Observation", "effectiveDateTime": "2020", "effectiveness": "not a choice"}
    assert evaluate(obs, "Observation.effective[x]") == ["2020"]
    period = {"start": "2020"}
    assert evaluate({"resourceType": "Observation", "effectivePeriod": period}, "Observation.effective[x]") == [period]


def test_as_restricts_a_choice_element_to_one_type():
    q = {"value": 5}
    assert evaluate({"resourceType": "Observation", "valueQuantity": q}, "Observation.value.as(Quantity)") == [q]
    assert evaluate({"resourceType": "Observation", "valueString": "5"}, "Observation.value.as(Quantity)") == []
    assert evaluate({"resourceType": "Condition", "onsetDateTime": "2020"}, "Condition.onset.as(dateTime)") == ["2020"]


def test_where_keeps_only_items_whose_child_equals_the_literal():
    p = {"resourceType": "Patient", "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}]}
    assert evaluate(p, "Patient.telecom.where(system='email')") == [{"system": "email", "value": "a@b"}]
    assert evaluate(p, "Patient.telecom.where(system='fax')") == []


def test_exists_is_true_only_for_a_value_that_is_not_false():
    path = "Patient.deceased[x].exists()"
    assert evaluate({"resourceType": "Patient", "deceasedBoolean": False}, path) == [False]
    assert evaluate({"resourceType": "Patient", "deceasedBoolean": True}, path) == [True]
    assert evaluate({"resourceType": "Patient", "deceasedDateTime": "1989-05-09"}, path) == [True]
    assert evaluate({"resourceType": "Patient"}, path) == [False]


@pytest.mark.parametrize(
    "path", ["patient.name", "Patient..name", "Patient.name.where(system=email)", "Patient.exists().name", "Patient.as(X)"]
)
def test_a_malformed_path_is_a_programming_error(path):
    with pytest.raises(ValueError):
        evaluate({"resourceType": "Patient"}, path)


# ---- token ---------------------------------------------------------------------------------


def test_the_ssn_identifier_of_a_synthea_patient_is_a_system_and_value_token():
    tokens = entries(by_id("Patient", SUMIKO), "identifier")
    assert TokenEntry("identifier", "http://hl7.org/fhir/sid/us-ssn", "999-94-5397") in tokens
    assert len(tokens) == 5


def test_a_codeable_concept_gives_one_token_per_coding_and_none_for_its_text():
    doc = synthea("DocumentReference")[0]
    assert entries(doc, "type") == [
        TokenEntry("type", "http://loinc.org", "34117-2"),
        TokenEntry("type", "http://loinc.org", "51847-2"),
    ]
    text_only = {"resourceType": "Condition", "code": {"text": "back pain"}}
    assert entries(text_only, "code") == []


def test_a_coding_gives_its_system_and_code():
    enc = synthea("Encounter")[0]
    assert entries(enc, "class") == [TokenEntry("class", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")]


def test_a_code_primitive_is_a_token_without_system():
    assert entries(by_id("Patient", SUMIKO), "gender") == [TokenEntry("gender", None, "female")]


def test_booleans_are_the_tokens_true_and_false():
    org = synthea("Organization")[0]
    assert entries(org, "active") == [TokenEntry("active", None, "true")]
    assert entries({"resourceType": "Patient", "active": False}, "active") == [TokenEntry("active", None, "false")]


def test_contact_points_are_tokens_of_their_value_and_phone_and_email_select_by_system():
    p = {
        "resourceType": "Patient",
        "telecom": [
            {"system": "phone", "value": "555-810-7203", "use": "home"},
            {"system": "email", "value": "sumiko@example.org"},
        ],
    }
    assert entries(p, "telecom") == [TokenEntry("telecom", None, "555-810-7203"), TokenEntry("telecom", None, "sumiko@example.org")]
    assert entries(p, "phone") == [TokenEntry("phone", None, "555-810-7203")]
    assert entries(p, "email") == [TokenEntry("email", None, "sumiko@example.org")]


def test_a_synthea_practitioner_email_is_indexed_under_telecom():
    pract = synthea("Practitioner")[0]
    assert entries(pract, "telecom") == [TokenEntry("telecom", None, "Irvin970.Emard19@example.com")]


def test_deceased_is_true_for_a_death_date_and_false_when_absent():
    assert entries(by_id("Patient", SUMIKO), "deceased") == [TokenEntry("deceased", None, "true")]
    alive = next(p for p in synthea("Patient") if "deceasedDateTime" not in p)
    assert entries(alive, "deceased") == [TokenEntry("deceased", None, "false")]


# ---- string --------------------------------------------------------------------------------


def test_a_human_name_gives_each_part_and_for_name_also_the_full_name():
    names = [e.value for e in entries(by_id("Patient", SUMIKO), "name")]
    assert names == [
        "Medhurst46", "Sumiko254", "Larue605", "Mrs.", "Sumiko254 Larue605 Medhurst46",
        "Cummerata161", "Sumiko254 Larue605 Cummerata161",
    ]  # fmt: skip
    assert [e.value for e in entries(by_id("Patient", SUMIKO), "family")] == ["Medhurst46", "Cummerata161"]
    assert [e.value for e in entries(by_id("Patient", SUMIKO), "given")] == ["Sumiko254", "Larue605"]


def test_a_name_text_is_indexed_and_a_single_part_name_adds_no_full_name():
    p = {"resourceType": "Patient", "name": [{"text": "Zoë Ångström"}, {"family": "Solo"}]}
    assert entries(p, "name") == [StringEntry("name", "Zoë Ångström"), StringEntry("name", "Solo")]


def test_an_address_gives_line_city_state_postal_code_and_country():
    assert [e.value for e in entries(by_id("Patient", SUMIKO), "address")] == [
        "633 Abernathy Landing", "Emporia", "KS", "66801", "US",
    ]  # fmt: skip
    assert entries(by_id("Patient", SUMIKO), "address-city") == [StringEntry("address-city", "Emporia")]


def test_an_organization_name_includes_its_aliases():
    org = {"resourceType": "Organization", "name": "Newman Regional Health", "alias": ["NRH", "Newman"]}
    assert [e.value for e in entries(org, "name")] == ["Newman Regional Health", "NRH", "Newman"]


def test_json_nulls_and_empty_strings_are_not_indexed():
    p = {"resourceType": "Patient", "name": [{"given": ["A", None, ""]}], "gender": ""}
    assert entries(p, "given") == [StringEntry("given", "A")]
    assert entries(p, "gender") == []


# ---- date ----------------------------------------------------------------------------------


def test_an_encounter_period_is_a_range_from_its_start_second_to_the_end_of_its_end_second():
    enc = synthea("Encounter")[0]  # 1989-10-04T02:25:16-04:00 .. 1989-10-04T06:20:16-04:00
    assert entries(enc, "date") == [DateEntry("date", us(1989, 10, 4, 6, 25, 16), us(1989, 10, 4, 10, 20, 16) + 999_999)]
    assert entries(enc, "date")[0].low == 623_485_516_000_000


def test_a_birth_date_covers_the_whole_day_in_utc():
    assert entries(by_id("Patient", SUMIKO), "birthdate") == [
        DateEntry("birthdate", us(1927, 5, 21), us(1927, 5, 22) - 1)
    ]


def test_a_period_with_an_open_end_reaches_the_end_of_time_and_an_open_start_the_beginning():
    open_end = {"resourceType": "Encounter", "period": {"start": "2024-01-01"}}
    assert entries(open_end, "date") == [DateEntry("date", us(2024, 1, 1), MAX_US)]
    open_start = {"resourceType": "Encounter", "period": {"end": "2024-01-01"}}
    assert entries(open_start, "date") == [DateEntry("date", MIN_US, us(2024, 1, 2) - 1)]
    assert entries({"resourceType": "Encounter", "period": {}}, "date") == []


def test_a_timing_is_indexed_by_its_events():
    obs = {"resourceType": "Observation", "effectiveTiming": {"event": ["2020-01-01", "2020-02-01"]}}
    assert entries(obs, "date") == [
        DateEntry("date", us(2020, 1, 1), us(2020, 1, 2) - 1),
        DateEntry("date", us(2020, 2, 1), us(2020, 2, 2) - 1),
    ]


def test_onset_date_takes_a_date_time_or_period_but_not_free_text():
    assert entries({"resourceType": "Condition", "onsetString": "in childhood"}, "onset-date") == []
    cond = {"resourceType": "Condition", "onsetPeriod": {"start": "2001", "end": "2002"}}
    assert entries(cond, "onset-date") == [DateEntry("onset-date", us(2001, 1, 1), us(2003, 1, 1) - 1)]


def test_a_malformed_date_in_a_resource_fails_the_write_and_names_the_parameter():
    with pytest.raises(InvalidInput) as exc:
        extract({"resourceType": "Patient", "birthDate": "1927-02-30"})
    assert "birthdate" in exc.value.message and "1927-02-30" in exc.value.message
    assert exc.value.expression == "Patient.birthDate"


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("1927", us(1927, 1, 1), us(1928, 1, 1) - 1),
        ("1927-05", us(1927, 5, 1), us(1927, 6, 1) - 1),
        ("1927-12", us(1927, 12, 1), us(1928, 1, 1) - 1),
        ("1927-05-21", us(1927, 5, 21), us(1927, 5, 22) - 1),
        ("2024-02", us(2024, 2, 1), us(2024, 2, 29, 23, 59, 59, 999_999)),  # leap year
        ("2023-02", us(2023, 2, 1), us(2023, 2, 28, 23, 59, 59, 999_999)),
        ("2000-02-29", us(2000, 2, 29), us(2000, 3, 1) - 1),  # divisible by 400: leap
        ("2020-03-04T05:06", us(2020, 3, 4, 5, 6), us(2020, 3, 4, 5, 7) - 1),
        ("2020-03-04T05:06:07", us(2020, 3, 4, 5, 6, 7), us(2020, 3, 4, 5, 6, 8) - 1),
        ("2020-03-04T05:06:07Z", us(2020, 3, 4, 5, 6, 7), us(2020, 3, 4, 5, 6, 8) - 1),
        ("2020-03-04T05:06:07.8", us(2020, 3, 4, 5, 6, 7, 800_000), us(2020, 3, 4, 5, 6, 7, 899_999)),
        ("2020-03-04T05:06:07.824", us(2020, 3, 4, 5, 6, 7, 824_000), us(2020, 3, 4, 5, 6, 7, 824_999)),
        ("2020-03-04T05:06:07.123456789", us(2020, 3, 4, 5, 6, 7, 123_456), us(2020, 3, 4, 5, 6, 7, 123_456)),
        ("1989-10-04T02:25:16-04:00", us(1989, 10, 4, 6, 25, 16), us(1989, 10, 4, 6, 25, 17) - 1),
        ("2020-01-01T00:00:00+05:30", us(2019, 12, 31, 18, 30), us(2019, 12, 31, 18, 30, 1) - 1),
        ("2020-12-31T23:30:00-01:00", us(2021, 1, 1, 0, 30), us(2021, 1, 1, 0, 30, 1) - 1),
        ("2016-12-31T23:59:60Z", us(2016, 12, 31, 23, 59, 59, 999_999), us(2016, 12, 31, 23, 59, 59, 999_999)),
        ("9999", us(9999, 1, 1), MAX_US),
        ("0001-01-01T00:00:00+14:00", MIN_US, MIN_US),  # before year 1 in UTC: pinned to the open end
        ("0001-01-01T14:00:00.5+14:00", MIN_US + 500_000, MIN_US + 599_999),
        ("9999-12-31T23:00:00-14:00", MAX_US, MAX_US),
        ("1989-10-04T02:25:16+14:00", us(1989, 10, 3, 12, 25, 16), us(1989, 10, 3, 12, 25, 17) - 1),
        ("1989-10-04T02:25:16-14:00", us(1989, 10, 4, 16, 25, 16), us(1989, 10, 4, 16, 25, 17) - 1),
    ],
)
def test_a_date_covers_the_range_its_precision_gives_in_utc(text, low, high):
    assert date_range(text) == (low, high)


def test_the_open_ends_are_the_first_and_last_microsecond_of_years_1_and_9999():
    assert MIN_US == us(1, 1, 1) == -62_135_596_800_000_000
    assert MAX_US == us(9999, 12, 31, 23, 59, 59, 999_999)


@pytest.mark.parametrize(
    "text",
    [
        "", "19", "1927-5", "1927-13", "1927-00", "2023-02-29", "1900-02-29", "2020-04-31", "2020-01-01T24:00",
        "2020-01-01T10:60", "2020-01-01T10:00:61", "2020-01-01T10", "2020-01-01T10:00+15:00", "2020-01-01 10:00",
        "20200101", "0000", "2020-01-01T10:00:00.", "yesterday", "1989-W40-4T02:25:16-04:00",
        "1989-10-04T24:00:00-04:00", "1989-10-04T02:25:16+14:01", "1989-10-04T02:25:16-14:30", "1989-10-04T02:25:16+0400Z",
        "1989-10-04T02:25:16.000-04:0", "１９８９-10-04T02:25:16-04:00", "１９８９", "1989-10-04T02:25:1٦Z",
    ],
)
def test_a_malformed_date_is_invalid_input_that_names_the_parameter_and_the_accepted_forms(text):
    with pytest.raises(InvalidInput) as exc:
        date_range(text, param="birthdate")
    assert "'birthdate'" in exc.value.message and "YYYY-MM-DD" in exc.value.message


@given(
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
    st.sampled_from(["", ".1", ".12", ".123", ".123456", ".1234567"]),
)
def test_a_date_time_with_a_zone_is_the_utc_instant_datetime_computes(local, offset_minutes, fraction):
    """Both the fast path (seconds, zone) and the general parser agree with the standard library."""
    zone = timezone(timedelta(minutes=offset_minutes))
    local = local.replace(microsecond=0)
    sign = "-" if offset_minutes < 0 else "+"
    hh, mm = divmod(abs(offset_minutes), 60)
    for tz in ([f"{sign}{hh:02d}:{mm:02d}"] + (["Z"] if offset_minutes == 0 else [])):
        text = local.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + fraction + tz
        digits = fraction[1:7]
        frac_us = int(digits.ljust(6, "0")) if digits else 0
        width = 10 ** (6 - len(fraction[1:])) if 0 < len(fraction[1:]) < 6 else (1 if fraction else 1_000_000)
        low = (local.replace(tzinfo=zone, microsecond=frac_us) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
        assert date_range(text) == (low, low + width - 1), text


def test_a_date_that_is_not_a_string_is_invalid_input():
    with pytest.raises(InvalidInput):
        date_range(1927)  # type: ignore[arg-type]


# ---- reference -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("Patient/123", ("Patient", "123")),
        ("Patient/a-b.c", ("Patient", "a-b.c")),
        ("Patient/123/_history/4", ("Patient", "123")),
        ("https://fhir.example.org/r4/Patient/123", ("Patient", "123")),
        ("http://x/Patient/123/_history/2", ("Patient", "123")),
        ("urn:uuid:9d8f0bc1-2b0c-4e0b-8c6c-3c7e2a7b0c11", None),
        ("urn:oid:1.2.3", None),
        ("#p1", None),
        ("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999974592", None),
        ("https://example.org/docs/readme", None),
    ],
)
def test_parse_reference_reads_relative_versioned_and_absolute_references(ref, parsed):
    assert parse_reference(ref) == parsed


@pytest.mark.parametrize("ref", ["Patient/", "patient/1", "Patient/a b", "123", "Patient/" + "x" * 65, ""])
def test_parse_reference_rejects_malformed_relative_references(ref):
    if ref == "":
        assert parse_reference(ref) is None  # an empty reference names nothing
        return
    with pytest.raises(ValueError):
        parse_reference(ref)


def test_a_literal_reference_is_indexed_by_type_and_id():
    enc = synthea("Encounter")[0]
    assert entries(enc, "patient") == [ReferenceEntry("patient", "Patient", "79a66c97-6131-3213-f3c9-4606946ab056")]
    assert entries(enc, "subject") == [ReferenceEntry("subject", "Patient", "79a66c97-6131-3213-f3c9-4606946ab056")]


def test_conditional_references_of_synthea_are_not_indexed():
    enc = synthea("Encounter")[0]  # participant, location and serviceProvider are Type?identifier=…
    assert entries(enc, "practitioner") == entries(enc, "location") == entries(enc, "service-provider") == []


def test_identifier_only_references_are_not_indexed():
    role = synthea("PractitionerRole")[0]
    assert entries(role, "practitioner") == entries(role, "organization") == []


def test_the_targets_of_a_parameter_filter_the_references_it_indexes():
    obs = {"resourceType": "Observation", "subject": {"reference": "Group/g1"}}
    assert entries(obs, "patient") == []
    assert entries(obs, "subject") == [ReferenceEntry("subject", "Group", "g1")]
    enc = {"resourceType": "Encounter", "participant": [{"individual": {"reference": "PractitionerRole/r1"}},
                                                        {"individual": {"reference": "Practitioner/p1"}}]}
    assert entries(enc, "practitioner") == [ReferenceEntry("practitioner", "Practitioner", "p1")]
    assert entries(enc, "participant") == [ReferenceEntry("participant", "PractitionerRole", "r1"),
                                           ReferenceEntry("participant", "Practitioner", "p1")]


def test_contained_urn_and_versioned_references_are_handled():
    obs = {
        "resourceType": "Observation",
        "performer": [{"reference": "#p1"}, {"reference": "urn:uuid:1"}, {"reference": "Practitioner/p9/_history/3"}],
    }
    assert entries(obs, "performer") == [ReferenceEntry("performer", "Practitioner", "p9")]


def test_a_malformed_reference_in_a_resource_fails_the_write():
    with pytest.raises(InvalidInput) as exc:
        extract({"resourceType": "Observation", "subject": {"reference": "Patient/"}})
    assert "'patient'" in exc.value.message or "'subject'" in exc.value.message
    assert "Type/id" in exc.value.message


def test_audit_event_patient_is_the_entity_that_is_a_patient():
    event = {
        "resourceType": "AuditEvent",
        "agent": [{"who": {"reference": "Patient/agent-patient"}}],
        "entity": [{"what": {"reference": "Patient/p1"}}, {"what": {"reference": "Observation/o1"}}],
    }
    assert entries(event, "patient") == [ReferenceEntry("patient", "Patient", "p1")]
    assert entries(event, "entity") == [ReferenceEntry("entity", "Patient", "p1"), ReferenceEntry("entity", "Observation", "o1")]


# ---- quantity, number, uri -----------------------------------------------------------------


def test_a_value_quantity_keeps_the_exact_decimal_and_its_units():
    obs = {
        "resourceType": "Observation",
        "valueQuantity": {"value": 6.3, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    }
    assert entries(obs, "value-quantity") == [
        QuantityEntry("value-quantity", Decimal("6.3"), "http://unitsofmeasure.org", "mmol/L", "mmol/L")
    ]
    assert entries({"resourceType": "Observation", "valueQuantity": {"value": 120}}, "value-quantity") == [
        QuantityEntry("value-quantity", Decimal(120), None, None, None)
    ]


def test_non_quantity_values_and_quantities_without_value_are_not_indexed():
    assert entries({"resourceType": "Observation", "valueString": "high"}, "value-quantity") == []
    assert entries({"resourceType": "Observation", "valueQuantity": {"unit": "mg"}}, "value-quantity") == []
    assert entries({"resourceType": "Observation", "valueQuantity": {"value": True}}, "value-quantity") == []


def test_a_uri_parameter_indexes_the_uri():
    event = {"resourceType": "AuditEvent", "agent": [{"policy": ["http://example.org/consent/1"]}]}
    assert entries(event, "policy") == [UriEntry("policy", "http://example.org/consent/1")]


def test_a_number_parameter_indexes_decimals():
    param = SearchParam("RiskAssessment", "probability", "number", ("RiskAssessment.prediction.probability[x]",))
    ra = {"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.25}, {"probabilityRange": {}}]}
    assert extract_param(ra, param) == [NumberEntry("probability", Decimal("0.25"))]


# ---- strings normalization -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Zoë Ångström", "zoe angstrom"),
        ("MÜLLER", "muller"),
        ("Straße", "strasse"),
        ("İstanbul", "istanbul"),
        ("ﬁle", "file"),
        ("㎒", "mhz"),
        ("Ｆｕｌｌｗｉｄｔｈ", "fullwidth"),
        ("Nguyễn", "nguyen"),
        ("ABC def", "abc def"),
    ],
)
def test_normalize_string_drops_case_and_accents(raw, normal):
    assert normalize_string(raw) == normal


@given(st.text())
def test_normalize_string_is_idempotent(s):
    once = normalize_string(s)
    assert normalize_string(once) == once


def test_normalize_string_is_idempotent_on_every_code_point():
    for cp in range(sys.maxunicode + 1):
        if not 0xD800 <= cp <= 0xDFFF:
            once = normalize_string(chr(cp))
            assert normalize_string(once) == once, hex(cp)


# ---- the definitions -----------------------------------------------------------------------

BRIEF_TYPES = {
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Encounter", "Observation",
    "Condition", "AllergyIntolerance", "Immunization", "Procedure", "MedicationRequest", "MedicationDispense",
    "Medication", "DocumentReference", "Appointment", "Schedule", "Slot", "Communication", "CareTeam", "Consent",
    "AuditEvent", "Claim", "ExplanationOfBenefit", "ResearchStudy", "ResearchSubject", "RelatedPerson", "Device",
    "DiagnosticReport", "Coverage", "Provenance", "Composition",
}  # fmt: skip


def test_every_type_of_the_brief_is_supported():
    assert set(supported_types()) == BRIEF_TYPES
    assert list(supported_types()) == sorted(supported_types())


def test_an_unsupported_type_has_no_parameters_and_no_entries():
    assert dict(params_for("Basic")) == {}
    assert extract({"resourceType": "Basic", "code": {"text": "x"}}) == []
    assert extract({}) == []


def test_the_parameter_table_cannot_be_changed_through_params_for():
    with pytest.raises(TypeError):
        params_for("Patient")["x"] = params_for("Patient")["name"]  # type: ignore[index]


def test_exactly_the_patient_identifying_parameters_are_marked_phi():
    phi = {(p.resource_type, p.name) for rt in supported_types() for p in params_for(rt).values() if p.phi}
    assert phi == {
        ("Patient", n)
        for n in ("identifier", "name", "family", "given", "birthdate", "telecom", "phone", "email", "address", "address-city")
    } | {("RelatedPerson", "identifier"), ("RelatedPerson", "name")}


def test_every_parameter_is_well_formed():
    for rt in supported_types():
        for name, p in params_for(rt).items():
            assert p.resource_type == rt and p.name == name
            assert p.paths and all(path.startswith(rt + ".") for path in p.paths)
            assert p.type in ("token", "string", "date", "reference", "quantity", "number", "uri")
            assert not p.targets or p.type == "reference"
            for path in p.paths:
                evaluate({"resourceType": rt}, path)  # compiles


def test_the_registry_names_of_the_brief_are_defined():
    expected = {
        "Encounter": "patient subject date status class type practitioner participant service-provider location identifier reason-code",
        "Observation": "patient subject code category date value-quantity status encounter identifier performer",
        "MedicationRequest": "patient subject status intent authoredon requester code encounter medication",
        "AuditEvent": "agent patient entity date outcome type subtype action source purpose",
        "Consent": "patient status scope category actor date purpose period",
        "Communication": "patient subject sender recipient sent received encounter status category part-of",
    }
    for rt, names in expected.items():
        assert set(names.split()) <= set(params_for(rt)), rt


def test_extract_returns_each_entry_once():
    p = by_id("Patient", SUMIKO)  # the official and maiden names share their given names
    found = extract(p)
    assert len(found) == len(set(found))
    assert [e.value for e in found if e.param == "given"] == ["Sumiko254", "Larue605"]


# Hand-made resources for the types and elements the Synthea set does not have.
HANDMADE: tuple[dict, ...] = (
    {"resourceType": "Patient", "id": "p1", "active": True, "generalPractitioner": [{"reference": "Practitioner/d1"}],
     "managingOrganization": {"reference": "Organization/o1"}, "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}],
     "telecom": [{"system": "email", "value": "p1@example.org"}]},
    {"resourceType": "PractitionerRole", "practitioner": {"reference": "Practitioner/d1"}, "organization": {"reference": "Organization/o1"},
     "location": [{"reference": "Location/l1"}], "active": True, "identifier": [{"system": "urn:x", "value": "r1"}]},
    {"resourceType": "Organization", "partOf": {"reference": "Organization/o0"}},
    {"resourceType": "Location", "managingOrganization": {"reference": "Organization/o1"},
     "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "HOSP"}]}]},
    {"resourceType": "Encounter", "participant": [{"individual": {"reference": "Practitioner/d1"}}],
     "serviceProvider": {"reference": "Organization/o1"}, "location": [{"location": {"reference": "Location/l1"}}]},
    {"resourceType": "Observation", "identifier": [{"value": "obs-1"}], "status": "final",
     "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
     "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "subject": {"reference": "Patient/p1"},
     "encounter": {"reference": "Encounter/e1"}, "effectiveDateTime": "2024-05-01T10:00:00Z",
     "performer": [{"reference": "Practitioner/d1"}], "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
    {"resourceType": "Condition", "asserter": {"reference": "Practitioner/d1"}},
    {"resourceType": "AllergyIntolerance", "recorder": {"reference": "Practitioner/d1"}, "asserter": {"reference": "Patient/p1"}},
    {"resourceType": "Procedure", "performer": [{"actor": {"reference": "Practitioner/d1"}}]},
    {"resourceType": "MedicationRequest", "requester": {"reference": "Practitioner/d1"}, "medicationReference": {"reference": "Medication/m1"}},
    {"resourceType": "MedicationDispense", "status": "completed", "subject": {"reference": "Patient/p1"},
     "authorizingPrescription": [{"reference": "MedicationRequest/mr1"}], "whenHandedOver": "2024-05-02",
     "performer": [{"actor": {"reference": "Organization/pharmacy"}}], "receiver": [{"reference": "Patient/p1"}],
     "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076"}]}},
    {"resourceType": "MedicationDispense", "medicationReference": {"reference": "Medication/m1"}},
    {"resourceType": "Medication", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076"}]}},
    {"resourceType": "DocumentReference", "author": [{"reference": "Practitioner/d1"}]},
    {"resourceType": "Appointment", "status": "booked", "start": "2024-06-01T09:00:00Z", "slot": [{"reference": "Slot/s1"}],
     "participant": [{"actor": {"reference": "Patient/p1"}}, {"actor": {"reference": "Practitioner/d1"}}]},
    {"resourceType": "Schedule", "active": True, "actor": [{"reference": "Practitioner/d1"}],
     "planningHorizon": {"start": "2024-06-01", "end": "2024-06-30"},
     "specialty": [{"coding": [{"system": "http://snomed.info/sct", "code": "394814009"}]}],
     "serviceType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-type", "code": "124"}]}]},
    {"resourceType": "Slot", "schedule": {"reference": "Schedule/sc1"}, "status": "free", "start": "2024-06-01T09:00:00Z",
     "serviceType": [{"coding": [{"code": "124"}]}], "specialty": [{"coding": [{"code": "394814009"}]}]},
    {"resourceType": "Communication", "status": "completed", "subject": {"reference": "Patient/p1"},
     "sender": {"reference": "Practitioner/d1"}, "recipient": [{"reference": "Patient/p1"}], "sent": "2024-06-01T10:00:00Z",
     "received": "2024-06-01T10:00:05Z", "encounter": {"reference": "Encounter/e1"}, "partOf": [{"reference": "Communication/c0"}],
     "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification"}]}]},
    {"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/p1"},
     "participant": [{"member": {"reference": "Practitioner/d1"}}], "category": [{"coding": [{"system": "http://loinc.org", "code": "LA27976-2"}]}]},
    {"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/p1"}, "dateTime": "2024-01-01",
     "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
     "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
     "provision": {"period": {"start": "2024-01-01"}, "actor": [{"reference": {"reference": "Practitioner/d1"}}],
                   "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}},
    {"resourceType": "AuditEvent", "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
     "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}], "action": "R",
     "recorded": "2024-06-01T10:00:00.123Z", "outcome": "0",
     "purposeOfEvent": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}],
     "agent": [{"who": {"reference": "Practitioner/d1"}, "requestor": True, "policy": ["urn:uuid:policy"]}],
     "source": {"observer": {"reference": "Device/node"}},
     "entity": [{"what": {"reference": "Patient/p1"}}]},
    {"resourceType": "Claim", "status": "active", "use": "claim", "patient": {"reference": "Patient/p1"}, "created": "2024-06-02",
     "provider": {"reference": "Organization/o1"}, "insurer": {"reference": "Organization/ins"},
     "payee": {"party": {"reference": "Organization/o1"}}, "item": [{"encounter": [{"reference": "Encounter/e1"}]}]},
    {"resourceType": "ExplanationOfBenefit", "status": "active", "patient": {"reference": "Patient/p1"},
     "claim": {"reference": "Claim/c1"}, "created": "2024-06-03", "provider": {"reference": "Organization/o1"},
     "payee": {"party": {"reference": "Organization/o1"}}},
    {"resourceType": "ResearchStudy", "identifier": [{"system": "urn:x", "value": "NCT0001"}], "title": "Telemedicine follow-up",
     "status": "active", "category": [{"text": "x", "coding": [{"code": "interventional"}]}], "period": {"start": "2024"},
     "sponsor": {"reference": "Organization/o1"}},
    {"resourceType": "ResearchSubject", "status": "on-study", "individual": {"reference": "Patient/p1"},
     "study": {"reference": "ResearchStudy/rs1"}, "period": {"start": "2024-03"}},
    {"resourceType": "RelatedPerson", "patient": {"reference": "Patient/p1"}, "identifier": [{"value": "rp-1"}],
     "name": [{"family": "Doe"}], "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]}]},
    {"resourceType": "DiagnosticReport", "status": "final", "subject": {"reference": "Patient/p1"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]}, "effectivePeriod": {"start": "2024-01-01"},
     "category": [{"coding": [{"code": "LAB"}]}]},
    {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/ins"}],
     "policyHolder": {"reference": "Patient/p1"}, "subscriber": {"reference": "Patient/p1"}},
    {"resourceType": "Provenance", "target": [{"reference": "Patient/p1"}], "recorded": "2024-06-01T10:00:00Z",
     "agent": [{"who": {"reference": "Practitioner/d1"}}]},
    {"resourceType": "Composition", "status": "final", "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
     "author": [{"reference": "Practitioner/d1"}], "attester": [{"mode": "legal", "party": {"reference": "Practitioner/d1"}}],
     "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}, "category": [{"coding": [{"code": "clinical-note"}]}],
     "date": "2024-06-01T10:30:00Z", "identifier": {"value": "note-1"}, "title": "Progress note",
     "section": [{"title": "Plan", "code": {"coding": [{"system": "http://loinc.org", "code": "18776-5"}]}}]},
)  # fmt: skip


def test_every_parameter_resolves_a_value_on_some_resource():
    corpus = [r for rt in supported_types() for r in synthea(rt)] + list(HANDMADE)
    found: dict[str, set[str]] = {}
    for r in corpus:
        for e in extract(r):
            found.setdefault(r["resourceType"], set()).add(e.param)
    missing = {rt: sorted(set(params_for(rt)) - found.get(rt, set())) for rt in supported_types()}
    assert {rt: m for rt, m in missing.items() if m} == {}


def test_every_synthea_resource_can_be_indexed():
    for rt in supported_types():
        for r in synthea(rt):
            extract(r)  # raises on a malformed date or reference
