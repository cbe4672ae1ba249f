"""Delegates: a parent, guardian or caregiver who acts for a patient — the rules, pure.

A delegate is a RelatedPerson of the patient (``RelatedPerson.patient`` is that patient) that a
patient-role account is linked to (``users.related_person_id``; the account's principal then has
``RelatedPerson/<id>`` in its ``actor_refs``). Only the patient designates or removes a delegate
(``may_designate``); the patient's EIP-712 ``SetDelegate`` signature sets the delegate account's
address in ConsentRegistry, and the ``DelegateSet`` event, projected back by the indexer, is what
puts the delegation in force (``policy.service.ConsentService.set_delegate``).

What a delegation means for access
----------------------------------
In the ``ConsentIndex`` a delegation is a consent of the patient like any other, under the id
``Delegation/<delegation id>`` (which is also the ``basis`` of the decisions it gives, so the
audit trail and ``ConsentService.explain`` trace them to the DelegateSet transaction): one
permit provision naming ``RelatedPerson/<id>``, with no condition on action, purpose or data
(``delegation_rules``). Because deny wins across a patient's consents, whatever the patient's own
consents deny to that RelatedPerson or to anyone stays denied to the delegate — a teenager keeps
sexual-health data from a parent with a deny on that label. ``decide`` already lets a patient-role
principal with ``actor_refs`` reach another patient's record only through the consent state.

What a delegation means for consent
-----------------------------------
An active delegate (in force on chain, and no removal waiting) grants, changes and revokes the
patient's consents, each signed with the delegate's own key (the contract accepts a delegate's
GrantConsent and RevokeConsent signatures, never their SetDelegate) — ``may_manage_consents``.
A delegate never designates further delegates, and never changes or withdraws a consent that
keeps something from them or from everyone (``may_change_consent``): otherwise a parent could
undo the very deny a teenager signed against them.

Pure core: no I/O; the caller supplies whether a delegation is active.
"""

from __future__ import annotations

from typing import Final

from teleledger.policy.consent import ConsentRules, Provision
from teleledger.policy.model import Decision, Principal

__all__ = [
    "DELEGATION_PREFIX",
    "acts_for_someone",
    "delegation_ref",
    "delegation_rules",
    "delegation_status",
    "keeps_from",
    "may_change_consent",
    "may_designate",
    "may_manage_consents",
    "related_person_of",
]

#: the ``basis`` prefix (and ConsentIndex consent id) of decisions that rest on a delegation
DELEGATION_PREFIX: Final = "Delegation/"

_OWN_DELEGATES: Final = Decision(True, "own-delegates", "A patient chooses who may act for them.")
_DELEGATE_CANNOT_DESIGNATE: Final = Decision(
    False, "delegate-cannot-designate",
    "A delegate acts for the patient but cannot choose further delegates: only the patient does.")
_NOT_THE_PATIENT: Final = Decision(False, "not-the-patient", "Only the patient chooses who may act for them.")
_OWN_CONSENT: Final = Decision(True, "own-consent", "A patient grants, changes and revokes their own consents.")
_DELEGATE_FOR_PATIENT: Final = Decision(
    True, "delegate-for-patient", "An active delegate grants, changes and revokes consents for the patient.")
_NOT_AN_ACTIVE_DELEGATE: Final = Decision(
    False, "not-an-active-delegate",
    "This account does not act for the patient: it was never designated, was removed, or the chain has not "
    "recorded the designation yet.")
_NOT_CONSENT_MANAGER: Final = Decision(
    False, "not-the-patient", "Only the patient a Consent is about, or their delegate, may grant, change or revoke it.")


def delegation_ref(delegation_id: str) -> str:
    """The id (and decision basis) of a delegation in the ConsentIndex: ``Delegation/<id>``."""
    return DELEGATION_PREFIX + delegation_id


def delegation_rules(delegation_id: str, patient_id: str, related_person_id: str) -> ConsentRules:
    """The consent a delegation amounts to: everything, for any purpose, to the RelatedPerson —
    under the patient's own denies (module docstring)."""
    return ConsentRules(
        consent_id=delegation_ref(delegation_id), patient_id=patient_id, scope="patient-privacy", status="active",
        policy_rule=None, provision=Provision("permit", actors=frozenset({f"RelatedPerson/{related_person_id}"})),
    )


