"""Patient compartment membership (teleledger.fhir.compartment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleledger.fhir.compartment import (
    PATIENT_COMPARTMENT,
    PATIENT_COMPARTMENT_TYPES,
    compartment_params,
    patient_ids,
)
from teleledger.fhir.searchparams import params_for, supported_types

_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "samples" / "synthea-10",
    Path("/work/shared/fhir-samples/synthea-10"),
)


def synthea() -> list[dict]:
    base = next((p for p in _CANDIDATES if p.is_dir()), None)
    if base is None:
        pytest.skip("Synthea samples not found (samples/synthea-10)")
    out = []
    for path in sorted(base.glob("*.ndjson")):
        with path.open() as f:
            out += [json.loads(line) for line in f]
    return out


def ref(target: str) -> dict:
    return {"reference": target}


def test_a_patient_is_in_its_own_compartment():
    assert patient_ids({"resourceType": "Patient", "id": "p1"}) == {"p1"}
    assert patient_ids({"resourceType": "Patient"}) == frozenset()  # not stored yet: no id


def test_a_patient_that_links_to_another_is_also_in_the_other_compartment():
    linked = {"resourceType": "Patient", "id": "p2", "link": [{"other": ref("Patient/p1"), "type": "replaced-by"},
                                                              {"other": ref("RelatedPerson/r1"), "type": "seealso"}]}
    assert patient_ids(linked) == {"p1", "p2"}


def test_every_synthea_clinical_resource_belongs_to_exactly_its_subject_or_patient():
    checked = 0
    for r in synthea():
        rt = r["resourceType"]
        if rt not in PATIENT_COMPARTMENT_TYPES or rt == "Patient":
            continue
        owner = (r.get("subject") or r.get("patient"))["reference"]
        assert owner.startswith("Patient/")
        assert patient_ids(r) == {owner.removeprefix("Patient/")}, (rt, r["id"])
        checked += 1
    assert checked > 6900  # all of Encounter, Condition, Procedure, MedicationRequest, DocumentReference, …


def test_every_synthea_patient_is_in_its_own_compartment_only():
    patients = [r for r in synthea() if r["resourceType"] == "Patient"]
    assert len(patients) == 13
    assert all(patient_ids(p) == {p["id"]} for p in patients)


def test_directory_resources_are_in_no_patient_compartment():
    for r in synthea():
        if r["resourceType"] in ("Practitioner", "PractitionerRole", "Organization", "Location"):
            assert patient_ids(r) == frozenset()
    for rt in ("Practitioner", "PractitionerRole", "Organization", "Location", "Medication", "Slot", "ResearchStudy"):
        assert rt not in PATIENT_COMPARTMENT_TYPES and compartment_params(rt) == ()


def test_an_observation_is_in_the_compartments_of_its_subject_and_of_a_patient_performer():
    obs = {"resourceType": "Observation", "subject": ref("Patient/p1"),
           "performer": [ref("Patient/p2"), ref("Practitioner/d1")]}
    assert patient_ids(obs) == {"p1", "p2"}
    assert patient_ids({"resourceType": "Observation", "subject": ref("Group/g1")}) == frozenset()


def test_an_audit_event_belongs_to_the_patient_entity_the_balp_way():
    event = {"resourceType": "AuditEvent",
             "agent": [{"who": ref("Patient/reader")}, {"who": ref("Practitioner/d1")}],
             "entity": [{"what": ref("Patient/p1")}, {"what": ref("Observation/o1")}]}
    assert patient_ids(event) == {"p1"}


def test_an_appointment_belongs_to_each_patient_actor():
    appt = {"resourceType": "Appointment", "participant": [
        {"actor": ref("Patient/p1")}, {"actor": ref("Patient/p2")}, {"actor": ref("Practitioner/d1")}]}
    assert patient_ids(appt) == {"p1", "p2"}


def test_a_message_belongs_to_its_subject_sender_and_recipients():
    msg = {"resourceType": "Communication", "subject": ref("Patient/p1"), "sender": ref("Patient/p2"),
           "recipient": [ref("Patient/p3"), ref("Practitioner/d1")]}
    assert patient_ids(msg) == {"p1", "p2", "p3"}


def test_a_claim_belongs_to_its_patient_and_a_patient_payee():
    claim = {"resourceType": "Claim", "patient": ref("Patient/p1"), "payee": {"party": ref("Patient/p2")}}
    assert patient_ids(claim) == {"p1", "p2"}


def test_consent_research_subject_coverage_and_provenance_belong_to_their_patient():
    assert patient_ids({"resourceType": "Consent", "patient": ref("Patient/p1")}) == {"p1"}
    assert patient_ids({"resourceType": "ResearchSubject", "individual": ref("Patient/p1")}) == {"p1"}
    assert patient_ids({"resourceType": "Coverage", "beneficiary": ref("Patient/p1"),
                        "subscriber": ref("RelatedPerson/r1"), "payor": [ref("Organization/o1")]}) == {"p1"}
    assert patient_ids({"resourceType": "Provenance", "target": [ref("Patient/p1"), ref("Observation/o1")]}) == {"p1"}


def test_a_device_of_a_patient_is_in_that_patient_compartment():
    assert patient_ids({"resourceType": "Device", "patient": ref("Patient/p1")}) == {"p1"}


def test_unresolved_references_put_a_resource_in_no_compartment():
    for target in ("Patient?identifier=urn:x|1", "urn:uuid:0c3a5b0e-1a3d-4a43-9cf3-2b1b8f0c6f11", "#p1"):
        assert patient_ids({"resourceType": "Encounter", "subject": ref(target)}) == frozenset()


def test_an_absolute_or_versioned_patient_reference_counts():
    assert patient_ids({"resourceType": "Encounter", "subject": ref("https://fhir.example.org/Patient/p1")}) == {"p1"}
    assert patient_ids({"resourceType": "Encounter", "subject": ref("Patient/p1/_history/3")}) == {"p1"}


def test_a_type_outside_the_compartment_definition_is_in_no_compartment():
    assert patient_ids({"resourceType": "Basic", "subject": ref("Patient/p1")}) == frozenset()
    assert patient_ids({}) == frozenset()


def test_every_compartment_parameter_is_a_reference_parameter_that_can_point_to_a_patient():
    for rt in PATIENT_COMPARTMENT_TYPES:
        names = compartment_params(rt)
        assert names
        for name in names:
            param = params_for(rt)[name]
            assert param.type == "reference" and (not param.targets or "Patient" in param.targets), (rt, name)


def test_the_compartment_types_are_sorted_supported_types():
    assert list(PATIENT_COMPARTMENT_TYPES) == sorted(PATIENT_COMPARTMENT_TYPES)
    assert set(PATIENT_COMPARTMENT_TYPES) <= set(supported_types())
    assert {"Patient", "Encounter", "Observation", "AuditEvent", "Consent", "Communication"} <= set(PATIENT_COMPARTMENT_TYPES)


def test_compartment_params_follow_the_r4_definition():
    assert compartment_params("Observation") == ("subject", "performer")
    assert compartment_params("Encounter") == ("patient",)
    assert compartment_params("Coverage") == ("policy-holder", "subscriber", "beneficiary", "payor")
    assert compartment_params("Patient") == ("link",)
