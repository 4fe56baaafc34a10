"""Strong reads at a read point opened without a log entry (`ClusterPort.open_read`). A
holder that did not answer the point in time may have moved past it and hold no snapshot
there (`SnapshotMissing`): the coordinator reads again, once, at a log barrier, and the
answer is still DuckDB's; a second miss is the user's error. Every point is released."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from query._reads import ClusterUnavailable
from tests.unit.query.harness import Pair

SETUP = (
    "CREATE TABLE t (id INTEGER, g INTEGER, v DECIMAL(10,2)) PARTITION BY HASH(id) PARTITIONS 3",
    "INSERT INTO t SELECT i, i % 4, i / 8 FROM range(200) r(i)",
    "CREATE TABLE u (id INTEGER, w VARCHAR) PARTITION BY HASH(w) PARTITIONS 2",
    "INSERT INTO u SELECT i, 'w' || (i % 9) FROM range(50) r(i)",
)
QUERIES = (
    "SELECT g, sum(v), count(*) FROM t GROUP BY g",  # fragments
    "SELECT t.g, count(*) FROM t JOIN u ON t.id = u.id GROUP BY ALL",  # scans first
    "SELECT g, v, rank() OVER (PARTITION BY g ORDER BY v DESC) FROM t",  # gathered
)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as made:
        made.port.open_reads = True
        yield made


@pytest.mark.parametrize("sql", QUERIES)
def test_a_missing_snapshot_is_read_again_at_a_log_barrier(pair: Pair, sql: str) -> None:
    pair.port.missing_snapshots = 1
    barriers = pair.port.index
    pair.run(sql)
    assert pair.port.missing_snapshots == 0, "the read point was used, and missed"
    assert pair.port.opened_reads == 1  # the second attempt took a log barrier
    assert pair.port.index == barriers + 2
    assert sorted(set(pair.port.releases)) == [barriers + 1, barriers + 2]


def test_missing_twice_is_the_users_error(pair: Pair) -> None:
    pair.port.missing_snapshots = 5
    pair.port._opened = set(range(10_000))  # every point, log barriers too, misses
    with pytest.raises(ClusterUnavailable, match="no read snapshot"):
        pair.coordinator.execute(QUERIES[0])
    assert pair.port.missing_snapshots == 3  # the read point, then one log barrier
    assert pair.port.open_barriers() == []


def test_explain_analyze_says_the_read_was_done_again(pair: Pair) -> None:
    pair.port.missing_snapshots = 1
    steps = pair.coordinator.execute("EXPLAIN ANALYZE " + QUERIES[0]).fetchall()
    assert steps[0][0] == "read point" and "log barrier" in str(steps[0][2])
    assert [step[0] for step in steps].count("plan") == 1
