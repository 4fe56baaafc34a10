"""Staging through `TransportPort` over a fake transport and simulated time: acks that
arrive while the port waits out backpressure on a later send still count, so a batch is
shipped once and staging does not wait for a second round.

The fake holders store every batch at once and answer with a `StageAck` on the sender's
next poll; one holder's queue is full for the first few sends to it, as a worker's is
while it catches up on earlier frames."""

from __future__ import annotations

from typing import Any

import msgspec
import pyarrow as pa

from clock import SimClock, SimTime
from cluster.protocol import node_of
from cluster.session import TransportPort
from cluster.sql_protocol import StageAck, StageHeader
from ipc.errors import Backpressure
from ipc.transport import Received

TABLE = "main.t"
CRC = 1234
BUSY_POLLS = 3
"""Polls the busy holder's queue stays full for."""


class FakeTransport:
    """Holders that store at once and ack on the next poll; `busy` pushes back at first."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.busy_polls = BUSY_POLLS
        self.sent: list[tuple[int, int]] = []
        """(node, partition) of every bulk send the transport took."""
        self._answers: list[Received] = []

    def send_bulk(self, target: int, header: msgspec.Struct, rows: pa.Table) -> None:
        assert isinstance(header, StageHeader)
        node = node_of(target)
        if node == self.busy and self.busy_polls > 0:
            raise Backpressure(target, 1)
        self.sent.append((node, header.partition))
        ack = StageAck(
            header.request_id, header.stage_id, True, rows.num_rows, CRC, holders=(node,)
        )
        self._answers.append(Received(target, ack))

    def poll(self) -> list[Any]:
        self.busy_polls -= 1
        answers, self._answers = self._answers, []
        return answers

    def next_timeout_ns(self) -> int | None:
        return None


class FakeSelector:
    """Waiting moves simulated time on by the whole timeout."""

    def __init__(self, time: SimTime) -> None:
        self.time = time

    def select(self, timeout_s: float) -> list[Any]:
        self.time.advance_by(max(1, int(timeout_s * 1e9)))
        return []


class FakeClient:
    def __init__(self, transport: FakeTransport) -> None:
        self.time = SimTime()
        self._clock = SimClock(self.time)
        self._transport = transport
        self._selector = FakeSelector(self.time)
        self._reply_address = None
        self.client_id = 7
        self.nodes = [0, 1, 2]


def test_acks_that_arrive_during_backpressure_are_not_lost() -> None:
    transport = FakeTransport(busy=2)
    client = FakeClient(transport)
    port = TransportPort(client)  # type: ignore[arg-type]
    rows = {partition: pa.table({"x": [partition] * 10}) for partition in range(3)}
    started_ns = client.time.now_ns

    batches = port.stage(TABLE, rows, placement=((0,), (1,), (2,)))

    assert [(batch.partition, batch.holders) for batch in batches] == [
        (0, (0,)),
        (1, (1,)),
        (2, (2,)),
    ]
    assert transport.sent == [(0, 0), (1, 1), (2, 2)], "every batch is shipped once"
    elapsed_ms = (client.time.now_ns - started_ns) // 1_000_000
    assert elapsed_ms < 100, f"staging waited {elapsed_ms} ms for a second round"
