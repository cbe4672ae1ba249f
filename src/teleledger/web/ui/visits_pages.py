"""Scheduling pages: the patient books, cancels and reschedules visits; the practitioner
publishes weekly hours and sees upcoming visits. Server-rendered forms that work without
JavaScript.

    GET  /visits                       → "My visits" (patient) or "Upcoming visits" (practitioner)
    GET  /visits/book?q=&specialty=    find a practitioner (patient)
    GET  /visits/book/{practitioner}   pick a free time, a week at a time (?week=, ?reschedule=)
    GET  /visits/confirm?slot=         confirm the chosen time (?reschedule=)
    POST /visits/book                  book it → 303 to My visits, or the page again with the reason
    GET  /visits/mine                  the patient's upcoming visits: join, reschedule, cancel
    POST /visits/{id}/cancel           cancel → 303 back to the list
    GET  /visits/{id}/reschedule       → the practitioner's free times, to pick the new one
    POST /visits/{id}/reschedule       book the new time and cancel the old one, atomically
    GET  /visits/availability          the practitioner's weekly hours form
    POST /visits/availability          publish them
    GET  /visits/upcoming              the practitioner's upcoming visits with their patients

The signed-in person is the cookie session's ``Principal`` (``session.page_principal``); every
use case is ``visits.scheduling`` as that person, so each page with patient data passes the same
policy decision point and audit as the API, and a refusal is rendered, never a traceback.
Whether a page is offered at all is asked of ``teleledger.policy`` too.

It also registers ``visit_reminders(request, user)`` for templates: the portal shows the visits
that begin within 24 hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from teleledger.core.errors import Forbidden, InvalidInput, TeleledgerError
from teleledger.policy import decide as policy
from teleledger.policy.model import Decision, Principal
from teleledger.visits import availability as av
from teleledger.visits.scheduling import DEFAULT_WEEKS, MAX_WEEKS, Scheduling, SlotView, Visit
from teleledger.web.deps import in_thread
from teleledger.web.ui.session import PagePrincipal, render, templates

router = APIRouter(tags=["ui"])

REMINDER_WINDOW = timedelta(hours=24)
DAYS_PER_PAGE = 7
MAX_WEEK_PAGES = 12
VISIT_LENGTHS = (10, 15, 20, 25, 30, 40, 45, 50, 60, 90)
DEFAULT_HOURS = {d: ("09:00", "17:00", "12:00-13:00") for d in av.WEEKDAYS[:5]}
DEFAULT_ZONE = "Europe/Berlin"
NOTICES = {
    "booked": "Your visit is booked.",
    "cancelled": "The visit was cancelled and its time is free again.",
    "rescheduled": "Your visit was moved to the new time. The old time is free again.",
}


def _scheduling(request: Request) -> Scheduling:
    return request.app.state.scheduling


def _to_login() -> Response:
    # the sign-in page only returns to the pages it knows; everyone lands on the portal
    return RedirectResponse("/login", status_code=303, headers={"Cache-Control": "no-store"})


def _see_other(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


def _forbidden(request: Request, user: Principal, message: str) -> Response:
    return render(request, "forbidden.html", {"message": f"{message} You are signed in as a {user.role}."},
                  status=403, user=user)


def _refused(request: Request, user: Principal, decision: Decision) -> Response:
    return _forbidden(request, user, decision.detail)


# ---- time, as people read it ----------------------------------------------------------------


@dataclass(frozen=True)
class When:
    """A moment in a time zone, with the texts a page shows."""

    utc: str  # ISO 8601 for <time datetime>
    day: str  # Thursday 26 November 2026
    clock: str  # 09:00
    zone: str


def when(moment: datetime, zone: str) -> When:
    try:
        local = moment.astimezone(ZoneInfo(zone))
    except (ValueError, KeyError):
        local, zone = moment, "UTC"
    return When(moment.isoformat().replace("+00:00", "Z"), f"{local:%A} {local.day} {local:%B %Y}",
                f"{local:%H:%M}", zone)


@dataclass(frozen=True)
class VisitRow:
    visit: Visit
    start: When
    end: When
    starts_in: str  # "in 3 hours", for reminders


def _starts_in(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "now"
    if minutes < 60:
        return f"in {minutes} minute{'s' if minutes != 1 else ''}"
    hours = minutes // 60
    return f"in {hours} hour{'s' if hours != 1 else ''}"


def _rows(visits: list[Visit], now: datetime) -> list[VisitRow]:
    return [VisitRow(v, when(v.start, v.timezone), when(v.end, v.timezone), _starts_in(v.start - now)) for v in visits]


def visit_reminders(request: Request, user: Principal | None) -> list[VisitRow]:
    """The signed-in person's visits that begin within 24 hours (for the portal's reminders);
    empty when there are none or they cannot be read (the portal must open regardless)."""
    if user is None:
        return []
    sched = _scheduling(request)
    try:
        visits = sched.upcoming(user, within=REMINDER_WINDOW)
    except TeleledgerError:
        return []
    return _rows(visits, sched.now())


templates.env.globals["visit_reminders"] = visit_reminders


# ---- patient: find, pick, confirm, book ------------------------------------------------------


@router.get("/visits", response_class=HTMLResponse)
def visits_home(user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    return _see_other("/visits/upcoming" if user.role == "practitioner" else "/visits/mine")


def _booking_refused(user: Principal) -> Decision | None:
    d = policy.book_visit(user, patient_id=user.patient_id or "")
    return None if d.allowed else d


@router.get("/visits/book", response_class=HTMLResponse)
def find(request: Request, user: PagePrincipal, q: str = "", specialty: str = "", reschedule: str = "") -> Response:
    if user is None:
        return _to_login()
    if (refused := _booking_refused(user)) is not None:
        return _refused(request, user, refused)
    error = ""
    try:
        found = _scheduling(request).find_practitioners(user, q=q[:100], specialty=specialty[:100])
        cards, specialties = found.practitioners, found.specialties
    except TeleledgerError as exc:
        cards, specialties, error = [], [], exc.message
    return render(request, "visits_book.html", {
        "q": q[:100], "specialty": specialty[:100], "cards": cards, "specialties": specialties,
        "searched": bool(q or specialty), "error": error, "reschedule": reschedule[:64],
    }, status=400 if error else 200, user=user)


@router.get("/visits/book/{practitioner_id}", response_class=HTMLResponse)
def pick(practitioner_id: str, request: Request, user: PagePrincipal, week: int = 0, reschedule: str = "") -> Response:
    if user is None:
        return _to_login()
    if (refused := _booking_refused(user)) is not None:
        return _refused(request, user, refused)
    sched = _scheduling(request)
    week = min(max(week, 0), MAX_WEEK_PAGES - 1)
    start = sched.now() + timedelta(days=DAYS_PER_PAGE * week)
    name, error, status = "", "", 200
    slots: list[SlotView] = []
    zone = None
    try:
        found = sched.free_slots(user, practitioner_id, days=DAYS_PER_PAGE, start=start)
        slots, zone, name = found.slots, found.timezone, found.practitioner_name
    except TeleledgerError as exc:
        error, status = exc.message, exc.status
    days: dict[str, list[tuple[SlotView, When]]] = {}
    for s in slots:
        w = when(s.start, zone or "UTC")
        days.setdefault(w.day, []).append((s, w))
    return render(request, "visits_slots.html", {
        "practitioner_id": practitioner_id, "name": name or "this practitioner", "zone": zone,
        "days": days, "week": week, "last_week": MAX_WEEK_PAGES - 1, "error": error,
        "reschedule": reschedule[:64], "published": zone is not None,
    }, status=status, user=user)


def _confirm_page(request: Request, user: Principal, slot_id: str, *, reschedule: str = "", error: str = "",
                  status: int = 200) -> Response:
    context: dict = {"slot_id": slot_id, "reschedule": reschedule, "error": error, "slot": None}
    try:
        view, slot_status, card = _scheduling(request).slot(user, slot_id)
        context.update(slot=view, practitioner=card, start=when(view.start, card.timezone or "UTC"),
                       end=when(view.end, card.timezone or "UTC"),
                       minutes=int((view.end - view.start).total_seconds() // 60))
        if not error and slot_status != "free":
            context["error"], status = "This slot is already booked. Please pick another time.", 409
    except TeleledgerError as exc:
        if not error:
            context["error"], status = exc.message, exc.status
    return render(request, "visits_confirm.html", context, status=status, user=user)


@router.get("/visits/confirm", response_class=HTMLResponse)
def confirm(request: Request, user: PagePrincipal, slot: str = "", reschedule: str = "") -> Response:
    if user is None:
        return _to_login()
    if (refused := _booking_refused(user)) is not None:
        return _refused(request, user, refused)
    if not slot:
        return render(request, "visits_confirm.html", {"slot": None, "slot_id": "", "reschedule": reschedule[:64],
                                                       "error": "Choose a time first."}, status=400, user=user)
    return _confirm_page(request, user, slot[:64], reschedule=reschedule[:64])


@router.post("/visits/book", response_class=HTMLResponse)
async def book(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    form = await request.form()
    slot_id = str(form.get("slot", ""))[:64]
    return await _run_in_thread(request, _book, request, user, slot_id)


def _book(request: Request, user: Principal, slot_id: str) -> Response:
    try:
        _scheduling(request).book(user, slot_id)
    except Forbidden as exc:
        return _forbidden(request, user, exc.message)
    except TeleledgerError as exc:
        return _confirm_page(request, user, slot_id, error=exc.message, status=exc.status)
    return _see_other("/visits/mine?notice=booked")


async def _run_in_thread(request: Request, fn, *args):  # type: ignore[no-untyped-def]
    return await in_thread(request, fn, *args)


# ---- patient: my visits, cancel, reschedule ---------------------------------------------------


def _list_page(request: Request, user: Principal, template: str, *, notice: str = "", error: str = "",
               status: int = 200) -> Response:
    sched = _scheduling(request)
    try:
        rows = _rows(sched.upcoming(user), sched.now())
    except TeleledgerError as exc:
        rows, error, status = [], error or exc.message, exc.status if status == 200 else status
    return render(request, template, {"rows": rows, "notice": NOTICES.get(notice, ""), "error": error},
                  status=status, user=user)


@router.get("/visits/mine", response_class=HTMLResponse)
def mine(request: Request, user: PagePrincipal, notice: str = "") -> Response:
    if user is None:
        return _to_login()
    if user.role == "practitioner":
        return _see_other("/visits/upcoming")
    if (refused := _booking_refused(user)) is not None:
        return _refused(request, user, refused)
    return _list_page(request, user, "visits_mine.html", notice=notice)


def _back(user: Principal) -> tuple[str, str]:
    return ("/visits/upcoming", "visits_upcoming.html") if user.role == "practitioner" else \
        ("/visits/mine", "visits_mine.html")


@router.post("/visits/{appointment_id}/cancel", response_class=HTMLResponse)
def cancel(appointment_id: str, request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    url, template = _back(user)
    try:
        _scheduling(request).cancel(user, appointment_id)
    except Forbidden as exc:
        return _forbidden(request, user, exc.message)
    except TeleledgerError as exc:
        return _list_page(request, user, template, error=exc.message, status=exc.status)
    return _see_other(f"{url}?notice=cancelled")


@router.get("/visits/{appointment_id}/reschedule", response_class=HTMLResponse)
def reschedule_pick(appointment_id: str, request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    try:
        visit = _scheduling(request).visit(user, appointment_id)
    except Forbidden as exc:
        return _forbidden(request, user, exc.message)
    except TeleledgerError as exc:
        return _list_page(request, user, "visits_mine.html", error=exc.message, status=exc.status)
    if not visit.practitioner_id:
        return _list_page(request, user, "visits_mine.html", error="This visit names no practitioner.", status=422)
    return _see_other(f"/visits/book/{visit.practitioner_id}?reschedule={visit.id}")


@router.post("/visits/{appointment_id}/reschedule", response_class=HTMLResponse)
async def reschedule(appointment_id: str, request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    form = await request.form()
    slot_id = str(form.get("slot", ""))[:64]
    return await _run_in_thread(request, _reschedule, request, user, appointment_id, slot_id)


def _reschedule(request: Request, user: Principal, appointment_id: str, slot_id: str) -> Response:
    try:
        _scheduling(request).reschedule(user, appointment_id, slot_id)
    except Forbidden as exc:
        return _forbidden(request, user, exc.message)
    except TeleledgerError as exc:
        return _confirm_page(request, user, slot_id, reschedule=appointment_id, error=exc.message, status=exc.status)
    return _see_other("/visits/mine?notice=rescheduled")


# ---- practitioner: availability, upcoming visits ---------------------------------------------


@dataclass(frozen=True)
class DayRow:
    key: str
    name: str
    on: bool
    start: str
    end: str
    breaks: str


def _day_rows(values: dict[str, tuple[str, str, str]]) -> list[DayRow]:
    rows = []
    for key, name in zip(av.WEEKDAYS, av.WEEKDAY_NAMES):
        start, end, breaks = values.get(key, ("09:00", "17:00", ""))
        rows.append(DayRow(key, name, key in values, start, end, breaks))
    return rows


def _availability_page(request: Request, user: Principal, *, values: dict[str, tuple[str, str, str]],
                       minutes: int | str, zone: str, weeks: int | str, notice: str = "", error: str = "",
                       status: int = 200, published: bool = False) -> Response:
    return render(request, "visits_availability.html", {
        "days": _day_rows(values), "minutes": str(minutes), "zone": zone, "weeks": str(weeks),
        "lengths": VISIT_LENGTHS, "zones": av.zone_names(), "max_weeks": MAX_WEEKS, "notice": notice,
        "error": error, "published": published,
    }, status=status, user=user)


PRACTITIONERS_ONLY = "This page shows a practitioner's own hours and visits."


def _availability_refused(user: Principal) -> Decision | None:
    d = policy.manage_availability(user, practitioner_id=user.practitioner_id or "")
    return None if d.allowed else d


@router.get("/visits/availability", response_class=HTMLResponse)
def availability_form(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    if user.practitioner_id is None:
        return _forbidden(request, user, PRACTITIONERS_ONLY)
    if (refused := _availability_refused(user)) is not None:
        return _refused(request, user, refused)
    try:
        found = _scheduling(request).availability(user, user.practitioner_id)
    except TeleledgerError as exc:
        return _availability_page(request, user, values=DEFAULT_HOURS, minutes=20, zone=DEFAULT_ZONE,
                                  weeks=DEFAULT_WEEKS, error=exc.message, status=exc.status)
    if found is None:
        return _availability_page(request, user, values=DEFAULT_HOURS, minutes=20, zone=DEFAULT_ZONE,
                                  weeks=DEFAULT_WEEKS)
    hours, weeks = found
    values = {av.WEEKDAYS[d]: (f"{h.start:%H:%M}", f"{h.end:%H:%M}",
                               ", ".join(f"{a:%H:%M}-{b:%H:%M}" for a, b in h.breaks)) for d, h in hours.days.items()}
    return _availability_page(request, user, values=values, minutes=hours.visit_minutes, zone=hours.timezone,
                              weeks=weeks, published=True)


@router.post("/visits/availability", response_class=HTMLResponse)
async def publish(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login()
    form = await request.form()
    values = {key: (str(form.get(f"{key}_start", ""))[:10], str(form.get(f"{key}_end", ""))[:10],
                    str(form.get(f"{key}_breaks", ""))[:200])
              for key in av.WEEKDAYS if form.get(f"{key}_on")}
    minutes, zone = str(form.get("visit_minutes", ""))[:5], str(form.get("timezone", ""))[:64]
    weeks = str(form.get("weeks", DEFAULT_WEEKS))[:3]
    return await _run_in_thread(request, _publish, request, user, values, minutes, zone, weeks)


def _publish(request: Request, user: Principal, values: dict[str, tuple[str, str, str]], minutes: str, zone: str,
             weeks: str) -> Response:
    if user.practitioner_id is None:
        return _forbidden(request, user, PRACTITIONERS_ONLY)
    if (refused := _availability_refused(user)) is not None:
        return _refused(request, user, refused)
    try:
        hours = av.weekly_hours_from_parts(values, visit_minutes=minutes, timezone_name=zone)
        try:
            n_weeks = int(weeks)
        except ValueError:
            raise InvalidInput(f"publish availability for 1 to {MAX_WEEKS} weeks ahead") from None
        result = _scheduling(request).publish(user, user.practitioner_id, hours, weeks=n_weeks)
    except Forbidden as exc:
        return _forbidden(request, user, exc.message)
    except TeleledgerError as exc:
        return _availability_page(request, user, values=values, minutes=minutes, zone=zone, weeks=weeks,
                                  error=exc.message, status=exc.status)
    notice = (f"Your availability is published until {when(result.horizon_end, zone).day}: "
              f"{result.created} new free time{'s' if result.created != 1 else ''}, "
              f"{result.removed} withdrawn, {result.kept} unchanged.")
    return _availability_page(request, user, values=values, minutes=minutes, zone=zone, weeks=weeks, notice=notice,
                              published=True)


@router.get("/visits/upcoming", response_class=HTMLResponse)
def upcoming(request: Request, user: PagePrincipal, notice: str = "") -> Response:
    if user is None:
        return _to_login()
    if user.role == "patient":
        return _see_other("/visits/mine")
    if user.practitioner_id is None:
        return _forbidden(request, user, PRACTITIONERS_ONLY)
    return _list_page(request, user, "visits_upcoming.html", notice=notice)
