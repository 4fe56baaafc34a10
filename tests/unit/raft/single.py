"""Helpers to drive one RaftNode by hand, etcd-raft style: build a node over a MemoryStorage
holding a chosen log, step hand-made Messages into it, and inspect what its Ready hands out.

`persist` plays the caller's loop for one Ready (persist, then advance) and returns the
Ready so a test can look at its messages, hard state and committed entries.
"""

from __future__ import annotations

import random
from typing import Any, cast

from raft import (
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


def log_of(*terms: int) -> list[Entry]:
    """Entries at indexes 1.. with the given terms (data names the index, for readability)."""
    return [Entry(term=term, index=i + 1, data=f"e{i + 1}".encode()) for i, term in enumerate(terms)]


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
    """A node over a MemoryStorage pre-filled with `entries` and `hard_state` (as if the
    node had persisted them before a restart)."""
    if storage is None:
        storage = MemoryStorage(conf=ConfState(voters=voters, learners=learners))
        storage.append(entries or [])
        if hard_state is not None:
            storage.set_hard_state(hard_state)
    return RaftNode(
        RaftConfig(node_id=node_id, storage=storage, rng=random.Random(seed), **config)
    )


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
        m for m in ready.messages
        if (kind is None or m.type == kind) and (target is None or m.target == target)
    ]


def msg(kind: MessageType, source: int, target: int = 1, term: int = 1, **fields: Any) -> Message:
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
        node.role, node.term, node.vote, node.leader, node.commit_index, node.applied_index,
        node.last_index, [node.log.term(i) for i in range(node.log.first_index(), node.last_index + 1)],
        node.conf, {peer: (p.match, p.next, p.state) for peer, p in node.progress.items()},
    )
