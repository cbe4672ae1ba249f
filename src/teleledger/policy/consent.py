"""The consent model: a FHIR R4 Consent (https://hl7.org/fhir/R4/consent.html) read into the rules
the policy enforces, checked for the mistakes a patient or an app can make, and hashed for the chain.

What a Consent says here
========================

``Consent.scope`` is one of ``patient-privacy``, ``research``, ``treatment`` (system
http://terminology.hl7.org/CodeSystem/consentscope); ``Consent.patient`` is a literal
``Patient/<id>``; ``Consent.status`` is any R4 code (only ``active`` consents are enforced, see
``ConsentIndex``); ``Consent.policyRule`` is kept and hashed, not interpreted: the
organization's ``DefaultPolicy`` is the base rule a consent departs from.

``Consent.provision`` is a tree. Each provision has a ``type`` (``permit``/``deny``) and narrows
*who*, *what for* and *which data* it applies to; an element left out means "any":

=================  ===============================================================================
element            read as
=================  ===============================================================================
``actor``          ``reference`` to Practitioner, PractitionerRole, Organization, ResearchStudy or
                   RelatedPerson (``Type/id``); ``role`` if given must be a recipient: v3
                   ParticipationType PRCP or IRCP. The principal matches when one of its
                   ``actor_refs`` is listed (a pharmacist's Organization, a delegate's RelatedPerson).
``action``         consentaction codes; each covers request actions: ``access``, ``use``,
                   ``disclose`` → read, vread, search, history; ``collect`` → create;
                   ``correct`` → create, update, delete.
``purpose``        v3 ActReason purpose-of-use codes (``PURPOSES``); a provision for a purpose also
                   covers its specializations (TREAT covers ETREAT, ETREAT covers BTG, HRESCH covers
                   CLINTRCH ...). The request's purpose is ``Principal.purpose``.
``class``          resource types (system http://hl7.org/fhir/resource-types).
``securityLabel``  sensitivity labels (v3 ActCode; ``policy.sensitivity``: PSY, HIV, ETH, GDIS, SEX,
                   aliases such as MH folded in). A *deny* on labels applies to a resource carrying
                   any of them; a *permit* on labels applies to a resource that carries at least one
                   label and only labels in the list — so a permit for HIV data never lets out a
                   note that is also about mental health.
``period``         when the provision applies (start inclusive, end inclusive at its precision:
                   ``"end": "2025-06-30"`` lasts until the end of that day; dates without a zone
                   are read as UTC).
``provision``      nested exceptions. A nested provision without ``type`` is the opposite of its
                   parent. It only ever applies inside its parent (conditions are AND-ed down the
                   tree).
=================  ===============================================================================

Evaluation (``ConsentIndex`` implements it; stated here because it is the meaning of a tree): a
consent *applies* to a request when its root provision matches; its verdict is that of the root,
where a matching provision's verdict is its own type if none of its nested provisions matches,
and otherwise deny if any matching nested provision's verdict is deny, else permit (deny wins
among siblings). Across several consents of one patient, deny wins.

A ``research`` consent whose root names no purpose is read as purpose HRESCH, a ``treatment``
consent as TREAT, so that neither can be mistaken for a blanket grant.

Rejected, each with ``InvalidInput`` naming the element in FHIRPath style
(``Consent.provision.provision[1].period``): a period that ends before it starts; an actor of a
type or role not in the tables above, or unknown to the caller's ``actor_exists``; a purpose,
action, class or label outside its value set; two sibling provisions of opposite type whose
actors, actions, purposes, data and periods all overlap (the same access both permitted and
denied at one level — nest one inside the other to make it an exception); ``provision.data``,
``provision.code`` and ``provision.dataPeriod`` (instance- and code-level rules are not
supported: name data by ``class`` and ``securityLabel``); any ``modifierExtension``.

The chain hash
==============

``provision_hash(rules, salt)`` is HMAC-SHA-256 keyed with ``salt`` (≥ 16 random bytes kept with
the Consent, off chain) over ``b"teleledger/consent-provision/v1\\n"`` followed by the canonical
form: the UTF-8 JSON, keys sorted, no whitespace (``separators=(",", ":")``,
``ensure_ascii=False``), of ::

    {"patient": <patient id>, "policyRule": <code or null>, "scope": <scope code>,
     "provision": P}
    P = {"type": "permit"|"deny",
         "period": [<start or null>, <end or null>],   # UTC "YYYY-MM-DDTHH:MM:SS.ffffffZ", end exclusive
         "actor": [...], "action": [...], "purpose": [...], "class": [...], "securityLabel": [...],
         "provision": [P, ...]}

every list sorted (nested provisions by their own canonical JSON), codes as normalized above
(labels canonical, inferred research/treatment purposes included). The consent id and status are
not hashed: they are not what the patient agreed to. The salt makes the 32 bytes on chain useless
to someone who would enumerate likely consents and compare hashes.

Pure core: this module must never perform I/O and imports no framework.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from hashlib import sha256
from types import MappingProxyType
from typing import Any, Final, Literal

from teleledger.core.errors import InvalidInput
from teleledger.identity.scopes import R4_RESOURCE_TYPES
from teleledger.policy.sensitivity import ACTCODE_SYSTEM, LABELS, normalize_label

__all__ = [
    "ACTION_COVERS",
    "ACTOR_TYPES",
    "ANYONE",
    "ConsentRules",
    "EMERGENCY_PURPOSES",
    "PURPOSES",
    "Period",
    "Provision",
    "canonical_form",
    "covered_purposes",
    "parse_consent",
    "provision_hash",
]

SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
ACTION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_REASON_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RESOURCE_TYPES_SYSTEM: Final = "http://hl7.org/fhir/resource-types"

ConsentScope = Literal["patient-privacy", "research", "treatment"]
ProvisionType = Literal["permit", "deny"]

SCOPES: Final[frozenset[str]] = frozenset({"patient-privacy", "research", "treatment"})
STATUSES: Final[frozenset[str]] = frozenset(
    {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
)
#: grantee key of a consent whose root provision names no actor: it concerns every principal
ANYONE: Final = "*"
ACTOR_TYPES: Final[frozenset[str]] = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "ResearchStudy", "RelatedPerson"}
)
ACTOR_ROLES: Final[frozenset[str]] = frozenset({"PRCP", "IRCP"})
POLICY_RULES: Final[frozenset[str]] = frozenset({"OPTIN", "OPTINR", "OPTOUT", "OPTOUTE"})

_READS: Final = frozenset({"read", "vread", "search", "history"})
#: consentaction code → the request actions (``policy.model.Action``) it covers
ACTION_COVERS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "access": _READS,
        "use": _READS,
        "disclose": _READS,
        "collect": frozenset({"create"}),
        "correct": frozenset({"create", "update", "delete"}),
    }
)

# The is-a hierarchy of HL7 v3 ActReason (terminology.hl7.org) for the purposes of use supported
# here: code → parent (None for the top of a branch). Hand-written because no maintained Python
# package ships HL7 terminology, and the policy needs only this small, stable corner of it.
_PURPOSE_PARENT: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "TREAT": None,
        "ETREAT": "TREAT",
        "BTG": "ETREAT",
        "ERTREAT": "ETREAT",
        "COC": "TREAT",
        "HPAYMT": None,
        "CLMATTCH": "HPAYMT",
        "COVAUTH": "HPAYMT",
        "COVERAGE": "HPAYMT",
        "ELIGDTRM": "COVERAGE",
        "ELIGVER": "COVERAGE",
        "ENROLLM": "COVERAGE",
        "REMITADV": "HPAYMT",
        "HRESCH": None,
        "BIORCH": "HRESCH",
        "CLINTRCH": "HRESCH",
        "CLINTRCHNPC": "CLINTRCH",
        "CLINTRCHPC": "CLINTRCH",
        "DSRCH": "HRESCH",
        "POARCH": "HRESCH",
        "PRECLINTRCH": "HRESCH",
        "TRANSRCH": "HRESCH",
        "HOPERAT": None,
        "CAREMGT": "HOPERAT",
        "PATADMIN": "HOPERAT",
        "PATSFTY": "HOPERAT",
        "RECORDMGT": "HOPERAT",
        "HSYSADMIN": "HOPERAT",
        "PATRQT": None,
        "FAMRQT": "PATRQT",
        "PWATRNY": "PATRQT",
        "SUPNWK": "PATRQT",
        "PUBHLTH": None,
        "DISASTER": "PUBHLTH",
        "THREAT": "PUBHLTH",
        "HMARKT": None,
    }
)
PURPOSES: Final[frozenset[str]] = frozenset(_PURPOSE_PARENT)


def _ancestors_or_self(code: str) -> Iterable[str]:
    current: str | None = code
    while current is not None:
        yield current
        current = _PURPOSE_PARENT[current]


def covered_purposes(codes: Iterable[str]) -> frozenset[str]:
    """The purposes ``codes`` cover: each code and all its specializations (TREAT → TREAT, ETREAT, BTG ...)."""
    wanted = set(codes)
    return frozenset(c for c in PURPOSES if not wanted.isdisjoint(_ancestors_or_self(c)))


#: purposes that claim emergency access (ETREAT and its specializations BTG, ERTREAT)
EMERGENCY_PURPOSES: Final[frozenset[str]] = covered_purposes({"ETREAT"})

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open interval [start, end) of UTC instants; None = unbounded on that side."""

    start: datetime | None = None
    end: datetime | None = None  # exclusive

    def contains(self, at: datetime) -> bool:
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)

    def overlaps(self, other: Period) -> bool:
        return (self.end is None or other.start is None or other.start < self.end) and (
            other.end is None or self.start is None or self.start < other.end
        )

    @property
    def start_ts(self) -> float:
        return float("-inf") if self.start is None else (self.start - _EPOCH).total_seconds()

    @property
    def end_ts(self) -> float:
        return float("inf") if self.end is None else (self.end - _EPOCH).total_seconds()


