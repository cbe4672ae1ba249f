"""App endpoints of patient consent (JSON; errors are OperationOutcomes).

    POST /api/break-glass     a practitioner's emergency claim {"patient": "Patient/<id>" | "<id>",
                              "reason": "..."} → 201 {"claim_id", "patient", "expires"}; reads then
                              need ``X-Purpose-Of-Use: ETREAT`` and are audited as break-glass (BTG)
    GET  /api/break-glass     the privacy officer's review: the claims made by members of their
                              organization, newest first → 200 {"claims": [{"claim_id", "practitioner",
                              "practitioner_name", "patient", "organization", "started", "expires",
                              "status": "active" | "expired", "reason"}]}; an access event per patient
                              concerned; 403 for anyone but an admin linked to the organization
    GET  /api/consent/explain/{audit_event_id}
                              the consent or rule that allowed an access, with the ConsentRegistry
                              key and the chain transaction and block (to whoever may read that AuditEvent)
    POST /api/consent/delegates
                              the patient lets a RelatedPerson of theirs that an account signs in as
                              (a parent, guardian or caregiver) act for them, or stops it:
                              {"relatedPerson": "RelatedPerson/<id>", "enabled": true | false} → 200
                              the delegation (status "pending" until the chain has recorded it)
    GET  /api/consent/delegates
                              {"delegates": [the patient's delegates], "actingFor": [the patients this
                              account acts for]}, each {"delegation", "patient", "relatedPerson",
                              "status": "pending" | "active" | "removed", "enabled", "address", "tx",
                              "block", "display"}

Authentication is the Bearer access token (``web.deps.Ctx``). Routes parse JSON and call one
``policy.service`` use case in a worker thread; they do no SQL and no authorization.
"""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from teleledger.core.errors import InvalidInput
from teleledger.web.deps import Ctx, NodeDep, in_thread

router = APIRouter(prefix="/api")


@router.post("/break-glass")
async def break_glass(request: Request, node: NodeDep, who: Ctx) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidInput("expected a JSON object {\"patient\": ..., \"reason\": ...}") from None
    if not isinstance(body, dict):
        raise InvalidInput("expected a JSON object {\"patient\": ..., \"reason\": ...}")
    claim = await in_thread(request, node.consent_service.break_glass, who, body.get("patient"), body.get("reason"))
    expires = datetime.fromtimestamp(claim.expires_at, timezone.utc).isoformat().replace("+00:00", "Z")
    return Response(orjson.dumps({"claim_id": claim.claim_id, "patient": f"Patient/{claim.patient_id}",
                                  "expires": expires}), status_code=201, media_type="application/json")


def _instant(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@router.get("/break-glass")
async def break_glass_review(request: Request, node: NodeDep, who: Ctx) -> Response:
    claims = await in_thread(request, node.consent_service.break_glass_review, who)
    return Response(orjson.dumps({"claims": [
        {"claim_id": c.claim_id, "practitioner": c.practitioner, "practitioner_name": c.practitioner_name,
         "patient": c.patient, "organization": c.organization, "started": _instant(c.started),
         "expires": _instant(c.expires), "status": "active" if c.active else "expired", "reason": c.reason}
        for c in claims]}), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/consent/explain/{audit_event_id}")
async def explain(audit_event_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    event = await in_thread(request, node.audit_events.read, who, audit_event_id)
    answer = await in_thread(request, node.consent_service.explain, event)
    return Response(orjson.dumps(answer), media_type="application/json")


def _delegation(row) -> dict:  # type: ignore[no-untyped-def]
    return {"delegation": row.delegation, "patient": row.patient, "relatedPerson": row.related_person,
            "status": row.status, "enabled": row.enabled, "address": row.address, "tx": row.tx, "block": row.block,
            "display": row.display}


@router.post("/consent/delegates")
async def set_delegate(request: Request, node: NodeDep, who: Ctx) -> Response:
    usage = 'expected a JSON object {"relatedPerson": "RelatedPerson/<id>", "enabled": true | false}'
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidInput(usage) from None
    if not isinstance(body, dict):
        raise InvalidInput(usage)
    row = await in_thread(request, node.consent_service.set_delegate, who, body.get("relatedPerson"),
                          body.get("enabled"))
    return Response(orjson.dumps(_delegation(row)), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/consent/delegates")
async def delegates(request: Request, node: NodeDep, who: Ctx) -> Response:
    mine, acting = await in_thread(request, node.consent_service.delegations, who)
    return Response(orjson.dumps({"delegates": [_delegation(r) for r in mine], "actingFor": [_delegation(r) for r in acting]}),
                    media_type="application/json", headers={"Cache-Control": "no-store"})
