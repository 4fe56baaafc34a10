"""Real clusters for the SQL tests: the `cluster` fixture of tests/real/cluster (one cluster
per test, destroyed and checked for leftovers at the end), and `three`, a started cluster of
three workers with fsync on.

`tmp_path` is overridden here with a directory of the test's own (removed at the end),
outside pytest's numbered base directory: several pytest sessions running at once on one
host as one user remove each other's `/tmp/pytest-of-USER/pytest-N`, and a cluster whose run
directory vanishes under it cannot be stopped by `down` nor reclaimed (its queues and
segments are named from files in that directory).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.cluster.conftest import CliCluster, cluster, cluster_factory

__all__ = ["cluster", "cluster_factory", "three", "tmp_path"]


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dcluster-sql-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def three(cluster: CliCluster) -> CliCluster:
    cluster.up("--cores", "3", "--oversubscribe")
    return cluster
