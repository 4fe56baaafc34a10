"""Figure 2 "Followers", "Candidates" and "RequestVote RPC", with pre-vote (thesis §9.6),
randomized election timeouts and check-quorum leases (thesis §6.2)."""

from __future__ import annotations

import pytest

from raft import NO_NODE, TRANSFER_CONTEXT, HardState, RaftNode, Role
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import (
    BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    log_of,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
    storage_of,
)

ELECTION_TICKS = 10


def _ticks_until_campaign(node: RaftNode, limit: int = 100) -> int:
    for tick in range(1, limit + 1):
        node.tick()
        if node.role != Role.FOLLOWER:
            return tick
    raise AssertionError("never campaigned")


# ---- Followers: election timeout -------------------------------------------------------


def test_election_timeout_is_randomized_in_e_to_2e() -> None:
    timeouts = {
        seed: _ticks_until_campaign(new_node(seed=seed, election_ticks=ELECTION_TICKS))
        for seed in range(60)
    }
    assert all(ELECTION_TICKS <= t < 2 * ELECTION_TICKS for t in timeouts.values()), timeouts
    assert len(set(timeouts.values())) > ELECTION_TICKS // 2, "timeouts are not spread out"


def test_election_timeout_is_deterministic_for_a_seed() -> None:
    for seed in range(10):
        first = _ticks_until_campaign(new_node(seed=seed))
        again = _ticks_until_campaign(new_node(seed=seed))
        assert first == again


def test_hearing_from_the_leader_resets_the_election_timer() -> None:
    node = new_node(seed=3, election_ticks=ELECTION_TICKS)
    for _ in range(5 * ELECTION_TICKS):
        node.tick()
        node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
        persist(node)
    assert node.role == Role.FOLLOWER
    assert node.leader == 2


def test_timeout_with_pre_vote_keeps_term_and_vote_and_asks_for_pre_votes() -> None:
    node = new_node(entries=log_of(2), hard_state=HardState(term=2, vote=3), pre_vote=True)
    persist(node)
    _ticks_until_campaign(node)
    assert node.role == Role.PRE_CANDIDATE
    assert node.term == 2
    assert node.vote == 3
    ready = persist(node)
    assert ready.hard_state is None, "a pre-vote must change nothing durable"
    requests = sent(ready, M.PRE_VOTE)
    assert sorted(m.target for m in requests) == [2, 3]
    for request in requests:
        assert (request.term, request.index, request.log_term) == (3, 2, 2)
        assert request.context == b""


def test_timeout_without_pre_vote_increments_term_and_votes_for_itself() -> None:
    node = new_node(entries=log_of(2), hard_state=HardState(term=2, vote=3), pre_vote=False)
    persist(node)
    _ticks_until_campaign(node)
    assert node.role == Role.CANDIDATE
    ready = persist(node)
    assert ready.hard_state == HardState(term=3, vote=1, commit=BOOTSTRAP_INDEX)
    requests = sent(ready, M.VOTE)
    assert sorted(m.target for m in requests) == [2, 3]
    assert all((m.term, m.index, m.log_term) == (3, 2, 2) for m in requests)


def test_successful_pre_vote_starts_the_real_election() -> None:
    node = new_node(pre_vote=True)
    node.campaign()
    persist(node)
    node.step(msg(M.PRE_VOTE_RESPONSE, 2, term=FIRST_ELECTION_TERM))  # granted, in the future term
    assert node.role == Role.CANDIDATE
    assert node.term == FIRST_ELECTION_TERM
    ready = persist(node)
    assert ready.hard_state == HardState(term=FIRST_ELECTION_TERM, vote=1, commit=BOOTSTRAP_INDEX)
    assert sorted(m.target for m in sent(ready, M.VOTE)) == [2, 3]


def test_rejected_pre_vote_returns_to_follower_without_changing_term() -> None:
    node = new_node(voters=(1, 2, 3), pre_vote=True)
    node.campaign()
    persist(node)
    node.step(msg(M.PRE_VOTE_RESPONSE, 2, term=BOOTSTRAP_TERM, reject=True))
    assert node.role == Role.PRE_CANDIDATE
    node.step(msg(M.PRE_VOTE_RESPONSE, 3, term=BOOTSTRAP_TERM, reject=True))
    assert node.role == Role.FOLLOWER
    assert node.term == BOOTSTRAP_TERM


