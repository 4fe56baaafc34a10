"""The dcluster half of `benchmarks.raft`'s commit figures: load client processes.

Each load process opens a client transport of its own (a POSIX mq under a fresh client
id, like `cluster.client.Client`) and keeps a fixed window of `KvRequest` PUTs in flight
to the leader, each with its own request id and a 128-byte value, over a bounded key
space. A commit's latency runs from the first send of its request to the acknowledged
response (a redirect or a retry keeps the first send time). Only acknowledgements that
arrive inside the measurement window count; the warm-up before it does not.

Invariant: a load process never has more than its window of requests in flight (at most
`RESULTS_PER_CLIENT_MAX`, the results the state machine keeps per client), stops
issuing when its window ends, and drains for at most `DRAIN_S_MAX`; every wait is bounded.

Protocol with the parent (over a `multiprocessing` pipe):
    child -> ("ready", client_id)      once its transport is open
    parent -> ("run", LoadSpec)         start now; child -> ("done", LoadResult) after the
                                        window and the drain (as often as asked)
    parent -> ("stop",)                 close the transport and exit

One process serves every run of a benchmark: a worker keeps the queue of each client it
has answered open while it lives, so short-lived clients would eat the host's mq budget.
"""

from __future__ import annotations

import itertools
import os
import random
import selectors
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from clock import Clock, SystemClock
from cluster.client import CLIENT_QUEUES_PER_HOST_EXPECTED, choose_client_id
from cluster.kv import RESULTS_PER_CLIENT_MAX
from cluster.protocol import CLIENT_MESSAGES, KvOp, KvRequest, KvResponse, node_of, raft_id
from ipc.errors import TransportError
from ipc.local import LocalOptions, LocalTransport
from ipc.transport import Received, Transport

DRAIN_S_MAX = 10.0
"""After the window, requests still in flight get this long to be answered."""
PARENT_WAIT_S_MAX = 300.0
SELECT_S_MAX = 0.01
CLIENT_ID_ATTEMPTS_MAX = 5
CLIENT_QUEUE_MESSAGE_BYTES_MAX = 1024
"""A client's queue only receives small responses (a larger one travels through shm), so
its messages are small: the host's mq byte budget is shared by every cluster on it."""
CLIENT_QUEUE_OPTIONS = LocalOptions(
    queue_message_bytes_max=CLIENT_QUEUE_MESSAGE_BYTES_MAX,
    queues_per_host_expected=CLIENT_QUEUES_PER_HOST_EXPECTED,
)
RESEND_AFTER_S = 6.0
"""A request unanswered this long is sent again (same id: the cluster applies it once).
Longer than a worker's own request deadline (5 s, cluster/_worker_requests.py), after
which the worker answers 'timed out' itself: only a lost answer waits this long."""
RETRY_PAUSE_S = 0.05
"""A request refused with no leader named is sent again after about this pause."""
RESEND_CHECK_S = 0.05


@dataclass(frozen=True)
class LoadSpec:
    cluster: str
    run_dir: str
    nodes: tuple[int, ...]
    leader: int
    window: int
    duration_s: float
    warmup_s: float
    value_bytes: int
    keys: int

    def __post_init__(self) -> None:
        assert self.leader in self.nodes, (self.leader, self.nodes)
        # More in flight and a request could fall out of the results the state machine
        # keeps per client, and be refused as expired (see cluster/kv.py).
        assert 1 <= self.window <= RESULTS_PER_CLIENT_MAX, self.window
        assert self.duration_s > 0 and self.warmup_s >= 0, self
        assert self.value_bytes > 0 and self.keys > 0, self


@dataclass(frozen=True)
class LoadResult:
    commits: int
    """Acknowledged PUTs inside the measurement window."""
    latencies_ns: bytes
    """array('q') of each measured commit's latency, as bytes."""
    errors: dict[str, int]
    """Responses that named an error, by error (each request is retried: at once where
    a leader is named, after `RETRY_PAUSE_S` otherwise)."""
    resends: int
    refused: int
    """Requests refused for good (not retryable): never acknowledged, not retried."""
    in_flight_at_end: int


def open_client_transport(
    cluster: str, run_dir: Path, clock: Clock, rng: random.Random
) -> tuple[Transport, int]:
    """A local client transport under a client id no live client holds."""
    error: Exception | None = None
    for _ in range(CLIENT_ID_ATTEMPTS_MAX):
        client_id = choose_client_id(os.getpid(), rng)
        try:
            transport = LocalTransport(
                cluster,
                client_id,
                run_dir,
                clock,
                incarnation=1,
                options=CLIENT_QUEUE_OPTIONS,
                messages=CLIENT_MESSAGES,
            )
        except TransportError as refused:
            error = refused
            continue
        return transport, client_id
    raise RuntimeError(f"no free client id: {error}")


class _Stopped(Exception):
    """The parent spoke (or went away) during a run."""


