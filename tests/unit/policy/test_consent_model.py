"""FHIR R4 Consent → ConsentRules, its validation, and the salted provision hash (teleledger.policy.consent)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import random
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.policy.consent import (
    ANYONE,
    EMERGENCY_PURPOSES,
    Period,
    canonical_form,
    covered_purposes,
    parse_consent,
    provision_hash,
)

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SALT = bytes(range(16))


def actor(ref: str, role: str | None = "PRCP") -> dict:
    a: dict = {"reference": {"reference": ref}}
    if role is not None:
        a["role"] = {"coding": [{"system": PARTICIPATION, "code": role}]}
    return a


def purposes(*codes: str) -> list[dict]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def labels(*codes: str) -> list[dict]:
    return [{"system": ACT_CODE, "code": c} for c in codes]


def classes(*types: str) -> list[dict]:
    return [{"system": TYPES, "code": t} for t in types]


def actions(*codes: str) -> list[dict]:
    return [{"coding": [{"system": ACTION, "code": c}]} for c in codes]


def consent(provision: dict | None, *, scope: str = "patient-privacy", **extra) -> dict:
    resource = {
        "resourceType": "Consent",
        "id": "c1",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": scope}]},
        "patient": {"reference": "Patient/pat-1"},
        **extra,
    }
    if provision is not None:
        resource["provision"] = provision
    return resource


#: "My pharmacy may see my record for treatment in 2025, except my mental-health notes."
PHARMACY = consent(
    {
        "type": "permit",
        "period": {"start": "2025-01-01", "end": "2025-12-31"},
        "actor": [actor("Organization/pharmacy-1")],
        "action": actions("access"),
        "purpose": purposes("TREAT"),
        "provision": [{"securityLabel": labels("MH")}],
    },
    policyRule={"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
)


def invalid(resource: dict, **kw) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_consent(resource, **kw)
    assert info.value.status == 400
    return info.value


# -- reading a consent ----------------------------------------------------------------------


def test_a_pharmacy_consent_with_a_mental_health_exception_is_read_into_rules():
    rules = parse_consent(PHARMACY)
    assert (rules.consent_id, rules.patient_id, rules.scope, rules.status, rules.policy_rule) == (
        "c1", "pat-1", "patient-privacy", "active", "OPTIN"
    )
    root = rules.provision
    assert root.type == "permit"
    assert root.actors == {"Organization/pharmacy-1"}
    assert root.actions == {"access"}
    assert root.purposes == {"TREAT"}
    assert rules.period == Period(
        datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, tzinfo=timezone.utc)
    )
    (exception,) = root.exceptions
    assert (exception.type, exception.labels, exception.actors) == ("deny", {"PSY"}, frozenset())
    assert rules.grantees == {"Organization/pharmacy-1"}


def test_a_consent_naming_no_actor_concerns_anyone():
    rules = parse_consent(consent({"type": "deny", "securityLabel": labels("HIV")}))
    assert rules.grantees == {ANYONE}


def test_a_nested_provision_without_type_is_the_opposite_of_its_parent():
    rules = parse_consent(consent({"type": "deny", "provision": [{"actor": [actor("Practitioner/d1")]}]}))
    assert rules.provision.exceptions[0].type == "permit"


def test_a_research_consent_without_purpose_is_read_as_research_only():
    rules = parse_consent(consent({"type": "permit", "actor": [actor("ResearchStudy/rs-1")]}, scope="research"))
    assert rules.provision.purposes == {"HRESCH"}
    explicit = consent({"type": "permit", "purpose": purposes("CLINTRCH")}, scope="research")
    assert parse_consent(explicit).provision.purposes == {"CLINTRCH"}


def test_a_date_only_end_lasts_until_the_end_of_that_day_and_times_need_a_zone():
    period = {"start": "2025-03", "end": "2025-03-31T18:00:00+02:00"}
    rules = parse_consent(consent({"type": "permit", "period": period}))
    assert rules.period.start == datetime(2025, 3, 1, tzinfo=timezone.utc)
    assert rules.period.end == datetime(2025, 3, 31, 16, tzinfo=timezone.utc)
    error = invalid(consent({"type": "permit", "period": {"start": "2025-03-01T10:00:00"}}))
    assert error.expression == "Consent.provision.period.start"
    assert "time zone" in error.message


def test_an_actor_role_may_be_left_out_but_must_be_a_recipient_when_given():
    assert parse_consent(consent({"type": "permit", "actor": [actor("Practitioner/d1", role=None)]}))
    error = invalid(consent({"type": "permit", "actor": [actor("Practitioner/d1", role="CST")]}))
    assert error.expression == "Consent.provision.actor[0].role"


def test_purposes_cover_their_v3_specializations():
    assert {"TREAT", "ETREAT", "BTG", "ERTREAT", "COC"} <= covered_purposes({"TREAT"})
    assert "HPAYMT" not in covered_purposes({"TREAT"})
    assert covered_purposes({"HRESCH"}) >= {"CLINTRCH", "CLINTRCHPC"}
    assert EMERGENCY_PURPOSES == {"ETREAT", "BTG", "ERTREAT"}


# -- bad input: each with a clear error naming where -------------------------------------------


def test_a_period_that_ends_before_it_starts_is_rejected_naming_the_provision():
    bad = consent(
        {
            "type": "permit",
            "provision": [
                {"securityLabel": labels("HIV")},
                {"securityLabel": labels("PSY"), "period": {"start": "2025-06-01", "end": "2025-01-01"}},
            ],
        }
    )
    error = invalid(bad)
    assert error.expression == "Consent.provision.provision[1].period"
    assert "ends (2025-01-01) before it starts (2025-06-01)" in error.message


@pytest.mark.parametrize("ref", ["Patient/pat-2", "Device/d1", "Practitioner", "Practitioner/", "urn:uuid:1234"])
def test_an_actor_of_an_unknown_type_is_rejected(ref):
    error = invalid(consent({"type": "permit", "actor": [actor("Practitioner/d1"), actor(ref)]}))
    assert error.expression == "Consent.provision.actor[1].reference"


def test_a_grant_to_an_actor_the_caller_does_not_know_is_rejected():
    known = {"Organization/pharmacy-1"}
    error = invalid(PHARMACY, actor_exists=lambda ref: ref in known - {"Organization/pharmacy-1"})
    assert error.expression == "Consent.provision.actor[0].reference"
    assert "Organization/pharmacy-1 is not a known actor" in error.message
    assert parse_consent(PHARMACY, actor_exists=known.__contains__).patient_id == "pat-1"


@pytest.mark.parametrize(
    ("coding", "where"),
    [
        ({"system": ACT_REASON, "code": "SHOPPING"}, "Consent.provision.purpose[0]"),
        ({"system": "http://example.org", "code": "TREAT"}, "Consent.provision.purpose[0]"),
    ],
)
def test_a_purpose_outside_the_value_set_is_rejected(coding, where):
    error = invalid(consent({"type": "permit", "purpose": [coding]}))
    assert error.expression == where


@pytest.mark.parametrize(
    ("provision", "where"),
    [
        ({"type": "permit", "action": actions("sell")}, "Consent.provision.action[0]"),
        ({"type": "permit", "class": classes("Spaceship")}, "Consent.provision.class[0]"),
        ({"type": "permit", "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                               "code": "R"}]}, "Consent.provision.securityLabel[0]"),
        ({"type": "allow"}, "Consent.provision.type"),
        ({"purpose": purposes("TREAT")}, "Consent.provision.type"),
        ({"type": "permit", "data": [{"meaning": "instance", "reference": {"reference": "Observation/o1"}}]},
         "Consent.provision.data"),
        ({"type": "permit", "code": [{"coding": [{"system": "http://loinc.org", "code": "1234-5"}]}]},
         "Consent.provision.code"),
        ({"type": "permit", "modifierExtension": [{"url": "http://example.org/x", "valueBoolean": True}]},
         "Consent.provision.modifierExtension"),
    ],
)
def test_provisions_outside_the_model_are_rejected(provision, where):
    assert invalid(consent(provision)).expression == where


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"resourceType": "Patient"}, "Consent"),
        ({"status": "signed"}, "Consent.status"),
        ({"scope": {"coding": [{"system": SCOPE, "code": "adr"}]}}, "Consent.scope.coding[0]"),
        ({"patient": {"reference": "Group/g1"}}, "Consent.patient"),
        ({"patient": None}, "Consent.patient"),
        ({"policyRule": {"coding": [{"system": ACT_CODE, "code": "PSY"}]}}, "Consent.policyRule.coding[0]"),
        ({"modifierExtension": [{"url": "http://example.org/x"}]}, "Consent.modifierExtension"),
    ],
)
def test_consents_that_are_not_access_rules_are_rejected(change, where):
    resource = {**PHARMACY, **change}
    assert invalid(resource).expression == where


def test_a_consent_without_provision_is_rejected():
    assert invalid(consent(None)).expression == "Consent.provision"


def test_contradictory_overlapping_provisions_at_one_level_are_rejected():
    bad = consent(
        {
            "type": "permit",
            "provision": [
                {"type": "deny", "securityLabel": labels("PSY")},
                {"type": "permit", "securityLabel": labels("PSY"), "actor": [actor("Practitioner/d1")]},
            ],
        }
    )
    error = invalid(bad)
    assert error.expression == "Consent.provision.provision[1]"
    assert "contradicts Consent.provision.provision[0]" in error.message


def test_contradictions_are_found_at_any_depth():
    bad = consent(
        {
            "type": "permit",
            "provision": [
                {
                    "type": "deny",
                    "class": classes("Observation"),
                    "provision": [
                        {"type": "permit", "purpose": purposes("ETREAT")},
                        {"type": "deny", "purpose": purposes("TREAT")},
                    ],
                }
            ],
        }
    )
    assert invalid(bad).expression == "Consent.provision.provision[0].provision[1]"


@pytest.mark.parametrize(
    "second",
    [
        {"type": "permit", "securityLabel": labels("HIV")},  # other data
        {"type": "permit", "purpose": purposes("HPAYMT")},  # other purpose
        {"type": "permit", "actor": [actor("Practitioner/d2")]},  # other actor
        {"type": "permit", "period": {"start": "2030-01-01"}},  # other time
        {"type": "permit", "action": actions("collect")},  # other action
    ],
)
def test_opposite_siblings_that_do_not_overlap_are_fine(second):
    first = {"type": "deny", "purpose": purposes("TREAT"), "securityLabel": labels("PSY"),
             "actor": [actor("Practitioner/d1")], "period": {"end": "2029-12-31"}, "action": actions("access")}
    rules = parse_consent(consent({"type": "permit", "provision": [first, second]}))
    assert len(rules.provision.exceptions) == 2


# -- provision hash -------------------------------------------------------------------------


def test_the_canonical_form_is_the_documented_json():
    expected = (
        '{"patient":"pat-1","policyRule":"OPTIN","provision":{"action":["access"],'
        '"actor":["Organization/pharmacy-1"],"class":[],'
        '"period":["2025-01-01T00:00:00.000000Z","2026-01-01T00:00:00.000000Z"],'
        '"provision":[{"action":[],"actor":[],"class":[],"period":[null,null],"provision":[],"purpose":[],'
        '"securityLabel":["PSY"],"type":"deny"}],"purpose":["TREAT"],"securityLabel":[],"type":"permit"},'
        '"scope":"patient-privacy"}'
    )
    assert canonical_form(parse_consent(PHARMACY)).decode() == expected


def test_the_provision_hash_is_the_salted_hmac_of_the_canonical_form():
    rules = parse_consent(PHARMACY)
    expected = hmac.new(SALT, b"teleledger/consent-provision/v1\n" + canonical_form(rules), hashlib.sha256).digest()
    digest = provision_hash(rules, SALT)
    assert digest == expected and len(digest) == 32


def test_the_hash_depends_on_the_salt_so_the_chain_cannot_be_dictionary_attacked():
    rules = parse_consent(PHARMACY)
    assert provision_hash(rules, SALT) != provision_hash(rules, bytes(16))
    with pytest.raises(InvalidInput):
        provision_hash(rules, b"short")


def test_the_hash_ignores_order_id_and_status_but_not_meaning():
    rules = parse_consent(PHARMACY)
    reordered = copy.deepcopy(PHARMACY)
    reordered["id"], reordered["status"] = "other-id", "inactive"
    reordered["provision"]["provision"] = [{"securityLabel": labels("PSY")}]  # MH and PSY are one label
    assert provision_hash(parse_consent(reordered), SALT) == provision_hash(rules, SALT)
    changed = copy.deepcopy(PHARMACY)
    changed["provision"]["purpose"] = purposes("HPAYMT")
    assert provision_hash(parse_consent(changed), SALT) != provision_hash(rules, SALT)
    other_patient = {**PHARMACY, "patient": {"reference": "Patient/pat-2"}}
    assert provision_hash(parse_consent(other_patient), SALT) != provision_hash(rules, SALT)


_LABELS = ["PSY", "HIV", "ETH", "GDIS", "SEX"]
_TYPES = ["Observation", "Condition", "MedicationRequest", "DocumentReference"]


@given(
    st.lists(st.sampled_from(_LABELS), min_size=1, max_size=5, unique=True),
    st.lists(st.sampled_from(_TYPES), min_size=1, max_size=4, unique=True),
    st.randoms(use_true_random=False),
)
def test_shuffling_lists_and_exceptions_never_changes_the_hash(label_codes, type_codes, rnd: random.Random):
    def build(order: random.Random) -> dict:
        ls, ts = list(label_codes), list(type_codes)
        order.shuffle(ls)
        order.shuffle(ts)
        nested = [{"securityLabel": labels(label_codes[0])}, {"class": classes(*ts)}]
        order.shuffle(nested)
        return consent({"type": "permit", "securityLabel": labels(*ls), "provision": nested})

    reference = provision_hash(parse_consent(build(random.Random(0))), SALT)
    assert provision_hash(parse_consent(build(rnd)), SALT) == reference
