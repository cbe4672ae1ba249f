"""The fast dispatcher for instance interactions answers exactly what the router would."""

from __future__ import annotations

from tests.integration.helpers import create, patient, service_headers


def test_paths_that_look_like_instances_but_are_not_reach_the_router(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    hist = client.get("/fhir/Patient/_history", headers=h)
    assert hist.status_code == 200 and hist.json()["type"] == "history"
    meta = client.get("/fhir/metadata")
    assert meta.status_code == 200 and meta.json()["resourceType"] == "CapabilityStatement"
    found = client.post("/fhir/Patient/_search", data={"_id": p["id"]}, headers={"Authorization": h["Authorization"]})
    assert found.status_code == 200 and found.json()["total"] == 1
    ev = client.get(f"/fhir/Patient/{p['id']}/$everything", headers=h)
    assert ev.status_code == 200 and ev.json()["type"] == "searchset"
    inst_hist = client.get(f"/fhir/Patient/{p['id']}/_history", headers=h)
    assert inst_hist.status_code == 200 and inst_hist.json()["total"] == 1


def test_the_dispatcher_keeps_the_routers_errors_and_headers(client, node):
    h = service_headers(client, node)
    p = create(client, h, patient())
    r = client.get(f"/fhir/Patient/{p['id']}")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["resourceType"] == "OperationOutcome"
    r = client.get(f"/fhir/Patient/{p['id']}", headers=h)
    assert r.status_code == 200 and r.headers["etag"] == 'W/"1"' and "last-modified" in r.headers
    r = client.get("/fhir/Spaceship/1", headers=h)
    assert r.status_code == 404 and r.json()["issue"][0]["code"] == "not-found"
    r = client.post("/fhir/Patient", content=b"{not json", headers=h)
    assert r.status_code == 400 and "malformed JSON" in r.json()["issue"][0]["diagnostics"]
    r = client.delete("/fhir/Patient", headers=h)
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
