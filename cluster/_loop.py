"""The worker's one event loop: the Raft core joined to the WAL, the transport and the
key-value state machine, on one thread.

Each wake-up (a frame arrived, a tick is due, a signal came) runs, in this order:

1. ticks that are due (at most `TICKS_PER_WAKE_MAX`; a worker that was stopped or starved
   skips the ticks it missed rather than firing them in a burst);
2. every input the transport has — Raft messages stepped, client requests handled — so
   all the writes that arrived while the last fsync ran share the next one (group commit);
3. the Readies, each in the order Raft's safety needs (see `raft.Ready`): persist the
   snapshot, entries and hard state and `sync()` the WAL ONCE; then send the messages (a
   full link drops one: Raft retries); then install the snapshot and apply committed
   entries to the state machine, serve read points and answer clients; then `advance`.
   At most `READIES_PER_WAKE_MAX` per wake-up, and at most
   `COMMITTED_ENTRIES_BYTES_PER_READY_MAX` applied per Ready, so ticks and heartbeats are
   never starved by a long replay.

Every wake-up also bumps the node's heartbeat counter (cluster.heartbeat), and the loop
wakes at least every `HEARTBEAT_MS`, so a loop that stops turning is seen by the
supervisor as a hang and killed.

Invariant: no message leaves and no client is answered before everything the Ready asked
to persist is synced; a WAL failure ends the process (non-zero) before anything that
depends on the failed write is sent or answered.
"""

from __future__ import annotations

import itertools
import os
import random
import selectors
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from clock import SystemClock
from cluster._applier import CatchUpItem
from cluster._worker_log import EventLog, TermSource
from cluster._worker_requests import Requests
from cluster._worker_sql import SqlService
from cluster._worker_stop import StopSignal
from cluster.config import WorkerConfig
from cluster.heartbeat import HEARTBEAT_MS, Heartbeat
from cluster.protocol import (
    CLIENT_ID_MIN,
    CLIENT_MESSAGES,
    NODES_MAX,
    Address,
    ChaosAction,
    ChaosRequest,
    ChaosResponse,
    NodeStatus,
    StatusRequest,
    StatusResponse,
    node_of,
    raft_id,
)
from cluster.rundir import RunDir
from cluster.sql_machine import StoreWork
from cluster.sql_protocol import (
    SQL_MESSAGES,
    CommandKind,
    SqlCommand,
    SqlRequest,
    encode_command,
    entry_data,
)
from cluster.state import ClusterState
from cluster.worker import EXIT_OK, EXIT_START_FAILED, EXIT_STORE_FAILED, EXIT_WAL_FAILED
from ipc.errors import Backpressure, TransportError
from ipc.local import LocalOptions, LocalTransport
from ipc.tcp import TcpTransport
from ipc.transport import BulkReceived, Delivery, Transport
from raft import (
    NO_NODE,
    ConfState,
    EntryKind,
    Message,
    ProposalRefused,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    SoftState,
)
from storage import Files, Wal, WalConfig, WalError
from storage.partitions import PartitionStoreError

RAFT_TAG = "raft"
"""The codec tag raft `Message`s travel under."""
TICKS_PER_WAKE_MAX = 2
"""Ticks fired per wake-up; a worker further behind (paused, starved) skips the rest."""
READIES_PER_WAKE_MAX = 8
"""Readies handled per wake-up before ticks and inputs get their turn again."""
INPUT_ROUNDS_MAX = 4
"""Polls of the transport per wake-up while frames keep arriving (before the next Ready)."""
COMMITTED_ENTRIES_BYTES_PER_READY_MAX = 256 * 1024
"""Applied per Ready: a few milliseconds of work, well under one election timeout."""
LOG_ENTRIES_KEPT_AFTER_SNAPSHOT = 1_000
"""Entries left in the WAL below a new snapshot (at most half a snapshot interval), so a
slightly lagging follower is sent entries, not the whole snapshot."""
STATS_INTERVAL_MS = 10_000
"""How often the worker logs one line of counters."""
SKEW_MS_MAX = 24 * 3600 * 1000
"""The largest clock skew a chaos request may inject, either way."""
HANG_MS_MAX = 600_000
"""The longest a chaos request may stop the loop for."""
HANG_SLEEP_S = 0.02
"""A hanging loop sleeps in steps this long, so SIGTERM still ends it (tests stay quick)."""
NS_PER_MS = 1_000_000


