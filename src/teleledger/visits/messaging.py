"""Secure messaging between visits: threads between a patient and their care team, stored as FHIR
``Communication`` resources, with attachments, unread counts and portal notifications.

A message is one Communication::

    status     completed
    category   urn:teleledger:communication-category | secure-message
    subject    Patient/<id>                      the patient the thread is about (and with)
    topic      coding urn:teleledger:message-thread | <thread id>, text = the thread's subject line
    sender     Patient/<id> or Practitioner/<id>
    recipient  every other participant of the thread
    sent       when it was sent
    inResponseTo  the message it answers (replies)
    payload    contentString (the text) and/or contentAttachment (contentType, data base64,
               title, size, SHA-1 hash as R4 defines Attachment.hash)

A thread's participants are the patient and the practitioners the first message was sent to
(or from). Who may message whom is ``policy.message_recipients`` (the practitioners must have a
care relationship with the patient); who takes part in a thread is ``policy.message_thread``;
every message is written and read through the records service, so the records policy (the
patient compartment) and the audit trail apply to each one as well.

``message_reads`` (``visits.notes_tables``) holds one row per participant and message: it
answers unread counts and "which threads are mine" without decrypting anything; the messages
themselves are always loaded through the records service.

Bad input is refused before anything is written: an attachment over the size limit (413) or of
a type outside the allowlist (415, ``visits.attachments``), a message over ``MAX_TEXT_CHARS``
(413), an empty message (400).

This module never speaks HTTP and never logs message text or file bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, Engine, func, select, update

from teleledger.core.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge
from teleledger.fhir import searchparams as sp
from teleledger.fhir.validation import ID_PATTERN
from teleledger.policy import decide as policy
from teleledger.policy.model import Decision, Principal
from teleledger.records.service import AccessDenied, RecordsService, SqlCareRelationships
from teleledger.records.store import instant
from teleledger.storage.db import UnitOfWork
from teleledger.visits.attachments import DEFAULT_MAX_BYTES, check_attachment, normalize_content_type
from teleledger.visits.notes import AuditDenials
from teleledger.visits.notes_tables import message_reads

__all__ = [
    "CATEGORY",
    "MAX_TEXT_CHARS",
    "THREAD_SYSTEM",
    "AttachmentInfo",
    "Contact",
    "Message",
    "MessagingService",
    "NewAttachment",
    "Thread",
    "ThreadSummary",
    "Unread",
]

CATEGORY_SYSTEM: Final = "urn:teleledger:communication-category"
CATEGORY: Final = {"system": CATEGORY_SYSTEM, "code": "secure-message", "display": "Secure message"}
THREAD_SYSTEM: Final = "urn:teleledger:message-thread"
MAX_TEXT_CHARS: Final = 10_000
MAX_TOPIC_CHARS: Final = 200
MAX_TITLE_CHARS: Final = 200
#: the most threads a list shows, and the most messages a thread loads
MAX_THREADS: Final = 200
MAX_MESSAGES: Final = 1000
_ID_CHUNK: Final = 100
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class NewAttachment:
    """A file someone attaches: checked by ``visits.attachments`` before anything is stored."""

    content_type: str
    data: bytes
    title: str


@dataclass(frozen=True)
class AttachmentInfo:
    title: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Message:
    id: str
    thread_id: str
    topic: str
    patient_id: str
    sender: str
    recipients: tuple[str, ...]
    sent: str
    text: str
    attachment: AttachmentInfo | None
    in_response_to: str | None
    unread: bool

    def as_json(self) -> dict:
        return {"id": self.id, "thread": self.thread_id, "topic": self.topic, "patient": f"Patient/{self.patient_id}",
                "sender": self.sender, "recipients": list(self.recipients), "sent": self.sent, "text": self.text,
                "attachment": None if self.attachment is None else {
                    "title": self.attachment.title, "contentType": self.attachment.content_type,
                    "size": self.attachment.size},
                "inResponseTo": self.in_response_to, "unread": self.unread}


@dataclass(frozen=True)
class ThreadSummary:
    thread_id: str
    topic: str
    patient_id: str
    participants: frozenset[str]
    last_sent: str
    last_sender: str
    messages: int
    unread: int

    def as_json(self) -> dict:
        return {"id": self.thread_id, "topic": self.topic, "patient": f"Patient/{self.patient_id}",
                "participants": sorted(self.participants), "lastSent": self.last_sent,
                "lastSender": self.last_sender, "messages": self.messages, "unread": self.unread}


@dataclass(frozen=True)
class Thread:
    thread_id: str
    topic: str
    patient_id: str
    participants: frozenset[str]
    messages: list[Message]

    @property
    def unread(self) -> int:
        return sum(1 for m in self.messages if m.unread)

    def as_json(self) -> dict:
        return {"id": self.thread_id, "topic": self.topic, "patient": f"Patient/{self.patient_id}",
                "participants": sorted(self.participants), "unread": self.unread,
                "messages": [m.as_json() for m in self.messages]}


@dataclass(frozen=True)
class Unread:
    total: int
    by_thread: dict[str, int]


@dataclass(frozen=True)
class Contact:
    """Someone the principal may start a thread with."""

    reference: str
    display: str


def _now_us() -> int:
    return time.time_ns() // 1000


def clean_text(text: object, *, what: str, limit: int, required: bool = False) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InvalidInput(f"the {what} must be text", expression=what)
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if _CONTROL.search(text):
        raise InvalidInput(f"the {what} holds control characters", expression=what)
    if len(text) > limit:
        raise PayloadTooLarge(f"the {what} has {len(text):,} characters; at most {limit:,}", expression=what)
    if required and not text:
        raise InvalidInput(f"the {what} is empty", expression=what)
    return text


def clean_title(name: object) -> str:
    """A file name without directory parts or control characters (it is shown to the reader)."""
    title = name if isinstance(name, str) else ""
    title = _CONTROL.sub("", title.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return title[:MAX_TITLE_CHARS] or "attachment"


def _ref_id(value: Any, rtype: str) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return None
    try:
        parsed = sp.parse_reference(ref)
    except ValueError:
        return None
    return parsed[1] if parsed is not None and parsed[0] == rtype else None


def _ref(value: Any) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return None
    try:
        parsed = sp.parse_reference(ref)
    except ValueError:
        return None
    return f"{parsed[0]}/{parsed[1]}" if parsed is not None else None


def _thread_of(comm: dict) -> tuple[str | None, str]:
    topic = comm.get("topic") or {}
    code = next((c.get("code") for c in topic.get("coding", []) if isinstance(c, dict)
                 and c.get("system") == THREAD_SYSTEM), None)
    return code, str(topic.get("text") or "")


def _participants(comm: dict) -> frozenset[str]:
    refs = [_ref(comm.get("sender"))] + [_ref(r) for r in comm.get("recipient") or []]
    return frozenset(r for r in refs if r is not None)


def display_name(resource: dict | None) -> str | None:
    """``given family`` (or HumanName.text) of a Patient or Practitioner, prefix kept."""
    if not resource:
        return None
    names = resource.get("name") or []
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if not isinstance(name, dict):
        return None
    if name.get("text"):
        return str(name["text"])
    parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
    text = " ".join(str(p) for p in parts if p).strip()
    return text or None


class MessagingService:
    """The secure-messaging use cases. Every message goes through ``records`` as the principal."""

    def __init__(self, engine: Engine, records: RecordsService, *, max_attachment_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], int] = _now_us) -> None:
        self.engine = engine
        self.records = records
        self.max_attachment_bytes = max_attachment_bytes
        self.clock = clock

    # ---- counts and lists -------------------------------------------------------------------

    def unread(self, principal: Principal) -> Unread:
        """Unread messages addressed to the principal, in total and per thread (no message is
        decrypted: the counts come from ``message_reads``)."""
        me = principal.fhir_user
        if me is None:
            return Unread(0, {})
        r = message_reads
        with UnitOfWork(self.engine) as uow:
            rows = uow.c.execute(select(r.c.thread_id, func.count()).where(r.c.reader == me, r.c.read_at.is_(None))
                                 .group_by(r.c.thread_id)).all()
        by_thread = {str(tid): int(n) for tid, n in rows}
        return Unread(sum(by_thread.values()), by_thread)

    def threads(self, principal: Principal) -> list[ThreadSummary]:
        """The principal's threads, most recent first, each from its latest message (read
        through the records service, so the records policy and audit apply)."""
        me = self._me(principal)
        r = message_reads
        with UnitOfWork(self.engine) as uow:
            rows = uow.c.execute(select(r.c.thread_id, r.c.communication_id, r.c.sent, r.c.read_at)
                                 .where(r.c.reader == me).order_by(r.c.sent.desc(), r.c.communication_id)).all()
        latest: dict[str, str] = {}
        counts: dict[str, list[int]] = {}
        for row in rows:
            latest.setdefault(row.thread_id, row.communication_id)
            n = counts.setdefault(row.thread_id, [0, 0])
            n[0] += 1
            n[1] += row.read_at is None
        wanted = list(latest.items())[:MAX_THREADS]
        loaded = self._load(principal, [cid for _, cid in wanted])
        out = []
        for thread_id, cid in wanted:
            comm = loaded.get(cid)
            if comm is None:  # the records policy no longer lets this principal read it
                continue
            _, topic = _thread_of(comm)
            out.append(ThreadSummary(thread_id, topic, _ref_id(comm.get("subject"), "Patient") or "",
                                     _participants(comm), str(comm.get("sent", "")),
                                     _ref(comm.get("sender")) or "", counts[thread_id][0], counts[thread_id][1]))
        return out

    def thread(self, principal: Principal, thread_id: str, *, mark_read: bool = False) -> Thread:
        """One thread, oldest message first; ``mark_read`` marks what the principal is shown as
        read (the page does; the API has its own call). A thread the principal does not take
        part in is 404: its existence is not theirs to learn."""
        with AuditDenials(self.records, principal):
            thread = self._thread(principal, thread_id)
        if mark_read and thread.unread:
            self.mark_read(principal, thread_id)
        return thread

    def _thread(self, principal: Principal, thread_id: str) -> Thread:
        me = self._me(principal)
        if not isinstance(thread_id, str) or not ID_PATTERN.fullmatch(thread_id):
            raise NotFound("no such message thread")
        r = message_reads
        with UnitOfWork(self.engine) as uow:
            rows = uow.c.execute(select(r.c.communication_id, r.c.read_at, r.c.patient_id)
                                 .where(r.c.reader == me, r.c.thread_id == thread_id)
                                 .order_by(r.c.sent, r.c.communication_id).limit(MAX_MESSAGES)).all()
        if not rows:
            raise NotFound("no such message thread")
        unread = {row.communication_id for row in rows if row.read_at is None}
        loaded = self._load(principal, [row.communication_id for row in rows])
        comms = [loaded[row.communication_id] for row in rows if row.communication_id in loaded]
        if not comms:
            raise NotFound("no such message thread")
        participants = frozenset().union(*(_participants(c) for c in comms))
        patient_id = _ref_id(comms[0].get("subject"), "Patient") or rows[0].patient_id
        self._deny(policy.message_thread(principal, participants=participants), "this message thread", "read",
                   frozenset({patient_id}))
        _, topic = _thread_of(comms[0])
        return Thread(thread_id, topic, patient_id, participants,
                      [self._message(c, thread_id, c.get("id") in unread) for c in comms])

    def mark_read(self, principal: Principal, thread_id: str) -> int:
        """Mark every message of the thread addressed to the principal read; how many were unread.
        Only the principal's own rows change; a thread they take no part in is 404."""
        me = self._me(principal)
        r = message_reads
        with UnitOfWork(self.engine) as uow:
            mine = uow.c.execute(select(func.count()).where(r.c.reader == me, r.c.thread_id == thread_id)).scalar_one()
            if not mine:
                raise NotFound("no such message thread")
            done = uow.c.execute(update(r).where(r.c.reader == me, r.c.thread_id == thread_id, r.c.read_at.is_(None))
                                 .values(read_at=self.clock()))
            uow.commit()
        return int(done.rowcount or 0)

    # ---- sending ----------------------------------------------------------------------------

    def start_thread(self, principal: Principal, *, topic: object, text: object, patient_id: str | None = None,
                     practitioner_ids: Iterable[str] = (), attachment: NewAttachment | None = None) -> Message:
        """A new thread: a patient writes to practitioners of their care team; a practitioner
        writes to a patient in their care (``patient_id``), optionally with colleagues."""
        me = self._me(principal)
        topic = clean_text(topic, what="subject", limit=MAX_TOPIC_CHARS, required=True)
        body, att = self._content(text, attachment)
        practitioners = {p for p in practitioner_ids if p}
        for p in practitioners:
            if not ID_PATTERN.fullmatch(p):
                raise InvalidInput(f"not a Practitioner id: {p[:70]!r}", expression="practitioners")
        if principal.role == "patient":
            if patient_id not in (None, principal.patient_id):
                raise InvalidInput("a patient writes about their own record only", expression="patient")
            patient_id = principal.patient_id
            if not practitioners:
                raise InvalidInput("choose at least one member of your care team to write to",
                                   expression="practitioners")
        elif principal.role == "practitioner":
            if not patient_id or not ID_PATTERN.fullmatch(patient_id):
                raise InvalidInput("choose the patient to write to", expression="patient")
            if principal.practitioner_id:
                practitioners.add(principal.practitioner_id)
        if patient_id is None:
            raise Forbidden("only a patient or a practitioner linked to their record sends secure messages")
        participants = frozenset({f"Patient/{patient_id}", *(f"Practitioner/{p}" for p in practitioners)})
        return self._send(principal, me, thread_id=str(uuid.uuid4()), topic=topic, patient_id=patient_id,
                          practitioners=frozenset(practitioners), participants=participants, text=body,
                          attachment=att, in_response_to=None)

    def reply(self, principal: Principal, thread_id: str, *, text: object,
              attachment: NewAttachment | None = None) -> Message:
        """Answer a thread: to every other participant, in response to its latest message."""
        me = self._me(principal)
        body, att = self._content(text, attachment)
        with AuditDenials(self.records, principal):
            thread = self._thread(principal, thread_id)
        practitioners = frozenset(p.removeprefix("Practitioner/") for p in thread.participants
                                  if p.startswith("Practitioner/"))
        message = self._send(principal, me, thread_id=thread_id, topic=thread.topic, patient_id=thread.patient_id,
                             practitioners=practitioners, participants=thread.participants, text=body,
                             attachment=att, in_response_to=thread.messages[-1].id)
        self.mark_read(principal, thread_id)  # answering a thread means having read it
        return message

    def _content(self, text: object, attachment: NewAttachment | None) -> tuple[str, dict | None]:
        body = clean_text(text, what="message", limit=MAX_TEXT_CHARS)
        att = None
        if attachment is not None:
            # before any unit of work: a refused file leaves nothing behind
            check_attachment(attachment.content_type, attachment.data, max_bytes=self.max_attachment_bytes)
            data = bytes(attachment.data)
            # Attachment.hash is SHA-1 in R4 (datatypes.html#Attachment): an integrity check
            att = {"contentType": normalize_content_type(attachment.content_type),
                   "data": base64.b64encode(data).decode("ascii"), "size": len(data),
                   "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),  # noqa: S324
                   "title": clean_title(attachment.title)}
        if not body and att is None:
            raise InvalidInput("the message is empty: write something or attach a file", expression="message")
        return body, att

    def _send(self, principal: Principal, me: str, *, thread_id: str, topic: str, patient_id: str,
              practitioners: frozenset[str], participants: frozenset[str], text: str, attachment: dict | None,
              in_response_to: str | None) -> Message:
        now = self.clock()
        sent = instant(now)
        recipients = sorted(participants - {me})
        if attachment is not None:
            attachment = {**attachment, "creation": sent}
        payload = ([{"contentString": text}] if text else []) + (
            [{"contentAttachment": attachment}] if attachment is not None else [])
        comm: dict = {
            "resourceType": "Communication",
            "status": "completed",
            "category": [{"coding": [CATEGORY]}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "topic": {"coding": [{"system": THREAD_SYSTEM, "code": thread_id}], "text": topic},
            "sender": {"reference": me},
            "recipient": [{"reference": r} for r in recipients],
            "sent": sent,
            "payload": payload,
        }
        if in_response_to is not None:
            comm["inResponseTo"] = [{"reference": f"Communication/{in_response_to}"}]
        with AuditDenials(self.records, principal):
            with UnitOfWork(self.engine) as uow:
                c = uow.c
                decision = policy.message_recipients(principal, patient_id=patient_id, practitioner_ids=practitioners,
                                                     care=SqlCareRelationships(c))
                self._deny(decision, "this message", "create", frozenset({patient_id}))
                stored, _ = self.records.create_in(c, principal, comm)
                self._index(c, stored.res_id, thread_id, patient_id, participants, sender=me, sent=now)
                uow.commit()
        assert stored.body is not None
        return self._message(stored.body, thread_id, False)

    @staticmethod
    def _index(c: Connection, communication_id: str, thread_id: str, patient_id: str, participants: frozenset[str],
               *, sender: str, sent: int) -> None:
        c.execute(message_reads.insert(), [
            {"reader": who, "communication_id": communication_id, "thread_id": thread_id, "patient_id": patient_id,
             "sent": sent, "read_at": sent if who == sender else None}
            for who in sorted(participants | {sender})])

    # ---- attachments and contacts -----------------------------------------------------------

    def attachment(self, principal: Principal, communication_id: str) -> tuple[str, str, bytes]:
        """(title, content type, bytes) of a message's attachment, for a participant."""
        if not ID_PATTERN.fullmatch(communication_id):
            raise NotFound("no such attachment")
        with AuditDenials(self.records, principal):
            comm = self.records.read(principal, "Communication", communication_id).body or {}
            thread_id, _ = _thread_of(comm)
            patient_id = _ref_id(comm.get("subject"), "Patient") or ""
            if thread_id is None or not any(c.get("code") == CATEGORY["code"]
                                            for cat in comm.get("category", []) for c in cat.get("coding", [])):
                raise NotFound("no such attachment")
            self._deny(policy.message_thread(principal, participants=_participants(comm)), "this message", "read",
                       frozenset({patient_id}))
        att = next((p["contentAttachment"] for p in comm.get("payload", []) if "contentAttachment" in p), None)
        if att is None or not isinstance(att.get("data"), str):
            raise NotFound("this message has no attachment")
        try:
            data = base64.b64decode(att["data"], validate=True)
        except (binascii.Error, ValueError):
            raise NotFound("this message's attachment cannot be read") from None
        return clean_title(att.get("title")), normalize_content_type(str(att.get("contentType", ""))), data

    def contacts(self, principal: Principal) -> list[Contact]:
        """Whom the principal may start a thread with: a patient's practitioners (from their
        encounters), a practitioner's patients (from theirs), most recent first."""
        if principal.role == "patient" and principal.patient_id:
            query = [("patient", principal.patient_id), ("_sort", "-date"), ("_count", "200")]
            wanted, kind = "Practitioner", "individual"
        elif principal.role == "practitioner" and principal.practitioner_id:
            query = [("practitioner", principal.practitioner_id), ("_sort", "-date"), ("_count", "200")]
            wanted, kind = "Patient", "subject"
        else:
            return []
        bundle = self.records.search(principal, "Encounter", query)
        ids: list[str] = []
        for e in bundle.get("entry", []):
            res = e.get("resource") or {}
            values = [p.get("individual") for p in res.get("participant", [])] if kind == "individual" \
                else [res.get("subject")]
            for v in values:
                rid = _ref_id(v, wanted)
                if rid and rid not in ids:
                    ids.append(rid)
        names = self.names(principal, [f"{wanted}/{i}" for i in ids[:50]])
        return [Contact(f"{wanted}/{i}", names.get(f"{wanted}/{i}", f"{wanted}/{i}")) for i in ids[:50]]

    def names(self, principal: Principal, refs: Iterable[str]) -> dict[str, str]:
        """Display names for ``Patient/…`` and ``Practitioner/…`` references the principal may
        read (through the records service); others are left out."""
        by_type: dict[str, list[str]] = {}
        for ref in dict.fromkeys(refs):
            rtype, _, rid = ref.partition("/")
            if rtype in ("Patient", "Practitioner") and ID_PATTERN.fullmatch(rid):
                by_type.setdefault(rtype, []).append(rid)
        out: dict[str, str] = {}
        for rtype, ids in by_type.items():
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                try:
                    bundle = self.records.search(principal, rtype, [("_id", ",".join(chunk)), ("_count", str(len(chunk)))])
                except Forbidden:
                    continue
                for e in bundle.get("entry", []):
                    res = e.get("resource") or {}
                    name = display_name(res)
                    if name:
                        out[f"{rtype}/{res.get('id')}"] = name
        return out

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _me(principal: Principal) -> str:
        me = principal.fhir_user
        if me is None or principal.role not in ("patient", "practitioner"):
            raise Forbidden("secure messages are for patients and practitioners linked to a record")
        return me

    @staticmethod
    def _deny(decision: Decision, what: str, action: str, patients: frozenset[str]) -> None:
        if not decision.allowed:
            raise AccessDenied(f"{what}: {decision.detail} ({decision.reason})", action=action,
                               reason=decision.reason, patients=patients)

    def _load(self, principal: Principal, ids: Sequence[str]) -> dict[str, dict]:
        """Communications by id through one records search per chunk (policy + audit); ones the
        principal may not read are simply absent."""
        out: dict[str, dict] = {}
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = list(ids[start : start + _ID_CHUNK])
            bundle = self.records.search(principal, "Communication", [("_id", ",".join(chunk)),
                                                                      ("_count", str(len(chunk)))])
            for e in bundle.get("entry", []):
                res = e.get("resource") or {}
                if e.get("search", {}).get("mode") == "match" and isinstance(res.get("id"), str):
                    out[res["id"]] = res
        return out

    @staticmethod
    def _message(comm: dict, thread_id: str, unread: bool) -> Message:
        _, topic = _thread_of(comm)
        text = " ".join(str(p["contentString"]) for p in comm.get("payload", []) if "contentString" in p)
        att = next((p["contentAttachment"] for p in comm.get("payload", []) if "contentAttachment" in p), None)
        info = None
        if isinstance(att, dict):
            info = AttachmentInfo(clean_title(att.get("title")), str(att.get("contentType", "")),
                                  int(att.get("size") or 0))
        replied = next((r for r in (_ref_id(x, "Communication") for x in comm.get("inResponseTo", [])) if r), None)
        return Message(str(comm.get("id")), thread_id, topic, _ref_id(comm.get("subject"), "Patient") or "",
                       _ref(comm.get("sender")) or "", tuple(_ref(r) or "" for r in comm.get("recipient", [])),
                       str(comm.get("sent", "")), text, info, replied, unread)

