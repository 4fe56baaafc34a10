"""TCP transport: the `Transport` interface across hosts, non-blocking, driven by `poll()`.

Each node dials every peer it sends to; that connection (a `_Link`) carries only this
node's frames to the peer. The node accepts connections (`_Inbound`) that carry peers'
frames to it. One direction per connection means no simultaneous-connect races, and one
connection per (source, target) pair keeps that pair's frames in send order.

A connection carries codec frames (`ipc.codec`) back to back. A bulk transfer is a
`_BulkBegin` frame (the user's header as a frame of its own, the byte count, a transfer
id) followed by that many raw bytes of one Arrow IPC stream, which the receiver reads with
`recv_into` into one preallocated (pooled) buffer and opens zero-copy.

Before a single frame is accepted the dialer proves it holds the cluster secret and the
acceptor proves it back (`ipc.auth`), within a bounded time. Any frame error on a
connection means its byte stream can no longer be trusted: the error is counted and
logged, that connection is closed, and the peer reconnects; other connections go on.

Invariants: every queue and buffer is bounded (`TcpOptions`); an outbound item leaves its
queue only once all its bytes are written, and an item cut off by a broken connection is
sent again whole on the next one (the receiver cannot have delivered it, so nothing is
delivered twice); nothing reaches `poll()`'s result from a connection that has not
authenticated, nor any part of a bulk transfer that did not arrive whole.
"""

from __future__ import annotations

import enum
import errno
import logging
import random
import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa

from clock import Clock
from ipc import auth
from ipc.codec import FRAME_BYTES_MAX_DEFAULT, HEADER_BYTES, Codec, Frame, cluster_id_for
from ipc.errors import (
    AuthenticationFailed,
    Backpressure,
    CorruptBulk,
    CorruptFrame,
    FrameTooLarge,
    MessageTooLarge,
    MisroutedFrame,
    RemoteProtocolError,
    TransportClosed,
    TruncatedFrame,
    UnknownPeer,
    WrongCluster,
)
from ipc.faults import LinkFaults
from ipc.transport import BulkData, BulkReceived, Delivery, Received, TransportStats

LOG = logging.getLogger(__name__)

INTERNAL_TAG_PREFIX = "ipc.tcp."
LISTEN_BACKLOG = 128
EPOLL_EVENTS_MAX = 1024
"""Readiness events taken per `poll()`; the rest stay ready for the next one."""
ACCEPTS_PER_POLL_MAX = 64
RECV_CHUNK_BYTES = 256 * 1024
"""One `recv` of frame bytes. Bulk bytes bypass it (recv_into the transfer's buffer)."""
SEND_SEGMENTS_MAX = 512
"""Buffers gathered into one `sendmsg` (below the kernel's IOV_MAX of 1024)."""
FLUSH_BYTES_MAX = 64 * 1024 * 1024
"""Bytes written to one connection per flush, so one big transfer cannot starve the rest."""
HANDSHAKE_FRAME_BYTES_MAX = 1024
"""Largest handshake frame: an unauthenticated peer cannot make us buffer more."""
NS_PER_MS = 1_000_000
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """Every limit of the TCP transport. Defaults suit a worker; tests shrink them."""

    queue_frames_max: int = 4096
    """Items (control frames and bulk transfers) queued per peer before `Backpressure`."""
    queue_bytes_max: int = 64 * MIB
    """Control-frame bytes queued per peer; a frame always fits an empty queue."""
    queue_bulk_bytes_max: int = 4 * GIB
    """Bulk bytes queued per peer: a transfer is refused once this many wait (so at most
    one transfer past the bound is ever held)."""
    bulk_bytes_max: int = 8 * GIB
    """Largest Arrow IPC stream of one transfer, sent or accepted."""
    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT
    """Largest control frame (the codec's maximum): bounds each receive buffer."""
    read_bytes_per_poll_max: int = 64 * MIB
    """Bytes read from one connection per `poll()`, for fairness between connections."""
    handshake_ms_max: int = 5_000
    """A connection that has not authenticated by then is dropped."""
    backoff_ms_base: int = 10
    backoff_ms_max: int = 2_000
    """Reconnect delay after the n-th consecutive failure: uniform(0, min(max, base*2^n))."""
    inbound_connections_max: int = 1024
    socket_buffer_bytes: int = 4 * MIB
    """SO_SNDBUF and SO_RCVBUF of every connection (0: the kernel's autotuning)."""
    pool_buffers_max: int = 4
    pool_bytes_max: int = 2 * GIB
    """Released bulk buffers kept for reuse (per direction) so steady transfers do not pay
    page faults; buffers below `pool_buffer_bytes_min` are not pooled."""
    pool_buffer_bytes_min: int = 1 * MIB

    def __post_init__(self) -> None:
        assert self.queue_frames_max > 0, self.queue_frames_max
        assert self.queue_bytes_max >= HEADER_BYTES, self.queue_bytes_max
        assert self.queue_bulk_bytes_max > 0, self.queue_bulk_bytes_max
        assert self.bulk_bytes_max >= 4 * GIB, self.bulk_bytes_max
        assert HEADER_BYTES < self.frame_bytes_max, self.frame_bytes_max
        assert self.read_bytes_per_poll_max >= RECV_CHUNK_BYTES, self.read_bytes_per_poll_max
        assert self.handshake_ms_max > 0, self.handshake_ms_max
        assert 0 < self.backoff_ms_base <= self.backoff_ms_max, self.backoff_ms_base
        assert self.inbound_connections_max > 0, self.inbound_connections_max
        assert self.socket_buffer_bytes >= 0, self.socket_buffer_bytes
        assert self.pool_buffers_max >= 0, self.pool_buffers_max
        assert self.pool_bytes_max >= 0, self.pool_bytes_max
        assert self.pool_buffer_bytes_min > 0, self.pool_buffer_bytes_min


