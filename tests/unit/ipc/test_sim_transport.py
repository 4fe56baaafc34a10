"""SimFabric and SimTransport on a tiny heap scheduler: FIFO links with faults off, each
fault alone, backpressure, held frames, crash semantics, link faults, bad frames,
the eventfd, determinism."""

from __future__ import annotations

import heapq
import random
import select
from collections.abc import Callable, Iterator

import msgspec
import pyarrow as pa
import pytest

from ipc.codec import Codec, cluster_id_for
from ipc.errors import Backpressure, MessageTooLarge, TransportClosed, UnknownPeer
from ipc.sim import SimFabric, SimOptions, SimTransport
from ipc.transport import BulkReceived, Delivery, Received, Transport

CLUSTER = cluster_id_for("unit-sim")
EVENTS_MAX = 1_000_000


class Ping(msgspec.Struct, frozen=True):
    seq: int
    payload: bytes = b""


class Header(msgspec.Struct, frozen=True):
    name: str


MESSAGES: dict[str, type[msgspec.Struct]] = {"t.ping": Ping, "t.header": Header}


class Scheduler:
    def __init__(self) -> None:
        self._now_ns = 0
        self._sequence = 0
        self._heap: list[tuple[int, int, Callable[[], None]]] = []

    def now_ns(self) -> int:
        return self._now_ns

    def schedule(self, at_ns: int, action: Callable[[], None]) -> None:
        assert at_ns >= self._now_ns
        self._sequence += 1
        heapq.heappush(self._heap, (at_ns, self._sequence, action))

    def run(self, until_ns: int | None = None) -> None:
        for _ in range(EVENTS_MAX):
            if not self._heap or (until_ns is not None and self._heap[0][0] > until_ns):
                break
            self._now_ns, _, action = heapq.heappop(self._heap)
            action()
        if until_ns is not None:
            self._now_ns = max(self._now_ns, until_ns)


class Cluster:
    """Transports on one fabric; a node `polls` only while it is not `paused`."""

    def __init__(self, seed: int = 1, options: SimOptions | None = None) -> None:
        self.scheduler = Scheduler()
        self.fabric = SimFabric(random.Random(seed), self.scheduler, CLUSTER)
        self.options = options or SimOptions()
        self.nodes: dict[int, SimTransport] = {}
        self.got: dict[int, list[Delivery]] = {}
        self.paused: set[int] = set()
        self.arrivals: list[tuple[int, int]] = []
        """(time, node) of every read."""

    def start(self, node: int) -> SimTransport:
        transport = SimTransport(
            self.fabric,
            node,
            messages=MESSAGES,
            options=self.options,
            on_ready=lambda: self._read(node),
        )
        self.nodes[node] = transport
        self.got[node] = []
        return transport

    def _read(self, node: int) -> None:
        if node not in self.paused:
            self.got[node].extend(self.nodes[node].poll())
            self.arrivals.append((self.scheduler.now_ns(), node))

    def pings(self, node: int, source: int | None = None) -> list[int]:
        return [
            d.message.seq
            for d in self.got[node]
            if isinstance(d, Received) and (source is None or d.source == source)
        ]

    def close(self) -> None:
        for transport in self.nodes.values():
            transport.close()
        self.scheduler.run()
        assert self.fabric.leaks() == []


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    try:
        yield made
    finally:
        made.close()


def test_it_is_a_transport(cluster: Cluster) -> None:
    assert isinstance(cluster.start(1), Transport)


def test_links_are_fifo_with_faults_off_despite_jitter(cluster: Cluster) -> None:
    one, _, _ = cluster.start(1), cluster.start(2), cluster.start(3)
    cluster.fabric.set_latency(1_000, 1_000_000)
    for seq in range(300):
        one.send(2, Ping(seq))
        one.send(3, Ping(seq))
    cluster.scheduler.run()
    assert cluster.pings(2) == list(range(300))
    assert cluster.pings(3) == list(range(300))
    assert cluster.fabric.stats.sent == cluster.fabric.stats.delivered == 600
    assert one.stats().frames_sent == 600
    assert cluster.nodes[2].stats().frames_received == 300


def test_reorder_is_a_fault_that_lets_jitter_reorder(cluster: Cluster) -> None:
    one, _ = cluster.start(1), cluster.start(2)
    cluster.fabric.set_latency(1_000, 1_000_000)
    cluster.fabric.reorder = True
    for seq in range(300):
        one.send(2, Ping(seq))
    cluster.scheduler.run()
    assert sorted(cluster.pings(2)) == list(range(300))
    assert cluster.pings(2) != list(range(300))


