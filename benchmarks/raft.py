"""The cluster log's speed on this box, beside PySyncObj measured in the same run.

Rows:
- commits per second and commit latency (send -> acknowledged response, p50/p99) of a
  3-voter dcluster cluster (`dcluster up --cores 3 --oversubscribe`, separate worker
  processes, fsync on, the local mq + shm transport), driven by several client processes
  that each keep many 128-byte PUTs in flight to the leader;
- the same figures for PySyncObj (PyPI `pysyncobj`): 3 nodes in separate processes on
  127.0.0.1 TCP ports, its default `SyncObjConf`, the same number of 128-byte writes in
  flight (issued on the leader's node, which is how PySyncObj is driven: its clients are
  in-process, and calls on a follower are forwarded to the leader);
- both again at a higher concurrency (`--in-flight-high`), for context: PySyncObj's
  throughput is bound by its 100 ms AppendEntries period and grows with the writes in
  flight, ours by CPU; the target is judged at `--in-flight` only;
- leader failover: SIGKILL of the leader to the first write acknowledged by the new one,
  p50/p99 over `--kills` kills (see benchmarks/_failover.py).

Targets: dcluster commits/s >= 2x PySyncObj's, with our fsync on; failover p99 < 500 ms.
The two systems run one after the other (never at once) on the same cores, the same
duration after the same warm-up. PySyncObj's defaults keep its log in memory (no journal
file, no fsync): its commits are not durable; ours are fsynced on a quorum before they
are acknowledged.

Every process started here is stopped in a finally (the cluster with `dcluster down
--purge`, then any worker still recorded is killed), every temp directory removed, and
every wait bounded.

Usage: python -m benchmarks.raft [--duration S] [--warmup S] [--clients P]
       [--in-flight W] [--in-flight-high W2] [--kills K] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import _dcluster_load
from benchmarks._failover import FailoverRun, Session
from benchmarks._processes import JOIN_S_MAX, child, expect
from clock import SystemClock
from cluster.kv import RESULTS_PER_CLIENT_MAX
from cluster.rundir import ClusterInfo, RunDir

VOTERS = 3
VALUE_BYTES = 128
KEYS = 1024
"""Writes cycle over this many keys, so the state stays small on both systems."""
DURATION_S_DEFAULT = 10.0
WARMUP_S_DEFAULT = 2.0
CLIENTS_DEFAULT = 4
IN_FLIGHT_DEFAULT = 256
"""Writes in flight at once, over all clients (the same number on both systems)."""
IN_FLIGHT_HIGH_DEFAULT = 1024
"""A second concurrency, measured on both systems for context (no target)."""
KILLS_DEFAULT = 20
DEFAULTS = {"duration": DURATION_S_DEFAULT, "warmup": WARMUP_S_DEFAULT, "kills": KILLS_DEFAULT}
QUICK = {"duration": 3.0, "warmup": 1.0, "kills": 3}
"""--quick's values, for whichever of these the command line does not set."""
IN_FLIGHT_MAX = 4096
"""A worker answers 'busy' past 4096 pending requests (cluster/_worker_requests.py)."""
CLIENTS_MAX = 16
CLI_S_MAX = 90.0
"""`dcluster up` or `down` takes at most this long."""
LOAD_READY_S_MAX = 60.0
LEADER_TIMEOUT_S = 1.0
TARGETS = {"throughput_vs_pysyncobj": 2.0, "failover_ms_p99": 500.0}


# ---- the dcluster cluster ----


def _dcluster(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cluster.cli", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=CLI_S_MAX, check=False)


@contextlib.contextmanager
def _cluster(name: str) -> Iterator[RunDir]:
    """A running 3-worker cluster in a temp directory; gone (processes, queues, segments,
    files) when the block ends, whatever happened."""
    base = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    run = RunDir(base / "run")
    try:
        started = _dcluster(
            "up",
            "--cores",
            str(VOTERS),
            "--oversubscribe",
            "--name",
            name,
            "--data-dir",
            str(run.path),
        )
        if started.returncode != 0:
            raise RuntimeError(
                f"dcluster up failed ({started.returncode}):\n{started.stdout}{started.stderr}"
            )
        yield run
    finally:
        try:
            _stop_cluster(name, run)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _stop_cluster(name: str, run: RunDir) -> None:
    if not run.cluster_file.exists():
        return
    try:
        _dcluster("down", "--purge", "--name", name, "--data-dir", str(run.path))
    finally:
        info = run.read_cluster() if run.cluster_file.exists() else None
        if info is not None:  # `down` failed or timed out: stop what it left, by pid
            _kill_leftovers(name, run, info)


def _kill_leftovers(name: str, run: RunDir, info: ClusterInfo) -> None:
    """The supervisor first (it would restart its workers), then the workers it recorded,
    then every queue and segment of the cluster."""
    from cluster import control
    from cluster.supervisor import running_supervisor

    supervisor = running_supervisor(run)  # the pid holding the lock: ours, from our `up`
    if supervisor is not None and supervisor > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGKILL)
    control.kill_workers(info)
    control.reclaim(name, run, isolate=False)


