"""Client requests at one worker: what each client waits for, and when it is answered.

Writes (PUT, CAS, DELETE) and membership changes are proposed by the leader alone and
answered when the entry at the proposed index is applied here: if that entry is ours (same
term), with its result; if another leader's entry took the index, with a retryable error
(ours was cut from the log and can never commit; the client's retry is applied once, by
the state machine's per-client results). Linearizable GETs go through ReadIndex on the
leader and are answered once this node has applied the read's index; stale GETs are
answered at once from local state, on any node. Followers answer writes and strong reads
with 'not leader' and where the leader is.

Invariant: no write is answered before its entry is applied (so it is committed and
durable on a quorum); every pending request is answered exactly once — by its apply, by a
read point, by a refusal, by its deadline, or when the worker stops.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from clock import Clock
from cluster.kv import KvResult, encode_address, encode_command
from cluster.protocol import (
    KEY_BYTES_MAX,
    NODES_MAX,
    VALUE_BYTES_MAX,
    Address,
    ChaosRequest,
    ChaosResponse,
    KvCommand,
    KvOp,
    KvRequest,
    KvResponse,
    MembershipOp,
    MembershipRequest,
    MembershipResponse,
    StatusRequest,
    node_of,
    raft_id,
)
from cluster.sql_machine import StoreWork
from cluster.sql_protocol import (
    CommandKind,
    SqlRequest,
    SqlResponse,
    decode_command,
    entry_data,
)
from cluster.state import ClusterState
from ipc.errors import TransportError
from ipc.transport import Transport
from raft import (
    NO_NODE,
    ConfChange,
    ConfChangeKind,
    Entry,
    ProposalRefused,
    ProposalTooLarge,
    RaftNode,
    ReadState,
    Role,
)

REQUESTS_PENDING_MAX = 4096
"""Writes and reads waiting for the log at once; beyond it a request is answered 'busy'."""
REQUEST_TIMEOUT_MS = 5_000
"""A request not answered by then gets a retryable 'timed out' (outcome unknown)."""
REPLY_PEERS_MAX = 1024
"""TCP: client reply addresses remembered; the least recently used is forgotten first."""
PROMOTE_LAG_ENTRIES_MAX = 1_000
"""A learner further behind the leader's log than this is not promoted yet."""

NOT_LEADER = "not leader"
BUSY = "busy: too many requests pending"
SUPERSEDED = "not applied: another leader's entry took its place; retry"
UNKNOWN_OUTCOME = "outcome unknown: the entry was covered by an installed snapshot; retry"
TIMED_OUT = "timed out; outcome unknown; retry"
STOPPING = "worker stopping; retry elsewhere"

Response = KvResponse | MembershipResponse | SqlResponse
KV, MEMBERSHIP, SQL = "kv", "membership", "sql"


@dataclass(slots=True)
class _Write:
    source: int
    request_id: int
    term: int
    deadline_ns: int
    kind: str
    """KV, MEMBERSHIP or SQL: which response answers it."""


@dataclass(slots=True)
class _Read:
    source: int
    request: KvRequest
    deadline_ns: int
    index: int = 0
    """The read point, once the leader confirmed it (0 until then)."""


@dataclass
class RequestStats:
    requests: int = 0
    writes_proposed: int = 0
    reads_linearizable: int = 0
    reads_stale: int = 0
    barriers: int = 0
    redirected: int = 0
    refused: int = 0
    timed_out: int = 0
    replies_dropped: int = 0


