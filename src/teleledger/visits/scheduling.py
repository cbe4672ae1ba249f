"""Visit scheduling: practitioners publish availability, patients find them and book, cancel or
reschedule visits, and visits move through their states.

The FHIR R4 resources, all stored through ``teleledger.records`` (validated, encrypted,
versioned, in the transparency log):

* ``Schedule`` — one per practitioner (``actor`` = the Practitioner), its id derived from the
  Practitioner id, so that two publishes can never create two. Its extension
  ``EXT_AVAILABILITY`` holds the weekly hours (the day texts of ``visits.availability``), the
  visit length and the horizon in weeks; ``EXT_TIMEZONE`` (the core ``timezone`` extension) the
  IANA zone they are in.
* ``Slot`` — one per bookable visit time (``schedule``, ``status`` free | busy, ``start``,
  ``end`` in UTC), its id derived from the Schedule id and its start: publishing twice finds the
  same Slots and creates none (https://hl7.org/fhir/R4/slot.html).
* ``Appointment`` — ``status``, participants Patient and Practitioner, ``slot``, ``start``,
  ``end`` (https://hl7.org/fhir/R4/appointment.html).

No double booking, at the database: booking inserts the Slot's row into ``slot_bookings``
(primary key: the Slot id) in the same unit of work as the Appointment's create and the Slot's
change to busy; of two bookings of one Slot, however close, exactly one commits and the other is
a ``Conflict`` (409, "this slot was just taken"). Cancelling deletes the row in the unit of work
that frees the Slot; rescheduling books the new Slot and cancels the old visit in one unit of
work, so a taken new Slot leaves the old visit as it was.

No write path around it: the write guard this service registers on the records service
(``RecordsService.add_write_guard``) runs for every Appointment and Slot write — FHIR API,
Bundles, imports — and refuses (422) an Appointment that takes a Slot without a booking row
naming it, or that lets go of a Slot its booking row still holds: ``POST /fhir/Appointment``
with a ``slot`` is refused with an OperationOutcome that points to the booking endpoint, and
cancelling such a visit with ``PUT`` points to the cancel endpoint. It refuses (409) freeing,
moving or deleting a booked Slot. Appointments without a Slot stay ordinary FHIR resources.

Appointment states (``TRANSITIONS``; value set appointmentstatus)::

    proposed ──> pending ──> booked ──> arrived ──> fulfilled
        │           │          │ └──> checked-in ──┘
        │           │          ├──> fulfilled
        │           │          ├──> noshow          (only once the visit has begun)
        └───────────┴──────────┴──> cancelled       (only before the visit begins)
    waitlist ──> booked | cancelled;  any state that is not final ──> entered-in-error

``fulfilled``, ``cancelled``, ``noshow`` and ``entered-in-error`` are final; ``cancelled``,
``noshow`` and ``entered-in-error`` release the Slot. Who may make which change is
``policy.change_visit_status`` (the patient cancels; the visit's practitioner does the rest).

Authority: every use case asks ``teleledger.policy`` first (``manage_availability``,
``book_visit``, ``change_visit_status``); the Appointment is then written with the caller's own
authority (``policy.decide``: a patient writes only into their own compartment), and the
Schedule and Slots with the server's (``SCHEDULER``), because a patient may book a Slot but not
edit one.

This module never speaks HTTP and never decides access itself. Time comes from an injected
clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from teleledger.core.errors import Conflict, InvalidInput, NotFound, PreconditionFailed, Unprocessable
from teleledger.fhir.validation import ID_PATTERN
from teleledger.identity.scopes import ScopeSet
from teleledger.policy import decide as policy
from teleledger.policy.model import Decision, Principal
from teleledger.records.service import AccessDenied, RecordsService, audited
from teleledger.records.store import Stored
from teleledger.storage.db import UnitOfWork, run
from teleledger.visits import availability as av

__all__ = [
    "DEFAULT_WEEKS",
    "Directory",
    "FreeSlots",
    "PractitionerCard",
    "Published",
    "SCHEDULER",
    "Scheduling",
    "SlotView",
    "TRANSITIONS",
    "Visit",
    "schedule_id_for",
    "slot_id_for",
]

EXT_AVAILABILITY = "https://teleledger.dev/fhir/StructureDefinition/weekly-availability"
EXT_TIMEZONE = "http://hl7.org/fhir/StructureDefinition/timezone"
CANCEL_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"

#: weeks of Slots a publish creates by default, and at most
DEFAULT_WEEKS = 4
MAX_WEEKS = 12
#: how far ahead a patient sees free slots by default, and at most
DEFAULT_SLOT_DAYS = 14
MAX_SLOT_DAYS = 92

# uuid5 namespace of the derived Schedule and Slot ids (a fixed random UUID: changing it would
# make every publish create a second set of Slots)
_NAMESPACE = uuid.UUID("6c0f3b8e-8f1e-4d44-9a55-1b8a2f8c9e37")

TRANSITIONS: dict[str, frozenset[str]] = {
    "proposed": frozenset({"pending", "booked", "cancelled", "entered-in-error"}),
    "pending": frozenset({"booked", "cancelled", "entered-in-error"}),
    "waitlist": frozenset({"booked", "cancelled", "entered-in-error"}),
    "booked": frozenset({"arrived", "checked-in", "fulfilled", "noshow", "cancelled", "entered-in-error"}),
    "checked-in": frozenset({"arrived", "fulfilled", "noshow", "entered-in-error"}),
    "arrived": frozenset({"fulfilled", "entered-in-error"}),
    "fulfilled": frozenset(),
    "cancelled": frozenset(),
    "noshow": frozenset(),
    "entered-in-error": frozenset(),
}
#: statuses in which an Appointment no longer holds its Slot
RELEASED: frozenset[str] = frozenset({"cancelled", "noshow", "entered-in-error"})
#: statuses shown as an upcoming visit
UPCOMING: frozenset[str] = frozenset({"proposed", "pending", "booked", "checked-in", "arrived"})

#: the server acting for the scheduling use cases on Schedules and Slots, after the policy
#: allowed the use case (never on patient data: its scopes name only these two types)
SCHEDULER = Principal(subject="system:teleledger-scheduling", role="service",
                      scopes=ScopeSet.parse("system/Schedule.cruds system/Slot.cruds"),
                      patient_id=None, practitioner_id=None, purpose="HOPERAT")

# fixed SQL on the driver (storage.db.run): the guard runs inside every Appointment and Slot
# write, and SQLAlchemy's per-statement work would cost more than these index probes
_HOLDER = "SELECT appointment_id FROM slot_bookings WHERE slot_id = ?"
_HELD_BY = "SELECT slot_id FROM slot_bookings WHERE appointment_id = ?"
_BOOK = "INSERT INTO slot_bookings (slot_id, appointment_id, patient_id, booked) VALUES (?, ?, ?, ?)"
_RELEASE = "DELETE FROM slot_bookings WHERE slot_id = ? AND appointment_id = ?"

TAKEN = "This slot was just taken by someone else. Please pick another time."
ALREADY_TAKEN = "This slot is already booked. Please pick another time."


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def instant(dt: datetime) -> str:
    """FHIR ``instant`` in UTC, to the second."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt.astimezone(timezone.utc) if dt.tzinfo is not None else None


