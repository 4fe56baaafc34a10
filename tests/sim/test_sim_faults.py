"""Each fault can be switched on alone, fires, and a correct group survives it."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from chaos.nemesis import FaultConfig, min_voters
from chaos.simulator import Simulator, _has_spare_node

FAULTS = [f.name for f in fields(FaultConfig) if f.name != "torn_writes"]


def test_no_faults_means_a_quiet_run() -> None:
    result = Simulator(5, steps=5000, faults=FaultConfig.none()).run()
    assert result.ok, result.detail
    assert result.stats.faults == {}
    assert result.stats.driver.crashes == 0
    assert result.stats.network.dropped_random == 0
    assert result.stats.workload.writes_acked > 0
    assert result.stats.workload.reads_ok > 0


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_alone_fires_and_the_group_survives(fault: str) -> None:
    faults = replace(FaultConfig.none(), **{fault: True})
    assert faults.enabled() == (fault,)
    fired = 0
    for seed in (1, 2, 3):
        result = Simulator(seed, steps=8000, faults=faults).run()
        assert result.ok, f"{result.summary_line()}\n{result.detail}"
        fired += result.stats.faults.get(fault, 0)
    assert fired > 0


def test_torn_writes_off_never_tears() -> None:
    faults = replace(FaultConfig(), torn_writes=False)
    for seed in (1, 2, 3, 4):
        result = Simulator(seed, steps=10_000, faults=faults).run()
        assert result.ok, result.detail
        assert result.stats.crashes_with_torn_write == 0
        assert result.stats.torn_tails_recovered == 0


def test_minimum_voters() -> None:
    assert [min_voters(nodes) for nodes in range(3, 8)] == [2, 3, 3, 4, 4]


@pytest.mark.parametrize("seed", [3, 6, 12, 19])
def test_a_spare_joining_with_an_empty_log_learns_the_membership_and_catches_up(seed: int) -> None:
    """These seeds add a spare node that starts with no log and no membership. It must be
    sent the leader's (bootstrap or later) snapshot, learn the membership from it, and be
    fully caught up once the faults heal (the liveness check requires every member's
    applied index to converge)."""
    simulator = Simulator(seed, steps=30_000)
    assert _has_spare_node(seed, simulator.nodes, simulator.faults)
    result = simulator.run()
    assert result.ok, f"{result.summary_line()}\n{result.detail}"
    assert result.stats.driver.snapshots_installed >= 1


def test_corrupted_frames_are_refused_by_the_codec_and_the_group_stays_safe() -> None:
    faults = replace(FaultConfig.none(), corrupt=True)
    corrupted = refused = 0
    for seed in (1, 2):
        result = Simulator(seed, steps=8000, faults=faults).run()
        assert result.ok, f"{result.summary_line()}\n{result.detail}"
        corrupted += result.stats.network.corrupted
        refused += sum(result.stats.refused.values())
        assert result.stats.workload.writes_acked > 0
    assert corrupted > 0
    assert 0 < refused <= corrupted  # a few die with a crashed receiver instead

