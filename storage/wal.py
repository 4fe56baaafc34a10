"""The durable Raft log: a write-ahead log in segment files that implements `LogStorage`.

The caller's loop uses it exactly like `raft.MemoryStorage` — `apply_snapshot`, `append`,
`set_hard_state` for a whole `Ready`, `create_snapshot` and `compact` after applying — and
then calls `sync()` once (group commit). Nothing is promised durable before `sync()`
returns; the write methods only change memory and encode records into a buffer, and
`sync()` writes the buffer and fsyncs once (plus the directory when it created a file).

On disk, in one directory of its own (see `_records` and `_snapshots` for the formats):

- `segment-NNNNNNNNNN.wal`: records — entries, hard states, snapshot markers, compactions.
  Each segment starts with a checkpoint of the whole state but the entries, so a segment
  whose entries are all compacted can be deleted. A new segment starts once the current one
  would pass `segment_bytes_max`.
- `snapshot-<index>-<term>.snap`: the current snapshot (older ones are deleted once a newer
  one's marker is synced). A snapshot file is written before the log records naming it.
- `LOCK`: held (flock) while a process has the log open.

Key invariant: after `open`, the in-memory state equals the state the log had after some
prefix of the records written — everything synced, possibly plus some unsynced records —
and every record of it passed its CRC. Damage in the newest batch of the last segment is a
torn write and is cut off; damage anywhere else means synced data is gone, and `open`
refuses with `CorruptLog` rather than start silently wrong (the rules are in `_replay`).

An IO error (a failed write or fsync, a full disk) raises `DiskError` / `DiskFull`; after it
the log refuses everything but `close()` (`WalFailed`), because after a failed fsync the
page cache can no longer be trusted. The process is expected to exit; reopening recovers
from what reached the disk.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from raft.storage import BOOTSTRAP_INDEX, bootstrap_snapshot, entry_size
from raft.types import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
)
from storage._errors import CorruptLog, DiskError, DiskFull, WalError, WalFailed, WalLocked
from storage._files import Files, OsFiles
from storage._index import LogIndex
from storage._records import (
    FORMAT_VERSION,
    HEADER_BYTES,
    Body,
    Checkpoint,
    CompactMarker,
    RawRecord,
    RecordType,
    SnapshotMarker,
    decode_body,
    encode_record,
    parse_segment_file_name,
    read_record,
    segment_file_name,
)
from storage._replay import Replay, replay_segments
from storage._snapshots import (
    decode_snapshot,
    encode_snapshot,
    parse_snapshot_file_name,
    snapshot_file_name,
)

log = logging.getLogger("dcluster.storage.wal")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

LOCK_FILE_NAME = "LOCK"
TEMPORARY_SUFFIX = ".tmp"


# ---- configuration and reports -------------------------------------------------------


@dataclass(frozen=True)
class WalConfig:
    segment_bytes_max: int = 64 * MIB
    """A new segment starts before a record that would take the current one past this."""
    record_bytes_max: int = 8 * MIB
    """One framed record (header + body). Larger than Raft's `entry_bytes_max` plus a few
    bytes of encoding, so every entry Raft accepts fits."""
    cache_bytes_max: int = 32 * MIB
    """Decoded entries kept in memory (by `raft.storage.entry_size`); misses read disk."""
    read_bytes_max: int = 1 * MIB
    """The most one disk read fetches when serving `entries()`: whole records, and always
    at least one (a record larger than this is read alone)."""
    snapshot_bytes_max: int = 8 * GIB
    """Encoded size of one snapshot file; matches Raft's `snapshot_bytes_max`."""
    fsync: bool = True
    """False is BENCHMARK MODE ONLY: nothing is fsynced, so a machine crash or power loss
    loses acknowledged writes and can break Raft's safety. `open` logs a warning."""

    def __post_init__(self) -> None:
        assert self.record_bytes_max > HEADER_BYTES, self.record_bytes_max
        assert self.record_bytes_max < 2**32, "body length is a u32"
        assert self.segment_bytes_max >= 2 * self.record_bytes_max, (
            f"segment_bytes_max {self.segment_bytes_max} must hold a checkpoint and the "
            f"largest record ({self.record_bytes_max})"
        )
        assert self.cache_bytes_max >= 0, self.cache_bytes_max
        assert self.read_bytes_max > 0, self.read_bytes_max
        assert self.snapshot_bytes_max > 0, self.snapshot_bytes_max


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass
class WalStats:
    syncs: int = 0
    """`sync()` calls that wrote something (each is one group commit)."""
    fsyncs: int = 0
    """fsync calls issued, of files and of the directory."""
    bytes_written: int = 0
    records_written: int = 0
    segments_created: int = 0
    segments_deleted: int = 0
    snapshots_written: int = 0
    cache_hits: int = 0
    disk_reads: int = 0


