"""The Wal's contract piece by piece: founders and joiners, group commit, nothing durable
before sync, reads from disk, segment rollover and deletion by compaction and snapshots,
limits checked up front, the lock, benchmark mode, and the record framing itself."""

from __future__ import annotations

import ast
import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    LogStorage,
    MemoryStorage,
    RaftConfig,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
    bootstrap_snapshot,
)
from raft.storage import limit_size
from storage import Wal, WalConfig, WalLocked
from storage._records import HEADER_BYTES, encode_record, read_record, scan
from tests.unit.storage.helpers import CONF, SMALL, entries, segment_paths, state_of


def test_a_founder_starts_from_the_bootstrap_snapshot_like_memory_storage(
    tmp_path: Path,
) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        assert state_of(wal) == state_of(MemoryStorage(CONF))
        assert wal.initial_state() == MemoryStorage(CONF).initial_state()
        assert wal.snapshot() == bootstrap_snapshot(CONF)
        assert wal.recovery.created
    assert [path.name for path in tmp_path.glob("snapshot-*")] == [
        "snapshot-00000000000000000001-00000000000000000001.snap"
    ]


def test_a_joiner_starts_empty_and_reopening_ignores_conf(tmp_path: Path) -> None:
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == state_of(MemoryStorage())
        assert wal.initial_state() == (HardState(), ConfState())
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        assert not wal.recovery.created
        assert wal.initial_state() == (HardState(), ConfState())
        assert wal.snapshot().is_empty()
    assert not list(tmp_path.glob("snapshot-*"))


