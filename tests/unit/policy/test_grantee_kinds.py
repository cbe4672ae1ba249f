"""What kind of grantee an Organization is (pharmacy, payer, clinic) and what a portal grant to
it is for."""

from __future__ import annotations

import pytest

from teleledger.core.errors import InvalidInput
from teleledger.policy.service import build_consent, organization_kind

ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"


def org(*codings: tuple[str, str]) -> dict:
    return {"resourceType": "Organization", "id": "o",
            "type": [{"coding": [{"system": s, "code": c} for s, c in codings]}]}


@pytest.mark.parametrize(("resource", "kind"), [
    (org(("http://snomed.info/sct", "264372000")), "pharmacy"),
    (org(("http://nucc.org/provider-taxonomy", "3336C0003X")), "pharmacy"),
    (org((ORG_TYPE, "prov"), ("http://snomed.info/sct", "264372000")), "pharmacy"),  # a pharmacy is a provider too
    (org((ORG_TYPE, "pay")), "payer"),
    (org((ORG_TYPE, "ins")), "payer"),
    (org((ORG_TYPE, "prov")), "clinic"),
    (org((ORG_TYPE, "dept")), "clinic"),
    (org((ORG_TYPE, "edu")), "organization"),
    ({"resourceType": "Organization", "id": "o"}, "organization"),
    ({"resourceType": "Organization", "id": "o", "type": ["junk", {"coding": "junk"}]}, "organization"),
    (org(("http://example.org/other", "pay")), "organization"),  # the code alone is not enough
])
def test_an_organizations_kind_comes_from_its_type_codings(resource, kind):
    assert organization_kind(resource) == kind


def test_a_portal_grant_carries_the_purpose_it_is_given_or_its_kinds_default():
    purposes = lambda c: [p["code"] for p in c["provision"]["purpose"]]  # noqa: E731
    assert purposes(build_consent("p", "Organization/payer", [], [], None, None, purpose="HPAYMT")) == ["HPAYMT"]
    assert purposes(build_consent("p", "Organization/pharmacy", [], [], None, None)) == ["TREAT"]
    study = build_consent("p", "ResearchStudy/s", [], [], None, None)
    assert purposes(study) == ["HRESCH"] and study["scope"]["coding"][0]["code"] == "research"


@pytest.mark.parametrize(("actor", "purpose"), [("Practitioner/d", "HPAYMT"), ("ResearchStudy/s", "TREAT"),
                                                ("Organization/o", "HRESCH")])
def test_a_purpose_that_does_not_fit_the_grantee_is_refused(actor, purpose):
    with pytest.raises(InvalidInput, match="cannot be for purpose"):
        build_consent("p", actor, [], [], None, None, purpose=purpose)
