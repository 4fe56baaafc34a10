"""Raft's safety properties (paper Figure 3), checked against a harness Cluster after
every step of a schedule:

- Election safety: at most one leader per term, ever.
- Log matching: two logs holding an entry with the same index and term are identical up
  to that index.
- State machine safety: no two nodes ever apply different entries at one index.
- Commit monotonicity: a node's commit index never decreases (within one incarnation; a
  restart resumes from the persisted one, which is never below what was applied).
- Local bounds: applied <= commit <= last index on every node.
"""

from __future__ import annotations

from itertools import combinations

from raft import CompactedError, Entry, RaftNode, Role
from tests.unit.raft.harness import Cluster


class SafetyChecker:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.leader_of_term: dict[int, int] = {}
        self.applied_at: dict[int, tuple[int, bytes, int]] = {}  # index -> (term, data, kind)
        self.applied_seen: dict[int, int] = {}  # node -> how many committed entries checked
        self.commit_of: dict[int, int] = {}
        self.incarnation: dict[int, RaftNode] = {}

    def check(self) -> None:
        for node_id, node in sorted(self.cluster.nodes.items()):
            self._check_local(node_id, node)
            self._check_election_safety(node_id, node)
            self._check_state_machine_safety(node_id)
        self._check_log_matching()

    def _check_local(self, node_id: int, node: RaftNode) -> None:
        assert node.applied_index <= node.commit_index <= node.last_index, (
            node_id,
            node.applied_index,
            node.commit_index,
            node.last_index,
        )
        if self.incarnation.get(node_id) is node:
            assert node.commit_index >= self.commit_of[node_id], (
                f"node {node_id} commit went back from {self.commit_of[node_id]} "
                f"to {node.commit_index}"
            )
        else:
            self.incarnation[node_id] = node
        self.commit_of[node_id] = node.commit_index

    def _check_election_safety(self, node_id: int, node: RaftNode) -> None:
        if node.role != Role.LEADER:
            return
        holder = self.leader_of_term.setdefault(node.term, node_id)
        assert holder == node_id, f"two leaders in term {node.term}: {holder} and {node_id}"

    def _check_state_machine_safety(self, node_id: int) -> None:
        entries = self.cluster.committed[node_id]
        start = self.applied_seen.get(node_id, 0)
        for entry in entries[start:]:
            seen = self.applied_at.setdefault(entry.index, _key(entry))
            assert seen == _key(entry), (
                f"node {node_id} applied {entry} at {entry.index}; another applied {seen}"
            )
        self.applied_seen[node_id] = len(entries)

    def _check_log_matching(self) -> None:
        nodes = sorted(self.cluster.nodes.items())
        for (a_id, a), (b_id, b) in combinations(nodes, 2):
            low = max(a.log.first_index(), b.log.first_index())
            high = min(a.last_index, b.last_index)
            # The highest index where both hold the same term: everything below must match.
            for index in range(high, low - 1, -1):
                if _term(a, index) == _term(b, index):
                    assert _entries(a, low, index) == _entries(b, low, index), (
                        f"logs of {a_id} and {b_id} agree at {index} but differ before it"
                    )
                    break


def _key(entry: Entry) -> tuple[int, bytes, int]:
    return (entry.term, entry.data, int(entry.kind))


def _term(node: RaftNode, index: int) -> int:
    try:
        return node.log.term(index)
    except CompactedError:
        return -1


def _entries(node: RaftNode, low: int, high: int) -> list[tuple[int, int, bytes, int]]:
    return [(e.index, e.term, e.data, int(e.kind)) for e in node.log.slice(low, high + 1, 1 << 62)]
