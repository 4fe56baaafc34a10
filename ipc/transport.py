"""The one interface every byte between nodes goes through.

A `Transport` belongs to one node. It sends control messages (registered msgspec Structs)
and bulk Arrow data (a table or a stream of record batches, with a small Struct header)
to other nodes of the same cluster, and hands back what arrived as `Delivery` values.
Three implementations share it: `LocalTransport` (POSIX mq + /dev/shm, one host),
`TcpTransport` (across hosts) and `SimTransport` (the simulator's seeded twin). Callers
never learn which one they hold.

The loop contract (one `selectors` loop per worker, see cluster/):

    selector.register(transport.fileno(), EVENT_READ)
    while running:
        selector.select(timeout=min(tick, transport.next_timeout_ns()))
        for delivery in transport.poll():
            ...

`fileno()` is one readiness descriptor for every input the transport has (an epoll
descriptor over its queue, sockets and timers); `poll()` never blocks: it flushes what it
can of the outbound queues, reads what has arrived, and returns it. A worker that calls
`poll()` after every wake-up and at least by `next_timeout_ns()` loses nothing.

Guarantees, for every implementation with its faults switched off:
- per (source, target) pair, deliveries arrive in send order (control and bulk share
  one order), each at most once;
- while both ends stay alive and polled, every message `send`/`send_bulk` accepted is
  delivered (nothing is lost without a crash or a fault); a peer that is not reachable
  yet (not started, restarting, reconnecting) gets its frames from the bounded outbound
  queue once it is;
- a frame that fails to decode is counted in `stats().errors[reason]` and dropped; the
  transport keeps serving;
- `send` never blocks: a full per-peer outbound queue raises `Backpressure`;
- a peer that is gone is detected (not waited on); frames queued to it are dropped and
  counted, and shared-memory lent to it is reclaimed.
What is not guaranteed: delivery. Raft and the client layer retry; the transport does
not persist anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

import msgspec
import pyarrow as pa

from ipc.faults import LinkFaults

BulkData: TypeAlias = pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch]
"""What `send_bulk` accepts. An iterable of batches must share one schema and be
non-empty (an empty table is fine: send `schema.empty_table()`)."""


class Received(NamedTuple):
    """A control message from `source`. (A tuple: one is built per message received.)"""

    source: int
    message: Any


class BulkReceived:
    """Bulk Arrow data from `source`. `table` may point straight into shared memory or a
    receive buffer (zero copy): call `release()` once nothing reads it any more, after
    which the memory may be reused by the sender. Releasing twice is harmless; a
    transport that is closed releases everything."""

    __slots__ = ("source", "header", "table", "bytes", "_release", "_released")

    def __init__(
        self,
        source: int,
        header: Any,
        table: pa.Table,
        bytes_: int,
        release: Any = None,
    ) -> None:
        self.source = source
        self.header = header
        self.table = table
        self.bytes = bytes_
        self._release = release
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._release is not None:
            self._release()

    def __enter__(self) -> BulkReceived:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"BulkReceived(source={self.source}, header={self.header!r}, "
            f"rows={self.table.num_rows}, bytes={self.bytes})"
        )


Delivery: TypeAlias = Received | BulkReceived


@dataclass
class TransportStats:
    """Counters, never reset. `errors` counts refused inbound frames by reason (see
    ipc.errors); `dropped` counts outbound frames dropped by reason (peer_gone,
    fault_drop, backpressure...)."""

    frames_sent: int = 0
    frames_received: int = 0
    bulk_sent: int = 0
    bulk_received: int = 0
    bulk_bytes_sent: int = 0
    bulk_bytes_received: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def count_dropped(self, reason: str, frames: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + frames


@runtime_checkable
class Transport(Protocol):
    """See the module docstring for the loop contract and the guarantees."""

    @property
    def node_id(self) -> int: ...

    @property
    def faults(self) -> LinkFaults:
        """Drop rules and added delay per link; all off until a chaos command or the
        simulator switches them on."""
        ...

    def register(self, tag: str, message_type: type[msgspec.Struct]) -> None:
        """Make a message type sendable and receivable (both ends must register it)."""
        ...

    def fileno(self) -> int:
        """One descriptor that is readable whenever `poll()` may have work."""
        ...

    def send(self, target: int, message: msgspec.Struct) -> None:
        """Queue one control message. Never blocks. Raises `Backpressure` when the
        per-peer outbound queue is full, `UnknownPeer`, `MessageTooLarge`,
        `TransportClosed`. A message larger than one queue message still goes (local
        transport: through shared memory)."""
        ...

    def send_bulk(self, target: int, header: msgspec.Struct, data: BulkData) -> None:
        """Queue bulk Arrow data with a small registered header. Same errors as `send`."""
        ...

    def poll(self) -> list[Delivery]:
        """Do all IO possible without blocking; return what arrived, in order per source."""
        ...

    def next_timeout_ns(self) -> int | None:
        """Nanoseconds until `poll()` must run again even if `fileno()` stays quiet
        (reconnect backoff, delayed frames), or None."""
        ...

    def stats(self) -> TransportStats: ...

    def close(self) -> None:
        """Release every resource (queues, segments, sockets). Idempotent."""
        ...
