"""The PySyncObj baseline: a 3-node cluster in separate processes, and its load drivers.

The node is a `SyncObj` holding a replicated dict (key -> 128-byte value), built with
PySyncObj's default `SyncObjConf` (nothing changed but the addresses): an in-memory
journal, no full dump file, batched AppendEntries, a 50 ms tick. PySyncObj has no
client protocol of its own: a program calls a `@replicated` method on its local node,
which forwards the command to the leader. So the load runs inside the node processes:
each driver keeps a fixed number of calls in flight, and each completion callback (run
on PySyncObj's tick thread) records the call's latency and issues the next call.

Invariant: a driver never has more than its window of calls in flight, and stops issuing
once its measurement window has ended; every wait is bounded.

Protocol with the parent (over a `multiprocessing` pipe):
    child -> ("ready", node)                 once the node is ready and knows a leader
    parent -> ("leader?",)                    child -> ("leader", address of its leader)
    parent -> ("run", DriveSpec)              child -> ("done", DriveResult) after the
                                              window and a bounded drain
    parent -> ("stop",)                       destroy the node and exit
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from array import array
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated

from benchmarks._processes import JOIN_S_MAX, child, expect
from clock import Clock, SystemClock

READY_S_MAX = 30.0
"""A node that is not ready (and knows no leader) by then reports an error."""
DRAIN_S_MAX = 10.0
"""After the window, calls still in flight get this long to complete (counted apart)."""
PARENT_WAIT_S_MAX = 600.0
"""A node hears from its parent within this, or stops by itself."""
POLL_S = 0.01
SUCCESS = 0
"""PySyncObj's FAIL_REASON.SUCCESS."""


@dataclass(frozen=True)
class DriveSpec:
    """What one node's driver does: `window` calls in flight for `warmup_s + duration_s`;
    completions during the last `duration_s` are measured."""

    window: int
    duration_s: float
    warmup_s: float
    value_bytes: int
    keys: int

    def __post_init__(self) -> None:
        assert self.window >= 0, self.window
        assert self.duration_s > 0 and self.warmup_s >= 0, self
        assert self.value_bytes > 0 and self.keys > 0, self


@dataclass(frozen=True)
class DriveResult:
    node: int
    commits: int
    """Calls acknowledged (SUCCESS) inside the measurement window."""
    latencies_ns: bytes
    """array('q') of each measured call's latency (issue -> callback), as bytes."""
    failures: int
    """Calls that completed with an error (any time)."""
    in_flight_at_end: int


class Store(SyncObj):  # PySyncObj has no type hints: SyncObj is Any here
    """The replicated state: a dict of the last value written under each key."""

    def __init__(self, self_address: str, other_addresses: list[str]) -> None:
        super().__init__(self_address, other_addresses, SyncObjConf())
        self.values: dict[str, bytes] = {}

    @replicated
    def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        return len(self.values)


class _Driver:
    """A window of asynchronous `put` calls, refilled from their own callbacks."""

    def __init__(self, store: Store, spec: DriveSpec, clock: Clock) -> None:
        self.store = store
        self.spec = spec
        self.clock = clock
        self.value = bytes(spec.value_bytes)
        self.lock = threading.Lock()
        self.sequence = 0
        self.in_flight = 0
        self.failures = 0
        self.done_ns = array("q")
        self.latencies_ns = array("q")
        self.stop_at_ns = 0
        self.idle = threading.Event()

    def run(self, parent: Connection) -> bool:
        """Drive until the window ends and the calls drain; False if the parent spoke (it
        says nothing during a run unless it wants us to stop) or went away."""
        began = self.clock.monotonic_ns()
        self.measure_from_ns = began + int(self.spec.warmup_s * 1e9)
        self.stop_at_ns = self.measure_from_ns + int(self.spec.duration_s * 1e9)
        for _ in range(self.spec.window):
            self._issue()
        while self.clock.monotonic_ns() < self.stop_at_ns:
            if parent.poll(POLL_S):
                self.stop_at_ns = 0  # the callbacks stop issuing
                return False
        with self.lock:
            if self.in_flight == 0:
                self.idle.set()
        self.idle.wait(DRAIN_S_MAX)
        return True

    def _issue(self) -> None:
        with self.lock:
            self.sequence += 1
            self.in_flight += 1
            key = f"k{self.sequence % self.spec.keys}"
        began = self.clock.monotonic_ns()
        self.store.put(key, self.value, callback=lambda _result, error: self._done(began, error))

    def _done(self, began_ns: int, error: Any) -> None:
        now = self.clock.monotonic_ns()
        with self.lock:
            self.in_flight -= 1
            if error != SUCCESS:
                self.failures += 1
            elif self.measure_from_ns <= now <= self.stop_at_ns:
                self.done_ns.append(now)
                self.latencies_ns.append(now - began_ns)
            stopping = now >= self.stop_at_ns
            if stopping and self.in_flight == 0:
                self.idle.set()
        if not stopping:
            self._issue()

    def result(self, node: int) -> DriveResult:
        with self.lock:
            return DriveResult(
                node,
                len(self.latencies_ns),
                self.latencies_ns.tobytes(),
                self.failures,
                self.in_flight,
            )


