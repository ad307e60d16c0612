"""Maintenance window specs: parsing (whole specs only), canonical form, and when they are open."""

from __future__ import annotations

import calendar
import re

import pytest

from backhaul import maintenance
from backhaul.control import validate
from backhaul.control.openapi import openapi_document
from backhaul.maintenance import BadWindow, Window

pytestmark = pytest.mark.codec_independent


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0)))


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("Sat,Sun 02:00-04:00", "Sat,Sun 02:00-04:00"),
        ("Sun,Sat 02:00-04:00", "Sat,Sun 02:00-04:00"),
        ("Sat,Sat 02:00-04:00", "Sat 02:00-04:00"),
        ("Mon-Fri 22:00-02:00", "Mon,Tue,Wed,Thu,Fri 22:00-02:00"),
        ("Fri-Mon 01:00-03:00", "Mon,Fri,Sat,Sun 01:00-03:00"),
        ("Mon-Sun 00:00-23:59", "daily 00:00-23:59"),
        ("daily 03:00-04:00", "daily 03:00-04:00"),
        ("Wed 00:00-00:00", "Wed 00:00-00:00"),
        ("Mon,Tue,Wed,Thu,Fri,Sat,Sun 23:59-00:00", "daily 23:59-00:00"),
        ("Mon-Tue,Wed-Thu,Fri-Sat,Sun-Mon,Tue-Wed,Thu-Fri,Sat-Sun 01:00-02:00", "daily 01:00-02:00"),
    ],
)
def test_valid_specs_parse_to_their_canonical_form(spec, canonical):
    assert maintenance.canonical(spec) == canonical
    assert validate.window(spec) == canonical
    assert maintenance.canonical(canonical) == canonical


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "Sat",
        "02:00-04:00",
        "sat 02:00-04:00",  # day names are written Mon..Sun
        "Saturday 02:00-04:00",
        "Sat 2:00-04:00",
        "Sat 02:00-24:00",
        "Sat 02:60-04:00",
        "Sat  02:00-04:00",
        "Sat, Sun 02:00-04:00",
        "Sat,,Sun 02:00-04:00",
        "Sat- 02:00-04:00",
        "Sat 02:00",
        "Sat 02:00-04:00 ",  # trailing junk, however small
        " Sat 02:00-04:00",
        "Sat 02:00-04:00x",
        "Sat 02:00-04:00\n",
        "Sat 02:00-04:00 UTC",
        "Sat 02:00-04:00,Sun 02:00-04:00",
        "daily,Sat 02:00-04:00",
        "Mon,Mon,Mon,Mon,Mon,Mon,Mon,Mon 01:00-02:00",  # more than seven items
        "Sat 0２:00-04:00",  # a fullwidth digit: not ASCII
    ],
)
def test_invalid_specs_are_refused_with_an_example(spec):
    with pytest.raises(BadWindow, match="Sat,Sun 02:00-04:00"):
        Window.parse(spec)
    with pytest.raises(validate.Invalid, match="DAYS HH:MM-HH:MM"):
        validate.window(spec)


@pytest.mark.parametrize("value", [5, ["Sat 02:00-04:00"], b"Sat 02:00-04:00", "x" * 1000])
def test_what_is_not_a_short_string_is_refused(value):
    with pytest.raises(validate.Invalid):
        validate.window(value)


def test_none_means_no_window():
    assert validate.window(None) is None


def test_the_served_pattern_is_the_one_validated():
    schema = openapi_document()["components"]["schemas"]["Window"]
    pattern = re.compile(schema["pattern"])
    assert schema["maxLength"] == maintenance.MAX_WINDOW
    for good in ("Sat,Sun 02:00-04:00", "daily 03:00-04:00", "Fri-Mon 01:00-03:00"):
        assert pattern.search(good)
    for bad in ("Sat 02:00-04:00 ", "sat 02:00-04:00", "x Sat 02:00-04:00"):
        assert not pattern.search(bad)
    longest = ",".join(["Mon-Tue"] * 7) + " 00:00-00:00"
    assert len(longest) == maintenance.MAX_WINDOW and pattern.search(longest)


def test_a_window_is_open_from_its_start_until_its_end():
    w = Window.parse("Sat 02:00-04:00")
    saturday = utc(2026, 12, 5)
    assert not w.contains(saturday + 2 * 3600 - 1)
    assert w.contains(saturday + 2 * 3600)
    assert w.contains(saturday + 4 * 3600 - 1)
    assert not w.contains(saturday + 4 * 3600)
    assert not w.contains(utc(2026, 12, 6, 3))  # Sunday
    assert w.seconds == 2 * 3600


def test_a_window_crossing_midnight_ends_on_the_next_day():
    w = Window.parse("Sun 23:00-01:00")
    assert w.contains(utc(2026, 12, 6, 23, 30))  # Sunday night
    assert w.contains(utc(2026, 12, 7, 0, 59))  # Monday, the same window
    assert not w.contains(utc(2026, 12, 7, 1, 0))
    assert not w.contains(utc(2026, 12, 7, 23, 30))  # Monday night: not a window day
    # The week wraps: a Sunday window is open early on Monday, then not again until Sunday.
    assert w.next_open(utc(2026, 12, 7, 1, 0)) == utc(2026, 12, 13, 23, 0)


def test_equal_start_and_end_is_a_whole_day():
    w = Window.parse("Wed 06:00-06:00")
    assert w.seconds == 86400
    assert w.contains(utc(2026, 12, 2, 6)) and w.contains(utc(2026, 12, 3, 5, 59))
    assert not w.contains(utc(2026, 12, 3, 6))


def test_next_open():
    w = Window.parse("Sat,Sun 02:00-04:00")
    assert w.next_open(utc(2026, 12, 1, 12)) == utc(2026, 12, 5, 2)  # Tuesday -> Saturday
    assert w.next_open(utc(2026, 12, 5, 3)) == utc(2026, 12, 6, 2)  # inside Saturday's -> Sunday's
    assert w.next_open(utc(2026, 12, 5, 2)) == utc(2026, 12, 5, 2)  # at the opening itself
    assert Window.parse("daily 00:00-01:00").next_open(utc(2026, 12, 1, 0, 1)) == utc(2026, 12, 2)
