"""Simulated clients: concurrent writers and linearizable readers of the register map.

Each client has at most one operation outstanding. It sends it to the node it believes
leads (or to a random node), and gives up after a timeout. A write is `propose`d once,
under a fresh op id (a retry is a new op id), and is acknowledged when the node that
proposed it applies an entry at the proposal's (index, term) carrying that op id — the
moment a real server would answer the client. A read asks the node for a ReadIndex and is
served from that node's register machine once it has applied the read index; the checker
compares the value with the register model, and the read index with every write
acknowledged before the read was issued.

Invariant: an op id is proposed at most once, and acknowledged at most once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from chaos._events import EventQueue, Trace
from chaos.checkers import InvariantChecker
from chaos.statemachine import Op, RegisterMachine, encode_op
from raft import NO_NODE, Entry, NotLeader, ProposalRefused, RaftNode, ReadState

KEYS = 8
"""Registers the clients write and read; few, so writes and reads contend."""

OP_TIMEOUT_NS = 1_000_000_000
THINK_NS_MIN = 5_000_000
THINK_NS_MAX = 60_000_000
RETRY_NS = 20_000_000
"""Pause after a refusal (not the leader, overloaded) before the next attempt."""
WRITE_FRACTION = 0.65
PROBE_KEY = KEYS
"""The register liveness probes write: no client reads or writes it."""
PROBE_CLIENT = -1
PENDING_PROPOSALS_MAX = 10_000


@dataclass
class WorkloadStats:
    writes_proposed: int = 0
    writes_acked: int = 0
    writes_failed: int = 0
    reads_issued: int = 0
    reads_ok: int = 0
    refusals: int = 0
    timeouts: int = 0


@dataclass
class _Outstanding:
    client: int
    generation: int
    op_id: int = 0
    request_id: bytes = b""
    key: int = 0
    acked_index_at_issue: int = 0


Submit = Callable[[int, Callable[[RaftNode], None]], bool]
"""Queue a call into node `n`'s Raft; False if that node is down or overloaded."""


