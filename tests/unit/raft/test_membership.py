"""Learners and one-at-a-time membership change (thesis §4.1 and §4.2.1).

A change takes effect on each node when its entry commits there; only one may be
uncommitted at once; a new leader accepts none until an entry of its own term commits.
"""

from __future__ import annotations

import pytest

from raft import (
    ConfChange,
    ConfChangeInProgress,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    InvalidConfChange,
    LeadershipTransferInProgress,
    MemoryStorage,
    Message,
    Role,
)
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import (
    BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    ack,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
    storage_of,
)

ADD_VOTER, ADD_LEARNER, REMOVE = (
    ConfChangeKind.ADD_VOTER,
    ConfChangeKind.ADD_LEARNER,
    ConfChangeKind.REMOVE,
)


def _settle(cluster: Cluster, ticks: int = 3) -> None:
    cluster.deliver_all()
    cluster.tick_all(ticks)


def _change(cluster: Cluster, kind: ConfChangeKind, node: int) -> None:
    leader = cluster.leader()
    assert leader is not None
    cluster.nodes[leader].propose_conf_change(ConfChange(kind, node))
    _settle(cluster)


# ---- learners -------------------------------------------------------------------------


def test_learner_receives_and_applies_the_log() -> None:
    cluster = Cluster(voters=(1, 2, 3), learners=(4,))
    leader = cluster.elect(1)
    for value in (b"a", b"b", b"c"):
        leader.propose(value)
    cluster.deliver_all()
    assert cluster.applied_data(4) == [b"a", b"b", b"c"]


def test_learner_never_campaigns() -> None:
    cluster = Cluster(voters=(1, 2, 3), learners=(4,), election_ticks=10)
    cluster.elect(1)
    term = cluster.nodes[1].term
    learner = cluster.nodes[4]
    cluster.isolate(4)
    for _ in range(100):
        learner.tick()
    learner.campaign()
    learner.step(msg(M.TIMEOUT_NOW, 1, target=4, term=term))
    assert learner.role == Role.FOLLOWER
    assert learner.term == term
    assert [m for m in learner.ready().messages if m.type in (M.VOTE, M.PRE_VOTE)] == []


def test_learner_acknowledgements_do_not_count_toward_commit() -> None:
    cluster = Cluster(voters=(1, 2, 3), learners=(4,))
    leader = cluster.elect(1)
    committed = leader.commit_index
    cluster.partition((1, 4), (2,), (3,))
    leader.propose(b"x")
    cluster.deliver_all()
    assert leader.progress[4].match == leader.last_index, "the learner holds the entry"
    assert leader.commit_index == committed, "but a learner is not part of any quorum"
    cluster.heal()
    cluster.tick_all(2)
    assert leader.commit_index == leader.last_index


def test_learner_votes_are_not_counted() -> None:
    node = new_node(voters=(1, 2, 3), learners=(4,), pre_vote=False)
    node.campaign()
    ready = persist(node)
    assert sorted(m.target for m in sent(ready, M.VOTE)) == [2, 3], "learners are not asked"
    node.step(msg(M.VOTE_RESPONSE, 4, term=FIRST_ELECTION_TERM))
    assert node.role == Role.CANDIDATE
    node.step(msg(M.VOTE_RESPONSE, 2, term=FIRST_ELECTION_TERM))
    assert node.role == Role.LEADER


def test_promote_learner_to_voter() -> None:
    cluster = Cluster(voters=(1, 2, 3), learners=(4,))
    cluster.elect(1)
    _change(cluster, ADD_VOTER, 4)
    for node in cluster.nodes.values():
        assert node.conf == ConfState(voters=(1, 2, 3, 4), learners=())
    # Quorum is now 3 of 4: the leader plus one voter no longer commits.
    leader = cluster.nodes[1]
    committed = leader.commit_index
    cluster.partition((1, 2), (3,), (4,))
    leader.propose(b"x")
    cluster.deliver_all()
    assert leader.commit_index == committed
    cluster.partition((1, 2, 4), (3,))
    cluster.tick_all(2)
    assert leader.commit_index == leader.last_index
    # And the promoted node may now campaign and win.
    cluster.heal()
    cluster.tick_all(2)
    cluster.nodes[1].transfer_leadership(4)
    cluster.deliver_all()
    assert cluster.leader() == 4