def schedule_id_for(practitioner_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"Schedule|Practitioner/{practitioner_id}"))


def slot_id_for(schedule_id: str, start: datetime) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"Slot|{schedule_id}|{instant(start)}"))


def _ref_ids(refs: Iterable[object], kind: str) -> list[str]:
    out = []
    for r in refs:
        ref = r.get("reference") if isinstance(r, dict) else None
        if isinstance(ref, str) and ref.startswith(kind + "/"):
            out.append(ref[len(kind) + 1:])
    return out


def participants(appointment: dict) -> tuple[frozenset[str], frozenset[str]]:
    """(Patient ids, Practitioner ids) among an Appointment's participants."""
    actors = [p.get("actor") for p in appointment.get("participant") or [] if isinstance(p, dict)]
    return frozenset(_ref_ids(actors, "Patient")), frozenset(_ref_ids(actors, "Practitioner"))


def slot_ids(appointment: dict) -> frozenset[str]:
    return frozenset(_ref_ids(appointment.get("slot") or [], "Slot"))


def person_name(resource: dict | None) -> str:
    """``Dr. Jo Smith`` from a Practitioner or Patient (its first name entry)."""
    names = (resource or {}).get("name") or []
    if not names:
        return ""
    n = names[0]
    if n.get("text"):
        return str(n["text"])
    parts = [*n.get("prefix", []), *n.get("given", []), n.get("family", "")]
    return " ".join(str(p) for p in parts if p)


def _entries(bundle: dict, resource_type: str | None = None) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", [])
            if "resource" in e and (resource_type is None or e["resource"].get("resourceType") == resource_type)]


@dataclass(frozen=True)
class Published:
    schedule_id: str
    created: int
    removed: int
    kept: int
    horizon_end: datetime


@dataclass(frozen=True)
class PractitionerCard:
    id: str
    name: str
    specialties: tuple[str, ...]
    bookable: bool  # has published availability
    timezone: str | None


@dataclass(frozen=True)
class Directory:
    practitioners: list[PractitionerCard]
    specialties: list[str]  # every specialty named in the directory, for a form's list


