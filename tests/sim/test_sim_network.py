"""The simulator's network (ipc.sim's fabric on the event queue) carrying raft messages:
latency, reordering as a fault, drop, duplication, corruption, partitions, healing."""

from __future__ import annotations

import random

import pytest

from chaos._events import EventQueue
from chaos.driver import RAFT_TAG
from chaos.network import QueueScheduler, SimFabric, SimTransport
from clock import SimTime
from ipc.codec import cluster_id_for
from ipc.transport import Received
from raft import Entry, Message, MessageType

NODES = (1, 2, 3, 4, 5)


class Harness:
    def __init__(self, seed: int = 7) -> None:
        self.queue = EventQueue(SimTime())
        scheduler = QueueScheduler(self.queue)
        self.fabric = SimFabric(random.Random(seed), scheduler, cluster_id_for("t"))
        self.received: list[tuple[int, Message]] = []
        self.transports = {node: self._transport(node) for node in NODES}

    def _transport(self, node: int) -> SimTransport:
        def ready() -> None:
            for delivery in self.transports[node].poll():
                assert isinstance(delivery, Received)
                self.received.append((self.queue.now_ns, delivery.message))

        return SimTransport(self.fabric, node, messages={RAFT_TAG: Message}, on_ready=ready)

    def send(self, source: int, target: int, index: int = 0) -> None:
        message = Message(
            type=MessageType.APPEND, source=source, target=target, term=1, index=index,
            entries=(Entry(1, index + 1, data=b"x"),),
        )
        self.transports[source].send(target, message)

    def run(self) -> None:
        while (action := self.queue.pop()) is not None:
            action()

    def delivered_links(self) -> set[tuple[int, int]]:
        return {(message.source, message.target) for _, message in self.received}


def test_messages_arrive_intact_within_the_latency_bounds_and_in_order_without_reorder() -> None:
    harness = Harness()
    harness.fabric.set_latency(1_000, 50_000)
    for index in range(200):
        harness.send(1, 2, index)
    harness.run()
    assert all(1_000 <= time_ns <= 50_000 for time_ns, _ in harness.received)
    assert [message.index for _, message in harness.received] == list(range(200))
    assert harness.received[5][1].entries == (Entry(1, 6, data=b"x"),)


def test_reorder_lets_jitter_reorder_a_link() -> None:
    harness = Harness()
    harness.fabric.set_latency(1_000, 50_000)
    harness.fabric.reorder = True
    for index in range(200):
        harness.send(1, 2, index)
    harness.run()
    order = [message.index for _, message in harness.received]
    assert order != sorted(order), "jitter should reorder some messages"
    assert sorted(order) == list(range(200))


def test_drop_probability_one_drops_everything() -> None:
    harness = Harness()
    harness.fabric.drop_probability = 1.0
    for _ in range(20):
        harness.send(1, 2)
    harness.run()
    assert harness.received == []
    assert harness.fabric.stats.dropped_random == 20


def test_duplicate_probability_one_delivers_twice() -> None:
    harness = Harness()
    harness.fabric.duplicate_probability = 1.0
    for _ in range(10):
        harness.send(1, 2)
    harness.run()
    assert len(harness.received) == 20
    assert harness.fabric.stats.duplicated == 10


def test_corrupted_frames_are_refused_by_the_receiver_and_counted() -> None:
    harness = Harness()
    harness.fabric.corrupt_probability = 1.0
    for index in range(50):
        harness.send(1, 2, index)
    harness.run()
    assert harness.received == []
    assert harness.fabric.stats.corrupted == 50
    assert sum(harness.transports[2].stats().errors.values()) == 50
    harness.fabric.heal()
    harness.send(1, 2, 99)
    harness.run()
    assert [message.index for _, message in harness.received] == [99]


def test_symmetric_partition_cuts_both_ways_and_only_across() -> None:
    harness = Harness()
    harness.fabric.partition([1, 2], [3, 4, 5])
    for source in NODES:
        for target in NODES:
            if source != target:
                harness.send(source, target)
    harness.run()
    delivered = harness.delivered_links()
    assert delivered == {(1, 2), (2, 1), (3, 4), (4, 3), (3, 5), (5, 3), (4, 5), (5, 4)}


def test_one_way_partition_blocks_one_direction_only() -> None:
    harness = Harness()
    harness.fabric.block(1, 2)
    harness.send(1, 2)
    harness.send(2, 1)
    harness.run()
    assert harness.delivered_links() == {(2, 1)}
    assert harness.fabric.is_blocked(1, 2)
    assert not harness.fabric.is_blocked(2, 1)


def test_isolation_cuts_a_node_from_everyone() -> None:
    harness = Harness()
    harness.fabric.isolate(3, NODES)
    for other in (1, 2, 4, 5):
        harness.send(3, other)
        harness.send(other, 3)
    harness.send(1, 2)
    harness.run()
    assert harness.delivered_links() == {(1, 2)}


def test_a_partition_cuts_messages_already_in_flight() -> None:
    harness = Harness()
    harness.send(1, 2)
    harness.fabric.partition([1], [2])
    harness.run()
    assert harness.received == []
    assert harness.fabric.stats.dropped_partition == 1


def test_heal_restores_a_clean_network() -> None:
    harness = Harness()
    fabric = harness.fabric
    fabric.partition([1], [2, 3])
    fabric.drop_probability = fabric.duplicate_probability = fabric.corrupt_probability = 1.0
    fabric.reorder = True
    fabric.set_latency(1, 2_000_000_000)
    fabric.heal()
    harness.send(1, 2)
    harness.run()
    assert len(harness.received) == 1
    assert fabric.blocked_links() == []
    assert not fabric.reorder


def test_the_same_seed_delivers_the_same_way() -> None:
    def deliveries(seed: int) -> list[tuple[int, int]]:
        harness = Harness(seed)
        fabric = harness.fabric
        fabric.drop_probability = fabric.duplicate_probability = 0.3
        fabric.corrupt_probability = 0.1
        fabric.reorder = True
        for index in range(100):
            harness.send(1 + index % 5, 1 + (index + 1) % 5, index)
        harness.run()
        return [(time_ns, message.index) for time_ns, message in harness.received]

    assert deliveries(3) == deliveries(3)
    assert deliveries(3) != deliveries(4)


def test_latency_bounds_are_checked() -> None:
    harness = Harness()
    with pytest.raises(AssertionError):
        harness.fabric.set_latency(10, 5)
