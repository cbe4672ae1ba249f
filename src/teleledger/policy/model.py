"""The vocabulary of access decisions: who asks (Principal), for what (AccessRequest), the answer
(Decision), the facts the policy consults (CareRelationships, Grants, ConsentSearch), the
organization's default policy (DefaultPolicy) and the restriction a search must apply in the store
(SearchFilter, with ``matches`` as its exact per-row definition).

Everything here is immutable and framework-free; the rules themselves live in
``teleledger.policy.decide``. This module must never perform I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeAlias

from teleledger.core.errors import ConfigurationError
from teleledger.identity.scopes import Role, ScopeSet, fhir_user
from teleledger.policy.consent import PURPOSES, covered_purposes

if TYPE_CHECKING:
    from teleledger.identity.tokens import Claims

__all__ = [
    "ALWAYS",
    "AccessRequest",
    "Action",
    "All",
    "AllOf",
    "AnyLabel",
    "AnyOf",
    "CareRelationships",
    "CareTeamOf",
    "Compartments",
    "ConsentSearch",
    "ConsentView",
    "Consented",
    "DEFAULT_POLICY",
    "Decision",
    "DefaultPolicy",
    "EMPTY_CONSENT_VIEW",
    "Grants",
    "NEVER",
    "NO_GRANTS",
    "NoGrants",
    "Not",
    "Nothing",
    "OnlyLabels",
    "Principal",
    "PublicOnly",
    "REASON_BREAK_GLASS",
    "REASON_BREAK_GLASS_EXPIRED",
    "REASON_CONSENT_DENY",
    "REASON_CONSENT_DENY_EXCEPTION",
    "REASON_CONSENT_PERMIT",
    "Role",
    "RowRule",
    "SearchFilter",
    "THREAD_TYPES",
    "TypeIn",
    "matches",
    "outside_thread",
    "row_matches",
]

Action = Literal["create", "read", "vread", "update", "delete", "search", "history"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    subject: str  # account id
    role: Role
    scopes: ScopeSet
    patient_id: str | None  # the Patient resource id a patient account is linked to
    practitioner_id: str | None  # the Practitioner resource id a practitioner account is linked to
    purpose: str = "TREAT"  # HL7 v3 ActReason: TREAT, HPAYMT, HRESCH, ETREAT, HOPERAT ...
    #: The FHIR references this principal acts as, which consents name as actors: a pharmacist's
    #: ``Organization/…``, a researcher's ``ResearchStudy/…``, a delegate's ``RelatedPerson/…``,
    #: a practitioner's ``PractitionerRole/…``. Filled by whoever builds the principal from the
    #: account; ``Practitioner/<practitioner_id>`` is always added for a linked practitioner.
    actor_refs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.practitioner_id is not None:
            own = f"Practitioner/{self.practitioner_id}"
            if own not in self.actor_refs:
                object.__setattr__(self, "actor_refs", self.actor_refs | {own})

    @property
    def fhir_user(self) -> str | None:
        return fhir_user(self.patient_id, self.practitioner_id)

    @classmethod
    def from_claims(cls, claims: Claims, *, purpose: str = "TREAT") -> Principal:
        """The principal an access token speaks for.

        Only a patient's token links the principal to a Patient (its ``patient`` claim): for any
        other role that claim is a launch context (the patient on screen), never an identity.
        Only a practitioner is linked to a Practitioner, through ``fhirUser = Practitioner/<id>``.
        ``actor_refs`` gets the ``organization`` claim of a member and the ``related_person``
        claim of a patient account that acts as a delegate.
        """
        patient_id = claims.patient if claims.role == "patient" else None
        practitioner_id = None
        if claims.role == "practitioner" and claims.fhir_user is not None:
            kind, _, ident = claims.fhir_user.partition("/")
            if kind == "Practitioner" and ident and "/" not in ident:
                practitioner_id = ident
        # what consents can name: the account's Organization (its members: practitioners,
        # pharmacists, payers, researchers) and a delegate's RelatedPerson
        refs: set[str] = set()
        if claims.organization and claims.role not in ("patient", "service"):
            refs.add(f"Organization/{claims.organization}")
        if claims.related_person and claims.role == "patient":
            refs.add(f"RelatedPerson/{claims.related_person}")
        return cls(
            subject=claims.subject,
            role=claims.role,
            scopes=claims.scopes,
            patient_id=patient_id,
            practitioner_id=practitioner_id,
            purpose=purpose,
            actor_refs=frozenset(refs),
        )


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One thing a principal wants to do.

    ``patient_ids`` is the patient compartment of the resource (every Patient id it belongs to);
    empty means the resource is not patient data, or, for ``search``/``history`` over a type,
    that this is the type-level question asked before the store applies ``search_filter``.
    It has no default on purpose: forgetting it must not read as "not patient data".
    """

    action: Action
    resource_type: str
    patient_ids: frozenset[str]
    #: The caller has checked that this create (Encounter, Appointment, CareTeam) lists the
    #: requesting practitioner as a participant, so it establishes a care relationship.
    establishes_care: bool = False
    #: Practitioner ids that own this directory entry (Practitioner.id, PractitionerRole.practitioner,
    #: Schedule.actor, the Slot's Schedule.actor); lets practitioners keep their own entries.
    practitioner_ids: frozenset[str] = frozenset()
    #: The request's search parameters, for SMART scopes with query restrictions.
    query: tuple[tuple[str, str], ...] = ()
    #: The resource's sensitivity labels (``teleledger.policy.sensitivity.classify``), so that a
    #: consent about mental-health or HIV data can decide; empty = no sensitive category.
    labels: frozenset[str] = frozenset()
    #: For a message (``THREAD_TYPES``): the FHIR references of its sender and recipients
    #: (``Patient/…``, ``Practitioner/…``), so that only its participants read it without a
    #: consent (``outside_thread``); empty = not a message, or one naming nobody.
    participants: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # machine-readable rule id, e.g. "own-compartment"
    detail: str  # a sentence for logs and OperationOutcome; never PHI
    #: What the decision rests on beyond the rule, for the audit trail: ``Consent/<id>`` or
    #: ``break-glass/<claim id>``; None for the fixed rules.
    basis: str | None = None


