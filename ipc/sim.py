"""The simulated transport: the deterministic simulator's network behind the one interface.

A `SimFabric` is the network of one simulated cluster. It carries frames (bytes) between
the `SimTransport`s attached to it as events on a `Scheduler`'s simulated time, and owns
the faults a simulation injects: random drop, duplication, corruption (a flipped byte the
receiver's codec refuses), latency with jitter, reordering, and directed partition rules.
A `SimTransport` is one node's end and implements `ipc.transport.Transport` exactly: every
control message is encoded by the codec and decoded at the receiver, and bulk data travels
as Arrow IPC bytes read back zero-copy, so a simulation exercises the bytes a real
transport carries.

Invariants: every random decision comes from the fabric's seeded `random.Random`, drawn
in send order, and every delivery is an event on the scheduler, so the same sends give
the same deliveries in every run. With the fabric's faults off, each (source, target)
link delivers in send order and loses nothing accepted while both ends stay up; a frame
in flight to an incarnation that has gone (closed or crashed) is dropped, while what a
crashed sender already put on the wire still arrives.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import msgspec
import pyarrow as pa

from ipc.codec import FRAME_BYTES_MAX_DEFAULT, NODE_ID_MAX, Codec, Frame
from ipc.errors import (
    Backpressure,
    CorruptBulk,
    MisroutedFrame,
    RemoteProtocolError,
    TransportClosed,
    UnknownPeer,
)
from ipc.faults import LinkFaults
from ipc.transport import BulkData, BulkReceived, Delivery, Received, TransportStats

_logger = logging.getLogger(__name__)

LATENCY_NS_MIN_DEFAULT = 1_000_000
LATENCY_NS_MAX_DEFAULT = 10_000_000
LATENCY_NS_LIMIT = 5_000_000_000
"""No simulated link latency is longer than this."""
LINK_FRAMES_MAX_DEFAULT = 1024
"""Frames one link may hold at once: queued at the sender, in flight, or arrived but
not yet polled. Past it `send` pushes back, as a full queue would."""
LINK_FRAMES_MAX_LIMIT = 1 << 20
BULK_TAG = "ipc.sim.bulk"
_UNCHECKED_OFFSETS = (3, 12, 13, 14, 15)
"""Header bytes the codec cannot check (flags, source). Corruption spares them, so a
corrupted frame is always refused rather than silently credited to another sender."""


class Scheduler(Protocol):
    """Simulated time: what drives a fabric (the simulator's event queue, or a test's)."""

    def now_ns(self) -> int: ...

    def schedule(self, at_ns: int, action: Callable[[], None]) -> None:
        """Run `action` at `at_ns` (never in the past), after every action scheduled
        earlier for the same instant."""
        ...


class SimBulk(msgspec.Struct, frozen=True, array_like=True):
    """The control frame that announces bulk data. `header` is a whole codec frame
    holding the caller's header Struct; the Arrow IPC bytes travel beside it."""

    header: bytes
    data_bytes: int


@dataclass(frozen=True, slots=True)
class SimOptions:
    link_frames_max: int = LINK_FRAMES_MAX_DEFAULT
    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT

    def __post_init__(self) -> None:
        assert 0 < self.link_frames_max <= LINK_FRAMES_MAX_LIMIT, self.link_frames_max
        assert self.frame_bytes_max > 0, self.frame_bytes_max


@dataclass
class FabricStats:
    """Frames the fabric carried, never reset. `sent` counts frames put on the wire."""

    sent: int = 0
    delivered: int = 0
    dropped_random: int = 0
    dropped_partition: int = 0
    dropped_crashed: int = 0
    """Arrived for an incarnation that had closed or crashed meanwhile."""
    duplicated: int = 0
    corrupted: int = 0


class _Packet:
    """One frame on the wire. `source` is None for raw bytes a test injects."""

    __slots__ = ("source", "target", "frame", "bulk")

    def __init__(
        self, source: int | None, target: int, frame: bytes, bulk: pa.Buffer | None
    ) -> None:
        self.source = source
        self.target = target
        self.frame = frame
        self.bulk = bulk


