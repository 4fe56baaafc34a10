"""The fragment time limit's bookkeeping, on simulated time: the loop interrupts only the
fragment being watched and only once its limit has passed, never one that has stopped;
closing interrupts at once; an interrupted fragment's SQL is refused for a while; the
limit's environment variable is checked."""

from __future__ import annotations

import pytest

from clock import SimClock, SimTime
from cluster._fragment_watch import (
    FRAGMENT_TIME_LIMIT_ENV,
    FRAGMENT_TIME_LIMIT_MS,
    INTERRUPTED_KEPT_MAX,
    INTERRUPTED_KEPT_MS,
    FragmentWatch,
    Interrupted,
    fragment_time_limit_ms_from,
)

LIMIT_MS = 100
NS_PER_MS = 1_000_000


class FakeStatement:
    def __init__(self) -> None:
        self.interrupts = 0

    def interrupt(self) -> None:
        self.interrupts += 1


def _watch() -> tuple[SimTime, FragmentWatch]:
    time = SimTime()
    return time, FragmentWatch(SimClock(time), LIMIT_MS)


def test_the_loop_interrupts_once_the_limit_has_passed_until_the_fragment_stops() -> None:
    time, watch = _watch()
    statement = FakeStatement()
    watched = watch.start(statement)
    time.advance_by(LIMIT_MS * NS_PER_MS - 1)
    watch.interrupt_overdue()
    assert statement.interrupts == 0 and watched.why is None
    time.advance_by(1)
    watch.interrupt_overdue()
    assert statement.interrupts == 1 and watched.why is Interrupted.TIME_LIMIT
    watch.interrupt_overdue()  # DuckDB may have missed the first one: again
    watch.interrupt_now()
    assert statement.interrupts == 3 and watched.why is Interrupted.TIME_LIMIT
    watch.stop(watched)
    watch.interrupt_overdue()
    assert statement.interrupts == 3


def test_a_stopped_fragment_is_never_interrupted() -> None:
    time, watch = _watch()
    first = FakeStatement()
    watch.stop(watch.start(first))
    time.advance_by(10 * LIMIT_MS * NS_PER_MS)
    watch.interrupt_overdue()
    watch.interrupt_now()
    assert first.interrupts == 0


def test_closing_interrupts_the_running_fragment_and_refuses_later_ones() -> None:
    _, watch = _watch()
    running = FakeStatement()
    watched = watch.start(running)
    watch.interrupt_now()
    assert running.interrupts == 1 and watched.why is Interrupted.CLOSING
    watch.stop(watched)
    later = watch.start(FakeStatement())
    assert later.why is Interrupted.CLOSING


def test_an_interrupted_fragment_is_remembered_for_a_while() -> None:
    time, watch = _watch()
    sql = "SELECT count(*) FROM range(10000000000)"
    assert watch.interrupted_ago_ms(sql) is None
    watch.remember(sql)
    time.advance_by(5 * NS_PER_MS)
    assert watch.interrupted_ago_ms(sql) == 5
    assert watch.interrupted_ago_ms(sql + " ") is None
    time.advance_by(INTERRUPTED_KEPT_MS * NS_PER_MS)
    assert watch.interrupted_ago_ms(sql) is None


def test_at_most_so_many_interrupted_fragments_are_remembered() -> None:
    _, watch = _watch()
    for number in range(INTERRUPTED_KEPT_MAX + 1):
        watch.remember(f"SELECT {number}")
    assert watch.interrupted_ago_ms("SELECT 0") is None
    assert watch.interrupted_ago_ms(f"SELECT {INTERRUPTED_KEPT_MAX}") == 0


def test_the_limit_comes_from_the_environment() -> None:
    assert fragment_time_limit_ms_from({}) == FRAGMENT_TIME_LIMIT_MS
    assert fragment_time_limit_ms_from({FRAGMENT_TIME_LIMIT_ENV: "1500"}) == 1500
    for bad in ("0", "-3", "1.5", "soon"):
        with pytest.raises(ValueError, match=FRAGMENT_TIME_LIMIT_ENV):
            fragment_time_limit_ms_from({FRAGMENT_TIME_LIMIT_ENV: bad})
