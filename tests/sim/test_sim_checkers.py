"""Every checker flags a fabricated violation (no checker is vacuous), and lets a lawful
history through. The last tests plant a broken IO loop and a broken Raft through the
simulator's hooks and see the simulator name what broke."""

from __future__ import annotations

import pytest

from chaos.checkers import INVARIANTS, InvariantChecker, Violation
from chaos.driver import NodeDriver
from chaos.nemesis import FaultConfig
from chaos.simulator import Simulator
from chaos.statemachine import CHAIN_EMPTY, Op, RegisterMachine, chain_hash, encode_op
from raft import (
    BOOTSTRAP_INDEX,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    RaftNode,
    Ready,
    Role,
    bootstrap_snapshot,
)

CONF = ConfState(voters=(1, 2, 3))
BOOTSTRAP_TERM = bootstrap_snapshot(CONF).meta.term
FIRST = BOOTSTRAP_INDEX + 1
"""A founder's first real log index: its log starts after the bootstrap snapshot."""
TERM = BOOTSTRAP_TERM + 1
"""The first term a founder can be elected in."""


def write(index: int, term: int, op_id: int, key: int = 0) -> tuple[Entry, Op]:
    op = Op(op_id, key, op_id * 10)
    return Entry(term=term, index=index, data=encode_op(op)), op


def storage_with(*entries: Entry) -> MemoryStorage:
    storage = MemoryStorage(conf=CONF)
    storage.append(list(entries))
    return storage


def flagged(invariant: str) -> pytest.RaisesExc[Violation]:
    return pytest.raises(Violation, match=f"^{invariant}:")


class Applier:
    """Feeds a node's applies to the checker the way the driver does."""

    def __init__(self, checker: InvariantChecker, node: int) -> None:
        self.checker = checker
        self.node = node
        self.machine = RegisterMachine.from_snapshot(bootstrap_snapshot(CONF))

    def apply(self, entry: Entry) -> None:
        op = self.machine.apply(entry)
        self.checker.observe_apply(self.node, entry, self.machine.chain, op)


def test_every_invariant_has_a_name() -> None:
    assert len(set(INVARIANTS)) == len(INVARIANTS)
    with pytest.raises(AssertionError):
        Violation("no_such_invariant", "")


def test_a_lawful_history_passes() -> None:
    checker = InvariantChecker()
    storage = storage_with()
    checker.observe_restore(1, BOOTSTRAP_INDEX, CHAIN_EMPTY)  # every founder starts here
    checker.observe_node(1, Role.LEADER, TERM, BOOTSTRAP_INDEX, BOOTSTRAP_INDEX, storage)
    second = FIRST + 1
    entry1, op1 = write(FIRST, TERM, op_id=1, key=3)
    entry2, op2 = write(second, TERM, op_id=2, key=3)
    checker.observe_append(1, BOOTSTRAP_INDEX, BOOTSTRAP_TERM, (entry1, entry2))
    checker.observe_append(2, BOOTSTRAP_INDEX, BOOTSTRAP_TERM, (entry1,))
    checker.observe_append(2, FIRST, TERM, (entry2,))
    storage.append([entry1, entry2])
    checker.observe_node(1, Role.LEADER, TERM, second, second, storage)
    for node in (1, 2):
        applier = Applier(checker, node)
        applier.apply(entry1)
        applier.apply(entry2)
    checker.record_ack(op1.op_id, FIRST)
    checker.record_ack(op2.op_id, second)
    checker.check_read(
        2, 3, 20, read_index=second, applied_index=second, acked_index_at_issue=second
    )
    checker.check_read(2, 3, 10, read_index=FIRST, applied_index=FIRST, acked_index_at_issue=FIRST)
    checker.check_read(
        2, 5, None, read_index=second, applied_index=second, acked_index_at_issue=second
    )
    checker.check_acked_present(2, second)
    checker.check_leader_log(1, TERM, storage)
    checker.observe_node(3, Role.LEADER, TERM + 1, BOOTSTRAP_INDEX, second, storage)
    checker.check_leader_log(3, TERM + 1, storage)
    checker.check_send(1, 0)
    synced = HardState(term=TERM + 1, vote=3, commit=second)
    checker.start_incarnation(1, synced, synced, second)
    checker.check_hard_state_handed_out(1, TERM + 1, 3, synced)
    assert checker.elections == 2
    assert checker.checks_run > 10


