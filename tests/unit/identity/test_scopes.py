"""SMART v2 scope parsing, checking and narrowing (teleledger.identity.scopes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.identity.scopes import (
    FLAGS,
    ROLE_SCOPE_SETS,
    ROLE_SCOPES,
    ClinicalScope,
    ScopeSet,
)

# -- parsing --------------------------------------------------------------------------------


def test_v2_scope_grants_exactly_its_letters():
    scopes = ScopeSet.parse("patient/Observation.rs")
    assert [(s.context, s.resource_type, s.letters) for s in scopes.scopes] == [("patient", "Observation", "rs")]
    assert scopes.allows("patient", "Observation", "r")
    assert scopes.allows("patient", "Observation", "s")
    assert not scopes.allows("patient", "Observation", "c")
    assert not scopes.allows("patient", "Observation", "u")
    assert not scopes.allows("patient", "Observation", "d")


@pytest.mark.parametrize(
    ("v1", "v2"),
    [
        ("patient/Observation.read", "patient/Observation.rs"),
        ("patient/Observation.write", "patient/Observation.cud"),
        ("patient/Observation.*", "patient/Observation.cruds"),
        ("user/*.read", "user/*.rs"),
        ("system/*.*", "system/*.cruds"),
    ],
)
def test_v1_scope_means_the_same_as_its_v2_letters(v1, v2):
    assert ScopeSet.parse(v1) == ScopeSet.parse(v2)
    assert str(ScopeSet.parse(v1)) == v2


@pytest.mark.parametrize(
    "letters", ["c", "r", "u", "d", "s", "rs", "cud", "cruds", "rd", "cs", "crs", "uds"]
)
def test_v2_letters_in_order_are_accepted(letters):
    assert ScopeSet.parse(f"user/Observation.{letters}").scopes[0].letters == letters


@pytest.mark.parametrize("letters", ["sr", "rc", "dr", "rr", "srudc", "cc", "scr"])
def test_v2_letters_out_of_order_or_repeated_are_rejected(letters):
    with pytest.raises(InvalidInput):
        ScopeSet.parse(f"user/Observation.{letters}")


@pytest.mark.parametrize(
    "scope",
    [
        "patient/Observation.",
        "patient/Observation",
        "patient/.rs",
        "patient//Observation.rs",
        "clinician/Observation.rs",
        "Patient/Observation.rs",
        "patient/observation.rs",
        "patient/Observaton.rs",
        "patient/Observation.rsx",
        "patient/Observation.READ",
        "patient/Observation.readwrite",
        "patient/Observation.rs.rs",
        "patient/Observation.read?category=laboratory",
        "patient/Observation.rs?",
        "patient/Observation.rs?category",
        "patient/Observation.rs?=laboratory",
        "patient/Observation.rs?category=",
        "patient/Observation.rs?category=laboratory&",
        "patient/Resource.rs",
        "user/**.rs",
    ],
)
def test_malformed_clinical_scope_is_invalid_input_naming_the_scope(scope):
    with pytest.raises(InvalidInput) as raised:
        ScopeSet.parse(f"openid {scope} fhirUser")
    assert raised.value.status == 400
    assert repr(scope) in raised.value.message


@pytest.mark.parametrize("scope", ["profile", "email", "launch/encounter", "admin", "OPENID", "*"])
def test_unknown_non_clinical_scope_is_invalid_input_when_parsing(scope):
    with pytest.raises(InvalidInput) as raised:
        ScopeSet.parse(f"openid {scope}")
    assert repr(scope) in raised.value.message


def test_non_clinical_scopes_are_kept_as_flags():
    scopes = ScopeSet.parse(" ".join(FLAGS))
    assert scopes.flags == frozenset(FLAGS)
    assert scopes.scopes == ()
    assert scopes.has_flag("launch/patient")
    assert not scopes.allows("patient", "Patient", "r")


def test_empty_and_blank_scope_strings_parse_to_the_empty_set():
    assert ScopeSet.parse("") == ScopeSet.parse("   \t ") == ScopeSet.empty()
    assert not ScopeSet.empty()
    assert str(ScopeSet.empty()) == ""


def test_query_restriction_is_parsed_and_kept_sorted():
    scopes = ScopeSet.parse("patient/Observation.rs?status=final&category=laboratory")
    (scope,) = scopes.scopes
    assert scope.restriction == (("category", "laboratory"), ("status", "final"))
    assert str(scopes) == "patient/Observation.rs?category=laboratory&status=final"


def test_query_restriction_value_may_be_a_system_and_code():
    text = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
    assert str(ScopeSet.parse(text)) == text


# -- canonical text -------------------------------------------------------------------------


def test_canonical_text_merges_letters_of_the_same_type():
    assert str(ScopeSet.parse("patient/Observation.r patient/Observation.s patient/Observation.c")) == (
        "patient/Observation.crs"
    )


def test_canonical_text_drops_scopes_covered_by_a_wildcard():
    assert str(ScopeSet.parse("patient/Observation.rs patient/*.rs")) == "patient/*.rs"
    assert str(ScopeSet.parse("patient/Observation.rs?category=laboratory patient/Observation.rs")) == (
        "patient/Observation.rs"
    )


def test_canonical_text_keeps_a_scope_that_adds_letters_to_a_wildcard():
    assert str(ScopeSet.parse("patient/Communication.cruds patient/*.rs")) == (
        "patient/*.rs patient/Communication.cruds"
    )


def test_canonical_text_orders_contexts_types_then_flags():
    text = "openid system/Patient.rs user/Observation.r offline_access user/*.s patient/Observation.r launch"
    assert str(ScopeSet.parse(text)) == (
        "patient/Observation.r user/*.s user/Observation.r system/Patient.rs openid launch offline_access"
    )


def test_scope_sets_compare_by_meaning_not_by_spelling():
    a = ScopeSet.parse("user/Observation.read openid")
    b = ScopeSet.parse("openid user/Observation.s user/Observation.r")
    assert a == b
    assert hash(a) == hash(b)
    assert a != ScopeSet.parse("user/Observation.r openid")


# -- allows() -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "context", "resource_type", "interaction", "expected"),
    [
        ("patient/*.rs", "patient", "Observation", "r", True),
        ("patient/*.rs", "patient", "Observation", "s", True),
        ("patient/*.rs", "patient", "Observation", "c", False),
        ("patient/*.rs", "user", "Observation", "r", False),
        ("patient/*.rs", "system", "Observation", "r", False),
        ("user/*.cruds", "user", "Patient", "d", True),
        ("user/*.cruds", "patient", "Patient", "r", False),
        ("user/Observation.rs", "user", "Condition", "r", False),
        ("user/Observation.rs", "user", "Observation", "u", False),
        ("user/Observation.cu user/*.r", "user", "Observation", "u", True),
        ("user/Observation.cu user/*.r", "user", "Condition", "r", True),
        ("user/Observation.cu user/*.r", "user", "Condition", "u", False),
        ("system/Patient.read", "system", "Patient", "s", True),
        ("system/Patient.write", "system", "Patient", "d", True),
        ("system/Patient.write", "system", "Patient", "r", False),
        ("openid fhirUser launch/patient", "patient", "Patient", "r", False),
        ("", "user", "Observation", "r", False),
    ],
)
def test_allows_matrix(text, context, resource_type, interaction, expected):
    assert ScopeSet.parse(text).allows(context, resource_type, interaction) is expected


def test_allows_rejects_an_unknown_interaction_letter_loudly():
    with pytest.raises(ValueError):
        ScopeSet.parse("user/*.cruds").allows("user", "Observation", "x")  # type: ignore[arg-type]


def test_restricted_scope_grants_nothing_without_the_query():
    scopes = ScopeSet.parse("patient/Observation.rs?category=laboratory")
    assert not scopes.allows("patient", "Observation", "s")
    assert not scopes.allows("patient", "Observation", "r")


def test_restricted_scope_grants_a_search_carrying_the_restriction():
    scopes = ScopeSet.parse("patient/Observation.rs?category=laboratory")
    assert scopes.allows("patient", "Observation", "s", query=[("category", "laboratory")])
    assert scopes.allows(
        "patient", "Observation", "s", query=[("code", "1234-5"), ("category", "laboratory")]
    )


def test_restricted_scope_denies_a_search_with_another_value_or_an_or_list():
    scopes = ScopeSet.parse("patient/Observation.rs?category=laboratory")
    assert not scopes.allows("patient", "Observation", "s", query=[("category", "vital-signs")])
    assert not scopes.allows("patient", "Observation", "s", query=[("category", "laboratory,vital-signs")])
    assert not scopes.allows("patient", "Observation", "s", query=[("category:not", "laboratory")])


def test_restricted_scope_needs_every_pair_of_its_restriction():
    scopes = ScopeSet.parse("user/Observation.s?category=laboratory&status=final")
    assert not scopes.allows("user", "Observation", "s", query=[("category", "laboratory")])
    assert scopes.allows("user", "Observation", "s", query=[("status", "final"), ("category", "laboratory")])


def test_restricted_scope_does_not_spill_over_to_other_types_or_letters():
    scopes = ScopeSet.parse("user/Observation.s?category=laboratory")
    q = [("category", "laboratory")]
    assert not scopes.allows("user", "Condition", "s", query=q)
    assert not scopes.allows("user", "Observation", "r", query=q)


def test_restricted_wildcard_scope_applies_to_every_type_with_the_query():
    scopes = ScopeSet.parse("user/*.rs?_security=N")
    assert scopes.allows("user", "Condition", "s", query=[("_security", "N")])
    assert not scopes.allows("user", "Condition", "s")


# -- narrow() -------------------------------------------------------------------------------


def test_narrow_keeps_only_what_both_sides_grant():
    role = ScopeSet.parse("user/Observation.rs user/Patient.cruds")
    assert str(role.narrow("user/Observation.cruds user/Patient.r user/Condition.rs")) == (
        "user/Observation.rs user/Patient.r"
    )


def test_narrow_expands_a_requested_wildcard_to_the_roles_types():
    assert str(ROLE_SCOPE_SETS["pharmacist"].narrow("user/*.read")) == (
        "user/Medication.rs user/MedicationDispense.rs user/MedicationRequest.rs"
        " user/Organization.rs user/Patient.rs user/Practitioner.rs"
    )


def test_narrow_against_a_role_wildcard_keeps_the_requested_type():
    assert str(ROLE_SCOPE_SETS["practitioner"].narrow("user/Observation.read launch openid")) == (
        "user/Observation.rs openid launch"
    )


def test_narrow_drops_scopes_of_another_context():
    assert str(ROLE_SCOPE_SETS["patient"].narrow("user/*.rs system/*.rs patient/Observation.rs")) == (
        "patient/Observation.rs"
    )


def test_narrow_intersects_flags():
    assert ROLE_SCOPE_SETS["admin"].narrow("openid offline_access launch").flags == frozenset({"openid"})


def test_narrow_drops_unknown_non_clinical_scopes_instead_of_failing():
    narrowed = ROLE_SCOPE_SETS["patient"].narrow("openid profile launch/encounter patient/*.read")
    assert str(narrowed) == "patient/*.rs openid"


def test_narrow_still_rejects_malformed_clinical_scopes():
    with pytest.raises(InvalidInput):
        ROLE_SCOPE_SETS["patient"].narrow("openid patient/Observation.sr")


def test_narrow_combines_query_restrictions_of_both_sides():
    ceiling = ScopeSet.parse("patient/Observation.rs?status=final")
    narrowed = ceiling.narrow("patient/Observation.rs?category=laboratory")
    assert str(narrowed) == "patient/Observation.rs?category=laboratory&status=final"


def test_narrow_never_grants_more_than_the_ceiling():
    assert not ROLE_SCOPE_SETS["researcher"].narrow("user/*.cruds").allows("user", "Patient", "r")


# -- the role table -------------------------------------------------------------------------


def test_role_table_is_written_in_canonical_form():
    for role, text in ROLE_SCOPES.items():
        assert str(ScopeSet.parse(text)) == text, role


def test_role_table_has_no_service_role_because_services_use_their_registration():
    assert "service" not in ROLE_SCOPES


def test_no_role_default_carries_system_scopes():
    for role, scopes in ROLE_SCOPE_SETS.items():
        assert all(scope.context != "system" for scope in scopes.scopes), role


CLINICAL_TYPES = [
    "Patient",
    "Observation",
    "Condition",
    "Encounter",
    "MedicationRequest",
    "DiagnosticReport",
    "DocumentReference",
    "AllergyIntolerance",
    "Communication",
    "Consent",
    "Appointment",
]


@pytest.mark.parametrize("resource_type", CLINICAL_TYPES)
@pytest.mark.parametrize("interaction", list("cruds"))
def test_admin_scopes_reach_no_clinical_type(resource_type, interaction):
    assert not ROLE_SCOPE_SETS["admin"].allows("user", resource_type, interaction)


def test_patient_scopes_read_everything_but_write_only_visits_messages_and_consent():
    patient = ROLE_SCOPE_SETS["patient"]
    assert patient.allows("patient", "Observation", "r")
    assert not patient.allows("patient", "Observation", "c")
    assert not patient.allows("patient", "Patient", "c")
    assert not patient.allows("patient", "Patient", "u")
    for writable in ("Appointment", "Communication", "Consent"):
        assert patient.allows("patient", writable, "c")
        assert patient.allows("patient", writable, "u")


def test_pharmacist_may_record_dispenses_but_not_prescribe():
    pharmacist = ROLE_SCOPE_SETS["pharmacist"]
    assert pharmacist.allows("user", "MedicationDispense", "c")
    assert pharmacist.allows("user", "MedicationRequest", "r")
    assert not pharmacist.allows("user", "MedicationRequest", "c")


# -- properties -----------------------------------------------------------------------------

_TYPES = ["*", "Observation", "Patient", "Condition", "Organization"]
_PAIRS = [("category", "laboratory"), ("status", "final"), ("code", "http://loinc.org|1234-5")]

clinical_scopes = st.builds(
    ClinicalScope,
    context=st.sampled_from(["patient", "user", "system"]),
    resource_type=st.sampled_from(_TYPES),
    permissions=st.integers(min_value=1, max_value=31),
    restriction=st.sets(st.sampled_from(_PAIRS), max_size=2).map(lambda s: tuple(sorted(s))),
)
scope_sets = st.builds(
    ScopeSet,
    st.lists(clinical_scopes, max_size=6),
    st.sets(st.sampled_from(FLAGS)),
)
requests = st.tuples(
    st.sampled_from(["patient", "user", "system"]),
    st.sampled_from(_TYPES[1:]),
    st.sampled_from(list("cruds")),
    st.lists(st.sampled_from(_PAIRS), max_size=3),
)


def _naive_allows(raw: list[ClinicalScope], context, resource_type, interaction, query) -> bool:
    bit = {"c": 1, "r": 2, "u": 4, "d": 8, "s": 16}[interaction]
    return any(
        s.context == context
        and s.resource_type in ("*", resource_type)
        and s.permissions & bit
        and set(s.restriction) <= set(query)
        for s in raw
    )


@given(scope_sets)
def test_canonical_text_round_trips(scopes):
    again = ScopeSet.parse(str(scopes))
    assert again == scopes
    assert str(again) == str(scopes)


@given(st.lists(clinical_scopes, max_size=6), requests)
def test_canonicalisation_never_changes_what_is_allowed(raw, request):
    context, resource_type, interaction, query = request
    assert ScopeSet(raw).allows(context, resource_type, interaction, query=query) is _naive_allows(
        raw, context, resource_type, interaction, query
    )


@given(scope_sets, scope_sets, requests)
def test_narrow_allows_exactly_what_both_sets_allow(ceiling, requested, request):
    context, resource_type, interaction, query = request
    narrowed = ceiling.narrow(requested)
    assert narrowed.allows(context, resource_type, interaction, query=query) is (
        ceiling.allows(context, resource_type, interaction, query=query)
        and requested.allows(context, resource_type, interaction, query=query)
    )
    assert narrowed.flags == ceiling.flags & requested.flags


@given(scope_sets)
def test_narrowing_by_itself_changes_nothing(scopes):
    assert scopes.narrow(scopes) == scopes
    assert scopes.narrow(str(scopes)) == scopes


_UNIVERSE = [
    (context, resource_type, letter, query)
    for context in ("patient", "user", "system")
    for resource_type in ("Observation", "Patient", "Condition", "Organization", "Encounter")
    for letter in "cruds"
    for query in ([], [_PAIRS[0]], [_PAIRS[1]], [_PAIRS[2]], _PAIRS[:2], _PAIRS[1:], [_PAIRS[0], _PAIRS[2]], _PAIRS)
]


@given(scope_sets, scope_sets)
def test_scope_sets_are_equal_exactly_when_they_allow_the_same_requests(a, b):
    same_meaning = all(
        a.allows(c, t, i, query=q) is b.allows(c, t, i, query=q) for c, t, i, q in _UNIVERSE
    ) and a.flags == b.flags
    assert (a == b) is same_meaning
    if a == b:
        assert hash(a) == hash(b)


def test_partly_covered_scope_keeps_its_letters_yet_equals_its_minimal_form():
    readable = ScopeSet.parse("user/*.c?category=laboratory user/*.cr?category=laboratory&status=final")
    minimal = ScopeSet.parse("user/*.c?category=laboratory user/*.r?category=laboratory&status=final")
    assert str(readable) != str(minimal)
    assert readable == minimal
