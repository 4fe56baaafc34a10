"""Bulk Arrow transfers over TCP: a 1 GiB table whole, and a sender killed mid-transfer.

The killed sender is a real child process (this file, run as a script) with its own
`TcpTransport`: it sends a Ping, then a 64 MiB bulk, and is SIGKILLed while the receiver
has read at most a few MiB of it (the receiver reads at most `read_bytes_per_poll_max`
per poll, and the test polls only a handful of times). The receiver must deliver nothing
of the bulk, count the cut-off transfer, and keep serving.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clock import SystemClock
from ipc.tcp import RECV_CHUNK_BYTES, TcpOptions, TcpTransport
from ipc.transport import BulkReceived
from tests.conformance.harness import TEST_MESSAGES, Header, Ping
from tests.real.ipc.tcp_nodes import SECRET, Nodes, link, running_nodes


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    yield from running_nodes()


ROOT = Path(__file__).resolve().parents[3]
CHILD_NODE_ID = 7
CHILD_BULK_MIB = 64
CHILD_LIFETIME_S = 60.0
"""A child that outlives its test (it should never) exits by itself after this long."""
GIB = 1 << 30
MIB = 1 << 20


def repeated_table(total_bytes: int, chunk_bytes: int = 16 * MIB) -> pa.Table:
    """An int64 table of `total_bytes`, built as chunks that share one random buffer, so
    making it costs one small allocation."""
    rows = chunk_bytes // 8
    chunk = pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(os.urandom(chunk_bytes))])
    return pa.table({"x": pa.chunked_array([chunk] * (total_bytes // chunk_bytes))})


def test_one_gib_bulk_arrives_whole(nodes: Nodes) -> None:
    one = nodes.start(1)
    two = nodes.start(2)
    link(one, two)
    table = repeated_table(GIB)
    one.send_bulk(2, Header("gib"), table)
    one.send(2, Ping(1))  # shares the bulk's order
    assert nodes.pump(lambda: len(nodes.inbox[2]) == 2, 120.0)
    bulk, ping = nodes.inbox[2]
    assert isinstance(bulk, BulkReceived) and bulk.header == Header("gib")
    assert bulk.bytes >= GIB
    assert bulk.table.num_rows == table.num_rows
    assert bulk.table.equals(table)
    assert nodes.pings(2, 1) == [1]
    assert two.stats().bulk_bytes_received == bulk.bytes == one.stats().bulk_bytes_sent
    bulk.release()


@pytest.fixture
def child_processes() -> Iterator[list[subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []
    try:
        yield children
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


def test_a_sender_killed_mid_bulk_yields_nothing_partial(
    nodes: Nodes, child_processes: list[subprocess.Popen[str]]
) -> None:
    receiver = nodes.start(1, options=TcpOptions(read_bytes_per_poll_max=RECV_CHUNK_BYTES))
    host, port = receiver.address
    child = subprocess.Popen(
        [sys.executable, __file__, nodes.cluster, SECRET.hex(), host, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    child_processes.append(child)
    assert child.stdout is not None and child.stdout.readline() == "queued\n"
    # The Ping went first on the child's connection; the bulk follows right behind it.
    assert nodes.pump(lambda: nodes.pings(1, CHILD_NODE_ID) == [1])
    for _ in range(4):  # a few polls: at most a few chunks of the 64 MiB
        nodes.inbox[1].extend(receiver.poll())
    assert receiver.stats().bulk_received == 0
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert nodes.pump(lambda: receiver.stats().errors.get("truncated_frame", 0) == 1, 60.0)
    assert not [d for d in nodes.inbox[1] if isinstance(d, BulkReceived)]
    assert receiver.stats().bulk_received == 0
    # ...and it keeps serving.
    other = nodes.start(2)
    link(other, receiver)
    other.send_bulk(1, Header("after"), pa.table({"x": [1]}))
    assert nodes.pump(lambda: receiver.stats().bulk_received == 1)


def _child(cluster: str, secret_hex: str, host: str, port: str) -> None:
    """Send a Ping and a big bulk to the receiver, then keep the IO going until killed."""
    clock = SystemClock()
    transport = TcpTransport(
        cluster,
        CHILD_NODE_ID,
        bytes.fromhex(secret_hex),
        clock,
        random.Random(0),
        peers={1: (host, int(port))},
        messages=TEST_MESSAGES,
    )
    transport.send(1, Ping(1))
    transport.send_bulk(1, Header("doomed"), repeated_table(CHILD_BULK_MIB * MIB))
    print("queued", flush=True)
    deadline_ns = clock.monotonic_ns() + int(CHILD_LIFETIME_S * 1e9)
    with selectors.DefaultSelector() as selector:
        selector.register(transport.fileno(), selectors.EVENT_READ)
        while clock.monotonic_ns() < deadline_ns:
            selector.select(0.05)
            transport.poll()
    transport.close()


if __name__ == "__main__":
    _child(*sys.argv[1:])
