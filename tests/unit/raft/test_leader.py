"""Figure 2 "Leaders": the no-op on election, heartbeats, nextIndex/matchIndex, commit by
counting current-term entries only (§5.4.2, the Figure 8 scenario), and flow control:
pipelining bounded by inflight_messages_max, one probe at a time, batching bounded by
entries_per_message_bytes_max."""

from __future__ import annotations

import pytest

from raft import (
    Entry,
    EntryKind,
    HardState,
    Message,
    NotLeader,
    ProgressState,
    ProposalRefused,
    ProposalTooLarge,
    Role,
)
from raft.storage import entry_size
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import (
    BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    ack,
    log_of,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
)


def test_new_leader_appends_a_no_op_of_its_term_and_sends_it() -> None:
    node = new_node(entries=log_of(1), hard_state=HardState(term=1), pre_vote=False)
    ready = make_leader(node)
    assert node.term == 2
    (no_op,) = ready.entries
    assert (no_op.index, no_op.term, no_op.kind, no_op.data) == (3, 2, EntryKind.NORMAL, b"")
    for peer in (2, 3):
        (append,) = sent(ready, M.APPEND, target=peer)
        assert (append.index, append.log_term, append.entries) == (2, 1, (no_op,))


def test_heartbeats_go_out_every_heartbeat_ticks() -> None:
    node = new_node(heartbeat_ticks=3, election_ticks=30)
    make_leader(node)
    heartbeat_ticks = []
    for tick in range(1, 10):
        node.tick()
        if sent(persist(node), M.HEARTBEAT):
            heartbeat_ticks.append(tick)
    assert heartbeat_ticks == [3, 6, 9]


def test_heartbeat_carries_commit_no_further_than_the_follower_matches() -> None:
    node = new_node(heartbeat_ticks=1)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)
    assert node.commit_index == FIRST_INDEX
    node.tick()
    ready = persist(node)
    assert sent(ready, M.HEARTBEAT, target=2)[0].commit == FIRST_INDEX
    assert sent(ready, M.HEARTBEAT, target=3)[0].commit == 0, "3 may not hold the no-op yet"


def test_next_and_match_follow_acknowledgements() -> None:
    node = new_node(entries=log_of(1, 1), hard_state=HardState(term=1), pre_vote=False)
    make_leader(node)  # no-op at 4
    progress = node.progress[2]
    assert (progress.match, progress.next, progress.state) == (0, 4, ProgressState.PROBE)
    ack(node, 2, 4)
    assert (progress.match, progress.next, progress.state) == (4, 5, ProgressState.REPLICATE)
    node.propose(b"a")
    persist(node)
    assert (progress.match, progress.next) == (4, 6), "next runs ahead while pipelining"
    ack(node, 2, 3)  # an old, reordered acknowledgement changes nothing
    assert (progress.match, progress.next) == (4, 6)


def test_follower_behind_is_caught_up_after_a_heartbeat_response() -> None:
    node = new_node(heartbeat_ticks=1)
    make_leader(node)
    node.step(msg(M.HEARTBEAT_RESPONSE, 2, term=FIRST_ELECTION_TERM))
    (append,) = sent(persist(node), M.APPEND, target=2)
    assert [e.index for e in append.entries] == [FIRST_INDEX]


def test_only_the_leader_takes_proposals() -> None:
    node = new_node()
    node.step(msg(M.HEARTBEAT, 2, term=1))
    with pytest.raises(NotLeader) as refused:
        node.propose(b"x")
    assert refused.value.leader_hint == 2
    assert persist(node).entries == ()


# ---- §5.4.2: commit only by counting replicas of a current-term entry -------------------


def test_leader_does_not_commit_an_old_term_entry_by_counting_replicas() -> None:
    node = new_node(entries=log_of(2), hard_state=HardState(term=2), pre_vote=False)
    make_leader(node)  # term 3, no-op at index 3
    ack(node, 2, 2)
    ack(node, 3, 2)
    assert node.commit_index == BOOTSTRAP_INDEX, (
        "index 2 (term 2) is on every node but is not committable"
    )
    ready = ack(node, 2, 3)
    assert node.commit_index == 3, "the current-term no-op commits, and with it 2"
    assert [e.index for e in ready.committed_entries] == [2, 3]


