"""The fault schedule: which faults strike when, all drawn from the simulation's seed.

Every so often the nemesis picks one enabled fault and applies it, and schedules its
healing a random while later, so the group keeps getting chances to make progress:
message drop, delay (longer latency with jitter), duplication, corruption (a flipped byte
the receiving transport's codec refuses), symmetric and one-way partitions, leader
isolation, crashes that lose unsynced writes (perhaps tearing the last record) followed
by restarts, whole-group power loss, pauses, clock drift, membership
changes (remove a voter, add it back as a learner, promote it; a spare node joins with
an empty disk) and leadership transfers. Reordering is a standing fault: when enabled, the
network reorders every link (by jitter) from the start until `heal_all`, which ends every
fault at once.

Invariants: every fault heals after at most FAULT_DURATION_NS_MAX (a single-node crash or
pause is refused while half the nodes are down or paused already; a power loss takes all
of them down at once, and each restarts after its own delay); membership changes never
drop the voters below `min_voters(n)`; a healing action only undoes the fault generation
that set it, never a newer fault of the same kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from chaos._events import EventQueue, Trace
from chaos.driver import NodeDriver, NodeState
from chaos.network import LATENCY_NS_MAX_DEFAULT, LATENCY_NS_MIN_DEFAULT, SimFabric
from raft import ConfChange, ConfChangeKind, ProposalRefused, RaftNode, Role

FAULT_INTERVAL_NS_MIN = 50_000_000
FAULT_INTERVAL_NS_MAX = 600_000_000
FAULT_DURATION_NS_MIN = 100_000_000
FAULT_DURATION_NS_MAX = 3_000_000_000
DRIFT_PPM_CHOICES = (-400_000, -200_000, -50_000, -1_000, 1_000, 50_000, 200_000, 400_000)
POWER_LOSS_PROBABILITY = 0.05
"""Of crash faults, the share that take down every node at once."""
CRASH_DURING_SYNC_PROBABILITY = 0.6
"""Of single-node crashes, the share that strike in the middle of the node's next fsync."""


@dataclass(frozen=True)
class FaultConfig:
    """Which faults the nemesis may inject. Every fault is on by default."""

    drop: bool = True
    delay: bool = True
    reorder: bool = True
    duplicate: bool = True
    corrupt: bool = True
    partition: bool = True
    one_way: bool = True
    isolate_leader: bool = True
    crash: bool = True
    torn_writes: bool = True
    pause: bool = True
    drift: bool = True
    membership: bool = True
    transfer: bool = True

    @staticmethod
    def none() -> FaultConfig:
        return FaultConfig(**{f.name: False for f in fields(FaultConfig)})

    def enabled(self) -> tuple[str, ...]:
        """Names of the enabled faults (torn_writes only modifies crash)."""
        return tuple(
            f.name for f in fields(self) if getattr(self, f.name) and f.name != "torn_writes"
        )


STANDING_FAULTS = ("reorder",)
"""Faults that hold for the whole fault phase instead of striking now and then."""
CORRUPT_PROBABILITIES = (0.01, 0.05, 0.2)


