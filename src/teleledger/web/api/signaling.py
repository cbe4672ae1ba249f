"""The video visit over HTTP: the signaling WebSocket and the room's JSON endpoints.

    WS   /visits/{id}/ws                       signaling (``visits.signaling`` frames)
    GET  /api/visits/{id}                      the room's state as the caller sees it
    POST /api/visits/{id}/admit                practitioner: admit the waiting patient → Encounter
    POST /api/visits/{id}/end                  practitioner: end the visit → finished Encounter
    GET  /api/visits/{id}/messages             the visit's chat, oldest first
    POST /api/visits/{id}/messages             {"text": "..."} → 201, stored as a Communication
    POST /api/visits/{id}/files                multipart field ``file``, or JSON {"title",
                                               "contentType", "data" (base64)} → 201 (413 / 415)
    GET  /api/visits/{id}/files/{comm_id}      a shared file, as a download

Authentication: a Bearer access token (``Authorization`` header) or the browser session cookie
of ``web.ui.session``. With the cookie, a request that changes something and the WebSocket
handshake must come from this site's own pages (``Origin``): the cookie is ``SameSite=Strict``
already; the check keeps that true behind proxies that rewrite it.

A WebSocket that may not join is accepted and closed at once with ``4000 + the HTTP status`` the
same refusal would get (4401 signed out, 4403 not a participant or the room is closed, 4404 no
such visit, ...) and the reason as the close reason, so a browser can show why.

Routes parse, authenticate and call one ``visits.rooms`` use case; they do no SQL and no policy.
Errors become OperationOutcomes in ``web.errors``. The hub is per process: see the multi-process
note in ``visits.signaling``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import HTTPConnection

from teleledger.config import parse_ice_servers
from teleledger.core.errors import (
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TeleledgerError,
    Unauthenticated,
)
from teleledger.fhir.validation import ID_PATTERN
from teleledger.policy.model import Principal
from teleledger.visits.rooms import JoinWindow, Room, RoomSettings, VisitRooms, message_view
from teleledger.visits.signaling import Close, Connection, Hub, RoomRefused
from teleledger.web import deps
from teleledger.web.deps import in_thread
from teleledger.web.errors import FHIR_JSON
from teleledger.web.ui.session import page_principal

router = APIRouter(tags=["visits"])

#: a chat message's JSON body: 4,000 characters of up to 4 bytes each, and room to spare
MAX_MESSAGE_BODY = 32 * 1024
#: room for multipart headers or the JSON around a base64 file
UPLOAD_OVERHEAD = 64 * 1024
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# ---- the per-app service and hub ----------------------------------------------------------


def visit_rooms(app) -> VisitRooms:  # type: ignore[no-untyped-def]
    """The app's ``VisitRooms``, made from its node's settings on first use."""
    rooms = getattr(app.state, "visit_rooms", None)
    if rooms is None:
        node = app.state.node
        s = node.settings
        rooms = VisitRooms(node.records, RoomSettings(
            window=JoinWindow(early=timedelta(minutes=s.visit_join_early_minutes),
                              grace=timedelta(minutes=s.visit_join_grace_minutes)),
            max_attachment_bytes=s.max_attachment_bytes, ice_servers=parse_ice_servers(s.ice_servers),
            turn_secret=s.turn_secret, turn_ttl_seconds=s.turn_credential_ttl_seconds,
        ))
        app.state.visit_rooms = rooms
    return rooms


def signaling_hub(app) -> Hub:  # type: ignore[no-untyped-def]
    hub = getattr(app.state, "visit_hub", None)
    if hub is None:
        hub = app.state.visit_hub = Hub()
    return hub


# ---- who is asking --------------------------------------------------------------------------


def _same_origin(conn: HTTPConnection) -> bool:
    origin = conn.headers.get("origin")
    if not origin:
        return False
    scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
    own = {f"{scheme}://{conn.headers.get('host', '')}", conn.app.state.node.settings.public_url}
    return origin.rstrip("/") in own


async def _principal(conn: HTTPConnection, *, changes: bool) -> Principal:
    if conn.headers.get("authorization"):
        return await deps.principal(conn)  # type: ignore[arg-type]
    user = page_principal(conn)  # type: ignore[arg-type]
    if user is None:
        raise Unauthenticated("sign in first, or send a Bearer access token")
    if changes and not _same_origin(conn):
        raise Forbidden("this request did not come from this site's own pages (Origin), so it was refused")
    return user


async def visit_principal(request: Request) -> Principal:
    return await _principal(request, changes=request.method in _UNSAFE_METHODS)


VisitCtx = Annotated[Principal, Depends(visit_principal)]


def _check_id(value: str, what: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise NotFound(f"there is no {what} {value[:64]!r}")
    return value


# ---- WebSocket ------------------------------------------------------------------------------


def _close_reason(message: str) -> str:
    # a close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5)
    raw = message.encode()
    return message if len(raw) <= 123 else raw[:120].decode(errors="ignore") + "…"


async def _refuse(websocket: WebSocket, code: int, message: str) -> None:
    await websocket.accept()
    await websocket.close(code=code, reason=_close_reason(message))


async def _pump(websocket: WebSocket, conn: Connection) -> None:
    """Send what the hub queues for this connection, in order, until it says close."""
    while True:
        item = await conn.next()
        if isinstance(item, Close):
            with contextlib.suppress(Exception):
                await websocket.close(code=item.code, reason=_close_reason(item.reason))
            return
        await websocket.send_text(item)


@router.websocket("/visits/{appointment_id}/ws")
async def visit_socket(websocket: WebSocket, appointment_id: str) -> None:
    app = websocket.app
    try:
        principal = await _principal(websocket, changes=True)
        _check_id(appointment_id, "visit")
        room: Room = await in_thread(websocket, visit_rooms(app).join, principal, appointment_id)  # type: ignore[arg-type]
    except TeleledgerError as exc:
        await _refuse(websocket, 4000 + exc.status if 400 <= exc.status < 1000 else 4500, exc.message)
        return
    hub = signaling_hub(app)
    await websocket.accept()
    try:
        conn = hub.join(appointment_id, member=room.member, role=room.role, participants=room.visit.members,
                        admitted=room.state == "in-progress", encounter=room.encounter_id)
    except RoomRefused as exc:
        await websocket.close(code=4403, reason=_close_reason(exc.reason))
        return
    writer = asyncio.create_task(_pump(websocket, conn))
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            hub.receive(conn, text if text is not None else (message.get("bytes") or b""))
    except Exception:  # noqa: BLE001 - a broken socket ends this connection, nothing else
        pass
    finally:
        hub.leave(conn)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


# ---- JSON endpoints -------------------------------------------------------------------------


def _json(body: object, status: int = 200, *, media_type: str = "application/json",
          headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=media_type,
                    headers={"Cache-Control": "no-store", **(headers or {})})


def room_summary(room: Room) -> dict:
    return {
        "appointment": room.appointment_id, "state": room.state, "message": room.message, "you": room.role,
        "encounter": room.encounter_id, "opens": room.opens.isoformat(), "closes": room.closes.isoformat(),
        "start": room.visit.start.isoformat(), "end": room.visit.end.isoformat(),
    }


@router.get("/api/visits/{appointment_id}")
async def room_state(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    room = await in_thread(request, visit_rooms(request.app).enter, principal, appointment_id, details=False)
    return _json(room_summary(room))


@router.post("/api/visits/{appointment_id}/admit")
async def admit(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    encounter = await in_thread(request, visit_rooms(request.app).admit, principal, appointment_id)
    signaling_hub(request.app).admit(appointment_id, encounter["id"])
    return _json(encounter, media_type=FHIR_JSON)


@router.post("/api/visits/{appointment_id}/end")
async def end(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    encounter = await in_thread(request, visit_rooms(request.app).end, principal, appointment_id)
    signaling_hub(request.app).end(appointment_id, {"encounter": encounter["id"],
                                                   "minutes": (encounter.get("length") or {}).get("value")})
    return _json(encounter, media_type=FHIR_JSON)


@router.get("/api/visits/{appointment_id}/messages")
async def list_messages(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    messages = await in_thread(request, visit_rooms(request.app).messages, principal, appointment_id)
    return _json({"messages": messages})


async def _capped_stream(request: Request, limit: int, what: str) -> AsyncGenerator[bytes, None]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the {what} is {int(declared)} bytes; at most {limit} are accepted")
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"the {what} is larger than the limit of {limit} bytes")
        yield chunk


async def _read_capped(request: Request, limit: int, what: str) -> bytes:
    body = bytearray()
    async for chunk in _capped_stream(request, limit, what):
        body += chunk
    return bytes(body)


def _posted(request: Request, appointment_id: str, communication: dict) -> Response:
    view = message_view(communication, appointment_id)
    signaling_hub(request.app).publish(appointment_id, {"type": "chat", "message": view})
    return _json(view, 201, headers={"Location": f"/fhir/Communication/{communication['id']}"})


@router.post("/api/visits/{appointment_id}/messages")
async def post_message(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    raw = await _read_capped(request, MAX_MESSAGE_BODY, "message")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput('send the message as JSON: {"text": "..."}') from None
    text = body.get("text") if isinstance(body, dict) else None
    stored = await in_thread(request, visit_rooms(request.app).send_text, principal, appointment_id, text)
    return _posted(request, appointment_id, stored)


@router.post("/api/visits/{appointment_id}/files")
async def post_file(appointment_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    rooms = visit_rooms(request.app)
    max_bytes = rooms.settings.max_attachment_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parser = MultiPartParser(request.headers, _capped_stream(request, max_bytes + UPLOAD_OVERHEAD, "upload"),
                                 max_files=1, max_fields=4)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidInput(f"the upload is not valid multipart/form-data: {exc.message}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput('send the file in a multipart field named "file"')
        try:
            data = await upload.read()
        finally:
            await form.close()
        title, content_type = upload.filename, upload.content_type or ""
    elif ctype in ("application/json", ""):
        raw = await _read_capped(request, max_bytes * 4 // 3 + UPLOAD_OVERHEAD, "upload")
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("data"), str):
                raise ValueError
            data = base64.b64decode(body["data"], validate=True)
        except (ValueError, binascii.Error):
            raise InvalidInput('send the file as {"title": ..., "contentType": ..., "data": "<base64>"} '
                               "or as multipart/form-data") from None
        title, content_type = body.get("title"), body.get("contentType", "")
    else:
        raise InvalidInput(f"send the file as multipart/form-data or JSON, not {ctype[:60]}")
    stored = await in_thread(request, rooms.send_file, principal, appointment_id, title=title,
                             content_type=content_type, data=data)
    return _posted(request, appointment_id, stored)


@router.get("/api/visits/{appointment_id}/files/{communication_id}")
async def get_file(appointment_id: str, communication_id: str, request: Request, principal: VisitCtx) -> Response:
    _check_id(appointment_id, "visit")
    _check_id(communication_id, "file")
    title, content_type, data = await in_thread(request, visit_rooms(request.app).attachment, principal,
                                                appointment_id, communication_id)
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in title)
    return Response(data, media_type=content_type, headers={
        "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(title)}",
        "X-Content-Type-Options": "nosniff",
        # never rendered as this site's page, even if a browser ignored the attachment disposition
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "Cache-Control": "no-store",
    })