ALWAYS: Final = Period()


@dataclass(frozen=True, slots=True)
class Provision:
    """One node of a consent's provision tree; an empty set means "any"."""

    type: ProvisionType
    actors: frozenset[str] = frozenset()  # "Practitioner/p1", "Organization/o1" ...
    actions: frozenset[str] = frozenset()  # consentaction codes
    purposes: frozenset[str] = frozenset()  # v3 ActReason codes, as written
    classes: frozenset[str] = frozenset()  # resource types
    labels: frozenset[str] = frozenset()  # canonical sensitivity labels
    period: Period = ALWAYS
    exceptions: tuple[Provision, ...] = ()

    @property
    def permit(self) -> bool:
        return self.type == "permit"


@dataclass(frozen=True, slots=True)
class ConsentRules:
    """A parsed Consent: who it belongs to, what kind it is, and its provision tree."""

    consent_id: str | None
    patient_id: str
    scope: ConsentScope
    status: str
    policy_rule: str | None
    provision: Provision

    @property
    def period(self) -> Period:
        """The consent's own period (that of its root provision)."""
        return self.provision.period

    @property
    def grantees(self) -> frozenset[str]:
        """The actors a grant of this consent may name: the root provision's, or ``ANYONE``."""
        return self.provision.actors or frozenset({ANYONE})


