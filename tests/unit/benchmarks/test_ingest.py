"""`python -m benchmarks.ingest`: a small run end to end, and the flags it refuses.

The smoke run starts a real 2-worker cluster, loads 20,000 rows once on each side and must
print one JSON object whose figures agree with each other, then leave nothing behind: no
process, queue or /dev/shm segment of its cluster, and no temp directory (TMPDIR points
into this test's tmp_path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmarks import ingest
from ipc import mq, registry, shm

ROOT = Path(__file__).resolve().parents[3]
SMOKE_S_MAX = 60.0
"""The whole smoke run, cluster start and stop included."""
STOP_S_MAX = 30.0
"""After a timeout: how long the benchmark gets to stop its cluster on SIGTERM."""
SMOKE_ROWS = 20_000
KEYS = {
    "cluster_rows_per_s",
    "duckdb_rows_per_s",
    "ratio",
    "rows",
    "cores",
    "replicas",
    "repeat",
    "target_ratio",
    "met",
}


def _run_benchmark(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """The benchmark in a subprocess, its temp files under tmp_path; on a timeout it is
    sent SIGTERM (it then stops its cluster), and SIGKILL only if that does not end it."""
    command = [sys.executable, "-m", "benchmarks.ingest", *flags]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=SMOKE_S_MAX)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=STOP_S_MAX)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the benchmark ran over {SMOKE_S_MAX} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _leftovers(cluster: dict[str, Any]) -> list[str]:
    """What still exists of the cluster the benchmark described."""
    found: list[str] = []
    for pid, create_time in cluster["processes"]:
        try:
            process = psutil.Process(pid)
            same = abs(process.create_time() - create_time) < 0.05
            if same and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"process {pid}")
        except psutil.Error:
            continue
    found += [f"queue {name}" for name in cluster["queues"] if mq.queue_exists(name)]
    token = registry.resource_token(cluster["name"], Path(cluster["run_dir"]))
    prefix = registry.cluster_prefix(token)
    found += [f"segment {name}" for name in shm.segment_files(shm.SHM_DIR, prefix)]
    return found


def test_smoke_run_reports_consistent_figures_and_leaves_nothing(tmp_path: Path) -> None:
    result = _run_benchmark(tmp_path, "--rows", str(SMOKE_ROWS), "--repeat", "1", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert KEYS <= figures.keys()
    assert (figures["rows"], figures["cores"], figures["replicas"]) == (SMOKE_ROWS, 2, 2)
    assert (figures["repeat"], figures["target_ratio"]) == (1, 3.0)
    cluster_s, duckdb_s = figures["cluster_s"], figures["duckdb_s"]
    assert cluster_s > 0 and duckdb_s > 0
    assert figures["ratio"] == pytest.approx(cluster_s / duckdb_s)
    assert figures["ratio"] == pytest.approx(
        figures["duckdb_rows_per_s"] / figures["cluster_rows_per_s"]
    )
    assert figures["cluster_rows_per_s"] == pytest.approx(SMOKE_ROWS / cluster_s)
    assert figures["duckdb_rows_per_s"] == pytest.approx(SMOKE_ROWS / duckdb_s)
    assert figures["met"] == (figures["ratio"] <= figures["target_ratio"])

    cluster = figures["cluster"]
    assert len(cluster["processes"]) >= 1 + figures["cores"]  # supervisor and workers
    assert len(cluster["queues"]) >= figures["cores"]
    assert _leftovers(cluster) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--rows", "0"],
        ["--rows", "many"],
        ["--cores", "1"],  # fewer workers than the two replicas
        ["--repeat", "0"],
        ["--repeat", str(ingest.REPEAT_MAX + 1)],
        ["--replicas", "3"],
    ],
)
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        ingest.main(argv)
    assert refused.value.code == 2


def test_defaults() -> None:
    args = ingest._arguments([])
    assert (args.rows, args.cores, args.repeat) == (5_000_000, 2, 3)
    assert not args.json and not args.keep_dir


def test_summary_takes_the_best_of_each_side() -> None:
    args = ingest._arguments(["--rows", "1000", "--repeat", "3"])
    summary = ingest.summarize(
        args, [4_000_000, 2_000_000, 3_000_000], [9_000_000, 7_000_000, 8_000_000]
    )
    assert (summary["duckdb_s"], summary["cluster_s"]) == (0.002, 0.007)
    assert summary["ratio"] == pytest.approx(3.5)
    assert summary["duckdb_rows_per_s"] == pytest.approx(500_000)
    assert not summary["met"]
