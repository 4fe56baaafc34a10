"""The endpoint directory of the local transport, and the names of its OS resources.

Every live `LocalTransport` publishes one small file, `<run_dir>/endpoints/<token>/<node>.entry`,
written atomically (temp file, then rename) and holding its pid, the pid's create time,
its incarnation, its queue name and its segment prefix. The publisher keeps an exclusive
`flock` on the file for as long as it lives: the kernel drops the lock when the process
dies (or, in one process, when the descriptor is closed), so a peer tells a live endpoint
from a stale one without trusting the pid alone. The pid and its create time are checked
as well, so a forked child that inherited the lock does not keep a dead parent "alive".

Invariant: an entry names the queue and segments of exactly one incarnation, and a reader
either sees the whole old entry or the whole new one, never a mix. Every change of an
entry (publish, withdraw, removal by a supervisor) is followed by a bump of the cluster's
generation counter, an 8-byte integer in a small shared file that every node maps: a
sender compares it with what it last saw (a memory read, no system call) and re-reads the
target's entry only when it moved, so it notices a new incarnation before it sends.

Names: queues are `/dc.<token>.<node>.<incarnation>`, segments in /dev/shm are
`dc.<token>.<node>.<incarnation>.<seq>`. The token is the cluster's name (sanitised) plus a
short hash of the cluster and its run directory, so two deployments of one cluster name
(two test runs, say) never share a resource.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
from pathlib import Path

import msgspec
import psutil

logger = logging.getLogger(__name__)

NAME_PREFIX = "dc"
CLUSTER_CHARS_MAX = 32
"""The cluster's name is cut to this many characters inside resource names."""
ENTRY_BYTES_MAX = 4096
NAME_BYTES_MAX = 255
"""NAME_MAX: the longest queue or /dev/shm file name."""
INCARNATION_MAX = (1 << 63) - 1
CREATE_TIME_TOLERANCE_S = 0.05
"""Two create times of one pid further apart than this belong to two processes."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class Endpoint(msgspec.Struct, frozen=True):
    """What a live node tells its peers about itself."""

    cluster: str
    node_id: int
    incarnation: int
    pid: int
    pid_create_time: float
    queue: str
    queue_messages: int
    queue_message_bytes: int
    segment_prefix: str


_ENTRY_DECODER = msgspec.json.Decoder(Endpoint)
_ENTRY_ENCODER = msgspec.json.Encoder()


# ---- names ----


def resource_token(cluster: str, run_dir: Path) -> str:
    """The part of every resource name that says whose it is: cluster name and a hash."""
    assert cluster, "a cluster needs a name"
    key = f"{cluster}\0{Path(run_dir).resolve()}".encode()
    digest = hashlib.blake2b(key, digest_size=5).hexdigest()
    return f"{_UNSAFE.sub('_', cluster)[:CLUSTER_CHARS_MAX]}-{digest}"


def _check_ids(node_id: int, incarnation: int) -> None:
    assert 0 <= node_id < 1 << 32, node_id
    assert 0 <= incarnation <= INCARNATION_MAX, incarnation


def queue_name(token: str, node_id: int, incarnation: int) -> str:
    _check_ids(node_id, incarnation)
    name = f"/{NAME_PREFIX}.{token}.{node_id}.{incarnation}"
    assert len(name) <= NAME_BYTES_MAX, name
    return name


def cluster_prefix(token: str) -> str:
    """Prefix of every segment of the cluster."""
    return f"{NAME_PREFIX}.{token}."


def node_prefix(token: str, node_id: int) -> str:
    """Prefix of every segment of every incarnation of one node."""
    return f"{cluster_prefix(token)}{node_id}."


def segment_prefix(token: str, node_id: int, incarnation: int) -> str:
    """Prefix of the segments of one incarnation; a sequence number follows it."""
    _check_ids(node_id, incarnation)
    return f"{node_prefix(token, node_id)}{incarnation}."


def node_of_segment(token: str, name: str) -> int | None:
    """The node a segment file of this cluster belongs to, or None."""
    prefix = cluster_prefix(token)
    if not name.startswith(prefix):
        return None
    node, _, _ = name[len(prefix) :].partition(".")
    return int(node) if node.isdigit() else None


# ---- the directory ----


def process_create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class Lease:
    """A published entry and the descriptor whose lock says its publisher lives."""

    __slots__ = ("fd", "path", "inode")

    def __init__(self, fd: int, path: str, inode: int) -> None:
        self.fd = fd
        self.path = path
        self.inode = inode

    def release(self) -> None:
        """Drop the lock (the entry, if still there, now reads as dead). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


GENERATION_FILE = "generation"
GENERATION_BYTES = 8


