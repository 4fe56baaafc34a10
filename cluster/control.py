"""What the operator's commands do: `up`, `down`, `status` and the chaos primitives.

The CLI (cluster/cli.py) parses flags and prints; this module checks the flags
(`plan_up`, pure: no files, no processes), prepares the run directory, starts the
supervisor, waits for a leader, stops and cleans up, merges the status views and sends
signals. Errors are typed by whose fault they are: `UsageError` (bad flags, exit 2) and
`ControlError` (the cluster's state refuses, exit 1).

Invariants: a process is signalled only if it is one of ours — its pid is recorded in
`cluster.json` with its create time and that still matches (so a reused pid is never
hit); `up` either returns with a leader or leaves nothing running; this module imports
nothing heavy at load time, so `up --foreground` can become the supervisor and fork
workers before duckdb or pyarrow are imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from clock import SystemClock
from cluster.protocol import NODES_MAX, Address, NodeStatus
from cluster.rundir import ClusterInfo, NodeInfo, RunDir, default_data_dir
from cluster.supervisor import STOP_TIMEOUT_MS, running_supervisor
from cluster.topology import Topology, TopologyError, assign_cores

UP_TIMEOUT_S = 30.0
"""`up` fails (and stops what it started) if the cluster has no leader by then."""
UP_TIMEOUT_S_MAX = 600.0
DOWN_TIMEOUT_S = STOP_TIMEOUT_MS / 1000 + 5.0
"""How long `down` waits for the supervisor to stop its workers before SIGKILL."""
KILL_WAIT_S = 5.0
POLL_INTERVAL_S = 0.05
UP_STATUS_TIMEOUT_MS = 300
VOTERS_DEFAULT_MAX = 5
SECRET_BYTES = 32
CREATE_TIME_TOLERANCE_S = 0.05
CPU_SAMPLE_S = 0.1
LOG_TAIL_LINES = 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TRANSPORTS = ("shm", "tcp")
JOIN_STATUS_TIMEOUT_MS = 3_000
LOCAL_HOST = "127.0.0.1"


class UsageError(Exception):
    """The command line asks for something invalid (exit code 2)."""


class ControlError(Exception):
    """The cluster's state refuses the command (exit code 1)."""


# ---- up: checking the flags ----


@dataclass(frozen=True)
class UpPlan:
    name: str
    run_dir: Path
    workers: int
    cores: tuple[int, ...]
    """The logical CPU of each worker, in node order."""
    transport: str
    fsync: bool
    voters: int
    oversubscribe: bool
    bind: Address | None
    join: Address | None
    join_node: int = 0
    """The node number listening at `join` (`--join N@HOST:PORT`; default 0)."""
    secret_file: Path | None = None


def parse_join(text: str) -> tuple[int, Address]:
    """`[N@]HOST:PORT`: the node listening there (default 0, the founding host's first)."""
    node_text, sep, address_text = text.partition("@")
    if not sep:
        return 0, parse_address(text, "--join")
    if not node_text.isdigit() or int(node_text) >= NODES_MAX:
        raise UsageError(f"--join wants [NODE@]HOST:PORT, not {text!r}")
    return int(node_text), parse_address(address_text, "--join")


def parse_address(text: str, flag: str) -> Address:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{flag} wants HOST:PORT (port 0-65535), not {text!r}")
    return host.strip("[]"), int(port_text)


def parse_fsync(text: str) -> bool:
    if text not in ("on", "off"):
        raise UsageError(f"--fsync is on or off, not {text!r}")
    return text == "on"


