"""The register machine: deterministic, canonical snapshots, membership tracked by apply."""

from __future__ import annotations

from chaos.statemachine import CHAIN_EMPTY, Op, RegisterMachine, decode_op, encode_op
from raft import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Snapshot,
    SnapshotMeta,
)

CONF = ConfState(voters=(1, 2, 3))


def log() -> list[Entry]:
    ops = [Op(1, 5, 10), Op(2, 1, 20), Op(3, 5, 30)]
    entries = [Entry(term=1, index=1)]  # a leader's no-op
    entries += [Entry(term=1, index=2 + i, data=encode_op(op)) for i, op in enumerate(ops)]
    change = ConfChange(ConfChangeKind.ADD_LEARNER, 4)
    entries.append(Entry(term=2, index=5, kind=EntryKind.CONF_CHANGE, data=change.encode()))
    return entries


def test_apply_tracks_registers_chain_and_membership() -> None:
    machine = RegisterMachine(CONF)
    assert machine.chain == CHAIN_EMPTY
    ops = [machine.apply(entry) for entry in log()]
    assert ops[0] is None and ops[4] is None
    assert ops[1] == Op(1, 5, 10)
    assert machine.value(5) == 30
    assert machine.value(1) == 20
    assert machine.value(2) is None
    assert machine.applied_index == 5
    assert machine.conf == ConfState(voters=(1, 2, 3), learners=(4,))
    assert decode_op(log()[2]) == Op(2, 1, 20)


def test_snapshots_are_canonical_and_restore_the_same_state() -> None:
    first, second = RegisterMachine(CONF), RegisterMachine(CONF)
    for entry in log():
        first.apply(entry)
        second.apply(entry)
    assert first.snapshot_bytes() == second.snapshot_bytes()
    meta = SnapshotMeta(index=5, term=2, conf=first.conf)
    restored = RegisterMachine.from_snapshot(Snapshot(meta=meta, data=first.snapshot_bytes()))
    assert restored.snapshot_bytes() == first.snapshot_bytes()
    assert restored.chain == first.chain
    assert restored.conf == first.conf
    assert restored.value(5) == 30


def test_the_bootstrap_snapshot_is_an_empty_machine() -> None:
    machine = RegisterMachine.from_snapshot(Snapshot(meta=SnapshotMeta(conf=CONF)))
    assert machine.applied_index == 0
    assert machine.conf == CONF
    assert machine.value(0) is None
