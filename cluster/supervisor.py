"""The supervisor: one process per cluster per host that forks, pins, watches and stops
the workers named in `cluster.json`.

It forks every worker BEFORE anything imports duckdb or pyarrow, so each child starts
from a small, clean interpreter (no threads, no mapped Arrow pools) and imports the
heavy modules itself. That is why this module imports only os, signal, psutil, msgspec
and the light cluster modules (config, rundir, protocol, heartbeat) — never ipc/.

Each worker is pinned to its logical CPU (psutil affinity) and runs under SCHED_BATCH
(`_batch_scheduling`: it does not preempt the client that woke it). A worker that dies is
restarted with exponential backoff and full jitter (`RESTART_BACKOFF_MS_BASE` doubling up
to `RESTART_BACKOFF_MS_CAP`); one restarted more than `CRASH_LOOP_RESTARTS_MAX` times
within `CRASH_LOOP_WINDOW_MS` is marked "crash_loop" and left down. SIGTERM (what
`dcluster down` sends) or SIGINT stops every worker: SIGTERM, then SIGKILL after
`STOP_TIMEOUT_MS`.

A worker that lives but no longer turns its loop (deadlocked, spinning, blocked on a hung
disk) is found by its heartbeat (cluster.heartbeat): every `hung_ms_max / 4` (at most
`LOOP_WAKE_MS_MAX`) the supervisor reads each worker's counter, and one silent for
`hung_ms_max` (default `HUNG_MS_MAX_DEFAULT`, 10 s; the constructor's `hung_ms_max` or
the `DCLUSTER_HUNG_MS_MAX` environment variable, in ms, shorten it for tests) is
SIGKILLed with the reason logged and recorded in `cluster.json` (`last_exit`); the
normal restart path (backoff, crash-loop accounting) takes over. A worker stopped on
purpose (SIGSTOP by `dcluster chaos pause`, a debugger) is never killed for it, nor one
still starting (imports, WAL replay) within `START_GRACE_MS_DEFAULT` of its fork.

Invariants: while the supervisor lives it holds an exclusive `flock` on
`supervisor.pid` (its children close their copy at fork, so the lock dies with the
supervisor alone); `cluster.json` always names the live pid, incarnation, state and
restart count of every worker, and is rewritten whole whenever one of them changes; an
incarnation number is never reused (each start is the previous one plus one).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import random
import select
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path

import psutil

from clock import SystemClock
from cluster.config import WorkerConfig, snapshot_entries_from
from cluster.heartbeat import (
    HUNG_MS_MIN,
    START_GRACE_MS_DEFAULT,
    HeartbeatWatch,
    hung_ms_max_from,
    is_hung,
    read_heartbeat,
)
from cluster.rundir import ClusterInfo, NodeInfo, RunDir

logger = logging.getLogger("cluster.supervisor")

RESTART_BACKOFF_MS_BASE = 100
RESTART_BACKOFF_MS_CAP = 5_000
CRASH_LOOP_RESTARTS_MAX = 5
CRASH_LOOP_WINDOW_MS = 60_000
STOP_TIMEOUT_MS = 5_000
"""How long stopping workers get to flush and exit after SIGTERM before SIGKILL."""
LOOP_WAKE_MS_MAX = 1_000
LOCK_ATTEMPTS_MAX = 50
LOCK_RETRY_S = 0.01
WORKER_QUEUES_PER_HOST_EXPECTED = 24
"""Sizes every worker's queue so two clusters and their clients fit the mq budget."""
NS_PER_MS = 1_000_000
PROCESS_NAME_BYTES_MAX = 15
_PR_SET_NAME = 15


class SupervisorError(Exception):
    """The supervisor cannot start (another one runs, or there is nothing to run)."""


class SupervisorRunning(SupervisorError):
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"a supervisor is already running (pid {pid})")


# ---- the lock on supervisor.pid ----


