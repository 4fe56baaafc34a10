"""ReadIndex (thesis §6.4): a read is answered at the leader's commit index only after a
quorum has answered a heartbeat sent after the read arrived, and never before the leader
has committed an entry of its own term."""

from __future__ import annotations

from typing import Any

import pytest

from raft import NotLeader, ProposalRefused, RaftNode, ReadState, Ready, Role
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import (
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    ack,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
)


def _leader_with_commit(**config: Any) -> RaftNode:
    node = new_node(**config)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # its no-op
    assert node.commit_index == FIRST_INDEX
    return node


def _heartbeat_context(ready: Ready) -> bytes:
    contexts = {m.context for m in sent(ready, M.HEARTBEAT)}
    assert len(contexts) == 1, contexts
    (context,) = contexts
    return context


def test_leader_answers_only_after_a_heartbeat_quorum() -> None:
    node = _leader_with_commit()
    node.read_index(b"r1")
    ready = persist(node)
    assert ready.read_states == ()
    assert sorted(m.target for m in sent(ready, M.HEARTBEAT)) == [2, 3]
    context = _heartbeat_context(ready)
    assert context
    node.step(msg(M.HEARTBEAT_RESPONSE, 3, term=FIRST_ELECTION_TERM, context=context))
    assert persist(node).read_states == (ReadState(index=FIRST_INDEX, request_id=b"r1"),)


def test_heartbeat_answers_without_the_round_context_do_not_confirm_a_read() -> None:
    node = _leader_with_commit()
    node.read_index(b"r1")
    persist(node)
    node.step(
        msg(M.HEARTBEAT_RESPONSE, 2, term=FIRST_ELECTION_TERM)
    )  # answer to an earlier plain heartbeat
    node.step(
        msg(M.HEARTBEAT_RESPONSE, 3, term=FIRST_ELECTION_TERM, context=b"\x00" * 8)
    )  # unknown round
    assert persist(node).read_states == ()


def test_a_later_round_confirms_earlier_rounds_in_order() -> None:
    node = _leader_with_commit()
    node.read_index(b"r1")
    persist(node)
    node.propose(b"x")
    persist(node)
    ack(node, 2, FIRST_INDEX + 1)
    node.read_index(b"r2")
    context2 = _heartbeat_context(persist(node))
    node.step(msg(M.HEARTBEAT_RESPONSE, 2, term=FIRST_ELECTION_TERM, context=context2))
    assert persist(node).read_states == (
        ReadState(index=FIRST_INDEX, request_id=b"r1"),
        ReadState(index=FIRST_INDEX + 1, request_id=b"r2"),
    )


def test_leader_answers_no_read_before_committing_an_entry_of_its_term() -> None:
    node = new_node()
    make_leader(node)
    node.read_index(b"early")
    ready = persist(node)
    assert ready.read_states == ()
    assert sent(ready, M.HEARTBEAT) == [], "its commit index may still be stale"
    ready = ack(node, 2, FIRST_INDEX)  # the no-op commits: the waiting read starts its round
    context = _heartbeat_context(ready)
    assert ready.read_states == ()
    node.step(msg(M.HEARTBEAT_RESPONSE, 2, term=FIRST_ELECTION_TERM, context=context))
    assert persist(node).read_states == (ReadState(index=FIRST_INDEX, request_id=b"early"),)


def test_single_voter_answers_at_once() -> None:
    node = new_node(voters=(1,))
    node.campaign()
    persist(node)
    node.read_index(b"solo")
    assert persist(node).read_states == (ReadState(index=FIRST_INDEX, request_id=b"solo"),)


def test_follower_forwards_and_gets_a_read_state() -> None:
    cluster = Cluster()
    leader = cluster.elect(1)
    leader.propose(b"a")
    cluster.deliver_all()
    cluster.nodes[2].read_index(b"from-2")
    cluster.deliver_all()
    assert cluster.read_states[2] == [ReadState(index=leader.commit_index, request_id=b"from-2")]
    assert cluster.read_states[1] == []


def test_follower_without_a_leader_refuses() -> None:
    node = new_node()
    with pytest.raises(NotLeader):
        node.read_index(b"nowhere")


def test_read_index_to_a_follower_is_dropped() -> None:
    node = new_node()
    node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
    persist(node)
    node.step(msg(M.READ_INDEX, 3, term=FIRST_ELECTION_TERM, context=b"misrouted"))
    assert persist(node).messages == ()
    assert node.dropped == {"read_index_not_leader": 1}


def test_reads_beyond_the_pending_limit_are_refused() -> None:
    node = _leader_with_commit(read_index_pending_max=2)
    node.read_index(b"1")
    node.read_index(b"2")
    with pytest.raises(ProposalRefused):
        node.read_index(b"3")


@pytest.mark.parametrize("check_quorum", [True, False])
def test_deposed_leader_never_answers_a_read(check_quorum: bool) -> None:
    cluster = Cluster(pre_vote=False, check_quorum=check_quorum, election_ticks=10)
    old = cluster.elect(1)
    old.propose(b"a")
    cluster.deliver_all()
    cluster.isolate(1)
    for _ in range(100):
        cluster.nodes[2].tick()
        cluster.nodes[3].tick()
        cluster.deliver_all()
        if Role.LEADER in (cluster.nodes[2].role, cluster.nodes[3].role):
            break
    new = cluster.nodes[2] if cluster.nodes[2].role == Role.LEADER else cluster.nodes[3]
    new.propose(b"b")
    cluster.deliver_all()
    old.read_index(b"stale")  # still believes it leads (or did until check-quorum)
    for _ in range(30):
        old.tick()
        cluster.deliver_all()
    assert cluster.read_states[1] == []
    if check_quorum:
        assert old.role == Role.FOLLOWER
    cluster.heal()
    cluster.tick_all(3)
    assert old.role == Role.FOLLOWER
    assert cluster.read_states[1] == [], "the read must not be answered at the old index"
    cluster.nodes[1].read_index(b"fresh")
    cluster.deliver_all()
    assert cluster.read_states[1] == [ReadState(index=new.commit_index, request_id=b"fresh")]
