"""Weekly availability → slots (teleledger.visits.availability): wall-clock hours across
daylight-saving changes, breaks, bad input; properties checked with Hypothesis."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.visits.availability import (
    DayHours,
    WeeklyHours,
    format_day,
    parse_breaks,
    parse_clock,
    parse_day,
    slots,
    weekly_hours_from_parts,
    weekly_hours_from_text,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC = timezone.utc


def weekdays(start: str, end: str, *breaks: tuple[str, str]) -> dict[int, DayHours]:
    day = DayHours(parse_clock(start), parse_clock(end), tuple((parse_clock(a), parse_clock(b)) for a, b in breaks))
    return {d: day for d in range(5)}


def every_day(start: str, end: str) -> dict[int, DayHours]:
    return {d: DayHours(parse_clock(start), parse_clock(end)) for d in range(7)}


def local(slot_start: datetime, tz: ZoneInfo) -> datetime:
    return slot_start.astimezone(tz).replace(tzinfo=None)


def test_a_working_day_with_a_lunch_break_yields_twenty_minute_slots_outside_the_break():
    hours = WeeklyHours(weekdays("09:00", "17:00", ("12:00", "13:00")), 20, "Europe/Berlin")
    day = slots(hours, date(2026, 6, 1), date(2026, 6, 1))  # a Monday in summer time (UTC+2)
    assert len(day) == 21  # 9 in the morning, 12 in the afternoon
    assert day[0].start == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
    assert day[8].end == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # 11:40-12:00 local is the last before lunch
    assert day[9].start == datetime(2026, 6, 1, 11, 0, tzinfo=UTC)  # 13:00 local
    assert day[-1].end == datetime(2026, 6, 1, 15, 0, tzinfo=UTC)
    assert all(s.end - s.start == timedelta(minutes=20) for s in day)


def test_weekends_and_days_without_hours_have_no_slots():
    hours = WeeklyHours(weekdays("09:00", "10:00"), 30, "Europe/Berlin")
    assert slots(hours, date(2026, 6, 6), date(2026, 6, 7)) == []  # Saturday, Sunday
    assert len(slots(hours, date(2026, 6, 1), date(2026, 6, 7))) == 10


def test_a_visit_that_does_not_fit_before_the_end_of_hours_is_not_offered():
    hours = WeeklyHours(weekdays("09:00", "10:00"), 25, "Europe/Berlin")
    day = slots(hours, date(2026, 6, 1), date(2026, 6, 1))
    assert [local(s.start, BERLIN).time() for s in day] == [time(9, 0), time(9, 25)]


def test_nine_oclock_stays_nine_oclock_local_across_the_berlin_spring_forward_week():
    hours = WeeklyHours(weekdays("09:00", "09:20"), 20, "Europe/Berlin")
    # DST starts on Sunday 29 March 2026: Friday is UTC+1, Monday UTC+2
    friday, monday = slots(hours, date(2026, 3, 27), date(2026, 3, 30))
    assert friday.start == datetime(2026, 3, 27, 8, 0, tzinfo=UTC)
    assert monday.start == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)
    assert local(friday.start, BERLIN).time() == local(monday.start, BERLIN).time() == time(9, 0)


def test_nine_oclock_stays_nine_oclock_local_across_the_new_york_fall_back_week():
    hours = WeeklyHours(weekdays("09:00", "09:30"), 30, "America/New_York")
    # DST ends on Sunday 1 November 2026: Friday is UTC-4, Monday UTC-5
    friday, monday = slots(hours, date(2026, 10, 30), date(2026, 11, 2))
    assert friday.start == datetime(2026, 10, 30, 13, 0, tzinfo=UTC)
    assert monday.start == datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
    assert local(friday.start, NEW_YORK).time() == local(monday.start, NEW_YORK).time() == time(9, 0)


def test_local_times_that_do_not_exist_at_spring_forward_are_skipped_not_shifted():
    hours = WeeklyHours(every_day("01:00", "04:00"), 30, "Europe/Berlin")
    day = slots(hours, date(2026, 3, 29), date(2026, 3, 29))  # 02:00 → 03:00 that night
    starts = [local(s.start, BERLIN).time() for s in day]
    assert starts == [time(1, 0), time(1, 30), time(3, 0), time(3, 30)]
    assert all(s.end - s.start == timedelta(minutes=30) for s in day)
    # the real-time gap between 01:30-02:00 CET and 03:00 CEST is zero: 02:00 CET *is* 03:00 CEST
    assert day[1].end == day[2].start


def test_ambiguous_local_times_at_fall_back_give_one_slot_not_two():
    hours = WeeklyHours(every_day("01:00", "04:00"), 30, "Europe/Berlin")
    day = slots(hours, date(2026, 10, 25), date(2026, 10, 25))  # 03:00 CEST → 02:00 CET that night
    starts = [local(s.start, BERLIN).time() for s in day]
    assert starts == sorted(set(starts)), "a wall-clock time must not be offered twice"
    assert starts == [time(1, 0), time(1, 30), time(2, 0), time(2, 30), time(3, 0), time(3, 30)]
    # 02:00 and 02:30 are their first occurrence (summer time, UTC+2)
    assert day[2].start == datetime(2026, 10, 25, 0, 0, tzinfo=UTC)
    assert day[4].start == datetime(2026, 10, 25, 2, 0, tzinfo=UTC)  # 03:00 CET


def test_a_slot_that_would_straddle_the_clock_change_is_not_offered():
    # fall back: 02:45 CEST + 30 min would end at 02:15 CET on the clock
    autumn = slots(WeeklyHours(every_day("02:45", "04:00"), 30, "Europe/Berlin"), date(2026, 10, 25),
                   date(2026, 10, 25))
    assert [local(s.start, BERLIN).time() for s in autumn] == [time(3, 15)]
    # spring forward: 01:45 CET + 30 min would end at 03:15 CEST on the clock
    spring = slots(WeeklyHours(every_day("01:45", "04:00"), 30, "Europe/Berlin"), date(2026, 3, 29),
                   date(2026, 3, 29))
    assert [local(s.start, BERLIN).time() for s in spring] == [time(3, 15)]


def test_a_slot_may_end_exactly_when_the_clock_changes():
    # 02:30-03:00 CEST ends at the instant 03:00 CEST becomes 02:00 CET
    day = slots(WeeklyHours(every_day("02:30", "03:00"), 30, "Europe/Berlin"), date(2026, 10, 25),
                date(2026, 10, 25))
    assert [(s.start, s.end) for s in day] == [(datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
                                                datetime(2026, 10, 25, 1, 0, tzinfo=UTC))]


def test_the_new_york_spring_forward_night_skips_the_missing_hour():
    hours = WeeklyHours(every_day("01:00", "04:00"), 60, "America/New_York")
    day = slots(hours, date(2026, 3, 8), date(2026, 3, 8))
    assert [local(s.start, NEW_YORK).time() for s in day] == [time(1, 0), time(3, 0)]


def test_the_day_text_form_round_trips():
    text = "wed 08:30-18:00 break 12:00-12:45 break 15:00-15:15"
    day, hours = parse_day(text)
    assert day == 2 and format_day(day, hours) == text
    assert parse_breaks("12:00-12:45, 15:00-15:15") == hours.breaks
    weekly = weekly_hours_from_text([text, "mon 09:00-12:00"], visit_minutes=15, timezone_name="Europe/Berlin")
    assert weekly.describe() == ["mon 09:00-12:00", text]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DayHours(time(17), time(9)), "end before they start"),
        (lambda: DayHours(time(9), time(17), ((time(8), time(10)),)), "outside the working hours"),
        (lambda: DayHours(time(9), time(17), ((time(12), time(13)), (time(12, 30), time(14)))), "overlaps"),
        (lambda: DayHours(time(9), time(17), ((time(13), time(12)),)), "ends before it starts"),
        (lambda: WeeklyHours({0: DayHours(time(9), time(17))}, 3, "Europe/Berlin"), "visit length"),
        (lambda: WeeklyHours({0: DayHours(time(9), time(17))}, 20, "Mars/Olympus"), "not an IANA time zone"),
        (lambda: WeeklyHours({0: DayHours(time(9), time(17))}, 20, "../../etc/passwd"), "not an IANA time zone"),
        (lambda: WeeklyHours({7: DayHours(time(9), time(17))}, 20, "UTC"), "weekday"),
        (lambda: parse_clock("25:00"), "not a time of day"),
        (lambda: parse_day("someday 09:00-17:00"), "does not start with a weekday"),
        (lambda: parse_day("mon 09:00-17:00 lunch 12:00-13:00"), "only 'break"),
        (lambda: weekly_hours_from_text(["mon 09:00-10:00", "mon 11:00-12:00"], visit_minutes=20,
                                        timezone_name="UTC"), "given twice"),
    ],
)
def test_bad_availability_is_refused_with_a_sentence_naming_the_problem(build, message):
    with pytest.raises(InvalidInput, match=message):
        build()


# ---- properties ---------------------------------------------------------------------------------

ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC", "America/Santiago"]


@st.composite
def day_hours(draw) -> DayHours:  # type: ignore[no-untyped-def]
    start = draw(st.integers(0, 22 * 60))
    end = draw(st.integers(start + 5, 23 * 60 + 59))
    cuts = sorted(draw(st.lists(st.integers(start, end), max_size=6, unique=True)))
    cuts = cuts[: len(cuts) // 2 * 2]
    breaks = tuple((time(a // 60, a % 60), time(b // 60, b % 60)) for a, b in zip(cuts[::2], cuts[1::2]) if a < b)
    return DayHours(time(start // 60, start % 60), time(end // 60, end % 60), breaks)


@st.composite
def weekly(draw) -> WeeklyHours:  # type: ignore[no-untyped-def]
    days = draw(st.dictionaries(st.integers(0, 6), day_hours(), min_size=1, max_size=7))
    return WeeklyHours(days, draw(st.integers(5, 240)), draw(st.sampled_from(ZONES)))


# ranges that include the DST changes of both hemispheres
FIRST_DAYS = st.sampled_from([date(2026, 3, 6), date(2026, 3, 26), date(2026, 4, 2), date(2026, 10, 22),
                              date(2026, 10, 29), date(2026, 9, 24)])


@settings(max_examples=150, deadline=None)
@given(weekly(), FIRST_DAYS, st.integers(0, 13))
def test_slots_never_overlap_never_fall_in_a_break_and_stay_within_the_hours(hours, first, span):
    out = slots(hours, first, first + timedelta(days=span))
    tz = hours.tz
    length = timedelta(minutes=hours.visit_minutes)
    for a, b in zip(out, out[1:]):
        assert a.end <= b.start, f"{a} overlaps {b}"
    for s in out:
        assert s.start.tzinfo is not None and s.start.utcoffset() == timedelta(0)
        assert s.end - s.start == length  # a real visit length, whatever the clock does
        offset = s.start.astimezone(tz).utcoffset()
        assert (s.end - timedelta(microseconds=1)).astimezone(tz).utcoffset() == offset, "offset changes inside"
        # the wall clock in the offset in force during the visit
        lo = (s.start + offset).replace(tzinfo=None)
        hi = lo + length
        assert lo == local(s.start, tz), "the start is a real wall-clock time (its first occurrence)"
        day = hours.days[lo.weekday()]
        assert first <= lo.date() <= first + timedelta(days=span)
        assert day.start <= lo.time()
        assert hi.date() == lo.date() and hi.time() <= day.end
        for b_start, b_end in day.breaks:
            assert hi.time() <= b_start or lo.time() >= b_end, f"{s} falls in break {b_start}-{b_end}"


@settings(max_examples=100, deadline=None)
@given(weekly(), FIRST_DAYS, st.integers(0, 13))
def test_every_local_start_time_is_offered_at_most_once(hours, first, span):
    out = slots(hours, first, first + timedelta(days=span))
    starts = [local(s.start, hours.tz) for s in out]
    assert len(starts) == len(set(starts))


def test_form_parts_become_weekly_hours_and_errors_name_the_day():
    hours = weekly_hours_from_parts({"mon": ("09:00", "17:00", "12:00-13:00, 15:00-15:15"),
                                     "Friday": ("08:00", "12:00", [])}, visit_minutes="30",
                                    timezone_name="America/New_York")
    assert hours.describe() == ["mon 09:00-17:00 break 12:00-13:00 break 15:00-15:15", "fri 08:00-12:00"]
    with pytest.raises(InvalidInput, match="^Tuesday: break 13:00-12:00 ends before it starts"):
        weekly_hours_from_parts({"tue": ("09:00", "17:00", "13:00-12:00")}, visit_minutes=20, timezone_name="UTC")
    with pytest.raises(InvalidInput, match="^Wednesday end: '9pm' is not a time of day"):
        weekly_hours_from_parts({"wed": ("09:00", "9pm", "")}, visit_minutes=20, timezone_name="UTC")
    with pytest.raises(InvalidInput, match="whole number of minutes"):
        weekly_hours_from_parts({}, visit_minutes="twenty", timezone_name="UTC")
    with pytest.raises(InvalidInput, match="not a weekday"):
        weekly_hours_from_parts({"xyz": ("09:00", "10:00", "")}, visit_minutes=20, timezone_name="UTC")