def acquire_lock(run: RunDir) -> int:
    """Take the supervisor lock and write our pid; returns the descriptor to keep open.
    Retries briefly, so a concurrent liveness check does not make us fail."""
    fd = os.open(run.supervisor_pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    for _ in range(LOCK_ATTEMPTS_MAX):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(LOCK_RETRY_S)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    pid = _read_pid(run)
    os.close(fd)
    raise SupervisorRunning(pid)


def running_supervisor(run: RunDir) -> int | None:
    """The pid of the live supervisor of this run directory, or None. The lock says
    whether one lives (a pid alone could have been reused)."""
    try:
        fd = os.open(run.supervisor_pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(run) or -1
    finally:
        os.close(fd)  # also drops a shared lock we took
    return None


def _read_pid(run: RunDir) -> int | None:
    try:
        text = run.supervisor_pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


# ---- the worker processes ----


class _Worker:
    """One node as the supervisor tracks it."""

    def __init__(self, info: NodeInfo) -> None:
        self.info = info
        self.restart_times_ns: deque[int] = deque()
        self.restart_due_ns: int | None = None
        self.watch: HeartbeatWatch | None = None
        """The running incarnation's heartbeat, as last read."""
        self.hung_reason: str | None = None
        """Set when the supervisor killed it as hung; becomes `last_exit` when reaped."""


def worker_config_for(cluster: ClusterInfo, node: NodeInfo, run: RunDir) -> WorkerConfig:
    """The config one (re)start of `node` runs with (its incarnation already bumped).
    Founding a cluster, this host's first `voters` workers are its founding voters;
    joining one (TCP, `up --join`), every worker starts empty and waits to be added."""
    joining = cluster.join is not None
    founders = () if joining else tuple(n.id for n in cluster.nodes[: cluster.voters])
    peers = dict(cluster.peers)
    peers.update(
        (other.id, other.address)
        for other in cluster.nodes
        if other.id != node.id and other.address is not None
    )
    return WorkerConfig(
        name=cluster.name,
        node=node.id,
        run_dir=str(run.path),
        founders=founders,
        incarnation=node.incarnation,
        transport=cluster.transport,
        fsync=cluster.fsync,
        bind=node.address,
        peers=peers,
        joining=joining,
        queues_per_host_expected=WORKER_QUEUES_PER_HOST_EXPECTED,
        snapshot_entries=snapshot_entries_from(os.environ),
    )


def _set_process_name(name: str) -> None:
    """Best effort: what `ps -o comm` and `top` show for this process."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:PROCESS_NAME_BYTES_MAX], 0, 0, 0)


def _batch_scheduling() -> None:
    """Run this process (and the threads it starts) under SCHED_BATCH: the same fair share
    of CPU, but a worker woken by a message does not preempt the process that sent it. A
    client fanning fragments out to every worker otherwise lost its CPU to the first worker
    it woke on its core, and reached the next one only once the scheduler moved it
    (measured: ~1 ms a send, ~1 ms off a query's fixed cost). Where the kernel refuses, the
    worker runs as it was."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _child(config: WorkerConfig, log_path: Path, inherited: list[int]) -> None:
    """In the forked child: drop what belongs to the supervisor, run the worker, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        # A process group of its own: Ctrl-C (or a hang-up) at a foreground `up` reaches
        # the supervisor alone, which turns it into an orderly stop of every worker.
        os.setpgid(0, 0)
        _batch_scheduling()
        for fd in inherited:
            os.close(fd)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        _set_process_name(f"dcluster-w{config.node}")
        from cluster.worker import main

        code = main(config)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Supervisor:
    """Runs in the foreground of its process until SIGTERM/SIGINT; see the module doc."""

    def __init__(
        self,
        run: RunDir,
        *,
        rng: random.Random | None = None,
        hung_ms_max: int | None = None,
        start_grace_ms: int = START_GRACE_MS_DEFAULT,
    ) -> None:
        self.run = run
        self.clock = SystemClock()
        self.rng = rng or random.Random()
        self.hung_ms_max = hung_ms_max if hung_ms_max is not None else hung_ms_max_from(os.environ)
        assert self.hung_ms_max >= HUNG_MS_MIN, self.hung_ms_max
        self.start_grace_ms = start_grace_ms
        self.check_ms = min(LOOP_WAKE_MS_MAX, self.hung_ms_max // 4)
        self._next_check_ns = 0
        self.stopping = False
        self.cluster: ClusterInfo | None = None
        self.workers: list[_Worker] = []
        self.by_pid: dict[int, _Worker] = {}
        self._lock_fd = -1
        self._wake_read = -1
        self._wake_write = -1

    # ---- lifecycle ----

    def serve(self) -> int:
        """Start every worker, keep them running, stop them on a signal. Returns the exit
        code of the supervisor process."""
        self._lock_fd = acquire_lock(self.run)
        try:
            cluster = self.run.read_cluster()
            if cluster is None:
                raise SupervisorError(f"no {self.run.cluster_file}: run `dcluster up`")
            self.cluster = cluster
            cluster.supervisor_pid = os.getpid()
            self.workers = [_Worker(node) for node in cluster.nodes]
            self._install_signals()
            logger.info("supervisor %d starts %d workers", os.getpid(), len(self.workers))
            try:
                for worker in self.workers:
                    self._start(worker)
                self._publish()
                self._loop()
            finally:  # also when starting failed half-way: no worker outlives us
                self._stop_all()
                cluster.supervisor_pid = None
                self._publish()
            logger.info("supervisor %d stopped", os.getpid())
            return 0
        finally:
            self._close()

    def _install_signals(self) -> None:
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_write)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        # A handler (not SIG_DFL, which discards SIGCHLD) so the wakeup fd sees it.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _close(self) -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_read, self._wake_write, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = self._lock_fd = -1

    def _loop(self) -> None:
        while not self.stopping:
            self._reap()
            self._restart_due()
            self._check_heartbeats()
            self._wait(self._next_wake_ms())

    def _wait(self, timeout_ms: int) -> None:
        try:
            select.select([self._wake_read], [], [], timeout_ms / 1000)
        except InterruptedError:
            pass
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 512):
                pass

    def _next_wake_ms(self) -> int:
        now = self.clock.monotonic_ns()
        wake_ms = max(0, min(LOOP_WAKE_MS_MAX, (self._next_check_ns - now) // NS_PER_MS))
        for worker in self.workers:
            if worker.restart_due_ns is not None:
                wake_ms = min(wake_ms, max(0, (worker.restart_due_ns - now) // NS_PER_MS))
        return wake_ms

    # ---- starting ----

    def _start(self, worker: _Worker) -> None:
        assert self.cluster is not None
        node = worker.info
        node.incarnation += 1
        config = worker_config_for(self.cluster, node, self.run)
        inherited = [self._lock_fd, self._wake_read, self._wake_write]
        # The new incarnation creates its own counter; until then there is none to read.
        self.run.heartbeat_file(node.id).unlink(missing_ok=True)
        worker.watch = HeartbeatWatch.start(self.clock.monotonic_ns())
        worker.hung_reason = None
        pid = os.fork()
        if pid == 0:
            _child(config, self.run.worker_log(node.id), inherited)
        node.pid = pid
        node.state = "running"
        node.create_time = _create_time(pid)
        worker.restart_due_ns = None
        self.by_pid[pid] = worker
        if node.core is not None:
            with contextlib.suppress(psutil.Error, OSError):
                psutil.Process(pid).cpu_affinity([node.core])
        logger.info(
            "started node %d incarnation %d pid %d on cpu %s",
            node.id,
            node.incarnation,
            pid,
            node.core,
        )

    def _restart_due(self) -> None:
        now = self.clock.monotonic_ns()
        started = False
        for worker in self.workers:
            due = worker.restart_due_ns
            if due is None or due > now:
                continue
            worker.restart_times_ns.append(now)
            worker.info.restarts += 1
            self._start(worker)
            started = True
        if started:
            self._publish()

    # ---- exits ----

    def _reap(self) -> list[_Worker]:
        """Collect every child that exited; schedule restarts unless stopping."""
        reaped: list[_Worker] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.by_pid.pop(pid, None)
            if worker is None:
                continue
            described = _describe(status)
            logger.info("node %d pid %d exited: %s", worker.info.id, pid, described)
            worker.info.last_exit = worker.hung_reason or described
            worker.info.pid = None
            worker.info.create_time = None
            worker.watch = None
            if self.stopping:
                worker.info.state = "stopped"
            else:
                self._schedule_restart(worker)
            reaped.append(worker)
        if reaped:
            self._publish()
        return reaped

    def _schedule_restart(self, worker: _Worker) -> None:
        now = self.clock.monotonic_ns()
        window_start = now - CRASH_LOOP_WINDOW_MS * NS_PER_MS
        times = worker.restart_times_ns
        while times and times[0] < window_start:
            times.popleft()
        if len(times) >= CRASH_LOOP_RESTARTS_MAX:
            worker.info.state = "crash_loop"
            worker.restart_due_ns = None
            logger.error(
                "node %d restarted %d times within %d ms: crash loop, not restarting it",
                worker.info.id,
                len(times),
                CRASH_LOOP_WINDOW_MS,
            )
            return
        delay_ms = restart_delay_ms(len(times), self.rng)
        worker.info.state = "restarting"
        worker.restart_due_ns = now + int(delay_ms * NS_PER_MS)
        logger.info("node %d restarts in %.0f ms", worker.info.id, delay_ms)

    # ---- hangs ----

    def _check_heartbeats(self) -> None:
        """Every `check_ms`: read each running worker's counter; SIGKILL a hung one."""
        now = self.clock.monotonic_ns()
        if now < self._next_check_ns:
            return
        self._next_check_ns = now + self.check_ms * NS_PER_MS
        killed = False
        for worker in self.workers:
            pid, watch = worker.info.pid, worker.watch
            if pid is None or watch is None or worker.hung_reason is not None:
                continue
            value = read_heartbeat(self.run.heartbeat_file(worker.info.id))
            stopped = value == watch.value and _stopped_on_purpose(pid)
            watch.observe(value, now, stopped=stopped)
            verdict = is_hung(
                silent_ms=watch.silent_ms(now),
                up_ms=watch.up_ms(now),
                beating=watch.beating,
                stopped=stopped,
                hung_ms_max=self.hung_ms_max,
                start_grace_ms=self.start_grace_ms,
            )
            if verdict:
                self._kill_hung(worker, pid, watch.silent_ms(now))
                killed = True
        if killed:
            self._publish()

    def _kill_hung(self, worker: _Worker, pid: int, silent_ms: int) -> None:
        reason = f"hung: no heartbeat for {silent_ms} ms"
        logger.warning("node %d pid %d %s: SIGKILL", worker.info.id, pid, reason)
        worker.hung_reason = reason
        worker.info.last_exit = reason
        _signal(pid, signal.SIGKILL)  # reaped (and restarted) like any other death

    # ---- stopping ----

    def _stop_all(self) -> None:
        """SIGTERM every worker (and SIGCONT, in case chaos paused it), wait up to
        STOP_TIMEOUT_MS for them to flush and exit, then SIGKILL the stragglers."""
        for worker in self.workers:
            worker.restart_due_ns = None
            if worker.info.state in ("restarting", "starting"):
                worker.info.state = "stopped"
        for pid in sorted(self.by_pid):
            _signal(pid, signal.SIGTERM)
            _signal(pid, signal.SIGCONT)
        deadline = self.clock.monotonic_ns() + STOP_TIMEOUT_MS * NS_PER_MS
        while self.by_pid and self.clock.monotonic_ns() < deadline:
            self._reap()
            if self.by_pid:
                self._wait(10)
        for pid in sorted(self.by_pid):
            logger.warning("node %d pid %d ignored SIGTERM: SIGKILL", self.by_pid[pid].info.id, pid)
            _signal(pid, signal.SIGKILL)
        for pid in sorted(self.by_pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            worker = self.by_pid.pop(pid)
            worker.info.last_exit = "killed by SIGKILL (ignored SIGTERM)"
            worker.info.pid = None
            worker.info.create_time = None
            worker.info.state = "stopped"

    def _publish(self) -> None:
        assert self.cluster is not None
        self.run.write_cluster(self.cluster)


def restart_delay_ms(recent_restarts: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^recent_restarts)]."""
    exponent = min(recent_restarts, 30)
    ceiling = min(RESTART_BACKOFF_MS_CAP, RESTART_BACKOFF_MS_BASE * (1 << exponent))
    return rng.uniform(0, ceiling)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _stopped_on_purpose(pid: int) -> bool:
    """SIGSTOPped (`dcluster chaos pause`) or held by a debugger: silent, not hung."""
    try:
        status = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.supervisor")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return Supervisor(RunDir(args.run_dir.resolve())).serve()
    except SupervisorError as error:
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
