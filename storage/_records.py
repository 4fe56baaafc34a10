"""How WAL records are framed on disk, and how a byte buffer is parsed back into records.

A segment file is a sequence of records. Each record is a 20-byte little-endian header —
magic (u16), record type (u8), a reserved zero byte, body length (u32), batch number (u64),
CRC-32 (u32) of the header's first 16 bytes followed by the body — then the body, a
msgpack-encoded msgspec Struct whose type the record type names.

The batch number is the count of the `sync` that wrote the record: every record written by
one `sync` carries the same number, and each `sync` that writes anything uses the next
one. Because a `sync` starts writing only after the previous one was fsynced, only records
of the newest batch can be torn by a crash; a damaged record followed by a valid record two
or more batches newer is corruption of synced data, never a torn write.

Invariant: `read_record` returns a record only if every header field is sane and the CRC
matches; it never raises on arbitrary bytes.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from dataclasses import dataclass

import msgspec

from raft.types import Entry, HardState

FORMAT_VERSION = 1
RECORD_MAGIC = 0xD7C5
_MAGIC_BYTES = struct.pack("<H", RECORD_MAGIC)

_HEADER_PREFIX = struct.Struct("<HBBIQ")
"""magic, record type, reserved, body length, batch: the part the CRC covers."""
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER_PREFIX.size + _CRC.size


_SEGMENT_NAME = re.compile(r"^segment-(\d{10})\.wal$")


def segment_file_name(segment: int) -> str:
    assert 0 < segment < 10**10, segment
    return f"segment-{segment:010d}.wal"


def parse_segment_file_name(name: str) -> int | None:
    """The number of the segment file called `name`, or None for any other name."""
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


class RecordType(enum.IntEnum):
    CHECKPOINT = 1
    """First record of every segment: the log's whole state at that point, except entries."""
    ENTRY = 2
    """One raft Entry. Writing index i drops every stored entry >= i first (a conflicting
    suffix is truncated by the append that overwrites it, as in MemoryStorage.append)."""
    HARD_STATE = 3
    """The latest one replayed wins."""
    SNAPSHOT = 4
    """The current snapshot is now the one in its own file named by (index, term)."""
    COMPACT = 5
    """Entries up to and including `index` are dropped; `term` is that entry's term."""


class Checkpoint(msgspec.Struct, frozen=True, array_like=True):
    """Lets replay start at any segment: everything earlier is summarised here, except the
    entries (compact_index, last_index], which earlier segments hold (or held, if a later
    compaction made them dead and deleted those segments)."""

    version: int
    segment: int
    hard_state: HardState
    snapshot_index: int
    snapshot_term: int
    compact_index: int
    compact_term: int
    last_index: int


class SnapshotMarker(msgspec.Struct, frozen=True, array_like=True):
    index: int
    term: int
    installed: bool
    """True: received from the leader (apply_snapshot), which replaces the whole log.
    False: taken locally (create_snapshot), which leaves the entries alone."""


class CompactMarker(msgspec.Struct, frozen=True, array_like=True):
    index: int
    term: int


Body = Checkpoint | Entry | HardState | SnapshotMarker | CompactMarker

_BODY_TYPES: dict[RecordType, type[Body]] = {
    RecordType.CHECKPOINT: Checkpoint,
    RecordType.ENTRY: Entry,
    RecordType.HARD_STATE: HardState,
    RecordType.SNAPSHOT: SnapshotMarker,
    RecordType.COMPACT: CompactMarker,
}
_RECORD_TYPE_OF: dict[type, RecordType] = {body: kind for kind, body in _BODY_TYPES.items()}
_encoder = msgspec.msgpack.Encoder()
_decoders = {kind: msgspec.msgpack.Decoder(body) for kind, body in _BODY_TYPES.items()}


def encode_record(body: Body, batch: int) -> bytes:
    """The framed record for `body`, to be written as part of batch number `batch`."""
    assert batch >= 1, batch
    payload = _encoder.encode(body)
    assert payload, "msgpack never encodes to nothing"
    prefix = _HEADER_PREFIX.pack(RECORD_MAGIC, _RECORD_TYPE_OF[type(body)], 0, len(payload), batch)
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return b"".join((prefix, _CRC.pack(crc), payload))


def decode_body(record_type: int, body: bytes | memoryview) -> Body:
    """The Struct in a record's body; `ValueError` for an unknown type or a bad encoding
    (a record whose CRC matched, so a format bug or a foreign file, not a torn write)."""
    try:
        decoder = _decoders[RecordType(record_type)]
    except ValueError:
        raise ValueError(f"unknown record type {record_type}") from None
    try:
        decoded: Body = decoder.decode(body)
    except msgspec.DecodeError as error:
        raise ValueError(f"undecodable {RecordType(record_type).name} record: {error}") from None
    return decoded


@dataclass(frozen=True, slots=True)
class RawRecord:
    offset: int
    """Where the record's header starts in its segment."""
    length: int
    """Header plus body."""
    record_type: int
    batch: int
    body: memoryview


def read_record(buffer: memoryview, offset: int, record_bytes_max: int) -> RawRecord | None:
    """The valid record starting at `offset`, or None (short, damaged or not a record)."""
    end_of_header = offset + HEADER_BYTES
    if end_of_header > len(buffer):
        return None
    magic, record_type, reserved, body_length, batch = _HEADER_PREFIX.unpack_from(buffer, offset)
    if magic != RECORD_MAGIC or reserved != 0 or batch == 0:
        return None
    if body_length == 0 or HEADER_BYTES + body_length > record_bytes_max:
        return None
    end = end_of_header + body_length
    if end > len(buffer):
        return None
    (crc,) = _CRC.unpack_from(buffer, offset + _HEADER_PREFIX.size)
    body = buffer[end_of_header:end]
    if zlib.crc32(body, zlib.crc32(buffer[offset : offset + _HEADER_PREFIX.size])) != crc:
        return None
    return RawRecord(offset, HEADER_BYTES + body_length, record_type, batch, body)


def scan(buffer: memoryview, offset: int, record_bytes_max: int) -> tuple[list[RawRecord], int]:
    """Every valid record from `offset` on, up to the first invalid one; and where the valid
    ones end (`len(buffer)` when the whole rest is valid)."""
    records: list[RawRecord] = []
    while offset < len(buffer):
        record = read_record(buffer, offset, record_bytes_max)
        if record is None:
            break
        records.append(record)
        offset += record.length
    return records, offset


def find_newer_record(
    data: bytes, start: int, batch_min: int, record_bytes_max: int
) -> RawRecord | None:
    """The first valid record at or after `start` whose batch is at least `batch_min`.

    Used only on the recovery path, after a damaged record: it finds candidates by their
    magic bytes, so the cost is one CRC per candidate, not one per byte."""
    view = memoryview(data)
    position = start
    while True:
        position = data.find(_MAGIC_BYTES, position)
        if position < 0:
            return None
        record = read_record(view, position, record_bytes_max)
        if record is not None and record.batch >= batch_min:
            return record
        position += 1
