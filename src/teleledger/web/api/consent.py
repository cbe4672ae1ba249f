"""App endpoints of patient consent (JSON; errors are OperationOutcomes).

    POST /api/break-glass     a practitioner's emergency claim {"patient": "Patient/<id>" | "<id>",
                              "reason": "..."} → 201 {"claim_id", "patient", "expires"}; reads then
                              need ``X-Purpose-Of-Use: ETREAT`` and are audited as break-glass (BTG)
    GET  /api/consent/explain/{audit_event_id}
                              the consent or rule that allowed an access, with the ConsentRegistry
                              key and the chain transaction and block (to whoever may read that AuditEvent)

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


@router.get("/consent/explain/{audit_event_id}")
async def explain(audit_event_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    event = await in_thread(request, node.audit_events.read, who, audit_event_id)
    answer = await in_thread(request, node.consent_service.explain, event)
    return Response(orjson.dumps(answer), media_type="application/json")
