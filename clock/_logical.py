"""Lamport and vector clocks, for the history checkers' happened-before relation.

A `LamportClock` gives a total order consistent with causality: if a happened before b,
then L(a) < L(b) (not the converse). A `VectorClock` captures causality exactly: a
happened before b if and only if V(a) < V(b) pointwise; incomparable vectors mark
concurrent events.

Invariants: a Lamport clock only grows, and each event's value exceeds every value it
has seen. A `VectorClock` is an immutable value whose counters are all positive (absent
nodes count zero and are not stored, so equal clocks have equal representations), kept
sorted by node id, so its repr and encoding are deterministic.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class LamportClock:
    """A Lamport counter. `tick()` for a local event, `send()` to stamp a message,
    `receive(remote)` on its arrival; each returns the event's value."""

    __slots__ = ("_value",)

    def __init__(self, value: int = 0) -> None:
        assert value >= 0, value
        self._value = value

    @property
    def value(self) -> int:
        return self._value

    def tick(self) -> int:
        self._value += 1
        return self._value

    def send(self) -> int:
        return self.tick()

    def receive(self, remote: int) -> int:
        assert remote >= 0, remote
        self._value = max(self._value, remote) + 1
        return self._value

    def __repr__(self) -> str:
        return f"LamportClock(value={self._value})"


class Ordering(enum.Enum):
    """How two vector clocks' events relate, seen from the left operand."""

    BEFORE = "before"
    """Left happened before right."""
    AFTER = "after"
    """Right happened before left."""
    EQUAL = "equal"
    CONCURRENT = "concurrent"
    """Neither happened before the other."""


class VectorClock:
    """An immutable vector clock keyed by node id. Operations return new clocks."""

    __slots__ = ("_counters",)

    _counters: tuple[tuple[int, int], ...]
    """(node_id, counter) pairs, sorted by node id, every counter positive."""

    def __init__(self, counters: Mapping[int, int] | None = None) -> None:
        pairs: list[tuple[int, int]] = []
        for node_id, counter in sorted((counters or {}).items()):
            assert isinstance(node_id, int), node_id
            assert node_id >= 0, node_id
            assert counter >= 0, counter
            if counter > 0:
                pairs.append((node_id, counter))
        self._counters = tuple(pairs)

    @classmethod
    def _from_sorted(cls, pairs: tuple[tuple[int, int], ...]) -> VectorClock:
        clock = cls.__new__(cls)
        clock._counters = pairs
        return clock

    def get(self, node_id: int) -> int:
        """The counter for `node_id`; zero if it has none."""
        for candidate, counter in self._counters:
            if candidate == node_id:
                return counter
        return 0

    def __getitem__(self, node_id: int) -> int:
        return self.get(node_id)

    def increment(self, node_id: int) -> VectorClock:
        """A local event (or send) on `node_id`."""
        counters = dict(self._counters)
        counters[node_id] = counters.get(node_id, 0) + 1
        return VectorClock(counters)

    def merge(self, other: VectorClock) -> VectorClock:
        """Pointwise maximum: what a receiver knows before counting its receive event."""
        counters = dict(self._counters)
        for node_id, counter in other._counters:
            counters[node_id] = max(counters.get(node_id, 0), counter)
        return VectorClock._from_sorted(tuple(sorted(counters.items())))

    def compare(self, other: VectorClock) -> Ordering:
        """BEFORE if self happened before other, AFTER if after, else EQUAL or CONCURRENT."""
        mine = dict(self._counters)
        theirs = dict(other._counters)
        some_less = False
        some_greater = False
        for node_id in mine.keys() | theirs.keys():
            counter_mine = mine.get(node_id, 0)
            counter_theirs = theirs.get(node_id, 0)
            some_less = some_less or counter_mine < counter_theirs
            some_greater = some_greater or counter_mine > counter_theirs
        if some_less and some_greater:
            return Ordering.CONCURRENT
        if some_less:
            return Ordering.BEFORE
        if some_greater:
            return Ordering.AFTER
        return Ordering.EQUAL

    def to_dict(self) -> dict[int, int]:
        """Positive counters by node id, in ascending node order."""
        return dict(self._counters)

    @classmethod
    def from_dict(cls, counters: Mapping[int, int]) -> VectorClock:
        return cls(counters)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self._counters == other._counters

    def __hash__(self) -> int:
        return hash(self._counters)

    def __repr__(self) -> str:
        return f"VectorClock({self.to_dict()!r})"
