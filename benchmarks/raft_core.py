"""Raft core throughput with no IO, and simulator speed.

Rows (each beside a baseline measured in the same run, so the ratio travels between
machines while absolute numbers do not):
- entries committed per second by an in-process 3-voter group (128-byte entries, proposals
  in batches), beside a 1-voter group (the same code path without replication);
- simulated seeds per second, 5 nodes, every fault on, beside the same seeds with faults off.

Usage: python -m benchmarks.raft_core [--entries N] [--seeds K] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from chaos.simulator import STEPS_DEFAULT
from clock import SystemClock
from raft import ConfState, MemoryStorage, Message, RaftConfig, RaftNode, Role

ENTRY_BYTES = 128
BATCH_ENTRIES = 64


class _Group:
    """Nodes that persist to memory and deliver messages instantly, in Ready order."""

    def __init__(self, voters: int) -> None:
        ids = tuple(range(1, voters + 1))
        self.storages = {i: MemoryStorage(conf=ConfState(voters=ids)) for i in ids}
        self.nodes = {
            i: RaftNode(
                RaftConfig(
                    node_id=i,
                    storage=self.storages[i],
                    rng=random.Random(i),
                    inflight_messages_max=256,
                    entries_per_message_bytes_max=256 * 1024,
                )
            )
            for i in ids
        }
        self.applied = 0

    def pump(self) -> None:
        pending: list[Message] = []
        while True:
            for node_id, node in self.nodes.items():
                while node.has_ready():
                    ready = node.ready()
                    storage = self.storages[node_id]
                    storage.append(ready.entries)
                    if ready.hard_state is not None:
                        storage.set_hard_state(ready.hard_state)
                    pending.extend(ready.messages)
                    if node_id == 1:
                        self.applied += len(ready.committed_entries)
                    node.advance(ready)
            if not pending:
                return
            batch, pending = pending, []
            for message in batch:
                self.nodes[message.target].step(message)

    def leader(self) -> RaftNode:
        leader = self.nodes[1]
        leader.campaign()
        self.pump()
        assert leader.role == Role.LEADER
        return leader


def commits_per_second(voters: int, entries: int) -> float:
    group = _Group(voters)
    leader = group.leader()
    payload = bytes(ENTRY_BYTES)
    group.applied = 0
    start = group.applied
    clock = SystemClock()
    began = clock.monotonic_ns()
    proposed = 0
    while proposed < entries:
        for _ in range(min(BATCH_ENTRIES, entries - proposed)):
            leader.propose(payload)
            proposed += 1
        group.pump()
    elapsed_s = (clock.monotonic_ns() - began) / 1e9
    committed = group.applied - start
    assert committed >= entries, (committed, entries)
    return committed / elapsed_s


def seeds_per_second(seeds: int, faults_on: bool) -> float:
    from chaos.simulator import FaultConfig, Simulator

    clock = SystemClock()
    began = clock.monotonic_ns()
    for seed in range(1, seeds + 1):
        faults = FaultConfig() if faults_on else FaultConfig.none()
        result = Simulator(seed=seed, nodes=5, faults=faults).run()
        assert result.violation is None, (seed, result.violation)
    return seeds / ((clock.monotonic_ns() - began) / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raft_core")
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    three = commits_per_second(3, args.entries)
    one = commits_per_second(1, args.entries)
    faulty = seeds_per_second(args.seeds, faults_on=True)
    calm = seeds_per_second(args.seeds, faults_on=False)
    figures = {
        "commits_per_s_3_voters": round(three),
        "commits_per_s_1_voter_baseline": round(one),
        "replication_cost_ratio": round(one / three, 2),
        "sim_seeds_per_s_all_faults": round(faulty, 2),
        "sim_seeds_per_s_no_faults_baseline": round(calm, 2),
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = [
        (
            "entries committed/s, 3 voters, no IO",
            f"{three:,.0f}",
            f"{one:,.0f} (1 voter)",
            f"{three / one:.2f}x",
        ),
        (
            f"simulated seeds/s, 5 nodes, {STEPS_DEFAULT:,} steps, all faults",
            f"{faulty:.2f}",
            f"{calm:.2f} (no faults)",
            f"{faulty / calm:.2f}x",
        ),
    ]
    header = ("figure", "measured", "baseline (same run)", "ratio")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(4)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
