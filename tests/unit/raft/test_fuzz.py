"""Fuzzed messages stepped into the nodes of a live cluster.

Raft trusts its peers: a well-formed message that lies (a vote grant never given, an
acknowledgement of entries never stored) can break agreement, and no check can tell it
from the truth. So the fuzzing is split by what can be promised:

- Arbitrary messages, well-formed or not: stepping them never raises, and each node's own
  invariants hold (applied <= commit <= last index, commit never goes back).
- Impossible messages (a correct peer could not send them) are each dropped and counted,
  change nothing, and — mixed with replays of genuine messages at any later time, which
  is what a real network does — never break election safety, log matching or state
  machine safety.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raft import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageType,
    SnapshotMeta,
)
from tests.unit.raft.harness import Cluster
from tests.unit.raft.invariants import SafetyChecker
from tests.unit.raft.schedule import Schedule
from tests.unit.raft.single import observable_state

FUZZ_SETTINGS = settings(
    derandomize=True,
    max_examples=150,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NODE_IDS = (1, 2, 3)
small = st.integers(min_value=-2, max_value=12)

conf_change_data = st.sampled_from(
    [
        ConfChange(ConfChangeKind.ADD_LEARNER, 4).encode(),
        ConfChange(ConfChangeKind.ADD_VOTER, 2).encode(),
        ConfChange(ConfChangeKind.REMOVE, 3).encode(),
        ConfChange(ConfChangeKind.REMOVE, 0).encode(),
        b"\xc1",
        b"",
    ]
)
entries_data = st.one_of(st.binary(max_size=6), conf_change_data)
entry_kinds = st.sampled_from(list(EntryKind))
any_entry = st.builds(Entry, term=small, index=small, kind=entry_kinds, data=entries_data)


@st.composite
def contiguous_entries(draw: st.DrawFn, index: int, log_term: int, term: int) -> tuple[Entry, ...]:
    """Entries a plausible leader could send after (index, log_term): increasing terms."""
    count = draw(st.integers(min_value=0, max_value=4))
    entries = []
    previous = max(log_term, 0)
    for offset in range(count):
        entry_term = draw(st.integers(min_value=previous, max_value=max(previous, term)))
        entries.append(
            Entry(
                term=entry_term,
                index=index + 1 + offset,
                kind=draw(entry_kinds),
                data=draw(entries_data),
            )
        )
        previous = entry_term
    return tuple(entries)


conf_states = st.builds(
    ConfState,
    voters=st.lists(st.integers(min_value=-1, max_value=5), max_size=4).map(tuple),
    learners=st.lists(st.integers(min_value=-1, max_value=5), max_size=2).map(tuple),
)
snapshot_metas = st.builds(SnapshotMeta, index=small, term=small, conf=conf_states)


@st.composite
def messages(draw: st.DrawFn, target: int) -> Message:
    """A message to `target`: usually from a member, with fields near the live values."""
    kind = draw(st.sampled_from(list(MessageType)))
    term = draw(small)
    index = draw(small)
    log_term = draw(small)
    plausible = draw(st.booleans())
    entries = (
        draw(contiguous_entries(index, log_term, term))
        if plausible
        else tuple(draw(st.lists(any_entry, max_size=3)))
    )
    chunk = draw(st.binary(max_size=10))
    if kind == MessageType.SNAPSHOT and draw(st.booleans()):
        # A plausible one-chunk snapshot, so that installs (with odd memberships) happen.
        meta = SnapshotMeta(
            index=draw(st.integers(min_value=1, max_value=12)),
            term=draw(st.integers(min_value=0, max_value=max(term, 0))),
            conf=draw(conf_states),
        )
        return Message(
            type=kind,
            source=draw(st.sampled_from(NODE_IDS)),
            target=target,
            term=term,
            snapshot_meta=meta,
            snapshot_size=len(chunk),
            chunk=chunk,
            chunk_done=True,
        )
    return Message(
        type=kind,
        source=draw(st.sampled_from([-1, 0, 1, 2, 3, 3, 2, 1, 9])),
        target=draw(st.sampled_from([target] * 6 + [0, 1, 2, 3])),
        term=term,
        log_term=log_term,
        index=index,
        entries=entries,
        commit=draw(small),
        reject=draw(st.booleans()),
        reject_hint=draw(small),
        hint_term=draw(small),
        context=draw(st.sampled_from([b"", b"transfer", b"\x00" * 7 + b"\x01", b"x"])),
        snapshot_meta=draw(st.none() | snapshot_metas),
        snapshot_size=draw(st.sampled_from([len(chunk), len(chunk) + 3, 0, -1, 10**12])),
        chunk_offset=draw(st.sampled_from([0, 0, 3, 8, -1])),
        chunk=chunk,
        chunk_done=draw(st.booleans()),
    )


def _live_cluster(seed: int) -> Schedule:
    cluster = Cluster(
        seed=seed,
        election_ticks=5,
        snapshot_chunk_bytes_max=4,
        snapshot_bytes_max=1000,
    )
    schedule = Schedule(cluster)
    leader = cluster.elect(1 + seed % 3)
    for i in range(3):
        leader.propose(b"warm%d" % i)
    cluster.deliver_all()
    schedule.settle()
    return schedule


# A step: ("fuzz", node, message) | ("tick",) | ("deliver", slot) | ("propose",)
def _steps(
    fuzz: Callable[[int], st.SearchStrategy[Message]],
) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    node = st.sampled_from(NODE_IDS)
    step = st.one_of(
        node.flatmap(lambda n: st.tuples(st.just("fuzz"), st.just(n), fuzz(n))),
        st.tuples(st.just("tick")),
        st.tuples(st.just("deliver"), st.integers(min_value=0, max_value=1000)),
        st.tuples(st.just("replay"), st.integers(min_value=0, max_value=1000)),
        st.tuples(st.just("propose")),
    )
    return st.lists(step, min_size=10, max_size=60)


def _common_step(schedule: Schedule, step: tuple[Any, ...]) -> None:
    kind = step[0]
    if kind == "tick":
        schedule._tick_all()
    elif kind == "deliver":
        schedule._deliver(step[1])
    elif kind == "replay" and schedule.history:
        schedule.deliver(schedule.history[step[1] % len(schedule.history)])
    elif kind == "propose":
        schedule._propose_at_leader(1)


@FUZZ_SETTINGS
@given(seed=st.integers(min_value=0, max_value=100), steps=_steps(messages))
def test_arbitrary_messages_never_raise_and_keep_local_invariants(
    seed: int, steps: list[tuple[Any, ...]]
) -> None:
    schedule = _live_cluster(seed)
    cluster = schedule.cluster
    commit_of = {n: node.commit_index for n, node in cluster.nodes.items()}
    for step in steps:
        if step[0] == "fuzz":
            cluster.nodes[step[1]].step(step[2])
        else:
            _common_step(schedule, step)
        for node_id in sorted(cluster.nodes):
            cluster.process_ready(node_id)
        for node_id, node in cluster.nodes.items():
            assert node.applied_index <= node.commit_index <= node.last_index
            assert node.commit_index >= commit_of[node_id]
            commit_of[node_id] = node.commit_index


# Each mutation turns a message into one no correct peer could send.
MUTATIONS = (
    "unknown_source",
    "negative_term",
    "negative_index",
    "negative_commit",
    "negative_log_term",
    "commit_beyond",
    "gap_in_entries",
    "log_term_beyond_term",
    "bad_snapshot_meta",
)


def _make_impossible(message: Message, mutation: str) -> Message:
    changes: dict[str, Any] = {}
    if mutation == "unknown_source":
        changes["source"] = 9
    elif mutation == "negative_term":
        changes["term"] = -1 - abs(message.term)
    elif mutation == "negative_index":
        changes["index"] = -1
    elif mutation == "negative_commit":
        changes["commit"] = -5
    elif mutation == "negative_log_term":
        changes["log_term"] = -1
    elif mutation == "commit_beyond":
        changes["type"] = MessageType.APPEND
        changes["commit"] = max(message.index, 0) + len(message.entries) + 1
    elif mutation == "gap_in_entries":
        changes["type"] = MessageType.APPEND
        changes["entries"] = (Entry(term=0, index=max(message.index, 0) + 2),)
    elif mutation == "log_term_beyond_term":
        changes["type"] = MessageType.VOTE
        changes["log_term"] = max(message.term, 0) + 1
    elif mutation == "bad_snapshot_meta":
        changes["type"] = MessageType.SNAPSHOT
        changes["snapshot_meta"] = SnapshotMeta(index=0, term=0)
    fields = {name: getattr(message, name) for name in message.__struct_fields__}
    fields.update(changes)
    return Message(**fields)


@st.composite
def impossible_messages(draw: st.DrawFn, target: int) -> Message:
    base = draw(messages(target))
    base = _with(base, source=draw(st.sampled_from([n for n in NODE_IDS if n != target])))
    base = _with(base, target=target)
    return _make_impossible(base, draw(st.sampled_from(MUTATIONS)))


def _with(message: Message, **changes: Any) -> Message:
    fields = {name: getattr(message, name) for name in message.__struct_fields__}
    fields.update(changes)
    return Message(**fields)


@FUZZ_SETTINGS
@given(seed=st.integers(min_value=0, max_value=100), steps=_steps(impossible_messages))
def test_impossible_messages_and_replays_are_harmless(
    seed: int, steps: list[tuple[Any, ...]]
) -> None:
    schedule = _live_cluster(seed)
    cluster = schedule.cluster
    checker = SafetyChecker(cluster)
    for step in steps:
        if step[0] == "fuzz":
            node = cluster.nodes[step[1]]
            cluster.process_ready(step[1])
            before = observable_state(node)
            dropped_before = sum(node.dropped.values())
            node.step(step[2])
            assert sum(node.dropped.values()) == dropped_before + 1, step[2]
            assert observable_state(node) == before
            assert not node.has_ready()
        else:
            _common_step(schedule, step)
        for node_id in sorted(cluster.nodes):
            cluster.process_ready(node_id)
        checker.check()
    schedule.heal_and_converge()
