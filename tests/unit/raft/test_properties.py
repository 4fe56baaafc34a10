"""Hypothesis property tests: random schedules of ticks, reordered/lost/duplicated
messages, proposals, partitions, crash-restarts, compaction, membership changes,
transfers and reads over 3–5 node harness clusters keep election safety, log matching,
state machine safety and commit monotonicity; once the faults stop, the cluster makes
progress again. Derandomized: the same examples run every time."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.raft.harness import Cluster
from tests.unit.raft.schedule import Schedule, steps

PROPERTY_SETTINGS = settings(
    derandomize=True,
    max_examples=150,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLUSTERS = {
    "3 voters": ((1, 2, 3), ()),
    "5 voters": ((1, 2, 3, 4, 5), ()),
    "3 voters + 2 learners": ((1, 2, 3), (4, 5)),
}


def _run(
    shape: str, seed: int, schedule_steps: list[tuple[int, int, int]], **config: Any
) -> Schedule:
    voters, learners = CLUSTERS[shape]
    cluster = Cluster(
        voters=voters,
        learners=learners,
        seed=seed,
        election_ticks=5,
        heartbeat_ticks=1,
        snapshot_chunk_bytes_max=8,
        entries_per_message_bytes_max=64,
        inflight_messages_max=4,
        **config,
    )
    schedule = Schedule(cluster)
    for step in schedule_steps:
        schedule.run(step)
    schedule.heal_and_converge()
    return schedule


SCENARIO = st.lists(steps(), min_size=60, max_size=200)


@PROPERTY_SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=1000),
    schedule_steps=SCENARIO,
    pre_vote=st.booleans(),
    check_quorum=st.booleans(),
)
def test_three_voters_stay_safe_and_recover(
    seed: int, schedule_steps: list[tuple[int, int, int]], pre_vote: bool, check_quorum: bool
) -> None:
    _run("3 voters", seed, schedule_steps, pre_vote=pre_vote, check_quorum=check_quorum)


@PROPERTY_SETTINGS
@given(seed=st.integers(min_value=0, max_value=1000), schedule_steps=SCENARIO)
def test_five_voters_stay_safe_and_recover(
    seed: int, schedule_steps: list[tuple[int, int, int]]
) -> None:
    _run("5 voters", seed, schedule_steps)


@PROPERTY_SETTINGS
@given(seed=st.integers(min_value=0, max_value=1000), schedule_steps=SCENARIO)
def test_membership_changes_stay_safe_and_recover(
    seed: int, schedule_steps: list[tuple[int, int, int]]
) -> None:
    """Learners 4 and 5 get promoted and voters demoted at random, one change at a time."""
    _run("3 voters + 2 learners", seed, schedule_steps)


def test_a_long_fixed_schedule_makes_progress() -> None:
    """A sanity check that the schedules above are not vacuous: proposals get applied."""
    tick_all, deliver_fifo, propose = 0, 50, 60  # rolls, see STEP_WEIGHTS
    schedule_steps: list[tuple[int, int, int]] = []
    for _ in range(30):
        schedule_steps += [(tick_all, 0, 0)] * 3 + [(deliver_fifo, 29, 0)] * 3
        schedule_steps += [(propose, 0, 0), (deliver_fifo, 29, 0), (deliver_fifo, 29, 0)]
    schedule = _run("3 voters", 7, schedule_steps)
    assert len(schedule.cluster.applied_data(1)) >= 20
