"""Safety invariants of a Raft group, checked incrementally as the simulation runs.

The node drivers report every change they see (a role or commit observed after each call
into Raft, entries persisted, entries applied, snapshots restored, writes acknowledged,
reads served) and each report is checked at once, in O(1) (O(entries) for a batch, O(terms)
for a leader's log): no check ever rescans a log. The global views the checks compare
against:

- the leader of each term (election safety);
- a chained hash per (index, term) ever written to any log: two logs holding the same
  (index, term) must hold the same prefix (log matching);
- the highest commit index seen in each term: a leader of a later term must hold it, with
  the term it was applied with (leader completeness);
- a chained hash per applied index: every state machine must have applied the same prefix
  (state machine safety), and a register model built from it that every linearizable read
  must agree with, at an index no lower than any write acknowledged before the read began.

Two rules are checked directly where their breach would otherwise need a rare schedule
to show: nothing leaves a node while what Raft asked it to persist is unsynced, and what
it synced survives a restart (durability); a leader only commits by counting replicas of
entries of its own term (current_term_commit).

Invariant of this module: a report that contradicts a global view raises `Violation`
naming the invariant; nothing else does.
"""

from __future__ import annotations

import bisect

from chaos.statemachine import CHAIN_EMPTY, Op, chain_hash
from raft import BOOTSTRAP_INDEX, Entry, HardState, MemoryStorage, Role

INVARIANTS = (
    "election_safety",
    "log_matching",
    "leader_completeness",
    "state_machine_safety",
    "commit_monotonic",
    "acked_write_lost",
    "duplicate_apply",
    "read_linearizability",
    "durability",
    "current_term_commit",
    "liveness",
    "exception",
)
"""`durability`: a node sent a message while state Raft asked it to persist was unsynced,
restarted with a term or vote older than it had synced, or Raft did not hand out its
current term and vote to be persisted (DESIGN.md §3).
`current_term_commit`: a leader advanced its commit index to an entry of an earlier term
(Raft §5.4.2 allows counting replicas of current-term entries only; Figure 8 shows why).
`exception`: the simulated code raised (an assertion in Raft, say) instead of returning."""


class Violation(Exception):
    """An invariant does not hold. `invariant` is one of INVARIANTS."""

    def __init__(self, invariant: str, detail: str) -> None:
        assert invariant in INVARIANTS, invariant
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")


