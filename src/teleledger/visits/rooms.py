"""The video visit room: who may enter it and when, the waiting room, admission, in-visit chat
and files, and the end of the visit.

A visit is a FHIR ``Appointment`` naming one ``Patient/<p>`` and its ``Practitioner/<pr>``
among its participants, with a ``start`` and an ``end``. The room has no table of its own: its
state *is* the Appointment's status, so every other FHIR client sees the same thing.

    Appointment.status         room state     what happens
    booked, checked-in         waiting        the patient waits; the practitioner sees who waits
                               (not-open      before ``start - early`` and after ``end + grace``)
    arrived                    in-progress    Encounter (class VR) in-progress, chat and files
    fulfilled                  ended          Encounter finished with period.end and length
    cancelled, noshow, others  closed         nobody enters

    admit (practitioner):  booked → arrived   + Encounter created, period.start = now
    end   (practitioner):  arrived → fulfilled + Encounter finished, length in minutes

The Encounter of a visit has a fixed id derived from the Appointment's (``encounter_id_for``):
the room finds it again without a search or a table of its own, and two admissions racing each
other cannot create two Encounters (the second finds the Appointment already changed — its
update carries ``If-Match`` — or the Encounter's id taken).

Every read and write goes through ``teleledger.records`` *as the person in the room*: the
records policy (compartments, care relationships, SMART scopes) applies to each resource, and
each access is audited exactly as through the FHIR API. Who is in the room at all is decided by
``teleledger.policy.decide.join_visit`` / ``host_visit``; a refusal is audited as a denied access.

The first half of this module is a pure core (parsing an Appointment, the join window, building
the FHIR resources); ``VisitRooms`` is the service that runs each use case in one unit of work.
It must never speak HTTP, decide access itself, or log anything of a message or a file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal

from teleledger.core.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    Unprocessable,
)
from teleledger.policy import decide as policy
from teleledger.policy.model import Decision, Principal
from teleledger.records.service import AccessDenied
from teleledger.storage.db import UnitOfWork
from teleledger.visits.attachments import check_attachment, normalize_content_type

if TYPE_CHECKING:
    from teleledger.records.service import RecordsService
    from teleledger.records.store import Stored

__all__ = [
    "MAX_CHAT_CHARS",
    "JoinWindow",
    "Room",
    "RoomClosed",
    "Visit",
    "VisitRooms",
    "encounter_id_for",
    "message_view",
    "visit_from_appointment",
]

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
UCUM = "http://unitsofmeasure.org"
#: the longest chat message, in characters (a message, not a document: documents are files)
MAX_CHAT_CHARS = 4000
#: a shared file's name as shown to the other side
MAX_TITLE_CHARS = 200

# uuid5 namespace of visit Encounter ids: uuid5(NAMESPACE_URL, "teleledger:visit-encounter")
_ENCOUNTER_NS = uuid.uuid5(uuid.NAMESPACE_URL, "teleledger:visit-encounter")
_REF = re.compile(r"^(Patient|Practitioner)/([A-Za-z0-9\-.]{1,64})$")
# control characters: none in a file name; in chat text, all but tab and newline
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

State = Literal["not-open", "waiting", "in-progress", "ended", "closed"]
Role = Literal["patient", "practitioner"]

_WAITING_STATUSES = frozenset({"booked", "checked-in"})
_CLOSED_MESSAGES = {
    "cancelled": "This visit was cancelled.",
    "noshow": "This visit was marked as missed.",
    "entered-in-error": "This appointment was entered in error.",
}


class RoomClosed(Forbidden):
    """The room exists but cannot be entered now (not open yet, ended, cancelled)."""


# ---- pure core ------------------------------------------------------------------------------


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def fhir_instant(dt: datetime) -> str:
    return _utc(dt).astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_instant(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise Unprocessable(f"this appointment has no {what} time, so it cannot be held as a video visit",
                            expression=f"Appointment.{what}")
    try:
        return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise Unprocessable(f"the appointment's {what} time {value[:40]!r} is not a date-time",
                            expression=f"Appointment.{what}") from None


@dataclass(frozen=True)
class Visit:
    """What the room needs to know of an Appointment."""

    appointment_id: str
    version: int
    status: str
    patient_id: str
    practitioner_ids: frozenset[str]
    start: datetime
    end: datetime

    @property
    def patients(self) -> frozenset[str]:
        return frozenset({self.patient_id})

    @property
    def members(self) -> frozenset[str]:
        """The participants' references, as the signaling hub names them."""
        return frozenset({f"Patient/{self.patient_id}", *(f"Practitioner/{p}" for p in self.practitioner_ids)})