def test_a_partitioned_node_with_pre_vote_does_not_inflate_its_term() -> None:
    cluster = Cluster(pre_vote=True)
    cluster.elect(1)
    term = cluster.nodes[1].term
    cluster.isolate(3)
    cluster.tick_all(10 * ELECTION_TICKS)
    assert cluster.nodes[3].term == term
    cluster.heal()
    cluster.tick_all(2)
    assert cluster.leader() == 1
    assert cluster.nodes[1].term == term, "rejoining node disrupted the leader"


# ---- RequestVote ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [M.VOTE, M.PRE_VOTE])
def test_vote_request_of_an_older_term_is_not_granted(kind: M) -> None:
    node = new_node(hard_state=HardState(term=3), pre_vote=True)
    node.step(msg(kind, 2, term=2))
    ready = persist(node)
    assert all(m.reject for m in ready.messages)
    assert node.term == 3
    assert node.vote == NO_NODE
    if kind == M.PRE_VOTE:
        (response,) = sent(ready, M.PRE_VOTE_RESPONSE)
        assert response.term == 3, "the rejection tells the candidate the newer term"


# Voter's log: terms [1, 1, 2] (last index 3, last term 2).
UP_TO_DATE_CASES = [
    # (candidate last term, candidate last index, granted)
    (2, 3, True),  # identical
    (2, 4, True),  # same last term, longer
    (3, 1, True),  # higher last term wins even when shorter
    (2, 2, False),  # same last term, shorter
    (1, 9, False),  # lower last term loses even when longer
    (0, 0, False),  # empty log
]


@pytest.mark.parametrize("kind", [M.VOTE, M.PRE_VOTE])
@pytest.mark.parametrize(("last_term", "last_index", "granted"), UP_TO_DATE_CASES)
def test_vote_granted_only_to_an_up_to_date_log(
    kind: M, last_term: int, last_index: int, granted: bool
) -> None:
    node = new_node(entries=log_of(1, 2), hard_state=HardState(term=2))
    persist(node)
    node.step(msg(kind, 2, term=3, index=last_index, log_term=last_term))
    ready = persist(node)
    response_kind = M.VOTE_RESPONSE if kind == M.VOTE else M.PRE_VOTE_RESPONSE
    (response,) = sent(ready, response_kind, target=2)
    assert response.reject is not granted
    if kind == M.VOTE:
        assert node.term == 3
        assert node.vote == (2 if granted else NO_NODE)
    else:
        assert node.term == 2, "a pre-vote never changes the voter's term"
        assert node.vote == NO_NODE
        assert response.term == (3 if granted else 2)


def test_at_most_one_vote_per_term() -> None:
    node = new_node(voters=(1, 2, 3, 4), pre_vote=False)
    node.step(msg(M.VOTE, 2, term=FIRST_ELECTION_TERM))
    first = persist(node)
    assert not sent(first, M.VOTE_RESPONSE)[0].reject
    node.step(msg(M.VOTE, 3, term=FIRST_ELECTION_TERM))
    assert sent(persist(node), M.VOTE_RESPONSE)[0].reject
    # The same candidate asking again (its request was duplicated) is granted again.
    node.step(msg(M.VOTE, 2, term=FIRST_ELECTION_TERM))
    assert not sent(persist(node), M.VOTE_RESPONSE)[0].reject
    assert node.vote == 2


def test_vote_survives_a_restart_so_no_second_vote_in_that_term() -> None:
    node = new_node(pre_vote=False)
    node.step(msg(M.VOTE, 2, term=4))
    persist(node)
    restarted = new_node(storage=storage_of(node), pre_vote=False)
    assert (restarted.term, restarted.vote) == (4, 2)
    restarted.step(msg(M.VOTE, 3, term=4))
    assert sent(persist(restarted), M.VOTE_RESPONSE)[0].reject


def test_follower_knowing_a_leader_does_not_vote_for_another_in_the_same_term() -> None:
    node = new_node(pre_vote=False, check_quorum=False)
    node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
    node.step(msg(M.VOTE, 3, term=FIRST_ELECTION_TERM))
    assert sent(persist(node), M.VOTE_RESPONSE)[0].reject