def test_control_and_bulk_share_one_order_and_bulk_reads_back_from_the_sent_bytes(
    cluster: Cluster,
) -> None:
    one, _ = cluster.start(1), cluster.start(2)
    table = pa.table({"x": list(range(1000)), "s": ["v"] * 1000})
    one.send(2, Ping(0))
    one.send_bulk(2, Header("table"), table)
    one.send_bulk(2, Header("batches"), iter(table.to_batches(max_chunksize=100)))
    one.send(2, Ping(1))
    cluster.scheduler.run()
    kinds = [type(d).__name__ for d in cluster.got[2]]
    assert kinds == ["Received", "BulkReceived", "BulkReceived", "Received"]
    bulks = [d for d in cluster.got[2] if isinstance(d, BulkReceived)]
    assert [b.header for b in bulks] == [Header("table"), Header("batches")]
    for bulk in bulks:
        assert bulk.table.equals(table)
        assert bulk.bytes > 0
        bulk.release()
    stats = cluster.nodes[2].stats()
    assert stats.bulk_received == 2 and stats.bulk_bytes_received == one.stats().bulk_bytes_sent


def test_an_empty_iterable_of_batches_is_refused(cluster: Cluster) -> None:
    one, _ = cluster.start(1), cluster.start(2)
    with pytest.raises(ValueError):
        one.send_bulk(2, Header("none"), iter([]))


def test_a_full_link_pushes_back_without_losing_what_it_accepted() -> None:
    cluster = Cluster(options=SimOptions(link_frames_max=8))
    try:
        one, two = cluster.start(1), cluster.start(2)
        cluster.paused.add(2)  # a stopped process: nothing reads its queue
        for seq in range(8):
            one.send(2, Ping(seq))
        with pytest.raises(Backpressure) as refused:
            one.send(2, Ping(8))
        assert (refused.value.target, refused.value.queued) == (2, 8)
        cluster.scheduler.run()
        with pytest.raises(Backpressure):  # arrived but not read still fills the link
            one.send(2, Ping(8))
        cluster.paused.clear()
        cluster.got[2].extend(two.poll())
        one.send(2, Ping(8))
        cluster.scheduler.run()
        assert cluster.pings(2) == list(range(9))
    finally:
        cluster.close()


def test_frames_for_a_peer_not_started_yet_wait_for_it(cluster: Cluster) -> None:
    one = cluster.start(1)
    for seq in range(5):
        one.send(2, Ping(seq))
    cluster.scheduler.run(until_ns=1_000_000_000)
    assert one.next_timeout_ns() is None  # nothing to do until the peer appears
    cluster.start(2)
    cluster.scheduler.run()
    assert cluster.pings(2) == list(range(5))


def test_frames_in_flight_to_a_crashed_node_are_lost_and_its_own_still_arrive(
    cluster: Cluster,
) -> None:
    one, two = cluster.start(1), cluster.start(2)
    one.send(2, Ping(1))
    two.send(1, Ping(2))
    two.close()  # crash: in flight both ways
    cluster.start(2)  # the next incarnation
    cluster.scheduler.run()
    assert cluster.pings(2) == []
    assert cluster.pings(1) == [2]
    assert cluster.fabric.stats.dropped_crashed == 1
    one.send(2, Ping(3))
    cluster.scheduler.run()
    assert cluster.pings(2) == [3]


def test_a_closed_transport_refuses_to_send(cluster: Cluster) -> None:
    one, _ = cluster.start(1), cluster.start(2)
    one.close()
    one.close()
    with pytest.raises(TransportClosed):
        one.send(2, Ping(1))
    with pytest.raises(TransportClosed):
        one.fileno()
    assert one.poll() == []


def test_unknown_peers_and_oversize_messages_are_refused() -> None:
    cluster = Cluster(options=SimOptions(frame_bytes_max=100))
    try:
        one, _ = cluster.start(1), cluster.start(2)
        with pytest.raises(UnknownPeer):
            one.send(1, Ping(1))
        with pytest.raises(UnknownPeer):
            one.send(0, Ping(1))
        with pytest.raises(MessageTooLarge):
            one.send(2, Ping(1, b"x" * 200))
    finally:
        cluster.close()


def test_link_faults_block_at_either_end_and_delay_keeps_order(cluster: Cluster) -> None:
    one, two, _ = cluster.start(1), cluster.start(2), cluster.start(3)
    one.faults.partition({1}, {2})  # told to one side only
    one.send(2, Ping(1))
    two.send(1, Ping(2))
    one.send(3, Ping(3))
    cluster.scheduler.run()
    assert cluster.pings(2) == [] and cluster.pings(1) == [] and cluster.pings(3) == [3]
    assert one.stats().dropped == {"fault_drop": 2}
    one.faults.heal()
    one.faults.set_delay(1, 3, 50_000_000)
    for seq in range(10, 15):
        one.send(3, Ping(seq))
    timeout_ns = one.next_timeout_ns()
    assert timeout_ns is not None and 0 < timeout_ns <= 50_000_000
    one.faults.set_delay(1, 3, 0)
    one.send(3, Ping(15))
    cluster.scheduler.run()
    assert cluster.pings(3) == [3, *range(10, 16)]
    assert one.next_timeout_ns() is None


