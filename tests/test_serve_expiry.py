"""When ``serve`` warns and stops as its manifest's expiry nears: the pure decision
(`signer.lifetime.outlook`) and the driver's use of it (`signer.serve.ExpiryWatch`)."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otacast.schemas.limits import SERVE_EXPIRY_CHECK_SECONDS, SERVE_EXPIRY_WARNINGS
from otacast.signer import lifetime
from otacast.signer.report import Reporter
from otacast.signer.serve import ExpiryWatch

EXPIRES = 1798675200  # 2026-12-31T00:00:00Z
DAY, HOUR = SERVE_EXPIRY_WARNINGS
LAST = len(SERVE_EXPIRY_WARNINGS) + 1


def test_the_lead_times_are_a_day_then_an_hour() -> None:
    assert SERVE_EXPIRY_WARNINGS == (24 * 3600, 3600)


@pytest.mark.parametrize(
    ("before", "stage"),
    [
        (30 * DAY, 0),
        (DAY + 1, 0),
        (DAY, 1),  # a lead time counts from its first instant
        (HOUR + 0.5, 1),
        (HOUR, 2),
        (0.25, 2),
    ],
)
def test_a_manifest_enters_each_lead_time_at_its_first_instant(before: float, stage: int) -> None:
    seen = lifetime.outlook(EXPIRES, EXPIRES - before)
    assert (seen.stage, seen.expired, seen.remaining) == (stage, False, before)


@pytest.mark.parametrize("after", [0, 0.5, 10 * DAY])
def test_from_its_expiry_on_the_manifest_is_expired_as_devices_judge_it(after: float) -> None:
    # policy.accept refuses when now >= expires: the sender stops at that same instant.
    seen = lifetime.outlook(EXPIRES, EXPIRES + after)
    assert (seen.stage, seen.expired, seen.remaining) == (LAST, True, 0.0)


@given(st.floats(-40 * DAY, 2 * DAY), st.floats(0, 40 * DAY))
def test_stages_never_fall_as_time_passes(offset: float, step: float) -> None:
    earlier = lifetime.outlook(EXPIRES, EXPIRES + offset)
    later = lifetime.outlook(EXPIRES, EXPIRES + offset + step)
    assert later.stage >= earlier.stage
    assert later.expired >= earlier.expired


def test_the_warning_names_the_date_and_the_time_left() -> None:
    text = lifetime.outlook(EXPIRES, EXPIRES - (23 * HOUR + 59 * 60 + 30)).warning()
    assert "expires at 2026-12-31T00:00:00Z (in 23 h 59 min)" in text
    assert "sign a new one" in text
    assert "(in 59 min)" in lifetime.outlook(EXPIRES, EXPIRES - 3599).warning()
    assert "(in 5 s)" in lifetime.outlook(EXPIRES, EXPIRES - 5.5).warning()
    assert "(in 2 h)" in lifetime.outlook(EXPIRES, EXPIRES - 2 * HOUR).warning()


def test_the_stop_and_refusal_messages_are_one_line_with_the_date() -> None:
    for text in (lifetime.stopped(EXPIRES), lifetime.refused(EXPIRES)):
        assert "2026-12-31T00:00:00Z" in text and "\n" not in text
        assert str(EXPIRES) not in text


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _watch(wall: Clock) -> tuple[ExpiryWatch, io.StringIO]:
    out = io.StringIO()
    return ExpiryWatch(EXPIRES, wall, Reporter(out, as_json=False)), out


def _warnings(out: io.StringIO) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.startswith("warning:")]


def test_the_sender_warns_once_per_lead_time_then_stops_at_expiry() -> None:
    wall = Clock(EXPIRES - 2 * DAY)
    watch, out = _watch(wall)
    checks = []
    for now in (EXPIRES - 2 * DAY, EXPIRES - DAY, EXPIRES - DAY + 60, EXPIRES - HOUR, EXPIRES - 1):
        wall.now = now
        checks.append(watch.expired())
    assert checks == [False] * 5
    warned = _warnings(out)
    assert len(warned) == 2
    assert "(in 24 h)" in warned[0] and "(in 1 h)" in warned[1]
    wall.now = EXPIRES
    assert watch.expired()


def test_a_sender_starting_inside_the_last_lead_time_warns_once() -> None:
    wall = Clock(EXPIRES - 5)
    watch, out = _watch(wall)
    assert not watch.expired()
    wall.now += 1
    assert not watch.expired()
    assert len(_warnings(out)) == 1


def test_the_wall_clock_is_read_at_most_once_per_check_interval() -> None:
    watch, _ = _watch(Clock(EXPIRES - 2 * DAY))
    assert watch.due(100.0)
    assert not watch.due(100.0 + SERVE_EXPIRY_CHECK_SECONDS / 2)
    assert watch.due(100.0 + SERVE_EXPIRY_CHECK_SECONDS)