def test_add_a_new_learner_then_promote_it() -> None:
    cluster = Cluster(voters=(1, 2, 3))
    leader = cluster.elect(1)
    leader.propose(b"before")
    cluster.deliver_all()
    cluster.add_node(4, MemoryStorage())  # a joiner: it learns the membership from 1
    _change(cluster, ADD_LEARNER, 4)
    leader.propose(b"after")
    _settle(cluster)
    assert cluster.applied_data(4) == [b"before", b"after"]
    assert cluster.nodes[4].conf == ConfState(voters=(1, 2, 3), learners=(4,))
    _change(cluster, ADD_VOTER, 4)
    assert all(n.conf.voters == (1, 2, 3, 4) for n in cluster.nodes.values())


def test_node_joining_with_empty_storage_learns_the_membership_from_the_leader() -> None:
    """A joiner's empty log holds no membership; the founders' lives in the bootstrap
    snapshot, which the leader must send first. Entries alone would teach the joiner only
    the later change (learners=(4,)) and leave it without voters."""
    cluster = Cluster(voters=(1, 2, 3))
    leader = cluster.elect(1)
    leader.propose(b"before")
    cluster.deliver_all()
    joiner = cluster.add_node(4, MemoryStorage())  # the documented way to join
    assert joiner.conf == ConfState() and joiner.last_index == 0
    _change(cluster, ADD_LEARNER, 4)
    leader.propose(b"after")
    _settle(cluster)
    full = ConfState(voters=(1, 2, 3), learners=(4,))
    assert joiner.conf == full
    [first_snapshot, *_] = cluster.snapshots[4]
    assert (first_snapshot.meta.index, first_snapshot.meta.term) == (
        BOOTSTRAP_INDEX,
        BOOTSTRAP_TERM,
    )
    assert first_snapshot.meta.conf == cluster.initial_conf, "the founding membership"
    # Caught up: the whole log, everything applied, the leader sees it as matching.
    assert cluster.applied_data(4) == [b"before", b"after"]
    assert (joiner.last_index, joiner.commit_index) == (leader.last_index, leader.commit_index)
    assert joiner.applied_index == leader.applied_index
    assert leader.progress[4].match == leader.last_index
    assert joiner.leader == leader.id
    assert "unknown_node" not in joiner.dropped and "unknown_node" not in leader.dropped
    # And it keeps the full membership across a restart, from its own storage.
    assert cluster.restart(4).conf == full
    leader.propose(b"later")
    _settle(cluster)
    assert cluster.applied_data(4)[-1:] == [b"later"]


def test_remove_a_follower() -> None:
    cluster = Cluster(voters=(1, 2, 3))
    leader = cluster.elect(1)
    _change(cluster, REMOVE, 3)
    assert leader.conf == ConfState(voters=(1, 2))
    assert 3 not in leader.progress
    # Messages from the removed node are now dropped as coming from an unknown node.
    before = leader.dropped.get("unknown_node", 0)
    leader.step(msg(M.APPEND_RESPONSE, 3, term=leader.term, index=1))
    assert leader.dropped["unknown_node"] == before + 1
    # Quorum is 2 of 2 now.
    leader.propose(b"x")
    cluster.deliver_all()
    assert cluster.applied_data(2) == [b"x"]


