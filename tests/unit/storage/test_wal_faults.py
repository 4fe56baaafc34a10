"""Disk faults through FaultyFiles: a failed fsync or write, a full disk, a failed rename
raise a typed error, the log then refuses further use, and reopening it from the real
files gives a consistent state: the one at the last sync, or that plus some whole records
of the failed one."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from raft import HardState, MemoryStorage
from storage import DiskError, DiskFull, FaultyFiles, Wal, WalFailed
from storage._files import Operation
from tests.unit.storage.helpers import CONF, SMALL, entries, records_of, segment_paths, state_of

Step = Callable[[MemoryStorage | Wal], object]


def _synced_log(directory: Path, files: FaultyFiles) -> tuple[Wal, MemoryStorage]:
    model = MemoryStorage(CONF)
    wal = Wal.open(directory, CONF, config=SMALL, files=files)
    for storage in (model, wal):
        storage.append(entries(2, 6, 2))
        storage.set_hard_state(HardState(term=2, vote=1, commit=6))
    wal.sync()
    return wal, model


def _failing_batch(wal: Wal, model: MemoryStorage, steps: list[Step]) -> list[tuple[object, ...]]:
    """Apply `steps` to both; the model's state before and after each step."""
    states = [state_of(model)]
    for step in steps:
        step(model)
        step(wal)
        states.append(state_of(model))
    return states


STEPS: list[Step] = [
    lambda storage: storage.append(entries(7, 7, 3, size=30)),
    lambda storage: storage.append(entries(8, 8, 3, size=30)),
    lambda storage: storage.set_hard_state(HardState(term=3, vote=2, commit=8)),
]


def _assert_refuses_everything(wal: Wal) -> None:
    with pytest.raises(WalFailed):
        wal.append(entries(9, 9, 3))
    with pytest.raises(WalFailed):
        wal.sync()
    with pytest.raises(WalFailed):
        wal.term(2)
    wal.close()
    wal.close()


def test_a_failed_fsync_is_a_disk_error_and_reopen_is_consistent(tmp_path: Path) -> None:
    files = FaultyFiles()
    wal, model = _synced_log(tmp_path, files)
    states = _failing_batch(wal, model, STEPS)
    files.arm("fsync", errno.EIO)
    with pytest.raises(DiskError, match="fsync of .*segment-0000000001.wal failed") as failure:
        wal.sync()
    assert not isinstance(failure.value, DiskFull)
    assert failure.value.errno == errno.EIO
    assert files.injected["fsync"] == 1
    _assert_refuses_everything(wal)
    with Wal.open(tmp_path, config=SMALL) as reopened:
        # The bytes reached the page cache before the fsync failed.
        assert state_of(reopened) in (states[0], states[-1])


@pytest.mark.parametrize("written_bytes", [0, 1, 19, 20, 40, 80, 200])
def test_a_full_disk_mid_write_keeps_a_prefix_of_whole_records(
    tmp_path: Path, written_bytes: int
) -> None:
    files = FaultyFiles()
    wal, model = _synced_log(tmp_path, files)
    size_before = segment_paths(tmp_path)[-1].stat().st_size
    states = _failing_batch(wal, model, STEPS)
    batch_bytes = wal.unsynced_bytes
    files.arm("write", errno.ENOSPC, written_bytes=written_bytes)
    with pytest.raises(DiskFull, match="No space left"):
        wal.sync()
    _assert_refuses_everything(wal)
    landed = segment_paths(tmp_path)[-1].stat().st_size - size_before
    assert landed == min(written_bytes, batch_bytes)
    with Wal.open(tmp_path, config=SMALL) as reopened:
        state = state_of(reopened)
        assert state in states
        whole_records = sum(
            1 for record in records_of(segment_paths(tmp_path)[-1]) if record.offset >= size_before
        )
        assert state == states[whole_records]
        assert reopened.recovery.torn_bytes == landed - sum(
            record.length
            for record in records_of(segment_paths(tmp_path)[-1])
            if record.offset >= size_before
        )


@pytest.mark.parametrize("operation", ["fsync_directory", "open", "write", "fsync"])
def test_a_fault_while_rolling_to_a_new_segment(tmp_path: Path, operation: Operation) -> None:
    files = FaultyFiles()
    model = MemoryStorage(CONF)
    wal = Wal.open(tmp_path, CONF, config=SMALL, files=files)
    index = 2
    while wal.stats.segments_created == 1:
        states = [state_of(model)]
        for entry in entries(index, index + 2, 2, size=60):
            model.append([entry])
            wal.append([entry])
            states.append(state_of(model))  # the batch may split between segments
        if wal.unsynced_bytes + segment_paths(tmp_path)[-1].stat().st_size > 1024:
            # This sync rolls over: fail in the new segment.
            skip = 1 if operation in ("write", "fsync") else 0
            files.arm(operation, errno.EIO, skip=skip)
            with pytest.raises(DiskError):
                wal.sync()
            break
        wal.sync()
        index += 3
    else:
        raise AssertionError("never rolled over")
    wal.close()
    with Wal.open(tmp_path, config=SMALL) as reopened:
        assert state_of(reopened) in states


def test_a_failed_snapshot_rename_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    files = FaultyFiles()
    wal, model = _synced_log(tmp_path, files)
    before = state_of(model)
    wal.create_snapshot(5, CONF, b"image")
    files.arm("rename", errno.EIO)
    with pytest.raises(DiskError, match="rename"):
        wal.sync()
    wal.close()
    with Wal.open(tmp_path, config=SMALL) as reopened:
        assert state_of(reopened) == before
        assert any(name.endswith(".snap.tmp") for name in reopened.recovery.removed_files)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_full_disk_while_creating_the_log_leaves_nothing_half_made(tmp_path: Path) -> None:
    files = FaultyFiles()
    files.arm("write", errno.ENOSPC, skip=1, written_bytes=7)  # the first segment's checkpoint
    with pytest.raises(DiskFull):
        Wal.open(tmp_path, CONF, config=SMALL, files=files)
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        assert state_of(wal) == state_of(MemoryStorage(CONF))
        assert wal.recovery.created


def test_a_failed_fsync_while_cutting_a_torn_tail_fails_the_open(tmp_path: Path) -> None:
    _synced_log(tmp_path, FaultyFiles())[0].close()
    segment = segment_paths(tmp_path)[-1]
    with segment.open("ab") as file:
        file.write(b"\xc5\xd7 torn")
    files = FaultyFiles()
    files.arm("fsync", errno.EIO)
    with pytest.raises(DiskError, match="fsync"):
        Wal.open(tmp_path, config=SMALL, files=files)
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.last_index() == 6


def test_fault_injection_is_off_until_armed_and_counts_calls(tmp_path: Path) -> None:
    files = FaultyFiles()
    wal, _ = _synced_log(tmp_path, files)
    with wal:
        assert sum(files.injected.values()) == 0
        assert files.calls["fsync"] >= 2 and files.calls["write"] >= 2
        files.arm("write", errno.EIO, times=2)
        files.disarm()
        wal.append(entries(7, 7, 2))
        wal.sync()
        assert sum(files.injected.values()) == 0