@dataclass(frozen=True)
class SlotView:
    id: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class FreeSlots:
    slots: list[SlotView]
    timezone: str | None  # of the practitioner's hours; None: no availability published
    practitioner_name: str


@dataclass(frozen=True)
class Visit:
    id: str
    status: str
    start: datetime
    end: datetime
    timezone: str
    practitioner_id: str | None
    practitioner_name: str
    patient_id: str | None
    patient_name: str  # empty unless the caller may read the Patient (the practitioner's list)
    slot_id: str | None


def visit_of(body: dict, patient_names: dict[str, str] | None = None) -> Visit | None:
    start, end = parse_instant(body.get("start")), parse_instant(body.get("end"))
    if start is None or end is None:
        return None
    patients, practitioners = participants(body)
    practitioner = next(iter(sorted(practitioners)), None)
    display = next((str(p["actor"].get("display", "")) for p in body.get("participant", [])
                    if isinstance(p.get("actor"), dict)
                    and p["actor"].get("reference") == f"Practitioner/{practitioner}"), "")
    patient = next(iter(sorted(patients)), None)
    tz = next((x.get("valueCode") for x in body.get("extension", []) if x.get("url") == EXT_TIMEZONE), None) or "UTC"
    return Visit(id=body["id"], status=body.get("status", ""), start=start, end=end, timezone=tz,
                 practitioner_id=practitioner, practitioner_name=display or (f"Practitioner/{practitioner}"
                                                                             if practitioner else ""),
                 patient_id=patient, patient_name=(patient_names or {}).get(patient or "", ""),
                 slot_id=next(iter(sorted(slot_ids(body))), None))


def weekly_hours_of(schedule: dict) -> tuple[av.WeeklyHours, int] | None:
    """The availability a Schedule stores (``EXT_AVAILABILITY``) and its horizon in weeks."""
    ext = next((x for x in schedule.get("extension", []) if x.get("url") == EXT_AVAILABILITY), None)
    tz = next((x.get("valueCode") for x in schedule.get("extension", []) if x.get("url") == EXT_TIMEZONE), None)
    if ext is None or not tz:
        return None
    parts = ext.get("extension", [])
    minutes = next((p.get("valuePositiveInt") for p in parts if p.get("url") == "visitMinutes"), None)
    weeks = next((p.get("valuePositiveInt") for p in parts if p.get("url") == "weeks"), DEFAULT_WEEKS)
    days = [p.get("valueString", "") for p in parts if p.get("url") == "day"]
    return av.weekly_hours_from_text(days, visit_minutes=minutes, timezone_name=tz), weeks  # type: ignore[arg-type]


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise NotFound(f"no {what} has this id")
    return value


def _allow(decision: Decision, what: str, *, action: str, patients: Iterable[str] = ()) -> None:
    if not decision.allowed:
        raise AccessDenied(f"{what} denied: {decision.detail} ({decision.reason})", action=action,
                           reason=decision.reason, patients=frozenset(patients))


