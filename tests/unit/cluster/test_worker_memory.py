"""The memory a worker's DuckDB store may use (`cluster.config.worker_memory_bytes_from`):
half the host's memory over its cores by default, never below 512 MiB, or what
`DCLUSTER_WORKER_MEMORY_MB` says; a bad value is refused (by `up`, before any worker)."""

from __future__ import annotations

import pytest

from cluster.config import (
    WORKER_MEMORY_BYTES_MIN,
    WORKER_MEMORY_ENV,
    worker_memory_bytes_from,
)

GIB = 1024**3


def test_half_the_host_over_its_cores_by_default() -> None:
    assert worker_memory_bytes_from({}, 24 * GIB, 2) == 6 * GIB
    assert worker_memory_bytes_from({WORKER_MEMORY_ENV: ""}, 64 * GIB, 16) == 2 * GIB


def test_never_below_the_floor() -> None:
    assert worker_memory_bytes_from({}, 2 * GIB, 8) == WORKER_MEMORY_BYTES_MIN
    assert worker_memory_bytes_from({}, 0, 1) == WORKER_MEMORY_BYTES_MIN


def test_the_environment_sets_it_in_megabytes() -> None:
    assert worker_memory_bytes_from({WORKER_MEMORY_ENV: "300"}, 24 * GIB, 2) == 300 * 1024**2


@pytest.mark.parametrize("bad", ["lots", "1.5", "0", "15", "-4", str((1 << 30) + 1)])
def test_a_bad_value_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=WORKER_MEMORY_ENV):
        worker_memory_bytes_from({WORKER_MEMORY_ENV: bad}, 24 * GIB, 2)