# -- parsing --------------------------------------------------------------------------------

_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _fail(where: str, message: str) -> InvalidInput:
    return InvalidInput(f"{where}: {message}", expression=where)


def _parse_instant(value: Any, where: str, *, end: bool) -> datetime:
    """A FHIR date or dateTime as a UTC instant; for ``end``, the first instant after it."""
    if not isinstance(value, str):
        raise _fail(where, f"expected a FHIR date or dateTime string, found {value!r}")
    m = _DATE_RE.match(value)
    if m is not None:
        year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        try:
            start = datetime(year, month, day, tzinfo=timezone.utc)
        except ValueError as exc:
            raise _fail(where, f"{value!r} is not a valid date") from exc
        if not end:
            return start
        if m[3]:
            return start + timedelta(days=1)
        if m[2]:
            return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
        return datetime(year + 1, 1, 1, tzinfo=timezone.utc)
    if "T" not in value:
        raise _fail(where, f"{value!r} is not a FHIR date or dateTime")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _fail(where, f"{value!r} is not a FHIR dateTime") from exc
    if parsed.tzinfo is None:
        raise _fail(where, f"{value!r} has a time but no time zone (FHIR requires one)")
    return parsed.astimezone(timezone.utc)


def _parse_period(value: Any, where: str) -> Period:
    if value is None:
        return ALWAYS
    if not isinstance(value, Mapping):
        raise _fail(where, "expected a Period object")
    start = _parse_instant(value["start"], f"{where}.start", end=False) if "start" in value else None
    end = _parse_instant(value["end"], f"{where}.end", end=True) if "end" in value else None
    if start is not None and end is not None and end <= start:
        raise _fail(where, f"the period ends ({value['end']}) before it starts ({value['start']})")
    return Period(start, end)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(where, "expected a list")
    return value


