"""Test helpers: a few workers as real processes (`python -m cluster.worker --config`) in
a temporary run directory, and a small client on the local transport.

`Workers` writes each node's WorkerConfig as JSON, starts and signals only the processes
it started, and on `close()` kills what is left and reclaims every queue, segment and
registry entry of its cluster (`ipc.local.reclaim_cluster(..., include_live=True)`).
`TestClient` registers a LocalTransport under a client id >= CLIENT_ID_MIN, sends requests,
waits for the matching answer with a timeout and follows `leader_hint` on retryable
refusals. (The real client is cluster/client.py; this one stays small and explicit.)
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from clock import SystemClock
from cluster import config as worker_config
from cluster.config import WorkerConfig
from cluster.protocol import (
    CLIENT_ID_MIN,
    CLIENT_MESSAGES,
    ChaosAction,
    ChaosRequest,
    ChaosResponse,
    KvOp,
    KvRequest,
    KvResponse,
    MembershipOp,
    MembershipRequest,
    MembershipResponse,
    NodeStatus,
    StatusRequest,
    StatusResponse,
    raft_id,
)
from cluster.rundir import RunDir
from ipc import mq, registry, shm
from ipc.local import LocalOptions, LocalTransport, reclaim_cluster
from ipc.tcp import TcpTransport
from raft import Message

REPO = Path(__file__).resolve().parents[3]
QUEUES_PER_HOST_EXPECTED = 24
"""Two clusters of three or four workers plus their clients fit the mq budget (pytest -n 2)."""
EXIT_WAIT_S = 10.0
ANSWER_WAIT_S = 2.0
"""One attempt at one node; a healthy worker answers in milliseconds."""
OPERATION_WAIT_S = 10.0
LEADER_WAIT_S = 10.0
CLIENT_OPTIONS = LocalOptions(queues_per_host_expected=QUEUES_PER_HOST_EXPECTED)
SECONDS_NS = 1_000_000_000
SECRET_BYTES = 32


def free_port() -> int:
    """A loopback port nobody listens on right now (the worker binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    clock = SystemClock()
    deadline = clock.monotonic_ns() + int(timeout_s * SECONDS_NS)
    while True:
        value = condition()
        if value:
            return value
        if clock.monotonic_ns() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


class Workers:
    """Up to a few workers of one cluster, started and signalled by this test only."""

    def __init__(
        self, root: Path, size: int, *, founders: int | None = None, **overrides: Any
    ) -> None:
        """`size` nodes, the first `founders` of them (default: all) founding voters; the
        rest join (`joining=True`). Over TCP every node gets a loopback port of its own."""
        self.name = f"t{os.getpid()}x{random.Random().getrandbits(32):08x}"
        self.run_dir = RunDir(root)
        self.size = size
        self.founders = tuple(range(size if founders is None else founders))
        self.overrides = overrides
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.incarnations: dict[int, int] = dict.fromkeys(range(size), 0)
        self.token = registry.resource_token(self.name, root)
        self.tcp = overrides.get("transport") == "tcp"
        self.addresses = {node: ("127.0.0.1", free_port()) for node in range(size)}
        if self.tcp:
            self.run_dir.write_secret(os.urandom(SECRET_BYTES))

    def config(self, node: int) -> WorkerConfig:
        fields: dict[str, Any] = {
            "name": self.name,
            "node": node,
            "run_dir": str(self.run_dir.path),
            "founders": self.founders,
            "incarnation": self.incarnations[node],
            "queues_per_host_expected": QUEUES_PER_HOST_EXPECTED,
            "joining": node not in self.founders,
        }
        if self.tcp:
            fields["bind"] = self.addresses[node]
            fields["peers"] = {  # a joiner's address reaches the others through the log
                peer: self.addresses[peer] for peer in self.founders if peer != node
            }
        fields.update(self.overrides)
        return WorkerConfig(**fields)

    def start(self, *nodes: int) -> None:
        for node in nodes or tuple(range(self.size)):
            assert node not in self.processes or self.processes[node].poll() is not None
            self.incarnations[node] += 1
            node_dir = self.run_dir.node_dir(node)
            node_dir.mkdir(parents=True, exist_ok=True)
            path = node_dir / f"config-{self.incarnations[node]}.json"
            path.write_bytes(worker_config.dump(self.config(node)))
            with (node_dir / "stderr.log").open("ab") as stderr:
                self.processes[node] = subprocess.Popen(
                    [sys.executable, "-m", "cluster.worker", "--config", str(path)],
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )

    def pid(self, node: int) -> int:
        return self.processes[node].pid

    def signal(self, node: int, signum: int) -> None:
        process = self.processes[node]
        assert process.poll() is None, f"node {node} already exited {process.returncode}"
        os.kill(process.pid, signum)

    def kill(self, *nodes: int) -> None:
        """SIGKILL, and wait for the process to be gone."""
        for node in nodes:
            process = self.processes[node]
            if process.poll() is None:
                process.kill()
            process.wait(EXIT_WAIT_S)

    def stop(self, node: int) -> int:
        """SIGTERM; the exit code."""
        self.signal(node, signal.SIGTERM)
        return self.processes[node].wait(EXIT_WAIT_S)

    def alive(self, node: int) -> bool:
        return node in self.processes and self.processes[node].poll() is None

    def log_lines(self, node: int) -> list[dict[str, Any]]:
        path = self.run_dir.worker_log(node)
        if not path.exists():
            return []
        return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line]

    def leftovers(self, node: int) -> list[str]:
        """Queues, segments and the registry entry of `node` that still exist."""
        found = []
        for incarnation in range(1, self.incarnations[node] + 1):
            queue = registry.queue_name(self.token, raft_id(node), incarnation)
            if mq.queue_exists(queue):
                found.append(queue)
        prefix = registry.node_prefix(self.token, raft_id(node))
        found.extend(shm.segment_files(shm.SHM_DIR, prefix))
        entry = (
            registry.registry_directory(self.run_dir.path, self.token) / f"{raft_id(node)}.entry"
        )
        if entry.exists():
            found.append(str(entry))
        return found

    def describe(self, lines: int = 15) -> str:
        """The tail of each node's log and stderr, for a failing test's report."""
        parts = []
        for node in range(self.size):
            process = self.processes.get(node)
            code = None if process is None else process.poll()
            parts.append(f"--- node {node} incarnation {self.incarnations[node]} exit {code}")
            for path in (self.run_dir.worker_log(node), self.run_dir.node_dir(node) / "stderr.log"):
                if path.exists():
                    parts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(parts)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)  # a paused worker cannot die cleanly
                except ProcessLookupError:
                    pass
                process.kill()
            process.wait(EXIT_WAIT_S)
        reclaim_cluster(self.name, self.run_dir.path, include_live=True)
        for node, incarnations in sorted(self.incarnations.items()):
            for incarnation in range(1, incarnations + 1):  # a queue no entry names any more
                mq.unlink_queue(registry.queue_name(self.token, raft_id(node), incarnation))


