"""Log compaction and chunked InstallSnapshot (paper §7): a follower that needs compacted
entries gets the snapshot in chunks; lost chunks are sent again, duplicates are harmless,
the follower installs it through Ready.snapshot and ordinary replication resumes."""

from __future__ import annotations

from typing import Any

from raft import (
    ConfState,
    Entry,
    HardState,
    Message,
    ProgressState,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMeta,
)
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import M, log_of, msg, new_node, persist, sent, storage_of

DATA = bytes(range(45))
CONF = ConfState(voters=(1, 2, 3))


def _chunks(meta: SnapshotMeta, data: bytes, size: int, term: int = 5) -> list[Message]:
    return [
        msg(
            M.SNAPSHOT,
            2,
            term=term,
            snapshot_meta=meta,
            snapshot_size=len(data),
            chunk_offset=offset,
            chunk=data[offset : offset + size],
            chunk_done=offset + size >= len(data),
        )
        for offset in range(0, len(data), size)
    ]


def _follower(*terms: int, commit: int = 0, **config: Any) -> RaftNode:
    node = new_node(entries=log_of(*terms), hard_state=HardState(term=5, commit=commit), **config)
    persist(node)
    return node


# ---- follower side, stepped by hand ---------------------------------------------------


def test_follower_assembles_chunks_and_restores() -> None:
    node = _follower(1)
    meta = SnapshotMeta(index=20, term=4, conf=ConfState(voters=(1, 2, 3), learners=(7,)))
    chunks = _chunks(meta, DATA, 10)
    assert len(chunks) == 5
    for chunk in chunks[:-1]:
        node.step(chunk)
        ready = persist(node)
        assert ready.snapshot is None
        (response,) = sent(ready, M.SNAPSHOT_RESPONSE)
        assert not response.reject
        assert response.chunk_offset == chunk.chunk_offset + len(chunk.chunk)
    node.step(chunks[-1])
    ready = node.ready()
    assert ready.snapshot == Snapshot(meta=meta, data=DATA)
    assert ready.committed_entries == (), "a snapshot replaces, not precedes, the entries"
    assert ready.hard_state is not None
    assert ready.hard_state.commit == 20
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert (response.index, response.reject) == (20, False)
    assert node.conf == meta.conf
    assert node.role == Role.FOLLOWER, "not promotable while the snapshot is unpersisted"
    storage = storage_of(node)
    storage.apply_snapshot(ready.snapshot)
    storage.set_hard_state(ready.hard_state)
    node.advance(ready)
    assert (node.last_index, node.commit_index, node.applied_index) == (20, 20, 20)
    # Replication resumes right after the snapshot.
    node.step(msg(M.APPEND, 2, term=5, index=20, log_term=4, entries=(Entry(5, 21),), commit=21))
    ready = persist(node)
    assert [e.index for e in ready.committed_entries] == [21]


def test_duplicate_chunks_are_acknowledged_and_ignored() -> None:
    node = _follower()
    meta = SnapshotMeta(index=9, term=4, conf=CONF)
    chunks = _chunks(meta, DATA, 10)
    sequence = [
        chunks[0],
        chunks[0],
        chunks[1],
        chunks[0],
        chunks[1],
        chunks[2],
        chunks[3],
        chunks[4],
    ]
    snapshots = []
    for chunk in sequence:
        node.step(chunk)
        ready = persist(node)
        assert all(not m.reject for m in ready.messages)
        if ready.snapshot is not None:
            snapshots.append(ready.snapshot)
    assert snapshots == [Snapshot(meta=meta, data=DATA)]
    # The final chunk arriving again after the install is stale: answered, not re-installed.
    node.step(chunks[-1])
    ready = persist(node)
    assert ready.snapshot is None
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert response.index == 9


def test_a_gap_is_rejected_with_the_bytes_held() -> None:
    node = _follower()
    chunks = _chunks(SnapshotMeta(index=9, term=4, conf=CONF), DATA, 10)
    node.step(chunks[0])
    persist(node)
    node.step(chunks[2])  # chunk 1 was lost
    (response,) = sent(persist(node), M.SNAPSHOT_RESPONSE)
    assert response.reject
    assert response.chunk_offset == 10