def _codings(concept: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        raise _fail(where, "expected a CodeableConcept")
    codings = [c for c in _list(concept.get("coding"), f"{where}.coding") if isinstance(c, Mapping)]
    if not codings:
        raise _fail(where, "expected at least one coding")
    return codings


def _code(coding: Any, where: str, system: str, allowed: Iterable[str], what: str) -> str:
    if not isinstance(coding, Mapping):
        raise _fail(where, "expected a Coding")
    if coding.get("system") != system:
        raise _fail(where, f"{what} must use the system {system}, found {coding.get('system')!r}")
    code = coding.get("code")
    if code not in allowed:
        raise _fail(where, f"{code!r} is not a supported {what} (expected one of {', '.join(sorted(allowed))})")
    return code  # type: ignore[no-any-return]


_UNSUPPORTED: Final = {
    "data": "rules about individual resources are not supported; name the data by class or securityLabel",
    "code": "rules about individual clinical codes are not supported; use securityLabel",
    "dataPeriod": "rules about when data was recorded are not supported",
    "modifierExtension": "modifier extensions change the meaning of a consent and none is understood here",
}


def _parse_provision(
    node: Any,
    where: str,
    parent_type: ProvisionType | None,
    actor_exists: Callable[[str], bool] | None,
) -> Provision:
    if not isinstance(node, Mapping):
        raise _fail(where, "expected a provision object")
    for key, why in _UNSUPPORTED.items():
        if node.get(key):
            raise _fail(f"{where}.{key}", why)
    kind = node.get("type")
    if kind is None:
        if parent_type is None:
            raise _fail(f"{where}.type", "the root provision must say permit or deny")
        kind = "deny" if parent_type == "permit" else "permit"
    elif kind not in ("permit", "deny"):
        raise _fail(f"{where}.type", f"expected permit or deny, found {kind!r}")

    actors: set[str] = set()
    for i, actor in enumerate(_list(node.get("actor"), f"{where}.actor")):
        at = f"{where}.actor[{i}]"
        if not isinstance(actor, Mapping):
            raise _fail(at, "expected an actor object")
        if actor.get("role") is not None:
            codings = _codings(actor["role"], f"{at}.role")
            if not any(c.get("system") == PARTICIPATION_SYSTEM and c.get("code") in ACTOR_ROLES for c in codings):
                _code(codings[0], f"{at}.role", PARTICIPATION_SYSTEM, ACTOR_ROLES, "actor role")
        ref = actor.get("reference")
        ref = ref.get("reference") if isinstance(ref, Mapping) else None
        if not isinstance(ref, str):
            raise _fail(f"{at}.reference", "expected a literal reference such as Practitioner/<id>")
        kind_of, _, ident = ref.partition("/")
        if kind_of not in ACTOR_TYPES or not ident or "/" in ident:
            raise _fail(
                f"{at}.reference",
                f"{ref!r} is not an actor consent can name (expected {', '.join(sorted(ACTOR_TYPES))}/<id>)",
            )
        if actor_exists is not None and not actor_exists(ref):
            raise _fail(f"{at}.reference", f"{ref} is not a known actor")
        actors.add(ref)

    actions = {
        _code(c, f"{where}.action[{i}]", ACTION_SYSTEM, ACTION_COVERS, "consent action")
        for i, concept in enumerate(_list(node.get("action"), f"{where}.action"))
        for c in _codings(concept, f"{where}.action[{i}]")
    }
    purposes = {
        _code(c, f"{where}.purpose[{i}]", ACT_REASON_SYSTEM, PURPOSES, "purpose of use")
        for i, c in enumerate(_list(node.get("purpose"), f"{where}.purpose"))
    }
    classes = {
        _code(c, f"{where}.class[{i}]", RESOURCE_TYPES_SYSTEM, R4_RESOURCE_TYPES, "resource type")
        for i, c in enumerate(_list(node.get("class"), f"{where}.class"))
    }
    labels: set[str] = set()
    for i, c in enumerate(_list(node.get("securityLabel"), f"{where}.securityLabel")):
        at = f"{where}.securityLabel[{i}]"
        code = c.get("code") if isinstance(c, Mapping) else None
        label = normalize_label(code) if isinstance(c, Mapping) and c.get("system") == ACTCODE_SYSTEM else None
        if label is None:
            raise _fail(
                at,
                f"{code!r} is not a sensitivity label consent can name (expected a v3 ActCode: "
                f"{', '.join(sorted(LABELS))} or an alias such as MH)",
            )
        labels.add(label)
    period = _parse_period(node.get("period"), f"{where}.period")

    nested_nodes = _list(node.get("provision"), f"{where}.provision")
    nested = tuple(
        _parse_provision(child, f"{where}.provision[{i}]", kind, actor_exists) for i, child in enumerate(nested_nodes)
    )
    _check_siblings(nested, f"{where}.provision")
    return Provision(
        kind,
        frozenset(actors),
        frozenset(actions),
        frozenset(purposes),
        frozenset(classes),
        frozenset(labels),
        period,
        nested,
    )


def _overlap(a: frozenset[str], b: frozenset[str]) -> bool:
    return not a or not b or not a.isdisjoint(b)


def _covered_actions(actions: frozenset[str]) -> frozenset[str]:
    return frozenset().union(*(ACTION_COVERS[a] for a in actions)) if actions else frozenset()


def _contradict(a: Provision, b: Provision) -> bool:
    """Whether two provisions of opposite type can both apply to one request."""
    return (
        a.type != b.type
        and _overlap(a.actors, b.actors)
        and _overlap(_covered_actions(a.actions), _covered_actions(b.actions))
        and _overlap(covered_purposes(a.purposes) if a.purposes else frozenset(),
                     covered_purposes(b.purposes) if b.purposes else frozenset())
        and _overlap(a.classes, b.classes)
        and _overlap(a.labels, b.labels)
        and a.period.overlaps(b.period)
    )


def _check_siblings(siblings: tuple[Provision, ...], where: str) -> None:
    for i, a in enumerate(siblings):
        for j in range(i + 1, len(siblings)):
            if _contradict(a, siblings[j]):
                raise _fail(
                    f"{where}[{j}]",
                    f"contradicts {where}[{i}]: one permits and the other denies an overlapping "
                    "actor, action, purpose, data and period at the same level; nest the exception "
                    "inside the provision it narrows",
                )


def _coded(concept: Any, where: str, system: str, allowed: Iterable[str], what: str) -> str:
    codings = _codings(concept, where)
    for c in codings:
        if c.get("system") == system and c.get("code") in allowed:
            return c["code"]  # type: ignore[no-any-return]
    return _code(codings[0], f"{where}.coding[0]", system, allowed, what)


_INFERRED_PURPOSE: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {"research": frozenset({"HRESCH"}), "treatment": frozenset({"TREAT"})}
)