def test_election_safety() -> None:
    checker = InvariantChecker()
    storage = storage_with()
    checker.observe_node(1, Role.LEADER, 4, 0, 0, storage)
    checker.observe_node(2, Role.LEADER, 5, 0, 0, storage)
    with flagged("election_safety"):
        checker.observe_node(3, Role.LEADER, 4, 0, 0, storage)


def test_log_matching_same_index_and_term_different_prefix() -> None:
    checker = InvariantChecker()
    after = (BOOTSTRAP_INDEX, BOOTSTRAP_TERM)
    checker.observe_append(1, *after, (write(FIRST, TERM, 1)[0], write(FIRST + 1, TERM + 1, 2)[0]))
    with flagged("log_matching"):
        checker.observe_append(
            2, *after, (write(FIRST, TERM, 9)[0], write(FIRST + 1, TERM + 1, 2)[0])
        )


def test_log_matching_append_after_an_entry_no_leader_wrote() -> None:
    checker = InvariantChecker()
    with flagged("log_matching"):
        checker.observe_append(1, 7, 3, (write(8, 3, 1)[0],))


def test_leader_completeness_on_election() -> None:
    checker = InvariantChecker()
    storage = storage_with()
    checker.observe_node(1, Role.FOLLOWER, 2, 5, 5, storage)  # index 5 committed in term 2
    with flagged("leader_completeness"):
        checker.observe_node(2, Role.LEADER, 3, 0, 4, storage)


def test_leader_completeness_in_the_persisted_log() -> None:
    checker = InvariantChecker()
    entry, _ = write(FIRST, TERM, 1)
    Applier(checker, 1).apply(entry)
    checker.observe_node(1, Role.FOLLOWER, TERM, FIRST, FIRST, storage_with(entry))
    with flagged("leader_completeness"):
        checker.check_leader_log(2, TERM + 1, storage_with(write(FIRST, TERM + 1, 5)[0]))
    with flagged("leader_completeness"):
        checker.check_leader_log(2, TERM + 1, storage_with())


def test_state_machine_safety_different_entry_at_an_index() -> None:
    checker = InvariantChecker()
    Applier(checker, 1).apply(write(FIRST, TERM, 1)[0])
    with flagged("state_machine_safety"):
        Applier(checker, 2).apply(write(FIRST, TERM, 2)[0])


def test_state_machine_safety_restore_of_a_state_never_applied() -> None:
    checker = InvariantChecker()
    Applier(checker, 1).apply(write(FIRST, TERM, 1)[0])
    with flagged("state_machine_safety"):
        checker.observe_restore(2, FIRST, chain_hash(CHAIN_EMPTY, write(FIRST, TERM, 2)[0]))
    with flagged("state_machine_safety"):
        checker.observe_restore(2, 9, CHAIN_EMPTY)


def test_commit_monotonic_within_an_incarnation() -> None:
    checker = InvariantChecker()
    storage = storage_with()
    checker.observe_node(1, Role.FOLLOWER, 1, 5, 5, storage)
    with flagged("commit_monotonic"):
        checker.observe_node(1, Role.FOLLOWER, 1, 4, 5, storage)


def test_commit_monotonic_across_a_restart() -> None:
    checker = InvariantChecker()
    synced = HardState(term=1, vote=1, commit=5)
    with flagged("commit_monotonic"):
        checker.start_incarnation(1, synced, synced, commit=3)


def test_acked_write_lost_when_overwritten() -> None:
    checker = InvariantChecker()
    entry, op = write(FIRST, TERM, 1)
    Applier(checker, 1).apply(entry)
    checker.record_ack(op.op_id, FIRST)
    with flagged("acked_write_lost"):
        Applier(checker, 2).apply(write(FIRST, TERM + 1, 2)[0])


def test_acked_write_lost_when_missing_after_healing() -> None:
    checker = InvariantChecker()
    applier = Applier(checker, 1)
    for op_id, index in enumerate((FIRST, FIRST + 1), start=1):
        entry, op = write(index, TERM, op_id)
        applier.apply(entry)
        checker.record_ack(op.op_id, index)
    with flagged("acked_write_lost"):
        checker.check_acked_present(2, FIRST)


