"""The conformance harness for the simulated transport: nodes on one `SimFabric` with its
faults off, driven by the simulator's event queue in simulated time."""

from __future__ import annotations

import random
from collections.abc import Callable

from chaos._events import EventQueue
from chaos.network import QueueScheduler
from clock import SimTime
from ipc.codec import cluster_id_for
from ipc.sim import SimFabric, SimTransport
from ipc.transport import Delivery, Transport
from tests.conformance.harness import CLUSTER_NAME, TEST_MESSAGES

SEED = 20_260_301
DRAIN_EVENTS_MAX = 1_000_000
"""`close` runs what is left on the event queue; more than this is a runaway timer."""


class SimHarness:
    name = "sim"
    authenticates = False

    def __init__(self) -> None:
        self.inbox: dict[int, list[Delivery]] = {}
        self._queue = EventQueue(SimTime())
        self._fabric = SimFabric(
            random.Random(SEED), QueueScheduler(self._queue), cluster_id_for(CLUSTER_NAME)
        )
        self._live: dict[int, SimTransport] = {}
        self._events_left = 0

    def start(self, node_id: int) -> Transport:
        assert node_id not in self._live, f"node {node_id} is running"
        self.inbox[node_id] = []
        transport = SimTransport(
            self._fabric, node_id, messages=TEST_MESSAGES, on_ready=lambda: self._read(node_id)
        )
        self._live[node_id] = transport
        return transport

    def transport(self, node_id: int) -> Transport:
        return self._live[node_id]

    def pump(self, until: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline_ns = self._queue.now_ns + int(timeout_s * 1e9)
        timed_out = False

        def time_is_up() -> None:
            nonlocal timed_out
            timed_out = True

        self._queue.at(deadline_ns, time_is_up)
        while not until():
            action = self._queue.pop()
            assert action is not None, "the deadline event is still queued"
            action()
            if timed_out:
                return until()
        return True

    def crash(self, node_id: int) -> None:
        """In simulation the fabric plays the kernel: a crashed node's transport is gone
        at once, with whatever was queued in it or in flight to it."""
        self._live.pop(node_id).close()
        self.inbox[node_id] = []

    def restart(self, node_id: int) -> Transport:
        return self.start(node_id)

    def inject(self, target: int, frame: bytes) -> None:
        self._fabric.inject(target, frame)

    def leaks(self) -> list[str]:
        found = self._fabric.leaks()
        if self._events_left:
            found.append(f"{self._events_left} events still pending after close")
        return found

    def close(self) -> None:
        for node_id in sorted(self._live):
            self._live.pop(node_id).close()
        for _ in range(DRAIN_EVENTS_MAX):
            action = self._queue.pop()
            if action is None:
                break
            action()
        self._events_left = len(self._queue)

    def _read(self, node_id: int) -> None:
        transport = self._live.get(node_id)
        if transport is not None:
            self.inbox[node_id].extend(transport.poll())