class SimFabric:
    """The simulated network of one cluster: fault knobs, partition rules, delivery."""

    def __init__(self, rng: random.Random, scheduler: Scheduler, cluster_id: int) -> None:
        self.cluster_id = cluster_id
        self.drop_probability = 0.0
        """Probabilities are in [0, 1]; each is drawn once per frame put on the wire."""
        self.duplicate_probability = 0.0
        self.corrupt_probability = 0.0
        self.reorder = False
        """Off: each link is FIFO (a frame never overtakes an earlier one on its link).
        On: each frame takes its own drawn latency, so jitter reorders a link."""
        self.latency_ns_min = LATENCY_NS_MIN_DEFAULT
        self.latency_ns_max = LATENCY_NS_MAX_DEFAULT
        self.stats = FabricStats()
        self._rng = rng
        self._now_ns = scheduler.now_ns
        self._schedule = scheduler.schedule
        self._blocked: set[tuple[int, int]] = set()
        self._attached: dict[int, SimTransport] = {}
        self._epochs = 0
        self._last_arrival_ns: dict[tuple[int, int], int] = {}
        self._link_frames: dict[tuple[int, int], int] = {}
        self._in_flight = 0
        self._timers = 0
        self._eventfds: set[int] = set()

    # ---- faults ----

    def set_latency(self, latency_ns_min: int, latency_ns_max: int) -> None:
        assert 0 <= latency_ns_min <= latency_ns_max <= LATENCY_NS_LIMIT, (
            latency_ns_min,
            latency_ns_max,
        )
        self.latency_ns_min = latency_ns_min
        self.latency_ns_max = latency_ns_max

    def block(self, source: int, target: int) -> None:
        """Frames from `source` to `target` are lost (a one-way partition), including
        those already in flight when they arrive."""
        assert source != target, source
        self._blocked.add((source, target))

    def unblock(self, source: int, target: int) -> None:
        self._blocked.discard((source, target))

    def partition(self, side: Iterable[int], other_side: Iterable[int]) -> None:
        """Cut every link between the two sides, both ways."""
        side_nodes, other_nodes = sorted(set(side)), sorted(set(other_side))
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
        """A healthy network again: no partitions, loss, duplication, corruption or
        reordering, default latency."""
        self._blocked.clear()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.corrupt_probability = 0.0
        self.reorder = False
        self.set_latency(LATENCY_NS_MIN_DEFAULT, LATENCY_NS_MAX_DEFAULT)

    def is_blocked(self, source: int, target: int) -> bool:
        return (source, target) in self._blocked

    def blocked_links(self) -> list[tuple[int, int]]:
        return sorted(self._blocked)

    # ---- tests and leak checks ----

    def inject(self, target: int, frame: bytes) -> None:
        """Put raw bytes on the wire to `target`, as one frame from nobody in particular."""
        self._launch(_Packet(None, target, frame, None), epoch=None)

    def leaks(self) -> list[str]:
        """What is still held: live transports, open eventfds, frames in flight, timers.
        Empty once every transport is closed and the scheduler has run dry."""
        found = [f"node {node}: transport not closed" for node in sorted(self._attached)]
        found += [f"eventfd {fd} open" for fd in sorted(self._eventfds)]
        if self._in_flight:
            found.append(f"{self._in_flight} frames in flight")
        if self._timers:
            found.append(f"{self._timers} transport timers pending")
        return found

    # ---- for SimTransport ----

    def _attach(self, transport: SimTransport) -> int:
        node = transport.node_id
        assert node not in self._attached, f"node {node} already has a live transport"
        self._epochs += 1
        self._attached[node] = transport
        self._schedule_timer(self._now_ns(), functools.partial(self._reachable, node, transport))
        return self._epochs

    def _detach(self, transport: SimTransport) -> None:
        if self._attached.get(transport.node_id) is transport:
            del self._attached[transport.node_id]

    def _reachable(self, node: int, transport: SimTransport) -> None:
        """A new incarnation is up: senders hand it what they held for it."""
        if self._attached.get(node) is not transport:
            return
        for source in sorted(self._attached):
            if source != node:
                self._attached[source]._flush(node)

    def _is_reachable(self, node: int) -> bool:
        return node in self._attached

    def _load(self, source: int | None, target: int, frames: int) -> None:
        """Count `frames` more (or fewer) on the link; injected frames count nowhere."""
        if source is not None:
            link = (source, target)
            load = self._link_frames[link] = self._link_frames.get(link, 0) + frames
            assert load >= 0, link

    def _schedule_timer(self, at_ns: int, action: Callable[[], None]) -> None:
        self._timers += 1
        self._schedule(at_ns, functools.partial(self._fire_timer, action))

    def _fire_timer(self, action: Callable[[], None]) -> None:
        self._timers -= 1
        action()

    def _transmit(self, packet: _Packet) -> None:
        """The sender puts a frame on the wire: partitioned, lost, or launched."""
        self.stats.sent += 1
        source, target = packet.source, packet.target
        assert source is not None
        if self._blocked and (source, target) in self._blocked:
            self.stats.dropped_partition += 1
            self._load(source, target, -1)
            return
        rng = self._rng
        if self.drop_probability and rng.random() < self.drop_probability:
            self.stats.dropped_random += 1
            self._load(source, target, -1)
            return
        epoch = self._attached[target]._epoch
        self._launch(packet, epoch)
        if self.duplicate_probability and rng.random() < self.duplicate_probability:
            self.stats.duplicated += 1
            self._load(source, target, 1)
            self._launch(packet, epoch)

    def _launch(self, packet: _Packet, epoch: int | None) -> None:
        rng = self._rng
        if (
            self.corrupt_probability
            and packet.source is not None
            and rng.random() < self.corrupt_probability
        ):
            self.stats.corrupted += 1
            packet = _Packet(packet.source, packet.target, _corrupt(packet.frame, rng), packet.bulk)
        latency_ns_min = self.latency_ns_min
        jitter_ns = int(rng.random() * (self.latency_ns_max - latency_ns_min + 1))
        arrival_ns = self._now_ns() + latency_ns_min + jitter_ns
        if not self.reorder:
            link = (-1 if packet.source is None else packet.source, packet.target)
            arrival_ns = max(arrival_ns, self._last_arrival_ns.get(link, 0))
            self._last_arrival_ns[link] = arrival_ns
        self._in_flight += 1
        self._schedule(arrival_ns, functools.partial(self._arrive, packet, epoch))

    def _arrive(self, packet: _Packet, epoch: int | None) -> None:
        self._in_flight -= 1
        source, target = packet.source, packet.target
        transport = self._attached.get(target)
        if transport is None or (epoch is not None and transport._epoch != epoch):
            self.stats.dropped_crashed += 1
            self._load(source, target, -1)
            return
        if self._blocked and source is not None and (source, target) in self._blocked:
            self.stats.dropped_partition += 1
            self._load(source, target, -1)
            return
        transport._receive(packet)


