"""Shared by the test_tcp_* files: `Nodes` makes TCP transports on loopback, drives
them, and closes them all even when a test fails."""

from __future__ import annotations

import itertools
import os
import random
import selectors
from collections.abc import Callable, Iterator

import psutil

from clock import SystemClock
from ipc.tcp import TcpOptions, TcpTransport
from ipc.transport import BulkReceived, Delivery, Received
from tests.conformance.harness import TEST_MESSAGES, Ping

WAIT_S = 20.0
SECRET = b"k" * 32
_clusters = itertools.count()


def unique_cluster() -> str:
    return f"tcp-test-{os.getpid()}-{next(_clusters)}"


class Nodes:
    """Transports of one test, driven together; `close_all` closes every one."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.clock = SystemClock()
        self.transports: list[TcpTransport] = []
        self.inbox: dict[int, list[Delivery]] = {}

    def start(
        self,
        node_id: int,
        *,
        secret: bytes = SECRET,
        host: str = "127.0.0.1",
        port: int = 0,
        options: TcpOptions | None = None,
        rng: random.Random | None = None,
        cluster: str | None = None,
    ) -> TcpTransport:
        transport = TcpTransport(
            cluster or self.cluster,
            node_id,
            secret,
            self.clock,
            rng or random.Random(node_id),
            bind=(host, port),
            options=options,
            messages=TEST_MESSAGES,
        )
        self.transports.append(transport)
        self.inbox.setdefault(node_id, [])
        return transport

    def stop(self, transport: TcpTransport) -> None:
        transport.close()
        self.transports.remove(transport)

    def pump(self, until: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
        deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        with selectors.DefaultSelector() as selector:
            for transport in self.transports:
                selector.register(transport.fileno(), selectors.EVENT_READ)
            while True:
                for transport in self.transports:
                    self.inbox[transport.node_id].extend(transport.poll())
                if until():
                    return True
                left_ns = deadline_ns - self.clock.monotonic_ns()
                if left_ns <= 0:
                    return False
                timeouts = [t.next_timeout_ns() for t in self.transports]
                wait_ns = min([left_ns, 50_000_000] + [t for t in timeouts if t is not None])
                selector.select(wait_ns / 1e9)

    def pings(self, node_id: int, source: int) -> list[int]:
        return [
            d.message.seq
            for d in self.inbox[node_id]
            if isinstance(d, Received) and d.source == source and isinstance(d.message, Ping)
        ]

    def close_all(self) -> None:
        for transport in self.transports:
            transport.close()
        for deliveries in self.inbox.values():
            for delivery in deliveries:
                if isinstance(delivery, BulkReceived):
                    delivery.release()


def running_nodes() -> Iterator[Nodes]:
    """The body of each test file's `nodes` fixture: everything closed, even on failure."""
    instance = Nodes(unique_cluster())
    try:
        yield instance
    finally:
        instance.close_all()


def open_ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections(kind="inet") if c.laddr}


def link(a: TcpTransport, b: TcpTransport) -> None:
    a.set_peer(b.node_id, b.address)
    b.set_peer(a.node_id, a.address)