def test_duplicate_apply() -> None:
    checker = InvariantChecker()
    applier = Applier(checker, 1)
    applier.apply(write(FIRST, TERM, 7)[0])
    with flagged("duplicate_apply"):
        applier.apply(write(FIRST + 1, TERM, 7)[0])


def test_read_linearizability_stale_read_index() -> None:
    checker = InvariantChecker()
    applier = Applier(checker, 1)
    for op_id, index in enumerate((FIRST, FIRST + 1), start=1):
        entry, op = write(index, TERM, op_id)
        applier.apply(entry)
        checker.record_ack(op.op_id, index)
    # The value is right for index FIRST; only the read index is stale.
    with flagged("read_linearizability"):
        checker.check_read(
            3, 0, 10, read_index=FIRST, applied_index=FIRST, acked_index_at_issue=FIRST + 1
        )


def test_read_linearizability_wrong_value() -> None:
    checker = InvariantChecker()
    Applier(checker, 1).apply(write(FIRST, TERM, 1, key=4)[0])
    with flagged("read_linearizability"):
        checker.check_read(1, 4, 99, read_index=FIRST, applied_index=FIRST, acked_index_at_issue=0)
    with flagged("read_linearizability"):
        checker.check_read(
            1, 4, None, read_index=FIRST, applied_index=FIRST, acked_index_at_issue=0
        )


def test_durability_send_before_fsync() -> None:
    with flagged("durability"):
        InvariantChecker().check_send(1, unsynced_raft_records=1)


def test_durability_vote_lost_across_a_restart() -> None:
    checker = InvariantChecker()
    with flagged("durability"):
        checker.start_incarnation(1, HardState(3, 2, 0), HardState(3, 0, 0), commit=0)
    with flagged("durability"):
        checker.start_incarnation(1, HardState(3, 2, 0), HardState(2, 2, 0), commit=0)


def test_durability_vote_never_handed_out() -> None:
    with flagged("durability"):
        InvariantChecker().check_hard_state_handed_out(1, 3, 2, HardState(3, 0, 0))


def test_current_term_commit() -> None:
    checker = InvariantChecker()
    storage = storage_with(
        write(FIRST, TERM, 1)[0],
        write(FIRST + 1, TERM, 2)[0],
        Entry(term=TERM + 1, index=FIRST + 2),
    )
    checker.observe_node(1, Role.LEADER, TERM + 1, FIRST, FIRST + 2, storage)
    with flagged("current_term_commit"):  # FIRST + 1 is of term TERM, not the leader's
        checker.observe_node(1, Role.LEADER, TERM + 1, FIRST + 1, FIRST + 2, storage)


class NeverCampaigns(RaftNode):
    def tick(self) -> None:
        pass


class RaisesOnAppend(RaftNode):
    def step(self, message: Message) -> None:
        if message.entries:
            raise RuntimeError("planted")
        super().step(message)


class SendsBeforeFsync(NodeDriver):
    """Planted IO-loop bug: messages leave before the Ready's writes are durable."""

    def persist(self, ready: Ready) -> None:
        super().persist(ready)
        super().send(ready)

    def send(self, ready: Ready) -> None:
        pass


def test_liveness_is_flagged_when_no_leader_is_ever_elected() -> None:
    simulator = Simulator(
        1,
        nodes=3,
        steps=200,
        faults=FaultConfig.none(),
        node_factory=NeverCampaigns,
        heal_ns_max=2_000_000_000,
    )
    result = simulator.run()
    assert result.violation == "liveness"
    assert result.steps > 200


def test_an_exception_in_the_simulated_code_is_reported() -> None:
    result = Simulator(1, nodes=3, steps=3000, node_factory=RaisesOnAppend).run()
    assert result.violation == "exception"
    assert "planted" in result.detail


def test_driver_factory_hook_catches_send_before_fsync() -> None:
    result = Simulator(1, nodes=3, steps=3000, driver_factory=SendsBeforeFsync).run()
    assert result.violation == "durability"