class _Load:
    """One process's window of PUTs, driven by a selector loop over its transport."""

    def __init__(
        self,
        transport: Transport,
        spec: LoadSpec,
        clock: Clock,
        request_ids: Iterator[int],
        parent: Connection,
    ) -> None:
        self.transport = transport
        self.spec = spec
        self.clock = clock
        self.value = bytes(spec.value_bytes)
        self.target = spec.leader
        self.request_ids = request_ids
        self.in_flight: dict[int, tuple[int, int, KvRequest]] = {}
        """request id -> (first send ns, last send ns, request)."""
        self.unsent: deque[KvRequest] = deque()
        self.latencies_ns = array("q")
        self.errors: Counter[str] = Counter()
        self.resends = 0
        self.refused = 0
        self.next_resend_check_ns = 0
        self.selector = selectors.DefaultSelector()
        self.selector.register(transport.fileno(), selectors.EVENT_READ)
        # The parent says nothing during a run: its end readable means stop (or it is gone).
        self.selector.register(parent.fileno(), selectors.EVENT_READ, data="parent")
        self.parent_spoke = False

    def run(self) -> LoadResult:
        began = self.clock.monotonic_ns()
        self.measure_from_ns = began + int(self.spec.warmup_s * 1e9)
        self.stop_at_ns = self.measure_from_ns + int(self.spec.duration_s * 1e9)
        drain_until_ns = self.stop_at_ns + int(DRAIN_S_MAX * 1e9)
        while True:
            now = self.clock.monotonic_ns()
            if now >= self.stop_at_ns and not self.in_flight or now >= drain_until_ns:
                break
            if self.parent_spoke:
                raise _Stopped
            if now < self.stop_at_ns:
                self._fill(now)
            self._flush_unsent()
            self._resend_stale(now)
            self._wait()
            for delivery in self.transport.poll():
                if isinstance(delivery, Received) and isinstance(delivery.message, KvResponse):
                    self._answer(node_of(delivery.source), delivery.message)
        return LoadResult(
            len(self.latencies_ns),
            self.latencies_ns.tobytes(),
            dict(self.errors),
            self.resends,
            self.refused,
            len(self.in_flight),
        )

    def _fill(self, now: int) -> None:
        while len(self.in_flight) < self.spec.window:
            request_id = next(self.request_ids)
            request = KvRequest(
                request_id=request_id,
                op=KvOp.PUT,
                key=f"k{request_id % self.spec.keys}",
                value=self.value,
            )
            self.in_flight[request_id] = (now, now, request)
            self._send(request)

    def _send(self, request: KvRequest) -> None:
        if self.unsent:
            self.unsent.append(request)  # keep send order behind what waits already
            return
        try:
            self.transport.send(raft_id(self.target), request)
        except TransportError:  # backpressure: the leader is not reading fast enough
            self.unsent.append(request)

    def _flush_unsent(self) -> None:
        while self.unsent:
            try:
                self.transport.send(raft_id(self.target), self.unsent[0])
            except TransportError:
                return
            self.unsent.popleft()

    def _resend_stale(self, now: int) -> None:
        """Send again what waited too long; looks at most every `RESEND_CHECK_S` (a scan
        of the whole window on every wake-up would cost the workers CPU)."""
        if now < self.next_resend_check_ns:
            return
        self.next_resend_check_ns = now + int(RESEND_CHECK_S * 1e9)
        stale_ns = int(RESEND_AFTER_S * 1e9)
        for request_id, (first_ns, last_ns, request) in list(self.in_flight.items()):
            if now - last_ns >= stale_ns:
                self.in_flight[request_id] = (first_ns, now, request)
                self.resends += 1
                self._send(request)

    def _wait(self) -> None:
        timeout_s = SELECT_S_MAX
        transport_ns = self.transport.next_timeout_ns()
        if transport_ns is not None:
            timeout_s = min(timeout_s, transport_ns / 1e9)
        for key, _events in self.selector.select(timeout_s):
            self.parent_spoke = self.parent_spoke or key.data == "parent"

    def _answer(self, source: int, response: KvResponse) -> None:
        """Record an acknowledgement; follow a redirect at once; retry the rest soon."""
        entry = self.in_flight.get(response.request_id)
        if entry is None:
            return  # a late answer to a request already acknowledged
        first_ns, _last_ns, request = entry
        if response.error is None and response.ok:
            del self.in_flight[response.request_id]
            now = self.clock.monotonic_ns()
            if self.measure_from_ns <= now <= self.stop_at_ns:
                self.latencies_ns.append(now - first_ns)
            return
        self.errors[response.error or "not ok"] += 1
        now = self.clock.monotonic_ns()
        if not response.retryable and response.leader_hint is None:
            del self.in_flight[response.request_id]  # refused for good: count it, move on
            self.refused += 1
            return
        hint = response.leader_hint
        if hint is not None and hint in self.spec.nodes and hint != source:
            self.target = hint
            self.in_flight[response.request_id] = (first_ns, now, request)
            self._send(request)
            return
        # Busy, or no leader known: _resend_stale sends it again after a short pause.
        retry_at_ns = now - int((RESEND_AFTER_S - RETRY_PAUSE_S) * 1e9)
        self.in_flight[response.request_id] = (first_ns, retry_at_ns, request)


def _receive(connection: Connection, timeout_s: float) -> Any:
    if not connection.poll(timeout_s):
        raise TimeoutError(f"no word from the parent in {timeout_s} s")
    return connection.recv()


def serve(cluster: str, run_dir: str, seed: int, connection: Connection) -> None:
    """A load process's entry point."""
    clock = SystemClock()
    transport, client_id = open_client_transport(cluster, Path(run_dir), clock, random.Random(seed))
    # Request ids only grow for one client id, across runs: the state machine refuses an
    # id at or below the oldest it has forgotten for that client.
    request_ids = itertools.count(1)
    try:
        connection.send(("ready", client_id))
        while True:
            message = _receive(connection, PARENT_WAIT_S_MAX)
            if message[0] != "run":
                return  # ("stop",)
            load = _Load(transport, message[1], clock, request_ids, connection)
            try:
                connection.send(("done", load.run()))
            finally:
                load.selector.close()
    except (_Stopped, BrokenPipeError, EOFError):
        return  # the parent stopped us mid-run, or is gone: nobody wants the result
    finally:
        transport.close()
        connection.close()
