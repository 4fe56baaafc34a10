"""Random schedules for property tests: a harness Cluster driven one small step at a time
(tick one node, deliver/drop/duplicate one message in any order, propose, partition,
crash-restart, compact, change membership, transfer leadership, read), with the safety
checker run after every step. Hypothesis picks the steps; everything else is deterministic.
"""

from __future__ import annotations

from hypothesis import strategies as st

from raft import (
    ConfChange,
    ConfChangeKind,
    Message,
    ProposalRefused,
    RaftError,
    Role,
)
from tests.unit.raft.harness import Cluster
from tests.unit.raft.invariants import SafetyChecker

IN_FLIGHT_MAX = 400
"""Duplication could grow the network without bound; beyond this the oldest are lost."""


# (kind, weight out of 100). A step is three integers: which kind, and two parameters the
# kind reads as it likes. Integers shrink well, and 0 is the most benign step (a tick).
STEP_WEIGHTS = (
    ("tick_all", 21),
    ("deliver", 18),
    ("deliver_fifo", 18),
    ("propose_at_leader", 10),
    ("tick", 5),
    ("drop", 5),
    ("duplicate", 3),
    ("propose", 2),
    ("isolate", 3),
    ("heal", 4),
    ("restart", 2),
    ("compact", 3),
    ("conf", 2),
    ("transfer", 2),
    ("read", 2),
)
_KIND_OF_ROLL = [kind for kind, weight in STEP_WEIGHTS for _ in range(weight)]
assert len(_KIND_OF_ROLL) == 100


def steps() -> st.SearchStrategy[tuple[int, int, int]]:
    return st.tuples(
        st.integers(min_value=0, max_value=99),
        st.integers(min_value=0, max_value=1 << 16),
        st.integers(min_value=0, max_value=1 << 16),
    )


