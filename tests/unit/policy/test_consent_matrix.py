"""The consent authorization matrix: every role × action × situation gives one exact decision.

The world: a node with the default policy, a ConsentIndex fed the way the chain indexer feeds it
(parsed FHIR Consents, grant and revoke events), break-glass claims, and care relationships.
Each situation is a resource of one patient (with the labels and purpose the situation needs).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from teleledger.identity.scopes import ROLE_SCOPE_SETS, ScopeSet
from teleledger.policy.consent import parse_consent
from teleledger.policy.consent_index import ConsentIndex
from teleledger.policy.decide import decide
from teleledger.policy.model import AccessRequest, Principal

NOW = 1_750_000_000.0
HOUR = 3600.0
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

PHARMACY, PAYER, STUDY = "Organization/pharmacy-1", "Organization/payer-1", "ResearchStudy/rs-1"
DR_CARE, DR_OTHER, DELEGATE_REF = "Practitioner/d1", "Practitioner/d2", "RelatedPerson/rp-1"
GRANTEES = [PHARMACY, PAYER, STUDY, DR_OTHER, DELEGATE_REF]


def consent(cid: str, patient: str, actors: list[str], *, scope: str = "patient-privacy", nested=()) -> dict:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}]},
        "patient": {"reference": f"Patient/{patient}"},
        "provision": {
            "type": "permit",
            "actor": [{"reference": {"reference": a}} for a in actors],
            "provision": list(nested),
        },
    }


class Care:
    def __init__(self, pairs: set[tuple[str, str]]) -> None:
        self.pairs = pairs

    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool:
        return (practitioner_id, patient_id) in self.pairs


def build_world() -> tuple[ConsentIndex, Care]:
    index = ConsentIndex(now=lambda: NOW)
    block = iter(range(1, 1000))

    def grant(cid: str, patient: str, grantee: str, resource: dict, **window) -> None:
        rules = parse_consent(resource)
        index.apply_grant(cid, patient, [grantee], rules, window.get("valid_from"), window.get("valid_until"),
                          (next(block), 0))

    for grantee in GRANTEES:
        name = grantee.split("/")[1]
        scope = "research" if grantee == STUDY else "patient-privacy"
        # consented: pat-2 permits each grantee
        grant(f"ok-{name}", "pat-2", grantee, consent(f"ok-{name}", "pat-2", [grantee], scope=scope))
        # consent expired: valid until an hour ago
        grant(f"old-{name}", "pat-3", grantee, consent(f"old-{name}", "pat-3", [grantee], scope=scope),
              valid_from=NOW - 48 * HOUR, valid_until=NOW - HOUR)
        # revoked: granted, then revoked in a later block
        grant(f"rev-{name}", "pat-4", grantee, consent(f"rev-{name}", "pat-4", [grantee], scope=scope))
        index.apply_revoke(f"rev-{name}", "pat-4", [grantee], (next(block), 0))
    # deny exception: "everyone I named may see everything except my mental-health data"
    everyone = [*GRANTEES, DR_CARE]
    no_psy = {"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}
    mh = consent("mh", "pat-5", everyone, nested=[no_psy])
    for grantee in everyone:
        grant("mh", "pat-5", grantee, mh)
    # break-glass active (pat-7) and expired (pat-8), claimed by both practitioners
    for dr in ("d1", "d2"):
        index.claim_break_glass(dr, "pat-7", "unconscious in the ER, no history", NOW - HOUR, 4 * HOUR)
        index.claim_break_glass(dr, "pat-8", "unconscious in the ER, no history", NOW - 5 * HOUR, 4 * HOUR)
    # delegate: pat-9 lets their RelatedPerson act for them
    grant("proxy", "pat-9", DELEGATE_REF, consent("proxy", "pat-9", [DELEGATE_REF]))
    # d1 treats everyone but pat-6
    care = Care({("d1", f"pat-{i}") for i in range(1, 10) if i != 6})
    return index, care


INDEX, CARE = build_world()


def who(role: str, *, patient=None, practitioner=None, refs=(), purpose="TREAT", scopes=None) -> Principal:
    scopes = scopes or (ScopeSet.parse("system/*.cruds") if role == "service" else ROLE_SCOPE_SETS[role])
    return Principal(f"acct-{role}", role, scopes, patient, practitioner, purpose,  # type: ignore[arg-type]
                     actor_refs=frozenset(refs))


#: role → (principal, the resource type that role works with)
ROLES = {
    "patient": (who("patient", patient="pat-1"), "Observation"),
    "practitioner with care": (who("practitioner", practitioner="d1"), "Observation"),
    "practitioner without care": (who("practitioner", practitioner="d2"), "Observation"),
    "pharmacist": (who("pharmacist", refs={PHARMACY}), "MedicationDispense"),
    "payer": (who("payer", refs={PAYER}, purpose="HPAYMT"), "Claim"),
    "researcher": (who("researcher", refs={STUDY}, purpose="HRESCH"), "ResearchSubject"),
    "admin": (who("admin"), "AuditEvent"),
    "service": (who("service"), "Observation"),
    "delegate": (who("patient", patient="pat-10", refs={DELEGATE_REF}), "Observation"),
}

#: situation → (patient, labels of the resource, purpose a practitioner states)
SITUATIONS = {
    "own record": ("pat-1", (), None),
    "consented": ("pat-2", (), None),
    "consent expired": ("pat-3", (), None),
    "revoked": ("pat-4", (), None),
    "deny exception": ("pat-5", ("PSY",), None),
    "no relationship": ("pat-6", (), None),
    "break-glass active": ("pat-7", (), "ETREAT"),
    "break-glass expired": ("pat-8", (), "ETREAT"),
    "delegate": ("pat-9", (), None),
}
ACTIONS = ("read", "vread", "search", "history", "create")

_ = "scope-denied"
OWN, NOT_OWN, CARE_, PERMIT = "own-compartment", "not-own-compartment", "care-relationship", "consent-permit"
EXC, NOREL, NEEDS = "consent-deny-exception", "no-relationship", "needs-consent"
BG, BGX = "break-glass", "break-glass-expired"
ADMIN, SYS = "admin-no-clinical", "system-scope"

# (reads: read/vread/search/history, create) per situation, in SITUATIONS order
EXPECTED = {
    #                            own record      consented          expired         revoked         deny exception  no relationship break-glass on  break-glass off delegate
    "patient":                   [(OWN, _),      (NOT_OWN, _),      (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _)],
    "practitioner with care":    [(CARE_, CARE_), (CARE_, CARE_),   (CARE_, CARE_), (CARE_, CARE_), (EXC, EXC),     (NOREL, NOREL), (BG, BG),       (CARE_, CARE_), (CARE_, CARE_)],
    "practitioner without care": [(NOREL, NOREL), (PERMIT, PERMIT), (NOREL, NOREL), (NOREL, NOREL), (EXC, EXC),     (NOREL, NOREL), (BG, BG),       (BGX, BGX),     (NOREL, NOREL)],
    "pharmacist":                [(NEEDS, NEEDS), (PERMIT, PERMIT), (NEEDS, NEEDS), (NEEDS, NEEDS), (EXC, EXC),     (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS)],
    "payer":                     [(NEEDS, NEEDS), (PERMIT, PERMIT), (NEEDS, NEEDS), (NEEDS, NEEDS), (EXC, EXC),     (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS)],
    "researcher":                [(NEEDS, NEEDS), (PERMIT, PERMIT), (NEEDS, NEEDS), (NEEDS, NEEDS), (EXC, EXC),     (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS), (NEEDS, NEEDS)],
    "admin":                     [(ADMIN, _),    (ADMIN, _),        (ADMIN, _),     (ADMIN, _),     (ADMIN, _),     (ADMIN, _),     (ADMIN, _),     (ADMIN, _),     (ADMIN, _)],
    "service":                   [(SYS, SYS),    (SYS, SYS),        (SYS, SYS),     (SYS, SYS),     (SYS, SYS),     (SYS, SYS),     (SYS, SYS),     (SYS, SYS),     (SYS, SYS)],
    "delegate":                  [(NOT_OWN, _),  (PERMIT, _),       (NOT_OWN, _),   (NOT_OWN, _),   (EXC, _),       (NOT_OWN, _),   (NOT_OWN, _),   (NOT_OWN, _),   (PERMIT, _)],
}  # fmt: skip
ALLOWING = {OWN, CARE_, PERMIT, BG, SYS}

CASES = [
    pytest.param(role, action, situation, EXPECTED[role][i][1 if action == "create" else 0],
                 id=f"{role} / {action} / {situation}")
    for role in ROLES
    for action in ACTIONS
    for i, situation in enumerate(SITUATIONS)
]


@pytest.mark.parametrize(("role", "action", "situation", "reason"), CASES)
def test_consent_matrix_gives_the_exact_decision(role, action, situation, reason):
    principal, resource_type = ROLES[role]
    patient, labels, purpose = SITUATIONS[situation]
    if purpose is not None and principal.role == "practitioner":
        principal = replace(principal, purpose=purpose)
    request = AccessRequest(action, resource_type, frozenset({patient}),  # type: ignore[arg-type]
                            labels=frozenset(labels))
    decision = decide(principal, request, CARE, INDEX)
    assert (decision.reason, decision.allowed) == (reason, reason in ALLOWING)


def test_consent_decisions_name_their_consent_and_break_glass_names_its_claim():
    pharmacist, rtype = ROLES["pharmacist"]
    permit = decide(pharmacist, AccessRequest("read", rtype, frozenset({"pat-2"})), CARE, INDEX)
    assert permit.basis == "Consent/ok-pharmacy-1"
    denied = decide(pharmacist, AccessRequest("read", rtype, frozenset({"pat-5"}), labels=frozenset({"PSY"})),
                    CARE, INDEX)
    assert denied.basis == "Consent/mh"
    er = replace(ROLES["practitioner without care"][0], purpose="ETREAT")
    glass = decide(er, AccessRequest("read", "Observation", frozenset({"pat-7"})), CARE, INDEX)
    assert glass.basis is not None and glass.basis.startswith("break-glass/")


def test_decision_details_name_no_patient_account_or_consent():
    for role, (principal, rtype) in ROLES.items():
        for patient, labels, _purpose in SITUATIONS.values():
            d = decide(principal, AccessRequest("read", rtype, frozenset({patient}), labels=frozenset(labels)),
                       CARE, INDEX)
            assert "pat-" not in d.detail and "acct-" not in d.detail and "Consent/" not in d.detail, role
