"""The deterministic simulator: a whole Raft group in one process, from one integer seed.

`Simulator(seed, ...).run()` builds 3-7 nodes, each a `NodeDriver` over a `SimDisk`, a
`SimClock` and a `SimTransport` (every raft message is encoded and decoded by the ipc
codec), joined by one `SimFabric`, with clients (`Workload`) proposing writes and
ReadIndex reads and a `Nemesis` injecting faults. Then it processes events one at a time
— a step — for the requested number of steps, checking invariants as it goes (see
`InvariantChecker`). Then it heals every fault and requires, within `heal_ns_max` of
simulated time, that a leader commits a fresh probe entry and that every member of the
configuration applies it and every acknowledged write (else `liveness`).

Every random choice comes from a stream derived from the seed by name, every tie in the
event queue breaks by scheduling order, and the trace digest covers every event: the same
seed gives the same digest in every run and process.

Hooks: `node_factory` builds each Raft node from its `RaftConfig` and `driver_factory`
builds each node's driver, so tests can plant a broken Raft or a broken IO loop and
check that the simulator catches it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos._events import EventQueue, Trace, derive_rng
from chaos.checkers import InvariantChecker, Violation
from chaos.disk import SimDisk
from chaos.driver import (
    DriverEnv,
    DriverStats,
    NodeDriver,
    NodeFactory,
    NodeState,
    NodeTiming,
    RaftAction,
    RaftTuning,
)
from chaos.nemesis import FaultConfig, Nemesis
from chaos.network import FabricStats, QueueScheduler, SimFabric, SimOptions
from chaos.workload import Workload, WorkloadStats
from clock import SimClock, SimTime
from ipc.codec import cluster_id_for
from raft import ConfState, Message, RaftNode

NODES_MIN = 3
NODES_MAX = 7
STEPS_DEFAULT = 20_000
HEAL_NS_MAX_DEFAULT = 30_000_000_000
"""After healing, a leader must commit and spread a fresh entry within this much sim time."""
HEAL_STEPS_MAX = 400_000
"""A bound on the events processed while waiting for liveness, whatever sim time does."""
PROBE_INTERVAL_NS = 100_000_000
CLUSTER_NAME = "sim"
LINK_FRAMES_MAX_CHOICES = (32, 256, 1024)
"""Per seed, how many frames one link holds before sends to it push back (and Raft's
message is dropped): small enough that a paused or slow node fills its links."""
EXCEPTION = "exception"
"""The result name when the simulated code raised instead of returning (a crash bug)."""

DriverFactory = Callable[[int, DriverEnv, SimDisk, SimClock], NodeDriver]


@dataclass
class SimStats:
    events: int = 0
    sim_time_ns: int = 0
    heal_ns: int = 0
    """Simulated time from healing every fault to liveness (0 if never reached)."""
    elections: int = 0
    commit_index_max: int = 0
    checks_run: int = 0
    trace_lines: int = 0
    torn_tails_recovered: int = 0
    crashes_with_torn_write: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    driver: DriverStats = field(default_factory=DriverStats)
    network: FabricStats = field(default_factory=FabricStats)
    workload: WorkloadStats = field(default_factory=WorkloadStats)
    refused: dict[str, int] = field(default_factory=dict)
    """Frames the nodes' transports refused (corruption), by reason."""

    def lines(self) -> list[str]:
        """Human-readable figures for --verbose."""
        driver, network, workload = self.driver, self.network, self.workload
        faults = " ".join(f"{name}={count}" for name, count in sorted(self.faults.items()))
        dropped = " ".join(f"{why}={n}" for why, n in sorted(driver.raft_dropped.items()))
        refused = " ".join(f"{why}={n}" for why, n in sorted(self.refused.items()))
        return [
            f"  events={self.events} sim_time_ms={self.sim_time_ns // 1_000_000} "
            f"heal_to_live_ms={self.heal_ns // 1_000_000} "
            f"checks={self.checks_run} trace_lines={self.trace_lines}",
            f"  elections={self.elections} commit_max={self.commit_index_max} "
            f"acked_writes={workload.writes_acked} failed_writes={workload.writes_failed} "
            f"reads_ok={workload.reads_ok} refusals={workload.refusals} "
            f"timeouts={workload.timeouts}",
            f"  faults: {faults or 'none'}",
            f"  crashes={driver.crashes} restarts={driver.restarts} "
            f"crashes_with_torn_write={self.crashes_with_torn_write} "
            f"torn_tails_recovered={self.torn_tails_recovered} "
            f"snapshots_taken={driver.snapshots_taken} "
            f"snapshot_chunks_sent={driver.snapshot_chunks_sent} "
            f"snapshots_installed={driver.snapshots_installed} fsyncs={driver.fsyncs}",
            f"  messages sent={network.sent} delivered={network.delivered} "
            f"dropped_random={network.dropped_random} "
            f"dropped_partition={network.dropped_partition} duplicated={network.duplicated} "
            f"corrupted={network.corrupted} to_down_nodes={network.dropped_crashed} "
            f"inbox_dropped={driver.inbox_dropped} backpressured={driver.backpressured}",
            f"  refused_by_transport: {refused or 'none'}",
            f"  dropped_by_raft: {dropped or 'none'}",
        ]


