"""The single access decision point (teleledger.policy.decide)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.identity.tokens import Claims
from teleledger.policy.decide import decide, search_filter
from teleledger.policy.model import (
    AccessRequest,
    All,
    CareTeamOf,
    Compartments,
    Decision,
    Nothing,
    Principal,
    PublicOnly,
)


class FakeCare:
    def __init__(self, pairs: set[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.calls = 0

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        self.calls += 1
        return (practitioner_id, patient_id) in self.pairs


class FakeGrants:
    def __init__(self, decision: Decision | None) -> None:
        self.decision = decision
        self.asked: list[tuple[Principal, AccessRequest]] = []

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None:
        self.asked.append((principal, request))
        return self.decision


CONSENTED = Decision(True, "consent-grant", "A consent grant covers this access.")

# prac-1 cares for pat-2 and pat-4; nobody cares for pat-3; pat-1 is the patient principal.
CARE = {("prac-1", "pat-2"), ("prac-1", "pat-4")}


def principal(role: str, scopes: ScopeSet | None = None, *, patient_id=None, practitioner_id=None) -> Principal:
    if scopes is None:
        scopes = ScopeSet.parse("system/*.cruds") if role == "service" else ROLE_SCOPE_SETS[role]
    return Principal(f"acct-{role}", role, scopes, patient_id, practitioner_id)  # type: ignore[arg-type]


PRINCIPALS = {
    "patient": principal("patient", patient_id="pat-1"),
    "practitioner": principal("practitioner", practitioner_id="prac-1"),
    "pharmacist": principal("pharmacist"),
    "payer": principal("payer"),
    "researcher": principal("researcher"),
    "admin": principal("admin"),
    "service": principal("service"),
}


def req(action, resource_type, *patients, **extra) -> AccessRequest:
    return AccessRequest(action, resource_type, frozenset(patients), **extra)


SCENARIOS = {
    "own record": req("read", "Observation", "pat-1"),
    "other patient with relationship": req("read", "Observation", "pat-2"),
    "other patient without relationship": req("read", "Observation", "pat-3"),
    "directory resource": req("read", "Organization"),
    "create establishing care": req("create", "Appointment", "pat-3", establishes_care=True),
    "admin reading clinical": req("read", "AuditEvent", "pat-2"),
    "pharmacy data": req("read", "MedicationRequest", "pat-2"),
    "claims data": req("read", "Claim", "pat-2"),
    "research data": req("read", "ResearchSubject", "pat-2"),
}

EXPECTED = {
    #               own record             with relationship      without relationship   directory           establishing care      admin clinical         pharmacy               claims                 research
    "patient":      ("own-compartment",    "not-own-compartment", "not-own-compartment", "public-directory", "not-own-compartment", "not-own-compartment", "not-own-compartment", "not-own-compartment", "not-own-compartment"),
    "practitioner": ("no-relationship",    "care-relationship",   "no-relationship",     "public-directory", "establishes-care",    "care-relationship",   "care-relationship",   "care-relationship",   "care-relationship"),
    "pharmacist":   ("scope-denied",       "scope-denied",        "scope-denied",        "public-directory", "scope-denied",        "scope-denied",        "needs-consent",       "scope-denied",        "scope-denied"),
    "payer":        ("scope-denied",       "scope-denied",        "scope-denied",        "public-directory", "scope-denied",        "scope-denied",        "scope-denied",        "needs-consent",       "scope-denied"),
    "researcher":   ("scope-denied",       "scope-denied",        "scope-denied",        "scope-denied",     "scope-denied",        "scope-denied",        "scope-denied",        "scope-denied",        "needs-consent"),
    "admin":        ("scope-denied",       "scope-denied",        "scope-denied",        "public-directory", "scope-denied",        "admin-no-clinical",   "scope-denied",        "scope-denied",        "scope-denied"),
    "service":      ("system-scope",       "system-scope",        "system-scope",        "system-scope",     "system-scope",        "system-scope",        "system-scope",        "system-scope",        "system-scope"),
}  # fmt: skip

ALLOWING = {
    "own-compartment",
    "care-relationship",
    "public-directory",
    "establishes-care",
    "system-scope",
    "directory-editor",
    "own-directory-entry",
    "search-filtered",
    "not-patient-data",
}

MATRIX = [
    pytest.param(role, scenario, EXPECTED[role][i], id=f"{role} / {scenario}")
    for role in PRINCIPALS
    for i, scenario in enumerate(SCENARIOS)
]


@pytest.mark.parametrize(("role", "scenario", "reason"), MATRIX)
def test_decision_matrix_gives_the_exact_rule(role, scenario, reason):
    decision = decide(PRINCIPALS[role], SCENARIOS[scenario], FakeCare(CARE))
    assert (decision.reason, decision.allowed) == (reason, reason in ALLOWING)


# -- scope check ----------------------------------------------------------------------------


def test_scope_check_comes_before_any_relationship_lookup():
    care = FakeCare(CARE)
    doctor = principal("practitioner", ScopeSet.parse("user/Observation.rs"), practitioner_id="prac-1")
    assert decide(doctor, req("update", "Observation", "pat-2"), care).reason == "scope-denied"
    assert care.calls == 0


@pytest.mark.parametrize(
    ("action", "letters", "allowed"),
    [
        ("create", "c", True),
        ("read", "r", True),
        ("vread", "r", True),
        ("history", "r", True),
        ("update", "u", True),
        ("delete", "d", True),
        ("search", "s", True),
        ("read", "s", False),
        ("search", "r", False),
        ("history", "s", False),
        ("update", "c", False),
        ("delete", "cru", False),
    ],
)
def test_each_action_needs_its_smart_letter(action, letters, allowed):
    doctor = principal("practitioner", ScopeSet.parse(f"user/Observation.{letters}"), practitioner_id="prac-1")
    assert decide(doctor, req(action, "Observation", "pat-2"), FakeCare(CARE)).allowed is allowed


def test_patient_scopes_do_not_work_for_a_practitioner_and_user_scopes_not_for_a_patient():
    doctor = principal("practitioner", ScopeSet.parse("patient/*.cruds"), practitioner_id="prac-1")
    patient = principal("patient", ScopeSet.parse("user/*.cruds"), patient_id="pat-1")
    assert decide(doctor, req("read", "Observation", "pat-2"), FakeCare(CARE)).reason == "scope-denied"
    assert decide(patient, req("read", "Observation", "pat-1"), FakeCare(CARE)).reason == "scope-denied"


def test_service_needs_system_scopes_for_the_type():
    service = principal("service", ScopeSet.parse("system/Patient.rs user/*.cruds"))
    assert decide(service, req("read", "Patient", "pat-3"), FakeCare(set())).reason == "system-scope"
    assert decide(service, req("read", "Observation", "pat-3"), FakeCare(set())).reason == "scope-denied"


def test_query_restricted_scope_allows_only_the_matching_search():
    patient = principal("patient", ScopeSet.parse("patient/Observation.rs?category=laboratory"), patient_id="pat-1")
    care = FakeCare(set())
    lab = (("category", "laboratory"),)
    assert decide(patient, req("search", "Observation", query=lab), care).reason == "search-filtered"
    assert decide(patient, req("search", "Observation"), care).reason == "scope-denied"
    assert decide(patient, req("search", "Observation", query=(("category", "vital-signs"),)), care).reason == (
        "scope-denied"
    )


# -- patients -------------------------------------------------------------------------------


def test_patient_may_not_create_a_patient_even_with_a_scope_for_it():
    patient = principal("patient", ScopeSet.parse("patient/*.cruds"), patient_id="pat-1")
    decision = decide(patient, req("create", "Patient", "pat-1"), FakeCare(set()))
    assert (decision.allowed, decision.reason) == (False, "patient-cannot-create-patient")


def test_patient_may_write_a_message_in_their_own_compartment():
    decision = decide(PRINCIPALS["patient"], req("create", "Communication", "pat-1"), FakeCare(set()))
    assert decision.reason == "own-compartment"


def test_patient_may_read_but_not_write_a_resource_shared_with_another_patient():
    shared = ("pat-1", "pat-2")
    patient = PRINCIPALS["patient"]
    assert decide(patient, req("read", "Communication", *shared), FakeCare(set())).reason == "own-compartment"
    assert decide(patient, req("update", "Communication", *shared), FakeCare(set())).reason == "not-own-compartment"
    assert decide(patient, req("create", "Appointment", *shared), FakeCare(set())).reason == "not-own-compartment"


def test_patient_may_not_write_a_resource_outside_every_compartment():
    decision = decide(PRINCIPALS["patient"], req("create", "Communication"), FakeCare(set()))
    assert decision.reason == "not-own-compartment"


def test_patient_account_without_a_linked_patient_sees_the_directory_but_no_record():
    unlinked = principal("patient")
    assert decide(unlinked, req("read", "Observation", "pat-1"), FakeCare(set())).reason == "no-linked-patient"
    assert decide(unlinked, req("read", "Practitioner"), FakeCare(set())).reason == "public-directory"


def test_patient_search_is_allowed_per_type_and_filtered_to_their_compartment():
    patient = PRINCIPALS["patient"]
    assert decide(patient, req("search", "Observation"), FakeCare(set())).reason == "search-filtered"
    assert search_filter(patient) == Compartments(frozenset({"pat-1"}))


def test_per_result_search_decisions_follow_the_read_rules():
    patient = PRINCIPALS["patient"]
    assert decide(patient, req("search", "Observation", "pat-1"), FakeCare(set())).reason == "own-compartment"
    assert decide(patient, req("search", "Observation", "pat-2"), FakeCare(set())).reason == "not-own-compartment"


# -- practitioners --------------------------------------------------------------------------


def test_practitioner_needs_a_relationship_with_every_patient_in_the_compartment():
    doctor = PRINCIPALS["practitioner"]
    assert decide(doctor, req("read", "Group", "pat-2", "pat-4"), FakeCare(CARE)).reason == "care-relationship"
    assert decide(doctor, req("read", "Group", "pat-2", "pat-3"), FakeCare(CARE)).reason == "no-relationship"


@pytest.mark.parametrize("resource_type", ["Encounter", "Appointment", "CareTeam"])
def test_practitioner_participating_in_a_new_encounter_appointment_or_care_team_may_create_it(resource_type):
    request = req("create", resource_type, "pat-3", establishes_care=True)
    assert decide(PRINCIPALS["practitioner"], request, FakeCare(set())).reason == "establishes-care"


def test_establishes_care_flag_is_ignored_on_other_types_and_other_actions():
    doctor = PRINCIPALS["practitioner"]
    care = FakeCare(set())
    assert decide(doctor, req("create", "Observation", "pat-3", establishes_care=True), care).reason == (
        "no-relationship"
    )
    assert decide(doctor, req("update", "Encounter", "pat-3", establishes_care=True), care).reason == (
        "no-relationship"
    )
    assert decide(doctor, req("create", "Encounter", "pat-3"), care).reason == "no-relationship"


def test_practitioner_account_without_a_linked_practitioner_gets_no_patient_data():
    unlinked = principal("practitioner")
    assert decide(unlinked, req("read", "Observation", "pat-2"), FakeCare(CARE)).reason == "no-linked-practitioner"
    assert search_filter(unlinked) == PublicOnly()


def test_practitioner_search_is_filtered_to_their_care_team():
    assert search_filter(PRINCIPALS["practitioner"]) == CareTeamOf("prac-1")


def test_practitioner_keeps_their_own_schedule_but_not_a_colleagues():
    doctor = PRINCIPALS["practitioner"]
    care = FakeCare(set())
    own = frozenset({"prac-1"})
    assert decide(doctor, req("create", "Slot", practitioner_ids=own), care).reason == "own-directory-entry"
    assert decide(doctor, req("update", "Practitioner", practitioner_ids=own), care).reason == "own-directory-entry"
    assert decide(doctor, req("delete", "Practitioner", practitioner_ids=own), care).reason == "directory-read-only"
    assert decide(doctor, req("update", "Schedule", practitioner_ids=frozenset({"prac-9"})), care).reason == (
        "directory-read-only"
    )
    assert decide(doctor, req("create", "Organization", practitioner_ids=own), care).reason == "directory-read-only"


def test_practitioner_may_write_data_that_belongs_to_no_patient():
    decision = decide(PRINCIPALS["practitioner"], req("create", "Questionnaire"), FakeCare(set()))
    assert decision.reason == "not-patient-data"


def test_nobody_but_a_service_writes_audit_events():
    doctor = PRINCIPALS["practitioner"]
    assert decide(doctor, req("create", "AuditEvent", "pat-2"), FakeCare(CARE)).reason == "server-managed-type"
    assert decide(doctor, req("delete", "AuditEvent"), FakeCare(CARE)).reason == "server-managed-type"
    assert decide(doctor, req("read", "AuditEvent", "pat-2"), FakeCare(CARE)).reason == "care-relationship"
    assert decide(PRINCIPALS["service"], req("create", "AuditEvent", "pat-2"), FakeCare(set())).reason == (
        "system-scope"
    )


# -- admins ---------------------------------------------------------------------------------


def test_admin_never_reads_patient_data_even_with_broad_scopes():
    admin = principal("admin", ScopeSet.parse("user/*.cruds"))
    for action in ("read", "search", "history", "update", "delete", "create"):
        decision = decide(admin, req(action, "Observation", "pat-2"), FakeCare(CARE))
        assert (decision.allowed, decision.reason) == (False, "admin-no-clinical")


def test_admin_reads_audit_events_that_are_about_no_patient():
    decision = decide(PRINCIPALS["admin"], req("read", "AuditEvent"), FakeCare(set()))
    assert decision.reason == "not-patient-data"


def test_admin_edits_the_directory_and_researchers_their_studies():
    care = FakeCare(set())
    assert decide(PRINCIPALS["admin"], req("create", "Organization"), care).reason == "directory-editor"
    assert decide(PRINCIPALS["admin"], req("delete", "Slot"), care).reason == "directory-editor"
    assert decide(PRINCIPALS["researcher"], req("update", "ResearchStudy"), care).reason == "directory-editor"
    assert decide(PRINCIPALS["researcher"], req("read", "ResearchStudy"), care).reason == "public-directory"


def test_admin_search_is_public_only():
    assert search_filter(PRINCIPALS["admin"]) == PublicOnly()


# -- consent extension point ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "resource_type"),
    [("pharmacist", "MedicationRequest"), ("payer", "Claim"), ("researcher", "ResearchSubject")],
)
def test_a_consent_grant_decides_for_pharmacist_payer_and_researcher(role, resource_type):
    grants = FakeGrants(CONSENTED)
    request = req("read", resource_type, "pat-2")
    assert decide(PRINCIPALS[role], request, FakeCare(set()), grants) is CONSENTED
    assert grants.asked == [(PRINCIPALS[role], request)]


def test_grants_are_not_consulted_for_admins_or_non_patient_data():
    grants = FakeGrants(CONSENTED)
    care = FakeCare(set())
    assert decide(PRINCIPALS["admin"], req("read", "AuditEvent", "pat-2"), care, grants).reason == "admin-no-clinical"
    assert decide(PRINCIPALS["pharmacist"], req("read", "Organization"), care, grants).reason == "public-directory"
    assert grants.asked == []


def test_a_practitioner_without_a_care_relationship_is_settled_by_a_consent_grant():
    # issue 5 (consent): without a care relationship only a permit helps (was: always denied)
    request = req("read", "Observation", "pat-3")
    assert decide(PRINCIPALS["practitioner"], request, FakeCare(set()), FakeGrants(CONSENTED)) is CONSENTED
    assert decide(PRINCIPALS["practitioner"], request, FakeCare(set()), FakeGrants(None)).reason == "no-relationship"


@pytest.mark.parametrize("role", ["pharmacist", "payer", "researcher"])
def test_consent_roles_search_public_rows_only_until_grants_exist(role):
    assert search_filter(PRINCIPALS[role]) == PublicOnly()


# -- odd inputs and shape -------------------------------------------------------------------


def test_unknown_role_and_action_are_denied():
    stranger = principal("service", ScopeSet.parse("system/*.cruds user/*.cruds"))
    stranger = Principal("x", "root", stranger.scopes, None, None)  # type: ignore[arg-type]
    assert decide(stranger, req("read", "Organization"), FakeCare(set())).reason == "unknown-role"
    assert search_filter(stranger) == Nothing()
    bad_action = AccessRequest("patch", "Organization", frozenset())  # type: ignore[arg-type]
    assert decide(PRINCIPALS["service"], bad_action, FakeCare(set())).reason == "unknown-action"


def test_service_search_is_unrestricted():
    assert search_filter(PRINCIPALS["service"]) == All()


def test_decisions_are_shared_constants_so_deciding_allocates_nothing():
    a = decide(PRINCIPALS["practitioner"], req("read", "Observation", "pat-2"), FakeCare(CARE))
    b = decide(PRINCIPALS["practitioner"], req("read", "Condition", "pat-4"), FakeCare(CARE))
    assert a is b


def test_decision_details_name_no_patient_or_account():
    for role, p in PRINCIPALS.items():
        for request in SCENARIOS.values():
            detail = decide(p, request, FakeCare(CARE)).detail
            assert "pat-" not in detail and "prac-" not in detail and "acct-" not in detail, role


# -- principals from tokens -----------------------------------------------------------------


def _claims(role: str, *, patient=None, fhir_user=None) -> Claims:
    t = datetime(2025, 1, 1, tzinfo=timezone.utc)
    scopes = ScopeSet.empty()
    return Claims("iss", "aud", "acct-1", t, t, t, "jti", scopes, role, patient, fhir_user, None)  # type: ignore[arg-type]


def test_a_patient_token_links_the_principal_to_its_patient():
    p = Principal.from_claims(_claims("patient", patient="pat-1", fhir_user="Patient/pat-1"))
    assert (p.patient_id, p.practitioner_id, p.purpose) == ("pat-1", None, "TREAT")


def test_a_practitioner_tokens_patient_claim_is_launch_context_not_identity():
    claims = _claims("practitioner", patient="pat-9", fhir_user="Practitioner/prac-1")
    p = Principal.from_claims(claims, purpose="ETREAT")
    assert (p.patient_id, p.practitioner_id, p.purpose) == (None, "prac-1", "ETREAT")


@pytest.mark.parametrize("fhir_user", [None, "Patient/prac-1", "Practitioner/", "Practitioner/a/b", "prac-1"])
def test_practitioner_id_comes_only_from_a_well_formed_practitioner_fhir_user(fhir_user):
    assert Principal.from_claims(_claims("practitioner", fhir_user=fhir_user)).practitioner_id is None


def test_other_roles_are_linked_to_neither_resource():
    p = Principal.from_claims(_claims("pharmacist", patient="pat-1", fhir_user="Practitioner/prac-1"))
    assert (p.patient_id, p.practitioner_id) == (None, None)


# -- invariants -----------------------------------------------------------------------------

_ROLES = list(PRINCIPALS)
_TYPES = ["Observation", "Patient", "Organization", "Encounter", "AuditEvent", "Claim", "Slot", "Questionnaire"]
_ACTIONS = ["create", "read", "vread", "update", "delete", "search", "history"]
_PATIENTS = ["pat-1", "pat-2", "pat-3", "pat-4"]

principals = st.builds(
    principal,
    st.sampled_from(_ROLES),
    st.sampled_from(
        [None, ScopeSet.parse("patient/*.cruds user/*.cruds system/*.cruds"), ScopeSet.parse("user/*.rs patient/*.rs")]
    ),
    patient_id=st.sampled_from([None, "pat-1"]),
    practitioner_id=st.sampled_from([None, "prac-1"]),
)
requests = st.builds(
    AccessRequest,
    st.sampled_from(_ACTIONS),
    st.sampled_from(_TYPES),
    st.frozensets(st.sampled_from(_PATIENTS), max_size=3),
    establishes_care=st.booleans(),
    practitioner_ids=st.frozensets(st.sampled_from(["prac-1", "prac-9"]), max_size=2),
)
_LETTER = {"create": "c", "read": "r", "vread": "r", "history": "r", "update": "u", "delete": "d", "search": "s"}
_CONTEXT = {"patient": "patient", "service": "system"}


@given(principals, requests)
def test_nothing_is_allowed_that_the_scopes_do_not_allow(p, r):
    scoped = p.scopes.allows(_CONTEXT.get(p.role, "user"), r.resource_type, _LETTER[r.action])
    if not scoped:
        decision = decide(p, r, FakeCare(CARE))
        assert (decision.allowed, decision.reason) == (False, "scope-denied")


@given(principals, requests)
def test_patient_data_reaches_only_its_patient_its_care_team_or_a_service(p, r):
    decision = decide(p, r, FakeCare(CARE))
    if not decision.allowed or not r.patient_ids:
        return
    if p.role == "patient":
        assert p.patient_id in r.patient_ids
        if r.action not in ("read", "vread", "search", "history"):
            assert r.patient_ids == {p.patient_id}
    elif p.role == "practitioner":
        assert p.practitioner_id is not None
        assert (r.establishes_care and r.action == "create") or all(("prac-1", x) in CARE for x in r.patient_ids)
    else:
        assert p.role == "service"


def test_only_a_linked_patient_may_open_their_own_access_log():
    from teleledger.identity.scopes import ROLE_SCOPE_SETS
    from teleledger.policy.decide import own_access_log
    from teleledger.policy.model import Principal

    def who(role, patient_id=None, practitioner_id=None):
        return Principal("acct", role, ROLE_SCOPE_SETS[role], patient_id, practitioner_id)

    assert own_access_log(who("patient", "p1")).allowed
    assert own_access_log(who("patient")).reason == "not-a-patient"
    assert not own_access_log(who("practitioner", practitioner_id="d1")).allowed
    assert not own_access_log(who("admin")).allowed
