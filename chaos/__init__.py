"""Deterministic simulation and fault injection for dcluster (DESIGN.md §9).

`Simulator(seed, nodes=5, steps=...).run()` runs a whole Raft group in one process on a
simulated clock, network and disk, injects faults from the seed, checks every safety
invariant after every step and liveness after healing, and returns a `SimResult` whose
trace digest is a pure function of the seed. `python -m chaos.sim` is its command line.

The pieces are public for tests and for planting bugs: `node_factory` and `driver_factory`
take a broken Raft or a broken IO loop (a `NodeDriver` subclass); `FaultConfig` switches
faults off one by one; `SimDisk` and `SimFabric` (ipc's simulated network, which every
node reaches through a `SimTransport`) are the fakes; `InvariantChecker` holds the checks.
Nothing here runs in production paths.
"""

from chaos.checkers import INVARIANTS, InvariantChecker, Violation
from chaos.disk import SimDisk
from chaos.driver import DriverEnv, NodeDriver, NodeState, NodeTiming, RaftTuning
from chaos.nemesis import FaultConfig
from chaos.network import SimFabric
from chaos.simulator import SimResult, SimStats, Simulator
from chaos.statemachine import Op, RegisterMachine

__all__ = [
    "INVARIANTS",
    "DriverEnv",
    "FaultConfig",
    "InvariantChecker",
    "NodeDriver",
    "NodeState",
    "NodeTiming",
    "Op",
    "RaftTuning",
    "RegisterMachine",
    "SimDisk",
    "SimFabric",
    "SimResult",
    "SimStats",
    "Simulator",
    "Violation",
]
