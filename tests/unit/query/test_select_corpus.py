"""The SELECT corpus (tests/unit/query/corpus.py) on the coordinator over the fake cluster,
against single-node DuckDB on the same data: same errors, columns, types and rows.

Rows are compared as multisets, or in order where the query's ORDER BY is total. DOUBLE
and FLOAT columns of queries marked `approx` (sums, averages and variances that a
distributed plan may add up in another order) are compared with a relative tolerance of
REL_TOLERANCE; everything else is exact, compared as DuckDB's text of each value (so
-0.0, NaN, NULL and nested values are told apart).

A query that can legitimately give two answers proves nothing, so every query is first run
on a copy of the data stored in another row order and must give the same answer there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pytest

from query.coordinator import SqlError
from tests.unit.query.corpus import QUERIES, SHAPES, TABLES, Query, load, load_shuffled
from tests.unit.query.harness import Pair, TextRow, sort_key

REL_TOLERANCE = 1e-9
ABS_TOLERANCE = 1e-12
"""For results that are zero up to rounding (a variance of equal values, a cancelled sum)."""
APPROX_TYPES = frozenset({"DOUBLE", "FLOAT"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Pair]:
    pair = Pair()
    try:
        load(pair)
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module")
def shuffled(cluster: Pair) -> Iterator[duckdb.DuckDBPyConnection]:
    con = load_shuffled(cluster.reference)
    yield con
    con.close()


def _params(query: Query) -> list[object] | None:
    return None if query.params is None else list(query.params)


def _cases() -> list[object]:
    cases: list[object] = []
    for query in QUERIES:
        marks = []
        if query.xfail is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=query.xfail))
        cases.append(pytest.param(query, id=query.id, marks=marks))
    return cases


# -- answers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    columns: list[str]
    types: list[str]
    """DuckDB's names of the column types."""
    arrow_types: list[pa.DataType]
    rows: list[TextRow]


def duckdb_answer(
    con: duckdb.DuckDBPyConnection, pair: Pair, query: Query
) -> Answer | duckdb.Error:
    try:
        relation = con.sql(query.sql, params=_params(query))
        assert relation is not None, query.sql
        types = [str(t) for t in relation.types]
        table = relation.to_arrow_table()
    except duckdb.Error as error:
        return error
    return Answer(table.column_names, types, table.schema.types, pair.text_rows(table))


def cluster_answer(pair: Pair, query: Query) -> Answer | SqlError:
    port = pair.port
    scans, releases = len(port.scans), len(port.releases)
    try:
        result = pair.coordinator.execute(query.sql, _params(query))
    except SqlError as error:
        return error
    scanned = {index for index, _ in port.scans[scans:]}
    assert scanned <= set(port.releases[releases:]), "every read is released"
    assert port.open_barriers() == []
    assert result.table is not None, query.sql
    table = result.table
    return Answer(result.columns, result.types, table.schema.types, pair.text_rows(table))


def _close(mine: str | None, theirs: str | None) -> bool:
    if mine is None or theirs is None:
        return mine is theirs
    a, b = float(mine), float(theirs)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


def assert_same_answer(mine: Answer, theirs: Answer, query: Query) -> None:
    assert mine.columns == theirs.columns
    assert mine.types == theirs.types
    assert mine.arrow_types == theirs.arrow_types
    approx = [query.approx and t in APPROX_TYPES for t in theirs.types]
    if not any(approx):
        mine_rows, their_rows = mine.rows, theirs.rows
        if not query.ordered:
            mine_rows, their_rows = (
                sorted(mine_rows, key=sort_key),
                sorted(their_rows, key=sort_key),
            )
        assert mine_rows == their_rows
        return

    def exact_first(row: TextRow) -> tuple[tuple[bool, str], ...]:
        exact = tuple(v for v, a in zip(row, approx, strict=True) if not a)
        rounded = tuple(
            None if v is None else f"{float(v):.6e}" for v, a in zip(row, approx, strict=True) if a
        )
        return sort_key(exact + rounded)

    mine_rows, their_rows = mine.rows, theirs.rows
    if not query.ordered:
        mine_rows, their_rows = (
            sorted(mine_rows, key=exact_first),
            sorted(their_rows, key=exact_first),
        )
    assert len(mine_rows) == len(their_rows)
    for mine_row, their_row in zip(mine_rows, their_rows, strict=True):
        for a, m, t in zip(approx, mine_row, their_row, strict=True):
            assert _close(m, t) if a else m == t, (mine_row, their_row)


