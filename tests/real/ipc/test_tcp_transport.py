"""The TCP transport on real loopback sockets: addresses, peers, queues, reconnects, faults.

What the conformance suite does not reach: IPv6, the bound address, unknown and removed
peers, frames waiting for a peer that has not started, reconnect backoff with full jitter,
fault counters and the descriptors `close()` releases. `Nodes` (also used by the other
test_tcp_* files) makes transports, drives them and closes them all, even on failure.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator

import psutil
import pyarrow as pa
import pytest

from ipc.errors import Backpressure, TransportClosed, UnknownPeer
from ipc.tcp import TcpOptions
from ipc.transport import BulkReceived, Transport
from tests.conformance.harness import Header, Ping
from tests.real.ipc.tcp_nodes import Nodes, link, open_ports, running_nodes


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    yield from running_nodes()


@pytest.fixture
def refused() -> Iterator[tuple[str, int]]:
    """An address that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()


# ---- addresses and peers ----


def test_binds_loopback_by_default_and_reports_the_chosen_port(nodes: Nodes) -> None:
    transport = nodes.start(1)
    host, port = transport.address
    assert host == "127.0.0.1"
    assert port > 0
    assert port in open_ports()
    assert isinstance(transport, Transport)


def test_ipv6_loopback(nodes: Nodes) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback")
    one = nodes.start(1, host="::1")
    two = nodes.start(2, host="::1")
    assert one.address[0] == "::1"
    link(one, two)
    one.send(2, Ping(1))
    one.send_bulk(2, Header("v6"), pa.table({"x": [1, 2]}))
    two.send(1, Ping(2))
    assert nodes.pump(lambda: len(nodes.inbox[2]) == 2 and nodes.pings(1, 2) == [2])
    assert nodes.pings(2, 1) == [1]
    bulk = nodes.inbox[2][1]
    assert isinstance(bulk, BulkReceived) and bulk.table.equals(pa.table({"x": [1, 2]}))


def test_sending_to_a_node_without_an_address_raises_unknown_peer(nodes: Nodes) -> None:
    one = nodes.start(1)
    with pytest.raises(UnknownPeer):
        one.send(9, Ping(1))
    with pytest.raises(UnknownPeer):
        one.send_bulk(9, Header("x"), pa.table({"x": [1]}))


def test_removing_a_peer_drops_its_queue_and_counts_it(
    nodes: Nodes, refused: tuple[str, int]
) -> None:
    one = nodes.start(1)
    one.set_peer(2, refused)
    for seq in range(3):
        one.send(2, Ping(seq))
    one.remove_peer(2)
    assert one.stats().dropped["peer_gone"] == 3
    with pytest.raises(UnknownPeer):
        one.send(2, Ping(4))


def test_frames_wait_for_a_peer_that_has_not_started(nodes: Nodes) -> None:
    two = nodes.start(2)
    port = two.address[1]
    nodes.stop(two)
    one = nodes.start(1)
    one.set_peer(2, ("127.0.0.1", port))
    for seq in range(5):
        one.send(2, Ping(seq))
    nodes.pump(lambda: False, 0.05)  # refused connections, backing off
    assert one.next_timeout_ns() is not None  # the next reconnect
    two = nodes.start(2, port=port)
    assert nodes.pump(lambda: len(nodes.pings(2, 1)) == 5)
    assert nodes.pings(2, 1) == [0, 1, 2, 3, 4]


# ---- reconnects ----


class CeilingRng(random.Random):
    """Full jitter's draw at its ceiling, recording each ceiling asked for."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        assert a == 0
        self.ceilings.append(b)
        return b


def test_reconnect_backoff_doubles_up_to_its_maximum_with_full_jitter(
    nodes: Nodes, refused: tuple[str, int]
) -> None:
    rng = CeilingRng()
    options = TcpOptions(backoff_ms_base=1, backoff_ms_max=8)
    one = nodes.start(1, options=options, rng=rng)
    one.set_peer(2, refused)
    one.send(2, Ping(0))
    assert nodes.pump(lambda: len(rng.ceilings) >= 6)
    assert rng.ceilings[:6] == [1, 2, 4, 8, 8, 8]


def test_reconnects_after_the_peer_restarts_on_the_same_port(nodes: Nodes) -> None:
    one = nodes.start(1)
    two = nodes.start(2)
    port = two.address[1]
    link(one, two)
    one.send(2, Ping(0))
    assert nodes.pump(lambda: nodes.pings(2, 1) == [0])
    two.close(abort=True)
    nodes.transports.remove(two)
    # Sent while the peer is down: the connection breaks, frames wait, backoff retries.
    sent = 1
    for sent in range(1, 1000):
        one.send(2, Ping(sent))
        if nodes.pump(lambda: one.next_timeout_ns() is not None, 0.01):
            break
    sent += 1
    for seq in range(sent, sent + 5):
        one.send(2, Ping(seq))
    nodes.inbox[2] = []
    nodes.start(2, port=port)
    last = sent + 4
    assert nodes.pump(lambda: last in nodes.pings(2, 1))
    got = nodes.pings(2, 1)
    assert got == list(range(got[0], last + 1))  # once one arrives, none after it is lost
    assert got[0] <= sent  # and what waited in the queue went too


# ---- queues and faults ----


def test_a_full_queue_pushes_back_and_counts_it(nodes: Nodes, refused: tuple[str, int]) -> None:
    one = nodes.start(1, options=TcpOptions(queue_frames_max=4))
    one.set_peer(2, refused)
    for seq in range(4):
        one.send(2, Ping(seq))
    with pytest.raises(Backpressure):
        one.send(2, Ping(4))
    assert one.stats().dropped["backpressure"] == 1


def test_blocked_links_drop_and_count_and_delay_reports_a_timeout(nodes: Nodes) -> None:
    one = nodes.start(1)
    two = nodes.start(2)
    link(one, two)
    one.faults.block(1, 2)
    one.send(2, Ping(0))
    one.send_bulk(2, Header("x"), pa.table({"x": [1]}))
    assert one.stats().dropped["fault_drop"] == 2
    one.faults.heal()
    two.faults.block(1, 2)  # the receiving side drops too
    one.send(2, Ping(1))
    assert nodes.pump(lambda: two.stats().dropped.get("fault_drop", 0) == 1)
    two.faults.heal()
    one.faults.set_delay(1, 2, 50_000_000)
    one.send(2, Ping(2))
    timeout = one.next_timeout_ns()
    assert timeout is not None and 0 < timeout <= 50_000_000
    assert nodes.pump(lambda: nodes.pings(2, 1) == [2])


def test_close_releases_every_socket_and_descriptor(nodes: Nodes) -> None:
    one = nodes.start(1)
    two = nodes.start(2)
    link(one, two)
    one.send(2, Ping(0))
    two.send(1, Ping(0))
    assert nodes.pump(lambda: nodes.pings(2, 1) == [0] and nodes.pings(1, 2) == [0])
    ports = {one.address[1], two.address[1]}
    fds = {one.fileno(), two.fileno()}
    one.close()
    two.close()
    one.close()  # idempotent
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    leftover = [
        c
        for c in psutil.Process().net_connections(kind="inet")
        if (c.laddr and c.laddr.port in ports) or (c.raddr and c.raddr.port in ports)
    ]
    assert leftover == []
    with pytest.raises(TransportClosed):
        one.send(2, Ping(1))
    assert one.poll() == []
