"""The transport conformance suite: one set of behaviours, every implementation.

Each test runs against the local (mq + shm), TCP and simulated transports through their
harnesses (see harness.py and conftest.py). The harness fixture also asserts, after every
test, that nothing was left behind: no queue, segment, socket, fd or process.

What is checked: per-pair ordering (control and bulk share one order); control messages
larger than one queue message; bulk payloads from empty to hundreds of MiB in every
common Arrow type; a full queue pushing back without losing what it accepted; corrupt,
truncated, oversize, misrouted, unknown and wrong-cluster frames refused, counted, and
the receiver still serving; a wrong secret refused; a peer crashing mid-transfer (sender
or receiver) never yielding a partial table; reconnecting after a peer restarts;
partitions (told to one side only) and heal; added delay keeping order.
"""

from __future__ import annotations

import datetime
import decimal
import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ipc.codec import HEADER, HEADER_BYTES, MAGIC, Codec, cluster_id_for
from ipc.errors import Backpressure, TransportClosed
from ipc.transport import BulkReceived, Received
from tests.conformance.harness import (
    CLUSTER_NAME,
    OTHER_CLUSTER_NAME,
    TEST_MESSAGES,
    Header,
    Ping,
    TransportHarness,
)

WAIT_S = 20.0
SEND_ATTEMPTS_MAX = 100_000


# ---- helpers ----


def pings(harness: TransportHarness, node: int, source: int) -> list[int]:
    return [
        delivery.message.seq
        for delivery in harness.inbox[node]
        if isinstance(delivery, Received)
        and delivery.source == source
        and isinstance(delivery.message, Ping)
    ]


def bulks(harness: TransportHarness, node: int, source: int) -> list[BulkReceived]:
    return [
        delivery
        for delivery in harness.inbox[node]
        if isinstance(delivery, BulkReceived) and delivery.source == source
    ]


def release_all(harness: TransportHarness) -> None:
    for inbox in harness.inbox.values():
        for delivery in inbox:
            if isinstance(delivery, BulkReceived):
                delivery.release()


def send_waiting(
    harness: TransportHarness, source: int, target: int, send: Callable[[], None]
) -> None:
    """Send, pumping IO while the outbound queue pushes back."""

    def attempt() -> bool:
        try:
            send()
        except Backpressure:
            return False
        return True

    assert harness.pump(attempt, WAIT_S), f"{source}->{target} stayed backpressured"


def send_ping(
    harness: TransportHarness, source: int, target: int, seq: int, payload: bytes = b""
) -> None:
    transport = harness.transport(source)
    send_waiting(harness, source, target, lambda: transport.send(target, Ping(seq, payload)))


def wait_pings(harness: TransportHarness, node: int, source: int, count: int) -> list[int]:
    assert harness.pump(lambda: len(pings(harness, node, source)) >= count, WAIT_S), (
        f"node {node} got {len(pings(harness, node, source))} of {count} pings from {source}"
    )
    return pings(harness, node, source)


def frame_to(target: int, message: Ping, *, source: int = 1, cluster: str = CLUSTER_NAME) -> bytes:
    codec = Codec(cluster_id_for(cluster), TEST_MESSAGES)
    return codec.encode(source, target, message)


def int_column(rows: int) -> pa.Array:
    """`rows` pseudo-random int64s, built without a Python loop."""
    return pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(os.urandom(8 * rows))])


def big_table(mib: int) -> pa.Table:
    rows = mib * 1024 * 1024 // 24
    ints = int_column(rows)
    return pa.table(
        {
            "id": ints,
            "value": pc.divide(pc.cast(ints, pa.float64(), safe=False), 3.0),
            "label": pc.cast(pc.bit_wise_and(ints, 0xFFFF), pa.string()),
        }
    )