def visit_from_appointment(appointment: dict, *, version: int = 1) -> Visit:
    """An Appointment → ``Visit``; ``Unprocessable`` unless it names exactly one patient, at
    least one practitioner, and a start and an end."""
    patients: set[str] = set()
    practitioners: set[str] = set()
    for part in appointment.get("participant") or []:
        ref = ((part or {}).get("actor") or {}).get("reference")
        m = _REF.match(ref) if isinstance(ref, str) else None
        if m:
            (patients if m.group(1) == "Patient" else practitioners).add(m.group(2))
    if len(patients) != 1 or not practitioners:
        raise Unprocessable("a video visit needs an appointment with exactly one patient and a practitioner "
                            f"(this one names {len(patients)} patients and {len(practitioners)} practitioners)",
                            expression="Appointment.participant")
    start = _parse_instant(appointment.get("start"), "start")
    end = _parse_instant(appointment.get("end"), "end")
    if end <= start:
        raise Unprocessable("the appointment ends before it starts", expression="Appointment.end")
    return Visit(str(appointment.get("id", "")), version, str(appointment.get("status", "")), next(iter(patients)),
                 frozenset(practitioners), start, end)


@dataclass(frozen=True)
class JoinWindow:
    """When a booked visit's room may be entered: from ``early`` before its start until
    ``grace`` after its planned end. A visit in progress stays open until it is ended."""

    early: timedelta = timedelta(minutes=15)
    grace: timedelta = timedelta(minutes=30)

    def opens(self, visit: Visit) -> datetime:
        return visit.start - self.early

    def closes(self, visit: Visit) -> datetime:
        return visit.end + self.grace

    def state(self, visit: Visit, now: datetime) -> tuple[State, str]:
        """The room's state and a sentence saying why, for the person at the door."""
        status = visit.status
        if status == "arrived":
            return "in-progress", "The visit is in progress."
        if status == "fulfilled":
            return "ended", "This visit has ended."
        if status in _WAITING_STATUSES:
            if now < self.opens(visit):
                return "not-open", (f"This visit has not started yet: it starts at {_hhmm(visit.start)}, and the "
                                    f"room opens at {_hhmm(self.opens(visit))}.")
            if now > self.closes(visit):
                return "closed", f"The time of this visit has passed (it was planned to end at {_hhmm(visit.end)})."
            return "waiting", "The visit has not begun: the patient waits until the practitioner admits them."
        return "closed", _CLOSED_MESSAGES.get(status, f"This appointment is not booked (its status is {status!r}).")


