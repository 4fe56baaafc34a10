"""Figure 2 "AppendEntries RPC", receiver side, one follower stepped by hand.

1. Reply false if term < currentTerm (and tell the stale leader the newer term).
2. Reply false if the log has no entry at prevLogIndex whose term is prevLogTerm (with a
   fast-backtracking hint: reject_hint/hint_term).
3. If an existing entry conflicts with a new one, delete it and all that follow.
4. Append any new entries not already in the log.
5. If leaderCommit > commitIndex: commitIndex = min(leaderCommit, index of last new entry).
Never truncate a committed entry.
"""

from __future__ import annotations

from typing import Any

import pytest

from raft import Entry, HardState, MemoryStorage, RaftNode, Role
from tests.unit.raft.single import (
    BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
    M,
    log_of,
    make_leader,
    msg,
    new_node,
    persist,
    sent,
    storage_of,
)


def _follower(*terms: int, term: int = 3, commit: int = 0, **config: Any) -> RaftNode:
    node = new_node(
        entries=log_of(*terms), hard_state=HardState(term=term, commit=commit), **config
    )
    persist(node)
    return node


def _terms(node: RaftNode) -> list[int]:
    return [node.log.term(i) for i in range(1, node.last_index + 1)]


def _entries(first_index: int, *terms: int) -> tuple[Entry, ...]:
    return tuple(
        Entry(term=t, index=first_index + k, data=b"new%d" % (first_index + k))
        for k, t in enumerate(terms)
    )


@pytest.mark.parametrize("check_quorum", [True, False])
def test_stale_leader_is_rejected_and_learns_the_new_term(check_quorum: bool) -> None:
    node = _follower(2, term=3, check_quorum=check_quorum, pre_vote=True)
    node.step(msg(M.APPEND, 2, term=2, index=2, log_term=2, entries=_entries(3, 2), commit=3))
    ready = persist(node)
    assert node.last_index == 2, "nothing appended"
    assert node.commit_index == BOOTSTRAP_INDEX, "nothing committed beyond the bootstrap"
    assert node.term == 3
    (response,) = sent(ready, M.APPEND_RESPONSE, target=2)
    assert response.term == 3, "the stale leader must learn it has been deposed"


def test_stale_leader_message_without_pre_vote_or_check_quorum_is_ignored() -> None:
    node = _follower(2, term=3, check_quorum=False, pre_vote=False)
    node.step(msg(M.APPEND, 2, term=2, index=2, log_term=2, entries=_entries(3, 2)))
    assert persist(node).messages == ()
    assert node.last_index == 2


# (follower log terms by index from 1 -- a founder's index 1 is the bootstrap snapshot at
# term 1, an empty tuple is a joiner's empty log --, prev index, prev term, expected hint
# index, expected hint term)
MISMATCH_CASES = [
    # prev index beyond our log: hint points at our last entry whose term <= prev term.
    ((1, 1, 2), 5, 2, 3, 2),
    ((1, 1, 2), 5, 3, 3, 2),
    # term mismatch at prev index: skip back over the whole conflicting term.
    ((1, 1, 4, 4, 4), 5, 3, 2, 1),
    ((1, 2, 4, 4, 4), 5, 3, 2, 2),
    # paper Figure 7 (f) against a leader of term 8 probing at index 10 (term 6).
    ((1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3), 10, 6, 10, 3),
    # nothing but the bootstrap snapshot.
    ((1,), 3, 1, 1, 1),
    # a joiner's empty log (no bootstrap): hint at index 0.
    ((), 3, 1, 0, 0),
]


@pytest.mark.parametrize(("terms", "prev_index", "prev_term", "hint", "hint_term"), MISMATCH_CASES)
def test_mismatch_at_prev_index_is_rejected_with_a_backtracking_hint(
    terms: tuple[int, ...], prev_index: int, prev_term: int, hint: int, hint_term: int
) -> None:
    if terms:
        assert terms[0] == BOOTSTRAP_TERM
        node = _follower(*terms[1:], term=8)
    else:
        joiner = MemoryStorage()
        joiner.set_hard_state(HardState(term=8))
        node = new_node(storage=joiner)
    node.step(
        msg(
            M.APPEND,
            2,
            term=8,
            index=prev_index,
            log_term=prev_term,
            entries=_entries(prev_index + 1, 8),
            commit=0,
        )
    )
    ready = persist(node)
    (response,) = sent(ready, M.APPEND_RESPONSE, target=2)
    assert response.reject
    assert response.index == prev_index
    assert (response.reject_hint, response.hint_term) == (hint, hint_term)
    assert _terms(node) == list(terms), "a rejected append changes nothing"


