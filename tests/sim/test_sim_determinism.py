"""One seed, one trace: in one process, across processes, whatever PYTHONHASHSEED says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from chaos.simulator import Simulator

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3000


def run_cli(seed: int, hash_seed: str) -> str:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed)
    completed = subprocess.run(
        [sys.executable, "-m", "chaos.sim", "--seed", str(seed), "--steps", str(STEPS)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout.splitlines()[-1]


def test_same_seed_same_trace_in_one_process() -> None:
    first = Simulator(11, steps=STEPS, keep_trace=True)
    second = Simulator(11, steps=STEPS, keep_trace=True)
    first_result, second_result = first.run(), second.run()
    assert first_result.ok, first_result.detail
    assert first_result.trace_digest == second_result.trace_digest
    assert first.trace.lines() == second.trace.lines()
    assert first_result.stats == second_result.stats


def test_different_seeds_different_traces() -> None:
    digests = {Simulator(seed, steps=500).run().trace_digest for seed in range(5)}
    assert len(digests) == 5


def test_same_seed_same_line_in_two_processes_with_different_hash_seeds() -> None:
    in_process = Simulator(12, steps=STEPS).run().summary_line()
    assert run_cli(12, "0") == in_process
    assert run_cli(12, "4242") == in_process
