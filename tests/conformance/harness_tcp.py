"""The TCP transport's conformance harness: nodes in one process, on 127.0.0.1.

Each node is a `TcpTransport` bound to port 0 with a shared secret; nodes learn each
other's addresses with `set_peer`. A crash resets every socket of the node (SO_LINGER 0,
no goodbye) and a restart binds the same port again, so peers reconnect to the new
incarnation. `inject` and `intrude` speak the client side of the handshake over a raw
socket, with the right secret and a wrong one. `leaks` looks at the process's own
sockets and descriptors.
"""

from __future__ import annotations

import os
import random
import selectors
import socket
from collections.abc import Callable

import psutil

from clock import SystemClock
from ipc import auth
from ipc.codec import HEADER_BYTES, Codec, cluster_id_for
from ipc.tcp import HANDSHAKE_FRAME_BYTES_MAX, TcpOptions, TcpTransport
from ipc.transport import Delivery
from tests.conformance.harness import CLUSTER_NAME, TEST_MESSAGES, Ping

HOST = "127.0.0.1"
INJECTOR_NODE_ID = 0xFFFF_FF00
"""The node id raw connections claim: no harness node, so they replace no real link."""
HANDSHAKE_WAIT_S = 10.0
POLL_WAIT_S_MAX = 0.05
"""Longest single wait in `pump`, so `until` is re-checked at least this often."""
OPTIONS = TcpOptions(queue_frames_max=1024)


class TcpHarness:
    name = "tcp"
    authenticates = True

    def __init__(self, seed: int = 0) -> None:
        self.inbox: dict[int, list[Delivery]] = {}
        self._clock = SystemClock()
        self._rng = random.Random(seed)
        self._secret = os.urandom(32)
        self._transports: dict[int, TcpTransport] = {}
        self._ports: dict[int, int] = {}
        self._epoll_fds: set[int] = set()
        self._raw_sockets: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()

    # ---- nodes ----

    def start(self, node_id: int) -> TcpTransport:
        assert node_id not in self._transports, node_id
        port = self._ports.get(node_id, 0)
        transport = TcpTransport(
            CLUSTER_NAME, node_id, self._secret, self._clock, self._rng,
            bind=(HOST, port), options=OPTIONS, messages=TEST_MESSAGES,
        )
        self._ports[node_id] = transport.address[1]
        self._epoll_fds.add(transport.fileno())
        for other, other_port in sorted(self._ports.items()):
            if other != node_id:
                transport.set_peer(other, (HOST, other_port))
        for _, peer in sorted(self._transports.items()):
            peer.set_peer(node_id, transport.address)
        self._transports[node_id] = transport
        self._selector.register(transport.fileno(), selectors.EVENT_READ, node_id)
        self.inbox[node_id] = []
        return transport

    def transport(self, node_id: int) -> TcpTransport:
        return self._transports[node_id]

    def crash(self, node_id: int) -> None:
        transport = self._transports.pop(node_id)
        self._selector.unregister(transport.fileno())
        transport.close(abort=True)
        self.inbox[node_id] = []

    def restart(self, node_id: int) -> TcpTransport:
        assert node_id in self._ports and node_id not in self._transports, node_id
        return self.start(node_id)

    # ---- driving IO ----

    def pump(self, until: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline_ns = self._clock.monotonic_ns() + int(timeout_s * 1e9)
        while True:
            self._poll_all()
            if until():
                return True
            left_ns = deadline_ns - self._clock.monotonic_ns()
            if left_ns <= 0:
                return False
            wait_ns = min([left_ns, int(POLL_WAIT_S_MAX * 1e9)] + self._timeouts_ns())
            self._selector.select(wait_ns / 1e9)

    def _poll_all(self) -> None:
        for node_id, transport in sorted(self._transports.items()):
            self.inbox[node_id].extend(transport.poll())

    def _timeouts_ns(self) -> list[int]:
        timeouts = (t.next_timeout_ns() for t in self._transports.values())
        return [timeout for timeout in timeouts if timeout is not None]

    # ---- raw bytes on the wire ----

    def inject(self, target: int, frame: bytes) -> None:
        sock = self._handshake(target, self._secret)
        sock.setblocking(True)
        sock.sendall(frame)
        sock.close()

    def intrude(self, target: int) -> None:
        """Connect with a wrong secret and try to send a Ping anyway."""
        sock = self._handshake(target, os.urandom(32))
        codec = Codec(cluster_id_for(CLUSTER_NAME), TEST_MESSAGES)
        sock.setblocking(True)
        try:
            sock.sendall(codec.encode(INJECTOR_NODE_ID, target, Ping(666)))
        except OSError:
            pass  # refused already: that is the point
        sock.close()

    def _handshake(self, target: int, secret: bytes) -> socket.socket:
        """The client side of the handshake over a raw socket, pumping the transports
        meanwhile. The proof is sent even if the server's does not verify (a wrong
        secret would not verify it): the server decides."""
        codec = Codec(cluster_id_for(CLUSTER_NAME), auth.HANDSHAKE_MESSAGES)
        sock = socket.create_connection((HOST, self._ports[target]), timeout=HANDSHAKE_WAIT_S)
        self._raw_sockets.append(sock)
        nonce = auth.new_nonce()
        sock.sendall(codec.encode(INJECTOR_NODE_ID, target, auth.Hello(nonce)))
        sock.setblocking(False)
        received = bytearray()

        def challenge_arrived() -> bool:
            try:
                received.extend(sock.recv(HANDSHAKE_FRAME_BYTES_MAX))
            except BlockingIOError:
                pass
            return len(received) >= HEADER_BYTES and len(received) >= codec.decode_header(
                received
            ).frame_bytes

        assert self.pump(challenge_arrived, HANDSHAKE_WAIT_S), "no challenge arrived"
        challenge = codec.decode(received).message
        assert isinstance(challenge, auth.Challenge), challenge
        transcript = auth.Transcript(
            codec.cluster_id, INJECTOR_NODE_ID, target, nonce, challenge.nonce
        )
        proof = auth.Proof(auth.client_proof(secret, transcript))
        sock.setblocking(True)
        sock.sendall(codec.encode(INJECTOR_NODE_ID, target, proof))
        return sock

    # ---- cleanup ----

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        for sock in self._raw_sockets:
            sock.close()
        self._selector.close()

    def leaks(self) -> list[str]:
        found = [f"raw socket {sock!r}" for sock in self._raw_sockets if sock.fileno() >= 0]
        ports = set(self._ports.values())
        for connection in psutil.Process().net_connections(kind="inet"):
            local = connection.laddr.port if connection.laddr else None
            remote = connection.raddr.port if connection.raddr else None
            if local in ports or remote in ports:
                found.append(f"socket {connection}")
        for fd in sorted(self._epoll_fds):
            if _is_epoll(fd):
                found.append(f"epoll descriptor {fd}")
        return found


def _is_epoll(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
    except OSError:
        return False