def registry_directory(run_dir: Path, token: str) -> Path:
    return Path(run_dir) / "endpoints" / token


class Registry:
    """The endpoint files of one cluster under one run directory, and its generation
    counter. `close()` unmaps the counter."""

    def __init__(self, run_dir: Path, token: str) -> None:
        self.directory = registry_directory(run_dir, token)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._directory = str(self.directory)
        self._mapping = _map_generation(f"{self._directory}/{GENERATION_FILE}")
        self.counter: memoryview | None = memoryview(self._mapping).cast("Q")

    @property
    def generation(self) -> int:
        assert self.counter is not None, "registry closed"
        return int(self.counter[0])

    def bump(self) -> None:
        """Announce that an entry changed. Writers serialise on a lock of the directory,
        so no bump is lost; readers need no lock (an aligned 8-byte store is atomic)."""
        assert self.counter is not None, "registry closed"
        fd = os.open(self._directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.counter[0] = (self.counter[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.counter is not None:
            self.counter.release()
            self.counter = None
            self._mapping.close()

    def entry_path(self, node_id: int) -> str:
        return f"{self._directory}/{node_id}.entry"

    def publish(self, endpoint: Endpoint) -> Lease:
        """Write the entry atomically, locked before it becomes visible."""
        data = _ENTRY_ENCODER.encode(endpoint)
        assert len(data) <= ENTRY_BYTES_MAX, len(data)
        final = self.entry_path(endpoint.node_id)
        temporary = f"{self._directory}/.{endpoint.node_id}.{endpoint.incarnation}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, data)
            os.rename(temporary, final)
        except BaseException:
            os.close(fd)
            _unlink(temporary)
            raise
        self.bump()
        return Lease(fd, final, os.fstat(fd).st_ino)

    def withdraw(self, lease: Lease) -> None:
        """Remove our entry if it is still ours; the lock stays until `lease.release()`."""
        if remove_entry(lease.path, lease.inode):
            self.bump()

    def read(self, node_id: int) -> tuple[Endpoint, tuple[int, int]] | None:
        """The node's entry and its file's signature, or None (absent or unreadable)."""
        return read_entry(self.entry_path(node_id))

    def entries(self) -> list[tuple[int, str]]:
        """(node id, path) of every entry file, in node order."""
        found: list[tuple[int, str]] = []
        for name in os.listdir(self._directory):
            stem, dot, suffix = name.partition(".")
            if dot and suffix == "entry" and stem.isdigit():
                found.append((int(stem), f"{self._directory}/{name}"))
        return sorted(found)

    def stale_temporaries(self) -> list[str]:
        """Temp files whose writer died before renaming them (their lock is free)."""
        stale = []
        for name in sorted(os.listdir(self._directory)):
            path = f"{self._directory}/{name}"
            if name.endswith(".tmp") and _lock_is_free(path) is not False:
                stale.append(path)
        return stale


def entry_signature(path: str) -> tuple[int, int] | None:
    """(inode, mtime in ns) of an entry file, or None if there is none. Entries are only
    ever replaced, never edited, so a new signature means a new entry."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def _map_generation(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < GENERATION_BYTES:
            os.ftruncate(fd, GENERATION_BYTES)  # racing creators all write zeros
        return mmap.mmap(fd, GENERATION_BYTES, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


def read_entry(path: str) -> tuple[Endpoint, tuple[int, int]] | None:
    """The entry at `path` and the signature of the very file it was read from."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        status = os.fstat(fd)
        data = os.read(fd, ENTRY_BYTES_MAX + 1)
    finally:
        os.close(fd)
    try:
        endpoint = _ENTRY_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        logger.warning("unreadable endpoint entry %s: %s", path, error)
        return None
    return endpoint, (status.st_ino, status.st_mtime_ns)


def holder_alive(path: str, inode: int, endpoint: Endpoint) -> bool:
    """Whether the process that published this entry (this very file) still lives."""
    free = _lock_is_free(path, inode)
    if free is None or free:
        return False
    create_time = process_create_time(endpoint.pid)
    return (
        create_time is not None
        and abs(create_time - endpoint.pid_create_time) <= CREATE_TIME_TOLERANCE_S
    )


def _lock_is_free(path: str, inode: int | None = None) -> bool | None:
    """True if nobody holds the file's lock, False if someone does, None if the file is
    gone or has been replaced by another one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if inode is not None and os.fstat(fd).st_ino != inode:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def remove_entry(path: str, inode: int) -> bool:
    """Remove a dead node's entry if the file is still the one we judged."""
    try:
        if os.stat(path).st_ino != inode:
            return False
    except FileNotFoundError:
        return False
    return _unlink(path)


def remove_file(path: str) -> bool:
    return _unlink(path)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
