"""Real clusters for the CLI tests: `dcluster` run as a subprocess, one cluster per test.

The `cluster` fixture gives each test a unique cluster name and a run directory under
tmp_path, and, whatever the test did, ends with `dcluster down`, then SIGKILLs any
process it saw recorded in `cluster.json` (supervisor or worker) that still lives and is
still the same process (same create time), and reclaims the cluster's queues and
segments. It then checks nothing is left: no process, queue or /dev/shm segment.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.client import Client
from cluster.rundir import RunDir
from ipc import mq, registry, shm
from ipc.local import reclaim_cluster

ROOT = Path(__file__).resolve().parents[3]
CLI_TIMEOUT_S = 60.0
WAIT_S = 15.0
POLL_S = 0.05
KILL_WAIT_S = 5.0
_names = itertools.count()


class CliCluster:
    """One cluster driven through the `dcluster` command line."""

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.run_dir = run_dir
        self.run = RunDir(run_dir)
        self.seen: dict[int, float] = {}
        """pid -> create time of every process cluster.json ever named."""
        self.queues: set[str] = set()

    # ---- the command line ----

    def cli(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run `dcluster ARGS --name N --data-dir D`; check the exit code unless None."""
        command = [sys.executable, "-m", "cluster.cli", *args]
        command += ["--name", self.name, "--data-dir", str(self.run_dir)]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        self.note_processes()
        if expect is not None:
            assert result.returncode == expect, (
                f"`dcluster {' '.join(args)}` exited {result.returncode}, not {expect}:\n"
                f"{result.stdout}\n{result.stderr}\n{self.log_tail()}"
            )
        return result

    def up(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return self.cli("up", *flags)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def status_if_up(self) -> dict[str, Any] | None:
        """`status --json` once it shows a leader, else None."""
        result = self.cli("status", "--json", expect=None)
        if result.returncode != 0:
            return None
        status: dict[str, Any] = json.loads(result.stdout)
        return status if status["leader"] is not None else None

    def client(self) -> Client:
        return Client(self.run_dir)

    # ---- what is running ----

    def info(self) -> Any:
        cluster = self.run.read_cluster()
        assert cluster is not None
        return cluster

    def note_processes(self) -> None:
        """Remember every pid cluster.json names (and queues the registry names)."""
        cluster = self.run.read_cluster() if self.run_dir.exists() else None
        if cluster is None:
            return
        pids = [cluster.supervisor_pid, *(node.pid for node in cluster.nodes)]
        for pid in pids:
            if pid is not None and pid not in self.seen:
                try:
                    self.seen[pid] = psutil.Process(pid).create_time()
                except psutil.Error:
                    pass
        token = registry.resource_token(self.name, self.run_dir)
        directory = registry.registry_directory(self.run_dir, token)
        if directory.is_dir():
            for entry in sorted(directory.glob("*.entry")):
                found = registry.read_entry(str(entry))
                if found is not None:
                    self.queues.add(found[0].queue)

    def live_processes(self) -> list[psutil.Process]:
        alive = []
        for pid, create_time in sorted(self.seen.items()):
            try:
                process = psutil.Process(pid)
                if abs(process.create_time() - create_time) < 0.05 and (
                    process.status() != psutil.STATUS_ZOMBIE
                ):
                    alive.append(process)
            except psutil.Error:
                continue
        return alive

    def leftovers(self) -> list[str]:
        """Processes, queues and segments of this cluster that still exist."""
        found = [f"process {process.pid}" for process in self.live_processes()]
        found += [f"queue {name}" for name in sorted(self.queues) if mq.queue_exists(name)]
        token = registry.resource_token(self.name, self.run_dir)
        found += [f"segment {name}" for name in shm.segment_files(shm.SHM_DIR, token)]
        return found

    def wait_for(self, condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")
            time.sleep(POLL_S)

    def log_tail(self, lines: int = 15) -> str:
        path = self.run.supervisor_log
        if not path.exists():
            return "(no supervisor log)"
        return "supervisor log:\n" + "\n".join(path.read_text().splitlines()[-lines:])

    # ---- teardown ----

    def destroy(self) -> None:
        """`down`, then kill and reclaim whatever is left, whatever state we are in."""
        if self.run_dir.exists() and self.run.read_cluster() is not None:
            self.note_processes()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cluster.cli",
                    "down",
                    "--name",
                    self.name,
                    "--data-dir",
                    str(self.run_dir),
                ],
                cwd=ROOT,
                capture_output=True,
                timeout=CLI_TIMEOUT_S,
            )
        processes = self.live_processes()
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(processes, timeout=KILL_WAIT_S)
        if self.run_dir.exists():
            reclaim_cluster(self.name, self.run_dir, include_live=True)
        for name in sorted(self.queues):
            mq.unlink_queue(name)


ClusterFactory = Callable[..., CliCluster]


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    """make(directory, name=None) -> a CliCluster in tmp_path/directory; every one made
    is destroyed at the end (in reverse order) and checked to leave nothing behind."""
    made: list[CliCluster] = []

    def make(directory: str, name: str | None = None) -> CliCluster:
        instance = CliCluster(name or f"t{os.getpid()}x{next(_names)}", tmp_path / directory)
        made.append(instance)
        return instance

    try:
        yield make
    finally:
        for instance in reversed(made):
            instance.destroy()
    for instance in made:
        assert instance.leftovers() == []


@pytest.fixture
def cluster(cluster_factory: ClusterFactory) -> CliCluster:
    return cluster_factory("cluster")