def test_a_transfer_joined_midway_restarts_from_zero() -> None:
    node = _follower()
    chunks = _chunks(SnapshotMeta(index=9, term=4, conf=CONF), DATA, 10)
    node.step(chunks[2])
    (response,) = sent(persist(node), M.SNAPSHOT_RESPONSE)
    assert (response.reject, response.chunk_offset) == (True, 0)


def test_a_newer_snapshot_replaces_a_partial_one() -> None:
    node = _follower()
    old = _chunks(SnapshotMeta(index=9, term=4, conf=CONF), DATA, 10)
    new_data = DATA[::-1]
    new_meta = SnapshotMeta(index=12, term=4, conf=CONF)
    new = _chunks(new_meta, new_data, 10)
    node.step(old[0])
    node.step(old[1])
    installed = None
    for chunk in new:
        node.step(chunk)
        ready = persist(node)
        installed = ready.snapshot or installed
    assert installed == Snapshot(meta=new_meta, data=new_data)


def test_stale_snapshot_is_ignored() -> None:
    node = _follower(1, 2, 3, 4, commit=4)
    for chunk in _chunks(SnapshotMeta(index=3, term=2, conf=CONF), DATA, 10)[:1]:
        node.step(chunk)
    ready = persist(node)
    assert ready.snapshot is None
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert response.index == 4
    assert node.last_index == 5


def test_snapshot_of_entries_already_held_only_advances_commit() -> None:
    node = _follower(1, 2, 3, 4, commit=1)
    meta = SnapshotMeta(index=4, term=3, conf=CONF)
    for chunk in _chunks(meta, DATA, 100):
        node.step(chunk)
    ready = persist(node)
    assert ready.snapshot is None, "our log already holds entry 4 of term 3"
    assert node.commit_index == 4
    assert node.last_index == 5, "the entry after the snapshot survives"


# ---- leader side and the whole loop ----------------------------------------------------


def _lagging_cluster(**config: Any) -> Cluster:
    """Leader 1; node 3 missed 10 entries that the leader then compacted into a snapshot."""
    cluster = Cluster(snapshot_chunk_bytes_max=10, snapshot_chunks_in_flight_max=2, **config)
    leader = cluster.elect(1)
    cluster.isolate(3)
    for i in range(10):
        leader.propose(b"v%d" % i)
    cluster.deliver_all()
    storage = cluster.storages[1]
    storage.create_snapshot(leader.applied_index, leader.conf, DATA)
    storage.compact(leader.applied_index)
    cluster.heal()
    return cluster


def test_lagging_follower_gets_a_chunked_snapshot_then_entries() -> None:
    cluster = _lagging_cluster()
    leader = cluster.nodes[1]
    snapshot_index = cluster.storages[1].snapshot().meta.index
    chunk_offsets: list[int] = []

    def record(m: Message) -> bool:
        if m.type == M.SNAPSHOT:
            chunk_offsets.append(m.chunk_offset)
            assert len(m.chunk) <= 10
        return False

    cluster.drop = record
    cluster.tick_all(2)
    assert sorted(set(chunk_offsets)) == [0, 10, 20, 30, 40]
    assert [s.meta.index for s in cluster.snapshots[3]] == [snapshot_index]
    assert cluster.snapshots[3][0].data == DATA
    assert leader.progress[3].state == ProgressState.REPLICATE
    leader.propose(b"after")
    cluster.deliver_all()
    assert cluster.applied_data(3) == [b"after"]
    assert cluster.nodes[3].log.term(snapshot_index + 1) == leader.log.term(snapshot_index + 1)


def test_snapshot_chunks_in_flight_are_bounded() -> None:
    cluster = _lagging_cluster()
    leader = cluster.nodes[1]
    cluster.drop = lambda m: m.type == M.SNAPSHOT_RESPONSE  # nothing is ever acknowledged
    cluster.tick_all(1)
    transfer = leader.progress[3].transfer
    assert transfer is not None
    assert transfer.sent_bytes - transfer.acked_bytes <= 2 * 10


