"""Hybrid logical clocks (Kulkarni et al., "Logical Physical Clocks", 2014).

Every worker stamps its log entries and events with an `HlcTimestamp` from its own
`HybridLogicalClock`, and stamps every message it sends; on receipt the stamp is merged
in. A timeline merged from all workers, sorted by stamp, then respects causality (if a
happened before b, stamp(a) < stamp(b)) while staying close to wall time.

Invariants: the clock never goes backwards, even when the physical wall clock does; each
`now()` and `update()` returns a stamp greater than every stamp this clock returned or
received before; a remote stamp further ahead of local physical time than the configured
maximum offset is refused (`ClockOffsetError`) and leaves the clock unchanged, so one
peer's runaway clock cannot drag the cluster's time forward.

Logical overflow: the logical counter is bounded by `LOGICAL_MAX` (16 bits, so a stamp
packs into one integer). When it would overflow, the clock carries into the wall part:
(wall + 1 ns, 0). That keeps every invariant above at the cost of the stamp's wall part
running at most 1 ns per 65,536 events ahead of physical time, which the next physical
tick absorbs. (The paper bounds the counter under its assumptions; this makes the bound
hold without them.)
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from clock._system import Clock

LOGICAL_BITS = 16
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1


class HlcTimestamp(msgspec.Struct, frozen=True, order=True, array_like=True):
    """A hybrid logical time: wall nanoseconds, then a logical counter to order ties.

    Ordered by (wall_ns, logical). Encodes as a two-element array. `pack()` gives one
    non-negative integer with the same order; it needs about 77 bits for present-day wall
    times, so store it as a HUGEINT, or send the struct itself.
    """

    wall_ns: Annotated[int, msgspec.Meta(ge=0)]
    logical: Annotated[int, msgspec.Meta(ge=0, le=LOGICAL_MAX)] = 0

    def __post_init__(self) -> None:
        # msgspec checks the Meta bounds when decoding a peer's bytes; these asserts catch
        # the same mistakes in our own code, where constructors skip those checks.
        assert self.wall_ns >= 0, self.wall_ns
        assert 0 <= self.logical, self.logical
        assert self.logical <= LOGICAL_MAX, self.logical

    def pack(self) -> int:
        return (self.wall_ns << LOGICAL_BITS) | self.logical

    @classmethod
    def unpack(cls, packed: int) -> HlcTimestamp:
        assert packed >= 0, packed
        return cls(wall_ns=packed >> LOGICAL_BITS, logical=packed & LOGICAL_MAX)

    def __str__(self) -> str:
        return f"{self.wall_ns}.{self.logical}"


ZERO = HlcTimestamp(wall_ns=0, logical=0)


class ClockOffsetError(Exception):
    """A peer's time is further ahead of ours than the configured maximum clock offset.

    An expected operating error, not a bug: one of the two clocks is badly out of sync.
    The message that carried the stamp should be dropped; the local clock is unchanged.
    """

    def __init__(self, remote: HlcTimestamp, local_wall_ns: int, max_offset_ns: int) -> None:
        self.remote = remote
        self.local_wall_ns = local_wall_ns
        self.max_offset_ns = max_offset_ns
        self.offset_ns = remote.wall_ns - local_wall_ns
        super().__init__(
            f"remote HLC time {remote} is {self.offset_ns} ns ahead of local physical wall "
            f"time {local_wall_ns}, beyond the maximum clock offset of {max_offset_ns} ns; "
            "refusing it (the remote clock runs fast or the local one slow: check clock "
            "synchronisation)"
        )


def _stamp(wall_ns: int, logical: int) -> HlcTimestamp:
    """Build a stamp, carrying a logical overflow into the wall part (see module doc)."""
    if logical > LOGICAL_MAX:
        assert logical == LOGICAL_MAX + 1, logical
        return HlcTimestamp(wall_ns=wall_ns + 1, logical=0)
    return HlcTimestamp(wall_ns=wall_ns, logical=logical)


class HybridLogicalClock:
    """One node's HLC over its physical `Clock`'s wall time.

    `now()` for a local or send event, `update(remote)` for a receive event.
    """

    __slots__ = ("_clock", "_max_offset_ns", "_last")

    def __init__(self, clock: Clock, max_offset_ns: int) -> None:
        assert max_offset_ns > 0, max_offset_ns
        self._clock = clock
        self._max_offset_ns = max_offset_ns
        self._last = ZERO

    @property
    def max_offset_ns(self) -> int:
        return self._max_offset_ns

    @property
    def last(self) -> HlcTimestamp:
        """The latest stamp this clock returned (ZERO before the first event)."""
        return self._last

    def now(self) -> HlcTimestamp:
        """Stamp a local or send event."""
        physical_ns = self._clock.wall_ns()
        previous = self._last
        if physical_ns > previous.wall_ns:
            stamp = HlcTimestamp(wall_ns=physical_ns, logical=0)
        else:
            stamp = _stamp(previous.wall_ns, previous.logical + 1)
        assert stamp > previous
        self._last = stamp
        return stamp

    def update(self, remote: HlcTimestamp) -> HlcTimestamp:
        """Stamp the receipt of a message stamped `remote`; the result exceeds both.

        Raises ClockOffsetError, leaving the clock unchanged, if `remote` is more than
        `max_offset_ns` ahead of local physical time.
        """
        physical_ns = self._clock.wall_ns()
        if remote.wall_ns - physical_ns > self._max_offset_ns:
            raise ClockOffsetError(remote, physical_ns, self._max_offset_ns)
        previous = self._last
        wall_ns = max(previous.wall_ns, remote.wall_ns, physical_ns)
        if wall_ns == previous.wall_ns and wall_ns == remote.wall_ns:
            logical = max(previous.logical, remote.logical) + 1
        elif wall_ns == previous.wall_ns:
            logical = previous.logical + 1
        elif wall_ns == remote.wall_ns:
            logical = remote.logical + 1
        else:
            logical = 0
        stamp = _stamp(wall_ns, logical)
        assert stamp > previous
        assert stamp > remote
        self._last = stamp
        return stamp

    # The names for the same two events, as Lamport clocks spell them.
    send = now
    receive = update

    def __repr__(self) -> str:
        return f"HybridLogicalClock(last={self._last}, max_offset_ns={self._max_offset_ns})"