class _BulkBegin(msgspec.Struct, frozen=True):
    """Announces `bulk_bytes` raw Arrow IPC bytes right after this frame."""

    transfer_id: int
    bulk_bytes: int
    header_frame: bytes


INTERNAL_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "ipc.tcp.bulk": _BulkBegin,
    **auth.HANDSHAKE_MESSAGES,
}
assert all(tag.startswith(INTERNAL_TAG_PREFIX) for tag in INTERNAL_MESSAGES)


# ---- buffers ----


class _BufferPool:
    """Large mutable buffers kept after use, so the next transfer finds its pages mapped.

    `acquire` hands out a mutable buffer at least as large as asked for (a slice would
    not be mutable); `give` takes it back. Bounded in count and bytes."""

    def __init__(self, buffers_max: int, bytes_max: int, buffer_bytes_min: int) -> None:
        self._buffers_max = buffers_max
        self._bytes_max = bytes_max
        self._buffer_bytes_min = buffer_bytes_min
        self._free: list[pa.Buffer] = []
        self._closed = False

    def acquire(self, size: int) -> pa.Buffer:
        fitting = [buffer for buffer in self._free if buffer.size >= size]
        if size < self._buffer_bytes_min or not fitting:
            return pa.allocate_buffer(size)
        buffer = min(fitting, key=lambda buffer: buffer.size)
        self._free.remove(buffer)
        return buffer

    def give(self, buffer: pa.Buffer) -> None:
        if self._closed or not self._buffer_bytes_min <= buffer.size <= self._bytes_max:
            return
        self._free.append(buffer)
        while len(self._free) > self._buffers_max or self._free_bytes() > self._bytes_max:
            self._free.pop(0)

    def close(self) -> None:
        self._closed = True
        self._free.clear()

    def _free_bytes(self) -> int:
        return sum(buffer.size for buffer in self._free)


