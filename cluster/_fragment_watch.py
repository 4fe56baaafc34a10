"""Time limits for fragments: the worker's loop interrupts one that runs too long.

A fragment is one SELECT a coordinator wrote, and nothing else bounds what it costs (a
cross join of partitions, a join to `range(10^10)`): without a limit one such fragment
holds the node's scan lane, and every read behind it, forever. The scan lane `start`s a
watch on the fragment's snapshot before running it and `stop`s it after; the loop calls
`interrupt_overdue` on every wake-up (at least every tick), which interrupts the DuckDB
statement once `limit_ms` has passed since it started — and again on every later wake-up
while it still runs, since DuckDB forgets an interrupt that comes just before its statement
starts. Closing the worker interrupts the running fragment too (`interrupt_now`, called
until the lane is done), so a stop does not wait for it.

A fragment interrupted for its limit is remembered (by a digest of its SQL) for
`INTERRUPTED_KEPT_MS`: the client asks every holder for a read that is slow to answer,
and asks again after a while, so copies of the same fragment queue up behind it on this
lane; they are refused at once rather than each running for the whole limit again.

Invariant: `interrupt` is called on a watched target only between its `start` and its
`stop` (all three hold one lock), so no later statement on the same snapshot is ever the
one interrupted (DuckDB clears a stray interrupt when the next statement starts anyway).
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from clock import Clock

FRAGMENT_TIME_LIMIT_MS = 8_000
"""A fragment still running this long after it started is interrupted and refused as not
retryable (it would run as long on any holder). Below the client's whole wait for a read
(cluster.session: SCAN_TIMEOUT_MS x SCAN_ROUNDS_MAX = 9 s), so the coordinator is told why
rather than giving up on a silent holder; a fragment running longer has nobody waiting."""
FRAGMENT_TIME_LIMIT_ENV = "DCLUSTER_FRAGMENT_TIME_LIMIT_MS"
"""Overrides FRAGMENT_TIME_LIMIT_MS (tests shorten it); read by each worker at start."""
FRAGMENT_TIME_LIMIT_MS_MAX = 3_600_000
INTERRUPTED_KEPT_MS = 60_000
"""How long a fragment interrupted for its limit is refused here without running."""
INTERRUPTED_KEPT_MAX = 64
NS_PER_MS = 1_000_000


def fragment_time_limit_ms_from(environ: Mapping[str, str]) -> int:
    """`DCLUSTER_FRAGMENT_TIME_LIMIT_MS` if set, else FRAGMENT_TIME_LIMIT_MS."""
    text = environ.get(FRAGMENT_TIME_LIMIT_ENV)
    if not text:
        return FRAGMENT_TIME_LIMIT_MS
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{FRAGMENT_TIME_LIMIT_ENV}={text!r} is not a whole number") from None
    if not 1 <= value <= FRAGMENT_TIME_LIMIT_MS_MAX:
        raise ValueError(
            f"{FRAGMENT_TIME_LIMIT_ENV}={value} must be between 1 and "
            f"{FRAGMENT_TIME_LIMIT_MS_MAX} ms"
        )
    return value


class Interruptible(Protocol):
    def interrupt(self) -> None:
        """From another thread: make the statement running now raise soon."""
        ...


class Interrupted(enum.Enum):
    TIME_LIMIT = "time limit"
    CLOSING = "closing"


@dataclass(slots=True)
class Watched:
    """One fragment being run; `why` is set once it has been interrupted."""

    target: Interruptible
    deadline_ns: int
    why: Interrupted | None = None


class FragmentWatch:
    def __init__(self, clock: Clock, limit_ms: int) -> None:
        assert 1 <= limit_ms <= FRAGMENT_TIME_LIMIT_MS_MAX, limit_ms
        self.limit_ms = limit_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._watched: Watched | None = None
        self._closing = False
        self._interrupted: OrderedDict[bytes, int] = OrderedDict()
        """Digest of an interrupted fragment's SQL -> when (monotonic ns); the scan lane's."""

    # ---- the scan lane ----

    def start(self, target: Interruptible) -> Watched:
        """Watch the fragment about to run on `target`; one at a time."""
        deadline_ns = self._clock.monotonic_ns() + self.limit_ms * NS_PER_MS
        watched = Watched(target, deadline_ns)
        with self._lock:
            assert self._watched is None, "one fragment at a time"
            if self._closing:
                watched.why = Interrupted.CLOSING
            else:
                self._watched = watched
        return watched

    def stop(self, watched: Watched) -> None:
        """The fragment is done: nothing interrupts `watched.target` after this returns."""
        with self._lock:
            if self._watched is watched:
                self._watched = None

    def remember(self, sql: str) -> None:
        key = _digest(sql)
        self._interrupted[key] = self._clock.monotonic_ns()
        self._interrupted.move_to_end(key)
        while len(self._interrupted) > INTERRUPTED_KEPT_MAX:
            self._interrupted.popitem(last=False)

    def interrupted_ago_ms(self, sql: str) -> int | None:
        """How long ago this SQL was interrupted for its limit here (None: not lately)."""
        now = self._clock.monotonic_ns()
        while self._interrupted:
            oldest_ns = next(iter(self._interrupted.values()))
            if now - oldest_ns <= INTERRUPTED_KEPT_MS * NS_PER_MS:
                break
            self._interrupted.popitem(last=False)
        when = self._interrupted.get(_digest(sql))
        return None if when is None else (now - when) // NS_PER_MS

    @property
    def watching(self) -> bool:
        """A fragment is running now (it may be being interrupted)."""
        return self._watched is not None

    # ---- the loop, and closing ----

    def interrupt_overdue(self) -> None:
        """Every wake-up of the loop: interrupt the fragment whose time is up (again, if it
        is still running)."""
        if self._watched is None:  # the common case, without the lock
            return
        now = self._clock.monotonic_ns()
        with self._lock:
            watched = self._watched
            if watched is None or now < watched.deadline_ns:
                return
            if watched.why is None:
                watched.why = Interrupted.TIME_LIMIT
            watched.target.interrupt()

    def interrupt_now(self) -> None:
        """The worker is closing: interrupt the running fragment, refuse later ones."""
        with self._lock:
            self._closing = True
            watched = self._watched
            if watched is None:
                return
            if watched.why is None:
                watched.why = Interrupted.CLOSING
            watched.target.interrupt()


def _digest(sql: str) -> bytes:
    return hashlib.blake2b(sql.encode(), digest_size=16).digest()