#: reason ids of decisions that come from the consent state (``ConsentIndex``)
REASON_CONSENT_PERMIT: Final = "consent-permit"
REASON_CONSENT_DENY: Final = "consent-deny"
REASON_CONSENT_DENY_EXCEPTION: Final = "consent-deny-exception"
REASON_BREAK_GLASS: Final = "break-glass"
REASON_BREAK_GLASS_EXPIRED: Final = "break-glass-expired"


@dataclass(frozen=True, slots=True)
class DefaultPolicy:
    """What an organization allows when no consent says otherwise (one per organization).

    * ``care_relationship_access``: a practitioner with a care relationship with every patient
      concerned may access their data without a grant (default yes). When no, practitioners
      need a consent permit like every other role.
    * ``care_purposes``: the purposes of use (``Principal.purpose``, v3 ActReason) for which the
      care relationship suffices; each also covers its specializations (default TREAT, which
      covers ETREAT, BTG, ERTREAT and COC). Any other purpose needs a consent permit.
    * ``break_glass``: practitioners may claim emergency access (default yes); checked when a
      claim is made (``consent_index.may_claim_break_glass``), so an organization that turns it
      off stops new claims and existing ones run out within their time limit.
    * ``break_glass_ttl``: how long a claim lasts (default 4 hours, at most 24).

    Whatever the default, a patient's deny overrides it, and it never reaches the roles that
    always need a grant (pharmacist, payer, researcher, a delegate).
    """

    care_relationship_access: bool = True
    care_purposes: frozenset[str] = frozenset({"TREAT"})
    break_glass: bool = True
    break_glass_ttl: timedelta = timedelta(hours=4)
    #: ``care_purposes`` with their specializations, what ``decide`` tests against
    covered_care_purposes: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.care_purposes) - PURPOSES
        if unknown:
            raise ConfigurationError(f"unknown purposes of use in the default policy: {sorted(unknown)}")
        if not timedelta(0) < self.break_glass_ttl <= timedelta(hours=24):
            raise ConfigurationError("break_glass_ttl must be more than 0 and at most 24 hours")
        object.__setattr__(self, "covered_care_purposes", covered_purposes(self.care_purposes))


DEFAULT_POLICY: Final = DefaultPolicy()


class CareRelationships(Protocol):
    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool: ...


class Grants(Protocol):
    """The consent state as ``decide`` asks it (``policy.consent_index.ConsentIndex``).

    Return a Decision when the patients' consents (or a break-glass claim) settle the request —
    a permit, a deny, "break-glass", "break-glass-expired", with ``basis`` naming the consent or
    claim — or None when none applies; ``decide`` then falls back on its fixed rules (the care
    relationship, or "needs-consent").
    """

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None: ...


class NoGrants:
    """No consent grants exist yet."""

    __slots__ = ()

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None:
        return None

    def search_view(self, principal: Principal) -> ConsentView:
        return EMPTY_CONSENT_VIEW


