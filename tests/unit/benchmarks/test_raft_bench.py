"""The pure parts of `python -m benchmarks.raft`: flags, percentiles, shares, verdicts.

The benchmark itself starts clusters and runs for minutes; it is not a test. These check
what it computes from its samples and what it refuses on the command line.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import raft


def test_defaults_and_quick() -> None:
    args = raft._arguments([])
    assert (args.duration, args.warmup, args.kills) == (10.0, 2.0, 20)
    assert (args.clients, args.in_flight, args.in_flight_high) == (4, 256, 1024)
    quick = raft._arguments(["--quick", "--kills", "5"])
    assert (quick.duration, quick.warmup, quick.kills) == (3.0, 1.0, 5)


@pytest.mark.parametrize(
    "argv",
    [
        ["--in-flight", "2000"],  # more than 4 clients may keep in flight
        ["--in-flight", "0"],
        ["--in-flight-high", "3"],  # fewer than one per client
        ["--clients", "0"],
        ["--duration", "0"],
        ["--kills", "-1"],
    ],
)
def test_bad_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        raft._arguments(argv)
    assert refused.value.code == 2


def test_more_clients_allow_more_in_flight() -> None:
    assert raft._arguments(["--clients", "8", "--in-flight", "2048"]).in_flight == 2048


def test_percentile_is_nearest_rank() -> None:
    samples = [ms * 1_000_000 for ms in range(1, 101)]  # 1..100 ms
    assert raft._percentile_ms(samples, 0.50) == 50.0
    assert raft._percentile_ms(samples, 0.99) == 99.0
    assert raft._percentile_ms([7_000_000] * 20, 0.99) == 7.0
    assert raft._percentile_ms(list(range(20, 0, -1)), 0.99) == 20 / 1e6  # p99 of 20 = max
    assert math.isnan(raft._percentile_ms([], 0.5))


def test_shares_split_the_window_evenly() -> None:
    assert raft._shares(256, 4) == [64, 64, 64, 64]
    assert raft._shares(10, 4) == [3, 3, 2, 2]


def test_pysyncobj_window_goes_to_the_drivers() -> None:
    pytest.importorskip("pysyncobj")
    from benchmarks._pysyncobj import _share

    assert [_share(10, (0, 2), node) for node in range(3)] == [5, 0, 5]


def test_verdicts() -> None:
    figures = {
        "commits_per_s": 5000.0,
        "pysyncobj_commits_per_s": 2000.0,
        "high_in_flight": 0,
        "failover_ms_p99": 499.0,
    }
    judged = raft._with_verdicts(figures)
    assert judged["throughput_vs_pysyncobj"] == 2.5
    assert judged["pass_throughput"] and judged["pass_failover"] and judged["pass"]
    slow = raft._with_verdicts({**figures, "failover_ms_p99": 500.0})
    assert not slow["pass_failover"] and not slow["pass"]
