"""Fragments on a real cluster of three workers: the coordinator's SELECTs over physical
partition tables, each run by one holder inside its snapshot of a read barrier (DESIGN
§5.2–5.4), in parallel, moving to another holder when one refuses or is silent.

What is checked: one fragment per partition adds up to the table at the barrier, not to
rows written after it; stale fragments (index 0) see what is applied now; DuckDB's errors
come back with DuckDB's message and class, and a fragment that fails while running does
not leave its holder answering later reads at that barrier from a broken snapshot;
anything but one SELECT is refused before it runs; a fragment that names a file or URL is
refused without reading it; a fragment that runs past its time limit is interrupted,
refused with the limit named, and its holder serves the next read; a holder that does not
hold a partition passes the fragment on; a paused first holder is hedged, not waited out.
Inputs: a fragment reads named Arrow tables sent with it (small ones, and ones too big for
one queue message), each only while it runs; bad inputs fail without being sent. The
catalog: its estimate of a table's rows catches up with the rows inserted. Each answer
says how long the fragment ran on its holder, and EXPLAIN ANALYZE shows it."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pyarrow as pa
import pytest

from cluster import control
from cluster._fragment_watch import FRAGMENT_TIME_LIMIT_ENV
from cluster.config import WORKER_MEMORY_ENV, worker_memory_bytes_from
from cluster.session import SCAN_TIMEOUT_MS, TransportPort, open_port
from query.port import Fragment, FragmentFailed, Unavailable
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import connect, current_leader

TABLE = "main.t"
ROWS = 1_000
HEDGED_BOUND_S = SCAN_TIMEOUT_MS / 1000
"""A fragment whose first holder is paused is answered well within one holder's timeout."""
TIME_LIMIT_MS = 1_000
"""The fragment time limit of the `limited` cluster's workers."""
WORKER_MEMORY_MB = 300
"""The `limited` cluster's workers' DuckDB memory_limit."""
ESTIMATE_WAIT_S = 10.0
"""Row counts are refreshed some time (STATS_REFRESH_MS) after writes; far less than this."""


def _count_and_sum(partition: int, table: str = "t") -> str:
    return f'SELECT count(*) AS n, sum(x)::BIGINT AS total FROM "main.{table}__p{partition}"'


def _values(rows: pa.Table) -> list[tuple[Any, ...]]:
    """The rows as DuckDB reads them (DuckDB's Arrow extension types included)."""
    con = duckdb.connect(config={"arrow_lossless_conversion": True})
    try:
        return con.sql("SELECT * FROM rows").fetchall()
    finally:
        con.close()


def _totals(results: list[Any]) -> tuple[int, int]:
    rows = [_values(result.rows)[0] for result in results]
    return sum(row[0] for row in rows), sum(row[1] or 0 for row in rows)


def _loaded_port(cluster: CliCluster) -> Iterator[TransportPort]:
    """A session of the cluster, whose table `t` (3 partitions, 3 replicas) holds x = 0..999."""
    with connect(cluster) as con:
        con.execute("CREATE TABLE t (x BIGINT) PARTITION BY HASH(x) PARTITIONS 3")
        con.execute(f"INSERT INTO t SELECT i FROM range({ROWS}) r(i)")
    opened = open_port(cluster.run_dir)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def port(three: CliCluster) -> Iterator[TransportPort]:
    yield from _loaded_port(three)


@pytest.fixture
def limited(cluster: CliCluster, monkeypatch: pytest.MonkeyPatch) -> CliCluster:
    """Three workers whose fragments may run for TIME_LIMIT_MS, with WORKER_MEMORY_MB."""
    monkeypatch.setenv(FRAGMENT_TIME_LIMIT_ENV, str(TIME_LIMIT_MS))  # `up` passes it on
    monkeypatch.setenv(WORKER_MEMORY_ENV, str(WORKER_MEMORY_MB))
    cluster.up("--cores", "3", "--oversubscribe")
    return cluster


@pytest.fixture
def limited_port(limited: CliCluster) -> Iterator[TransportPort]:
    yield from _loaded_port(limited)


def _per_partition(port: TransportPort, sql_of: Any = _count_and_sum) -> list[Fragment]:
    holders_of = port.catalog(refresh=True).placements[TABLE]
    return [
        Fragment(sql_of(partition), ((TABLE, partition),), holders)
        for partition, holders in enumerate(holders_of)
    ]


