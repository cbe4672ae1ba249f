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
6. Patient data, by role. ``grants`` is the consent state (``policy.consent_index.ConsentIndex``:
   the patients' consents projected from the chain, and break-glass claims); its answers carry
   the consent or claim in ``Decision.basis``. ``default`` is the organization's
   ``DefaultPolicy``.
   a. patient: reads need their own id in the compartment, writes need the compartment to be
      exactly their own id, so that they cannot write into another patient's record
      ("own-compartment"). Anything else goes to the consent state if the account acts for
      someone (``actor_refs``: a delegate's RelatedPerson), which decides ("consent-permit",
      "consent-deny", "consent-deny-exception"); otherwise deny ("no-linked-patient" for an
      account not linked to a Patient, else "not-own-compartment");
   b. practitioner: an account not linked to a Practitioner gets nothing
      ("no-linked-practitioner"); a create of an Encounter, Appointment or CareTeam that the
      caller marked ``establishes_care`` (the practitioner is a participant) is allowed
      ("establishes-care"). A message (``THREAD_TYPES``: Communication) whose participants
      (``AccessRequest.participants``: sender and recipients) are known and do not include
      ``Practitioner/<id>`` is not the care team's to read: only a consent permit of every
      patient concerned reaches it ("consent-permit"), a patient's deny says so ("consent-deny",
      "consent-deny-exception"), and otherwise, care relationship and break-glass claim
      notwithstanding, deny ("not-a-thread-participant"; ``model.outside_thread``). Otherwise
      every patient in the compartment must allow it, each on
      its own basis, judged in this order (the first denial is the answer; with several
      patients the answer names the strongest basis used: break-glass, consent, care):
      i.   break-glass: purpose ETREAT (or BTG, ERTREAT), an active claim for the patient, and no
           consent that permits anyway → allowed ("break-glass", flagged BTG in the audit), over
           the patient's deny too;
      ii.  a patient's deny (to this practitioner, their organization or role, or anyone)
           overrides the care relationship ("consent-deny" / "consent-deny-exception");
      iii. the default policy: with ``care_relationship_access`` and a care relationship with
           the patient, allowed for the ``care_purposes`` ("care-relationship"); for another
           purpose only a permit helps ("consent-permit", else "purpose-needs-consent");
      iv.  otherwise only a permit helps ("consent-permit"); an expired claim says so
           ("break-glass-expired"); else deny ("no-relationship", or "needs-consent" when the
           default policy gives care relationships no access);
   c. admin: never ("admin-no-clinical");
   d. pharmacist, payer, researcher: whatever the consent state decides ("consent-permit",
      "consent-deny", "consent-deny-exception"); without a consent, deny ("needs-consent").

Search: ``search_filter`` turns the same rules into a row restriction the store applies, so a
search returns (and counts, and pages) exactly the rows ``decide`` would let the principal read.

This module must never perform I/O itself: care relationships and grants are injected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, TypeAlias