NO_GRANTS = NoGrants()


# -- search filters -------------------------------------------------------------------------
# A SearchFilter says which rows *with a non-empty patient compartment* a search may return.
# Rows outside every compartment (directory entries, terminology...) are always returned once
# the type-level decision allowed the search.


@dataclass(frozen=True, slots=True)
class All:
    """No restriction (trusted backend with system scopes)."""


@dataclass(frozen=True, slots=True)
class Compartments:
    """Rows whose compartment contains at least one of ``patient_ids``."""

    patient_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class CareTeamOf:
    """Rows whose every compartment patient has a care relationship with the practitioner."""

    practitioner_id: str


@dataclass(frozen=True, slots=True)
class PublicOnly:
    """No rows with a patient compartment."""


@dataclass(frozen=True, slots=True)
class Nothing:
    """No rows at all."""


# -- row rules: which (type, labels) a consent covers -----------------------------------------
# A consent's data conditions, once the principal, purpose, action and time are fixed, are a
# boolean formula over the row's resource type and its sensitivity labels. These six nodes are
# that formula; each maps to one SQL construct (the lead's ``visibility_clause``):
#   TypeIn(ts)      type_col IN ts
#   AnyLabel(ls)    EXISTS (label row of this resource with label IN ls)
#   OnlyLabels(ls)  EXISTS (label row) AND NOT EXISTS (label row with label NOT IN ls)
#   Not / AllOf / AnyOf   NOT / AND / OR (AllOf(()) is TRUE, AnyOf(()) is FALSE)


@dataclass(frozen=True, slots=True)
class TypeIn:
    types: frozenset[str]


@dataclass(frozen=True, slots=True)
class AnyLabel:
    """The row carries at least one of ``labels``."""

    labels: frozenset[str]


@dataclass(frozen=True, slots=True)
class OnlyLabels:
    """The row carries at least one label, and every label it carries is in ``labels``."""

    labels: frozenset[str]


@dataclass(frozen=True, slots=True)
class Not:
    rule: RowRule


@dataclass(frozen=True, slots=True)
class AllOf:
    rules: tuple[RowRule, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    rules: tuple[RowRule, ...]


RowRule: TypeAlias = TypeIn | AnyLabel | OnlyLabels | Not | AllOf | AnyOf
ALWAYS: Final = AllOf(())
NEVER: Final = AnyOf(())


def row_matches(rule: RowRule, resource_type: str, labels: frozenset[str]) -> bool:
    """Whether a row of ``resource_type`` carrying ``labels`` satisfies ``rule``."""
    if isinstance(rule, TypeIn):
        return resource_type in rule.types
    if isinstance(rule, AnyLabel):
        return not rule.labels.isdisjoint(labels)
    if isinstance(rule, OnlyLabels):
        return bool(labels) and labels <= rule.labels
    if isinstance(rule, Not):
        return not row_matches(rule.rule, resource_type, labels)
    if isinstance(rule, AllOf):
        return all(row_matches(r, resource_type, labels) for r in rule.rules)
    if isinstance(rule, AnyOf):
        return any(row_matches(r, resource_type, labels) for r in rule.rules)
    raise TypeError(f"not a row rule: {rule!r}")  # pragma: no cover - programming error


PatientGroups: TypeAlias = tuple[tuple[frozenset[str], RowRule], ...]


@dataclass(frozen=True, slots=True)
class ConsentView:
    """What the consent state says about one principal's search, resolved for its purpose, the
    action ``search`` and the current time (built by ``ConsentIndex.search_view``).

    ``permits`` and ``denies`` are groups ``(patient ids, rule)``: a row of one of those patients
    is permitted (denied) by their consents when it satisfies the rule. Patients sharing a rule
    share a group, so the SQL stays short. ``break_glass``: patients under an active break-glass
    claim of this practitioner.
    """

    permits: PatientGroups = ()
    denies: PatientGroups = ()
    break_glass: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.permits or self.denies or self.break_glass)


EMPTY_CONSENT_VIEW: Final = ConsentView()


class ConsentSearch(Protocol):
    """The consent state as a search needs it (``ConsentIndex``; ``NoGrants`` gives an empty view)."""

    def search_view(self, principal: Principal) -> ConsentView: ...


