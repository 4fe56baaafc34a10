"""Leader failover of a running dcluster cluster, measured from outside it.

One round: find the leader (each worker's status; the leader in the highest term), check
its pid is the worker `cluster.json` records (same create time), SIGKILL it, and from
that instant send a fresh PUT to every surviving worker every `PROBE_INTERVAL_S` until
one is acknowledged: the failover time runs from just before the kill to that
acknowledgement (a commit by the new leader). Then wait for the supervisor to restart
the killed worker and for the cluster to be whole again — every worker answering, one
leader, the restarted worker applied past the probe's index — before the next round.

The supervisor marks a worker restarted `CRASH_LOOP_RESTARTS_MAX` times within
`CRASH_LOOP_WINDOW_MS` as crash-looping and leaves it down. Kills follow the leader, so
before each kill the round waits (bounded) until the leader's recent restarts, as seen
from here (never earlier than they happened), are fewer than that; the time spent so is
reported, not counted in any failover.

Invariant: only a worker of this cluster, verified by pid and create time, is signalled;
every wait is bounded.
"""

from __future__ import annotations

import itertools
import os
import random
import selectors
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from benchmarks._dcluster_load import open_client_transport
from clock import Clock
from cluster.client import leader_of
from cluster.control import our_process
from cluster.protocol import (
    KvOp,
    KvRequest,
    KvResponse,
    NodeStatus,
    StatusRequest,
    StatusResponse,
    node_of,
    raft_id,
)
from cluster.rundir import RunDir
from cluster.supervisor import CRASH_LOOP_RESTARTS_MAX, CRASH_LOOP_WINDOW_MS
from ipc.errors import TransportError
from ipc.transport import Received

PROBE_INTERVAL_S = 0.005
FAILOVER_S_MAX = 15.0
"""A round whose probes are not acknowledged by then fails the benchmark."""
RESTART_S_MAX = 30.0
"""The supervisor restarts the killed worker within this (its backoff is at most 5 s)."""
HEALTHY_S_MAX = 30.0
LEADER_S_MAX = 10.0
POLL_S = 0.02
STATUS_TIMEOUT_S = 0.3
CRASH_LOOP_MARGIN_S = 2.0
PACING_S_MAX = CRASH_LOOP_WINDOW_MS / 1000 + CRASH_LOOP_MARGIN_S
PROBE_VALUE_BYTES = 128


class FailoverError(Exception):
    """The cluster did not recover within a bound."""


@dataclass
class FailoverFigures:
    failover_ns: list[int] = field(default_factory=list)
    killed: list[tuple[int, int]] = field(default_factory=list)
    """(node, pid) of each kill, in order."""
    recovery_ns: list[int] = field(default_factory=list)
    """Kill -> the cluster whole again (restarted worker caught up)."""
    paced_ns: int = 0
    """Time spent waiting so the supervisor would not see a crash loop."""


class Session:
    """One client transport for both questions a round asks: each worker's status, and
    fresh PUTs to every surviving worker until one is acknowledged. (One queue, not two:
    the mq budget is shared by every cluster on the host.)"""

    def __init__(self, run: RunDir, clock: Clock, rng: random.Random) -> None:
        info = run.read_cluster()
        assert info is not None, run.path
        self.run = run
        self.nodes = [node.id for node in info.nodes]
        self.clock = clock
        self.request_ids = itertools.count(rng.randrange(1, 1 << 30))
        self.value = bytes(PROBE_VALUE_BYTES)
        self.transport, _client_id = open_client_transport(info.name, run.path, clock, rng)
        self.selector = selectors.DefaultSelector()
        try:
            self.selector.register(self.transport.fileno(), selectors.EVENT_READ)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.selector.close()
        finally:
            self.transport.close()

    def leader(self, timeout_s: float) -> tuple[int, NodeStatus] | None:
        """The leader in the highest term any worker reports, with its status, or None."""
        statuses = self.status_all(timeout_s)
        leader = leader_of(statuses)
        status = statuses.get(leader) if leader is not None else None
        return None if leader is None or status is None else (leader, status)

    def first_ack(self, targets: list[int], timeout_s: float) -> tuple[int, KvResponse]:
        """(when, response) of the first acknowledged probe; FailoverError past timeout."""
        deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        sent: set[int] = set()
        next_probe_ns = 0
        while True:
            now = self.clock.monotonic_ns()
            if now >= deadline_ns:
                raise FailoverError(f"no write acknowledged within {timeout_s} s of the kill")
            if now >= next_probe_ns:
                sent.update(self._probe(targets))
                next_probe_ns = now + int(PROBE_INTERVAL_S * 1e9)
            for delivery in self.transport.poll():
                if not isinstance(delivery, Received):
                    continue
                message = delivery.message
                if (
                    isinstance(message, KvResponse)
                    and message.request_id in sent
                    and message.ok
                    and message.error is None
                    and node_of(delivery.source) in targets
                ):
                    return self.clock.monotonic_ns(), message
            self._wait(next_probe_ns)

    def status_all(self, timeout_s: float) -> dict[int, NodeStatus | None]:
        """Each worker's view of itself; None for one that did not answer in time."""
        nodes = self.nodes
        request_id = next(self.request_ids)
        asked = {node for node in nodes if self._send(node, StatusRequest(request_id))}
        answers: dict[int, NodeStatus | None] = dict.fromkeys(nodes)
        deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        while asked and self.clock.monotonic_ns() < deadline_ns:
            for delivery in self.transport.poll():
                message = delivery.message if isinstance(delivery, Received) else None
                if isinstance(message, StatusResponse) and message.request_id == request_id:
                    node = node_of(delivery.source)
                    answers[node] = message.status
                    asked.discard(node)
            if asked:
                self._wait(deadline_ns)
        return answers

    def _send(self, node: int, message: msgspec.Struct) -> bool:
        try:
            self.transport.send(raft_id(node), message)
        except TransportError:  # that worker is not reading (yet): skip it this time
            return False
        return True

    def _probe(self, targets: list[int]) -> list[int]:
        request_ids: list[int] = []
        for node in targets:
            request_id = next(self.request_ids)
            request = KvRequest(
                request_id=request_id,
                op=KvOp.PUT,
                key=f"failover-{request_id % 64}",
                value=self.value,
            )
            if self._send(node, request):
                request_ids.append(request_id)
        return request_ids

    def _wait(self, until_ns: int) -> None:
        wait_ns = max(0, until_ns - self.clock.monotonic_ns())
        transport_ns = self.transport.next_timeout_ns()
        if transport_ns is not None:
            wait_ns = min(wait_ns, transport_ns)
        self.selector.select(wait_ns / 1e9)


