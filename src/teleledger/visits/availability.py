"""A practitioner's weekly availability, and the concrete visit slots it yields.

``WeeklyHours`` says, in the practitioner's own wall-clock time and IANA time zone, when they
see patients: working hours per weekday, breaks inside them, and the length of one visit.
``slots(hours, first, last)`` turns that into slots with UTC start and end over a range of local
dates. Wall-clock hours are what people mean, so:

* a 09:00 slot stays at 09:00 local time on both sides of a daylight-saving change (its UTC
  instant moves by the change of offset);
* spring forward: a slot whose local start does not exist (02:30 on the last Sunday of March in
  Europe/Berlin) is skipped, not moved;
* fall back: a local time that happens twice (02:30 on the last Sunday of October) yields one
  slot, at its first occurrence; and no slot ever straddles a change of offset, so every slot
  lasts exactly the visit length in real time and slots never overlap.

The text form of one day (``mon 09:00-17:00 break 12:00-13:00 break 15:00-15:15``) is what the
Schedule resource stores (``format_day`` / ``parse_day``) and what an error message quotes.

Pure: no clock, no database, no I/O of its own (``zoneinfo`` reads the system's time-zone
database). Bad input raises ``InvalidInput`` with a sentence a person can act on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from teleledger.core.errors import InvalidInput

__all__ = [
    "DayHours",
    "MAX_VISIT_MINUTES",
    "MIN_VISIT_MINUTES",
    "SlotTime",
    "WEEKDAYS",
    "WeeklyHours",
    "format_day",
    "parse_clock",
    "parse_day",
    "slots",
    "zone",
]

#: weekday keys, Monday first (``date.weekday()`` order)
WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEKDAY_NAMES: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MIN_VISIT_MINUTES = 5
MAX_VISIT_MINUTES = 240

_TICK = timedelta(microseconds=1)
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_RANGE = re.compile(r"^(\S+)\s*-\s*(\S+)$")


def parse_clock(text: str, *, what: str = "time") -> time:
    """``"09:00"`` → ``time(9, 0)``; anything else is an ``InvalidInput`` naming ``what``."""
    m = _CLOCK.match(text.strip())
    if not m:
        raise InvalidInput(f"{what}: {text.strip()[:20]!r} is not a time of day like 09:00 (24-hour clock)")
    return time(int(m.group(1)), int(m.group(2)))


def _hhmm(t: time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}"


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (``Europe/Berlin``); an unknown name is ``InvalidInput``."""
    name = name.strip()
    # ZoneInfo also accepts file paths below the tz database and raises odd errors on them:
    # only names the database lists are time zones here
    if name not in _zone_names():
        raise InvalidInput(f"time zone {name[:64]!r} is not an IANA time zone name such as Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # pragma: no cover - listed but unreadable
        raise InvalidInput(f"time zone {name!r} cannot be loaded") from exc


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(available_timezones())
    return _ZONES


def zone_names() -> list[str]:
    """Every IANA zone name, sorted (for a form's list)."""
    return sorted(n for n in _zone_names() if "/" in n and not n.startswith(("Etc/", "SystemV/", "posix/", "right/")))


@dataclass(frozen=True)
class DayHours:
    """Working hours of one weekday, local wall-clock time, with breaks inside them."""

    start: time
    end: time
    breaks: tuple[tuple[time, time], ...] = ()

    def __post_init__(self) -> None:
        if self.start >= self.end:
            raise InvalidInput(f"working hours {_hhmm(self.start)}-{_hhmm(self.end)} end before they start")
        ordered = tuple(sorted(self.breaks))
        previous_end: time | None = None
        for b_start, b_end in ordered:
            span = f"break {_hhmm(b_start)}-{_hhmm(b_end)}"
            if b_start >= b_end:
                raise InvalidInput(f"{span} ends before it starts")
            if b_start < self.start or b_end > self.end:
                raise InvalidInput(f"{span} is outside the working hours {_hhmm(self.start)}-{_hhmm(self.end)}")
            if previous_end is not None and b_start < previous_end:
                raise InvalidInput(f"{span} overlaps another break")
            previous_end = b_end
        object.__setattr__(self, "breaks", ordered)

    def open_intervals(self) -> list[tuple[int, int]]:
        """The working hours minus the breaks, as (start, end) minutes after local midnight."""
        out, cursor = [], _minutes(self.start)
        for b_start, b_end in self.breaks:
            if _minutes(b_start) > cursor:
                out.append((cursor, _minutes(b_start)))
            cursor = max(cursor, _minutes(b_end))
        if _minutes(self.end) > cursor:
            out.append((cursor, _minutes(self.end)))
        return out


@dataclass(frozen=True)
class WeeklyHours:
    """When a practitioner sees patients: ``days`` maps a weekday (0 = Monday) to its hours."""

    days: Mapping[int, DayHours]
    visit_minutes: int
    timezone: str
    tz: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.visit_minutes, int) or not (
            MIN_VISIT_MINUTES <= self.visit_minutes <= MAX_VISIT_MINUTES
        ):
            raise InvalidInput(
                f"visit length must be a whole number of minutes from {MIN_VISIT_MINUTES} to {MAX_VISIT_MINUTES}"
            )
        for day in self.days:
            if day not in range(7):
                raise InvalidInput(f"weekday {day!r} is not 0 (Monday) to 6 (Sunday)")
        object.__setattr__(self, "days", dict(sorted(self.days.items())))
        object.__setattr__(self, "tz", zone(self.timezone))
        object.__setattr__(self, "timezone", self.timezone.strip())

    def describe(self) -> list[str]:
        """``["mon 09:00-17:00 break 12:00-13:00", ...]`` (the stored text form)."""
        return [format_day(d, h) for d, h in self.days.items()]