@dataclass(frozen=True, slots=True)
class Consented:
    """Rows visible through consent, a care relationship, break-glass or the patient's own record.

    A row with a non-empty compartment (patients P, resource type T, sensitivity labels L) is
    visible exactly when ``own_patient_id`` is in P, or when *every* patient p in P is allowed:

        p in break_glass
        or ( not deny(p, T, L)
             and ( (care_team_of is set and p has a care relationship with it) or permit(p, T, L) ) )

    where permit(p, T, L) holds when some group of ``permits`` contains p and its rule holds for
    (T, L), and deny likewise with ``denies``. This is ``decide``'s answer for each row, so a
    search returns what the reads would allow, and counts and pages only what it returns.
    In SQL: ``NOT EXISTS`` (a compartment row of the resource whose patient is not allowed),
    with ``care_patients_subquery`` for the care team and one ``patient_id IN (...) AND <rule>``
    term per group.
    """

    own_patient_id: str | None = None
    care_team_of: str | None = None
    break_glass: frozenset[str] = frozenset()
    permits: PatientGroups = ()
    denies: PatientGroups = ()
    #: The practitioner whose search this is: a message row ``outside_thread`` of them is visible
    #: only when every compartment patient permits it and none denies it (no care relationship,
    #: no break-glass), as ``decide`` answers "not-a-thread-participant".
    practitioner_id: str | None = None


SearchFilter: TypeAlias = All | Compartments | CareTeamOf | PublicOnly | Nothing | Consented


#: Resource types that are messages between participants: secure-message threads and in-visit
#: chat (``Communication``), read by their sender and recipients, not by the whole care team.
THREAD_TYPES: Final = frozenset({"Communication"})


def outside_thread(practitioner_id: str, resource_type: str, participants: frozenset[str]) -> bool:
    """Whether a resource is a message whose participants (sender and recipients) are known and
    do not include ``Practitioner/<practitioner_id>``: then a care relationship does not reach it
    (``decide`` rule 6b-0, "not-a-thread-participant"); only a consent permit does."""
    return (resource_type in THREAD_TYPES and bool(participants)
            and f"Practitioner/{practitioner_id}" not in participants)


def _in_groups(groups: PatientGroups, patient_id: str, resource_type: str, labels: frozenset[str]) -> bool:
    for patients, rule in groups:
        if patient_id in patients and row_matches(rule, resource_type, labels):
            return True
    return False


def matches(
    search_filter: SearchFilter,
    patient_ids: Iterable[str],
    resource_type: str,
    labels: frozenset[str] = frozenset(),
    *,
    care: CareRelationships | None = None,
    participants: frozenset[str] = frozenset(),
) -> bool:
    """Whether ``search_filter`` lets a row through: the exact, pure definition of each variant,
    for the store to double-check every row it returns.

    ``patient_ids`` is the row's compartment; a row outside every compartment passes every
    filter but ``Nothing``. ``care`` answers care relationships for ``CareTeamOf`` and
    ``Consented.care_team_of``; without it nobody counts as a care-team patient. Like ``decide``,
    ``CareTeamOf`` and ``Consented`` need *every* compartment patient to be allowed, and
    ``Compartments`` (a patient's own record) any one. ``participants`` are a message's sender
    and recipients (``AccessRequest.participants``): a message ``outside_thread`` of the
    practitioner of ``CareTeamOf`` never passes it, and passes ``Consented`` with that
    ``practitioner_id`` only through a permit of every compartment patient.
    """
    if isinstance(search_filter, Nothing):
        return False
    patients = frozenset(patient_ids)
    if not patients or isinstance(search_filter, All):
        return True
    if isinstance(search_filter, PublicOnly):
        return False
    if isinstance(search_filter, Compartments):
        return not search_filter.patient_ids.isdisjoint(patients)
    if isinstance(search_filter, CareTeamOf):
        if outside_thread(search_filter.practitioner_id, resource_type, participants):
            return False
        return care is not None and all(
            care.has_care_relationship(search_filter.practitioner_id, p) for p in patients
        )
    if isinstance(search_filter, Consented):
        f = search_filter
        if f.own_patient_id is not None and f.own_patient_id in patients:
            return True
        if f.practitioner_id is not None and outside_thread(f.practitioner_id, resource_type, participants):
            return all(not _in_groups(f.denies, p, resource_type, labels)
                       and _in_groups(f.permits, p, resource_type, labels) for p in patients)
        for p in patients:
            if p in f.break_glass:
                continue
            if _in_groups(f.denies, p, resource_type, labels):
                return False
            if f.care_team_of is not None and care is not None and care.has_care_relationship(f.care_team_of, p):
                continue
            if not _in_groups(f.permits, p, resource_type, labels):
                return False
        return True
    raise TypeError(f"not a search filter: {search_filter!r}")  # pragma: no cover - programming error
