"""Helpers to drive one RaftNode by hand, etcd-raft style: build a node over a MemoryStorage
holding a chosen log, step hand-made Messages into it, and inspect what its Ready hands out.

`persist` plays the caller's loop for one Ready (persist, then advance) and returns the
Ready so a test can look at its messages, hard state and committed entries.
"""

from __future__ import annotations

import random
from typing import Any, cast

from raft import (
    BOOTSTRAP_INDEX,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
)

M = MessageType


BOOTSTRAP_TERM = BOOTSTRAP_INDEX
"""A founder's storage starts from the bootstrap snapshot at (BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
with hard state (term=BOOTSTRAP_TERM, commit=BOOTSTRAP_INDEX)."""

FIRST_INDEX = BOOTSTRAP_INDEX + 1
"""Where a founder's first real entry goes."""

FIRST_ELECTION_TERM = BOOTSTRAP_TERM + 1
"""The term a fresh founder's first election goes to."""


def log_of(*terms: int) -> list[Entry]:
    """Entries at indexes FIRST_INDEX.. (right after the bootstrap snapshot, which holds
    index 1 at term 1) with the given terms (data names the index, for readability). So
    `log_of(1, 2)` is the log whose terms by index 1, 2, 3 are 1 (bootstrap), 1, 2."""
    assert all(term >= BOOTSTRAP_TERM for term in terms), terms
    assert list(terms) == sorted(terms), f"log terms never decrease: {terms}"
    return [
        Entry(term=term, index=index, data=f"e{index}".encode())
        for index, term in enumerate(terms, start=FIRST_INDEX)
    ]


def new_node(
    node_id: int = 1,
    voters: tuple[int, ...] = (1, 2, 3),
    learners: tuple[int, ...] = (),
    *,
    entries: list[Entry] | None = None,
    hard_state: HardState | None = None,
    storage: MemoryStorage | None = None,
    seed: int = 0,
    **config: Any,
) -> RaftNode:
    """A founding member over a MemoryStorage pre-filled with `entries` (after the bootstrap
    snapshot: see `log_of`) and `hard_state` (as if the node had persisted them before a
    restart). A founder's commit is never below the bootstrap, so a `hard_state` commit
    below BOOTSTRAP_INDEX (such as the default 0) stands for "nothing committed since"."""
    if storage is None:
        storage = MemoryStorage(conf=ConfState(voters=voters, learners=learners))
        assert not entries or entries[0].index == FIRST_INDEX, "entries start after the bootstrap"
        storage.append(entries or [])
        if hard_state is not None:
            assert hard_state.term >= BOOTSTRAP_TERM, hard_state
            if hard_state.commit < BOOTSTRAP_INDEX:
                hard_state = HardState(hard_state.term, hard_state.vote, BOOTSTRAP_INDEX)
            storage.set_hard_state(hard_state)
    return RaftNode(RaftConfig(node_id=node_id, storage=storage, rng=random.Random(seed), **config))


def storage_of(node: RaftNode) -> MemoryStorage:
    return cast(MemoryStorage, node.config.storage)


def persist(node: RaftNode) -> Ready:
    """Handle one Ready the way the caller's loop must: persist, (send), apply, advance."""
    ready = node.ready()
    storage = storage_of(node)
    if ready.snapshot is not None:
        storage.apply_snapshot(ready.snapshot)
    storage.append(ready.entries)
    if ready.hard_state is not None:
        storage.set_hard_state(ready.hard_state)
    node.advance(ready)
    return ready


def sent(ready: Ready, kind: MessageType | None = None, target: int | None = None) -> list[Message]:
    return [
        m
        for m in ready.messages
        if (kind is None or m.type == kind) and (target is None or m.target == target)
    ]


def msg(kind: MessageType, source: int, target: int = 1, term: int = 1, **fields: Any) -> Message:
    """A message; a vote request without (index, log_term) comes from a candidate whose log
    is a fresh founder's: just the bootstrap snapshot."""
    if kind in (MessageType.VOTE, MessageType.PRE_VOTE) and "index" not in fields:
        fields = {"index": BOOTSTRAP_INDEX, "log_term": BOOTSTRAP_TERM, **fields}
    return Message(type=kind, source=source, target=target, term=term, **fields)


def make_leader(node: RaftNode) -> Ready:
    """Campaign (pre-vote when enabled) and feed in grants from every other voter until
    the node leads; returns the Ready holding its first appends (already persisted)."""
    node.campaign()
    for _ in range(2):  # pre-vote round, then the real round
        if node.role == Role.LEADER:
            break
        ready = persist(node)
        for request in ready.messages:
            if request.type == M.PRE_VOTE:
                node.step(msg(M.PRE_VOTE_RESPONSE, request.target, node.id, request.term))
            elif request.type == M.VOTE:
                node.step(msg(M.VOTE_RESPONSE, request.target, node.id, request.term))
    assert node.role == Role.LEADER, node.role
    return persist(node)


def ack(node: RaftNode, source: int, index: int) -> Ready:
    """`source` acknowledges the leader's log up to `index`; returns the resulting Ready."""
    node.step(msg(M.APPEND_RESPONSE, source, node.id, node.term, index=index))
    return persist(node)


def observable_state(node: RaftNode) -> tuple[Any, ...]:
    """Everything a message could change: role, term, vote, leader, commit/apply, the log,
    membership and the leader's view of its followers."""
    return (
        node.role,
        node.term,
        node.vote,
        node.leader,
        node.commit_index,
        node.applied_index,
        node.last_index,
        [node.log.term(i) for i in range(node.log.first_index(), node.last_index + 1)],
        node.conf,
        {peer: (p.match, p.next, p.state) for peer, p in node.progress.items()},
    )