def _wait_ready(store: Store, clock: Clock) -> None:
    deadline_ns = clock.monotonic_ns() + int(READY_S_MAX * 1e9)
    while not (store.isReady() and store._getLeader() is not None):
        if clock.monotonic_ns() > deadline_ns:
            raise TimeoutError(f"PySyncObj node not ready with a leader in {READY_S_MAX} s")
        time.sleep(POLL_S)


def _leader_address(store: Store) -> str:
    leader = store._getLeader()
    return str(getattr(leader, "address", leader))


def _receive(connection: Connection) -> Any:
    if not connection.poll(PARENT_WAIT_S_MAX):
        raise TimeoutError(f"no word from the parent in {PARENT_WAIT_S_MAX} s")
    return connection.recv()


def serve(node: int, addresses: list[str], connection: Connection) -> None:
    """The child's entry point: run node `node` of the cluster at `addresses`."""
    clock = SystemClock()
    others = [address for index, address in enumerate(addresses) if index != node]
    store = Store(addresses[node], others)
    try:
        _wait_ready(store, clock)
        connection.send(("ready", node))
        while True:
            message = _receive(connection)
            if message[0] == "leader?":
                connection.send(("leader", _leader_address(store)))
            elif message[0] == "run":
                driver = _Driver(store, message[1], clock)
                if not driver.run(connection):
                    return
                connection.send(("done", driver.result(node)))
            else:  # ("stop",)
                return
    except (BrokenPipeError, EOFError):
        return  # the parent is gone: nobody wants the result
    finally:
        with contextlib.suppress(Exception):
            store.destroy()
        connection.close()


# ---- the parent's side ----


@dataclass(frozen=True)
class Figures:
    commits: int
    duration_s: float
    latencies_ns: list[int]
    failures: int
    drivers: tuple[int, ...]
    """Node indexes that ran a driver."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(count)
        ]
        return [sock.getsockname()[1] for sock in sockets]


def measure(spec: DriveSpec, nodes: int, leader_only: bool) -> Figures:
    """Start `nodes` PySyncObj processes, drive them (only the leader, or every node with
    an equal share of the window) and stop them all, whatever happens."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(nodes)]
    with contextlib.ExitStack() as stack:
        connections = [stack.enter_context(child(serve, node, addresses)) for node in range(nodes)]
        for connection in connections:
            expect(connection, "ready", READY_S_MAX + JOIN_S_MAX, "a PySyncObj node")
        leader = addresses.index(_agreed_leader(connections))
        drivers = (leader,) if leader_only else tuple(range(nodes))
        for node, connection in enumerate(connections):
            share = _share(spec.window, drivers, node)
            connection.send(("run", replace(spec, window=share)))
        wait_s = spec.warmup_s + spec.duration_s + DRAIN_S_MAX + JOIN_S_MAX
        results: list[DriveResult] = [
            expect(connection, "done", wait_s, "a PySyncObj node")[1] for connection in connections
        ]
    latencies: list[int] = []
    for result in results:
        latencies.extend(array("q", result.latencies_ns))
    return Figures(
        sum(result.commits for result in results),
        spec.duration_s,
        latencies,
        sum(result.failures for result in results),
        drivers,
    )


def _agreed_leader(connections: list[Connection]) -> str:
    """The leader every node names, asked until they agree (an election may be settling)."""
    clock = SystemClock()
    deadline_ns = clock.monotonic_ns() + int(READY_S_MAX * 1e9)
    while True:
        for connection in connections:
            connection.send(("leader?",))
        leaders = {
            expect(connection, "leader", JOIN_S_MAX, "a PySyncObj node")[1]
            for connection in connections
        }
        if len(leaders) == 1:
            return leaders.pop()
        if clock.monotonic_ns() > deadline_ns:
            raise TimeoutError(f"PySyncObj nodes disagree on the leader: {sorted(leaders)}")
        time.sleep(POLL_S)


def _share(window: int, drivers: tuple[int, ...], node: int) -> int:
    if node not in drivers:
        return 0
    position = drivers.index(node)
    return window // len(drivers) + (1 if position < window % len(drivers) else 0)
