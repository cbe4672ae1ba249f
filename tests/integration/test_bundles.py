"""Batch and transaction Bundles: atomicity, urn:uuid rewriting, conditional references."""

from __future__ import annotations

from tests.integration.helpers import create, patient, service_headers

NPI = "http://hl7.org/fhir/sid/us-npi"


def transaction(*entries: dict, kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict, full_url: str | None = None) -> dict:
    e: dict = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        e["fullUrl"] = full_url
    return e


def total(client, h, query: str) -> int:  # type: ignore[no-untyped-def]
    return client.get(f"/fhir/{query}", headers=h).json()["total"]


def test_transaction_rewrites_urn_uuid_and_conditional_references(client, node):
    h = service_headers(client, node)
    prac = create(client, h, {"resourceType": "Practitioner", "identifier": [{"system": NPI, "value": "999"}]})
    bundle = transaction(
        post(patient(), "urn:uuid:11111111-1111-1111-1111-111111111111"),
        post({"resourceType": "Encounter", "status": "finished",
              "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
              "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
              "participant": [{"individual": {"reference": f"Practitioner?identifier={NPI}|999"}}]}),
    )
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["type"] == "transaction-response"
    assert [e["response"]["status"] for e in resp["entry"]] == ["201 Created", "201 Created"]
    pid = resp["entry"][0]["resource"]["id"]
    enc = resp["entry"][1]["resource"]
    assert enc["subject"]["reference"] == f"Patient/{pid}"
    assert enc["participant"][0]["individual"]["reference"] == f"Practitioner/{prac['id']}"
    assert total(client, h, f"Encounter?patient={pid}") == 1


def test_a_transaction_with_one_failing_entry_stores_nothing(client, node):
    h = service_headers(client, node)
    before = total(client, h, "Patient")
    bundle = transaction(
        post(patient(family="Good")),
        post({"resourceType": "Patient", "birthDate": "not-a-date"}),
    )
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 400
    assert "entry[1]" in r.json()["issue"][0]["diagnostics"]
    assert total(client, h, "Patient") == before


def test_a_conditional_reference_that_matches_nothing_fails_the_transaction(client, node):
    h = service_headers(client, node)
    bundle = transaction(post({"resourceType": "Encounter", "status": "finished",
                               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                               "participant": [{"individual": {"reference": f"Practitioner?identifier={NPI}|nobody"}}]}))
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 412
    assert total(client, h, "Encounter") == 0


def test_transaction_put_delete_and_get_entries(client, node):
    h = service_headers(client, node)
    keep = create(client, h, patient(family="Keep"))
    drop = create(client, h, patient(family="Drop"))
    bundle = transaction(
        {"resource": {**keep, "active": True}, "request": {"method": "PUT", "url": f"Patient/{keep['id']}",
                                                            "ifMatch": 'W/"1"'}},
        {"request": {"method": "DELETE", "url": f"Patient/{drop['id']}"}},
        {"request": {"method": "GET", "url": f"Patient/{keep['id']}"}},
    )
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["200 OK", "204 No Content", "200 OK"]
    assert client.get(f"/fhir/Patient/{drop['id']}", headers=h).status_code == 410


def test_a_stale_if_match_inside_a_transaction_rolls_back_everything(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    before = total(client, h, "Patient")
    bundle = transaction(post(patient(family="New")),
                         {"resource": p, "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"7"'}})
    assert client.post("/fhir", json=bundle, headers=h).status_code == 412
    assert total(client, h, "Patient") == before


def test_a_batch_reports_each_entry_on_its_own(client, node):
    h = service_headers(client, node)
    bundle = transaction(post(patient(family="Ok")), post({"resourceType": "Patient", "gender": "robot"}),
                         {"request": {"method": "GET", "url": "Patient?family=ok"}}, kind="batch")
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 200
    entries = r.json()["entry"]
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"]["status"] == "400"
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert entries[2]["resource"]["total"] == 1


def test_a_bundle_of_the_wrong_type_is_refused(client, node):
    h = service_headers(client, node)
    r = client.post("/fhir", json={"resourceType": "Bundle", "type": "collection", "entry": []}, headers=h)
    assert r.status_code == 400
    r = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                   "entry": [{"resource": patient()}]}, headers=h)
    assert r.status_code == 400 and "request" in r.json()["issue"][0]["diagnostics"]
