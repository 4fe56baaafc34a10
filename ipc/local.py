"""The local transport: control frames over POSIX message queues, bulk Arrow over /dev/shm.

Each node owns one inbound queue (named after cluster, node and incarnation, mode 0600)
and publishes it in the endpoint registry (ipc.registry). A sender resolves a target
through the registry, checking the target's entry file (one `stat`) before every send so
it never writes into the queue of an incarnation that has been replaced. Sends never
block: a frame the target's queue cannot take yet waits in a bounded per-peer FIFO that
`poll()` flushes when the queue has room (its descriptor is in our epoll for EPOLLOUT
while frames wait). A frame larger than one queue message travels through a
shared-memory segment and a small reference frame.

Bulk data is written as Arrow IPC streams straight into pooled segments (ipc.shm), one
chunk per segment, each chunk announced by a reference frame on the same FIFO as control
frames, so one source's control and bulk keep one order. The receiver maps the segments
and reads them zero-copy; it delivers one `BulkReceived` when the last chunk is in, and
its `release()` sends a release frame so the sender returns the segments to its pool.
A bulk whose stream fits in one queue message travels inside it instead (an inline frame:
no segment to write, map or release), in the same order.

Invariants: a partial transfer is never delivered (a source that dies or restarts
mid-transfer has its partial chunks dropped and their mappings closed); segments are
written only while not lent; frames to a gone peer are dropped and counted, and what was
lent to it is reclaimed; every inbound refusal is counted, logged and survived.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import select
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import posix_ipc
import pyarrow as pa

from clock import Clock
from ipc import mq, registry, shm
from ipc.codec import NODE_ID_MAX, Codec, cluster_id_for
from ipc.errors import (
    Backpressure,
    CorruptBulk,
    CorruptFrame,
    HostLimitError,
    MessageTooLarge,
    MisroutedFrame,
    RemoteProtocolError,
    TransportClosed,
    TransportError,
    UnknownPeer,
)
from ipc.faults import LinkFaults
from ipc.transport import BulkData, BulkReceived, Delivery, Received, TransportStats

logger = logging.getLogger(__name__)

INTERNAL_TAG_PREFIX = "ipc.local."
QUEUE_MESSAGE_BYTES_FLOOR = 512
"""Smallest queue message we can work with: every reference frame must fit in one."""
GiB = 1 << 30
MiB = 1 << 20


# ---- internal messages ----


class _Chunk(msgspec.Struct, frozen=True, array_like=True):
    """One segment of a bulk transfer. The first chunk carries the encoded header frame."""

    incarnation: int
    transfer: int
    index: int
    segment: str
    length: int
    last: bool
    header: bytes = b""


class _Large(msgspec.Struct, frozen=True, array_like=True):
    """A frame too large for one queue message, waiting in a segment."""

    incarnation: int
    transfer: int
    segment: str
    length: int


class _Inline(msgspec.Struct, frozen=True, array_like=True):
    """A whole bulk transfer small enough for one queue message: the encoded header frame
    and the Arrow IPC stream itself (no segment, so nothing to release)."""

    header: bytes
    stream: bytes


class _Release(msgspec.Struct, frozen=True, array_like=True):
    """The receiver is done with the segments of `transfer` (lent by `incarnation`)."""

    incarnation: int
    transfer: int


class _Abort(msgspec.Struct, frozen=True, array_like=True):
    """The sender gave up on `transfer` after some of its chunks left."""

    incarnation: int
    transfer: int


INTERNAL_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "ipc.local.chunk": _Chunk,
    "ipc.local.large": _Large,
    "ipc.local.release": _Release,
    "ipc.local.abort": _Abort,
    "ipc.local.inline": _Inline,
}


INTERNAL_TYPES = frozenset(INTERNAL_MESSAGES.values())


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """Every limit of the local transport. Queue sizes are upper bounds: the host's
    limits and `queues_per_host_expected` may make the real queue smaller."""

    queue_messages_max: int = 64
    queue_message_bytes_max: int = 64 * 1024
    queue_messages_min: int = 8
    queue_message_bytes_min: int = 1024
    queues_per_host_expected: int = 8
    outbound_frames_max: int = 4096
    frames_per_poll_max: int = 1024
    peers_max: int = 1024
    segment_bytes_min: int = 64 * 1024
    segment_bytes_max: int = 64 * MiB
    shm_bytes_max: int = 4 * GiB
    shm_free_bytes_max: int = 1 * GiB
    lent_bytes_max: int = 3 * GiB
    segments_max: int = 256
    mappings_max: int = 1024
    mapped_bytes_max: int = 4 * GiB
    inbound_transfers_max: int = 256
    liveness_check_ns: int = 50_000_000
    shm_dir: Path = field(default=shm.SHM_DIR)

    def __post_init__(self) -> None:
        assert 1 <= self.queue_messages_min <= self.queue_messages_max, self
        assert QUEUE_MESSAGE_BYTES_FLOOR <= self.queue_message_bytes_min, self
        assert self.queue_message_bytes_min <= self.queue_message_bytes_max, self
        assert self.queues_per_host_expected >= 1, self.queues_per_host_expected
        assert self.outbound_frames_max >= 1, self.outbound_frames_max
        assert self.frames_per_poll_max >= 1, self.frames_per_poll_max
        assert self.peers_max >= 1, self.peers_max
        assert self.segment_bytes_max > 2 * shm.STREAM_SLACK_BYTES, self.segment_bytes_max
        assert self.segment_bytes_max <= self.lent_bytes_max <= self.shm_bytes_max, self
        assert 0 <= self.shm_free_bytes_max <= self.shm_bytes_max, self
        assert self.segments_max >= 1, self.segments_max
        assert self.mappings_max >= 1, self.mappings_max
        assert self.mapped_bytes_max >= self.segment_bytes_max, self
        assert self.inbound_transfers_max >= 1, self.inbound_transfers_max
        assert 0 < self.liveness_check_ns <= 60_000_000_000, self.liveness_check_ns


class _Peer:
    """What we know of another node: its current endpoint, our write end of its queue,
    the frames waiting for it and what we lent it."""

    __slots__ = (
        "node_id",
        "path",
        "signature",
        "endpoint",
        "dead",
        "queue",
        "message_bytes",
        "pending",
        "blocked_out",
        "lends",
        "generation",
    )

    def __init__(self, node_id: int, path: str) -> None:
        self.node_id = node_id
        self.path = path
        self.signature: tuple[int, int] | None = (-1, -1)  # never read yet
        self.endpoint: registry.Endpoint | None = None
        self.dead = False
        self.queue: posix_ipc.MessageQueue | None = None
        self.message_bytes = 0
        self.pending: deque[tuple[int, bytes, int]] = deque()  # (ready_at_ns, frame, transfer)
        self.blocked_out = False
        self.lends: set[int] = set()
        self.generation = -1  # the registry generation when we last looked at its entry


class _Lend:
    __slots__ = ("target", "segments", "sent")

    def __init__(self, target: int, segments: list[shm.Segment]) -> None:
        self.target = target
        self.segments = segments
        self.sent = False  # some frame of it may have reached the target


class _Partial:
    """An inbound bulk transfer whose last chunk has not arrived."""

    __slots__ = ("header", "pieces", "next_index", "bytes", "failed", "fault_dropped")

    def __init__(self) -> None:
        self.header: Any = None
        self.pieces: list[pa.Table] = []
        self.next_index = 0
        self.bytes = 0
        self.failed = False
        self.fault_dropped = False


_PartialKey = tuple[int, int, int]  # (source, source incarnation, transfer)


class LocalTransport:
    """`ipc.transport.Transport` over POSIX mq and /dev/shm, for nodes on one host."""

    def __init__(
        self,
        cluster: str,
        node_id: int,
        run_dir: Path,
        clock: Clock,
        *,
        incarnation: int,
        options: LocalOptions = LocalOptions(),  # noqa: B008 (frozen, shared safely)
        messages: Mapping[str, type[msgspec.Struct]] | None = None,
    ) -> None:
        assert 0 <= node_id <= NODE_ID_MAX, node_id
        assert 0 <= incarnation <= registry.INCARNATION_MAX, incarnation
        self._node_id = node_id
        self._incarnation = incarnation
        self._clock = clock
        self._options = options
        self._frames_max = options.outbound_frames_max
        self._faults = LinkFaults()
        self._stats = TransportStats()
        self._codec = Codec(cluster_id_for(cluster))
        for tag, message_type in INTERNAL_MESSAGES.items():
            self._codec.register(tag, message_type)
        for tag, message_type in (messages or {}).items():
            self.register(tag, message_type)
        self._token = registry.resource_token(cluster, run_dir)
        self._shm_dir = options.shm_dir
        self._limits = mq.detect_host_limits()
        self._queue_size = self._choose_queue_size()
        self._queue_name = registry.queue_name(self._token, node_id, incarnation)
        self._peers: dict[int, _Peer] = {}
        self._backlog: dict[int, _Peer] = {}
        self._lends: dict[int, _Lend] = {}
        self._partials: dict[_PartialKey, _Partial] = {}
        self._transfers = itertools.count(1)
        self._watch_due_ns: int | None = None
        self._closed = False
        self._pool = shm.SegmentPool(
            self._shm_dir,
            registry.segment_prefix(self._token, node_id, incarnation),
            segment_bytes_min=options.segment_bytes_min,
            segment_bytes_max=options.segment_bytes_max,
            held_bytes_max=options.shm_bytes_max,
            free_bytes_max=options.shm_free_bytes_max,
            lent_bytes_max=options.lent_bytes_max,
            segments_max=options.segments_max,
        )
        self._mappings = shm.MappingCache(
            self._shm_dir,
            mappings_max=options.mappings_max,
            mapped_bytes_max=options.mapped_bytes_max,
        )
        self._registry = registry.Registry(run_dir, self._token)
        assert self._registry.counter is not None
        self._generation = self._registry.counter
        self._swept_generation = -1
        try:
            self._start()
        except BaseException:
            self._registry.close()
            raise

    # ---- start ----

    def _start(self) -> None:
        """Reclaim what earlier incarnations left, publish our entry, create our queue.
        The entry goes first, so a queue of ours is always named by some entry."""
        self._reclaim_previous()
        self._lease = self._registry.publish(self._endpoint())
        try:
            self._epoll = select.epoll()
            try:
                self._queue = mq.create_queue(self._queue_name, self._queue_size, self._limits)
                self._epoll.register(self._queue.mqd, select.EPOLLIN)
            except BaseException:
                self._epoll.close()
                raise
        except BaseException:
            self._registry.withdraw(self._lease)
            self._lease.release()
            raise

    def _choose_queue_size(self) -> mq.QueueSize:
        options = self._options
        size = mq.choose_queue_size(
            self._limits,
            messages_max=options.queue_messages_max,
            message_bytes_max=options.queue_message_bytes_max,
            messages_min=options.queue_messages_min,
            message_bytes_min=options.queue_message_bytes_min,
            queues_expected=options.queues_per_host_expected,
        )
        if size.message_bytes < QUEUE_MESSAGE_BYTES_FLOOR:
            raise HostLimitError(
                f"queue messages of {size.message_bytes} bytes are too small (the local "
                f"transport needs {QUEUE_MESSAGE_BYTES_FLOOR}); host limits: "
                f"{self._limits.describe()}. Raise fs.mqueue.msgsize_max with sysctl."
            )
        return size

    def _endpoint(self) -> registry.Endpoint:
        pid = os.getpid()
        create_time = registry.process_create_time(pid)
        assert create_time is not None, pid
        return registry.Endpoint(
            cluster=self._token,
            node_id=self._node_id,
            incarnation=self._incarnation,
            pid=pid,
            pid_create_time=create_time,
            queue=self._queue_name,
            queue_messages=self._queue_size.messages,
            queue_message_bytes=self._queue_size.message_bytes,
            segment_prefix=registry.segment_prefix(self._token, self._node_id, self._incarnation),
        )

    def _reclaim_previous(self) -> None:
        """Remove what earlier incarnations of this node left: their queue (named in
        the registry) and every segment with this node's prefix."""
        path = self._registry.entry_path(self._node_id)
        found = registry.read_entry(path)
        if found is not None:
            previous, (inode, _) = found
            if registry.holder_alive(path, inode, previous):
                raise TransportError(
                    f"node {self._node_id} incarnation {previous.incarnation} (pid "
                    f"{previous.pid}) is still alive; refusing to start a second one"
                )
            if mq.unlink_queue(previous.queue):
                logger.info("reclaimed queue %s of a previous incarnation", previous.queue)
            registry.remove_entry(path, inode)
        prefix = registry.node_prefix(self._token, self._node_id)
        for name in shm.segment_files(self._shm_dir, prefix):
            shm.unlink_segment(self._shm_dir, name)
            logger.info("reclaimed segment %s of a previous incarnation", name)
        if mq.unlink_queue(self._queue_name):
            logger.info("reclaimed queue %s left by this incarnation", self._queue_name)

    # ---- the Transport interface ----

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def faults(self) -> LinkFaults:
        return self._faults

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def host_limits(self) -> mq.HostLimits:
        return self._limits

    @property
    def queue_size(self) -> mq.QueueSize:
        return self._queue_size

    def register(self, tag: str, message_type: type[msgspec.Struct]) -> None:
        assert not tag.startswith(INTERNAL_TAG_PREFIX), f"{tag} is reserved"
        self._codec.register(tag, message_type)

    def fileno(self) -> int:
        self._check_open()
        return self._epoll.fileno()

    def stats(self) -> TransportStats:
        stats = self._stats
        return replace(stats, errors=dict(stats.errors), dropped=dict(stats.dropped))

    def send(self, target: int, message: msgspec.Struct) -> None:
        self._check_open()
        peer = self._peers.get(target) or self._add_peer(target)
        ready_at = self._outbound_ready_at(target) if self._faults.active else 0
        if ready_at < 0:
            return
        frame = self._codec.encode(self._node_id, target, message)
        if peer.generation != self._generation[0]:
            self._refresh(peer)
        # The common case inline: nothing waits, the queue is open and the frame fits.
        queue = peer.queue
        if queue is not None and not ready_at and not peer.pending:
            if len(frame) <= peer.message_bytes:
                try:
                    queue.send(frame)
                except posix_ipc.BusyError:
                    pass
                else:
                    self._stats.frames_sent += 1
                    return
        self._enqueue(peer, frame, 0, ready_at)

    def send_bulk(self, target: int, header: msgspec.Struct, data: BulkData) -> None:
        self._check_open()
        peer = self._peers.get(target) or self._add_peer(target)
        ready_at = self._outbound_ready_at(target) if self._faults.active else 0
        if ready_at < 0:
            return
        header_frame = self._codec.encode(self._node_id, target, header)
        if peer.generation != self._generation[0]:
            self._refresh(peer)
        if len(peer.pending) >= self._frames_max:
            raise Backpressure(target, len(peer.pending))
        if isinstance(data, pa.Table) and self._pool.lent_bytes:
            if self._pool.lent_bytes + data.nbytes > self._options.lent_bytes_max:
                raise Backpressure(target, len(peer.pending))
        if isinstance(data, pa.Table) and self._send_inline(peer, ready_at, header_frame, data):
            return
        schema, batches = _schema_and_batches(data)
        transfer = self._new_lend(peer, [])
        try:
            total = self._send_chunks(peer, transfer, ready_at, header_frame, schema, batches)
        except BaseException:
            self._abort_outbound(peer, transfer)
            raise
        self._stats.bulk_sent += 1
        self._stats.bulk_bytes_sent += total

    def _send_inline(
        self, peer: _Peer, ready_at: int, header_frame: bytes, table: pa.Table
    ) -> bool:
        """Send a table whose stream fits one queue message in that message (no segment to
        write, map and release); False when it does not fit."""
        if peer.message_bytes == 0 or table.nbytes > peer.message_bytes:
            return False
        stream = shm.stream_bytes(table)
        frame = self._codec.encode(self._node_id, peer.node_id, _Inline(header_frame, stream))
        if len(frame) > peer.message_bytes:
            return False
        self._enqueue(peer, frame, 0, ready_at)
        self._stats.bulk_sent += 1
        self._stats.bulk_bytes_sent += len(stream)
        return True

    def poll(self) -> list[Delivery]:
        if self._closed:
            return []
        deliveries: list[Delivery] = []
        queue = self._queue
        waiting = queue.current_messages  # one cheap syscall, and no EAGAIN to catch
        if waiting:
            receive = queue.receive
            on_frame = self._on_frame
            for _ in range(min(waiting, self._options.frames_per_poll_max)):
                raw, _ = receive()
                on_frame(raw, deliveries)
        if self._generation[0] != self._swept_generation:
            self._close_withdrawn_peers(self._generation[0])
        if self._backlog or self._lends or self._partials:
            self._housekeeping()
        return deliveries

    def next_timeout_ns(self) -> int | None:
        if self._closed or not (self._backlog or self._lends or self._partials):
            return None
        now = self._clock.monotonic_ns()
        due = self._watch_due_ns
        if due is None:
            due = now + self._options.liveness_check_ns
        for peer in self._backlog.values():
            if peer.pending and peer.queue is not None:
                ready_at = peer.pending[0][0]
                if ready_at and ready_at < due:
                    due = ready_at
        return max(0, due - now)

    def close(self) -> None:
        """Withdraw from the registry, unlink our queue and segments, drop mappings."""
        if self._closed:
            return
        self._closed = True
        self._registry.withdraw(self._lease)
        self._close_descriptors()
        mq.unlink_queue(self._queue_name)
        self._pool.close()
        self._mappings.close()
        self._lease.release()
        self._registry.close()

    def _abandon(self) -> None:
        """Die as SIGKILL would: close descriptors and mappings, remove nothing."""
        if self._closed:
            return
        self._closed = True
        self._close_descriptors()
        self._pool.abandon()
        self._mappings.close()
        self._lease.release()
        self._registry.close()

    def _close_descriptors(self) -> None:
        for peer in self._peers.values():
            if peer.queue is not None:
                peer.queue.close()
                peer.queue = None
        self._backlog.clear()
        self._partials.clear()
        self._epoll.close()
        self._queue.close()

    def _open_descriptors(self) -> list[str]:
        """The descriptors this transport still holds (for leak checks)."""
        held = []
        if not self._epoll.closed:
            held.append(f"epoll {self._epoll.fileno()}")
        if self._queue.mqd != -1:
            held.append(f"queue {self._queue_name}")
        if self._lease.fd != -1:
            held.append(f"registry lock {self._lease.path}")
        held.extend(
            f"queue of node {peer.node_id}"
            for peer in self._peers.values()
            if peer.queue is not None
        )
        return held

    def __repr__(self) -> str:
        return (
            f"LocalTransport(node={self._node_id}, incarnation={self._incarnation}, "
            f"queue={self._queue_name!r}, closed={self._closed})"
        )

    # ---- outbound ----

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"node {self._node_id}'s transport is closed")

    def _add_peer(self, node_id: int) -> _Peer:
        if not isinstance(node_id, int) or not 0 <= node_id <= NODE_ID_MAX:
            raise UnknownPeer(node_id)
        if len(self._peers) >= self._options.peers_max and not self._evict_idle_peer():
            raise UnknownPeer(node_id)
        peer = _Peer(node_id, self._registry.entry_path(node_id))
        self._peers[node_id] = peer
        return peer

    def _evict_idle_peer(self) -> bool:
        """Make room in a full peer table (a long-lived worker answers many short-lived
        clients): forget the longest-known peer with nothing queued, nothing lent and no
        transfer in flight. It is learned again from the registry if it is used again."""
        busy = {source for source, _, _ in self._partials}
        for node_id, peer in self._peers.items():
            if peer.pending or peer.lends or peer.blocked_out or node_id in self._backlog:
                continue
            if node_id in busy:
                continue
            if peer.queue is not None:
                peer.queue.close()
            del self._peers[node_id]
            logger.debug("forgot idle peer %d to make room", node_id)
            return True
        return False

    def _outbound_ready_at(self, target: int) -> int:
        """0 to send now, a monotonic time to hold the frame until, -1 to drop it."""
        faults = self._faults
        if faults.blocks(self._node_id, target):
            self._stats.count_dropped("fault_drop")
            return -1
        delay_ns = faults.delay_ns(self._node_id, target)
        return self._clock.monotonic_ns() + delay_ns if delay_ns else 0

    def _enqueue(
        self, peer: _Peer, frame: bytes, transfer: int, ready_at: int, *, bounded: bool = True
    ) -> None:
        """Send now if nothing waits before this frame and the queue has room, else
        queue it. Internal frames (`bounded=False`) are at most one per transfer."""
        if peer.queue is None and peer.endpoint is not None and not peer.dead:
            self._open(peer)
        queue = peer.queue
        direct = queue is not None and not peer.pending and not ready_at
        if not direct and bounded and len(peer.pending) >= self._frames_max:
            raise Backpressure(peer.node_id, len(peer.pending))
        if queue is not None and len(frame) > peer.message_bytes:
            frame, transfer = self._wrap_large(peer, frame)
        if direct:
            assert queue is not None
            try:
                queue.send(frame)
            except posix_ipc.BusyError:
                self._set_blocked_out(peer, True)
            else:
                self._sent(transfer)
                return
        peer.pending.append((ready_at, frame, transfer))
        self._backlog[peer.node_id] = peer

    def _sent(self, transfer: int) -> None:
        self._stats.frames_sent += 1
        if transfer:
            lend = self._lends.get(transfer)
            if lend is not None:
                lend.sent = True

    def _wrap_large(self, peer: _Peer, frame: bytes) -> tuple[bytes, int]:
        """Put a frame too large for one queue message into a segment; the reference."""
        segment = self._pool.acquire(len(frame))
        if segment is None:
            raise Backpressure(peer.node_id, len(peer.pending))
        shm.write_bytes(segment, frame)
        transfer = self._new_lend(peer, [segment])
        reference = self._codec.encode(
            self._node_id,
            peer.node_id,
            _Large(self._incarnation, transfer, segment.name, len(frame)),
        )
        assert len(reference) <= peer.message_bytes, (len(reference), peer.message_bytes)
        return reference, transfer

    def _flush(self, peer: _Peer, now: int | None) -> None:
        """Send waiting frames, in order, while the target's queue has room."""
        queue = peer.queue
        pending = peer.pending
        while pending and queue is not None:
            ready_at, frame, transfer = pending[0]
            if ready_at:
                if now is None:
                    now = self._clock.monotonic_ns()
                if ready_at > now:
                    break
            if len(frame) > peer.message_bytes:
                try:
                    frame, wrapped = self._wrap_large(peer, frame)
                except (Backpressure, HostLimitError) as error:
                    logger.debug("large frame to %d waits: %s", peer.node_id, error)
                    break
                if transfer in self._lends:
                    self._lends[transfer].sent = True  # conservatively: it may arrive
                pending[0] = (ready_at, frame, wrapped)
                transfer = wrapped
            try:
                queue.send(frame)
            except posix_ipc.BusyError:
                self._set_blocked_out(peer, True)
                return
            pending.popleft()
            self._sent(transfer)
        self._set_blocked_out(peer, False)
        if not pending:
            self._backlog.pop(peer.node_id, None)

    def _set_blocked_out(self, peer: _Peer, blocked: bool) -> None:
        """Watch the peer's queue for room (EPOLLOUT) exactly while a frame waits on it."""
        if blocked == peer.blocked_out or peer.queue is None:
            return
        if blocked:
            self._epoll.register(peer.queue.mqd, select.EPOLLOUT)
        else:
            self._epoll.unregister(peer.queue.mqd)
        peer.blocked_out = blocked

    # ---- bulk out ----

    def _send_chunks(
        self,
        peer: _Peer,
        transfer: int,
        ready_at: int,
        header_frame: bytes,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
    ) -> int:
        lend = self._lends[transfer]
        total = 0
        chunks = shm.plan_chunks(batches, self._options.segment_bytes_max)
        for index, (chunk, last) in enumerate(chunks):
            segment, length = self._write_chunk(peer, lend, schema, chunk)
            lend.segments.append(segment)
            message = _Chunk(
                self._incarnation,
                transfer,
                index,
                segment.name,
                length,
                last,
                header_frame if index == 0 else b"",
            )
            frame = self._codec.encode(self._node_id, peer.node_id, message)
            self._enqueue(peer, frame, transfer, ready_at)
            if peer.pending and peer.queue is not None:
                self._flush(peer, None)  # let the receiver start mapping early
            total += length
        return total

    def _write_chunk(
        self, peer: _Peer, lend: _Lend, schema: pa.Schema, batches: list[pa.RecordBatch]
    ) -> tuple[shm.Segment, int]:
        size = shm.measure_stream(schema, batches)
        segment = self._pool.acquire(size)
        if segment is None:
            own = sum(segment.capacity for segment in lend.segments)
            if self._pool.lent_bytes == own:
                raise MessageTooLarge(
                    f"bulk to node {peer.node_id} needs more than lent_bytes_max="
                    f"{self._options.lent_bytes_max} bytes of shared memory at once"
                )
            raise Backpressure(peer.node_id, len(peer.pending))
        try:
            length = shm.write_stream(segment, schema, batches)
        except BaseException:
            self._pool.give_back(segment)
            raise
        assert length == size, (length, size)
        return segment, length

    def _new_lend(self, peer: _Peer, segments: list[shm.Segment]) -> int:
        transfer = next(self._transfers)
        self._lends[transfer] = _Lend(peer.node_id, segments)
        peer.lends.add(transfer)
        return transfer

    def _end_lend(self, transfer: int) -> None:
        lend = self._lends.pop(transfer)
        peer = self._peers.get(lend.target)
        if peer is not None:
            peer.lends.discard(transfer)
        for segment in lend.segments:
            self._pool.give_back(segment)

    def _abort_outbound(self, peer: _Peer, transfer: int) -> None:
        """A send_bulk failed part way: unsend what has not left; if some chunk has, tell
        the receiver, whose release will return the segments."""
        lend = self._lends.get(transfer)
        if lend is None:
            return  # the peer was forgotten meanwhile, and the lend with it
        if any(item[2] == transfer for item in peer.pending):
            peer.pending = deque(item for item in peer.pending if item[2] != transfer)
            if not peer.pending:
                self._set_blocked_out(peer, False)
                self._backlog.pop(peer.node_id, None)
        if not lend.sent:
            self._end_lend(transfer)
            return
        abort = _Abort(self._incarnation, transfer)
        self._enqueue(
            peer, self._codec.encode(self._node_id, peer.node_id, abort), 0, 0, bounded=False
        )

    # ---- the registry view of peers ----

    def _refresh(self, peer: _Peer) -> None:
        """Notice a new, replaced or withdrawn entry of the peer (one stat). Callers on
        hot paths skip it while the registry generation has not moved."""
        peer.generation = self._generation[0]  # read before the entry: see registry
        if registry.entry_signature(peer.path) != peer.signature:
            self._reload(peer)

    def _reload(self, peer: _Peer) -> None:
        found = registry.read_entry(peer.path)
        if found is None:
            peer.signature = registry.entry_signature(peer.path)
            if peer.endpoint is not None and not peer.dead:
                logger.info("node %d withdrew from the registry", peer.node_id)
                self._forget(peer, "peer_gone")
            peer.endpoint, peer.dead = None, False
            return
        endpoint, peer.signature = found
        old = peer.endpoint
        if old is not None and old.incarnation == endpoint.incarnation:
            return
        if old is not None and not peer.dead:
            logger.info(
                "node %d restarted (incarnation %d -> %d)",
                peer.node_id,
                old.incarnation,
                endpoint.incarnation,
            )
            self._forget(peer, "peer_gone")
        peer.endpoint, peer.dead = endpoint, False
        peer.message_bytes = endpoint.queue_message_bytes
        if not registry.holder_alive(peer.path, peer.signature[0], endpoint):
            self._mark_dead(peer)
            return
        self._open(peer)

    def _open(self, peer: _Peer) -> None:
        assert peer.endpoint is not None
        assert peer.queue is None, peer.node_id
        peer.queue = mq.open_queue(peer.endpoint.queue)

    def _mark_dead(self, peer: _Peer) -> None:
        """The peer's current incarnation is gone: drop what waits for it, take back what
        we lent it. Frames sent from now on wait for its next incarnation."""
        assert peer.endpoint is not None
        logger.info("node %d incarnation %d is gone", peer.node_id, peer.endpoint.incarnation)
        self._forget(peer, "peer_gone")
        peer.dead = True

    def _forget(self, peer: _Peer, reason: str) -> None:
        if peer.pending:
            self._stats.count_dropped(reason, len(peer.pending))
            peer.pending.clear()
        self._set_blocked_out(peer, False)
        self._backlog.pop(peer.node_id, None)
        if peer.queue is not None:
            peer.queue.close()
            peer.queue = None
        for transfer in sorted(peer.lends):
            self._end_lend(transfer)
        if peer.endpoint is not None:
            incarnation = peer.endpoint.incarnation
            self._abort_partials(peer.node_id, incarnation + 1)
            prefix = registry.segment_prefix(self._token, peer.node_id, incarnation)
            self._mappings.evict_prefix(prefix)

    def _housekeeping(self) -> None:
        """Flush waiting frames, and every `liveness_check_ns` look for peers that died."""
        now = self._clock.monotonic_ns()
        generation = self._generation[0]
        for peer in list(self._backlog.values()):
            if peer.generation != generation:
                self._refresh(peer)
            if peer.queue is None and peer.endpoint is not None and not peer.dead:
                self._open(peer)
            self._flush(peer, now)
        if not (self._backlog or self._lends or self._partials):
            self._watch_due_ns = None
        elif self._watch_due_ns is None:
            self._watch_due_ns = now + self._options.liveness_check_ns
        elif now >= self._watch_due_ns:
            self._check_peers()
            self._watch_due_ns = now + self._options.liveness_check_ns

    def _close_withdrawn_peers(self, generation: int) -> None:
        """The registry changed: close our write end of every queue whose owner withdrew
        or restarted. The kernel charges a queue against its owner's byte budget until
        the last descriptor closes, so a worker that answered many short-lived clients
        would otherwise hold their unlinked queues (and the user's mq budget) forever."""
        self._swept_generation = generation
        for peer in list(self._peers.values()):
            if peer.queue is not None and peer.generation != generation:
                self._refresh(peer)

    def _check_peers(self) -> None:
        watched = set(self._backlog)
        watched.update(lend.target for lend in self._lends.values())
        watched.update(source for source, _, _ in self._partials)
        for node_id in sorted(watched):
            peer = self._known_peer(node_id)
            if peer is None:
                self._abort_partials(node_id, registry.INCARNATION_MAX + 1)
                continue
            self._refresh(peer)
            endpoint = peer.endpoint
            if endpoint is None or peer.dead:
                continue
            assert peer.signature is not None
            if not registry.holder_alive(peer.path, peer.signature[0], endpoint):
                self._mark_dead(peer)
            elif peer.pending:
                self._flush(peer, None)

    # ---- inbound ----

    def _refuse(self, error: RemoteProtocolError) -> None:
        self._stats.count_error(error.reason)
        logger.warning("node %d refused a frame (%s): %s", self._node_id, error.reason, error)

    def _on_frame(self, raw: bytes, deliveries: list[Delivery], nested: bool = False) -> None:
        try:
            frame = self._codec.decode(raw)
        except RemoteProtocolError as error:
            self._refuse(error)
            return
        if frame.target != self._node_id:
            self._refuse(MisroutedFrame(f"frame for node {frame.target} reached {self._node_id}"))
            return
        self._stats.frames_received += 1
        message = frame.message
        source = frame.source
        if type(message) not in INTERNAL_TYPES:
            if self._faults.active and self._faults.blocks(source, self._node_id):
                self._stats.count_dropped("fault_drop")
            else:
                deliveries.append(Received(source, message))
        elif isinstance(message, _Chunk):
            self._on_chunk(source, message, deliveries)
        elif isinstance(message, _Inline):
            self._on_inline(source, message, deliveries)
        elif isinstance(message, _Release):
            self._on_release(source, message)
        elif isinstance(message, _Abort):
            self._on_abort(source, message)
        elif nested:
            self._refuse(CorruptFrame("a large-frame reference inside a large frame"))
        else:
            assert isinstance(message, _Large), message
            self._on_large(source, message, deliveries)

    def _segment_buffer(self, source: int, incarnation: int, name: str, length: int) -> pa.Buffer:
        """A view of a source's segment. Raises CorruptBulk for a segment that is not the
        source's, or that is gone or too short."""
        prefix = registry.segment_prefix(self._token, source, incarnation)
        if not (name.startswith(prefix) and name[len(prefix) :].isdigit()):
            raise CorruptBulk(f"segment {name!r} does not belong to node {source}")
        if length < 0:
            raise CorruptBulk(f"negative length {length}")
        return self._mappings.buffer(name, length)

    def _on_large(self, source: int, large: _Large, deliveries: list[Delivery]) -> None:
        try:
            data = self._segment_buffer(source, large.incarnation, large.segment, large.length)
            raw = data.to_pybytes()
        except CorruptBulk as error:
            self._refuse(error)
            raw = b""
        self._send_release(source, large.incarnation, large.transfer)
        if raw:
            self._on_frame(raw, deliveries, nested=True)

    def _on_release(self, source: int, release: _Release) -> None:
        lend = self._lends.get(release.transfer)
        if release.incarnation != self._incarnation or lend is None or lend.target != source:
            logger.debug("ignoring release of transfer %d from %d", release.transfer, source)
            return
        self._end_lend(release.transfer)

    def _on_abort(self, source: int, abort: _Abort) -> None:
        partial = self._partials.pop((source, abort.incarnation, abort.transfer), None)
        if partial is not None:
            self._stats.count_dropped("bulk_aborted")
        self._send_release(source, abort.incarnation, abort.transfer)

    def _on_inline(self, source: int, inline: _Inline, deliveries: list[Delivery]) -> None:
        if self._faults.active and self._faults.blocks(source, self._node_id):
            self._stats.count_dropped("fault_drop")
            return
        try:
            header = self._codec.decode(inline.header)
        except RemoteProtocolError as error:
            self._refuse(error)
            return
        if header.source != source or header.target != self._node_id:
            self._refuse(CorruptBulk("bulk header names other nodes"))
            return
        try:
            table = shm.read_stream(pa.py_buffer(inline.stream))
        except CorruptBulk as error:
            self._refuse(error)
            return
        self._stats.bulk_received += 1
        self._stats.bulk_bytes_received += len(inline.stream)
        deliveries.append(BulkReceived(source, header.message, table, len(inline.stream)))

    def _on_chunk(self, source: int, chunk: _Chunk, deliveries: list[Delivery]) -> None:
        key = (source, chunk.incarnation, chunk.transfer)
        partial = self._partials.get(key)
        if partial is None:
            partial = self._start_partial(source, chunk)
            self._partials[key] = partial
        elif chunk.index != partial.next_index:
            self._fail(
                partial, CorruptBulk(f"chunk {chunk.index} came after {partial.next_index - 1}")
            )
        partial.next_index = chunk.index + 1
        if not (partial.failed or partial.fault_dropped):
            try:
                buffer = self._segment_buffer(
                    source, chunk.incarnation, chunk.segment, chunk.length
                )
                partial.pieces.append(shm.read_stream(buffer))
            except CorruptBulk as error:
                self._fail(partial, error)
            partial.bytes += chunk.length
        if chunk.last:
            del self._partials[key]
            self._finish(source, chunk, partial, deliveries)

    def _start_partial(self, source: int, chunk: _Chunk) -> _Partial:
        self._abort_partials(source, chunk.incarnation)  # older incarnations are gone
        partial = _Partial()
        if self._faults.active and self._faults.blocks(source, self._node_id):
            partial.fault_dropped = True
        elif chunk.index != 0:
            self._fail(
                partial, CorruptBulk(f"transfer {chunk.transfer} began at chunk {chunk.index}")
            )
        elif len(self._partials) >= self._options.inbound_transfers_max:
            self._fail(partial, CorruptBulk("too many bulk transfers in progress"))
        else:
            try:
                header = self._codec.decode(chunk.header)
            except RemoteProtocolError as error:
                self._fail(partial, error)
            else:
                if header.source != source or header.target != self._node_id:
                    self._fail(partial, CorruptBulk("bulk header names other nodes"))
                partial.header = header.message
        return partial

    def _fail(self, partial: _Partial, error: RemoteProtocolError) -> None:
        if not partial.failed:
            partial.failed = True
            partial.pieces.clear()
            self._refuse(error)

    def _finish(
        self, source: int, chunk: _Chunk, partial: _Partial, deliveries: list[Delivery]
    ) -> None:
        table: pa.Table | None = None
        if not (partial.failed or partial.fault_dropped):
            pieces = partial.pieces
            try:
                table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
            except (pa.ArrowException, ValueError) as error:
                self._fail(partial, CorruptBulk(f"chunks do not join: {error}"))
        if table is None:
            if partial.fault_dropped:
                self._stats.count_dropped("fault_drop")
            self._send_release(source, chunk.incarnation, chunk.transfer)
            return
        self._stats.bulk_received += 1
        self._stats.bulk_bytes_received += partial.bytes
        release = functools.partial(
            self._release_inbound, source, chunk.incarnation, chunk.transfer
        )
        deliveries.append(BulkReceived(source, partial.header, table, partial.bytes, release))

    def _abort_partials(self, source: int, below_incarnation: int) -> None:
        """Drop partial transfers from incarnations of `source` older than the given one."""
        stale = [key for key in self._partials if key[0] == source and key[1] < below_incarnation]
        for key in stale:
            del self._partials[key]
            self._stats.count_dropped("bulk_aborted")
            prefix = registry.segment_prefix(self._token, source, key[1])
            self._mappings.evict_prefix(prefix)
            logger.info("dropped partial transfer %d from node %d", key[2], source)

    def _release_inbound(self, source: int, incarnation: int, transfer: int) -> None:
        if not self._closed:
            self._send_release(source, incarnation, transfer)

    def _known_peer(self, node_id: int) -> _Peer | None:
        """The peer, added if need be; None past `peers_max`."""
        peer = self._peers.get(node_id)
        if peer is None:
            try:
                peer = self._add_peer(node_id)
            except UnknownPeer:
                return None
        return peer

    def _send_release(self, source: int, incarnation: int, transfer: int) -> None:
        """Tell the lender it may reuse the segments of `transfer`; pointless (and
        skipped) once the lending incarnation is gone."""
        peer = self._known_peer(source)
        if peer is None:
            return
        if peer.generation != self._generation[0]:
            self._refresh(peer)
        endpoint = peer.endpoint
        if endpoint is None or peer.dead or endpoint.incarnation != incarnation:
            return
        frame = self._codec.encode(self._node_id, source, _Release(incarnation, transfer))
        self._enqueue(peer, frame, 0, 0, bounded=False)


