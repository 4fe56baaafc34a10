"""The seed bank has teeth: every deliberately broken variant of the core is caught.

For each planted bug, run the CI seed bank's seeds, in order and with the bank's exact
settings, until one reports a violation. The bug must be caught by a named invariant
(not by an exception, not only by running out of the bank). Stopping at the first catch
keeps this cheap: every bug here is caught within the first few seeds.
"""

from __future__ import annotations

import pytest

from chaos.driver import NodeDriver
from chaos.nemesis import FaultConfig
from chaos.simulator import Simulator
from raft import RaftNode
from tests.planted.bugs import PLANTED_NODE_BUGS
from tests.sim.test_sim_checkers import SendsBeforeFsync
from tests.sim.test_sim_seed_bank import BANK_NODES, BANK_SEEDS, BANK_STEPS

SEEDS_TRIED_MAX = 40
"""A bug the bank catches only after this many seeds is too rarely caught to count."""


def first_catch(
    node_factory: type[RaftNode] = RaftNode, driver_factory: type[NodeDriver] = NodeDriver
) -> tuple[int, str]:
    for seed in list(BANK_SEEDS)[:SEEDS_TRIED_MAX]:
        result = Simulator(
            seed, nodes=BANK_NODES, steps=BANK_STEPS, faults=FaultConfig(),
            node_factory=node_factory, driver_factory=driver_factory,
        ).run()
        if result.violation is not None:
            return seed, result.violation
    raise AssertionError(f"not caught by the first {SEEDS_TRIED_MAX} seeds of the bank")


EXPECTED = {
    "commits_old_term_entries": {"current_term_commit", "state_machine_safety", "log_matching",
                                 "leader_completeness"},
    "votes_for_stale_logs": {"leader_completeness", "state_machine_safety", "log_matching",
                             "acked_write_lost", "current_term_commit"},
    "votes_twice_per_term": {"election_safety"},
    "reads_without_quorum": {"read_linearizability"},
    "ignores_log_mismatch": {"log_matching", "state_machine_safety", "liveness",
                             "leader_completeness", "acked_write_lost"},
    "forgets_vote_on_restart": {"durability", "election_safety"},
}


@pytest.mark.parametrize("bug", sorted(PLANTED_NODE_BUGS))
def test_seed_bank_catches_planted_raft_bug(bug: str) -> None:
    seed, violation = first_catch(node_factory=PLANTED_NODE_BUGS[bug])
    assert violation in EXPECTED[bug], f"{bug}: seed {seed} reported {violation}"


def test_seed_bank_catches_planted_driver_bug() -> None:
    seed, violation = first_catch(driver_factory=SendsBeforeFsync)
    assert violation == "durability", f"seed {seed} reported {violation}"


def test_the_real_core_passes_the_seeds_the_planted_bugs_fail_on() -> None:
    """Guards against a bank that 'catches' everything because it flags everything."""
    result = Simulator(
        1, nodes=BANK_NODES, steps=BANK_STEPS, faults=FaultConfig()
    ).run()
    assert result.ok, result.summary_line()
