"""Bad input from the network: a message from an unknown node, or with a field no correct
peer could send, is dropped and counted under a named reason in `node.dropped` — never
applied, never a change of term, never an exception."""

from __future__ import annotations

from typing import Any

import pytest

from raft import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    RaftNode,
    Role,
    SnapshotMeta,
)
from tests.unit.raft.harness import Cluster
from tests.unit.raft.single import (
    FIRST_ELECTION_TERM,
    FIRST_INDEX,
    M,
    ack,
    log_of,
    make_leader,
    msg,
    new_node,
    observable_state,
    persist,
)

CONF = ConfState(voters=(1, 2, 3))
META = SnapshotMeta(index=10, term=2, conf=CONF)


def _follower() -> RaftNode:
    """Follower of leader 2 in term 2 with log terms [1, 1, 2], commit 1."""
    node = new_node(
        entries=log_of(1, 2),
        hard_state=HardState(term=2, commit=1),
        snapshot_bytes_max=1000,
    )
    node.step(msg(M.HEARTBEAT, 2, term=2, commit=1))
    persist(node)
    assert not node.has_ready()
    return node


def _leader() -> RaftNode:
    node = new_node(snapshot_bytes_max=1000)
    make_leader(node)
    ack(node, 2, FIRST_INDEX)
    assert not node.has_ready()
    return node


def _append(term: int = 2, index: int = 3, log_term: int = 2, **fields: Any) -> Message:
    return msg(M.APPEND, 2, term=term, index=index, log_term=log_term, **fields)


def _chunk(**fields: Any) -> Message:
    base: dict[str, Any] = {
        "term": 2,
        "snapshot_meta": META,
        "snapshot_size": 10,
        "chunk": b"0123456789",
        "chunk_done": True,
    }
    base.update(fields)
    return msg(M.SNAPSHOT, 2, **base)


BAD_CONF_CHANGE = Entry(term=2, index=4, kind=EntryKind.CONF_CHANGE, data=b"\xc1 not msgpack")

# (id, message, reason). Messages come "from" node 2 (the leader) unless the case is about
# the sender; a higher term is used where a valid message would have changed our term.
FOLLOWER_CASES = [
    ("unknown-node", msg(M.APPEND, 9, term=2, index=3, log_term=2), "unknown_node"),
    ("unknown-node-vote", msg(M.VOTE, 9, term=5, index=9, log_term=4), "unknown_node"),
    ("wrong-target", msg(M.APPEND, 2, target=3, term=2), "wrong_target"),
    ("source-zero", msg(M.APPEND, 0, term=2), "bad_source"),
    ("source-self", msg(M.APPEND, 1, term=2), "bad_source"),
    ("source-negative", msg(M.APPEND, -2, term=2), "bad_source"),
    ("negative-term", _append(term=-1, log_term=0), "negative_field"),
    ("negative-index", _append(index=-1), "negative_field"),
    ("negative-log-term", _append(log_term=-1), "negative_field"),
    ("negative-commit", _append(commit=-1), "negative_field"),
    ("negative-hint", msg(M.APPEND_RESPONSE, 2, term=2, reject_hint=-1), "negative_field"),
    ("negative-hint-term", msg(M.APPEND_RESPONSE, 2, term=2, hint_term=-3), "negative_field"),
    ("negative-chunk-offset", _chunk(chunk_offset=-1), "negative_field"),
    ("negative-snapshot-size", _chunk(snapshot_size=-1), "negative_field"),
    ("negative-term-vote", msg(M.VOTE, 3, term=-5), "negative_field"),
    (
        "commit-beyond-sender-log",
        _append(term=3, entries=(Entry(3, 4),), commit=5),
        "commit_beyond_sender_log",
    ),
    ("commit-beyond-sender-log-empty", _append(term=3, commit=4), "commit_beyond_sender_log"),
    ("entries-skip-ahead", _append(entries=(Entry(2, 5),)), "entries_not_contiguous"),
    ("entries-overlap-prev", _append(entries=(Entry(2, 3),)), "entries_not_contiguous"),
    (
        "entries-repeat",
        _append(entries=(Entry(2, 4), Entry(2, 4))),
        "entries_not_contiguous",
    ),
    (
        "entry-term-decreases",
        _append(term=3, entries=(Entry(3, 4), Entry(2, 5))),
        "entry_term_out_of_order",
    ),
    (
        "entry-term-before-prev",
        _append(index=3, log_term=2, entries=(Entry(1, 4),)),
        "entry_term_out_of_order",
    ),
    ("entry-term-beyond-term", _append(entries=(Entry(3, 4),)), "entry_term_out_of_order"),
    ("log-term-beyond-term", _append(log_term=3), "log_term_beyond_term"),
    ("vote-log-term-beyond-term", msg(M.VOTE, 3, term=5, log_term=6), "log_term_beyond_term"),
    (
        "pre-vote-log-term-beyond-term",
        msg(M.PRE_VOTE, 3, term=3, log_term=4),
        "log_term_beyond_term",
    ),
    ("snapshot-without-meta", _chunk(snapshot_meta=None), "bad_snapshot_meta"),
    (
        "snapshot-at-index-zero",
        _chunk(snapshot_meta=SnapshotMeta(index=0, term=1)),
        "bad_snapshot_meta",
    ),
    (
        "snapshot-term-beyond-term",
        _chunk(snapshot_meta=SnapshotMeta(index=10, term=3, conf=CONF)),
        "bad_snapshot_meta",
    ),
    ("chunk-beyond-snapshot", _chunk(chunk_offset=5), "chunk_beyond_snapshot"),
    ("chunk-longer-than-snapshot", _chunk(snapshot_size=4), "chunk_beyond_snapshot"),
    (
        "snapshot-too-large",
        _chunk(snapshot_size=10_000, chunk_done=False),
        "snapshot_too_large",
    ),
    (
        "heartbeat-commit-beyond-log",
        msg(M.HEARTBEAT, 2, term=2, commit=4),
        "commit_beyond_log",
    ),
    (
        "conf-change-of-node-zero",
        _append(
            entries=(
                Entry(2, 4, EntryKind.CONF_CHANGE, ConfChange(ConfChangeKind.REMOVE, 0).encode()),
            ),
        ),
        "bad_conf_change",
    ),
    (
        "undecodable-conf-change",
        _append(entries=(BAD_CONF_CHANGE,), commit=4),
        "bad_conf_change",
    ),
]


