"""Accounts, OAuth tokens, SMART discovery and the access policy, through HTTP on SQLite and PostgreSQL.

The ``world`` fixture builds, with a trusted service token, two practitioners and three
patients: Dr Doc has treated Alice and Bob (one Encounter each); nobody has treated Carol;
Dr Stranger has treated nobody. Every role has an account. Each test then speaks as one of
them and checks both what it gets and what it must never get.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import jwt
import pytest
from sqlalchemy import func, select

from teleledger.identity.scopes import ROLE_SCOPES, ScopeSet
from teleledger.storage import tables as t
from tests.integration.helpers import FHIR, create, observation, patient, service_headers

PASSWORD = "correct horse 1"
CLIENT_SECRET = "backend-secret-0123456789"
ROLES_WITHOUT_PATIENT_DATA = ("pharmacist", "payer", "researcher")


# ---- the world ----------------------------------------------------------------------------------


@dataclass
class World:
    client: object
    node: object
    service: dict
    ids: dict[str, str] = field(default_factory=dict)

    def login(self, username: str, scope: str | None = None) -> dict:
        data = {"grant_type": "password", "username": username, "password": PASSWORD}
        if scope is not None:
            data["scope"] = scope
        r = self.client.post("/auth/token", data=data)  # type: ignore[attr-defined]
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}", **FHIR}

    def get(self, username: str, path: str, *, scope: str | None = None):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers=self.login(username, scope))  # type: ignore[attr-defined]

    def stored(self) -> tuple[int, int]:
        """(resources, resource versions) rows: any write shows up in one of them."""
        with self.node.engine.connect() as conn:  # type: ignore[attr-defined]
            return (conn.execute(select(func.count()).select_from(t.resources)).scalar_one(),
                    conn.execute(select(func.count()).select_from(t.resource_versions)).scalar_one())


def encounter(patient_id: str, practitioner_id: str, **extra: object) -> dict:
    return {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"individual": {"reference": f"Practitioner/{practitioner_id}"}}],
        **extra,
    }


def practitioner(family: str) -> dict:
    return {"resourceType": "Practitioner", "name": [{"family": family}]}


@pytest.fixture
def world(client, node) -> World:  # type: ignore[no-untyped-def]
    w = World(client, node, service_headers(client, node))
    ids = w.ids
    ids["doc"] = create(client, w.service, practitioner("Doc"))["id"]
    ids["stranger"] = create(client, w.service, practitioner("Stranger"))["id"]
    for name in ("alice", "bob", "carol"):
        ids[name] = create(client, w.service, patient(family=name.title()))["id"]
    ids["enc_alice"] = create(client, w.service, encounter(ids["alice"], ids["doc"]))["id"]
    ids["enc_bob"] = create(client, w.service, encounter(ids["bob"], ids["doc"]))["id"]
    ids["obs_alice"] = create(client, w.service, observation(ids["alice"]))["id"]
    ids["obs_bob"] = create(client, w.service, observation(ids["bob"]))["id"]
    ids["obs_carol"] = create(client, w.service, observation(ids["carol"]))["id"]
    accounts = node.accounts
    accounts.create_user(username="alice", password=PASSWORD, role="patient", patient=f"Patient/{ids['alice']}")
    accounts.create_user(username="bob", password=PASSWORD, role="patient", patient=f"Patient/{ids['bob']}")
    accounts.create_user(username="doc", password=PASSWORD, role="practitioner",
                         practitioner=f"Practitioner/{ids['doc']}")
    accounts.create_user(username="stranger", password=PASSWORD, role="practitioner",
                         practitioner=f"Practitioner/{ids['stranger']}")
    for role in ("admin", *ROLES_WITHOUT_PATIENT_DATA):
        accounts.create_user(username=role, password=PASSWORD, role=role)
    return w


def matches(bundle: dict, mode: str = "match") -> set[tuple[str, str]]:
    return {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle.get("entry", [])
            if e["search"]["mode"] == mode}


def assert_outcome(r, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code


def token_request(client, **form: str):  # type: ignore[no-untyped-def]
    return client.post("/auth/token", data=form)


# ---- accounts and the token endpoint --------------------------------------------------------------


def test_accounts_linked_to_an_organization_or_a_related_person_carry_it_in_the_token_and_principal(world):
    from teleledger.policy.model import Principal

    client, node, ids = world.client, world.node, world.ids
    org = create(client, world.service, {"resourceType": "Organization", "name": "Corner Pharmacy"})["id"]
    rp = create(client, world.service, {"resourceType": "RelatedPerson", "patient": {"reference":
                                        f"Patient/{ids['alice']}"}})["id"]
    node.accounts.create_user(username="chemist", password=PASSWORD, role="pharmacist",
                              organization=f"Organization/{org}")
    node.accounts.create_user(username="mum", password=PASSWORD, role="patient", related_person=f"RelatedPerson/{rp}")
    node.accounts.create_user(username="mum2", password=PASSWORD, role="patient", patient=f"Patient/{ids['bob']}",
                              related_person=f"RelatedPerson/{rp}")
    expected = {"chemist": ({f"Organization/{org}"}, None, None), "mum": ({f"RelatedPerson/{rp}"}, None, None),
                "mum2": ({f"RelatedPerson/{rp}"}, ids["bob"], f"Patient/{ids['bob']}")}
    for username, (refs, patient_id, fhir_user) in expected.items():
        r = token_request(client, grant_type="password", username=username, password=PASSWORD)
        assert r.status_code == 200, r.text
        claims = node.verifier.verify(r.json()["access_token"])
        principal = Principal.from_claims(claims)
        assert principal.actor_refs == frozenset(refs) and principal.patient_id == patient_id
        if fhir_user is not None:
            assert claims.fhir_user == fhir_user
    mum = node.verifier.verify(token_request(client, grant_type="password", username="mum",
                                             password=PASSWORD).json()["access_token"])
    assert mum.fhir_user == f"RelatedPerson/{rp}" and mum.patient is None


@pytest.mark.parametrize("kwargs, message", [
    ({"role": "patient"}, "needs --patient"),
    ({"role": "pharmacist", "related_person": "RelatedPerson/x"}, "only patient accounts act as a RelatedPerson"),
    ({"role": "patient", "patient": "Patient/p", "organization": "Organization/o"}, "not linked to an Organization"),
    ({"role": "pharmacist", "organization": "Practitioner/o"}, "expected a reference like Organization/ID"),
])
def test_account_links_that_make_no_sense_are_refused_and_nothing_is_stored(node, kwargs, message):
    from teleledger.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match=message):
        node.accounts.create_user(username="linked", password=PASSWORD, **kwargs)
    assert node.accounts.get_by_username("linked") is None


def test_stored_password_and_client_secret_are_argon2id_hashes_not_the_secrets(node):
    node.accounts.create_user(username="hashme", password=PASSWORD, role="admin")
    node.accounts.create_client(client_id="hashed-client", secret=CLIENT_SECRET, scopes="system/*.rs")
    with node.engine.connect() as conn:
        stored = conn.execute(select(t.users.c.password_hash).where(t.users.c.username == "hashme")).scalar_one()
        secret = conn.execute(select(t.clients.c.secret_hash)
                              .where(t.clients.c.client_id == "hashed-client")).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert secret.startswith("$argon2id$") and CLIENT_SECRET not in secret


@pytest.mark.parametrize("role", ["patient", "practitioner", "pharmacist", "payer", "researcher", "admin"])
def test_password_grant_issues_a_bearer_jwt_carrying_the_role_and_its_smart_scopes(world, role):
    username = {"patient": "alice", "practitioner": "doc"}.get(role, role)
    r = token_request(world.client, grant_type="password", username=username, password=PASSWORD)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert ScopeSet.parse(body["scope"]) == ScopeSet.parse(ROLE_SCOPES[role])
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["role"] == role and claims["scope"] == body["scope"]
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "EdDSA"
    if role == "patient":
        assert body["patient"] == claims["patient"] == world.ids["alice"]
        assert claims["fhirUser"] == f"Patient/{world.ids['alice']}"
    else:
        assert "patient" not in body and "patient" not in claims
    if role == "practitioner":
        assert claims["fhirUser"] == f"Practitioner/{world.ids['doc']}"


def test_client_credentials_grant_accepts_the_secret_in_the_form_or_by_basic_auth(client, node):
    node.accounts.create_client(client_id="lab-system", secret=CLIENT_SECRET, scopes="system/Observation.cruds")
    posted = token_request(client, grant_type="client_credentials", client_id="lab-system",
                           client_secret=CLIENT_SECRET)
    basic = client.post("/auth/token", data={"grant_type": "client_credentials"}, auth=("lab-system", CLIENT_SECRET))
    for r in (posted, basic):
        assert r.status_code == 200, r.text
        assert r.json()["scope"] == "system/Observation.cruds"
        claims = jwt.decode(r.json()["access_token"], options={"verify_signature": False})
        assert claims["role"] == "service" and claims["client_id"] == "lab-system"
        assert claims["sub"] == "client:lab-system"


def test_a_wrong_password_and_an_unknown_user_get_the_same_invalid_grant(world):
    wrong = token_request(world.client, grant_type="password", username="alice", password="not the password")
    unknown = token_request(world.client, grant_type="password", username="nobody-here", password=PASSWORD)
    for r in (wrong, unknown):
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_grant"
    assert wrong.json() == unknown.json()


def test_a_password_grant_without_a_password_is_an_invalid_request(world):
    r = token_request(world.client, grant_type="password", username="alice")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_an_unknown_client_or_a_wrong_secret_is_invalid_client_401_with_a_challenge(client, node):
    node.accounts.create_client(client_id="lab-system", secret=CLIENT_SECRET, scopes="system/*.rs")
    unknown = token_request(client, grant_type="client_credentials", client_id="no-such-client",
                            client_secret=CLIENT_SECRET)
    wrong = token_request(client, grant_type="client_credentials", client_id="lab-system",
                          client_secret="wrong-secret-0123456789")
    missing = token_request(client, grant_type="client_credentials", client_id="lab-system")
    for r in (unknown, wrong, missing):
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "invalid_client"
        assert "www-authenticate" in r.headers


def test_a_token_request_that_is_not_form_encoded_is_rejected_400(world):
    r = world.client.post("/auth/token", json={"grant_type": "password", "username": "alice", "password": PASSWORD})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("grant", ["authorization_code", "implicit", ""])
def test_an_unsupported_grant_type_is_rejected_400(world, grant):
    r = token_request(world.client, grant_type=grant, username="alice", password=PASSWORD)
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_a_malformed_requested_scope_is_invalid_scope(world):
    r = token_request(world.client, grant_type="password", username="alice", password=PASSWORD,
                      scope="patient/NoSuchType.rs")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


def _token_garbage() -> list[dict]:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    login = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    return [
        {"data": {"grant_type": "password", "username": "a" * 10_000, "password": PASSWORD}},
        {"data": {"grant_type": "password", "username": "alice", "password": "x" * 2_000_000}},
        {"data": {"grant_type": "password", "username": "alice", "password": "\x00"}},
        {"data": {"grant_type": "client_credentials", "client_id": "c" * 1000, "client_secret": "x" * 20}},
        {"data": {"grant_type": "client_credentials"}, "headers": {"Authorization": "Basic !!!"}},
        {"data": {"grant_type": "client_credentials"},
         "headers": {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()}},
        {"data": {"grant_type": "client_credentials"},
         "headers": {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}},
        {"data": {**login, "scope": "user/*.cruds?x"}},
        {"data": {**login, "scope": "patient/Patient.xyz"}},
        {"data": {**login, "scope": "patient/*.rs?=&=&"}},
        {"content": b"\xff\xfe\x00=&&&=", "headers": form},
        {"content": b"--b\r\nContent-Disposition: form-data; name=\"grant_type\"\r\n\r\npassword\r\n--b--\r\n",
         "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
        {"content": b"", "headers": form},
        {"content": b"{}", "headers": {"Content-Type": "application/json"}},
    ]


def test_garbage_token_requests_get_a_4xx_error_and_never_a_token_or_a_500(world):
    for kwargs in _token_garbage():
        r = world.client.post("/auth/token", **kwargs)
        assert 400 <= r.status_code < 500, (kwargs.get("data") or kwargs.get("content"), r.status_code, r.text[:200])
        body = r.json()
        assert "access_token" not in body
        assert "error" in body or body.get("resourceType") == "OperationOutcome", body


@pytest.mark.parametrize("which", ["username", "client_id"])
def test_a_nul_byte_in_a_username_or_client_id_is_an_ordinary_credential_failure(world, backend, which, request):
    if which == "username":
        r = token_request(world.client, grant_type="password", username="ali\x00ce", password=PASSWORD)
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    else:
        r = token_request(world.client, grant_type="client_credentials", client_id="svc\x00",
                          client_secret=CLIENT_SECRET)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"


# ---- narrowing scopes ---------------------------------------------------------------------------


def test_a_token_narrowed_to_observations_reads_observations_but_not_encounters(world):
    ids = world.ids
    h = world.login("alice", scope="patient/Observation.rs")
    assert world.client.get(f"/fhir/Observation/{ids['obs_alice']}", headers=h).status_code == 200
    assert_outcome(world.client.get(f"/fhir/Encounter/{ids['enc_alice']}", headers=h), 403, "forbidden")
    assert_outcome(world.client.get(f"/fhir/Patient/{ids['alice']}", headers=h), 403, "forbidden")
    assert_outcome(world.client.get("/fhir/Encounter", headers=h), 403, "forbidden")


def test_requesting_more_than_the_role_allows_grants_only_the_intersection(world):
    r = token_request(world.client, grant_type="password", username="alice", password=PASSWORD,
                      scope="patient/Observation.cruds system/*.cruds")
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "patient/Observation.rs"
    h = {"Authorization": f"Bearer {r.json()['access_token']}", **FHIR}
    before = world.stored()
    denied = world.client.post("/fhir/Observation", json=observation(world.ids["alice"]), headers=h)
    assert_outcome(denied, 403, "forbidden")
    assert world.stored() == before


def test_a_service_token_narrowed_to_reading_patients_cannot_write(world):
    h = service_headers(world.client, world.node, scope="system/Patient.rs")
    assert world.client.get(f"/fhir/Patient/{world.ids['alice']}", headers=h).status_code == 200
    before = world.stored()
    assert_outcome(world.client.post("/fhir/Patient", json=patient(), headers=h), 403, "forbidden")
    assert_outcome(world.client.delete(f"/fhir/Patient/{world.ids['alice']}", headers=h), 403, "forbidden")
    assert_outcome(world.client.get(f"/fhir/Observation/{world.ids['obs_alice']}", headers=h), 403, "forbidden")
    assert world.stored() == before


# ---- discovery and third-party verification ------------------------------------------------------


def test_smart_configuration_names_the_token_endpoint_the_jwks_and_v2_permissions(client):
    r = client.get("/.well-known/smart-configuration")
    assert r.status_code == 200
    conf = r.json()
    assert conf["issuer"] == "http://testserver"
    assert conf["token_endpoint"] == "http://testserver/auth/token"
    assert conf["jwks_uri"] == "http://testserver/.well-known/jwks.json"
    assert set(conf["grant_types_supported"]) == {"password", "client_credentials"}
    assert "permission-v2" in conf["capabilities"]
    assert {"patient/*.cruds", "user/*.cruds", "system/*.cruds"} <= set(conf["scopes_supported"])


def test_jwks_publishes_one_ed25519_verification_key_and_no_private_part(client):
    r = client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    (key,) = r.json()["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA" and key["use"] == "sig"
    assert key["kid"] and key["x"]
    assert "d" not in key


def test_a_third_party_verifies_an_issued_token_with_the_jwks_alone(world):
    token = world.login("alice")["Authorization"].removeprefix("Bearer ")
    conf = world.client.get("/.well-known/smart-configuration").json()
    (jwk,) = world.client.get("/.well-known/jwks.json").json()["keys"]
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, key, algorithms=["EdDSA"], audience=f"{conf['issuer']}/fhir", issuer=conf["issuer"])
    assert claims["patient"] == world.ids["alice"] and claims["role"] == "patient"
    head, payload, sig = token.split(".")
    forged = jwt.encode({**claims, "patient": world.ids["bob"]}, "attacker", algorithm="HS256").split(".")[1]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(f"{head}.{forged}.{sig}", key, algorithms=["EdDSA"], audience=f"{conf['issuer']}/fhir")


# ---- patients see only their own compartment -----------------------------------------------------


def test_a_patient_reads_their_own_patient_encounter_and_observation(world):
    ids = world.ids
    h = world.login("alice")
    for path in (f"Patient/{ids['alice']}", f"Encounter/{ids['enc_alice']}", f"Observation/{ids['obs_alice']}"):
        r = world.client.get(f"/fhir/{path}", headers=h)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["id"] == path.split("/")[1]


def test_a_patient_gets_403_reading_another_patients_patient_encounter_or_observation(world):
    ids = world.ids
    h = world.login("alice")
    for path in (f"Patient/{ids['bob']}", f"Encounter/{ids['enc_bob']}", f"Observation/{ids['obs_bob']}"):
        r = world.client.get(f"/fhir/{path}", headers=h)
        assert_outcome(r, 403, "forbidden")
        assert "Bob" not in r.text and "subject" not in r.text  # the rule is named, no data is shown


def test_a_patients_searches_never_include_another_patients_resources(world):
    ids = world.ids
    h = world.login("alice")
    expected = {
        "Patient": {("Patient", ids["alice"])},
        "Encounter": {("Encounter", ids["enc_alice"])},
        "Observation": {("Observation", ids["obs_alice"])},
    }
    for rt, own in expected.items():
        r = world.client.get(f"/fhir/{rt}", headers=h)
        assert r.status_code == 200, r.text
        assert matches(r.json()) == own and r.json()["total"] == 1
        counted = world.client.get(f"/fhir/{rt}?_summary=count", headers=h).json()
        assert counted["total"] == 1 and "entry" not in counted
    # asking for Bob by name or reference finds nothing rather than Bob
    for query in (f"Patient?_id={ids['bob']}", f"Encounter?patient=Patient/{ids['bob']}",
                  f"Observation?subject=Patient/{ids['bob']}", "Patient?family=Bob"):
        r = world.client.get(f"/fhir/{query}", headers=h)
        assert r.status_code == 200, (query, r.text)
        assert r.json()["total"] == 0 and "entry" not in r.json(), query


def test_a_patients_type_history_lists_only_their_own_resources(world):
    r = world.get("alice", "/fhir/Observation/_history")
    assert r.status_code == 200, r.text
    ids = {e["fullUrl"].rsplit("/", 1)[1] for e in r.json()["entry"]}
    assert ids == {world.ids["obs_alice"]} and r.json()["total"] == 1


def test_history_and_vread_of_another_patients_resource_are_403(world):
    ids = world.ids
    h = world.login("alice")
    for path in (f"Patient/{ids['bob']}/_history", f"Patient/{ids['bob']}/_history/1",
                 f"Observation/{ids['obs_bob']}/_history", f"Observation/{ids['obs_bob']}/_history/1"):
        assert_outcome(world.client.get(f"/fhir/{path}", headers=h), 403, "forbidden")
    assert world.client.get(f"/fhir/Patient/{ids['alice']}/_history/1", headers=h).status_code == 200
    assert world.client.get(f"/fhir/Patient/{ids['alice']}/_history", headers=h).status_code == 200


def test_everything_of_another_patient_is_403_and_of_ones_own_holds_nothing_of_theirs(world):
    ids = world.ids
    h = world.login("alice")
    assert_outcome(world.client.get(f"/fhir/Patient/{ids['bob']}/$everything", headers=h), 403, "forbidden")
    r = world.client.get(f"/fhir/Patient/{ids['alice']}/$everything", headers=h)
    assert r.status_code == 200, r.text
    got = matches(r.json())
    assert {("Patient", ids["alice"]), ("Encounter", ids["enc_alice"]), ("Observation", ids["obs_alice"])} <= got
    theirs = {ids["bob"], ids["enc_bob"], ids["obs_bob"], ids["carol"], ids["obs_carol"]}
    assert not {rid for _, rid in got} & theirs


def test_a_patient_cannot_write_into_another_patients_record(world):
    ids = world.ids
    h = world.login("alice")
    message = {"resourceType": "Communication", "status": "completed",
               "subject": {"reference": f"Patient/{ids['bob']}"}, "payload": [{"contentString": "hello"}]}
    before = world.stored()
    assert_outcome(world.client.post("/fhir/Communication", json=message, headers=h), 403, "forbidden")
    assert_outcome(world.client.post("/fhir/Patient", json=patient(), headers=h), 403, "forbidden")
    bob = world.client.get(f"/fhir/Patient/{ids['bob']}", headers=world.service).json()
    assert_outcome(world.client.put(f"/fhir/Patient/{ids['bob']}", json={**bob, "gender": "male"}, headers=h),
                   403, "forbidden")
    bobs = create(world.client, world.service, message)
    before = world.stored()
    assert_outcome(world.client.delete(f"/fhir/Communication/{bobs['id']}", headers=h), 403, "forbidden")
    assert world.stored() == before
    own = {**message, "subject": {"reference": f"Patient/{ids['alice']}"}}
    assert world.client.post("/fhir/Communication", json=own, headers=h).status_code == 201


# ---- _include and _revinclude never leak ---------------------------------------------------------


def test_a_patient_including_the_practitioner_of_their_own_encounter_gets_it(world):
    ids = world.ids
    r = world.get("alice", "/fhir/Encounter?_include=Encounter:practitioner")
    assert r.status_code == 200, r.text
    assert matches(r.json()) == {("Encounter", ids["enc_alice"])}
    assert matches(r.json(), "include") == {("Practitioner", ids["doc"])}


def test_revinclude_from_a_patient_returns_only_their_own_encounters(world):
    ids = world.ids
    r = world.get("alice", "/fhir/Practitioner?_revinclude=Encounter:practitioner")
    assert r.status_code == 200, r.text
    assert {("Practitioner", ids["doc"]), ("Practitioner", ids["stranger"])} <= matches(r.json())
    assert matches(r.json(), "include") == {("Encounter", ids["enc_alice"])}


def test_include_of_a_reference_into_another_patients_record_is_dropped(world):
    ids = world.ids
    # Alice's observation that (wrongly, or for a family history) points at Bob's encounter and Bob
    linked = create(world.client, world.service, {
        **observation(ids["alice"]), "encounter": {"reference": f"Encounter/{ids['enc_bob']}"},
    })
    r = world.get("alice", f"/fhir/Observation?_id={linked['id']}&_include=Observation:encounter")
    assert r.status_code == 200, r.text
    assert matches(r.json()) == {("Observation", linked["id"])}
    assert matches(r.json(), "include") == set()


def test_a_practitioner_without_a_relationship_gets_no_revincluded_encounters(world):
    ids = world.ids
    r = world.get("stranger", "/fhir/Practitioner?_revinclude=Encounter:practitioner")
    assert r.status_code == 200, r.text
    assert ("Practitioner", ids["doc"]) in matches(r.json())
    assert matches(r.json(), "include") == set()
    r = world.get("stranger", "/fhir/Patient?_revinclude=Encounter:patient")
    assert r.status_code == 200 and r.json()["total"] == 0 and "entry" not in r.json()


# ---- practitioners see the patients they care for -----------------------------------------------


def test_a_practitioner_sees_a_patient_only_after_a_care_relationship_exists(world):
    ids = world.ids
    h = world.login("doc")
    carol = f"/fhir/Patient/{ids['carol']}"
    assert_outcome(world.client.get(carol, headers=h), 403, "forbidden")
    assert_outcome(world.client.get(f"/fhir/Observation/{ids['obs_carol']}", headers=h), 403, "forbidden")
    before = world.client.get("/fhir/Patient", headers=h).json()
    assert matches(before) == {("Patient", ids["alice"]), ("Patient", ids["bob"])}
    assert world.client.get(f"/fhir/Observation?subject=Patient/{ids['carol']}", headers=h).json()["total"] == 0

    create(world.client, world.service, encounter(ids["carol"], ids["doc"]))

    assert world.client.get(carol, headers=h).status_code == 200
    assert world.client.get(f"/fhir/Observation/{ids['obs_carol']}", headers=h).status_code == 200
    after = world.client.get("/fhir/Patient", headers=h).json()
    assert ("Patient", ids["carol"]) in matches(after) and after["total"] == 3


def test_deleting_the_only_encounter_ends_the_care_relationship(world):
    ids = world.ids
    h = world.login("doc")
    care = create(world.client, world.service, encounter(ids["carol"], ids["doc"]))
    assert world.client.get(f"/fhir/Patient/{ids['carol']}", headers=h).status_code == 200
    assert world.client.delete(f"/fhir/Encounter/{care['id']}", headers=world.service).status_code == 204
    assert_outcome(world.client.get(f"/fhir/Patient/{ids['carol']}", headers=h), 403, "forbidden")
    assert ("Patient", ids["carol"]) not in matches(world.client.get("/fhir/Patient", headers=h).json())


def test_a_practitioner_without_any_relationship_sees_no_patient_data(world):
    ids = world.ids
    h = world.login("stranger")
    for path in (f"Patient/{ids['alice']}", f"Encounter/{ids['enc_alice']}", f"Observation/{ids['obs_alice']}",
                 f"Patient/{ids['alice']}/_history", f"Patient/{ids['alice']}/$everything"):
        assert_outcome(world.client.get(f"/fhir/{path}", headers=h), 403, "forbidden")
    for rt in ("Patient", "Encounter", "Observation"):
        r = world.client.get(f"/fhir/{rt}?_summary=count", headers=h)
        assert r.status_code == 200 and r.json()["total"] == 0, rt


def test_a_practitioner_may_open_care_by_an_encounter_they_take_part_in_but_not_for_someone_else(world):
    ids = world.ids
    stranger = world.login("stranger")
    before = world.stored()
    for_doc = encounter(ids["carol"], ids["doc"])
    assert_outcome(world.client.post("/fhir/Encounter", json=for_doc, headers=stranger), 403, "forbidden")
    assert world.stored() == before
    own = encounter(ids["carol"], ids["stranger"])
    assert world.client.post("/fhir/Encounter", json=own, headers=stranger).status_code == 201
    assert world.client.get(f"/fhir/Patient/{ids['carol']}", headers=stranger).status_code == 200


def test_a_practitioner_cannot_join_someone_elses_encounter_by_updating_it(world):
    ids = world.ids
    stranger = world.login("stranger")
    current = world.client.get(f"/fhir/Encounter/{ids['enc_bob']}", headers=world.service).json()
    joined = {**current, "participant": [*current["participant"],
                                         {"individual": {"reference": f"Practitioner/{ids['stranger']}"}}]}
    before = world.stored()
    r = world.client.put(f"/fhir/Encounter/{ids['enc_bob']}", json=joined, headers=stranger)
    assert_outcome(r, 403, "forbidden")
    assert world.stored() == before
    assert_outcome(world.client.get(f"/fhir/Patient/{ids['bob']}", headers=stranger), 403, "forbidden")


# ---- admins and the other roles -----------------------------------------------------------------


def test_an_admin_gets_403_on_clinical_data(world):
    ids = world.ids
    h = world.login("admin")
    before = world.stored()
    for path in (f"Patient/{ids['alice']}", f"Observation/{ids['obs_alice']}", f"Encounter/{ids['enc_alice']}",
                 "Patient", "Observation", f"Patient/{ids['alice']}/$everything"):
        assert_outcome(world.client.get(f"/fhir/{path}", headers=h), 403, "forbidden")
    assert_outcome(world.client.post("/fhir/Patient", json=patient(), headers=h), 403, "forbidden")
    assert_outcome(world.client.post("/fhir/Observation", json=observation(ids["alice"]), headers=h),
                   403, "forbidden")
    assert world.stored() == before


def test_an_admin_creates_reads_updates_and_searches_organizations(world):
    h = world.login("admin")
    org = {"resourceType": "Organization", "name": "North Clinic"}
    r = world.client.post("/fhir/Organization", json=org, headers=h)
    assert r.status_code == 201, r.text
    org = r.json()
    assert world.client.get(f"/fhir/Organization/{org['id']}", headers=h).status_code == 200
    r = world.client.put(f"/fhir/Organization/{org['id']}", json={**org, "name": "North Clinic East"}, headers=h)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    found = world.client.get("/fhir/Organization?name=North", headers=h).json()
    assert matches(found) == {("Organization", org["id"])}


def test_a_patient_may_read_the_directory_but_not_edit_it(world):
    h = world.login("alice")
    assert world.client.get(f"/fhir/Practitioner/{world.ids['doc']}", headers=h).status_code == 200
    before = world.stored()
    r = world.client.post("/fhir/Organization", json={"resourceType": "Organization", "name": "Mine"}, headers=h)
    assert_outcome(r, 403, "forbidden")
    assert world.stored() == before


@pytest.mark.parametrize("role", ROLES_WITHOUT_PATIENT_DATA)
def test_pharmacists_payers_and_researchers_are_denied_patient_data_without_consent(world, role):
    ids = world.ids
    h = world.login(role)
    for path in (f"Patient/{ids['alice']}", f"Observation/{ids['obs_alice']}", f"Encounter/{ids['enc_alice']}",
                 f"Patient/{ids['alice']}/_history/1", f"Patient/{ids['alice']}/$everything"):
        assert_outcome(world.client.get(f"/fhir/{path}", headers=h), 403, "forbidden")
    for rt in ("Patient", "Encounter", "Observation"):
        r = world.client.get(f"/fhir/{rt}", headers=h)
        # a role without a scope for the type is refused; one with a scope gets an empty listing
        if r.status_code == 200:
            assert r.json()["total"] == 0 and "entry" not in r.json(), (role, rt)
        else:
            assert_outcome(r, 403, "forbidden")
    expected_listing = {"pharmacist": 200, "payer": 200, "researcher": 403}[role]
    assert world.client.get("/fhir/Patient", headers=h).status_code == expected_listing


# ---- versions that belonged to someone else -----------------------------------------------------


@pytest.fixture
def refiled(world) -> dict:  # type: ignore[no-untyped-def]
    """An observation first filed under Bob (version 1), then corrected to Alice (version 2)."""
    misfiled = create(world.client, world.service, {**observation(world.ids["bob"]), "note": [{"text": "Bob's"}]})
    corrected = {**misfiled, "subject": {"reference": f"Patient/{world.ids['alice']}"}, "note": [{"text": "Alice's"}]}
    r = world.client.put(f"/fhir/Observation/{misfiled['id']}", json=corrected, headers=world.service)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    return r.json()


def test_vread_of_a_version_filed_under_another_patient_is_403(world, refiled):
    h = world.login("alice")
    assert world.client.get(f"/fhir/Observation/{refiled['id']}/_history/2", headers=h).status_code == 200
    assert_outcome(world.client.get(f"/fhir/Observation/{refiled['id']}/_history/1", headers=h), 403, "forbidden")


def _versions(bundle: dict) -> list[tuple[str, str]]:
    return [(e["fullUrl"].rsplit("/", 1)[1], e["response"]["etag"]) for e in bundle["entry"]]


def test_instance_history_never_returns_a_version_filed_under_another_patient(world, refiled):
    r = world.get("alice", f"/fhir/Observation/{refiled['id']}/_history")
    assert r.status_code == 200, r.text
    assert _versions(r.json()) == [(refiled["id"], 'W/"2"')] and r.json()["total"] == 1
    assert "Bob's" not in r.text


def test_type_history_never_returns_a_version_filed_under_another_patient(world, refiled):
    r = world.get("alice", "/fhir/Observation/_history")
    assert r.status_code == 200, r.text
    assert sorted(_versions(r.json())) == sorted([(refiled["id"], 'W/"2"'), (world.ids["obs_alice"], 'W/"1"')])
    assert r.json()["total"] == 2
    assert "Bob's" not in r.text
