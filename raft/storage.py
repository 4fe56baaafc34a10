"""The stable-log interface Raft reads from, and an in-memory implementation.

Raft only *reads* stable storage (through `LogStorage`); the caller's loop *writes* it when
it handles a `Ready`: `apply_snapshot`, `append`, `set_hard_state`, then fsync. After a
snapshot the caller may `compact` the log up to the snapshot index.

Invariant kept by every implementation: the stored log is the contiguous range
[first_index, last_index]; `term(first_index - 1)` is the snapshot's term; an index beyond
`last_index` is unavailable and one below `first_index - 1` is compacted.

`durable/` implementations (the WAL in storage/) satisfy the same protocol.
"""

from __future__ import annotations

from typing import Protocol

from raft.types import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
)


class LogStorage(Protocol):
    """What Raft needs from stable storage. Raises CompactedError / UnavailableError."""

    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Entries in [low, high); at least one if any, then at most `max_bytes` of data."""
        ...

    def term(self, index: int) -> int: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


BOOTSTRAP_INDEX = 1
"""The founders' log begins after a snapshot at index 1, term 1."""


def bootstrap_snapshot(conf: ConfState) -> Snapshot:
    """The snapshot every founding member starts from: membership, no data."""
    assert conf.voters, "a new cluster needs at least one voter"
    return Snapshot(meta=SnapshotMeta(index=BOOTSTRAP_INDEX, term=BOOTSTRAP_INDEX, conf=conf))


class MemoryStorage:
    """A `LogStorage` held in memory, plus the write side the caller's loop uses.

    `_entries[0]` is a sentinel standing for the snapshot's (index, term).
    """

    def __init__(self, conf: ConfState | None = None) -> None:
        """A fresh log.

        With `conf`, a founding member of a new cluster: it starts from the bootstrap
        snapshot (index 1, term 1, that membership, empty state machine data), identical on
        every founder. Without, a node joining an existing cluster: an empty log and no
        membership. Because the founders' log starts after a snapshot, a joiner is always
        sent that snapshot first and so learns the founding membership from it (entries
        alone would teach it only the later changes)."""
        if conf is None:
            self._hard_state = HardState()
            self._snapshot = Snapshot()
        else:
            self._hard_state = HardState(term=BOOTSTRAP_INDEX, commit=BOOTSTRAP_INDEX)
            self._snapshot = bootstrap_snapshot(conf)
        meta = self._snapshot.meta
        self._entries: list[Entry] = [Entry(term=meta.term, index=meta.index)]

    # ---- read side (LogStorage) ----

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf

    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        offset = self._entries[0].index
        if low <= offset:
            raise CompactedError(f"index {low} is compacted (snapshot at {offset})")
        if high > self.last_index() + 1:
            raise UnavailableError(f"index {high - 1} is beyond last index {self.last_index()}")
        assert low <= high, (low, high)
        return limit_size(self._entries[low - offset : high - offset], max_bytes)

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise CompactedError(f"index {index} is compacted (snapshot at {offset})")
        if index - offset >= len(self._entries):
            raise UnavailableError(f"index {index} is beyond last index {self.last_index()}")
        return self._entries[index - offset].term

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # ---- write side (the caller's loop) ----

    def hard_state(self) -> HardState:
        return self._hard_state

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot` (a newer one than we hold)."""
        if snapshot.meta.index <= self._snapshot.meta.index:
            return
        self._snapshot = snapshot
        self._entries = [Entry(term=snapshot.meta.term, index=snapshot.meta.index)]

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        """Record a state machine image taken at applied `index` (which must be stored)."""
        if index <= self._snapshot.meta.index:
            return self._snapshot
        assert index <= self.last_index(), (index, self.last_index())
        meta = SnapshotMeta(index=index, term=self.term(index), conf=conf)
        self._snapshot = Snapshot(meta=meta, data=data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index`; keep it as the new sentinel."""
        offset = self._entries[0].index
        if index <= offset:
            return
        assert index <= self.last_index(), (index, self.last_index())
        sentinel = Entry(term=self._entries[index - offset].term, index=index)
        self._entries = [sentinel, *self._entries[index - offset + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append `entries`, first truncating any stored suffix they overwrite."""
        if not entries:
            return
        first = self.first_index()
        last_new = entries[-1].index
        if last_new < first:
            return  # wholly compacted already
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = self._entries[0].index
        start = entries[0].index - offset
        assert start <= len(self._entries), (
            f"gap: appending at {entries[0].index}, last is {self.last_index()}"
        )
        del self._entries[start:]
        self._entries.extend(entries)


def entry_size(entry: Entry) -> int:
    return len(entry.data) + 16


def limit_size(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The longest prefix within `max_bytes`, but never empty when `entries` is not."""
    if not entries:
        return entries
    total = entry_size(entries[0])
    for count in range(1, len(entries)):
        total += entry_size(entries[count])
        if total > max_bytes:
            return entries[:count]
    return entries
