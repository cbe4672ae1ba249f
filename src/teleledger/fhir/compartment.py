"""Patient compartment membership (https://hl7.org/fhir/R4/compartmentdefinition-patient.html).

A resource is in the compartment of Patient/X when one of the search parameters the
CompartmentDefinition names for its type refers to Patient/X; a Patient is in its own
compartment (and, through ``link``, in the compartment of the patient it links to). Access
decisions and per-patient encryption keys hang off this answer, so it is computed from the
same extraction as the search index (``searchparams.extract_param``): what search finds and
what the compartment contains cannot drift apart.

Only literal references count: conditional references (``Patient?identifier=…``) and
``urn:uuid:`` ones must have been resolved by the Bundle/transaction logic before a resource
is stored, or the resource is in no patient's compartment.

One deliberate deviation from R4: ``Device`` (param ``patient``) is in the compartment. R4 gives
Device a compartment of its own, but a Device with a ``patient`` is that patient's implant or
meter (US Core implantable device), and the store treats types outside the compartment as
data anyone may read.

Pure core: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from teleledger.fhir.searchparams import ReferenceEntry, extract_param, params_for

__all__ = ["PATIENT_COMPARTMENT", "PATIENT_COMPARTMENT_TYPES", "compartment_params", "patient_ids"]

#: resource type → the search parameters that put it in a patient's compartment (R4 definition,
#: restricted to the types teleledger supports, plus Device)
PATIENT_COMPARTMENT: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "AllergyIntolerance": ("patient", "recorder", "asserter"),
        "Appointment": ("actor",),
        "AuditEvent": ("patient",),
        "CareTeam": ("patient", "participant"),
        "Claim": ("patient", "payee"),
        "Communication": ("subject", "sender", "recipient"),
        "Composition": ("subject", "author", "attester"),
        "Condition": ("patient", "asserter"),
        "Consent": ("patient",),
        "Coverage": ("policy-holder", "subscriber", "beneficiary", "payor"),
        "Device": ("patient",),
        "DiagnosticReport": ("subject",),
        "DocumentReference": ("subject", "author"),
        "Encounter": ("patient",),
        "ExplanationOfBenefit": ("patient", "payee"),
        "Immunization": ("patient",),
        "MedicationDispense": ("subject", "patient", "receiver"),
        "MedicationRequest": ("subject",),
        "Observation": ("subject", "performer"),
        "Patient": ("link",),
        "Procedure": ("patient", "performer"),
        "Provenance": ("patient",),
        "RelatedPerson": ("patient",),
        "ResearchSubject": ("individual",),
        "Schedule": ("actor",),
    }
)

#: the types whose instances can belong to a patient, sorted
PATIENT_COMPARTMENT_TYPES: tuple[str, ...] = tuple(sorted(PATIENT_COMPARTMENT))

_PARAMS = {rt: tuple(params_for(rt)[name] for name in names) for rt, names in PATIENT_COMPARTMENT.items()}


def compartment_params(resource_type: str) -> tuple[str, ...]:
    """The search parameters that link ``resource_type`` to a patient (``()`` if it never is in a compartment).

    For ``Patient`` this is ``("link",)``: a Patient is also in its own compartment by ``_id``.
    """
    return PATIENT_COMPARTMENT.get(resource_type, ())


def patient_ids(resource: dict) -> frozenset[str]:
    """Ids of the Patients whose compartment contains ``resource`` (empty if none)."""
    rt = resource.get("resourceType")
    params = _PARAMS.get(rt)  # type: ignore[arg-type]
    if params is None:
        return frozenset()
    ids: set[str] = set()
    if rt == "Patient" and isinstance(resource.get("id"), str):
        ids.add(resource["id"])
    for param in params:
        for entry in extract_param(resource, param):
            if isinstance(entry, ReferenceEntry) and entry.type == "Patient":
                ids.add(entry.id)
    return frozenset(ids)
