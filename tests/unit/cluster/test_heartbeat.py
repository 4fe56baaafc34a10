"""The liveness heartbeat: the counter a worker maps and the supervisor reads, and the
rule that turns a silent counter into "hung" — never for a worker stopped on purpose,
nor for one still starting within its grace."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.heartbeat import (
    HUNG_MS_MAX_DEFAULT,
    HUNG_MS_MIN,
    Heartbeat,
    HeartbeatWatch,
    hung_ms_max_from,
    is_hung,
    read_heartbeat,
)

MS = 1_000_000
HUNG_MS = 1_000
GRACE_MS = 5_000


def verdict(watch: HeartbeatWatch, now_ns: int, *, stopped: bool = False) -> bool:
    return is_hung(
        silent_ms=watch.silent_ms(now_ns),
        up_ms=watch.up_ms(now_ns),
        beating=watch.beating,
        stopped=stopped,
        hung_ms_max=HUNG_MS,
        start_grace_ms=GRACE_MS,
    )


def replay(history: list[tuple[int, int | None, bool]]) -> list[bool]:
    """(ms since start, counter read or None, stopped) readings -> the verdict after each."""
    watch = HeartbeatWatch.start(0)
    verdicts = []
    for at_ms, value, stopped in history:
        watch.observe(value, at_ms * MS, stopped=stopped)
        verdicts.append(verdict(watch, at_ms * MS, stopped=stopped))
    return verdicts


def test_the_counter_written_through_the_mapping_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "node-0" / "heartbeat"
    assert read_heartbeat(path) is None, "not created yet"
    beat = Heartbeat(path)
    try:
        assert read_heartbeat(path) == 0
        for _ in range(3):
            beat.bump()
        assert read_heartbeat(path) == 3
        assert path.stat().st_size == 8
    finally:
        beat.close()
    assert read_heartbeat(path) == 3, "the file outlives the worker"
    Heartbeat(path).close()
    assert read_heartbeat(path) == 0, "a new incarnation starts from zero"


def test_a_short_file_reads_as_no_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat"
    path.write_bytes(b"\x01\x02")
    assert read_heartbeat(path) is None


def test_a_beating_worker_is_never_hung() -> None:
    history = [(at, at // 100, False) for at in range(0, 20_000, 250)]
    assert not any(replay(history))


def test_a_worker_whose_counter_stops_is_hung_after_the_limit() -> None:
    history = [(0, 0, False), (250, 3, False), (500, 7, False)]
    history += [(at, 7, False) for at in range(750, 1_750, 250)]
    verdicts = replay(history)
    assert verdicts[:-1] == [False] * (len(history) - 1)
    assert verdicts[-1], "silent from 500 ms to 1500 ms: 1000 ms, the limit"


def test_a_stopped_worker_is_not_hung_however_long_nor_just_after_it_resumes() -> None:
    history = [(0, 0, False), (250, 5, False)]
    history += [(at, 5, True) for at in range(500, 30_000, 250)]  # SIGSTOP for ~30 s
    history += [(30_000, 5, False), (30_250, 9, False)]  # SIGCONT: silent 250 ms, then beats
    assert not any(replay(history))


def test_a_resumed_worker_that_stays_silent_is_hung_a_limit_after_last_seen_stopped() -> None:
    history = [(0, 0, False), (250, 5, False), (500, 5, True), (750, 5, True)]
    history += [(at, 5, False) for at in range(1_000, 2_000, 250)]
    verdicts = replay(history)
    assert verdicts[-1], "silent since it was last seen stopped at 750 ms: 1000 ms at 1750"
    assert not any(verdicts[:-1])


def test_a_starting_worker_gets_the_grace_then_is_hung() -> None:
    """No file, then a file at zero (created, not yet beating): grace applies."""
    history = [(at, None, False) for at in range(0, 2_000, 250)]
    history += [(at, 0, False) for at in range(2_000, GRACE_MS, 250)]
    assert not any(replay(history))
    assert replay([*history, (GRACE_MS, 0, False)])[-1]


def test_once_it_has_beaten_the_grace_is_over() -> None:
    history = [(0, None, False), (300, 0, False), (400, 1, False)]
    history += [(at, 1, False) for at in range(500, 1_500, 100)]
    verdicts = replay(history)
    assert verdicts[-1] and not any(verdicts[:-1])


def test_the_limit_comes_from_the_environment_or_the_default() -> None:
    assert hung_ms_max_from({}) == HUNG_MS_MAX_DEFAULT
    assert hung_ms_max_from({"DCLUSTER_HUNG_MS_MAX": "1500"}) == 1500
    with pytest.raises(ValueError):
        hung_ms_max_from({"DCLUSTER_HUNG_MS_MAX": str(HUNG_MS_MIN - 1)})