def plan_up(
    *,
    name: str,
    data_dir: Path | None,
    cores: int | None,
    transport: str | None,
    bind: str | None,
    join: str | None,
    voters: int | None,
    oversubscribe: bool,
    fsync: str,
    topology: Topology,
    previous: ClusterInfo | None = None,
    secret_file: Path | None = None,
) -> UpPlan:
    """Check every flag of `up` against each other and the host; touches nothing. Flags
    left out (None) default to what `previous` (the cluster's last run) had, else to one
    worker per physical core, shm and min(N, VOTERS_DEFAULT_MAX) voters."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"--name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    if transport is None:
        transport = previous.transport if previous else "shm"
    if transport not in TRANSPORTS:
        raise UsageError(f"--transport is shm or tcp, not {transport!r}")
    if cores is None and previous is not None:
        cores = len(previous.nodes)
        oversubscribe = oversubscribe or previous.oversubscribe
    if voters is None and previous is not None:
        if join is not None or previous.voters <= (cores or 0):
            voters = previous.voters
    workers = topology.cores if cores is None else cores
    if not 1 <= workers <= NODES_MAX:
        raise UsageError(f"--cores must be 1 to {NODES_MAX}, not {workers}")
    try:
        assigned = assign_cores(workers, topology.cpus, oversubscribe=oversubscribe)
    except TopologyError as error:
        raise UsageError(f"--cores {workers}: {error}") from error
    bind_address = parse_address(bind, "--bind") if bind is not None else None
    join_node, join_address = parse_join(join) if join is not None else (0, None)
    if transport == "shm" and (bind_address or join_address):
        raise UsageError("--bind and --join need --transport tcp")
    if join_address is not None and bind_address is None:
        raise UsageError("--join needs --bind HOST:PORT: where the other hosts reach this one")
    voter_count = _voters(voters, workers, joining=join_address is not None)
    if secret_file is not None and not secret_file.is_file():
        raise UsageError(f"--secret-file {secret_file}: no such file")
    run_dir = (data_dir or default_data_dir(name)).expanduser().resolve()
    return UpPlan(
        name=name,
        run_dir=run_dir,
        workers=workers,
        cores=tuple(assigned),
        transport=transport,
        fsync=parse_fsync(fsync),
        voters=voter_count,
        oversubscribe=oversubscribe,
        bind=bind_address,
        join=join_address,
        join_node=join_node,
        secret_file=secret_file,
    )


def _voters(voters: int | None, workers: int, *, joining: bool) -> int:
    """Founding a cluster: how many of its workers vote. Joining one: how many voters
    the whole cluster should have (this host's workers are promoted until it does)."""
    if joining:
        count = VOTERS_DEFAULT_MAX if voters is None else voters
        if not 1 <= count <= NODES_MAX:
            raise UsageError(f"--voters must be 1 to {NODES_MAX}, not {voters}")
        return count
    count = min(workers, VOTERS_DEFAULT_MAX) if voters is None else voters
    if not 1 <= count <= workers:
        raise UsageError(f"--voters must be 1 to the number of workers ({workers}), not {voters}")
    return count


# ---- up: starting ----


@dataclass(frozen=True)
class UpResult:
    run_dir: Path
    supervisor_pid: int
    leader: int
    term: int
    cleaned: list[str]
    joined: list[str]
    """TCP: learners added and voters promoted, in words."""
    addresses: list[tuple[int, Address]]


def prepare(plan: UpPlan, *, isolate_reclaim: bool) -> tuple[RunDir, list[str]]:
    """Refuse a live cluster of this name, clean up what a killed one left, write the
    secret (first time) and a fresh cluster.json. Returns the run dir and what was
    cleaned up."""
    run = RunDir(plan.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    pid = running_supervisor(run)
    if pid is not None:
        raise ControlError(
            f"cluster {plan.name} is already running (supervisor pid {pid}, {run.path}); "
            f"run `dcluster down --name {plan.name}` first"
        )
    previous = run.read_cluster()
    cleaned: list[str] = []
    if previous is not None:
        _check_compatible(plan, previous, run)
        cleaned = clean_leftovers(run, previous, isolate=isolate_reclaim)
    secret = _secret(run, plan)
    if plan.join is None:
        info = _cluster_info(plan, previous)
    else:
        peers = discover(plan, secret)
        info = _cluster_info(plan, previous, first_id=_first_free(peers), peers=peers)
    if not run.secret_file.exists():
        run.write_secret(secret)  # only now: a secret that did not work is not kept
    run.write_cluster(info)
    return run, cleaned


def _secret(run: RunDir, plan: UpPlan) -> bytes:
    """The cluster secret: from --secret-file, kept from an earlier run, or (founding a
    cluster) made fresh."""
    if plan.secret_file is not None:
        try:
            secret = bytes.fromhex(plan.secret_file.read_text().strip())
        except ValueError as error:
            raise UsageError(f"--secret-file {plan.secret_file}: not a hex secret") from error
        if run.secret_file.exists() and run.read_secret() != secret:
            raise ControlError(f"{run.secret_file} holds another secret than {plan.secret_file}")
        return secret
    if run.secret_file.exists():
        return run.read_secret()
    if plan.join is not None:
        raise UsageError(
            "--join needs the cluster's secret: pass --secret-file with a copy of the "
            "`secret` file from a host of the cluster"
        )
    return secrets.token_bytes(SECRET_BYTES)


def _check_compatible(plan: UpPlan, previous: ClusterInfo, run: RunDir) -> None:
    """A cluster with data keeps its size and name: its WALs name their voters."""
    has_data = any(run.wal_dir(node.id).exists() for node in previous.nodes)
    if not has_data:
        return
    if previous.name != plan.name:
        raise UsageError(f"{run.path} holds cluster {previous.name!r}, not {plan.name!r}")
    if len(previous.nodes) != plan.workers:
        raise UsageError(
            f"cluster {plan.name} has {len(previous.nodes)} workers with data in {run.path}; "
            f"start it with --cores {len(previous.nodes)} or remove it with "
            f"`dcluster down --name {plan.name} --purge`"
        )


def _cluster_info(
    plan: UpPlan,
    previous: ClusterInfo | None,
    *,
    first_id: int = 0,
    peers: dict[int, Address] | None = None,
) -> ClusterInfo:
    """The table `up` hands the supervisor. A host that joined before keeps its node
    numbers (its WALs belong to them); incarnations go on from the last run."""
    if previous is not None and previous.nodes:
        first_id = previous.nodes[0].id
    incarnations = {node.id: node.incarnation for node in previous.nodes} if previous else {}
    addresses = _addresses(plan, previous)
    host = addresses[0][0] if addresses else socket.gethostname()
    nodes = [
        NodeInfo(
            id=first_id + index,
            host=host,
            core=core,
            incarnation=incarnations.get(first_id + index, 0),
            address=addresses[index] if addresses else None,
        )
        for index, core in enumerate(plan.cores)
    ]
    return ClusterInfo(
        name=plan.name,
        transport=plan.transport,
        fsync=plan.fsync,
        voters=plan.voters,
        oversubscribe=plan.oversubscribe,
        supervisor_pid=None,
        nodes=nodes,
        bind=plan.bind,
        join=plan.join,
        peers=dict(sorted((peers or {}).items())),
    )


def _addresses(plan: UpPlan, previous: ClusterInfo | None) -> list[Address]:
    """TCP: this host's i-th worker listens on the --bind port + i; without a port, on
    the port it had last run (the log remembers members' addresses), else a free one."""
    if plan.transport != "tcp":
        return []
    host, port = plan.bind or (LOCAL_HOST, 0)
    if port:
        return [(host, port + index) for index in range(plan.workers)]
    before = [node.address for node in previous.nodes] if previous else []
    if len(before) == plan.workers and all(a is not None and a[0] == host for a in before):
        return [address for address in before if address is not None]
    return [(host, _free_port(host)) for _ in range(plan.workers)]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# ---- up: joining a cluster on other hosts, and its address book ----


def discover(plan: UpPlan, secret: bytes) -> dict[int, Address]:
    """Ask the worker at --join who the members are and where each listens (from the
    address book every tcp `up` writes). Reads are stale reads of that one worker: the
    leader may be anywhere, and we cannot reach it until we know where it is."""
    from cluster.client import Client, address_key

    assert plan.join is not None
    seed = ClusterInfo(
        name=plan.name,
        transport="tcp",
        fsync=plan.fsync,
        voters=0,
        oversubscribe=False,
        supervisor_pid=None,
        nodes=[],
        bind=plan.bind,
        peers={plan.join_node: plan.join},
    )
    with Client(plan.run_dir, cluster=seed, secret=secret) as client:
        status = client.status_all(JOIN_STATUS_TIMEOUT_MS).get(plan.join_node)
        if status is None:
            raise ControlError(
                f"no worker of cluster {plan.name} answered at {_show(plan.join)} (node "
                f"{plan.join_node}) within {JOIN_STATUS_TIMEOUT_MS} ms: check the address, "
                f"that the cluster is up, and that --secret-file is its secret"
            )
        peers = {plan.join_node: plan.join}
        for node in sorted(set(status.voters) | set(status.learners)):
            if node not in peers:
                value = client.get(address_key(node), stale=True)
                if value is None:
                    raise ControlError(f"node {node} is a member but has no address on record")
                peers[node] = parse_address(value.decode(), address_key(node))
    return peers


def _first_free(peers: dict[int, Address]) -> int:
    return max(peers, default=-1) + 1


def join_cluster(client: Any, leader_status: NodeStatus, voters: int) -> list[str]:
    """On a tcp cluster: record this host's workers in the address book; add the ones
    that are not members yet as learners; promote them while the cluster has fewer than
    `voters` voters. Returns what it did, in words."""
    from cluster.client import address_key

    said = [f"added node {node} as a learner" for node in add_learners(client, leader_status)]
    for node in client.cluster.nodes:
        if node.address is not None:
            client.put(address_key(node.id), _show(node.address))
    count = len(leader_status.voters)
    for node in client.cluster.nodes:
        if count >= voters:
            break
        if node.id in leader_status.voters:
            continue
        client.promote(node.id)
        count += 1
        said.append(f"promoted node {node.id} to voter")
    return said


def _show(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def start_background(run: RunDir) -> subprocess.Popen[bytes]:
    """The supervisor as a fresh interpreter in its own session, logging to its file."""
    log = open(run.supervisor_log, "ab")  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.supervisor", "--run-dir", str(run.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
    finally:
        log.close()


def _package_root() -> str:
    root = str(Path(__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH")
    return f"{root}:{current}" if current else root


def wait_for_leader(
    run: RunDir, supervisor: subprocess.Popen[bytes], timeout_s: float = UP_TIMEOUT_S
) -> tuple[int, NodeStatus, list[str]]:
    """Block until a status query shows a leader. Then add the workers that are not
    members yet as learners (and, TCP, record addresses and promote: `join_cluster`).
    Returns (leader, its status, what was done in words). Raises ControlError if the
    supervisor exits or `timeout_s` passes first."""
    from cluster.client import Client, leader_of

    clock = SystemClock()
    deadline_ns = clock.monotonic_ns() + int(timeout_s * 1e9)
    with Client(run.path) as client:
        while clock.monotonic_ns() < deadline_ns:
            code = supervisor.poll()
            if code is not None:
                raise ControlError(f"the supervisor exited with code {code}\n{log_tail(run)}")
            statuses = client.status_all(UP_STATUS_TIMEOUT_MS)
            leader = leader_of(statuses)
            status = statuses.get(leader) if leader is not None else None
            if leader is not None and status is not None:
                if client.cluster.transport == "tcp":
                    said = join_cluster(client, status, client.cluster.voters)
                else:
                    said = [f"added node {n} as a learner" for n in add_learners(client, status)]
                return leader, status, said
            time.sleep(POLL_INTERVAL_S)
    raise ControlError(
        f"no leader within {timeout_s:g} s; stopped everything it started\n{log_tail(run)}"
    )


def add_learners(client: Any, leader_status: NodeStatus) -> list[int]:
    """Workers that are not founding voters join the log as learners (once: the change
    is in the log, so later runs find them members already)."""
    members = set(leader_status.voters) | set(leader_status.learners)
    added = []
    for node in client.cluster.nodes:
        if node.id not in members:
            client.add_learner(node.id, node.address)
            added.append(node.id)
    return added


def up(plan: UpPlan, timeout_s: float = UP_TIMEOUT_S) -> UpResult:
    """Start the cluster in the background and wait for its leader (see the module doc)."""
    run, cleaned = prepare(plan, isolate_reclaim=False)
    supervisor = start_background(run)
    try:
        leader, status, joined = wait_for_leader(run, supervisor, timeout_s)
    except BaseException:
        _abort_up(run, supervisor)
        raise
    nodes = run.read_cluster()
    assert nodes is not None
    addresses = [(node.id, node.address) for node in nodes.nodes if node.address is not None]
    return UpResult(run.path, supervisor.pid, leader, status.term, cleaned, joined, addresses)


def _abort_up(run: RunDir, supervisor: subprocess.Popen[bytes]) -> None:
    """Leave nothing running after a failed `up`."""
    with contextlib.suppress(ProcessLookupError):
        supervisor.terminate()
    try:
        supervisor.wait(DOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        supervisor.wait()
    with contextlib.suppress(ControlError):
        down(run)


def up_foreground(plan: UpPlan) -> int:
    """Become the supervisor; returns its exit code once it is stopped."""
    from cluster.supervisor import Supervisor

    run, _ = prepare(plan, isolate_reclaim=True)
    return Supervisor(run).serve()


def log_tail(run: RunDir, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = run.supervisor_log.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {run.supervisor_log})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {run.supervisor_log}:\n{tail}"


# ---- down and leftovers ----


def our_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The process `pid` if it is still the one recorded (same create time)."""
    if pid is None or create_time is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return process


def kill_workers(cluster: ClusterInfo) -> list[str]:
    """SIGKILL every recorded worker that is still ours; wait (bounded) for them."""
    victims: list[psutil.Process] = []
    killed: list[str] = []
    for node in cluster.nodes:
        process = our_process(node.pid, node.create_time)
        if process is None:
            continue
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
            victims.append(process)
            killed.append(f"worker {node.id} (pid {node.pid})")
    psutil.wait_procs(victims, timeout=KILL_WAIT_S)
    return killed


def clean_leftovers(run: RunDir, cluster: ClusterInfo, *, isolate: bool) -> list[str]:
    """After a supervisor was SIGKILLed: kill its workers, remove queues and segments;
    says what it did, in words (nothing when nothing was left). With `isolate`, the
    reclaim (which imports ipc/, hence pyarrow) runs in a child process, so this process
    can still fork workers cleanly."""
    killed = kill_workers(cluster)
    removed = reclaim(cluster.name, run, isolate=isolate)
    cleaned = [f"killed leftover {victim}" for victim in killed]
    if removed:
        cleaned.append(f"removed {len(removed)} leftover queues, segments and registry entries")
    return cleaned


def reclaim(name: str, run: RunDir, *, isolate: bool) -> list[str]:
    if not isolate:
        from ipc.local import reclaim_cluster

        return reclaim_cluster(name, run.path, include_live=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            os.close(read_end)
            from ipc.local import reclaim_cluster

            removed = reclaim_cluster(name, run.path, include_live=True)
            os.write(write_end, "\n".join(removed).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    os.waitpid(pid, 0)
    return [line for line in output.splitlines() if line]


@dataclass
class DownResult:
    supervisor: str
    """What happened to the supervisor, in words."""
    killed: list[str]
    removed: list[str]
    purged: bool


def down(run: RunDir, *, purge: bool = False) -> DownResult:
    """Stop the supervisor (it stops its workers), kill any leftover worker, remove every
    queue and segment; with `purge`, remove the run directory (the data) too."""
    cluster = run.read_cluster()
    if cluster is None:
        raise ControlError(f"no cluster at {run.path}")
    said = _stop_supervisor(run)
    cluster = run.read_cluster() or cluster
    killed = kill_workers(cluster)
    removed = reclaim(cluster.name, run, isolate=False)
    if purge:
        shutil.rmtree(run.path, ignore_errors=True)
    else:
        cluster.supervisor_pid = None
        for node in cluster.nodes:
            node.pid, node.create_time, node.state = None, None, "stopped"
        run.write_cluster(cluster)
    return DownResult(said, killed, removed, purge)


def _stop_supervisor(run: RunDir) -> str:
    pid = running_supervisor(run)
    if pid is None:
        return "supervisor was not running"
    if pid < 0:
        raise ControlError(f"a supervisor holds {run.supervisor_pid_file} but its pid is unknown")
    os.kill(pid, signal.SIGTERM)
    if _wait(lambda: running_supervisor(run) is None, DOWN_TIMEOUT_S):
        return f"stopped supervisor (pid {pid}) with SIGTERM"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: running_supervisor(run) is None, KILL_WAIT_S)
    return f"supervisor (pid {pid}) ignored SIGTERM for {DOWN_TIMEOUT_S:.0f} s: SIGKILL"


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    clock = SystemClock()
    deadline_ns = clock.monotonic_ns() + int(timeout_s * 1e9)
    while not condition():
        if clock.monotonic_ns() >= deadline_ns:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


# ---- status ----


def running_cluster(run: RunDir) -> ClusterInfo:
    """The cluster's table, if its supervisor lives; else a ControlError that says so."""
    cluster = run.read_cluster()
    if cluster is None:
        raise ControlError(f"no cluster at {run.path} (run `dcluster up` first)")
    if running_supervisor(run) is None:
        raise ControlError(
            f"cluster {cluster.name} is down (no supervisor running for {run.path}); "
            f"start it with `dcluster up --name {cluster.name}`"
        )
    return cluster


def merge_status(
    cluster: ClusterInfo,
    statuses: dict[int, NodeStatus | None],
    running: bool,
    addresses: dict[int, Address] | None = None,
) -> dict[str, Any]:
    """One object: the supervisor's table, each worker's view and what psutil sees."""
    from cluster.client import leader_of

    usage = _process_usage(cluster)
    answered = [status for status in statuses.values() if status is not None]
    nodes = [_node_entry(node, statuses.get(node.id), usage.get(node.id)) for node in cluster.nodes]
    local = {node.id for node in cluster.nodes}
    known = {**cluster.peers, **(addresses or {})}
    for node_id in sorted((set(statuses) | set(cluster.peers)) - local):  # on other hosts
        address = known.get(node_id)
        host = address[0] if address else "?"
        remote = NodeInfo(id=node_id, host=host, core=None, state="remote", address=address)
        entry = _node_entry(remote, statuses.get(node_id), None)
        entry["restarts"] = None  # another host's supervisor knows
        nodes.append(entry)
    nodes.sort(key=lambda entry: int(entry["id"]))
    return {
        "name": cluster.name,
        "running": running,
        "supervisor_pid": cluster.supervisor_pid,
        "transport": cluster.transport,
        "fsync": cluster.fsync,
        "leader": leader_of(statuses),
        "term": max((status.term for status in answered), default=None),
        "nodes": nodes,
    }


def _node_entry(
    node: NodeInfo, status: NodeStatus | None, usage: tuple[float, int] | None
) -> dict[str, Any]:
    return {
        "id": node.id,
        "host": node.host,
        "core": node.core,
        "pid": node.pid,
        "role": status.role if status is not None else "down",
        "state": node.state,
        "term": status.term if status else None,
        "commit_index": status.commit_index if status else None,
        "applied_index": status.applied_index if status else None,
        "last_heartbeat_ms": status.last_heartbeat_ms if status else None,
        "restarts": node.restarts,
        "last_exit": node.last_exit,
        "incarnation": node.incarnation,
        "cpu_percent": usage[0] if usage else None,
        "rss_bytes": usage[1] if usage else None,
        "address": list(node.address) if node.address else None,
        "store_applied_index": status.store_applied_index if status else None,
        "partitions": len(status.partitions) if status else None,
        "rows": sum(info.rows for info in status.partitions) if status else None,
        "bytes": sum(info.bytes for info in status.partitions) if status else None,
    }


def partition_view(
    placements: dict[str, tuple[tuple[int, ...], ...]],
    statuses: dict[int, NodeStatus | None],
) -> list[dict[str, Any]]:
    """Who holds what: one entry per (table, partition) with its holders, primary first
    (from the log's placement), and the rows and bytes each holder last counted (None for a
    holder that did not answer: it is down)."""
    counts: dict[tuple[str, int, int], tuple[int, int]] = {}
    for node, status in statuses.items():
        for info in status.partitions if status is not None else ():
            counts[(info.table, info.partition, node)] = (info.rows, info.bytes)
    view = []
    for table, holders_of in sorted(placements.items()):
        for partition, holders in enumerate(holders_of):
            entries = []
            for node in holders:
                rows_bytes = counts.get((table, partition, node))
                up = statuses.get(node) is not None
                entries.append(
                    {
                        "node": node,
                        "up": up,
                        "rows": rows_bytes[0] if rows_bytes else None,
                        "bytes": rows_bytes[1] if rows_bytes else None,
                    }
                )
            view.append(
                {"table": table, "partition": partition, "primary": holders[0], "holders": entries}
            )
    return view


def _process_usage(cluster: ClusterInfo) -> dict[int, tuple[float, int]]:
    """(cpu_percent over CPU_SAMPLE_S, rss_bytes) of each live worker."""
    processes = {}
    for node in cluster.nodes:
        process = our_process(node.pid, node.create_time)
        if process is not None:
            with contextlib.suppress(psutil.Error):
                process.cpu_percent(None)
                processes[node.id] = process
    if processes:
        time.sleep(CPU_SAMPLE_S)
    usage: dict[int, tuple[float, int]] = {}
    for node_id, process in processes.items():
        with contextlib.suppress(psutil.Error):
            usage[node_id] = (process.cpu_percent(None), process.memory_info().rss)
    return usage


# ---- chaos by signal ----


def resolve_node(nodes: list[int], target: str, leader: Callable[[], int | None]) -> int:
    """A node number from "leader" or a number, checked against the known nodes."""
    if target == "leader":
        node = leader()
        if node is None:
            raise ControlError("the cluster has no leader right now")
        return node
    if not target.isdigit() or int(target) not in nodes:
        raise UsageError(f"node {target!r}: give 'leader' or a node number ({_ranges(nodes)})")
    return int(target)


def _ranges(nodes: list[int]) -> str:
    if nodes == list(range(len(nodes))):
        return f"0 to {len(nodes) - 1}"
    return ", ".join(map(str, nodes))


def node_ids(cluster: ClusterInfo) -> list[int]:
    """Every node this host knows: its own and (TCP) other hosts'."""
    return sorted({node.id for node in cluster.nodes} | set(cluster.peers))


def signal_node(cluster: ClusterInfo, node: int, signum: int) -> int:
    """Send `signum` to `node`'s worker (one of this host's); returns its pid."""
    info = next((local for local in cluster.nodes if local.id == node), None)
    if info is None:
        host = cluster.peers[node][0] if node in cluster.peers else "another host"
        raise ControlError(f"node {node} runs on {host}: signal it from there")
    process = our_process(info.pid, info.create_time)
    if process is None:
        raise ControlError(f"node {node} has no live worker (state {info.state})")
    process.send_signal(signum)
    return process.pid


def parse_partition(spec: str, nodes: list[int]) -> tuple[tuple[int, ...], ...]:
    """ "0,1|2" -> ((0, 1), (2,)): at least two non-empty, disjoint sides of valid nodes."""
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for side in spec.split("|"):
        members = [item.strip() for item in side.split(",") if item.strip()]
        if not members:
            raise UsageError(f"partition {spec!r}: every side needs a node, like '0,1|2'")
        group: list[int] = []
        for item in members:
            if not item.isdigit() or int(item) not in nodes:
                raise UsageError(f"partition {spec!r}: {item!r} is not a node ({_ranges(nodes)})")
            if int(item) in seen:
                raise UsageError(f"partition {spec!r}: node {item} is on two sides")
            seen.add(int(item))
            group.append(int(item))
        groups.append(tuple(group))
    if len(groups) < 2:
        raise UsageError(f"partition {spec!r}: give at least two sides, like '0,1|2'")
    return tuple(groups)
