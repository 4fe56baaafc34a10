"""The run directory of one cluster on one host, and `cluster.json`, its table of nodes.

Layout (under `--data-dir`, default `$XDG_DATA_HOME/dcluster/<name>`):

    cluster.json          what `up` asked for and what the supervisor knows now (atomic writes)
    secret                the cluster secret (mode 0600), for TCP peers
    supervisor.pid        the supervisor's pid (and a lock held while it lives)
    supervisor.log
    endpoints/            the local transport's registry (ipc.registry)
    node-<n>/wal/         node n's durable Raft log (storage.Wal)
    node-<n>/worker.log   node n's structured log
    node-<n>/heartbeat    node n's loop counter (cluster.heartbeat), read by the supervisor

Invariant: `cluster.json` is only ever replaced whole (write temp, fsync, rename), so a
reader sees the old table or the new one, never half of either.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from cluster.protocol import Address

CLUSTER_FILE = "cluster.json"
SECRET_FILE = "secret"
SUPERVISOR_PID_FILE = "supervisor.pid"
SUPERVISOR_LOG = "supervisor.log"
CLUSTER_FILE_BYTES_MAX = 1024 * 1024


def default_data_dir(name: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dcluster" / name


class NodeInfo(msgspec.Struct):
    id: int
    host: str
    core: int | None
    """The logical CPU the worker is pinned to (None: not pinned)."""
    pid: int | None = None
    incarnation: int = 0
    restarts: int = 0
    state: str = "starting"
    """starting / running / restarting / crash_loop / stopped."""
    address: Address | None = None
    """TCP: where its transport listens."""
    create_time: float | None = None
    """psutil's create time of `pid`, so nobody signals a pid the kernel has reused."""
    last_exit: str | None = None
    """Why the previous incarnation ended ("killed by SIGKILL", "exit code 3", "hung: no
    heartbeat for 10000 ms"), None before any exit."""


class ClusterInfo(msgspec.Struct):
    name: str
    transport: str
    """"shm" or "tcp"."""
    fsync: bool
    voters: int
    oversubscribe: bool
    supervisor_pid: int | None
    nodes: list[NodeInfo]
    bind: Address | None = None
    join: Address | None = None
    peers: dict[int, Address] = {}
    """TCP, multi-host: nodes on other hosts (node number -> address), as learned when
    this host joined (and refreshed at each `up`)."""


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def cluster_file(self) -> Path:
        return self.path / CLUSTER_FILE

    @property
    def secret_file(self) -> Path:
        return self.path / SECRET_FILE

    @property
    def supervisor_pid_file(self) -> Path:
        return self.path / SUPERVISOR_PID_FILE

    @property
    def supervisor_log(self) -> Path:
        return self.path / SUPERVISOR_LOG

    def node_dir(self, node: int) -> Path:
        return self.path / f"node-{node}"

    def wal_dir(self, node: int) -> Path:
        return self.node_dir(node) / "wal"

    def store_file(self, node: int) -> Path:
        """The node's DuckDB database holding its partitions."""
        return self.node_dir(node) / "partitions.duckdb"

    def staging_dir(self, node: int) -> Path:
        return self.node_dir(node) / "staging"

    def worker_log(self, node: int) -> Path:
        return self.node_dir(node) / "worker.log"

    def heartbeat_file(self, node: int) -> Path:
        return self.node_dir(node) / "heartbeat"

    def read_cluster(self) -> ClusterInfo | None:
        """The current table, or None when there is none (never started, or removed)."""
        try:
            data = self.cluster_file.read_bytes()
        except FileNotFoundError:
            return None
        assert len(data) <= CLUSTER_FILE_BYTES_MAX, len(data)
        return msgspec.json.decode(data, type=ClusterInfo)

    def write_cluster(self, info: ClusterInfo) -> None:
        write_atomically(self.cluster_file, msgspec.json.format(msgspec.json.encode(info)))

    def read_secret(self) -> bytes:
        return bytes.fromhex(self.secret_file.read_text().strip())

    def write_secret(self, secret: bytes) -> None:
        write_atomically(self.secret_file, secret.hex().encode(), mode=0o600)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` whole: temp file, fsync, rename, fsync of the directory."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