def test_removed_leader_steps_down_and_the_rest_elect_a_new_one() -> None:
    cluster = Cluster(voters=(1, 2, 3), election_ticks=10)
    old = cluster.elect(1)
    old.propose_conf_change(ConfChange(REMOVE, 1))
    cluster.deliver_all()
    assert old.role == Role.FOLLOWER
    assert old.conf.voters == (2, 3)
    for _ in range(60):
        cluster.tick_all()
        if cluster.leader() in (2, 3):
            break
    new_leader = cluster.leader()
    assert new_leader in (2, 3)
    assert old.role == Role.FOLLOWER, "a removed node never campaigns"
    cluster.nodes[new_leader].propose(b"y")
    cluster.deliver_all()
    assert cluster.applied_data(2) == cluster.applied_data(3) == [b"y"]


def test_demote_a_voter_to_learner() -> None:
    cluster = Cluster(voters=(1, 2, 3))
    cluster.elect(1)
    _change(cluster, ADD_LEARNER, 3)
    assert cluster.nodes[1].conf == ConfState(voters=(1, 2), learners=(3,))
    assert cluster.nodes[1].progress[3].is_learner


def test_only_one_membership_change_at_a_time() -> None:
    node = new_node()
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # the no-op of the new term commits
    node.propose_conf_change(ConfChange(ADD_LEARNER, 4))
    with pytest.raises(ConfChangeInProgress) as refused:
        node.propose_conf_change(ConfChange(ADD_LEARNER, 5))
    assert refused.value.pending_index == FIRST_INDEX + 1
    ack(node, 2, FIRST_INDEX + 1)  # the first change commits
    assert node.conf.learners == (4,)
    node.propose_conf_change(ConfChange(ADD_LEARNER, 5))


def test_new_leader_accepts_no_change_until_an_entry_of_its_term_commits() -> None:
    # Everything in the log is already committed when the node wins.
    node = new_node(
        entries=[],
        hard_state=HardState(term=1, commit=BOOTSTRAP_INDEX),
        pre_vote=False,
    )
    make_leader(node)
    with pytest.raises(ConfChangeInProgress):
        node.propose_conf_change(ConfChange(ADD_LEARNER, 4))
    ack(node, 2, node.last_index)
    node.propose_conf_change(ConfChange(ADD_LEARNER, 4))


def test_new_leader_waits_for_earlier_uncommitted_changes() -> None:
    change = Entry(
        term=1, index=FIRST_INDEX, kind=EntryKind.CONF_CHANGE, data=ConfChange(REMOVE, 3).encode()
    )
    node = new_node(entries=[change], hard_state=HardState(term=1), pre_vote=False)
    make_leader(node)  # no-op at FIRST_INDEX + 1
    assert node.conf.voters == (1, 2, 3), "the change is not in effect until it commits"
    with pytest.raises(ConfChangeInProgress):
        node.propose_conf_change(ConfChange(ADD_LEARNER, 4))
    ack(node, 2, FIRST_INDEX + 1)
    assert node.conf.voters == (1, 2)
    node.propose_conf_change(ConfChange(ADD_LEARNER, 4))


@pytest.mark.parametrize(
    ("change", "conf"),
    [
        (ConfChange(ADD_VOTER, 2), ConfState(voters=(1, 2, 3))),
        (ConfChange(ADD_LEARNER, 4), ConfState(voters=(1, 2, 3), learners=(4,))),
        (ConfChange(REMOVE, 9), ConfState(voters=(1, 2, 3))),
        (ConfChange(ADD_VOTER, 0), ConfState(voters=(1, 2, 3))),
        (ConfChange(REMOVE, 1), ConfState(voters=(1,), learners=(2,))),
        (ConfChange(ADD_LEARNER, 1), ConfState(voters=(1,))),
    ],
    ids=[
        "voter-again",
        "learner-again",
        "remove-stranger",
        "node-zero",
        "last-voter",
        "demote-last",
    ],
)
def test_invalid_changes_are_refused_and_write_nothing(change: ConfChange, conf: ConfState) -> None:
    node = new_node(voters=conf.voters, learners=conf.learners)
    make_leader(node)
    if len(conf.voters) > 1:
        ack(node, 2, FIRST_INDEX)
    last = node.last_index
    with pytest.raises(InvalidConfChange):
        node.propose_conf_change(change)
    assert node.last_index == last
    assert persist(node).entries == ()


