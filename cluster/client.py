"""A client session of one cluster: the Python API behind `dcluster kv|status|chaos`.

`Client(name_or_run_dir)` reads the cluster's `cluster.json`, opens a transport of the
cluster's kind (a local queue, or a TCP listener the workers dial back to) under a client
id of its own (>= CLIENT_ID_MIN, from the pid and a random number), and sends requests
from cluster/protocol.py. A write is sent with one request id however often it is
retried, so the cluster applies it once; a refusal that names a leader is retried there
at once, any other failure at the next node after a jittered backoff, within
`ATTEMPTS_MAX` attempts and `OPERATION_TIMEOUT_MS`.

Invariant: a Client owns exactly one transport and closes it (withdrawing and removing
its queue) on `close()` or leaving its `with` block, whatever happened.
"""

from __future__ import annotations

import itertools
import os
import random
import selectors
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from clock import SystemClock
from cluster.protocol import (
    CLIENT_ID_MAX,
    CLIENT_ID_MIN,
    CLIENT_MESSAGES,
    KEY_BYTES_MAX,
    VALUE_BYTES_MAX,
    Address,
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
    node_of,
    raft_id,
)
from cluster.rundir import ClusterInfo, RunDir, default_data_dir
from cluster.sql_protocol import SQL_MESSAGES

CLIENT_QUEUES_PER_HOST_EXPECTED = 24
"""Sizes the client's queue so it fits the mq budget beside two clusters' workers."""
REQUEST_TIMEOUT_MS = 1_000
"""How long one attempt waits for its answer before trying the next node."""
OPERATION_TIMEOUT_MS = 15_000
ATTEMPTS_MAX = 30
RETRY_BACKOFF_MS_BASE = 20
RETRY_BACKOFF_MS_CAP = 500
STATUS_TIMEOUT_MS = 1_000
"""A worker that has not answered a status or chaos request by then counts as down."""
CLIENT_ID_ATTEMPTS_MAX = 20
HOST_LIMIT_WAIT_MS = 3_000
CLIENT_QUEUE_MESSAGES_MAX = 8
CLIENT_QUEUE_MESSAGE_BYTES_MAX = 2048
"""A client's queue holds answers only, and small: larger frames travel through shm."""
CLIENT_ID_RANDOM_VALUES = 1024
NS_PER_MS = 1_000_000
LOCAL_HOST = "127.0.0.1"
ADDRESS_KEY_PREFIX = "dcluster/address/"
"""The address book: where each member of a tcp cluster listens, as "host:port" values
in the key-value store (written by every tcp `up`), so any host can reach every member."""


class ClientError(Exception):
    """A request could not be served."""


class ClusterNotFound(ClientError):
    """There is no cluster.json where the cluster should be."""


class ClusterUnavailable(ClientError):
    """No worker answered (or none could serve) within the bounds."""


class RequestRefused(ClientError):
    """A worker refused the request for a reason retrying will not fix."""


def address_key(node: int) -> str:
    """The key under which the cluster's address book keeps where `node` listens."""
    return f"{ADDRESS_KEY_PREFIX}{node}"


def resolve_run_dir(target: str | Path, data_dir: Path | None = None) -> RunDir:
    """The run directory of the cluster named `target` (a str), or at `target` (a Path);
    `data_dir`, when given, wins."""
    if data_dir is not None:
        return RunDir(Path(data_dir).expanduser().resolve())
    if isinstance(target, Path):
        return RunDir(target.expanduser().resolve())
    return RunDir(default_data_dir(target).expanduser().resolve())


def choose_client_id(pid: int, rng: random.Random) -> int:
    span = CLIENT_ID_MAX - CLIENT_ID_MIN + 1
    value = pid * CLIENT_ID_RANDOM_VALUES + rng.randrange(CLIENT_ID_RANDOM_VALUES)
    return CLIENT_ID_MIN + value % span


