"""The loop that joins one simulated node's Raft state machine to its simulated IO.

It mirrors the production loop in cluster/ step for step, because that order is what
makes Raft safe: for each `Ready`, (1) write the installed snapshot, the entries and the
hard state to the disk and fsync — the fsync takes simulated time, and the node handles no
other input meanwhile (inputs queue in its inbox, and are all stepped before the next
Ready: group commit); (2) send the messages; (3) restore the state machine from the
snapshot and apply the committed entries, serving read states once applied; (4) advance.
After applying it may take a snapshot and compact the log.

Raft messages travel through the node's `SimTransport` (encoded and decoded by the ipc
codec); the driver reads them when the transport reports an arrival. A node is UP, PAUSED
(a stopped process: nothing runs, arrivals wait in its transport until the links fill and
push back) or DOWN (crashed: unsynced writes are lost, and so is its transport with
whatever was queued in it; a restart recovers from the disk and opens a new one). Each
restart is a new incarnation; events meant for an earlier one are ignored.

Invariant: no message leaves the node, and nothing is applied, before everything the Ready
asked to persist is durable on its disk. Subclasses that break this on purpose (planted
bugs) override `persist`, `send`, `apply` or `complete`.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from chaos._events import EventQueue, Trace, derive_rng
from chaos.checkers import InvariantChecker, Violation
from chaos.disk import (
    ApplySnapshotRecord,
    CompactRecord,
    CreateSnapshotRecord,
    EntriesRecord,
    HardStateRecord,
    SimDisk,
)
from chaos.network import SimFabric, SimOptions, SimTransport
from chaos.statemachine import Op, RegisterMachine
from clock import SimClock
from ipc.errors import Backpressure
from ipc.transport import Received
from raft import (
    Entry,
    HardState,
    MemoryStorage,
    Message,
    RaftConfig,
    RaftNode,
    ReadState,
    Ready,
    Role,
)

INBOX_ITEMS_MAX = 4096
"""Inputs queued while a node syncs; beyond this they are dropped (counted). A paused
node reads nothing: what is sent to it waits in the transport, which pushes back."""
RAFT_TAG = "raft"
"""The codec tag raft `Message`s travel under."""

NodeFactory = Callable[[RaftConfig], RaftNode]
RaftAction = Callable[[RaftNode], None]


class NodeState(enum.Enum):
    UP = "up"
    PAUSED = "paused"
    DOWN = "down"


@dataclass(frozen=True)
class RaftTuning:
    """The Raft limits a simulation runs with: small, so batching limits are exercised."""

    election_ticks: int = 10
    heartbeat_ticks: int = 2
    entries_per_message_bytes_max: int = 256
    inflight_messages_max: int = 4
    uncommitted_entries_bytes_max: int = 16 * 1024
    snapshot_chunk_bytes_max: int = 128
    snapshot_chunks_in_flight_max: int = 2
    committed_entries_bytes_max: int = 1024
    read_index_pending_max: int = 64

    def raft_config(
        self, node_id: int, storage: MemoryStorage, rng: random.Random, applied: int
    ) -> RaftConfig:
        return RaftConfig(
            node_id=node_id,
            storage=storage,
            rng=rng,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            applied=applied,
            entries_per_message_bytes_max=self.entries_per_message_bytes_max,
            inflight_messages_max=self.inflight_messages_max,
            uncommitted_entries_bytes_max=self.uncommitted_entries_bytes_max,
            snapshot_chunk_bytes_max=self.snapshot_chunk_bytes_max,
            snapshot_chunks_in_flight_max=self.snapshot_chunks_in_flight_max,
            committed_entries_bytes_max=self.committed_entries_bytes_max,
            read_index_pending_max=self.read_index_pending_max,
        )


@dataclass(frozen=True)
class NodeTiming:
    """Simulated durations (tick interval in the node's local clock, the rest global)."""

    tick_interval_ns: int = 50_000_000
    fsync_ns_min: int = 100_000
    fsync_ns_max: int = 3_000_000
    snapshot_every_entries: int = 40
    compact_keep_entries: int = 5


class DriverListener(Protocol):
    """What the workload hears from a node: applies, restores, crashes, read points."""

    def on_applied(self, node: int, incarnation: int, entry: Entry, op: Op | None) -> None: ...

    def on_restored(self, node: int, incarnation: int, index: int) -> None: ...

    def on_crash(self, node: int) -> None: ...

    def on_read_ready(
        self, node: int, incarnation: int, read_state: ReadState, machine: RegisterMachine
    ) -> None: ...


@dataclass
class DriverStats:
    readies: int = 0
    fsyncs: int = 0
    applied_entries: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    snapshot_chunks_sent: int = 0
    messages_sent: int = 0
    inbox_dropped: int = 0
    backpressured: int = 0
    """Raft messages the transport refused because their link was full (dropped)."""
    torn_tails_recovered: int = 0
    crashes: int = 0
    restarts: int = 0
    raft_dropped: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    """Frames refused by closed transports (crashed incarnations), by reason."""


@dataclass
class DriverEnv:
    """Everything the drivers of one simulation share."""

    seed: int
    queue: EventQueue
    trace: Trace
    network: SimFabric
    checker: InvariantChecker
    listener: DriverListener
    node_factory: NodeFactory
    tuning: RaftTuning
    timing: NodeTiming
    stats: DriverStats
    transport_options: SimOptions = SimOptions()
    before_send: Callable[[Message], None] | None = None
    """Sees each raft message as it leaves its node (the simulator checks durability)."""


class NodeDriver:
    """One simulated node: its disk, clock, Raft state machine and register machine."""

    def __init__(self, node_id: int, env: DriverEnv, disk: SimDisk, clock: SimClock) -> None:
        self.id = node_id
        self.env = env
        self.disk = disk
        self.clock = clock
        self.state = NodeState.DOWN
        self.incarnation = 0
        self.raft: RaftNode | None = None
        self.storage: MemoryStorage | None = None
        self.machine: RegisterMachine | None = None
        self.transport: SimTransport | None = None
        self._rng = derive_rng(env.seed, "driver", node_id)
        self._inbox: deque[RaftAction] = deque()
        self._syncing: Ready | None = None
        self._sync_done_while_paused = False
        self._waiting_reads: list[ReadState] = []
        self._tick_generation = 0
        self._tick_queued = False
        self._pumping = False
        self._armed_crash: Callable[[], None] | None = None
        self._synced_hard_state = MemoryStorage(conf=disk.initial_conf).hard_state()
        """The last hard state Raft handed out that this loop fsynced: survives crashes.
        A founder starts with the bootstrap hard state already durable."""
        self._handed_out_hard_state = HardState()
        """The last hard state this incarnation's Raft handed out in a Ready."""

    # ---- lifecycle ----

    def start(self) -> None:
        """Boot (or reboot) from whatever the disk durably holds."""
        assert self.state == NodeState.DOWN, self.state
        env = self.env
        self.incarnation += 1
        recovery = self.disk.recover()
        storage = recovery.storage
        if recovery.torn_tail_bytes:
            env.stats.torn_tails_recovered += 1
        if self.incarnation > 1:
            env.stats.restarts += 1
        snapshot = storage.snapshot()
        machine = RegisterMachine.from_snapshot(snapshot)
        if snapshot.meta.index:
            env.checker.observe_restore(self.id, snapshot.meta.index, machine.chain)
        rng = derive_rng(env.seed, "raft", self.id, self.incarnation)
        config = env.tuning.raft_config(self.id, storage, rng, applied=snapshot.meta.index)
        raft = env.node_factory(config)
        hard_state = storage.hard_state()
        env.checker.start_incarnation(
            self.id, self._synced_hard_state, hard_state, raft.commit_index
        )
        self.storage, self.machine, self.raft = storage, machine, raft
        self._handed_out_hard_state = hard_state
        self.transport = SimTransport(
            env.network,
            self.id,
            messages={RAFT_TAG: Message},
            options=env.transport_options,
            on_ready=self._on_transport_ready,
            before_send=self._leaving,
        )
        self.state = NodeState.UP
        env.trace.record(
            self.id,
            "start",
            f"inc={self.incarnation} records={recovery.records} torn={recovery.torn_tail_bytes} "
            f"hs={hard_state.term},{hard_state.vote},{hard_state.commit} "
            f"snap={snapshot.meta.index} last={storage.last_index()}",
        )
        self._observe(raft)
        self._schedule_tick()
        self._pump()

    def crash(self, torn_writes: bool) -> bool:
        """Power loss: unsynced writes are lost, perhaps tearing the last record.

        Returns True when the disk kept a torn record."""
        assert self.state != NodeState.DOWN, self.state
        outcome = self.disk.crash(self._rng, torn_writes=torn_writes)
        self.env.trace.record(
            self.id, "crash", f"unsynced={outcome.unsynced_bytes} kept={outcome.kept_bytes}"
        )
        self.account_dropped()
        self._close_transport()
        self.env.stats.crashes += 1
        self.raft = self.storage = self.machine = None
        self.state = NodeState.DOWN
        self._syncing = None
        self._sync_done_while_paused = False
        self._inbox.clear()
        self._waiting_reads.clear()
        self._tick_generation += 1
        self._tick_queued = False
        self._armed_crash = None
        self.env.listener.on_crash(self.id)
        return outcome.torn

    def arm_crash_during_sync(self, crash: Callable[[], None]) -> None:
        """Call `crash` partway through this node's next fsync, while its writes are unsynced
        (a crash at a random instant rarely lands there, and that is where bugs hide)."""
        self._armed_crash = crash

    def pause(self) -> None:
        assert self.state == NodeState.UP, self.state
        self.state = NodeState.PAUSED
        self._tick_generation += 1
        self.env.trace.record(self.id, "pause")

    def resume(self) -> None:
        assert self.state == NodeState.PAUSED, self.state
        self.state = NodeState.UP
        self.env.trace.record(self.id, "resume")
        self._schedule_tick()
        self._on_transport_ready()  # read what queued up while the process was stopped
        if self._sync_done_while_paused:
            self._sync_done_while_paused = False
            ready = self._syncing
            assert ready is not None
            self._syncing = None
            self._complete_ready(ready)
        self._pump()

    def set_drift_ppm(self, drift_ppm: int) -> None:
        self.clock.set_drift_ppm(drift_ppm)
        self.env.trace.record(self.id, "drift", str(drift_ppm))
        if self.state == NodeState.UP:
            self._schedule_tick()  # the pending tick was timed at the old rate

    def account_dropped(self) -> None:
        """Fold this incarnation's count of bad messages Raft dropped into the stats."""
        if self.raft is None:
            return
        totals = self.env.stats.raft_dropped
        for reason, count in sorted(self.raft.dropped.items()):
            totals[reason] = totals.get(reason, 0) + count
        self.raft.dropped.clear()

    def transport_errors(self) -> dict[str, int]:
        """Frames the live transport refused so far, by reason (empty when down)."""
        return dict(self.transport.stats().errors) if self.transport is not None else {}

    def _close_transport(self) -> None:
        """The process is gone: so is its transport, and what was queued in it."""
        transport = self.transport
        assert transport is not None
        totals = self.env.stats.transport_errors
        for reason, count in sorted(transport.stats().errors.items()):
            totals[reason] = totals.get(reason, 0) + count
        transport.close()
        self.transport = None

    # ---- inputs ----

    def _on_transport_ready(self) -> None:
        """Frames arrived: a running process reads them; a paused one leaves them queued."""
        if self.state != NodeState.UP:
            return
        transport = self.transport
        assert transport is not None
        for delivery in transport.poll():
            assert isinstance(delivery, Received), delivery
            message = delivery.message
            assert isinstance(message, Message), message
            self.receive(message)

    def receive(self, message: Message) -> None:
        env = self.env
        if self.state == NodeState.DOWN:
            return
        env.trace.record(
            self.id,
            "recv",
            f"{message.type.name} {message.source} t={message.term} i={message.index} "
            f"lt={message.log_term} c={message.commit} n={len(message.entries)} "
            f"rj={int(message.reject)} o={message.chunk_offset}",
        )
        self.submit(lambda raft: raft.step(message))

    def submit(self, action: RaftAction) -> bool:
        """Queue one call into Raft (a step, a proposal...); False if the node cannot take it."""
        if self.state == NodeState.DOWN:
            return False
        if len(self._inbox) >= INBOX_ITEMS_MAX:
            self.env.stats.inbox_dropped += 1
            return False
        self._inbox.append(action)
        self._pump()
        return True

    def _schedule_tick(self) -> None:
        self._tick_generation += 1
        generation = self._tick_generation
        delay_ns = self.clock.global_ns_for_local_delta(self.env.timing.tick_interval_ns)
        self.env.queue.after(delay_ns, lambda: self._on_tick(generation))

    def _on_tick(self, generation: int) -> None:
        if generation != self._tick_generation or self.state != NodeState.UP:
            return
        self._schedule_tick()
        self.env.trace.record(self.id, "tick")
        if not self._tick_queued:  # a tick that finds one still queued merges into it
            self._tick_queued = True
            self._inbox.append(self._tick_action)
        self._pump()

    def _tick_action(self, raft: RaftNode) -> None:
        self._tick_queued = False
        raft.tick()

    # ---- the Ready loop ----

    def _pump(self) -> None:
        """Step every queued input, then handle one Ready; repeat until idle or syncing."""
        if self._pumping:
            return  # re-entered from a listener: the outer loop picks up the new input
        self._pumping = True
        try:
            while self.state == NodeState.UP and self._syncing is None:
                raft = self.raft
                assert raft is not None
                inbox = self._inbox
                while inbox:
                    inbox.popleft()(raft)
                    self._observe(raft)
                if not raft.has_ready():
                    return
                self._handle_ready(raft)
        finally:
            self._pumping = False

    def _observe(self, raft: RaftNode) -> None:
        storage = self.storage
        assert storage is not None
        self.env.checker.observe_node(
            self.id, raft.role, raft.term, raft.commit_index, raft.last_index, storage
        )

    def _handle_ready(self, raft: RaftNode) -> None:
        ready = raft.ready()
        if ready.hard_state is not None:
            self._handed_out_hard_state = ready.hard_state
        self.env.checker.check_hard_state_handed_out(
            self.id, raft.term, raft.vote, self._handed_out_hard_state
        )
        self.env.stats.readies += 1
        self._trace_ready(ready)
        self.persist(ready)
        if ready.must_sync:
            self._syncing = ready
            incarnation = self.incarnation
            timing = self.env.timing
            delay_ns = self._rng.randint(timing.fsync_ns_min, timing.fsync_ns_max)
            self.env.queue.after(delay_ns, lambda: self._on_fsync_done(incarnation))
            if self._armed_crash is not None:
                self.env.queue.after(self._rng.randrange(delay_ns), self._armed_crash)
                self._armed_crash = None
            return
        self._complete_ready(ready)

    def _on_fsync_done(self, incarnation: int) -> None:
        if incarnation != self.incarnation or self.state == NodeState.DOWN:
            return  # the node crashed before the fsync finished: the writes are lost
        self.disk.fsync()
        self.env.stats.fsyncs += 1
        self.env.trace.record(self.id, "fsync")
        ready = self._syncing
        assert ready is not None
        if ready.hard_state is not None:
            self._synced_hard_state = ready.hard_state
        if self.state == NodeState.PAUSED:
            self._sync_done_while_paused = True
            return
        self._syncing = None
        self._complete_ready(ready)
        self._pump()

    def _complete_ready(self, ready: Ready) -> None:
        raft = self.raft
        assert raft is not None
        self.send(ready)
        self.apply(ready)
        raft.advance(ready)
        self._observe(raft)
        self._maybe_take_snapshot()

    def persist(self, ready: Ready) -> None:
        """Step 1 (before the fsync): write snapshot, entries and hard state."""
        storage, disk, raft = self.storage, self.disk, self.raft
        assert storage is not None and raft is not None
        if ready.snapshot is not None:
            storage.apply_snapshot(ready.snapshot)
            disk.write(ApplySnapshotRecord(ready.snapshot))
        if ready.entries:
            self._check_append(storage, ready.entries)
            storage.append(ready.entries)
            disk.write(EntriesRecord(ready.entries))
        if ready.hard_state is not None:
            storage.set_hard_state(ready.hard_state)
            disk.write(HardStateRecord(ready.hard_state))
        if raft.role == Role.LEADER:
            self.env.checker.check_leader_log(self.id, raft.term, storage)

    def _check_append(self, storage: MemoryStorage, entries: tuple[Entry, ...]) -> None:
        snapshot_index = storage.snapshot().meta.index
        fresh = tuple(entry for entry in entries if entry.index > snapshot_index)
        if not fresh:
            return
        previous = fresh[0].index - 1
        if previous > storage.last_index():
            raise Violation(
                "log_matching",
                f"node {self.id} appends at {fresh[0].index} past its last index "
                f"{storage.last_index()}",
            )
        self.env.checker.observe_append(self.id, previous, storage.term(previous), fresh)

    def send(self, ready: Ready) -> None:
        """Step 2: hand the messages to the transport (a full link drops one: Raft
        retries, as it must over any lossy network)."""
        stats = self.env.stats
        transport = self.transport
        assert transport is not None
        for message in ready.messages:
            assert message.source == self.id, message
            stats.messages_sent += 1
            if message.chunk or message.chunk_done:
                stats.snapshot_chunks_sent += 1
            try:
                transport.send(message.target, message)
            except Backpressure:
                stats.backpressured += 1

    def _leaving(self, target: int, message: msgspec.Struct) -> None:
        assert isinstance(message, Message) and message.target == target, message
        if self.env.before_send is not None:
            self.env.before_send(message)

    def apply(self, ready: Ready) -> None:
        """Step 3: install the snapshot, apply committed entries, serve read states."""
        machine = self.machine
        assert machine is not None
        env = self.env
        checker, listener = env.checker, env.listener
        if ready.snapshot is not None:
            machine.restore(ready.snapshot)
            index = ready.snapshot.meta.index
            checker.observe_restore(self.id, index, machine.chain)
            env.stats.snapshots_installed += 1
            listener.on_restored(self.id, self.incarnation, index)
        for entry in ready.committed_entries:
            applied_before = machine.applied_index
            if entry.index != applied_before + 1:
                raise Violation(
                    "state_machine_safety",
                    f"node {self.id} is handed index {entry.index} after applying {applied_before}",
                )
            op = machine.apply(entry)
            checker.observe_apply(self.id, entry, machine.chain, op)
            env.stats.applied_entries += 1
            listener.on_applied(self.id, self.incarnation, entry, op)
        if ready.read_states:
            self._waiting_reads.extend(ready.read_states)
        if self._waiting_reads:
            self._serve_reads(machine)

    def _serve_reads(self, machine: RegisterMachine) -> None:
        still_waiting = []
        for read_state in self._waiting_reads:
            if read_state.index <= machine.applied_index:
                self.env.listener.on_read_ready(self.id, self.incarnation, read_state, machine)
            else:
                still_waiting.append(read_state)
        self._waiting_reads = still_waiting

    def _maybe_take_snapshot(self) -> None:
        """Step 5 (after advance): every so many applied entries, snapshot and compact."""
        storage, machine = self.storage, self.machine
        assert storage is not None and machine is not None
        applied = machine.applied_index
        timing = self.env.timing
        if applied - storage.snapshot().meta.index < timing.snapshot_every_entries:
            return
        data = machine.snapshot_bytes()
        storage.create_snapshot(applied, machine.conf, data)
        self.disk.write(CreateSnapshotRecord(applied, machine.conf, data))
        compact_index = applied - timing.compact_keep_entries
        if compact_index >= storage.first_index():
            storage.compact(compact_index)
            self.disk.write(CompactRecord(compact_index))
        self.env.stats.snapshots_taken += 1
        self.env.trace.record(self.id, "snapshot", f"at={applied} compact={compact_index}")

    def _trace_ready(self, ready: Ready) -> None:
        parts = []
        if ready.soft_state is not None:
            parts.append(f"ss={ready.soft_state.role.name},{ready.soft_state.leader}")
        if ready.hard_state is not None:
            hard_state = ready.hard_state
            parts.append(f"hs={hard_state.term},{hard_state.vote},{hard_state.commit}")
        if ready.snapshot is not None:
            parts.append(f"snap={ready.snapshot.meta.index},{ready.snapshot.meta.term}")
        if ready.entries:
            parts.append(
                f"e={ready.entries[0].index}-{ready.entries[-1].index}@{ready.entries[-1].term}"
            )
        if ready.committed_entries:
            parts.append(
                f"c={ready.committed_entries[0].index}-{ready.committed_entries[-1].index}"
            )
        if ready.messages:
            parts.append(f"m={len(ready.messages)}")
        if ready.read_states:
            parts.append(f"r={len(ready.read_states)}")
        self.env.trace.record(self.id, "ready", " ".join(parts))
