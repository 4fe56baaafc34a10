"""SystemClock: real readings, and the injected skew chaos uses."""

from __future__ import annotations

from clock import Clock, SystemClock

SKEW_NS = 10_000_000_000


def test_system_clock_satisfies_protocol() -> None:
    clock: Clock = SystemClock()
    assert isinstance(clock.monotonic_ns(), int)
    assert isinstance(clock.wall_ns(), int)


def test_monotonic_never_decreases() -> None:
    clock = SystemClock()
    readings = [clock.monotonic_ns() for _ in range(1_000)]
    assert readings == sorted(readings)


def test_skew_shifts_both_readings() -> None:
    plain = SystemClock()
    skewed = SystemClock(skew_ns=SKEW_NS)
    # Sandwich the skewed reading between two plain ones: exact, with no timing tolerance.
    before_ns = plain.monotonic_ns()
    skewed_ns = skewed.monotonic_ns()
    after_ns = plain.monotonic_ns()
    assert before_ns <= skewed_ns - SKEW_NS <= after_ns

    before_ns = plain.wall_ns()
    skewed_ns = skewed.wall_ns()
    after_ns = plain.wall_ns()
    assert before_ns <= skewed_ns - SKEW_NS <= after_ns


def test_lowering_skew_moves_wall_back_but_not_monotonic() -> None:
    clock = SystemClock()
    clock.skew_ns = SKEW_NS
    wall_skewed_ns = clock.wall_ns()
    monotonic_skewed_ns = clock.monotonic_ns()

    clock.skew_ns = -SKEW_NS
    assert clock.skew_ns == -SKEW_NS
    assert clock.wall_ns() < wall_skewed_ns - SKEW_NS
    assert clock.monotonic_ns() >= monotonic_skewed_ns


def test_repr_names_skew() -> None:
    assert repr(SystemClock(skew_ns=5)) == "SystemClock(skew_ns=5)"