def test_commit_needs_a_majority_of_voters() -> None:
    node = new_node(voters=(1, 2, 3, 4, 5))
    make_leader(node)
    ack(node, 2, FIRST_INDEX)
    assert node.commit_index == BOOTSTRAP_INDEX
    ack(node, 4, FIRST_INDEX)
    assert node.commit_index == FIRST_INDEX


def _campaign_until_leader(cluster: Cluster, node_id: int, attempts: int = 3) -> None:
    node = cluster.nodes[node_id]
    for _ in range(attempts):
        node.campaign()
        cluster.deliver_all()
        if node.role == Role.LEADER:
            return
    raise AssertionError(f"node {node_id} never won")


@pytest.mark.parametrize("current_term_entry_replicated", [False, True])
def test_figure_8(current_term_entry_replicated: bool) -> None:
    """Paper Figure 8 on five servers, with the paper's terms: everyone starts from the
    bootstrap (index 1, term 1). (a) S1 leads in term 2 and replicates x to S2 only. (b) S5
    is elected in term 3 by S3, S4 and writes its own entry at x's index. (c) S1 is elected
    in term 4 and copies x to S3: x is now on a majority, but from an old term. (d) If S1
    now fails, S5 can be elected (term 5) and overwrite x everywhere — so S1 must not have
    committed x. (e) If S1 first gets an entry of its own term onto a majority, x is
    committed and S5 can no longer win. x's index is one past the paper's (index 2) because
    S1's term-2 no-op, which reaches everyone, comes first."""
    x_index = FIRST_INDEX + 1
    cluster = Cluster(
        voters=(1, 2, 3, 4, 5),
        pre_vote=False,
        check_quorum=False,
        entries_per_message_bytes_max=1,  # one entry per append, so they can be cut apart
    )
    s1, s5 = cluster.nodes[1], cluster.nodes[5]
    cluster.elect(1)
    # (a)
    cluster.partition((1, 2), (3,), (4,), (5,))
    s1.propose(b"x")
    cluster.deliver_all()
    assert (s1.term, s1.log.term(x_index)) == (2, 2)
    # (b) S5 wins term 3 with S3 and S4; its no-op stays on S5 alone.
    cluster.drop = lambda m: (
        not ({m.source, m.target} <= {3, 4, 5} and m.type in (M.VOTE, M.VOTE_RESPONSE))
    )
    cluster.elect(5)
    assert (s5.term, s5.log.term(x_index)) == (3, 3)
    # (c) S1 is elected in term 4 (S3 voted in term 3, so S1 needs two tries).
    s3_has_x = False

    def drop_c(m: Message) -> bool:
        nonlocal s3_has_x
        if not {m.source, m.target} <= {1, 2, 3}:
            return True
        if m.type == M.APPEND_RESPONSE and m.source == 3 and m.index == x_index and not m.reject:
            s3_has_x = True
            return False
        carries_no_op = any(e.index == x_index + 1 for e in m.entries)
        return (
            m.type == M.APPEND
            and m.target == 3
            and carries_no_op
            and s3_has_x
            and not current_term_entry_replicated
        )

    cluster.drop = drop_c
    s5 = cluster.restart(5)  # S5 crashes (and later comes back as a follower)
    s1 = cluster.restart(1)
    _campaign_until_leader(cluster, 1)
    assert s1.term == 4
    assert s3_has_x
    assert [cluster.nodes[n].log.term_or_zero(x_index) for n in (1, 2, 3)] == [2, 2, 2]
    if not current_term_entry_replicated:
        assert s1.commit_index == x_index - 1, "x is on a majority but from term 2: not committed"
        assert b"x" not in cluster.applied_data(1)
        # (d) S1 fails; S5 is elected by S3 and S4 and overwrites x.
        cluster.partition((1,), (2,), (3, 4, 5))
        _campaign_until_leader(cluster, 5)
        assert s5.term == 5
        assert cluster.nodes[3].log.term(x_index) == 3, "x was overwritten on S3"
        assert s5.commit_index >= x_index
    else:
        assert s1.commit_index == x_index + 1
        assert b"x" in cluster.applied_data(1)
        # (e) S5 cannot win any more: S3 holds a term-4 entry.
        cluster.partition((1,), (2,), (3, 4, 5))
        for _ in range(3):
            s5.campaign()
            cluster.deliver_all()
            assert s5.role != Role.LEADER
    # Heal; everyone converges on one log, and no index was applied with two values.
    cluster.heal()
    for _ in range(200):
        cluster.tick_all()
        leader = cluster.leader()
        if leader is not None and all(
            n.commit_index == cluster.nodes[leader].last_index for n in cluster.nodes.values()
        ):
            break
    leader_id = cluster.leader()
    assert leader_id is not None
    cluster.nodes[leader_id].propose(b"after")
    cluster.deliver_all()
    outcomes = {tuple(cluster.applied_data(n)) for n in cluster.nodes}
    assert len(outcomes) == 1, outcomes
    (applied,) = outcomes
    assert (b"x" in applied) == current_term_entry_replicated
    assert applied[-1] == b"after"


