"""The video visit room page: ``GET /visits/{appointment_id}/room``.

One page for both people of a visit. The patient sees the waiting room until the practitioner
admits them; the practitioner sees who waits and admits, ends the visit, and finds the
"Prescribe" and "Write visit note" entries. ``static/visit.js`` does the rest in the browser:
camera and microphone, the RTCPeerConnection, signaling over ``/visits/{id}/ws``, the connection
quality, reconnection, chat and files (``web.api.signaling``).

The page reads the visit through ``visits.rooms.VisitRooms.enter`` as the signed-in person, so
the Appointment (and the Encounter and the other person's name) pass the same policy decision
point and are audited exactly as through the FHIR API. A visit that is not open (too early,
ended long ago, cancelled) or not theirs gets a page that says why, never a stack trace.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from teleledger.core.errors import TeleledgerError
from teleledger.visits.attachments import ALLOWED_TYPES
from teleledger.visits.rooms import MAX_CHAT_CHARS
from teleledger.web.api.signaling import visit_rooms
from teleledger.web.ui.session import PagePrincipal, render

router = APIRouter(tags=["ui"])

#: headings of the refusal page, by room state
_REFUSED = {"not-open": "Your visit has not started yet", "closed": "This visit cannot be joined"}


def _size_text(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n // 1024} KB"


@router.get("/visits/{appointment_id}/room", response_class=HTMLResponse)
def visit_room(appointment_id: str, request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return RedirectResponse(f"/login?next=/visits/{appointment_id}/room", status_code=303,
                                headers={"Cache-Control": "no-store"})
    rooms = visit_rooms(request.app)
    try:
        room = rooms.enter(user, appointment_id)
    except TeleledgerError as exc:
        return render(request, "forbidden.html", {"message": exc.message}, status=exc.status if exc.status < 500 else 503,
                      user=user)
    if room.state in _REFUSED:
        return render(request, "visit_room.html", {"room": room, "refused": _REFUSED[room.state]}, status=403,
                      user=user)
    max_bytes = rooms.settings.max_attachment_bytes
    return render(request, "visit_room.html", {
        "room": room,
        "refused": None,
        "ice_json": json.dumps(rooms.ice_servers(user), separators=(",", ":")),
        "max_file_bytes": max_bytes,
        "max_file_text": _size_text(max_bytes),
        "max_chat_chars": MAX_CHAT_CHARS,
        "allowed_types": " ".join(ALLOWED_TYPES),
        "allowed_labels": ", ".join(ALLOWED_TYPES.values()),
        "minutes": ((room.encounter or {}).get("length") or {}).get("value"),
    }, user=user)
