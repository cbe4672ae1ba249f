"""Bad requests get a precise error, an OperationOutcome, never a 500, and change nothing.

Each rejected write is checked against storage itself (rows in ``resources`` and
``resource_versions``), not only against what the API says, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import random
from datetime import datetime, timedelta, timezone

import jwt
import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from teleledger.identity.scopes import ScopeSet
from teleledger.identity.tokens import TokenIssuer
from teleledger.storage import tables as t
from tests.conftest import database_url, make_settings
from tests.integration.helpers import FHIR, create, observation, patient, service_headers

PASSWORD = "correct horse 1"


def stored(node) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(resources, resource versions) rows: any write, even a delete, shows up in one of them."""
    with node.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(t.resources)).scalar_one(),
                conn.execute(select(func.count()).select_from(t.resource_versions)).scalar_one())


def assert_outcome(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code and body["issue"][0]["severity"] == "error"
    return body


def diagnostics(r) -> str:  # type: ignore[no-untyped-def]
    return r.json()["issue"][0]["diagnostics"]


@pytest.fixture
def svc(client, node) -> dict:  # type: ignore[no-untyped-def]
    return service_headers(client, node)


@pytest.fixture
def existing(client, svc) -> dict:  # type: ignore[no-untyped-def]
    return create(client, svc, patient(family="Existing"))


def raw_post(client, path: str, body: bytes, headers: dict, **more: str):  # type: ignore[no-untyped-def]
    return client.post(path, content=body, headers={**headers, **more})


# ---- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b'{"resourceType": "Patient",', b"{'resourceType': 'Patient'}", b"\xff\xfe\x00",
                                  b"not json at all"])
def test_malformed_json_is_400_and_stores_nothing(client, node, svc, body):
    before = stored(node)
    r = raw_post(client, "/fhir/Patient", body, svc)
    assert_outcome(r, 400, "invalid")
    assert "malformed JSON" in diagnostics(r)
    assert stored(node) == before


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"Patient"', b"42"])
def test_an_empty_body_or_a_json_value_that_is_not_an_object_is_400(client, node, svc, body):
    before = stored(node)
    assert_outcome(raw_post(client, "/fhir/Patient", body, svc), 400, "invalid")
    assert stored(node) == before