def _hhmm(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def encounter_id_for(appointment_id: str) -> str:
    """The id of the Encounter of the visit held for this Appointment (a name-based UUID)."""
    return str(uuid.uuid5(_ENCOUNTER_NS, appointment_id))


def new_encounter(visit: Visit, *, host: str, now: datetime) -> dict:
    """The virtual Encounter that starts when ``host`` (a Practitioner id) admits the patient."""
    participants = [{"type": [{"coding": [{"system": PARTICIPATION, "code": "PPRF", "display": "primary performer"}]}],
                     "individual": {"reference": f"Practitioner/{host}"}}]
    participants += [{"type": [{"coding": [{"system": PARTICIPATION, "code": "PART", "display": "Participation"}]}],
                      "individual": {"reference": f"Practitioner/{p}"}}
                     for p in sorted(visit.practitioner_ids - {host})]
    return {
        "resourceType": "Encounter",
        "status": "in-progress",
        "class": {"system": ACT_CODE, "code": "VR", "display": "virtual"},
        "subject": {"reference": f"Patient/{visit.patient_id}"},
        "participant": participants,
        "appointment": [{"reference": f"Appointment/{visit.appointment_id}"}],
        "period": {"start": fhir_instant(now)},
    }


def finished_encounter(encounter: dict, *, now: datetime) -> dict:
    """The Encounter as it ends now: status finished, ``period.end`` and ``length`` in minutes."""
    period = dict(encounter.get("period") or {})
    started = _parse_instant(period.get("start"), "start") if period.get("start") else _utc(now)
    minutes = max(0.0, (_utc(now) - started).total_seconds() / 60)
    period["end"] = fhir_instant(max(_utc(now), started))
    return {**encounter, "status": "finished", "period": period,
            "length": {"value": round(minutes, 2), "unit": "min", "system": UCUM, "code": "min"}}


def with_status(appointment: dict, status: str) -> dict:
    return {**appointment, "status": status}


def clean_text(text: object) -> str:
    """A chat message as it will be stored; ``InvalidInput`` / ``PayloadTooLarge`` when it cannot be."""
    if not isinstance(text, str):
        raise InvalidInput('send the message as {"text": "..."}', expression="text")
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise InvalidInput("the message is empty", expression="text")
    if len(text) > MAX_CHAT_CHARS:
        raise PayloadTooLarge(f"the message has {len(text)} characters; messages may have at most {MAX_CHAT_CHARS} "
                              "(share longer text as a file)", expression="text")
    return text


def clean_title(name: object) -> str:
    """A file name without any directory part or control characters, at most ``MAX_TITLE_CHARS``."""
    title = name if isinstance(name, str) else ""
    title = _ANY_CONTROL.sub("", title.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return title[:MAX_TITLE_CHARS] or "file"


def _communication(visit: Visit, encounter_id: str, sender: str, now: datetime, payload: dict) -> dict:
    patient = f"Patient/{visit.patient_id}"
    others = sorted(visit.members - {sender})
    return {
        "resourceType": "Communication",
        "status": "completed",
        "subject": {"reference": patient},
        "encounter": {"reference": f"Encounter/{encounter_id}"},
        "sender": {"reference": sender},
        "recipient": [{"reference": r} for r in others],
        "sent": fhir_instant(now),
        "payload": [payload],
    }


def chat_communication(visit: Visit, encounter_id: str, sender: str, text: str, now: datetime) -> dict:
    return _communication(visit, encounter_id, sender, now, {"contentString": text})


def file_communication(visit: Visit, encounter_id: str, sender: str, *, title: str, content_type: str,
                       data: bytes, now: datetime) -> dict:
    # Attachment.hash is "the calculated hash of the data using SHA-1, base64ed" in R4
    # (https://hl7.org/fhir/R4/datatypes.html#Attachment): an integrity check, not a signature
    attachment = {"contentType": content_type, "data": base64.b64encode(data).decode(), "size": len(data),
                  "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(), "title": title,  # noqa: S324
                  "creation": fhir_instant(now)}
    return _communication(visit, encounter_id, sender, now, {"contentAttachment": attachment})


def message_view(communication: dict, appointment_id: str) -> dict:
    """A stored chat Communication as the room shows it: who sent it (patient or practitioner),
    when, and its text or the file's name, type, size and download URL (never the bytes)."""
    sender = str((communication.get("sender") or {}).get("reference", ""))
    view: dict = {"id": communication.get("id"), "from": "patient" if sender.startswith("Patient/") else "practitioner",
                  "sent": communication.get("sent")}
    payload = (communication.get("payload") or [{}])[0]
    if "contentAttachment" in payload:
        att = payload["contentAttachment"]
        view["file"] = {"title": att.get("title") or "file", "contentType": att.get("contentType"),
                        "size": att.get("size"),
                        "url": f"/api/visits/{appointment_id}/files/{communication.get('id')}"}
    else:
        view["text"] = payload.get("contentString", "")
    return view


def turn_credentials(secret: str, user: str, *, now: float, ttl: int) -> tuple[str, str]:
    """Short-lived TURN credentials for coturn's ``use-auth-secret`` (the "TURN REST API" of
    draft-uberti-behave-turn-rest-00 §2.2): username ``<expiry unix time>:<user>``, password
    base64(HMAC-SHA1(secret, username)). coturn checks the same HMAC and refuses expired names."""
    username = f"{int(now) + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for(servers: list[dict], *, user: str, secret: str, now: float, ttl: int) -> list[dict]:
    """The configured RTCIceServers, with TURN entries that carry no username given fresh
    credentials when a shared secret is configured."""
    out = []
    for server in servers:
        urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
        if secret and "username" not in server and any(u.startswith(("turn:", "turns:")) for u in urls):
            username, credential = turn_credentials(secret, user, now=now, ttl=ttl)
            server = {**server, "username": username, "credential": credential}
        out.append(server)
    return out


# ---- the service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Room:
    """A participant's view of a visit room."""

    visit: Visit
    role: Role
    member: str  # "Patient/<id>" or "Practitioner/<id>": how the hub names this participant
    state: State
    message: str
    opens: datetime
    closes: datetime
    encounter_id: str | None = None
    encounter: dict | None = None
    #: who the person is meeting, as their record names them ("" when it cannot be shown)
    counterpart: str = ""

    @property
    def appointment_id(self) -> str:
        return self.visit.appointment_id


@dataclass
class RoomSettings:
    window: JoinWindow = field(default_factory=JoinWindow)
    max_attachment_bytes: int = 4 * 1024 * 1024
    ice_servers: list[dict] = field(default_factory=list)
    turn_secret: str = ""
    turn_ttl_seconds: int = 6 * 3600


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _name(resource: dict | None) -> str:
    for name in (resource or {}).get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("prefix") or []), *(name.get("given") or []), name.get("family") or ""]
        text = " ".join(p for p in parts if p).strip()
        if text:
            return text
    return ""


