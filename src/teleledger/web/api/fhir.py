"""FHIR R4 REST routes at ``/fhir`` (https://hl7.org/fhir/R4/http.html).

Routes parse HTTP (body, headers, query) and call one records use case; they do no SQL and no
authorization (the principal is authenticated by ``Ctx``; access is decided in ``policy``).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from teleledger import __version__
from teleledger.core.errors import InvalidInput, MethodNotAllowed, NotFound, PayloadTooLarge
from teleledger.fhir import searchparams as sp
from teleledger.fhir.validation import ID_PATTERN
from teleledger.prescriptions.service import TOKEN_HEADER, PrescriptionService
from teleledger.records.bundles import parse_etag
from teleledger.records.store import Stored, instant
from teleledger.web.deps import Ctx, NodeDep, in_place, in_thread
from teleledger.web.errors import FHIR_JSON

router = APIRouter(prefix="/fhir")


def fhir_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def _resource_response(node, stored: Stored, status: int = 200) -> Response:  # type: ignore[no-untyped-def]
    headers = {"ETag": stored.etag, "Last-Modified": instant(stored.last_updated)}
    if status == 201:
        headers["Location"] = f"{node.settings.public_url}/fhir/{stored.res_type}/{stored.res_id}/_history/{stored.version}"
    return fhir_response(stored.body, status, headers)


async def read_json(request: Request, limit: int) -> Any:
    return (await read_json_text(request, limit))[0]


async def read_json_text(request: Request, limit: int) -> tuple[Any, bytes]:
    """The parsed body and the bytes it was parsed from (validating those is faster)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
    if not body:
        raise InvalidInput("the request has no body; send a FHIR resource as JSON")
    ctype = request.headers.get("content-type", "application/fhir+json").split(";")[0].strip().lower()
    if ctype not in ("application/fhir+json", "application/json", "application/json+fhir", ""):
        raise InvalidInput(f"content type {ctype} is not supported; send application/fhir+json")
    raw = bytes(body)
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


# AuditEvents are the server's own record of access: readable and searchable, never written by clients
SERVER_MANAGED = "AuditEvent"


def _check_type(res_type: str, *, write: bool = False) -> None:
    if res_type not in sp.supported_types():
        raise NotFound(f"resource type {res_type!r} is not supported by this server (see /fhir/metadata)")
    if write and res_type == SERVER_MANAGED:
        raise MethodNotAllowed("AuditEvents are recorded by the server: read and search them; they cannot be written")


