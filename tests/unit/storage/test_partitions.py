"""The partition store: every operation, exactly-once apply, atomic entries, snapshot reads,
export/import round trips and the common DuckDB types through Arrow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from storage.partitions import (
    AddColumn,
    CreateTable,
    Delete,
    DropTable,
    ImportPartition,
    Insert,
    Operation,
    OperationRejected,
    PartitionStore,
    PartitionStoreConfig,
    SnapshotUnavailable,
    StoreClosed,
    TooManySnapshots,
    partition_table_name,
    partition_table_sql,
)

COLUMNS = "id BIGINT PRIMARY KEY, name VARCHAR, score DOUBLE"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "worker.duckdb"


@pytest.fixture
def store(path: Path) -> Iterator[PartitionStore]:
    with PartitionStore.open(path, PartitionStoreConfig(memory_limit_bytes=64 << 20)) as opened:
        yield opened


def rows(ids: range, tag: str = "x") -> pa.Table:
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "name": [f"{tag}{i}" for i in ids],
            "score": [i / 2 for i in ids],
        }
    )


def ids(table: pa.Table) -> list[int]:
    return sorted(table.column("id").to_pylist())


def test_names_are_deterministic_quoted_and_injective() -> None:
    assert partition_table_name("t", 3) == "t__p3"
    assert partition_table_sql('we"ird', 0) == '"we""ird__p0"'
    assert partition_table_name("a__p1", 2) != partition_table_name("a", 12)


def test_a_new_store_is_empty_at_index_zero(store: PartitionStore) -> None:
    assert store.applied_index() == 0
    assert store.partitions() == []
    assert store.partition_stats() == []


def test_every_operation(store: PartitionStore) -> None:
    assert store.create_table(1, "t", 0, COLUMNS)
    assert store.apply(2, [CreateTable("t", 3, COLUMNS), CreateTable("u", 3, "k INTEGER")])
    assert store.partitions() == [("t", 0), ("t", 3), ("u", 3)]
    assert store.insert(3, "t", 0, rows(range(10)))
    assert store.insert(4, "t", 3, rows(range(100, 105)))
    assert store.delete(5, "t", 0, "id >= 5")
    assert store.update(6, "t", 0, "name = 'changed', score = score * 10", "id = 1")
    assert ids(store.scan("t", 0)) == [0, 1, 2, 3, 4]
    assert store.scan("t", 0, "WHERE id = 1").to_pylist() == [
        {"id": 1, "name": "changed", "score": 5.0}
    ]
    assert store.add_column(7, "t", "flag BOOLEAN DEFAULT true")
    assert store.scan("t", 3, "LIMIT 1").column_names == ["id", "name", "score", "flag"]
    # Insert matches columns by name and fills the absent ones with their defaults.
    assert store.insert(8, "t", 3, pa.table({"id": pa.array([7], pa.int64())}))
    assert store.scan("t", 3, "WHERE id = 7").to_pylist() == [
        {"id": 7, "name": None, "score": None, "flag": True}
    ]
    assert store.drop_partition(9, "t", 3)
    assert store.partitions() == [("t", 0), ("u", 3)]
    assert store.drop_table(10, "t")
    assert store.drop_table(11, "absent")  # holding none of a table's partitions is fine
    assert store.partitions() == [("u", 3)]
    assert store.applied_index() == 11


def test_an_entry_at_or_below_the_applied_index_is_skipped(path: Path) -> None:
    with PartitionStore.open(path) as store:
        store.create_table(1, "t", 0, COLUMNS)
        store.insert(2, "t", 0, rows(range(3)))
        assert not store.insert(2, "t", 0, rows(range(3, 6)))
        assert not store.create_table(1, "t", 0, COLUMNS)
        assert store.apply(5, [])  # gaps are fine: entries 3, 4 touched no local partition
    with PartitionStore.open(path) as store:  # restart, then replay the whole log
        assert store.applied_index() == 5
        log: list[list[Operation]] = [
            [CreateTable("t", 0, COLUMNS)],
            [Insert("t", 0, rows(range(3)))],
            [],
            [],
            [],
            [Insert("t", 0, rows(range(10, 12)))],
        ]
        applied = [store.apply(index, entry) for index, entry in enumerate(log, start=1)]
        assert applied == [False] * 5 + [True]
        assert ids(store.scan("t", 0)) == [0, 1, 2, 10, 11]


def test_an_entry_whose_last_operation_fails_leaves_nothing_applied(store: PartitionStore) -> None:
    store.create_table(1, "t", 0, COLUMNS)
    store.insert(2, "t", 0, rows(range(3)))
    entry: list[Operation] = [
        Insert("t", 0, rows(range(10, 20))),
        CreateTable("v", 0, "a INTEGER"),
        AddColumn("t", "extra INTEGER"),
        Delete("t", 0, "id = 0"),
        Insert("t", 0, rows(range(1, 2))),  # duplicate primary key
    ]
    with pytest.raises(OperationRejected) as caught:
        store.apply(3, entry)
    assert caught.value.operation_number == 4
    assert "Duplicate key" in str(caught.value)
    assert str(caught.value) == caught.value.duckdb_message
    assert store.applied_index() == 2
    assert store.partitions() == [("t", 0)]
    assert ids(store.scan("t", 0)) == [0, 1, 2]
    assert store.scan("t", 0).column_names == ["id", "name", "score"]
    # Every replica rejects it the same way, so the caller may pass over the entry.
    assert store.apply(3, [])
    assert store.applied_index() == 3


def test_duckdb_messages_come_through_unchanged(store: PartitionStore) -> None:
    store.create_table(1, "t", 0, COLUMNS)
    with pytest.raises(OperationRejected) as caught:
        store.update(2, "t", 0, "nope = 1", "true")
    assert caught.value.duckdb_message.startswith("Binder Error")
    with pytest.raises(OperationRejected) as caught:
        store.insert(2, "t", 0, pa.table({"id": ["not a number"]}))
    assert caught.value.duckdb_message.startswith("Conversion Error")
    with pytest.raises(OperationRejected) as caught:
        store.create_table(2, "t", 0, COLUMNS)
    assert "already exists" in str(caught.value)
    with pytest.raises(OperationRejected):
        store.create_table(2, "t", -1, COLUMNS)
    assert store.applied_index() == 1


def test_a_snapshot_keeps_its_state_while_applies_continue(store: PartitionStore) -> None:
    store.apply(1, [CreateTable("t", 0, COLUMNS), CreateTable("t", 1, COLUMNS)])
    store.apply(2, [Insert("t", 0, rows(range(5))), Insert("t", 1, rows(range(5, 10)))])
    with store.read_at(2) as snapshot:
        # One statement moves rows across partitions: a reader sees before or after, whole.
        store.apply(3, [Delete("t", 0, "id < 3"), Insert("t", 1, rows(range(0, 3)))])
        store.apply(4, [AddColumn("t", "extra INTEGER"), DropTable("t")])
        assert snapshot.applied_index == 2
        assert ids(snapshot.scan("t", 0)) == [0, 1, 2, 3, 4]
        assert ids(snapshot.scan("t", 1)) == [5, 6, 7, 8, 9]
        both = snapshot.query(
            f"SELECT count(*) AS n FROM (SELECT id FROM {partition_table_sql('t', 0)} "
            f"UNION ALL SELECT id FROM {partition_table_sql('t', 1)})"
        )
        assert both.to_pylist() == [{"n": 10}]
    assert store.partitions() == []
    with pytest.raises(StoreClosed):
        snapshot.scan("t", 0)


def test_a_query_reads_its_inputs_by_name_only_while_it_runs(store: PartitionStore) -> None:
    store.apply(1, [CreateTable("t", 0, COLUMNS), Insert("t", 0, rows(range(10)))])
    keys = pa.table({"k": pa.array([2, 3, 5, 7, 11], pa.int64())})
    wanted = f"SELECT id FROM {partition_table_sql('t', 0)} WHERE id IN (SELECT k FROM keys_0)"
    with store.read_at(1) as snapshot:
        assert ids(snapshot.query(wanted + " ORDER BY id", {"keys_0": keys})) == [2, 3, 5, 7]
        both = snapshot.query(
            "SELECT count(*) AS n FROM keys_0, keys_1", {"keys_0": keys, "keys_1": keys}
        )
        assert both.to_pylist() == [{"n": 25}]
        with pytest.raises(OperationRejected, match="keys_0"):  # gone once the query ran
            snapshot.query("SELECT * FROM keys_0")
        # A query that fails while binding leaves nothing registered either.
        with pytest.raises(OperationRejected, match="nope"):
            snapshot.query("SELECT nope FROM keys_0", {"keys_0": keys})
        with pytest.raises(OperationRejected, match="keys_0"):
            snapshot.query("SELECT * FROM keys_0")
        # Without inputs a query is as before; the snapshot still serves.
        assert ids(snapshot.scan("t", 0)) == list(range(10))
        assert snapshot.query("SELECT 1 AS one", {}).to_pylist() == [{"one": 1}]


def test_a_query_that_aborts_with_inputs_raises_its_own_error(store: PartitionStore) -> None:
    """A failure while running aborts the snapshot's transaction: DuckDB's error comes out,
    not the one unregistering inside the aborted transaction would give."""
    store.apply(1, [CreateTable("t", 0, COLUMNS), Insert("t", 0, rows(range(3)))])
    keys = pa.table({"k": ["a", "x"]})
    with store.read_at(1) as snapshot:
        with pytest.raises(OperationRejected, match="Conversion Error"):
            snapshot.query("SELECT k::INTEGER FROM keys_0", {"keys_0": keys})


def test_reads_run_without_partial_aggregate_pushdown(store: PartitionStore) -> None:
    """It pre-aggregated half of TPC-H's orders by key below q12's join (5x slower)."""
    store.apply(1, [])
    with store.read_at(1) as snapshot:
        setting = snapshot.query("SELECT current_setting('disabled_optimizers') AS s")
    assert setting.to_pylist() == [{"s": "partial_aggregate_pushdown"}]


def test_read_at_refuses_an_index_other_than_the_applied_one(store: PartitionStore) -> None:
    store.apply(1, [])
    with pytest.raises(SnapshotUnavailable):
        store.read_at(2)
    with pytest.raises(SnapshotUnavailable):
        store.read_at(0)


def test_open_snapshots_are_bounded_and_closed_with_the_store(path: Path) -> None:
    store = PartitionStore.open(path, PartitionStoreConfig(snapshots_open_max=2))
    first, _second = store.snapshot(), store.snapshot()
    with pytest.raises(TooManySnapshots):
        store.snapshot()
    first.close()
    store.snapshot()
    store.close()
    with pytest.raises(StoreClosed):
        store.applied_index()
    with pytest.raises(StoreClosed):
        first.scan("t", 0)


def test_export_then_import_replaces_the_partition(tmp_path: Path) -> None:
    with PartitionStore.open(tmp_path / "live.duckdb") as live:
        live.create_table(1, "t", 4, COLUMNS)
        live.insert(2, "t", 4, rows(range(1000)))
        live.delete(3, "t", 4, "id % 7 = 0")
        exported = live.export_partition("t", 4)
        expected = live.scan("t", 4, "ORDER BY id")
    assert exported.schema.metadata[b"dcluster.applied_index"] == b"3"
    with PartitionStore.open(tmp_path / "behind.duckdb") as behind:
        behind.create_table(1, "t", 4, COLUMNS)
        behind.insert(2, "t", 4, rows(range(5), tag="stale"))
        assert behind.import_partition(3, "t", 4, exported)
        assert behind.scan("t", 4, "ORDER BY id").equals(expected)
        # A partition new to this worker: create and fill it in one entry.
        behind.apply(4, [CreateTable("t", 9, COLUMNS), ImportPartition("t", 9, exported)])
        assert behind.scan("t", 9, "ORDER BY id").equals(expected)


TYPES_COLUMNS = (
    "i TINYINT, s SMALLINT, n INTEGER, b BIGINT, h HUGEINT, u UBIGINT, f REAL, d DOUBLE, "
    "dec DECIMAL(18, 4), big DECIMAL(38, 10), ok BOOLEAN, txt VARCHAR, raw BLOB, day DATE, "
    "tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ, iv INTERVAL, id UUID, list INTEGER[], "
    "st STRUCT(a INTEGER, b VARCHAR), m MAP(VARCHAR, INTEGER), e ENUM('red', 'green')"
)
TYPES_VALUES = """
(-1, -300, 70000, 9000000000, 170141183460469231731687303715884105727, 18446744073709551615,
 1.5, -2.25, 12345678901234.5678, -1234567890123456789012345678.0123456789, true,
 'héllo wörld 🌍 日本語 ''quoted''', '\\x00\\xFF'::BLOB, DATE '1970-01-01', TIME '23:59:59.999999',
 TIMESTAMP '2024-02-29 12:34:56.789012', TIMESTAMPTZ '2024-06-01 10:00:00+02',
 INTERVAL '1 month 2 days 3 seconds', '6f1c8a1e-3a5b-4c1d-9e8f-0a1b2c3d4e5f',
 [1, NULL, 3], {'a': 1, 'b': 'ü'}, MAP {'k': 1}, 'green'),