def test_membership_is_replayed_from_storage_on_restart() -> None:
    cluster = Cluster(voters=(1, 2, 3), learners=(4,))
    cluster.elect(1)
    _change(cluster, ADD_VOTER, 4)
    cluster.add_node(5, MemoryStorage())  # a joiner
    _change(cluster, ADD_LEARNER, 5)
    _change(cluster, REMOVE, 2)
    expected = ConfState(voters=(1, 3, 4), learners=(5,))
    for node_id in (1, 3, 4, 5):
        assert cluster.nodes[node_id].conf == expected
        restarted = cluster.restart(node_id)
        assert restarted.conf == expected, node_id
        assert sorted(restarted.progress) == [1, 3, 4, 5]
    leader = cluster.elect(3)
    leader.propose(b"z")
    cluster.deliver_all()
    assert all(cluster.applied_data(n)[-1:] == [b"z"] for n in (1, 3, 4, 5))


def test_uncommitted_change_is_not_in_effect_after_restart() -> None:
    node = new_node()
    make_leader(node)
    ack(node, 2, FIRST_INDEX)
    node.propose_conf_change(ConfChange(REMOVE, 3))
    persist(node)
    restarted = new_node(storage=storage_of(node))
    assert restarted.conf.voters == (1, 2, 3)


def _two_voters_whose_leader_demotes_itself_ahead_of_its_follower(
    lose_the_final_heartbeat: bool,
) -> Cluster:
    """Leader 1 of voters {1, 2} demotes itself; the entries it appended after the change
    do not reach 2 while the faults last. 2 must learn that the change committed, or it
    waits for a vote 1 never gives: 1's log is longer, and a learner never campaigns. So 1
    keeps leading (handing off) until 2 holds its whole log, then hands over."""
    cluster = Cluster(voters=(1, 2), election_ticks=5)
    leader = cluster.elect(1)
    index, _ = leader.propose_conf_change(ConfChange(ADD_LEARNER, 1))
    cluster.process_ready(1)  # the change goes out alone
    leader.propose(b"x")
    leader.propose(b"y")

    def lose(m: Message) -> bool:
        if m.type == M.APPEND and m.target == 2 and any(e.index > index for e in m.entries):
            return True
        return lose_the_final_heartbeat and m.type == M.HEARTBEAT and m.source == 1

    cluster.drop = lose
    cluster.deliver_all()
    assert leader.conf.voters == (2,)
    assert leader.role == Role.LEADER, "stepped down before its successor held its log"
    assert leader.transfer_target == 2
    with pytest.raises(LeadershipTransferInProgress):
        leader.propose(b"refused while handing off")
    cluster.heal()
    for _ in range(100):
        cluster.tick_all()
    return cluster


def test_departing_leader_tells_the_remaining_voter_the_change_committed() -> None:
    cluster = _two_voters_whose_leader_demotes_itself_ahead_of_its_follower(False)
    assert cluster.nodes[2].conf == ConfState(voters=(2,), learners=(1,))
    assert cluster.leader() == 2


def test_departing_leader_whose_final_heartbeat_is_lost_does_not_stall_the_cluster() -> None:
    cluster = _two_voters_whose_leader_demotes_itself_ahead_of_its_follower(True)
    assert cluster.leader() == 2
    assert cluster.nodes[2].conf == ConfState(voters=(2,), learners=(1,))
    assert cluster.nodes[1].role == Role.FOLLOWER
    assert cluster.applied_data(2) == cluster.applied_data(1) == [b"x", b"y"]