# ---- the measurements ----


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@contextlib.contextmanager
def _load_clients(run: RunDir, clients: int) -> Iterator[list[Connection]]:
    """`clients` load processes with their transports open, for every load phase."""
    info = run.read_cluster()
    assert info is not None, run.path
    with contextlib.ExitStack() as stack:
        connections = [
            stack.enter_context(child(_dcluster_load.serve, info.name, str(run.path), seed))
            for seed in range(clients)
        ]
        for connection in connections:
            expect(connection, "ready", LOAD_READY_S_MAX, "a load process")
        yield connections


def _measure_dcluster_load(
    connections: list[Connection],
    session: Session,
    args: argparse.Namespace,
    in_flight: int,
    prefix: str,
) -> dict[str, Any]:
    """Commit figures of `in_flight` PUTs kept in flight by the load processes."""
    found = session.leader(LEADER_TIMEOUT_S)
    if found is None:
        raise RuntimeError("the cluster has no leader before the load")
    info = session.run.read_cluster()
    assert info is not None, session.run.path
    for connection, window in zip(connections, _shares(in_flight, len(connections)), strict=True):
        spec = _dcluster_load.LoadSpec(
            info.name,
            str(session.run.path),
            tuple(session.nodes),
            found[0],
            window,
            args.duration,
            args.warmup,
            VALUE_BYTES,
            KEYS,
        )
        connection.send(("run", spec))
    wait_s = args.warmup + args.duration + _dcluster_load.DRAIN_S_MAX + JOIN_S_MAX
    results = [
        expect(connection, "done", wait_s, "a load process")[1] for connection in connections
    ]
    latencies: list[int] = []
    for result in results:
        latencies.extend(array("q", result.latencies_ns))
    return {
        f"{prefix}commits": len(latencies),
        f"{prefix}commits_per_s": len(latencies) / args.duration,
        f"{prefix}commit_ms_p50": _percentile_ms(latencies, 0.50),
        f"{prefix}commit_ms_p99": _percentile_ms(latencies, 0.99),
        f"{prefix}load_errors": _merged(result.errors for result in results),
        f"{prefix}load_resends": sum(result.resends for result in results),
        f"{prefix}load_refused": sum(result.refused for result in results),
        f"{prefix}load_unanswered": sum(result.in_flight_at_end for result in results),
    }


def _merged(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    return dict(sorted(total.items()))


def _measure_pysyncobj(args: argparse.Namespace, in_flight: int, prefix: str) -> dict[str, Any]:
    """The same figures for a fresh 3-node PySyncObj cluster, driven on its leader."""
    from benchmarks import _pysyncobj  # needs the optional `bench` extra: see main()

    spec = _pysyncobj.DriveSpec(in_flight, args.duration, args.warmup, VALUE_BYTES, KEYS)
    figures = _pysyncobj.measure(spec, VOTERS, leader_only=True)
    return {
        f"{prefix}pysyncobj_commits": figures.commits,
        f"{prefix}pysyncobj_commits_per_s": figures.commits / figures.duration_s,
        f"{prefix}pysyncobj_commit_ms_p50": _percentile_ms(figures.latencies_ns, 0.50),
        f"{prefix}pysyncobj_commit_ms_p99": _percentile_ms(figures.latencies_ns, 0.99),
        f"{prefix}pysyncobj_failures": figures.failures,
    }


def _measure_failover(run: RunDir, session: Session, kills: int) -> dict[str, Any]:
    figures = FailoverRun(run, session).rounds(kills)
    return {
        "failover_ms_p50": _percentile_ms(figures.failover_ns, 0.50),
        "failover_ms_p99": _percentile_ms(figures.failover_ns, 0.99),
        "failover_ms_max": max(figures.failover_ns) / 1e6,
        "failover_ms": [round(value / 1e6, 1) for value in figures.failover_ns],
        "recovery_ms_p50": _percentile_ms(figures.recovery_ns, 0.50),
        "failover_paced_s": figures.paced_ns / 1e9,
    }


def _percentile_ms(samples_ns: list[int], fraction: float) -> float:
    """Nearest rank: the smallest sample with at least `fraction` of them at or below."""
    if not samples_ns:
        return float("nan")
    ordered = sorted(samples_ns)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1] / 1e6