# ---- flow control ---------------------------------------------------------------------


def test_replicate_state_pipelines_up_to_the_in_flight_limit() -> None:
    node = new_node(inflight_messages_max=3)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # the no-op
    assert node.progress[2].state == ProgressState.REPLICATE
    appends = []
    for value in (b"a", b"b", b"c", b"d", b"e"):
        node.propose(value)
        appends += sent(persist(node), M.APPEND, target=2)
    assert [[e.index for e in m.entries] for m in appends] == [[3], [4], [5]]
    assert node.progress[2].inflights.full()
    # One acknowledgement frees a slot; the rest go out in one batch.
    ready = ack(node, 2, 3)
    appends = sent(ready, M.APPEND, target=2)
    assert [[e.index for e in m.entries] for m in appends] == [[6, 7]]


def test_probe_state_sends_one_append_at_a_time() -> None:
    node = new_node()
    first = make_leader(node)
    assert len(sent(first, M.APPEND, target=3)) == 1
    assert node.progress[3].state == ProgressState.PROBE
    for value in (b"a", b"b", b"c"):
        node.propose(value)
    assert sent(persist(node), M.APPEND, target=3) == [], "waits for the probe's answer"
    ready = ack(node, 3, FIRST_INDEX)  # the no-op
    assert node.progress[3].state == ProgressState.REPLICATE
    (append,) = sent(ready, M.APPEND, target=3)
    assert [e.index for e in append.entries] == [3, 4, 5]


def test_rejected_probe_backs_off_and_probes_again() -> None:
    node = new_node(entries=log_of(1, 1, 1), hard_state=HardState(term=1), pre_vote=False)
    make_leader(node)  # no-op at 5; probe to 2 at index 4
    node.step(msg(M.APPEND_RESPONSE, 2, term=2, index=4, reject=True, reject_hint=2, hint_term=1))
    (probe,) = sent(persist(node), M.APPEND, target=2)
    assert (probe.index, probe.log_term) == (2, 1)
    assert [e.index for e in probe.entries] == [3, 4, 5]
    # A duplicate of the same rejection is stale now and changes nothing.
    node.step(msg(M.APPEND_RESPONSE, 2, term=2, index=4, reject=True, reject_hint=2, hint_term=1))
    assert sent(persist(node), M.APPEND, target=2) == []


def test_rejection_in_replicate_state_falls_back_to_probe() -> None:
    node = new_node()
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # the no-op
    node.propose(b"a")
    node.propose(b"b")
    persist(node)
    node.step(
        msg(
            M.APPEND_RESPONSE,
            2,
            term=FIRST_ELECTION_TERM,
            index=3,
            reject=True,
            reject_hint=FIRST_INDEX,
            hint_term=FIRST_ELECTION_TERM,
        )
    )
    ready = persist(node)
    assert node.progress[2].state == ProgressState.PROBE
    (probe,) = sent(ready, M.APPEND, target=2)
    assert probe.index == FIRST_INDEX
    assert [e.index for e in probe.entries] == [3, 4]


def test_batches_are_bounded_by_entries_per_message_bytes_max() -> None:
    big = [Entry(term=1, index=i, data=bytes(50)) for i in range(FIRST_INDEX, FIRST_INDEX + 10)]
    limit = 2 * entry_size(big[0]) + 10  # room for two entries, not three
    node = new_node(
        entries=big,
        hard_state=HardState(term=1),
        pre_vote=False,
        entries_per_message_bytes_max=limit,
    )
    make_leader(node)  # no-op at 12
    # A follower holding only the bootstrap.
    node.step(
        msg(
            M.APPEND_RESPONSE,
            2,
            term=2,
            index=11,
            reject=True,
            reject_hint=BOOTSTRAP_INDEX,
            hint_term=BOOTSTRAP_TERM,
        )
    )
    ready = persist(node)
    (probe,) = sent(ready, M.APPEND, target=2)
    assert [e.index for e in probe.entries] == [2, 3]
    ready = ack(node, 2, 3)
    batches = [[e.index for e in m.entries] for m in sent(ready, M.APPEND, target=2)]
    assert batches == [[4, 5], [6, 7], [8, 9], [10, 11], [12]]
    for m in sent(ready, M.APPEND, target=2):
        assert sum(entry_size(e) for e in m.entries) <= limit