def test_a_body_whose_resource_type_disagrees_with_the_url_is_400_on_create_and_update(client, node, svc, existing):
    before = stored(node)
    r = client.post("/fhir/Patient", json=observation(existing["id"]), headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "'Observation'" in diagnostics(r) and "'Patient'" in diagnostics(r)
    obs = {**observation(existing["id"]), "id": existing["id"]}
    assert_outcome(client.put(f"/fhir/Patient/{existing['id']}", json=obs, headers=svc), 400, "invalid")
    assert stored(node) == before


def test_a_body_whose_id_disagrees_with_the_url_is_400_and_the_resource_is_unchanged(client, node, svc, existing):
    before = stored(node)
    r = client.put(f"/fhir/Patient/{existing['id']}", json={**existing, "id": "someone-else", "gender": "male"},
                   headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "someone-else" in diagnostics(r)
    no_id = {k: v for k, v in existing.items() if k != "id"}
    assert_outcome(client.put(f"/fhir/Patient/{existing['id']}", json=no_id, headers=svc), 400, "invalid")
    assert stored(node) == before
    assert client.get(f"/fhir/Patient/{existing['id']}", headers=svc).json() == existing


@pytest.mark.parametrize("method", ["get", "post"])
def test_an_unknown_resource_type_in_the_url_is_404(client, node, svc, method):
    before = stored(node)
    kwargs = {"json": {"resourceType": "Spaceship"}} if method == "post" else {}
    r = getattr(client, method)("/fhir/Spaceship", headers=svc, **kwargs)
    assert_outcome(r, 404, "not-found")
    assert "Spaceship" in diagnostics(r)
    assert_outcome(client.get("/fhir/Spaceship/1", headers=svc), 404, "not-found")
    assert stored(node) == before


def test_an_unknown_resource_type_in_a_body_is_400(client, node, svc):
    before = stored(node)
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Spaceship"}, headers=svc), 400, "invalid")
    assert_outcome(client.post("/fhir/Patient", json={"name": [{"family": "NoType"}]}, headers=svc), 400, "invalid")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Spaceship"},
         "request": {"method": "POST", "url": "Spaceship"}}]}
    r = client.post("/fhir", json=bundle, headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "Spaceship" in diagnostics(r)
    spaceship = {**bundle["entry"][0], "request": {"method": "POST", "url": "Patient"}}
    batch = {**bundle, "type": "batch", "entry": [spaceship]}
    r = client.post("/fhir", json=batch, headers=svc)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["entry"]
    assert entry["response"]["status"] == "400"
    assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert stored(node) == before


def test_an_invalid_birth_date_is_400_naming_the_element(client, node, svc, existing):
    before = stored(node)
    r = client.post("/fhir/Patient", json=patient(birth="1990-13-45"), headers=svc)
    body = assert_outcome(r, 400, "invalid")
    assert "Patient.birthDate" in diagnostics(r)
    assert body["issue"][0]["expression"] == ["Patient.birthDate"]
    r = client.put(f"/fhir/Patient/{existing['id']}", json={**existing, "birthDate": "1990-13-45"}, headers=svc)
    assert_outcome(r, 400, "invalid")
    assert stored(node) == before


def test_an_invalid_gender_code_is_400_naming_the_element(client, node, svc):
    before = stored(node)
    r = client.post("/fhir/Patient", json={**patient(), "gender": "xyz"}, headers=svc)
    body = assert_outcome(r, 400, "invalid")
    assert "Patient.gender" in diagnostics(r) and "'xyz'" in diagnostics(r)
    assert body["issue"][0]["expression"] == ["Patient.gender"]
    assert stored(node) == before


def test_an_invalid_element_deep_inside_a_resource_is_400_naming_its_path(client, node, svc, existing):
    before = stored(node)
    bad = {**observation(existing["id"]), "effectiveDateTime": "yesterday"}
    r = client.post("/fhir/Observation", json=bad, headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "Observation.effectiveDateTime" in diagnostics(r)
    r = client.post("/fhir/Patient", json={**patient(), "name": "not a list"}, headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "Patient.name" in diagnostics(r)
    assert stored(node) == before


def test_a_body_in_an_unsupported_content_type_is_400(client, node, svc):
    before = stored(node)
    r = raw_post(client, "/fhir/Patient", orjson.dumps(patient()), svc, **{"Content-Type": "application/xml"})
    assert_outcome(r, 400, "invalid")
    assert stored(node) == before


# ---- the body size limit -------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, backend):  # type: ignore[no-untyped-def]
    """A node that accepts bodies of at most 2048 bytes, and a client on it."""
    from teleledger.bootstrap import build
    from teleledger.web.app import create_app

    node = build(make_settings(tmp_path, database_url(backend, tmp_path), max_body_bytes=2048))
    with TestClient(create_app(node), raise_server_exceptions=False) as c:
        yield node, c
    node.close()


def test_a_body_over_the_configured_limit_is_413_and_stores_nothing(small):
    node, client = small
    svc = service_headers(client, node)
    fits = patient(family="F" * 100)
    assert client.post("/fhir/Patient", json=fits, headers=svc).status_code == 201
    before = stored(node)
    big = orjson.dumps(patient(family="F" * 3000))
    r = raw_post(client, "/fhir/Patient", big, svc)
    assert_outcome(r, 413, "too-costly")
    assert "2048" in diagnostics(r)

    def chunks():  # no Content-Length: the limit must hold while streaming too
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    assert_outcome(client.post("/fhir/Patient", content=chunks(), headers=svc), 413, "too-costly")
    bundle = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(family="F" * 3000), "request": {"method": "POST", "url": "Patient"}}]})
    assert_outcome(raw_post(client, "/fhir", bundle, svc), 413, "too-costly")
    assert stored(node) == before


def test_a_body_over_the_default_8_mib_limit_is_413(client, node, svc):
    before = stored(node)
    big = b'{"resourceType":"Patient","name":[{"family":"' + b"x" * (8 * 1024 * 1024) + b'"}]}'
    assert_outcome(raw_post(client, "/fhir/Patient", big, svc), 413, "too-costly")
    assert stored(node) == before