def parse_consent(resource: Mapping[str, Any], *, actor_exists: Callable[[str], bool] | None = None) -> ConsentRules:
    """Read a FHIR R4 Consent (JSON as a dict) into ``ConsentRules``, or raise ``InvalidInput``.

    ``actor_exists(ref)``, when given, is asked about every actor reference (``"Practitioner/p1"``);
    a False answer rejects the consent as a grant to an unknown actor. The caller does the lookup;
    this function does no I/O.
    """
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "Consent":
        raise _fail("Consent", "expected a Consent resource")
    if resource.get("modifierExtension"):
        raise _fail("Consent.modifierExtension", _UNSUPPORTED["modifierExtension"])
    consent_id = resource.get("id")
    if consent_id is not None and not isinstance(consent_id, str):
        raise _fail("Consent.id", "expected a string")
    status = resource.get("status")
    if status not in STATUSES:
        raise _fail("Consent.status", f"expected one of {', '.join(sorted(STATUSES))}, found {status!r}")
    if resource.get("scope") is None:
        raise _fail("Consent.scope", "required: patient-privacy, research or treatment")
    scope = _coded(resource["scope"], "Consent.scope", SCOPE_SYSTEM, SCOPES, "consent scope")
    patient = resource.get("patient")
    ref = patient.get("reference") if isinstance(patient, Mapping) else None
    kind, _, patient_id = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    if kind != "Patient" or not patient_id or "/" in patient_id:
        raise _fail("Consent.patient", "expected a literal reference Patient/<id>")
    policy_rule = None
    if resource.get("policyRule") is not None:
        policy_rule = _coded(resource["policyRule"], "Consent.policyRule", ACTCODE_SYSTEM, POLICY_RULES, "policy rule")
    if resource.get("provision") is None:
        raise _fail("Consent.provision", "a consent without a provision permits and denies nothing")
    root = _parse_provision(resource["provision"], "Consent.provision", None, actor_exists)
    if not root.purposes and scope in _INFERRED_PURPOSE:
        root = Provision(root.type, root.actors, root.actions, _INFERRED_PURPOSE[scope], root.classes,
                         root.labels, root.period, root.exceptions)
    return ConsentRules(consent_id, patient_id, scope, status, policy_rule, root)  # type: ignore[arg-type]