def _query(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()


def _version(vid: str) -> int:
    if not vid.isascii() or not vid.isdigit() or len(vid) > 9 or int(vid) < 1:
        raise NotFound(f"version {vid[:20]!r} does not exist")
    return int(vid)


def _check_id(res_id: str, *, write: bool = False) -> str:
    if not ID_PATTERN.fullmatch(res_id):
        if write:
            raise InvalidInput("a resource id is 1–64 letters, digits, '-' or '.'")
        raise NotFound("no resource has this id (ids are 1–64 letters, digits, '-' or '.')")
    return res_id


@router.get("/metadata")
async def metadata(node: NodeDep) -> Response:
    """CapabilityStatement (https://hl7.org/fhir/R4/capabilitystatement.html): exactly what we support."""
    return fhir_response(capability_statement(node.settings.public_url))


def capability_statement(base: str) -> dict:
    resources = []
    for rt in sp.supported_types():
        params = sp.params_for(rt)
        if rt == SERVER_MANAGED:
            resources.append({"type": rt, "interaction": [{"code": "read"}, {"code": "search-type"}],
                              "searchParam": [{"name": n, "type": "token" if n in ("outcome", "action", "subtype",
                                                                                      "purpose", "_id")
                                               else "date" if n == "date" else "reference"}
                                              for n in ("patient", "agent", "date", "outcome", "action", "subtype",
                                                        "purpose", "_id")]})
            continue
        resources.append({
            "type": rt,
            "interaction": [{"code": c} for c in
                            ("read", "vread", "update", "delete", "history-instance", "history-type", "create",
                             "search-type")],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchInclude": sorted(f"{rt}:{p.name}" for p in params.values() if p.type == "reference"),
            "searchParam": [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
            + [{"name": p.name, "type": p.type} for p in sorted(params.values(), key=lambda p: p.name)],
            **({"operation": [{"name": "everything",
                               "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]}
               if rt == "Patient" else {}),
        })
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "kind": "instance",
        "software": {"name": "teleledger", "version": __version__},
        "implementation": {"description": "teleledger FHIR R4 server", "url": f"{base}/fhir"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": f"{base}/auth/token"}],
                }],
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    }


@router.post("")
@router.post("/")
async def transaction(request: Request, node: NodeDep, who: Ctx) -> Response:
    """batch / transaction (https://hl7.org/fhir/R4/http.html#transaction)."""
    bundle = await read_json(request, node.settings.max_body_bytes)
    return fhir_response(await in_thread(request, node.bundles.process, who, bundle))


@router.get("/Patient/{res_id}/$everything")
async def everything(res_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    _check_id(res_id)
    return fhir_response(await in_thread(request, node.records.everything, who, res_id, _query(request)))


@router.get("/{res_type}")
async def search(res_type: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """search-type (https://hl7.org/fhir/R4/http.html#search)."""
    _check_type(res_type)
    if res_type == SERVER_MANAGED:
        return fhir_response(await in_thread(request, node.audit_events.search, who, _query(request),
                                                     strict=_strict(request)))
    return fhir_response(await in_thread(request, node.records.search, who, res_type, _query(request),
                                                 strict=_strict(request)))


@router.post("/{res_type}/_search")
async def search_post(res_type: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    _check_type(res_type)
    form = await request.form()
    items = _query(request) + [(k, str(v)) for k, v in form.multi_items()]
    if res_type == SERVER_MANAGED:
        return fhir_response(await in_thread(request, node.audit_events.search, who, items, strict=_strict(request)))
    return fhir_response(await in_thread(request, node.records.search, who, res_type, items, strict=_strict(request)))


@router.get("/{res_type}/_history")
async def history_type(res_type: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    _check_type(res_type, write=True)
    return fhir_response(await in_thread(request, node.records.history, who, res_type, None, _query(request)))


@router.post("/{res_type}")
async def create(res_type: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """create (https://hl7.org/fhir/R4/http.html#create), conditional with If-None-Exist."""
    _check_type(res_type, write=True)
    resource, raw = await read_json_text(request, node.settings.max_body_bytes)
    if isinstance(resource, dict) and resource.get("resourceType") != res_type:
        raise InvalidInput(f"resourceType {resource.get('resourceType')!r} in the body does not match {res_type!r} in the URL")
    if res_type in PRESCRIPTION_TYPES and who.role == PRESCRIPTION_TYPES[res_type]:
        return await _prescription_create(res_type, resource, request, node, who)
    if _is_consent_write(res_type, who):
        stored, _ = await in_thread(request, node.consent_service.grant, who, resource)
        return _resource_response(node, stored, 201)
    if_none_exist = request.headers.get("if-none-exist")
    # a conditional create searches first: that may take long, so it takes a thread
    run = in_thread if if_none_exist else in_place
    stored, created = await run(request, node.records.create, who, resource, if_none_exist=if_none_exist, raw=raw)
    return _resource_response(node, stored, 201 if created else 200)


# e-prescriptions (https://hl7.org/fhir/R4/medicationrequest.html, medicationdispense.html): the one
# place where a create goes to ``prescriptions.service`` instead of the generic create. A
# practitioner's MedicationRequest is issued (signed token, chain record); a pharmacist's
# MedicationDispense is a dispense checked against the chain (409 OperationOutcome with the
# contract's reason when refused). Other roles (a service importing history) keep the generic create.
PRESCRIPTION_TYPES = {"MedicationRequest": "practitioner", "MedicationDispense": "pharmacist"}


async def _prescription_create(res_type: str, resource: Any, request: Request, node, who) -> Response:  # type: ignore[no-untyped-def]
    service = PrescriptionService.for_node(node)
    if res_type == "MedicationRequest":
        stored, token = await in_thread(request, service.issue_with_records, who, resource)
        response = _resource_response(node, stored, 201)
        response.headers[TOKEN_HEADER] = token
        return response
    if not isinstance(resource, dict):
        raise InvalidInput("expected a MedicationDispense object")
    refs = resource.get("authorizingPrescription") or []
    prescription = refs[0].get("reference") if refs and isinstance(refs[0], dict) else None
    token = request.headers.get(TOKEN_HEADER) or service.token_of(resource)
    quantity = (resource.get("quantity") or {}).get("value") if isinstance(resource.get("quantity"), dict) else None
    stored = await in_thread(request, service.dispense, who, quantity, token=token, prescription=prescription,
                             resource=resource)
    return _resource_response(node, stored, 201)


# patient consent (https://hl7.org/fhir/R4/consent.html): the one place where Consent writes go to
# ``policy.service`` (signed by the patient, recorded on chain, enforced from the chain's state)
# instead of the generic interactions. A service principal (a trusted import) keeps the generic ones.
def _is_consent_write(res_type: str, who) -> bool:  # type: ignore[no-untyped-def]
    return res_type == "Consent" and who.role != "service"


@router.get("/{res_type}/{res_id}")
async def read(res_type: str, res_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """read (https://hl7.org/fhir/R4/http.html#read)."""
    _check_type(res_type)
    if res_type == SERVER_MANAGED:
        return fhir_response(await in_place(request, node.audit_events.read, who, res_id))
    _check_id(res_id)
    return _resource_response(node, await in_place(request, node.records.read, who, res_type, res_id))


@router.put("/{res_type}/{res_id}")
async def update(res_type: str, res_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """update (https://hl7.org/fhir/R4/http.html#update) with If-Match (412 on a stale version)."""
    _check_type(res_type, write=True)
    _check_id(res_id, write=True)
    resource, raw = await read_json_text(request, node.settings.max_body_bytes)
    if _is_consent_write(res_type, who):
        stored, _ = await in_thread(request, node.consent_service.update, who, res_id, resource)
        return _resource_response(node, stored)
    if_match = parse_etag(request.headers.get("if-match"))
    stored, created = await in_place(request, node.records.update, who, res_type, res_id, resource, if_match=if_match,
                                     raw=raw)
    return _resource_response(node, stored, 201 if created else 200)


@router.delete("/{res_type}/{res_id}")
async def delete(res_type: str, res_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """delete (https://hl7.org/fhir/R4/http.html#delete)."""
    _check_type(res_type, write=True)
    _check_id(res_id)
    if _is_consent_write(res_type, who):
        stored, _ = await in_thread(request, node.consent_service.withdraw, who, res_id)
        return Response(status_code=204, headers={"ETag": stored.etag} if stored else None)
    stored = await in_place(request, node.records.delete, who, res_type, res_id)
    headers = {"ETag": stored.etag} if stored else None
    return Response(status_code=204, headers=headers)


@router.get("/{res_type}/{res_id}/_history")
async def history_instance(res_type: str, res_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    _check_type(res_type, write=True)
    _check_id(res_id)
    return fhir_response(await in_thread(request, node.records.history, who, res_type, res_id, _query(request)))


@router.get("/{res_type}/{res_id}/_history/{vid}")
async def vread(res_type: str, res_id: str, vid: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    """vread (https://hl7.org/fhir/R4/http.html#vread)."""
    _check_type(res_type, write=True)
    _check_id(res_id)
    return _resource_response(node, await in_place(request, node.records.vread, who, res_type, res_id, _version(vid)))
