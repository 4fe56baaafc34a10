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
from raft import ConfState, Entry, HardState, Snapshot, SnapshotMeta

CONF = ConfState(voters=(1, 2, 3))


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
    assert recovery.storage.initial_state() == (HardState(), CONF)
    assert SimDisk().recover().storage.initial_state()[1] == ConfState()


def test_synced_records_survive_a_crash() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(1, 3, 1)))
    disk.write(HardStateRecord(HardState(term=1, vote=2, commit=2)))
    disk.fsync()
    outcome = disk.crash(random.Random(1))
    assert outcome.unsynced_bytes == 0
    recovery = disk.recover()
    assert recovery.records == 2
    storage = recovery.storage
    assert storage.last_index() == 3
    assert storage.hard_state() == HardState(term=1, vote=2, commit=2)
    assert storage.entries(1, 4, 1 << 20) == list(entries(1, 3, 1))


def test_unsynced_records_are_lost_when_the_crash_keeps_nothing() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(1, 2, 1)))
    disk.fsync()
    disk.write(EntriesRecord(entries(3, 5, 1)))
    disk.write(HardStateRecord(HardState(term=2, vote=1, commit=0)))
    assert disk.unsynced_raft_records == 2
    outcome = disk.crash(ScriptedRandom([0.1], []))
    assert outcome.kept_bytes == 0
    assert not outcome.torn
    assert disk.unsynced_raft_records == 0
    storage = disk.recover().storage
    assert storage.last_index() == 2
    assert storage.hard_state() == HardState()


def test_a_torn_last_record_is_truncated_on_recovery() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(1, 2, 1)))
    disk.fsync()
    synced_bytes = disk.durable_bytes
    disk.write(EntriesRecord(entries(3, 3, 1)))
    first_unsynced_end = disk.unsynced_bytes
    disk.write(EntriesRecord(entries(4, 6, 1)))
    cut = first_unsynced_end + 5  # five bytes into the second unsynced record
    outcome = disk.crash(ScriptedRandom([0.9], [cut]))
    assert outcome.torn
    assert outcome.kept_bytes == cut
    recovery = disk.recover()
    assert recovery.torn_tail_bytes == 5
    assert recovery.records == 2  # the synced one and the whole unsynced one
    assert recovery.storage.last_index() == 3
    assert disk.durable_bytes == synced_bytes + first_unsynced_end
    again = disk.recover()  # the log was truncated: nothing torn any more
    assert again.torn_tail_bytes == 0
    assert again.records == 2


def test_a_crash_without_torn_writes_keeps_whole_records() -> None:
    for seed in range(50):
        disk = SimDisk(CONF)
        for first in range(1, 20, 3):
            disk.write(EntriesRecord(entries(first, first + 2, 1)))
        outcome = disk.crash(random.Random(seed), torn_writes=False)
        assert not outcome.torn
        assert disk.recover().torn_tail_bytes == 0


def test_a_corrupt_record_ends_the_log() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(1, 2, 1)))
    disk.fsync()
    good_bytes = disk.durable_bytes
    disk.write(EntriesRecord(entries(3, 4, 1)))
    disk.write(EntriesRecord(entries(5, 6, 1)))
    disk.fsync()
    disk.corrupt_byte(good_bytes + 10)  # inside the second record's body
    recovery = disk.recover()
    assert recovery.records == 1
    assert recovery.storage.last_index() == 2
    assert recovery.torn_tail_bytes > 0
    assert disk.durable_bytes == good_bytes


def test_replay_reproduces_snapshots_compaction_and_truncation() -> None:
    disk = SimDisk(CONF)
    disk.write(EntriesRecord(entries(1, 10, 1)))
    disk.write(EntriesRecord(entries(8, 9, 2)))  # a new leader overwrites 8..10
    disk.write(HardStateRecord(HardState(term=2, vote=3, commit=7)))
    disk.write(CreateSnapshotRecord(7, CONF, b"image-at-7"))
    disk.write(CompactRecord(5))
    disk.fsync()
    storage = disk.recover().storage
    assert storage.last_index() == 9
    assert storage.term(9) == 2
    assert storage.term(7) == 1
    assert storage.first_index() == 6
    assert storage.snapshot().meta == SnapshotMeta(index=7, term=1, conf=CONF)
    assert storage.snapshot().data == b"image-at-7"


def test_replay_of_an_installed_snapshot_replaces_the_log() -> None:
    disk = SimDisk()
    disk.write(EntriesRecord(entries(1, 3, 1)))
    snapshot = Snapshot(meta=SnapshotMeta(index=20, term=4, conf=CONF), data=b"image")
    disk.write(ApplySnapshotRecord(snapshot))
    disk.write(EntriesRecord(entries(21, 22, 4)))
    disk.fsync()
    storage = disk.recover().storage
    assert storage.snapshot() == snapshot
    assert storage.first_index() == 21
    assert storage.last_index() == 22
    assert storage.initial_state()[1] == CONF
