"""Leadership transfer (thesis §3.10): catch the target up, send it TIMEOUT_NOW, refuse
proposals meanwhile, and give up after one election timeout."""

from __future__ import annotations

import pytest

from raft import (
    TRANSFER_CONTEXT,
    ConfChange,
    ConfChangeKind,
    LeadershipTransferInProgress,
    NotLeader,
    ProposalRefused,
    Role,
)
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

ELECTION_TICKS = 10


def test_caught_up_target_gets_timeout_now_at_once() -> None:
    node = new_node()
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # its no-op
    node.transfer_leadership(2)
    ready = persist(node)
    (timeout_now,) = sent(ready, M.TIMEOUT_NOW)
    assert (timeout_now.target, timeout_now.term) == (2, FIRST_ELECTION_TERM)


def test_lagging_target_is_caught_up_before_timeout_now() -> None:
    node = new_node()
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # its no-op
    ack(node, 3, FIRST_INDEX)
    node.propose(b"a")
    node.propose(b"b")
    persist(node)
    ack(node, 2, FIRST_INDEX + 2)
    node.transfer_leadership(3)
    assert sent(persist(node), M.TIMEOUT_NOW) == []
    ready = ack(node, 3, FIRST_INDEX + 1)
    assert sent(ready, M.TIMEOUT_NOW) == [], "still one entry behind"
    ready = ack(node, 3, FIRST_INDEX + 2)
    (timeout_now,) = sent(ready, M.TIMEOUT_NOW)
    assert timeout_now.target == 3


def test_timeout_now_makes_the_target_campaign_at_once_past_leases() -> None:
    node = new_node(node_id=2, pre_vote=True, check_quorum=True)
    node.step(msg(M.HEARTBEAT, 1, target=2, term=FIRST_ELECTION_TERM))
    persist(node)
    node.step(msg(M.TIMEOUT_NOW, 1, target=2, term=FIRST_ELECTION_TERM))
    assert node.role == Role.CANDIDATE, "no pre-vote round: the leader asked for this"
    assert node.term == FIRST_ELECTION_TERM + 1
    requests = sent(persist(node), M.VOTE)
    assert sorted(m.target for m in requests) == [1, 3]
    assert {m.context for m in requests} == {TRANSFER_CONTEXT}


def test_stale_timeout_now_is_ignored() -> None:
    node = new_node(node_id=2)
    node.step(msg(M.HEARTBEAT, 1, target=2, term=3))
    node.step(msg(M.TIMEOUT_NOW, 1, target=2, term=2))
    assert node.role == Role.FOLLOWER
    assert node.term == 3


@pytest.mark.parametrize("pre_vote", [True, False])
def test_transfer_to_a_caught_up_follower_in_a_cluster(pre_vote: bool) -> None:
    cluster = Cluster(pre_vote=pre_vote, check_quorum=True)
    leader = cluster.elect(1)
    leader.propose(b"a")
    cluster.deliver_all()
    term = leader.term
    leader.transfer_leadership(2)
    cluster.deliver_all()
    assert cluster.leader() == 2
    assert cluster.nodes[2].term == term + 1
    assert leader.role == Role.FOLLOWER
    cluster.nodes[2].propose(b"b")
    cluster.deliver_all()
    assert all(cluster.applied_data(n) == [b"a", b"b"] for n in cluster.nodes)


def test_transfer_to_a_lagging_follower_in_a_cluster() -> None:
    cluster = Cluster()
    leader = cluster.elect(1)
    cluster.isolate(3)
    for value in (b"a", b"b", b"c"):
        leader.propose(value)
    cluster.deliver_all()
    cluster.heal()
    assert cluster.nodes[3].last_index < leader.last_index
    leader.transfer_leadership(3)
    with pytest.raises(LeadershipTransferInProgress):
        leader.propose(b"refused")
    cluster.deliver_all()
    assert cluster.leader() == 3
    assert cluster.applied_data(3) == [b"a", b"b", b"c"]


def test_proposals_and_changes_are_refused_during_a_transfer() -> None:
    node = new_node()
    make_leader(node)
    node.transfer_leadership(3)
    last = node.last_index
    with pytest.raises(LeadershipTransferInProgress) as refused:
        node.propose(b"x")
    assert refused.value.target == 3
    with pytest.raises(LeadershipTransferInProgress):
        node.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 4))
    assert node.last_index == last


def test_transfer_is_abandoned_after_an_election_timeout() -> None:
    cluster = Cluster(election_ticks=ELECTION_TICKS, check_quorum=True)
    leader = cluster.elect(1)
    cluster.isolate(3)
    leader.transfer_leadership(3)
    for _ in range(ELECTION_TICKS - 1):
        cluster.tick_all()
        assert leader.transfer_target == 3
    cluster.tick_all()
    assert leader.transfer_target == 0
    assert leader.role == Role.LEADER
    leader.propose(b"accepted again")
    cluster.deliver_all()
    assert cluster.applied_data(2) == [b"accepted again"]


def test_transfer_argument_checks() -> None:
    follower = new_node()
    with pytest.raises(NotLeader):
        follower.transfer_leadership(2)
    node = new_node(voters=(1, 2, 3), learners=(4,))
    make_leader(node)
    with pytest.raises(ProposalRefused):
        node.transfer_leadership(4)  # a learner cannot lead
    node.transfer_leadership(1)  # to ourselves: nothing to do
    assert node.transfer_target == 0
    node.propose(b"still leading")