class TestClient:
    """Requests to workers over the local transport, one at a time or pipelined."""

    __test__ = False  # not a pytest class

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.clock = SystemClock()
        rng = random.Random()
        self.id = CLIENT_ID_MIN + rng.randrange(1 << 24)
        self._next_request = self.clock.wall_ns()
        """Request ids must never repeat for a client id: start from the wall clock."""
        messages = {"raft": Message, **CLIENT_MESSAGES}
        self.transport: LocalTransport | TcpTransport
        self.reply_address: tuple[str, int] | None = None
        if workers.tcp:
            self.transport = TcpTransport(
                workers.name,
                self.id,
                workers.run_dir.read_secret(),
                self.clock,
                rng,
                bind=("127.0.0.1", 0),
                peers={raft_id(node): address for node, address in workers.addresses.items()},
                messages=messages,
            )
            self.reply_address = self.transport.address
        else:
            self.transport = LocalTransport(
                workers.name,
                self.id,
                workers.run_dir.path,
                self.clock,
                incarnation=1,
                options=CLIENT_OPTIONS,
                messages=messages,
            )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.transport.fileno(), selectors.EVENT_READ)
        self._answers: dict[int, Any] = {}
        self.leader: int | None = None

    def close(self) -> None:
        self._selector.close()
        self.transport.close()

    def request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    def send(self, node: int, message: msgspec.Struct) -> None:
        if self.reply_address is not None and hasattr(message, "reply_address"):
            message = msgspec.structs.replace(message, reply_address=self.reply_address)
        self.transport.send(raft_id(node), message)

    def receive(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for something to arrive; file answers by request id."""
        deliveries = self.transport.poll()
        if not deliveries:
            wait_ns = self.transport.next_timeout_ns()
            timeout = timeout_s if wait_ns is None else min(timeout_s, wait_ns / SECONDS_NS)
            self._selector.select(timeout)
            deliveries = self.transport.poll()
        for delivery in deliveries:
            message = delivery.message
            self._answers[message.request_id] = message

    def answer(self, request_id: int, timeout_s: float = ANSWER_WAIT_S) -> Any:
        """The answer to `request_id`, or None after `timeout_s`."""
        deadline = self.clock.monotonic_ns() + int(timeout_s * SECONDS_NS)
        while request_id not in self._answers:
            left_ns = deadline - self.clock.monotonic_ns()
            if left_ns <= 0:
                return None
            self.receive(left_ns / SECONDS_NS)
        return self._answers.pop(request_id)

    def take(self, request_id: int) -> Any:
        return self._answers.pop(request_id, None)

    def status(self, node: int, timeout_s: float = ANSWER_WAIT_S) -> NodeStatus | None:
        request = StatusRequest(self.request_id())
        self.send(node, request)
        response = self.answer(request.request_id, timeout_s)
        assert response is None or isinstance(response, StatusResponse), response
        return response.status if response is not None else None

    def chaos(self, node: int, request: ChaosRequest) -> ChaosResponse:
        self.send(node, request)
        response = self.answer(request.request_id)
        assert isinstance(response, ChaosResponse), response
        return response

    def partition(self, nodes: list[int], *groups: tuple[int, ...]) -> None:
        for node in nodes:
            request = ChaosRequest(self.request_id(), ChaosAction.PARTITION, groups=groups)
            assert self.chaos(node, request).ok

    def heal(self, nodes: list[int]) -> None:
        for node in nodes:
            assert self.chaos(node, ChaosRequest(self.request_id(), ChaosAction.HEAL)).ok

    def wait_ready(self, nodes: list[int] | None = None, timeout_s: float = LEADER_WAIT_S) -> None:
        """Wait until every node (default: all) answers a status request: its signal
        handlers, WAL and transport are up."""
        for node in nodes if nodes is not None else range(self.workers.size):
            wait_until(lambda n=node: self.status(n, 0.5), timeout_s, f"node {node} to answer")

    def find_leader(self, nodes: list[int] | None = None, timeout_s: float = LEADER_WAIT_S) -> int:
        """A node that says it leads, asking only `nodes` (default: every live one)."""

        def ask() -> int | None:
            candidates = nodes if nodes is not None else range(self.workers.size)
            for node in candidates:
                if not self.workers.alive(node):
                    continue
                status = self.status(node, timeout_s=0.5)
                if status is not None and status.role == "leader":
                    return node + 1  # truthy even for node 0
            return None

        self.leader = wait_until(ask, timeout_s, "a leader") - 1
        assert self.leader is not None
        return self.leader

    def membership(
        self, op: MembershipOp, node: int, address: tuple[str, int] | None = None
    ) -> MembershipResponse:
        """One membership change at the leader, retried while the refusal is retryable."""

        def change() -> MembershipResponse | None:
            leader = self.find_leader()
            request = MembershipRequest(self.request_id(), op, node, address)
            response = self.attempt(leader, request, ANSWER_WAIT_S)
            if response is not None and (response.ok or not response.retryable):
                return response  # type: ignore[no-any-return]
            return None

        return wait_until(change, OPERATION_WAIT_S, f"{op.name} of node {node}")  # type: ignore[no-any-return]

    def kv(
        self,
        op: KvOp,
        key: str,
        value: bytes | None = None,
        *,
        expected: bytes | None = None,
        stale: bool = False,
        node: int | None = None,
        follow: bool = True,
        timeout_s: float = OPERATION_WAIT_S,
    ) -> KvResponse:
        """One request, retried (same request id) at the hinted leader until served."""
        request = KvRequest(self.request_id(), op, key, value, expected, stale)
        target = node if node is not None else self.leader
        if target is None:
            target = self.find_leader()
        deadline = self.clock.monotonic_ns() + int(timeout_s * SECONDS_NS)
        rotation = 0
        while self.clock.monotonic_ns() < deadline:
            if self.workers.alive(target):
                self.send(target, request)
                response = self.answer(request.request_id)
                if response is not None and not (follow and response.retryable):
                    if response.error is None:
                        self.leader = target if not stale else self.leader
                    return response  # type: ignore[no-any-return]
                if response is not None and response.leader_hint is not None:
                    target = response.leader_hint
                    continue
            rotation += 1
            target = rotation % self.workers.size
            time.sleep(0.05)
        raise AssertionError(f"{op.name} {key!r} not served within {timeout_s}s")

    def put(self, key: str, value: bytes, **options: Any) -> KvResponse:
        response = self.kv(KvOp.PUT, key, value, **options)
        assert response.ok, response
        return response

    def get(self, key: str, **options: Any) -> KvResponse:
        return self.kv(KvOp.GET, key, **options)

    def attempt(self, node: int, request: KvRequest | MembershipRequest, timeout_s: float) -> Any:
        """Send once, no retry: the answer, or None after `timeout_s`."""
        self.send(node, request)
        return self.answer(request.request_id, timeout_s)

    def pipeline_puts(
        self,
        node: int,
        keys: list[str],
        value: bytes,
        outstanding: int,
        between: Callable[[list[str]], None] | None = None,
    ) -> tuple[list[str], list[str]]:
        """PUT every key at `node` with up to `outstanding` requests in flight, each sent
        once. Returns (acknowledged keys, keys refused or never answered). `between` sees
        the acknowledged keys after each answer that arrives (to act mid-flight)."""
        pending: dict[int, str] = {}
        acknowledged: list[str] = []
        failed: list[str] = []
        queue = list(reversed(keys))
        while queue or pending:
            while queue and len(pending) < outstanding:
                key = queue.pop()
                request = KvRequest(self.request_id(), KvOp.PUT, key, value)
                pending[request.request_id] = key
                self.send(node, request)
            if not self._settle(pending, acknowledged, failed):
                failed.extend(pending.values())  # nothing arrived for a while: give up
                failed.extend(reversed(queue))
                break
            if between is not None:
                between(acknowledged)
        return acknowledged, failed

    def _settle(self, pending: dict[int, str], acknowledged: list[str], failed: list[str]) -> bool:
        """Wait for at least one pending answer; False if none came within ANSWER_WAIT_S."""
        deadline = self.clock.monotonic_ns() + int(ANSWER_WAIT_S * SECONDS_NS)
        while (left_ns := deadline - self.clock.monotonic_ns()) > 0:
            self.receive(left_ns / SECONDS_NS)
            settled = [request_id for request_id in pending if request_id in self._answers]
            for request_id in settled:
                response = self._answers.pop(request_id)
                key = pending.pop(request_id)
                (acknowledged if response.ok else failed).append(key)
            if settled:
                return True
        return False


@contextmanager
def running(root: Path, size: int, **overrides: Any) -> Iterator[tuple[Workers, TestClient]]:
    """`size` founders started, a client, and everything torn down afterwards."""
    workers = Workers(root, size, **overrides)
    client: TestClient | None = None
    try:
        workers.start()
        client = TestClient(workers)
        client.wait_ready()
        yield workers, client
    except BaseException:
        print(workers.describe())  # pytest shows it with the failure
        raise
    finally:
        if client is not None:
            client.close()
        workers.close()
