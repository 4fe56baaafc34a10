"""The simulator's one event queue, its trace and its seeded random streams.

Every input a simulated node ever sees (a tick, a message, a finished fsync, a client
request, a fault) is an event in one priority queue keyed by (global time, sequence
number). The sequence number is the order of scheduling, so two events at the same
nanosecond always run in the same order: nothing depends on object ids, hashing or wall
time. The trace is a sha256 over one canonical text line per thing that happened.

Invariant: global time never goes backwards, and the same seed schedules the same events
in the same order, so it yields the same trace digest in every process.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable

from clock import SimTime

Action = Callable[[], None]

QUEUE_EVENTS_MAX = 1_000_000
"""More pending events than this means a runaway feedback loop in the simulator itself."""

TRACE_LINES_KEPT_MAX = 2_000_000
"""`--trace` keeps lines in memory to print them; bound that."""


def derive_rng(seed: int, *names: object) -> random.Random:
    """An independent random stream for one component, from the master seed and a name.

    Seeding with a str goes through sha512 (random's version 2 seeding), so the stream
    does not depend on PYTHONHASHSEED.
    """
    return random.Random(":".join([str(seed), *(str(name) for name in names)]))


class EventQueue:
    """Discrete-event queue over a shared `SimTime`."""

    __slots__ = ("_heap", "_sequence", "_sim_time")

    def __init__(self, sim_time: SimTime) -> None:
        self._heap: list[tuple[int, int, Action]] = []
        self._sequence = 0
        self._sim_time = sim_time

    @property
    def now_ns(self) -> int:
        return self._sim_time.now_ns

    @property
    def sim_time(self) -> SimTime:
        return self._sim_time

    def at(self, time_ns: int, action: Action) -> None:
        assert time_ns >= self._sim_time.now_ns, (time_ns, self._sim_time.now_ns)
        assert len(self._heap) < QUEUE_EVENTS_MAX, "event queue overflow"
        self._sequence += 1
        heapq.heappush(self._heap, (time_ns, self._sequence, action))

    def after(self, delay_ns: int, action: Action) -> None:
        assert delay_ns >= 0, delay_ns
        self.at(self._sim_time.now_ns + delay_ns, action)

    def pop(self) -> Action | None:
        """Advance global time to the next event and return it (None when empty)."""
        if not self._heap:
            return None
        time_ns, _, action = heapq.heappop(self._heap)
        self._sim_time.advance_to(time_ns)
        return action

    def __len__(self) -> int:
        return len(self._heap)


class Trace:
    """A running sha256 over canonical event lines: `<time_ns> <node> <kind> <detail>`.

    Lines hold only ints, enum names, and hex: never a repr that could carry an id.
    """

    __slots__ = ("_hash", "_queue", "_lines", "lines_recorded")

    def __init__(self, queue: EventQueue, *, keep_lines: bool = False) -> None:
        self._hash = hashlib.sha256()
        self._queue = queue
        self._lines: list[str] | None = [] if keep_lines else None
        self.lines_recorded = 0

    def record(self, node: int, kind: str, detail: str = "") -> None:
        prefix = f"{self._queue.now_ns} {node} {kind}"
        line = f"{prefix} {detail}\n" if detail else f"{prefix}\n"
        self._hash.update(line.encode())
        self.lines_recorded += 1
        if self._lines is not None and len(self._lines) < TRACE_LINES_KEPT_MAX:
            self._lines.append(line)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def lines(self) -> list[str]:
        return list(self._lines or ())