def min_voters(nodes: int) -> int:
    """Fewest voters membership changes may leave: a majority of the group, at least 2."""
    return max(2, nodes // 2 + 1)


Submit = Callable[[int, Callable[[RaftNode], None]], bool]


class Nemesis:
    def __init__(
        self,
        rng: random.Random,
        queue: EventQueue,
        trace: Trace,
        network: SimFabric,
        drivers: Mapping[int, NodeDriver],
        faults: FaultConfig,
        submit: Submit,
    ) -> None:
        self._rng = rng
        self._queue = queue
        self._trace = trace
        self._network = network
        self._drivers = drivers
        self._node_ids = tuple(sorted(drivers))
        self._faults = faults
        self._kinds = tuple(kind for kind in faults.enabled() if kind not in STANDING_FAULTS)
        self._submit = submit
        self._generation: dict[str, int] = {}
        self.running = False
        self.counts: dict[str, int] = {}
        self.torn_crashes = 0
        self._actions: dict[str, Callable[[], bool]] = {
            "drop": self._drop,
            "delay": self._delay,
            "duplicate": self._duplicate,
            "corrupt": self._corrupt,
            "partition": self._partition,
            "one_way": self._one_way,
            "isolate_leader": self._isolate_leader,
            "crash": self._crash,
            "pause": self._pause,
            "drift": self._drift,
            "membership": self._membership,
            "transfer": self._transfer,
        }

    def start(self) -> None:
        self.running = True
        if self._faults.reorder:
            self._network.reorder = True
            self.counts["reorder"] = 1
            self._trace.record(0, "fault", "reorder")
        if self._kinds:
            self._schedule_next()

    def _schedule_next(self) -> None:
        delay_ns = self._rng.randint(FAULT_INTERVAL_NS_MIN, FAULT_INTERVAL_NS_MAX)
        self._queue.after(delay_ns, self._strike)

    def _strike(self) -> None:
        if not self.running:
            return
        kind = self._rng.choice(self._kinds)
        if self._actions[kind]():
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self._schedule_next()

    def _duration_ns(self) -> int:
        return self._rng.randint(FAULT_DURATION_NS_MIN, FAULT_DURATION_NS_MAX)

    def _heal_later(self, kind: str, heal: Callable[[], None]) -> None:
        """Undo fault `kind` after a while, unless a newer fault of that kind replaced it."""
        generation = self._generation.get(kind, 0) + 1
        self._generation[kind] = generation

        def heal_if_current() -> None:
            if self.running and self._generation[kind] == generation:
                self._trace.record(0, "heal", kind)
                heal()

        self._queue.after(self._duration_ns(), heal_if_current)

    # ---- network faults ----

    def _drop(self) -> bool:
        probability = self._rng.choice((0.05, 0.1, 0.2, 0.4))
        self._network.drop_probability = probability
        self._trace.record(0, "fault", f"drop p={probability}")
        self._heal_later("drop", lambda: setattr(self._network, "drop_probability", 0.0))
        return True

    def _delay(self) -> bool:
        latency_ns_max = self._rng.choice((30_000_000, 100_000_000, 300_000_000))
        network = self._network
        network.set_latency(LATENCY_NS_MIN_DEFAULT, latency_ns_max)
        self._trace.record(0, "fault", f"delay max={latency_ns_max}")
        self._heal_later(
            "delay", lambda: network.set_latency(LATENCY_NS_MIN_DEFAULT, LATENCY_NS_MAX_DEFAULT)
        )
        return True

    def _duplicate(self) -> bool:
        probability = self._rng.choice((0.05, 0.2, 0.5))
        self._network.duplicate_probability = probability
        self._trace.record(0, "fault", f"duplicate p={probability}")
        self._heal_later("duplicate", lambda: setattr(self._network, "duplicate_probability", 0.0))
        return True

    def _corrupt(self) -> bool:
        probability = self._rng.choice(CORRUPT_PROBABILITIES)
        self._network.corrupt_probability = probability
        self._trace.record(0, "fault", f"corrupt p={probability}")
        self._heal_later("corrupt", lambda: setattr(self._network, "corrupt_probability", 0.0))
        return True

    def _partition(self) -> bool:
        nodes = list(self._node_ids)
        self._rng.shuffle(nodes)
        cut = self._rng.randint(1, len(nodes) // 2)
        side, other_side = sorted(nodes[:cut]), sorted(nodes[cut:])
        self._network.heal_partitions()
        self._network.partition(side, other_side)
        self._trace.record(0, "fault", f"partition {side} | {other_side}")
        self._heal_later("partition", self._network.heal_partitions)
        return True

    def _one_way(self) -> bool:
        self._network.heal_partitions()
        links = []
        for _ in range(self._rng.randint(1, len(self._node_ids))):
            source, target = self._rng.sample(self._node_ids, 2)
            self._network.block(source, target)
            links.append(f"{source}>{target}")
        self._trace.record(0, "fault", f"one-way {' '.join(links)}")
        self._heal_later("partition", self._network.heal_partitions)
        return True

    def _isolate_leader(self) -> bool:
        leader = self.leader()
        if leader is None:
            return False
        self._network.heal_partitions()
        self._network.isolate(leader.id, self._node_ids)
        self._trace.record(0, "fault", f"isolate leader {leader.id}")
        self._heal_later("partition", self._network.heal_partitions)
        return True

    # ---- process faults ----

    def _down_count(self) -> int:
        return sum(1 for n in self._node_ids if self._drivers[n].state != NodeState.UP)

    def _crash(self) -> bool:
        if self._rng.random() < POWER_LOSS_PROBABILITY:
            self._trace.record(0, "fault", "power loss")
            for node in self._node_ids:
                if self._drivers[node].state != NodeState.DOWN:
                    self._crash_now(self._drivers[node])
            return True
        if self._down_count() >= len(self._node_ids) // 2:
            return False
        candidates = [n for n in self._node_ids if self._drivers[n].state == NodeState.UP]
        if not candidates:
            return False
        driver = self._drivers[self._rng.choice(candidates)]
        if self._rng.random() < CRASH_DURING_SYNC_PROBABILITY:
            incarnation = driver.incarnation

            def crash_if_same_incarnation() -> None:
                if driver.incarnation == incarnation and driver.state != NodeState.DOWN:
                    self._crash_now(driver)

            self._trace.record(driver.id, "fault", "crash armed")
            driver.arm_crash_during_sync(crash_if_same_incarnation)
        else:
            self._crash_now(driver)
        return True

    def _crash_now(self, driver: NodeDriver) -> None:
        if driver.crash(torn_writes=self._faults.torn_writes):
            self.torn_crashes += 1
        self._queue.after(self._duration_ns(), lambda: self._restart(driver))

    def _restart(self, driver: NodeDriver) -> None:
        if driver.state == NodeState.DOWN:
            driver.start()

    def _pause(self) -> bool:
        if self._down_count() >= len(self._node_ids) // 2:
            return False
        candidates = [n for n in self._node_ids if self._drivers[n].state == NodeState.UP]
        if not candidates:
            return False
        driver = self._drivers[self._rng.choice(candidates)]
        driver.pause()
        incarnation = driver.incarnation

        def resume() -> None:
            if driver.incarnation == incarnation and driver.state == NodeState.PAUSED:
                driver.resume()

        self._queue.after(self._duration_ns(), resume)
        return True

    def _drift(self) -> bool:
        driver = self._drivers[self._rng.choice(self._node_ids)]
        driver.set_drift_ppm(self._rng.choice(DRIFT_PPM_CHOICES))
        self._heal_later(f"drift{driver.id}", lambda: driver.set_drift_ppm(0))
        return True

    # ---- Raft-level faults ----

    def leader(self) -> NodeDriver | None:
        """The running node that leads the highest term, if any."""
        best: NodeDriver | None = None
        for node in self._node_ids:
            driver = self._drivers[node]
            raft = driver.raft
            if driver.state != NodeState.UP or raft is None or raft.role != Role.LEADER:
                continue
            if best is None or (best.raft is not None and raft.term > best.raft.term):
                best = driver
        return best

    def _membership(self) -> bool:
        leader = self.leader()
        if leader is None or leader.raft is None:
            return False
        conf = leader.raft.conf
        options: list[ConfChange] = []
        for node in conf.learners:
            options.append(ConfChange(ConfChangeKind.ADD_VOTER, node))
        for node in self._node_ids:
            if node not in conf.voters and node not in conf.learners:
                options.append(ConfChange(ConfChangeKind.ADD_LEARNER, node))
        if not options and len(conf.voters) > min_voters(len(self._node_ids)):
            victim = self._rng.choice(conf.voters)
            kind = self._rng.choice((ConfChangeKind.REMOVE, ConfChangeKind.ADD_LEARNER))
            options.append(ConfChange(kind, victim))
        if not options:
            return False
        change = self._rng.choice(options)
        self._trace.record(leader.id, "fault", f"conf {change.kind.name} {change.node}")
        return self._submit(leader.id, _refusal_ignored(lambda raft: raft.propose_conf_change(change)))

    def _transfer(self) -> bool:
        leader = self.leader()
        if leader is None or leader.raft is None:
            return False
        others = [n for n in leader.raft.conf.voters if n != leader.id]
        if not others:
            return False
        target = self._rng.choice(others)
        self._trace.record(leader.id, "fault", f"transfer to {target}")
        return self._submit(leader.id, _refusal_ignored(lambda raft: raft.transfer_leadership(target)))

    # ---- the end ----

    def heal_all(self) -> None:
        """Stop injecting; heal the network, resume, restart, reset every clock's drift."""
        self.running = False
        self._network.heal()
        self._trace.record(0, "heal", "all")
        for node in self._node_ids:
            driver = self._drivers[node]
            if driver.clock.drift_ppm != 0:
                driver.set_drift_ppm(0)
            if driver.state == NodeState.PAUSED:
                driver.resume()
            elif driver.state == NodeState.DOWN:
                driver.start()


def _refusal_ignored(action: Callable[[RaftNode], object]) -> Callable[[RaftNode], None]:
    """A nemesis action whose typed refusal (not leader any more, a change in flight) is
    an expected outcome of injecting it at a random moment, not a failure."""

    def run(raft: RaftNode) -> None:
        try:
            action(raft)
        except ProposalRefused:
            pass

    return run
