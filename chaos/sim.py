"""Command line for the deterministic simulator: `python -m chaos.sim`.

    python -m chaos.sim --seed S [--nodes N] [--steps K] [--verbose] [--trace]
    python -m chaos.sim --seeds A..B [--nodes N] [--steps K] [--verbose]

One seed: the last line is exactly
`seed=S steps=K trace=<sha256 of the event trace> result=ok` (or `result=violation:<name>`,
with steps = the step at which it was seen); exit 0 only for ok. A range prints that line
per seed and ends with `seeds=<count> failed=<count>`, followed by ` <failing seeds>`
(comma-separated) when any failed; exit 0 only when none did. Bad arguments: a message on
stderr and exit 2. The same seed prints the same line in every run and every process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chaos.simulator import NODES_MAX, NODES_MIN, STEPS_DEFAULT, SimResult, Simulator

SEEDS_PER_RANGE_MAX = 1_000_000
STEPS_MAX = 10_000_000


def _seed_range(text: str) -> range:
    first, separator, last = text.partition("..")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected A..B, got {text!r}")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"need 0 <= A <= B, got {text!r}")
    if high - low + 1 > SEEDS_PER_RANGE_MAX:
        raise argparse.ArgumentTypeError(f"at most {SEEDS_PER_RANGE_MAX} seeds per run")
    return range(low, high + 1)


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"seed must not be negative, got {seed}")
    return seed


def _nodes(text: str) -> int:
    try:
        nodes = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"nodes must be an integer, got {text!r}") from None
    if not NODES_MIN <= nodes <= NODES_MAX:
        raise argparse.ArgumentTypeError(
            f"nodes must be between {NODES_MIN} and {NODES_MAX}, got {nodes}"
        )
    return nodes


def _steps(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be an integer, got {text!r}") from None
    if not 0 <= steps <= STEPS_MAX:
        raise argparse.ArgumentTypeError(f"steps must be between 0 and {STEPS_MAX}, got {steps}")
    return steps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.sim",
        description="Run the deterministic Raft simulator for one seed or a range of seeds.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=_seed, help="run one seed")
    which.add_argument("--seeds", type=_seed_range, metavar="A..B", help="run seeds A to B")
    parser.add_argument(
        "--nodes", type=_nodes, default=5, help=f"group size, {NODES_MIN}-{NODES_MAX}"
    )
    parser.add_argument(
        "--steps", type=_steps, default=STEPS_DEFAULT, help="events in the fault phase"
    )
    parser.add_argument("--verbose", action="store_true", help="per-seed figures")
    parser.add_argument("--trace", action="store_true", help="print every trace line")
    return parser


def _run_one(seed: int, arguments: argparse.Namespace) -> SimResult:
    simulator = Simulator(
        seed, nodes=arguments.nodes, steps=arguments.steps, keep_trace=arguments.trace
    )
    result = simulator.run()
    if arguments.trace:
        sys.stdout.writelines(simulator.trace.lines())
    if arguments.verbose:
        print(f"seed={seed} nodes={arguments.nodes}")
        for line in result.stats.lines():
            print(line)
    if not result.ok:
        for line in result.detail.splitlines():
            print(f"  {line}")
    print(result.summary_line(), flush=True)
    return result


def range_summary(count: int, failed: Sequence[int]) -> str:
    """`seeds=<count> failed=<count>`, then ` <seed>,<seed>...` when any failed."""
    summary = f"seeds={count} failed={len(failed)}"
    if failed:
        summary += " " + ",".join(str(seed) for seed in failed)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.seed is not None:
        return 0 if _run_one(arguments.seed, arguments).ok else 1
    failed = [seed for seed in arguments.seeds if not _run_one(seed, arguments).ok]
    print(range_summary(len(arguments.seeds), failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