def test_duplication_and_drop(cluster: Cluster) -> None:
    one, _ = cluster.start(1), cluster.start(2)
    cluster.fabric.duplicate_probability = 1.0
    one.send(2, Ping(1))
    cluster.scheduler.run()
    assert cluster.pings(2) == [1, 1]
    cluster.fabric.duplicate_probability = 0.0
    cluster.fabric.drop_probability = 1.0
    one.send(2, Ping(2))
    cluster.scheduler.run()
    assert cluster.pings(2) == [1, 1]
    stats = cluster.fabric.stats
    assert (stats.duplicated, stats.dropped_random) == (1, 1)


def test_every_corrupted_frame_is_refused_counted_and_the_receiver_keeps_serving(
    cluster: Cluster,
) -> None:
    one, two = cluster.start(1), cluster.start(2)
    cluster.fabric.corrupt_probability = 1.0
    for seq in range(500):
        one.send(2, Ping(seq, b"p" * (seq % 40)))
    one.send_bulk(2, Header("b"), pa.table({"x": [1]}))
    cluster.scheduler.run()
    assert cluster.got[2] == []
    assert sum(two.stats().errors.values()) == cluster.fabric.stats.corrupted == 501
    assert len(two.stats().errors) > 2  # header and body corruption show up differently
    cluster.fabric.corrupt_probability = 0.0
    one.send(2, Ping(1000))
    cluster.scheduler.run()
    assert cluster.pings(2) == [1000]


def test_injected_bad_frames_are_refused(cluster: Cluster) -> None:
    two = cluster.start(2)
    codec = Codec(CLUSTER, MESSAGES)
    cluster.fabric.inject(2, b"garbage" * 5)
    cluster.fabric.inject(2, codec.encode(1, 3, Ping(1)))  # misrouted
    cluster.fabric.inject(2, Codec(cluster_id_for("other"), MESSAGES).encode(1, 2, Ping(1)))
    cluster.fabric.inject(2, codec.encode(1, 2, Ping(7)))
    cluster.scheduler.run()
    assert two.stats().errors == {"corrupt_frame": 1, "misrouted_frame": 1, "wrong_cluster": 1}
    assert cluster.pings(2) == [7]


def test_the_eventfd_is_readable_while_deliveries_wait() -> None:
    cluster = Cluster()
    try:
        one, two = cluster.start(1), cluster.start(2)
        cluster.paused.add(2)
        fd = two.fileno()
        assert two.fileno() == fd
        assert select.select([fd], [], [], 0)[0] == []
        one.send(2, Ping(1))
        one.send(2, Ping(2))
        cluster.scheduler.run()
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert [d.message.seq for d in two.poll() if isinstance(d, Received)] == [1, 2]
        assert select.select([fd], [], [], 0)[0] == []
        assert cluster.fabric.leaks() == [f"node {n}: transport not closed" for n in (1, 2)] + [
            f"eventfd {fd} open"
        ]
    finally:
        cluster.close()


def test_before_send_sees_each_message_as_it_leaves(cluster: Cluster) -> None:
    seen: list[tuple[int, msgspec.Struct]] = []
    cluster.start(2)
    one = SimTransport(
        cluster.fabric, 1, messages=MESSAGES, before_send=lambda t, m: seen.append((t, m))
    )
    cluster.nodes[1], cluster.got[1] = one, []
    one.send(2, Ping(1))
    one.faults.block(1, 2)
    one.send(2, Ping(2))
    assert seen == [(2, Ping(1)), (2, Ping(2))]


def test_the_same_seed_delivers_the_same_way() -> None:
    def run(seed: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
        cluster = Cluster(seed)
        try:
            for node in (1, 2, 3):
                cluster.start(node)
            fabric = cluster.fabric
            fabric.reorder = True
            fabric.drop_probability = fabric.duplicate_probability = 0.2
            fabric.corrupt_probability = 0.1
            for seq in range(200):
                cluster.nodes[1 + seq % 3].send(1 + (seq + 1) % 3, Ping(seq))
            cluster.scheduler.run()
            return cluster.arrivals, [cluster.pings(node) for node in (1, 2, 3)]
        finally:
            cluster.close()

    assert run(5) == run(5)
    assert run(5) != run(6)
