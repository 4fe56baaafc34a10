"""The `Clock` protocol, and `SystemClock`, the one place production code reads real time.

Everything that needs time takes a `Clock` argument; nothing outside clock/ calls
`time.*`. A `Clock` gives two readings, both integer nanoseconds:

- `monotonic_ns()` measures intervals (timeouts, ticks, latencies). Its origin is
  arbitrary and it never goes backwards.
- `wall_ns()` is time since the Unix epoch, comparable across nodes only as far as their
  clocks are synchronised. It may jump, backwards too; use it to stamp events (through
  `HybridLogicalClock`), never to measure intervals.

`SystemClock` can be skewed on purpose (`skew_ns`), so chaos commands can make one real
worker's clock disagree with its peers. The invariant holds under any skew: its
`monotonic_ns()` never goes backwards.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of time. Pass one in; never read time any other way."""

    def monotonic_ns(self) -> int:
        """Nanoseconds since an arbitrary origin; never decreases."""
        ...

    def wall_ns(self) -> int:
        """Nanoseconds since the Unix epoch; may jump either way."""
        ...


class SystemClock:
    """The operating system's clocks, plus an injected skew (zero unless chaos sets it).

    Setting `skew_ns` moves `wall_ns()` by exactly the new skew, either way, as an NTP step
    would. `monotonic_ns()` follows the skew only forwards: lowering the skew leaves the
    monotonic reading where it was, because a monotonic clock that goes back would fire
    timers early and break every interval measured across the change.
    """

    __slots__ = ("_skew_ns", "_monotonic_skew_ns")

    def __init__(self, *, skew_ns: int = 0) -> None:
        self._skew_ns = 0
        self._monotonic_skew_ns = 0
        self.skew_ns = skew_ns

    @property
    def skew_ns(self) -> int:
        """Nanoseconds added to the real wall clock (and, forwards only, to monotonic)."""
        return self._skew_ns

    @skew_ns.setter
    def skew_ns(self, skew_ns: int) -> None:
        assert isinstance(skew_ns, int), skew_ns
        self._skew_ns = skew_ns
        # The monotonic offset is a ratchet: it only ever grows.
        self._monotonic_skew_ns = max(self._monotonic_skew_ns, skew_ns)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns() + self._monotonic_skew_ns

    def wall_ns(self) -> int:
        return time.time_ns() + self._skew_ns

    def __repr__(self) -> str:
        return f"SystemClock(skew_ns={self._skew_ns})"
