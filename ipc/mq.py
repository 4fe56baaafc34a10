"""POSIX message queues for the local transport: host limits, sizing, create and open.

The kernel caps each queue (`fs.mqueue.msg_max` messages of at most `fs.mqueue.msgsize_max`
bytes), the number of queues on the host (`fs.mqueue.queues_max`) and the bytes one user
may reserve across all its queues (`RLIMIT_MSGQUEUE`, charged at creation as roughly
`messages * (message_bytes + MESSAGE_OVERHEAD_BYTES)`). `detect_host_limits` reads them
(raising the soft rlimit to the hard one when it can) and `choose_queue_size` picks the
largest queue that stays under the caps while `queues_per_host_expected` queues of that
size still fit the per-user budget. Invariant: every queue we create is mode 0600 and
non-blocking, and a refusal by the kernel surfaces as `HostLimitError` naming the limit
and how to raise it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import posix_ipc

from ipc.errors import HostLimitError

PROC_MQUEUE = Path("/proc/sys/fs/mqueue")
MESSAGE_OVERHEAD_BYTES = 100
"""What the kernel charges per message slot beyond its payload (struct msg_msg and the
priority tree node), for budgeting against RLIMIT_MSGQUEUE."""
QUEUE_MODE = 0o600
DEFAULT_MSG_MAX = 10
DEFAULT_MSGSIZE_MAX = 8192
DEFAULT_QUEUES_MAX = 256


@dataclass(frozen=True, slots=True)
class HostLimits:
    """The host's POSIX mq limits as this process sees them. `rlimit_bytes` is None when
    unlimited."""

    msg_max: int
    msgsize_max: int
    queues_max: int
    rlimit_bytes: int | None
    rlimit_bytes_hard: int | None
    rlimit_raised: bool = False

    def queues_that_fit(self, size: QueueSize) -> int | None:
        """How many queues of `size` one user may hold at once (None: no byte limit)."""
        if self.rlimit_bytes is None:
            return None
        return self.rlimit_bytes // size.charge_bytes

    def describe(self) -> str:
        budget = "unlimited" if self.rlimit_bytes is None else f"{self.rlimit_bytes} bytes"
        return (
            f"fs.mqueue.msg_max={self.msg_max}, fs.mqueue.msgsize_max={self.msgsize_max}, "
            f"fs.mqueue.queues_max={self.queues_max}, RLIMIT_MSGQUEUE={budget}"
        )


@dataclass(frozen=True, slots=True)
class QueueSize:
    messages: int
    message_bytes: int

    def __post_init__(self) -> None:
        assert self.messages >= 1, self.messages
        assert self.message_bytes >= 1, self.message_bytes

    @property
    def charge_bytes(self) -> int:
        """Roughly what the kernel charges this queue against RLIMIT_MSGQUEUE."""
        return self.messages * (self.message_bytes + MESSAGE_OVERHEAD_BYTES)


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def detect_host_limits(*, proc_dir: Path = PROC_MQUEUE, raise_soft: bool = True) -> HostLimits:
    """Read the host's limits; with `raise_soft`, lift this process's soft RLIMIT_MSGQUEUE
    to its hard limit first (allowed without privilege)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    raised = False
    if raise_soft and soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_MSGQUEUE, (hard, hard))
        except (OSError, ValueError):
            pass
        else:
            soft, raised = hard, True
    return HostLimits(
        msg_max=_read_int(proc_dir / "msg_max", DEFAULT_MSG_MAX),
        msgsize_max=_read_int(proc_dir / "msgsize_max", DEFAULT_MSGSIZE_MAX),
        queues_max=_read_int(proc_dir / "queues_max", DEFAULT_QUEUES_MAX),
        rlimit_bytes=_limit(soft),
        rlimit_bytes_hard=_limit(hard),
        rlimit_raised=raised,
    )


def choose_queue_size(
    limits: HostLimits,
    *,
    messages_max: int,
    message_bytes_max: int,
    messages_min: int,
    message_bytes_min: int,
    queues_expected: int,
) -> QueueSize:
    """The largest queue under the host caps and our own maxima such that
    `queues_expected` of them fit the per-user budget. Depth is kept at `messages_min` or
    more by halving the message size first (never below `message_bytes_min`); past that
    the depth shrinks, down to one message."""
    assert 1 <= messages_min <= messages_max, (messages_min, messages_max)
    assert 1 <= message_bytes_min <= message_bytes_max, (message_bytes_min, message_bytes_max)
    assert queues_expected >= 1, queues_expected
    messages_cap = max(1, min(messages_max, limits.msg_max))
    message_bytes = max(1, min(message_bytes_max, limits.msgsize_max))
    floor = min(message_bytes_min, message_bytes)
    if limits.rlimit_bytes is None:
        return QueueSize(messages_cap, message_bytes)
    budget = limits.rlimit_bytes // queues_expected
    wanted_depth = min(messages_min, messages_cap)
    while True:
        messages = min(messages_cap, budget // (message_bytes + MESSAGE_OVERHEAD_BYTES))
        if messages >= wanted_depth or message_bytes <= floor:
            return QueueSize(max(1, messages), message_bytes)
        message_bytes = max(floor, message_bytes // 2)


def host_limit_message(name: str, size: QueueSize, limits: HostLimits, error: Exception) -> str:
    fit = limits.queues_that_fit(size)
    fits = "any number" if fit is None else str(fit)
    return (
        f"the kernel refused POSIX message queue {name} of {size.messages} messages x "
        f"{size.message_bytes} bytes ({error}). Host limits: {limits.describe()}; "
        f"{fits} queues of this size fit one user's RLIMIT_MSGQUEUE. Raise the per-user "
        f"budget with `ulimit -q <bytes>` (systemd: LimitMSGQUEUE=, limits.conf: msgqueue), "
        f"the caps with `sysctl -w fs.mqueue.msg_max=<n> fs.mqueue.msgsize_max=<bytes> "
        f"fs.mqueue.queues_max=<n>`, or lower LocalOptions.queue_messages_max / "
        f"queue_message_bytes_max, or raise queues_per_host_expected."
    )


def create_queue(name: str, size: QueueSize, limits: HostLimits) -> posix_ipc.MessageQueue:
    """Our own inbound queue: created exclusively, mode 0600, non-blocking reads."""
    try:
        queue = posix_ipc.MessageQueue(
            name,
            posix_ipc.O_CREX,
            mode=QUEUE_MODE,
            max_messages=size.messages,
            max_message_size=size.message_bytes,
            read=True,
            write=False,
        )
    except posix_ipc.ExistentialError:
        raise
    except (ValueError, OSError, MemoryError, posix_ipc.Error) as error:
        raise HostLimitError(host_limit_message(name, size, limits, error)) from error
    queue.block = False
    return queue


def open_queue(name: str) -> posix_ipc.MessageQueue | None:
    """A peer's queue for non-blocking writes, or None if it does not exist (yet)."""
    try:
        queue = posix_ipc.MessageQueue(name, read=False, write=True)
    except posix_ipc.ExistentialError:
        return None
    queue.block = False
    return queue


def unlink_queue(name: str) -> bool:
    try:
        posix_ipc.unlink_message_queue(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def queue_exists(name: str) -> bool:
    try:
        queue = posix_ipc.MessageQueue(name, read=False, write=True)
    except posix_ipc.ExistentialError:
        return False
    queue.close()
    return True
