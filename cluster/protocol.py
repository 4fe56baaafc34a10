"""What clients (the CLI, the Python API) and workers say to each other over ipc/.

Every request carries a `request_id` unique per client and the client's `reply_address`
(TCP only: where the worker dials back; None on the local transport, where the client's
node id is enough). Every response echoes the `request_id`. A worker that cannot serve a
request says why in `error` and, when it knows one, where the leader is (`leader_hint`),
so the client retries there. Writes carry (client_id, request_id) into the log, so a
retried write is applied once.

Node numbering: users see nodes 0..N-1 (`dcluster chaos kill 2`); Raft and the transport
use `raft_id(node) = node + 1` because 0 means "nobody" in raft/. Client ids live above
`CLIENT_ID_MIN`, so they never collide with a worker.
"""

from __future__ import annotations

import enum

import msgspec

CLIENT_ID_MIN = 1 << 20
CLIENT_ID_MAX = (1 << 32) - 1
NODES_MAX = 1024
KEY_BYTES_MAX = 1024
VALUE_BYTES_MAX = 1024 * 1024


def raft_id(node: int) -> int:
    assert 0 <= node < NODES_MAX, node
    return node + 1


def node_of(raft_node_id: int) -> int:
    assert 1 <= raft_node_id <= NODES_MAX, raft_node_id
    return raft_node_id - 1


Address = tuple[str, int]


class KvOp(enum.IntEnum):
    PUT = 0
    GET = 1
    CAS = 2
    DELETE = 3


class KvRequest(msgspec.Struct, frozen=True):
    request_id: int
    op: KvOp
    key: str
    value: bytes | None = None
    expected: bytes | None = None
    """CAS only: the value the key must hold (None: the key must be absent)."""
    stale: bool = False
    """GET only: answer from this node's applied state, with no ReadIndex round."""
    reply_address: Address | None = None


class KvResponse(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    """PUT/DELETE: applied. GET: answered. CAS: applied (False: the value did not match)."""
    value: bytes | None = None
    found: bool = False
    index: int = 0
    """The log index the answer reflects."""
    error: str | None = None
    """Set when the request was not served; `ok` and `value` mean nothing then."""
    leader_hint: int | None = None
    """A node number (0-based) to retry at, when the error is 'not leader'."""
    retryable: bool = False


class KvCommand(msgspec.Struct, frozen=True, array_like=True):
    """One write as it travels through the log."""

    client_id: int
    request_id: int
    op: KvOp
    key: str
    value: bytes | None = None
    expected: bytes | None = None


class StatusRequest(msgspec.Struct, frozen=True):
    request_id: int
    reply_address: Address | None = None


class PartitionInfo(msgspec.Struct, frozen=True, array_like=True):
    """One partition a worker holds, as its status reports it."""

    table: str
    partition: int
    rows: int
    bytes: int
    primary: bool


class NodeStatus(msgspec.Struct, frozen=True):
    """One worker's view of itself. The CLI adds what the supervisor knows (host, core,
    restarts) and what psutil sees (cpu_percent, rss_bytes)."""

    id: int
    role: str
    """leader / follower / candidate / learner (pre-candidates report as candidate)."""
    term: int
    leader: int | None
    commit_index: int
    applied_index: int
    last_heartbeat_ms: int | None
    """Milliseconds since this node last heard from a leader (0 on the leader itself)."""
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    pid: int = 0
    incarnation: int = 0
    transport: str = ""
    fsync: bool = True
    clock_skew_ms: int = 0
    faults: tuple[tuple[int, int], ...] = ()
    """Blocked links (source node, target node), 0-based."""
    address: Address | None = None
    """TCP: where this worker's transport listens (the port it bound, if it asked for 0)."""
    partitions: tuple[PartitionInfo, ...] = ()
    """The partitions this worker holds, with rows and bytes as last counted."""
    store_applied_index: int = 0
    """The last log index the partition store has applied."""


class StatusResponse(msgspec.Struct, frozen=True):
    request_id: int
    status: NodeStatus


class ChaosAction(enum.IntEnum):
    PARTITION = 0
    HEAL = 1
    SKEW = 2
    HANG = 3
    """Stop the loop (no heartbeat, no serving) for `hang_ms`; tests of hang detection."""


class ChaosRequest(msgspec.Struct, frozen=True):
    request_id: int
    action: ChaosAction
    groups: tuple[tuple[int, ...], ...] = ()
    """PARTITION: node numbers on each side; every link between sides is cut."""
    skew_ms: int = 0
    reply_address: Address | None = None
    hang_ms: int = 0


class ChaosResponse(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    detail: str = ""


class MembershipOp(enum.IntEnum):
    ADD_LEARNER = 0
    """Add `node` as a learner; `address` is where its transport listens (TCP)."""
    PROMOTE = 1
    """Make learner `node` a voter (refused, retryably, while it lags the leader)."""
    REMOVE = 2


class MembershipRequest(msgspec.Struct, frozen=True):
    """One membership change, served by the leader (others answer 'not leader')."""

    request_id: int
    op: MembershipOp
    node: int
    """A node number, 0-based."""
    address: Address | None = None
    reply_address: Address | None = None


class MembershipResponse(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    """The change is committed and applied on the leader."""
    index: int = 0
    error: str | None = None
    leader_hint: int | None = None
    retryable: bool = False


CLIENT_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "client.kv": KvRequest,
    "client.kv_response": KvResponse,
    "client.status": StatusRequest,
    "client.status_response": StatusResponse,
    "client.chaos": ChaosRequest,
    "client.chaos_response": ChaosResponse,
    "client.membership": MembershipRequest,
    "client.membership_response": MembershipResponse,
}
"""Registered on every worker's and client's transport (with raft.Message as 'raft')."""