@dataclass(frozen=True)
class Recovery:
    """What `open` found and repaired."""

    created: bool
    """True when the directory held no log and a new one was written."""
    segments: int = 0
    records: int = 0
    torn_segment: str | None = None
    torn_offset: int = 0
    """Where the cut was made in `torn_segment`."""
    torn_bytes: int = 0
    """Bytes cut off the end: records of the last, unfinished sync."""
    removed_files: tuple[str, ...] = ()
    """Files deleted as leftovers: an empty new segment, temporary files, unused snapshots,
    segments from before a gap that compaction had already retired."""


# ---- internal bookkeeping -----------------------------------------------------------------


@dataclass
class _Segment:
    number: int
    path: str
    fd: int
    size: int
    """Bytes written to the file (synced unless a pending chunk of this segment exists)."""


@dataclass
class _Chunk:
    """Records waiting for `sync()` that land in segment `segment` from byte `start` on."""

    segment: int
    start: int
    new_file: bool
    data: bytearray = field(default_factory=bytearray)


# ---- the log --------------------------------------------------------------------------------


class Wal:
    """A durable `LogStorage`. Use `Wal.open(directory, conf)`; one process at a time."""

    def __init__(self, directory: str, config: WalConfig, files: Files) -> None:
        """Internal: see `Wal.open`."""
        self.directory = directory
        self.config = config
        self.files = files
        self.stats = WalStats()
        self.recovery = Recovery(created=False)
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._index = LogIndex(0, 0)
        self._segments: dict[int, _Segment] = {}
        self._chunks: list[_Chunk] = []
        self._active_records = 0
        """Records in the newest segment, its checkpoint included."""
        self._pending_snapshots: list[Snapshot] = []
        self._snapshot_files: set[str] = set()
        self._batch = 1
        """The number the next `sync()` writes its records under."""
        self._cache: OrderedDict[tuple[int, int], Entry] = OrderedDict()
        self._cache_bytes = 0
        self._failed: WalError | None = None
        self._closed = False
        self._lock_fd: int | None = None

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        conf: ConfState | None = None,
        *,
        config: WalConfig | None = None,
        files: Files | None = None,
    ) -> Wal:
        """Open the log in `directory`, recovering it, or create it there.

        A new log starts like `MemoryStorage(conf)`: with `conf` a founding member (the
        bootstrap snapshot), without it a joiner (empty). An existing log ignores `conf`.
        Raises CorruptLog, DiskError, WalLocked."""
        wal = cls(os.fspath(directory), config or WalConfig(), files or OsFiles())
        if not wal.config.fsync:
            log.warning(
                "WAL %s: fsync is OFF (benchmark mode): a machine crash loses acked writes",
                wal.directory,
            )
        try:
            wal._open(conf)
        except BaseException:
            wal.close()
            raise
        return wal

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the files. Unsynced changes are dropped, as in a crash: `sync()` first."""
        if self._closed:
            return
        self._closed = True
        pending = sum(len(chunk.data) for chunk in self._chunks)
        if pending and self._failed is None:
            log.debug("WAL %s: closing with %d unsynced bytes dropped", self.directory, pending)
        for segment in self._segments.values():
            self.files.close(segment.fd)
        self._segments.clear()
        self._chunks.clear()
        self._cache.clear()
        if self._lock_fd is not None:
            self.files.close(self._lock_fd)
            self._lock_fd = None

    # ---- read side (LogStorage) ----

    def initial_state(self) -> tuple[HardState, ConfState]:
        self._check_usable()
        return self._hard_state, self._snapshot.meta.conf

    def hard_state(self) -> HardState:
        self._check_usable()
        return self._hard_state

    def snapshot(self) -> Snapshot:
        self._check_usable()
        return self._snapshot

    def first_index(self) -> int:
        return self._index.first_index()

    def last_index(self) -> int:
        return self._index.last_index()

    def term(self, index: int) -> int:
        self._check_usable()
        if index < self._index.offset:
            raise CompactedError(f"index {index} is compacted (snapshot at {self._index.offset})")
        if index > self._index.last_index():
            raise UnavailableError(f"index {index} is beyond last index {self.last_index()}")
        return self._index.term(index)

    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Entries in [low, high); at least one if any, then at most `max_bytes` of data."""
        self._check_usable()
        if low <= self._index.offset:
            raise CompactedError(f"index {low} is compacted (snapshot at {self._index.offset})")
        if high > self.last_index() + 1:
            raise UnavailableError(f"index {high - 1} is beyond last index {self.last_index()}")
        assert low <= high, (low, high)
        result: list[Entry] = []
        total_bytes = 0
        index = low
        while index < high:
            for entry in self._read_run(index, high):
                size = entry_size(entry)
                if result and total_bytes + size > max_bytes:
                    return result
                total_bytes += size
                result.append(entry)
            index = low + len(result)
        return result

    # ---- write side (the caller's loop); durable only after sync() ----

    def set_hard_state(self, hard_state: HardState) -> None:
        self._check_usable()
        self._enqueue(hard_state)
        self._hard_state = hard_state

    def append(self, entries: Sequence[Entry]) -> None:
        """Append `entries`, first truncating any stored suffix they overwrite."""
        self._check_usable()
        if not entries:
            return
        first = self.first_index()
        if entries[-1].index < first:
            return  # wholly compacted already
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        assert entries[0].index <= self.last_index() + 1, (
            f"gap: appending at {entries[0].index}, last is {self.last_index()}"
        )
        records = [encode_record(entry, self._batch) for entry in entries]
        for position, (entry, record) in enumerate(zip(entries, records, strict=True)):
            assert entry.index == entries[0].index + position, "entries must be contiguous"
            assert entry.term > 0, entry
            assert len(record) <= self.config.record_bytes_max, (
                f"entry {entry.index} of {len(entry.data)} bytes exceeds record_bytes_max "
                f"{self.config.record_bytes_max}; configure Raft's entry_bytes_max below it"
            )
        for entry, record in zip(entries, records, strict=True):
            segment, offset = self._enqueue_encoded(record)
            self._index.append(entry.index, entry.term, segment, offset, len(record))
            self._cache_put((segment, offset), entry)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot` (a newer one than we hold)."""
        self._check_usable()
        meta = snapshot.meta
        if meta.index <= self._snapshot.meta.index:
            return
        self._stage_snapshot(snapshot, installed=True)
        self._index.reset(meta.index, meta.term)

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        """Record a state machine image taken at applied `index` (which must be stored)."""
        self._check_usable()
        if index <= self._snapshot.meta.index:
            return self._snapshot
        assert index <= self.last_index(), (index, self.last_index())
        meta = SnapshotMeta(index=index, term=self.term(index), conf=conf)
        snapshot = Snapshot(meta=meta, data=data)
        self._stage_snapshot(snapshot, installed=False)
        return snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index`; their segments go at the next sync."""
        self._check_usable()
        if index <= self._index.offset:
            return
        assert index <= self.last_index(), (index, self.last_index())
        term = self._index.term(index)
        self._enqueue(CompactMarker(index=index, term=term))
        self._index.compact(index, term)

    def sync(self) -> None:
        """Make every change so far durable: snapshot files, then the log, then (when a file
        was created) the directory. Then delete segments and snapshots no longer needed."""
        self._check_usable()
        if not self._pending_snapshots and not any(chunk.data for chunk in self._chunks):
            return
        for snapshot in self._pending_snapshots:
            self._write_snapshot_file(snapshot)
        if self._pending_snapshots:
            self._fsync_directory()
        self._pending_snapshots.clear()
        created = False
        for chunk in self._chunks:
            created |= self._write_chunk(chunk)
        if created:
            self._fsync_directory()
        active = self._segments[self._chunks[-1].segment]
        self._chunks = [_Chunk(segment=active.number, start=active.size, new_file=False)]
        self._batch += 1
        self.stats.syncs += 1
        self._delete_retired_files()

    @property
    def unsynced_bytes(self) -> int:
        return sum(len(chunk.data) for chunk in self._chunks)

    def segment_files(self) -> list[str]:
        """Names of the segment files in use, oldest first."""
        return [os.path.basename(segment.path) for segment in self._segments.values()]

    # ---- writing: records into chunks, chunks and snapshots to disk ----

    def _enqueue(self, body: Body) -> tuple[int, int]:
        record = encode_record(body, self._batch)
        assert len(record) <= self.config.record_bytes_max, (type(body), len(record))
        return self._enqueue_encoded(record)

    def _enqueue_encoded(self, record: bytes) -> tuple[int, int]:
        """Buffer `record` in the newest segment; (segment, offset) it will have there."""
        chunk = self._chunks[-1]
        active_bytes = chunk.start + len(chunk.data)
        if active_bytes + len(record) > self.config.segment_bytes_max and self._active_records > 1:
            chunk = self._start_segment()
        offset = chunk.start + len(chunk.data)
        chunk.data += record
        self._active_records += 1
        self.stats.records_written += 1
        return chunk.segment, offset

    def _start_segment(self) -> _Chunk:
        """Begin the next segment with a checkpoint of the state as of now."""
        number = self._chunks[-1].segment + 1 if self._chunks else 1
        chunk = _Chunk(segment=number, start=0, new_file=True)
        self._chunks.append(chunk)
        self._active_records = 0
        checkpoint = Checkpoint(
            version=FORMAT_VERSION,
            segment=number,
            hard_state=self._hard_state,
            snapshot_index=self._snapshot.meta.index,
            snapshot_term=self._snapshot.meta.term,
            compact_index=self._index.offset,
            compact_term=self._index.sentinel_term(),
            last_index=self._index.last_index(),
        )
        record = encode_record(checkpoint, self._batch)
        chunk.data += record
        self._active_records = 1
        self.stats.records_written += 1
        return chunk

    def _stage_snapshot(self, snapshot: Snapshot, *, installed: bool) -> None:
        meta = snapshot.meta
        assert meta.index > 0 and meta.term > 0, meta
        self._pending_snapshots.append(snapshot)
        self._enqueue(SnapshotMarker(index=meta.index, term=meta.term, installed=installed))
        self._snapshot = snapshot

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        name = snapshot_file_name(snapshot.meta.index, snapshot.meta.term)
        data = encode_snapshot(snapshot)
        assert len(data) <= self.config.snapshot_bytes_max, (
            f"snapshot of {len(data)} bytes exceeds snapshot_bytes_max"
        )
        path = self._path(name)
        temporary = path + TEMPORARY_SUFFIX
        with self._io("create", temporary):
            fd = self.files.open(temporary, create=True)
        try:
            with self._io("write", temporary):
                self.files.write(fd, data, 0)
            self._fsync(fd, temporary)
        finally:
            self.files.close(fd)
        with self._io("rename", temporary):
            self.files.rename(temporary, path)
        self._snapshot_files.add(name)
        self.stats.snapshots_written += 1
        self.stats.bytes_written += len(data)

    def _write_chunk(self, chunk: _Chunk) -> bool:
        """Write and fsync one chunk; True if it created its segment file."""
        if chunk.new_file:
            path = self._path(segment_file_name(chunk.segment))
            with self._io("create", path):
                fd = self.files.open(path, create=True)
            self._segments[chunk.segment] = _Segment(chunk.segment, path, fd, 0)
            self.stats.segments_created += 1
        segment = self._segments[chunk.segment]
        assert segment.size == chunk.start, (segment.size, chunk.start)
        if chunk.data:
            with self._io("write", segment.path):
                self.files.write(segment.fd, chunk.data, chunk.start)
            segment.size += len(chunk.data)
            self.stats.bytes_written += len(chunk.data)
            # Fsync each chunk before writing the next segment, so that only the last
            # segment can ever have a torn tail.
            self._fsync(segment.fd, segment.path)
        return chunk.new_file

    def _delete_retired_files(self) -> None:
        """Delete segments holding no live entry (all older than the first one that does)
        and snapshot files other than the current one. No directory fsync: a deleted file
        that comes back after a crash is only a leftover that recovery removes again."""
        active = self._chunks[-1].segment
        first_live = self._index.first_live_segment()
        keep_from = active if first_live is None else min(first_live, active)
        for number in [number for number in self._segments if number < keep_from]:
            segment = self._segments.pop(number)
            self.files.close(segment.fd)
            with self._io("unlink", segment.path):
                self.files.unlink(segment.path)
            self.stats.segments_deleted += 1
        current = self._snapshot_name()
        for name in sorted(self._snapshot_files - {current} if current else self._snapshot_files):
            with self._io("unlink", self._path(name)):
                self.files.unlink(self._path(name))
            self._snapshot_files.discard(name)

    def _fsync(self, fd: int, path: str) -> None:
        if not self.config.fsync:
            return
        with self._io("fsync", path):
            self.files.fsync(fd)
        self.stats.fsyncs += 1

    def _fsync_directory(self) -> None:
        if not self.config.fsync:
            return
        with self._io("fsync", self.directory):
            self.files.fsync_directory(self.directory)
        self.stats.fsyncs += 1

    # ---- reading entries: cache, pending chunks, disk ----

    def _read_run(self, index: int, high: int) -> list[Entry]:
        """Entry `index` and maybe some after it (below `high`), with one read at most."""
        segment, position, length = self._index.location(index)
        cached = self._cache.get((segment, position))
        if cached is not None:
            self._cache.move_to_end((segment, position))
            self.stats.cache_hits += 1
            return [cached]
        last, end = index, position + length
        while last + 1 < high:
            next_segment, next_position, next_length = self._index.location(last + 1)
            if next_segment != segment:
                break
            if next_position + next_length - position > self.config.read_bytes_max:
                break
            if (next_segment, next_position) in self._cache:
                break
            last, end = last + 1, next_position + next_length
        data = self._read_span(segment, position, end)
        view = memoryview(data)
        run: list[Entry] = []
        for entry_index in range(index, last + 1):
            _, entry_position, entry_length = self._index.location(entry_index)
            entry = self._decode_entry(view, entry_position - position, entry_index, segment)
            self._cache_put((segment, entry_position), entry)
            run.append(entry)
        return run

    def _read_span(self, segment: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of `segment`, from the pending chunk and/or the file."""
        chunk = next((c for c in self._chunks if c.segment == segment and c.data), None)
        pending = b""
        if chunk is not None and end > chunk.start:
            pending = bytes(chunk.data[max(start, chunk.start) - chunk.start : end - chunk.start])
            end = chunk.start
        durable = b""
        if start < end:
            record = self._segments[segment]
            with self._io("read", record.path):
                durable = self.files.read(record.fd, end - start, start)
            self.stats.disk_reads += 1
            if len(durable) != end - start:
                raise self._corrupt(
                    f"{record.path} is shorter than the index says ({start}+{end - start})"
                )
        return durable + pending

    def _decode_entry(self, view: memoryview, offset: int, index: int, segment: int) -> Entry:
        raw = read_record(view, offset, self.config.record_bytes_max)
        name = segment_file_name(segment)
        if raw is None or raw.record_type != RecordType.ENTRY:
            raise self._corrupt(f"the record of entry {index} in {name} fails its check on read")
        entry = decode_body(raw.record_type, raw.body)
        assert isinstance(entry, Entry)
        if entry.index != index or entry.term != self._index.term(index):
            raise self._corrupt(f"{name} holds entry {entry.index} where {index} should be")
        return entry

    def _cache_put(self, key: tuple[int, int], entry: Entry) -> None:
        size = entry_size(entry)
        if size > self.config.cache_bytes_max:
            return
        previous = self._cache.pop(key, None)
        if previous is not None:
            self._cache_bytes -= entry_size(previous)
        self._cache[key] = entry
        self._cache_bytes += size
        while self._cache_bytes > self.config.cache_bytes_max:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= entry_size(evicted)

    # ---- open: create or recover ----

    def _open(self, conf: ConfState | None) -> None:
        with self._io("create directory", self.directory):
            self.files.makedirs(self.directory)
        lock_path = self._path(LOCK_FILE_NAME)
        try:
            self._lock_fd = self.files.lock(lock_path)
        except BlockingIOError:
            raise WalLocked(f"{self.directory} is open in another process") from None
        except OSError as error:
            raise DiskError("lock", lock_path, error) from error
        with self._io("list", self.directory):
            names = self.files.listdir(self.directory)
        segments = sorted(
            number for number in map(parse_segment_file_name, names) if number is not None
        )
        replay = None
        if segments:
            replay = replay_segments(
                segments, self._read_segment, self.config.record_bytes_max, self._entry_seen
            )
        if replay is None:
            self._create(conf, names)
        else:
            self._finish_recovery(replay, names)

    def _create(self, conf: ConfState | None, names: list[str]) -> None:
        """A brand-new log, like MemoryStorage(conf); leftovers of a failed creation go."""
        for segment in self._segments.values():
            self.files.close(segment.fd)
        self._segments.clear()
        removed = [name for name in names if self._is_ours(name)]
        for name in removed:
            with self._io("unlink", self._path(name)):
                self.files.unlink(self._path(name))
        parent = os.path.dirname(os.path.abspath(self.directory))
        if self.config.fsync:
            with self._io("fsync", parent):
                self.files.fsync_directory(parent)
        if conf is None:
            self._hard_state = HardState()
            self._snapshot = Snapshot()
        else:
            self._hard_state = HardState(term=BOOTSTRAP_INDEX, commit=BOOTSTRAP_INDEX)
            self._snapshot = bootstrap_snapshot(conf)
            self._pending_snapshots.append(self._snapshot)
        self._index = LogIndex(self._snapshot.meta.index, self._snapshot.meta.term)
        self._start_segment()
        self.sync()
        self.recovery = Recovery(created=True, removed_files=tuple(removed))

    def _entry_seen(self, segment: int, raw: RawRecord, entry: Entry) -> None:
        self._cache_put((segment, raw.offset), entry)

    def _read_segment(self, number: int) -> bytes:
        path = self._path(segment_file_name(number))
        with self._io("open", path):
            fd = self.files.open(path, create=False)
        self._segments[number] = _Segment(number, path, fd, 0)
        with self._io("read", path):
            size = self.files.size(fd)
            data = self.files.read(fd, size, 0)
        if len(data) != size:
            raise CorruptLog(f"{path}: read {len(data)} of {size} bytes")
        return data

    def _finish_recovery(self, replay: Replay, names: list[str]) -> None:
        """Check the rebuilt state is whole, then repair the disk: cut the torn tail, drop
        leftovers. Only now is anything on disk changed."""
        index = replay.index
        missing = index.first_missing()
        if missing is not None:
            raise CorruptLog(
                f"entry {missing} (of {index.first_index()}..{index.last_index()}) is in no "
                f"segment on disk: a segment file is missing"
            )
        snapshot_index, snapshot_term = replay.snapshot_id
        snapshot = Snapshot()
        current_snapshot = None
        if snapshot_index > 0:
            current_snapshot = snapshot_file_name(snapshot_index, snapshot_term)
            snapshot = self._read_snapshot(current_snapshot, snapshot_index, snapshot_term)
        removed: list[str] = []
        if replay.torn is not None:
            self._cut_torn_tail(*replay.torn)
        if replay.empty_last is not None:
            removed.append(self._remove_segment(replay.empty_last))
        for number in replay.stale:
            removed.append(self._remove_segment(number))
        for name in names:
            leftover = name.endswith(TEMPORARY_SUFFIX) or (
                parse_snapshot_file_name(name) is not None and name != current_snapshot
            )
            if leftover:
                with self._io("unlink", self._path(name)):
                    self.files.unlink(self._path(name))
                removed.append(name)
        if removed:
            self._fsync_directory()
        for number, size in replay.segment_sizes.items():
            self._segments[number].size = size
        active = self._segments[max(replay.segment_sizes)]
        self._fsync(active.fd, active.path)  # what recovery read must be durable before use
        self._hard_state = replay.hard_state
        self._snapshot = snapshot
        self._snapshot_files = {current_snapshot} if current_snapshot else set()
        self._index = index
        self._batch = replay.batch_max + 1
        self._active_records = replay.active_records
        self._chunks = [_Chunk(segment=active.number, start=active.size, new_file=False)]
        torn_segment, torn_offset, torn_bytes = replay.torn or (None, 0, 0)
        self.recovery = Recovery(
            created=False,
            segments=len(replay.segment_sizes),
            records=replay.records,
            torn_segment=segment_file_name(torn_segment) if torn_segment else None,
            torn_offset=torn_offset,
            torn_bytes=torn_bytes,
            removed_files=tuple(removed),
        )

    def _read_snapshot(self, name: str, index: int, term: int) -> Snapshot:
        path = self._path(name)
        try:
            fd = self.files.open(path, create=False)
        except FileNotFoundError:
            raise CorruptLog(f"the log's current snapshot {name} is missing") from None
        except OSError as error:
            raise DiskError("open", path, error) from error
        try:
            with self._io("read", path):
                data = self.files.read(fd, self.files.size(fd), 0)
        finally:
            self.files.close(fd)
        try:
            return decode_snapshot(data, index, term, self.config.snapshot_bytes_max)
        except ValueError as error:
            raise CorruptLog(f"snapshot file {name} is damaged: {error}") from None

    def _cut_torn_tail(self, number: int, offset: int, torn_bytes: int) -> None:
        segment = self._segments[number]
        log.warning(
            "WAL %s: cut %d bytes of a torn write off %s at byte %d (records of a sync that "
            "never returned)",
            self.directory,
            torn_bytes,
            os.path.basename(segment.path),
            offset,
        )
        with self._io("truncate", segment.path):
            self.files.truncate(segment.fd, offset)
        self._fsync(segment.fd, segment.path)

    def _remove_segment(self, number: int) -> str:
        segment = self._segments.pop(number, None)
        if segment is not None:
            self.files.close(segment.fd)
        name = segment_file_name(number)
        with self._io("unlink", self._path(name)):
            self.files.unlink(self._path(name))
        log.warning("WAL %s: removed leftover segment %s", self.directory, name)
        return name

    # ---- helpers ----

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _snapshot_name(self) -> str | None:
        meta = self._snapshot.meta
        return snapshot_file_name(meta.index, meta.term) if meta.index > 0 else None

    @staticmethod
    def _is_ours(name: str) -> bool:
        return (
            parse_segment_file_name(name) is not None
            or parse_snapshot_file_name(name) is not None
            or name.endswith(TEMPORARY_SUFFIX)
        )

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WalFailed(f"the log failed earlier ({self._failed}); reopen it") from None
        assert not self._closed, "the log is closed"

    def _corrupt(self, message: str) -> CorruptLog:
        failure = CorruptLog(message)
        self._failed = failure
        return failure

    @contextmanager
    def _io(self, operation: str, path: str) -> Iterator[None]:
        """Turn an OSError into DiskError / DiskFull and refuse all further use."""
        try:
            yield
        except OSError as error:
            kind = DiskFull if error.errno in _DISK_FULL_ERRNOS else DiskError
            failure = kind(operation, path, error)
            self._failed = failure
            raise failure from error