# ---- versions and transactions ------------------------------------------------------------------


def test_a_stale_if_match_is_412_and_the_version_is_unchanged(client, node, svc, existing):
    url = f"/fhir/Patient/{existing['id']}"
    v2 = client.put(url, json={**existing, "gender": "other"}, headers={**svc, "If-Match": 'W/"1"'})
    assert v2.status_code == 200 and v2.json()["meta"]["versionId"] == "2"
    before = stored(node)
    r = client.put(url, json={**existing, "gender": "male"}, headers={**svc, "If-Match": 'W/"1"'})
    assert_outcome(r, 412, "conflict")
    assert stored(node) == before
    now = client.get(url, headers=svc)
    assert now.json()["meta"]["versionId"] == "2" and now.json()["gender"] == "other"
    assert now.headers["etag"] == 'W/"2"'
    assert client.get(f"{url}/_history", headers=svc).json()["total"] == 2


def test_an_if_match_that_is_not_a_version_etag_is_400(client, node, svc, existing):
    before = stored(node)
    r = client.put(f"/fhir/Patient/{existing['id']}", json=existing, headers={**svc, "If-Match": "yesterday"})
    assert_outcome(r, 400, "invalid")
    assert stored(node) == before


def _transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def test_a_transaction_with_one_invalid_entry_stores_nothing_from_any_entry(client, node, svc, existing):
    before = stored(node)
    patients_before = client.get("/fhir/Patient?_summary=count", headers=svc).json()["total"]
    bundle = _transaction(
        {"fullUrl": "urn:uuid:p1", "resource": patient(family="First"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:o1", "resource": {**observation("x"), "subject": {"reference": "urn:uuid:p1"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {**existing, "gender": "other"}, "request": {"method": "PUT", "url": f"Patient/{existing['id']}"}},
        {"request": {"method": "DELETE", "url": f"Patient/{existing['id']}"}},
        {"resource": {**patient(family="Broken"), "gender": "xyz"}, "request": {"method": "POST", "url": "Patient"}},
    )
    r = client.post("/fhir", json=bundle, headers=svc)
    assert_outcome(r, 400, "invalid")
    assert "Bundle.entry[4]" in diagnostics(r) and "Patient.gender" in diagnostics(r)
    assert stored(node) == before
    assert client.get("/fhir/Patient?_summary=count", headers=svc).json()["total"] == patients_before
    assert client.get("/fhir/Observation?_summary=count", headers=svc).json()["total"] == 0
    assert client.get(f"/fhir/Patient/{existing['id']}", headers=svc).json() == existing


def test_a_transaction_with_a_stale_if_match_stores_nothing(client, node, svc, existing):
    before = stored(node)
    bundle = _transaction(
        {"resource": patient(family="Second"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**existing, "gender": "other"},
         "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"7"'}},
    )
    assert_outcome(client.post("/fhir", json=bundle, headers=svc), 412, "conflict")
    assert stored(node) == before


def test_a_transaction_referring_to_an_unknown_urn_or_with_a_bad_entry_stores_nothing(client, node, svc):
    before = stored(node)
    dangling = _transaction(
        {"fullUrl": "urn:uuid:p1", "resource": patient(), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**observation("x"), "subject": {"reference": "urn:uuid:nobody"}},
         "request": {"method": "POST", "url": "Observation"}},
    )
    assert_outcome(client.post("/fhir", json=dangling, headers=svc), 400, "invalid")
    no_request = _transaction({"resource": patient()})
    assert_outcome(client.post("/fhir", json=no_request, headers=svc), 400, "invalid")
    not_a_bundle = patient()
    assert_outcome(client.post("/fhir", json=not_a_bundle, headers=svc), 400, "invalid")
    collection = {**_transaction(), "type": "collection"}
    assert_outcome(client.post("/fhir", json=collection, headers=svc), 400, "invalid")
    assert stored(node) == before


# ---- tokens -------------------------------------------------------------------------------------


def _claims_of(headers: dict) -> dict:
    return jwt.decode(headers["Authorization"].removeprefix("Bearer "), options={"verify_signature": False})


def _assert_401(r) -> None:  # type: ignore[no-untyped-def]
    assert_outcome(r, 401, "login")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_no_token_or_a_non_bearer_scheme_is_401_with_a_challenge(client, node, svc, existing):
    before = stored(node)
    url = f"/fhir/Patient/{existing['id']}"
    _assert_401(client.get(url))
    _assert_401(client.get(url, headers={"Authorization": "Bearer "}))
    _assert_401(client.get(url, headers={"Authorization": "Basic " + base64.b64encode(b"svc:secret").decode()}))
    _assert_401(client.post("/fhir/Patient", json=patient()))
    _assert_401(client.delete(url))
    assert stored(node) == before


def test_an_expired_token_is_401_with_a_challenge(client, node, svc, existing):
    claims = _claims_of(svc)
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    old = TokenIssuer(node.node_key, issuer=claims["iss"], audience=claims["aud"], ttl=timedelta(minutes=5),
                      now=lambda: two_hours_ago)
    token = old.issue("client:svc", "service", ScopeSet.parse("system/*.cruds"), client_id="svc").access_token
    h = {"Authorization": f"Bearer {token}", **FHIR}
    r = client.get(f"/fhir/Patient/{existing['id']}", headers=h)
    _assert_401(r)
    assert "expired" in diagnostics(r)
    before = stored(node)
    _assert_401(client.post("/fhir/Patient", json=patient(), headers=h))
    assert stored(node) == before


def test_a_tampered_token_is_401_with_a_challenge(client, node, svc, existing):
    head, payload, sig = svc["Authorization"].removeprefix("Bearer ").split(".")
    # flip one character of the payload (keeping it valid base64url)
    i = len(payload) // 2
    flipped = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1 :]
    widened = base64.urlsafe_b64encode(json.dumps({**_claims_of(svc), "scope": "system/*.cruds",
                                                   "role": "service"}).encode()).rstrip(b"=").decode()
    for token in (f"{head}.{flipped}.{sig}", f"{head}.{widened}.{sig}", f"{head}.{payload}.{sig[:-4]}AAAA",
                  f"{head}.{payload}", "not-a-jwt", "a.b.c"):
        _assert_401(client.get(f"/fhir/Patient/{existing['id']}", headers={"Authorization": f"Bearer {token}"}))


def test_a_token_with_alg_none_or_signed_by_another_key_or_for_another_audience_is_401(client, node, svc, existing):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    claims = _claims_of(svc)
    now = datetime.now(timezone.utc)
    scopes = ScopeSet.parse("system/*.cruds")
    tokens = [
        jwt.encode(claims, None, algorithm="none"),
        TokenIssuer(Ed25519PrivateKey.generate(), issuer=claims["iss"], audience=claims["aud"],
                    ttl=timedelta(minutes=5), now=lambda: now).issue("client:svc", "service", scopes).access_token,
        TokenIssuer(node.node_key, issuer=claims["iss"], audience="https://elsewhere.example/fhir",
                    ttl=timedelta(minutes=5), now=lambda: now).issue("client:svc", "service", scopes).access_token,
        TokenIssuer(node.node_key, issuer="https://elsewhere.example", audience=claims["aud"],
                    ttl=timedelta(minutes=5), now=lambda: now).issue("client:svc", "service", scopes).access_token,
        TokenIssuer(node.node_key, issuer=claims["iss"], audience=claims["aud"], ttl=timedelta(minutes=5),
                    now=lambda: now + timedelta(hours=1)).issue("client:svc", "service", scopes).access_token,
    ]
    for token in tokens:
        _assert_401(client.get(f"/fhir/Patient/{existing['id']}", headers={"Authorization": f"Bearer {token}"}))


def test_a_patient_token_reading_another_patient_is_403(client, node, svc, existing):
    me = create(client, svc, patient(family="Me"))
    node.accounts.create_user(username="patient-me", password=PASSWORD, role="patient", patient=f"Patient/{me['id']}")
    r = client.post("/auth/token", data={"grant_type": "password", "username": "patient-me", "password": PASSWORD})
    h = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert client.get(f"/fhir/Patient/{me['id']}", headers=h).status_code == 200
    assert_outcome(client.get(f"/fhir/Patient/{existing['id']}", headers=h), 403, "forbidden")


# ---- reads, methods and search parameters ---------------------------------------------------------


def test_delete_then_read_is_410_and_vread_of_the_deletion_is_410(client, node, svc, existing):
    url = f"/fhir/Patient/{existing['id']}"
    assert client.delete(url, headers=svc).status_code == 204
    assert_outcome(client.get(url, headers=svc), 410, "deleted")
    assert_outcome(client.get(f"{url}/_history/2", headers=svc), 410, "deleted")
    assert client.get(f"{url}/_history/1", headers=svc).status_code == 200
    assert client.get("/fhir/Patient?_summary=count", headers=svc).json()["total"] == 0
    before = stored(node)
    assert client.delete(url, headers=svc).status_code == 204  # deleting twice is not an error...
    assert client.delete("/fhir/Patient/never-existed", headers=svc).status_code == 204
    assert stored(node) == before  # ...and writes nothing


def test_reading_an_unknown_id_is_404(client, svc):
    assert_outcome(client.get("/fhir/Patient/no-such-patient", headers=svc), 404, "not-found")
    assert_outcome(client.get("/fhir/Patient/no-such-patient/_history", headers=svc), 404, "not-found")
    assert_outcome(client.get("/fhir/Patient/no-such-patient/$everything", headers=svc), 404, "not-found")


@pytest.mark.parametrize(("method", "path"), [
    ("PATCH", "/fhir/Patient/x"),
    ("DELETE", "/fhir/Patient"),
    ("PUT", "/fhir/Patient"),
    ("POST", "/fhir/Patient/x"),
    ("DELETE", "/fhir/Patient/x/_history/1"),
    ("PUT", "/fhir/metadata"),
])
def test_a_method_the_endpoint_does_not_support_is_405(client, node, svc, method, path):
    before = stored(node)
    r = client.request(method, path, headers=svc, json=patient())
    assert_outcome(r, 405, "not-supported")
    assert method in diagnostics(r)
    assert stored(node) == before


def test_an_unknown_search_parameter_is_reported_in_the_bundle_by_default_and_400_when_strict(client, svc, existing):
    r = client.get("/fhir/Patient?colour=blue", headers=svc)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 1
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    (entry,) = outcomes
    assert entry["resource"]["resourceType"] == "OperationOutcome"
    assert "colour" in entry["resource"]["issue"][0]["diagnostics"]
    strict = client.get("/fhir/Patient?colour=blue", headers={**svc, "Prefer": "handling=strict"})
    assert_outcome(strict, 400, "invalid")
    assert "colour" in diagnostics(strict)
    lenient = client.get("/fhir/Patient?colour=blue", headers={**svc, "Prefer": "handling=lenient"})
    assert lenient.status_code == 200


@pytest.mark.parametrize("query", ["_count=abc", "_count=-1", "_offset=minus", "birthdate=notadate",
                                   "birthdate=1990-13-45", "_lastUpdated=gtsoon", "_summary=most",
                                   "_sort=-colour", "_include=Patient:nothing", "_total=maybe",
                                   "identifier=|"])
def test_an_invalid_search_parameter_value_is_400(client, svc, query):
    r = client.get(f"/fhir/Patient?{query}", headers=svc)
    assert_outcome(r, 400, "invalid")
    assert query.split("=")[0].lstrip("-") in diagnostics(r) or "expected" in diagnostics(r)


@pytest.mark.parametrize("version", ["abc", "0", "-1", "1.5", "99"])
def test_vread_of_a_version_that_is_not_a_positive_number_or_does_not_exist_is_404(client, svc, existing, version):
    assert_outcome(client.get(f"/fhir/Patient/{existing['id']}/_history/{version}", headers=svc), 404, "not-found")


@pytest.mark.parametrize("query", ["_count=abc", "_offset=-3", "_since=never"])
def test_an_invalid_history_parameter_is_400(client, svc, existing, query):
    assert_outcome(client.get(f"/fhir/Patient/{existing['id']}/_history?{query}", headers=svc), 400, "invalid")
    assert_outcome(client.get(f"/fhir/Patient/_history?{query}", headers=svc), 400, "invalid")


# ---- never a 500 --------------------------------------------------------------------------------


def _nested_extensions(depth: int) -> dict:
    inner: dict = {"url": "http://x"}
    for _ in range(depth):
        inner = {"url": "http://x", "extension": [inner]}
    return {"resourceType": "Patient", "extension": [inner]}


def _garbage(seed: int, patient_id: str) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments) for ~45 assorted hostile or broken requests."""
    rnd = random.Random(seed)
    noise = [rnd.randbytes(rnd.randint(1, 600)) for _ in range(4)]
    huge_value = orjson.dumps(observation(patient_id)).replace(b'"value":72', b'"value":1e400')
    return [
        *[("POST", "/fhir/Patient", {"content": n}) for n in noise],
        ("PUT", f"/fhir/Patient/{patient_id}", {"content": noise[0]}),
        ("POST", "/fhir", {"content": noise[1]}),
        ("POST", "/fhir/Patient", {"content": b"[" * 5000 + b"]" * 5000}),
        ("POST", "/fhir/Patient", {"json": _nested_extensions(60)}),
        ("POST", "/fhir/Patient", {"json": {"resourceType": "Patient", "birthDate": 19900101}}),
        ("POST", "/fhir/Patient", {"json": {"resourceType": ["Patient"]}}),
        ("POST", "/fhir/Patient", {"json": {"resourceType": "Patient", "name": [{"family": "\x00\ud7ff\u202e"}]}}),
        ("POST", "/fhir/Patient", {"json": {"resourceType": "Patient", "id": "x" * 5000}}),
        ("POST", "/fhir/Observation", {"content": huge_value}),
        ("POST", "/fhir/Observation", {"json": {**observation(patient_id), "subject": {"reference": "Patient/"}}}),
        ("PUT", "/fhir/Patient/" + "x" * 5000, {"json": {"resourceType": "Patient", "id": "x" * 5000}}),
        ("PUT", "/fhir/Patient/bad id!", {"json": {"resourceType": "Patient", "id": "bad id!"}}),
        ("PUT", "/fhir/Patient/日本語", {"json": {"resourceType": "Patient", "id": "日本語"}}),
        ("GET", "/fhir/Patient/" + "a" * 5000, {}),
        ("GET", "/fhir/Patient/日本語", {}),
        ("GET", "/fhir/Patient?name=' OR 1=1 --", {}),
        ("GET", "/fhir/Patient?_id='; DROP TABLE resources; --", {}),
        ("GET", "/fhir/Patient?family=%00", {}),
        ("GET", "/fhir/Patient?identifier=%00|%00", {}),
        ("GET", "/fhir/Patient?name=" + "ü" * 3000, {}),
        ("GET", "/fhir/Patient?_sort=;DROP TABLE users", {}),
        ("GET", "/fhir/Patient?_count=99999999999999999999999", {}),
        ("GET", "/fhir/Patient?birthdate=ge", {}),
        ("GET", "/fhir/Patient?birthdate=ge99999-01-01", {}),
        ("GET", "/fhir/Patient?_include=*", {}),
        ("GET", "/fhir/Patient?_revinclude=Spaceship:pilot", {}),
        ("GET", "/fhir/Patient?general-practitioner.name=x", {}),
        ("GET", "/fhir/Patient?general-practitioner=Practitioner/%00", {}),
        ("GET", "/fhir/Patient?_has:Observation:patient:code=1", {}),
        ("GET", "/fhir/Observation?value-quantity=abc", {}),
        ("GET", "/fhir/Observation?value-quantity=1e99999", {}),
        ("GET", "/fhir/Observation?value-quantity=NaN", {}),
        ("GET", "/fhir/Observation?code:nonsense=1", {}),
        ("GET", "/fhir/Patient/_history?_since=9999-99-99", {}),
        ("GET", "/fhir/Patient/_history?_count=99999999999999999999999", {}),
        ("POST", "/fhir/Patient/_search", {"data": {"name": "\x00", "_count": "x"}}),
        ("POST", "/fhir/Patient/_search", {"content": b"\xff\xfe=\xff",
                                           "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        ("POST", "/fhir", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [1, "two", None]}}),
        ("POST", "/fhir", {"json": {"resourceType": "Bundle", "type": "batch", "entry": {"not": "a list"}}}),
        ("POST", "/fhir", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": "x", "request": {"method": "POST", "url": "Patient"}}]}}),
        ("POST", "/fhir", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {**patient(), "generalPractitioner": [{"reference": "Spaceship?x=1"}]},
             "request": {"method": "POST", "url": "Patient"}}]}}),
        ("POST", "/fhir", {"json": {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient?birthdate=notadate"}},
            {"request": {"method": "DELETE", "url": "Patient"}},
            {"request": {"method": "PUT", "url": "Patient?name=x"}, "resource": 5}]}}),
        ("PUT", f"/fhir/Patient/{patient_id}", {"json": {"resourceType": "Patient", "id": patient_id},
                                                "headers": {"If-Match": "W/\"-1\""}}),
        ("PUT", f"/fhir/Patient/{patient_id}", {"json": {"resourceType": "Patient", "id": patient_id},
                                                "headers": {"If-Match": "W/\"99999999999999999999999\""}}),
        ("POST", "/fhir/Patient", {"json": patient(), "headers": {"If-None-Exist": "colour=blue&&=="}}),
        ("GET", "/fhir/Patient", {"headers": {"Authorization": "Bearer " + "x" * 10000}}),
        ("GET", "/fhir/Patient", {"headers": {"Authorization": "Bearer ..."}}),
    ]


def _send(client, headers: dict, method: str, path: str, kwargs: dict):  # type: ignore[no-untyped-def]
    kwargs = dict(kwargs)
    return client.request(method, path, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)


def _problem(r) -> str | None:  # type: ignore[no-untyped-def]
    """What is wrong with a response to a bad request, or None."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:160]}"
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            return f"{r.status_code} and not JSON: {r.text[:100]}"
        if body.get("resourceType") != "OperationOutcome":
            return f"{r.status_code} and not an OperationOutcome"
    return None