def mixed_table() -> pa.Table:
    tz = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    return pa.table(
        {
            "i8": pa.array([1, None, -128], pa.int8()),
            "u64": pa.array([0, 2**64 - 1, None], pa.uint64()),
            "f32": pa.array([1.5, float("inf"), None], pa.float32()),
            "dec": pa.array(
                [decimal.Decimal("1.10"), None, decimal.Decimal("-9.99")], pa.decimal128(5, 2)
            ),
            "s": pa.array(["héllo", None, "日本語 🦆"], pa.string()),
            "ls": pa.array(["x" * 10, "", None], pa.large_string()),
            "b": pa.array([b"\x00\xff", None, b""], pa.binary()),
            "ok": pa.array([True, False, None], pa.bool_()),
            "d": pa.array([datetime.date(2026, 11, 21), None, datetime.date(1970, 1, 1)]),
            "ts": pa.array(
                [
                    datetime.datetime(2026, 11, 21, 12, 0, tzinfo=tz),
                    None,
                    datetime.datetime(1999, 12, 31, tzinfo=tz),
                ],
                pa.timestamp("us", tz="Asia/Kolkata"),
            ),
            "list": pa.array([[1, 2], None, []], pa.list_(pa.int32())),
            "struct": pa.array([{"a": 1, "b": "x"}, None, {"a": None, "b": "y"}]),
            "dict": pa.array(["a", "b", "a"]).dictionary_encode(),
        }
    )


# ---- ordering ----


def test_control_messages_keep_per_pair_order(harness: TransportHarness) -> None:
    for node in (1, 2, 3):
        harness.start(node)
    count = 300
    for seq in range(count):
        send_ping(harness, 1, 2, seq)
        send_ping(harness, 3, 2, seq)
        send_ping(harness, 2, 1, seq)
    assert wait_pings(harness, 2, 1, count) == list(range(count))
    assert wait_pings(harness, 2, 3, count) == list(range(count))
    assert wait_pings(harness, 1, 2, count) == list(range(count))
    stats = harness.transport(2).stats()
    assert stats.frames_received >= 2 * count
    assert harness.transport(1).stats().frames_sent >= count


def test_control_and_bulk_share_one_order(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    sender = harness.transport(1)
    small = pa.table({"x": [1, 2, 3]})
    expected: list[tuple[str, int]] = []
    for seq in range(20):
        if seq % 3 == 0:
            send_waiting(
                harness, 1, 2, lambda seq=seq: sender.send_bulk(2, Header("t", seq), small)
            )
            expected.append(("bulk", seq))
        else:
            send_ping(harness, 1, 2, seq)
            expected.append(("ping", seq))
    assert harness.pump(lambda: len(harness.inbox[2]) >= len(expected), WAIT_S)
    got = [
        ("bulk", d.header.seq) if isinstance(d, BulkReceived) else ("ping", d.message.seq)
        for d in harness.inbox[2]
    ]
    assert got == expected
    for delivery in bulks(harness, 2, 1):
        assert delivery.table.equals(small)
    release_all(harness)


def test_control_message_larger_than_one_queue_message(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    payloads = [b"a" * 9_000, os.urandom(300_000), os.urandom(5 * 1024 * 1024), b""]
    for seq, payload in enumerate(payloads):
        send_ping(harness, 1, 2, seq, payload)
    assert wait_pings(harness, 2, 1, len(payloads)) == [0, 1, 2, 3]
    got = [d.message.payload for d in harness.inbox[2] if isinstance(d, Received)]
    assert got == payloads


# ---- bulk ----


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: pa.table({"x": pa.array([], pa.int64())}), id="empty"),
        pytest.param(lambda: pa.table({"x": [42]}), id="one-row"),
        pytest.param(mixed_table, id="all-types-with-nulls"),
        pytest.param(lambda: big_table(48), id="48MiB"),
    ],
)
def test_bulk_table_arrives_whole(harness: TransportHarness, make: Callable[[], pa.Table]) -> None:
    harness.start(1)
    harness.start(2)
    table = make()
    sender = harness.transport(1)
    send_waiting(harness, 1, 2, lambda: sender.send_bulk(2, Header("t"), table))
    assert harness.pump(lambda: len(bulks(harness, 2, 1)) == 1, WAIT_S)
    (delivery,) = bulks(harness, 2, 1)
    assert delivery.header == Header("t")
    assert delivery.table.schema.equals(table.schema)
    assert delivery.table.equals(table)
    assert delivery.bytes > 0
    delivery.release()
    delivery.release()  # twice is harmless
    assert harness.transport(2).stats().bulk_received == 1