(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(0, 0, 0, 0, 0, 0, 'nan', '-inf', 0, 0, false, '', ''::BLOB, DATE '9999-12-31', TIME '00:00',
 TIMESTAMP '1900-01-01', TIMESTAMPTZ '1969-12-31 23:59:59.5+00', INTERVAL '0 days',
 '00000000-0000-0000-0000-000000000000', [], {'a': NULL, 'b': NULL}, MAP {}, 'red')
"""


def test_common_types_and_nulls_survive_insert_export_and_import(tmp_path: Path) -> None:
    import duckdb

    # The store hands rows out as lossless Arrow (HUGEINT, UUID, TIMETZ keep their types),
    # as coordinators send them; values are compared as DuckDB reads them back.
    source = duckdb.connect(config={"arrow_lossless_conversion": True})
    source.execute(f"CREATE TABLE source ({TYPES_COLUMNS})")
    source.execute(f"INSERT INTO source VALUES {TYPES_VALUES}")
    data = source.sql("SELECT * FROM source").to_arrow_table()
    as_text = "SELECT COLUMNS(*)::VARCHAR FROM {}"  # Python datetimes with a zone need pytz
    expected = source.sql(as_text.format("data")).fetchall()
    with PartitionStore.open(tmp_path / "a.duckdb") as store:
        store.create_table(1, "types", 0, TYPES_COLUMNS)
        store.insert(2, "types", 0, data)
        exported = store.export_partition("types", 0)
        store.create_table(3, "types", 1, TYPES_COLUMNS)
        store.import_partition(4, "types", 1, exported)
        for partition in (0, 1):
            back = store.scan("types", partition)
            assert back.schema.remove_metadata() == data.schema.remove_metadata()
            # repr: NaN is not equal to itself, but its repr is.
            assert source.sql(as_text.format("back")).fetchall() == expected
        found = store.scan("types", 1, "WHERE i = -1")
        values = source.sql(as_text.format("found")).fetchall()[0]
        first = dict(zip(found.column_names, values, strict=True))
    assert first["dec"] == "12345678901234.5678"
    assert first["tz"] == "2024-06-01 08:00:00+00"
    assert first["txt"] == "héllo wörld 🌍 日本語 'quoted'"
    assert first["h"] == str(2**127 - 1)


def test_partition_stats_count_rows_and_bytes(path: Path) -> None:
    with PartitionStore.open(path) as store:
        store.apply(1, [CreateTable("t", 0, COLUMNS), CreateTable("t", 2, COLUMNS)])
        store.apply(2, [Insert("t", 0, rows(range(50_000))), Insert("t", 2, rows(range(10)))])
    with PartitionStore.open(path) as store:  # close checkpointed: the data is in blocks
        stats = store.partition_stats()
    assert [(s.table, s.partition, s.rows) for s in stats] == [("t", 0, 50_000), ("t", 2, 10)]
    assert stats[0].bytes > 0


def test_close_checkpoints_and_reopen_keeps_everything(path: Path) -> None:
    with PartitionStore.open(path) as store:
        store.create_table(1, "t", 0, COLUMNS)
        store.insert(2, "t", 0, rows(range(100)))
    assert not Path(f"{path}.wal").exists()
    with PartitionStore.open(path) as store:
        assert store.applied_index() == 2
        assert ids(store.scan("t", 0)) == list(range(100))
