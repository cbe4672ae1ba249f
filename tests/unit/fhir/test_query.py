"""Search query parsing and the reference matching semantics (teleledger.fhir.query)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from teleledger.core.errors import InvalidInput
from teleledger.fhir.query import (
    Condition,
    DateValue,
    Include,
    NumberValue,
    QuantityValue,
    ReferenceValue,
    StringValue,
    TokenValue,
    matches,
    parse_search,
)
from teleledger.fhir.searchparams import (
    DateEntry,
    NumberEntry,
    QuantityEntry,
    ReferenceEntry,
    StringEntry,
    TokenEntry,
    UriEntry,
    extract,
    params_for,
)


def us(*args: int) -> int:
    return (datetime(*args, tzinfo=timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def parse(rt: str, *items: tuple[str, str], **kw) -> object:
    return parse_search(rt, list(items), **kw)


def only(rt: str, name: str, value: str) -> Condition:
    (cond,) = parse_search(rt, [(name, value)]).conditions
    return cond


def invalid(rt: str, *items: tuple[str, str], **kw) -> str:
    with pytest.raises(InvalidInput) as exc:
        parse_search(rt, list(items), **kw)
    return exc.value.message


# ---- conditions ----------------------------------------------------------------------------


def test_a_condition_carries_the_definition_name_modifier_and_typed_values():
    cond = only("Patient", "family:exact", "Medhurst46")
    assert cond == Condition(params_for("Patient")["family"], "family", "exact", (StringValue("Medhurst46"),))


def test_commas_or_the_values_of_one_parameter_and_repeats_and_them():
    ps = parse("Observation", ("code", "8867-4,9279-1"), ("code", "http://loinc.org|8310-5"))
    assert [c.values for c in ps.conditions] == [
        (TokenValue(None, "8867-4", False), TokenValue(None, "9279-1", False)),
        (TokenValue("http://loinc.org", "8310-5", True),),
    ]


def test_an_escaped_comma_is_part_of_the_value():
    assert only("Patient", "name", r"Smith\, John,Doe").values == (StringValue("Smith, John"), StringValue("Doe"))
    assert only("Patient", "name", r"back\\slash\$").values == (StringValue("back\\slash$"),)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("female", TokenValue(None, "female", False)),
        ("|female", TokenValue(None, "female", True)),
        ("http://hl7.org/fhir/administrative-gender|", TokenValue("http://hl7.org/fhir/administrative-gender", None, True)),
        ("http://hl7.org/fhir/sid/us-ssn|999-94-5397", TokenValue("http://hl7.org/fhir/sid/us-ssn", "999-94-5397", True)),
        (r"urn:x|a\|b", TokenValue("urn:x", "a|b", True)),
        (r"a\|b", TokenValue(None, "a|b", False)),
    ],
)
def test_token_values_take_the_four_forms_of_the_spec(raw, value):
    assert only("Patient", "identifier", raw).values == (value,)


def test_a_token_of_a_lone_bar_is_invalid():
    assert "'identifier'" in invalid("Patient", ("identifier", "|"))


def test_empty_parameters_and_empty_list_items_are_ignored():
    ps = parse("Patient", ("name", ""), ("gender", "male,,"), ("_id", ""))
    assert [(c.name, c.values) for c in ps.conditions] == [("gender", (TokenValue(None, "male", False),))]


def test_format_and_pretty_are_ignored_silently_and_unknown_parameters_are_reported():
    ps = parse("Patient", ("_format", "json"), ("_pretty", "true"), ("shoe-size", "42"), ("_tag", "x"), ("shoe-size", "43"))
    assert ps.conditions == () and ps.unknown == ("shoe-size", "_tag")


def test_strict_handling_rejects_unknown_parameters_by_name():
    message = invalid("Patient", ("shoe-size", "42"), ("name", "x"), strict=True)
    assert "shoe-size" in message and "supported" in message


def test_a_type_that_is_not_supported_cannot_be_searched():
    assert "Basic" in invalid("Basic", ("code", "x"))


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("name:above", "':above' is not supported for a string parameter"),
        ("birthdate:exact", "':exact' is unknown for a date parameter"),
        ("gender:text", "':text' is not supported for a token parameter"),
        ("gender:contains", "':contains' is unknown for a token parameter"),
        ("general-practitioner:identifier", "':identifier' is not supported"),
        ("general-practitioner:below", "':below' is not supported"),
        ("general-practitioner:Patient", "refers to Practitioner, PractitionerRole, Organization, not Patient"),
        ("organization:foo", "':foo' is unknown for a reference parameter"),
        ("name:", "empty modifier"),
    ],
)
def test_an_unknown_or_unsupported_modifier_is_invalid_and_named(key, fragment):
    assert fragment in invalid("Patient", (key, "x"))


def test_a_bad_modifier_is_invalid_even_with_an_empty_value():
    assert "':above'" in invalid("Patient", ("name:above", ""))


@pytest.mark.parametrize("name", ["name", "gender", "birthdate", "organization", "identifier"])
def test_missing_is_supported_for_every_type(name):
    assert only("Patient", f"{name}:missing", "true").values == (True,)
    assert only("Patient", f"{name}:missing", "false").values == (False,)


def test_missing_takes_only_true_or_false():
    assert "'gender:missing': expected true or false" in invalid("Patient", ("gender:missing", "yes"))


def test_not_is_kept_on_a_token_condition():
    cond = only("Encounter", "status:not", "cancelled")
    assert cond.modifier == "not" and cond.values == (TokenValue(None, "cancelled", False),)


def test_chained_parameters_and_has_are_rejected_as_not_supported():
    assert "chained search parameters are not supported" in invalid("Observation", ("subject.name", "peter"))
    assert "chained" in invalid("Observation", ("subject:Patient.name", "peter"))
    assert "_has" in invalid("Patient", ("_has:Observation:patient:code", "1234-5"))


def test_an_unknown_dotted_name_is_unknown_not_a_chain():
    assert parse("Patient", ("utm.source", "mail")).unknown == ("utm.source",)


# ---- dates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
def test_a_date_value_carries_its_prefix_and_range(prefix):
    assert only("Patient", "birthdate", f"{prefix}1927-05").values == (
        DateValue(prefix, us(1927, 5, 1), us(1927, 6, 1) - 1),
    )


def test_a_date_without_prefix_is_eq():
    assert only("Encounter", "date", "2020").values == (DateValue("eq", us(2020, 1, 1), us(2021, 1, 1) - 1),)


def test_the_approximate_prefix_is_rejected_for_dates():
    assert "'ap' is not supported for dates" in invalid("Encounter", ("date", "ap2020"))


def test_an_unencoded_plus_of_a_time_zone_is_read_as_plus():
    assert only("Encounter", "date", "ge2020-01-01T10:00:00 02:00").values == (
        DateValue("ge", us(2020, 1, 1, 8), us(2020, 1, 1, 8, 0, 1) - 1),
    )


@pytest.mark.parametrize("raw", ["1927-02-30", "ge", "xx2020", "2020-01-01T25:00", "5"])
def test_an_invalid_date_names_the_parameter(raw):
    assert "'birthdate'" in invalid("Patient", ("birthdate", raw))


def test_last_updated_is_a_date_condition_without_definition():
    (cond,) = parse("Patient", ("_lastUpdated", "gt2024-01-01T00:00:00Z")).conditions
    assert cond == Condition(None, "_lastUpdated", None, (DateValue("gt", us(2024, 1, 1), us(2024, 1, 1, 0, 0, 1) - 1),))
    assert "_lastUpdated" in invalid("Patient", ("_lastUpdated", "today"))
    assert "modifier" in invalid("Patient", ("_lastUpdated:missing", "true"))


def test_id_values_are_tokens_and_not_is_the_only_modifier():
    (cond,) = parse("Patient", ("_id:not", "a,b")).conditions
    assert cond == Condition(None, "_id", "not", (TokenValue(None, "a", False), TokenValue(None, "b", False)))
    assert "expected an id" in invalid("Patient", ("_id", "a b"))
    assert "':exact' is not supported" in invalid("Patient", ("_id:exact", "a"))


# ---- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("subject", "Patient/123", ReferenceValue("Patient", "123")),
        ("subject", "123", ReferenceValue(None, "123")),
        ("patient", "123", ReferenceValue("Patient", "123")),  # one target type: assumed
        ("subject:Patient", "123", ReferenceValue("Patient", "123")),
        ("subject:Patient", "Patient/123", ReferenceValue("Patient", "123")),
        ("subject", "Patient/123/_history/2", ReferenceValue("Patient", "123")),
        ("subject", "https://fhir.example.org/Patient/123", ReferenceValue("Patient", "123")),
    ],
)
def test_reference_values_take_type_and_id_from_the_value_or_the_modifier(key, raw, value):
    assert only("Observation", key, raw).values == (value,)


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("subject:Patient", "Group/1", "the value names a Group"),
        ("subject", "Practitioner/1", "refers to Patient, Group, Device, Location; got a reference to Practitioner"),
        ("subject", "Patient?identifier=x|1", "expected an id or Type/id"),
        ("subject", "urn:uuid:1", "expected an id or Type/id"),
        ("subject", "Patient/a b", "expected an id or Type/id"),
        ("subject:Practitioner", "1", "refers to Patient, Group, Device, Location, not Practitioner"),
    ],
)
def test_invalid_reference_values_are_rejected_with_the_parameter_named(key, raw, fragment):
    message = invalid("Observation", (key, raw))
    assert fragment in message and "'subject" in message


# ---- quantities and numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("5.4", QuantityValue("eq", Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), None, None)),
        ("100", QuantityValue("eq", Decimal("100"), Decimal("99.5"), Decimal("100.5"), None, None)),
        ("100.00", QuantityValue("eq", Decimal("100.00"), Decimal("99.995"), Decimal("100.005"), None, None)),
        ("1e2", QuantityValue("eq", Decimal("1e2"), Decimal("50"), Decimal("150"), None, None)),
        ("-0.5", QuantityValue("eq", Decimal("-0.5"), Decimal("-0.55"), Decimal("-0.45"), None, None)),
        ("gt5.4|http://unitsofmeasure.org|mg",
         QuantityValue("gt", Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), "http://unitsofmeasure.org", "mg")),
        ("le5.4||mg", QuantityValue("le", Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), None, "mg")),
        ("ap100", QuantityValue("ap", Decimal("100"), Decimal("99.5"), Decimal("100.5"), None, None)),
    ],
)  # fmt: skip
def test_a_quantity_value_has_the_implicit_range_of_its_precision(raw, value):
    assert only("Observation", "value-quantity", raw).values == (value,)


def test_a_quantity_with_many_digits_keeps_an_exact_range():
    (value,) = only("Observation", "value-quantity", "123456789012345678901234567890.123456789").values
    assert value.low == Decimal("123456789012345678901234567890.1234567885")
    assert value.high == Decimal("123456789012345678901234567890.1234567895")


@pytest.mark.parametrize(
    "raw", ["abc", "5.4|mg", "NaN", "Infinity", "gt", "5,4.3.2", "1_000", "0x10", "5.4|a|b|c", "٥", "1e999999999", "1e-400"]
)
def test_a_non_numeric_quantity_is_invalid_and_names_the_parameter(raw):
    assert "'value-quantity'" in invalid("Observation", ("value-quantity", raw))


# ---- result parameters ---------------------------------------------------------------------


def test_count_defaults_is_bounded_and_must_be_a_non_negative_integer():
    assert parse("Patient").count == 50
    assert parse("Patient", default_count=20).count == 20
    assert parse("Patient", ("_count", "5000"), max_count=100).count == 100
    assert parse("Patient", ("_count", "0")).count == 0
    for bad in ("abc", "-1", "1.5", "٣"):
        assert "_count: expected a non-negative integer" in invalid("Patient", ("_count", bad))
    assert "_count is given more than once" in invalid("Patient", ("_count", "1"), ("_count", "2"))
    assert "takes no modifier" in invalid("Patient", ("_count:x", "1"))


def test_offset_is_a_non_negative_integer():
    assert parse("Patient").offset == 0
    assert parse("Patient", ("_offset", "40")).offset == 40
    assert "_offset" in invalid("Patient", ("_offset", "-40"))


def test_sort_accepts_parameters_id_and_last_updated_with_minus_for_descending():
    ps = parse("Encounter", ("_sort", "-date,status,_id,-_lastUpdated"))
    assert ps.sort == (("date", True), ("status", False), ("_id", False), ("_lastUpdated", True))


@pytest.mark.parametrize(
    ("rt", "raw", "fragment"),
    [
        ("Encounter", "shoe-size", "'shoe-size' is not a search parameter of Encounter"),
        ("AuditEvent", "policy", "'policy' is a uri parameter of AuditEvent"),
        ("Encounter", "date,-date", "'date' is named twice"),
        ("Encounter", "date,", "'' is not a search parameter"),
    ],
)
def test_sort_by_anything_else_is_invalid(rt, raw, fragment):
    assert fragment in invalid(rt, ("_sort", raw))


def test_include_names_a_reference_parameter_of_the_searched_type():
    ps = parse("Observation", ("_include", "Observation:subject:Patient"), ("_include", "Observation:encounter"))
    assert ps.include == (Include("Observation", "subject", "Patient"), Include("Observation", "encounter", None))


def test_include_iterate_may_start_from_another_type():
    ps = parse("Encounter", ("_include", "Encounter:patient"), ("_include:iterate", "Patient:general-practitioner"))
    assert ps.include[1] == Include("Patient", "general-practitioner", None, True)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("Encounter:patient", "source type must be the searched type Observation"),
        ("Observation:code", "has no reference search parameter 'code'"),
        ("Observation:shoe", "has no reference search parameter 'shoe'"),
        ("Observation:subject:Practitioner", "refers to Patient, Group, Device, Location, not 'Practitioner'"),
        ("*", "wildcard includes are not supported"),
        ("Observation:*", "wildcard"),
        ("Observation", "expected SourceType:parameter[:TargetType]"),
        ("Observation:subject:Patient:x", "expected SourceType:parameter[:TargetType]"),
        ("Basic:subject", "'Basic' is not a supported resource type"),
    ],
)
def test_an_invalid_include_is_rejected(raw, fragment):
    assert fragment in invalid("Observation", ("_include", raw))


def test_include_takes_only_the_iterate_modifier():
    assert "':recurse' is unknown" in invalid("Observation", ("_include:recurse", "Observation:subject"))


def test_revinclude_names_a_reference_parameter_of_another_type_that_points_here():
    ps = parse("Patient", ("_revinclude", "Observation:patient"), ("_revinclude", "Provenance:target:Patient"))
    assert ps.revinclude == (Include("Observation", "patient", None), Include("Provenance", "target", "Patient"))
    assert "never refers to Patient" in invalid("Patient", ("_revinclude", "Observation:encounter"))
    assert "target type must be the searched type Patient" in invalid("Patient", ("_revinclude", "Observation:subject:Group"))


def test_summary_total_and_elements_take_only_their_values():
    ps = parse("Patient", ("_summary", "count"), ("_total", "accurate"), ("_elements", "name, birthDate,name"))
    assert (ps.summary, ps.total, ps.elements) == ("count", "accurate", ("name", "birthDate"))
    for value in ("true", "text", "data", "false"):
        assert parse("Patient", ("_summary", value)).summary == value
    assert "_summary: expected one of" in invalid("Patient", ("_summary", "some"))
    assert "_total: expected none, estimate or accurate" in invalid("Patient", ("_total", "exact"))
    assert "_elements" in invalid("Patient", ("_elements", "Patient.name"))
    assert "_elements" in invalid("Patient", ("_elements", "name,"))


def test_a_search_without_parameters_has_the_defaults():
    ps = parse("Patient")
    assert (ps.conditions, ps.sort, ps.include, ps.revinclude, ps.summary, ps.elements, ps.total, ps.unknown) == (
        (), (), (), (), None, (), None, (),
    )  # fmt: skip


# ---- matching: dates -----------------------------------------------------------------------

DAY = (us(2020, 6, 1), us(2020, 6, 2) - 1)  # the search value 2020-06-01

# target range → the prefixes it satisfies against the search value 2020-06-01 (search.html#prefix)
DATE_CASES = {
    "same day": (DAY, {"eq", "ge", "le"}),
    "an instant inside": ((us(2020, 6, 1, 12), us(2020, 6, 1, 12)), {"eq", "ge", "le"}),
    "the first microsecond": ((DAY[0], DAY[0]), {"eq", "ge", "le"}),
    "the last microsecond": ((DAY[1], DAY[1]), {"eq", "ge", "le"}),
    "the whole month": ((us(2020, 6, 1), us(2020, 7, 1) - 1), {"ne", "gt", "ge"}),
    "the whole year": ((us(2020, 1, 1), us(2021, 1, 1) - 1), {"ne", "gt", "lt", "ge", "le"}),
    "the day before": ((us(2020, 5, 31), DAY[0] - 1), {"ne", "lt", "le", "eb"}),
    "ends on the first microsecond": ((us(2020, 5, 31), DAY[0]), {"ne", "lt", "le"}),
    "the day after": ((DAY[1] + 1, us(2020, 6, 3) - 1), {"ne", "gt", "ge", "sa"}),
    "starts on the last microsecond": ((DAY[1], us(2020, 6, 3)), {"ne", "gt", "ge"}),
    "open-ended period from before": ((us(2019, 1, 1), 253402300799999999), {"ne", "gt", "lt", "ge", "le"}),
}


@pytest.mark.parametrize("case", list(DATE_CASES))
@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
def test_date_prefixes_compare_the_target_range_with_the_search_range(case, prefix):
    (low, high), satisfied = DATE_CASES[case]
    value = DateValue(prefix, *DAY)
    assert matches(DateEntry("date", low, high), value) is (prefix in satisfied)


def test_a_synthea_birth_date_matches_its_day_month_and_year_but_not_a_later_one():
    patient = _first("Patient")
    birth = [e for e in extract(patient) if e.param == "birthdate"]
    cond = lambda raw: only("Patient", "birthdate", raw)  # noqa: E731
    for raw, expected in [("1927-05-21", True), ("1927-05", True), ("1927", True), ("1927-05-22", False),
                          ("gt1927-05-20", True), ("lt1927-05-21", False), ("le1927-05-21", True), ("sa1927-05-20", True)]:
        assert any(matches(e, v) for e in birth for v in cond(raw).values) is expected, raw


def test_a_synthea_encounter_in_the_evening_eastern_time_is_on_the_next_day_in_utc():
    # 1989-10-04T02:25:16-04:00 .. 06:20:16-04:00 is all on 1989-10-04 in UTC
    enc = _first("Encounter")
    (date,) = [e for e in extract(enc) if e.param == "date"]
    assert matches(date, only("Encounter", "date", "1989-10-04").values[0])
    assert not matches(date, only("Encounter", "date", "1989-10-03").values[0])
    assert matches(date, only("Encounter", "date", "ge1989-10-04T06:25:16Z").values[0])
    assert not matches(date, only("Encounter", "date", "eq1989-10-04T02:25:16-04:00").values[0])  # spans hours


# ---- matching: strings, tokens, references -------------------------------------------------


@pytest.mark.parametrize(
    ("indexed", "modifier", "searched", "expected"),
    [
        ("Ångström", None, "ang", True),
        ("Ångström", None, "ANGSTRÖM", True),
        ("Ångström", None, "ngs", False),
        ("Ångström", "contains", "NGSTRO", True),
        ("Ångström", "exact", "Ångström", True),
        ("Ångström", "exact", "angstrom", False),
        ("Ångström", "exact", "Ångströ", False),
        ("Sumiko254 Larue605 Medhurst46", None, "sumiko254 lar", True),
        ("Straße", None, "STRASS", True),
    ],
)
def test_string_matching_is_accent_and_case_insensitive_prefix_unless_exact(indexed, modifier, searched, expected):
    assert matches(StringEntry("name", indexed), StringValue(searched), modifier) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TokenValue(None, "999-94-5397", False), True),
        (TokenValue("http://hl7.org/fhir/sid/us-ssn", "999-94-5397", True), True),
        (TokenValue("http://hl7.org/fhir/sid/us-ssn", None, True), True),
        (TokenValue("http://other", "999-94-5397", True), False),
        (TokenValue(None, "999-94-5397", True), False),  # |code: only entries without system
        (TokenValue(None, "999-94-539", False), False),
    ],
)
def test_token_matching_follows_the_system_and_code_forms(value, expected):
    assert matches(TokenEntry("identifier", "http://hl7.org/fhir/sid/us-ssn", "999-94-5397"), value) is expected


def test_token_codes_are_case_sensitive_and_no_system_matches_bar_code():
    assert not matches(TokenEntry("gender", None, "female"), TokenValue(None, "Female", False))
    assert matches(TokenEntry("gender", None, "female"), TokenValue(None, "female", True))


def test_not_answers_the_positive_question_per_entry_and_missing_is_refused():
    entry = TokenEntry("status", None, "cancelled")
    assert matches(entry, TokenValue(None, "cancelled", False), "not")
    with pytest.raises(ValueError):
        matches(entry, True, "missing")


def test_reference_matching_needs_the_id_and_the_type_when_given():
    entry = ReferenceEntry("subject", "Patient", "123")
    assert matches(entry, ReferenceValue("Patient", "123"))
    assert matches(entry, ReferenceValue(None, "123"))
    assert not matches(entry, ReferenceValue("Group", "123"))
    assert not matches(entry, ReferenceValue("Patient", "1234"))


def test_uri_matching_is_exact():
    assert matches(UriEntry("policy", "http://x/p"), StringValue("http://x/p"))
    assert not matches(UriEntry("policy", "http://x/p"), StringValue("http://x"))


def test_an_entry_and_a_value_of_different_types_do_not_match_silently():
    with pytest.raises(TypeError):
        matches(TokenEntry("code", None, "x"), StringValue("x"))


# ---- matching: quantities and numbers ------------------------------------------------------


def q(x: str, system: str | None = "http://unitsofmeasure.org", code: str | None = "mg", unit: str | None = "mg"):
    return QuantityEntry("value-quantity", Decimal(x), system, code, unit)


@pytest.mark.parametrize(
    ("raw", "true_for", "false_for"),
    [
        ("5.4", ["5.35", "5.4", "5.449"], ["5.349", "5.45"]),
        ("ne5.4", ["5.349", "5.45"], ["5.35", "5.4"]),
        ("gt5.4", ["5.41"], ["5.4", "5.39"]),
        ("ge5.4", ["5.4", "5.41"], ["5.39"]),
        ("lt5.4", ["5.39"], ["5.4"]),
        ("le5.4", ["5.4", "5.39"], ["5.41"]),
        ("sa5.4", ["5.41"], ["5.4"]),
        ("eb5.4", ["5.39"], ["5.4"]),
        ("ap100", ["90", "110", "100.4"], ["89.9", "110.1"]),
    ],
)
def test_quantity_prefixes_compare_the_resource_value_with_the_search_value(raw, true_for, false_for):
    (value,) = only("Observation", "value-quantity", raw).values
    assert all(matches(q(x), value) for x in true_for)
    assert not any(matches(q(x), value) for x in false_for)


def test_quantity_units_must_match_the_system_and_code_or_without_system_the_code_or_unit():
    assert matches(q("5"), only("Observation", "value-quantity", "5|http://unitsofmeasure.org|mg").values[0])
    assert not matches(q("5"), only("Observation", "value-quantity", "5|http://unitsofmeasure.org|g").values[0])
    assert not matches(q("5"), only("Observation", "value-quantity", "5|http://snomed.info/sct|mg").values[0])
    assert matches(q("5", None, None, "mg"), only("Observation", "value-quantity", "5||mg").values[0])
    assert not matches(q("5", None, None, "kg"), only("Observation", "value-quantity", "5||mg").values[0])


def test_number_values_compare_like_quantities_without_units():
    value = NumberValue("eq", Decimal("0.25"), Decimal("0.245"), Decimal("0.255"))
    assert matches(NumberEntry("probability", Decimal("0.25")), value)
    assert not matches(NumberEntry("probability", Decimal("0.26")), value)
    assert matches(NumberEntry("probability", Decimal("0.3")), NumberValue("gt", Decimal("0.25"), Decimal("0.245"), Decimal("0.255")))


# ---- helpers -------------------------------------------------------------------------------

_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "samples" / "synthea-10",
    Path("/work/shared/fhir-samples/synthea-10"),
)


def _first(resource_type: str) -> dict:
    """The first resource of a Synthea sample file."""
    base = next((p for p in _CANDIDATES if p.is_dir()), None)
    if base is None:
        pytest.skip("Synthea samples not found (samples/synthea-10)")
    with (base / f"{resource_type}.000.ndjson").open() as f:
        return json.loads(f.readline())
