"""LinkFaults: directed drop rules and added delay per link, all off until switched on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.faults import DELAY_NS_MAX, LinkFaults


def test_a_new_instance_has_no_faults() -> None:
    faults = LinkFaults()
    assert not faults.active
    assert faults.blocked_links() == []
    assert not faults.blocks(1, 2)
    assert faults.delay_ns(1, 2) == 0


def test_a_block_is_directed() -> None:
    faults = LinkFaults()
    faults.block(1, 2)
    assert faults.active
    assert faults.blocks(1, 2)
    assert not faults.blocks(2, 1)
    assert not faults.blocks(1, 3)
    assert faults.blocked_links() == [(1, 2)]


def test_blocking_twice_then_unblocking_once_clears_the_link() -> None:
    faults = LinkFaults()
    faults.block(1, 2)
    faults.block(1, 2)
    assert faults.blocked_links() == [(1, 2)]
    faults.unblock(1, 2)
    assert not faults.blocks(1, 2)
    assert not faults.active


def test_unblocking_a_link_that_is_not_blocked_is_harmless() -> None:
    faults = LinkFaults()
    faults.block(2, 1)
    faults.unblock(1, 2)
    assert faults.blocked_links() == [(2, 1)]


def test_a_node_cannot_block_itself() -> None:
    with pytest.raises(AssertionError):
        LinkFaults().block(3, 3)


def test_a_partition_cuts_both_directions_between_the_sides_only() -> None:
    faults = LinkFaults()
    faults.partition([1, 2], [3])
    assert faults.blocked_links() == [(1, 3), (2, 3), (3, 1), (3, 2)]
    assert not faults.blocks(1, 2) and not faults.blocks(2, 1)


def test_a_partition_takes_any_iterables() -> None:
    faults = LinkFaults()
    faults.partition((node for node in (4, 5)), {1})
    assert faults.blocked_links() == [(1, 4), (1, 5), (4, 1), (5, 1)]


def test_partition_sides_must_not_overlap() -> None:
    faults = LinkFaults()
    with pytest.raises(AssertionError):
        faults.partition([1, 2], [2, 3])
    assert faults.blocked_links() == []


def test_partitions_add_up_and_heal_removes_everything() -> None:
    faults = LinkFaults()
    faults.partition([1], [2])
    faults.partition([1], [3])
    faults.set_delay(2, 3, 5_000_000)
    assert faults.blocked_links() == [(1, 2), (1, 3), (2, 1), (3, 1)]
    faults.heal()
    assert not faults.active
    assert faults.blocked_links() == []
    assert faults.delay_ns(2, 3) == 0


def test_a_delay_is_directed_and_replaced_by_the_next_one() -> None:
    faults = LinkFaults()
    faults.set_delay(1, 2, 1_000)
    assert faults.active
    assert faults.delay_ns(1, 2) == 1_000
    assert faults.delay_ns(2, 1) == 0
    faults.set_delay(1, 2, 7_000)
    assert faults.delay_ns(1, 2) == 7_000
    assert not faults.blocks(1, 2), "a delay is not a drop"


def test_a_zero_delay_removes_the_rule() -> None:
    faults = LinkFaults()
    faults.set_delay(1, 2, 1_000)
    faults.set_delay(1, 2, 0)
    assert faults.delay_ns(1, 2) == 0
    assert not faults.active


def test_delays_are_bounded() -> None:
    faults = LinkFaults()
    faults.set_delay(1, 2, DELAY_NS_MAX)
    assert faults.delay_ns(1, 2) == DELAY_NS_MAX
    with pytest.raises(AssertionError):
        faults.set_delay(1, 2, DELAY_NS_MAX + 1)
    with pytest.raises(AssertionError):
        faults.set_delay(1, 2, -1)
    assert faults.delay_ns(1, 2) == DELAY_NS_MAX


def test_instances_share_nothing() -> None:
    first, second = LinkFaults(), LinkFaults()
    first.block(1, 2)
    first.set_delay(1, 3, 10)
    assert not second.active


links = st.tuples(st.integers(1, 5), st.integers(1, 5)).filter(lambda link: link[0] != link[1])
operations = st.lists(
    st.tuples(st.sampled_from(["block", "unblock", "delay", "heal"]), links, st.integers(0, 3)),
    max_size=30,
)


@settings(derandomize=True, database=None, max_examples=200)
@given(script=operations)
def test_rules_match_a_model(script: list[tuple[str, tuple[int, int], int]]) -> None:
    """Any sequence of calls leaves exactly the rules a plain set and dict would hold."""
    faults = LinkFaults()
    blocked: set[tuple[int, int]] = set()
    delays: dict[tuple[int, int], int] = {}
    for operation, link, delay_ns in script:
        if operation == "block":
            faults.block(*link)
            blocked.add(link)
        elif operation == "unblock":
            faults.unblock(*link)
            blocked.discard(link)
        elif operation == "delay":
            faults.set_delay(*link, delay_ns)
            delays[link] = delay_ns
        else:
            faults.heal()
            blocked.clear()
            delays.clear()
    assert faults.blocked_links() == sorted(blocked)
    for source in range(1, 6):
        for target in range(1, 6):
            link = (source, target)
            assert faults.blocks(source, target) == (link in blocked)
            assert faults.delay_ns(source, target) == delays.get(link, 0)
    assert faults.active == bool(blocked or any(delays.values()))