class SimTransport:
    """One node's end of a `SimFabric`. A restart is a new `SimTransport` for the same
    node id, made after the previous one was closed.

    `on_ready` is called each time a frame arrives (the simulator polls from it instead
    of waiting on `fileno()`); `before_send(target, message)` sees every control message
    as it leaves the node, before anything can refuse it."""

    def __init__(
        self,
        fabric: SimFabric,
        node_id: int,
        *,
        messages: Mapping[str, type[msgspec.Struct]] | None = None,
        options: SimOptions = SimOptions(),  # noqa: B008 - frozen, shared safely
        on_ready: Callable[[], None] | None = None,
        before_send: Callable[[int, msgspec.Struct], None] | None = None,
    ) -> None:
        assert 0 < node_id <= NODE_ID_MAX, node_id
        self._fabric = fabric
        self._node_id = node_id
        self._options = options
        self._on_ready = on_ready
        self._before_send = before_send
        self._codec = Codec(fabric.cluster_id, messages, options.frame_bytes_max)
        self._codec.register(BULK_TAG, SimBulk)
        self._faults = LinkFaults()
        self._stats = TransportStats()
        self._outbound: dict[int, deque[tuple[int, _Packet]]] = {}
        """Per target: frames held back by added delay or until the target is reachable,
        with the time each may leave."""
        self._inbox: list[_Packet] = []
        self._eventfd: int | None = None
        self._closed = False
        self._epoch = fabric._attach(self)

    # ---- the Transport interface ----

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def faults(self) -> LinkFaults:
        return self._faults

    def register(self, tag: str, message_type: type[msgspec.Struct]) -> None:
        self._codec.register(tag, message_type)

    def fileno(self) -> int:
        """An eventfd, made on first use, readable while deliveries wait for `poll()`."""
        if self._closed:
            raise TransportClosed(f"node {self._node_id}: transport is closed")
        if self._eventfd is None:
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fabric._eventfds.add(self._eventfd)
            if self._inbox:
                os.eventfd_write(self._eventfd, 1)
        return self._eventfd

    def send(self, target: int, message: msgspec.Struct) -> None:
        if self._closed or target == self._node_id or not 0 < target <= NODE_ID_MAX:
            self._check_target(target)
        if self._before_send is not None:
            self._before_send(target, message)
        frame = self._codec.encode(self._node_id, target, message)
        self._enqueue(_Packet(self._node_id, target, frame, None))

    def send_bulk(self, target: int, header: msgspec.Struct, data: BulkData) -> None:
        self._check_target(target)
        buffer = _arrow_ipc_bytes(data)
        codec = self._codec
        header_frame = codec.encode(self._node_id, target, header)
        frame = codec.encode(self._node_id, target, SimBulk(header_frame, buffer.size))
        if self._enqueue(_Packet(self._node_id, target, frame, buffer)):
            self._stats.bulk_sent += 1
            self._stats.bulk_bytes_sent += buffer.size

    def poll(self) -> list[Delivery]:
        """What arrived since the last poll, in arrival order (send order per source)."""
        if self._closed or not self._inbox:
            return []
        inbox, self._inbox = self._inbox, []
        if self._eventfd is not None:
            _drain_eventfd(self._eventfd)
        deliveries: list[Delivery] = []
        links, node_id, decode = self._fabric._link_frames, self._node_id, self._codec.decode
        stats = self._stats
        for packet in inbox:
            if packet.source is not None:
                links[(packet.source, node_id)] -= 1
            try:  # the common case inline: a control message for this node
                frame = decode(packet.frame)
            except RemoteProtocolError as error:
                self._refused(error)
                continue
            if frame.target == node_id and not isinstance(frame.message, SimBulk):
                stats.frames_received += 1
                deliveries.append(Received(frame.source, frame.message))
                continue
            delivery = self._deliver(frame, packet)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def next_timeout_ns(self) -> int | None:
        """Until the earliest delayed frame may leave. Frames held for an unreachable
        peer leave when it attaches, not on a timer."""
        now_ns = self._fabric._now_ns()
        earliest: int | None = None
        for target, queue in self._outbound.items():
            if not queue:
                continue
            release_ns = queue[0][0]
            if release_ns <= now_ns and not self._fabric._is_reachable(target):
                continue
            if earliest is None or release_ns < earliest:
                earliest = release_ns
        return None if earliest is None else max(0, earliest - now_ns)

    def stats(self) -> TransportStats:
        """The live counters."""
        return self._stats

    def close(self) -> None:
        """Gone, as after a crash: queued and unpolled frames are dropped, frames in
        flight to this incarnation will be dropped on arrival. Idempotent."""
        if self._closed:
            return
        self._closed = True
        fabric = self._fabric
        for target in sorted(self._outbound):
            held = len(self._outbound[target])
            if held:
                fabric._load(self._node_id, target, -held)
                self._stats.count_dropped("closed", held)
        self._outbound.clear()
        for packet in self._inbox:
            fabric._load(packet.source, self._node_id, -1)
        self._inbox.clear()
        fabric._detach(self)
        if self._eventfd is not None:
            fabric._eventfds.discard(self._eventfd)
            os.close(self._eventfd)
            self._eventfd = None

    # ---- sending ----

    def _check_target(self, target: int) -> None:
        if self._closed:
            raise TransportClosed(f"node {self._node_id}: transport is closed")
        if target == self._node_id or not 0 < target <= NODE_ID_MAX:
            raise UnknownPeer(target)

    def _enqueue(self, packet: _Packet) -> bool:
        """Queue one frame for its target; False when a fault rule dropped it."""
        source, target = self._node_id, packet.target
        faults = self._faults
        faulty = faults.active
        if faulty and faults.blocks(source, target):
            self._stats.count_dropped("fault_drop")
            return False
        fabric = self._fabric
        link, links = (source, target), fabric._link_frames
        queued = links.get(link, 0)
        if queued >= self._options.link_frames_max:
            raise Backpressure(target, queued)
        links[link] = queued + 1
        self._stats.frames_sent += 1
        delay_ns = faults.delay_ns(source, target) if faulty else 0
        queue = self._outbound.get(target)
        if not delay_ns and not queue and target in fabric._attached:
            fabric._transmit(packet)  # the common case: straight onto the wire
            return True
        if queue is None:
            queue = self._outbound[target] = deque()
        release_ns = fabric._now_ns() + delay_ns
        queue.append((release_ns, packet))
        if delay_ns:
            fabric._schedule_timer(release_ns, functools.partial(self._flush, target))
        return True

    def _flush(self, target: int) -> None:
        """Put every frame for `target` whose delay has passed on the wire, in order."""
        queue = self._outbound.get(target)
        if self._closed or not queue or not self._fabric._is_reachable(target):
            return
        now_ns = self._fabric._now_ns()
        while queue and queue[0][0] <= now_ns:
            self._fabric._transmit(queue.popleft()[1])

    # ---- receiving ----

    def _receive(self, packet: _Packet) -> None:
        assert not self._closed, self._node_id
        source, faults = packet.source, self._faults
        if source is not None and faults.active and faults.blocks(source, self._node_id):
            self._stats.count_dropped("fault_drop")
            self._fabric._load(source, self._node_id, -1)
            return
        self._inbox.append(packet)
        self._fabric.stats.delivered += 1
        if self._eventfd is not None and len(self._inbox) == 1:
            os.eventfd_write(self._eventfd, 1)
        if self._on_ready is not None:
            self._on_ready()

    def _deliver(self, frame: Frame, packet: _Packet) -> BulkReceived | None:
        """A misrouted frame (refused) or a bulk announcement (read its data)."""
        try:
            if frame.target != self._node_id:
                raise MisroutedFrame(f"frame for node {frame.target} arrived at {self._node_id}")
            assert isinstance(frame.message, SimBulk), frame.message
            return self._bulk(frame.source, frame.message, packet.bulk)
        except RemoteProtocolError as error:
            self._refused(error)
            return None

    def _refused(self, error: RemoteProtocolError) -> None:
        self._stats.count_error(error.reason)
        _logger.info("node %d refused a frame: %s", self._node_id, error)

    def _bulk(self, source: int, announce: SimBulk, data: pa.Buffer | None) -> BulkReceived:
        header = self._codec.decode(announce.header)
        if header.source != source or header.target != self._node_id:
            raise MisroutedFrame(f"bulk header from {header.source} to {header.target}")
        if isinstance(header.message, SimBulk):
            raise CorruptBulk("a bulk header cannot announce bulk data itself")
        if data is None or data.size != announce.data_bytes:
            raise CorruptBulk(f"announced {announce.data_bytes} bulk bytes, found none or others")
        try:
            table = pa.ipc.open_stream(data).read_all()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
            raise CorruptBulk(f"bulk bytes are not an Arrow IPC stream: {error}") from None
        self._stats.frames_received += 1
        self._stats.bulk_received += 1
        self._stats.bulk_bytes_received += data.size
        return BulkReceived(source, header.message, table, data.size)


def _arrow_ipc_bytes(data: BulkData) -> pa.Buffer:
    """Serialize a table, a reader or an iterable of batches as one Arrow IPC stream."""
    batches: Iterator[pa.RecordBatch] | pa.RecordBatchReader
    if isinstance(data, pa.Table):
        schema, batches = data.schema, iter(data.to_batches())
    elif isinstance(data, pa.RecordBatchReader):
        schema, batches = data.schema, data
    else:
        iterator = iter(data)
        first = next(iterator, None)
        if first is None:
            raise ValueError("bulk data is an empty iterable: send schema.empty_table()")
        schema, batches = first.schema, chain([first], iterator)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def _corrupt(frame: bytes, rng: random.Random) -> bytes:
    """`frame` with one byte changed, somewhere the codec checks."""
    corrupted = bytearray(frame)
    offset = rng.randrange(len(frame) - len(_UNCHECKED_OFFSETS))
    for skipped in _UNCHECKED_OFFSETS:  # ascending: map onto the checked offsets
        if offset >= skipped:
            offset += 1
    corrupted[offset] ^= rng.randrange(1, 256)
    return bytes(corrupted)


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