@dataclass(frozen=True)
class SimResult:
    seed: int
    steps: int
    """The steps requested when ok; the step at which the violation was seen otherwise."""
    trace_digest: str
    violation: str | None
    detail: str
    stats: SimStats

    @property
    def ok(self) -> bool:
        return self.violation is None

    def summary_line(self) -> str:
        result = "ok" if self.violation is None else f"violation:{self.violation}"
        return f"seed={self.seed} steps={self.steps} trace={self.trace_digest} result={result}"


class Simulator:
    def __init__(
        self,
        seed: int,
        nodes: int = 5,
        steps: int = STEPS_DEFAULT,
        faults: FaultConfig | None = None,
        node_factory: NodeFactory = RaftNode,
        driver_factory: DriverFactory = NodeDriver,
        keep_trace: bool = False,
        heal_ns_max: int = HEAL_NS_MAX_DEFAULT,
    ) -> None:
        """A spare node (when the seed has one) joins later with an empty log and no
        membership, and learns both from the leader's bootstrap or later snapshot."""
        if not NODES_MIN <= nodes <= NODES_MAX:
            raise ValueError(f"nodes must be in {NODES_MIN}..{NODES_MAX}, got {nodes}")
        if steps < 0:
            raise ValueError(f"steps must not be negative, got {steps}")
        self.seed = seed
        self.nodes = nodes
        self.steps = steps
        self.faults = faults if faults is not None else FaultConfig()
        self.heal_ns_max = heal_ns_max
        self._steps_done = 0
        self._heal_ns = 0
        self.sim_time = SimTime()
        self.queue = EventQueue(self.sim_time)
        self.trace = Trace(self.queue, keep_lines=keep_trace)
        self.checker = InvariantChecker()
        self.node_ids = tuple(range(1, nodes + 1))
        self.drivers: dict[int, NodeDriver] = {}
        self.network = SimFabric(
            derive_rng(seed, "net"), QueueScheduler(self.queue), cluster_id_for(CLUSTER_NAME)
        )
        self.workload = Workload(
            derive_rng(seed, "clients"),
            self.queue,
            self.trace,
            self.checker,
            self.node_ids,
            self._submit,
            lambda node: self.drivers[node].incarnation,
            clients=derive_rng(seed, "shape", "clients").randint(2, 4),
        )
        self.driver_stats = DriverStats()
        env = DriverEnv(
            seed=seed,
            queue=self.queue,
            trace=self.trace,
            network=self.network,
            checker=self.checker,
            listener=self.workload,
            node_factory=node_factory,
            tuning=_tuning_for(seed),
            timing=_timing_for(seed),
            stats=self.driver_stats,
            transport_options=_transport_options_for(seed),
            before_send=self._before_send,
        )
        self._make_drivers(env, driver_factory)
        self.nemesis = Nemesis(
            derive_rng(seed, "nemesis"),
            self.queue,
            self.trace,
            self.network,
            self.drivers,
            self.faults,
            self._submit,
        )

    def _make_drivers(
        self, env: DriverEnv, driver_factory: DriverFactory
    ) -> None:
        spare = _has_spare_node(self.seed, self.nodes, self.faults)
        voters = self.node_ids[:-1] if spare else self.node_ids
        for node in self.node_ids:
            initial_conf = ConfState(voters=voters) if node in voters else None
            drift_ppm = derive_rng(self.seed, "drift", node).randint(-100, 100)
            clock = SimClock(self.sim_time, drift_ppm=drift_ppm if self.faults.drift else 0)
            self.drivers[node] = driver_factory(node, env, SimDisk(initial_conf), clock)

    # ---- wiring ----

    def _before_send(self, message: Message) -> None:
        sender = self.drivers[message.source]
        self.checker.check_send(message.source, sender.disk.unsynced_raft_records)

    def _submit(self, node: int, action: RaftAction) -> bool:
        return self.drivers[node].submit(action)

    # ---- running ----

    def run(self) -> SimResult:
        violation: str | None = None
        detail = ""
        steps = self.steps
        try:
            self._start()
            self._run_steps(self.steps)
            self._heal_and_await_liveness()
        except Violation as found:
            violation, detail, steps = found.invariant, found.detail, self._steps_done
        except Exception as error:  # noqa: BLE001 - a crash of the simulated code is a finding
            violation, steps = EXCEPTION, self._steps_done
            detail = "".join(traceback.format_exception_only(error)).strip()
            detail += "\n" + "".join(traceback.format_tb(error.__traceback__)[-4:])
        if violation is not None:
            self.trace.record(0, "violation", violation)
        return SimResult(
            seed=self.seed,
            steps=steps,
            trace_digest=self.trace.hexdigest(),
            violation=violation,
            detail=detail,
            stats=self._stats(),
        )

    def _start(self) -> None:
        self.trace.record(0, "sim", f"seed={self.seed} nodes={self.nodes} steps={self.steps}")
        for node in self.node_ids:
            self.drivers[node].start()
        self.workload.start()
        self.nemesis.start()

    def _step(self) -> bool:
        action = self.queue.pop()
        if action is None:
            return False
        self._steps_done += 1
        action()
        return True

    def _run_steps(self, steps: int) -> None:
        for _ in range(steps):
            if not self._step():
                return

    def _heal_and_await_liveness(self) -> None:
        self.workload.stop()
        self.nemesis.heal_all()
        healed_ns = self.queue.now_ns
        deadline_ns = healed_ns + self.heal_ns_max
        self._schedule_probe()
        for _ in range(HEAL_STEPS_MAX):
            if self._is_live():
                self._heal_ns = self.queue.now_ns - healed_ns
                self.trace.record(0, "live")
                return
            if self.queue.now_ns > deadline_ns or not self._step():
                break
        raise Violation(
            "liveness",
            f"no fresh entry committed and applied everywhere within "
            f"{self.heal_ns_max // 1_000_000} ms of healing (probe index "
            f"{self.workload.probe_acked_index}, acked up to {self.checker.acked_index_max})",
        )

    def _schedule_probe(self) -> None:
        def probe() -> None:
            if self.workload.probe_acked_index is not None:
                return
            leader = self.nemesis.leader()
            if leader is not None:
                self.workload.probe(leader.id)
            self.queue.after(PROBE_INTERVAL_NS, probe)

        self.queue.after(0, probe)

    def _is_live(self) -> bool:
        """A probe was acknowledged and every member has applied it and every acked write."""
        probe_index = self.workload.probe_acked_index
        if probe_index is None:
            return False
        leader = self.nemesis.leader()
        if leader is None or leader.raft is None:
            return False
        needed = max(probe_index, self.checker.acked_index_max)
        for node in leader.raft.conf.members():
            driver = self.drivers[node]
            if driver.state != NodeState.UP or driver.machine is None:
                return False
            if driver.machine.applied_index < needed:
                return False
        for node in leader.raft.conf.members():
            machine = self.drivers[node].machine
            assert machine is not None
            self.checker.check_acked_present(node, machine.applied_index)
        return True

    def _stats(self) -> SimStats:
        refused = dict(self.driver_stats.transport_errors)
        for node in self.node_ids:
            self.drivers[node].account_dropped()
            for reason, count in self.drivers[node].transport_errors().items():
                refused[reason] = refused.get(reason, 0) + count
        return SimStats(
            events=self._steps_done,
            sim_time_ns=self.queue.now_ns,
            heal_ns=self._heal_ns,
            elections=self.checker.elections,
            commit_index_max=self.checker.applied_max_index,
            checks_run=self.checker.checks_run,
            trace_lines=self.trace.lines_recorded,
            torn_tails_recovered=self.driver_stats.torn_tails_recovered,
            crashes_with_torn_write=self.nemesis.torn_crashes,
            faults=dict(self.nemesis.counts),
            driver=self.driver_stats,
            network=self.network.stats,
            workload=self.workload.stats,
            refused=dict(sorted(refused.items())),
        )