def format_day(weekday: int, hours: DayHours) -> str:
    text = f"{WEEKDAYS[weekday]} {_hhmm(hours.start)}-{_hhmm(hours.end)}"
    return text + "".join(f" break {_hhmm(a)}-{_hhmm(b)}" for a, b in hours.breaks)


def _parse_range(text: str, what: str) -> tuple[time, time]:
    m = _RANGE.match(text.strip())
    if not m:
        raise InvalidInput(f"{what}: {text.strip()[:40]!r} is not a range like 09:00-17:00")
    return parse_clock(m.group(1), what=what), parse_clock(m.group(2), what=what)


def parse_breaks(text: str, *, what: str = "breaks") -> tuple[tuple[time, time], ...]:
    """``"12:00-13:00, 15:00-15:15"`` → ranges (commas or semicolons; empty → none)."""
    parts = [p for p in re.split(r"[,;]", text) if p.strip()]
    return tuple(_parse_range(p, what) for p in parts)


def parse_day(text: str) -> tuple[int, DayHours]:
    """Inverse of ``format_day``: ``"mon 09:00-17:00 break 12:00-13:00"``."""
    words = text.split()
    if len(words) < 2 or words[0].lower() not in WEEKDAYS:
        raise InvalidInput(f"{text[:60]!r} does not start with a weekday (mon … sun) and hours like 09:00-17:00")
    day = WEEKDAYS.index(words[0].lower())
    start, end = _parse_range(words[1], WEEKDAY_NAMES[day])
    rest, breaks = words[2:], []
    while rest:
        if len(rest) < 2 or rest[0].lower() != "break":
            raise InvalidInput(f"{text[:60]!r}: after the hours only 'break HH:MM-HH:MM' may follow")
        breaks.append(_parse_range(rest[1], f"{WEEKDAY_NAMES[day]} break"))
        rest = rest[2:]
    return day, DayHours(start, end, tuple(breaks))


@dataclass(frozen=True, order=True)
class SlotTime:
    """One concrete slot: aware UTC datetimes, ``end - start`` = the visit length."""

    start: datetime
    end: datetime


