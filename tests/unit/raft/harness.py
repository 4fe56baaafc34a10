"""A tiny synchronous network of RaftNodes for unit tests: no faults unless a test drops
messages itself. Each node persists Ready into its MemoryStorage, exactly in Ready order."""

from __future__ import annotations

import random
from collections.abc import Callable

from raft import ConfState, Entry, EntryKind, MemoryStorage, Message, RaftConfig, RaftNode, ReadState


class Cluster:
    def __init__(
        self,
        voters: tuple[int, ...] = (1, 2, 3),
        learners: tuple[int, ...] = (),
        seed: int = 1,
        **config: object,
    ) -> None:
        self.config = config
        self.seed = seed
        self.storages: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RaftNode] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.in_flight: list[Message] = []
        self.drop: Callable[[Message], bool] = lambda m: False
        conf = ConfState(voters=voters, learners=learners)
        for node_id in (*voters, *learners):
            self.add_node(node_id, MemoryStorage(conf=conf))

    def add_node(self, node_id: int, storage: MemoryStorage) -> RaftNode:
        self.storages[node_id] = storage
        node = RaftNode(
            RaftConfig(
                node_id=node_id, storage=storage, rng=random.Random(self.seed * 1000 + node_id),
                **self.config,  # type: ignore[arg-type]
            )
        )
        self.nodes[node_id] = node
        self.applied.setdefault(node_id, [])
        self.read_states.setdefault(node_id, [])
        return node

    def process_ready(self, node_id: int) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            storage = self.storages[node_id]
            if ready.snapshot is not None:
                storage.apply_snapshot(ready.snapshot)
            storage.append(ready.entries)
            if ready.hard_state is not None:
                storage.set_hard_state(ready.hard_state)
            self.in_flight.extend(m for m in ready.messages if not self.drop(m))
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
