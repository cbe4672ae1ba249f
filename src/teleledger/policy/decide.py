"""The single access decision point: may this principal do this to this resource?

Pure and deny-by-default. ``decide`` is called for every resource a request touches (and for
every search result), so it allocates nothing: each outcome is a prebuilt ``Decision``.

Rules, applied in order; the first that matches settles the request (reason in quotes):

1. The action maps to a SMART letter (create c; read, vread, history r; update u; delete d;
   search s) and the role to a scope context (patient → ``patient/``, service → ``system/``,
   every other role → ``user/``). Unknown role or action: deny ("unknown-role",
   "unknown-action"). Scopes that do not allow the letter on the type: deny ("scope-denied").
2. A service principal (trusted backend, client_credentials) is allowed by its scopes alone
   ("system-scope").
3. Nobody but a service writes an AuditEvent: the audit trail is written by the server
   ("server-managed-type").
4. A patient may never create a Patient ("patient-cannot-create-patient").
5. Resources outside every patient compartment (``patient_ids`` empty):
   a. directory types (Organization, Location, Practitioner, PractitionerRole,
      HealthcareService, Schedule, Slot, Endpoint, Medication, ResearchStudy,
      CapabilityStatement) are readable by every principal whose scopes allow it
      ("public-directory");
   b. directory writes: admins edit the directory, researchers their ResearchStudy entries
      ("directory-editor"); a practitioner keeps their own Schedule and Slots (create, update,
      delete) and updates their own Practitioner and PractitionerRole, judged by
      ``AccessRequest.practitioner_ids`` ("own-directory-entry"); anyone else: deny
      ("directory-read-only");
   c. other types: search and history are allowed, the store applying ``search_filter``
      ("search-filtered"); read and vread are allowed ("not-patient-data"); writes are denied
      to patients, whose writes must land in their own compartment ("not-own-compartment"),
      and allowed to other roles ("not-patient-data").
6. Patient data, by role:
   a. patient: an account not linked to a Patient gets nothing ("no-linked-patient"); reads
      need their own id in the compartment, writes need the compartment to be exactly their
      own id, so that they cannot write into another patient's record ("own-compartment" /
      "not-own-compartment");
   b. practitioner: an account not linked to a Practitioner gets nothing
      ("no-linked-practitioner"); a create of an Encounter, Appointment or CareTeam that the
      caller marked ``establishes_care`` (the practitioner is a participant) is allowed
      ("establishes-care"); otherwise they need a care relationship with every patient in the
      compartment ("care-relationship" / "no-relationship");
   c. admin: never ("admin-no-clinical");
   d. pharmacist, payer, researcher: whatever a consent grant decides (``Grants``); without one,
      deny ("needs-consent").

Break-the-glass (purpose ETREAT) is not a rule yet: ``Principal.purpose`` is carried so the
consent work can add it behind ``Grants`` without changing callers.

This module must never perform I/O itself: care relationships and grants are injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from teleledger.policy.model import (
    NO_GRANTS,
    AccessRequest,
    All,
    CareRelationships,
    CareTeamOf,
    Compartments,
    Decision,
    Grants,
    Nothing,
    Principal,
    PublicOnly,
    SearchFilter,
)

__all__ = [
    "ACTION_LETTER",
    "CARE_ESTABLISHING_TYPES",
    "DIRECTORY_TYPES",
    "ROLE_CONTEXT",
    "decide",
    "search_filter",
]

ACTION_LETTER: Final[dict[str, str]] = {
    "create": "c",
    "read": "r",
    "vread": "r",
    "history": "r",
    "update": "u",
    "delete": "d",
    "search": "s",
}
ROLE_CONTEXT: Final[dict[str, str]] = {
    "patient": "patient",
    "practitioner": "user",
    "pharmacist": "user",
    "payer": "user",
    "researcher": "user",
    "admin": "user",
    "service": "system",
}
DIRECTORY_TYPES: Final[frozenset[str]] = frozenset(
    {
        "Organization",
        "Location",
        "Practitioner",
        "PractitionerRole",
        "HealthcareService",
        "Schedule",
        "Slot",
        "Endpoint",
        "Medication",
        "ResearchStudy",
        "CapabilityStatement",
    }
)
CARE_ESTABLISHING_TYPES: Final[frozenset[str]] = frozenset({"Encounter", "Appointment", "CareTeam"})

_READS: Final[frozenset[str]] = frozenset({"read", "vread", "search", "history"})
_LISTINGS: Final[frozenset[str]] = frozenset({"search", "history"})
_SERVER_MANAGED: Final[frozenset[str]] = frozenset({"AuditEvent"})
_DIRECTORY_EDITORS: Final[dict[str, frozenset[str]]] = {
    "admin": DIRECTORY_TYPES,
    "researcher": frozenset({"ResearchStudy"}),
}
_NO_TYPES: Final[frozenset[str]] = frozenset()
_OWN_ENTRY_ACTIONS: Final[dict[str, frozenset[str]]] = {
    "Schedule": frozenset({"create", "update", "delete"}),
    "Slot": frozenset({"create", "update", "delete"}),
    "Practitioner": frozenset({"update"}),
    "PractitionerRole": frozenset({"update"}),
}
_NO_ACTIONS: Final[frozenset[str]] = frozenset()


def _allow(reason: str, detail: str) -> Decision:
    return Decision(True, reason, detail)


def _deny(reason: str, detail: str) -> Decision:
    return Decision(False, reason, detail)


UNKNOWN_ROLE = _deny("unknown-role", "The principal's role is not one the policy knows.")
UNKNOWN_ACTION = _deny("unknown-action", "The action is not one the policy knows.")
SCOPE_DENIED = _deny("scope-denied", "The access token's scopes do not allow this interaction on this type.")
SYSTEM_SCOPE = _allow("system-scope", "A trusted backend service is allowed by its system scopes.")
SERVER_MANAGED = _deny("server-managed-type", "Only the server writes resources of this type.")
PATIENT_CANNOT_CREATE_PATIENT = _deny(
    "patient-cannot-create-patient", "A patient account cannot create Patient resources."
)
NO_LINKED_PATIENT = _deny("no-linked-patient", "The patient account is not linked to a Patient resource.")
PUBLIC_DIRECTORY = _allow("public-directory", "Directory entries are readable by every authenticated user.")
DIRECTORY_EDITOR = _allow("directory-editor", "The role maintains this part of the directory.")
OWN_DIRECTORY_ENTRY = _allow("own-directory-entry", "Practitioners maintain their own directory entries.")
DIRECTORY_READ_ONLY = _deny("directory-read-only", "The directory is read-only for this role.")
SEARCH_FILTERED = _allow(
    "search-filtered", "The listing is allowed; the store restricts it with the principal's search filter."
)
NOT_PATIENT_DATA = _allow("not-patient-data", "The resource is not in any patient compartment.")
OWN_COMPARTMENT = _allow("own-compartment", "The resource is in the patient's own compartment.")
NOT_OWN_COMPARTMENT = _deny("not-own-compartment", "Patients may only access their own record.")
NO_LINKED_PRACTITIONER = _deny(
    "no-linked-practitioner", "The practitioner account is not linked to a Practitioner resource."
)
ESTABLISHES_CARE = _allow(
    "establishes-care", "The practitioner is a participant of the resource that starts the care relationship."
)
CARE_RELATIONSHIP = _allow(
    "care-relationship", "The practitioner has a care relationship with every patient concerned."
)
NO_RELATIONSHIP = _deny(
    "no-relationship", "The practitioner has no care relationship with a patient concerned."
)
ADMIN_NO_CLINICAL = _deny("admin-no-clinical", "Administrators do not access patient data.")
NEEDS_CONSENT = _deny("needs-consent", "This role needs a consent grant to access patient data.")


def decide(
    principal: Principal,
    request: AccessRequest,
    care: CareRelationships,
    grants: Grants = NO_GRANTS,
) -> Decision:
    """Apply the rules of the module docstring, in order."""
    role = principal.role
    context = ROLE_CONTEXT.get(role)
    if context is None:
        return UNKNOWN_ROLE
    action = request.action
    letter = ACTION_LETTER.get(action)
    if letter is None:
        return UNKNOWN_ACTION
    resource_type = request.resource_type
    if not principal.scopes.allows(context, resource_type, letter, query=request.query):  # type: ignore[arg-type]
        return SCOPE_DENIED
    if role == "service":
        return SYSTEM_SCOPE
    if letter in "cud" and resource_type in _SERVER_MANAGED:
        return SERVER_MANAGED
    if role == "patient" and action == "create" and resource_type == "Patient":
        return PATIENT_CANNOT_CREATE_PATIENT

    patients = request.patient_ids
    if not patients:
        return _non_patient_data(principal, request)

    if role == "patient":
        own = principal.patient_id
        if own is None:
            return NO_LINKED_PATIENT
        if action in _READS:
            return OWN_COMPARTMENT if own in patients else NOT_OWN_COMPARTMENT
        return OWN_COMPARTMENT if len(patients) == 1 and own in patients else NOT_OWN_COMPARTMENT
    if role == "practitioner":
        practitioner_id = principal.practitioner_id
        if practitioner_id is None:
            return NO_LINKED_PRACTITIONER
        if request.establishes_care and action == "create" and resource_type in CARE_ESTABLISHING_TYPES:
            return ESTABLISHES_CARE
        for patient_id in patients:
            if not care.has_care_relationship(practitioner_id, patient_id):
                return NO_RELATIONSHIP
        return CARE_RELATIONSHIP
    if role == "admin":
        return ADMIN_NO_CLINICAL
    granted = grants.grant(principal, request)
    return NEEDS_CONSENT if granted is None else granted


def _non_patient_data(principal: Principal, request: AccessRequest) -> Decision:
    role, action, resource_type = principal.role, request.action, request.resource_type
    if resource_type in DIRECTORY_TYPES:
        if action in _READS:
            return PUBLIC_DIRECTORY
        if resource_type in _DIRECTORY_EDITORS.get(role, _NO_TYPES):
            return DIRECTORY_EDITOR
        if (
            role == "practitioner"
            and principal.practitioner_id is not None
            and principal.practitioner_id in request.practitioner_ids
            and action in _OWN_ENTRY_ACTIONS.get(resource_type, _NO_ACTIONS)
        ):
            return OWN_DIRECTORY_ENTRY
        return DIRECTORY_READ_ONLY
    if action in _LISTINGS:
        return SEARCH_FILTERED
    if action in _READS:
        return NOT_PATIENT_DATA
    return NOT_OWN_COMPARTMENT if role == "patient" else NOT_PATIENT_DATA


_ALL: Final = All()
_PUBLIC_ONLY: Final = PublicOnly()
_NOTHING: Final = Nothing()


def search_filter(principal: Principal) -> SearchFilter:
    """The restriction the store must apply to a search that ``decide`` allowed.

    service → All; patient → Compartments({own id}); practitioner → CareTeamOf(own id);
    admin, pharmacist, payer, researcher, and accounts not linked to their resource →
    PublicOnly (consent grants will widen the last three); unknown role → Nothing.
    """
    role = principal.role
    if role == "service":
        return _ALL
    if role == "patient":
        return Compartments(frozenset({principal.patient_id})) if principal.patient_id else _PUBLIC_ONLY
    if role == "practitioner":
        return CareTeamOf(principal.practitioner_id) if principal.practitioner_id else _PUBLIC_ONLY
    if role in ROLE_CONTEXT:
        return _PUBLIC_ONLY
    return _NOTHING


@dataclass(frozen=True, slots=True)
class OwnActions:
    """Audit rows whose actor is this account (anyone may review what they did)."""

    subject: str


AuditFilter: TypeAlias = All | Compartments | OwnActions | Nothing


def audit_filter(principal: Principal) -> AuditFilter:
    """Which access events (served as AuditEvent) a principal may read.

    Scope first (``AuditEvent`` with ``r``/``s`` in the principal's context), then:
    service → All; admin → All ("audit-review": the privacy officer's job — audit rows hold ids
    and codes, never clinical content); patient → Compartments({own id}) ("who accessed my
    record"); every other role → OwnActions (their own activity only).
    """
    context = ROLE_CONTEXT.get(principal.role)
    if context is None or not (principal.scopes.allows(context, "AuditEvent", "s")
                               or principal.scopes.allows(context, "AuditEvent", "r")):
        return _NOTHING
    if principal.role in ("service", "admin"):
        return _ALL
    if principal.role == "patient":
        return Compartments(frozenset({principal.patient_id})) if principal.patient_id else _NOTHING
    return OwnActions(principal.subject)


_OWN_LOG_ALLOWED: Final = Decision(True, "own-access-log", "Patients may review who accessed their own record.")
_OWN_LOG_DENIED: Final = Decision(
    False, "not-a-patient",
    "The access log shows who accessed a patient's record, and only to that patient.")


def own_access_log(principal: Principal) -> Decision:
    """May this principal open the patient portal's "who accessed my record" page? Exactly when
    ``audit_filter`` gives them their own compartment (a linked patient with AuditEvent scope)."""
    return _OWN_LOG_ALLOWED if isinstance(audit_filter(principal), Compartments) else _OWN_LOG_DENIED
