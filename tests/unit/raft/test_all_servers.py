"""Figure 2, "Rules for Servers / All Servers", plus the persistence order of Ready.

- If commitIndex > lastApplied: apply log[lastApplied+1 ..] in order (here: handed out in
  Ready.committed_entries, in order, each exactly once).
- If an RPC carries term T > currentTerm: set currentTerm = T, convert to follower (and
  the vote of the old term is forgotten).
"""

from __future__ import annotations

from typing import Any

import pytest

from raft import NO_NODE, Entry, HardState, Message, RaftNode, Role, SnapshotMeta
from tests.unit.raft.single import (
    BOOTSTRAP_INDEX,
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    log_of,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
)

HIGHER_TERM = 7


def _higher_term_messages() -> list[Any]:
    """(name, message from node 2 at a higher term, leader the receiver should then know)."""
    snapshot_chunk = msg(
        M.SNAPSHOT,
        2,
        term=HIGHER_TERM,
        snapshot_meta=SnapshotMeta(index=50, term=6),
        snapshot_size=10,
        chunk=b"01234",
        chunk_offset=0,
    )
    cases = [
        ("append", msg(M.APPEND, 2, term=HIGHER_TERM), 2),
        ("heartbeat", msg(M.HEARTBEAT, 2, term=HIGHER_TERM), 2),
        ("snapshot", snapshot_chunk, 2),
        ("append_response", msg(M.APPEND_RESPONSE, 2, term=HIGHER_TERM), NO_NODE),
        ("heartbeat_response", msg(M.HEARTBEAT_RESPONSE, 2, term=HIGHER_TERM), NO_NODE),
        ("vote_response", msg(M.VOTE_RESPONSE, 2, term=HIGHER_TERM, reject=True), NO_NODE),
        (
            "pre_vote_response_reject",
            msg(M.PRE_VOTE_RESPONSE, 2, term=HIGHER_TERM, reject=True),
            NO_NODE,
        ),
        ("snapshot_response", msg(M.SNAPSHOT_RESPONSE, 2, term=HIGHER_TERM), NO_NODE),
        ("read_index_response", msg(M.READ_INDEX_RESPONSE, 2, term=HIGHER_TERM), NO_NODE),
    ]
    return [pytest.param(message, leader, id=name) for name, message, leader in cases]


def _node_in_role(role: Role) -> RaftNode:
    node = new_node(pre_vote=False, entries=log_of(1), hard_state=HardState(term=1, commit=2))
    if role == Role.LEADER:
        make_leader(node)
    elif role == Role.CANDIDATE:
        node.campaign()
        persist(node)
    assert node.role == role
    return node


@pytest.mark.parametrize("role", [Role.FOLLOWER, Role.CANDIDATE, Role.LEADER], ids=lambda r: r.name)
@pytest.mark.parametrize(("message", "leader"), _higher_term_messages())
def test_higher_term_in_any_rpc_makes_a_follower_of_that_term(
    role: Role, message: Message, leader: int
) -> None:
    node = _node_in_role(role)
    assert node.term < HIGHER_TERM
    node.step(message)
    assert node.role == Role.FOLLOWER
    assert node.term == HIGHER_TERM
    assert node.vote == NO_NODE
    assert node.leader == leader
    ready = persist(node)
    assert ready.hard_state is not None
    assert ready.hard_state.term == HIGHER_TERM
    assert ready.hard_state.vote == NO_NODE


def test_higher_term_vote_request_converts_a_leader_when_check_quorum_is_off() -> None:
    node = new_node(pre_vote=False, check_quorum=False)
    make_leader(node)
    node.step(msg(M.VOTE, 3, term=HIGHER_TERM, index=FIRST_INDEX, log_term=FIRST_ELECTION_TERM))
    assert node.role == Role.FOLLOWER
    assert node.term == HIGHER_TERM
    # Its log (no-op at FIRST_INDEX, FIRST_ELECTION_TERM) is as up-to-date as the
    # candidate's: it votes.
    assert node.vote == 3


def test_new_term_forgets_the_vote_of_the_old_term() -> None:
    node = new_node(pre_vote=False)
    first, second = FIRST_ELECTION_TERM, FIRST_ELECTION_TERM + 1
    node.step(msg(M.VOTE, 2, term=first))
    assert persist(node).hard_state == HardState(term=first, vote=2, commit=BOOTSTRAP_INDEX)
    node.step(msg(M.HEARTBEAT, 3, term=second))
    assert node.vote == NO_NODE
    assert persist(node).hard_state == HardState(term=second, vote=NO_NODE, commit=BOOTSTRAP_INDEX)


def test_committed_entries_are_handed_out_in_order_exactly_once() -> None:
    node = new_node(entries=log_of(1, 1, 1, 1, 1), hard_state=HardState(term=1))
    persist(node)
    handed_out: list[Entry] = []
    node.step(msg(M.APPEND, 2, index=6, log_term=1, commit=3))
    handed_out += persist(node).committed_entries
    node.step(msg(M.HEARTBEAT, 2, commit=6))
    handed_out += persist(node).committed_entries
    assert [e.index for e in handed_out] == [2, 3, 4, 5, 6], "all but the bootstrap"
    assert node.applied_index == 6
    node.step(msg(M.HEARTBEAT, 2, commit=6))
    assert persist(node).committed_entries == ()


def test_committed_entries_are_split_by_the_byte_limit_but_stay_in_order() -> None:
    node = new_node(
        entries=log_of(*[1] * 10), hard_state=HardState(term=1), committed_entries_bytes_max=40
    )
    persist(node)
    node.step(msg(M.HEARTBEAT, 2, commit=11))
    batches = []
    while node.has_ready():
        ready = persist(node)
        if ready.committed_entries:
            batches.append([e.index for e in ready.committed_entries])
    assert [i for batch in batches for i in batch] == list(range(FIRST_INDEX, 12))
    assert len(batches) > 1, "the byte limit should have split the hand-out"
    assert all(len(batch) <= 2 for batch in batches)  # 18-byte entries, 40-byte limit


def test_committed_entries_are_not_handed_out_before_a_restart_point() -> None:
    """A node restarted with `applied` set skips what its state machine already holds."""
    node = new_node(entries=log_of(1, 1), hard_state=HardState(term=1, commit=3), applied=2)
    assert [e.index for e in persist(node).committed_entries] == [3]


def test_hard_state_and_the_messages_it_guards_leave_in_the_same_ready() -> None:
    """Ready says: persist hard_state/entries BEFORE sending messages. A vote and its grant
    must therefore come out together, or a crash between them could grant twice."""
    node = new_node(pre_vote=False)
    node.step(msg(M.VOTE, 2, term=3))
    ready = node.ready()
    assert ready.hard_state == HardState(term=3, vote=2, commit=BOOTSTRAP_INDEX)
    (response,) = sent(ready, M.VOTE_RESPONSE)
    assert not response.reject
    assert ready.must_sync