def related_person_of(principal: Principal) -> str | None:
    """The RelatedPerson id this principal acts as (a delegate account), or None."""
    for ref in sorted(principal.actor_refs):
        kind, _, ident = ref.partition("/")
        if kind == "RelatedPerson" and ident:
            return ident
    return None


def may_designate(principal: Principal, patient_id: str | None = None) -> Decision:
    """May this principal designate or remove the delegates of ``patient_id`` (default: their own
    Patient)? Only that patient ("own-delegates"); a delegate — including one acting for that
    patient — never ("delegate-cannot-designate"); anyone else: "not-the-patient"."""
    own = principal.patient_id if principal.role == "patient" else None
    if own is not None and (patient_id is None or patient_id == own):
        return _OWN_DELEGATES
    if principal.role == "patient" and related_person_of(principal) is not None:
        return _DELEGATE_CANNOT_DESIGNATE
    return _NOT_THE_PATIENT


def may_manage_consents(principal: Principal, patient_id: str, *, active_delegate: bool) -> Decision:
    """May this principal grant, change or revoke Consents of Patient ``patient_id``? The patient
    ("own-consent"); a patient-role account whose delegation for that patient is active
    ("delegate-for-patient": the caller says whether it is); a delegate that is not (never
    designated, removed, or not yet on chain): "not-an-active-delegate"; anyone else: "not-the-patient"."""
    if principal.role != "patient":
        return _NOT_CONSENT_MANAGER
    if principal.patient_id is not None and principal.patient_id == patient_id:
        return _OWN_CONSENT
    if related_person_of(principal) is None:
        return _NOT_CONSENT_MANAGER
    return _DELEGATE_FOR_PATIENT if active_delegate else _NOT_AN_ACTIVE_DELEGATE


_ACTS_FOR_SOMEONE: Final = Decision(
    True, "delegate-workspace", "A delegate opens the list of the patients they act for.")
_NOT_A_DELEGATE: Final = Decision(False, "not-a-delegate", "This account does not act for anyone.")


def acts_for_someone(principal: Principal) -> Decision:
    """May this principal open the delegate's side of the consent portal (the patients they act
    for)? A patient-role account that signs in as a RelatedPerson ("delegate-workspace");
    anyone else: "not-a-delegate". Each patient's page then needs ``may_manage_consents``."""
    if principal.role == "patient" and related_person_of(principal) is not None:
        return _ACTS_FOR_SOMEONE
    return _NOT_A_DELEGATE


_KEPT_FROM_DELEGATE: Final = Decision(
    False, "consent-keeps-from-delegate",
    "This consent keeps data from you (or from everyone): only the patient can change or withdraw it.")


def keeps_from(rules: ConsentRules, actor_ref: str) -> bool:
    """Whether a consent denies anything to ``actor_ref``: some deny provision, at any depth,
    that can apply to them (every provision on its path names them, or names nobody — nested
    conditions are AND-ed down the tree)."""
    def walk(p: Provision) -> bool:
        if p.actors and actor_ref not in p.actors:
            return False
        return not p.permit or any(walk(c) for c in p.exceptions)

    return walk(rules.provision)


def may_change_consent(principal: Principal, rules: ConsentRules, *, active_delegate: bool) -> Decision:
    """May this principal change or withdraw this (current) consent? As ``may_manage_consents``,
    except that a delegate may not touch a consent that keeps something from their RelatedPerson
    or from everyone ("consent-keeps-from-delegate")."""
    decision = may_manage_consents(principal, rules.patient_id, active_delegate=active_delegate)
    if decision is not _DELEGATE_FOR_PATIENT:
        return decision
    if keeps_from(rules, f"RelatedPerson/{related_person_of(principal)}"):
        return _KEPT_FROM_DELEGATE
    return decision


def delegation_status(requested: bool, on_chain: bool | None) -> str:
    """How a delegation stands: "active" when the patient's last request and the chain both say
    enabled, "removed" when both say removed, "pending" while the chain has not yet recorded the
    patient's last request (either way)."""
    if on_chain is None or bool(on_chain) != bool(requested):
        return "pending"
    return "active" if requested else "removed"