ROLE_NAMES = {
    Role.LEADER: "leader",
    Role.FOLLOWER: "follower",
    Role.PRE_CANDIDATE: "candidate",
    Role.CANDIDATE: "candidate",
}


@dataclass
class LoopStats:
    wakes: int = 0
    ticks: int = 0
    ticks_skipped: int = 0
    readies: int = 0
    syncs: int = 0
    entries_applied: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    backpressured: int = 0
    """Raft messages dropped because the link was full (Raft retries)."""
    send_errors: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    dropped: int = 0
    """Inputs that were not for a worker (bulk, responses, a forged raft source)."""
    ready_budget_exhausted: int = 0


CATCH_UP_ASK_MS = 2_000
"""How often a worker catching up asks again for its barrier until it sees it applied."""


@dataclass
class _CatchUp:
    floor: int
    """The store's applied index when the catch-up began: partitions changed after it are
    copied from replicas."""
    request_id: int
    next_ask_ns: int = 0
    barrier: int | None = None
    """The index of this node's barrier, once applied."""
    buffered: list[StoreWork] = field(default_factory=list)
    """Store work of entries after the barrier, held until the copy is in."""


class Worker:
    """One node: its Raft core, WAL, transport and state machine, and the loop over them."""

    def __init__(
        self,
        config: WorkerConfig,
        clock: SystemClock,
        wal: Wal,
        transport: Transport,
        raft: RaftNode,
        machine: ClusterState,
        log: EventLog,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.config = config
        self.heartbeat = heartbeat
        self.clock = clock
        self.wal = wal
        self.transport = transport
        self.raft = raft
        self.machine = machine
        self.log = log
        self.stats = LoopStats()
        self._tick_ns = config.tick_ms * 1_000_000
        self._now_ns = clock.monotonic_ns()
        self._next_tick_ns = self._now_ns + self._tick_ns
        self._next_stats_ns = self._now_ns + STATS_INTERVAL_MS * 1_000_000
        self._leader_contact_ns: int | None = None
        self._backlog = False
        self._stopping = False
        self._hang_until_ns: int | None = None
        self._known_addresses: dict[int, Address] = {}
        set_peer = transport.set_peer if isinstance(transport, TcpTransport) else None
        self._set_peer = set_peer
        self.requests = Requests(raft, transport, clock, lambda: self.machine, set_peer)
        self.failure: str | None = None
        """Why the partition store failed (the worker then stops and is restarted)."""
        self._snapshot_pending = False
        self.sql = SqlService(
            config.node,
            RunDir(config.run_path),
            transport,
            clock,
            log,
            lambda: self.machine,
            self.requests.reply,
            self._on_store_failure,
            self._on_caught_up,
            read_index=self.raft.read_index,
            catching_up=lambda: self._catch_up is not None,
        )
        self._catch_up: _CatchUp | None = None
        self._seed_store_state()
        self._barrier_ids = itertools.count(clock.wall_ns())
        self._check_store_behind()
        self._learn_addresses()

    # ---- the loop ----

    def run(self, stop: StopSignal) -> None:
        """Serve until SIGTERM/SIGINT; raises WalError when the disk fails."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.transport.fileno(), selectors.EVENT_READ)
            selector.register(stop.fileno(), selectors.EVENT_READ)
            selector.register(self.sql.mailbox.fileno(), selectors.EVENT_READ)
            while stop.requested is None and self.failure is None:
                self._once(selector, stop)
            if self.failure is None:
                assert stop.requested is not None
                self.log.event("stopping", signal=signal.Signals(stop.requested).name)
            self._stopping = True
            self._hand_off_leadership(selector, stop)
        self.requests.close()

    def _once(self, selector: selectors.BaseSelector, stop: StopSignal) -> None:
        self._wait(selector, stop)
        if self.heartbeat is not None:
            self.heartbeat.bump()
        self._tick()
        self.sql.run_mailbox()
        self._take_inputs()
        self.requests.expire()
        self.sql.tick()
        catch_up = self._catch_up
        if (
            catch_up is not None
            and catch_up.barrier is None
            and self._now_ns >= catch_up.next_ask_ns
        ):
            self._ask_for_barrier()
        self._handle_readies()
        if self._now_ns >= self._next_stats_ns:
            self._next_stats_ns = self._now_ns + STATS_INTERVAL_MS * 1_000_000
            self.log.event("stats", **self.stats_fields())
        if self._hang_until_ns is not None:
            self._hang(stop)

    def _wait(self, selector: selectors.BaseSelector, stop: StopSignal) -> None:
        now = self.clock.monotonic_ns()
        timeout_ns = min(max(0, self._next_tick_ns - now), HEARTBEAT_MS * NS_PER_MS)
        transport_ns = self.transport.next_timeout_ns()
        if transport_ns is not None:
            timeout_ns = min(timeout_ns, transport_ns)
        if self._backlog:
            timeout_ns = 0
        for key, _ in selector.select(timeout_ns / 1e9):
            if key.fd == stop.fileno():
                stop.drain()
        self.stats.wakes += 1
        self._now_ns = self.clock.monotonic_ns()

    def _tick(self) -> None:
        ticks = 0
        while self._now_ns >= self._next_tick_ns and ticks < TICKS_PER_WAKE_MAX:
            self.raft.tick()
            ticks += 1
            self._next_tick_ns += self._tick_ns
        self.stats.ticks += ticks
        if self._now_ns >= self._next_tick_ns:  # fell behind (stopped, starved): skip
            missed = (self._now_ns - self._next_tick_ns) // self._tick_ns + 1
            self.stats.ticks_skipped += missed
            self._next_tick_ns += missed * self._tick_ns

    def _take_inputs(self) -> None:
        for _ in range(INPUT_ROUNDS_MAX):
            deliveries = self.transport.poll()
            if not deliveries:
                return
            for delivery in deliveries:
                self._dispatch(delivery)

    def _dispatch(self, delivery: Delivery) -> None:
        if isinstance(delivery, BulkReceived):
            if self._stopping:
                delivery.release()
                self.stats.dropped += 1
            else:
                self.sql.on_bulk(delivery)
            return
        source, message = delivery
        if type(message) is Message:
            self._step(source, message)
        elif self._stopping and not isinstance(message, StatusRequest):
            self.requests.refuse_stopping(source, message)
        elif self.requests.on_request(source, message):
            pass
        elif self.sql.on_message(source, message):
            pass
        elif isinstance(message, StatusRequest):
            self.requests.reply(source, StatusResponse(message.request_id, self.status()))
        elif isinstance(message, ChaosRequest):
            self.requests.reply(source, self._chaos(message))
        else:
            self.stats.dropped += 1

    def _step(self, source: int, message: Message) -> None:
        if message.source != source or source >= CLIENT_ID_MIN:  # forged, or not a worker
            self.stats.dropped += 1
            return
        self.stats.messages_received += 1
        self.raft.step(message)
        if source == self.raft.leader:
            self._leader_contact_ns = self._now_ns

    # ---- Readies ----

    def _handle_readies(self) -> None:
        raft = self.raft
        for _ in range(READIES_PER_WAKE_MAX):
            if not raft.has_ready():
                self._backlog = False
                return
            self._handle_ready(raft.ready())
        self._backlog = raft.has_ready()
        if self._backlog:
            self.stats.ready_budget_exhausted += 1

    def _handle_ready(self, ready: Ready) -> None:
        self.stats.readies += 1
        if ready.soft_state is not None:
            self._on_soft_state(ready.soft_state)
        self._persist(ready)
        self._send(ready)
        self._apply(ready)
        self.raft.advance(ready)
        self._maybe_snapshot()

    def _persist(self, ready: Ready) -> None:
        """Step 1: everything the Ready asks to keep, then ONE sync (group commit)."""
        wal = self.wal
        if ready.snapshot is not None:
            wal.apply_snapshot(ready.snapshot)
        if ready.entries:
            wal.append(ready.entries)
        if ready.hard_state is not None:
            wal.set_hard_state(ready.hard_state)
        if ready.must_sync:
            wal.sync()
            self.stats.syncs += 1

    def _send(self, ready: Ready) -> None:
        """Step 2: a message the transport cannot take is dropped; Raft sends again."""
        transport, stats = self.transport, self.stats
        for message in ready.messages:
            try:
                transport.send(message.target, message)
            except Backpressure:
                stats.backpressured += 1
            except TransportError:
                stats.send_errors += 1
            else:
                stats.messages_sent += 1

    def _apply(self, ready: Ready) -> None:
        """Step 3: install the snapshot, apply entries, serve reads, answer clients."""
        requests = self.requests
        if ready.snapshot is not None:
            meta = ready.snapshot.meta
            old = self.machine
            self.machine = ClusterState.restore(
                ready.snapshot.data, meta.index, meta.conf, self.config.node
            )
            old.close()
            self._seed_store_state()
            self._check_store_behind()
            self.stats.snapshots_installed += 1
            requests.on_snapshot_installed(meta.index)
            self._learn_addresses()
            self.log.event("snapshot_installed", index=meta.index, snapshot_term=meta.term)
        machine = self.machine
        for entry in ready.committed_entries:
            result = machine.apply(entry)
            if isinstance(result, StoreWork):
                if self._catch_up is None:
                    self.sql.submit(result)
                else:
                    self._during_catch_up(result)
            if entry.kind == EntryKind.CONF_CHANGE:
                self._on_membership_applied(entry.index)
            requests.on_applied(entry, result)
        self.stats.entries_applied += len(ready.committed_entries)
        if ready.read_states:
            requests.on_read_states(ready.read_states)
            self.sql.on_read_states((s.request_id, s.index) for s in ready.read_states)
        requests.serve_reads()
        self.sql.serve_opens()

    def _maybe_snapshot(self) -> None:
        """Every `snapshot_entries` applied entries: snapshot the machine, compact the log.
        The partition store must hold everything up to the snapshot first (the log below
        it goes), so the snapshot is written once the applier's checkpoint says so."""
        machine, wal = self.machine, self.wal
        applied = machine.applied_index
        if self._snapshot_pending or self._catch_up is not None:
            return
        if applied - wal.snapshot().meta.index < self.config.snapshot_entries:
            return
        conf, data = machine.conf, machine.snapshot()
        self._snapshot_pending = True

        def checkpointed() -> None:
            self.sql.mailbox.post(lambda: self._write_snapshot(applied, conf, data))

        self.sql.applier.submit_checkpoint(applied, checkpointed)

    def _write_snapshot(self, applied: int, conf: ConfState, data: bytes) -> None:
        self._snapshot_pending = False
        wal = self.wal
        if applied <= wal.snapshot().meta.index:
            return  # a snapshot from the leader got there first
        wal.create_snapshot(applied, conf, data)
        kept = min(LOG_ENTRIES_KEPT_AFTER_SNAPSHOT, self.config.snapshot_entries // 2)
        compact_index = applied - kept
        if compact_index >= wal.first_index():
            wal.compact(compact_index)
        wal.sync()
        self.stats.snapshots_taken += 1
        self.log.event("snapshot_taken", index=applied, compacted_through=compact_index)

    # ---- membership, roles, addresses ----

    def _on_soft_state(self, soft_state: SoftState) -> None:
        leader = node_of(soft_state.leader) if soft_state.leader != NO_NODE else None
        self.log.event("role", role=self._role_name(), leader=leader)
        if soft_state.role == Role.LEADER:
            self._leader_contact_ns = self._now_ns
        self.requests.on_role_change(soft_state.role)
        if soft_state.role != Role.LEADER:
            self.sql.on_leadership_lost()

    def _on_membership_applied(self, index: int) -> None:
        conf = self.machine.conf
        self.log.event(
            "membership",
            index=index,
            voters=[node_of(voter) for voter in conf.voters],
            learners=[node_of(learner) for learner in conf.learners],
        )
        self._learn_addresses()

    def _learn_addresses(self) -> None:
        """TCP: dial members at the addresses the log gave them."""
        if self._set_peer is None:
            return
        for node_id, address in sorted(self.machine.kv.addresses.items()):
            if node_id == self.raft.id or self._known_addresses.get(node_id) == address:
                continue
            self._known_addresses[node_id] = address
            self._set_peer(node_id, address)
            self.log.event("peer_address", peer=node_of(node_id), address=list(address))

    def _role_name(self) -> str:
        raft = self.raft
        if raft.is_learner:
            return "learner"
        return ROLE_NAMES[raft.role]

    def _hand_off_leadership(self, selector: selectors.BaseSelector, stop: StopSignal) -> None:
        """A stopping leader asks its most caught-up voter to take over, and keeps the
        loop running (refusing clients) for up to one election timeout while it does."""
        raft = self.raft
        followers = [voter for voter in raft.conf.voters if voter != raft.id]
        if raft.role != Role.LEADER or not followers:
            return
        target = max(followers, key=lambda voter: raft.progress[voter].match)
        try:
            raft.transfer_leadership(target)
        except ProposalRefused:
            return
        self.log.event("leadership_transfer", target=node_of(target))
        deadline_ns = self._now_ns + self.config.election_ticks * self._tick_ns
        while raft.role == Role.LEADER and self._now_ns < deadline_ns:
            self._once(selector, stop)

    # ---- status and chaos ----

    def status(self) -> NodeStatus:
        raft, transport = self.raft, self.transport
        address = transport.address if isinstance(transport, TcpTransport) else None
        return NodeStatus(
            id=self.config.node,
            role=self._role_name(),
            term=raft.term,
            leader=node_of(raft.leader) if raft.leader != NO_NODE else None,
            commit_index=raft.commit_index,
            applied_index=self.machine.applied_index,
            last_heartbeat_ms=self._last_heartbeat_ms(),
            voters=tuple(node_of(voter) for voter in raft.conf.voters),
            learners=tuple(node_of(learner) for learner in raft.conf.learners),
            pid=os.getpid(),
            incarnation=self.config.incarnation,
            transport=self.config.transport,
            fsync=self.config.fsync,
            clock_skew_ms=self.clock.skew_ns // 1_000_000,
            faults=tuple(
                (node_of(source), node_of(target))
                for source, target in transport.faults.blocked_links()
                if 1 <= source <= NODES_MAX and 1 <= target <= NODES_MAX
            ),
            address=address,
            partitions=self.sql.partition_infos,
            store_applied_index=self.sql.store_applied_index,
        )

    # ---- catching up the partition store ----

    def _seed_store_state(self) -> None:
        """The machine was restored (a restart, or a snapshot installed): the store is at
        its state, or behind it and about to catch up (reads of the current state are
        refused until the copy is done)."""
        sql = self.machine.sql
        self.sql.applier.seed_state(sql.state_index, sql.catalog_version)

    def _check_store_behind(self) -> None:
        """After a snapshot from the leader (or a restart in the middle of a catch-up), the
        store may be behind the state machine with the log below gone: copy what changed
        since from replicas, at a read barrier this node appends for the purpose."""
        floor = self.sql.store_applied_index
        index = self.machine.applied_index
        if floor >= index or self._catch_up is not None:
            return
        self._catch_up = _CatchUp(floor, next(self._barrier_ids))
        items = self._catch_up_items(floor)
        if not items:  # nothing changed since the store's index: it is current as of now
            self._start_copy(index, items)
            return
        self.log.event("catch_up_begins", store_index=floor, state_index=index)
        self._ask_for_barrier()

    def _ask_for_barrier(self) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        if catch_up.barrier is not None:
            return
        catch_up.next_ask_ns = self._now_ns + CATCH_UP_ASK_MS * NS_PER_MS
        me = raft_id(self.config.node)
        command = SqlCommand(me, catch_up.request_id, CommandKind.BARRIER, text="catch-up")
        encoded = encode_command(command)
        if self.raft.role == Role.LEADER:
            try:
                self.raft.propose(entry_data(encoded))
            except ProposalRefused:
                pass
            return
        if self.raft.leader == NO_NODE:
            return
        try:
            self.transport.send(self.raft.leader, SqlRequest(catch_up.request_id, encoded))
        except TransportError:
            pass

    def _during_catch_up(self, work: StoreWork) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        if catch_up.barrier is not None:
            catch_up.buffered.append(work)  # after the barrier: applied once it is done
            return
        me = raft_id(self.config.node)
        ours = work.client_id == me and work.request_id == catch_up.request_id
        if not ours or work.duplicate:
            return  # covered by the copy taken at our barrier
        items = self._catch_up_items(catch_up.floor)
        self.log.event("catch_up_copying", index=work.index, partitions=len(items))
        self._start_copy(work.index, items)

    def _catch_up_items(self, floor: int) -> list[CatchUpItem]:
        """This node's partitions that changed after the store's index `floor`."""
        sql = self.machine.sql
        return [
            CatchUpItem(
                table,
                partition,
                sql.columns_sql(table),
                tuple(n for n in sql.placements[table][partition] if n != self.config.node),
            )
            for table, partition in sql.local_partitions()
            if sql.partition_changed[table][partition] > floor
        ]

    def _start_copy(self, index: int, items: list[CatchUpItem]) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        catch_up.barrier = index
        sql = self.machine.sql  # as of `index`: the copy is taken as the entry applies
        keep = set(sql.local_partitions())
        state = (sql.state_index, sql.catalog_version)
        self.sql.applier.submit_catch_up(index, items, keep, state)

    def _on_caught_up(self, index: int, ok: bool) -> None:
        catch_up = self._catch_up
        if catch_up is None or catch_up.barrier != index or self._stopping:
            return  # (when stopping, the restart finds the store behind and copies again)
        if not ok:  # no replica could serve the copy: try again at a new barrier
            self.log.event("catch_up_retry", index=index)
            self._catch_up = _CatchUp(catch_up.floor, next(self._barrier_ids))
            self._ask_for_barrier()
            return
        self._catch_up = None
        self.log.event("catch_up_done", index=index, buffered=len(catch_up.buffered))
        for work in catch_up.buffered:
            self.sql.submit(work)

    def _on_store_failure(self, message: str) -> None:
        self.log.error("store_failed", error=message)
        self.failure = message

    def _last_heartbeat_ms(self) -> int | None:
        if self.raft.role == Role.LEADER:
            return 0
        if self._leader_contact_ns is None:
            return None
        return (self.clock.monotonic_ns() - self._leader_contact_ns) // 1_000_000

    def _hang(self, stop: StopSignal) -> None:
        """Chaos: stop turning the loop (no heartbeat, no input, no tick) until the
        deadline, like a deadlock would; only SIGTERM ends it early."""
        until_ns, self._hang_until_ns = self._hang_until_ns, None
        assert until_ns is not None
        self.log.event("chaos_hang_begins", hang_ms=(until_ns - self._now_ns) // NS_PER_MS)
        while stop.requested is None and self.clock.monotonic_ns() < until_ns:
            time.sleep(HANG_SLEEP_S)
        self.log.event("chaos_hang_ends")

    def _chaos(self, request: ChaosRequest) -> ChaosResponse:
        faults = self.transport.faults
        if request.action == ChaosAction.HANG:
            if not 0 < request.hang_ms <= HANG_MS_MAX:
                return ChaosResponse(request.request_id, ok=False, detail="bad hang duration")
            self._hang_until_ns = self.clock.monotonic_ns() + request.hang_ms * NS_PER_MS
            return ChaosResponse(request.request_id, ok=True, detail=f"hang {request.hang_ms} ms")
        if request.action == ChaosAction.HEAL:
            faults.heal()
            self.log.event("chaos_heal")
            return ChaosResponse(request.request_id, ok=True, detail="healed every link")
        if request.action == ChaosAction.SKEW:
            if abs(request.skew_ms) > SKEW_MS_MAX:
                return ChaosResponse(request.request_id, ok=False, detail="skew too large")
            self.clock.skew_ns = request.skew_ms * 1_000_000
            self.log.event("chaos_skew", skew_ms=request.skew_ms)
            return ChaosResponse(request.request_id, ok=True, detail=f"skew {request.skew_ms} ms")
        groups = [set(group) for group in request.groups]
        every = [node for group in groups for node in group]
        if len(groups) < 2 or len(every) != len(set(every)):
            detail = "a partition needs two or more disjoint groups"
            return ChaosResponse(request.request_id, ok=False, detail=detail)
        if not all(0 <= node < NODES_MAX for node in every):
            return ChaosResponse(request.request_id, ok=False, detail="bad node number")
        faults.heal()
        for position, side in enumerate(groups):
            for other in groups[position + 1 :]:
                faults.partition(map(raft_id, sorted(side)), map(raft_id, sorted(other)))
        described = "|".join(",".join(map(str, sorted(group))) for group in groups)
        self.log.event("chaos_partition", groups=described)
        return ChaosResponse(request.request_id, ok=True, detail=f"partitioned {described}")

    def stats_fields(self) -> dict[str, object]:
        fields: dict[str, object] = asdict(self.stats)
        fields.update(asdict(self.requests.stats))
        fields["commit_index"] = self.raft.commit_index
        fields["applied_index"] = self.machine.applied_index
        fields["wal_syncs"] = self.wal.stats.syncs
        fields.update({f"sql_{k}": v for k, v in asdict(self.sql.stats).items()})
        fields["store_applied_index"] = self.sql.store_applied_index
        return fields


# ---- building a worker ----


def open_wal(config: WorkerConfig, files: Files | None = None) -> Wal:
    """The node's WAL: a brand-new one of a founder starts with the founders as voters.
    `files` injects disk faults (tests, chaos); None is the real disk."""
    founder = config.node in config.founders and not config.joining
    conf = ConfState(voters=tuple(sorted(map(raft_id, config.founders)))) if founder else None
    directory = RunDir(config.run_path).wal_dir(config.node)
    return Wal.open(directory, conf, config=WalConfig(fsync=config.fsync), files=files)


def open_transport(config: WorkerConfig, clock: SystemClock, rng: random.Random) -> Transport:
    messages: dict[str, type[msgspec.Struct]] = {
        RAFT_TAG: Message,
        **CLIENT_MESSAGES,
        **SQL_MESSAGES,
    }
    node_id = raft_id(config.node)
    if config.transport == "shm":
        options = LocalOptions(queues_per_host_expected=config.queues_per_host_expected)
        return LocalTransport(
            config.name,
            node_id,
            Path(config.run_dir),
            clock,
            incarnation=config.incarnation,
            options=options,
            messages=messages,
        )
    secret = RunDir(config.run_path).read_secret()
    peers = {raft_id(node): address for node, address in sorted(config.peers.items())}
    return TcpTransport(
        config.name,
        node_id,
        secret,
        clock,
        rng,
        bind=config.bind or ("127.0.0.1", 0),
        peers=peers,
        messages=messages,
    )


def new_raft(config: WorkerConfig, wal: Wal, rng: random.Random, applied: int) -> RaftNode:
    return RaftNode(
        RaftConfig(
            node_id=raft_id(config.node),
            storage=wal,
            rng=rng,
            election_ticks=config.election_ticks,
            heartbeat_ticks=config.heartbeat_ticks,
            pre_vote=True,
            check_quorum=True,
            applied=applied,
            committed_entries_bytes_max=COMMITTED_ENTRIES_BYTES_PER_READY_MAX,
        )
    )


def serve(
    config: WorkerConfig,
    clock: SystemClock,
    log: EventLog,
    term: TermSource,
    stop: StopSignal,
    files: Files | None = None,
) -> int:
    """Open everything, run the loop until `stop`, close everything. The exit code."""
    wal: Wal | None = None
    transport: Transport | None = None
    heartbeat = Heartbeat(RunDir(config.run_path).heartbeat_file(config.node))
    seed = int.from_bytes(os.urandom(8), "little")
    rng = random.Random(seed)
    try:
        try:
            wal = open_wal(config, files)
        except WalError as error:
            log.error("wal_open_failed", error=str(error), kind=type(error).__name__)
            return EXIT_WAL_FAILED
        try:
            transport = open_transport(config, clock, rng)
        except (TransportError, OSError) as error:
            log.error("transport_failed", error=str(error), kind=type(error).__name__)
            return EXIT_START_FAILED
        snapshot = wal.snapshot()
        meta = snapshot.meta
        machine = ClusterState.restore(snapshot.data, meta.index, meta.conf, config.node)
        raft = new_raft(config, wal, rng, machine.applied_index)
        term.read = lambda: raft.term
        try:
            worker = Worker(config, clock, wal, transport, raft, machine, log, heartbeat)
        except PartitionStoreError as error:
            log.error("store_open_failed", error=str(error), kind=type(error).__name__)
            return EXIT_STORE_FAILED
        try:
            _log_start(log, config, wal, worker, seed)
            try:
                worker.run(stop)
            except WalError as error:
                log.error("wal_failed", error=str(error), kind=type(error).__name__)
                return EXIT_WAL_FAILED
            if worker.failure is not None:
                return EXIT_STORE_FAILED
            worker.sql.close()  # the lanes' last results land before "stopped" is said
            log.event("stopped", **worker.stats_fields())
            return EXIT_OK
        finally:
            worker.sql.close()
            worker.machine.close()
    finally:
        if transport is not None:
            transport.close()
        if wal is not None:
            wal.close()
        heartbeat.close()


def _log_start(log: EventLog, config: WorkerConfig, wal: Wal, worker: Worker, seed: int) -> None:
    recovery = wal.recovery
    status = worker.status()
    log.event(
        "started",
        pid=os.getpid(),
        transport=config.transport,
        address=list(status.address) if status.address else None,
        fsync=config.fsync,
        created=recovery.created,
        torn_bytes=recovery.torn_bytes,
        torn_segment=recovery.torn_segment,
        snapshot_index=wal.snapshot().meta.index,
        last_index=wal.last_index(),
        commit_index=status.commit_index,
        voters=list(status.voters),
        learners=list(status.learners),
        seed=seed,
    )
