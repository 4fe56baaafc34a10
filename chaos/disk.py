"""A simulated disk for one node: an append-only log of checksummed records.

The node's loop writes one record per storage change it makes while handling a `Ready`
(hard state, entries, an installed snapshot) or after applying (a snapshot it took, a
compaction). `write` appends unsynced bytes; `fsync` makes everything written so far
durable. `crash` keeps the durable bytes plus a random prefix of the unsynced ones (maybe
cutting the last record in half: a torn write). `recover` replays the durable records into
a fresh `MemoryStorage`, stopping at the first short or corrupt record and truncating the
log there, exactly as the WAL in storage/ must.

Record layout: u32 little-endian body length, u32 crc32 of the body, then the body, a
msgpack tagged union. Invariant: after `recover`, the byte log is a whole number of valid
records and replaying it gives the same storage the node had when those records were
written.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass

import msgspec

from raft import ConfState, Entry, HardState, MemoryStorage, Snapshot

RECORD_BODY_BYTES_MAX = 16 * 1024 * 1024
"""A larger record is a simulator bug (entries and snapshots in the sim are tiny)."""

_HEADER = struct.Struct("<II")


class HardStateRecord(msgspec.Struct, frozen=True, array_like=True, tag=0):
    hard_state: HardState


class EntriesRecord(msgspec.Struct, frozen=True, array_like=True, tag=1):
    entries: tuple[Entry, ...]


class ApplySnapshotRecord(msgspec.Struct, frozen=True, array_like=True, tag=2):
    snapshot: Snapshot


class CreateSnapshotRecord(msgspec.Struct, frozen=True, array_like=True, tag=3):
    index: int
    conf: ConfState
    data: bytes


class CompactRecord(msgspec.Struct, frozen=True, array_like=True, tag=4):
    index: int


Record = (
    HardStateRecord | EntriesRecord | ApplySnapshotRecord | CreateSnapshotRecord | CompactRecord
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


@dataclass(frozen=True)
class CrashOutcome:
    unsynced_bytes: int
    kept_bytes: int
    torn: bool
    """True when the kept prefix ends inside a record."""


@dataclass(frozen=True)
class Recovery:
    storage: MemoryStorage
    records: int
    torn_tail_bytes: int
    """Bytes cut off the end because they did not form a whole valid record."""


class SimDisk:
    """One node's durable log. Only `fsync`ed bytes are guaranteed to survive `crash`."""

    __slots__ = (
        "initial_conf",
        "_durable",
        "_unsynced",
        "_unsynced_ends",
        "bytes_written",
        "fsyncs",
        "unsynced_raft_records",
    )

    def __init__(self, initial_conf: ConfState | None = None) -> None:
        """`initial_conf`: the bootstrap membership (None for a node joining later)."""
        self.initial_conf = initial_conf
        self._durable = bytearray()
        self._unsynced = bytearray()
        self._unsynced_ends: list[int] = []
        """Offsets into `_unsynced` where each unsynced record ends."""
        self.bytes_written = 0
        self.fsyncs = 0
        self.unsynced_raft_records = 0
        """Unsynced records of what Raft asked to persist (hard state, entries, an installed
        snapshot): while non-zero the node must not send (see DESIGN.md §3)."""

    @property
    def durable_bytes(self) -> int:
        return len(self._durable)

    @property
    def unsynced_bytes(self) -> int:
        return len(self._unsynced)

    def write(self, record: Record) -> None:
        body = _encoder.encode(record)
        assert 0 < len(body) <= RECORD_BODY_BYTES_MAX, len(body)
        self._unsynced += _HEADER.pack(len(body), zlib.crc32(body))
        self._unsynced += body
        self._unsynced_ends.append(len(self._unsynced))
        self.bytes_written += _HEADER.size + len(body)
        if isinstance(record, HardStateRecord | EntriesRecord | ApplySnapshotRecord):
            self.unsynced_raft_records += 1

    def fsync(self) -> None:
        self._durable += self._unsynced
        self._unsynced.clear()
        self._unsynced_ends.clear()
        self.unsynced_raft_records = 0
        self.fsyncs += 1

    def crash(self, rng: random.Random, *, torn_writes: bool = True) -> CrashOutcome:
        """Lose power: keep the durable bytes and a random prefix of the unsynced ones."""
        unsynced = len(self._unsynced)
        kept = 0
        if unsynced:
            choice = rng.random()
            if choice < 0.4:
                kept = 0
            elif choice < 0.7 or not torn_writes:
                kept = rng.choice([0, *self._unsynced_ends])
            else:
                kept = rng.randrange(unsynced + 1)
        torn = kept not in (0, *self._unsynced_ends)
        self._durable += self._unsynced[:kept]
        self._unsynced.clear()
        self._unsynced_ends.clear()
        self.unsynced_raft_records = 0
        return CrashOutcome(unsynced_bytes=unsynced, kept_bytes=kept, torn=torn)

    def recover(self) -> Recovery:
        """Replay the durable records into a fresh storage; truncate any torn tail."""
        assert not self._unsynced, "recover only after a crash (or before any write)"
        storage = MemoryStorage(conf=self.initial_conf)
        offset = 0
        records = 0
        view = memoryview(self._durable)
        while True:
            record = _read_record(view, offset)
            if record is None:
                break
            body_length, decoded = record
            _replay(storage, decoded)
            offset += _HEADER.size + body_length
            records += 1
        view.release()
        torn_tail_bytes = len(self._durable) - offset
        del self._durable[offset:]
        return Recovery(storage=storage, records=records, torn_tail_bytes=torn_tail_bytes)

    def corrupt_byte(self, offset: int) -> None:
        """Flip one durable byte (for tests of the recovery path)."""
        self._durable[offset] ^= 0xFF


def _read_record(view: memoryview, offset: int) -> tuple[int, Record] | None:
    """The record at `offset` with its body length, or None if short or corrupt."""
    if offset + _HEADER.size > len(view):
        return None
    body_length, crc = _HEADER.unpack_from(view, offset)
    start = offset + _HEADER.size
    if body_length == 0 or body_length > RECORD_BODY_BYTES_MAX:
        return None
    if start + body_length > len(view):
        return None
    body = view[start : start + body_length]
    if zlib.crc32(body) != crc:
        return None
    try:
        decoded = _decoder.decode(body)
    except msgspec.DecodeError:
        return None
    return body_length, decoded


def _replay(storage: MemoryStorage, record: Record) -> None:
    if isinstance(record, HardStateRecord):
        storage.set_hard_state(record.hard_state)
    elif isinstance(record, EntriesRecord):
        storage.append(record.entries)
    elif isinstance(record, ApplySnapshotRecord):
        storage.apply_snapshot(record.snapshot)
    elif isinstance(record, CreateSnapshotRecord):
        storage.create_snapshot(record.index, record.conf, record.data)
    else:
        assert isinstance(record, CompactRecord), record
        storage.compact(record.index)
