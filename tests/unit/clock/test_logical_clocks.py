"""Lamport and vector clocks: happened-before, concurrency, and the merge algebra."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clock import LamportClock, Ordering, VectorClock

NODE_COUNT = 4

vector_clocks = st.builds(
    VectorClock,
    st.dictionaries(
        st.integers(min_value=0, max_value=NODE_COUNT - 1), st.integers(min_value=0, max_value=4)
    ),
)
# A run of a message-passing system: each step is (node, action, choice), where the action
# is a local event, a send, or the receipt of the in-flight message `choice` picks.
runs = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=NODE_COUNT - 1),
        st.sampled_from(["local", "send", "receive"]),
        st.integers(min_value=0, max_value=1_000),
    ),
    max_size=40,
)

OPPOSITE = {
    Ordering.BEFORE: Ordering.AFTER,
    Ordering.AFTER: Ordering.BEFORE,
    Ordering.EQUAL: Ordering.EQUAL,
    Ordering.CONCURRENT: Ordering.CONCURRENT,
}


def test_lamport_tick_send_receive() -> None:
    clock = LamportClock()
    assert clock.value == 0
    assert clock.tick() == 1
    assert clock.send() == 2
    assert clock.receive(10) == 11
    assert clock.receive(3) == 12
    assert clock.value == 12
    assert repr(clock) == "LamportClock(value=12)"
    with pytest.raises(AssertionError):
        clock.receive(-1)


def test_vector_clock_basics() -> None:
    empty = VectorClock()
    assert empty.to_dict() == {}
    one = empty.increment(2).increment(0).increment(2)
    assert one.to_dict() == {0: 1, 2: 2}
    assert list(one.to_dict()) == [0, 2]
    assert one[2] == 2
    assert one.get(1) == 0
    assert repr(one) == "VectorClock({0: 1, 2: 2})"
    assert empty.to_dict() == {}, "increment must not change the original"


def test_vector_clock_zero_counters_are_not_stored() -> None:
    assert VectorClock({1: 0, 3: 2}) == VectorClock({3: 2})
    assert hash(VectorClock({1: 0, 3: 2})) == hash(VectorClock({3: 2}))
    assert VectorClock({1: 0}).to_dict() == {}


def test_vector_clock_key_order_does_not_matter() -> None:
    forwards = VectorClock({1: 1, 2: 2, 3: 3})
    backwards = VectorClock({3: 3, 2: 2, 1: 1})
    assert forwards == backwards
    assert repr(forwards) == repr(backwards)


def test_vector_clock_compare_cases() -> None:
    base = VectorClock({0: 1})
    assert base.compare(base) is Ordering.EQUAL
    assert base.compare(base.increment(0)) is Ordering.BEFORE
    assert base.increment(1).compare(base) is Ordering.AFTER
    assert base.increment(1).compare(base.increment(2)) is Ordering.CONCURRENT
    assert VectorClock().compare(base) is Ordering.BEFORE


def test_vector_clock_equality_with_other_types() -> None:
    assert VectorClock() != {}
    assert VectorClock({1: 1}) != 1


@given(clock=vector_clocks)
def test_dict_round_trip(clock: VectorClock) -> None:
    assert VectorClock.from_dict(clock.to_dict()) == clock
    assert list(clock.to_dict()) == sorted(clock.to_dict())


@given(left=vector_clocks, right=vector_clocks)
def test_merge_is_commutative(left: VectorClock, right: VectorClock) -> None:
    assert left.merge(right) == right.merge(left)


@given(first=vector_clocks, second=vector_clocks, third=vector_clocks)
def test_merge_is_associative(first: VectorClock, second: VectorClock, third: VectorClock) -> None:
    assert first.merge(second).merge(third) == first.merge(second.merge(third))


@given(clock=vector_clocks)
def test_merge_is_idempotent(clock: VectorClock) -> None:
    assert clock.merge(clock) == clock


@given(left=vector_clocks, right=vector_clocks)
def test_merge_is_the_least_upper_bound(left: VectorClock, right: VectorClock) -> None:
    merged = left.merge(right)
    assert left.compare(merged) in (Ordering.BEFORE, Ordering.EQUAL)
    assert right.compare(merged) in (Ordering.BEFORE, Ordering.EQUAL)
    for node_id in range(NODE_COUNT):
        assert merged[node_id] == max(left[node_id], right[node_id])


@given(left=vector_clocks, right=vector_clocks)
def test_compare_is_antisymmetric(left: VectorClock, right: VectorClock) -> None:
    ordering = left.compare(right)
    assert right.compare(left) is OPPOSITE[ordering]
    assert (ordering is Ordering.EQUAL) == (left == right)


@given(
    base=vector_clocks, first=st.integers(0, NODE_COUNT - 1), second=st.integers(0, NODE_COUNT - 1)
)
def test_independent_increments_are_concurrent(base: VectorClock, first: int, second: int) -> None:
    left = base.increment(first)
    right = base.increment(second)
    expected = Ordering.EQUAL if first == second else Ordering.CONCURRENT
    assert left.compare(right) is expected


@given(run=runs)
def test_clocks_agree_with_happened_before(run: list[tuple[int, str, int]]) -> None:
    """Replay a run, compute happened-before from its event graph, and check that vector
    clocks report it exactly and Lamport clocks are consistent with it."""
    lamports = [LamportClock() for _ in range(NODE_COUNT)]
    vectors = [VectorClock() for _ in range(NODE_COUNT)]
    last_event: list[int | None] = [None] * NODE_COUNT
    in_flight: list[tuple[int, int, VectorClock]] = []  # (send event, lamport, vector)
    ancestors: list[set[int]] = []  # strict happened-before predecessors of each event
    stamps: list[tuple[int, VectorClock]] = []

    for node, action, choice in run:
        if action == "receive" and not in_flight:
            action = "local"
        predecessors: set[int] = set()
        previous_event = last_event[node]
        if previous_event is not None:
            predecessors.add(previous_event)
        if action == "receive":
            send_event, remote_lamport, remote_vector = in_flight.pop(choice % len(in_flight))
            predecessors.add(send_event)
            lamport = lamports[node].receive(remote_lamport)
            vectors[node] = vectors[node].merge(remote_vector).increment(node)
        else:
            lamport = lamports[node].send() if action == "send" else lamports[node].tick()
            vectors[node] = vectors[node].increment(node)
        event = len(stamps)
        ancestors.append(set().union(predecessors, *(ancestors[p] for p in predecessors)))
        stamps.append((lamport, vectors[node]))
        last_event[node] = event
        if action == "send":
            in_flight.append((event, lamport, vectors[node]))

    for later, (lamport_later, vector_later) in enumerate(stamps):
        for earlier, (lamport_earlier, vector_earlier) in enumerate(stamps[:later]):
            if earlier in ancestors[later]:
                assert vector_earlier.compare(vector_later) is Ordering.BEFORE
                assert lamport_earlier < lamport_later
            else:
                assert vector_earlier.compare(vector_later) is Ordering.CONCURRENT


@given(hops=st.lists(st.integers(0, NODE_COUNT - 1), min_size=1, max_size=20))
def test_send_receive_chain_is_ordered(hops: list[int]) -> None:
    """A message relayed node to node: every hop's stamp is after the previous hop's."""
    lamports = [LamportClock() for _ in range(NODE_COUNT)]
    vectors = [VectorClock() for _ in range(NODE_COUNT)]
    carried_lamport = lamports[hops[0]].send()
    vectors[hops[0]] = vectors[hops[0]].increment(hops[0])
    carried_vector = vectors[hops[0]]
    for node in hops[1:]:
        lamport = lamports[node].receive(carried_lamport)
        vectors[node] = vectors[node].merge(carried_vector).increment(node)
        assert lamport > carried_lamport
        assert carried_vector.compare(vectors[node]) is Ordering.BEFORE
        carried_lamport, carried_vector = lamport, vectors[node]