def test_granting_a_vote_resets_the_election_timer() -> None:
    node = new_node(seed=5, pre_vote=False, election_ticks=ELECTION_TICKS)
    for _ in range(ELECTION_TICKS - 1):
        node.tick()
    node.step(msg(M.VOTE, 2, term=FIRST_ELECTION_TERM))
    persist(node)
    for _ in range(ELECTION_TICKS - 1):
        node.tick()
    assert node.role == Role.FOLLOWER


# ---- Candidates -----------------------------------------------------------------------


def test_candidate_becomes_leader_on_a_majority() -> None:
    node = new_node(voters=(1, 2, 3, 4, 5), pre_vote=False)
    node.campaign()
    persist(node)
    node.step(msg(M.VOTE_RESPONSE, 2, term=FIRST_ELECTION_TERM))
    assert node.role == Role.CANDIDATE, "2 of 5 is not a majority"
    node.step(msg(M.VOTE_RESPONSE, 4, term=FIRST_ELECTION_TERM, reject=True))
    node.step(msg(M.VOTE_RESPONSE, 2, term=FIRST_ELECTION_TERM))  # a duplicate grant counts once
    assert node.role == Role.CANDIDATE
    node.step(msg(M.VOTE_RESPONSE, 5, term=FIRST_ELECTION_TERM))
    assert node.role == Role.LEADER
    assert node.leader == 1


def test_candidate_steps_down_when_a_majority_rejects() -> None:
    node = new_node(voters=(1, 2, 3, 4, 5), pre_vote=False)
    node.campaign()
    persist(node)
    for voter in (2, 3):
        node.step(msg(M.VOTE_RESPONSE, voter, term=FIRST_ELECTION_TERM, reject=True))
    assert node.role == Role.CANDIDATE
    node.step(msg(M.VOTE_RESPONSE, 4, term=FIRST_ELECTION_TERM, reject=True))
    assert node.role == Role.FOLLOWER
    assert node.term == FIRST_ELECTION_TERM


@pytest.mark.parametrize("kind", [M.APPEND, M.HEARTBEAT])
def test_candidate_becomes_follower_on_leader_message_of_its_term(kind: M) -> None:
    node = new_node(pre_vote=False)
    node.campaign()
    persist(node)
    node.step(msg(kind, 3, term=FIRST_ELECTION_TERM))
    assert node.role == Role.FOLLOWER
    assert node.leader == 3
    assert node.term == FIRST_ELECTION_TERM
    assert node.vote == 1, "stepping down keeps the vote already cast in this term"
    assert sent(persist(node), target=3), "the leader's message is answered"


def test_candidate_ignores_leader_message_of_an_older_term() -> None:
    node = new_node(pre_vote=False, hard_state=HardState(term=4))
    node.campaign()
    persist(node)
    node.step(msg(M.APPEND, 3, term=4))
    assert node.role == Role.CANDIDATE
    assert node.term == 5


def test_candidate_starts_a_new_election_on_timeout() -> None:
    node = new_node(pre_vote=False, election_ticks=ELECTION_TICKS)
    node.campaign()
    persist(node)
    assert node.term == FIRST_ELECTION_TERM
    for _ in range(2 * ELECTION_TICKS):
        node.tick()
    assert node.role == Role.CANDIDATE
    assert node.term == FIRST_ELECTION_TERM + 1
    ready = persist(node)
    assert ready.hard_state == HardState(
        term=FIRST_ELECTION_TERM + 1, vote=1, commit=BOOTSTRAP_INDEX
    )
    assert {m.term for m in sent(ready, M.VOTE)} == {FIRST_ELECTION_TERM + 1}