def _tuning_for(seed: int) -> RaftTuning:
    """Per-seed Raft limits, small enough that batching and chunking limits bite."""
    rng = derive_rng(seed, "shape", "tuning")
    return RaftTuning(
        election_ticks=10,
        heartbeat_ticks=rng.choice((1, 2, 3)),
        entries_per_message_bytes_max=rng.choice((64, 256, 1024)),
        inflight_messages_max=rng.choice((1, 2, 4, 8)),
        uncommitted_entries_bytes_max=rng.choice((512, 4096, 65536)),
        snapshot_chunk_bytes_max=rng.choice((64, 128, 256)),
        snapshot_chunks_in_flight_max=rng.choice((1, 2, 4)),
        committed_entries_bytes_max=rng.choice((64, 512, 4096)),
        read_index_pending_max=rng.choice((4, 64)),
    )


def _timing_for(seed: int) -> NodeTiming:
    rng = derive_rng(seed, "shape", "timing")
    return NodeTiming(
        tick_interval_ns=rng.choice((20_000_000, 50_000_000)),
        fsync_ns_min=100_000,
        fsync_ns_max=rng.choice((1_000_000, 5_000_000, 20_000_000)),
        snapshot_every_entries=rng.choice((8, 20, 50, 200)),
        compact_keep_entries=rng.choice((0, 3, 20)),
    )


def _transport_options_for(seed: int) -> SimOptions:
    rng = derive_rng(seed, "shape", "transport")
    return SimOptions(link_frames_max=rng.choice(LINK_FRAMES_MAX_CHOICES))


def _has_spare_node(seed: int, nodes: int, faults: FaultConfig) -> bool:
    """Some seeds start the last node outside the group, with an empty disk, to join later."""
    if not faults.membership or nodes < 4:
        return False
    return derive_rng(seed, "shape", "spare").random() < 0.3
