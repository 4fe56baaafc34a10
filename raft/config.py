"""Configuration of one Raft node, with every limit named and checked up front."""

from __future__ import annotations

import random
from dataclasses import dataclass

from raft.storage import LogStorage


class ConfigError(ValueError):
    pass


@dataclass
class RaftConfig:
    node_id: int
    storage: LogStorage
    rng: random.Random
    """The node's only source of randomness (election timeouts). Seed it; never share it."""

    election_ticks: int = 10
    """Ticks without hearing from a leader before campaigning; randomized in [e, 2e)."""
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    applied: int = 0
    """Index the caller's state machine has already applied (restart)."""

    entries_per_message_bytes_max: int = 64 * 1024
    inflight_messages_max: int = 64
    uncommitted_entries_bytes_max: int = 8 * 1024 * 1024
    """Proposals beyond this many unapplied bytes are refused (backpressure)."""
    entry_bytes_max: int = 4 * 1024 * 1024
    snapshot_chunk_bytes_max: int = 64 * 1024
    snapshot_chunks_in_flight_max: int = 4
    snapshot_bytes_max: int = 8 * 1024 * 1024 * 1024
    """A follower refuses to buffer an incoming snapshot larger than this."""
    committed_entries_bytes_max: int = 4 * 1024 * 1024
    """At most this much committed data handed out by one Ready."""
    read_index_pending_max: int = 4096

    def validate(self) -> None:
        if self.node_id <= 0:
            raise ConfigError(f"node_id must be positive, got {self.node_id}")
        if self.heartbeat_ticks <= 0:
            raise ConfigError("heartbeat_ticks must be positive")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ConfigError("election_ticks must be greater than heartbeat_ticks")
        for name in (
            "entries_per_message_bytes_max",
            "inflight_messages_max",
            "uncommitted_entries_bytes_max",
            "entry_bytes_max",
            "snapshot_chunk_bytes_max",
            "snapshot_chunks_in_flight_max",
            "snapshot_bytes_max",
            "committed_entries_bytes_max",
            "read_index_pending_max",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.applied < 0:
            raise ConfigError("applied must not be negative")
