"""Host limit detection and queue sizing for the local transport (pure parts)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc import mq
from ipc.mq import HostLimits, QueueSize, choose_queue_size, detect_host_limits

DEFAULT_HOST = HostLimits(
    msg_max=10, msgsize_max=8192, queues_max=256, rlimit_bytes=819200, rlimit_bytes_hard=819200
)
ROOMY_HOST = HostLimits(
    msg_max=65536, msgsize_max=1 << 20, queues_max=1024, rlimit_bytes=None, rlimit_bytes_hard=None
)


def choose(limits: HostLimits, queues_expected: int = 8, **overrides: int) -> QueueSize:
    options = {
        "messages_max": 64,
        "message_bytes_max": 64 * 1024,
        "messages_min": 8,
        "message_bytes_min": 1024,
        "queues_expected": queues_expected,
    }
    options.update(overrides)
    return choose_queue_size(limits, **options)


def write_proc(directory: Path, msg_max: int, msgsize_max: int, queues_max: int) -> Path:
    directory.mkdir()
    (directory / "msg_max").write_text(f"{msg_max}\n")
    (directory / "msgsize_max").write_text(f"{msgsize_max}\n")
    (directory / "queues_max").write_text(f"{queues_max}\n")
    return directory


# ---- detection ----


def test_detect_reads_the_proc_files(tmp_path: Path) -> None:
    proc = write_proc(tmp_path / "mqueue", 300, 16384, 512)
    limits = detect_host_limits(proc_dir=proc, raise_soft=False)
    assert (limits.msg_max, limits.msgsize_max, limits.queues_max) == (300, 16384, 512)
    soft, hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    expected_soft = None if soft == resource.RLIM_INFINITY else soft
    expected_hard = None if hard == resource.RLIM_INFINITY else hard
    assert limits.rlimit_bytes == expected_soft
    assert limits.rlimit_bytes_hard == expected_hard
    assert not limits.rlimit_raised


def test_detect_falls_back_to_kernel_defaults_without_proc(tmp_path: Path) -> None:
    limits = detect_host_limits(proc_dir=tmp_path / "absent", raise_soft=False)
    assert (limits.msg_max, limits.msgsize_max, limits.queues_max) == (
        mq.DEFAULT_MSG_MAX,
        mq.DEFAULT_MSGSIZE_MAX,
        mq.DEFAULT_QUEUES_MAX,
    )


def test_detect_never_leaves_the_soft_limit_below_the_hard_one() -> None:
    limits = detect_host_limits()
    assert limits.rlimit_bytes == limits.rlimit_bytes_hard


# ---- sizing ----


def test_default_host_gets_the_kernel_default_queue() -> None:
    assert choose(DEFAULT_HOST) == QueueSize(10, 8192)


def test_more_queues_expected_shrink_the_message_before_the_depth() -> None:
    size = choose(DEFAULT_HOST, queues_expected=16)
    assert size == QueueSize(10, 4096)
    assert 16 * size.charge_bytes <= 819200


def test_roomy_host_gets_our_own_maxima() -> None:
    assert choose(ROOMY_HOST) == QueueSize(64, 64 * 1024)


def test_a_starved_budget_keeps_one_message_of_the_smallest_size() -> None:
    starved = HostLimits(10, 8192, 256, rlimit_bytes=100, rlimit_bytes_hard=100)
    assert choose(starved) == QueueSize(1, 1024)


def test_queues_that_fit() -> None:
    assert DEFAULT_HOST.queues_that_fit(QueueSize(10, 8192)) == 9
    assert ROOMY_HOST.queues_that_fit(QueueSize(10, 8192)) is None


@given(
    msg_max=st.integers(1, 100_000),
    msgsize_max=st.integers(128, 1 << 24),
    rlimit=st.one_of(st.none(), st.integers(0, 1 << 34)),
    queues_expected=st.integers(1, 1000),
    messages_max=st.integers(1, 4096),
    message_bytes_max=st.integers(1024, 1 << 22),
)
def test_the_choice_respects_every_cap_and_the_budget(
    msg_max: int,
    msgsize_max: int,
    rlimit: int | None,
    queues_expected: int,
    messages_max: int,
    message_bytes_max: int,
) -> None:
    limits = HostLimits(msg_max, msgsize_max, 256, rlimit, rlimit)
    size = choose(
        limits,
        queues_expected=queues_expected,
        messages_max=messages_max,
        message_bytes_max=message_bytes_max,
        messages_min=min(8, messages_max),
    )
    assert 1 <= size.messages <= min(msg_max, messages_max)
    assert 1 <= size.message_bytes <= min(msgsize_max, message_bytes_max)
    if rlimit is not None and size.messages > 1:
        assert queues_expected * size.charge_bytes <= rlimit
    if rlimit is not None and queues_expected * size.charge_bytes > rlimit:
        # over budget only at the floor: one message, as small as we allow
        assert size.messages == 1
        assert size.message_bytes == min(1024, msgsize_max, message_bytes_max)


def test_sizing_rejects_nonsense_options() -> None:
    with pytest.raises(AssertionError):
        choose(DEFAULT_HOST, messages_min=100, messages_max=10)
    with pytest.raises(AssertionError):
        choose(DEFAULT_HOST, queues_expected=0)


# ---- the refusal message ----


def test_host_limit_message_names_the_limits_and_how_to_raise_them() -> None:
    message = mq.host_limit_message(
        "/dc.x.1.1", QueueSize(10, 8192), DEFAULT_HOST, OSError(24, "Too many open files")
    )
    for needle in (
        "/dc.x.1.1",
        "10 messages x 8192 bytes",
        "fs.mqueue.msg_max=10",
        "fs.mqueue.msgsize_max=8192",
        "fs.mqueue.queues_max=256",
        "RLIMIT_MSGQUEUE=819200 bytes",
        "9 queues of this size",
        "ulimit -q",
        "sysctl -w fs.mqueue.msg_max",
        "queues_per_host_expected",
    ):
        assert needle in message, needle