class _Item:
    """One outbound unit: a control frame, or a bulk transfer (begin frame + payload)."""

    __slots__ = ("segments", "size", "due_ns", "bulk_bytes", "on_done")

    def __init__(
        self,
        segments: tuple[memoryview, ...],
        due_ns: int,
        bulk_bytes: int | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.segments = segments
        self.size = sum(len(segment) for segment in segments)
        self.due_ns = due_ns
        self.bulk_bytes = bulk_bytes
        """Payload bytes of a bulk transfer; None for a control frame."""
        self.on_done = on_done
        """Called once the item is written or dropped (gives its buffer back)."""


class _Outbox:
    """A bounded FIFO of items to one peer and the write cursor into its head item.

    Items leave only once fully written. Delayed items (fault hooks) hold back everything
    behind them, so a delay never reorders."""

    def __init__(self, options: TcpOptions) -> None:
        self._options = options
        self.items: deque[_Item] = deque()
        self.head_offset = 0
        self.frame_bytes = 0
        self.bulk_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def fits_frame(self, size: int) -> bool:
        if len(self.items) >= self._options.queue_frames_max:
            return False
        return not self.items or self.frame_bytes + size <= self._options.queue_bytes_max

    def fits_bulk(self) -> bool:
        if len(self.items) >= self._options.queue_frames_max:
            return False
        return self.bulk_bytes < self._options.queue_bulk_bytes_max

    def push(self, item: _Item) -> None:
        self.items.append(item)
        self.frame_bytes += item.size - (item.bulk_bytes or 0)
        self.bulk_bytes += item.bulk_bytes or 0

    def due_ns(self) -> int | None:
        return self.items[0].due_ns if self.items else None

    def ready_segments(self, now_ns: int) -> list[memoryview]:
        """Due bytes from the cursor on, bounded in buffers and bytes."""
        segments: list[memoryview] = []
        total = 0
        skip = self.head_offset
        for item in self.items:
            if item.due_ns > now_ns or len(segments) >= SEND_SEGMENTS_MAX:
                break
            for segment in item.segments:
                if skip >= len(segment):
                    skip -= len(segment)
                    continue
                segments.append(segment[skip:])
                total += len(segment) - skip
                skip = 0
                if len(segments) >= SEND_SEGMENTS_MAX or total >= FLUSH_BYTES_MAX:
                    return segments
        return segments

    def advance(self, sent: int) -> list[_Item]:
        """Move the cursor `sent` bytes on; return the items now fully written."""
        done: list[_Item] = []
        while sent:
            head = self.items[0]
            remaining = head.size - self.head_offset
            if sent < remaining:
                self.head_offset += sent
                break
            sent -= remaining
            done.append(self._pop())
        return done

    def rewind(self) -> None:
        """The connection broke: the head item starts over on the next one."""
        self.head_offset = 0

    def clear(self) -> list[_Item]:
        dropped = list(self.items)
        self.items.clear()
        self.head_offset = self.frame_bytes = self.bulk_bytes = 0
        return dropped

    def _pop(self) -> _Item:
        item = self.items.popleft()
        self.head_offset = 0
        self.frame_bytes -= item.size - (item.bulk_bytes or 0)
        self.bulk_bytes -= item.bulk_bytes or 0
        return item


# ---- connections ----


class _LinkState(enum.Enum):
    IDLE = "idle"  # no socket; dial when there is something to send and backoff allows
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"  # hello sent, waiting for the challenge
    READY = "ready"


class _Link:
    """Our connection to one peer, carrying our frames to it, and its outbound queue."""

    def __init__(
        self, node_id: int, address: tuple[Any, ...], family: int, outbox: _Outbox
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.family = family
        self.outbox = outbox
        self.state = _LinkState.IDLE
        self.sock: socket.socket | None = None
        self.preamble = bytearray()  # handshake bytes, written before any queued item
        self.inbuf = bytearray()
        self.nonce = b""
        self.failures = 0
        self.retry_ns = 0
        self.deadline_ns = 0
        self.transfer_id = 0


class _InboundState(enum.Enum):
    HELLO = "hello"
    PROOF = "proof"
    FRAMES = "frames"


class _BulkIn:
    """A bulk transfer being read straight into its buffer."""

    __slots__ = ("source", "header", "begin", "buffer", "view", "filled")

    def __init__(self, source: int, header: Any, begin: _BulkBegin, buffer: pa.Buffer) -> None:
        assert buffer.size >= begin.bulk_bytes, (buffer.size, begin.bulk_bytes)
        self.source = source
        self.header = header
        self.begin = begin
        self.buffer = buffer
        self.view = memoryview(buffer).cast("B")[:begin.bulk_bytes]
        self.filled = 0


class _Inbound:
    """An accepted connection: a handshake, then one authenticated peer's frames to us."""

    def __init__(self, sock: socket.socket, deadline_ns: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _InboundState.HELLO
        self.deadline_ns = deadline_ns
        self.peer_id = -1
        self.client_nonce = b""
        self.server_nonce = b""
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.bulk: _BulkIn | None = None
        self.open = True

    def describe(self) -> str:
        peer = f"node {self.peer_id}" if self.peer_id >= 0 else "unauthenticated peer"
        try:
            return f"{peer} at {self.sock.getpeername()}"
        except OSError:
            return peer


_RETRY = (BlockingIOError, InterruptedError)
_BODY_BYTES = struct.Struct("<I")
_BODY_AT = HEADER_BYTES - 8
"""Where the codec header keeps the body length (see ipc.codec: ... body_bytes, crc)."""
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_LINGER_ABORT = struct.pack("ii", 1, 0)


def _resolve(address: tuple[str, int]) -> tuple[int, tuple[Any, ...]]:
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    assert infos, address
    family, _, _, _, sockaddr = infos[0]
    return int(family), tuple(sockaddr)


def _backoff_ns(rng: random.Random, options: TcpOptions, failures: int) -> int:
    exponent = min(failures, 62)  # beyond this the cap wins anyway
    ceiling_ms = min(options.backoff_ms_max, options.backoff_ms_base * 2**exponent)
    return int(rng.uniform(0, ceiling_ms) * NS_PER_MS)


class TcpTransport:
    """One node's TCP transport. See the module docstring and `ipc.transport`."""

    def __init__(
        self,
        cluster: str,
        node_id: int,
        secret: bytes,
        clock: Clock,
        rng: random.Random,
        *,
        bind: tuple[str, int] = ("127.0.0.1", 0),
        peers: Mapping[int, tuple[str, int]] | None = None,
        options: TcpOptions | None = None,
        messages: Mapping[str, type[msgspec.Struct]] | None = None,
    ) -> None:
        auth.check_secret(secret)
        assert 0 <= node_id < 1 << 32, node_id
        self._node_id = node_id
        self._secret = secret
        self._clock = clock
        self._rng = rng
        self._options = options = options or TcpOptions()
        self._codec = Codec(cluster_id_for(cluster), frame_bytes_max=options.frame_bytes_max)
        for tag, message_type in {**INTERNAL_MESSAGES, **(messages or {})}.items():
            self._codec.register(tag, message_type)
        self._faults = LinkFaults()
        self._stats = TransportStats()
        self._links: dict[int, _Link] = {}
        self._link_by_fd: dict[int, _Link] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._inbound_by_node: dict[int, _Inbound] = {}
        self._interest: dict[int, int] = {}
        self._retired: list[socket.socket] = []
        self._polling = False
        self._closed = False
        self._chunk = bytearray(RECV_CHUNK_BYTES)
        self._chunk_view = memoryview(self._chunk)
        self._send_pool = self._pool()
        self._receive_pool = self._pool()
        self._epoll = select.epoll()
        try:
            self._listener = self._listen(bind)
        except BaseException:
            self._epoll.close()
            raise
        try:
            for peer, address in (peers or {}).items():
                self.set_peer(peer, address)
        except BaseException:
            self.close()
            raise

    # ---- the Transport interface ----

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def faults(self) -> LinkFaults:
        return self._faults

    @property
    def address(self) -> tuple[str, int]:
        """The bound address, with the port the kernel chose if asked for port 0."""
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def register(self, tag: str, message_type: type[msgspec.Struct]) -> None:
        assert not tag.startswith(INTERNAL_TAG_PREFIX), tag
        self._codec.register(tag, message_type)

    def fileno(self) -> int:
        self._check_open()
        return self._epoll.fileno()

    def stats(self) -> TransportStats:
        """The live counters (never reset)."""
        return self._stats

    def set_peer(self, node_id: int, address: tuple[str, int]) -> None:
        """Where to dial `node_id`. A changed address drops the current connection; what
        is queued goes to the new address."""
        self._check_open()
        family, sockaddr = _resolve(address)
        link = self._links.get(node_id)
        if link is None:
            self._links[node_id] = _Link(node_id, sockaddr, family, _Outbox(self._options))
            return
        if (family, sockaddr) != (link.family, link.address):
            link.family, link.address = family, sockaddr
            self._drop_connection(link)
            link.failures, link.retry_ns = 0, 0
            self._service(link, self._clock.monotonic_ns())

    def remove_peer(self, node_id: int) -> None:
        """Forget `node_id`: its connection closes and its queued frames are dropped."""
        link = self._links.pop(node_id, None)
        if link is None:
            return
        self._drop_connection(link)
        self._drop_items(link.outbox.clear(), "peer_gone")

    def send(self, target: int, message: msgspec.Struct) -> None:
        self._check_open()
        link = self._link(target)
        frame = self._codec.encode(self._node_id, target, message)
        if self._faults.blocks(self._node_id, target):
            self._stats.count_dropped("fault_drop")
            return
        if not link.outbox.fits_frame(len(frame)):
            self._stats.count_dropped("backpressure")
            raise Backpressure(target, len(link.outbox))
        due_ns = self._due_ns(target)
        sent = self._send_now(link, frame) if not due_ns else 0
        if sent == len(frame):
            self._stats.frames_sent += 1
            return
        link.outbox.push(_Item((memoryview(frame),), due_ns))
        link.outbox.advance(sent)
        self._service(link, self._clock.monotonic_ns())

    def send_bulk(self, target: int, header: msgspec.Struct, data: BulkData) -> None:
        self._check_open()
        link = self._link(target)
        header_frame = self._codec.encode(self._node_id, target, header)
        if self._faults.blocks(self._node_id, target):
            self._stats.count_dropped("fault_drop")
            return
        if not link.outbox.fits_bulk():
            self._stats.count_dropped("backpressure")
            raise Backpressure(target, len(link.outbox))
        buffer, size = self._serialize(data)
        link.transfer_id += 1
        begin = _BulkBegin(link.transfer_id, size, header_frame)
        begin_frame = self._codec.encode(self._node_id, target, begin)
        segments = (memoryview(begin_frame), memoryview(buffer).cast("B")[:size])
        pool = self._send_pool
        item = _Item(segments, self._due_ns(target), size, lambda: pool.give(buffer))
        link.outbox.push(item)
        self._service(link, self._clock.monotonic_ns())

    def poll(self) -> list[Delivery]:
        if self._closed:
            return []
        deliveries: list[Delivery] = []
        self._polling = True
        try:
            for fd, events in self._epoll.poll(0, EPOLL_EVENTS_MAX):
                self._on_ready(fd, events, deliveries)
            self._on_timers(self._clock.monotonic_ns())
        finally:
            self._polling = False
            self._close_retired()
        return deliveries

    def next_timeout_ns(self) -> int | None:
        if self._closed:
            return None
        now = self._clock.monotonic_ns()
        times = [conn.deadline_ns for conn in self._inbound.values()
                 if conn.state is not _InboundState.FRAMES]
        for link in self._links.values():
            if link.state is _LinkState.IDLE and link.outbox:
                times.append(link.retry_ns)
            elif link.state is _LinkState.READY and (link.outbox.due_ns() or 0) > now:
                times.append(link.outbox.due_ns() or now)  # a delayed head
            elif link.state is not _LinkState.READY and link.sock is not None:
                times.append(link.deadline_ns)
        if not times:
            return None
        return max(0, min(times) - now)

    def close(self, *, abort: bool = False) -> None:
        """Close every socket and the epoll descriptor. Idempotent. `abort` resets every
        connection (SO_LINGER 0) with no goodbye, as a killed process's would."""
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            if link.sock is not None:
                self._close_socket(link.sock, abort)
                link.sock = None
            self._drop_items(link.outbox.clear(), "closed")
        for conn in self._inbound.values():
            self._close_socket(conn.sock, abort)
        self._close_socket(self._listener, abort)
        for sock in self._retired:
            sock.close()
        self._retired.clear()
        self._links.clear()
        self._link_by_fd.clear()
        self._inbound.clear()
        self._inbound_by_node.clear()
        self._send_pool.close()
        self._receive_pool.close()
        self._epoll.close()

    # ---- sending ----

    def _link(self, target: int) -> _Link:
        link = self._links.get(target)
        if link is None:
            raise UnknownPeer(target)
        return link

    def _due_ns(self, target: int) -> int:
        delay_ns = self._faults.delay_ns(self._node_id, target)
        return self._clock.monotonic_ns() + delay_ns if delay_ns else 0

    def _send_now(self, link: _Link, frame: bytes) -> int:
        """The fast path: with nothing queued ahead, write straight to the socket."""
        if link.state is not _LinkState.READY or link.outbox or link.preamble:
            return 0
        assert link.sock is not None
        try:
            return link.sock.send(frame)
        except _RETRY:
            return 0
        except OSError as error:
            self._link_lost(link, f"send: {error}")
            return 0

    def _serialize(self, data: BulkData) -> tuple[pa.Buffer, int]:
        """One Arrow IPC stream at the start of a (pooled) buffer, and its size: a dry run
        through a MockOutputStream measures it, so the real write is one pass with no
        regrowth."""
        if isinstance(data, pa.Table):
            schema, batches = data.schema, data.to_batches()
        elif isinstance(data, pa.RecordBatchReader):
            schema, batches = data.schema, list(data)
        else:
            batches = list(data)
            assert batches, "an iterable of batches must not be empty"
            schema = batches[0].schema
        sink = pa.MockOutputStream()
        self._write_stream(sink, schema, batches)
        size = sink.size()
        if size > self._options.bulk_bytes_max:
            raise MessageTooLarge(
                f"bulk of {size} bytes exceeds the maximum of {self._options.bulk_bytes_max}"
            )
        buffer = self._send_pool.acquire(size)
        writer = pa.FixedSizeBufferWriter(buffer)
        self._write_stream(writer, schema, batches)
        assert writer.tell() == size, (writer.tell(), size)
        return buffer, size

    @staticmethod
    def _write_stream(sink: Any, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
        with pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    def _service(self, link: _Link, now_ns: int) -> None:
        """Move `link` along: dial when due, write what is ready."""
        if link.state is _LinkState.IDLE:
            if link.outbox and now_ns >= link.retry_ns:
                self._dial(link, now_ns)
        elif link.state is _LinkState.READY:
            self._flush(link, now_ns)

    def _dial(self, link: _Link, now_ns: int) -> None:
        try:
            sock = socket.socket(link.family, socket.SOCK_STREAM)
        except OSError as error:  # out of descriptors, say: a host limit, retried later
            LOG.warning("node %d: cannot dial node %d: %s", self._node_id, link.node_id, error)
            self._link_lost(link, f"socket: {error}")
            return
        self._configure(sock)
        link.sock = sock
        link.state = _LinkState.CONNECTING
        link.deadline_ns = now_ns + self._options.handshake_ms_max * NS_PER_MS
        link.inbuf.clear()
        link.nonce = auth.new_nonce()
        hello = self._codec.encode(self._node_id, link.node_id, auth.Hello(link.nonce))
        link.preamble[:] = hello
        self._link_by_fd[sock.fileno()] = link
        code = sock.connect_ex(link.address)
        if code not in (0, errno.EINPROGRESS):
            self._link_lost(link, f"connect: {errno.errorcode.get(code, code)}")
            return
        self._watch(sock, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, link: _Link, now_ns: int) -> None:
        """Write the preamble, then (once authenticated) due items, until the kernel
        pushes back (then wait for EPOLLOUT) or nothing due is left."""
        assert link.sock is not None
        written = 0
        while written < FLUSH_BYTES_MAX:
            segments: list[Any] = [link.preamble] if link.preamble else []
            if link.state is _LinkState.READY and not link.preamble:
                segments = link.outbox.ready_segments(now_ns)
            if not segments:
                self._watch(link.sock, select.EPOLLIN)
                return
            try:
                sent = link.sock.sendmsg(segments)
            except _RETRY:
                break
            except OSError as error:
                self._link_lost(link, f"send: {error}")
                return
            written += sent
            if link.preamble:
                del link.preamble[:sent]
            else:
                for item in link.outbox.advance(sent):
                    self._count_sent(item)
            if sent < sum(len(segment) for segment in segments):
                break
        self._watch(link.sock, select.EPOLLIN | select.EPOLLOUT)

    def _count_sent(self, item: _Item) -> None:
        if item.bulk_bytes is None:
            self._stats.frames_sent += 1
        else:
            self._stats.bulk_sent += 1
            self._stats.bulk_bytes_sent += item.bulk_bytes
        if item.on_done is not None:
            item.on_done()

    def _drop_items(self, items: list[_Item], reason: str) -> None:
        for item in items:
            if item.on_done is not None:
                item.on_done()
        if items:
            self._stats.count_dropped(reason, len(items))

    # ---- our links: connecting, authenticating the peer ----

    def _on_link_ready(self, link: _Link, events: int, now_ns: int) -> None:
        sock = link.sock
        assert sock is not None
        if link.state is _LinkState.CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._link_lost(link, f"connect: {errno.errorcode.get(code, code)}")
                return
            try:
                sock.getpeername()
            except OSError:
                return  # still connecting (a stale event for a reused descriptor)
            link.state = _LinkState.HANDSHAKE
            self._flush(link, now_ns)
            return
        if events & select.EPOLLOUT:
            self._flush(link, now_ns)
        if link.sock is not None and events & _READABLE:
            self._read_link(link, now_ns)

    def _read_link(self, link: _Link, now_ns: int) -> None:
        assert link.sock is not None
        try:
            data = link.sock.recv(RECV_CHUNK_BYTES)
        except _RETRY:
            return
        except OSError as error:
            self._link_lost(link, f"recv: {error}")
            return
        if not data:
            self._link_lost(link, "closed by the peer")
            return
        if link.state is not _LinkState.HANDSHAKE:
            self._link_lost(link, "the peer sent bytes on a one-way connection")
            return
        link.inbuf += data
        self._read_challenge(link, now_ns)

    def _read_challenge(self, link: _Link, now_ns: int) -> None:
        try:
            found = self._next_frame(link.inbuf, 0, HANDSHAKE_FRAME_BYTES_MAX)
        except RemoteProtocolError as error:
            self._refuse_link(link, error)
            return
        if found is None:
            return
        frame, _ = found
        challenge = frame.message
        if not isinstance(challenge, auth.Challenge) or frame.source != link.node_id:
            self._refuse_link(link, AuthenticationFailed("expected the peer's challenge"))
            return
        transcript = auth.Transcript(
            self._codec.cluster_id, self._node_id, link.node_id, link.nonce, challenge.nonce
        )
        proof = auth.Proof(auth.client_proof(self._secret, transcript))
        proof_frame = self._codec.encode(self._node_id, link.node_id, proof)
        if not auth.verify_server_proof(self._secret, transcript, challenge.proof):
            # Our proof still goes, so the acceptor sees the mismatch and counts it too. It
            # binds the acceptor's fresh nonce: useless for any other handshake.
            self._try_send(link, proof_frame)
            self._refuse_link(link, AuthenticationFailed("the peer's proof is wrong"))
            return
        link.preamble[:] = proof_frame
        link.inbuf.clear()
        link.state = _LinkState.READY
        link.failures = 0
        LOG.debug("node %d: connected to node %d", self._node_id, link.node_id)
        self._flush(link, now_ns)

    @staticmethod
    def _try_send(link: _Link, data: bytes) -> None:
        assert link.sock is not None
        try:
            link.sock.send(data)
        except OSError:
            pass  # best effort: the connection is being dropped anyway

    def _refuse_link(self, link: _Link, error: RemoteProtocolError) -> None:
        self._stats.count_error(error.reason)
        LOG.warning("node %d: refused node %d at %s: %s (%s)", self._node_id, link.node_id,
                    link.address, error, error.reason)
        self._link_lost(link, error.reason)

    def _link_lost(self, link: _Link, why: str) -> None:
        """Close the link's socket and schedule a reconnect with backoff and full jitter."""
        if link.sock is not None:
            LOG.info("node %d: connection to node %d lost (%s)", self._node_id, link.node_id, why)
        self._drop_connection(link)
        link.retry_ns = self._clock.monotonic_ns() + _backoff_ns(
            self._rng, self._options, link.failures
        )
        link.failures += 1

    def _drop_connection(self, link: _Link) -> None:
        if link.sock is not None:
            self._link_by_fd.pop(link.sock.fileno(), None)
            self._retire(link.sock)
            link.sock = None
        link.state = _LinkState.IDLE
        link.preamble.clear()
        link.inbuf.clear()
        link.outbox.rewind()

    # ---- inbound connections ----

    def _accept(self, now_ns: int) -> None:
        for _ in range(ACCEPTS_PER_POLL_MAX):
            try:
                sock, _ = self._listener.accept()
            except _RETRY:
                return
            except OSError as error:
                LOG.warning("node %d: accept failed: %s", self._node_id, error)
                return
            if len(self._inbound) >= self._options.inbound_connections_max:
                self._stats.count_error("too_many_connections")
                LOG.warning("node %d: refused a connection: %d open", self._node_id,
                            len(self._inbound))
                sock.close()
                continue
            self._configure(sock)
            deadline_ns = now_ns + self._options.handshake_ms_max * NS_PER_MS
            conn = _Inbound(sock, deadline_ns)
            self._inbound[conn.fd] = conn
            self._watch(sock, select.EPOLLIN)

    def _read_inbound(self, conn: _Inbound, deliveries: list[Delivery]) -> None:
        """Read what `conn` has, up to the per-poll budget. A short read means the socket
        is drained (epoll is level-triggered: it reports whatever comes next)."""
        budget = self._options.read_bytes_per_poll_max
        while conn.open and budget > 0:
            bulk = conn.bulk
            try:
                if bulk is not None:
                    wanted = min(bulk.begin.bulk_bytes - bulk.filled, budget)
                    count = conn.sock.recv_into(bulk.view[bulk.filled:], wanted)
                else:
                    wanted = RECV_CHUNK_BYTES
                    count = conn.sock.recv_into(self._chunk, wanted)
            except _RETRY:
                return
            except OSError as error:
                self._close_inbound(conn, f"recv: {error}")
                return
            if count == 0:
                self._close_inbound(conn, "closed by the peer")
                return
            budget -= count
            if bulk is None:
                conn.inbuf += self._chunk_view[:count]
                self._parse(conn, deliveries)
            else:
                bulk.filled += count
                if bulk.filled == bulk.begin.bulk_bytes:
                    self._finish_bulk(conn, bulk, deliveries)
            if count < wanted:
                return

    def _parse(self, conn: _Inbound, deliveries: list[Delivery]) -> None:
        """Take every whole frame out of `conn.inbuf`; stop at a bulk's raw bytes."""
        position = 0
        try:
            while conn.open and conn.bulk is None:
                authenticated = conn.state is _InboundState.FRAMES
                limit = self._options.frame_bytes_max if authenticated else HANDSHAKE_FRAME_BYTES_MAX
                found = self._next_frame(conn.inbuf, position, limit)
                if found is None:
                    break
                frame, position = found
                if authenticated:
                    position = self._on_frame(conn, frame, position, deliveries)
                else:
                    self._on_handshake(conn, frame, deliveries)
        except RemoteProtocolError as error:
            self._refuse_inbound(conn, error)
            return
        del conn.inbuf[:position]

    def _next_frame(
        self, buffer: bytearray, position: int, frame_bytes_max: int
    ) -> tuple[Frame, int] | None:
        """The whole frame at `position` and where it ends, or None until all its bytes
        are in."""
        if len(buffer) - position < HEADER_BYTES:
            return None
        end = position + HEADER_BYTES + _BODY_BYTES.unpack_from(buffer, position + _BODY_AT)[0]
        if len(buffer) < end and end - position <= frame_bytes_max:
            # Incomplete: check the header now, so a bad one is refused before we wait
            # for (and buffer) the body it announces.
            self._codec.decode_header(buffer[position:position + HEADER_BYTES])
            return None
        if end - position > frame_bytes_max:
            self._codec.decode_header(buffer[position:position + HEADER_BYTES])
            raise FrameTooLarge(f"{end - position} byte frame; at most {frame_bytes_max} here")
        return self._codec.decode(buffer[position:end]), end

    def _on_frame(
        self, conn: _Inbound, frame: Frame, position: int, deliveries: list[Delivery]
    ) -> int:
        """Handle one frame of an authenticated connection; return the parse position."""
        self._check_route(conn, frame)
        message = frame.message
        if isinstance(message, _BulkBegin):
            return self._begin_bulk(conn, frame, message, position, deliveries)
        if type(message) in auth.HANDSHAKE_MESSAGES.values():
            raise CorruptFrame(f"handshake message {type(message).__name__} after the handshake")
        if self._faults.blocks(frame.source, self._node_id):
            self._stats.count_dropped("fault_drop")
            return position
        self._stats.frames_received += 1
        deliveries.append(Received(frame.source, message))
        return position

    def _check_route(self, conn: _Inbound, frame: Frame) -> None:
        if frame.target != self._node_id:
            raise MisroutedFrame(f"frame for node {frame.target} arrived at {self._node_id}")
        if frame.source != conn.peer_id:
            raise MisroutedFrame(
                f"frame from node {frame.source} on node {conn.peer_id}'s connection"
            )

    def _begin_bulk(
        self, conn: _Inbound, frame: Frame, begin: _BulkBegin, position: int,
        deliveries: list[Delivery],
    ) -> int:
        if not 0 <= begin.bulk_bytes <= self._options.bulk_bytes_max:
            raise FrameTooLarge(
                f"bulk of {begin.bulk_bytes} bytes; the maximum is {self._options.bulk_bytes_max}"
            )
        header = self._codec.decode(begin.header_frame)
        self._check_route(conn, header)
        try:
            buffer = self._receive_pool.acquire(begin.bulk_bytes)
        except MemoryError:
            raise FrameTooLarge(f"no memory for a bulk of {begin.bulk_bytes} bytes") from None
        bulk = _BulkIn(frame.source, header.message, begin, buffer)
        # Bytes of the payload that came in with the begin frame; the rest is recv_into.
        taken = min(len(conn.inbuf) - position, begin.bulk_bytes)
        bulk.view[:taken] = memoryview(conn.inbuf)[position:position + taken]
        bulk.filled = taken
        conn.bulk = bulk
        if taken == begin.bulk_bytes:
            self._finish_bulk(conn, bulk, deliveries)
        return position + taken

    def _finish_bulk(self, conn: _Inbound, bulk: _BulkIn, deliveries: list[Delivery]) -> None:
        conn.bulk = None
        bulk.view.release()
        buffer, size = bulk.buffer, bulk.begin.bulk_bytes
        try:
            table = pa.ipc.open_stream(buffer.slice(0, size)).read_all()
            table.validate()
        except (pa.ArrowException, ValueError, OSError) as error:
            self._receive_pool.give(buffer)
            self._count_refused(CorruptBulk(f"bulk is not an Arrow IPC stream: {error}"), conn)
            return
        if self._faults.blocks(bulk.source, self._node_id):
            self._receive_pool.give(buffer)
            self._stats.count_dropped("fault_drop")
            return
        self._stats.bulk_received += 1
        self._stats.bulk_bytes_received += size
        pool = self._receive_pool
        deliveries.append(
            BulkReceived(bulk.source, bulk.header, table, size, lambda: pool.give(buffer))
        )

    def _on_handshake(self, conn: _Inbound, frame: Frame, deliveries: list[Delivery]) -> None:
        message = frame.message
        if frame.target != self._node_id:
            raise AuthenticationFailed(f"handshake for node {frame.target}")
        if conn.state is _InboundState.HELLO:
            if not isinstance(message, auth.Hello):
                raise AuthenticationFailed(f"expected a hello, got {type(message).__name__}")
            self._challenge(conn, frame.source, message)
            return
        if not isinstance(message, auth.Proof) or frame.source != conn.peer_id:
            raise AuthenticationFailed(f"expected a proof, got {type(message).__name__}")
        transcript = auth.Transcript(self._codec.cluster_id, conn.peer_id, self._node_id,
                                     conn.client_nonce, conn.server_nonce)
        if not auth.verify_client_proof(self._secret, transcript, message.proof):
            raise AuthenticationFailed("wrong proof (the peer does not hold the secret)")
        conn.state = _InboundState.FRAMES
        old = self._inbound_by_node.get(conn.peer_id)
        self._inbound_by_node[conn.peer_id] = conn
        if old is not None:
            # Whatever the old connection still holds came first: deliver it, then drop it.
            self._read_inbound(old, deliveries)
            self._close_inbound(old, "replaced by a new connection")
        LOG.debug("node %d: node %d connected", self._node_id, conn.peer_id)

    def _challenge(self, conn: _Inbound, client_id: int, hello: auth.Hello) -> None:
        conn.peer_id = client_id
        conn.client_nonce = hello.nonce
        conn.server_nonce = auth.new_nonce()
        transcript = auth.Transcript(self._codec.cluster_id, client_id, self._node_id,
                                     conn.client_nonce, conn.server_nonce)
        challenge = auth.Challenge(conn.server_nonce, auth.server_proof(self._secret, transcript))
        conn.outbuf += self._codec.encode(self._node_id, client_id, challenge)
        conn.state = _InboundState.PROOF
        self._write_inbound(conn)

    def _write_inbound(self, conn: _Inbound) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except _RETRY:
            sent = 0
        except OSError as error:
            self._close_inbound(conn, f"send: {error}")
            return
        del conn.outbuf[:sent]
        events = select.EPOLLIN | (select.EPOLLOUT if conn.outbuf else 0)
        self._watch(conn.sock, events)

    def _refuse_inbound(self, conn: _Inbound, error: RemoteProtocolError) -> None:
        authenticating = conn.state is not _InboundState.FRAMES
        if authenticating and not isinstance(error, WrongCluster):
            error = AuthenticationFailed(f"{error} (during the handshake)")
        self._count_refused(error, conn)
        conn.inbuf.clear()
        self._discard_bulk(conn)
        self._close_inbound(conn, error.reason)

    def _count_refused(self, error: RemoteProtocolError, conn: _Inbound) -> None:
        self._stats.count_error(error.reason)
        LOG.warning("node %d: refused %s from %s: %s", self._node_id, error.reason,
                    conn.describe(), error)

    def _close_inbound(self, conn: _Inbound, why: str) -> None:
        if not conn.open:
            return
        conn.open = False
        if conn.bulk is not None or conn.inbuf:
            # Cut off mid-frame or mid-transfer: nothing of it is delivered.
            cut_off: RemoteProtocolError = TruncatedFrame(f"connection ended mid-frame ({why})")
            if conn.state is not _InboundState.FRAMES:
                cut_off = AuthenticationFailed(f"connection ended mid-handshake ({why})")
            self._count_refused(cut_off, conn)
            conn.inbuf.clear()
            self._discard_bulk(conn)
        LOG.debug("node %d: closing %s (%s)", self._node_id, conn.describe(), why)
        self._inbound.pop(conn.fd, None)
        if self._inbound_by_node.get(conn.peer_id) is conn:
            del self._inbound_by_node[conn.peer_id]
        self._retire(conn.sock)

    def _discard_bulk(self, conn: _Inbound) -> None:
        if conn.bulk is not None:
            conn.bulk.view.release()
            self._receive_pool.give(conn.bulk.buffer)
            conn.bulk = None

    # ---- the loop ----

    def _on_ready(self, fd: int, events: int, deliveries: list[Delivery]) -> None:
        """One readiness event. It may be stale (its socket closed and the number reused
        since epoll reported it): every handler then finds EAGAIN and does nothing."""
        now_ns = self._clock.monotonic_ns()
        if fd == self._listener.fileno():
            self._accept(now_ns)
            return
        conn = self._inbound.get(fd)
        if conn is not None:
            if conn.outbuf:
                self._write_inbound(conn)
            if conn.open and events & _READABLE:
                self._read_inbound(conn, deliveries)
            return
        link = self._link_by_fd.get(fd)
        if link is not None:
            self._on_link_ready(link, events, now_ns)

    def _on_timers(self, now_ns: int) -> None:
        """Handshake deadlines, reconnects whose backoff is over, delayed items now due."""
        expired = [conn for conn in self._inbound.values()
                   if conn.state is not _InboundState.FRAMES and now_ns >= conn.deadline_ns]
        for conn in expired:
            self._refuse_inbound(conn, AuthenticationFailed("handshake timed out"))
        for link in [link for link in self._links.values() if link.outbox or link.sock]:
            if link.state in (_LinkState.CONNECTING, _LinkState.HANDSHAKE):
                if now_ns >= link.deadline_ns:
                    self._link_lost(link, "handshake timed out")
            elif link.outbox and not self._waiting_to_write(link):
                self._service(link, now_ns)

    # ---- sockets ----

    def _listen(self, bind: tuple[str, int]) -> socket.socket:
        family, sockaddr = _resolve(bind)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._watch(sock, select.EPOLLIN)
        return sock

    def _configure(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._options.socket_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._options.socket_buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._options.socket_buffer_bytes)

    def _watch(self, sock: socket.socket, events: int) -> None:
        fd = sock.fileno()
        current = self._interest.get(fd)
        if current == events:
            return
        if current is None:
            self._epoll.register(fd, events)
        else:
            self._epoll.modify(fd, events)
        self._interest[fd] = events

    def _waiting_to_write(self, link: _Link) -> bool:
        """Whether `link` waits for EPOLLOUT (the kernel's buffer was full)."""
        if link.sock is None:
            return False
        return bool(self._interest.get(link.sock.fileno(), 0) & select.EPOLLOUT)

    def _retire(self, sock: socket.socket) -> None:
        """Stop watching `sock` and close it; inside `poll()` the close waits for the end
        of the event batch, so its descriptor number cannot be reused within it."""
        fd = sock.fileno()
        if self._interest.pop(fd, None) is not None:
            self._epoll.unregister(fd)
        if self._polling:
            self._retired.append(sock)
        else:
            sock.close()

    def _close_retired(self) -> None:
        for sock in self._retired:
            sock.close()
        self._retired.clear()

    def _close_socket(self, sock: socket.socket, abort: bool) -> None:
        if abort and sock.fileno() >= 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass  # already reset by the peer: closing resets nothing more
        sock.close()

    def _pool(self) -> _BufferPool:
        options = self._options
        return _BufferPool(
            options.pool_buffers_max, options.pool_bytes_max, options.pool_buffer_bytes_min
        )

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"node {self._node_id}: the transport is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.address}"
        return f"TcpTransport(node_id={self._node_id}, {state})"
