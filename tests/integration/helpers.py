"""Small helpers for the HTTP-level tests: tokens and resources."""

from __future__ import annotations

from typing import Any

FHIR = {"Content-Type": "application/fhir+json"}
SERVICE_SECRET = "service-secret-0123456789"


def token(client, username: str, password: str, scope: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    data = {"grant_type": "password", "username": username, "password": password}
    if scope:
        data["scope"] = scope
    r = client.post("/auth/token", data=data)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def service_headers(client, node, scope: str = "system/*.cruds") -> dict:  # type: ignore[no-untyped-def]
    if not getattr(node, "_test_client_made", False):
        node.accounts.create_client(client_id="svc", secret=SERVICE_SECRET, scopes="system/*.cruds")
        node._test_client_made = True
    r = client.post("/auth/token", data={"grant_type": "client_credentials", "client_id": "svc",
                                         "client_secret": SERVICE_SECRET, "scope": scope})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}", **FHIR}


def create(client, headers: dict, resource: dict[str, Any]) -> dict:  # type: ignore[no-untyped-def]
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**headers, **FHIR})
    assert r.status_code == 201, r.text
    return r.json()


def patient(family: str = "Doe", given: str = "Jane", birth: str = "1980-02-29", **extra: Any) -> dict:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], "gender": "female",
            "birthDate": birth, **extra}


def observation(patient_id: str, code: str = "8867-4", value: float = 72, when: str = "2024-03-01T10:00:00Z",
                unit: str = "/min") -> dict:
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
