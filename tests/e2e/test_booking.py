"""Booking a video visit in a real browser against a real server process.

A server is started with ``teleledger serve`` on an empty node; a service creates a practitioner
and two patients, and the CLI their accounts. In Chromium the practitioner publishes weekly
hours through "My availability"; the patient finds them by name, picks a free time, confirms,
and sees the visit in "My visits" (with a link to its room) and as a reminder on the portal when
it is within 24 hours; a second patient who tries the same time is told it is taken. All
with forms only: the pages need no JavaScript.

Needs Chromium at /usr/bin/chromium: skipped with a reason when it is missing, failed instead
when TELELEDGER_REQUIRE_BROWSER=1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import ARTIFACTS, PASSWORD, WAIT_MS, browser_or_skip, chromium, serve, sign_in


@dataclass
class Site:
    base: str
    doctor_id: str
    log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    browser_or_skip()
    tmp = tmp_path_factory.mktemp("e2e-booking")
    with serve(tmp) as server:
        create = server.create
        doctor = create({"resourceType": "Practitioner", "name": [{"family": "Smith", "given": ["Jo"],
                                                                   "prefix": ["Dr."]}]})
        create({"resourceType": "Practitioner", "name": [{"family": "Jones", "given": ["Ann"]}]})
        alice = create({"resourceType": "Patient", "name": [{"family": "Liddell", "given": ["Alice"]}],
                        "gender": "female", "birthDate": "1990-05-04"})
        bob = create({"resourceType": "Patient", "name": [{"family": "Builder", "given": ["Bob"]}],
                      "gender": "male", "birthDate": "1985-01-02"})
        server.cli("users", "create", "--role", "practitioner", "--username", "drsmith", "--password", PASSWORD,
                   "--practitioner", f"Practitioner/{doctor}")
        server.cli("users", "create", "--role", "patient", "--username", "alice", "--password", PASSWORD,
                   "--patient", f"Patient/{alice}")
        server.cli("users", "create", "--role", "patient", "--username", "bob", "--password", PASSWORD,
                   "--patient", f"Patient/{bob}")
        yield Site(server.base, doctor, server.log)


@pytest.fixture(scope="module")
def browser(site: Site):  # type: ignore[no-untyped-def]
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB", timezone_id="Europe/Paris",
                                  java_script_enabled=False)  # every step works with forms alone
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    p = context.new_page()
    try:
        yield p
    finally:
        context.close()


def no_horizontal_overflow(page) -> None:  # type: ignore[no-untyped-def]
    page.set_viewport_size({"width": 390, "height": 844})
    too_wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
        .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 5)""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 391, f"wider than a phone: {too_wide}"


def publish_every_day(page, site: Site) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sign_in(page, site.base, "drsmith")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="My availability").click()
    page.wait_for_url(f"{site.base}/visits/availability")
    # every day, all day: whatever the hour the test runs, the next 24 hours have free times
    for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"):
        page.get_by_label(day, exact=True).check()
        page.get_by_label(f"{day} from").fill("00:00")
        page.get_by_label(f"{day} until").fill("23:30")
        page.get_by_label(f"{day} breaks").fill("12:00-13:00")
    page.get_by_label("Visit length (minutes)").select_option("30")
    page.get_by_label("Time zone").select_option("Europe/Berlin")
    page.get_by_label("Weeks ahead").fill("1")
    page.get_by_role("button", name="Publish availability").click()
    expect(page.get_by_role("status")).to_contain_text("Your availability is published until")
    page.screenshot(path=str(ARTIFACTS / "booking-availability.png"), full_page=True)


def test_a_patient_finds_a_practitioner_books_a_time_and_sees_the_visit_and_its_reminder(page, site):
    from playwright.sync_api import expect

    publish_every_day(page, site)
    page.get_by_role("button", name="Sign out").click()

    sign_in(page, site.base, "alice")
    page.get_by_role("navigation").get_by_role("link", name="Book a visit").click()
    page.get_by_label("Name").fill("smi")
    page.get_by_role("button", name="Search").click()
    cards = page.locator("li.practitioner")
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text("Dr. Jo Smith")
    page.get_by_role("link", name="See free times with Dr. Jo Smith").click()
    page.wait_for_url(f"{site.base}/visits/book/{site.doctor_id}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Choose a time with Dr. Jo Smith")
    expect(page.locator("main")).to_contain_text("Europe/Berlin")
    page.screenshot(path=str(ARTIFACTS / "booking-pick-a-time.png"), full_page=True)
    first = page.get_by_role("radio").first
    chosen = first.get_attribute("value")
    first.check()
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Confirm your visit")
    expect(page.locator("dl.details")).to_contain_text("Dr. Jo Smith")
    page.get_by_role("button", name="Confirm booking").click()
    page.wait_for_url(f"{site.base}/visits/mine?notice=booked")
    expect(page.get_by_role("status")).to_have_text("Your visit is booked.")
    visit = page.locator("li.visit-item")
    expect(visit).to_have_count(1)
    expect(visit).to_contain_text("Dr. Jo Smith")
    appointment_id = visit.get_attribute("data-appointment-id")
    expect(visit.get_by_role("link", name="Join the visit room")).to_have_attribute(
        "href", f"/visits/{appointment_id}/room")
    page.screenshot(path=str(ARTIFACTS / "booking-my-visits.png"), full_page=True)

    # the first free time is within 24 hours: the portal reminds her
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Portal").click()
    reminder = page.locator(f'li.reminder[data-appointment-id="{appointment_id}"]')
    expect(reminder).to_contain_text("Reminder:")
    expect(reminder).to_contain_text("Dr. Jo Smith")
    page.screenshot(path=str(ARTIFACTS / "booking-portal-reminder.png"), full_page=True)

    page.goto(f"{site.base}/visits/mine")
    no_horizontal_overflow(page)
    page.screenshot(path=str(ARTIFACTS / "booking-my-visits-phone.png"), full_page=True)

    # the same time for Bob: a clear message in the page, and nothing booked for him
    page.set_viewport_size({"width": 1280, "height": 900})
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, site.base, "bob")
    response = page.goto(f"{site.base}/visits/confirm?slot={chosen}")
    assert response is not None and response.status == 409
    expect(page.get_by_role("alert")).to_contain_text("already booked")
    expect(page.get_by_role("button", name="Confirm booking")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "booking-taken.png"), full_page=True)
    page.goto(f"{site.base}/visits/mine")
    expect(page.locator("li.visit-item")).to_have_count(0)


def test_a_patient_cancels_a_visit_with_the_keyboard_and_its_time_is_free_again(page, site):
    from playwright.sync_api import expect

    publish_every_day(page, site)  # again: publishing is idempotent, and this test may run alone
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, site.base, "bob")
    page.goto(f"{site.base}/visits/book/{site.doctor_id}")
    radio = page.get_by_role("radio").first
    chosen = radio.get_attribute("value")
    radio.check()
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Confirm booking").click()
    page.wait_for_url(f"{site.base}/visits/mine?notice=booked")
    cancel = page.locator("li.visit-item").get_by_role("button", name="Cancel")
    cancel.focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{site.base}/visits/mine?notice=cancelled")
    expect(page.get_by_role("status")).to_contain_text("cancelled")
    expect(page.locator("li.visit-item")).to_have_count(0)
    page.goto(f"{site.base}/visits/book/{site.doctor_id}")
    expect(page.locator(f'input[type="radio"][value="{chosen}"]')).to_have_count(1)


def test_a_patient_gets_a_clear_403_page_for_the_availability_form(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.base, "alice")
    expect(page.get_by_role("link", name="My availability")).to_have_count(0)
    response = page.goto(f"{site.base}/visits/availability")
    assert response is not None and response.status == 403
    expect(page.get_by_role("alert")).to_contain_text("signed in as a patient")