class Schedule:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.checker = SafetyChecker(cluster)
        self.proposals = 0
        self.history: list[Message] = []
        self.partitioned: frozenset[int] = frozenset()
        self.step_counts: dict[str, int] = {}

    # ---- plumbing ----

    def settle(self) -> None:
        """Persist and collect every node's Ready (messages go to the network), then check."""
        for node_id in sorted(self.cluster.nodes):
            self.cluster.process_ready(node_id)
        if len(self.cluster.in_flight) > IN_FLIGHT_MAX:
            del self.cluster.in_flight[: len(self.cluster.in_flight) - IN_FLIGHT_MAX]
        self.checker.check()

    def deliver(self, message: Message) -> None:
        self.history.append(message)
        if message.target in self.cluster.nodes:
            self.cluster.nodes[message.target].step(message)

    def _take(self, slot: int) -> Message | None:
        if not self.cluster.in_flight:
            return None
        return self.cluster.in_flight.pop(slot % len(self.cluster.in_flight))

    def leader(self) -> int | None:
        leaders = [n for n, node in self.cluster.nodes.items() if node.role == Role.LEADER]
        if not leaders:
            return None
        return max(leaders, key=lambda n: self.cluster.nodes[n].term)

    # ---- steps ----

    def run(self, step: tuple[int, int, int]) -> None:
        roll, a, b = step
        kind = _KIND_OF_ROLL[roll]
        self.step_counts[kind] = self.step_counts.get(kind, 0) + 1
        ids = sorted(self.cluster.nodes)
        node_id = ids[a % len(ids)]
        if kind == "tick_all":
            self._tick_all(1 + a % 3)
        elif kind == "deliver":
            self._deliver(a)
        elif kind == "deliver_fifo":
            self._deliver_fifo(1 + a % 30)
        elif kind == "propose_at_leader":
            self._propose_at_leader(1 + a % 3)
        elif kind == "isolate":
            group = {ids[i] for i in range(len(ids)) if b >> i & 1}
            group = set(sorted(group)[: len(ids) // 2]) or {node_id}
            self._isolate(frozenset(group))
        elif kind == "conf":
            kinds = (ConfChangeKind.ADD_VOTER, ConfChangeKind.ADD_LEARNER)
            self._conf(node_id, kinds[b % 2])
        elif kind == "heal":
            self._heal()
        elif kind in ("drop", "duplicate"):
            getattr(self, "_" + kind)(a)
        else:
            getattr(self, "_" + kind)(node_id)
        self.settle()

    def _tick(self, node_id: int) -> None:
        self.cluster.nodes[node_id].tick()

    def _tick_all(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for node in self.cluster.nodes.values():
                node.tick()

    def _deliver(self, slot: int) -> None:
        message = self._take(slot)
        if message is not None:
            self.deliver(message)

    def _deliver_fifo(self, count: int) -> None:
        batch = self.cluster.in_flight[:count]
        del self.cluster.in_flight[:count]
        for message in batch:
            self.deliver(message)

    def _drop(self, slot: int) -> None:
        self._take(slot)

    def _duplicate(self, slot: int) -> None:
        if self.cluster.in_flight:
            self.cluster.in_flight.append(
                self.cluster.in_flight[slot % len(self.cluster.in_flight)]
            )

    def _propose(self, node_id: int) -> None:
        self.proposals += 1
        try:
            self.cluster.nodes[node_id].propose(b"p%d" % self.proposals)
        except ProposalRefused:
            pass

    def _propose_at_leader(self, count: int) -> None:
        leader = self.leader()
        if leader is None:
            return
        for _ in range(count):
            self._propose(leader)

    def _isolate(self, group: frozenset[int]) -> None:
        self.partitioned = group
        self.cluster.isolate(*group)
        # Messages already on the wire across the cut are lost too.
        self.cluster.in_flight = [m for m in self.cluster.in_flight if not self.cluster.drop(m)]

    def _heal(self) -> None:
        self.partitioned = frozenset()
        self.cluster.heal()

    def _restart(self, node_id: int) -> None:
        self.cluster.restart(node_id)

    def _compact(self, node_id: int) -> None:
        """Take a state machine snapshot at the applied index and drop the log before it."""
        node = self.cluster.nodes[node_id]
        storage = self.cluster.storages[node_id]
        index = node.applied_index
        if (
            index != node.commit_index  # membership is known as of commit, so snapshot there
            or node.log.has_pending_snapshot()
            or index <= storage.snapshot().meta.index
            or index > storage.last_index()
        ):
            return
        storage.create_snapshot(index, node.conf, b"image@%d" % index)
        storage.compact(index)

    def _conf(self, node_id: int, kind: ConfChangeKind) -> None:
        leader = self.leader()
        if leader is None:
            return
        try:
            self.cluster.nodes[leader].propose_conf_change(ConfChange(kind, node_id))
        except ProposalRefused:
            return

    def _transfer(self, node_id: int) -> None:
        leader = self.leader()
        if leader is None:
            return
        try:
            self.cluster.nodes[leader].transfer_leadership(node_id)
        except RaftError:
            pass

    def _read(self, node_id: int) -> None:
        try:
            self.cluster.nodes[node_id].read_index(b"r%d" % len(self.history))
        except RaftError:
            pass

    # ---- liveness ----

    def heal_and_converge(self, ticks_max: int = 400) -> None:
        """After the faults stop, a leader emerges and a new proposal reaches every node.
        The proposal is made again whenever the current leader lacks it (a deposed leader
        may have taken it down with it)."""
        self._heal()
        cluster = self.cluster
        marker = b"final"
        for _ in range(ticks_max):
            self._tick_all()
            self.settle()
            while cluster.in_flight:
                self._deliver_fifo(len(cluster.in_flight))
                self.settle()
            leader = self.leader()
            if leader is not None and not _holds(cluster, leader, marker):
                try:
                    cluster.nodes[leader].propose(marker)
                except ProposalRefused:
                    pass
                self.settle()
            if all(
                marker in cluster.applied_data(n) or _restored_past(cluster, n, marker)
                for n in cluster.nodes
            ):
                return
        raise AssertionError(
            "no progress after healing: "
            + ", ".join(
                f"{n}:{node.role.name}/t{node.term}/c{node.commit_index}/l{node.last_index}"
                for n, node in sorted(cluster.nodes.items())
            )
        )


def _holds(cluster: Cluster, node_id: int, marker: bytes) -> bool:
    node = cluster.nodes[node_id]
    if marker in cluster.applied_data(node_id):
        return True
    entries = node.log.slice(node.log.first_index(), node.last_index + 1, 1 << 62)
    return any(e.data == marker for e in entries)


def _restored_past(cluster: Cluster, node_id: int, marker: bytes) -> bool:
    """True if `node_id` installed a snapshot covering the marker instead of applying it."""
    applied = cluster.committed[node_id]
    leader_entries = [e for n in cluster.nodes for e in cluster.committed[n] if e.data == marker]
    if not leader_entries:
        return False
    index = leader_entries[0].index
    snapshots = cluster.snapshots[node_id]
    return any(s.meta.index >= index for s in snapshots) and all(e.index != index for e in applied)
