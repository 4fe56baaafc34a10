"""SimNetwork: latency and reordering, drop, duplication, partitions (both kinds), healing."""

from __future__ import annotations

import random

import pytest

from chaos._events import EventQueue, Trace
from chaos.network import SimNetwork
from clock import SimTime
from raft import Message, MessageType

NODES = (1, 2, 3, 4, 5)


class Harness:
    def __init__(self, seed: int = 7) -> None:
        self.queue = EventQueue(SimTime())
        self.received: list[tuple[int, Message]] = []
        self.network = SimNetwork(
            random.Random(seed),
            self.queue,
            Trace(self.queue),
            lambda message: self.received.append((self.queue.now_ns, message)),
        )

    def send(self, source: int, target: int, index: int = 0) -> None:
        self.network.send(
            Message(type=MessageType.HEARTBEAT, source=source, target=target, term=1, index=index)
        )

    def run(self) -> None:
        while (action := self.queue.pop()) is not None:
            action()

    def delivered_links(self) -> set[tuple[int, int]]:
        return {(message.source, message.target) for _, message in self.received}


def test_messages_arrive_within_the_latency_bounds_and_jitter_reorders_them() -> None:
    harness = Harness()
    harness.network.set_latency(1_000, 50_000)
    for index in range(200):
        harness.send(1, 2, index)
    harness.run()
    assert len(harness.received) == 200
    assert all(1_000 <= time_ns <= 50_000 for time_ns, _ in harness.received)
    order = [message.index for _, message in harness.received]
    assert order != sorted(order), "jitter should reorder some messages"
    assert sorted(order) == list(range(200))


def test_drop_probability_one_drops_everything() -> None:
    harness = Harness()
    harness.network.drop_probability = 1.0
    for _ in range(20):
        harness.send(1, 2)
    harness.run()
    assert harness.received == []
    assert harness.network.stats.dropped_random == 20


def test_duplicate_probability_one_delivers_twice() -> None:
    harness = Harness()
    harness.network.duplicate_probability = 1.0
    for _ in range(10):
        harness.send(1, 2)
    harness.run()
    assert len(harness.received) == 20
    assert harness.network.stats.duplicated == 10


def test_symmetric_partition_cuts_both_ways_and_only_across() -> None:
    harness = Harness()
    harness.network.partition([1, 2], [3, 4, 5])
    for source in NODES:
        for target in NODES:
            if source != target:
                harness.send(source, target)
    harness.run()
    delivered = harness.delivered_links()
    assert delivered == {(1, 2), (2, 1), (3, 4), (4, 3), (3, 5), (5, 3), (4, 5), (5, 4)}


def test_one_way_partition_blocks_one_direction_only() -> None:
    harness = Harness()
    harness.network.block(1, 2)
    harness.send(1, 2)
    harness.send(2, 1)
    harness.run()
    assert harness.delivered_links() == {(2, 1)}
    assert harness.network.is_blocked(1, 2)
    assert not harness.network.is_blocked(2, 1)


def test_isolation_cuts_a_node_from_everyone() -> None:
    harness = Harness()
    harness.network.isolate(3, NODES)
    for other in (1, 2, 4, 5):
        harness.send(3, other)
        harness.send(other, 3)
    harness.send(1, 2)
    harness.run()
    assert harness.delivered_links() == {(1, 2)}


def test_a_partition_cuts_messages_already_in_flight() -> None:
    harness = Harness()
    harness.send(1, 2)
    harness.network.partition([1], [2])
    harness.run()
    assert harness.received == []
    assert harness.network.stats.dropped_partition == 1


def test_heal_restores_a_clean_network() -> None:
    harness = Harness()
    harness.network.partition([1], [2, 3])
    harness.network.drop_probability = 1.0
    harness.network.duplicate_probability = 1.0
    harness.network.set_latency(1, 2_000_000_000)
    harness.network.heal()
    harness.send(1, 2)
    harness.run()
    assert len(harness.received) == 1
    assert harness.network.blocked_links() == []


def test_the_same_seed_delivers_the_same_way() -> None:
    def deliveries(seed: int) -> list[tuple[int, int]]:
        harness = Harness(seed)
        harness.network.drop_probability = 0.3
        harness.network.duplicate_probability = 0.3
        for index in range(100):
            harness.send(1 + index % 5, 1 + (index + 1) % 5, index)
        harness.run()
        return [(time_ns, message.index) for time_ns, message in harness.received]

    assert deliveries(3) == deliveries(3)
    assert deliveries(3) != deliveries(4)


def test_latency_bounds_are_checked() -> None:
    harness = Harness()
    with pytest.raises(AssertionError):
        harness.network.set_latency(10, 5)