def _concurrencies(args: argparse.Namespace) -> dict[str, int]:
    """Key prefix -> writes in flight: the compared one, and the high one unless skipped."""
    levels = {"": args.in_flight}
    if args.in_flight_high:
        levels["high_"] = args.in_flight_high
    return levels


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure: PySyncObj first, then dcluster's load, then its failovers."""
    clock = SystemClock()
    figures: dict[str, Any] = {
        "voters": VOTERS,
        "value_bytes": VALUE_BYTES,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "clients": args.clients,
        "in_flight": args.in_flight,
        "high_in_flight": args.in_flight_high,
        "kills": args.kills,
        "fsync": True,
        "pysyncobj_fsync": False,
        "load_avg_1m_before": os.getloadavg()[0],
    }
    began_ns = clock.monotonic_ns()
    for prefix, in_flight in _concurrencies(args).items():
        figures.update(_measure_pysyncobj(args, in_flight, prefix))
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(_cluster(f"bench-raft-{os.getpid()}"))
        session = Session(run, clock, random.Random(args.kills))
        stack.callback(session.close)
        with _load_clients(run, args.clients) as connections:
            for prefix, in_flight in _concurrencies(args).items():
                figures.update(
                    _measure_dcluster_load(connections, session, args, in_flight, prefix)
                )
        if args.kills:
            figures.update(_measure_failover(run, session, args.kills))
    figures["load_avg_1m_after"] = os.getloadavg()[0]
    figures["elapsed_s"] = (clock.monotonic_ns() - began_ns) / 1e9
    return _with_verdicts(figures)


def _ratio(figures: dict[str, Any], prefix: str) -> float:
    """Our commits/s over PySyncObj's at one concurrency."""
    baseline = figures[f"{prefix}pysyncobj_commits_per_s"]
    return float(figures[f"{prefix}commits_per_s"] / baseline) if baseline else math.inf


def _with_verdicts(figures: dict[str, Any]) -> dict[str, Any]:
    ratio = figures["throughput_vs_pysyncobj"] = _ratio(figures, "")
    if figures["high_in_flight"]:
        figures["high_throughput_vs_pysyncobj"] = _ratio(figures, "high_")
    figures["pass_throughput"] = ratio >= TARGETS["throughput_vs_pysyncobj"]
    verdicts = [figures["pass_throughput"]]
    if "failover_ms_p99" in figures:
        figures["pass_failover"] = figures["failover_ms_p99"] < TARGETS["failover_ms_p99"]
        verdicts.append(figures["pass_failover"])
    figures["pass"] = all(verdicts)
    return {
        key: round(value, 3) if isinstance(value, float) else value
        for key, value in figures.items()
    }


# ---- output ----


def _table(f: dict[str, Any]) -> list[tuple[str, ...]]:
    def verdict(key: str) -> str:
        return "pass" if f[key] else "FAIL"

    rows: list[tuple[str, ...]] = [
        ("figure", "dcluster", "PySyncObj (same run) *", "ratio", "target"),
        *_commit_rows(f, "", f">= 2x: {verdict('pass_throughput')}"),
    ]
    if f["high_in_flight"]:
        rows += _commit_rows(f, "high_", "(context, no target)")
    if "failover_ms_p99" in f:
        kills = f"({f['kills']} leader SIGKILLs)"
        rows += [
            (f"failover p50 {kills}", f"{f['failover_ms_p50']:.0f} ms", "", "", ""),
            (
                f"failover p99 {kills}",
                f"{f['failover_ms_p99']:.0f} ms",
                "",
                "",
                f"< 500 ms: {verdict('pass_failover')}",
            ),
        ]
    return rows