class Client:
    """A session with one cluster: `Client("name")` (its default run directory),
    `Client(Path(run_dir))`, or `Client("name", data_dir=...)`. Use as a context manager,
    or call `close()`."""

    def __init__(
        self,
        target: str | Path,
        *,
        data_dir: Path | None = None,
        rng: random.Random | None = None,
        cluster: ClusterInfo | None = None,
        secret: bytes | None = None,
    ) -> None:
        """`cluster` and `secret` (tools that reach a cluster this host has no run
        directory for, such as `up --join`) replace what the run directory holds."""
        self.run = resolve_run_dir(target, data_dir)
        cluster = cluster or self.run.read_cluster()
        if cluster is None:
            raise ClusterNotFound(f"no cluster at {self.run.path} (run `dcluster up` first)")
        self.cluster: ClusterInfo = cluster
        self._secret = secret
        self.nodes = sorted({node.id for node in cluster.nodes} | set(cluster.peers))
        """Every node this client may send to: this host's and (TCP) other hosts'."""
        self.addresses: dict[int, Address] = dict(cluster.peers)
        self.addresses.update((n.id, n.address) for n in cluster.nodes if n.address is not None)
        """TCP: where each node in `nodes` listens."""
        self._clock = SystemClock()
        self._rng = rng or random.Random()
        # Request ids grow across sessions too: a later client that happens to get the
        # same client id must never look like a retry of an earlier one (the state
        # machine's dedupe window is per client id). Wall-clock nanoseconds do that.
        self._request_ids = itertools.count(self._clock.wall_ns())
        self._leader: int | None = None
        self._transport: Any = None
        self._transport = self._open_transport()
        self._reply_address: Address | None = getattr(self._transport, "address", None)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._transport.fileno(), selectors.EVENT_READ)

    # ---- lifetime ----

    def _open_transport(self) -> Any:
        """A transport under a fresh client id. An id a live client holds is skipped; a
        host out of queue budget (other clients closing any moment) is waited for, up to
        HOST_LIMIT_WAIT_MS."""
        from ipc.errors import HostLimitError, TransportError

        deadline_ns = self._clock.monotonic_ns() + HOST_LIMIT_WAIT_MS * NS_PER_MS
        error: Exception | None = None
        for attempt in range(CLIENT_ID_ATTEMPTS_MAX):
            self.client_id = choose_client_id(os.getpid(), self._rng)
            try:
                return self._transport_for(self.client_id)
            except HostLimitError as refused:
                if self._clock.monotonic_ns() >= deadline_ns:
                    raise ClientError(str(refused)) from refused
                error = refused
                time.sleep(_backoff_ms(attempt, self._rng) / 1000)
            except TransportError as refused:  # that id is taken by a live client
                error = refused
        raise ClientError(f"could not open a client transport: {error}")

    def _transport_for(self, client_id: int) -> Any:
        cluster = self.cluster
        if cluster.transport == "tcp":
            from ipc.tcp import TcpTransport

            peers = {raft_id(n.id): n.address for n in cluster.nodes if n.address is not None}
            bind_host = cluster.bind[0] if cluster.bind is not None else LOCAL_HOST
            host = next(iter(peers.values()))[0] if peers else bind_host
            peers.update({raft_id(node): address for node, address in cluster.peers.items()})
            return TcpTransport(
                cluster.name,
                client_id,
                self._secret or self.run.read_secret(),
                self._clock,
                self._rng,
                bind=(host, 0),
                peers=peers,
                messages={**CLIENT_MESSAGES, **SQL_MESSAGES},
            )
        from ipc.local import LocalOptions, LocalTransport

        return LocalTransport(
            cluster.name,
            client_id,
            self.run.path,
            self._clock,
            incarnation=1,
            options=LocalOptions(
                queue_messages_max=CLIENT_QUEUE_MESSAGES_MAX,
                queue_messages_min=2,
                queue_message_bytes_max=CLIENT_QUEUE_MESSAGE_BYTES_MAX,
                queue_message_bytes_min=1024,
                queues_per_host_expected=CLIENT_QUEUES_PER_HOST_EXPECTED,
            ),
            messages={**CLIENT_MESSAGES, **SQL_MESSAGES},
        )

    def close(self) -> None:
        if self._transport is None:
            return
        try:
            self._selector.close()
        finally:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- key-value ----

    def put(self, key: str, value: bytes | str) -> int:
        """Store `value` under `key`; returns the log index it was applied at."""
        response = self._kv(KvOp.PUT, key, value=_bytes(value))
        return response.index

    def get(self, key: str, *, stale: bool = False) -> bytes | None:
        """The value of `key` (None: absent). Linearizable unless `stale`."""
        response = self._kv(KvOp.GET, key, stale=stale)
        return response.value if response.found else None

    def cas(self, key: str, expected: bytes | str | None, new: bytes | str) -> bool:
        """Set `key` to `new` if it holds `expected` (None: if absent). True if it did."""
        expected_bytes = None if expected is None else _bytes(expected)
        response = self._kv(KvOp.CAS, key, value=_bytes(new), expected=expected_bytes)
        return response.ok

    def delete(self, key: str) -> bool:
        """Remove `key`; True if it was there."""
        return self._kv(KvOp.DELETE, key).found

    def _kv(
        self,
        op: KvOp,
        key: str,
        *,
        value: bytes | None = None,
        expected: bytes | None = None,
        stale: bool = False,
    ) -> KvResponse:
        if not key or len(key.encode()) > KEY_BYTES_MAX:
            raise ValueError(f"a key is 1 to {KEY_BYTES_MAX} bytes")
        for data in (value, expected):
            if data is not None and len(data) > VALUE_BYTES_MAX:
                raise ValueError(f"a value is at most {VALUE_BYTES_MAX} bytes")
        request = KvRequest(
            request_id=next(self._request_ids),
            op=op,
            key=key,
            value=value,
            expected=expected,
            stale=stale,
            reply_address=self._reply_address,
        )
        response = self._until_served(request)
        assert isinstance(response, KvResponse)
        return response

    # ---- membership ----

    def add_learner(self, node: int, address: Address | None = None) -> int:
        """Add `node` as a learner (TCP: listening at `address`); the change's log index."""
        return self._membership(MembershipOp.ADD_LEARNER, node, address)

    def promote(self, node: int) -> int:
        """Make learner `node` a voter (retried while it is still catching up)."""
        return self._membership(MembershipOp.PROMOTE, node, None)

    def _membership(self, op: MembershipOp, node: int, address: Address | None) -> int:
        request = MembershipRequest(
            request_id=next(self._request_ids),
            op=op,
            node=node,
            address=address,
            reply_address=self._reply_address,
        )
        response = self._until_served(request, MembershipResponse)
        assert isinstance(response, MembershipResponse)
        return response.index

    # ---- one request until some node serves it ----

    def _until_served(
        self, request: msgspec.Struct, response_type: type[msgspec.Struct] = KvResponse
    ) -> Any:
        """Send `request` until a node answers it without error, following leader hints
        at once and moving to the next node (after a backoff) on anything else."""
        deadline_ns = self._clock.monotonic_ns() + OPERATION_TIMEOUT_MS * NS_PER_MS
        stale = getattr(request, "stale", False)
        target = self._leader if self._leader is not None else self.nodes[0]
        last_error = "no answer"
        for attempt in range(ATTEMPTS_MAX):
            remaining_ms = (deadline_ns - self._clock.monotonic_ns()) // NS_PER_MS
            if remaining_ms <= 0:
                break
            timeout_ms = min(REQUEST_TIMEOUT_MS, remaining_ms)
            answer: Any = self._exchange(target, request, response_type, timeout_ms)
            if answer is not None and answer.error is None:
                if not stale:
                    self._leader = target
                return answer
            if answer is not None and not answer.retryable and answer.leader_hint is None:
                raise RequestRefused(f"node {target}: {answer.error}")
            last_error = f"node {target}: {answer.error if answer else 'no answer'}"
            hint = answer.leader_hint if answer is not None else None
            if hint is not None and hint != target and not stale and self.learn(hint):
                target = hint
                continue
            if answer is None or hint is None:
                self._leader = None
                target = self.nodes[(self.nodes.index(target) + 1) % len(self.nodes)]
            time.sleep(_backoff_ms(attempt, self._rng) / 1000)
        raise ClusterUnavailable(
            f"cluster {self.cluster.name} did not serve the request within "
            f"{OPERATION_TIMEOUT_MS} ms ({last_error})"
        )

    def _exchange(
        self,
        node: int,
        request: msgspec.Struct,
        response_type: type[msgspec.Struct],
        timeout_ms: int,
    ) -> msgspec.Struct | None:
        """Send `request` to `node` and wait up to `timeout_ms` for its answer (from any
        node: an earlier attempt's late answer carries the same request id)."""
        if not self._send(node, request):
            return None
        request_id = getattr(request, "request_id")  # noqa: B009 (every request has one)
        found: list[msgspec.Struct] = []

        def take(source: int, message: Any) -> bool:
            if isinstance(message, response_type) and message_id(message) == request_id:
                found.append(message)
                return True
            return False

        self._receive(take, timeout_ms)
        return found[0] if found else None

    # ---- status and chaos: one request to each of several workers ----

    def status_all(self, timeout_ms: int = STATUS_TIMEOUT_MS) -> dict[int, NodeStatus | None]:
        """Each worker's view of itself; None for one that did not answer in time. On
        TCP, members on other hosts that this client did not know are looked up in the
        address book and asked too."""
        statuses = self._status_round(self.nodes, timeout_ms)
        if self.cluster.transport == "tcp":
            members: set[int] = set()
            for status in statuses.values():
                if status is not None:
                    members.update(status.voters, status.learners)
            learned = [node for node in sorted(members - set(statuses)) if self.learn(node)]
            if learned:
                statuses.update(self._status_round(learned, timeout_ms))
        return dict(sorted(statuses.items()))

    def _status_round(self, nodes: list[int], timeout_ms: int) -> dict[int, NodeStatus | None]:
        request_id = next(self._request_ids)
        answers = self._broadcast(
            nodes,
            StatusRequest(request_id=request_id, reply_address=self._reply_address),
            StatusResponse,
            timeout_ms,
        )
        return {node: _status(answers.get(node)) for node in nodes}

    # ---- the address book (TCP) ----

    def learn(self, node: int) -> bool:
        """Make `node` reachable: known already, or (TCP) found in the address book by a
        stale read of a node we know. False if it cannot be found."""
        if node in self.nodes:
            return True
        if self.cluster.transport != "tcp":
            return False
        try:
            value = self.get(address_key(node), stale=True)
        except ClientError:
            return False
        if value is None:
            return False
        host, _, port = value.decode().rpartition(":")
        self.add_peer(node, (host, int(port)))
        return True

    def add_peer(self, node: int, address: Address) -> None:
        """TCP: reach `node` at `address` from now on."""
        self._transport.set_peer(raft_id(node), address)
        self.addresses[node] = address
        if node not in self.nodes:
            self.nodes = sorted([*self.nodes, node])

    def chaos(
        self,
        action: ChaosAction,
        nodes: Iterable[int] | None = None,
        *,
        groups: tuple[tuple[int, ...], ...] = (),
        skew_ms: int = 0,
        hang_ms: int = 0,
        timeout_ms: int = STATUS_TIMEOUT_MS,
    ) -> dict[int, ChaosResponse | None]:
        """Send one chaos request to `nodes` (default: every worker); each one's answer,
        None where none came in time."""
        if nodes is None and self.cluster.transport == "tcp":
            self.status_all(timeout_ms)  # learns members on other hosts
        targets = list(self.nodes if nodes is None else nodes)
        request = ChaosRequest(
            request_id=next(self._request_ids),
            action=action,
            groups=groups,
            skew_ms=skew_ms,
            hang_ms=hang_ms,
            reply_address=self._reply_address,
        )
        answers = self._broadcast(targets, request, ChaosResponse, timeout_ms)
        return {node: _chaos(answers.get(node)) for node in targets}

    def leader(self, timeout_ms: int = STATUS_TIMEOUT_MS) -> int | None:
        """The node that says it leads in the highest term any worker reports, if any."""
        return leader_of(self.status_all(timeout_ms))

    def _broadcast(
        self,
        nodes: list[int],
        request: msgspec.Struct,
        response_type: type[msgspec.Struct],
        timeout_ms: int,
    ) -> dict[int, msgspec.Struct]:
        request_id = getattr(request, "request_id")  # noqa: B009 (every request has one)
        waiting = {node for node in nodes if self._send(node, request)}
        answers: dict[int, msgspec.Struct] = {}

        def take(source: int, message: Any) -> bool:
            if not isinstance(message, response_type):
                return False
            if message_id(message) != request_id:
                return False
            node = node_of(source)
            if node in waiting:
                waiting.discard(node)
                answers[node] = message
            return not waiting

        if waiting:
            self._receive(take, timeout_ms)
        return answers

    # ---- the transport ----

    def _send(self, node: int, message: msgspec.Struct) -> bool:
        from ipc.errors import TransportError

        try:
            self._transport.send(raft_id(node), message)
        except TransportError:  # backpressure: that worker is not reading its queue
            return False
        return True

    def _receive(self, take: Callable[[int, Any], bool], timeout_ms: int) -> None:
        """Poll until `take` says it has all it wanted or `timeout_ms` passes."""
        from ipc.transport import Received

        assert self._transport is not None, "the client is closed"
        deadline_ns = self._clock.monotonic_ns() + timeout_ms * NS_PER_MS
        while True:
            for delivery in self._transport.poll():
                if isinstance(delivery, Received) and take(delivery.source, delivery.message):
                    return
            now = self._clock.monotonic_ns()
            if now >= deadline_ns:
                return
            wait_ns = deadline_ns - now
            transport_ns = self._transport.next_timeout_ns()
            if transport_ns is not None:
                wait_ns = min(wait_ns, transport_ns)
            self._selector.select(wait_ns / 1e9)


def leader_of(statuses: dict[int, NodeStatus | None]) -> int | None:
    """The node reporting itself leader in the highest term reported, or None."""
    answered = [status for status in statuses.values() if status is not None]
    if not answered:
        return None
    term = max(status.term for status in answered)
    leaders = [node for node, s in statuses.items() if s and s.role == "leader" and s.term == term]
    return leaders[0] if len(leaders) == 1 else None


def _backoff_ms(attempt: int, rng: random.Random) -> float:
    ceiling = min(RETRY_BACKOFF_MS_CAP, RETRY_BACKOFF_MS_BASE * (1 << min(attempt, 20)))
    return rng.uniform(0, ceiling)


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _status(response: msgspec.Struct | None) -> NodeStatus | None:
    return response.status if isinstance(response, StatusResponse) else None


def _chaos(response: msgspec.Struct | None) -> ChaosResponse | None:
    return response if isinstance(response, ChaosResponse) else None


def message_id(message: msgspec.Struct) -> int | None:
    """The request id a request or response carries."""
    return getattr(message, "request_id", None)