def _schema_and_batches(data: BulkData) -> tuple[pa.Schema, Iterable[pa.RecordBatch]]:
    if isinstance(data, pa.Table):
        return data.schema, data.to_batches()
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, data
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("send_bulk needs at least one batch (send schema.empty_table())")
    return first.schema, itertools.chain([first], iterator)


# ---- supervision ----


def reclaim_cluster(
    cluster: str,
    run_dir: Path,
    *,
    include_live: bool = False,
    shm_dir: Path = shm.SHM_DIR,
) -> list[str]:
    """Remove the queues, segments and registry entries of a cluster's dead nodes (with
    `include_live`, of every node: for `down`). Returns what was removed."""
    token = registry.resource_token(cluster, run_dir)
    directory = registry.registry_directory(run_dir, token)
    removed: list[str] = []
    live_prefixes: list[str] = []
    if directory.is_dir():
        entries = registry.Registry(run_dir, token)
        try:
            removed.extend(_reclaim_entries(entries, include_live, live_prefixes))
        finally:
            entries.close()
    for name in shm.segment_files(shm_dir, registry.cluster_prefix(token)):
        if any(name.startswith(prefix) for prefix in live_prefixes):
            continue
        if shm.unlink_segment(shm_dir, name):
            removed.append(f"{shm_dir}/{name}")
    return removed


def _reclaim_entries(
    entries: registry.Registry, include_live: bool, live_prefixes: list[str]
) -> list[str]:
    removed: list[str] = []
    for _, path in entries.entries():
        found = registry.read_entry(path)
        if found is None:
            continue
        endpoint, (inode, _) = found
        if not include_live and registry.holder_alive(path, inode, endpoint):
            live_prefixes.append(endpoint.segment_prefix)
            continue
        if mq.unlink_queue(endpoint.queue):
            removed.append(endpoint.queue)
        if registry.remove_entry(path, inode):
            removed.append(path)
    for path in entries.stale_temporaries():
        if registry.remove_file(path):
            removed.append(path)
    if removed:
        entries.bump()
    return removed
