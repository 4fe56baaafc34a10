"""A tiny synchronous network of RaftNodes for unit tests: no faults unless a test drops
messages itself. Each node persists Ready into its MemoryStorage, exactly in Ready order."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from raft import (
    ConfState,
    Entry,
    EntryKind,
    MemoryStorage,
    Message,
    MessageType,
    RaftConfig,
    RaftNode,
    ReadState,
    Snapshot,
)


class Cluster:
    def __init__(
        self,
        voters: tuple[int, ...] = (1, 2, 3),
        learners: tuple[int, ...] = (),
        seed: int = 1,
        **config: Any,
    ) -> None:
        self.config = config
        self.seed = seed
        self.initial_conf = ConfState(voters=voters, learners=learners)
        self.storages: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RaftNode] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.committed: dict[int, list[Entry]] = {}
        """Every committed entry each node handed out (all kinds), in order."""
        self.read_states: dict[int, list[ReadState]] = {}
        self.snapshots: dict[int, list[Snapshot]] = {}
        self.in_flight: list[Message] = []
        self.drop: Callable[[Message], bool] = lambda m: False
        self.duplicate: Callable[[Message], bool] = lambda m: False
        for node_id in (*voters, *learners):
            self.add_node(node_id, MemoryStorage(conf=self.initial_conf))

    def add_node(self, node_id: int, storage: MemoryStorage, applied: int = 0) -> RaftNode:
        self.storages[node_id] = storage
        node = RaftNode(
            RaftConfig(
                node_id=node_id,
                storage=storage,
                rng=random.Random(self.seed * 1000 + node_id),
                applied=applied,
                **self.config,
            )
        )
        self.nodes[node_id] = node
        self.applied.setdefault(node_id, [])
        self.committed.setdefault(node_id, [])
        self.read_states.setdefault(node_id, [])
        self.snapshots.setdefault(node_id, [])
        return node

    def restart(self, node_id: int) -> RaftNode:
        """Crash `node_id` (losing nothing: MemoryStorage holds all it persisted) and rebuild
        it from storage. Its state machine survives, so `applied` is what it had applied."""
        applied = self.nodes[node_id].applied_index
        self.in_flight = [m for m in self.in_flight if m.target != node_id]
        return self.add_node(node_id, self.storages[node_id], applied=applied)

    def process_ready(self, node_id: int) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            storage = self.storages[node_id]
            if ready.snapshot is not None:
                storage.apply_snapshot(ready.snapshot)
                self.snapshots[node_id].append(ready.snapshot)
            storage.append(ready.entries)
            if ready.hard_state is not None:
                storage.set_hard_state(ready.hard_state)
            check_durable_before_send(node, storage, ready.messages)
            for message in ready.messages:
                if not self.drop(message):
                    self.in_flight.append(message)
                    if self.duplicate(message):
                        self.in_flight.append(message)
            self.committed[node_id].extend(ready.committed_entries)
            self.applied[node_id].extend(
                e for e in ready.committed_entries if e.kind == EntryKind.NORMAL and e.data
            )
            self.read_states[node_id].extend(ready.read_states)
            node.advance(ready)

    def deliver_all(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            for node_id in sorted(self.nodes):
                self.process_ready(node_id)
            if not self.in_flight:
                return
            batch, self.in_flight = self.in_flight, []
            for message in batch:
                if message.target in self.nodes:
                    self.nodes[message.target].step(message)
        raise AssertionError("messages still flowing after max_rounds")

    def tick_all(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for node_id in sorted(self.nodes):
                self.nodes[node_id].tick()
            self.deliver_all()

    def elect(self, node_id: int) -> RaftNode:
        self.nodes[node_id].campaign()
        self.deliver_all()
        assert self.leader() == node_id, f"node {node_id} did not win: leader={self.leader()}"
        return self.nodes[node_id]

    def leader(self) -> int | None:
        leaders = [n for n, node in self.nodes.items() if node.role.name == "LEADER"]
        assert len(leaders) <= 1 or len({self.nodes[n].term for n in leaders}) == len(leaders)
        if not leaders:
            return None
        return max(leaders, key=lambda n: self.nodes[n].term)

    def applied_data(self, node_id: int) -> list[bytes]:
        return [e.data for e in self.applied[node_id]]

    # ---- faults, all expressed as drop rules ----

    def isolate(self, *node_ids: int) -> None:
        """Cut `node_ids` off from everyone else (they still reach each other)."""
        cut = set(node_ids)
        self.drop = lambda m: (m.source in cut) != (m.target in cut)

    def partition(self, *groups: tuple[int, ...]) -> None:
        """Only nodes of the same group reach each other; unlisted nodes reach nobody."""
        group_of = {node: index for index, group in enumerate(groups) for node in group}
        self.drop = lambda m: (
            m.source not in group_of
            or m.target not in group_of
            or group_of[m.source] != group_of[m.target]
        )

    def heal(self) -> None:
        self.drop = lambda m: False


def check_durable_before_send(
    node: RaftNode, storage: MemoryStorage, messages: tuple[Message, ...]
) -> None:
    """What a message promises must already be on stable storage when it is sent: a vote
    grant its vote, an append acknowledgement the entries it acknowledges."""
    persisted_term = storage.hard_state().term
    for message in messages:
        assert message.term >= persisted_term, (
            f"node {node.id} sent a message of term {message.term} after persisting term "
            f"{persisted_term}: it may speak of entries that term overwrote: {message}"
        )
        if message.reject:
            continue
        if message.type == MessageType.VOTE_RESPONSE:
            # A later term in the same Ready supersedes the grant, and forbids a second
            # vote in the old term just as well.
            hard_state = storage.hard_state()
            assert hard_state.term > message.term or (
                (hard_state.term, hard_state.vote) == (message.term, message.target)
            ), f"node {node.id} granted a vote not yet persisted: {hard_state}, {message}"
        elif message.type == MessageType.APPEND_RESPONSE:
            assert storage.last_index() >= message.index, (
                f"node {node.id} acknowledged {message.index}, stored {storage.last_index()}"
            )
            if message.index >= storage.first_index():
                assert storage.term(message.index) == node.log.term(message.index)
