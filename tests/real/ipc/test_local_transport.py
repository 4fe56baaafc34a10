"""The local transport on real queues, segments and processes.

In-process nodes come from the conformance harness (LocalHarness) with small limits;
other processes run tests/real/ipc/local_child.py. Every test leaves nothing behind: the
fixtures kill children, reclaim the cluster and assert no queue, segment or fd is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from clock import SystemClock
from ipc import mq, registry, shm
from ipc.codec import Codec, cluster_id_for
from ipc.errors import Backpressure, HostLimitError, MessageTooLarge, TransportError
from ipc.local import (
    INTERNAL_MESSAGES,
    LocalOptions,
    LocalTransport,
    _Chunk,
    _Inline,
    reclaim_cluster,
)
from ipc.transport import BulkReceived, Received
from tests.conformance.harness import CLUSTER_NAME, TEST_MESSAGES, Header, Ping
from tests.conformance.harness_local import HARNESS_OPTIONS, LocalHarness

ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 20.0
MiB = 1 << 20
SMALL = dataclasses.replace(
    HARNESS_OPTIONS,
    outbound_frames_max=8,
    segment_bytes_max=1 * MiB,
    shm_bytes_max=8 * MiB,
    shm_free_bytes_max=4 * MiB,
    lent_bytes_max=2 * MiB,
    mapped_bytes_max=16 * MiB,
)


@contextlib.contextmanager
def local_harness(options: LocalOptions = SMALL) -> Iterator[LocalHarness]:
    harness = LocalHarness(options)
    try:
        yield harness
    finally:
        harness.close()
    assert harness.leaks() == []


@pytest.fixture
def harness() -> Iterator[LocalHarness]:
    with local_harness() as instance:
        yield instance


def pings(harness: LocalHarness, node: int, source: int) -> list[int]:
    return [
        d.message.seq
        for d in harness.inbox[node]
        if isinstance(d, Received) and d.source == source and isinstance(d.message, Ping)
    ]


def wait_pings(harness: LocalHarness, node: int, source: int, count: int) -> bool:
    return harness.pump(lambda: len(pings(harness, node, source)) >= count, WAIT_S)


def bulks(harness: LocalHarness, node: int) -> list[BulkReceived]:
    return [d for d in harness.inbox[node] if isinstance(d, BulkReceived)]


def ints(rows: int, start: int = 0) -> pa.Table:
    return pa.table({"x": pa.array(range(start, start + rows), pa.int64())})


def send_until_backpressure(send: object, attempts_max: int = 10_000) -> int:
    assert callable(send)
    for accepted in range(attempts_max):
        try:
            send(accepted)
        except Backpressure:
            return accepted
    raise AssertionError("never pushed back")


# ---- other processes ----


def read_line(process: subprocess.Popen[str], timeout_s: float = WAIT_S) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout_s), "the child said nothing"
    return process.stdout.readline().strip()


@contextlib.contextmanager
def child(
    mode: str, harness: LocalHarness, node: int, peer: int
) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "tests.real.ipc.local_child", mode, CLUSTER_NAME]
    command += [str(harness.run_dir), str(node), str(peer)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert read_line(process) == "ready"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT_S)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(WAIT_S)


# ---- privacy and host limits ----


def test_queue_segments_and_entry_are_private(harness: LocalHarness) -> None:
    harness.start(1)
    harness.start(2)
    harness.transport(1).send_bulk(2, Header("t"), ints(100_000))  # too big to travel inline
    queue = posix_ipc.MessageQueue(registry.queue_name(harness.token, 2, 1))
    try:
        assert stat.S_IMODE(os.fstat(queue.mqd).st_mode) == 0o600
    finally:
        queue.close()
    segments = shm.segment_files(shm.SHM_DIR, registry.cluster_prefix(harness.token))
    assert segments
    for name in segments:
        assert stat.S_IMODE(os.stat(f"{shm.SHM_DIR}/{name}").st_mode) == 0o600
    entry = registry.registry_directory(harness.run_dir, harness.token) / "2.entry"
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600
    assert harness.pump(lambda: len(bulks(harness, 2)) == 1, WAIT_S)
    bulks(harness, 2)[0].release()


def test_the_queue_fits_the_host_and_the_options(harness: LocalHarness) -> None:
    transport = harness.start(1)
    assert isinstance(transport, LocalTransport)
    limits, size = transport.host_limits, transport.queue_size
    assert size.messages <= min(limits.msg_max, SMALL.queue_messages_max)
    assert size.message_bytes <= min(limits.msgsize_max, SMALL.queue_message_bytes_max)


def test_a_queue_the_kernel_refuses_is_a_host_limit_error(harness: LocalHarness) -> None:
    limits = mq.detect_host_limits()
    too_big = mq.QueueSize(1, limits.msgsize_max + 1)
    name = registry.queue_name(harness.token, 99, 1)
    with pytest.raises(HostLimitError) as refused:
        mq.create_queue(name, too_big, limits)
    assert "fs.mqueue.msgsize_max" in str(refused.value)
    assert not mq.queue_exists(name)


def test_an_exhausted_queue_budget_is_a_host_limit_error_naming_ulimit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from clock import SystemClock
        from ipc.errors import HostLimitError
        from ipc.local import LocalTransport
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (100, 100))
        try:
            LocalTransport("starved", 1, Path({str(tmp_path)!r}), SystemClock(), incarnation=1)
        except HostLimitError as error:
            print(error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0, done.stderr
    assert "RLIMIT_MSGQUEUE=100 bytes" in done.stdout
    assert "ulimit -q" in done.stdout
    directory = registry.registry_directory(tmp_path, registry.resource_token("starved", tmp_path))
    assert sorted(os.listdir(directory)) == [registry.GENERATION_FILE]
    assert shm.segment_files(shm.SHM_DIR, registry.cluster_prefix(directory.name)) == []


def test_a_second_live_incarnation_is_refused(harness: LocalHarness) -> None:
    harness.start(1)
    with pytest.raises(TransportError, match="still alive"):
        LocalTransport(
            CLUSTER_NAME, 1, harness.run_dir, SystemClock(), incarnation=2, options=SMALL
        )


# ---- outbound queues ----


def test_frames_for_a_node_not_started_yet_wait_and_arrive_in_order(harness: LocalHarness) -> None:
    one = harness.start(1)
    for seq in range(5):
        one.send(2, Ping(seq))
    assert one.next_timeout_ns() is not None  # it keeps looking for node 2
    harness.start(2)
    assert harness.pump(lambda: len(pings(harness, 2, 1)) == 5, WAIT_S)
    assert pings(harness, 2, 1) == list(range(5))


def test_the_outbound_queue_is_bounded(harness: LocalHarness) -> None:
    one = harness.start(1)
    two = harness.start(2)
    assert isinstance(two, LocalTransport)
    accepted = send_until_backpressure(lambda seq: one.send(2, Ping(seq)))
    assert accepted == two.queue_size.messages + SMALL.outbound_frames_max
    assert harness.pump(lambda: len(pings(harness, 2, 1)) == accepted, WAIT_S)
    assert pings(harness, 2, 1) == list(range(accepted))


def test_lent_shared_memory_is_bounded_and_comes_back_on_release(harness: LocalHarness) -> None:
    one = harness.start(1)
    harness.start(2)
    table = ints(90_000)  # ~720 KB: one 1 MiB segment each
    accepted = send_until_backpressure(lambda seq: one.send_bulk(2, Header("b", seq), table))
    assert accepted == SMALL.lent_bytes_max // SMALL.segment_bytes_max
    assert harness.pump(lambda: len(bulks(harness, 2)) == accepted, WAIT_S)
    with pytest.raises(Backpressure):
        one.send_bulk(2, Header("b", accepted), table)  # nothing released yet
    for delivery in bulks(harness, 2):
        assert delivery.table.equals(table)
        delivery.release()

    def resend() -> bool:
        try:
            one.send_bulk(2, Header("b", accepted), table)
        except Backpressure:
            return False
        return True

    assert harness.pump(resend, WAIT_S)


def test_a_bulk_that_can_never_fit_is_too_large_and_leaks_nothing(harness: LocalHarness) -> None:
    one = harness.start(1)
    harness.start(2)
    huge = ints(400_000)  # 3.2 MB: more than lent_bytes_max
    with pytest.raises(MessageTooLarge):
        one.send_bulk(2, Header("huge"), iter(huge.to_batches(max_chunksize=50_000)))
    harness.pump(lambda: False, 0.1)
    assert bulks(harness, 2) == []
    one.send_bulk(2, Header("small"), ints(100))  # all of the budget is back
    assert harness.pump(lambda: len(bulks(harness, 2)) == 1, WAIT_S)
    bulks(harness, 2)[0].release()


# ---- zero copy and bad bulk ----


def _mapped_file(address: int) -> str | None:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


def test_the_received_table_points_into_the_senders_segment(harness: LocalHarness) -> None:
    one = harness.start(1)
    harness.start(2)
    table = pa.table({"x": pa.array(range(50_000), pa.int64()), "s": ["v"] * 50_000})
    one.send_bulk(2, Header("zero-copy"), table)
    assert harness.pump(lambda: len(bulks(harness, 2)) == 1, WAIT_S)
    with bulks(harness, 2)[0] as delivery:
        assert delivery.table.equals(table)
        prefix = f"{shm.SHM_DIR}/{registry.segment_prefix(harness.token, 1, 1)}"
        for column in delivery.table.columns:
            for chunk in column.chunks:
                for buffer in chunk.buffers():
                    if buffer is not None and buffer.size:
                        mapped = _mapped_file(buffer.address)
                        assert mapped is not None and mapped.startswith(prefix), mapped


def test_a_bulk_that_does_not_read_back_is_counted_and_dropped(harness: LocalHarness) -> None:
    harness.start(1)
    receiver = harness.start(2)
    codec = Codec(cluster_id_for(CLUSTER_NAME), {**TEST_MESSAGES, **INTERNAL_MESSAGES})
    header = codec.encode(9, 2, Header("bad"))
    garbage = registry.segment_prefix(harness.token, 9, 1) + "0"
    Path(shm.SHM_DIR, garbage).write_bytes(b"\xff" * 4096)
    foreign = registry.segment_prefix(harness.token, 8, 1) + "0"
    cases = [(1, garbage), (2, foreign)]  # unreadable; not the source's segment
    for transfer, segment in cases:
        chunk = _Chunk(1, transfer, 0, segment, 4096, True, header)
        harness.inject(2, codec.encode(9, 2, chunk))
    assert harness.pump(lambda: receiver.stats().errors.get("corrupt_bulk", 0) == 2, WAIT_S)
    harness.transport(1).send(2, Ping(1))
    assert harness.pump(lambda: pings(harness, 2, 1) == [1], WAIT_S)
    assert bulks(harness, 2) == []


def test_a_small_bulk_travels_inside_one_frame_in_order_with_control(
    harness: LocalHarness,
) -> None:
    one = harness.start(1)
    harness.start(2)
    small = pa.table({"x": pa.array([1, None, 3], pa.int64()), "s": ["a", "ü", None]})
    one.send(2, Ping(1))
    one.send_bulk(2, Header("inline", 7), small)
    one.send(2, Ping(2))
    assert harness.pump(lambda: len(harness.inbox[2]) == 3, WAIT_S)
    first, delivery, last = harness.inbox[2]
    assert isinstance(first, Received) and first.message == Ping(1)
    assert isinstance(last, Received) and last.message == Ping(2)
    assert isinstance(delivery, BulkReceived) and delivery.header == Header("inline", 7)
    assert delivery.table.equals(small) and delivery.table.schema == small.schema
    # no segment was written, so none is lent or mapped, and release is a no-op
    assert shm.segment_files(shm.SHM_DIR, registry.cluster_prefix(harness.token)) == []
    delivery.release()
    assert one.stats().bulk_sent == 1 and harness.transport(2).stats().bulk_received == 1


def test_an_inline_bulk_that_does_not_read_back_is_counted_and_dropped(
    harness: LocalHarness,
) -> None:
    harness.start(1)
    receiver = harness.start(2)
    codec = Codec(cluster_id_for(CLUSTER_NAME), {**TEST_MESSAGES, **INTERNAL_MESSAGES})
    good = shm.stream_bytes(ints(10))
    cases = [
        _Inline(codec.encode(9, 2, Header("bad")), b"\xff" * 64),  # not a stream
        _Inline(codec.encode(9, 2, Header("cut")), good[: len(good) // 2]),  # cut short
        _Inline(codec.encode(8, 2, Header("other")), good),  # header names another source
        _Inline(b"\x00" * 8, good),  # header is not a frame
    ]
    for inline in cases:
        harness.inject(2, codec.encode(9, 2, inline))
    assert harness.pump(lambda: sum(receiver.stats().errors.values()) == len(cases), WAIT_S)
    harness.transport(1).send(2, Ping(1))
    assert harness.pump(lambda: pings(harness, 2, 1) == [1], WAIT_S)
    assert bulks(harness, 2) == []


# ---- gone peers, crashes, reclaim ----


def test_a_dead_receiver_is_detected_not_waited_on(harness: LocalHarness) -> None:
    one = harness.start(1)
    two = harness.start(2)
    assert isinstance(two, LocalTransport)
    one.send(2, Ping(0))
    assert harness.pump(lambda: pings(harness, 2, 1) == [0], WAIT_S)
    harness.crash(2)
    depth = two.queue_size.messages
    for seq in range(1, depth + 6):  # fills the dead queue, then waits in ours
        one.send(2, Ping(seq))
    assert harness.pump(lambda: one.stats().dropped.get("peer_gone", 0) == 5, WAIT_S)
    for seq in range(100, 103):  # from now on frames wait for its next incarnation
        one.send(2, Ping(seq))
    harness.restart(2)
    assert harness.pump(lambda: len(pings(harness, 2, 1)) == 3, WAIT_S)
    assert pings(harness, 2, 1) == [100, 101, 102]


def test_a_restart_reclaims_what_the_previous_incarnation_left(harness: LocalHarness) -> None:
    harness.start(1)
    two = harness.start(2)
    two.send_bulk(1, Header("left"), ints(1000))
    old_queue = registry.queue_name(harness.token, 2, 1)
    old_prefix = registry.segment_prefix(harness.token, 2, 1)
    harness.crash(2)
    assert mq.queue_exists(old_queue)
    assert shm.segment_files(shm.SHM_DIR, old_prefix)
    harness.restart(2)
    assert not mq.queue_exists(old_queue)
    assert shm.segment_files(shm.SHM_DIR, old_prefix) == []


def test_reclaim_cluster_removes_dead_nodes_and_spares_live_ones(harness: LocalHarness) -> None:
    harness.start(1)
    two = harness.start(2)
    two.send_bulk(1, Header("left"), ints(1000))
    harness.crash(2)
    removed = reclaim_cluster(CLUSTER_NAME, harness.run_dir)
    assert registry.queue_name(harness.token, 2, 1) in removed
    assert shm.segment_files(shm.SHM_DIR, registry.node_prefix(harness.token, 2)) == []
    assert mq.queue_exists(registry.queue_name(harness.token, 1, 1))
    harness.transport(1).send(1, Ping(7))  # node 1 still works, even to itself
    assert harness.pump(lambda: pings(harness, 1, 1) == [7], WAIT_S)
    everything = reclaim_cluster(CLUSTER_NAME, harness.run_dir, include_live=True)
    assert registry.queue_name(harness.token, 1, 1) in everything


def test_a_sender_killed_mid_bulk_yields_nothing_and_its_restart_leaves_nothing(
    harness: LocalHarness,
) -> None:
    receiver = harness.start(1)
    with child("partial", harness, node=2, peer=1) as process:
        assert read_line(process) == "partial"
        # Its first chunks arrive and wait as a partial transfer.
        assert harness.pump(lambda: receiver.stats().frames_received >= 2, WAIT_S)
        assert shm.segment_files(shm.SHM_DIR, registry.segment_prefix(harness.token, 2, 1))
        kill(process)
        assert harness.pump(lambda: receiver.stats().dropped.get("bulk_aborted", 0) == 1, WAIT_S)
    assert bulks(harness, 1) == []
    harness.start(2, incarnation=2)
    assert not mq.queue_exists(registry.queue_name(harness.token, 2, 1))
    assert shm.segment_files(shm.SHM_DIR, registry.node_prefix(harness.token, 2)) == []
    harness.transport(2).send(1, Ping(1))
    assert harness.pump(lambda: pings(harness, 1, 2) == [1], WAIT_S)
    assert bulks(harness, 1) == []


def test_a_killed_receiver_gives_back_what_it_held(harness: LocalHarness) -> None:
    one = harness.start(1)
    harness.start(3)
    table = ints(200_000)  # 1.6 MB: both segments of the lent budget
    with child("hold", harness, node=2, peer=1) as process:
        one.send_bulk(2, Header("held"), table)
        assert harness.pump(lambda: pings(harness, 1, 2) == [-table.num_rows], WAIT_S)
        with pytest.raises(Backpressure):  # node 2 holds the whole budget
            one.send_bulk(3, Header("blocked"), table)
        kill(process)

        def send() -> bool:
            try:
                one.send_bulk(3, Header("after"), table)
            except Backpressure:
                return False
            return True

        assert harness.pump(send, WAIT_S)
    assert harness.pump(lambda: len(bulks(harness, 3)) == 1, WAIT_S)
    bulks(harness, 3)[0].release()
    removed = reclaim_cluster(CLUSTER_NAME, harness.run_dir)
    assert registry.queue_name(harness.token, 2, 1) in removed


def test_round_trips_with_another_process(harness: LocalHarness) -> None:
    one = harness.start(1)
    with child("echo", harness, node=2, peer=1) as process:
        for seq in range(200):
            one.send(2, Ping(seq))
            assert wait_pings(harness, 1, 2, seq + 1)
        big = Ping(999, os.urandom(100_000))  # larger than a queue message
        one.send(2, big)
        assert harness.pump(lambda: len(pings(harness, 1, 2)) == 201, WAIT_S)
        table = ints(150_000)  # two chunks
        one.send_bulk(2, Header("there"), table)
        assert harness.pump(lambda: len(pings(harness, 1, 2)) == 202, WAIT_S)
        assert pings(harness, 1, 2) == [*range(200), 999, -table.num_rows]
        replies = [d.message for d in harness.inbox[1] if isinstance(d, Received)]
        assert replies[200] == big
        assert process.stdin is not None
        process.stdin.close()  # the child closes its transport and exits
        assert process.wait(WAIT_S) == 0
    assert not mq.queue_exists(registry.queue_name(harness.token, 2, 1))


# ---- size ----


def test_one_gib_bulk() -> None:
    options = LocalOptions(
        queue_messages_max=10,
        queue_message_bytes_max=4096,
        queue_messages_min=4,
        queues_per_host_expected=16,
        segment_bytes_max=64 * MiB,
        shm_bytes_max=1280 * MiB,
        shm_free_bytes_max=0,
        lent_bytes_max=1152 * MiB,
        mapped_bytes_max=1280 * MiB,
    )
    slices = 16
    rows = (1 << 30) // 8 // slices
    base = pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(os.urandom(rows * 8))])
    table = pa.table({"x": pa.chunked_array([pc.add(base, index) for index in range(slices)])})
    assert table.nbytes == 1 << 30
    with local_harness(options) as harness:
        one = harness.start(1)
        harness.start(2)
        one.send_bulk(2, Header("GiB"), table)
        assert harness.pump(lambda: len(bulks(harness, 2)) == 1, 60.0)
        with bulks(harness, 2)[0] as delivery:
            assert delivery.bytes > 1 << 30
            assert delivery.table.equals(table)
        harness.inbox[2].clear()


def test_a_full_peer_table_forgets_idle_peers_so_new_clients_are_answered() -> None:
    """A long-lived worker answers many short-lived clients: past `peers_max` it forgets
    idle peers instead of refusing new ones."""
    with local_harness(dataclasses.replace(SMALL, peers_max=2)) as harness:
        server = harness.start(1)
        for client in range(10, 16):
            harness.start(client).send(1, Ping(client))
            assert wait_pings(harness, 1, client, 1)
            server.send(client, Ping(100 + client))
            assert wait_pings(harness, client, 1, 1)
            assert pings(harness, client, 1) == [100 + client]


def test_queues_of_clients_that_left_are_closed_so_their_budget_returns() -> None:
    """The kernel charges a queue to its owner until its last descriptor closes: a
    worker must not keep the write ends of departed clients' queues open."""
    with local_harness() as harness:
        server = harness.start(1)
        client = harness.start(10)
        client.send(1, Ping(1))
        assert wait_pings(harness, 1, 10, 1)
        server.send(10, Ping(2))
        assert wait_pings(harness, 10, 1, 1)
        assert server._peers[10].queue is not None  # noqa: SLF001 (the property under test)
        client.close()
        assert harness.pump(lambda: server._peers[10].queue is None, WAIT_S)  # noqa: SLF001
