"""Recovery's decisions, without IO: from the bytes of the segment files to the log's state.

`replay_segments` reads each segment through a callback, checks every record, decides
whether damage is a torn tail (cut it) or corruption (refuse), and replays the records into
a `Replay`: hard state, current snapshot id, log index, and what must be repaired on disk.
It changes nothing itself; the Wal applies the repairs only once the whole log checked out.

Rules (see `_records` for why batches make them sound):
- Damage in any segment but the last is corruption: a segment is fsynced whole before the
  next one is created, so only the last can hold an unfinished write.
- Damage in the last segment is a torn tail, unless a valid record two or more batches
  newer than the last whole record follows it; then synced records were damaged.
- A last segment without a valid checkpoint was being created at the crash: drop it.
- Segments before a gap in the numbering are leftovers of a compaction whose unlinks did
  not all reach the disk; replay starts after the gap, and the Wal refuses if that lost a
  live entry (`LogIndex.first_missing`).
- Every checkpoint after the first must agree with the state replayed so far.

Invariant: a returned `Replay` is the state after some prefix of the records ever written,
including every record of every completed sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from raft.types import Entry, HardState
from storage._errors import CorruptLog
from storage._index import LogIndex
from storage._records import (
    FORMAT_VERSION,
    Body,
    Checkpoint,
    CompactMarker,
    RawRecord,
    SnapshotMarker,
    decode_body,
    find_newer_record,
    scan,
    segment_file_name,
)

EntrySeen = Callable[[int, RawRecord, Entry], None]
"""Called with (segment, record, entry) for each entry replayed, e.g. to warm a cache."""


@dataclass
class Replay:
    """What replaying the segments found, before anything on disk is changed."""

    hard_state: HardState
    snapshot_id: tuple[int, int]
    """(index, term) of the current snapshot; (0, 0) for none."""
    index: LogIndex
    segment_sizes: dict[int, int] = field(default_factory=dict)
    """Segments replayed, oldest first, with the bytes of whole records in each."""
    batch_max: int = 0
    records: int = 0
    active_records: int = 0
    """Records in the last segment, its checkpoint included."""
    torn: tuple[int, int, int] | None = None
    """(segment, offset, bytes) to cut off the last segment."""
    empty_last: int | None = None
    """A last segment with no valid checkpoint, to delete."""
    stale: tuple[int, ...] = ()
    """Segments before a gap, to delete."""


def replay_segments(
    segments: list[int],
    read_segment: Callable[[int], bytes],
    record_bytes_max: int,
    entry_seen: EntrySeen,
) -> Replay | None:
    """Check and replay the segments numbered `segments` (ascending); raise CorruptLog.

    None when the only segment holds no valid checkpoint: the log was never created."""
    run_start = len(segments) - 1
    while run_start > 0 and segments[run_start - 1] == segments[run_start] - 1:
        run_start -= 1
    run = segments[run_start:]
    replay: Replay | None = None
    previous_batch = 0
    for position, number in enumerate(run):
        is_last = position == len(run) - 1
        data = read_segment(number)
        records, end = scan(memoryview(data), 0, record_bytes_max)
        name = segment_file_name(number)
        if end < len(data):
            _check_torn(name, data, end, is_last, records, previous_batch, record_bytes_max)
        if not records:
            if not is_last:
                raise CorruptLog(f"{name} holds no records but is not the last segment")
            if replay is not None:
                replay.empty_last = number
                break
            if run_start > 0:
                raise CorruptLog(f"{name} holds no records, and older segments precede it")
            return None
        replay = _replay_segment(number, records, replay, entry_seen)
        replay.segment_sizes[number] = end
        if end < len(data):
            replay.torn = (number, end, len(data) - end)
        previous_batch = records[-1].batch
    assert replay is not None
    replay.stale = tuple(segments[:run_start])
    return replay


def _check_torn(
    name: str,
    data: bytes,
    end: int,
    is_last: bool,
    records: list[RawRecord],
    previous_batch: int,
    record_bytes_max: int,
) -> None:
    """Raise CorruptLog unless the damaged record at `end` can be a torn write."""
    where = f"{name} is damaged at byte {end} of {len(data)}"
    if not is_last:
        raise CorruptLog(f"{where}, and it is not the last segment: synced records are lost")
    last_batch = records[-1].batch if records else previous_batch
    newer = find_newer_record(data, end + 1, last_batch + 2, record_bytes_max)
    if newer is not None:
        raise CorruptLog(
            f"{where}, but a record of batch {newer.batch} follows at byte {newer.offset} "
            f"(the last whole record before the damage is of batch {last_batch}): synced "
            "records are damaged, this is not a torn write"
        )


def _replay_segment(
    number: int, records: list[RawRecord], replay: Replay | None, entry_seen: EntrySeen
) -> Replay:
    name = segment_file_name(number)
    checkpoint = _decode(name, records[0])
    if not isinstance(checkpoint, Checkpoint) or checkpoint.segment != number:
        raise CorruptLog(f"{name} does not start with its own checkpoint")
    if checkpoint.version != FORMAT_VERSION:
        raise CorruptLog(f"{name} has format version {checkpoint.version}")
    if replay is None:
        index = LogIndex(checkpoint.compact_index, checkpoint.compact_term)
        index.add_missing(checkpoint.last_index)
        replay = Replay(
            hard_state=checkpoint.hard_state,
            snapshot_id=(checkpoint.snapshot_index, checkpoint.snapshot_term),
            index=index,
        )
    else:
        _check_checkpoint(name, checkpoint, replay)
    for record in records[1:]:
        body = _decode(name, record)
        try:
            _replay_record(body, record, number, replay, entry_seen)
        except ValueError as error:
            raise CorruptLog(f"{name} at byte {record.offset}: {error}") from None
    replay.records += len(records)
    replay.active_records = len(records)
    replay.batch_max = max(replay.batch_max, records[-1].batch)
    return replay


def _check_checkpoint(name: str, checkpoint: Checkpoint, replay: Replay) -> None:
    index = replay.index
    found = (
        checkpoint.hard_state,
        (checkpoint.snapshot_index, checkpoint.snapshot_term),
        (checkpoint.compact_index, checkpoint.compact_term, checkpoint.last_index),
    )
    expected = (
        replay.hard_state,
        replay.snapshot_id,
        (index.offset, index.sentinel_term(), index.last_index()),
    )
    if found != expected:
        raise CorruptLog(f"{name}'s checkpoint {found} disagrees with the replay {expected}")


def _replay_record(
    body: Body, raw: RawRecord, segment: int, replay: Replay, entry_seen: EntrySeen
) -> None:
    """Apply one record as the writer did; ValueError if it cannot follow the state."""
    index = replay.index
    if isinstance(body, Entry):
        if body.term <= 0:
            raise ValueError(f"entry {body.index} has term {body.term}")
        index.append(body.index, body.term, segment, raw.offset, raw.length)
        entry_seen(segment, raw, body)
    elif isinstance(body, HardState):
        replay.hard_state = body
    elif isinstance(body, SnapshotMarker):
        _replay_snapshot_marker(body, replay)
    elif isinstance(body, CompactMarker):
        if body.index <= index.offset:
            raise ValueError(f"compaction to {body.index} but already at {index.offset}")
        index.compact(body.index, body.term)
    else:
        raise ValueError("a checkpoint in the middle of a segment")


def _replay_snapshot_marker(marker: SnapshotMarker, replay: Replay) -> None:
    index = replay.index
    if marker.index <= replay.snapshot_id[0]:
        raise ValueError(f"snapshot {marker.index} is not newer than {replay.snapshot_id}")
    if marker.installed:
        index.reset(marker.index, marker.term)
    elif not index.offset <= marker.index <= index.last_index():
        raise ValueError(f"snapshot at {marker.index} of an entry not in the log")
    elif not index.is_missing(marker.index) and index.term(marker.index) != marker.term:
        raise ValueError(f"snapshot at {marker.index} has the wrong term {marker.term}")
    replay.snapshot_id = (marker.index, marker.term)


def _decode(name: str, raw: RawRecord) -> Body:
    try:
        return decode_body(raw.record_type, raw.body)
    except ValueError as error:
        raise CorruptLog(f"{name} at byte {raw.offset}: {error}") from None
