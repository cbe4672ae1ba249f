"""App endpoints of clinical notes and secure messaging (JSON; errors are OperationOutcomes).

    GET    /api/encounters/{id}/note          the caller's own draft of the encounter's note ({"draft": null} if none)
    POST   /api/encounters/{id}/note          save the draft {"type", "subjective", "objective", "assessment", "plan"}
    DELETE /api/encounters/{id}/note          discard the draft (204)
    POST   /api/encounters/{id}/note/sign     sign the draft (or the sections sent) → 201 {"composition", "provenance"}
    POST   /api/encounters/{id}/conditions    record a Condition {"text", "snomed", "clinical_status"} → 201
    POST   /api/encounters/{id}/vitals        record vital signs {"systolic", "diastolic", "heart_rate",
                                              "temperature", "weight"} → 201 {"observations": [...]}
    GET    /api/compositions/{id}/verify      [?version=n] is that version signed by its practitioner?
    GET    /api/messages                      the caller's threads {"threads": [...], "unread": n}
    POST   /api/messages                      start a thread {"subject", "text", "patient" | "practitioners",
                                              "attachment": {"contentType", "data" (base64), "title"}} → 201
    GET    /api/messages/unread               {"total": n, "threads": {thread id: n}}
    GET    /api/messages/{thread}             one thread, oldest first (does not mark it read)
    POST   /api/messages/{thread}/replies     {"text", "attachment"} → 201
    POST   /api/messages/{thread}/read        mark the thread read → {"marked": n}
    GET    /api/messages/attachments/{comm}   a message's attachment, as a download

Authentication is the Bearer access token (``web.deps.Ctx``), as for ``/fhir``: these
endpoints never read the page session cookie, so no other site can make a browser call them.
Routes parse JSON and call one ``visits.notes`` / ``visits.messaging`` use case in a worker
thread; they do no SQL and no authorization.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from teleledger.core.errors import InvalidInput, NotFound
from teleledger.fhir.validation import ID_PATTERN
from teleledger.visits.messaging import MessagingService, NewAttachment
from teleledger.visits.notes import ConditionInput, NotesService, SoapNote, Vitals
from teleledger.web.api.fhir import read_json
from teleledger.web.deps import Ctx, in_thread

router = APIRouter(prefix="/api", tags=["notes and messages"])

_NOTE_FIELDS = frozenset({"type", "subjective", "objective", "assessment", "plan"})
_CONDITION_FIELDS = frozenset({"text", "snomed", "clinical_status"})
_VITAL_FIELDS = frozenset({"systolic", "diastolic", "heart_rate", "temperature", "weight"})
_THREAD_FIELDS = frozenset({"subject", "text", "patient", "practitioners", "attachment"})
_REPLY_FIELDS = frozenset({"text", "attachment"})
#: the JSON around a base64 attachment (base64 is 4/3 of the bytes)
_JSON_OVERHEAD = 64 * 1024


# ---- the per-app services -----------------------------------------------------------------------


def notes_service(app) -> NotesService:  # type: ignore[no-untyped-def]
    """The app's ``NotesService``, made from its node on first use (nothing at import time)."""
    service = getattr(app.state, "notes_service", None)
    if service is None:
        node = app.state.node
        service = app.state.notes_service = NotesService(node.engine, node.records, node.keystore)
    return service


def messaging_service(app) -> MessagingService:  # type: ignore[no-untyped-def]
    service = getattr(app.state, "messaging_service", None)
    if service is None:
        node = app.state.node
        service = app.state.messaging_service = MessagingService(
            node.engine, node.records, max_attachment_bytes=node.settings.max_attachment_bytes)
    return service


def message_body_limit(app) -> int:  # type: ignore[no-untyped-def]
    """Bytes a message request may have: the attachment as base64 plus the JSON around it."""
    return messaging_service(app).max_attachment_bytes * 4 // 3 + _JSON_OVERHEAD


# ---- parsing --------------------------------------------------------------------------------


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


