"""The Raft log as the state machine sees it: stable storage plus an unstable tail.

Entries (and an incoming snapshot) the node has accepted but the caller has not yet
persisted live in `_Unstable`; `Ready.entries` hands them out and `stable_to` forgets them
once the caller says they are on disk. `committed` and `applied` are tracked here.

Invariants: applied <= committed <= last_index(); the unstable tail always starts right
after the stable part (or right after an unstable snapshot); an index is committed only
after it is known to be durable on a quorum — this class never decides that, it only
refuses to move `committed` backwards.
"""

from __future__ import annotations

from raft.storage import LogStorage, limit_size
from raft.types import CompactedError, Entry, Snapshot, UnavailableError


class _Unstable:
    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset  # index of entries[0] (when there are entries)

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.meta.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        found = self.maybe_term(index)
        if found is None or found != term or index < self.offset:
            return  # the entry was replaced since the Ready was made; keep it unstable
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snapshot_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first <= self.offset:
            self.offset = first
            self.entries = list(entries)
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(entries)

    def slice(self, low: int, high: int) -> list[Entry]:
        assert self.offset <= low <= high <= self.offset + len(self.entries), (
            low,
            high,
            self.offset,
            len(self.entries),
        )
        return self.entries[low - self.offset : high - self.offset]


class RaftLog:
    def __init__(self, storage: LogStorage) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = _Unstable(offset=last + 1)
        self.committed = first - 1
        self.applied = first - 1

    # ---- indexes and terms ----

    def first_index(self) -> int:
        index = self.unstable.maybe_first_index()
        return index if index is not None else self.storage.first_index()

    def last_index(self) -> int:
        index = self.unstable.maybe_last_index()
        return index if index is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """Term of the entry at `index`; raises CompactedError / UnavailableError."""
        dummy = self.first_index() - 1
        if index < dummy:
            raise CompactedError(f"index {index} is compacted")
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond the last index")
        term = self.unstable.maybe_term(index)
        if term is not None:
            return term
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a candidate's log is at least as up-to-date as ours."""
        our_term = self.last_term()
        return last_term > our_term or (last_term == our_term and last_index >= self.last_index())

    # ---- reading entries ----

    def slice(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Entries in [low, high), size-limited but never empty when the range is not."""
        if low == high:
            return []
        first = self.first_index()
        if low < first:
            raise CompactedError(f"index {low} is compacted (first is {first})")
        if high > self.last_index() + 1:
            raise UnavailableError(f"index {high - 1} is beyond the last index")
        result: list[Entry] = []
        offset = self.unstable.offset
        if low < offset:
            stored = self.storage.entries(low, min(high, offset), max_bytes)
            if len(stored) < min(high, offset) - low:
                return stored  # size limit reached inside storage
            result = stored
        if high > offset:
            result = result + self.unstable.slice(max(low, offset), high)
        return limit_size(result, max_bytes)

    def entries_from(self, index: int, max_bytes: int) -> list[Entry]:
        if index > self.last_index():
            return []
        return self.slice(index, self.last_index() + 1, max_bytes)

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def has_pending_snapshot(self) -> bool:
        return self.unstable.snapshot is not None

    def has_next_committed_entries(self) -> bool:
        if self.has_pending_snapshot():
            return False
        return self.committed > self.applied

    def next_committed_entries(self, max_bytes: int) -> list[Entry]:
        if self.has_pending_snapshot() or self.committed <= self.applied:
            return []
        return self.slice(self.applied + 1, self.committed + 1, max_bytes)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # ---- changing the log ----

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry whose term differs from ours (or is new); 0 if none."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest (i, term(i)) with i <= index and term(i) <= term (fast backtracking)."""
        while index > 0:
            try:
                our_term = self.term(index)
            except CompactedError:
                return index, 0
            except UnavailableError:
                index = self.last_index()
                continue
            if our_term <= term:
                return index, our_term
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, commit: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """The follower side of AppendEntries: None if (index, log_term) does not match our
        log; otherwise append, advance commit (bounded by what we now hold) and return the
        last new index."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict != 0:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with committed entry (committed={self.committed})"
            )
            self.append(list(entries[conflict - index - 1 :]))
        return last_new

    def append(self, entries: list[Entry]) -> int:
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        assert after >= self.committed, f"would overwrite committed entry {after + 1}"
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    def commit_to(self, index: int) -> bool:
        if index <= self.committed:
            return False
        assert index <= self.last_index(), (index, self.last_index())
        self.committed = index
        return True

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        assert self.applied <= index <= self.committed, (self.applied, index, self.committed)
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snapshot_to(self, index: int) -> None:
        self.unstable.stable_snapshot_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.unstable.restore(snapshot)
