"""`dcluster up` and `down` on real processes: a leader and the paths printed, a second
`up` refused, `down` leaving nothing behind, and a cluster whose every process was
SIGKILLed coming back with every acknowledged write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.real.cluster.conftest import ROOT, CliCluster

THREE = ("--cores", "3", "--oversubscribe")


def test_up_returns_with_a_leader_and_prints_where_everything_is(cluster: CliCluster) -> None:
    result = cluster.up(*THREE)
    assert "leader node" in result.stdout
    assert f"run directory: {cluster.run_dir}" in result.stdout
    assert str(cluster.run.supervisor_log) in result.stdout
    info = cluster.info()
    assert len(info.nodes) == 3
    assert all(node.pid is not None and node.state == "running" for node in info.nodes)
    for node in info.nodes:
        assert psutil.Process(node.pid).cpu_affinity() == [node.core], "pinned to its core"
        assert os.sched_getscheduler(node.pid) == os.SCHED_BATCH, "not preempting its clients"
    assert cluster.run.secret_file.stat().st_mode & 0o777 == 0o600
    status = cluster.status()
    assert status["leader"] is not None


def test_a_second_up_with_the_same_name_is_refused(cluster: CliCluster) -> None:
    cluster.up(*THREE)
    pids = [node.pid for node in cluster.info().nodes]
    result = cluster.cli("up", *THREE, expect=1)
    assert "already running" in result.stderr
    assert [node.pid for node in cluster.info().nodes] == pids, "the live cluster is untouched"


def test_down_leaves_no_process_queue_or_segment(cluster: CliCluster) -> None:
    cluster.up(*THREE)
    with cluster.client() as client:
        client.put("before-down", "1")
    cluster.note_processes()
    assert len(cluster.queues) >= 3
    assert len(cluster.live_processes()) == 4  # the supervisor and three workers
    result = cluster.cli("down")
    assert "stopped supervisor" in result.stdout
    assert cluster.leftovers() == []
    assert cluster.run.wal_dir(0).is_dir(), "down keeps the data"
    again = cluster.cli("down")
    assert "not running" in again.stdout


def kill_everything(cluster: CliCluster) -> None:
    """SIGKILL the supervisor and every worker, as a power cut of the processes would."""
    info = cluster.info()
    pids = [info.supervisor_pid, *(node.pid for node in info.nodes)]
    victims = [psutil.Process(pid) for pid in pids if pid is not None]
    for process in victims:
        os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=5)


def test_every_process_sigkilled_then_up_again_keeps_acknowledged_writes(
    cluster: CliCluster,
) -> None:
    cluster.up(*THREE)
    with cluster.client() as client:
        for index in range(20):
            client.put(f"key-{index}", f"value-{index}")
    kill_everything(cluster)
    assert "is down" in cluster.cli("status", expect=1).stderr
    result = cluster.up()  # same size and flags as the last run, from cluster.json
    assert "previous run was killed; cleaned up: removed" in result.stdout
    assert all(node.incarnation >= 2 for node in cluster.info().nodes), "incarnations go on"
    with cluster.client() as client:
        for index in range(20):
            assert client.get(f"key-{index}") == f"value-{index}".encode()
    kill_everything(cluster)
    cluster.note_processes()
    down = cluster.cli("down")
    assert "supervisor was not running" in down.stdout
    assert "removed /dc." in down.stdout, "down cleans up after a killed cluster too"
    assert cluster.leftovers() == []


def test_bad_flags_exit_2_and_start_nothing(cluster: CliCluster) -> None:
    for flags, message in [
        (("--cores", "0"), "--cores must be 1"),
        (("--cores", "999"), "--oversubscribe"),
        (("--fsync", "maybe"), "on or off"),
        (("--join", "127.0.0.1:1"), "--transport tcp"),
    ]:
        result = cluster.cli("up", *flags, expect=2)
        assert message in result.stderr, result.stderr
    assert not cluster.run_dir.exists()


def test_a_cluster_that_cannot_elect_fails_up_in_bounded_time_and_leaves_nothing(
    cluster: CliCluster,
) -> None:
    """Two of three WAL directories are files: those workers die at start, the supervisor
    marks them crash_loop, no leader can be elected, `up --timeout` gives up and stops
    everything."""
    for node in (0, 1):
        cluster.run.node_dir(node).mkdir(parents=True)
        cluster.run.wal_dir(node).write_text("not a directory")
    started = time.monotonic()
    result = cluster.cli("up", *THREE, "--timeout", "6", expect=1)
    assert time.monotonic() - started < 15
    assert "no leader within 6 s" in result.stderr
    assert "crash loop" in cluster.run.supervisor_log.read_text()
    cluster.note_processes()
    assert cluster.leftovers() == []


def test_foreground_runs_the_supervisor_in_the_command_until_sigterm(
    cluster: CliCluster,
) -> None:
    command = [sys.executable, "-m", "cluster.cli", "up", *THREE, "--foreground"]
    command += ["--name", cluster.name, "--data-dir", str(cluster.run_dir)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        with_leader = cluster.wait_for(
            lambda: cluster.run.cluster_file.exists() and cluster.status_if_up(), "a leader"
        )
        assert with_leader["supervisor_pid"] == process.pid
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    cluster.note_processes()
    assert [n.pid for n in cluster.info().nodes] == [None, None, None]
    assert cluster.leftovers() == []