def _local_instant(day: date, minutes: int, tz: ZoneInfo) -> datetime | None:
    """The first real instant (UTC) showing ``day`` + ``minutes`` on the local wall clock, or
    None when that wall-clock time does not exist (the spring-forward gap)."""
    naive = datetime.combine(day, time()) + timedelta(minutes=minutes)
    local = naive.replace(tzinfo=tz, fold=0)
    utc = local.astimezone(timezone.utc)
    # a time in the gap does not survive the round trip (Python shifts it by the offset change)
    if utc.astimezone(tz).replace(tzinfo=None) != naive:
        return None
    return utc


def slots(hours: WeeklyHours, first: date, last: date) -> list[SlotTime]:
    """Every slot on the local dates ``first`` … ``last`` (inclusive), in time order.

    Per open interval of a day (hours minus breaks) the local start times are the interval's
    start, then every visit length after it while a whole visit fits. A slot is kept when its
    start exists on the wall clock (its first occurrence when it exists twice) and the UTC
    offset does not change inside it, so it lasts the visit length on the wall clock too.
    """
    if last < first:
        return []
    if (last - first).days > 400:
        raise InvalidInput("slots can be generated for at most 400 days at once")
    length = hours.visit_minutes
    delta = timedelta(minutes=length)
    tz = hours.tz
    out: list[SlotTime] = []
    day = first
    while day <= last:
        dh = hours.days.get(day.weekday())
        if dh is not None:
            for lo, hi in dh.open_intervals():
                m = lo
                while m + length <= hi:
                    start = _local_instant(day, m, tz)
                    if start is not None:
                        end = start + delta
                        # the offset in force for the whole visit: the clock may change at its
                        # end (a visit may end at 02:00 when 02:00 becomes 03:00), not inside it
                        if start.astimezone(tz).utcoffset() == (end - _TICK).astimezone(tz).utcoffset():
                            out.append(SlotTime(start, end))
                    m += length
        day += timedelta(days=1)
    return out


def weekly_hours_from_text(days: Iterable[str], *, visit_minutes: int, timezone_name: str) -> WeeklyHours:
    """``WeeklyHours`` from stored day texts (see ``format_day``); a weekday named twice is an error."""
    parsed: dict[int, DayHours] = {}
    for text in days:
        d, h = parse_day(text)
        if d in parsed:
            raise InvalidInput(f"{WEEKDAY_NAMES[d]} is given twice")
        parsed[d] = h
    return WeeklyHours(parsed, visit_minutes, timezone_name)


def weekly_hours_from_parts(days: Mapping[str, tuple[str, str, str | Iterable[str]]], *, visit_minutes: object,
                            timezone_name: str) -> WeeklyHours:
    """``WeeklyHours`` from a form or a JSON body: weekday key (``mon`` …) → (start, end, breaks),
    breaks as ``"12:00-13:00, 15:00-15:15"`` or a list of such ranges; every error names the day."""
    parsed: dict[int, DayHours] = {}
    for key, (start, end, breaks) in days.items():
        k = str(key).strip().lower()[:3]
        if k not in WEEKDAYS:
            raise InvalidInput(f"{str(key)[:20]!r} is not a weekday (mon … sun)")
        name = WEEKDAY_NAMES[WEEKDAYS.index(k)]
        text = breaks if isinstance(breaks, str) else ", ".join(str(b) for b in breaks)
        try:
            parsed[WEEKDAYS.index(k)] = DayHours(parse_clock(str(start), what=f"{name} start"),
                                                 parse_clock(str(end), what=f"{name} end"),
                                                 parse_breaks(text, what=f"{name} breaks"))
        except InvalidInput as exc:
            message = exc.message if exc.message.startswith(name) else f"{name}: {exc.message}"
            raise InvalidInput(message) from None
    try:
        minutes = int(str(visit_minutes).strip())
    except ValueError:
        raise InvalidInput("visit length must be a whole number of minutes") from None
    return WeeklyHours(parsed, minutes, timezone_name)