class Requests:
    """The pending tables and the answers. The loop calls the `on_*` methods in the Ready
    order: requests as they arrive, applied entries, read states, then `serve_reads`."""

    def __init__(
        self,
        raft: RaftNode,
        transport: Transport,
        clock: Clock,
        machine: Callable[[], ClusterState],
        set_peer: Callable[[int, Address], None] | None,
    ) -> None:
        self._raft = raft
        self._transport = transport
        self._clock = clock
        self._machine = machine
        self._set_peer = set_peer
        self._timeout_ns = REQUEST_TIMEOUT_MS * 1_000_000
        self._writes: dict[int, _Write] = {}
        """Log index -> the write proposed there, in proposal order."""
        self._reads: dict[int, _Read] = {}
        """ReadIndex sequence number -> the read, in request order."""
        self._read_sequence = itertools.count(1)
        self._reply_peers: dict[int, Address] = {}
        self.stats = RequestStats()

    @property
    def pending(self) -> int:
        return len(self._writes) + len(self._reads)

    # ---- arrivals ----

    def on_request(self, source: int, message: msgspec.Struct) -> bool:
        """Handle one client message; False if it is not a request this worker serves
        (status and chaos are the loop's: it answers them with `reply`)."""
        if isinstance(message, KvRequest):
            self.stats.requests += 1
            self._remember_reply_address(source, message.reply_address)
            self._on_kv(source, message)
            return True
        if isinstance(message, MembershipRequest):
            self.stats.requests += 1
            self._remember_reply_address(source, message.reply_address)
            self._on_membership(source, message)
            return True
        if isinstance(message, SqlRequest):
            self.stats.requests += 1
            self._remember_reply_address(source, message.reply_address)
            self._on_sql(source, message)
            return True
        if isinstance(message, (StatusRequest, ChaosRequest)):
            self._remember_reply_address(source, message.reply_address)
        return False

    def _on_kv(self, source: int, request: KvRequest) -> None:
        refusal = _invalid(request)
        if refusal is not None:
            self.stats.refused += 1
            self.reply(source, _kv_error(request.request_id, refusal, retryable=False))
        elif request.op == KvOp.GET and request.stale:
            self.stats.reads_stale += 1
            self._answer_get(source, request)
        elif self._raft.role != Role.LEADER:
            self.stats.redirected += 1
            self.reply(source, self._not_leader(request.request_id))
        elif self.pending >= REQUESTS_PENDING_MAX:
            self.stats.refused += 1
            self.reply(source, _kv_error(request.request_id, BUSY, retryable=True))
        elif request.op == KvOp.GET:
            self._start_read(source, request)
        else:
            command = KvCommand(
                client_id=source,
                request_id=request.request_id,
                op=request.op,
                key=request.key,
                value=request.value,
                expected=request.expected,
            )
            self._propose(source, request.request_id, encode_command(command), None)

    def _on_membership(self, source: int, request: MembershipRequest) -> None:
        raft = self._raft
        if raft.role != Role.LEADER:
            self.stats.redirected += 1
            self.reply(source, self._membership_error(request.request_id, NOT_LEADER, True))
            return
        if self.pending >= REQUESTS_PENDING_MAX:
            self.reply(source, self._membership_error(request.request_id, BUSY, True))
            return
        if not 0 <= request.node < NODES_MAX:
            why = f"node numbers are 0..{NODES_MAX - 1}"
            self.reply(source, self._membership_error(request.request_id, why, False))
            return
        node = raft_id(request.node)
        if request.op == MembershipOp.PROMOTE:
            progress = raft.progress.get(node)
            if progress is None or raft.last_index - progress.match > PROMOTE_LAG_ENTRIES_MAX:
                why = f"node {request.node} is not a caught-up learner yet"
                self.reply(source, self._membership_error(request.request_id, why, True))
                return
        kind = {
            MembershipOp.ADD_LEARNER: ConfChangeKind.ADD_LEARNER,
            MembershipOp.PROMOTE: ConfChangeKind.ADD_VOTER,
            MembershipOp.REMOVE: ConfChangeKind.REMOVE,
        }[request.op]
        context = encode_address(request.address) if request.address is not None else b""
        change = ConfChange(kind=kind, node=node, context=context)
        self._propose(source, request.request_id, None, change)

    def _on_sql(self, source: int, request: SqlRequest) -> None:
        """Append a client's SQL command; answered when applied here. The command must be
        stamped with the sender's own id (the per-client results are keyed by it)."""
        try:
            command = decode_command(request.command)
        except msgspec.DecodeError as error:
            self.stats.refused += 1
            self.reply(source, SqlResponse(request.request_id, False, error=f"malformed: {error}"))
            return
        if command.client_id != source or command.request_id != request.request_id:
            self.stats.refused += 1
            why = "the command's client and request ids must be the sender's"
            self.reply(source, SqlResponse(request.request_id, False, error=why))
            return
        if self._raft.role != Role.LEADER:
            self.stats.redirected += 1
            self.reply(source, self._error(request.request_id, NOT_LEADER, True, SQL))
        elif self.pending >= REQUESTS_PENDING_MAX:
            self.stats.refused += 1
            self.reply(source, self._error(request.request_id, BUSY, True, SQL))
        else:
            if command.kind == CommandKind.BARRIER:
                self.stats.barriers += 1
            self._propose(source, request.request_id, entry_data(request.command), None, SQL)

    def _propose(
        self,
        source: int,
        request_id: int,
        data: bytes | None,
        change: ConfChange | None,
        kind: str = KV,
    ) -> None:
        if change is not None:
            kind = MEMBERSHIP
        try:
            if change is not None:
                index, term = self._raft.propose_conf_change(change)
            else:
                assert data is not None
                index, term = self._raft.propose(data)
        except ProposalRefused as refusal:
            self.stats.refused += 1
            retryable = not isinstance(refusal, ProposalTooLarge)
            error = self._error(request_id, str(refusal), retryable, kind)
            self.reply(source, error)
            return
        self.stats.writes_proposed += 1
        superseded = self._writes.pop(index, None)
        if superseded is not None:  # proposed at this index in an older term: cut off
            self._answer_write(superseded, False, None, index)
        deadline = self._clock.monotonic_ns() + self._timeout_ns
        self._writes[index] = _Write(source, request_id, term, deadline, kind)

    def _start_read(self, source: int, request: KvRequest) -> None:
        sequence = next(self._read_sequence)
        try:
            self._raft.read_index(sequence.to_bytes(8, "little"))
        except ProposalRefused as refusal:
            self.stats.refused += 1
            self.reply(source, _kv_error(request.request_id, str(refusal), retryable=True))
            return
        self.stats.reads_linearizable += 1
        deadline = self._clock.monotonic_ns() + self._timeout_ns
        self._reads[sequence] = _Read(source, request, deadline)

    # ---- the log's answers ----

    def on_applied(self, entry: Entry, result: KvResult | StoreWork | None) -> None:
        """`entry` was applied here: answer the write proposed at its index, if any."""
        if not self._writes:
            return
        write = self._writes.pop(entry.index, None)
        if write is None:
            return
        self._answer_write(write, write.term == entry.term, result, entry.index)

    def on_snapshot_installed(self, index: int) -> None:
        """Entries up to `index` arrived as a snapshot: their writers cannot be told what
        happened (a retry is applied at most once)."""
        for log_index in [i for i in self._writes if i <= index]:
            write = self._writes.pop(log_index)
            error = self._error(write.request_id, UNKNOWN_OUTCOME, True, write.kind)
            self.reply(write.source, error)

    def on_read_states(self, read_states: tuple[ReadState, ...]) -> None:
        for read_state in read_states:
            read = self._reads.get(int.from_bytes(read_state.request_id, "little"))
            if read is not None:
                read.index = read_state.index

    def serve_reads(self) -> None:
        """Answer every read whose point this node has applied."""
        if not self._reads:
            return
        applied = self._machine().applied_index
        done = [seq for seq, read in self._reads.items() if 0 < read.index <= applied]
        for sequence in done:
            read = self._reads.pop(sequence)
            self._answer_get(read.source, read.request)

    def on_role_change(self, role: Role) -> None:
        """No longer leader: reads without a confirmed point never get one here."""
        if role == Role.LEADER:
            return
        unconfirmed = [seq for seq, read in self._reads.items() if read.index == 0]
        for sequence in unconfirmed:
            read = self._reads.pop(sequence)
            self.stats.redirected += 1
            self.reply(read.source, self._not_leader(read.request.request_id))

    def expire(self) -> None:
        """Answer what waited past its deadline (tables are in deadline order)."""
        now = self._clock.monotonic_ns()
        for table in (self._writes, self._reads):
            while table:
                key = next(iter(table))
                waiting = table[key]
                if waiting.deadline_ns > now:
                    break
                del table[key]
                self.stats.timed_out += 1
                if isinstance(waiting, _Write):
                    error = self._error(waiting.request_id, TIMED_OUT, True, waiting.kind)
                    self.reply(waiting.source, error)
                else:
                    self.reply(
                        waiting.source, _kv_error(waiting.request.request_id, TIMED_OUT, True)
                    )

    def refuse_stopping(self, source: int, message: msgspec.Struct) -> None:
        """While stopping, every request is answered 'retry elsewhere'."""
        if isinstance(message, MembershipRequest):
            self.reply(source, self._membership_error(message.request_id, STOPPING, True))
        elif isinstance(message, KvRequest):
            self.reply(source, _kv_error(message.request_id, STOPPING, retryable=True))
        elif isinstance(message, SqlRequest):
            self.reply(source, self._error(message.request_id, STOPPING, True, SQL))
        elif isinstance(message, ChaosRequest):
            self.reply(source, ChaosResponse(message.request_id, ok=False, detail=STOPPING))

    def close(self) -> None:
        """The worker stops: tell everyone still waiting to retry elsewhere."""
        for index, write in list(self._writes.items()):
            del self._writes[index]
            self.reply(write.source, self._error(write.request_id, STOPPING, True, write.kind))
        for sequence, read in list(self._reads.items()):
            del self._reads[sequence]
            self.reply(read.source, _kv_error(read.request.request_id, STOPPING, True))

    # ---- answers ----

    def _answer_write(
        self, write: _Write, ours: bool, result: KvResult | StoreWork | None, index: int
    ) -> None:
        response: Response
        if not ours:
            response = self._error(write.request_id, SUPERSEDED, True, write.kind)
        elif write.kind == MEMBERSHIP:
            response = MembershipResponse(write.request_id, ok=True, index=index)
        elif write.kind == SQL:
            assert isinstance(result, StoreWork), (index, result)
            response = self._sql_response(write.request_id, result)
        else:
            assert isinstance(result, KvResult), (index, result)
            response = KvResponse(
                request_id=write.request_id,
                ok=result.ok,
                value=result.value,
                found=result.found,
                index=index,
                error=result.error,
            )
        self.reply(write.source, response)

    def _sql_response(self, request_id: int, work: StoreWork) -> SqlResponse:
        sql = self._machine().sql
        result = work.result
        versions = tuple(sorted(sql.versions.items())) if work.barrier else ()
        return SqlResponse(
            request_id,
            ok=result.ok,
            index=work.index,
            error=result.error,
            error_kind=result.error_kind,
            versions=versions,
            catalog_version=sql.catalog_version,
        )

    def _answer_get(self, source: int, request: KvRequest) -> None:
        machine = self._machine()
        value, found = machine.kv.get(request.key)
        response = KvResponse(
            request.request_id, ok=True, value=value, found=found, index=machine.applied_index
        )
        self.reply(source, response)

    def reply(self, target: int, response: msgspec.Struct) -> None:
        """Send an answer; a client that cannot take it (gone, full) retries on its own."""
        try:
            self._transport.send(target, response)
        except TransportError:
            self.stats.replies_dropped += 1

    def _remember_reply_address(self, source: int, address: Address | None) -> None:
        if address is None or self._set_peer is None:
            return
        address = (address[0], address[1])
        peers = self._reply_peers
        if peers.get(source) == address:
            return
        try:
            self._set_peer(source, address)
        except (OSError, UnicodeError, ValueError):  # an address that does not resolve
            self.stats.replies_dropped += 1
            return
        peers.pop(source, None)
        peers[source] = address
        while len(peers) > REPLY_PEERS_MAX:
            peers.pop(next(iter(peers)))

    def leader_hint(self) -> int | None:
        leader = self._raft.leader
        return node_of(leader) if leader != NO_NODE else None

    def _not_leader(self, request_id: int) -> KvResponse:
        return KvResponse(
            request_id, ok=False, error=NOT_LEADER, leader_hint=self.leader_hint(), retryable=True
        )

    def _membership_error(self, request_id: int, error: str, retryable: bool) -> MembershipResponse:
        return MembershipResponse(
            request_id,
            ok=False,
            error=error,
            leader_hint=self.leader_hint(),
            retryable=retryable,
        )

    def _error(self, request_id: int, error: str, retryable: bool, kind: str) -> Response:
        if kind == MEMBERSHIP:
            return self._membership_error(request_id, error, retryable)
        if kind == SQL:
            return SqlResponse(
                request_id,
                ok=False,
                error=error,
                leader_hint=self.leader_hint(),
                retryable=retryable,
            )
        return KvResponse(
            request_id, ok=False, error=error, leader_hint=self.leader_hint(), retryable=retryable
        )


def _kv_error(request_id: int, error: str, retryable: bool) -> KvResponse:
    return KvResponse(request_id, ok=False, error=error, retryable=retryable)


def _invalid(request: KvRequest) -> str | None:
    """Why a request can never succeed (answered at once, not retryable), or None."""
    if len(request.key.encode()) > KEY_BYTES_MAX:
        return f"key longer than {KEY_BYTES_MAX} bytes"
    for value in (request.value, request.expected):
        if value is not None and len(value) > VALUE_BYTES_MAX:
            return f"value longer than {VALUE_BYTES_MAX} bytes"
    if request.op == KvOp.PUT and request.value is None:
        return "PUT needs a value"
    if request.stale and request.op != KvOp.GET:
        return "only a GET can be stale"
    return None
