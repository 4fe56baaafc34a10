"""The in-memory index of the durable log: the compaction point and, for every stored entry,
its term and where its record lives (segment, byte position, record length).

It mirrors `MemoryStorage._entries` without holding entry data: slot 0 is the sentinel
standing for the last compacted entry (index `offset`, its term), slot k is index
`offset + k`. `term()` is one array lookup; reading an entry's data means reading the
record at its location. Replay after a restart applies the same operations in the same
order as the writer did, so it rebuilds the same index.

A slot whose segment is `MISSING_SEGMENT` stands for an entry written in a segment that is
not on disk (deleted by compaction): replay starting at a later segment's checkpoint only
knows such entries exist. Invariant after a successful recovery: no live slot is missing.
"""

from __future__ import annotations

from array import array

MISSING_SEGMENT = 0
"""Segment numbers start at 1."""


class LogIndex:
    __slots__ = ("offset", "_terms", "_segments", "_positions", "_lengths")

    def __init__(self, index: int, term: int) -> None:
        self.offset = index
        self._terms = array("q", [term])
        self._segments = array("q", [MISSING_SEGMENT])
        self._positions = array("q", [0])
        self._lengths = array("q", [0])

    def reset(self, index: int, term: int) -> None:
        """Drop everything: the log is now empty after (index, term)."""
        self.offset = index
        self._terms = array("q", [term])
        self._segments = array("q", [MISSING_SEGMENT])
        self._positions = array("q", [0])
        self._lengths = array("q", [0])

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self._terms) - 1

    def sentinel_term(self) -> int:
        return self._terms[0]

    def term(self, index: int) -> int:
        """The term at `index`, which must be in [offset, last_index] (the caller checks)."""
        slot = index - self.offset
        assert 0 <= slot < len(self._terms), (index, self.offset, self.last_index())
        return self._terms[slot]

    def location(self, index: int) -> tuple[int, int, int]:
        """(segment, position, length) of the record holding entry `index`."""
        slot = index - self.offset
        assert 1 <= slot < len(self._terms), (index, self.offset, self.last_index())
        return self._segments[slot], self._positions[slot], self._lengths[slot]

    def is_missing(self, index: int) -> bool:
        return self._segments[index - self.offset] == MISSING_SEGMENT

    def append(self, index: int, term: int, segment: int, position: int, length: int) -> None:
        """Store entry `index`, first dropping any stored entry at or after it.

        ValueError if `index` is compacted or leaves a gap (replay turns it into a typed
        corruption error; the writer asserts it never happens)."""
        slot = index - self.offset
        if not 1 <= slot <= len(self._terms):
            raise ValueError(
                f"entry {index} does not follow the log (compacted to {self.offset}, "
                f"last {self.last_index()})"
            )
        assert segment != MISSING_SEGMENT and term > 0, (segment, term)
        if slot < len(self._terms):
            self._truncate(slot)
        self._terms.append(term)
        self._segments.append(segment)
        self._positions.append(position)
        self._lengths.append(length)

    def add_missing(self, last_index: int) -> None:
        """Stand-ins for entries (last_index(), last_index] that earlier segments hold."""
        assert last_index >= self.last_index(), (last_index, self.last_index())
        count = last_index - self.last_index()
        self._terms.extend([0] * count)
        self._segments.extend([MISSING_SEGMENT] * count)
        self._positions.extend([0] * count)
        self._lengths.extend([0] * count)

    def compact(self, index: int, term: int) -> None:
        """Drop entries up to and including `index` (in (offset, last_index]), whose term
        is `term`; ValueError if that contradicts the stored term."""
        slot = index - self.offset
        if not 1 <= slot < len(self._terms):
            raise ValueError(
                f"compaction to {index} outside the log ({self.offset}, {self.last_index()}]"
            )
        if not self.is_missing(index) and self._terms[slot] != term:
            raise ValueError(
                f"compaction to {index} at term {term}, but that entry has term {self._terms[slot]}"
            )
        for column in (self._terms, self._segments, self._positions, self._lengths):
            del column[:slot]
        self.offset = index
        self._terms[0] = term
        self._segments[0] = MISSING_SEGMENT
        self._positions[0] = 0
        self._lengths[0] = 0

    def first_live_segment(self) -> int | None:
        """The segment holding the first stored entry, or None when the log is empty.

        Segments never decrease along the log: entry j's record was written before entry
        l's for j < l (rewriting j would have dropped l), so no later entry is older."""
        if len(self._terms) == 1:
            return None
        return self._segments[1]

    def first_missing(self) -> int | None:
        """The lowest stored index whose record is missing, if any."""
        try:
            return self.offset + self._segments.index(MISSING_SEGMENT, 1)
        except ValueError:
            return None

    def _truncate(self, slot: int) -> None:
        for column in (self._terms, self._segments, self._positions, self._lengths):
            del column[slot:]