@pytest.mark.parametrize("seed", [0, 1])
def test_garbage_requests_never_get_a_500_and_always_get_an_operation_outcome(client, node, svc, existing, seed):
    failures = []
    for method, path, kwargs in _garbage(seed, existing["id"]):
        problem = _problem(_send(client, svc, method, path, kwargs))
        if problem:
            failures.append(f"{method} {path[:60]}: {problem}")
    assert not failures, "\n".join(failures)
    assert client.get(f"/fhir/Patient/{existing['id']}", headers=svc).json() == existing


# Requests that crashed the server (500) when these tests were written. Each names the backends
# on which it crashes; the lead removes an entry's ``bug`` once it is fixed.
_ID64 = "b" * 64
CRASHES = {
    "deeply-nested-extensions": dict(
        method="POST", path="/fhir/Patient", kwargs={"json": _nested_extensions(150)}, expect=400,
        bug="RecursionError from the model validator is not caught (fhir/validation.py validate(): only "
            "ValidationError/TypeError/ValueError are translated)", on=("sqlite", "postgres")),
    "vread-of-a-huge-version": dict(
        method="GET", path="/fhir/Patient/{pid}/_history/99999999999999999999999", kwargs={}, expect=404,
        bug="web/api/fhir.py _version() has no upper bound: OverflowError (SQLite) / integer out of range (PG)",
        on=("sqlite", "postgres")),
    "search-with-a-huge-offset": dict(
        method="GET", path="/fhir/Patient?_offset=99999999999999999999999", kwargs={}, expect=(200, 400),
        bug="fhir/query.py _non_negative() has no upper bound for _offset: OverflowError / bigint out of range",
        on=("sqlite", "postgres")),
    "type-history-with-a-huge-offset": dict(
        method="GET", path="/fhir/Patient/_history?_offset=99999999999999999999999", kwargs={}, expect=(200, 400),
        bug="records/service.py history() parses _offset with int() and no upper bound", on=("sqlite", "postgres")),
    "search-with-count-zero": dict(
        method="GET", path="/fhir/Patient?_count=0", kwargs={}, expect=200,
        bug="ZeroDivisionError in records/service.py _links(): last = ((total - 1) // count) * count",
        on=("sqlite", "postgres")),
    "transaction-with-a-non-string-if-none-exist": dict(
        method="POST", path="/fhir", expect=400, on=("sqlite", "postgres"),
        kwargs={"json": {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient", "ifNoneExist": 5}}]}},
        bug="records/bundles.py passes request.ifNoneExist unchecked; service._conditional_matches calls "
            ".lstrip on an int (AttributeError)"),
    "read-of-an-id-with-a-nul-byte": dict(
        method="GET", path="/fhir/Patient/%00", kwargs={}, expect=404, on=("postgres",),
        bug="path ids are not checked against the FHIR id syntax; PostgreSQL refuses NUL in text (DataError)"),
    "delete-of-an-id-with-a-nul-byte": dict(
        method="DELETE", path="/fhir/Patient/%00", kwargs={}, expect=(204, 400, 404), on=("postgres",),
        bug="path ids are not checked against the FHIR id syntax; PostgreSQL refuses NUL in text (DataError)"),
    "history-of-an-id-with-a-nul-byte": dict(
        method="GET", path="/fhir/Patient/%00/_history", kwargs={}, expect=404, on=("postgres",),
        bug="path ids are not checked against the FHIR id syntax; PostgreSQL refuses NUL in text (DataError)"),
    "vread-of-an-id-with-a-nul-byte": dict(
        method="GET", path="/fhir/Patient/%00/_history/1", kwargs={}, expect=404, on=("postgres",),
        bug="path ids are not checked against the FHIR id syntax; PostgreSQL refuses NUL in text (DataError)"),
    "everything-of-an-id-with-a-nul-byte": dict(
        method="GET", path="/fhir/Patient/%00/$everything", kwargs={}, expect=404, on=("postgres",),
        bug="path ids are not checked against the FHIR id syntax; PostgreSQL refuses NUL in text (DataError)"),
    "batch-read-of-an-id-with-a-nul-byte": dict(
        method="POST", path="/fhir", expect=200, on=("postgres",),
        kwargs={"json": {"resourceType": "Bundle", "type": "batch",
                         "entry": [{"request": {"method": "GET", "url": "Patient/\x00"}}]}},
        bug="DataError is not a TeleledgerError, so the batch's per-entry handler does not catch it"),
    "patient-with-a-64-character-id": dict(
        method="PUT", path=f"/fhir/Patient/{_ID64}", kwargs={"json": {"resourceType": "Patient", "id": _ID64}},
        expect=201, on=("postgres",),
        bug="records/keys.py key_id_for() returns 'p.' + patient id (66 chars) but data_keys.key_id is String(64)"),
    "observation-of-a-patient-with-a-64-character-id": dict(
        method="POST", path="/fhir/Observation", kwargs={"json": observation(_ID64)}, expect=201, on=("postgres",),
        bug="records/keys.py key_id_for() returns 'p.' + patient id (66 chars) but data_keys.key_id is String(64)"),
    "organization-with-a-65-character-id": dict(
        method="PUT", path=f"/fhir/Organization/{'c' * 65}",
        kwargs={"json": {"resourceType": "Organization", "id": "c" * 65}}, expect=400, on=("sqlite", "postgres"),
        bug="ids over FHIR's 64 characters are accepted (fhir.resources allows 255): stored on SQLite, "
            "500 on PostgreSQL (resources.res_id is String(64))"),
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_requests_that_once_crashed_the_server_get_a_clear_answer(client, node, svc, existing, backend, case,
                                                                   request):
    spec = CRASHES[case]
    r = _send(client, svc, spec["method"], spec["path"].format(pid=existing["id"]), spec["kwargs"])
    assert _problem(r) is None, _problem(r)
    expect = spec["expect"] if isinstance(spec["expect"], tuple) else (spec["expect"],)
    assert r.status_code in expect, r.text[:300]
