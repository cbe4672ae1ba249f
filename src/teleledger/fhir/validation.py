"""Validate incoming resources with the ``fhir.resources`` models.

``fhir.resources`` 8 ships FHIR R4B models; R4B differs from R4 only in a few resource types
that teleledger does not use for clinical data (e.g. SubscriptionTopic, the medication
definition resources), so R4 payloads parse unchanged. The models check structure, cardinality
and primitive formats (dates, ids, decimals); they do not check code bindings, so the
*required* bindings clients get wrong most often are checked here (``REQUIRED_CODES``).

We validate, but we store the client's JSON as sent (plus ``id``/``meta``), never a model
re-serialisation: that would rewrite numbers and drop nothing the client can see otherwise.
"""

from __future__ import annotations

import re
from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from teleledger.core.errors import InvalidInput

# FHIR R4 id datatype (https://hl7.org/fhir/R4/datatypes.html#id)
ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")

# (resource type, element) → allowed codes, for required bindings of R4 (value sets from the spec)
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Practitioner", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("RelatedPerson", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Observation", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    ("Encounter", "status"): frozenset(
        {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
    ),
    ("MedicationRequest", "status"): frozenset(
        {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"}
    ),
    ("MedicationRequest", "intent"): frozenset(
        {"proposal", "plan", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"}
    ),
    ("Appointment", "status"): frozenset(
        {"proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow", "entered-in-error",
         "checked-in", "waitlist"}
    ),
    ("Slot", "status"): frozenset({"busy", "free", "busy-unavailable", "busy-tentative", "entered-in-error"}),
    ("Consent", "status"): frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}),
    ("Claim", "status"): frozenset({"active", "cancelled", "draft", "entered-in-error"}),
    ("Communication", "status"): frozenset(
        {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"}
    ),
    ("DocumentReference", "status"): frozenset({"current", "superseded", "entered-in-error"}),
}


@lru_cache(maxsize=256)
def model_class(resource_type: str):  # type: ignore[no-untyped-def]
    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError):
        return None


def is_resource_type(name: str) -> bool:
    cls = model_class(name)
    return cls is not None and "resourceType" in getattr(cls, "model_fields", {}) or (
        cls is not None and hasattr(cls, "get_resource_type")
    )


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(resource: object, *, expected_type: str | None = None, raw: bytes | None = None) -> str:
    """Check a parsed JSON resource; returns its type. Raises ``InvalidInput`` naming the element.

    ``raw``, when given, is the JSON text ``resource`` was parsed from: validating the text is
    about twice as fast as validating the dict (the import path has it).
    """
    if not isinstance(resource, dict):
        raise InvalidInput("the body must be a JSON object (a FHIR resource)")
    rt = resource.get("resourceType")
    if not isinstance(rt, str) or not rt:
        raise InvalidInput("the resource has no resourceType")
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_PATTERN.fullmatch(rid)):
        raise InvalidInput(f"{rt}.id must be 1–64 letters, digits, '-' or '.'", expression=f"{rt}.id")
    if expected_type is not None and rt != expected_type:
        raise InvalidInput(f"resourceType {rt!r} in the body does not match {expected_type!r} in the URL")
    cls = model_class(rt)
    if cls is None:
        raise InvalidInput(f"unknown resource type {rt!r}")
    try:
        if raw is not None:
            cls.model_validate_json(raw)
        else:
            cls.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"{rt}.{_location(first['loc'])}" if first.get("loc") else rt
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InvalidInput(f"{where}: {msg}{more}", expression=where) from None
    except RecursionError:
        raise InvalidInput(f"{rt}: the resource is nested too deeply to be valid FHIR") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{rt}: {exc.__class__.__name__} while validating") from None
    for (typ, element), allowed in REQUIRED_CODES.items():
        if typ == rt and element in resource and resource[element] not in allowed:
            raise InvalidInput(
                f"{rt}.{element}: {resource[element]!r} is not a code of the required value set "
                f"({', '.join(sorted(allowed))})",
                expression=f"{rt}.{element}",
            )
    return rt