class InvariantChecker:
    """Global views of what every node has done, and the checks against them."""

    def __init__(self) -> None:
        self.checks_run = 0
        self._leader_of_term: dict[int, int] = {}
        # Both the empty log (a joiner) and the founders' bootstrap snapshot hold no entries.
        self._log_chain: dict[tuple[int, int], bytes] = {
            (0, 0): CHAIN_EMPTY,
            (BOOTSTRAP_INDEX, BOOTSTRAP_INDEX): CHAIN_EMPTY,
        }
        self._applied_chain: dict[int, bytes] = {0: CHAIN_EMPTY, BOOTSTRAP_INDEX: CHAIN_EMPTY}
        self.applied_max_index = BOOTSTRAP_INDEX  # every founder starts there
        self._op_index: dict[int, int] = {}
        self._acked_op_at_index: dict[int, int] = {}
        self.acked_index_max = 0
        self.acked_writes = 0
        self._commit: dict[int, int] = {}
        self._commit_in_term: dict[int, int] = {}
        self._role: dict[int, tuple[Role, int]] = {}
        self._applied_term: dict[int, int] = {0: 0, BOOTSTRAP_INDEX: BOOTSTRAP_INDEX}
        self._write_indexes: dict[int, list[int]] = {}
        self._write_values: dict[int, list[int]] = {}

    @property
    def elections(self) -> int:
        """Terms in which some node became leader."""
        return len(self._leader_of_term)

    # ---- after every call into a node ----

    def observe_node(
        self,
        node: int,
        role: Role,
        term: int,
        commit: int,
        last_index: int,
        storage: MemoryStorage,
    ) -> None:
        """Election safety, commit monotonicity and rule, leader completeness on election.

        `storage` is the node's stable log (its entries up to the commit index, for a leader
        whose loop persists before it sends)."""
        self.checks_run += 1
        previous = self._commit.get(node, 0)
        if commit < previous:
            raise Violation("commit_monotonic", f"node {node} commit {previous} -> {commit}")
        self._commit[node] = commit
        was_leader = self._role.get(node) == (Role.LEADER, term)
        if commit > previous and role == Role.LEADER and was_leader:
            self._check_commit_term(node, term, commit, storage)
        if commit > self._commit_in_term.get(term, 0):
            # A node's commit moves only on word from the leader of its current term, so
            # everything up to `commit` was committed in `term` or earlier.
            self._commit_in_term[term] = commit
        if role == Role.LEADER:
            leader = self._leader_of_term.setdefault(term, node)
            if leader != node:
                raise Violation("election_safety", f"nodes {leader} and {node} lead term {term}")
            if not was_leader:
                required = self.committed_before_term(term)
                if last_index < required:
                    raise Violation(
                        "leader_completeness",
                        f"node {node} became leader of term {term} with last index "
                        f"{last_index}, but index {required} was committed in an earlier term",
                    )
        self._role[node] = (role, term)

    def _check_commit_term(self, node: int, term: int, commit: int, storage: MemoryStorage) -> None:
        if not storage.snapshot().meta.index < commit <= storage.last_index():
            return
        commit_term = storage.term(commit)
        if commit_term != term:
            raise Violation(
                "current_term_commit",
                f"leader {node} of term {term} committed index {commit} of term {commit_term} "
                "by counting replicas",
            )

    def committed_before_term(self, term: int) -> int:
        """The highest index known committed in a term before `term`: its leaders need it."""
        return max(
            (commit for commit_term, commit in self._commit_in_term.items() if commit_term < term),
            default=0,
        )

    def start_incarnation(
        self, node: int, synced: HardState, recovered: HardState, commit: int
    ) -> None:
        """A node (re)started. `synced`: the last hard state its loop fsynced for Raft;
        `recovered`: what its disk gave back; `commit`: the restarted node's commit index."""
        self.checks_run += 1
        if commit < synced.commit:
            raise Violation(
                "commit_monotonic",
                f"node {node} restarted with commit {commit} below synced {synced.commit}",
            )
        if recovered.term < synced.term:
            raise Violation(
                "durability",
                f"node {node} restarted in term {recovered.term}, but had synced {synced.term}",
            )
        if recovered.term == synced.term and synced.vote and recovered.vote != synced.vote:
            raise Violation(
                "durability",
                f"node {node} restarted with vote {recovered.vote} in term {synced.term}, "
                f"but had synced a vote for {synced.vote}",
            )
        self._commit[node] = commit
        self._role.pop(node, None)

    def check_hard_state_handed_out(
        self, node: int, term: int, vote: int, handed_out: HardState
    ) -> None:
        """Raft's current term and vote must be the ones its latest Ready hands out to
        persist: a vote kept only in memory is forgotten by a crash, and cast again."""
        self.checks_run += 1
        if term != handed_out.term or vote != handed_out.vote:
            raise Violation(
                "durability",
                f"node {node} is in term {term} with vote {vote}, but its Ready persists "
                f"term {handed_out.term} vote {handed_out.vote}",
            )

    def check_send(self, node: int, unsynced_raft_records: int) -> None:
        """A message leaves `node`: everything Raft asked it to persist must be synced."""
        if unsynced_raft_records:
            raise Violation(
                "durability",
                f"node {node} sends with {unsynced_raft_records} Raft records not yet fsynced",
            )

    # ---- the log ----

    def observe_append(
        self, node: int, previous_index: int, previous_term: int, entries: tuple[Entry, ...]
    ) -> None:
        """`entries` are about to be written after (previous_index, previous_term)."""
        self.checks_run += 1
        chain = self._log_chain.get((previous_index, previous_term))
        if chain is None:
            raise Violation(
                "log_matching",
                f"node {node} appends after ({previous_index}, {previous_term}), "
                "an entry no leader ever wrote",
            )
        log_chain = self._log_chain
        for entry in entries:
            chain = chain_hash(chain, entry)
            key = (entry.index, entry.term)
            known = log_chain.setdefault(key, chain)
            if known != chain:
                raise Violation(
                    "log_matching",
                    f"node {node} holds ({entry.index}, {entry.term}) with a different prefix",
                )

    def check_leader_log(self, node: int, term: int, storage: MemoryStorage) -> None:
        """A leader's persisted log holds every entry committed in an earlier term."""
        self.checks_run += 1
        required = self.committed_before_term(term)
        if required <= storage.snapshot().meta.index:
            return  # covered by the leader's snapshot, itself checked at restore
        if storage.last_index() < required:
            raise Violation(
                "leader_completeness",
                f"leader {node} of term {term} has last index {storage.last_index()}, but "
                f"index {required} was committed in an earlier term",
            )
        index = min(required, self.applied_max_index)
        if index <= storage.snapshot().meta.index:
            return
        if storage.term(index) != self._applied_term[index]:
            raise Violation(
                "leader_completeness",
                f"leader {node} of term {term} holds term {storage.term(index)} at committed "
                f"index {index}, which was applied with term {self._applied_term[index]}",
            )

    # ---- state machines ----

    def observe_apply(self, node: int, entry: Entry, chain: bytes, op: Op | None) -> None:
        """A node applied `entry` (right after index - 1); `chain` is its chain hash after."""
        self.checks_run += 1
        index = entry.index
        known = self._applied_chain.get(index)
        if known is None:
            self._record_first_apply(entry, chain, op)
        elif known != chain:
            acked_op = self._acked_op_at_index.get(index)
            if acked_op is not None:
                raise Violation(
                    "acked_write_lost",
                    f"node {node} applies at {index} something else than acked op {acked_op}",
                )
            raise Violation(
                "state_machine_safety", f"node {node} applies a different entry at {index}"
            )
        if op is not None:
            first_index = self._op_index.setdefault(op.op_id, index)
            if first_index != index:
                raise Violation(
                    "duplicate_apply",
                    f"node {node} applies op {op.op_id} at {index}, already at {first_index}",
                )

    def _record_first_apply(self, entry: Entry, chain: bytes, op: Op | None) -> None:
        # The previous index is known (checked by the caller's contiguity and restore
        # checks), so first applies arrive in index order.
        assert entry.index == self.applied_max_index + 1, (entry.index, self.applied_max_index)
        self._applied_chain[entry.index] = chain
        self._applied_term[entry.index] = entry.term
        self.applied_max_index = entry.index
        if op is not None:
            self._write_indexes.setdefault(op.key, []).append(entry.index)
            self._write_values.setdefault(op.key, []).append(op.value)

    def observe_restore(self, node: int, index: int, chain: bytes) -> None:
        """A node's state machine was rebuilt from a snapshot taken at `index`."""
        self.checks_run += 1
        known = self._applied_chain.get(index)
        if known is None:
            raise Violation(
                "state_machine_safety",
                f"node {node} restores a snapshot at {index}, which no node applied",
            )
        if known != chain:
            raise Violation(
                "state_machine_safety",
                f"node {node} restores a snapshot at {index} that differs from the applied state",
            )

    # ---- clients ----

    def record_ack(self, op_id: int, index: int) -> None:
        self.checks_run += 1
        assert self._op_index.get(op_id) == index, (op_id, index)
        self._acked_op_at_index[index] = op_id
        self.acked_index_max = max(self.acked_index_max, index)
        self.acked_writes += 1

    def check_acked_present(self, node: int, applied_index: int) -> None:
        """After healing: a live member holds every acknowledged write."""
        self.checks_run += 1
        if applied_index < self.acked_index_max:
            raise Violation(
                "acked_write_lost",
                f"node {node} applied only up to {applied_index}, but index "
                f"{self.acked_index_max} was acknowledged",
            )

    def model_value(self, key: int, index: int) -> int | None:
        """The register's value after applying the log up to `index`."""
        indexes = self._write_indexes.get(key)
        if not indexes:
            return None
        position = bisect.bisect_right(indexes, index)
        return None if position == 0 else self._write_values[key][position - 1]

    def check_read(
        self,
        node: int,
        key: int,
        value: int | None,
        read_index: int,
        applied_index: int,
        acked_index_at_issue: int,
    ) -> None:
        """A ReadIndex read served `value` for `key` at `applied_index` >= `read_index`."""
        self.checks_run += 1
        assert read_index <= applied_index, (read_index, applied_index)
        if read_index < acked_index_at_issue:
            raise Violation(
                "read_linearizability",
                f"node {node} read at index {read_index}, but index {acked_index_at_issue} "
                "was acknowledged before the read began",
            )
        expected = self.model_value(key, applied_index)
        if value != expected:
            raise Violation(
                "read_linearizability",
                f"node {node} read key {key} = {value} at {applied_index}; the log says {expected}",
            )