# -- tests --------------------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    ids = [query.id for query in QUERIES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert len(QUERIES) >= 200
    for shape in SHAPES:
        assert sum(query.shape == shape for query in QUERIES) >= 10, shape
    for query in QUERIES:
        assert query.shape in SHAPES, query.id
        assert not (query.fails and query.approx), query.id
        if query.ordered:
            assert "ORDER BY" in query.sql.upper(), query.id


def test_data_has_the_promised_layout(cluster: Pair) -> None:
    """Several partitionings, an empty table, a table with empty partitions and one key
    holding most rows: what the corpus claims to exercise is really there."""
    counts = {
        table.name: [part.num_rows for part in cluster.port.partitions(f"main.{table.name}")]
        for table in TABLES
    }
    assert {name: len(parts) for name, parts in counts.items()} == {
        "f": 6, "g": 6, "h": 4, "r": 5, "lt": 4, "d": 1, "e": 6, "sk": 8,
    }  # fmt: skip
    assert {name: sum(parts) for name, parts in counts.items()} == {
        table.name: table.rows for table in TABLES
    }
    assert sum(counts["e"]) == 0
    assert 0 in counts["sk"] and max(counts["sk"]) > 0.7 * sum(counts["sk"])
    assert all(parts.count(0) == 0 for name, parts in counts.items() if name not in ("e", "sk"))
    for table in TABLES:
        if table.rows:
            nulls = cluster.reference.sql(
                f"SELECT count(*) FROM {table.name} WHERE "
                + " OR ".join(f"{column} IS NULL" for column, _ in table.columns)
            ).fetchall()
            assert nulls[0][0] > 0, f"{table.name} has NULLs"


@pytest.mark.parametrize("query", _cases())
def test_answer_does_not_depend_on_row_order(
    query: Query, cluster: Pair, shuffled: duckdb.DuckDBPyConnection
) -> None:
    """The corpus itself: DuckDB gives one answer whatever order the rows are stored in."""
    if query.xfail is not None:
        pytest.skip("the xfail is the cluster's, not the corpus's")
    expected = duckdb_answer(cluster.reference, cluster, query)
    other = duckdb_answer(shuffled, cluster, query)
    if isinstance(expected, duckdb.Error) or isinstance(other, duckdb.Error):
        assert query.fails, f"DuckDB raised {expected!r} / {other!r}"
        assert type(expected) is type(other) and str(expected) == str(other)
        return
    assert not query.fails, "DuckDB did not raise"
    assert_same_answer(other, expected, query)


@pytest.mark.parametrize("query", _cases())
def test_cluster_answers_as_duckdb(query: Query, cluster: Pair) -> None:
    if not query.approx:
        cluster.run(query.sql, _params(query), ordered=query.ordered, fails=query.fails)
        return
    expected = duckdb_answer(cluster.reference, cluster, query)
    assert isinstance(expected, Answer), expected
    ours = cluster_answer(cluster, query)
    assert isinstance(ours, Answer), f"dcluster raised {ours!r}; DuckDB ran: {query.sql}"
    assert_same_answer(ours, expected, query)


def test_list_partition_values_may_be_unicode() -> None:
    pair = Pair()
    try:
        pair.run(
            "CREATE TABLE u (k VARCHAR, v INTEGER) PARTITION BY LIST(k) (('ζώνη', 'a'), ('b'))"
        )
        pair.run("INSERT INTO u VALUES ('ζώνη', 1), ('a', 2), ('b', 3)")
        pair.run("SELECT * FROM u")
    finally:
        pair.close()