def test_bulk_from_a_stream_of_batches(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    table = big_table(16)
    batches = table.to_batches(max_chunksize=100_000)
    assert len(batches) > 3
    sender = harness.transport(1)
    send_waiting(harness, 1, 2, lambda: sender.send_bulk(2, Header("gen"), iter(batches)))
    reader = pa.RecordBatchReader.from_batches(table.schema, batches)
    send_waiting(harness, 1, 2, lambda: sender.send_bulk(2, Header("reader"), reader))
    assert harness.pump(lambda: len(bulks(harness, 2, 1)) == 2, WAIT_S)
    for delivery in bulks(harness, 2, 1):
        assert delivery.table.equals(table)
        delivery.release()


def test_large_bulk(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    table = big_table(256)
    sender = harness.transport(1)
    for seq in range(2):  # the second transfer reuses what the first released
        send_waiting(harness, 1, 2, lambda seq=seq: sender.send_bulk(2, Header("big", seq), table))
        assert harness.pump(lambda seq=seq: len(bulks(harness, 2, 1)) == seq + 1, WAIT_S)
        delivery = bulks(harness, 2, 1)[seq]
        assert delivery.table.num_rows == table.num_rows
        assert delivery.table.equals(table)
        delivery.release()


# ---- backpressure ----


def test_full_queue_pushes_back_and_loses_nothing_it_accepted(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    sender = harness.transport(1)
    accepted = 0
    for seq in range(SEND_ATTEMPTS_MAX):
        try:
            sender.send(2, Ping(seq, b"p" * 100))
        except Backpressure as error:
            assert error.target == 2
            break
        accepted += 1
    else:
        pytest.fail("the outbound queue never pushed back")
    assert accepted > 0
    assert wait_pings(harness, 2, 1, accepted) == list(range(accepted))
    send_ping(harness, 1, 2, accepted)  # and it flows again
    assert wait_pings(harness, 2, 1, accepted + 1)[-1] == accepted


# ---- bad frames ----


def _corrupt_frames(target: int) -> dict[str, bytes]:
    good = frame_to(target, Ping(7))
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    newer = bytearray(good)
    newer[2] = 99
    bad_magic = b"XX" + good[2:]
    _, version, flags, cluster_id, source, _, _, _ = HEADER.unpack_from(good)
    oversize = HEADER.pack(MAGIC, version, flags, cluster_id, source, target, 2**31, 0)
    unknown_codec = Codec(cluster_id_for(CLUSTER_NAME), {"test.unknown": Header})
    misrouted = frame_to(target + 100, Ping(8))
    return {
        "corrupt_frame": bytes(flipped),
        "newer_version": bytes(newer),
        "truncated_frame": good[: HEADER_BYTES + 2],
        "frame_too_large": oversize,
        "unknown_tag": unknown_codec.encode(source, target, Header("?")),
        "misrouted_frame": misrouted,
        "wrong_cluster": frame_to(target, Ping(9), cluster=OTHER_CLUSTER_NAME),
        "garbage": bad_magic,
    }


def test_bad_frames_are_refused_counted_and_the_receiver_keeps_serving(
    harness: TransportHarness,
) -> None:
    harness.start(1)
    receiver = harness.start(2)
    for seq, (reason, frame) in enumerate(_corrupt_frames(2).items()):
        harness.inject(2, frame)
        counted = "corrupt_frame" if reason == "garbage" else reason
        before_total = sum(receiver.stats().errors.values())
        assert harness.pump(
            lambda counted=counted: receiver.stats().errors.get(counted, 0) >= 1, WAIT_S
        ), f"{reason}: errors={receiver.stats().errors}"
        assert sum(receiver.stats().errors.values()) >= before_total
        send_ping(harness, 1, 2, seq)
        assert wait_pings(harness, 2, 1, seq + 1)[-1] == seq, reason
    assert all(isinstance(d, Received) and d.source == 1 for d in harness.inbox[2])


def test_wrong_cluster_is_refused(harness: TransportHarness) -> None:
    harness.start(1)
    receiver = harness.start(2)
    harness.inject(2, frame_to(2, Ping(1), cluster=OTHER_CLUSTER_NAME))
    assert harness.pump(lambda: receiver.stats().errors.get("wrong_cluster", 0) == 1, WAIT_S)
    assert harness.inbox[2] == []


def test_wrong_secret_is_refused(harness: TransportHarness) -> None:
    if not getattr(harness, "authenticates", False):
        pytest.skip(f"{harness.name}: no shared secret (mq mode 0600 / simulation)")
    harness.start(1)
    receiver = harness.start(2)
    harness.intrude(2)  # type: ignore[attr-defined]
    assert harness.pump(
        lambda: receiver.stats().errors.get("authentication_failed", 0) >= 1, WAIT_S
    )
    send_ping(harness, 1, 2, 1)
    assert wait_pings(harness, 2, 1, 1) == [1]
    assert all(isinstance(d, Received) and d.source == 1 for d in harness.inbox[2])


# ---- crashes and restarts ----


def test_reconnect_after_the_peer_restarts(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    send_ping(harness, 1, 2, 0)
    assert wait_pings(harness, 2, 1, 1) == [0]
    harness.crash(2)
    harness.restart(2)
    # Frames sent around the crash may be lost; once one arrives, none after it is.
    seq = 1
    for seq in range(1, 1000):
        send_ping(harness, 1, 2, seq)
        if harness.pump(lambda: len(pings(harness, 2, 1)) > 0, 0.05):
            break
    first = pings(harness, 2, 1)[0]
    for later in range(seq + 1, seq + 51):
        send_ping(harness, 1, 2, later)
    got = wait_pings(harness, 2, 1, seq + 51 - first)
    assert got == list(range(first, seq + 51))
    # and the restarted node can talk back
    send_ping(harness, 2, 1, 0)
    assert wait_pings(harness, 1, 2, 1) == [0]


def test_sender_crash_mid_transfer_never_yields_a_partial_table(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    table = big_table(64)
    sender = harness.transport(1)
    send_waiting(harness, 1, 2, lambda: sender.send_bulk(2, Header("doomed"), table))
    harness.pump(lambda: False, 0.001)
    harness.crash(1)
    harness.restart(1)
    send_ping(harness, 1, 2, 1)
    wait_pings(harness, 2, 1, 1)
    for delivery in bulks(harness, 2, 1):  # all or nothing
        assert delivery.table.equals(table)
    release_all(harness)


def test_receiver_crash_mid_transfer_leaves_the_sender_serving(harness: TransportHarness) -> None:
    for node in (1, 2, 3):
        harness.start(node)
    table = big_table(32)
    sender = harness.transport(1)
    send_waiting(harness, 1, 2, lambda: sender.send_bulk(2, Header("lost"), table))
    harness.crash(2)
    send_waiting(harness, 1, 3, lambda: sender.send_bulk(3, Header("kept"), table))
    assert harness.pump(lambda: len(bulks(harness, 3, 1)) == 1, WAIT_S)
    assert bulks(harness, 3, 1)[0].table.equals(table)
    harness.restart(2)
    for seq in range(1000):
        send_ping(harness, 1, 2, seq)
        if harness.pump(lambda: len(pings(harness, 2, 1)) > 0, 0.05):
            break
    assert pings(harness, 2, 1)
    release_all(harness)


# ---- faults ----


def test_partition_told_to_one_side_holds_both_ways_and_heals(harness: TransportHarness) -> None:
    for node in (1, 2, 3):
        harness.start(node)
    one = harness.transport(1)
    one.faults.partition({1}, {2})
    send_ping(harness, 1, 2, 100)
    send_ping(harness, 2, 1, 100)
    send_ping(harness, 1, 3, 100)
    send_ping(harness, 2, 3, 100)
    assert wait_pings(harness, 3, 1, 1) == [100]
    assert wait_pings(harness, 3, 2, 1) == [100]
    harness.pump(lambda: False, 0.2)  # give the blocked frames every chance to arrive
    assert pings(harness, 2, 1) == []
    assert pings(harness, 1, 2) == []
    one.faults.heal()
    send_ping(harness, 1, 2, 101)
    send_ping(harness, 2, 1, 101)
    assert wait_pings(harness, 2, 1, 1) == [101]
    assert wait_pings(harness, 1, 2, 1) == [101]


def test_added_delay_keeps_order(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    one = harness.transport(1)
    one.faults.set_delay(1, 2, 30_000_000)
    for seq in range(10):
        send_ping(harness, 1, 2, seq)
    assert one.next_timeout_ns() is not None
    one.faults.set_delay(1, 2, 0)
    for seq in range(10, 15):
        send_ping(harness, 1, 2, seq)
    assert wait_pings(harness, 2, 1, 15) == list(range(15))


# ---- lifecycle ----


def test_send_after_close_is_refused(harness: TransportHarness) -> None:
    harness.start(1)
    harness.start(2)
    one = harness.transport(1)
    one.close()
    one.close()
    with pytest.raises(TransportClosed):
        one.send(2, Ping(1))
    with pytest.raises(TransportClosed):
        one.send_bulk(2, Header("x"), pa.table({"x": [1]}))
