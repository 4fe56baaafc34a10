"""Simulated time: one global `SimTime` the simulator advances, and per-node `SimClock`s.

The simulator owns a single `SimTime` (integer nanoseconds, starting at zero) and moves it
forward between events. Each simulated node reads time only through its own `SimClock`,
which derives a local reading from global time with that node's drift (a rate error in
parts per million), offset (skew against its peers) and wall-clock jumps. Everything is
integer arithmetic, so one seed replays the same nanoseconds on every run and platform.

Invariants: global time never goes backwards; a node's `monotonic_ns()` never goes
backwards, whatever drift changes, skews and jumps the simulator applies (jumps move the
wall clock only); and changing the drift never makes local time jump.
"""

from __future__ import annotations

PPM = 1_000_000
"""Parts per million: the unit of drift."""

DRIFT_PPM_MAX = 500_000
"""Largest drift either way: a clock runs between half and one and a half times real speed.
Real oscillators drift by tens of ppm; the bound keeps the rate positive, so local time
always advances and `global_ns_for_local_delta` has an answer."""

WALL_EPOCH_NS_DEFAULT = 1_700_000_000_000_000_000
"""Wall time at global time zero for an unshifted clock: 2023-11-14T22:13:20Z. Fixed, so
simulated wall stamps replay exactly."""


class SimTime:
    """The simulator's global time, in integer nanoseconds. Only the simulator advances it."""

    __slots__ = ("_now_ns",)

    def __init__(self, start_ns: int = 0) -> None:
        assert start_ns >= 0, start_ns
        self._now_ns = start_ns

    @property
    def now_ns(self) -> int:
        return self._now_ns

    def advance_to(self, time_ns: int) -> None:
        """Move global time to `time_ns`, which must not be in the past."""
        assert time_ns >= self._now_ns, f"global time going backwards: {self._now_ns} -> {time_ns}"
        self._now_ns = time_ns

    def advance_by(self, delta_ns: int) -> None:
        assert delta_ns >= 0, delta_ns
        self._now_ns += delta_ns

    def __repr__(self) -> str:
        return f"SimTime(now_ns={self._now_ns})"


def _scale(global_elapsed_ns: int, drift_ppm: int) -> int:
    """Local nanoseconds elapsed over `global_elapsed_ns` at rate (1 + drift_ppm / 1e6), floored.

    Non-decreasing in `global_elapsed_ns` because the rate is positive.
    """
    return global_elapsed_ns * (PPM + drift_ppm) // PPM


def _check_drift(drift_ppm: int) -> None:
    assert isinstance(drift_ppm, int), drift_ppm
    assert -DRIFT_PPM_MAX <= drift_ppm, drift_ppm
    assert drift_ppm <= DRIFT_PPM_MAX, drift_ppm


class SimClock:
    """One simulated node's `Clock`, derived from the shared `SimTime`.

    local monotonic = offset_ns + global * (1 + drift_ppm / 1e6), in integer nanoseconds.
    local wall = wall_epoch_ns + local monotonic + the sum of all `jump`s.

    A drift change is applied from the current instant on (the clock is rebased), so the
    reading is continuous: only its rate changes.
    """

    __slots__ = ("_sim_time", "_drift_ppm", "_base_global_ns", "_base_local_ns", "_wall_shift_ns")

    def __init__(
        self,
        sim_time: SimTime,
        *,
        drift_ppm: int = 0,
        offset_ns: int = 0,
        wall_epoch_ns: int = WALL_EPOCH_NS_DEFAULT,
    ) -> None:
        _check_drift(drift_ppm)
        self._sim_time = sim_time
        self._drift_ppm = drift_ppm
        # local = base_local + _scale(global - base_global, drift). Rebasing moves the base
        # to the present instead of accumulating a rate history.
        self._base_global_ns = 0
        self._base_local_ns = offset_ns
        self._wall_shift_ns = wall_epoch_ns

    @property
    def drift_ppm(self) -> int:
        return self._drift_ppm

    def monotonic_ns(self) -> int:
        global_elapsed_ns = self._sim_time.now_ns - self._base_global_ns
        assert global_elapsed_ns >= 0, "global time went back past this clock's base"
        return self._base_local_ns + _scale(global_elapsed_ns, self._drift_ppm)

    def wall_ns(self) -> int:
        return self._wall_shift_ns + self.monotonic_ns()

    def set_drift_ppm(self, drift_ppm: int) -> None:
        """Run at the new rate from now on; the current reading does not change."""
        _check_drift(drift_ppm)
        local_ns = self.monotonic_ns()
        self._base_global_ns = self._sim_time.now_ns
        self._base_local_ns = local_ns
        self._drift_ppm = drift_ppm
        assert self.monotonic_ns() == local_ns

    def jump(self, delta_ns: int) -> None:
        """Step the wall clock by `delta_ns`, either way (an NTP step, an operator's `date`).

        The monotonic clock does not move: a real OS keeps CLOCK_MONOTONIC steady across
        wall-clock steps.
        """
        self._wall_shift_ns += delta_ns

    def skew(self, delta_ns: int) -> None:
        """Move the whole local clock (monotonic and wall) forward by `delta_ns`.

        Forward only, so monotonic time never goes back. To skew a node backwards against
        its peers, give it a negative `offset_ns` or drift, or `jump` its wall clock.
        """
        assert delta_ns >= 0, f"skew must be forward, got {delta_ns} ns"
        self._base_local_ns += delta_ns

    def global_ns_for_local_delta(self, delta_local_ns: int) -> int:
        """Global nanoseconds until this clock's monotonic reading has advanced `delta_local_ns`.

        The least g >= 1 such that advancing global time by g moves the local reading by at
        least `delta_local_ns`, at the current drift. The simulator schedules a node's timer
        that many nanoseconds ahead; if the drift changes meanwhile it asks again.
        """
        assert delta_local_ns >= 0, delta_local_ns
        rate_ppm = PPM + self._drift_ppm
        elapsed_ns = self._sim_time.now_ns - self._base_global_ns
        target_ns = _scale(elapsed_ns, self._drift_ppm) + delta_local_ns
        # floor(e * rate / PPM) >= target  <=>  e * rate >= target * PPM
        #                                   <=>  e >= ceil(target * PPM / rate).
        elapsed_needed_ns = -(-target_ns * PPM // rate_ppm)
        global_delta_ns = max(1, elapsed_needed_ns - elapsed_ns)
        assert _scale(elapsed_ns + global_delta_ns, self._drift_ppm) >= target_ns
        return global_delta_ns

    def __repr__(self) -> str:
        return (
            f"SimClock(monotonic_ns={self.monotonic_ns()}, wall_ns={self.wall_ns()}, "
            f"drift_ppm={self._drift_ppm})"
        )
