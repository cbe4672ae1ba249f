"""The vocabulary of access decisions: who asks (Principal), for what (AccessRequest), the answer
(Decision), the facts the policy consults (CareRelationships, Grants) and the restriction a
search must apply in the store (SearchFilter).

Everything here is immutable and framework-free; the rules themselves live in
``teleledger.policy.decide``. This module must never perform I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from teleledger.identity.scopes import Role, ScopeSet, fhir_user

if TYPE_CHECKING:
    from teleledger.identity.tokens import Claims

__all__ = [
    "AccessRequest",
    "Action",
    "All",
    "CareRelationships",
    "CareTeamOf",
    "Compartments",
    "Decision",
    "Grants",
    "NO_GRANTS",
    "NoGrants",
    "Nothing",
    "Principal",
    "PublicOnly",
    "Role",
    "SearchFilter",
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

    @property
    def fhir_user(self) -> str | None:
        return fhir_user(self.patient_id, self.practitioner_id)

    @classmethod
    def from_claims(cls, claims: Claims, *, purpose: str = "TREAT") -> Principal:
        """The principal an access token speaks for.

        Only a patient's token links the principal to a Patient (its ``patient`` claim): for any
        other role that claim is a launch context (the patient on screen), never an identity.
        Only a practitioner is linked to a Practitioner, through ``fhirUser = Practitioner/<id>``.
        """
        patient_id = claims.patient if claims.role == "patient" else None
        practitioner_id = None
        if claims.role == "practitioner" and claims.fhir_user is not None:
            kind, _, ident = claims.fhir_user.partition("/")
            if kind == "Practitioner" and ident and "/" not in ident:
                practitioner_id = ident
        return cls(
            subject=claims.subject,
            role=claims.role,
            scopes=claims.scopes,
            patient_id=patient_id,
            practitioner_id=practitioner_id,
            purpose=purpose,
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


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # machine-readable rule id, e.g. "own-compartment"
    detail: str  # a sentence for logs and OperationOutcome; never PHI


class CareRelationships(Protocol):
    def has_care_relationship(self, practitioner_id: str, patient_id: str) -> bool: ...


class Grants(Protocol):
    """Extension point for consent: a grant lets a role without a care relationship see data.

    Return a Decision to settle the request, or None when no grant applies (the policy then
    denies with "needs-consent").
    """

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None: ...


class NoGrants:
    """No consent grants exist yet."""

    __slots__ = ()

    def grant(self, principal: Principal, request: AccessRequest) -> Decision | None:
        return None


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


SearchFilter: TypeAlias = All | Compartments | CareTeamOf | PublicOnly | Nothing