def test_the_wal_satisfies_the_log_storage_protocol(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        storage: LogStorage = wal
        assert storage.first_index() == 2


def test_group_commit_is_one_fsync_for_a_whole_ready(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        syncs, fsyncs = wal.stats.syncs, wal.stats.fsyncs
        wal.append(entries(2, 6, 2))
        wal.set_hard_state(HardState(term=2, vote=1, commit=6))
        wal.sync()
        assert (wal.stats.syncs - syncs, wal.stats.fsyncs - fsyncs) == (1, 1)
        wal.sync()  # nothing new: no fsync
        assert (wal.stats.syncs - syncs, wal.stats.fsyncs - fsyncs) == (1, 1)


def test_nothing_before_sync_is_on_disk(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        wal.append(entries(2, 3, 2))
        wal.sync()
        size = segment_paths(tmp_path)[-1].stat().st_size
        wal.append(entries(4, 5, 2))
        wal.set_hard_state(HardState(term=2, vote=1, commit=5))
        wal.create_snapshot(3, CONF, b"image")
        assert wal.unsynced_bytes > 0
        assert segment_paths(tmp_path)[-1].stat().st_size == size
        assert len(list(tmp_path.glob("snapshot-*"))) == 1
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.last_index() == 3
        assert wal.hard_state() == HardState(term=1, commit=1)
        assert wal.snapshot() == bootstrap_snapshot(CONF)


def test_entries_come_from_disk_when_the_cache_is_empty(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, cache_bytes_max=0)
    model = MemoryStorage(CONF)
    with Wal.open(tmp_path, CONF, config=config) as wal:
        rng = random.Random(7)
        for first in range(2, 60, 4):
            batch = [
                Entry(term=2, index=index, data=rng.randbytes(rng.randrange(0, 100)))
                for index in range(first, first + 4)
            ]
            model.append(batch)
            wal.append(batch)
            if first % 8 == 2:
                wal.sync()  # the rest stays in the unsynced buffer
        for low, high, max_bytes in [(2, 62, 2**40), (2, 62, 0), (10, 50, 300), (61, 62, 1)]:
            expected = model.entries(low, high, max_bytes)
            assert wal.entries(low, high, max_bytes) == expected
            assert expected == limit_size(model.entries(low, high, 2**40), max_bytes)
        assert wal.stats.disk_reads > 0 and wal.stats.cache_hits == 0


def test_out_of_range_reads_raise_like_memory_storage(tmp_path: Path) -> None:
    model = MemoryStorage(CONF)
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        for storage in (model, wal):
            storage.append(entries(2, 9, 2))
            storage.compact(4)
        for storage in (model, wal):
            with pytest.raises(CompactedError):
                storage.entries(4, 6, 100)
            with pytest.raises(CompactedError):
                storage.term(3)
            with pytest.raises(UnavailableError):
                storage.entries(5, 11, 100)
            with pytest.raises(UnavailableError):
                storage.term(10)
            with pytest.raises(CompactedError):
                storage.create_snapshot(3, CONF, b"")
            assert storage.term(4) == 2 and storage.entries(9, 9, 0) == []


def test_segments_roll_over_and_compaction_deletes_whole_old_segments(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        for index in range(2, 80):
            wal.append(entries(index, index, 2, size=50))
            if index % 3 == 0:
                wal.sync()
        wal.sync()
        before = [path.name for path in segment_paths(tmp_path)]
        assert len(before) >= 5
        sizes = [path.stat().st_size for path in segment_paths(tmp_path)]
        assert max(sizes) <= SMALL.segment_bytes_max
        assert before == wal.segment_files()
        wal.create_snapshot(60, CONF, b"image at 60")
        wal.compact(60)
        assert [path.name for path in segment_paths(tmp_path)] == before  # not until sync
        wal.sync()
        after = [path.name for path in segment_paths(tmp_path)]
        kept = [name for name in after if name in before]  # the sync may have rolled over
        assert kept == before[-len(kept) :] and len(kept) < len(before)
        assert wal.stats.segments_deleted == len(before) - len(kept)
        # Every kept segment holds a live entry or is the newest.
        first_kept = after[0]
        assert f"{wal.first_index()}:2:".encode() in (tmp_path / first_kept).read_bytes()
        expected = state_of(wal)
        assert [path.name for path in tmp_path.glob("snapshot-*")] == [
            "snapshot-00000000000000000060-00000000000000000002.snap"
        ]
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == expected
        assert wal.snapshot().data == b"image at 60"


def test_an_installed_snapshot_retires_every_older_segment_and_snapshot(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        for index in range(2, 40):
            wal.append(entries(index, index, 2, size=50))
            wal.sync()
        wal.create_snapshot(20, CONF, b"local")
        wal.sync()
        snapshot = Snapshot(meta=SnapshotMeta(index=100, term=7, conf=CONF), data=b"leader's")
        wal.apply_snapshot(snapshot)
        wal.sync()
        assert len(segment_paths(tmp_path)) == 1
        assert [path.name for path in tmp_path.glob("snapshot-*")] == [
            "snapshot-00000000000000000100-00000000000000000007.snap"
        ]
        assert (wal.first_index(), wal.last_index(), wal.term(100)) == (101, 100, 7)
        wal.append(entries(101, 103, 7))
        wal.sync()
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.snapshot() == snapshot
        assert wal.entries(101, 104, 2**20) == entries(101, 103, 7)


def test_conflicting_appends_truncate_durably(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        wal.append(entries(2, 20, 2))
        wal.sync()
        wal.append(entries(12, 14, 3))  # a new leader overwrites an uncommitted suffix
        wal.sync()
        assert wal.last_index() == 14
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.last_index() == 14
        assert [wal.term(index) for index in (11, 12, 14)] == [2, 3, 3]
        assert wal.entries(2, 15, 2**20) == entries(2, 11, 2) + entries(12, 14, 3)


def test_a_second_open_of_the_same_log_is_refused(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL):
        with pytest.raises(WalLocked):
            Wal.open(tmp_path, CONF, config=SMALL)
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.first_index() == 2


def test_benchmark_mode_never_fsyncs_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(SMALL, fsync=False)
    with Wal.open(tmp_path, CONF, config=config) as wal:
        wal.append(entries(2, 40, 2, size=50))
        wal.sync()
        assert wal.stats.syncs >= 2 and wal.stats.fsyncs == 0
    assert "fsync is OFF (benchmark mode)" in caplog.text
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.last_index() == 40


def test_the_default_limits_are_consistent_with_raft(tmp_path: Path) -> None:
    config = WalConfig()
    raft_config = RaftConfig(node_id=1, storage=MemoryStorage(CONF), rng=random.Random(1))
    assert config.record_bytes_max > raft_config.entry_bytes_max + 64
    assert config.snapshot_bytes_max >= raft_config.snapshot_bytes_max
    with Wal.open(tmp_path, CONF) as wal:
        big = Entry(term=2, index=2, data=b"x" * raft_config.entry_bytes_max)
        wal.append([big, *entries(3, 4, 2)])
        wal.sync()
        assert wal.config == config
    with Wal.open(tmp_path) as wal:
        assert wal.entries(2, 5, 2**40) == [big, *entries(3, 4, 2)]
        assert wal.stats.disk_reads == 0  # the cache holds what replay read


def test_a_record_larger_than_one_read_is_still_read_whole(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, read_bytes_max=16, cache_bytes_max=0)
    with Wal.open(tmp_path, CONF, config=config) as wal:
        wal.append(entries(2, 5, 2, size=100))
        wal.sync()
        assert wal.entries(2, 6, 2**40) == entries(2, 5, 2, size=100)
        assert wal.stats.disk_reads == 4


@pytest.mark.parametrize(
    "limits",
    [
        {"record_bytes_max": 10},
        {"segment_bytes_max": 300, "record_bytes_max": 256},
        {"read_bytes_max": 0},
        {"cache_bytes_max": -1},
        {"snapshot_bytes_max": 0},
    ],
)
def test_limits_are_checked_at_construction(limits: dict[str, int]) -> None:
    with pytest.raises(AssertionError):
        dataclasses.replace(SMALL, **limits)  # type: ignore[arg-type]


def test_an_entry_larger_than_a_record_is_refused_before_anything_changes(
    tmp_path: Path,
) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        wal.append(entries(2, 3, 2))
        with pytest.raises(AssertionError, match="record_bytes_max"):
            wal.append([*entries(4, 4, 2), Entry(term=2, index=5, data=b"x" * 300)])
        assert wal.last_index() == 3


def test_records_round_trip_and_damage_is_never_an_exception() -> None:
    record = encode_record(HardState(term=3, vote=2, commit=9), batch=4)
    parsed = read_record(memoryview(record), 0, 1024)
    assert parsed is not None
    assert (parsed.batch, parsed.length, bytes(parsed.body)) == (
        4,
        len(record),
        record[HEADER_BYTES:],
    )
    assert read_record(memoryview(record), 0, len(record) - 1) is None  # over the limit
    records, end = scan(memoryview(record + record[:-1]), 0, 1024)
    assert (len(records), end) == (1, len(record))


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200))
def test_reading_arbitrary_bytes_never_raises(data: bytes, offset: int) -> None:
    view = memoryview(data)
    record = read_record(view, min(offset, len(data)), 1024)
    assert record is None or record.offset + record.length <= len(data)
    scan(view, 0, 1024)


def test_storage_reads_no_clock_and_no_global_random() -> None:
    """Nothing in storage/ imports time, datetime or random: no clock, no global RNG."""
    forbidden = {"time", "datetime", "random"}
    for path in sorted((Path(__file__).resolve().parents[3] / "storage").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