class VisitRooms:
    """The room's use cases, each in one unit of work, as the person in the room."""

    def __init__(self, records: RecordsService, settings: RoomSettings | None = None, *,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self.records = records
        self.settings = settings or RoomSettings()
        self.now = now

    # -- entering -------------------------------------------------------------------------------

    def enter(self, principal: Principal, appointment_id: str, *, details: bool = True) -> Room:
        """The room as this participant sees it, in whatever state it is (the page shows each).

        ``details``: also read the Encounter and the name of the person on the other side (the
        page shows them; a connection or a chat message does not need them)."""
        with self._auditing(principal):
            with UnitOfWork(self.records.engine) as uow:
                room = self._enter_in(uow.c, principal, appointment_id, names=details)
                uow.commit()
        return room

    def join(self, principal: Principal, appointment_id: str) -> Room:
        """``enter``, for a live connection: only a waiting or running room can be joined."""
        room = self.enter(principal, appointment_id, details=False)
        if room.state not in ("waiting", "in-progress"):
            raise RoomClosed(room.message)
        return room

    def ice_servers(self, principal: Principal) -> list[dict]:
        s = self.settings
        return ice_servers_for(s.ice_servers, user=principal.subject, secret=s.turn_secret, now=time.time(),
                               ttl=s.turn_ttl_seconds)

    # -- the practitioner's controls ------------------------------------------------------------

    def admit(self, principal: Principal, appointment_id: str) -> dict:
        """Admit the waiting patient: the Appointment becomes ``arrived`` and the visit's
        Encounter (class VR, in-progress, period.start now) is created, in one transaction."""
        with self._auditing(principal):
            with UnitOfWork(self.records.engine) as uow:
                c = uow.c
                appt = self.records.read_in(c, principal, "Appointment", appointment_id)
                visit = self._visit(appt)
                self._require(policy.host_visit(principal, patients=visit.patients,
                                                practitioners=visit.practitioner_ids), visit, "admit the patient")
                state, message = self.settings.window.state(visit, self.now())
                if state == "in-progress":
                    raise Conflict("the patient has already been admitted to this visit")
                if state != "waiting":
                    raise RoomClosed(message)
                now = self.now()
                assert principal.practitioner_id is not None  # host_visit allows practitioners only
                try:
                    # the Appointment first: its row lock and If-Match make a racing admission fail here
                    self.records.update_in(c, principal, "Appointment", appointment_id,
                                           with_status(appt.body or {}, "arrived"), if_match=appt.version)
                    stored, _ = self.records.create_in(c, principal, new_encounter(visit, host=principal.practitioner_id,
                                                                                    now=now),
                                                       res_id=encounter_id_for(appointment_id))
                except PreconditionFailed:
                    raise Conflict("the visit changed a moment ago (admitted or cancelled); reload the room") from None
                uow.commit()
        assert stored.body is not None
        return stored.body

    def end(self, principal: Principal, appointment_id: str) -> dict:
        """End the visit: the Encounter is finished (period.end, length in minutes) and the
        Appointment ``fulfilled``, in one transaction."""
        with self._auditing(principal):
            with UnitOfWork(self.records.engine) as uow:
                c = uow.c
                appt = self.records.read_in(c, principal, "Appointment", appointment_id)
                visit = self._visit(appt)
                self._require(policy.host_visit(principal, patients=visit.patients,
                                                practitioners=visit.practitioner_ids), visit, "end the visit")
                if visit.status != "arrived":
                    state, message = self.settings.window.state(visit, self.now())
                    raise Conflict("the patient has not been admitted yet: there is no visit to end"
                                   if state in ("waiting", "not-open") else message)
                enc_id = encounter_id_for(appointment_id)
                enc = self.records.read_in(c, principal, "Encounter", enc_id)
                try:
                    self.records.update_in(c, principal, "Appointment", appointment_id,
                                           with_status(appt.body or {}, "fulfilled"), if_match=appt.version)
                    stored, _ = self.records.update_in(c, principal, "Encounter", enc_id,
                                                       finished_encounter(enc.body or {}, now=self.now()),
                                                       if_match=enc.version)
                except PreconditionFailed:
                    raise Conflict("the visit changed a moment ago (it was ended already); reload the room") from None
                uow.commit()
        assert stored.body is not None
        return stored.body

    # -- chat and files -------------------------------------------------------------------------

    def send_text(self, principal: Principal, appointment_id: str, text: object) -> dict:
        """Store a chat message as a Communication (payload.contentString) from this participant
        to the other; returns the stored Communication."""
        clean = clean_text(text)  # before the transaction: a refused message touches nothing
        return self._send(principal, appointment_id,
                          lambda visit, enc, sender, now: chat_communication(visit, enc, sender, clean, now))

    def send_file(self, principal: Principal, appointment_id: str, *, title: object, content_type: object,
                  data: bytes) -> dict:
        """Store a shared file as a Communication (payload.contentAttachment with data,
        contentType, size and hash). Size and type are checked before anything is written."""
        if not isinstance(content_type, str):
            content_type = ""
        check_attachment(content_type, data, max_bytes=self.settings.max_attachment_bytes)
        ctype = normalize_content_type(content_type)
        name = clean_title(title)
        return self._send(principal, appointment_id,
                          lambda visit, enc, sender, now: file_communication(
                              visit, enc, sender, title=name, content_type=ctype, data=data, now=now))

    def messages(self, principal: Principal, appointment_id: str) -> list[dict]:
        """The visit's chat, oldest first, as ``message_view``s (file bytes are fetched one by one)."""
        room = self.enter(principal, appointment_id, details=False)
        if room.encounter_id is None:
            return []
        bundle = self.records.search(principal, "Communication",
                                     [("encounter", f"Encounter/{room.encounter_id}"), ("_sort", "sent,_lastUpdated"),
                                      ("_count", str(self.records.settings.max_count))])
        return [message_view(e["resource"], appointment_id) for e in bundle.get("entry", [])
                if e.get("search", {}).get("mode") == "match"]

    def attachment(self, principal: Principal, appointment_id: str, communication_id: str) -> tuple[str, str, bytes]:
        """(title, content type, bytes) of a file shared in this visit."""
        room = self.enter(principal, appointment_id, details=False)
        comm = self.records.read(principal, "Communication", communication_id).body or {}
        payload = (comm.get("payload") or [{}])[0]
        att = payload.get("contentAttachment")
        if (room.encounter_id is None or att is None
                or (comm.get("encounter") or {}).get("reference") != f"Encounter/{room.encounter_id}"):
            raise NotFound(f"no file {communication_id} was shared in this visit")
        try:
            data = base64.b64decode(att.get("data", ""), validate=True)
        except ValueError:
            raise NotFound(f"the file {communication_id} has no readable content") from None
        return clean_title(att.get("title")), str(att.get("contentType", "application/octet-stream")), data

    # -- internals ------------------------------------------------------------------------------

    def _send(self, principal: Principal, appointment_id: str, build) -> dict:  # type: ignore[no-untyped-def]
        with self._auditing(principal):
            with UnitOfWork(self.records.engine) as uow:
                c = uow.c
                room = self._enter_in(c, principal, appointment_id, names=False)
                if room.state != "in-progress":
                    raise (Conflict("chat and files open once the practitioner has admitted the patient")
                           if room.state in ("waiting", "not-open") else RoomClosed(room.message))
                assert room.encounter_id is not None
                comm = build(room.visit, room.encounter_id, room.member, self.now())
                stored, _ = self.records.create_in(c, principal, comm)
                uow.commit()
        assert stored.body is not None
        return stored.body

    def _enter_in(self, c, principal: Principal, appointment_id: str, *, names: bool) -> Room:  # type: ignore[no-untyped-def]
        appt = self.records.read_in(c, principal, "Appointment", appointment_id)
        visit = self._visit(appt)
        decision = policy.join_visit(principal, patients=visit.patients, practitioners=visit.practitioner_ids)
        self._require(decision, visit, "join this visit")
        role: Role = "patient" if decision.reason == "visit-patient" else "practitioner"
        member = f"Patient/{principal.patient_id}" if role == "patient" else f"Practitioner/{principal.practitioner_id}"
        window = self.settings.window
        state, message = window.state(visit, self.now())
        encounter_id = encounter = None
        if state in ("in-progress", "ended"):
            encounter_id = encounter_id_for(appointment_id)
            if names:
                try:
                    encounter = self.records.read_in(c, principal, "Encounter", encounter_id).body
                except NotFound:
                    encounter = None
        counterpart = ""
        if names:
            others = ([f"Practitioner/{p}" for p in sorted(visit.practitioner_ids)] if role == "patient"
                      else [f"Patient/{visit.patient_id}"])
            counterpart = ", ".join(filter(None, (self._display(c, principal, appt.body or {}, ref) for ref in others)))
        return Room(visit, role, member, state, message, window.opens(visit), window.closes(visit),
                    encounter_id, encounter, counterpart)

    def _display(self, c, principal: Principal, appointment: dict, ref: str) -> str:  # type: ignore[no-untyped-def]
        for part in appointment.get("participant") or []:
            actor = (part or {}).get("actor") or {}
            if actor.get("reference") == ref and isinstance(actor.get("display"), str):
                return actor["display"]
        res_type, _, res_id = ref.partition("/")
        try:
            return _name(self.records.read_in(c, principal, res_type, res_id).body)
        except NotFound:
            return ""

    @staticmethod
    def _visit(stored: Stored) -> Visit:
        return visit_from_appointment(stored.body or {}, version=stored.version)

    @staticmethod
    def _require(decision: Decision, visit: Visit, what: str) -> None:
        if not decision.allowed:
            raise AccessDenied(f"you cannot {what}: {decision.detail} ({decision.reason})", action="read",
                               reason=decision.reason, patients=visit.patients)

    @contextmanager
    def _auditing(self, principal: Principal) -> Iterator[None]:
        """Record a refusal in the audit trail after the refused transaction has rolled back (the
        records service's ``@audited`` does the same for its own use cases)."""
        try:
            yield
        except AccessDenied as exc:
            self.records.record_denial(principal, exc)
            raise
