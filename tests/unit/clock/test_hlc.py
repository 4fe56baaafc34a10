"""HybridLogicalClock: the Kulkarni et al. rules, offset refusal, overflow carry, encoding."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clock import ClockOffsetError, HlcTimestamp, HybridLogicalClock, SimClock, SimTime
from clock._hlc import LOGICAL_MAX

MAX_OFFSET_NS = 500_000_000
WALL_BASE_NS = 1_700_000_000_000_000_000


class FakeWallClock:
    """A clock whose readings the test sets directly, backwards too."""

    def __init__(self, wall_ns: int = WALL_BASE_NS) -> None:
        self.now_ns = wall_ns

    def monotonic_ns(self) -> int:
        return 0

    def wall_ns(self) -> int:
        return self.now_ns


physical_ns = st.integers(min_value=WALL_BASE_NS - 10_000, max_value=WALL_BASE_NS + 10_000)
timestamps = st.builds(
    HlcTimestamp,
    wall_ns=st.integers(min_value=0, max_value=1 << 62),
    logical=st.integers(min_value=0, max_value=LOGICAL_MAX),
)
# Events against a wall clock that wanders back and forth: ("now", physical) or
# ("update", physical, remote wall relative to physical, remote logical).
events = st.lists(
    st.one_of(
        st.tuples(st.just("now"), physical_ns, st.just(0), st.just(0)),
        st.tuples(
            st.just("update"),
            physical_ns,
            st.integers(min_value=-20_000, max_value=MAX_OFFSET_NS),
            st.sampled_from([0, 1, 2, LOGICAL_MAX - 1, LOGICAL_MAX]),
        ),
    ),
    max_size=60,
)


def test_now_follows_physical_time_when_it_advances() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    assert hlc.now() == HlcTimestamp(WALL_BASE_NS, 0)
    physical.now_ns += 10
    assert hlc.now() == HlcTimestamp(WALL_BASE_NS + 10, 0)


def test_now_counts_logically_when_physical_stalls_or_goes_back() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    hlc.now()
    assert hlc.now() == HlcTimestamp(WALL_BASE_NS, 1)
    physical.now_ns -= 1_000
    assert hlc.now() == HlcTimestamp(WALL_BASE_NS, 2)
    assert hlc.last == HlcTimestamp(WALL_BASE_NS, 2)


def test_update_takes_remote_time_when_ahead() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    hlc.now()
    remote = HlcTimestamp(WALL_BASE_NS + 100, 7)
    assert hlc.update(remote) == HlcTimestamp(WALL_BASE_NS + 100, 8)


def test_update_with_equal_walls_takes_the_larger_logical() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    hlc.update(HlcTimestamp(WALL_BASE_NS, 3))
    assert hlc.last == HlcTimestamp(WALL_BASE_NS, 4)
    assert hlc.update(HlcTimestamp(WALL_BASE_NS, 9)) == HlcTimestamp(WALL_BASE_NS, 10)
    assert hlc.update(HlcTimestamp(WALL_BASE_NS, 2)) == HlcTimestamp(WALL_BASE_NS, 11)


def test_update_resets_logical_when_physical_leads() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    assert hlc.update(HlcTimestamp(WALL_BASE_NS - 5, 40)) == HlcTimestamp(WALL_BASE_NS, 0)


def test_send_and_receive_are_now_and_update() -> None:
    physical = FakeWallClock()
    sender = HybridLogicalClock(physical, MAX_OFFSET_NS)
    receiver = HybridLogicalClock(physical, MAX_OFFSET_NS)
    stamp = sender.send()
    assert receiver.receive(stamp) == HlcTimestamp(WALL_BASE_NS, 1)


def test_remote_beyond_max_offset_is_refused_and_state_unchanged() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    before = hlc.now()
    remote = HlcTimestamp(WALL_BASE_NS + MAX_OFFSET_NS + 1, 0)
    with pytest.raises(ClockOffsetError) as raised:
        hlc.update(remote)
    assert hlc.last == before
    message = str(raised.value)
    assert str(remote) in message
    assert str(WALL_BASE_NS) in message
    assert str(MAX_OFFSET_NS) in message
    assert raised.value.offset_ns == MAX_OFFSET_NS + 1
    # Exactly at the limit is accepted.
    accepted = hlc.update(HlcTimestamp(WALL_BASE_NS + MAX_OFFSET_NS, 0))
    assert accepted == HlcTimestamp(WALL_BASE_NS + MAX_OFFSET_NS, 1)


def test_offset_is_judged_against_physical_time_not_hlc_time() -> None:
    """A clock already dragged forward still refuses a stamp far ahead of its physical time."""
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    hlc.update(HlcTimestamp(WALL_BASE_NS + MAX_OFFSET_NS, 0))
    with pytest.raises(ClockOffsetError):
        hlc.update(HlcTimestamp(WALL_BASE_NS + MAX_OFFSET_NS + 1, 0))


def test_logical_overflow_carries_into_wall() -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    remote = HlcTimestamp(WALL_BASE_NS + 10, LOGICAL_MAX)
    assert hlc.update(remote) == HlcTimestamp(WALL_BASE_NS + 11, 0)
    # now() carries the same way: drive logical to the maximum with the physical clock stalled.
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    hlc.update(HlcTimestamp(WALL_BASE_NS, LOGICAL_MAX - 1))
    assert hlc.last == HlcTimestamp(WALL_BASE_NS, LOGICAL_MAX)
    assert hlc.now() == HlcTimestamp(WALL_BASE_NS + 1, 0)


def test_timestamp_rejects_out_of_range_fields() -> None:
    with pytest.raises(AssertionError):
        HlcTimestamp(wall_ns=0, logical=LOGICAL_MAX + 1)
    with pytest.raises(AssertionError):
        HlcTimestamp(wall_ns=-1, logical=0)


def test_timestamp_encodes_as_a_pair_and_decoding_checks_bounds() -> None:
    stamp = HlcTimestamp(WALL_BASE_NS, 5)
    encoded = msgspec.msgpack.encode(stamp)
    assert msgspec.msgpack.decode(encoded) == [WALL_BASE_NS, 5]
    assert msgspec.msgpack.decode(encoded, type=HlcTimestamp) == stamp
    bad = msgspec.msgpack.encode([WALL_BASE_NS, LOGICAL_MAX + 1])
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(bad, type=HlcTimestamp)


@given(stamp=timestamps)
def test_pack_round_trips(stamp: HlcTimestamp) -> None:
    packed = stamp.pack()
    assert packed >= 0
    assert HlcTimestamp.unpack(packed) == stamp


@given(left=timestamps, right=timestamps)
def test_pack_preserves_order(left: HlcTimestamp, right: HlcTimestamp) -> None:
    assert (left < right) == (left.pack() < right.pack())
    assert (left == right) == (left.pack() == right.pack())


@given(events=events)
def test_hlc_never_goes_backwards_and_update_exceeds_both(
    events: list[tuple[str, int, int, int]],
) -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, MAX_OFFSET_NS)
    for kind, physical_now_ns, remote_ahead_ns, remote_logical in events:
        physical.now_ns = physical_now_ns
        previous = hlc.last
        if kind == "now":
            stamp = hlc.now()
        else:
            remote = HlcTimestamp(physical_now_ns + remote_ahead_ns, remote_logical)
            stamp = hlc.update(remote)
            assert stamp > remote
        assert stamp > previous
        assert stamp == hlc.last
        # The HLC never lags the physical clock it reads.
        assert stamp.wall_ns >= physical_now_ns


@given(events=events, max_offset_ns=st.integers(min_value=1, max_value=MAX_OFFSET_NS))
def test_refusal_happens_exactly_beyond_max_offset_and_changes_nothing(
    events: list[tuple[str, int, int, int]], max_offset_ns: int
) -> None:
    physical = FakeWallClock()
    hlc = HybridLogicalClock(physical, max_offset_ns)
    for _kind, physical_now_ns, remote_ahead_ns, remote_logical in events:
        physical.now_ns = physical_now_ns
        previous = hlc.last
        remote = HlcTimestamp(physical_now_ns + remote_ahead_ns, remote_logical)
        if remote_ahead_ns > max_offset_ns:
            with pytest.raises(ClockOffsetError):
                hlc.update(remote)
            assert hlc.last == previous
        else:
            assert hlc.update(remote) > previous


@given(
    drifts_ppm=st.lists(st.integers(min_value=-200, max_value=200), min_size=3, max_size=3),
    offsets_ns=st.lists(
        st.integers(min_value=-1_000_000, max_value=1_000_000), min_size=3, max_size=3
    ),
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),
            st.integers(min_value=0, max_value=2),
            st.integers(min_value=0, max_value=5_000_000),
            st.integers(min_value=-3_000_000, max_value=3_000_000),
        ),
        max_size=40,
    ),
)
def test_messages_between_drifting_sim_clocks_are_stamped_in_causal_order(
    drifts_ppm: list[int], offsets_ns: list[int], steps: list[tuple[int, int, int, int]]
) -> None:
    """Each message's receive stamp exceeds its send stamp and the receiver's earlier stamps,
    across skewed, drifting, jumping simulated clocks."""
    sim_time = SimTime()
    clocks = [
        SimClock(sim_time, drift_ppm=drift, offset_ns=offset)
        for drift, offset in zip(drifts_ppm, offsets_ns, strict=True)
    ]
    hlcs = [HybridLogicalClock(clock, MAX_OFFSET_NS) for clock in clocks]
    for source, target, delay_ns, jump_ns in steps:
        clocks[source].jump(jump_ns)
        sent = hlcs[source].send()
        sim_time.advance_by(delay_ns)
        target_before = hlcs[target].last
        received = hlcs[target].receive(sent)
        assert received > sent
        assert received > target_before
