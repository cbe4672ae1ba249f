"""Research export endpoint (issue 5, point 6).

    GET /api/research/{study_id}/export   the study's de-identified data as FHIR NDJSON
                                          (application/fhir+ndjson, one resource per line, in
                                          resourceType order); 403 unless the caller is a
                                          researcher on the study (``policy.research``)

Authentication is the Bearer access token (``web.deps.Ctx``); the route calls one use case in a
worker thread and does no SQL and no authorization.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from teleledger.bootstrap import Node
from teleledger.records.research_export import research_export
from teleledger.web.deps import Ctx, NodeDep, in_thread

router = APIRouter(prefix="/api")


def include(app: FastAPI, node: Node) -> None:
    """Mount the route, and build the export service now: it installs the ResearchStudy
    membership guard (``policy.research``) before the app accepts its first write."""
    research_export(node)
    app.include_router(router)


def _export(node, who, study_id: str) -> bytes:  # type: ignore[no-untyped-def]
    # materialized in the worker thread: each page is its own unit of work, and a refusal
    # (403) must come before any byte of the body
    return b"".join(line.encode() + b"\n" for _, line in research_export(node).export(who, study_id))


@router.get("/research/{study_id}/export")
async def export(request: Request, study_id: str, node: NodeDep, who: Ctx) -> Response:
    body = await in_thread(request, _export, node, who, study_id)
    return Response(body, media_type="application/fhir+ndjson")
