"""The CI seed bank: hundreds of seeds of a 5-node group with every fault on, plus a few of
3 and 7 nodes. Each seed is its own test, so pytest-xdist spreads them over workers.

A failure names the seed and the command that replays it. Budget: the whole bank in well
under 3 minutes on 2 cores (`pytest -n 2`); measured ~0.4 s per 5-node seed at 30 000 steps.
Deselect locally with `-m "not slow"`.
"""

from __future__ import annotations

import pytest

from chaos.nemesis import FaultConfig
from chaos.simulator import Simulator

BANK_SEEDS = range(1, 301)
BANK_NODES = 5
BANK_STEPS = 30_000
SMALL_AND_LARGE_SEEDS = range(1001, 1031)
SMALL_AND_LARGE_STEPS = 20_000


def run_seed(seed: int, nodes: int, steps: int) -> None:
    result = Simulator(seed, nodes=nodes, steps=steps, faults=FaultConfig()).run()
    replay = f"python -m chaos.sim --seed {seed} --nodes {nodes} --steps {steps} --verbose"
    assert result.ok, f"{result.summary_line()}\n{result.detail}\nreplay: {replay}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", BANK_SEEDS)
def test_seed_bank_five_nodes_every_fault(seed: int) -> None:
    run_seed(seed, BANK_NODES, BANK_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [3, 7])
@pytest.mark.parametrize("seed", SMALL_AND_LARGE_SEEDS)
def test_seed_bank_three_and_seven_nodes(seed: int, nodes: int) -> None:
    run_seed(seed, nodes, SMALL_AND_LARGE_STEPS)
