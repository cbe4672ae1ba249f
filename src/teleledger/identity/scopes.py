"""SMART App Launch v2 scopes: parsing, checking, narrowing, and the maximum scopes of each role.

Spec: https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html

A scope string is a space-separated list. Two kinds of scope are understood:

* clinical scopes ``(patient|user|system)/(ResourceType|*).(permissions)[?query]`` where the
  permissions are the v2 letters ``c r u d s`` (create, read, update, delete, search), in that
  order, at least one; or the v1 forms ``read`` (= ``rs``), ``write`` (= ``cud``) and ``*``
  (= ``cruds``). ``ResourceType`` must be a FHIR R4 resource type. The optional v2 query
  restriction (``patient/Observation.rs?category=laboratory``) is a list of ``name=value``
  pairs joined with ``&``; v1 forms take no restriction.
* the non-clinical flags ``openid fhirUser launch launch/patient offline_access online_access``.

Anything else makes :meth:`ScopeSet.parse` raise ``InvalidInput`` naming the offending scope.

Query restrictions (deny by default): a restricted scope grants only requests whose own query
parameters contain every ``name=value`` pair of the restriction, compared as exact strings
(FHIR search parameters are AND-ed, so extra parameters only narrow the result and are safe).
``allows()`` without a ``query`` never counts a restricted scope; a read of a single resource
therefore needs an unrestricted scope unless the caller passes the resource's own search
values. Comma-separated alternatives (``category=laboratory,vital-signs``) are a different
string and do not match: the safe failure is a denial.

Canonical text (``str(scopes)``): v1 forms are written as v2 letters; scopes with the same
context, type and restriction are merged; a scope whose letters are all granted by more general
scopes (``*`` type and/or a subset of its restriction) is dropped; clinical scopes are sorted by
context (patient, user, system), ``*`` first, then type and restriction; the flags follow in the
order listed above. ``ScopeSet.parse(str(s)) == s`` and ``str(ScopeSet.parse(str(s))) == str(s)``
for every ``ScopeSet``. A scope only partly covered keeps all its letters
(``patient/*.rs patient/Appointment.cruds``), so clients see what they asked for; equality is by
meaning (the requests allowed), not by text.

Maximum scopes per role (``ROLE_SCOPES``), intersected at the token endpoint with what the
client requests and what the client registration allows (``narrow``):

============  ==================================================================================
role          scopes and why
============  ==================================================================================
patient       ``patient/*.rs`` read/search anything in their own compartment (and the public
              directory); ``patient/Appointment.cruds patient/Communication.cruds
              patient/Consent.cruds`` book visits, message their care team, manage their consent.
              No write on clinical record types and no ``Patient`` create: the record is kept by
              clinicians. ``launch/patient openid fhirUser offline_access online_access``:
              patient-facing apps (mobile) get their own patient as context and refresh tokens.
practitioner  ``user/*.cruds``: full clinical work; the policy layer limits it to patients with
              whom they have a care relationship. ``launch launch/patient openid fhirUser
              offline_access online_access``.
pharmacist    ``user/MedicationRequest.rs user/MedicationDispense.cruds user/Medication.rs
              user/Patient.rs user/Practitioner.rs user/Organization.rs``: read prescriptions,
              record dispenses; patient data only through a consent grant (policy).
              ``openid fhirUser online_access``.
payer         ``user/Claim.cruds user/ExplanationOfBenefit.cruds user/Coverage.cruds
              user/Patient.rs user/Encounter.rs user/Practitioner.rs user/Organization.rs``:
              adjudication; patient data only through a consent grant. ``openid fhirUser
              online_access``.
researcher    ``user/ResearchStudy.cruds user/ResearchSubject.cruds``: studies and enrolment;
              subjects' data only through a consent grant. ``openid fhirUser online_access``.
admin         ``user/Practitioner.cruds user/PractitionerRole.cruds user/Organization.cruds
              user/Location.cruds user/HealthcareService.cruds user/Endpoint.cruds
              user/Schedule.cruds user/Slot.cruds user/AuditEvent.rs``: runs the directory and
              reads the audit trail. No type of the patient compartment other than AuditEvent,
              and the policy denies AuditEvents that are about a patient ("admin-no-clinical").
              No ``system/`` scopes: an administrator is a person, not a backend.
              ``openid fhirUser online_access`` (no refresh tokens for privileged accounts).
service       not in the table: a backend (client_credentials) gets the ``system/`` scopes of its
              client registration, never a role default.
============  ==================================================================================

Staff roles other than patient and practitioner get no ``offline_access``: they work from
managed workstations and should re-authenticate rather than hold long-lived refresh tokens.

This module must never perform I/O or import a framework: it is a pure core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from teleledger.core.errors import InvalidInput

__all__ = [
    "CONTEXTS",
    "FLAGS",
    "INTERACTIONS",
    "R4_RESOURCE_TYPES",
    "ROLES",
    "ROLE_SCOPES",
    "ROLE_SCOPE_SETS",
    "ClinicalScope",
    "Context",
    "Interaction",
    "Role",
    "ScopeSet",
]

Context = Literal["patient", "user", "system"]
Interaction = Literal["c", "r", "u", "d", "s"]
Role = Literal["patient", "practitioner", "pharmacist", "payer", "researcher", "admin", "service"]

CONTEXTS: Final[tuple[str, ...]] = ("patient", "user", "system")
INTERACTIONS: Final[str] = "cruds"
ROLES: Final[frozenset[str]] = frozenset(
    {"patient", "practitioner", "pharmacist", "payer", "researcher", "admin", "service"}
)
#: Non-clinical scopes, in canonical output order.
FLAGS: Final[tuple[str, ...]] = (
    "openid",
    "fhirUser",
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
)

#: Every concrete resource type of FHIR R4 (4.0.1).
R4_RESOURCE_TYPES: Final[frozenset[str]] = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition ResearchElementDefinition
    ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter
    ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap Subscription
    Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
    SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
    """.split()
)

