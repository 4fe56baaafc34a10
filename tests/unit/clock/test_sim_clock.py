"""SimTime and SimClock: drift, offsets, jumps, skews and the timer inverse, all exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clock import Clock, SimClock, SimTime
from clock._sim import DRIFT_PPM_MAX, WALL_EPOCH_NS_DEFAULT

SECOND_NS = 1_000_000_000

drifts_ppm = st.integers(min_value=-DRIFT_PPM_MAX, max_value=DRIFT_PPM_MAX)
offsets_ns = st.integers(min_value=-10 * SECOND_NS, max_value=10 * SECOND_NS)
durations_ns = st.integers(min_value=0, max_value=100 * SECOND_NS)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), durations_ns),
        st.tuples(st.just("drift"), drifts_ppm),
        st.tuples(
            st.just("jump"), st.integers(min_value=-100 * SECOND_NS, max_value=100 * SECOND_NS)
        ),
        st.tuples(st.just("skew"), durations_ns),
    ),
    max_size=40,
)


def test_sim_time_advances_forward_only() -> None:
    sim_time = SimTime()
    assert sim_time.now_ns == 0
    sim_time.advance_to(5)
    sim_time.advance_to(5)
    sim_time.advance_by(3)
    assert sim_time.now_ns == 8
    with pytest.raises(AssertionError):
        sim_time.advance_to(7)
    with pytest.raises(AssertionError):
        sim_time.advance_by(-1)
    assert sim_time.now_ns == 8


def test_sim_clock_satisfies_protocol() -> None:
    clock: Clock = SimClock(SimTime())
    assert clock.monotonic_ns() == 0
    assert clock.wall_ns() == WALL_EPOCH_NS_DEFAULT


def test_no_drift_follows_global_time_plus_offset() -> None:
    sim_time = SimTime()
    clock = SimClock(sim_time, offset_ns=7, wall_epoch_ns=1_000)
    sim_time.advance_to(SECOND_NS)
    assert clock.monotonic_ns() == SECOND_NS + 7
    assert clock.wall_ns() == 1_000 + SECOND_NS + 7


def test_drift_runs_fast_or_slow_exactly() -> None:
    sim_time = SimTime()
    fast = SimClock(sim_time, drift_ppm=100)
    slow = SimClock(sim_time, drift_ppm=-100)
    sim_time.advance_to(SECOND_NS)
    assert fast.monotonic_ns() == SECOND_NS + 100_000
    assert slow.monotonic_ns() == SECOND_NS - 100_000


def test_drift_out_of_bounds_is_refused() -> None:
    with pytest.raises(AssertionError):
        SimClock(SimTime(), drift_ppm=DRIFT_PPM_MAX + 1)
    clock = SimClock(SimTime())
    with pytest.raises(AssertionError):
        clock.set_drift_ppm(-DRIFT_PPM_MAX - 1)
    assert clock.drift_ppm == 0


def test_set_drift_rebases_without_discontinuity() -> None:
    sim_time = SimTime()
    clock = SimClock(sim_time, drift_ppm=1_000)
    sim_time.advance_to(SECOND_NS)
    assert clock.monotonic_ns() == SECOND_NS + 1_000_000
    clock.set_drift_ppm(-1_000)
    assert clock.monotonic_ns() == SECOND_NS + 1_000_000
    sim_time.advance_to(2 * SECOND_NS)
    assert clock.monotonic_ns() == 2 * SECOND_NS


def test_jump_moves_wall_only() -> None:
    sim_time = SimTime()
    clock = SimClock(sim_time)
    sim_time.advance_to(SECOND_NS)
    clock.jump(-5 * SECOND_NS)
    assert clock.monotonic_ns() == SECOND_NS
    assert clock.wall_ns() == WALL_EPOCH_NS_DEFAULT - 4 * SECOND_NS


def test_skew_moves_both_forward_only() -> None:
    sim_time = SimTime()
    clock = SimClock(sim_time)
    clock.skew(SECOND_NS)
    assert clock.monotonic_ns() == SECOND_NS
    assert clock.wall_ns() == WALL_EPOCH_NS_DEFAULT + SECOND_NS
    with pytest.raises(AssertionError):
        clock.skew(-1)
    assert clock.monotonic_ns() == SECOND_NS


def test_global_ns_for_local_delta_examples() -> None:
    sim_time = SimTime()
    assert SimClock(sim_time).global_ns_for_local_delta(SECOND_NS) == SECOND_NS
    # Running 10% fast, a local second passes in 1/1.1 global seconds, rounded up.
    assert SimClock(sim_time, drift_ppm=100_000).global_ns_for_local_delta(SECOND_NS) == 909_090_910
    assert SimClock(sim_time, drift_ppm=-100_000).global_ns_for_local_delta(9) == 10
    assert SimClock(sim_time).global_ns_for_local_delta(0) == 1


@given(operations=operations, drift_ppm=drifts_ppm, offset_ns=offsets_ns)
def test_readings_stay_consistent_under_any_operations(
    operations: list[tuple[str, int]], drift_ppm: int, offset_ns: int
) -> None:
    """Monotonic never goes back; a drift change is continuous; wall - monotonic moves by jumps only."""
    sim_time = SimTime()
    clock = SimClock(sim_time, drift_ppm=drift_ppm, offset_ns=offset_ns)
    jumps_ns = 0
    for kind, argument in operations:
        monotonic_before_ns = clock.monotonic_ns()
        if kind == "advance":
            sim_time.advance_by(argument)
        elif kind == "drift":
            clock.set_drift_ppm(argument)
            assert clock.monotonic_ns() == monotonic_before_ns
        elif kind == "jump":
            clock.jump(argument)
            jumps_ns += argument
            assert clock.monotonic_ns() == monotonic_before_ns
        else:
            clock.skew(argument)
            assert clock.monotonic_ns() == monotonic_before_ns + argument
        assert clock.monotonic_ns() >= monotonic_before_ns
        assert clock.wall_ns() - clock.monotonic_ns() == WALL_EPOCH_NS_DEFAULT + jumps_ns


@given(
    drift_ppm=drifts_ppm,
    offset_ns=offsets_ns,
    elapsed_ns=durations_ns,
    delta_local_ns=st.integers(min_value=0, max_value=10 * SECOND_NS),
)
def test_global_ns_for_local_delta_is_the_least_sufficient_wait(
    drift_ppm: int, offset_ns: int, elapsed_ns: int, delta_local_ns: int
) -> None:
    sim_time = SimTime()
    clock = SimClock(sim_time, drift_ppm=drift_ppm, offset_ns=offset_ns)
    sim_time.advance_by(elapsed_ns)
    start_ns = clock.monotonic_ns()

    wait_ns = clock.global_ns_for_local_delta(delta_local_ns)
    assert wait_ns >= 1
    # One nanosecond short of the wait is not enough (unless the wait is the minimum 1)...
    sim_time.advance_by(wait_ns - 1)
    if wait_ns > 1:
        assert clock.monotonic_ns() - start_ns < delta_local_ns
    # ...and the full wait is.
    sim_time.advance_by(1)
    assert clock.monotonic_ns() - start_ns >= delta_local_ns


@given(operations=operations)
def test_same_operations_replay_the_same_nanoseconds(operations: list[tuple[str, int]]) -> None:
    def replay() -> list[tuple[int, int]]:
        sim_time = SimTime()
        clock = SimClock(sim_time, drift_ppm=37, offset_ns=11)
        readings = []
        for kind, argument in operations:
            if kind == "advance":
                sim_time.advance_by(argument)
            elif kind == "drift":
                clock.set_drift_ppm(argument)
            elif kind == "jump":
                clock.jump(argument)
            else:
                clock.skew(argument)
            readings.append((clock.monotonic_ns(), clock.wall_ns()))
        return readings

    assert replay() == replay()
