"""PIVOT without an IN list: DuckDB makes it several statements (an ENUM type of the values
found in the data, then the query over it), so the coordinator runs it as written over the
whole tables. Same answer as DuckDB, EXPLAIN says why, and nothing is left behind in the
coordinator's DuckDB."""

from __future__ import annotations

import re
from collections.abc import Iterator

import duckdb
import pytest

from query._reads import SqlError, Unsupported
from tests.unit.query.harness import Pair

SETUP = (
    "CREATE TABLE sales (id INTEGER, region VARCHAR, year INTEGER, amount DECIMAL(10,2)) "
    "PARTITION BY HASH(id) PARTITIONS 3",
    "INSERT INTO sales SELECT i, ['north', 'south', 'east', NULL][i % 4 + 1], 2020 + i % 3, "
    "(i * 7 % 100) / 4 FROM range(60) t(i)",
    "CREATE TABLE regions (name VARCHAR, country VARCHAR) REFERENCE",
    "INSERT INTO regions VALUES ('north', 'no'), ('south', 'se'), ('east', 'fi')",
)
PIVOT = "PIVOT sales ON region USING sum(amount) GROUP BY year ORDER BY year"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as made:
        yield made


@pytest.mark.parametrize(
    "sql",
    [
        PIVOT,
        "SELECT * FROM (PIVOT sales ON region, year USING count(*), max(amount))",
        "WITH p AS (PIVOT sales ON year USING sum(amount) GROUP BY region) "
        "SELECT p.*, r.country FROM p LEFT JOIN regions r ON p.region = r.name",
        "SELECT * FROM (PIVOT (SELECT region, year FROM sales WHERE id < 10) ON region) "
        "ORDER BY ALL",
        "FROM sales PIVOT (sum(amount) FOR region IN ('north', 'east') GROUP BY year)",
    ],
)
def test_a_pivot_answers_as_duckdb(pair: Pair, sql: str) -> None:
    pair.run(sql, ordered="ORDER BY" in sql)


def test_new_values_in_the_data_are_new_columns(pair: Pair) -> None:
    first = pair.run(PIVOT, ordered=True)
    pair.run("INSERT INTO sales VALUES (100, 'west', 2021, 1.50)")
    again = pair.run(PIVOT, ordered=True)
    assert first is not None and again is not None
    assert "west" not in first.columns and "west" in again.columns


def test_explain_says_the_pivot_runs_here_over_whole_tables(pair: Pair) -> None:
    rows = pair.coordinator.execute("EXPLAIN " + PIVOT).fetchall()
    assert rows[0][0] == "whole tables" and "PIVOT without an IN list" in str(rows[0][2])
    assert [row[0] for row in rows[1:]] == ["scan main.sales"]
    analyzed = pair.coordinator.execute("EXPLAIN ANALYZE " + PIVOT).fetchall()
    assert "PIVOT without an IN list" in str(analyzed[0][2])
    assert analyzed[-1][0] == "result" and analyzed[-1][3] == "3"


def test_a_pivot_with_its_values_written_out_is_planned(pair: Pair) -> None:
    sql = "PIVOT sales ON region IN ('north', 'south') USING sum(amount) GROUP BY year"
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    assert not any("PIVOT without an IN list" in str(row[2]) for row in rows)


def test_no_enum_type_is_left_in_the_coordinators_duckdb(pair: Pair) -> None:
    for _ in range(3):
        pair.run(PIVOT, ordered=True)
    left = pair.coordinator._work.con.sql(
        "SELECT type_name FROM duckdb_types() WHERE type_name LIKE '%pivot%'"
    ).fetchall()
    assert left == []


def test_a_pivot_that_fails_fails_as_in_duckdb(pair: Pair) -> None:
    pair.run("PIVOT sales ON nowhere USING sum(amount)", fails=True)
    # DuckDB's message quotes its rewritten query, which names the ENUM type by a UUID.
    sql = "PIVOT sales ON region USING sum(nothing)"
    with pytest.raises(duckdb.BinderException) as theirs:
        pair.reference.sql(sql)
    with pytest.raises(SqlError) as ours:
        pair.coordinator.execute(sql)
    assert getattr(ours.value, "duckdb_error", None) == "BinderException"
    assert _without_uuids(str(ours.value)) == _without_uuids(str(theirs.value))


def _without_uuids(text: str) -> str:
    return re.sub(r"[0-9a-f]{8}(-[0-9a-f]{1,4})*", "<uuid>", text)


def test_a_write_with_a_pivot_is_refused_and_writes_nothing(pair: Pair) -> None:
    pair.run("CREATE TABLE wide (year INTEGER, east DECIMAL(38,2)) PARTITION BY HASH(year)")
    with pytest.raises(Unsupported, match="only as a query"):
        pair.coordinator.execute(
            "INSERT INTO wide SELECT year, east FROM (PIVOT sales ON region USING sum(amount) "
            "GROUP BY year)"
        )
    pair.check_tables()