_BIT: Final[Mapping[str, int]] = MappingProxyType({"c": 1, "r": 2, "u": 4, "d": 8, "s": 16})
_ALL: Final[int] = 31
_V1: Final[Mapping[str, int]] = MappingProxyType(
    {"read": _BIT["r"] | _BIT["s"], "write": _BIT["c"] | _BIT["u"] | _BIT["d"], "*": _ALL}
)
_CONTEXT_ORDER: Final[Mapping[str, int]] = MappingProxyType({c: i for i, c in enumerate(CONTEXTS)})
_FLAG_ORDER: Final[Mapping[str, int]] = MappingProxyType({f: i for i, f in enumerate(FLAGS)})

_CLINICAL = re.compile(
    r"(?P<context>patient|user|system)/(?P<type>[A-Za-z]+|\*)\.(?P<perm>[a-z*]+)(?:\?(?P<query>.*))?",
    re.ASCII,
)
_V2_LETTERS = re.compile(r"c?r?u?d?s?", re.ASCII)
_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*", re.ASCII)
_CLINICAL_PREFIXES: Final[tuple[str, ...]] = ("patient/", "user/", "system/")

Restriction = tuple[tuple[str, str], ...]


def _letters(mask: int) -> str:
    return "".join(letter for letter in INTERACTIONS if mask & _BIT[letter])


