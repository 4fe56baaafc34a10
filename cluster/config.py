"""What a worker is told when it starts: who it is, where its files are, how to reach
its peers. The supervisor builds one per node and hands it over at fork (or, for tests
and tools, as JSON to `python -m cluster.worker --config FILE`).

Invariant: everything a worker needs to rejoin its cluster after a crash is here or in
its run directory; nothing is inherited from the supervisor's memory except this value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from cluster.protocol import NODES_MAX, Address

TICK_MS_DEFAULT = 10
ELECTION_TICKS_DEFAULT = 15
HEARTBEAT_TICKS_DEFAULT = 3
SNAPSHOT_ENTRIES_DEFAULT = 10_000
"""Take a state-machine snapshot (and compact the WAL) every this many applied entries."""


class WorkerConfig(msgspec.Struct, frozen=True):
    name: str
    node: int
    """This worker's node number, 0-based (its raft id is node + 1)."""
    run_dir: str
    founders: tuple[int, ...]
    """Node numbers of the founding voters (used only when the WAL is brand new)."""
    incarnation: int
    """Grows by one at every (re)start of this node; names its queue and segments."""
    transport: str = "shm"
    """"shm" (POSIX mq + /dev/shm) or "tcp"."""
    fsync: bool = True
    bind: Address | None = None
    """TCP: where to listen (port 0 picks one; the worker reports it in its status)."""
    peers: dict[int, Address] = {}
    """TCP: node number -> address of every other known worker."""
    joining: bool = False
    """True for a worker that joins an existing cluster (starts with an empty log and
    waits to be added as a learner)."""
    tick_ms: int = TICK_MS_DEFAULT
    election_ticks: int = ELECTION_TICKS_DEFAULT
    heartbeat_ticks: int = HEARTBEAT_TICKS_DEFAULT
    snapshot_entries: int = SNAPSHOT_ENTRIES_DEFAULT
    queues_per_host_expected: int = 8
    """Sizes the local transport's queue so this many fit the user's mq byte budget."""

    def __post_init__(self) -> None:
        assert 0 <= self.node < NODES_MAX, self.node
        assert self.transport in ("shm", "tcp"), self.transport
        assert all(0 <= founder < NODES_MAX for founder in self.founders), self.founders
        assert self.incarnation >= 1, self.incarnation
        assert 1 <= self.tick_ms <= 1000, self.tick_ms
        assert self.election_ticks > self.heartbeat_ticks >= 1, (
            self.election_ticks,
            self.heartbeat_ticks,
        )
        assert self.snapshot_entries >= 1, self.snapshot_entries

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


SNAPSHOT_ENTRIES_ENV = "DCLUSTER_SNAPSHOT_ENTRIES"


def snapshot_entries_from(environ: Mapping[str, str]) -> int:
    """`DCLUSTER_SNAPSHOT_ENTRIES` if set (tests shorten it to exercise compaction and
    catch-up from replicas), else the default."""
    text = environ.get(SNAPSHOT_ENTRIES_ENV)
    if text is None:
        return SNAPSHOT_ENTRIES_DEFAULT
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{SNAPSHOT_ENTRIES_ENV}={text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{SNAPSHOT_ENTRIES_ENV}={value} must be at least 1")
    return value


WORKER_MEMORY_ENV = "DCLUSTER_WORKER_MEMORY_MB"
WORKER_MEMORY_SHARE = 0.5
"""Of the host's memory, the part the workers' DuckDB stores may use together by default
(the coordinators, the OS page cache and the transport's segments need the rest)."""
WORKER_MEMORY_BYTES_MIN = 512 * 1024 * 1024


def worker_memory_bytes_from(environ: Mapping[str, str], host_bytes: int, cores: int) -> int:
    """DuckDB's memory_limit for one worker's store: `DCLUSTER_WORKER_MEMORY_MB` if set,
    else WORKER_MEMORY_SHARE of the host's memory over its `cores` (one worker per core),
    at least WORKER_MEMORY_BYTES_MIN. A fixed 512 MiB made every worker of a large host
    spill its joins and re-read its blocks long before the host ran short."""
    text = environ.get(WORKER_MEMORY_ENV)
    if text is None or text == "":
        share = int(host_bytes * WORKER_MEMORY_SHARE) // max(1, cores)
        return max(WORKER_MEMORY_BYTES_MIN, share)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{WORKER_MEMORY_ENV}={text!r} is not a whole number") from None
    if not 16 <= value <= 1 << 30:
        raise ValueError(f"{WORKER_MEMORY_ENV}={value} must be between 16 and {1 << 30} (MB)")
    return value * 1024 * 1024


def load(path: Path) -> WorkerConfig:
    return msgspec.json.decode(path.read_bytes(), type=WorkerConfig)


def dump(config: WorkerConfig) -> bytes:
    return msgspec.json.encode(config)