def test_an_entry_larger_than_the_batch_limit_still_goes_alone() -> None:
    node = new_node(entries_per_message_bytes_max=20, entry_bytes_max=1000)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)
    node.propose(bytes(500))
    (append,) = sent(persist(node), M.APPEND, target=2)
    assert [len(e.data) for e in append.entries] == [500]


def test_pipelined_cluster_replicates_everything_in_order() -> None:
    cluster = Cluster(inflight_messages_max=2, entries_per_message_bytes_max=40)
    leader = cluster.elect(1)
    values = [b"v%d" % i for i in range(40)]
    for value in values:
        leader.propose(value)
    cluster.deliver_all()
    for node_id in cluster.nodes:
        assert cluster.applied_data(node_id) == values


def test_oversized_proposal_is_refused() -> None:
    node = new_node(entry_bytes_max=10)
    make_leader(node)
    last = node.last_index
    with pytest.raises(ProposalTooLarge):
        node.propose(bytes(11))
    assert node.last_index == last
    node.propose(bytes(10))


def test_uncommitted_bytes_limit_applies_backpressure_until_commit() -> None:
    node = new_node(uncommitted_entries_bytes_max=100)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)  # its no-op
    accepted = 0
    with pytest.raises(ProposalRefused):
        for _ in range(10):
            node.propose(bytes(20))  # 36 bytes each, counted with overhead
            accepted += 1
    assert accepted == 2
    persist(node)
    ack(node, 2, node.last_index)  # they commit: the budget is free again
    node.propose(bytes(20))


def test_stale_ack_is_dropped_when_a_newer_term_overwrites_what_it_acknowledges() -> None:
    """A follower acknowledges an entry, then — before its Ready is persisted — a newer
    leader truncates that entry. The old acknowledgement would describe a log that was
    never stored, so it must not leave: messages queued in an older term are dropped when
    the term changes (losing a message is always safe; sending it would break 'persist,
    then send'). The old leader then cannot commit the entry."""
    cluster = Cluster(voters=(1, 2, 3, 4, 5), pre_vote=False, check_quorum=False)
    old = cluster.elect(1)
    old.propose(b"e")
    cluster.drop = lambda m: m.source == 1 and m.target != 2
    cluster.process_ready(1)
    (append,) = cluster.in_flight
    cluster.in_flight = []
    cluster.nodes[2].step(append)  # 2 holds e and queues its acknowledgement...
    cluster.drop = lambda m: 1 in (m.source, m.target) or (m.source == 2 and m.target != 1)
    new = cluster.nodes[3]
    e_index, old_term, new_term = FIRST_INDEX + 1, FIRST_ELECTION_TERM, FIRST_ELECTION_TERM + 1
    assert (old.term, old.log.term(e_index)) == (old_term, old_term)
    new.campaign()  # ...while 3 wins new_term with 3, 4, 5 and overwrites e_index on 2
    for node_id in (3, 4, 5):
        cluster.process_ready(node_id)
    while cluster.in_flight:
        batch, cluster.in_flight = cluster.in_flight, []
        for message in batch:
            cluster.nodes[message.target].step(message)
        for node_id in (3, 4, 5):
            cluster.process_ready(node_id)
    assert new.role == Role.LEADER
    assert new.term == new_term
    assert cluster.nodes[2].log.term(e_index) == new_term, (
        "2 stepped the new leader's append (unpersisted)"
    )
    cluster.drop = lambda m: False
    cluster.process_ready(2)
    stale = [m for m in cluster.in_flight if m.target == 1 and m.type == M.APPEND_RESPONSE]
    assert stale == [], "the stale acknowledgement must not leave"
    assert cluster.storages[2].term(e_index) == new_term, (
        "what 2 stored at e_index is new_term's entry"
    )
    cluster.deliver_all()
    assert old.commit_index == e_index - 1, "the old leader cannot commit e with it"
    cluster.tick_all(5)
    assert all(b"e" not in cluster.applied_data(n) for n in cluster.nodes)
