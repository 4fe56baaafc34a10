"""The shadow catalog (storage/catalog.py): binding, DDL changes, deterministic snapshots."""

from __future__ import annotations

import duckdb
import pytest

from storage import ddl
from storage.catalog import (
    AlterTable,
    BindError,
    Catalog,
    CatalogConflict,
    CreateTable,
    DropTable,
    UnknownTable,
)

SCRIPT = [
    "CREATE TABLE orders (id BIGINT, customer VARCHAR, placed DATE) PARTITION BY HASH(customer)",
    "CREATE TABLE regions (code VARCHAR, name VARCHAR) REFERENCE",
    "CREATE TABLE events (day DATE, kind VARCHAR) PARTITION BY RANGE(day) ('2024-01-01')",
    "CREATE VIEW recent AS SELECT * FROM orders WHERE placed > DATE '2024-01-01'",
    "ALTER TABLE orders ADD COLUMN total DECIMAL(12, 2)",
    "CREATE OR REPLACE VIEW recent AS SELECT id, total FROM orders",
    "CREATE VIEW big AS SELECT * FROM recent WHERE total > 100",
    "DROP TABLE events",
    "CREATE TABLE copy_of PARTITIONS 2 AS SELECT id, customer FROM orders",
]


def build(script: list[str] = SCRIPT, worker_count: int = 3) -> Catalog:
    catalog = Catalog()
    for sql in script:
        change = catalog.prepare(sql, worker_count)
        assert change is not None, sql
        catalog.apply_ddl(change)
    return catalog


def test_script_builds_the_expected_tables() -> None:
    catalog = build()
    assert [spec.name for spec in catalog.tables()] == ["orders", "regions", "copy_of"]
    orders = catalog.table("ORDERS")
    assert orders.key == "customer" and [c.name for c in orders.columns][-1] == "total"
    assert "total DECIMAL(12,2)" in orders.ddl
    assert catalog.table("regions").reference
    assert catalog.views() == ["recent", "big"]
    with pytest.raises(UnknownTable):
        catalog.table("events")


def test_create_table_as_binds_without_running_its_query(tmp_path: object) -> None:
    catalog = build(SCRIPT[:1])
    change = catalog.prepare(
        "CREATE TABLE c AS SELECT count(*) AS n, customer FROM orders GROUP BY ALL", 3
    )
    assert isinstance(change, CreateTable)
    assert [(c.name, c.type) for c in change.spec.columns] == [
        ("n", "BIGINT"),
        ("customer", "VARCHAR"),
    ]
    assert change.populate_sql is not None and change.populate_sql.startswith("SELECT count")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT o.id, r.name FROM orders o JOIN regions r ON r.code = o.customer",
        "INSERT INTO orders VALUES (1, 'a', DATE '2024-01-01', 3.5)",
        "INSERT INTO orders SELECT * FROM orders",
        "UPDATE orders SET total = total + 1 WHERE id = 3",
        "DELETE FROM orders WHERE customer = 'x'",
        "COPY orders TO '/nonexistent-dir/never-written.csv'",
        "SELECT * FROM big",
        "DROP TABLE regions",
        "ALTER TABLE regions ADD COLUMN extra INT",
    ],
)
def test_good_statements_bind_and_change_nothing(sql: str) -> None:
    catalog = build()
    before = catalog.snapshot()
    catalog.bind(sql)
    assert catalog.snapshot() == before
    assert [s.name for s in catalog.tables()] == ["orders", "regions", "copy_of"]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nope FROM orders",
        "SELECT * FROM missing_table",
        "INSERT INTO orders VALUES (1)",
        "UPDATE orders SET nope = 1",
        "DELETE FROM regions WHERE\nnope = 1",
        "DROP TABLE missing_table",
        "ALTER TABLE orders ADD COLUMN id INT",
        "CREATE TABLE orders (a INT)",
        "CREATE VIEW v AS SELECT nope FROM orders",
        "CREATE TABLE c AS SELECT nope FROM orders",
    ],
)
def test_bad_statements_get_duckdbs_message(sql: str) -> None:
    catalog = build()
    with pytest.raises(BindError) as ours:
        catalog.bind(sql)
    if "CREATE TABLE c AS" in sql:
        return  # bound as CREATE … AS SELECT * FROM (…) LIMIT 0: same error, other LINE text
    reference = duckdb.connect()
    for statement in SCRIPT:
        reference.execute(ddl.parse(statement).sql).fetchall()
    with pytest.raises(duckdb.Error) as direct:
        reference.execute(sql).fetchall()
    assert str(ours.value) == str(direct.value)
    assert ours.value.duckdb_error == type(direct.value).__name__


def test_dcluster_clause_errors_pass_through_bind() -> None:
    with pytest.raises(ddl.UnknownKeyColumn):
        build().bind("CREATE TABLE t (a INT) PARTITION BY HASH(b)")


def test_no_op_ddl_prepares_to_nothing() -> None:
    catalog = build()
    assert catalog.prepare("CREATE TABLE IF NOT EXISTS orders (a INT)", 3) is None
    assert catalog.prepare("DROP TABLE IF EXISTS nothing_here", 3) is None
    assert catalog.prepare("CREATE VIEW IF NOT EXISTS big AS SELECT 1", 3) is None


def test_conflicting_changes_raise_and_change_nothing() -> None:
    catalog = build()
    create = catalog.prepare("CREATE TABLE fresh (a INT)", 3)
    assert create is not None
    catalog.apply_ddl(create)
    before = catalog.snapshot()
    with pytest.raises(CatalogConflict):
        catalog.apply_ddl(create)
    with pytest.raises(CatalogConflict):
        catalog.apply_ddl(DropTable("main", "never_was"))
    with pytest.raises(CatalogConflict):
        catalog.apply_ddl(AlterTable("main", "fresh", "ALTER TABLE fresh ADD COLUMN a INT"))
    assert catalog.snapshot() == before
    catalog.apply_ddl(DropTable("main", "never_was", if_exists=True))
    assert catalog.snapshot() == before


def test_or_replace_replaces_the_spec() -> None:
    catalog = build()
    change = catalog.prepare("CREATE OR REPLACE TABLE regions (code INT) PARTITIONS 5", 3)
    assert change is not None
    catalog.apply_ddl(change)
    assert catalog.table("regions").partitions == 5
    assert [s.name for s in catalog.tables()] == ["orders", "regions", "copy_of"]


def test_snapshots_are_deterministic_and_restore_exactly() -> None:
    first, second = build(), build()
    assert first.snapshot() == second.snapshot()
    restored = Catalog.restore(first.snapshot())
    assert restored.snapshot() == first.snapshot()
    assert restored.tables() == first.tables()
    restored.bind("SELECT * FROM big")
    for catalog in (first, restored):
        change = catalog.prepare("CREATE TABLE later (x INT)", 3)
        assert change is not None
        catalog.apply_ddl(change)
    assert restored.snapshot() == first.snapshot()


def test_a_different_history_gives_a_different_snapshot() -> None:
    assert build(SCRIPT[:3]).snapshot() != build(SCRIPT[:2]).snapshot()