def test_fragments_add_up_at_their_barrier_and_stale_sees_now(
    three: CliCluster, port: TransportPort
) -> None:
    fragments = _per_partition(port)
    barrier = port.barrier()
    with connect(three) as con:
        con.execute("INSERT INTO t VALUES (5000), (6000)")
    began = time.monotonic_ns()
    results = port.fragments(barrier.index, fragments)
    waited_us = (time.monotonic_ns() - began) // 1000
    assert _totals(results) == (ROWS, ROWS * (ROWS - 1) // 2)
    for result, fragment in zip(results, fragments, strict=True):
        assert result.node in fragment.holders
        assert 0 < result.elapsed_us <= waited_us, "the holder's own time, within the wait"
    port.release(barrier.index)
    with connect(three) as con:  # EXPLAIN ANALYZE says how long each fragment ran
        steps = con.execute("EXPLAIN ANALYZE SELECT x % 7, count(*) FROM t GROUP BY 1").fetchall()
        # and plain EXPLAIN what DuckDB estimates on each holder: a plain scan, its rows
        estimated = con.execute("EXPLAIN SELECT x FROM t").fetchall()
    ran = [str(step[2]) for step in steps if str(step[0]).startswith("partition ")]
    assert len(ran) == 3 and all(re.fullmatch(r"ran \d+\.\d ms there", r) for r in ran), steps
    rows = [str(step[3]) for step in estimated if str(step[0]).startswith("partition ")]
    assert all(re.fullmatch(r"~[\d,]+", r) for r in rows), estimated
    assert sum(int(r[1:].replace(",", "")) for r in rows) == ROWS + 2

    stale = port.fragments(0, fragments)
    assert _totals(stale) == (ROWS + 2, ROWS * (ROWS - 1) // 2 + 11_000)
    port.release(0)


def test_a_holder_without_the_partition_passes_it_on(
    three: CliCluster, port: TransportPort
) -> None:
    with connect(three) as con:
        con.execute("CREATE TABLE r (x BIGINT) PARTITION BY HASH(x) PARTITIONS 3 REPLICAS 1")
        con.execute("INSERT INTO r SELECT i FROM range(300) r(i)")
    view = port.catalog(refresh=True)
    barrier = port.barrier()
    fragments = []
    for partition, (holder,) in enumerate(view.placements["main.r"]):
        stranger = next(node for node in view.members if node != holder)
        sql = _count_and_sum(partition, "r")
        fragments.append(Fragment(sql, (("main.r", partition),), (stranger, holder)))
    results = port.fragments(barrier.index, fragments)
    assert _totals(results) == (300, 299 * 300 // 2)
    assert [result.node for result in results] == [f.holders[1] for f in fragments]
    port.release(barrier.index)


def test_duckdb_errors_come_back_as_duckdb_said_them(port: TransportPort) -> None:
    barrier = port.barrier()
    first, *_ = _per_partition(port)
    alone = first.holders[:1]
    plain = duckdb.connect()
    plain.execute('CREATE TABLE "main.t__p0" (x BIGINT)')

    # Refused while binding: the holder's snapshot is still good afterwards.
    unbound = 'SELECT nope FROM "main.t__p0"'
    with pytest.raises(duckdb.BinderException) as expected:
        plain.sql(unbound)
    with pytest.raises(FragmentFailed) as refused:
        port.fragments(barrier.index, [Fragment(unbound, first.reads, alone)])
    assert (str(refused.value), refused.value.duckdb_error) == (
        str(expected.value),
        "BinderException",
    )
    (result,) = port.fragments(barrier.index, [Fragment(first.sql, first.reads, alone)])
    assert result.node == alone[0]

    # Failed while running: DuckDB aborts the snapshot's transaction, so that holder
    # refuses later reads at this barrier (retryably) and the next holder serves them.
    failing = "SELECT 'x'::INTEGER + count(*) FROM \"main.t__p0\""
    with pytest.raises(duckdb.ConversionException) as expected_conversion:
        plain.sql(failing).fetchall()
    with pytest.raises(FragmentFailed) as refused:
        port.fragments(barrier.index, [Fragment(failing, first.reads, alone)])
    assert (str(refused.value), refused.value.duckdb_error) == (
        str(expected_conversion.value),
        "ConversionException",
    )
    with pytest.raises(Unavailable, match=f"no read snapshot at index {barrier.index}"):
        port.fragments(barrier.index, [Fragment(first.sql, first.reads, alone)])
    (result,) = port.fragments(barrier.index, [first])
    assert result.node != alone[0]
    assert _values(result.rows)[0][0] == port.scan(barrier.index, TABLE, [0]).num_rows
    port.release(barrier.index)


NOT_ONE_SELECT = (
    "COPY (SELECT * FROM \"main.t__p0\") TO '{folder}/out.csv'",
    'CREATE TABLE u AS SELECT * FROM "main.t__p0"',
    'SELECT 1; SELECT count(*) FROM "main.t__p0"',
    "ATTACH '{folder}/other.db' AS other",
    "SET threads = 4",
)


def test_only_one_select_is_run(port: TransportPort) -> None:
    first, *_ = _per_partition(port)
    with tempfile.TemporaryDirectory(prefix="dcluster-fragments-") as name:
        folder = Path(name)
        for sql in NOT_ONE_SELECT:
            fragment = Fragment(sql.format(folder=folder), first.reads, first.holders)
            with pytest.raises(FragmentFailed, match="a fragment must be") as refused:
                port.fragments(0, [fragment])
            assert refused.value.duckdb_error == "", sql
        assert list(folder.iterdir()) == [], "nothing was written"
    with pytest.raises(FragmentFailed, match="syntax error") as refused:
        port.fragments(0, [Fragment("SELEC 1", first.reads, first.holders)])
    assert refused.value.duckdb_error == "ParserException"
    port.release(0)


def test_a_paused_first_holder_is_hedged(three: CliCluster, port: TransportPort) -> None:
    fragments = _per_partition(port)
    barrier = port.barrier()
    with three.client() as client:
        leader = current_leader(client)
    victim = next(f.holders[0] for f in fragments if f.holders[0] != leader)
    control.signal_node(three.info(), victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = port.fragments(barrier.index, fragments)
        elapsed = time.monotonic() - started
    finally:
        control.signal_node(three.info(), victim, signal.SIGCONT)
    assert _totals(results) == (ROWS, ROWS * (ROWS - 1) // 2)
    assert victim not in {result.node for result in results}
    assert elapsed < HEDGED_BOUND_S, f"the fragments took {elapsed:.1f} s"
    port.release(barrier.index)


def test_a_fragment_cannot_reach_outside_the_store(port: TransportPort) -> None:
    first, *_ = _per_partition(port)
    partition = '"main.t__p0"'
    with tempfile.TemporaryDirectory(prefix="dcluster-fragments-") as name:
        secret = Path(name) / "secret.csv"
        secret.write_text("x\n42\n")
        outside = (
            f"SELECT * FROM read_csv('{secret}')",
            f"SELECT * FROM '{secret}'",
            f"SELECT content FROM read_text('{secret}')",
            f"SELECT count(*) FROM glob('{name}/*')",
            f"SELECT x FROM {partition} UNION ALL SELECT x FROM read_csv('{secret}')",
            "SELECT * FROM read_parquet('http://127.0.0.1:9/rows.parquet')",
        )
        barrier = port.barrier()
        for index in (0, barrier.index):
            for sql in outside:
                with pytest.raises(FragmentFailed, match="not files or the network"):
                    port.fragments(index, [Fragment(sql, first.reads, first.holders)])
        assert [path.name for path in Path(name).iterdir()] == ["secret.csv"]
    (result,) = port.fragments(barrier.index, [first])
    assert _totals([result])[0] == port.scan(barrier.index, TABLE, [0]).num_rows
    port.release(barrier.index)
    port.release(0)


def _runaway(partition: int) -> str:
    """Runs for hours: a cross join of the partition with itself and a big range."""
    table = f'"main.t__p{partition}"'
    return f"SELECT count(*) AS n, 0::BIGINT AS total FROM {table} a, {table} b, range(10000000000)"


def test_a_runaway_fragment_is_interrupted_and_its_holder_serves_on(
    limited: CliCluster, limited_port: TransportPort
) -> None:
    port = limited_port
    first, *_ = _per_partition(port)
    alone = first.holders[:1]
    barrier = port.barrier()
    started = time.monotonic()
    with pytest.raises(FragmentFailed, match=f"time limit of {TIME_LIMIT_MS} ms") as refused:
        port.fragments(barrier.index, [Fragment(_runaway(0), first.reads, alone)])
    elapsed = time.monotonic() - started
    assert refused.value.duckdb_error == ""
    assert elapsed < HEDGED_BOUND_S, f"the refusal took {elapsed:.1f} s"

    # The holder's lane is free again: a stale read there is answered at once, and the
    # barrier's snapshot, which the interrupt aborted, is refused there, not served broken.
    started = time.monotonic()
    (result,) = port.fragments(0, [Fragment(first.sql, first.reads, alone)])
    assert time.monotonic() - started < HEDGED_BOUND_S
    assert (result.node, _totals([result])[0]) == (alone[0], port.scan(0, TABLE, [0]).num_rows)
    with pytest.raises(Unavailable, match=f"no read snapshot at index {barrier.index}"):
        port.fragments(barrier.index, [Fragment(first.sql, first.reads, alone)])
    port.release(barrier.index)
    port.release(0)

    # Hedged to every holder, it is refused as soon as the first of them gives up on it.
    fragments = [
        Fragment(_runaway(number), fragment.reads, fragment.holders)
        for number, fragment in enumerate(_per_partition(port))
    ]
    with pytest.raises(FragmentFailed, match=f"time limit of {TIME_LIMIT_MS} ms"):
        port.fragments(0, fragments)
    port.release(0)
    results = port.fragments(0, _per_partition(port))
    assert _totals(results) == (ROWS, ROWS * (ROWS - 1) // 2)
    port.release(0)


def _semi_join(partition: int) -> str:
    return (
        f'SELECT count(*) AS n, sum(x)::BIGINT AS total FROM "main.t__p{partition}" '
        "WHERE x IN (SELECT k FROM dcluster_keys_0)"
    )


def test_fragments_read_their_inputs(port: TransportPort) -> None:
    few = pa.table({"k": pa.array([3, 5, 8, 999, 5000], pa.int64())})
    many = pa.table({"k": pa.array(range(-100_000, 100_000), pa.int64())})  # 1.6 MB
    barrier = port.barrier()
    for keys, expected in ((few, (4, 3 + 5 + 8 + 999)), (many, (ROWS, ROWS * (ROWS - 1) // 2))):
        fragments = [
            Fragment(f.sql, f.reads, f.holders, (("dcluster_keys_0", keys),))
            for f in _per_partition(port, _semi_join)
        ]
        results = port.fragments(barrier.index, fragments)
        assert _totals(results) == expected

    # Gone from the holder's snapshot once the fragment ran.
    first, *_ = _per_partition(port)
    ran_on = (results[0].node,)
    with pytest.raises(FragmentFailed, match="dcluster_keys_0") as gone:
        port.fragments(
            barrier.index, [Fragment("SELECT count(*) FROM dcluster_keys_0", first.reads, ran_on)]
        )
    assert gone.value.duckdb_error == "CatalogException"

    # Inputs every worker would refuse are not sent.
    for inputs in ((("keys", few),), (("dcluster_keys_0", few), ("dcluster_keys_0", few))):
        with pytest.raises(FragmentFailed, match="fragment input") as refused:
            port.fragments(barrier.index, [Fragment(first.sql, first.reads, ran_on, inputs)])
        assert refused.value.duckdb_error == ""
    (result,) = port.fragments(barrier.index, [Fragment(first.sql, first.reads, ran_on)])
    assert _totals([result])[0] == port.scan(barrier.index, TABLE, [0]).num_rows
    port.release(barrier.index)


def test_the_catalog_estimates_the_rows_of_each_table(
    three: CliCluster, port: TransportPort
) -> None:
    with connect(three) as con:
        con.execute("CREATE TABLE two (x BIGINT) PARTITION BY HASH(x) PARTITIONS 2")
        con.execute("INSERT INTO two SELECT i FROM range(700) r(i)")

    def estimates() -> dict[str, int] | None:
        rows = port.catalog(refresh=True).table_rows
        return dict(rows) if rows.get("main.two") == 700 else None

    found = three.wait_for(estimates, "the catalog's estimate of main.two", ESTIMATE_WAIT_S)
    # Three workers: every one holds every partition (three replicas), so it is exact.
    assert found == {"main.t": ROWS, "main.two": 700}


def _memory_limits(port: TransportPort) -> set[str]:
    sql = "SELECT value FROM duckdb_settings() WHERE name = 'memory_limit'"
    fragments = _per_partition(port, lambda _partition: sql)
    barrier = port.barrier()
    try:
        return {
            str(_values(result.rows)[0][0]) for result in port.fragments(barrier.index, fragments)
        }
    finally:
        port.release(barrier.index)


def _as_duckdb_says(limit_bytes: int) -> str:
    con = duckdb.connect(config={"memory_limit": f"{limit_bytes}B"})
    try:
        return str(con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0])
    finally:
        con.close()


def test_a_workers_memory_is_half_the_hosts_over_its_cores(port: TransportPort) -> None:
    expected = worker_memory_bytes_from({}, psutil.virtual_memory().total, os.cpu_count() or 1)
    assert _memory_limits(port) == {_as_duckdb_says(expected)}


def test_a_workers_memory_comes_from_the_environment(limited_port: TransportPort) -> None:
    assert _memory_limits(limited_port) == {_as_duckdb_says(WORKER_MEMORY_MB * 1024 * 1024)}
