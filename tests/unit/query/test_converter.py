"""A result's Python rows are single-node DuckDB's `fetchall()`, value for value.

`Converter.rows` skips DuckDB for columns whose Arrow pyarrow turns into the same Python
values (query.results.PYTHON_ALIKE). These tests hold that claim to DuckDB itself:
every value below goes through both and must come out equal and of the same Python type
(Decimal('1.50') is not Decimal('1.5'), and a date is not a string).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from query.results import Converter, python_alike

ALIKE = {
    "BOOLEAN": "[true, false, NULL]",
    "TINYINT": "[-128, 0, 127, NULL]",
    "SMALLINT": "[-32768, 32767, NULL]",
    "INTEGER": "[-2147483648, 0, 2147483647, NULL]",
    "BIGINT": "[-9223372036854775808, 9223372036854775807, NULL]",
    "UTINYINT": "[0, 255, NULL]",
    "USMALLINT": "[0, 65535]",
    "UINTEGER": "[0, 4294967295]",
    "UBIGINT": "[0, 18446744073709551615]",
    "FLOAT": "[0.1, -0.0, 3.4e38, 'nan', 'inf', '-inf', NULL]",
    "DOUBLE": "[0.1, -0.0, 1e308, 5e-324, 'nan', '-inf', NULL]",
    "VARCHAR": "['', 'a', 'naïve 🦆', 'tab\tnew\nline', NULL]",
    "DATE": "['0001-01-01', '1970-01-01', '1992-02-29', '9999-12-31', NULL]",
    "TIMESTAMP": "['0001-01-01 00:00:00', '2024-02-29 23:59:59.999999', NULL]",
    "DECIMAL(15,2)": "[0, 1.5, -0.1, 9999999999999.99, NULL]",
    "DECIMAL(4,0)": "[0, -9999, 9999]",
    "DECIMAL(38,10)": "[0, 1234567890123456789012345678.0123456789, -1e-10]",
    "DECIMAL(18,18)": "[0, 0.123456789012345678]",
}
"""DuckDB type -> a list literal of values, edges included, cast to it."""

THROUGH_DUCKDB = {
    "HUGEINT": "[0, 170141183460469231731687303715884105727]",
    "INTERVAL": "[INTERVAL 1 DAY]",
    "TIME": "['12:34:56']",
    "BLOB": "['\\xAA'::BLOB]",
    "UUID": "['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']",
    "INTEGER[]": "[[1, 2], NULL]",
    "ENUM('a', 'b')": "['a', 'b']",
    "TIMESTAMP_NS": "['2024-01-01 00:00:00.123456789']",
    "DATE ": "['infinity', '-infinity', '10000-01-01']",  # beyond Python's dates
    "TIMESTAMP ": "['infinity', '10000-01-01 00:00:00']",
}
"""Types whose rows must come from DuckDB (values pyarrow would give otherwise, or not
at all). A trailing space keeps a type twice as a key."""


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(":memory:")
    yield connection
    connection.close()


def _same(left: Any, right: Any) -> bool:
    if type(left) is not type(right):
        return False
    if isinstance(left, float) and math.isnan(left):
        return math.isnan(right)
    if isinstance(left, float):
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    return bool(left == right) and str(left) == str(right)


def _both(con: duckdb.DuckDBPyConnection, type_name: str, values: str) -> tuple[Any, Any, Any]:
    sql = f"SELECT unnest(CAST({values} AS {type_name.strip()}[])) AS v, 7 AS k"
    relation = con.sql(sql)
    types = [str(t) for t in relation.types]
    return relation.fetchall(), relation.to_arrow_table(), types


@pytest.mark.parametrize("type_name", sorted(ALIKE))
def test_python_alike_columns_skip_duckdb_and_give_its_values(
    con: duckdb.DuckDBPyConnection, type_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, table, types = _both(con, type_name, ALIKE[type_name])
    assert python_alike(types, table.schema), (types, table.schema)
    converter = Converter()
    monkeypatch.setattr(converter, "apply", lambda *a: pytest.fail("went through DuckDB"))
    rows = converter.rows(table, types)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert all(_same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("type_name", sorted(THROUGH_DUCKDB))
def test_other_columns_give_duckdbs_values(con: duckdb.DuckDBPyConnection, type_name: str) -> None:
    expected, table, types = _both(con, type_name, THROUGH_DUCKDB[type_name])
    converter = Converter()
    try:
        rows = converter.rows(table, types)
    finally:
        converter.close()
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert all(_same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


def test_python_alike_is_refused_for_a_type_arrow_does_not_match() -> None:
    table = pa.table({"x": pa.array([1], pa.decimal128(38, 0))})
    assert not python_alike(["HUGEINT"], table.schema)
    assert not python_alike(["DECIMAL(18,0)"], table.schema)
    assert python_alike(["DECIMAL(38,0)"], table.schema)
    assert not python_alike(["BIGINT"], pa.table({"x": pa.array([1], pa.int32())}).schema)
