"""Scheduling endpoints at ``/api/visits`` (JSON; errors are FHIR OperationOutcomes).

    GET  /api/visits/practitioners?q=&specialty=     find practitioners by name or specialty
    GET  /api/visits/availability?practitioner=       a practitioner's published weekly hours
    POST /api/visits/availability                     publish weekly hours → Schedule + Slots
    GET  /api/visits/slots?practitioner=&days=        free slots, soonest first
    GET  /api/visits/appointments                     the caller's upcoming visits
    POST /api/visits/appointments {"slot"}            book → 201 + the FHIR Appointment
    POST /api/visits/appointments/{id}/cancel         cancel → the cancelled Appointment
    POST /api/visits/appointments/{id}/reschedule {"slot"}  → 201 + the new Appointment
    POST /api/visits/appointments/{id}/status {"status"}    → the Appointment

Booking a taken slot → 409, a past one → 400, an unknown one → 404, each an OperationOutcome
and nothing stored. ``POST /fhir/Appointment`` with a ``slot`` is refused (422) and points here:
see ``teleledger.visits.scheduling``.

Routes authenticate (Bearer, ``Ctx``), parse and call one scheduling use case in a worker
thread; they do no SQL and no authorization. This router must be included before any router
with a catch-all ``/api/visits/{appointment_id}`` route.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from teleledger.core.errors import InvalidInput
from teleledger.records.store import Stored
from teleledger.visits import availability as av
from teleledger.visits.scheduling import DEFAULT_SLOT_DAYS, DEFAULT_WEEKS, Scheduling, Visit
from teleledger.web.deps import Ctx, NodeDep, in_thread
from teleledger.web.errors import FHIR_JSON

router = APIRouter(prefix="/api/visits", tags=["visits"])


def scheduling(request: Request) -> Scheduling:
    return request.app.state.scheduling


def _json(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    def default(value: object) -> object:
        if isinstance(value, datetime):
            return value.isoformat().replace("+00:00", "Z")
        raise TypeError

    return Response(orjson.dumps(body, default=default), status_code=status, media_type="application/json",
                    headers=headers)


def _appointment(node, stored: Stored, status: int = 200) -> Response:  # type: ignore[no-untyped-def]
    headers = {"ETag": stored.etag}
    if status == 201:
        headers["Location"] = f"{node.settings.public_url}/fhir/Appointment/{stored.res_id}/_history/{stored.version}"
    return Response(orjson.dumps(stored.body), status_code=status, media_type=FHIR_JSON, headers=headers)


def _visit(v: Visit) -> dict:
    return {**asdict(v), "room": f"/visits/{v.id}/room"}


class DayIn(BaseModel):
    start: str = Field(max_length=10)
    end: str = Field(max_length=10)
    breaks: list[str] = Field(default_factory=list, max_length=12)


class AvailabilityIn(BaseModel):
    practitioner: str | None = Field(default=None, max_length=64, description="default: the caller's own")
    timezone: str = Field(max_length=64, description="IANA time zone, e.g. Europe/Berlin")
    visit_minutes: int
    weeks: int = DEFAULT_WEEKS
    days: dict[str, DayIn] = Field(max_length=7, description='weekday → hours, e.g. {"mon": {"start": "09:00", '
                                                             '"end": "17:00", "breaks": ["12:00-13:00"]}}')


class BookIn(BaseModel):
    slot: str = Field(max_length=64)
    patient: str | None = Field(default=None, max_length=64, description="default: the caller (a patient)")


class RescheduleIn(BaseModel):
    slot: str = Field(max_length=64)


class StatusIn(BaseModel):
    status: str = Field(max_length=32)


def _hours_json(found: tuple[av.WeeklyHours, int] | None) -> dict:
    if found is None:
        return {"published": False}
    hours, weeks = found
    days = {av.WEEKDAYS[d]: {"start": f"{h.start:%H:%M}", "end": f"{h.end:%H:%M}",
                             "breaks": [f"{a:%H:%M}-{b:%H:%M}" for a, b in h.breaks]} for d, h in hours.days.items()}
    return {"published": True, "timezone": hours.timezone, "visit_minutes": hours.visit_minutes, "weeks": weeks,
            "days": days}


def _practitioner(who, given: str | None) -> str:  # type: ignore[no-untyped-def]
    value = given or who.practitioner_id
    if not value:
        raise InvalidInput("say which practitioner (practitioner=<Practitioner id>)")
    return value


@router.get("/practitioners")
async def practitioners(request: Request, who: Ctx, q: Annotated[str, Query(max_length=100)] = "",
                        specialty: Annotated[str, Query(max_length=100)] = "") -> Response:
    found = await in_thread(request, scheduling(request).find_practitioners, who, q=q, specialty=specialty)
    return _json({"practitioners": [asdict(c) for c in found.practitioners], "specialties": found.specialties})


@router.get("/availability")
async def get_availability(request: Request, who: Ctx,
                           practitioner: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    found = await in_thread(request, scheduling(request).availability, who, _practitioner(who, practitioner))
    return _json(_hours_json(found))


@router.post("/availability")
async def publish(request: Request, who: Ctx, body: Annotated[AvailabilityIn, Body()]) -> Response:
    hours = av.weekly_hours_from_parts({k: (d.start, d.end, d.breaks) for k, d in body.days.items()},
                                       visit_minutes=body.visit_minutes, timezone_name=body.timezone)
    pid = _practitioner(who, body.practitioner)
    result = await in_thread(request, scheduling(request).publish, who, pid, hours, weeks=body.weeks)
    return _json({**asdict(result), "availability": _hours_json((hours, body.weeks))})


@router.get("/slots")
async def slots(request: Request, who: Ctx, practitioner: Annotated[str, Query(max_length=64)],
                days: Annotated[int, Query(ge=1, le=92)] = DEFAULT_SLOT_DAYS) -> Response:
    found = await in_thread(request, scheduling(request).free_slots, who, practitioner, days=days)
    return _json({"practitioner": practitioner, "name": found.practitioner_name, "timezone": found.timezone,
                  "slots": [asdict(s) for s in found.slots]})


@router.get("/appointments")
async def upcoming(request: Request, who: Ctx) -> Response:
    visits = await in_thread(request, scheduling(request).upcoming, who)
    return _json({"visits": [_visit(v) for v in visits]})


@router.post("/appointments")
async def book(request: Request, node: NodeDep, who: Ctx, body: Annotated[BookIn, Body()]) -> Response:
    stored = await in_thread(request, scheduling(request).book, who, body.slot, patient_id=body.patient)
    return _appointment(node, stored, 201)


@router.post("/appointments/{appointment_id}/cancel")
async def cancel(appointment_id: str, request: Request, node: NodeDep, who: Ctx) -> Response:
    stored = await in_thread(request, scheduling(request).cancel, who, appointment_id)
    return _appointment(node, stored)


@router.post("/appointments/{appointment_id}/reschedule")
async def reschedule(appointment_id: str, request: Request, node: NodeDep, who: Ctx,
                     body: Annotated[RescheduleIn, Body()]) -> Response:
    booked, _ = await in_thread(request, scheduling(request).reschedule, who, appointment_id, body.slot)
    return _appointment(node, booked, 201)


@router.post("/appointments/{appointment_id}/status")
async def set_status(appointment_id: str, request: Request, node: NodeDep, who: Ctx,
                     body: Annotated[StatusIn, Body()]) -> Response:
    stored = await in_thread(request, scheduling(request).set_status, who, appointment_id, body.status)
    return _appointment(node, stored)
