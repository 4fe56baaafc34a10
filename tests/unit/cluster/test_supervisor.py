"""The supervisor's restart policy and lock, without starting any worker: backoff with
full jitter under a cap, a crash loop marked instead of restarted, one supervisor per
run directory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cluster import supervisor
from cluster.rundir import ClusterInfo, NodeInfo, RunDir
from cluster.supervisor import (
    CRASH_LOOP_RESTARTS_MAX,
    RESTART_BACKOFF_MS_BASE,
    RESTART_BACKOFF_MS_CAP,
    Supervisor,
    SupervisorRunning,
    acquire_lock,
    restart_delay_ms,
    running_supervisor,
)


def test_restart_delays_are_full_jitter_under_a_doubling_capped_ceiling() -> None:
    rng = random.Random(7)
    for restarts in range(12):
        ceiling = min(RESTART_BACKOFF_MS_CAP, RESTART_BACKOFF_MS_BASE * 2**restarts)
        delays = [restart_delay_ms(restarts, rng) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling / 2, "the whole range is used"
        assert min(delays) < ceiling / 2


def test_a_worker_that_keeps_dying_is_marked_crash_loop_not_restarted(tmp_path: Path) -> None:
    boss = Supervisor(RunDir(tmp_path), rng=random.Random(1))
    worker = supervisor._Worker(NodeInfo(id=0, host="h", core=0))
    for _ in range(CRASH_LOOP_RESTARTS_MAX):
        boss._schedule_restart(worker)
        assert worker.info.state == "restarting"
        assert worker.restart_due_ns is not None
        worker.restart_times_ns.append(boss.clock.monotonic_ns())
    boss._schedule_restart(worker)
    assert worker.info.state == "crash_loop"
    assert worker.restart_due_ns is None


def test_old_restarts_fall_out_of_the_crash_loop_window(tmp_path: Path) -> None:
    boss = Supervisor(RunDir(tmp_path), rng=random.Random(1))
    worker = supervisor._Worker(NodeInfo(id=0, host="h", core=0))
    long_ago = boss.clock.monotonic_ns() - 2 * supervisor.CRASH_LOOP_WINDOW_MS * 1_000_000
    worker.restart_times_ns.extend([long_ago] * CRASH_LOOP_RESTARTS_MAX)
    boss._schedule_restart(worker)
    assert worker.info.state == "restarting"
    assert not worker.restart_times_ns


def test_one_supervisor_per_run_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert running_supervisor(run) is None
    fd = acquire_lock(run)
    try:
        assert running_supervisor(run) is not None
        with pytest.raises(SupervisorRunning):
            acquire_lock(run)
    finally:
        os.close(fd)
    assert running_supervisor(run) is None


def test_worker_configs_name_founders_peers_and_the_bumped_incarnation(tmp_path: Path) -> None:
    nodes = [
        NodeInfo(id=n, host="127.0.0.1", core=n, incarnation=3, address=("127.0.0.1", 7000 + n))
        for n in range(4)
    ]
    cluster = ClusterInfo(
        name="c",
        transport="tcp",
        fsync=True,
        voters=3,
        oversubscribe=False,
        supervisor_pid=None,
        nodes=nodes,
    )
    config = supervisor.worker_config_for(cluster, nodes[1], RunDir(tmp_path))
    assert config.founders == (0, 1, 2)
    assert config.incarnation == 3
    assert config.bind == ("127.0.0.1", 7001)
    assert sorted(config.peers) == [0, 2, 3]


def test_the_supervisor_and_cli_import_neither_pyarrow_nor_duckdb() -> None:
    """They fork workers; the heavy modules must arrive only in the children."""
    import subprocess
    import sys

    code = (
        "import sys, cluster.cli, cluster.supervisor, cluster.control\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'duckdb', 'ipc'))\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert result.stdout.strip() == "[]"
