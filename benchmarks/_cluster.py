"""A dcluster cluster for a benchmark: started with the command line in a directory of its
own, stopped whatever happens, and checked gone.

Invariant: when `running()`'s block ends, the cluster's supervisor and workers are gone, and
so are its queues, shm segments and run directory. `dcluster down --purge` comes first; then
every process `cluster.json` ever named that still lives (the same pid and create time) is
SIGKILLed, and every queue and segment left is removed. Each step's wait is bounded, and a
Ctrl-C during the stop does not cut it short. On a normal exit, anything still left is an
error.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from cluster.rundir import RunDir
from cluster.supervisor import running_supervisor
from cluster.topology import detect
from ipc import mq, registry, shm
from ipc.local import reclaim_cluster

CLI_S_MAX = 90.0
"""`dcluster up` or `down` takes at most this long."""
KILL_WAIT_S_MAX = 10.0
"""How long SIGKILLed leftovers get to disappear."""
CREATE_TIME_SLACK_S = 0.05
"""psutil's create times are rounded: two readings of one process differ by less."""


@dataclass
class Cluster:
    """A running cluster, and everything of it seen so far (to clean up and to check)."""

    name: str
    run: RunDir
    cores: int
    oversubscribe: bool
    processes: dict[int, float] = field(default_factory=dict)
    """pid -> create time of every supervisor and worker `cluster.json` ever named."""
    queues: set[str] = field(default_factory=set)
    """Every queue the cluster's registry ever named (workers' and clients')."""

    @property
    def token(self) -> str:
        return registry.resource_token(self.name, self.run.path)

    def note(self) -> None:
        """Remember the processes and queues the run directory names now."""
        info = self.run.read_cluster() if self.run.cluster_file.exists() else None
        if info is not None:
            for pid in (info.supervisor_pid, *(node.pid for node in info.nodes)):
                if pid is not None and pid > 0 and pid not in self.processes:
                    with contextlib.suppress(psutil.Error):
                        self.processes[pid] = psutil.Process(pid).create_time()
        directory = registry.registry_directory(self.run.path, self.token)
        if directory.is_dir():
            for entry in sorted(directory.glob("*.entry")):
                found = registry.read_entry(str(entry))
                if found is not None:
                    self.queues.add(found[0].queue)

    def live_processes(self) -> list[psutil.Process]:
        return [
            process for process in map(_same_process, sorted(self.processes.items())) if process
        ]

    def leftovers(self) -> list[str]:
        """Processes, queues and segments of this cluster that still exist."""
        found = [f"process {process.pid}" for process in self.live_processes()]
        found += [f"queue {name}" for name in sorted(self.queues) if mq.queue_exists(name)]
        prefix = registry.cluster_prefix(self.token)
        found += [f"segment {name}" for name in shm.segment_files(shm.SHM_DIR, prefix)]
        return found

    def description(self) -> dict[str, Any]:
        """What a separate process needs to check that nothing of the cluster is left."""
        return {
            "name": self.name,
            "run_dir": str(self.run.path),
            "processes": [[pid, created] for pid, created in sorted(self.processes.items())],
            "queues": sorted(self.queues),
        }


def _same_process(seen: tuple[int, float]) -> psutil.Process | None:
    """The process `seen` names if it still lives (not a zombie, not a reused pid)."""
    pid, create_time = seen
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) >= CREATE_TIME_SLACK_S:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def physical_cores() -> int:
    """The physical cores `dcluster up` would count on this host."""
    return detect().cores


@contextlib.contextmanager
def running(name: str, cores: int, directory: Path) -> Iterator[Cluster]:
    """A cluster of `cores` workers whose run directory is `directory` (which must not
    exist yet); `--oversubscribe` only when the host has fewer physical cores."""
    assert cores >= 1, cores
    assert not directory.exists(), directory
    directory = directory.resolve()
    cluster = Cluster(name, RunDir(directory), cores, oversubscribe=cores > physical_cores())
    try:
        flags = ["--cores", str(cores), *(["--oversubscribe"] if cluster.oversubscribe else [])]
        started = _dcluster(cluster, "up", *flags)
        cluster.note()
        if started.returncode != 0:
            raise RuntimeError(
                f"dcluster up failed ({started.returncode}):\n{started.stdout}{started.stderr}"
            )
        yield cluster
    finally:
        with _sigint_ignored():
            stop(cluster)
    left = cluster.leftovers()
    if left:
        raise RuntimeError(f"cluster {name} left behind: {', '.join(left)}")


def stop(cluster: Cluster) -> None:
    """`down --purge`, then whatever it left: processes by pid, queues, segments, files."""
    cluster.note()
    if cluster.run.cluster_file.exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            _dcluster(cluster, "down", "--purge")
    supervisor = running_supervisor(cluster.run) if cluster.run.path.exists() else None
    if supervisor is not None and supervisor > 0 and supervisor not in cluster.processes:
        with contextlib.suppress(psutil.Error):  # from an `up` cut short: ours all the same
            cluster.processes[supervisor] = psutil.Process(supervisor).create_time()
    # The supervisor first: it would restart the workers killed before it.
    victims = sorted(cluster.live_processes(), key=lambda p: p.pid != supervisor)
    for process in victims:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(victims, timeout=KILL_WAIT_S_MAX)
    reclaim_cluster(cluster.name, cluster.run.path, include_live=True)
    for queue in sorted(cluster.queues):
        mq.unlink_queue(queue)
    shutil.rmtree(cluster.run.path, ignore_errors=True)


def _dcluster(cluster: Cluster, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cluster.cli", *arguments]
    command += ["--name", cluster.name, "--data-dir", str(cluster.run.path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=CLI_S_MAX, check=False)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored for the block (and by the commands it runs, which inherit it), so a
    second Ctrl-C cannot leave a cluster half stopped. Every wait in it is bounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
