"""A simulated network between the nodes of one group, driven by the simulator's seed.

Each message sent is planned at once: blocked by a partition rule, dropped at random,
or scheduled for delivery after a latency drawn from [latency_min, latency_max] (jitter
reorders messages), perhaps twice (duplication). Partition rules are directed
source -> target blocks, so one-way partitions are first-class; a symmetric partition and
leader isolation are sets of such rules. A rule is checked again at delivery time, so a
partition that starts while a message is in flight cuts it too.

Invariant: every decision comes from the network's own seeded `random.Random`, drawn in
send order, so the same sends give the same deliveries in every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chaos._events import EventQueue, Trace
from raft import Message

LATENCY_NS_MIN_DEFAULT = 1_000_000
LATENCY_NS_MAX_DEFAULT = 10_000_000
LATENCY_NS_LIMIT = 5_000_000_000
"""No simulated delay is ever longer than this."""


@dataclass
class NetworkStats:
    sent: int = 0
    delivered: int = 0
    dropped_random: int = 0
    dropped_partition: int = 0
    duplicated: int = 0


class SimNetwork:
    """Delivers raft `Message`s through the event queue to `receive(message)`."""

    def __init__(
        self,
        rng: random.Random,
        queue: EventQueue,
        trace: Trace,
        receive: Callable[[Message], None],
        before_send: Callable[[Message], None] | None = None,
    ) -> None:
        """`before_send` sees each message as it leaves its node (the simulator checks the
        sender's durability there)."""
        self._rng = rng
        self._queue = queue
        self._trace = trace
        self._receive = receive
        self._before_send = before_send
        self._blocked: set[tuple[int, int]] = set()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.latency_ns_min = LATENCY_NS_MIN_DEFAULT
        self.latency_ns_max = LATENCY_NS_MAX_DEFAULT
        self.stats = NetworkStats()

    # ---- faults ----

    def set_latency(self, latency_ns_min: int, latency_ns_max: int) -> None:
        assert 0 <= latency_ns_min <= latency_ns_max <= LATENCY_NS_LIMIT, (
            latency_ns_min,
            latency_ns_max,
        )
        self.latency_ns_min = latency_ns_min
        self.latency_ns_max = latency_ns_max

    def block(self, source: int, target: int) -> None:
        """Messages from `source` to `target` are lost (a one-way partition)."""
        assert source != target, source
        self._blocked.add((source, target))

    def unblock(self, source: int, target: int) -> None:
        self._blocked.discard((source, target))

    def partition(self, side: Iterable[int], other_side: Iterable[int]) -> None:
        """Cut every link between the two sides, both ways."""
        side_nodes = sorted(set(side))
        other_nodes = sorted(set(other_side))
        assert not set(side_nodes) & set(other_nodes), (side_nodes, other_nodes)
        for source in side_nodes:
            for target in other_nodes:
                self._blocked.add((source, target))
                self._blocked.add((target, source))

    def isolate(self, node: int, others: Iterable[int]) -> None:
        self.partition([node], [other for other in others if other != node])

    def heal_partitions(self) -> None:
        self._blocked.clear()

    def heal(self) -> None:
        """Back to a healthy network: no partitions, no loss, no duplication, low latency."""
        self._blocked.clear()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.latency_ns_min = LATENCY_NS_MIN_DEFAULT
        self.latency_ns_max = LATENCY_NS_MAX_DEFAULT

    def is_blocked(self, source: int, target: int) -> bool:
        return (source, target) in self._blocked

    def blocked_links(self) -> list[tuple[int, int]]:
        return sorted(self._blocked)

    # ---- traffic ----

    def send(self, message: Message) -> None:
        if self._before_send is not None:
            self._before_send(message)
        self.stats.sent += 1
        source, target = message.source, message.target
        if (source, target) in self._blocked:
            self.stats.dropped_partition += 1
            return
        rng = self._rng
        if self.drop_probability and rng.random() < self.drop_probability:
            self.stats.dropped_random += 1
            return
        self._schedule(message)
        if self.duplicate_probability and rng.random() < self.duplicate_probability:
            self.stats.duplicated += 1
            self._schedule(message)

    def _schedule(self, message: Message) -> None:
        delay_ns = self._rng.randint(self.latency_ns_min, self.latency_ns_max)
        self._queue.after(delay_ns, lambda: self._deliver(message))

    def _deliver(self, message: Message) -> None:
        source, target = message.source, message.target
        if (source, target) in self._blocked:
            self.stats.dropped_partition += 1
            self._trace.record(target, "cut", f"{source} {message.type.name}")
            return
        self.stats.delivered += 1
        self._receive(message)