def _created(body: Any) -> Response:
    return Response(orjson.dumps(body), status_code=201, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _check_id(value: str, what: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise NotFound(f"there is no {what} {value[:64]!r}")
    return value


async def _object(request: Request, allowed: frozenset[str], *, limit: int = 256 * 1024,
                  empty_ok: bool = False) -> dict:
    if empty_ok and request.headers.get("content-length") in (None, "0") and \
            request.headers.get("transfer-encoding") is None:
        return {}
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
    return body


def _attachment(value: Any) -> NewAttachment | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise InvalidInput('attachment must be {"contentType", "data" (base64), "title"}', expression="attachment")
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("attachment.data is not base64", expression="attachment.data") from None
    return NewAttachment(str(value.get("contentType") or ""), data, str(value.get("title") or ""))


def _practitioners(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput("practitioners must be a list of Practitioner ids or references", expression="practitioners")
    return [v.removeprefix("Practitioner/") for v in value]


# ---- notes ----------------------------------------------------------------------------------


@router.get("/encounters/{encounter_id}/note")
async def get_draft(request: Request, encounter_id: str, who: Ctx) -> Response:
    draft = await in_thread(request, notes_service(request.app).draft, who, _check_id(encounter_id, "encounter"))
    return _json({"draft": None if draft is None else draft.as_json()})


@router.post("/encounters/{encounter_id}/note")
async def save_draft(request: Request, encounter_id: str, who: Ctx) -> Response:
    body = await _object(request, _NOTE_FIELDS)
    note = SoapNote.of(body)
    draft = await in_thread(request, notes_service(request.app).save_draft, who, _check_id(encounter_id, "encounter"),
                            note, note_type=body.get("type") or "11506-3")
    return _json({"draft": draft.as_json()})


@router.delete("/encounters/{encounter_id}/note")
async def discard_draft(request: Request, encounter_id: str, who: Ctx) -> Response:
    await in_thread(request, notes_service(request.app).discard_draft, who, _check_id(encounter_id, "encounter"))
    return Response(status_code=204)


@router.post("/encounters/{encounter_id}/note/sign")
async def sign_note(request: Request, encounter_id: str, who: Ctx) -> Response:
    body = await _object(request, _NOTE_FIELDS, empty_ok=True)
    sections = set(body) - {"type"}
    note = SoapNote.of(body) if sections else None
    signed = await in_thread(request, notes_service(request.app).sign, who, _check_id(encounter_id, "encounter"),
                             note, note_type=body.get("type"))
    return _created({"composition": signed.composition, "provenance": signed.provenance})


@router.post("/encounters/{encounter_id}/conditions")
async def record_condition(request: Request, encounter_id: str, who: Ctx) -> Response:
    condition = ConditionInput.of(await _object(request, _CONDITION_FIELDS))
    stored = await in_thread(request, notes_service(request.app).record_condition, who,
                             _check_id(encounter_id, "encounter"), condition)
    return _created(stored)


@router.post("/encounters/{encounter_id}/vitals")
async def record_vitals(request: Request, encounter_id: str, who: Ctx) -> Response:
    vitals = Vitals.of(await _object(request, _VITAL_FIELDS))
    stored = await in_thread(request, notes_service(request.app).record_vitals, who,
                             _check_id(encounter_id, "encounter"), vitals)
    return _created({"observations": stored})


@router.get("/compositions/{composition_id}/verify")
async def verify(request: Request, composition_id: str, who: Ctx) -> Response:
    raw = request.query_params.get("version")
    version = None
    if raw is not None:
        if not raw.isdigit() or not 0 < int(raw) < 10**9:
            raise InvalidInput("version must be a positive integer", expression="version")
        version = int(raw)
    result = await in_thread(request, notes_service(request.app).verify, who,
                             _check_id(composition_id, "Composition"), version)
    return _json(result.as_json())


# ---- messages -------------------------------------------------------------------------------


@router.get("/messages")
async def threads(request: Request, who: Ctx) -> Response:
    service = messaging_service(request.app)
    listed = await in_thread(request, service.threads, who)
    unread = await in_thread(request, service.unread, who)
    return _json({"threads": [t.as_json() for t in listed], "unread": unread.total})


@router.post("/messages")
async def start_thread(request: Request, who: Ctx) -> Response:
    body = await _object(request, _THREAD_FIELDS, limit=message_body_limit(request.app))
    patient = body.get("patient")
    if patient is not None and not isinstance(patient, str):
        raise InvalidInput("patient must be a Patient id or reference", expression="patient")
    message = await in_thread(
        request, messaging_service(request.app).start_thread, who, topic=body.get("subject"), text=body.get("text"),
        patient_id=patient.removeprefix("Patient/") if patient else None,
        practitioner_ids=_practitioners(body.get("practitioners")), attachment=_attachment(body.get("attachment")))
    return _created(message.as_json())


@router.get("/messages/unread")
async def unread(request: Request, who: Ctx) -> Response:
    counts = await in_thread(request, messaging_service(request.app).unread, who)
    return _json({"total": counts.total, "threads": counts.by_thread})


@router.get("/messages/attachments/{communication_id}")
async def attachment(request: Request, communication_id: str, who: Ctx) -> Response:
    title, content_type, data = await in_thread(request, messaging_service(request.app).attachment, who,
                                                _check_id(communication_id, "message"))
    return attachment_response(title, content_type, data)


def attachment_response(title: str, content_type: str, data: bytes) -> Response:
    """A stored attachment as a download: never rendered inline by the browser, never sniffed."""
    return Response(data, media_type=content_type, headers={
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(title)}",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; sandbox"})


@router.get("/messages/{thread_id}")
async def thread(request: Request, thread_id: str, who: Ctx) -> Response:
    found = await in_thread(request, messaging_service(request.app).thread, who, _check_id(thread_id, "thread"))
    return _json(found.as_json())


@router.post("/messages/{thread_id}/replies")
async def reply(request: Request, thread_id: str, who: Ctx) -> Response:
    body = await _object(request, _REPLY_FIELDS, limit=message_body_limit(request.app))
    message = await in_thread(request, messaging_service(request.app).reply, who, _check_id(thread_id, "thread"),
                              text=body.get("text"), attachment=_attachment(body.get("attachment")))
    return _created(message.as_json())


@router.post("/messages/{thread_id}/read")
async def mark_read(request: Request, thread_id: str, who: Ctx) -> Response:
    marked = await in_thread(request, messaging_service(request.app).mark_read, who, _check_id(thread_id, "thread"))
    return _json({"marked": marked})

