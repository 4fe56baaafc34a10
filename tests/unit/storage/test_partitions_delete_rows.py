"""DeleteRows: deleting the rows of a partition equal to given Arrow rows, checked against
DuckDB deleting the same rows from an ordinary table (a differently planned EXISTS), with
duplicates, NULLs, NaN, -0.0, nested values and awkward column names; its plan is a hash
join; and it is atomic with the applied index like every operation."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from storage._partition_ops import ROWS_VIEW, delete_rows_sql
from storage.partitions import (
    CreateTable,
    DeleteRows,
    Insert,
    Operation,
    OperationRejected,
    PartitionStore,
    PartitionStoreConfig,
    quote_identifier,
)

NESTED_COLUMNS = (
    "k INTEGER, f DOUBLE, s VARCHAR, l INTEGER[], st STRUCT(x INTEGER, y VARCHAR), "
    "ls STRUCT(a DOUBLE)[]"
)
NESTED_SCHEMA = pa.schema(
    [
        ("k", pa.int32()),
        ("f", pa.float64()),
        ("s", pa.string()),
        ("l", pa.list_(pa.int32())),
        ("st", pa.struct([("x", pa.int32()), ("y", pa.string())])),
        ("ls", pa.list_(pa.struct([("a", pa.float64())]))),
    ]
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    config = PartitionStoreConfig(memory_limit_bytes=64 << 20)
    with PartitionStore.open(tmp_path / "worker.duckdb", config) as opened:
        yield opened


def canonical(table: pa.Table) -> list[str]:
    """The rows as a sorted list of reprs: a multiset that compares NaN equal to NaN."""
    return sorted(repr(row) for row in table.to_pylist())


def reference_delete(columns_sql: str, rows: pa.Table, doomed: pa.Table) -> list[str]:
    """What DuckDB leaves when an ordinary table deletes `doomed` with EXISTS."""
    connection = duckdb.connect()
    connection.execute(f"CREATE TABLE ordinary ({columns_sql})")
    connection.register("inserted", rows)
    connection.execute("INSERT INTO ordinary BY NAME SELECT * FROM inserted")
    if doomed.num_rows:
        connection.register("doomed", doomed)
        matches = " AND ".join(
            f"ordinary.{name} IS NOT DISTINCT FROM doomed.{name}"
            for name in map(quote_identifier, doomed.column_names)
        )
        connection.execute(
            f"DELETE FROM ordinary WHERE EXISTS (SELECT 1 FROM doomed WHERE {matches})"
        )
    left = connection.sql("SELECT * FROM ordinary").to_arrow_table()
    connection.close()
    return canonical(left)


def check_against_reference(
    store: PartitionStore, columns_sql: str, rows: pa.Table, doomed: pa.Table
) -> list[str]:
    index = store.applied_index()
    assert store.apply(index + 1, [CreateTable("t", 0, columns_sql), Insert("t", 0, rows)])
    assert store.delete_rows(index + 2, "t", 0, doomed)
    left = canonical(store.scan("t", 0))
    assert left == reference_delete(columns_sql, rows, doomed)
    assert store.drop_table(index + 3, "t")
    return left


def test_every_copy_of_an_equal_row_goes(store: PartitionStore) -> None:
    rows = pa.table({"a": [1, 1, 1, 2, 2, 3], "b": ["x", "x", "y", "x", "x", "x"]})
    doomed = pa.table({"a": [1, 1, 2, 9], "b": ["x", "x", "x", "x"]})
    left = check_against_reference(store, "a BIGINT, b VARCHAR", rows, doomed)
    assert left == canonical(pa.table({"a": [1, 3], "b": ["y", "x"]}))


def test_nulls_match_nulls_and_nan_matches_nan(store: PartitionStore) -> None:
    nan = float("nan")
    rows = pa.table(
        {
            "k": pa.array([1, 2, 3, 4, 5, 6, 7, None], pa.int64()),
            "f": pa.array([nan, None, 0.0, -0.0, 1.5, nan, None, 2.0]),
        }
    )
    doomed = pa.table(
        {
            "k": pa.array([1, 2, 3, None, 7], pa.int64()),
            "f": pa.array([nan, None, -0.0, 2.0, 1.0]),
        }
    )
    left = check_against_reference(store, "k BIGINT, f DOUBLE", rows, doomed)
    # 3 goes: DuckDB holds -0.0 = 0.0. 7 stays: NULL matches only NULL.
    assert left == canonical(rows.slice(3, 4))


def test_a_subset_of_the_columns_decides(store: PartitionStore) -> None:
    rows = pa.table({"a": [1, 2, 3, None], "b": ["x", "y", "z", "w"], "c": [1.0, 2.0, 3.0, 4.0]})
    doomed = pa.table({"b": ["y", "w"], "a": pa.array([2, None], pa.int16())})
    left = check_against_reference(store, "a BIGINT, b VARCHAR, c DOUBLE", rows, doomed)
    assert left == canonical(rows.take([0, 2]))


def test_column_names_that_need_quotes(store: PartitionStore) -> None:
    columns_sql = '"select" INTEGER, "b c" VARCHAR, "we""ird" INTEGER, "Mixed" INTEGER'
    rows = pa.table(
        {"select": [1, 2, 3], "b c": ["x", "y", "z"], 'we"ird': [7, 8, 9], "Mixed": [0, 0, 1]}
    )
    doomed = pa.table({"b c": ["y", "z"], 'we"ird': [8, 0], "Mixed": [0, 1]})
    left = check_against_reference(store, columns_sql, rows, doomed)
    assert left == canonical(rows.take([0, 2]))


def test_nested_values(store: PartitionStore) -> None:
    rows = pa.Table.from_pylist(
        [
            {"k": 1, "l": [1, None], "st": {"x": 1, "y": None}, "ls": [{"a": float("nan")}]},
            {"k": 1, "l": [1, None], "st": {"x": 1, "y": None}, "ls": [{"a": float("nan")}]},
            {"k": 2, "l": [1], "st": {"x": 1, "y": "q"}, "ls": [None]},
            {"k": 3, "l": [], "st": None, "ls": []},
            {"k": 4, "l": None, "st": {"x": None, "y": None}, "ls": None},
            {"k": 5, "l": [None], "st": {"x": 2, "y": "q"}, "ls": [{"a": None}]},
        ],
        schema=NESTED_SCHEMA,
    )
    doomed = rows.select(["l", "st", "ls"]).take([0, 3, 4])
    left = check_against_reference(store, NESTED_COLUMNS, rows, doomed)
    assert left == canonical(rows.take([2, 5]))


def test_empty_rows_delete_nothing(store: PartitionStore) -> None:
    rows = pa.table({"a": [1, 2]})
    left = check_against_reference(store, "a BIGINT", rows, rows.slice(0, 0))
    assert left == canonical(rows)
    # Even with no columns at all, and the index still advances.
    store.create_table(10, "u", 0, "a BIGINT")
    assert store.delete_rows(11, "u", 0, pa.table({}))
    assert store.applied_index() == 11


def test_deleting_everything_and_deleting_twice(store: PartitionStore) -> None:
    rows = pa.table({"a": list(range(100)) * 3})
    store.apply(
        1, [CreateTable("t", 0, "a INTEGER PRIMARY KEY"), Insert("t", 0, rows.slice(0, 100))]
    )
    assert store.delete_rows(2, "t", 0, rows)
    assert store.scan("t", 0).num_rows == 0
    assert store.delete_rows(3, "t", 0, rows)  # nothing left to match: fine
    # With a primary key the rows can come back at once.
    assert store.insert(4, "t", 0, rows.slice(0, 100))
    assert store.scan("t", 0).num_rows == 100


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_match_the_reference(store: PartitionStore, seed: int) -> None:
    rng = random.Random(seed)
    table_rows = [random_row(rng) for _ in range(rng.randint(0, 300))]
    table_rows += rng.choices(table_rows, k=len(table_rows) // 3)  # exact duplicates
    picked = rng.choices(table_rows, k=rng.randint(0, len(table_rows))) if table_rows else []
    doomed_rows = picked + [random_row(rng) for _ in range(rng.randint(0, 50))]
    rows = pa.Table.from_pylist(table_rows, schema=NESTED_SCHEMA)
    columns = rng.sample(NESTED_SCHEMA.names, rng.randint(1, len(NESTED_SCHEMA)))
    doomed = pa.Table.from_pylist(doomed_rows, schema=NESTED_SCHEMA).select(columns)
    left = check_against_reference(store, NESTED_COLUMNS, rows, doomed)
    assert len(left) <= rows.num_rows
    if picked and len(columns) == len(NESTED_SCHEMA):
        assert len(left) < rows.num_rows


def random_row(rng: random.Random) -> dict[str, Any]:
    """Values from tiny domains, so that rows collide often."""

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    floats = [0.0, -0.0, 1.0, float("nan"), float("inf")]
    return {
        "k": maybe(rng.randint(0, 3)),
        "f": maybe(rng.choice(floats)),
        "s": maybe(rng.choice(["", "a", "é", "a b"])),
        "l": maybe([maybe(rng.randint(0, 1)) for _ in range(rng.randint(0, 2))]),
        "st": maybe({"x": maybe(rng.randint(0, 1)), "y": maybe(rng.choice(["p", "q"]))}),
        "ls": maybe([maybe({"a": maybe(rng.choice(floats))}) for _ in range(rng.randint(0, 2))]),
    }


def plan_operators(connection: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    plan = json.loads(connection.execute(f"EXPLAIN (FORMAT json) {sql}").fetchall()[0][1])
    names: list[str] = []
    pending = list(plan)
    while pending:
        node = pending.pop()
        names.append(node["name"])
        pending.extend(node["children"])
    return names


@pytest.mark.parametrize(
    "columns",
    [["k"], ["k", "f", "s"], ["l", "st", "ls"], ["k", "f", "s", "l", "st", "ls"]],
)
def test_the_plan_is_a_hash_join(columns: list[str]) -> None:
    connection = duckdb.connect()
    connection.execute(f"CREATE TABLE big ({NESTED_COLUMNS})")
    connection.execute(
        "INSERT INTO big SELECT i, i / 7, i::VARCHAR, [i], {'x': i, 'y': 'y'}, [{'a': i / 3}] "
        "FROM range(100000) r(i)"
    )
    rng = random.Random(7)
    doomed = pa.Table.from_pylist([random_row(rng) for _ in range(10_000)], schema=NESTED_SCHEMA)
    connection.register(ROWS_VIEW, doomed.select(columns))
    operators = plan_operators(connection, delete_rows_sql('"big"', columns))
    assert "HASH_JOIN" in operators, operators
    slow = {"NESTED_LOOP_JOIN", "CROSS_PRODUCT", "PIECEWISE_MERGE_JOIN", "BLOCKWISE_NL_JOIN"}
    assert slow.isdisjoint(operators), operators
    connection.close()


def test_a_rejected_delete_leaves_nothing_applied(store: PartitionStore) -> None:
    rows = pa.table({"a": [1, 2, 3]})
    store.apply(1, [CreateTable("t", 0, "a BIGINT"), Insert("t", 0, rows)])
    entry: list[Operation] = [
        DeleteRows("t", 0, pa.table({"a": [1]})),
        Insert("t", 0, pa.table({"a": [10]})),
        DeleteRows("t", 0, pa.table({"no_such_column": [2]})),
    ]
    with pytest.raises(OperationRejected) as caught:
        store.apply(2, entry)
    assert caught.value.operation_number == 2
    assert "no_such_column" in str(caught.value)
    assert store.applied_index() == 1
    assert canonical(store.scan("t", 0)) == canonical(rows)
    with pytest.raises(OperationRejected):
        store.delete_rows(2, "t", 7, rows)  # no such partition
    assert store.applied_index() == 1
    # The rejected entries released their rows: later operations work as usual.
    assert store.apply(2, entry[:2])
    assert canonical(store.scan("t", 0)) == canonical(pa.table({"a": [2, 3, 10]}))


def test_a_delete_is_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "worker.duckdb"
    rows = pa.table({"a": [1, 1, 2]})
    log: list[list[Operation]] = [
        [CreateTable("t", 0, "a BIGINT"), Insert("t", 0, rows)],
        [DeleteRows("t", 0, pa.table({"a": [1]}))],
        [Insert("t", 0, pa.table({"a": [1]}))],
    ]
    with PartitionStore.open(path) as store:
        assert [store.apply(i, entry) for i, entry in enumerate(log, start=1)] == [True] * 3
    with PartitionStore.open(path) as store:  # replay after a restart changes nothing
        assert [store.apply(i, entry) for i, entry in enumerate(log, start=1)] == [False] * 3
        assert canonical(store.scan("t", 0)) == canonical(pa.table({"a": [2, 1]}))