@dataclass(frozen=True, slots=True)
class ClinicalScope:
    """One clinical scope: ``context/resource_type.letters[?restriction]``.

    ``permissions`` is a bit mask over ``c r u d s`` (1, 2, 4, 8, 16), never 0;
    ``restriction`` is a sorted tuple of ``(name, value)`` query pairs, all of which must be
    present in a request for the scope to apply.
    """

    context: Context
    resource_type: str
    permissions: int
    restriction: Restriction = ()

    def __post_init__(self) -> None:
        if self.context not in _CONTEXT_ORDER:
            raise ValueError(f"unknown scope context {self.context!r}")
        if self.resource_type != "*" and self.resource_type not in R4_RESOURCE_TYPES:
            raise ValueError(f"unknown resource type {self.resource_type!r}")
        if not 0 < self.permissions <= _ALL:
            raise ValueError(f"permissions must be a non-empty c/r/u/d/s mask, got {self.permissions}")
        if tuple(sorted(set(self.restriction))) != self.restriction:
            raise ValueError("restriction must be a sorted tuple of distinct (name, value) pairs")

    @property
    def letters(self) -> str:
        return _letters(self.permissions)

    def __str__(self) -> str:
        text = f"{self.context}/{self.resource_type}.{self.letters}"
        if self.restriction:
            text += "?" + "&".join(f"{name}={value}" for name, value in self.restriction)
        return text

    def _sort_key(self) -> tuple[int, bool, str, Restriction]:
        return (_CONTEXT_ORDER[self.context], self.resource_type != "*", self.resource_type, self.restriction)

    def _covers(self, other: ClinicalScope) -> bool:
        """Whether every request ``other`` applies to is one ``self`` applies to as well."""
        return (
            self.context == other.context
            and (self.resource_type == "*" or self.resource_type == other.resource_type)
            and set(self.restriction) <= set(other.restriction)
        )


def _parse_clinical(token: str) -> ClinicalScope:
    match = _CLINICAL.fullmatch(token)
    if match is None:
        raise InvalidInput(f"malformed scope {token!r}", expression="scope")
    resource_type = match["type"]
    if resource_type != "*" and resource_type not in R4_RESOURCE_TYPES:
        raise InvalidInput(f"scope {token!r} names an unknown resource type", expression="scope")
    perm, query = match["perm"], match["query"]
    if perm in _V1:
        if query is not None:
            raise InvalidInput(
                f"scope {token!r}: query restrictions need v2 permissions (c r u d s)",
                expression="scope",
            )
        mask = _V1[perm]
    elif perm and _V2_LETTERS.fullmatch(perm):
        mask = 0
        for letter in perm:
            mask |= _BIT[letter]
    else:
        raise InvalidInput(
            f"scope {token!r}: permissions must be v2 letters in the order c r u d s "
            "or one of read, write, *",
            expression="scope",
        )
    restriction: Restriction = ()
    if query is not None:
        pairs: set[tuple[str, str]] = set()
        for part in query.split("&"):
            name, sep, value = part.partition("=")
            if not sep or not value or _PARAM_NAME.fullmatch(name) is None:
                raise InvalidInput(
                    f"scope {token!r}: query restriction must be name=value pairs joined by &",
                    expression="scope",
                )
            pairs.add((name, value))
        restriction = tuple(sorted(pairs))
    return ClinicalScope(match["context"], resource_type, mask, restriction)  # type: ignore[arg-type]


def _canonical(scopes: Iterable[ClinicalScope]) -> tuple[tuple[ClinicalScope, ...], frozenset[ClinicalScope]]:
    """The canonical scopes for display, and the meaning of the set as a unique key.

    Display drops only whole scopes that more general scopes cover, so a client sees the scopes
    it asked for whenever they are granted. The key keeps, for each scope, only the letters that
    no more general scope grants: two sets allow exactly the same requests if and only if their
    keys are equal, whatever their text.
    """
    merged: dict[tuple[str, str, Restriction], int] = {}
    for scope in scopes:
        key = (scope.context, scope.resource_type, scope.restriction)
        merged[key] = merged.get(key, 0) | scope.permissions
    candidates = [ClinicalScope(c, t, m, r) for (c, t, r), m in merged.items()]  # type: ignore[arg-type]
    kept = []
    meaning = set()
    for scope in candidates:
        covered = 0
        for other in candidates:
            if other is not scope and other._covers(scope):
                covered |= other.permissions
        # Covering is a strict partial order and transitive, so judging every scope against the
        # original set gives the same result as repeated passes: the result is idempotent.
        own = scope.permissions & ~covered
        if own:
            kept.append(scope)
            meaning.add(ClinicalScope(scope.context, scope.resource_type, own, scope.restriction))
    kept.sort(key=ClinicalScope._sort_key)
    return tuple(kept), frozenset(meaning)