@pytest.mark.parametrize(
    ("message", "reason"), [c[1:] for c in FOLLOWER_CASES], ids=[c[0] for c in FOLLOWER_CASES]
)
def test_follower_drops_and_counts_impossible_messages(message: Message, reason: str) -> None:
    node = _follower()
    before = observable_state(node)
    node.step(message)
    assert node.dropped == {reason: 1}
    assert observable_state(node) == before
    assert not node.has_ready(), "nothing to persist, send or apply"


LEADER_TERM = FIRST_ELECTION_TERM
"""The term `_leader()` leads in: a fresh founder's first election."""

LEADER_CASES = [
    ("ack-beyond-log", msg(M.APPEND_RESPONSE, 2, term=LEADER_TERM, index=99), "ack_beyond_log"),
    (
        "unknown-node-ack",
        msg(M.APPEND_RESPONSE, 7, term=LEADER_TERM, index=FIRST_INDEX),
        "unknown_node",
    ),
    ("unknown-node-read", msg(M.READ_INDEX, 7, term=LEADER_TERM, context=b"r"), "unknown_node"),
    (
        "second-leader",
        msg(M.APPEND, 2, term=LEADER_TERM, index=FIRST_INDEX, log_term=LEADER_TERM),
        "second_leader_in_term",
    ),
    ("second-leader-heartbeat", msg(M.HEARTBEAT, 3, term=LEADER_TERM), "second_leader_in_term"),
    ("negative-term-response", msg(M.HEARTBEAT_RESPONSE, 2, term=-1), "negative_field"),
]


@pytest.mark.parametrize(
    ("message", "reason"), [c[1:] for c in LEADER_CASES], ids=[c[0] for c in LEADER_CASES]
)
def test_leader_drops_and_counts_impossible_messages(message: Message, reason: str) -> None:
    node = _leader()
    before = observable_state(node)
    node.step(message)
    assert node.dropped == {reason: 1}
    assert observable_state(node) == before
    assert not node.has_ready()


def test_dropped_counts_accumulate_per_reason() -> None:
    node = _follower()
    for _ in range(3):
        node.step(msg(M.APPEND, 9, term=2))
    node.step(_append(term=-1))
    assert node.dropped == {"unknown_node": 3, "negative_field": 1}


def test_ack_beyond_the_snapshot_is_dropped() -> None:
    cluster = Cluster(snapshot_chunk_bytes_max=4)
    leader = cluster.elect(1)
    cluster.isolate(3)
    leader.propose(b"a")
    cluster.deliver_all()
    cluster.storages[1].create_snapshot(leader.applied_index, leader.conf, b"0123456789")
    cluster.storages[1].compact(leader.applied_index)
    cluster.drop = lambda m: m.type == M.SNAPSHOT  # the chunks are lost: stays in SNAPSHOT
    cluster.tick_all(1)
    meta = cluster.storages[1].snapshot().meta
    assert leader.progress[3].transfer is not None
    leader.step(msg(M.SNAPSHOT_RESPONSE, 3, term=leader.term, snapshot_meta=meta, chunk_offset=11))
    assert leader.dropped == {"ack_beyond_snapshot": 1}


def test_a_valid_conf_change_entry_still_passes() -> None:
    node = _follower()
    change = Entry(
        term=2,
        index=4,
        kind=EntryKind.CONF_CHANGE,
        data=ConfChange(ConfChangeKind.ADD_LEARNER, 4).encode(),
    )
    node.step(_append(entries=(change,), commit=4))
    persist(node)
    assert node.dropped == {}
    assert node.conf.learners == (4,)
    assert node.role == Role.FOLLOWER
