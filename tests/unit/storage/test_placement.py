"""Placement of partitions on workers and of rows on partitions (storage/placement.py)."""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import placement
from storage.ddl import Column, TableSpec


@settings(max_examples=200, deadline=None)
@given(
    partitions=st.integers(1, 64),
    workers=st.lists(st.integers(0, 1000), min_size=1, max_size=12, unique=True),
    data=st.data(),
)
def test_holders_are_distinct_even_and_deterministic(
    partitions: int, workers: list[int], data: st.DataObject
) -> None:
    replicas = data.draw(st.integers(1, len(workers)))
    result = placement.holders(partitions, replicas, workers)
    assert result == placement.holders(partitions, replicas, list(reversed(workers)))
    assert len(result) == partitions
    assert all(len(set(held_by)) == replicas == len(held_by) for held_by in result)
    primaries = Counter(held_by[0] for held_by in result)
    copies = Counter(worker for held_by in result for worker in held_by)
    for counter, spread_max in ((copies, 1), (primaries, 2)):
        counts = [counter.get(worker, 0) for worker in workers]
        assert max(counts) - min(counts) <= spread_max


@pytest.mark.parametrize(
    ("partitions", "replicas", "workers"),
    [(0, 1, [1]), (1, 2, [1]), (1, 0, [1]), (1, 1, []), (1, 1, [1, 1])],
)
def test_holders_refuse_bad_inputs(partitions: int, replicas: int, workers: list[int]) -> None:
    with pytest.raises(placement.PlacementError):
        placement.holders(partitions, replicas, workers)


def spec(kind: str, key_type: str, partitions: int, **extra: Any) -> TableSpec:
    return TableSpec(
        schema="main",
        name="t",
        ddl=f"CREATE TABLE t(k {key_type});",
        columns=(Column("k", key_type),),
        kind=kind,  # type: ignore[arg-type]
        key="k",
        key_type=key_type,
        partitions=partitions,
        replicas=1,
        **extra,
    )


def test_reference_tables_are_on_every_worker() -> None:
    reference = TableSpec("main", "d", "", (Column("k", "INTEGER"),), "reference", None, None, 1, 3)
    assert placement.place(reference, [5, 3, 4]).holders == ((3, 4, 5),)
    con = duckdb.connect(config={"threads": 1})
    ids = placement.partition_of_table(con, pa.table({"k": [1, 2]}), reference)
    assert ids.to_pylist() == [0, 0]


CON = duckdb.connect(config={"threads": 1})

ints = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))
texts = st.one_of(st.none(), st.text(max_size=6))
dates = st.one_of(st.none(), st.dates(datetime.date(1900, 1, 1), datetime.date(2100, 1, 1)))
TYPES = [
    ("INTEGER", ints, pa.int64()),
    ("VARCHAR", texts, pa.string()),
    ("DATE", dates, pa.date32()),
]


def text_of(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime.date) else str(value)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), which=st.integers(0, 2))
def test_range_assignment_matches_a_python_model(data: st.DataObject, which: int) -> None:
    key_type, values, arrow_type = TYPES[which]
    keys = data.draw(st.lists(values, max_size=40))
    drawn: list[Any] = data.draw(st.lists(values.filter(lambda v: v is not None), max_size=5))
    bounds = sorted(set(drawn))
    if key_type == "VARCHAR":
        bounds = sorted(bounds, key=lambda v: v.encode())  # DuckDB compares bytes
    table_spec = spec("range", key_type, len(bounds) + 1, bounds=tuple(map(text_of, bounds)))
    ids = placement.partition_of_table(CON, pa.table({"k": pa.array(keys, arrow_type)}), table_spec)

    def model(key: Any) -> int:
        if key is None:
            return 0
        sortable = (lambda v: v.encode()) if key_type == "VARCHAR" else (lambda v: v)
        return next(
            (i for i, bound in enumerate(bounds) if sortable(key) < sortable(bound)), len(bounds)
        )

    assert ids.to_pylist() == [model(key) for key in keys]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), which=st.integers(0, 2))
def test_list_assignment_matches_a_python_model(data: st.DataObject, which: int) -> None:
    key_type, values, arrow_type = TYPES[which]
    members = data.draw(st.lists(values, min_size=1, max_size=8, unique=True))
    cut = data.draw(st.integers(1, len(members)))
    lists = [members[:cut], members[cut:]] if cut < len(members) else [members]
    keys = data.draw(st.lists(st.sampled_from(members), max_size=30))
    table_spec = spec(
        "list",
        key_type,
        len(lists),
        lists=tuple(tuple(None if v is None else text_of(v) for v in group) for group in lists),
    )
    ids = placement.partition_of_table(CON, pa.table({"k": pa.array(keys, arrow_type)}), table_spec)
    assert ids.to_pylist() == [next(i for i, g in enumerate(lists) if k in g) for k in keys]


def test_a_key_in_no_list_is_reported() -> None:
    table_spec = spec("list", "INTEGER", 1, lists=(("1", "2"),))
    with pytest.raises(placement.RowNotPlaceable, match="key 7 of table t"):
        placement.partition_of_table(CON, pa.table({"k": [1, 7]}), table_spec)
    with pytest.raises(placement.RowNotPlaceable, match="key NULL"):
        placement.partition_of_table(CON, pa.table({"k": pa.array([None], pa.int64())}), table_spec)


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(ints, max_size=50), partitions=st.integers(1, 9))
def test_hash_assignment_is_duckdbs_hash_of_the_declared_type(
    keys: list[int | None], partitions: int
) -> None:
    table_spec = spec("hash", "INTEGER", partitions)
    ids = placement.partition_of_table(CON, pa.table({"k": pa.array(keys, pa.int64())}), table_spec)
    expected = [
        CON.execute("SELECT hash(CAST(? AS INTEGER)) % ?", [key, partitions]).fetchall()[0][0]
        for key in keys
    ]
    assert ids.to_pylist() == expected
    assert ids.type == pa.int32()
    same = placement.partition_of_table(
        CON, pa.table({"k": pa.array(keys, pa.int32())}), table_spec
    )
    assert same.equals(ids)  # an Arrow int32 or int64 column hashes the same


def test_rows_without_the_key_column_are_refused() -> None:
    with pytest.raises(placement.PlacementError):
        placement.partition_of_table(CON, pa.table({"other": [1]}), spec("hash", "INTEGER", 2))


def test_row_order_is_kept_on_many_rows() -> None:
    count = 200_000
    table_spec = spec("range", "INTEGER", 2, bounds=(str(count // 2),))
    ids = placement.partition_of_table(CON, pa.table({"k": pa.array(range(count))}), table_spec)
    assert ids.to_pylist() == [0] * (count // 2) + [1] * (count // 2)