def _commit_rows(f: dict[str, Any], prefix: str, target: str) -> list[tuple[str, ...]]:
    where = f"{f[prefix + 'in_flight']} in flight"
    ours, theirs = (lambda key: f[prefix + key]), (lambda key: f[prefix + "pysyncobj_" + key])
    return [
        (
            f"commits/s, {where}",
            f"{ours('commits_per_s'):,.0f}",
            f"{theirs('commits_per_s'):,.0f}",
            f"{ours('throughput_vs_pysyncobj'):.2f}x",
            target,
        ),
        *(
            (
                f"commit latency {name}, {where}",
                f"{ours('commit_ms_' + name):.2f} ms",
                f"{theirs('commit_ms_' + name):.2f} ms",
                "",
                "",
            )
            for name in ("p50", "p99")
        ),
    ]


def _print_table(figures: dict[str, Any]) -> None:
    rows = _table(figures)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    f = figures
    print(
        f"\n{f['voters']} voters, separate processes; {f['value_bytes']}-byte values; "
        f"{f['in_flight']} writes in flight on both systems (dcluster: {f['clients']} client "
        f"processes); {f['duration_s']:.0f} s measured after {f['warmup_s']:.0f} s warm-up. "
        f"dcluster: fsync on, every acknowledged write is on disk on a quorum."
    )
    print(
        "* PySyncObj with its defaults: the log is kept in memory only (no journal file, "
        "no fsync), so its commits are not durable; its 'clients' are callbacks inside "
        "the leader's process (PySyncObj has no client protocol); it batches commands and "
        "sends AppendEntries every 100 ms (appendEntriesPeriod), so its commit latency is "
        "about 100 ms and its throughput grows with the writes in flight."
    )
    if "failover_ms_max" in f:
        print(
            f"failover: SIGKILL of the leader -> first write acknowledged by the new one; "
            f"max {f['failover_ms_max']:.0f} ms; restarted worker caught up "
            f"p50 {f['recovery_ms_p50']:.0f} ms after the kill; "
            f"{f['failover_paced_s']:.1f} s spent pacing kills below the supervisor's "
            f"crash-loop threshold."
        )
    print(
        f"load average {f['load_avg_1m_before']:.2f} before, {f['load_avg_1m_after']:.2f} "
        f"after; whole run {f['elapsed_s']:.0f} s."
    )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raft")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds measured, per system (default {DURATION_S_DEFAULT:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help=f"seconds before measuring (default {WARMUP_S_DEFAULT:g})",
    )
    parser.add_argument(
        "--clients", type=int, default=CLIENTS_DEFAULT, help="dcluster client processes"
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=IN_FLIGHT_DEFAULT,
        help="writes in flight at once, over all clients, on both systems",
    )
    parser.add_argument(
        "--in-flight-high",
        type=int,
        default=IN_FLIGHT_HIGH_DEFAULT,
        help="a second, higher concurrency measured on both systems for context (0 skips)",
    )
    parser.add_argument(
        "--kills",
        type=int,
        default=None,
        help=f"leader SIGKILLs (default {KILLS_DEFAULT}; 0 skips failover)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: --duration 3 --warmup 1 --kills 3"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.clients <= CLIENTS_MAX:
        parser.error(f"--clients is 1 to {CLIENTS_MAX}")
    most = min(IN_FLIGHT_MAX, args.clients * RESULTS_PER_CLIENT_MAX)
    for flag, value in (("--in-flight", args.in_flight), ("--in-flight-high", args.in_flight_high)):
        if (value or flag == "--in-flight") and not args.clients <= value <= most:
            parser.error(
                f"{flag} is --clients to {most} (a client keeps at most "
                f"{RESULTS_PER_CLIENT_MAX} writes in flight; a worker at most {IN_FLIGHT_MAX})"
            )
    if args.duration <= 0 or args.warmup < 0 or args.kills < 0:
        parser.error("--duration > 0, --warmup >= 0, --kills >= 0")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: nothing is left behind


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if importlib.util.find_spec("pysyncobj") is None:
        print("PySyncObj is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    figures = measure(args)
    if args.json:
        print(json.dumps(figures))
    else:
        _print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
