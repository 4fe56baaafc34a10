"""The conformance harness for the local transport (POSIX mq + /dev/shm).

Every node is a `LocalTransport` in this process, sharing one temporary run directory.
The nodes use the suite's cluster name (so frames the suite builds carry the right
cluster id); their OS resources stay apart from other runs' because resource names hash
the run directory in. Queues are small (10 x 4 KiB) so parallel test processes stay
within the per-user RLIMIT_MSGQUEUE budget.
"""

from __future__ import annotations

import os
import selectors
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import posix_ipc

from clock import SystemClock
from ipc import mq, registry, shm
from ipc.local import LocalOptions, LocalTransport, reclaim_cluster
from ipc.transport import Delivery, Transport
from tests.conformance.harness import CLUSTER_NAME, TEST_MESSAGES

MiB = 1 << 20
HARNESS_OPTIONS = LocalOptions(
    queue_messages_max=10,
    queue_message_bytes_max=4096,
    queue_messages_min=4,
    queues_per_host_expected=16,
    outbound_frames_max=256,
    segment_bytes_max=16 * MiB,
    shm_bytes_max=1536 * MiB,
    shm_free_bytes_max=512 * MiB,
    lent_bytes_max=1024 * MiB,
    mapped_bytes_max=1024 * MiB,
    liveness_check_ns=20_000_000,
)
WAIT_SLICE_NS = 50_000_000
INJECT_ATTEMPTS_MAX = 1000


class LocalHarness:
    name = "local"

    def __init__(self, options: LocalOptions = HARNESS_OPTIONS) -> None:
        self.options = options
        self.clock = SystemClock()
        self.run_dir = Path(tempfile.mkdtemp(prefix="dc-local-"))
        self.token = registry.resource_token(CLUSTER_NAME, self.run_dir)
        self.inbox: dict[int, list[Delivery]] = {}
        self._live: dict[int, LocalTransport] = {}
        self._made: list[LocalTransport] = []
        self._incarnations: dict[int, int] = {}
        self._queue_names: set[str] = set()
        self._leftovers: list[str] = []

    def start(self, node_id: int, incarnation: int | None = None) -> Transport:
        """The next incarnation of the node (or the one given)."""
        assert node_id not in self._live, f"node {node_id} is running"
        if incarnation is None:
            incarnation = self._incarnations.get(node_id, 0) + 1
        self._incarnations[node_id] = incarnation
        transport = LocalTransport(
            CLUSTER_NAME,
            node_id,
            self.run_dir,
            self.clock,
            incarnation=incarnation,
            options=self.options,
            messages=TEST_MESSAGES,
        )
        self._queue_names.add(registry.queue_name(self.token, node_id, incarnation))
        self._made.append(transport)
        self._live[node_id] = transport
        self.inbox[node_id] = []
        return transport

    def transport(self, node_id: int) -> Transport:
        return self._live[node_id]

    def local(self, node_id: int) -> LocalTransport:
        return self._live[node_id]

    def pump(self, until: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        while True:
            if until():
                return True
            now = self.clock.monotonic_ns()
            if now >= deadline:
                return False
            wait_ns = min(deadline - now, WAIT_SLICE_NS)
            live = [t for t in self._live.values() if not t.closed]
            for transport in live:
                timeout = transport.next_timeout_ns()
                if timeout is not None:
                    wait_ns = min(wait_ns, timeout)
            with selectors.DefaultSelector() as selector:
                for transport in live:
                    selector.register(transport.fileno(), selectors.EVENT_READ)
                selector.select(wait_ns / 1e9)
            for node_id, transport in sorted(self._live.items()):
                self.inbox[node_id].extend(transport.poll())

    def crash(self, node_id: int) -> None:
        transport = self._live.pop(node_id)
        transport._abandon()
        self.inbox[node_id] = []

    def restart(self, node_id: int) -> Transport:
        return self.start(node_id)

    def inject(self, target: int, frame: bytes) -> None:
        directory = registry.registry_directory(self.run_dir, self.token)
        found = registry.read_entry(f"{directory}/{target}.entry")
        assert found is not None, f"node {target} is not registered"
        queue = mq.open_queue(found[0].queue)
        assert queue is not None, found[0].queue
        try:
            for _ in range(INJECT_ATTEMPTS_MAX):
                try:
                    queue.send(frame)
                    return
                except posix_ipc.BusyError:
                    self.pump(lambda: False, 0.01)
            raise AssertionError(f"node {target}'s queue stayed full")
        finally:
            queue.close()

    def close(self) -> None:
        for transport in self._live.values():
            transport.close()
        self._live.clear()
        reclaim_cluster(CLUSTER_NAME, self.run_dir, include_live=True)
        directory = registry.registry_directory(self.run_dir, self.token)
        if directory.is_dir():
            self._leftovers.extend(
                f"registry {name}"
                for name in sorted(os.listdir(directory))
                if name != registry.GENERATION_FILE
            )
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def leaks(self) -> list[str]:
        found = list(self._leftovers)
        prefix = registry.cluster_prefix(self.token)
        found.extend(f"segment {name}" for name in shm.segment_files(shm.SHM_DIR, prefix))
        found.extend(f"queue {name}" for name in sorted(self._queue_names) if mq.queue_exists(name))
        for transport in self._made:
            found.extend(f"{transport!r}: {fd}" for fd in transport._open_descriptors())
        for fd in sorted(os.listdir("/proc/self/fd")):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if self.token in target:
                found.append(f"fd {fd} -> {target}")
        if self.run_dir.exists():
            found.append(f"run dir {self.run_dir}")
        return found
