"""Shared-memory segments for the local transport's bulk plane and large frames.

The sender writes Arrow IPC streams straight into segments, files in /dev/shm mapped into
its address space, and lends them to a receiver, which maps them read-only and reads the
stream zero-copy (the table's buffers point into the mapping). A `SegmentPool` keeps
released segments mapped (power-of-two size classes) so steady-state transfers pay no
page faults or allocation; its held, free and lent bytes each have a named maximum. A
`MappingCache` keeps the receiver's mappings, bounded, for the same reason.

Invariants: a segment is written only while no receiver holds it (it is lent from
`acquire` until `give_back`); segment names are never reused within an incarnation, so a
cached mapping always shows the segment it was made for; segment files are mode 0600.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from ipc.errors import CorruptBulk, HostLimitError

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_MODE = 0o600
PAGE_BYTES = mmap.PAGESIZE
STREAM_SLACK_BYTES = 64 * 1024
"""Room kept in a chunk's budget for what batch size estimates leave out (schema,
dictionaries, end-of-stream marker)."""
SWEEP_PER_MISS = 4
"""Cached mappings checked for vanished files on each cache miss."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class Segment:
    """One shared-memory file of ours, mapped read-write. (A Python mmap keeps a
    duplicate of the file's descriptor, so the pool bounds its segment count.)"""

    __slots__ = ("name", "capacity", "mapping", "buffer")

    def __init__(self, name: str, capacity: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.capacity = capacity
        self.mapping: mmap.mmap | None = mapping
        self.buffer: pa.Buffer | None = pa.py_buffer(mapping)

    def unmap(self) -> None:
        self.buffer = None
        if self.mapping is not None:
            _close_mapping(self.mapping)
            self.mapping = None


def _close_mapping(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        pass  # a table still points into it; it is unmapped when the last one goes


class SegmentPool:
    """The segments one incarnation owns, named `<prefix><seq>` in `shm_dir`."""

    def __init__(
        self,
        shm_dir: Path,
        prefix: str,
        *,
        segment_bytes_min: int,
        segment_bytes_max: int,
        held_bytes_max: int,
        free_bytes_max: int,
        lent_bytes_max: int,
        segments_max: int,
    ) -> None:
        assert PAGE_BYTES <= segment_bytes_min <= segment_bytes_max, (
            segment_bytes_min,
            segment_bytes_max,
        )
        assert segment_bytes_min & (segment_bytes_min - 1) == 0, segment_bytes_min
        assert segment_bytes_max <= lent_bytes_max <= held_bytes_max, (
            segment_bytes_max,
            lent_bytes_max,
            held_bytes_max,
        )
        assert 0 <= free_bytes_max <= held_bytes_max, free_bytes_max
        assert segments_max >= 1, segments_max
        self._dir = str(shm_dir)
        self._prefix = prefix
        self._segment_bytes_min = segment_bytes_min
        self._segment_bytes_max = segment_bytes_max
        self._held_bytes_max = held_bytes_max
        self._free_bytes_max = free_bytes_max
        self._lent_bytes_max = lent_bytes_max
        self._segments_max = segments_max
        self._free: dict[int, list[Segment]] = {}
        self._held: dict[str, Segment] = {}
        self._held_bytes = 0
        self._free_bytes = 0
        self._lent_bytes = 0
        self._sequence = 0

    @property
    def lent_bytes(self) -> int:
        return self._lent_bytes

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def capacity_for(self, nbytes: int) -> int:
        """The size class that holds `nbytes`: a power of two up to the segment maximum,
        beyond it (one huge row) exactly enough pages."""
        assert nbytes >= 0, nbytes
        if nbytes > self._segment_bytes_max:
            return _round_up(nbytes, PAGE_BYTES)
        capacity = self._segment_bytes_min
        while capacity < nbytes:
            capacity *= 2
        return capacity

    def acquire(self, nbytes: int) -> Segment | None:
        """A segment of at least `nbytes`, lent until `give_back`; None when that would
        pass the lent or held maximum. Raises HostLimitError if /dev/shm is full."""
        capacity = self.capacity_for(nbytes)
        if self._lent_bytes + capacity > self._lent_bytes_max:
            return None
        free = self._free.get(capacity)
        if free:
            segment = free.pop()
            self._free_bytes -= capacity
        else:
            self._evict_free(self._held_bytes_max - capacity, self._segments_max - 1)
            if self._held_bytes + capacity > self._held_bytes_max:
                return None
            if len(self._held) >= self._segments_max:
                return None
            segment = self._create(capacity)
        self._lent_bytes += capacity
        return segment

    def give_back(self, segment: Segment) -> None:
        assert segment.name in self._held, segment.name
        capacity = segment.capacity
        self._lent_bytes -= capacity
        assert self._lent_bytes >= 0, self._lent_bytes
        pooled = capacity <= self._segment_bytes_max
        if pooled and self._free_bytes + capacity <= self._free_bytes_max:
            self._free.setdefault(capacity, []).append(segment)
            self._free_bytes += capacity
        else:
            self._destroy(segment)

    def close(self) -> None:
        """Unmap and unlink every segment, lent ones too."""
        for segment in list(self._held.values()):
            self._destroy(segment)
        self._free.clear()
        self._free_bytes = self._lent_bytes = 0

    def abandon(self) -> None:
        """Unmap everything and unlink nothing, as a killed process would."""
        for segment in self._held.values():
            segment.unmap()
        self._held.clear()
        self._free.clear()

    def _evict_free(self, held_bytes_target: int, segments_target: int) -> None:
        """Unmap free segments, largest first, until both targets are met."""
        for capacity in sorted(self._free, reverse=True):
            free = self._free[capacity]
            while free and (
                self._held_bytes > held_bytes_target or len(self._held) > segments_target
            ):
                self._free_bytes -= capacity
                self._destroy(free.pop())

    def _create(self, capacity: int) -> Segment:
        name = f"{self._prefix}{self._sequence}"
        self._sequence += 1
        path = f"{self._dir}/{name}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, SEGMENT_MODE)
        try:
            os.fchmod(fd, SEGMENT_MODE)
            # Reserve the pages now: a full tmpfs then fails here with ENOSPC instead of
            # killing us with SIGBUS when we write into the mapping.
            os.posix_fallocate(fd, 0, capacity)
            mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as error:
            os.unlink(path)
            raise HostLimitError(
                f"cannot create a {capacity}-byte shared-memory segment {path}: {error}. "
                f"Free space in {self._dir} or enlarge it (mount -o remount,size=<bytes> "
                f"{self._dir}), or lower LocalOptions.shm_bytes_max"
            ) from error
        finally:
            os.close(fd)
        segment = Segment(name, capacity, mapping)
        self._held[name] = segment
        self._held_bytes += capacity
        return segment

    def _destroy(self, segment: Segment) -> None:
        if self._held.pop(segment.name, None) is None:
            return
        self._held_bytes -= segment.capacity
        try:
            os.unlink(f"{self._dir}/{segment.name}")
        except FileNotFoundError:
            pass
        segment.unmap()


# ---- Arrow IPC streams in segments ----


def measure_stream(schema: pa.Schema, batches: list[pa.RecordBatch]) -> int:
    """Exact bytes of the IPC stream of `batches`, without writing them anywhere."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return int(sink.size())


def write_stream(segment: Segment, schema: pa.Schema, batches: list[pa.RecordBatch]) -> int:
    """Write the IPC stream into the segment (one copy of each buffer); its length."""
    assert segment.buffer is not None, segment.name
    sink = pa.FixedSizeBufferWriter(segment.buffer)
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    length = int(sink.tell())
    sink.close()
    return length


def stream_bytes(table: pa.Table) -> bytes:
    """The table as one Arrow IPC stream in memory (for tables small enough to travel
    inside a control frame)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_bytes(segment: Segment, data: bytes) -> None:
    assert segment.mapping is not None, segment.name
    assert len(data) <= segment.capacity, (len(data), segment.capacity)
    segment.mapping[: len(data)] = data


def read_stream(buffer: pa.Buffer) -> pa.Table:
    """The table in an IPC stream, zero-copy. Raises CorruptBulk if it does not read."""
    try:
        table = pa.ipc.open_stream(buffer).read_all()
        table.validate()
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorruptBulk(f"bulk does not read back as an Arrow IPC stream: {error}") from None
    return table


def plan_chunks(
    batches: Iterable[pa.RecordBatch], chunk_bytes_max: int
) -> Iterator[tuple[list[pa.RecordBatch], bool]]:
    """Group batches into chunks of about `chunk_bytes_max` serialized bytes, slicing
    batches that are larger (zero-copy). Yields `(batches, last)`; always at least one
    chunk, the final one with `last=True`. Streams: a chunk is yielded as soon as the
    batch after it is seen, so a long stream's chunks leave before it ends."""
    budget = chunk_bytes_max - STREAM_SLACK_BYTES
    assert budget > 0, chunk_bytes_max
    current: list[pa.RecordBatch] = []
    current_bytes = 0
    for batch in batches:
        for piece in _pieces(batch, budget):
            size = pa.ipc.get_record_batch_size(piece)
            if current and current_bytes + size > budget:
                yield current, False
                current, current_bytes = [], 0
            current.append(piece)
            current_bytes += size
    yield current, True


def _pieces(batch: pa.RecordBatch, budget: int) -> Iterator[pa.RecordBatch]:
    """The batch, or row slices of it that each serialize to at most `budget` bytes
    (a single row larger than that comes alone)."""
    size = pa.ipc.get_record_batch_size(batch)
    if size <= budget or batch.num_rows <= 1:
        yield batch
        return
    rows = max(1, batch.num_rows * budget // size)
    for start in range(0, batch.num_rows, rows):
        piece = batch.slice(start, rows)
        if piece.num_rows > 1 and pa.ipc.get_record_batch_size(piece) > budget:
            half = piece.num_rows // 2
            yield from _pieces(piece.slice(0, half), budget)
            yield from _pieces(piece.slice(half), budget)
        else:
            yield piece


# ---- the receiver's mappings ----


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_READ = 22
"""Linux 5.14+: map every page of a range now, instead of one fault per page later."""


def _populate(buffer: pa.Buffer) -> None:
    """Best effort: older kernels refuse the advice and pages fault in on first use."""
    _LIBC.madvise(buffer.address, buffer.size, MADV_POPULATE_READ)


class MappingCache:
    """Read-only mappings of other nodes' segments, most recently used last, bounded in
    count and bytes. Mappings hold no descriptor (Arrow closes the file once mapped); an
    evicted mapping is unmapped when the last table pointing into it goes."""

    def __init__(self, shm_dir: Path, *, mappings_max: int, mapped_bytes_max: int) -> None:
        assert mappings_max >= 1, mappings_max
        assert mapped_bytes_max >= PAGE_BYTES, mapped_bytes_max
        self._dir = str(shm_dir)
        self._mappings_max = mappings_max
        self._mapped_bytes_max = mapped_bytes_max
        self._entries: OrderedDict[str, pa.Buffer] = OrderedDict()
        self._mapped_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def buffer(self, name: str, length: int) -> pa.Buffer:
        """The first `length` bytes of segment `name`. Raises CorruptBulk if the
        segment is gone or shorter."""
        buffer = self._entries.get(name)
        if buffer is None:
            buffer = self._map(name)
        else:
            self._entries.move_to_end(name)
        if length > buffer.size:
            raise CorruptBulk(f"segment {name} holds {buffer.size} bytes, not {length}")
        return buffer.slice(0, length)

    def evict_prefix(self, prefix: str) -> None:
        for name in [name for name in self._entries if name.startswith(prefix)]:
            self._evict(name)

    def close(self) -> None:
        for name in list(self._entries):
            self._evict(name)

    def _map(self, name: str) -> pa.Buffer:
        self._sweep()
        path = f"{self._dir}/{name}"
        if os.path.islink(path):
            raise CorruptBulk(f"segment {name} is a symbolic link")
        try:
            mapped = pa.memory_map(path, "r")
        except (OSError, pa.ArrowException) as error:
            raise CorruptBulk(f"segment {name} cannot be mapped: {error}") from None
        try:
            size = mapped.size()
            if size == 0:
                raise CorruptBulk(f"segment {name} is empty")
            buffer = mapped.read_buffer(size)
        finally:
            mapped.close()
        _populate(buffer)
        while self._entries and (
            len(self._entries) >= self._mappings_max
            or self._mapped_bytes + size > self._mapped_bytes_max
        ):
            self._evict(next(iter(self._entries)))
        self._entries[name] = buffer
        self._mapped_bytes += size
        return buffer

    def _sweep(self) -> None:
        """Drop a few of the oldest mappings whose files their owner has unlinked."""
        for name in list(self._entries)[:SWEEP_PER_MISS]:
            if not os.path.exists(f"{self._dir}/{name}"):
                self._evict(name)

    def _evict(self, name: str) -> None:
        buffer = self._entries.pop(name)
        self._mapped_bytes -= buffer.size


def segment_files(shm_dir: Path, prefix: str) -> list[str]:
    """Names of the files in `shm_dir` that start with `prefix`."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))


def unlink_segment(shm_dir: Path, name: str) -> bool:
    try:
        os.unlink(f"{shm_dir}/{name}")
    except FileNotFoundError:
        return False
    return True
