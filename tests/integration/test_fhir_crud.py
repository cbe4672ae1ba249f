"""FHIR instance interactions over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.integration.helpers import FHIR, create, patient, service_headers


def test_metadata_lists_supported_types_and_search_parameters_without_a_token(client):
    r = client.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    types = {res["type"]: res for res in cs["rest"][0]["resource"]}
    for rt in ("Patient", "Encounter", "Observation", "MedicationRequest", "Claim", "ResearchSubject", "AuditEvent"):
        assert rt in types
    names = {p["name"] for p in types["Patient"]["searchParam"]}
    assert {"identifier", "name", "family", "given", "birthdate", "gender", "telecom", "_id", "_lastUpdated"} <= names
    assert {"patient", "code", "category", "date", "value-quantity"} <= {p["name"] for p in types["Observation"]["searchParam"]}
    assert types["Patient"]["operation"][0]["name"] == "everything"


def test_create_assigns_an_id_and_read_returns_the_same_resource(client, node):
    h = service_headers(client, node)
    r = client.post("/fhir/Patient", json={**patient(), "id": "client-chosen"}, headers=h)
    assert r.status_code == 201
    body = r.json()
    assert body["id"] != "client-chosen" and body["meta"]["versionId"] == "1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    got = client.get(f"/fhir/Patient/{body['id']}", headers=h)
    assert got.status_code == 200 and got.json() == body


def test_update_with_current_if_match_makes_a_new_version_and_vread_keeps_the_old(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    changed = {**p, "gender": "other"}
    r = client.put(f"/fhir/Patient/{p['id']}", json=changed, headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    stale = client.put(f"/fhir/Patient/{p['id']}", json={**p, "gender": "male"}, headers={**h, "If-Match": 'W/"1"'})
    assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Patient/{p['id']}", headers=h).json()["gender"] == "other"
    v1 = client.get(f"/fhir/Patient/{p['id']}/_history/1", headers=h)
    assert v1.status_code == 200 and v1.json()["gender"] == "female"
    assert client.get(f"/fhir/Patient/{p['id']}/_history/9", headers=h).status_code == 404


def test_update_of_an_unknown_id_creates_it(client, node):
    h = service_headers(client, node)
    r = client.put("/fhir/Organization/org-1", json={"resourceType": "Organization", "id": "org-1", "name": "Clinic"},
                   headers=h)
    assert r.status_code == 201 and r.json()["id"] == "org-1"


def test_delete_makes_reads_gone_and_history_keeps_every_version(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    client.put(f"/fhir/Patient/{p['id']}", json={**p, "active": True}, headers=h)
    assert client.delete(f"/fhir/Patient/{p['id']}", headers=h).status_code == 204
    r = client.get(f"/fhir/Patient/{p['id']}", headers=h)
    assert r.status_code == 410 and r.json()["issue"][0]["code"] == "deleted"
    hist = client.get(f"/fhir/Patient/{p['id']}/_history", headers=h).json()
    assert hist["type"] == "history" and hist["total"] == 3
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT", "POST"]
    # a deleted resource is gone from search
    assert client.get(f"/fhir/Patient?_id={p['id']}", headers=h).json()["total"] == 0
    # deleting again is idempotent
    assert client.delete(f"/fhir/Patient/{p['id']}", headers=h).status_code == 204


def test_conditional_create_returns_the_existing_match_instead_of_a_duplicate(client, node):
    h = service_headers(client, node)
    ident = {"system": "http://hospital.example/mrn", "value": "MRN-77"}
    first = client.post("/fhir/Patient", json=patient(identifier=[ident]),
                        headers={**h, "If-None-Exist": "identifier=http://hospital.example/mrn|MRN-77"})
    second = client.post("/fhir/Patient", json=patient(identifier=[ident]),
                         headers={**h, "If-None-Exist": "identifier=http://hospital.example/mrn|MRN-77"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert client.get("/fhir/Patient?identifier=MRN-77", headers=h).json()["total"] == 1


def test_type_history_lists_changes_across_resources(client, node):
    h = service_headers(client, node)
    a = create(client, h, patient(family="A"))
    create(client, h, patient(family="B"))
    client.put(f"/fhir/Patient/{a['id']}", json={**a, "active": False}, headers=h)
    hist = client.get("/fhir/Patient/_history?_count=2", headers=h).json()
    assert hist["total"] == 3 and len(hist["entry"]) == 2
    assert any(link["relation"] == "next" for link in hist["link"])


def test_patient_everything_returns_the_compartment(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    other = create(client, h, patient(family="Other"))
    enc = create(client, h, {"resourceType": "Encounter", "status": "finished",
                             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
                             "subject": {"reference": f"Patient/{p['id']}"}})
    create(client, h, {"resourceType": "Encounter", "status": "finished",
                       "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                       "subject": {"reference": f"Patient/{other['id']}"}})
    r = client.get(f"/fhir/Patient/{p['id']}/$everything", headers=h)
    assert r.status_code == 200
    ids = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in r.json()["entry"]}
    assert ids == {("Patient", p["id"]), ("Encounter", enc["id"])}


def test_responses_are_fhir_json(client, node):
    h = service_headers(client, node)
    r = client.get("/fhir/Patient", headers=h)
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert r.json()["type"] == "searchset"
    assert FHIR["Content-Type"] == "application/fhir+json"
