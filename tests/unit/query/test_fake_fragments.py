"""The fake port's fragments behave as the workers' do: one SELECT over the physical
partition tables it names, at the barrier's snapshot (or now, for index 0), with DuckDB's
own types, messages and exception classes, and nothing but a single SELECT allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from query.coordinator import Coordinator
from query.port import Fragment, FragmentFailed, PortError
from tests.unit.query.fake_port import FakePort

TABLE = "main.t"


def _count_and_sum(partition: int) -> str:
    return f'SELECT count(*) AS n, sum(x) AS total FROM "main.t__p{partition}"'


def _fragment(port: FakePort, sql: str, partition: int, table: str = TABLE) -> Fragment:
    holders = port.catalog(refresh=True).placements[table][partition]
    return Fragment(sql, ((table, partition),), holders)


@pytest.fixture
def loaded(port: FakePort, coordinator: Coordinator) -> FakePort:
    """`t` with 3 partitions holding x = 0..99."""
    coordinator.execute(
        "CREATE TABLE t (x BIGINT, label VARCHAR) PARTITION BY HASH(x) PARTITIONS 3"
    )
    coordinator.execute("INSERT INTO t SELECT i, 'row ' || i FROM range(100) r(i)")
    return port


def test_one_fragment_per_partition_adds_up_at_the_barrier(
    loaded: FakePort, coordinator: Coordinator
) -> None:
    port = loaded
    barrier = port.barrier()
    coordinator.execute("INSERT INTO t VALUES (1000, 'later')")
    fragments = [_fragment(port, _count_and_sum(p), p) for p in range(3)]
    results = port.fragments(barrier.index, fragments)
    assert [result.node for result in results] == [f.holders[0] for f in fragments]
    counts = [result.rows.column("n")[0].as_py() for result in results]
    before = [sum(x < 100 for x in rows.column("x").to_pylist()) for rows in port.partitions(TABLE)]
    assert counts == before and sum(counts) == 100
    assert sum(_values(result.rows)[0][1] or 0 for result in results) == 4950
    assert port.fragment_calls == [(barrier.index, fragments)]
    stale = port.fragments(0, fragments)
    assert sum(result.rows.column("n")[0].as_py() for result in stale) == 101
    port.release(barrier.index)
    with pytest.raises(PortError, match="no read snapshot"):
        port.fragments(barrier.index, fragments)


def _values(rows: pa.Table) -> list[tuple[Any, ...]]:
    """The rows as DuckDB reads them (a HUGEINT sum is an Arrow extension type)."""
    con = duckdb.connect(config={"arrow_lossless_conversion": True})
    try:
        return con.sql("SELECT * FROM rows").fetchall()
    finally:
        con.close()


def test_fragment_rows_have_duckdbs_exact_types(port: FakePort, coordinator: Coordinator) -> None:
    coordinator.execute(
        "CREATE TABLE typed (k INTEGER, big HUGEINT, price DECIMAL(12,3), id UUID, "
        "tags VARCHAR[], mood ENUM('sad', 'ok')) PARTITION BY HASH(k) PARTITIONS 2"
    )
    coordinator.execute(
        "INSERT INTO typed VALUES (1, 170141183460469231731687303715884105727, 12.5, "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', ['x', NULL], 'ok'), "
        "(2, -1, -0.001, NULL, [], 'sad'), (3, NULL, NULL, NULL, NULL, NULL)"
    )
    barrier = port.barrier()
    for partition in range(2):
        sql = f'SELECT * FROM "main.typed__p{partition}"'
        (result,) = port.fragments(barrier.index, [_fragment(port, sql, partition, "main.typed")])
        scanned = port.scan(barrier.index, "main.typed", [partition])
        assert result.rows.schema == scanned.schema
        assert result.rows.equals(scanned)
    port.release(barrier.index)


def test_a_fragment_sees_only_the_partitions_it_names(loaded: FakePort) -> None:
    port = loaded
    reads_zero_names_one = _fragment(port, 'SELECT count(*) FROM "main.t__p1"', 0)
    with pytest.raises(FragmentFailed) as refused:
        port.fragments(0, [reads_zero_names_one])
    assert refused.value.duckdb_error == "CatalogException"


def test_duckdb_errors_come_back_with_duckdbs_message_and_class(loaded: FakePort) -> None:
    port = loaded
    sql = "SELECT 'x'::INTEGER + count(*) FROM \"main.t__p0\""
    plain = duckdb.connect()
    plain.execute('CREATE TABLE "main.t__p0" (x BIGINT, label VARCHAR)')
    with pytest.raises(duckdb.ConversionException) as expected:
        plain.sql(sql).fetchall()
    with pytest.raises(FragmentFailed) as refused:
        port.fragments(0, [_fragment(port, sql, 0)])
    assert str(refused.value) == str(expected.value)
    assert refused.value.duckdb_error == "ConversionException"


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM \"main.t__p0\") TO '{folder}/out.csv'",
        'CREATE TABLE u AS SELECT * FROM "main.t__p0"',
        "SELECT 1; SELECT 2",
        "PRAGMA version",
        "ATTACH '{folder}/other.db'",
        "",
    ],
)
def test_only_a_single_select_runs(loaded: FakePort, folder: Path, sql: str) -> None:
    port = loaded
    with pytest.raises(FragmentFailed, match="a fragment must be") as refused:
        port.fragments(0, [_fragment(port, sql.format(folder=folder), 0)])
    assert refused.value.duckdb_error == ""
    assert list(folder.iterdir()) == []


def test_sql_duckdb_cannot_parse_is_refused_with_its_parser_error(loaded: FakePort) -> None:
    port = loaded
    with pytest.raises(FragmentFailed, match="syntax error") as refused:
        port.fragments(0, [_fragment(port, "SELEC 1", 0)])
    assert refused.value.duckdb_error == "ParserException"


def test_another_client_runs_fragments_on_the_same_cluster(loaded: FakePort) -> None:
    port = loaded
    other = port.client()
    barrier = other.barrier()
    results = other.fragments(
        barrier.index, [_fragment(port, _count_and_sum(p), p) for p in range(3)]
    )
    assert sum(result.rows.column("n")[0].as_py() for result in results) == 100
    assert port.fragment_calls[-1][0] == barrier.index
    other.release(barrier.index)
