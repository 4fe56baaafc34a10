"""The liveness heartbeat between a worker's loop and its supervisor, and the rule that
calls a worker hung.

The worker creates `node-<n>/heartbeat` (8 bytes, a little-endian counter), maps it and
bumps the counter once per loop wake-up — a store into shared memory, no system call —
and its loop wakes at least every `HEARTBEAT_MS`. The supervisor reads the file every
few hundred milliseconds and keeps, per worker, a `HeartbeatWatch`: the last value seen
and when it last changed. A stuck loop (deadlocked, spinning in a bug, blocked on a hung
disk) stops bumping while its process stays alive; `is_hung` turns that silence into a
verdict.

Invariant: only the worker's loop writes the counter, and a worker stopped on purpose
(SIGSTOP by `dcluster chaos pause`, or a debugger) is never called hung: time spent
stopped does not count as silence. This module imports nothing heavy (the supervisor
uses it before forking).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_MS = 200
"""The worker's loop bumps its counter at least this often while it runs."""
HEARTBEAT_BYTES = 8
HUNG_MS_MAX_DEFAULT = 10_000
"""A worker whose counter has not moved for this long is killed (and restarted)."""
HUNG_MS_MIN = 4 * HEARTBEAT_MS
"""The shortest `hung_ms_max` allowed: several beats, so a busy host is not a hang."""
START_GRACE_MS_DEFAULT = 60_000
"""Before its first beat a worker imports, replays its WAL and opens its transport; it
is called hung only once it has been up this long without one."""
COUNTER_MASK = (1 << 64) - 1


class Heartbeat:
    """The worker's side: a mapped 8-byte counter it bumps once per wake-up."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, HEARTBEAT_BYTES)
            self._map = mmap.mmap(fd, HEARTBEAT_BYTES)  # shared, read-write
        finally:
            os.close(fd)  # the mapping keeps the file
        self._view = memoryview(self._map).cast("Q")
        self.count = 0

    def bump(self) -> None:
        self.count = (self.count + 1) & COUNTER_MASK
        self._view[0] = self.count

    def close(self) -> None:
        self._view.release()
        self._map.close()


def read_heartbeat(path: Path) -> int | None:
    """The counter in `path`, or None when the worker has not created it yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, HEARTBEAT_BYTES, 0)
    finally:
        os.close(fd)
    if len(data) < HEARTBEAT_BYTES:
        return None
    return int.from_bytes(data, "little")


@dataclass
class HeartbeatWatch:
    """The supervisor's memory of one worker incarnation's counter."""

    started_ns: int
    changed_ns: int
    """When the counter last moved (or the worker started, or was last seen stopped)."""
    value: int | None = None
    beating: bool = False
    """The counter has moved since this incarnation started: its loop runs."""

    @classmethod
    def start(cls, now_ns: int) -> HeartbeatWatch:
        return cls(started_ns=now_ns, changed_ns=now_ns)

    def observe(self, value: int | None, now_ns: int, *, stopped: bool) -> None:
        """Record one reading. A stopped process's silence is not counted: its clock of
        silence restarts when it is seen stopped."""
        if value is not None and value != self.value:
            if self.value is not None or value != 0:
                self.beating = True
            self.value = value
            self.changed_ns = now_ns
        elif stopped:
            self.changed_ns = now_ns

    def silent_ms(self, now_ns: int) -> int:
        return max(0, now_ns - self.changed_ns) // 1_000_000

    def up_ms(self, now_ns: int) -> int:
        return max(0, now_ns - self.started_ns) // 1_000_000


def is_hung(
    *,
    silent_ms: int,
    up_ms: int,
    beating: bool,
    stopped: bool,
    hung_ms_max: int,
    start_grace_ms: int,
) -> bool:
    """Kill or not. Hung means: not stopped on purpose, silent for `hung_ms_max`, and
    either its loop has run (it beat once: start-up is over) or it has been up for the
    whole start-up grace without ever beating."""
    if stopped or silent_ms < hung_ms_max:
        return False
    return beating or up_ms >= start_grace_ms


def hung_ms_max_from(environ: Mapping[str, str]) -> int:
    """`DCLUSTER_HUNG_MS_MAX` if set (tests shorten it), else the default."""
    text = environ.get("DCLUSTER_HUNG_MS_MAX")
    if not text:
        return HUNG_MS_MAX_DEFAULT
    value = int(text)
    if value < HUNG_MS_MIN:
        raise ValueError(f"DCLUSTER_HUNG_MS_MAX={value} is below {HUNG_MS_MIN} ms")
    return value