class Scheduling:
    """The scheduling use cases. Constructing one registers its write guard on ``records``."""

    def __init__(self, records: RecordsService, engine: Engine, *,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self.records = records
        self.engine = engine
        self.now = now
        records.add_write_guard("visits.scheduling", ("Appointment", "Slot"), self._guard)

    def record_denial(self, principal: Principal, exc: AccessDenied) -> None:
        # what ``records.service.audited`` calls: a denied use case is in the audit trail too
        self.records.record_denial(principal, exc)

    # ---- availability -----------------------------------------------------------------------

    def availability(self, principal: Principal, practitioner_id: str) -> tuple[av.WeeklyHours, int] | None:
        """The weekly hours Practitioner ``practitioner_id`` published (None: none yet)."""
        _check_id(practitioner_id, "practitioner")
        with UnitOfWork(self.engine) as uow:
            try:
                schedule = self.records.read_in(uow.c, principal, "Schedule", schedule_id_for(practitioner_id))
            except NotFound:
                return None
            uow.commit()
        assert schedule.body is not None
        return weekly_hours_of(schedule.body)

    @audited
    def publish(self, principal: Principal, practitioner_id: str, hours: av.WeeklyHours, *,
                weeks: int = DEFAULT_WEEKS) -> Published:
        """Store ``hours`` as the practitioner's Schedule and make its free Slots for the next
        ``weeks`` weeks match them: missing Slots are created, free Slots the hours no longer
        cover are deleted, booked Slots stay (a new Slot that would overlap one is not made).
        Idempotent: the same hours published again create and delete nothing."""
        _check_id(practitioner_id, "practitioner")
        if not isinstance(weeks, int) or not 1 <= weeks <= MAX_WEEKS:
            raise InvalidInput(f"publish availability for 1 to {MAX_WEEKS} weeks ahead")
        _allow(policy.manage_availability(principal, practitioner_id=practitioner_id),
               "publishing this practitioner's availability", action="update")
        now = self.now()
        first = now.astimezone(hours.tz).date()
        horizon_end = datetime.combine(first + timedelta(days=7 * weeks), datetime.min.time(), hours.tz)
        wanted = [s for s in av.slots(hours, first, first + timedelta(days=7 * weeks - 1)) if s.start > now]
        limit = self.records.settings.max_count
        if len(wanted) > limit:
            raise InvalidInput(f"these hours make {len(wanted)} slots in {weeks} weeks; at most {limit} can be "
                               "published at once: publish fewer weeks or longer visits")
        sched_id = schedule_id_for(practitioner_id)
        try:
            with UnitOfWork(self.engine) as uow:
                c = uow.c
                practitioner = self.records.read_in(c, principal, "Practitioner", practitioner_id)
                name = person_name(practitioner.body)
                # the Schedule first: its row lock (PostgreSQL) serializes two publishes of one practitioner
                self.records.update_in(c, SCHEDULER, "Schedule", sched_id,
                                       self._schedule_body(sched_id, practitioner_id, name, hours, weeks, now,
                                                           horizon_end))
                existing = self.records.search_in(c, SCHEDULER, "Slot", [
                    ("schedule", f"Schedule/{sched_id}"), ("start", f"ge{instant(now)}"), ("_count", str(limit))])
                taken = [(parse_instant(s.body["start"]), parse_instant(s.body["end"])) for s in existing
                         if s.body and s.body.get("status") != "free"]
                want = {slot_id_for(sched_id, s.start): s for s in wanted
                        if not any(a is not None and b is not None and s.start < b and a < s.end for a, b in taken)}
                have = {s.res_id: s for s in existing}
                created = removed = kept = 0
                for sid, when in want.items():
                    if sid in have:
                        kept += 1
                        continue
                    self.records.update_in(c, SCHEDULER, "Slot", sid, {
                        "resourceType": "Slot", "id": sid, "schedule": {"reference": f"Schedule/{sched_id}"},
                        "status": "free", "start": instant(when.start), "end": instant(when.end)})
                    created += 1
                for sid, slot in have.items():
                    if sid not in want and slot.body and slot.body.get("status") == "free":
                        self.records.delete_in(c, SCHEDULER, "Slot", sid)
                        removed += 1
                    elif sid not in want:
                        kept += 1
                uow.commit()
        except IntegrityError as exc:  # PostgreSQL: another publish created the same Schedule or Slot meanwhile
            raise Conflict("this availability was being published at the same moment; try again") from exc
        return Published(sched_id, created, removed, kept, horizon_end)

    @staticmethod
    def _schedule_body(sched_id: str, practitioner_id: str, name: str, hours: av.WeeklyHours, weeks: int,
                       now: datetime, horizon_end: datetime) -> dict:
        described = hours.describe()
        return {
            "resourceType": "Schedule", "id": sched_id, "active": True,
            "extension": [
                {"url": EXT_TIMEZONE, "valueCode": hours.timezone},
                {"url": EXT_AVAILABILITY, "extension": [
                    {"url": "visitMinutes", "valuePositiveInt": hours.visit_minutes},
                    {"url": "weeks", "valuePositiveInt": weeks},
                    *({"url": "day", "valueString": d} for d in described),
                ]},
            ],
            "actor": [{"reference": f"Practitioner/{practitioner_id}", **({"display": name} if name else {})}],
            "planningHorizon": {"start": instant(now), "end": instant(horizon_end)},
            "comment": (f"{hours.visit_minutes}-minute video visits; hours in {hours.timezone}: "
                        + ("; ".join(described) if described else "none")),
        }

    # ---- finding ----------------------------------------------------------------------------

    def find_practitioners(self, principal: Principal, *, q: str = "", specialty: str = "",
                           limit: int = 50) -> Directory:
        """Practitioners whose name contains ``q`` and who have a role whose specialty (code or
        words) contains ``specialty``; those who publish availability first.

        The directory is read whole (up to the records service's ``max_count`` entries per type):
        specialties are tokens in the search index (keyed hashes), which cannot match words."""
        q, specialty = q.strip()[:100], specialty.strip()[:100].casefold()
        most = str(self.records.settings.max_count)
        items = [("_count", most)] + ([("name:contains", q)] if q else [])
        practitioners = _entries(self.records.search(principal, "Practitioner", items))
        roles = _entries(self.records.search(principal, "PractitionerRole", [("_count", most)]))
        schedules = _entries(self.records.search(principal, "Schedule", [("_count", most)]))

        by_identifier: dict[tuple[str, str], str] = {}
        for p in practitioners:
            for ident in p.get("identifier", []):
                by_identifier[(ident.get("system", ""), ident.get("value", ""))] = p["id"]
        # practitioner id → (words shown, lowercased words and codes matched)
        specialties_of: dict[str, list[tuple[str, str]]] = {}
        every: set[str] = set()
        for role in roles:
            ref = role.get("practitioner") or {}
            pid = None
            if isinstance(ref.get("reference"), str) and ref["reference"].startswith("Practitioner/"):
                pid = ref["reference"].split("/", 1)[1]
            elif isinstance(ref.get("identifier"), dict):
                ident = ref["identifier"]
                pid = by_identifier.get((ident.get("system", ""), ident.get("value", "")))
            words: list[tuple[str, str]] = []
            for concept in role.get("specialty", []):
                text = concept.get("text") or next((c.get("display") for c in concept.get("coding", [])
                                                    if c.get("display")), None)
                codes = " ".join(c.get("code", "") for c in concept.get("coding", []))
                if text:
                    every.add(text)
                words.append((text or codes, f"{text or ''} {codes}".casefold()))
            if pid is not None:
                specialties_of.setdefault(pid, []).extend(words)
        zones: dict[str, str] = {}
        for s in schedules:
            if not s.get("active", True):
                continue
            tz = next((x.get("valueCode") for x in s.get("extension", []) if x.get("url") == EXT_TIMEZONE), None)
            for pid in _ref_ids(s.get("actor", []), "Practitioner"):
                zones[pid] = tz or "UTC"

        cards = []
        for p in practitioners:
            spec = specialties_of.get(p["id"], [])
            if specialty and not any(specialty in haystack for _, haystack in spec):
                continue
            shown = tuple(dict.fromkeys(text for text, _ in spec if text))
            cards.append(PractitionerCard(p["id"], person_name(p) or f"Practitioner/{p['id']}", shown,
                                          p["id"] in zones, zones.get(p["id"])))
        cards.sort(key=lambda c: (not c.bookable, c.name.casefold()))
        return Directory(cards[:limit], sorted(every))

    def free_slots(self, principal: Principal, practitioner_id: str, *, days: int = DEFAULT_SLOT_DAYS,
                   start: datetime | None = None) -> FreeSlots:
        """The practitioner's free Slots from now (or ``start``) for ``days`` days, in time order,
        with the time zone of their hours and their name. NotFound: no such practitioner."""
        _check_id(practitioner_id, "practitioner")
        if not isinstance(days, int) or not 1 <= days <= MAX_SLOT_DAYS:
            raise InvalidInput(f"list free slots for 1 to {MAX_SLOT_DAYS} days")
        now = self.now()
        begin = max(now, start) if start is not None else now
        sched_id = schedule_id_for(practitioner_id)
        with UnitOfWork(self.engine) as uow:
            practitioner = self.records.read_in(uow.c, principal, "Practitioner", practitioner_id)
            name = person_name(practitioner.body) or f"Practitioner/{practitioner_id}"
            try:
                schedule = self.records.read_in(uow.c, principal, "Schedule", sched_id)
            except NotFound:
                return FreeSlots([], None, name)
            uow.commit()
        assert schedule.body is not None
        tz = next((x.get("valueCode") for x in schedule.body.get("extension", []) if x.get("url") == EXT_TIMEZONE),
                  "UTC")
        bundle = self.records.search(principal, "Slot", [
            ("schedule", f"Schedule/{sched_id}"), ("status", "free"), ("start", f"gt{instant(begin)}"),
            ("start", f"lt{instant(begin + timedelta(days=days))}"), ("_sort", "start"),
            ("_count", str(self.records.settings.max_count))])
        out = []
        for s in _entries(bundle, "Slot"):
            a, b = parse_instant(s.get("start")), parse_instant(s.get("end"))
            if a is not None and b is not None and a > now:
                out.append(SlotView(s["id"], a, b))
        return FreeSlots(out, tz, name)

    def slot(self, principal: Principal, slot_id: str) -> tuple[SlotView, str, PractitionerCard]:
        """One Slot with its practitioner (for a confirmation page); NotFound when unknown."""
        _check_id(slot_id, "slot")
        with UnitOfWork(self.engine) as uow:
            slot, schedule, practitioner_id, name = self._slot_context(uow.c, principal, slot_id)
            uow.commit()
        assert slot.body is not None and schedule.body is not None
        tz = next((x.get("valueCode") for x in schedule.body.get("extension", []) if x.get("url") == EXT_TIMEZONE),
                  "UTC")
        a, b = parse_instant(slot.body.get("start")), parse_instant(slot.body.get("end"))
        if a is None or b is None:
            raise Unprocessable(f"Slot/{slot_id} has no valid start and end")
        return (SlotView(slot_id, a, b), slot.body.get("status", ""),
                PractitionerCard(practitioner_id, name, (), True, tz))

    def _slot_context(self, c: Connection, principal: Principal, slot_id: str) -> tuple[Stored, Stored, str, str]:
        """The Slot, its Schedule, the Schedule's Practitioner id and name."""
        try:
            slot = self.records.read_in(c, principal, "Slot", slot_id)
        except NotFound:  # Gone too: a withdrawn slot is as unknown as one that never existed
            raise NotFound(f"There is no slot Slot/{slot_id}: it does not exist or was withdrawn. "
                           "Please pick another time.") from None
        assert slot.body is not None
        sched = _ref_ids([slot.body.get("schedule")], "Schedule")
        if not sched:
            raise Unprocessable(f"Slot/{slot_id} names no Schedule")
        try:
            schedule = self.records.read_in(c, principal, "Schedule", sched[0])
        except NotFound:
            raise Unprocessable(f"the Schedule of Slot/{slot_id} does not exist") from None
        assert schedule.body is not None
        actors = _ref_ids(schedule.body.get("actor", []), "Practitioner")
        if not actors:
            raise Unprocessable(f"the Schedule of Slot/{slot_id} names no Practitioner")
        display = next((a.get("display", "") for a in schedule.body.get("actor", [])
                        if a.get("reference") == f"Practitioner/{actors[0]}"), "")
        return slot, schedule, actors[0], display or f"Practitioner/{actors[0]}"

    # ---- booking ----------------------------------------------------------------------------

    @audited
    def book(self, principal: Principal, slot_id: str, *, patient_id: str | None = None) -> Stored:
        """Book Slot ``slot_id`` for ``patient_id`` (a patient: themselves) → the Appointment.

        Unknown or withdrawn slot: NotFound (404); in the past: InvalidInput (400); taken, also
        by a booking at the same instant: Conflict (409). Nothing is stored unless it succeeds."""
        patient_id = patient_id or principal.patient_id
        if not patient_id:
            raise InvalidInput("say which patient the visit is for (patient)")
        _check_id(slot_id, "slot")
        _allow(policy.book_visit(principal, patient_id=patient_id), "booking a visit", action="create",
               patients=(patient_id,))
        with UnitOfWork(self.engine) as uow:
            stored = self._book_in(uow.c, principal, slot_id, patient_id)
            uow.commit()
        return stored

    def _book_in(self, c: Connection, principal: Principal, slot_id: str, patient_id: str) -> Stored:
        slot, schedule, practitioner_id, name = self._slot_context(c, principal, slot_id)
        assert slot.body is not None and schedule.body is not None
        start, end = parse_instant(slot.body.get("start")), parse_instant(slot.body.get("end"))
        if start is None or end is None:
            raise Unprocessable(f"Slot/{slot_id} has no valid start and end")
        if start <= self.now():
            raise InvalidInput(f"This slot ({instant(start)}) is in the past. Please pick a later time.")
        if slot.body.get("status") != "free":
            raise Conflict(ALREADY_TAKEN)
        appointment_id = self.records.store.new_id()
        try:
            # the guarantee: of two bookings of this Slot only one row can exist (PostgreSQL: the
            # second insert waits for the first transaction and then fails here)
            run(c, _BOOK, (slot_id, appointment_id, patient_id, _micros(self.now())))
        except IntegrityError as exc:
            raise Conflict(TAKEN) from exc
        try:
            # the stored Slot was valid and only its status changes, to a code of the required
            # binding: validating it again would be a third of the booking's CPU time
            self.records.update_in(c, SCHEDULER, "Slot", slot_id, {**slot.body, "status": "busy"},
                                   if_match=slot.version, validated=True)
        except PreconditionFailed as exc:  # changed (withdrawn, blocked) since we read it
            raise Conflict(TAKEN) from exc
        tz = next((x.get("valueCode") for x in schedule.body.get("extension", []) if x.get("url") == EXT_TIMEZONE),
                  "UTC")
        appointment = {
            "resourceType": "Appointment",
            "extension": [{"url": EXT_TIMEZONE, "valueCode": tz}],
            "status": "booked",
            "description": "Video visit",
            "slot": [{"reference": f"Slot/{slot_id}"}],
            "start": instant(start), "end": instant(end),
            "minutesDuration": max(1, int((end - start).total_seconds() // 60)),
            "created": self.now().date().isoformat(),
            "participant": [
                {"actor": {"reference": f"Patient/{patient_id}"}, "required": "required", "status": "accepted"},
                {"actor": {"reference": f"Practitioner/{practitioner_id}", "display": name},
                 "required": "required", "status": "accepted"},
            ],
        }
        stored, _ = self.records.create_in(c, principal, appointment, res_id=appointment_id)
        return stored

    @audited
    def cancel(self, principal: Principal, appointment_id: str, *, reason: str = "") -> Stored:
        """Cancel a visit before it begins, freeing its Slot → the cancelled Appointment."""
        return self._cancel(principal, appointment_id, reason=reason)

    def _cancel(self, principal: Principal, appointment_id: str, *, reason: str = "") -> Stored:
        _check_id(appointment_id, "visit")
        with UnitOfWork(self.engine) as uow:
            current = self.records.read_in(uow.c, principal, "Appointment", appointment_id)
            assert current.body is not None
            self._may_change(principal, current.body, "cancelled")
            stored = self._release_in(uow.c, principal, current, "cancelled", reason=reason or "cancelled")
            uow.commit()
        return stored

    @audited
    def reschedule(self, principal: Principal, appointment_id: str, slot_id: str) -> tuple[Stored, Stored]:
        """Book ``slot_id`` for the same patient and cancel the visit, in one unit of work →
        (the new Appointment, the cancelled one). If the new slot cannot be booked, the visit
        stays as it was."""
        _check_id(appointment_id, "visit")
        _check_id(slot_id, "slot")
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            current = self.records.read_in(c, principal, "Appointment", appointment_id)
            assert current.body is not None
            patients, _ = participants(current.body)
            if len(patients) != 1:
                raise Unprocessable("only a visit of exactly one patient can be rescheduled")
            (patient_id,) = patients
            self._may_change(principal, current.body, "cancelled")
            _allow(policy.book_visit(principal, patient_id=patient_id), "booking a visit", action="create",
                   patients=patients)
            if slot_id in slot_ids(current.body):
                raise Conflict("This visit already has this slot. Please pick another time.")
            self._check_transition(current.body, "cancelled")
            booked = self._book_in(c, principal, slot_id, patient_id)
            cancelled = self._release_in(c, principal, current, "cancelled", reason="rescheduled")
            uow.commit()
        return booked, cancelled

    @audited
    def set_status(self, principal: Principal, appointment_id: str, status: str) -> Stored:
        """Move a visit to ``status`` (arrived, checked-in, fulfilled, noshow, cancelled,
        entered-in-error) as the state machine and the policy allow."""
        _check_id(appointment_id, "visit")
        if status not in TRANSITIONS:
            raise InvalidInput(f"{str(status)[:30]!r} is not an Appointment status")
        if status == "cancelled":
            return self._cancel(principal, appointment_id)
        with UnitOfWork(self.engine) as uow:
            c = uow.c
            current = self.records.read_in(c, principal, "Appointment", appointment_id)
            assert current.body is not None
            self._may_change(principal, current.body, status)
            if status in RELEASED:
                stored = self._release_in(c, principal, current, status)
            else:
                self._check_transition(current.body, status)
                stored = self._update_appointment(c, principal, current, {**current.body, "status": status})
            uow.commit()
        return stored

    def _may_change(self, principal: Principal, body: dict, status: str) -> None:
        patients, practitioners = participants(body)
        _allow(policy.change_visit_status(principal, status=status, patients=patients, practitioners=practitioners),
               f"changing this visit to {status}", action="update", patients=patients)

    @staticmethod
    def _check_transition(body: dict, status: str) -> None:
        was = body.get("status", "")
        if status not in TRANSITIONS.get(was, frozenset()):
            allowed = ", ".join(sorted(TRANSITIONS.get(was, ()))) or "none: it is final"
            raise Conflict(f"This visit is {was}; it cannot become {status} (allowed from {was}: {allowed}).")

    def _release_in(self, c: Connection, principal: Principal, current: Stored, status: str, *,
                    reason: str = "") -> Stored:
        body = current.body
        assert body is not None
        self._check_transition(body, status)
        start = parse_instant(body.get("start"))
        now = self.now()
        if status == "cancelled" and start is not None and start <= now:
            raise InvalidInput("This visit has already begun and can no longer be cancelled.")
        if status == "noshow" and start is not None and start > now:
            raise InvalidInput("A visit that has not begun cannot be marked as a no-show.")
        for sid in sorted(slot_ids(body)):
            freed = run(c, _RELEASE, (sid, current.res_id)).rowcount
            if not freed:
                continue
            try:
                slot = self.records.read_in(c, SCHEDULER, "Slot", sid)
            except NotFound:  # withdrawn by hand since: nothing to free
                continue
            if slot.body is not None and slot.body.get("status") == "busy":
                self.records.update_in(c, SCHEDULER, "Slot", sid, {**slot.body, "status": "free"})
        new = {**body, "status": status}
        if status == "cancelled":
            code = "pat" if principal.role == "patient" else "prov" if principal.role == "practitioner" else "other"
            new["cancelationReason"] = {"coding": [{"system": CANCEL_REASON_SYSTEM, "code": code}], "text": reason}
        return self._update_appointment(c, principal, current, new)

    def _update_appointment(self, c: Connection, principal: Principal, current: Stored, body: dict) -> Stored:
        try:
            stored, _ = self.records.update_in(c, principal, "Appointment", current.res_id, body,
                                               if_match=current.version)
        except PreconditionFailed as exc:
            raise Conflict("This visit was changed at the same moment by someone else. Reload it and try again.") \
                from exc
        return stored

    # ---- listing ----------------------------------------------------------------------------

    def upcoming(self, principal: Principal, *, within: timedelta | None = None, limit: int = 100) -> list[Visit]:
        """The caller's visits that have not ended (a patient's own; a practitioner's with their
        patients' names), soonest first; ``within``: only those starting before now + within."""
        now = self.now()
        if principal.role == "patient" and principal.patient_id:
            items = [("patient", principal.patient_id)]
        elif principal.role == "practitioner" and principal.practitioner_id:
            items = [("practitioner", principal.practitioner_id), ("_include", "Appointment:patient")]
        else:
            return []
        # a visit in progress began before now: look back by the longest visit
        items += [("date", f"ge{instant(now - timedelta(minutes=av.MAX_VISIT_MINUTES))}"), ("_sort", "date"),
                  ("_count", str(min(limit, self.records.settings.max_count)))]
        if within is not None:
            items.append(("date", f"le{instant(now + within)}"))
        bundle = self.records.search(principal, "Appointment", items)
        names = {p["id"]: person_name(p) for p in _entries(bundle, "Patient")}
        out = []
        for body in _entries(bundle, "Appointment"):
            v = visit_of(body, names)
            if v is not None and v.status in UPCOMING and v.end > now:
                out.append(v)
        return out

    def visit(self, principal: Principal, appointment_id: str) -> Visit:
        _check_id(appointment_id, "visit")
        stored = self.records.read(principal, "Appointment", appointment_id)
        v = visit_of(stored.body or {})
        if v is None:
            raise Unprocessable(f"Appointment/{appointment_id} has no valid start and end")
        return v

    # ---- the write guard --------------------------------------------------------------------

    def _guard(self, c: Connection, principal: Principal, res_type: str, res_id: str | None,
               before: dict | None, after: dict | None) -> None:
        """Keep ``slot_bookings`` and the Appointments and Slots in step (see the module
        docstring); runs inside every Appointment and Slot write (``RecordsService.add_write_guard``)."""
        if res_type == "Slot":
            row = run(c, _HOLDER, (res_id,)).fetchone() if res_id else None
            holder = row[0] if row else None
            if holder is None:
                return
            cancel = f"cancel or reschedule the visit first (POST /api/visits/appointments/{holder}/cancel)"
            if after is None:
                raise Conflict(f"Slot/{res_id} is booked: {cancel}")
            if after.get("status") != "busy":
                raise Conflict(f"Slot/{res_id} is booked and stays busy until its visit is cancelled: {cancel}")
            if before is not None and (before.get("start"), before.get("end")) != (after.get("start"), after.get("end")):
                raise Conflict(f"Slot/{res_id} is booked and cannot move: reschedule the visit instead")
            return
        held = slot_ids(after) if after is not None and after.get("status") not in RELEASED else frozenset()
        for sid in held:
            row = run(c, _HOLDER, (sid,)).fetchone()
            if row is None or row[0] != res_id:
                raise Unprocessable(
                    f"An Appointment that takes a Slot (Slot/{sid}) is booked with POST /api/visits/appointments "
                    '{"slot": "<id>"}, which guarantees that no slot is booked twice; it cannot be written '
                    "directly. Leave out the slot to record an appointment without one.")
        if res_id is not None:
            mine = [r[0] for r in run(c, _HELD_BY, (res_id,)).fetchall()]
            for sid in mine:
                if sid not in held:
                    raise Unprocessable(
                        f"Appointment/{res_id} holds Slot/{sid}: cancel or reschedule it with POST "
                        f"/api/visits/appointments/{res_id}/cancel or /reschedule, which free the slot.")
        if before is not None and after is not None and before.get("status") != after.get("status"):
            status = str(after.get("status"))
            self._check_transition(before, status)
            patients, practitioners = participants(before)
            _allow(policy.change_visit_status(principal, status=status, patients=patients,
                                              practitioners=practitioners),
                   f"changing this visit to {status}", action="update", patients=patients)


def _micros(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)