class Workload:
    def __init__(
        self,
        rng: random.Random,
        queue: EventQueue,
        trace: Trace,
        checker: InvariantChecker,
        node_ids: tuple[int, ...],
        submit: Submit,
        incarnation_of: Callable[[int], int],
        clients: int,
    ) -> None:
        self._rng = rng
        self._queue = queue
        self._trace = trace
        self._checker = checker
        self._node_ids = node_ids
        self._submit = submit
        self._incarnation_of = incarnation_of
        self._clients = clients
        self._leader_hint = [NO_NODE] * clients
        self._generation = [0] * clients
        self._outstanding: list[_Outstanding | None] = [None] * clients
        self._proposals: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        """(node, incarnation, index) -> (term, op_id, client) of a proposal awaiting apply."""
        self._reads: dict[tuple[int, int, bytes], _Outstanding] = {}
        self._next_op_id = 1
        self._next_read = 1
        self.running = False
        self.probe_acked_index: int | None = None
        """Index of the first acknowledged liveness probe, once there is one."""
        self.stats = WorkloadStats()

    def start(self) -> None:
        self.running = True
        for client in range(self._clients):
            self._schedule_next(client, self._rng.randint(THINK_NS_MIN, THINK_NS_MAX))

    def stop(self) -> None:
        """No new operations; outstanding ones still complete or time out."""
        self.running = False

    def new_op_id(self) -> int:
        op_id = self._next_op_id
        self._next_op_id += 1
        return op_id

    def probe(self, node: int) -> None:
        """Propose a liveness-probe write at `node`; acknowledged like a client write."""
        op = Op(self.new_op_id(), PROBE_KEY, 0)

        def propose(raft: RaftNode) -> None:
            try:
                index, term = raft.propose(encode_op(op))
            except ProposalRefused:
                return
            key = (raft.id, self._incarnation_of(raft.id), index)
            self._proposals[key] = (term, op.op_id, PROBE_CLIENT)

        self._trace.record(node, "probe", f"op={op.op_id}")
        self._submit(node, propose)

    # ---- issuing ----

    def _schedule_next(self, client: int, delay_ns: int) -> None:
        self._generation[client] += 1
        generation = self._generation[client]
        self._outstanding[client] = None
        self._queue.after(delay_ns, lambda: self._issue(client, generation))

    def _pick_node(self, client: int) -> int:
        hint = self._leader_hint[client]
        if hint != NO_NODE and hint in self._node_ids and self._rng.random() < 0.9:
            return hint
        return self._rng.choice(self._node_ids)

    def _issue(self, client: int, generation: int) -> None:
        if generation != self._generation[client] or not self.running:
            return
        node = self._pick_node(client)
        outstanding = _Outstanding(client, generation)
        outstanding.acked_index_at_issue = self._checker.acked_index_max
        self._outstanding[client] = outstanding
        if self._rng.random() < WRITE_FRACTION:
            outstanding.op_id = self.new_op_id()
            op = Op(outstanding.op_id, self._rng.randrange(KEYS), outstanding.op_id)
            self._trace.record(node, "client-write", f"c={client} op={op.op_id} k={op.key}")
            accepted = self._submit(node, lambda raft: self._propose(raft, outstanding, op))
        else:
            outstanding.key = self._rng.randrange(KEYS)
            outstanding.request_id = f"{client}.{self._next_read}".encode()
            self._next_read += 1
            self._trace.record(node, "client-read", f"c={client} k={outstanding.key}")
            accepted = self._submit(node, lambda raft: self._read(raft, outstanding))
        if not accepted:
            self._leader_hint[client] = NO_NODE
            self._schedule_next(client, RETRY_NS)
            return
        self._queue.after(OP_TIMEOUT_NS, lambda: self._timeout(client, generation))

    def _propose(self, raft: RaftNode, outstanding: _Outstanding, op: Op) -> None:
        if not self._is_current(outstanding):
            return
        client = outstanding.client
        try:
            index, term = raft.propose(encode_op(op))
        except ProposalRefused as refusal:
            self._refused(client, refusal)
            return
        self.stats.writes_proposed += 1
        self._leader_hint[client] = raft.id
        assert len(self._proposals) < PENDING_PROPOSALS_MAX, "proposals never resolved"
        node = raft.id
        incarnation = self._incarnation_of(node)
        self._proposals[(node, incarnation, index)] = (term, op.op_id, client)

    def _read(self, raft: RaftNode, outstanding: _Outstanding) -> None:
        if not self._is_current(outstanding):
            return
        try:
            raft.read_index(outstanding.request_id)
        except ProposalRefused as refusal:
            self._refused(outstanding.client, refusal)
            return
        self.stats.reads_issued += 1
        self._reads[(raft.id, self._incarnation_of(raft.id), outstanding.request_id)] = outstanding

    def _refused(self, client: int, refusal: ProposalRefused) -> None:
        self.stats.refusals += 1
        if isinstance(refusal, NotLeader):
            self._leader_hint[client] = refusal.leader_hint
        self._schedule_next(client, RETRY_NS)

    def _is_current(self, outstanding: _Outstanding) -> bool:
        return self._outstanding[outstanding.client] is outstanding

    def _timeout(self, client: int, generation: int) -> None:
        if generation != self._generation[client]:
            return
        self.stats.timeouts += 1
        self._trace.record(NO_NODE, "client-timeout", f"c={client}")
        self._leader_hint[client] = NO_NODE
        self._schedule_next(client, 0)

    # ---- DriverListener ----

    def on_applied(self, node: int, incarnation: int, entry: Entry, op: Op | None) -> None:
        proposal = self._proposals.pop((node, incarnation, entry.index), None)
        if proposal is None:
            return
        term, op_id, client = proposal
        if op is not None and op.op_id == op_id and entry.term == term:
            self._checker.record_ack(op_id, entry.index)
            self.stats.writes_acked += 1
            self._trace.record(node, "ack", f"op={op_id} i={entry.index}")
            if client == PROBE_CLIENT and self.probe_acked_index is None:
                self.probe_acked_index = entry.index
        else:
            self.stats.writes_failed += 1  # overwritten by another leader: not acknowledged
        if client == PROBE_CLIENT:
            return
        outstanding = self._outstanding[client]
        if outstanding is not None and outstanding.op_id == op_id:
            self._schedule_next(client, self._rng.randint(THINK_NS_MIN, THINK_NS_MAX))

    def on_restored(self, node: int, incarnation: int, index: int) -> None:
        """Proposals the snapshot jumped over have an unknown fate: never acknowledged."""
        for key in sorted(self._proposals):
            if key[0] == node and key[1] == incarnation and key[2] <= index:
                del self._proposals[key]
                self.stats.writes_failed += 1

    def on_crash(self, node: int) -> None:
        for key in sorted(self._proposals):
            if key[0] == node:
                del self._proposals[key]
        for read_key in sorted(self._reads):
            if read_key[0] == node:
                del self._reads[read_key]

    def on_read_ready(
        self, node: int, incarnation: int, read_state: ReadState, machine: RegisterMachine
    ) -> None:
        outstanding = self._reads.pop((node, incarnation, read_state.request_id), None)
        if outstanding is None:
            return  # a read from an earlier incarnation, or answered twice
        value = machine.value(outstanding.key)
        self._checker.check_read(
            node,
            outstanding.key,
            value,
            read_state.index,
            machine.applied_index,
            outstanding.acked_index_at_issue,
        )
        self.stats.reads_ok += 1
        self._trace.record(
            node,
            "read",
            f"k={outstanding.key} v={value} ri={read_state.index} ai={machine.applied_index}",
        )
        if self._is_current(outstanding):
            self._schedule_next(outstanding.client, self._rng.randint(THINK_NS_MIN, THINK_NS_MAX))
