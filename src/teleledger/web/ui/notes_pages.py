"""Server-rendered pages of clinical notes and secure messaging (no JavaScript needed).

    GET  /console/encounters/{id}/note       the practitioner's note: SOAP form, save draft, sign;
    POST /console/encounters/{id}/note       record a Condition and vital signs; earlier signed versions
    POST /console/encounters/{id}/conditions
    POST /console/encounters/{id}/vitals
    GET  /portal/notes                       "My notes": the patient's signed notes, each verified
    GET  /portal/notes/{composition_id}      one note (``?version=n`` for an earlier version), verified
    GET  /portal/messages, /console/messages           threads with unread counts; new message
    POST /portal/messages, /console/messages           start a thread (multipart: text and a file)
    GET  /portal/messages/{thread}, /console/messages/{thread}   a thread (marks it read); reply
    POST /portal/messages/{thread}, /console/messages/{thread}
    GET  /portal/messages/attachments/{communication_id}         a message's file, as a download

Every page reads and writes through ``visits.notes`` / ``visits.messaging`` as the signed-in
person, so every resource shown passes the same policy decision point and is audited exactly as
through the FHIR API. A form that is refused (over a limit, a forbidden file type, not the
encounter's practitioner, a stale amendment) is shown again with the person's text still in it
and a message saying what to do: nothing typed is lost and nothing half-written is stored.
Forms rely on the session cookie's ``SameSite=Strict`` against cross-site posts (``session``).

Importing this module also registers ``nav_unread`` for every page (the navigation badge and the
portal's notifications): the count of unread messages, from ``message_reads`` only; and the
template filters ``notes_utc`` (an instant as UTC text) and ``notes_file_size``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from teleledger.core.errors import InvalidInput, PayloadTooLarge, TeleledgerError
from teleledger.policy.model import Principal
from teleledger.visits.attachments import ALLOWED_TYPES
from teleledger.visits.messaging import MAX_TEXT_CHARS, MAX_TOPIC_CHARS, NewAttachment, Thread, display_name
from teleledger.visits.notes import (
    CLINICAL_STATUSES,
    NOTE_TYPES,
    SECTIONS,
    ConditionInput,
    SoapNote,
    Verification,
    Vitals,
    div_to_text,
)
from teleledger.web.api.notes import attachment_response, messaging_service, notes_service
from teleledger.web.deps import in_thread
from teleledger.web.ui import session
from teleledger.web.ui.session import PagePrincipal, page_principal, render

log = logging.getLogger("teleledger.web")
router = APIRouter(tags=["ui"])

#: what a successful form says after its redirect (``?done=``)
_DONE = {
    "saved": "Draft saved. Only you can see it until you sign it.",
    "signed": "Note signed. The patient can now read it in their portal.",
    "discarded": "Draft discarded.",
    "condition": "Condition recorded.",
    "vitals": "Vital signs recorded.",
    "sent": "Message sent.",
}


def _nav_unread(request: Request) -> dict[str, Any]:
    """``nav_unread`` for base.html and portal.html: unread messages of the signed-in patient or
    practitioner, None for everyone else. A failure leaves the badge out, never the page."""
    user = page_principal(request)
    if user is None or user.role not in ("patient", "practitioner") or user.fhir_user is None:
        return {"nav_unread": None}
    try:
        return {"nav_unread": messaging_service(request.app).unread(user).total}
    except (TeleledgerError, SQLAlchemyError) as exc:
        log.warning("unread count unavailable: %s", type(exc).__name__)
        return {"nav_unread": None}


def _utc_text(instant: object) -> str:
    """``2024-06-01T10:00:00.000Z`` → ``2024-06-01 10:00 UTC`` (the markup keeps the instant in
    ``<time datetime>``)."""
    try:
        moment = datetime.fromisoformat(str(instant).replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return str(instant)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _file_size(n: object) -> str:
    size = int(n) if isinstance(n, (int, float)) else 0
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    return f"{size / 1024:.0f} KB" if size >= 1024 else f"{size} bytes"


if _nav_unread not in session.templates.context_processors:
    session.templates.context_processors.append(_nav_unread)
session.templates.env.filters.setdefault("notes_utc", _utc_text)
session.templates.env.filters.setdefault("notes_file_size", _file_size)


def _to_login(path: str) -> Response:
    return RedirectResponse(f"/login?next={path}", status_code=303, headers={"Cache-Control": "no-store"})


def _back(path: str, done: str) -> Response:
    return RedirectResponse(f"{path}?done={done}", status_code=303, headers={"Cache-Control": "no-store"})


def _refused(request: Request, user: Principal, exc: TeleledgerError) -> HTMLResponse:
    return render(request, "forbidden.html", {"message": exc.message},
                  status=exc.status if exc.status < 500 else 503, user=user)


def _status(exc: TeleledgerError) -> int:
    return exc.status if exc.status < 500 else 503


def _text(values: Any, name: str) -> str:
    value = values.get(name)
    return value if isinstance(value, str) else ""


# ---- the clinician's note page -----------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    version: str
    status: str
    date: str
    href: str


def _note_context(page: Any, encounter_id: str) -> dict:
    versions = [VersionRow(v.get("meta", {}).get("versionId", ""), v.get("status", ""), v.get("date", ""),
                           f"/portal/notes/{v['id']}?version={v.get('meta', {}).get('versionId', '')}")
                for v in page.versions]
    enc = page.encounter
    return {
        "encounter_id": encounter_id, "encounter": enc, "patient_name": display_name(page.patient) or "the patient",
        "period": (enc.get("period") or {}).get("start", ""), "encounter_status": enc.get("status", ""),
        "versions": versions, "signed": page.current is not None, "draft": page.draft,
        "conditions": [(c.get("code", {}).get("text") or next((x.get("code") for x in c.get("code", {}).get("coding", [])), ""),
                        next((x.get("code") for x in c.get("clinicalStatus", {}).get("coding", [])), ""))
                       for c in page.conditions],
        "vitals": [_vital_text(o) for o in page.vitals],
    }


def _vital_text(obs: dict) -> tuple[str, str, str]:
    name = obs.get("code", {}).get("text") or next((c.get("display") for c in obs.get("code", {}).get("coding", [])), "")
    if "component" in obs:
        parts = [c.get("valueQuantity", {}) for c in obs["component"]]
        value = "/".join(str(p.get("value", "")) for p in parts) + " " + (parts[0].get("unit", "") if parts else "")
    else:
        q = obs.get("valueQuantity", {})
        value = f"{q.get('value', '')} {q.get('unit', '')}"
    return name, value.strip(), obs.get("effectiveDateTime", "")


def _note_page(request: Request, user: Principal, encounter_id: str, *, error: str = "", status: int = 200,
               form: dict | None = None, condition_form: dict | None = None, vitals_form: dict | None = None,
               error_target: str = "note") -> HTMLResponse:
    try:
        page = notes_service(request.app).note_page(user, encounter_id)
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    ctx = _note_context(page, encounter_id)
    values = form if form is not None else {**page.form.as_dict(), "type": page.note_type}
    ctx.update({
        "sections": SECTIONS, "note_types": NOTE_TYPES, "values": values, "error": error,
        "error_target": error_target, "done": _DONE.get(request.query_params.get("done", ""), ""),
        "condition_form": condition_form or {}, "vitals_form": vitals_form or {},
        "clinical_statuses": CLINICAL_STATUSES, "max_section_chars": 20_000,
    })
    return render(request, "notes_editor.html", ctx, status=status, user=user)


@router.get("/console/encounters/{encounter_id}/note", response_class=HTMLResponse)
def note_editor(request: Request, encounter_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login(f"/console/encounters/{encounter_id}/note")
    return _note_page(request, user, encounter_id)


@router.post("/console/encounters/{encounter_id}/note", response_class=HTMLResponse)
async def note_submit(request: Request, encounter_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login(f"/console/encounters/{encounter_id}/note")
    path = f"/console/encounters/{encounter_id}/note"
    form = await request.form()
    values = {name: _text(form, name) for name, _, _, _ in SECTIONS} | {"type": _text(form, "type")}
    action = _text(form, "action")
    service = notes_service(request.app)
    try:
        if action == "discard":
            await in_thread(request, service.discard_draft, user, encounter_id)
            return _back(path, "discarded")
        note = SoapNote.of(values)
        if action == "sign":
            await in_thread(request, service.sign, user, encounter_id, note, note_type=values["type"] or None)
            return _back(path, "signed")
        if action != "save":
            raise InvalidInput("choose Save draft or Sign note")
        await in_thread(request, service.save_draft, user, encounter_id, note, note_type=values["type"] or "11506-3")
        return _back(path, "saved")
    except TeleledgerError as exc:
        # the page again, with the practitioner's text in the form and what went wrong
        return await in_thread(request, _note_page, request, user, encounter_id, error=exc.message,
                               status=_status(exc), form=values)


@router.post("/console/encounters/{encounter_id}/conditions", response_class=HTMLResponse)
async def condition_submit(request: Request, encounter_id: str, user: PagePrincipal) -> Response:
    path = f"/console/encounters/{encounter_id}/note"
    if user is None:
        return _to_login(path)
    form = await request.form()
    values = {k: _text(form, k) for k in ("text", "snomed", "clinical_status")}
    try:
        await in_thread(request, notes_service(request.app).record_condition, user, encounter_id,
                        ConditionInput.of(values))
        return _back(path, "condition")
    except TeleledgerError as exc:
        return await in_thread(request, _note_page, request, user, encounter_id, error=exc.message,
                               status=_status(exc), condition_form=values, error_target="condition")


@router.post("/console/encounters/{encounter_id}/vitals", response_class=HTMLResponse)
async def vitals_submit(request: Request, encounter_id: str, user: PagePrincipal) -> Response:
    path = f"/console/encounters/{encounter_id}/note"
    if user is None:
        return _to_login(path)
    form = await request.form()
    values = {k: _text(form, k) for k in ("systolic", "diastolic", "heart_rate", "temperature", "weight")}
    try:
        await in_thread(request, notes_service(request.app).record_vitals, user, encounter_id, Vitals.of(values))
        return _back(path, "vitals")
    except TeleledgerError as exc:
        return await in_thread(request, _note_page, request, user, encounter_id, error=exc.message,
                               status=_status(exc), vitals_form=values, error_target="vitals")


# ---- the patient's notes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteView:
    id: str
    title: str
    version: str
    status: str
    date: str
    author: str
    sections: list[tuple[str, str]]
    verification: Verification
    signer: str
    versions: list[VersionRow]


def _note_view(composition: dict, verification: Verification, names: dict[str, str],
               versions: list[VersionRow] | None = None) -> NoteView:
    author = next((a.get("reference", "") for a in composition.get("author", [])), "")
    sections = [(s.get("title", ""), div_to_text((s.get("text") or {}).get("div", "")))
                for s in composition.get("section", [])]
    signer = names.get(verification.practitioner or "", verification.practitioner or "unknown")
    return NoteView(composition["id"], composition.get("title", "Note"), composition.get("meta", {}).get("versionId", ""),
                    composition.get("status", ""), composition.get("date", ""), names.get(author, author), sections,
                    verification, signer, versions or [])


def _my_notes(request: Request, user: Principal) -> HTMLResponse:
    try:
        notes = notes_service(request.app).patient_notes(user)
        refs = [r for n, v in notes for r in ([v.practitioner] if v.practitioner else [])
                + [a.get("reference", "") for a in n.get("author", [])]]
        names = messaging_service(request.app).names(user, refs)
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    return render(request, "notes_list.html", {"notes": [_note_view(n, v, names) for n, v in notes]}, user=user)


@router.get("/portal/notes", response_class=HTMLResponse)
def my_notes(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/notes")
    return _my_notes(request, user)


@router.get("/portal/notes/{composition_id}", response_class=HTMLResponse)
def note_version(request: Request, composition_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/notes")
    raw = request.query_params.get("version", "")
    version = int(raw) if raw.isdigit() and 0 < int(raw) < 10**9 else None
    service = notes_service(request.app)
    try:
        composition = service.composition(user, composition_id, version)
        verification = service.verify(user, composition_id, int(composition["meta"]["versionId"]))
        history = service.versions(user, composition_id)
        refs = [verification.practitioner or ""] + [a.get("reference", "") for a in composition.get("author", [])]
        names = messaging_service(request.app).names(user, refs)
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    rows = [VersionRow(v["meta"]["versionId"], v.get("status", ""), v.get("date", ""),
                       f"/portal/notes/{composition_id}?version={v['meta']['versionId']}") for v in history]
    view = _note_view(composition, verification, names, rows)
    latest = rows[0].version if rows else view.version
    return render(request, "notes_view.html", {"note": view, "latest": latest}, user=user)


# ---- messages ------------------------------------------------------------------------------------


def _area(user: Principal) -> str:
    return "/portal/messages" if user.role == "patient" else "/console/messages"


def _wrong_area(request: Request, user: Principal, path: str) -> Response | None:
    """Patients use /portal/messages, practitioners /console/messages: send each to theirs."""
    base = _area(user)
    if user.role not in ("patient", "practitioner"):
        return render(request, "forbidden.html",
                      {"message": f"Secure messages are for patients and practitioners; you are signed in as a {user.role}."},
                      status=403, user=user)
    if not path.startswith(base):
        return RedirectResponse(base + path.split("/messages", 1)[1], status_code=303)
    return None


def _limits(request: Request) -> dict:
    max_bytes = messaging_service(request.app).max_attachment_bytes
    return {"max_file_text": f"{max_bytes / (1024 * 1024):.0f} MB" if max_bytes >= 1024 * 1024 else f"{max_bytes // 1024} KB",
            "allowed_types": ",".join(ALLOWED_TYPES), "allowed_labels": ", ".join(ALLOWED_TYPES.values()),
            "max_text_chars": MAX_TEXT_CHARS, "max_topic_chars": MAX_TOPIC_CHARS}


def _threads_page(request: Request, user: Principal, *, error: str = "", status: int = 200,
                  form: dict | None = None) -> HTMLResponse:
    service = messaging_service(request.app)
    try:
        threads = service.threads(user)
        contacts = service.contacts(user)
        names = service.names(user, [p for t in threads for p in t.participants])
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    rows = [{"thread": t, "href": f"{_area(user)}/{t.thread_id}",
             "with": ", ".join(names.get(p, p) for p in sorted(t.participants) if p != user.fhir_user)}
            for t in threads]
    return render(request, "messages_list.html", {
        "rows": rows, "contacts": contacts, "area": _area(user), "form": form or {}, "error": error,
        "done": _DONE.get(request.query_params.get("done", ""), ""), **_limits(request)}, status=status, user=user)


@router.get("/portal/messages", response_class=HTMLResponse)
@router.get("/console/messages", response_class=HTMLResponse)
def messages(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/messages")
    return _wrong_area(request, user, request.url.path) or _threads_page(request, user)


async def _message_form(request: Request) -> tuple[dict, NewAttachment | None]:
    """The fields of a message form and its file, refusing a body over the limit before parsing."""
    # up to twice the file limit is parsed, so that the file check can refuse it with the
    # person's text still in the form; anything larger is refused unread
    limit = 2 * messaging_service(request.app).max_attachment_bytes + 64 * 1024
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the message with its file is {int(declared) / (1024 * 1024):.1f} MB; files may be at "
                              f"most {_limits(request)['max_file_text']}")
    try:
        form = await request.form(max_files=1, max_fields=50)
    except MultiPartException as exc:
        raise InvalidInput(f"the form could not be read: {exc.message}") from None
    values = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    values["practitioners"] = [v for v in form.getlist("practitioners") if isinstance(v, str)]  # type: ignore[assignment]
    upload = form.get("file")
    attachment = None
    if isinstance(upload, UploadFile) and upload.filename:
        max_bytes = messaging_service(request.app).max_attachment_bytes
        data = await upload.read(max_bytes + 1)  # one byte over is enough to refuse it
        attachment = NewAttachment(upload.content_type or "", data, upload.filename)
    return values, attachment


@router.post("/portal/messages", response_class=HTMLResponse)
@router.post("/console/messages", response_class=HTMLResponse)
async def messages_submit(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/messages")
    wrong = _wrong_area(request, user, request.url.path)
    if wrong is not None:
        return wrong
    values: dict = {}
    try:
        values, attachment = await _message_form(request)
        message = await in_thread(
            request, messaging_service(request.app).start_thread, user, topic=values.get("subject"),
            text=values.get("text"), patient_id=(values.get("patient") or "").removeprefix("Patient/") or None,
            practitioner_ids=[p.removeprefix("Practitioner/") for p in values.get("practitioners", [])],
            attachment=attachment)
    except TeleledgerError as exc:
        return await in_thread(request, _threads_page, request, user, error=exc.message, status=_status(exc),
                               form=values)
    return _back(f"{_area(user)}/{message.thread_id}", "sent")


def _thread_page(request: Request, user: Principal, thread_id: str, *, error: str = "", status: int = 200,
                 form: dict | None = None) -> HTMLResponse:
    service = messaging_service(request.app)
    try:
        thread: Thread = service.thread(user, thread_id, mark_read=True)
        names = service.names(user, thread.participants)
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    return render(request, "messages_thread.html", {
        "thread": thread, "names": names, "me": user.fhir_user, "area": _area(user), "form": form or {},
        "error": error, "done": _DONE.get(request.query_params.get("done", ""), ""), **_limits(request),
        "others": ", ".join(names.get(p, p) for p in sorted(thread.participants) if p != user.fhir_user),
    }, status=status, user=user)


@router.get("/portal/messages/attachments/{communication_id}")
def message_attachment(request: Request, communication_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/messages")
    try:
        title, content_type, data = messaging_service(request.app).attachment(user, communication_id)
    except TeleledgerError as exc:
        return _refused(request, user, exc)
    return attachment_response(title, content_type, data)


@router.get("/portal/messages/{thread_id}", response_class=HTMLResponse)
@router.get("/console/messages/{thread_id}", response_class=HTMLResponse)
def message_thread(request: Request, thread_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/messages")
    return _wrong_area(request, user, request.url.path) or _thread_page(request, user, thread_id)


@router.post("/portal/messages/{thread_id}", response_class=HTMLResponse)
@router.post("/console/messages/{thread_id}", response_class=HTMLResponse)
async def message_reply(request: Request, thread_id: str, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/messages")
    wrong = _wrong_area(request, user, request.url.path)
    if wrong is not None:
        return wrong
    values: dict = {}
    try:
        values, attachment = await _message_form(request)
        await in_thread(request, messaging_service(request.app).reply, user, thread_id, text=values.get("text"),
                        attachment=attachment)
    except TeleledgerError as exc:
        return await in_thread(request, _thread_page, request, user, thread_id, error=exc.message,
                               status=_status(exc), form=values)
    return _back(f"{_area(user)}/{thread_id}", "sent")
