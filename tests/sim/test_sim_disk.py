"""SimDisk: only fsynced records survive a crash; torn and corrupt tails are cut on recovery."""

from __future__ import annotations

import random

from chaos.disk import (
    ApplySnapshotRecord,
    CompactRecord,
    CreateSnapshotRecord,
    EntriesRecord,
    HardStateRecord,
    SimDisk,
)
from raft import (
    BOOTSTRAP_INDEX,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
    bootstrap_snapshot,
)

CONF = ConfState(voters=(1, 2, 3))
BOOTSTRAP = bootstrap_snapshot(CONF)
BOOTSTRAP_HARD_STATE = HardState(term=BOOTSTRAP.meta.term, vote=0, commit=BOOTSTRAP_INDEX)
"""A founder's hard state before it has persisted any of its own."""
FIRST = BOOTSTRAP_INDEX + 1
"""A founder's first real log index: its log starts after the bootstrap snapshot."""
TERM = BOOTSTRAP.meta.term + 1
"""The first term a founder can be elected in."""


class ScriptedRandom(random.Random):
    """A Random whose `random()` and `randrange()` answer from a script (a fake, not a mock)."""

    def __init__(self, randoms: list[float], ranges: list[int]) -> None:
        super().__init__(0)
        self._randoms = list(randoms)
        self._ranges = list(ranges)

    def random(self) -> float:
        return self._randoms.pop(0)

    def randrange(self, *args: object, **kwargs: object) -> int:
        return self._ranges.pop(0)


def entries(first: int, last: int, term: int) -> tuple[Entry, ...]:
    return tuple(Entry(term=term, index=i, data=f"op{i}".encode()) for i in range(first, last + 1))


def test_fresh_disk_recovers_bootstrap_membership() -> None:
    recovery = SimDisk(CONF).recover()
    assert recovery.records == 0
    assert recovery.torn_tail_bytes == 0
    storage = recovery.storage
    assert storage.initial_state() == (BOOTSTRAP_HARD_STATE, CONF)
    assert storage.snapshot() == BOOTSTRAP
    assert storage.snapshot().meta == SnapshotMeta(
        index=BOOTSTRAP_INDEX, term=BOOTSTRAP_INDEX, conf=CONF
    )
    assert storage.snapshot().data == b""
    assert storage.first_index() == FIRST
    assert storage.last_index() == BOOTSTRAP_INDEX
    assert storage.term(BOOTSTRAP_INDEX) == BOOTSTRAP.meta.term
    joiner = SimDisk().recover().storage
    assert joiner.initial_state() == (HardState(), ConfState())
    assert joiner.snapshot() == Snapshot()
    assert joiner.last_index() == 0


def test_synced_records_survive_a_crash() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(FIRST, FIRST + 2, TERM)))
    disk.write(HardStateRecord(HardState(term=TERM, vote=2, commit=FIRST + 1)))
    disk.fsync()
    outcome = disk.crash(random.Random(1))
    assert outcome.unsynced_bytes == 0
    recovery = disk.recover()
    assert recovery.records == 2
    storage = recovery.storage
    assert storage.last_index() == FIRST + 2
    assert storage.hard_state() == HardState(term=TERM, vote=2, commit=FIRST + 1)
    assert storage.entries(FIRST, FIRST + 3, 1 << 20) == list(entries(FIRST, FIRST + 2, TERM))


def test_unsynced_records_are_lost_when_the_crash_keeps_nothing() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(FIRST, FIRST + 1, TERM)))
    disk.fsync()
    disk.write(EntriesRecord(entries(FIRST + 2, FIRST + 4, TERM)))
    disk.write(HardStateRecord(HardState(term=TERM + 1, vote=1, commit=BOOTSTRAP_INDEX)))
    assert disk.unsynced_raft_records == 2
    outcome = disk.crash(ScriptedRandom([0.1], []))
    assert outcome.kept_bytes == 0
    assert not outcome.torn
    assert disk.unsynced_raft_records == 0
    storage = disk.recover().storage
    assert storage.last_index() == FIRST + 1
    assert storage.hard_state() == BOOTSTRAP_HARD_STATE