class ScopeSet:
    """An immutable, canonical set of SMART scopes. Build with :meth:`parse`."""

    __slots__ = ("_flags", "_meaning", "_restricted", "_scopes", "_text", "_unrestricted")

    _scopes: tuple[ClinicalScope, ...]
    _flags: frozenset[str]
    _unrestricted: dict[str, dict[str, int]]
    _restricted: dict[str, dict[str, tuple[tuple[int, frozenset[tuple[str, str]]], ...]]]
    _text: str
    _meaning: frozenset[ClinicalScope]

    def __init__(self, scopes: Iterable[ClinicalScope] = (), flags: Iterable[str] = ()) -> None:
        flag_set = frozenset(flags)
        unknown = flag_set - _FLAG_ORDER.keys()
        if unknown:
            raise ValueError(f"unknown scope flags {sorted(unknown)}")
        canonical, meaning = _canonical(scopes)
        # Indexes built once so that allows() is two dict look-ups and no allocation.
        unrestricted: dict[str, dict[str, int]] = {}
        restricted: dict[str, dict[str, list[tuple[int, frozenset[tuple[str, str]]]]]] = {}
        for scope in canonical:
            if scope.restriction:
                by_type = restricted.setdefault(scope.context, {})
                by_type.setdefault(scope.resource_type, []).append(
                    (scope.permissions, frozenset(scope.restriction))
                )
            else:
                types = unrestricted.setdefault(scope.context, {})
                types[scope.resource_type] = types.get(scope.resource_type, 0) | scope.permissions
        self._scopes = canonical
        self._meaning = meaning
        self._flags = flag_set
        self._unrestricted = unrestricted
        self._restricted = {
            context: {t: tuple(entries) for t, entries in by_type.items()}
            for context, by_type in restricted.items()
        }
        self._text = " ".join(
            [str(scope) for scope in canonical] + sorted(flag_set, key=_FLAG_ORDER.__getitem__)
        )

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> ScopeSet:
        """Parse a space-separated scope string; any unknown or malformed scope is InvalidInput."""
        return cls._parse(text, strict=True)

    @classmethod
    def empty(cls) -> ScopeSet:
        return _EMPTY

    @classmethod
    def _parse(cls, text: str, *, strict: bool) -> ScopeSet:
        if not isinstance(text, str):
            raise InvalidInput("scope must be a string", expression="scope")
        scopes: list[ClinicalScope] = []
        flags: set[str] = set()
        for token in text.split():
            if token.startswith(_CLINICAL_PREFIXES):
                scopes.append(_parse_clinical(token))
            elif token in _FLAG_ORDER:
                flags.add(token)
            elif strict:
                raise InvalidInput(f"unknown scope {token!r}", expression="scope")
        return cls(scopes, flags)

    # -- reading ----------------------------------------------------------------------------

    @property
    def scopes(self) -> tuple[ClinicalScope, ...]:
        """The clinical scopes, canonical and sorted."""
        return self._scopes

    @property
    def flags(self) -> frozenset[str]:
        """The non-clinical scopes (``openid``, ``launch/patient``...)."""
        return self._flags

    def has_flag(self, flag: str) -> bool:
        return flag in self._flags

    def allows(
        self,
        context: Context,
        resource_type: str,
        interaction: Interaction,
        *,
        query: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """Whether some scope grants ``interaction`` on ``resource_type`` in ``context``.

        ``query`` is the request's own search parameters as ``(name, value)`` pairs; only then can
        a restricted scope apply (see the module docstring).
        """
        bit = _BIT.get(interaction)
        if bit is None:
            raise ValueError(f"interaction must be one of c r u d s, got {interaction!r}")
        types = self._unrestricted.get(context)
        if types is not None and (types.get(resource_type, 0) | types.get("*", 0)) & bit:
            return True
        if query and self._restricted:
            by_type = self._restricted.get(context)
            if by_type:
                present = set(query)
                for key in (resource_type, "*"):
                    for mask, pairs in by_type.get(key, ()):
                        if mask & bit and pairs <= present:
                            return True
        return False

    # -- combining --------------------------------------------------------------------------

    def narrow(self, requested: str | ScopeSet) -> ScopeSet:
        """The scopes both in ``requested`` and in ``self``: what a token may carry.

        ``self`` is the ceiling (a role's maximum, a client registration). A requested string is
        parsed leniently: malformed or unknown *clinical* scopes are still InvalidInput, but
        unknown non-clinical scopes (``profile``, ``launch/encounter``...) are dropped, as
        RFC 6749 section 3.3 lets the server grant less than asked.
        """
        req = requested if isinstance(requested, ScopeSet) else ScopeSet._parse(requested, strict=False)
        out: list[ClinicalScope] = []
        for a in req._scopes:
            for b in self._scopes:
                if a.context != b.context:
                    continue
                if a.resource_type == "*":
                    resource_type = b.resource_type
                elif b.resource_type in ("*", a.resource_type):
                    resource_type = a.resource_type
                else:
                    continue
                mask = a.permissions & b.permissions
                if mask:
                    # Restrictions are AND-ed, so the intersection carries both.
                    restriction = tuple(sorted(set(a.restriction) | set(b.restriction)))
                    out.append(ClinicalScope(a.context, resource_type, mask, restriction))
        return ScopeSet(out, req._flags & self._flags)

    # -- dunder -----------------------------------------------------------------------------

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"ScopeSet.parse({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScopeSet):
            return NotImplemented
        return self._meaning == other._meaning and self._flags == other._flags

    def __hash__(self) -> int:
        return hash((self._meaning, self._flags))

    def __bool__(self) -> bool:
        return bool(self._scopes or self._flags)


_EMPTY: Final[ScopeSet] = ScopeSet()

ROLE_SCOPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "patient": (
            "patient/*.rs patient/Appointment.cruds patient/Communication.cruds patient/Consent.cruds"
            " openid fhirUser launch/patient offline_access online_access"
        ),
        "practitioner": "user/*.cruds openid fhirUser launch launch/patient offline_access online_access",
        "pharmacist": (
            "user/Medication.rs user/MedicationDispense.cruds user/MedicationRequest.rs"
            " user/Organization.rs user/Patient.rs user/Practitioner.rs"
            " openid fhirUser online_access"
        ),
        "payer": (
            "user/Claim.cruds user/Coverage.cruds user/Encounter.rs user/ExplanationOfBenefit.cruds"
            " user/Organization.rs user/Patient.rs user/Practitioner.rs"
            " openid fhirUser online_access"
        ),
        "researcher": "user/ResearchStudy.cruds user/ResearchSubject.cruds openid fhirUser online_access",
        "admin": (
            "user/AuditEvent.rs user/Endpoint.cruds user/HealthcareService.cruds user/Location.cruds"
            " user/Organization.cruds user/Practitioner.cruds user/PractitionerRole.cruds"
            " user/Schedule.cruds user/Slot.cruds openid fhirUser online_access"
        ),
    }
)

#: ``ROLE_SCOPES`` parsed once (and so validated at import).
ROLE_SCOPE_SETS: Final[Mapping[str, ScopeSet]] = MappingProxyType(
    {role: ScopeSet.parse(text) for role, text in ROLE_SCOPES.items()}
)


def fhir_user(patient_id: str | None, practitioner_id: str | None, related_person_id: str | None = None) -> str | None:
    """The SMART ``fhirUser`` of a person: their Patient, Practitioner or RelatedPerson, if linked."""
    if patient_id:
        return f"Patient/{patient_id}"
    if practitioner_id:
        return f"Practitioner/{practitioner_id}"
    return f"RelatedPerson/{related_person_id}" if related_person_id else None