from teleledger.policy.model import (
    DEFAULT_POLICY,
    EMPTY_CONSENT_VIEW,
    NO_GRANTS,
    REASON_BREAK_GLASS,
    REASON_BREAK_GLASS_EXPIRED,
    AccessRequest,
    All,
    CareRelationships,
    CareTeamOf,
    Compartments,
    Consented,
    ConsentSearch,
    Decision,
    DefaultPolicy,
    Grants,
    Nothing,
    Principal,
    PublicOnly,
    SearchFilter,
    outside_thread,
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
NOT_A_THREAD_PARTICIPANT = _deny(
    "not-a-thread-participant",
    "Messages are read by their sender and recipients; other practitioners need the patient's consent.",
)
ADMIN_NO_CLINICAL = _deny("admin-no-clinical", "Administrators do not access patient data.")
NEEDS_CONSENT = _deny("needs-consent", "This role needs a consent grant to access patient data.")
NEEDS_CONSENT_BY_POLICY = _deny(
    "needs-consent", "The organization's default policy requires a consent grant for this access."
)
PURPOSE_NEEDS_CONSENT = _deny(
    "purpose-needs-consent",
    "A care relationship gives access only for the default policy's purposes of use; "
    "this purpose needs a consent grant.",
)


def decide(
    principal: Principal,
    request: AccessRequest,
    care: CareRelationships,
    grants: Grants = NO_GRANTS,
    *,
    default: DefaultPolicy = DEFAULT_POLICY,
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
        if own is not None and own in patients and (action in _READS or len(patients) == 1):
            return OWN_COMPARTMENT
        if principal.actor_refs:  # a delegate: the represented patient's consents decide
            granted = grants.grant(principal, request)
            if granted is not None:
                return granted
        return NO_LINKED_PATIENT if own is None else NOT_OWN_COMPARTMENT
    if role == "practitioner":
        practitioner_id = principal.practitioner_id
        if practitioner_id is None:
            return NO_LINKED_PRACTITIONER
        if request.establishes_care and action == "create" and resource_type in CARE_ESTABLISHING_TYPES:
            return ESTABLISHES_CARE
        if outside_thread(practitioner_id, resource_type, request.participants):
            granted = grants.grant(principal, request)
            if granted is not None and granted.reason not in (REASON_BREAK_GLASS, REASON_BREAK_GLASS_EXPIRED):
                return granted  # a consent permit (of every patient) or a patient's deny
            return NOT_A_THREAD_PARTICIPANT
        if len(patients) > 1:
            return _practitioner_each(principal, request, care, grants, default)
        granted = grants.grant(principal, request)
        if granted is not None and (
            granted.reason == REASON_BREAK_GLASS
            or (not granted.allowed and granted.reason != REASON_BREAK_GLASS_EXPIRED)
        ):
            return granted  # 6b-i: break-glass; 6b-ii: a patient's deny beats the care relationship
        if not default.care_relationship_access:
            return NEEDS_CONSENT_BY_POLICY if granted is None else granted
        for patient_id in patients:
            if not care.has_care_relationship(practitioner_id, patient_id):
                return NO_RELATIONSHIP if granted is None else granted
        if principal.purpose in default.covered_care_purposes:
            return CARE_RELATIONSHIP
        return granted if granted is not None and granted.allowed else PURPOSE_NEEDS_CONSENT
    if role == "admin":
        return ADMIN_NO_CLINICAL
    granted = grants.grant(principal, request)
    return NEEDS_CONSENT if granted is None else granted


def _practitioner_each(principal: Principal, request: AccessRequest, care: CareRelationships, grants: Grants,
                       default: DefaultPolicy) -> Decision:
    """Rule 6b for a resource shared by several patients: every one of them must allow it, each
    on its own basis (a care relationship with one, a consent of the other), judged as if the
    resource were theirs alone. The decision returned names the strongest basis used:
    break-glass, else a consent, else care."""
    chosen: Decision | None = None
    for patient_id in sorted(request.patient_ids):
        one = replace(request, patient_ids=frozenset((patient_id,)))
        decision = decide(principal, one, care, grants, default=default)
        if not decision.allowed:
            return decision
        if chosen is None or _strength(decision) > _strength(chosen):
            chosen = decision
    assert chosen is not None
    return chosen


def _strength(decision: Decision) -> int:
    return 2 if decision.reason == REASON_BREAK_GLASS else 0 if decision is CARE_RELATIONSHIP else 1


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


def search_filter(
    principal: Principal,
    grants: ConsentSearch = NO_GRANTS,
    *,
    default: DefaultPolicy = DEFAULT_POLICY,
) -> SearchFilter:
    """The restriction the store must apply to a search that ``decide`` allowed (rule 6 as rows;
    ``model.matches`` defines each variant exactly).

    service → All; admin → PublicOnly; unknown role → Nothing. The others start from what the
    consent state says about them (``grants.search_view``); when it says nothing:
    patient → Compartments({own id}); practitioner → CareTeamOf(own id) when the default
    policy gives care relationships access for their purpose, else PublicOnly; pharmacist, payer,
    researcher and accounts not linked to their resource → PublicOnly. When it says something:
    Consented(own patient id for a patient (delegates), care team as above for a practitioner,
    their active break-glass patients, the consents' permits and denies, and for a practitioner
    their id, which keeps messages they do not take part in to the permits).
    """
    role = principal.role
    if role == "service":
        return _ALL
    if role not in ROLE_CONTEXT:
        return _NOTHING
    if role == "admin":
        return _PUBLIC_ONLY
    if role == "patient":
        own = principal.patient_id
        view = grants.search_view(principal) if principal.actor_refs else EMPTY_CONSENT_VIEW
        if view.empty:
            return Compartments(frozenset({own})) if own else _PUBLIC_ONLY
        return Consented(own_patient_id=own, permits=view.permits, denies=view.denies)
    if role == "practitioner":
        practitioner_id = principal.practitioner_id
        if practitioner_id is None:
            return _PUBLIC_ONLY
        care_team = (
            practitioner_id
            if default.care_relationship_access and principal.purpose in default.covered_care_purposes
            else None
        )
        view = grants.search_view(principal)
        if view.empty:
            return CareTeamOf(practitioner_id) if care_team is not None else _PUBLIC_ONLY
        return Consented(care_team_of=care_team, break_glass=view.break_glass, permits=view.permits,
                         denies=view.denies, practitioner_id=practitioner_id)
    view = grants.search_view(principal)
    if view.empty:
        return _PUBLIC_ONLY
    return Consented(permits=view.permits, denies=view.denies)


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


# -- visit scheduling -------------------------------------------------------------------------
# teleledger.visits.scheduling writes Schedules and Slots, and turns a Slot busy or free, with
# the server's own authority once these rules allowed the use case (a patient may book a Slot,
# not edit it). The Appointment itself is written with the caller's authority and judged by
# ``decide`` like any other resource: both must allow.

_OWN_AVAILABILITY: Final = Decision(True, "own-availability", "Practitioners publish their own availability.")
_AVAILABILITY_ADMIN: Final = Decision(True, "directory-editor", "Administrators run the directory, schedules included.")
_NOT_OWN_AVAILABILITY: Final = Decision(
    False, "not-own-availability", "Only the practitioner themselves (or an administrator) publishes their availability.")
_OWN_BOOKING: Final = Decision(True, "own-booking", "Patients book visits for themselves.")
_BOOK_FOR_YOURSELF: Final = Decision(False, "book-for-yourself", "A patient may book visits only for themselves.")
_PATIENTS_BOOK: Final = Decision(False, "patients-book", "Visits are booked by the patient (or a trusted backend).")
_PATIENT_CANCELS: Final = Decision(True, "patient-cancels", "A patient may cancel their own visit.")
_PATIENT_ONLY_CANCELS: Final = Decision(
    False, "patient-only-cancels", "A patient may cancel or reschedule their visit; its other states are the practitioner's.")
_VISIT_STATUS_BY_PRACTITIONER: Final = Decision(
    True, "visit-practitioner-status", "The practitioner of a visit moves it through its states.")
_NOT_VISIT_PARTY: Final = Decision(
    False, "not-a-visit-party", "Only the patient or the practitioner of a visit may change it.")


def manage_availability(principal: Principal, *, practitioner_id: str) -> Decision:
    """May this principal publish the weekly hours (Schedule and Slots) of Practitioner
    ``practitioner_id``? The practitioner account linked to it ("own-availability"), an
    administrator ("directory-editor"), a service ("system-scope"); anyone else: deny
    ("not-own-availability")."""
    role = principal.role
    if role == "practitioner" and principal.practitioner_id is not None and principal.practitioner_id == practitioner_id:
        return _OWN_AVAILABILITY
    if role == "admin":
        return _AVAILABILITY_ADMIN
    if role == "service":
        return SYSTEM_SCOPE
    return _NOT_OWN_AVAILABILITY


def book_visit(principal: Principal, *, patient_id: str) -> Decision:
    """May this principal book (or reschedule) a visit for Patient ``patient_id``? A patient for
    themselves ("own-booking"), never for another patient ("book-for-yourself"); a service for
    anyone ("system-scope"); no other role ("patients-book")."""
    if principal.role == "patient":
        own = principal.patient_id
        if own is None:
            return NO_LINKED_PATIENT
        return _OWN_BOOKING if own == patient_id else _BOOK_FOR_YOURSELF
    if principal.role == "service":
        return SYSTEM_SCOPE
    return _PATIENTS_BOOK


def change_visit_status(principal: Principal, *, status: str, patients: frozenset[str],
                        practitioners: frozenset[str]) -> Decision:
    """May this principal move a visit (an Appointment naming ``patients`` and ``practitioners``)
    to ``status``? Its patient only to ``cancelled`` ("patient-cancels" / "patient-only-cancels");
    its practitioner to any status the state machine allows ("visit-practitioner-status"); a
    service likewise ("system-scope"); anyone else, a colleague with a care relationship
    included: deny ("not-a-visit-party"). Whether the change itself is allowed from the current
    status is the state machine's question (``teleledger.visits.scheduling.TRANSITIONS``)."""
    role = principal.role
    if role == "patient" and principal.patient_id is not None and principal.patient_id in patients:
        return _PATIENT_CANCELS if status == "cancelled" else _PATIENT_ONLY_CANCELS
    if role == "practitioner" and principal.practitioner_id is not None and principal.practitioner_id in practitioners:
        return _VISIT_STATUS_BY_PRACTITIONER
    if role == "service":
        return SYSTEM_SCOPE
    return _NOT_VISIT_PARTY


# -- video visits ---------------------------------------------------------------------------
# A visit room (teleledger.visits.rooms) is one Appointment's two participants and nobody else:
# not a colleague with a care relationship, not an administrator, not a backend service. The
# records rules above still govern every resource the room reads or writes; these two decide
# who is *in the room* at all.

_VISIT_PATIENT: Final = Decision(True, "visit-patient", "The patient of this visit may join its room.")
_VISIT_PRACTITIONER: Final = Decision(True, "visit-practitioner", "A practitioner of this visit may join its room.")
_NOT_A_VISIT_PARTICIPANT: Final = Decision(
    False, "not-a-visit-participant", "Only the patient and the practitioner of this visit may join its room.")
_VISIT_HOST: Final = Decision(True, "visit-host", "A practitioner of this visit admits the patient and ends the visit.")
_ONLY_PRACTITIONER_HOSTS: Final = Decision(
    False, "only-practitioner-hosts", "Only the practitioner of this visit admits the patient and ends the visit.")


def join_visit(principal: Principal, *, patients: frozenset[str], practitioners: frozenset[str]) -> Decision:
    """May this principal join the room of a visit whose Appointment names these participants?

    A patient account linked to one of ``patients`` ("visit-patient"), a practitioner account
    linked to one of ``practitioners`` ("visit-practitioner"); anyone else, including services
    and administrators: deny ("not-a-visit-participant")."""
    if principal.role == "patient" and principal.patient_id is not None and principal.patient_id in patients:
        return _VISIT_PATIENT
    if (principal.role == "practitioner" and principal.practitioner_id is not None
            and principal.practitioner_id in practitioners):
        return _VISIT_PRACTITIONER
    return _NOT_A_VISIT_PARTICIPANT


def host_visit(principal: Principal, *, patients: frozenset[str], practitioners: frozenset[str]) -> Decision:
    """May this principal admit the patient of this visit and end it? Only a practitioner of the
    visit ("visit-host"); its patient is told so ("only-practitioner-hosts"); anyone else gets
    "not-a-visit-participant"."""
    joined = join_visit(principal, patients=patients, practitioners=practitioners)
    if joined is _VISIT_PRACTITIONER:
        return _VISIT_HOST
    return _ONLY_PRACTITIONER_HOSTS if joined is _VISIT_PATIENT else joined


# -- clinical notes and secure messaging ----------------------------------------------------
# The records rules above govern every Composition, Provenance, Condition, Observation and
# Communication these features read or write (through the patient compartment). These decide
# what the records rules cannot see: who may author an encounter's note (drafts never enter the
# store), whose draft is whose, and who takes part in a message thread.

_NOTE_AUTHOR: Final = Decision(True, "encounter-practitioner",
                               "A practitioner of this encounter writes and signs its clinical note.")
_NOT_ENCOUNTER_PRACTITIONER: Final = Decision(
    False, "not-encounter-practitioner", "Only the practitioner of this encounter may write or sign its note.")
_OWN_DRAFT: Final = Decision(True, "own-draft", "A note draft is visible to its author.")
_NOT_OWN_DRAFT: Final = Decision(False, "not-own-draft", "A note draft is visible only to its author.")
_THREAD_PARTICIPANT: Final = Decision(True, "thread-participant", "Participants read and answer their thread.")
_NOT_THREAD_PARTICIPANT: Final = Decision(
    False, "not-thread-participant", "Only the patient and the care team members of a thread take part in it.")
_MESSAGE_CARE_TEAM: Final = Decision(
    True, "message-care-team", "Patients and practitioners message each other within a care relationship.")
_MESSAGE_NO_RELATIONSHIP: Final = Decision(
    False, "message-no-relationship",
    "Messages go between a patient and practitioners who have a care relationship with them.")
_MESSAGE_NOT_A_PARTY: Final = Decision(
    False, "message-not-a-party", "Only a patient or a practitioner linked to their record sends secure messages.")


def note_author(principal: Principal, *, encounter_practitioners: frozenset[str]) -> Decision:
    """May this principal write a draft of, and sign, the note of an encounter whose participants
    are ``encounter_practitioners`` (Practitioner ids)? Only a practitioner account linked to one
    of them ("encounter-practitioner"); anyone else, including another practitioner with a care
    relationship, an administrator or a service: deny ("not-encounter-practitioner")."""
    if (principal.role == "practitioner" and principal.practitioner_id is not None
            and principal.practitioner_id in encounter_practitioners):
        return _NOTE_AUTHOR
    return _NOT_ENCOUNTER_PRACTITIONER


def own_note_draft(principal: Principal, *, author: str) -> Decision:
    """May this principal see or change a note draft written by Practitioner ``author``? Only its
    author ("own-draft" / "not-own-draft"): a draft is not yet part of anyone's record."""
    if principal.role == "practitioner" and principal.practitioner_id is not None and principal.practitioner_id == author:
        return _OWN_DRAFT
    return _NOT_OWN_DRAFT


def message_thread(principal: Principal, *, participants: frozenset[str]) -> Decision:
    """May this principal read, answer and mark read a message thread whose participants are the
    FHIR references ``participants`` (``Patient/…``, ``Practitioner/…``)? Exactly when their own
    ``fhirUser`` is one of them ("thread-participant" / "not-thread-participant"). The records
    rules apply to each message as well: both must allow."""
    me = principal.fhir_user
    return _THREAD_PARTICIPANT if me is not None and me in participants else _NOT_THREAD_PARTICIPANT


def message_recipients(principal: Principal, *, patient_id: str, practitioner_ids: frozenset[str],
                       care: CareRelationships) -> Decision:
    """May this principal send a message about Patient ``patient_id`` to (or with) these
    practitioners? The sender must be that patient or one of those practitioners, and every
    practitioner must have a care relationship with the patient ("message-care-team"); a sender
    who is neither: "message-not-a-party"; a practitioner without one: "message-no-relationship"."""
    if principal.role == "patient":
        if principal.patient_id is None or principal.patient_id != patient_id:
            return _MESSAGE_NOT_A_PARTY
    elif principal.role == "practitioner":
        if principal.practitioner_id is None or principal.practitioner_id not in practitioner_ids:
            return _MESSAGE_NOT_A_PARTY
    else:
        return _MESSAGE_NOT_A_PARTY
    if not practitioner_ids:
        return _MESSAGE_NO_RELATIONSHIP
    for practitioner_id in practitioner_ids:
        if not care.has_care_relationship(practitioner_id, patient_id):
            return _MESSAGE_NO_RELATIONSHIP
    return _MESSAGE_CARE_TEAM


# -- admin console ----------------------------------------------------------------------------
# The node's admin pages (the chain explorer: blocks, transactions, anchors, the outbox) show
# operational data only: addresses, pseudonyms, hashes, queue states. Still, only admins.

_ADMIN_CONSOLE: Final = Decision(True, "admin-console", "Administrators may open the node's admin pages.")
_NOT_AN_ADMIN: Final = Decision(False, "not-an-admin", "Only administrators may open the node's admin pages.")


def admin_console(principal: Principal) -> Decision:
    """May this principal open the node's admin pages (``/admin/...``)? Accounts with the admin
    role ("admin-console"); every other role, services included: deny ("not-an-admin")."""
    return _ADMIN_CONSOLE if principal.role == "admin" else _NOT_AN_ADMIN


# -- role workspaces -----------------------------------------------------------------------------
# A workspace page (the pharmacy, the prescribing console, a patient's consent page) belongs to one
# role; what it then shows is still decided per resource by the rules above. A patient workspace
# also needs an account linked to a Patient, a practitioner's one a linked Practitioner.

_LINK_NEEDED: Final[dict[str, str]] = {"patient": "patient_id", "practitioner": "practitioner_id"}


def role_workspace(principal: Principal, role: str) -> Decision:
    """May this principal open a page meant for ``role``? Same role (and, for patients and
    practitioners, a linked record): allow ("role-workspace"); otherwise deny ("not-this-role",
    "no-linked-record")."""
    if principal.role != role:
        return Decision(False, "not-this-role", f"This page is for {role}s.")
    link = _LINK_NEEDED.get(role)
    if link is not None and not getattr(principal, link):
        return Decision(False, "no-linked-record", f"This account is not linked to a {link.removesuffix('_id')} record.")
    return Decision(True, "role-workspace", f"A {role} opens a {role}'s page.")


# -- e-prescriptions ----------------------------------------------------------------------------
# A pharmacy works from the prescription token and the chain, never from the prescriber's record:
# verification (token signature, the signer is the chain's prescriber, the chain's status) is
# done by ``prescriptions.service`` before it asks. These rules say who may act on a verified
# prescription; the records rules still apply to every resource read or written for a prescriber
# or a patient.

_DISPENSE_VERIFIED: Final = Decision(
    True, "verified-prescription",
    "A pharmacist records the dispense of a prescription whose token was verified against the chain.")
_DISPENSE_NOT_VERIFIED: Final = Decision(
    False, "prescription-not-verified", "A dispense needs a prescription token verified against the chain.")
_NOT_A_PHARMACIST: Final = Decision(False, "not-a-pharmacist", "Only pharmacists dispense prescriptions.")
_OWN_PRESCRIPTION: Final = Decision(True, "own-prescription", "The prescriber may cancel their own prescription.")
_NOT_OWN_PRESCRIPTION: Final = Decision(
    False, "not-own-prescription", "Only the prescriber who issued a prescription may cancel it.")
_PATIENT_SHARES: Final = Decision(True, "patient-shares-own", "Patients choose where their prescriptions go.")
_NOT_PATIENTS_OWN: Final = Decision(
    False, "not-patients-own", "Only the patient of a prescription may send it to a pharmacy.")


def dispense_prescription(principal: Principal, *, token_verified: bool) -> Decision:
    """May this principal record a MedicationDispense (and the on-chain dispense) for a
    prescription? A pharmacist, when the caller verified the prescription's token against the
    chain ("verified-prescription"): this is the narrow exception to rule 6d (pharmacists need a
    consent for patient data), because the token the patient handed over is the authorization
    and the chain, not this node's records, says whether it may still be filled. A pharmacist
    without a verified token: "prescription-not-verified"; every other role, services included:
    "not-a-pharmacist" (the contract itself also wants ROLE_PHARMACIST)."""
    if principal.role != "pharmacist":
        return _NOT_A_PHARMACIST
    return _DISPENSE_VERIFIED if token_verified else _DISPENSE_NOT_VERIFIED


def cancel_prescription(principal: Principal, *, prescriber_account: str) -> Decision:
    """May this principal cancel a prescription issued by the account ``prescriber_account``
    (an account id)? Only that practitioner account ("own-prescription" / "not-own-prescription")."""
    if principal.role == "practitioner" and principal.subject == prescriber_account:
        return _OWN_PRESCRIPTION
    return _NOT_OWN_PRESCRIPTION


def share_prescription(principal: Principal, *, patient_id: str) -> Decision:
    """May this principal send a prescription of Patient ``patient_id`` to a pharmacy? Only that
    patient ("patient-shares-own" / "not-patients-own")."""
    if principal.role == "patient" and principal.patient_id is not None and principal.patient_id == patient_id:
        return _PATIENT_SHARES
    return _NOT_PATIENTS_OWN


# -- the privacy officer's break-glass review ----------------------------------------------------
# Break-glass claims (policy.service) are listed for the claimant organization's privacy officer:
# an admin account linked to that Organization. The list holds who claimed access to whom, when,
# and the written reason (which may be PHI): not for admins of other organizations, not for the
# claimant's colleagues. The patient sees the claims on them in their portal (not this rule).

_PRIVACY_OFFICER: Final = Decision(
    True, "privacy-officer", "The organization's privacy officer reviews its members' break-glass claims.")
_NOT_A_PRIVACY_OFFICER: Final = Decision(
    False, "not-a-privacy-officer", "Only an organization's privacy officer (an administrator) reviews break-glass claims.")
_OTHER_ORGANIZATION: Final = Decision(
    False, "not-this-organization", "A privacy officer reviews the break-glass claims of their own organization only.")
_NO_LINKED_ORGANIZATION: Final = Decision(
    False, "no-linked-organization",
    "This administrator account is not linked to an organization, so it has no break-glass claims to review.")


def review_break_glass(principal: Principal, *, organization_id: str | None) -> Decision:
    """May this principal review the break-glass claims made by members of Organization
    ``organization_id``? An admin account linked to that organization (``actor_refs`` holds
    ``Organization/<id>``): allow ("privacy-officer"); an admin linked to no organization: deny
    ("no-linked-organization"); an admin of another organization, or a claim made by nobody's
    member (``organization_id`` None): deny ("not-this-organization"); every other role, services
    included: deny ("not-a-privacy-officer")."""
    if principal.role != "admin":
        return _NOT_A_PRIVACY_OFFICER
    if not any(ref.startswith("Organization/") for ref in principal.actor_refs):
        return _NO_LINKED_ORGANIZATION
    if organization_id is None or f"Organization/{organization_id}" not in principal.actor_refs:
        return _OTHER_ORGANIZATION
    return _PRIVACY_OFFICER