# -- canonical form and hash ----------------------------------------------------------------

_HASH_PREFIX: Final = b"teleledger/consent-provision/v1\n"
MIN_SALT_BYTES: Final = 16


def _instant(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical_provision(p: Provision) -> dict[str, Any]:
    nested = [_canonical_provision(e) for e in p.exceptions]
    nested.sort(key=_json)
    return {
        "type": p.type,
        "period": [_instant(p.period.start), _instant(p.period.end)],
        "actor": sorted(p.actors),
        "action": sorted(p.actions),
        "purpose": sorted(p.purposes),
        "class": sorted(p.classes),
        "securityLabel": sorted(p.labels),
        "provision": nested,
    }


def canonical_form(rules: ConsentRules) -> bytes:
    """The bytes ``provision_hash`` hashes (after its prefix), as defined in the module docstring."""
    return _json(
        {
            "patient": rules.patient_id,
            "policyRule": rules.policy_rule,
            "scope": rules.scope,
            "provision": _canonical_provision(rules.provision),
        }
    ).encode("utf-8")


def provision_hash(rules: ConsentRules, salt: bytes) -> bytes:
    """The 32-byte salted hash of ``rules`` that the chain's ConsentRegistry stores."""
    if not isinstance(salt, bytes | bytearray) or len(salt) < MIN_SALT_BYTES:
        raise InvalidInput(f"the provision-hash salt must be at least {MIN_SALT_BYTES} random bytes")
    return hmac.new(bytes(salt), _HASH_PREFIX + canonical_form(rules), sha256).digest()
