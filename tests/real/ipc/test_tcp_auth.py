"""TCP peers must prove they hold the cluster secret before any frame is accepted.

Refused peers (wrong secret, another cluster, garbage, silence) are counted under
stats().errors and disconnected, while good peers keep working; a second connection for
a node id replaces the first; a bulk that is not Arrow is refused without dropping the
connection. Raw clients here speak the handshake by hand with ipc/auth.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import msgspec
import pytest

from ipc import auth
from ipc.codec import HEADER_BYTES, Codec, Frame, cluster_id_for
from ipc.tcp import INTERNAL_MESSAGES, TcpOptions, TcpTransport
from tests.conformance.harness import TEST_MESSAGES, Ping
from tests.real.ipc.tcp_nodes import SECRET, Nodes, link, running_nodes


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    yield from running_nodes()


RAW_NODE_ID = 50


class RawClient:
    """A hand-driven dialer: connects, authenticates, writes bytes; `nodes` is pumped
    whenever it waits, since the transports share this thread."""

    def __init__(self, nodes: Nodes, target: TcpTransport) -> None:
        self.nodes = nodes
        self.target = target
        self.codec = Codec(cluster_id_for(nodes.cluster), {**TEST_MESSAGES, **INTERNAL_MESSAGES})
        self.sock = socket.create_connection(target.address, timeout=5)
        self.sock.setblocking(False)

    def handshake(self, node_id: int = RAW_NODE_ID, secret: bytes = SECRET) -> None:
        nonce = auth.new_nonce()
        self.write(self.codec.encode(node_id, self.target.node_id, auth.Hello(nonce)))
        challenge = self.read_frame().message
        assert isinstance(challenge, auth.Challenge)
        transcript = auth.Transcript(
            self.codec.cluster_id, node_id, self.target.node_id, nonce, challenge.nonce
        )
        proof = auth.Proof(auth.client_proof(secret, transcript))
        self.write(self.codec.encode(node_id, self.target.node_id, proof))

    def send(self, message: msgspec.Struct, node_id: int = RAW_NODE_ID) -> None:
        self.write(self.codec.encode(node_id, self.target.node_id, message))

    def write(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def read_frame(self) -> Frame:
        received = bytearray()

        def whole() -> bool:
            try:
                received.extend(self.sock.recv(4096))
            except BlockingIOError:
                pass
            return len(received) >= HEADER_BYTES and (
                len(received) >= self.codec.decode_header(received).frame_bytes
            )

        assert self.nodes.pump(whole), "no frame arrived"
        return self.codec.decode(received)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(4096) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True


@pytest.fixture
def raw_clients(nodes: Nodes) -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    try:
        yield clients
    finally:
        for client in clients:
            client.sock.close()


def raw(nodes: Nodes, clients: list[RawClient], target: TcpTransport) -> RawClient:
    client = RawClient(nodes, target)
    clients.append(client)
    return client


def test_a_wrong_secret_is_refused_and_counted_while_good_peers_keep_working(
    nodes: Nodes,
) -> None:
    good = nodes.start(1)
    receiver = nodes.start(2)
    intruder = nodes.start(3, secret=b"w" * 32)
    link(good, receiver)
    link(intruder, receiver)
    intruder.send(2, Ping(666))
    good.send(2, Ping(1))
    assert nodes.pump(lambda: receiver.stats().errors.get("authentication_failed", 0) >= 1)
    assert nodes.pump(lambda: nodes.pings(2, 1) == [1])
    # The intruder refuses the receiver's proof too, and keeps retrying in vain.
    assert nodes.pump(lambda: intruder.stats().errors.get("authentication_failed", 0) >= 1)
    good.send(2, Ping(2))
    assert nodes.pump(lambda: nodes.pings(2, 1) == [1, 2])
    assert nodes.pings(2, 3) == []


def test_garbage_before_the_handshake_is_refused(
    nodes: Nodes, raw_clients: list[RawClient]
) -> None:
    good = nodes.start(1)
    receiver = nodes.start(2)
    link(good, receiver)
    client = raw(nodes, raw_clients, receiver)
    client.write(b"GET / HTTP/1.1\r\nHost: dcluster\r\n\r\n")
    assert nodes.pump(client.closed_by_peer)
    assert receiver.stats().errors == {"authentication_failed": 1}
    good.send(2, Ping(1))
    assert nodes.pump(lambda: nodes.pings(2, 1) == [1])


def test_a_silent_connection_is_dropped_after_the_handshake_time(
    nodes: Nodes, raw_clients: list[RawClient]
) -> None:
    receiver = nodes.start(2, options=TcpOptions(handshake_ms_max=50))
    client = raw(nodes, raw_clients, receiver)
    assert nodes.pump(lambda: receiver.next_timeout_ns() is not None)
    assert nodes.pump(client.closed_by_peer)
    assert receiver.stats().errors == {"authentication_failed": 1}


def test_a_peer_of_another_cluster_is_refused(nodes: Nodes) -> None:
    receiver = nodes.start(2)
    stranger = nodes.start(7, cluster=nodes.cluster + "-other")
    stranger.set_peer(2, receiver.address)
    stranger.send(2, Ping(1))
    assert nodes.pump(lambda: receiver.stats().errors.get("wrong_cluster", 0) >= 1)
    assert nodes.inbox[2] == []


def test_frames_before_the_proof_are_refused(nodes: Nodes, raw_clients: list[RawClient]) -> None:
    receiver = nodes.start(2)
    client = raw(nodes, raw_clients, receiver)
    client.send(Ping(1))
    assert nodes.pump(client.closed_by_peer)
    assert receiver.stats().errors == {"authentication_failed": 1}
    assert nodes.inbox[2] == []


def test_a_second_connection_for_a_node_replaces_the_first(
    nodes: Nodes, raw_clients: list[RawClient]
) -> None:
    receiver = nodes.start(2)
    first = raw(nodes, raw_clients, receiver)
    first.handshake()
    first.send(Ping(1))
    assert nodes.pump(lambda: nodes.pings(2, RAW_NODE_ID) == [1])
    second = raw(nodes, raw_clients, receiver)
    second.handshake()
    second.send(Ping(2))
    assert nodes.pump(lambda: nodes.pings(2, RAW_NODE_ID) == [1, 2])
    assert nodes.pump(first.closed_by_peer)
    assert receiver.stats().errors == {}


def test_a_bulk_that_is_not_arrow_is_refused_and_the_connection_goes_on(
    nodes: Nodes, raw_clients: list[RawClient]
) -> None:
    receiver = nodes.start(2)
    client = raw(nodes, raw_clients, receiver)
    client.handshake()
    header = client.codec.encode(RAW_NODE_ID, 2, TEST_MESSAGES["test.header"]("junk"))
    junk = b"not an arrow stream" * 100
    begin = INTERNAL_MESSAGES["ipc.tcp.bulk"](1, len(junk), header)
    client.send(begin)
    client.write(junk)
    client.send(Ping(3))
    assert nodes.pump(lambda: nodes.pings(2, RAW_NODE_ID) == [3])
    assert receiver.stats().errors == {"corrupt_bulk": 1}
    assert receiver.stats().bulk_received == 0
