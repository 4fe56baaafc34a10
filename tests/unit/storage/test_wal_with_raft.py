"""A RaftNode runs on a Wal exactly as on MemoryStorage: the Ready loop persists into it
with one sync per Ready, and a node rebuilt from the reopened log has the same term, vote,
commit and log, and applies nothing twice."""

from __future__ import annotations

import random
from pathlib import Path

from raft import ConfState, Entry, EntryKind, RaftConfig, RaftNode, Role
from storage import Wal
from tests.unit.storage.helpers import SMALL

SOLO = ConfState(voters=(1,))


def _drive(node: RaftNode, wal: Wal, applied: list[Entry]) -> None:
    """The caller's loop, in Ready order: persist and sync, (send), apply, advance."""
    while node.has_ready():
        ready = node.ready()
        if ready.snapshot is not None:
            wal.apply_snapshot(ready.snapshot)
        wal.append(ready.entries)
        if ready.hard_state is not None:
            wal.set_hard_state(ready.hard_state)
        wal.sync()
        applied.extend(ready.committed_entries)
        node.advance(ready)


def _node(wal: Wal, applied: int) -> RaftNode:
    return RaftNode(RaftConfig(node_id=1, storage=wal, rng=random.Random(1), applied=applied))


def test_a_node_restarted_from_the_wal_keeps_its_state_and_log(tmp_path: Path) -> None:
    applied: list[Entry] = []
    with Wal.open(tmp_path, SOLO, config=SMALL) as wal:
        node = _node(wal, applied=1)
        node.campaign()
        _drive(node, wal, applied)
        assert node.role == Role.LEADER
        for value in range(60):
            node.propose(f"value {value}".encode())
            _drive(node, wal, applied)
        data = [entry.data for entry in applied if entry.kind == EntryKind.NORMAL and entry.data]
        assert data == [f"value {value}".encode() for value in range(60)]
        wal.create_snapshot(55, SOLO, b"state machine at 55")
        wal.compact(50)
        wal.sync()
        before = (node.term, node.vote, node.commit_index, node.last_index)
        assert len(wal.segment_files()) < wal.stats.segments_created
    with Wal.open(tmp_path, config=SMALL) as wal:
        restarted = _node(wal, applied=len(applied) + 1)
        assert (restarted.term, restarted.vote, restarted.commit_index) == before[:3]
        assert restarted.last_index == before[3]
        again: list[Entry] = []
        restarted.campaign()
        _drive(restarted, wal, again)
        restarted.propose(b"after restart")
        _drive(restarted, wal, again)
        assert [entry.data for entry in again if entry.data] == [b"after restart"]
