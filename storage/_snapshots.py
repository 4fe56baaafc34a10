"""The on-disk form of a Raft snapshot: one file per snapshot, named by its (index, term).

A file is a 20-byte header — magic, body length (u64), CRC-32 of the body (u32) — then the
msgpack-encoded `raft.Snapshot` (metadata and data). The WAL writes it to a temporary name,
fsyncs it and renames it into place, so a file under its final name is always whole; the
log's SNAPSHOT record, written after the rename, makes it the current snapshot.

Invariant: `decode_snapshot` returns only a snapshot whose bytes match their CRC, whose
size is within the limit, and whose (index, term) match the file's name.
"""

from __future__ import annotations

import re
import struct
import zlib

import msgspec

from raft.types import Snapshot

SNAPSHOT_MAGIC = b"DCSNAP01"
_HEADER = struct.Struct("<8sQI")
SNAPSHOT_HEADER_BYTES = _HEADER.size
_NAME = re.compile(r"^snapshot-(\d{20})-(\d{20})\.snap$")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def snapshot_file_name(index: int, term: int) -> str:
    assert index > 0 and term > 0, (index, term)
    return f"snapshot-{index:020d}-{term:020d}.snap"


def parse_snapshot_file_name(name: str) -> tuple[int, int] | None:
    """(index, term) of a snapshot file's name, or None for any other name."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = _encoder.encode(snapshot)
    return _HEADER.pack(SNAPSHOT_MAGIC, len(body), zlib.crc32(body)) + body


def decode_snapshot(data: bytes, index: int, term: int, snapshot_bytes_max: int) -> Snapshot:
    """The snapshot in `data`, read from the file named for (index, term); ValueError (with
    the reason) if the file is damaged or is not that snapshot."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes is shorter than the header")
    magic, body_length, crc = _HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if body_length > snapshot_bytes_max:
        raise ValueError(f"body of {body_length} bytes exceeds the {snapshot_bytes_max} limit")
    if _HEADER.size + body_length != len(data):
        raise ValueError(
            f"header says {body_length} body bytes, file has {len(data) - _HEADER.size}"
        )
    body = memoryview(data)[_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise ValueError("CRC mismatch")
    try:
        snapshot = _decoder.decode(body)
    except msgspec.DecodeError as error:
        raise ValueError(f"undecodable: {error}") from None
    if (snapshot.meta.index, snapshot.meta.term) != (index, term):
        raise ValueError(
            f"holds the snapshot at index {snapshot.meta.index} term {snapshot.meta.term}"
        )
    return snapshot
