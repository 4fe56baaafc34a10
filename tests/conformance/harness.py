"""What the transport conformance suite needs from each implementation.

One suite (test_conformance.py) runs against every `TransportHarness`; each
implementation supplies one in harness_<name>.py. A harness owns a small cluster of
transports of one kind, drives their IO, and collects what each node receives. It knows
how to break them the way the real world does (a crash that leaves resources behind, raw
bytes on the wire) and how to tell whether anything leaked.

Shared vocabulary: every harness registers `Ping` and `Header` under the tags below on
every transport it makes, so tests can send them without knowing the implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from ipc.transport import Delivery, Transport

CLUSTER_NAME = "conformance"
OTHER_CLUSTER_NAME = "someone-else"


class Ping(msgspec.Struct, frozen=True):
    seq: int
    payload: bytes = b""


class Header(msgspec.Struct, frozen=True):
    name: str
    seq: int = 0


TEST_MESSAGES: dict[str, type[msgspec.Struct]] = {"test.ping": Ping, "test.header": Header}


class TransportHarness(Protocol):
    name: str
    """"local", "tcp" or "sim"."""

    inbox: dict[int, list[Delivery]]
    """Everything each node received, in arrival order, since it (re)started."""

    def start(self, node_id: int) -> Transport:
        """A new transport for `node_id`, reachable by every other node of the harness."""
        ...

    def transport(self, node_id: int) -> Transport: ...

    def pump(self, until: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Drive every live transport's IO (real: wait on fileno() and poll(); sim: run
        simulated time) appending deliveries to `inbox`, until `until()` is true (return
        True) or the timeout passes (return False). Real time for real transports,
        simulated time for the simulated one."""
        ...

    def crash(self, node_id: int) -> None:
        """Kill the node the way SIGKILL would: no goodbye, no cleanup. Whatever it
        held (queues, segments, sockets half-written) is left for its next incarnation
        or for whoever supervises it. The node's inbox is cleared."""
        ...

    def restart(self, node_id: int) -> Transport:
        """A new incarnation of a crashed node."""
        ...

    def inject(self, target: int, frame: bytes) -> None:
        """Put raw bytes on the wire to `target` as one frame would travel (local: one mq
        message; tcp: an authenticated connection's byte stream; sim: one network frame)."""
        ...

    def leaks(self) -> list[str]:
        """After `close()`: every queue, shm segment, socket, fd or process that is
        still there. Must be empty."""
        ...

    def close(self) -> None:
        """Close every transport and clean up what crashed ones left."""
        ...


HarnessFactory = Callable[[], TransportHarness]
