"""What a leader knows about each follower's log, and the flow control it applies.

A follower is in one of three states:
- PROBE: we do not know where its log matches ours; send one append at a time and wait.
- REPLICATE: it matches up to `match`; stream appends optimistically (pipelining), at most
  `Inflights.capacity` unacknowledged messages at once.
- SNAPSHOT: it needs entries we compacted; stream snapshot chunks, then probe again.

Invariant: match < next; match never decreases within a term.
"""

from __future__ import annotations

import enum
from collections import deque

from raft.types import Snapshot


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """Last indexes of appends sent but not yet acknowledged, oldest first."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self._last_indexes: deque[int] = deque()

    def add(self, last_index: int) -> None:
        assert not self.full(), "sending past the in-flight limit"
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        while self._last_indexes and self._last_indexes[0] <= index:
            self._last_indexes.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def count(self) -> int:
        return len(self._last_indexes)

    def reset(self) -> None:
        self._last_indexes.clear()


class SnapshotTransfer:
    """A chunked InstallSnapshot in progress: bytes acknowledged and bytes sent."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.acked_bytes = 0
        self.sent_bytes = 0
        self.all_sent = False
        self.acked_bytes_at_last_heartbeat = -1

    def rewind(self, offset: int) -> None:
        """Send again from `offset` (bytes the follower is known to hold)."""
        self.acked_bytes = offset
        self.sent_bytes = offset
        self.all_sent = False

    @property
    def size(self) -> int:
        return len(self.snapshot.data)


class Progress:
    def __init__(self, next_index: int, inflight_max: int, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.recent_active = True
        self.is_learner = is_learner
        self.inflights = Inflights(inflight_max)
        self.transfer: SnapshotTransfer | None = None

    def _reset(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.transfer = None
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT and self.transfer is not None:
            pending = self.transfer.snapshot.meta.index
            self._reset(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.transfer = SnapshotTransfer(snapshot)

    def pending_snapshot_index(self) -> int:
        return self.transfer.snapshot.meta.index if self.transfer is not None else 0

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to `index`; True if it moved `match`."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append at `rejected`; True if we should probe again."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale rejection
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale rejection of an earlier probe
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def sent_entries(self, last_index: int | None) -> None:
        """Record an append carrying entries up to `last_index` (None: no entries)."""
        if self.state == ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True
