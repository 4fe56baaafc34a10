"""Shared pieces of the WAL tests: small limits, a comparable view of any log storage, and
the framed records of a segment file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from raft import ConfState, Entry, HardState, Snapshot
from storage import WalConfig
from storage._records import RawRecord, scan

CONF = ConfState(voters=(1, 2, 3))

SMALL = WalConfig(
    segment_bytes_max=1024,
    record_bytes_max=256,
    read_bytes_max=512,
    cache_bytes_max=200,
)
"""Limits small enough that a few dozen entries roll segments and miss the cache."""


class Readable(Protocol):
    def hard_state(self) -> HardState: ...
    def snapshot(self) -> Snapshot: ...
    def first_index(self) -> int: ...
    def last_index(self) -> int: ...
    def term(self, index: int) -> int: ...
    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]: ...


def state_of(storage: Readable) -> tuple[object, ...]:
    """Everything a reader can observe of a log, for comparing MemoryStorage and a Wal."""
    first, last = storage.first_index(), storage.last_index()
    terms = tuple(storage.term(index) for index in range(first - 1, last + 1))
    entries = tuple(storage.entries(first, last + 1, 2**62)) if last >= first else ()
    return storage.hard_state(), storage.snapshot(), first, last, terms, entries


def entries(first: int, last: int, term: int, size: int = 8) -> list[Entry]:
    return [
        Entry(term=term, index=index, data=f"{index}:{term}:".encode().ljust(size, b"."))
        for index in range(first, last + 1)
    ]


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.wal"))


def records_of(path: Path, record_bytes_max: int = SMALL.record_bytes_max) -> list[RawRecord]:
    data = path.read_bytes()
    records, end = scan(memoryview(data), 0, record_bytes_max)
    assert end == len(data), f"{path} is damaged at {end}"
    return records


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def cut_file(path: Path, length: int) -> None:
    os.truncate(path, length)
