"""The 22 TPC-H queries at sf 0.01 through the coordinator over the fake cluster, each
against plain DuckDB on the same data.

The 8 tables are created with dcluster's clauses (benchmarks.tpch_data.create_tables_sql:
lineitem and orders co-located by order key, customer, part and partsupp hashed, supplier,
nation and region REFERENCE) and loaded from dbgen's Parquet files with
`INSERT INTO t SELECT * FROM read_parquet(…)` through the coordinator; plain DuckDB gets the
same tables without the clauses and the same INSERTs. Each query must then return DuckDB's
answer: the same column names, DuckDB types and Arrow types, the same rows in the same
order (every query has an ORDER BY), values equal exactly except DOUBLE columns, which agree
within a relative 1e-9 (benchmarks.tpch_data.answer_difference).

The data comes from DuckDB's tpch extension run in a side environment
(benchmarks.tpch_data), made on first use and cached; when that environment cannot be made
(no package index) the tests skip and say why.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from benchmarks import tpch_data
from storage import ddl
from tests.unit.query.harness import Pair

SCALE_FACTOR = 0.01
PARTITIONS = 4
"""More partitions than the fake cluster's 3 workers: some worker holds two."""


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[Pair, tpch_data.Dataset]]:
    try:
        dataset = tpch_data.ensure_dataset(SCALE_FACTOR)
    except tpch_data.TpchUnavailable as error:
        pytest.skip(f"no TPC-H data: {error}")
    pair = Pair()
    try:
        for statement in tpch_data.create_tables_sql(partitions=PARTITIONS):
            pair.coordinator.execute(statement)
            pair.reference.execute(ddl.parse(statement).sql)
        for name in tpch_data.TABLES:
            insert = tpch_data.insert_sql(name, dataset)
            assert pair.coordinator.execute(insert).rowcount == dataset.rows[name], name
            pair.reference.execute(insert)
        pair.check_tables()  # the same rows, each in the partition its key maps to
        yield pair, dataset
    finally:
        pair.close()


@pytest.mark.parametrize("number", range(1, tpch_data.QUERY_COUNT + 1), ids="q{:02d}".format)
def test_query_answers_as_duckdb(loaded: tuple[Pair, tpch_data.Dataset], number: int) -> None:
    pair, dataset = loaded
    sql = dataset.queries[number]
    ours = pair.coordinator.execute(sql)
    relation = pair.reference.sql(sql)
    assert relation is not None and ours.table is not None
    expected = tpch_data.Answer(
        relation.columns, [str(kind) for kind in relation.types], relation.fetchall()
    )
    assert expected.rows, f"q{number:02d} returns rows at sf {SCALE_FACTOR}"
    actual = tpch_data.Answer(ours.columns, ours.types, ours.fetchall())
    difference = tpch_data.answer_difference(expected, actual)
    assert difference is None, f"q{number:02d}: {difference}"
    assert ours.table.schema.types == relation.to_arrow_table().schema.types
    assert pair.port.open_barriers() == [], "every read snapshot is released"


def test_answers_compare_exactly_but_doubles_within_a_relative_tolerance() -> None:
    def answer(
        rows: list[tuple[object, ...]], kinds: tuple[str, str] = ("DOUBLE", "DECIMAL(38,2)")
    ) -> tpch_data.Answer:
        return tpch_data.Answer(["x", "y"], list(kinds), rows)

    expected = answer([(1.0, Decimal("2.50")), (None, Decimal("0.00"))])
    assert tpch_data.answer_difference(expected, expected) is None
    close = answer([(1.0 + 1e-12, Decimal("2.50")), (None, Decimal("0.00"))])
    assert tpch_data.answer_difference(expected, close) is None
    far = answer([(1.0 + 1e-6, Decimal("2.50")), (None, Decimal("0.00"))])
    assert tpch_data.answer_difference(expected, far) == (
        f"row 0 is {(1.0 + 1e-6, Decimal('2.50'))!r}, expected {(1.0, Decimal('2.50'))!r}"
    )
    cent = answer([(1.0, Decimal("2.51")), (None, Decimal("0.00"))])
    assert tpch_data.answer_difference(expected, cent) is not None
    swapped = answer([(None, Decimal("0.00")), (1.0, Decimal("2.50"))])
    assert tpch_data.answer_difference(expected, swapped) is not None
    retyped = answer(list(expected.rows), ("DOUBLE", "DECIMAL(18,2)"))
    assert tpch_data.answer_difference(expected, retyped) is not None
    renamed = tpch_data.Answer(["x", "z"], list(expected.types), list(expected.rows))
    assert tpch_data.answer_difference(expected, renamed) is not None
    assert tpch_data.answer_difference(expected, answer(list(expected.rows[:1]))) is not None