def test_split_vote_is_resolved_by_a_later_election() -> None:
    cluster = Cluster(voters=(1, 2, 3, 4), pre_vote=False, check_quorum=False)
    # 1's requests reach only 3; 2's reach only 4: each gets two of four votes.
    reach = {1: {3}, 2: {4}}
    cluster.drop = lambda m: m.type == M.VOTE and m.target not in reach[m.source]
    cluster.nodes[1].campaign()
    cluster.nodes[2].campaign()
    cluster.deliver_all()
    assert cluster.leader() is None
    assert {cluster.nodes[n].role for n in (1, 2)} == {Role.CANDIDATE}
    assert cluster.nodes[1].term == cluster.nodes[2].term == FIRST_ELECTION_TERM
    cluster.heal()
    for _ in range(100):
        cluster.tick_all()
        if cluster.leader() is not None:
            break
    leader = cluster.leader()
    assert leader is not None
    assert cluster.nodes[leader].term >= FIRST_ELECTION_TERM + 1


def test_single_voter_elects_itself_at_once() -> None:
    node = new_node(voters=(1,), pre_vote=True)
    node.campaign()
    assert node.role == Role.LEADER
    assert node.term == FIRST_ELECTION_TERM
    assert node.commit_index == FIRST_INDEX, "its no-op commits with a quorum of one"


# ---- check-quorum and leases ----------------------------------------------------------


def test_leader_steps_down_without_hearing_from_a_quorum() -> None:
    cluster = Cluster(check_quorum=True, election_ticks=ELECTION_TICKS)
    leader = cluster.elect(1)
    cluster.isolate(1)
    for _ in range(2 * ELECTION_TICKS):
        leader.tick()
        cluster.deliver_all()
    assert leader.role == Role.FOLLOWER
    assert leader.leader == NO_NODE


def test_leader_keeps_leading_with_a_quorum_of_one_peer() -> None:
    cluster = Cluster(check_quorum=True, election_ticks=ELECTION_TICKS)
    cluster.elect(1)
    cluster.isolate(3)
    for _ in range(5 * ELECTION_TICKS):
        cluster.nodes[1].tick()
        cluster.nodes[2].tick()
        cluster.deliver_all()
    assert cluster.nodes[1].role == Role.LEADER


def test_leader_without_check_quorum_keeps_leading_alone() -> None:
    cluster = Cluster(check_quorum=False, pre_vote=False, election_ticks=ELECTION_TICKS)
    leader = cluster.elect(1)
    cluster.isolate(1)
    for _ in range(5 * ELECTION_TICKS):
        leader.tick()
        cluster.deliver_all()
    assert leader.role == Role.LEADER


@pytest.mark.parametrize("kind", [M.VOTE, M.PRE_VOTE])
def test_follower_in_lease_ignores_vote_requests(kind: M) -> None:
    node = new_node(check_quorum=True, pre_vote=True)
    node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
    persist(node)
    node.step(msg(kind, 3, term=5, index=9, log_term=1))
    ready = persist(node)
    assert ready.messages == ()
    assert ready.hard_state is None
    assert (node.term, node.vote, node.leader) == (FIRST_ELECTION_TERM, NO_NODE, 2)


@pytest.mark.parametrize("kind", [M.VOTE, M.PRE_VOTE])
def test_follower_in_lease_heeds_a_transfer_election(kind: M) -> None:
    node = new_node(check_quorum=True, pre_vote=True)
    node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
    persist(node)
    node.step(msg(kind, 3, term=5, index=9, log_term=1, context=TRANSFER_CONTEXT))
    response_kind = M.VOTE_RESPONSE if kind == M.VOTE else M.PRE_VOTE_RESPONSE
    (response,) = sent(persist(node), response_kind)
    assert not response.reject


def test_follower_whose_lease_expired_votes_again() -> None:
    node = new_node(check_quorum=True, pre_vote=True, election_ticks=ELECTION_TICKS)
    node.step(msg(M.HEARTBEAT, 2, term=FIRST_ELECTION_TERM))
    persist(node)
    for _ in range(ELECTION_TICKS):
        node.tick()
    persist(node)
    node.step(msg(M.PRE_VOTE, 3, term=5, index=9, log_term=1))
    (response,) = sent(persist(node), M.PRE_VOTE_RESPONSE)
    assert not response.reject


def test_leader_in_lease_ignores_a_disruptive_candidate() -> None:
    node = new_node(check_quorum=True, pre_vote=False)
    make_leader(node)
    node.step(msg(M.VOTE, 3, term=9, index=5, log_term=1))
    assert node.role == Role.LEADER
    assert node.term == FIRST_ELECTION_TERM
