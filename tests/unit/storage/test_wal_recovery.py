"""Recovery: a torn tail (the last sync cut short, or its bytes damaged) is cut back to the
last whole record without losing a synced one; damage anywhere else, or a missing file, is
a CorruptLog instead of a silently shorter log; leftovers are cleaned up."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from raft import HardState, MemoryStorage
from storage import CorruptLog, Wal, WalConfig
from tests.unit.storage.helpers import (
    CONF,
    SMALL,
    entries,
    flip_byte,
    records_of,
    segment_paths,
    state_of,
)

ONE_SEGMENT = WalConfig(
    segment_bytes_max=64 * 1024, record_bytes_max=1024, read_bytes_max=4096, cache_bytes_max=0
)
"""Everything in one segment, and every read from disk."""
REOPEN_FAST = dataclasses.replace(ONE_SEGMENT, fsync=False)
"""For loops of hundreds of reopens: recovery decides the same with or without fsync (the
other tests here keep it on), and fsync on a shared disk would make them slow."""


def _both(
    model: MemoryStorage, wal: Wal, operation: Callable[[MemoryStorage | Wal], object]
) -> None:
    operation(model)
    operation(wal)


def _build_with_last_batch(directory: Path) -> tuple[list[tuple[object, ...]], int, int]:
    """A synced log whose last sync wrote three records: entry 11, entry 12, a hard state.

    Returns the states after each whole record of that batch (0 to 3 of them), and the byte
    range of the batch in the only segment."""
    model = MemoryStorage(CONF)
    with Wal.open(directory, CONF, config=ONE_SEGMENT) as wal:
        for first, last in ((2, 4), (5, 7), (8, 10)):
            for storage in (model, wal):
                storage.append(entries(first, last, 2))
                storage.set_hard_state(HardState(term=2, vote=1, commit=last))
            wal.sync()
        states = [state_of(model)]
        operations: list[Callable[[MemoryStorage | Wal], object]] = [
            lambda storage: storage.append(entries(11, 11, 3, size=40)),
            lambda storage: storage.append(entries(12, 12, 3, size=40)),
            lambda storage: storage.set_hard_state(HardState(term=3, vote=2, commit=12)),
        ]
        for operation in operations:
            _both(model, wal, operation)
            states.append(state_of(model))
        wal.sync()
    (segment,) = segment_paths(directory)
    records = records_of(segment, ONE_SEGMENT.record_bytes_max)
    last_batch = [record for record in records if record.batch == records[-1].batch]
    assert len(last_batch) == 3
    return states, last_batch[0].offset, segment.stat().st_size


def _whole_records_before(offset: int, segment: Path) -> int:
    """How many records of the last batch end at or before `offset`."""
    records = records_of(segment, ONE_SEGMENT.record_bytes_max)
    last_batch = [record for record in records if record.batch == records[-1].batch]
    return sum(1 for record in last_batch if record.offset + record.length <= offset)


def test_cutting_the_last_batch_at_every_byte_keeps_every_whole_record(tmp_path: Path) -> None:
    states, batch_start, end = _build_with_last_batch(tmp_path)
    (segment,) = segment_paths(tmp_path)
    whole = segment.read_bytes()
    boundaries = [_whole_records_before(cut, segment) for cut in range(batch_start, end + 1)]
    for cut in range(batch_start, end + 1):
        segment.write_bytes(whole[:cut])
        with Wal.open(tmp_path, config=REOPEN_FAST) as wal:
            assert state_of(wal) == states[boundaries[cut - batch_start]], cut
            recovery = wal.recovery
        kept = segment.stat().st_size
        assert recovery.torn_bytes == cut - kept, cut
        assert recovery.torn_segment == (segment.name if cut != kept else None)
    assert boundaries[0] == 0 and boundaries[-1] == 3


def test_damaging_any_byte_of_the_last_batch_cuts_from_the_damaged_record(
    tmp_path: Path,
) -> None:
    states, batch_start, end = _build_with_last_batch(tmp_path)
    (segment,) = segment_paths(tmp_path)
    whole = segment.read_bytes()
    records = records_of(segment, ONE_SEGMENT.record_bytes_max)
    last_batch = [record for record in records if record.batch == records[-1].batch]
    for offset in range(batch_start, end):
        segment.write_bytes(whole)
        flip_byte(segment, offset)
        damaged = next(
            position
            for position, record in enumerate(last_batch)
            if record.offset <= offset < record.offset + record.length
        )
        with Wal.open(tmp_path, config=REOPEN_FAST) as wal:
            assert state_of(wal) == states[damaged], offset
            assert wal.recovery.torn_offset == last_batch[damaged].offset
            assert wal.recovery.torn_bytes == end - last_batch[damaged].offset


def test_a_torn_tail_is_logged_and_the_log_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    states, batch_start, _ = _build_with_last_batch(tmp_path)
    (segment,) = segment_paths(tmp_path)
    segment.write_bytes(segment.read_bytes()[: batch_start + 5])
    with caplog.at_level(logging.WARNING, logger="dcluster.storage.wal"):
        wal = Wal.open(tmp_path, config=ONE_SEGMENT)
    assert "cut 5 bytes of a torn write" in caplog.text
    with wal:
        assert state_of(wal) == states[0]
        wal.append(entries(11, 11, 4))
        wal.sync()
    with Wal.open(tmp_path, config=ONE_SEGMENT) as wal:
        assert wal.last_index() == 11 and wal.term(11) == 4
        assert wal.recovery.torn_bytes == 0


def test_a_new_segment_torn_in_its_checkpoint_is_removed(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        index = 2
        while len(segment_paths(tmp_path)) < 2:
            wal.append(entries(index, index, 2, size=60))
            wal.sync()
            index += 1
        last_two = state_of(wal)
    newest = segment_paths(tmp_path)[-1]
    records = records_of(newest)
    # Leave only half of the new segment's checkpoint: the state of the sync before.
    newest.write_bytes(newest.read_bytes()[: records[0].length // 2])
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.recovery.removed_files == (newest.name,)
        assert not newest.exists()
        assert wal.last_index() == last_two[3] - 1  # type: ignore[operator]
        wal.append(entries(wal.last_index() + 1, wal.last_index() + 3, 3, size=60))
        wal.sync()
        expected = state_of(wal)
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == expected


def _multi_segment_log(directory: Path, count: int = 40) -> tuple[object, ...]:
    with Wal.open(directory, CONF, config=SMALL) as wal:
        for index in range(2, count + 2):
            wal.append(entries(index, index, 2, size=40))
            wal.set_hard_state(HardState(term=2, vote=1, commit=index))
            wal.sync()
        assert len(segment_paths(directory)) >= 3
        return state_of(wal)


def test_damage_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    _multi_segment_log(tmp_path)
    first = segment_paths(tmp_path)[0]
    records = records_of(first)
    flip_byte(first, records[2].offset + records[2].length - 1)
    with pytest.raises(CorruptLog, match="not the last segment"):
        Wal.open(tmp_path, config=SMALL)


def test_damage_to_an_older_checkpoint_is_corruption(tmp_path: Path) -> None:
    _multi_segment_log(tmp_path)
    flip_byte(segment_paths(tmp_path)[1], 3)
    with pytest.raises(CorruptLog, match="not the last segment"):
        Wal.open(tmp_path, config=SMALL)


def test_damage_followed_by_newer_batches_in_the_last_segment_is_corruption(
    tmp_path: Path,
) -> None:
    _build_with_last_batch(tmp_path)
    (segment,) = segment_paths(tmp_path)
    records = records_of(segment, ONE_SEGMENT.record_bytes_max)
    # A record of an early batch: two or more newer batches follow it.
    early = next(record for record in records if record.batch == 2)
    flip_byte(segment, early.offset + early.length - 2)
    with pytest.raises(CorruptLog, match="not a torn write"):
        Wal.open(tmp_path, config=ONE_SEGMENT)
    # The log was not changed by the refusal.
    flip_byte(segment, early.offset + early.length - 2)
    with Wal.open(tmp_path, config=ONE_SEGMENT) as wal:
        assert wal.last_index() == 12


def test_damaged_first_checkpoint_before_newer_batches_is_corruption(tmp_path: Path) -> None:
    _build_with_last_batch(tmp_path)
    (segment,) = segment_paths(tmp_path)
    flip_byte(segment, 0)
    with pytest.raises(CorruptLog, match="not a torn write"):
        Wal.open(tmp_path, config=ONE_SEGMENT)


def test_a_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    _multi_segment_log(tmp_path)
    segment_paths(tmp_path)[1].unlink()
    with pytest.raises(CorruptLog, match="in no segment on disk"):
        Wal.open(tmp_path, config=SMALL)


def test_a_missing_or_damaged_snapshot_file_is_corruption(tmp_path: Path) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        wal.append(entries(2, 9, 2))
        wal.create_snapshot(6, CONF, b"image")
        wal.sync()
    (snapshot_file,) = tmp_path.glob("snapshot-*.snap")
    whole = snapshot_file.read_bytes()
    flip_byte(snapshot_file, len(whole) - 1)
    with pytest.raises(CorruptLog, match="damaged: CRC mismatch"):
        Wal.open(tmp_path, config=SMALL)
    snapshot_file.unlink()
    with pytest.raises(CorruptLog, match="is missing"):
        Wal.open(tmp_path, config=SMALL)
    snapshot_file.write_bytes(whole)
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert wal.snapshot().data == b"image"


def test_compacted_segments_that_come_back_are_leftovers_not_corruption(
    tmp_path: Path,
) -> None:
    _multi_segment_log(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    for path in segment_paths(tmp_path):
        shutil.copy(path, saved / path.name)
    with Wal.open(tmp_path, config=SMALL) as wal:
        wal.create_snapshot(35, CONF, b"image")
        wal.compact(35)
        wal.sync()
        expected = state_of(wal)
        live = [path.name for path in segment_paths(tmp_path)]
    retired = sorted(path.name for path in saved.iterdir() if path.name not in live)
    assert len(retired) >= 2
    # Only the oldest comes back (its unlink was lost, the others' were not): a gap.
    shutil.copy(saved / retired[0], tmp_path / retired[0])
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == expected
        assert wal.recovery.removed_files == (retired[0],)
    # All of them come back: replay starts at the oldest and gets the same state.
    for name in retired:
        shutil.copy(saved / name, tmp_path / name)
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == expected
        wal.append(entries(wal.last_index() + 1, wal.last_index() + 1, 3))
        wal.sync()
        assert [path.name for path in segment_paths(tmp_path)] == live


def test_leftover_temporary_and_unreferenced_snapshot_files_are_removed(
    tmp_path: Path,
) -> None:
    with Wal.open(tmp_path, CONF, config=SMALL) as wal:
        wal.append(entries(2, 5, 2))
        wal.sync()
        expected = state_of(wal)
    stray = [
        "snapshot-00000000000000000004-00000000000000000002.snap",
        "snapshot-00000000000000000004-00000000000000000002.snap.tmp",
    ]
    for name in stray:
        (tmp_path / name).write_bytes(b"written before a crash")
    with Wal.open(tmp_path, config=SMALL) as wal:
        assert state_of(wal) == expected
        assert sorted(wal.recovery.removed_files) == sorted(stray)
    assert not any((tmp_path / name).exists() for name in stray)
