"""A node rebuilt from what it persisted (hard state, entries, snapshot) keeps its term,
vote and commit, and rejoins its cluster."""

from __future__ import annotations

from raft import ConfState, Entry, HardState, MemoryStorage, Role, Snapshot, SnapshotMeta
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import M, log_of, msg, new_node, persist, sent, storage_of


def test_restarted_follower_keeps_term_vote_and_commit_and_rejoins() -> None:
    cluster = Cluster()
    leader = cluster.elect(1)
    for value in (b"a", b"b"):
        leader.propose(value)
    cluster.deliver_all()
    before = cluster.nodes[2]
    expected = (before.term, before.vote, before.commit_index)
    assert expected[1] == 1
    restarted = cluster.restart(2)
    assert (restarted.term, restarted.vote, restarted.commit_index) == expected
    assert restarted.role == Role.FOLLOWER
    assert restarted.last_index == leader.last_index
    leader.propose(b"c")
    cluster.deliver_all()
    assert cluster.applied_data(2) == [b"a", b"b", b"c"]


def test_restarted_leader_comes_back_as_a_follower_of_the_same_term() -> None:
    cluster = Cluster(election_ticks=10)
    leader = cluster.elect(1)
    leader.propose(b"a")
    cluster.deliver_all()
    term = leader.term
    restarted = cluster.restart(1)
    assert (restarted.role, restarted.term, restarted.vote) == (Role.FOLLOWER, term, 1)
    for _ in range(50):
        cluster.tick_all()
        if cluster.leader() is not None:
            break
    new_leader = cluster.leader()
    assert new_leader is not None
    cluster.nodes[new_leader].propose(b"b")
    cluster.deliver_all()
    assert cluster.applied_data(1) == [b"a", b"b"]


def test_restart_does_not_apply_twice() -> None:
    cluster = Cluster()
    leader = cluster.elect(1)
    leader.propose(b"a")
    cluster.deliver_all()
    cluster.restart(3)  # `applied` = what the state machine holds
    cluster.deliver_all()
    assert cluster.applied_data(3) == [b"a"]


def test_restart_from_snapshot_plus_entries() -> None:
    storage = MemoryStorage(conf=ConfState(voters=(1, 2, 3)))
    storage.append(log_of(1, 2, 2, 2, 3, 3, 3))
    storage.create_snapshot(5, ConfState(voters=(1, 2, 3), learners=(4,)), b"image")
    storage.compact(5)
    storage.set_hard_state(HardState(term=3, vote=2, commit=7))
    node = new_node(storage=storage)
    assert (node.term, node.vote, node.commit_index, node.applied_index) == (3, 2, 7, 5)
    assert node.conf.learners == (4,), "membership comes from the snapshot"
    ready = persist(node)
    assert [e.index for e in ready.committed_entries] == [6, 7]
    assert ready.hard_state is None, "nothing changed since it was persisted"
    assert node.log.first_index() == 6
    # Entry 8 was persisted but not known committed: kept, and committed when the leader says.
    node.step(msg(M.HEARTBEAT, 2, term=3, commit=8))
    assert [e.index for e in persist(node).committed_entries] == [8]


def test_snapshot_installed_then_restarted() -> None:
    node = new_node(hard_state=HardState(term=2))
    meta = SnapshotMeta(index=30, term=2, conf=ConfState(voters=(1, 2, 3)))
    node.step(
        msg(
            M.SNAPSHOT,
            2,
            term=2,
            snapshot_meta=meta,
            snapshot_size=3,
            chunk=b"abc",
            chunk_done=True,
        )
    )
    ready = persist(node)
    assert ready.snapshot == Snapshot(meta=meta, data=b"abc")
    restarted = new_node(storage=storage_of(node))
    assert (restarted.commit_index, restarted.applied_index, restarted.last_index) == (30, 30, 30)
    restarted.step(msg(M.APPEND, 2, term=2, index=30, log_term=2, entries=(Entry(2, 31),)))
    (response,) = sent(persist(restarted), M.APPEND_RESPONSE)
    assert (response.reject, response.index) == (False, 31)


def test_restarted_node_keeps_its_uncommitted_tail() -> None:
    node = new_node(entries=log_of(1, 1), hard_state=HardState(term=1, commit=1))
    assert (node.last_index, node.commit_index) == (3, 1)
    # A vote request is judged against the whole persisted log, committed or not.
    node.step(msg(M.VOTE, 2, term=2, index=2, log_term=1))
    (response,) = sent(persist(node), M.VOTE_RESPONSE)
    assert response.reject
