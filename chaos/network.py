"""The simulator's network: `ipc.sim`'s fabric, driven by the simulator's event queue.

The network itself (seeded drop, duplication, corruption, latency with jitter,
reordering, directed partition rules) lives in `ipc.sim.SimFabric`, below chaos, so the
simulated twin of the transport is the one the simulator runs. This module adapts the
simulator's `EventQueue` to the fabric's `Scheduler` and re-exports what chaos uses.

Invariant: the adapter adds no ordering of its own; events keep the queue's
(time, scheduling order) key, so the same seed gives the same deliveries.
"""

from __future__ import annotations

from collections.abc import Callable

from chaos._events import EventQueue
from ipc.sim import (
    LATENCY_NS_LIMIT,
    LATENCY_NS_MAX_DEFAULT,
    LATENCY_NS_MIN_DEFAULT,
    FabricStats,
    SimFabric,
    SimOptions,
    SimTransport,
)

__all__ = [
    "LATENCY_NS_LIMIT",
    "LATENCY_NS_MAX_DEFAULT",
    "LATENCY_NS_MIN_DEFAULT",
    "FabricStats",
    "QueueScheduler",
    "SimFabric",
    "SimOptions",
    "SimTransport",
]


class QueueScheduler:
    """An `EventQueue` seen as an `ipc.sim.Scheduler`."""

    __slots__ = ("_at", "_sim_time")

    def __init__(self, queue: EventQueue) -> None:
        self._sim_time = queue.sim_time
        self._at = queue.at

    def now_ns(self) -> int:
        return self._sim_time.now_ns

    def schedule(self, at_ns: int, action: Callable[[], None]) -> None:
        self._at(at_ns, action)