def test_lost_chunks_are_sent_again() -> None:
    cluster = _lagging_cluster()
    lost: set[int] = set()

    def lose_once(m: Message) -> bool:
        if m.type == M.SNAPSHOT and m.chunk_offset in (10, 40) and m.chunk_offset not in lost:
            lost.add(m.chunk_offset)
            return True
        return False

    cluster.drop = lose_once
    cluster.tick_all(6)
    assert lost == {10, 40}, "both the middle and the final chunk were lost once"
    assert [s.data for s in cluster.snapshots[3]] == [DATA]
    cluster.nodes[1].propose(b"after")
    cluster.deliver_all()
    assert cluster.applied_data(3) == [b"after"]


def test_duplicated_chunks_do_not_corrupt_the_snapshot() -> None:
    cluster = _lagging_cluster()
    cluster.duplicate = lambda m: m.type in (M.SNAPSHOT, M.SNAPSHOT_RESPONSE)
    cluster.tick_all(3)
    assert [s.data for s in cluster.snapshots[3]] == [DATA]
    cluster.nodes[1].propose(b"after")
    cluster.deliver_all()
    assert cluster.applied_data(3) == [b"after"]


def test_restored_follower_can_restart_from_its_storage() -> None:
    cluster = _lagging_cluster()
    cluster.tick_all(2)
    index = cluster.storages[1].snapshot().meta.index
    restarted = cluster.restart(3)
    assert (restarted.commit_index, restarted.applied_index, restarted.last_index) == (
        index,
        index,
        index,
    )
    assert restarted.conf == CONF
    cluster.nodes[1].propose(b"after")
    cluster.deliver_all()
    assert cluster.applied_data(3) == [b"after"]


def _feed_like_a_leader(
    node: RaftNode, meta: SnapshotMeta, data: bytes, term: int, source: int
) -> Snapshot | None:
    """Play the leader's side of one transfer against `node`: send the chunk the follower
    asks for next (rewinding on a rejection) until it installs something or 20 rounds pass."""
    offset = 0
    for _ in range(20):
        chunk = data[offset : offset + 10]
        node.step(
            msg(
                M.SNAPSHOT,
                source,
                term=term,
                snapshot_meta=meta,
                snapshot_size=len(data),
                chunk_offset=offset,
                chunk=chunk,
                chunk_done=offset + len(chunk) >= len(data),
            )
        )
        ready = persist(node)
        if ready.snapshot is not None:
            return ready.snapshot
        (response,) = sent(ready, M.SNAPSHOT_RESPONSE)
        offset = response.chunk_offset
    return None


def test_a_new_leader_sending_the_same_snapshot_index_does_not_mix_images() -> None:
    """Two leaders' images of one (index, term) need not be byte-identical (a state machine
    dump is rarely deterministic). Chunks from the old leader's transfer must not be
    completed with the new leader's bytes."""
    node = _follower(1)
    meta = SnapshotMeta(index=20, term=4, conf=CONF)
    old_image, new_image = b"A" * 30, b"B" * 30
    for chunk in _chunks(meta, old_image, 10, term=5)[:2]:  # old leader 2, term 5: 20 bytes
        node.step(chunk)
        persist(node)
    installed = _feed_like_a_leader(node, meta, new_image, term=6, source=3)
    assert installed is not None
    assert installed.data == new_image


def test_a_new_leader_with_a_different_snapshot_size_is_not_stuck() -> None:
    node = _follower(1)
    meta = SnapshotMeta(index=20, term=4, conf=CONF)
    for chunk in _chunks(meta, b"A" * 30, 10, term=5)[:2]:
        node.step(chunk)
        persist(node)
    installed = _feed_like_a_leader(node, meta, b"B" * 45, term=6, source=3)
    assert installed is not None, "the transfer never completed"
    assert installed.data == b"B" * 45