def test_a_torn_last_record_is_truncated_on_recovery() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(FIRST, FIRST + 1, TERM)))
    disk.fsync()
    synced_bytes = disk.durable_bytes
    disk.write(EntriesRecord(entries(FIRST + 2, FIRST + 2, TERM)))
    first_unsynced_end = disk.unsynced_bytes
    disk.write(EntriesRecord(entries(FIRST + 3, FIRST + 5, TERM)))
    cut = first_unsynced_end + 5  # five bytes into the second unsynced record
    outcome = disk.crash(ScriptedRandom([0.9], [cut]))
    assert outcome.torn
    assert outcome.kept_bytes == cut
    recovery = disk.recover()
    assert recovery.torn_tail_bytes == 5
    assert recovery.records == 2  # the synced one and the whole unsynced one
    assert recovery.storage.last_index() == FIRST + 2
    assert disk.durable_bytes == synced_bytes + first_unsynced_end
    again = disk.recover()  # the log was truncated: nothing torn any more
    assert again.torn_tail_bytes == 0
    assert again.records == 2


def test_a_crash_without_torn_writes_keeps_whole_records() -> None:
    for seed in range(50):
        disk = SimDisk(CONF)
        for first in range(FIRST, FIRST + 19, 3):
            disk.write(EntriesRecord(entries(first, first + 2, TERM)))
        outcome = disk.crash(random.Random(seed), torn_writes=False)
        assert not outcome.torn
        assert disk.recover().torn_tail_bytes == 0


def test_a_corrupt_record_ends_the_log() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(FIRST, FIRST + 1, TERM)))
    disk.fsync()
    good_bytes = disk.durable_bytes
    disk.write(EntriesRecord(entries(FIRST + 2, FIRST + 3, TERM)))
    disk.write(EntriesRecord(entries(FIRST + 4, FIRST + 5, TERM)))
    disk.fsync()
    disk.corrupt_byte(good_bytes + 10)  # inside the second record's body
    recovery = disk.recover()
    assert recovery.records == 1
    assert recovery.storage.last_index() == FIRST + 1
    assert recovery.torn_tail_bytes > 0
    assert disk.durable_bytes == good_bytes


def test_replay_reproduces_snapshots_compaction_and_truncation() -> None:
    disk = SimDisk(CONF)
    last, overwritten, snapshot_at, compact_to = FIRST + 9, FIRST + 7, FIRST + 6, FIRST + 4
    disk.write(EntriesRecord(entries(FIRST, last, TERM)))
    # A new leader overwrites overwritten..last with a shorter suffix.
    disk.write(EntriesRecord(entries(overwritten, last - 1, TERM + 1)))
    disk.write(HardStateRecord(HardState(term=TERM + 1, vote=3, commit=snapshot_at)))
    disk.write(CreateSnapshotRecord(snapshot_at, CONF, b"image"))
    disk.write(CompactRecord(compact_to))
    disk.fsync()
    storage = disk.recover().storage
    assert storage.last_index() == last - 1
    assert storage.term(last - 1) == TERM + 1
    assert storage.term(snapshot_at) == TERM
    assert storage.first_index() == compact_to + 1
    assert storage.snapshot().meta == SnapshotMeta(index=snapshot_at, term=TERM, conf=CONF)
    assert storage.snapshot().data == b"image"


def test_replay_of_an_installed_snapshot_replaces_the_log() -> None:
    disk = SimDisk()  # a joiner: it is sent the bootstrap snapshot before any entry
    disk.write(ApplySnapshotRecord(BOOTSTRAP))
    disk.write(EntriesRecord(entries(FIRST, FIRST + 2, TERM)))
    later_conf = ConfState(voters=(1, 2, 3, 4))
    snapshot = Snapshot(meta=SnapshotMeta(index=20, term=4, conf=later_conf), data=b"image")
    disk.write(ApplySnapshotRecord(snapshot))
    disk.write(EntriesRecord(entries(21, 22, 4)))
    disk.fsync()
    storage = disk.recover().storage
    assert storage.snapshot() == snapshot
    assert storage.first_index() == 21
    assert storage.last_index() == 22
    assert storage.initial_state()[1] == later_conf