class FailoverRun:
    """Rounds of kills against the cluster in `run`, asked and probed through `session`;
    see the module docstring."""

    def __init__(self, run: RunDir, session: Session) -> None:
        self.run = run
        self.session = session
        self.clock = session.clock
        self.nodes = session.nodes
        self.restarts_seen: dict[int, deque[int]] = {node: deque() for node in self.nodes}
        self.figures = FailoverFigures()

    def rounds(self, kills: int) -> FailoverFigures:
        for _ in range(kills):
            self._round()
        return self.figures

    def _round(self) -> None:
        leader, pid = self._leader()
        while self._pace(leader):  # each wait forgets one restart: a bounded loop
            leader, pid = self._leader()
        survivors = [node for node in self.nodes if node != leader]
        began_ns = self.clock.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        acked_ns, response = self.session.first_ack(survivors, FAILOVER_S_MAX)
        self.figures.failover_ns.append(acked_ns - began_ns)
        self.figures.killed.append((leader, pid))
        self._wait_restarted(leader, pid)
        self._wait_whole(leader, response.index)
        self.figures.recovery_ns.append(self.clock.monotonic_ns() - began_ns)

    def _leader(self) -> tuple[int, int]:
        """The leader and its pid, verified against cluster.json (ours, same process)."""
        deadline_ns = self.clock.monotonic_ns() + int(LEADER_S_MAX * 1e9)
        while self.clock.monotonic_ns() < deadline_ns:
            found = self.session.leader(STATUS_TIMEOUT_S)
            info = self.run.read_cluster()
            if found is not None and info is not None:
                leader, status = found
                node = info.nodes[leader]
                assert node.id == leader, (node, leader)
                if status.pid == node.pid and our_process(node.pid, node.create_time):
                    return leader, status.pid
            time.sleep(POLL_S)
        raise FailoverError(f"no leader with a verified pid within {LEADER_S_MAX} s")

    def _pace(self, node: int) -> bool:
        """Wait until killing `node` cannot look like a crash loop; True if it waited."""
        seen = self.restarts_seen[node]
        window_ns = int(PACING_S_MAX * 1e9)
        now = self.clock.monotonic_ns()
        while seen and seen[0] < now - window_ns:
            seen.popleft()
        if len(seen) < CRASH_LOOP_RESTARTS_MAX:
            return False
        wait_ns = seen[0] + window_ns - now
        assert 0 < wait_ns <= window_ns, wait_ns
        time.sleep(wait_ns / 1e9)
        self.figures.paced_ns += wait_ns
        seen.popleft()
        return True

    def _wait_restarted(self, node: int, old_pid: int) -> None:
        deadline_ns = self.clock.monotonic_ns() + int(RESTART_S_MAX * 1e9)
        while self.clock.monotonic_ns() < deadline_ns:
            info = self.run.read_cluster()
            entry = info.nodes[node] if info is not None else None
            if entry is not None and entry.state == "crash_loop":
                raise FailoverError(f"the supervisor marked node {node} crash-looping")
            if entry is not None and entry.pid not in (None, old_pid) and entry.state == "running":
                self.restarts_seen[node].append(self.clock.monotonic_ns())
                return
            time.sleep(POLL_S)
        raise FailoverError(f"node {node} was not restarted within {RESTART_S_MAX} s")

    def _wait_whole(self, restarted: int, index: int) -> None:
        deadline_ns = self.clock.monotonic_ns() + int(HEALTHY_S_MAX * 1e9)
        while self.clock.monotonic_ns() < deadline_ns:
            statuses = self.session.status_all(STATUS_TIMEOUT_S)
            status = statuses.get(restarted)
            if (
                all(value is not None for value in statuses.values())
                and leader_of(statuses) is not None
                and status is not None
                and status.applied_index >= index
            ):
                return
            time.sleep(POLL_S)
        raise FailoverError(
            f"node {restarted} did not rejoin and catch up within {HEALTHY_S_MAX} s"
        )