def test_leader_uses_the_hint_to_skip_a_whole_term_per_round_trip() -> None:
    """Leader side of fast backtracking: leader log [1,1,1,4,4,5,5,6,6,6], follower
    [1,1,1,4,4,4,4]. One rejection takes the leader straight to index 5."""
    leader = new_node(
        entries=log_of(1, 1, 4, 4, 5, 5, 6, 6, 6),
        hard_state=HardState(term=7),
        pre_vote=False,
    )
    first = make_leader(leader)
    (probe,) = sent(first, M.APPEND, target=2)
    assert (probe.index, probe.log_term) == (10, 6)
    follower = _follower(1, 1, 4, 4, 4, 4, term=7, node_id=2)
    follower.step(probe)
    (rejection,) = sent(persist(follower), M.APPEND_RESPONSE)
    assert rejection.reject
    leader.step(rejection)
    (second_probe,) = sent(persist(leader), M.APPEND, target=2)
    assert (second_probe.index, second_probe.log_term) == (5, 4)
    follower.step(second_probe)
    (accept,) = sent(persist(follower), M.APPEND_RESPONSE)
    assert not accept.reject
    assert _terms(follower) == [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 8]


def test_conflicting_suffix_is_deleted_and_new_entries_appended() -> None:
    node = _follower(1, 2, 2, 2, term=3)
    node.step(msg(M.APPEND, 2, term=3, index=2, log_term=1, entries=_entries(3, 3, 3)))
    ready = persist(node)
    assert _terms(node) == [1, 1, 3, 3]
    assert [e.index for e in ready.entries] == [3, 4]
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert not response.reject
    assert response.index == 4
    stored = storage_of(node)
    assert [stored.term(i) for i in range(1, stored.last_index() + 1)] == [1, 1, 3, 3]


def test_entries_already_held_are_not_rewritten() -> None:
    node = _follower(1, 1, 2, term=3)
    node.step(msg(M.APPEND, 2, term=3, index=1, log_term=1, entries=_entries(2, 1, 1)))
    ready = persist(node)
    assert ready.entries == (), "matching entries need no write"
    assert _terms(node) == [1, 1, 1, 2], "a shorter (old, reordered) append must not truncate"
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert response.index == 3


def test_new_entries_after_matching_ones_are_appended() -> None:
    node = _follower(1, term=3)
    node.step(msg(M.APPEND, 2, term=3, index=1, log_term=1, entries=_entries(2, 1, 3, 3)))
    ready = persist(node)
    assert [e.index for e in ready.entries] == [3, 4]
    assert _terms(node) == [1, 1, 3, 3]


@pytest.mark.parametrize(
    ("leader_commit", "entries_terms", "expected_commit"),
    [
        (4, (3, 3), 4),  # leader commit inside the new entries
        (9, (3, 3), 5),  # capped at the index of the last new entry
        (9, (), 3),  # heartbeat-like append: capped at prev index
        (2, (3,), 2),  # leader commit below prev index (and above the bootstrap)
    ],
)
def test_commit_is_min_of_leader_commit_and_last_new_entry(
    leader_commit: int, entries_terms: tuple[int, ...], expected_commit: int
) -> None:
    node = _follower(1, 1, 1, 1, 1, term=3)  # longer than what the leader sends
    appended = _entries(4, *entries_terms)
    commit = min(leader_commit, 3 + len(appended))  # a correct sender's bound
    node.step(msg(M.APPEND, 2, term=3, index=3, log_term=1, entries=appended, commit=commit))
    persist(node)
    assert node.commit_index == min(expected_commit, commit)


def test_commit_never_moves_backwards() -> None:
    node = _follower(1, 1, term=3, commit=3)
    node.step(msg(M.APPEND, 2, term=3, index=3, log_term=1, commit=1))
    persist(node)
    assert node.commit_index == 3
    node.step(msg(M.HEARTBEAT, 2, term=3, commit=1))
    persist(node)
    assert node.commit_index == 3


def test_append_below_commit_is_answered_with_the_commit_index_and_never_truncates() -> None:
    node = _follower(1, 2, 2, term=3, commit=3)
    # An append (perhaps delayed) that would replace committed entries 3.. with term 3.
    node.step(msg(M.APPEND, 2, term=3, index=1, log_term=1, entries=_entries(2, 1, 3, 3)))
    ready = persist(node)
    assert _terms(node)[:3] == [1, 1, 2], "committed entries must stay"
    (response,) = sent(ready, M.APPEND_RESPONSE)
    assert not response.reject
    assert response.index == 3


def test_follower_remembers_the_leader_and_resets_its_timer() -> None:
    node = _follower(term=3, election_ticks=10)
    for _ in range(9):
        node.tick()
    node.step(msg(M.APPEND, 2, term=3, index=1, log_term=1))
    for _ in range(9):
        node.tick()
    assert node.role == Role.FOLLOWER
    assert node.leader == 2


def test_heartbeat_commits_what_the_follower_holds_and_echoes_its_context() -> None:
    node = _follower(1, 1, 1, term=3)
    node.step(msg(M.HEARTBEAT, 2, term=3, commit=3, context=b"round-7"))
    ready = persist(node)
    assert node.commit_index == 3
    assert [e.index for e in ready.committed_entries] == [2, 3]
    (response,) = sent(ready, M.HEARTBEAT_RESPONSE)
    assert response.context == b"round-7"
