"""A node of the local transport in its own process, for the real-process tests.

    python -m tests.real.ipc.local_child <mode> <cluster> <run_dir> <node> <peer>

Modes:
- `echo`: echo every Ping to its source; acknowledge every bulk with Ping(-rows) after
  reading every column (then release it).
- `partial`: send node <peer> a bulk from a generator that stops producing after a few
  chunks have left, print "partial" and hang there (the test SIGKILLs it).
- `hold`: like echo, but never release a bulk (the test SIGKILLs it while it holds one).

Prints "ready" once its transport is registered. Exits when its stdin closes (the test
went away) or after LIFETIME_S_MAX, so it can never outlive a broken test for long.
"""

from __future__ import annotations

import dataclasses
import selectors
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from clock import SystemClock
from ipc.local import LocalTransport
from ipc.transport import BulkReceived, Received
from tests.conformance.harness import TEST_MESSAGES, Header, Ping
from tests.conformance.harness_local import HARNESS_OPTIONS

LIFETIME_S_MAX = 60.0
MiB = 1 << 20
CHILD_OPTIONS = dataclasses.replace(
    HARNESS_OPTIONS,
    outbound_frames_max=64,
    segment_bytes_max=1 * MiB,
    shm_bytes_max=64 * MiB,
    shm_free_bytes_max=16 * MiB,
    lent_bytes_max=32 * MiB,
    mapped_bytes_max=64 * MiB,
)
PARTIAL_BATCH_ROWS = 100_000  # 800 KB of int64: each batch fills most of a 1 MiB chunk
PARTIAL_BATCHES_BEFORE_HANG = 4


def _read_every_column(table: pa.Table) -> None:
    for column in table.columns:
        pc.count(column)


def _hang(stdin_selector: selectors.BaseSelector) -> None:
    """Block until stdin closes or the lifetime runs out."""
    stdin_selector.select(LIFETIME_S_MAX)
    raise SystemExit(0)


def _partial_batches(stdin_selector: selectors.BaseSelector) -> Iterator[pa.RecordBatch]:
    for index in range(PARTIAL_BATCHES_BEFORE_HANG + 1):
        if index == PARTIAL_BATCHES_BEFORE_HANG:
            print("partial", flush=True)
            _hang(stdin_selector)
        values = pa.array(range(index * PARTIAL_BATCH_ROWS, (index + 1) * PARTIAL_BATCH_ROWS))
        yield pa.record_batch({"x": values})


def _serve(
    transport: LocalTransport, release: bool, stdin_selector: selectors.BaseSelector
) -> None:
    clock = SystemClock()
    deadline = clock.monotonic_ns() + int(LIFETIME_S_MAX * 1e9)
    selector = selectors.DefaultSelector()
    selector.register(transport.fileno(), selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, data="stdin")
    held: list[BulkReceived] = []
    while clock.monotonic_ns() < deadline:
        timeout = transport.next_timeout_ns()
        for key, _ in selector.select(0.1 if timeout is None else min(0.1, timeout / 1e9)):
            if key.data == "stdin":
                return
        for delivery in transport.poll():
            if isinstance(delivery, Received) and isinstance(delivery.message, Ping):
                transport.send(delivery.source, delivery.message)
            elif isinstance(delivery, BulkReceived):
                _read_every_column(delivery.table)
                transport.send(delivery.source, Ping(-delivery.table.num_rows))
                if release:
                    delivery.release()
                else:
                    held.append(delivery)


def main(argv: list[str]) -> None:
    mode, cluster, run_dir, node, peer = argv
    transport = LocalTransport(
        cluster,
        int(node),
        Path(run_dir),
        SystemClock(),
        incarnation=1,
        options=CHILD_OPTIONS,
        messages=TEST_MESSAGES,
    )
    stdin_selector = selectors.DefaultSelector()
    stdin_selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    print("ready", flush=True)
    try:
        if mode == "partial":
            transport.send_bulk(int(peer), Header("partial"), _partial_batches(stdin_selector))
            _hang(stdin_selector)
        else:
            _serve(transport, release=mode == "echo", stdin_selector=stdin_selector)
    finally:
        transport.close()


if __name__ == "__main__":
    main(sys.argv[1:])
