"""DDL through the coordinator: one command each, CREATE TABLE … AS atomic with its rows,
DuckDB's errors, dcluster's refusals, scripts and unsupported statements."""

from __future__ import annotations

import msgspec
import pytest

from cluster.sql_protocol import CommandKind
from query.coordinator import (
    BindFailed,
    CatalogMoved,
    Coordinator,
    ParseFailed,
    Refused,
    Unsupported,
)
from query.port import CatalogChanged
from storage.catalog import CreateTable, Ddl
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import Pair


def test_create_table_as_commits_table_and_rows_in_one_command(pair: Pair) -> None:
    pair.run("CREATE TABLE src (k INTEGER, v VARCHAR) PARTITION BY HASH(k) PARTITIONS 4")
    pair.run("INSERT INTO src SELECT i % 13, 'v' || i FROM range(300) AS s(i)")
    commits = len(pair.port.log)
    result = pair.run(
        "CREATE TABLE copy PARTITION BY RANGE(k) (5, 10) REPLICAS 2 AS "
        "SELECT k, count(*) AS n, min(v) AS first FROM src GROUP BY k"
    )
    assert result is not None and result.rowcount == 13
    assert len(pair.port.log) == commits + 1
    command = pair.port.log[-1]
    assert command.kind == CommandKind.DDL and command.expected_versions == (("main.src", 2),)
    change = msgspec.msgpack.decode(command.ddl or b"", type=Ddl)
    assert isinstance(change, CreateTable) and change.spec.kind == "range"
    assert change.spec.replicas == 2
    assert [write.table for write in command.writes] == ["main.copy"]
    assert sum(batch.rows for batch in command.writes[0].batches) == 13
    pair.run("SELECT * FROM copy ORDER BY k", ordered=True)
    pair.run("CREATE TABLE copy AS SELECT 1 AS k", fails=True)
    pair.run("CREATE TABLE IF NOT EXISTS copy AS SELECT 1 AS k")
    pair.run("CREATE OR REPLACE TABLE copy AS SELECT k * 2 AS k2, v FROM src WHERE k < 3")
    pair.run("CREATE TABLE empty_copy AS SELECT * FROM src WHERE false")
    pair.run("CREATE TABLE constant PARTITIONS 2 AS SELECT range AS k FROM range(5)")
    assert len(pair.port.log) == commits + 4


def test_alter_table_add_column(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(k)")
    pair.run("INSERT INTO t SELECT i, 'v' || i FROM range(20) AS s(i)")
    pair.run("ALTER TABLE t ADD COLUMN n INTEGER DEFAULT 7")
    pair.run("ALTER TABLE t ADD COLUMN IF NOT EXISTS n INTEGER")
    pair.run("ALTER TABLE t ADD COLUMN n INTEGER", fails=True)
    pair.run("ALTER TABLE t ADD COLUMN label VARCHAR DEFAULT 'x' || 'y'")
    pair.run("INSERT INTO t (k) VALUES (100)")
    pair.run("SELECT * FROM t ORDER BY k", ordered=True)
    commits = len(pair.port.log)
    for volatile in ("random()", "now()", "uuid()", "current_timestamp"):
        with pytest.raises(Refused, match="replicas would differ"):
            pair.coordinator.execute(
                f"ALTER TABLE t ADD COLUMN r VARCHAR DEFAULT CAST({volatile} AS VARCHAR)"
            )
    assert len(pair.port.log) == commits


def test_views_and_drops(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)")
    pair.run("INSERT INTO t SELECT * FROM range(10)")
    pair.run("CREATE VIEW v AS SELECT k * 2 AS doubled FROM t")
    pair.run("CREATE VIEW v AS SELECT 1", fails=True)
    pair.run("CREATE OR REPLACE VIEW v AS SELECT k * 3 AS tripled FROM t WHERE k > 4")
    pair.run("SELECT * FROM v")
    pair.run("DROP VIEW v")
    pair.run("SELECT * FROM v", fails=True)
    pair.run("DROP VIEW v", fails=True)
    pair.run("DROP VIEW IF EXISTS v")
    pair.run("DROP TABLE t")
    pair.run("SELECT * FROM t", fails=True)
    pair.run("DROP TABLE IF EXISTS t")
    pair.run("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(v)")
    pair.run("SELECT * FROM t")


def test_no_op_ddl_commits_nothing(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER) REFERENCE")
    commits = len(pair.port.log)
    pair.run("CREATE TABLE IF NOT EXISTS t (other VARCHAR)")
    pair.run("DROP VIEW IF EXISTS nothing")
    pair.run("DROP TABLE IF EXISTS nothing")
    assert len(pair.port.log) == commits


def test_bind_errors_are_duckdbs(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)")
    for sql in (
        "CREATE TABLE t (k INTEGER)",
        "CREATE TABLE u (k NOTATYPE)",
        "CREATE VIEW w AS SELECT nope FROM t",
        "CREATE TABLE c AS SELECT * FROM nope",
        "ALTER TABLE nope ADD COLUMN x INTEGER",
        "DROP TABLE nope",
    ):
        pair.run(sql, fails=True)
    with pytest.raises(BindFailed) as raised:
        pair.coordinator.execute("DROP TABLE nope")
    assert raised.value.duckdb_error == "CatalogException"


def test_dcluster_clause_errors_are_refusals(coordinator: Coordinator) -> None:
    for sql, message in (
        ("CREATE TABLE t (k INTEGER) PARTITION BY HASH(nope)", "not a column"),
        ("CREATE TABLE t (k INTEGER) REPLICAS 9", "REPLICAS 9"),
        ("CREATE TABLE t (k INTEGER) PARTITION BY RANGE(k) (5, 1)", "strictly increasing"),
        ("CREATE TABLE t (k INTEGER) REFERENCE PARTITIONS 2", "REFERENCE"),
    ):
        with pytest.raises(Refused, match=message):
            coordinator.execute(sql)


def test_concurrent_create_gets_duckdbs_error(port: FakePort) -> None:
    ours = Coordinator(port)
    theirs = Coordinator(port.client())
    ours.execute("SELECT 1")
    theirs.execute("CREATE TABLE same (k INTEGER)")
    # Our catalog is stale: prepare passes and the log refuses the change; planned again on
    # a fresh catalog it fails to bind, with DuckDB's own message.
    with pytest.raises(BindFailed, match='Table with name "same" already exists'):
        ours.execute("CREATE TABLE same (k INTEGER)")
    assert ours.execute("CREATE TABLE IF NOT EXISTS same (k INTEGER)").fetchall() == []

    def create_first(command: object) -> None:
        port.before_commit = None
        theirs.execute("CREATE TABLE raced (k INTEGER)")

    port.before_commit = create_first
    with pytest.raises(BindFailed, match='Table with name "raced" already exists'):
        ours.execute("CREATE TABLE raced (k VARCHAR)")
    ours.close()
    theirs.close()


def test_catalog_changed_every_time_is_a_cluster_error(port: FakePort) -> None:
    ours = Coordinator(port, sleep=lambda _seconds: None)

    def refuse(command: object) -> None:
        raise CatalogChanged("table 'x' already exists")

    port.before_commit = refuse
    with pytest.raises(CatalogMoved) as raised:
        ours.execute("CREATE TABLE x (k INTEGER)")
    assert isinstance(raised.value, CatalogChanged) and "already exists" in str(raised.value)
    ours.close()


def test_unsupported_statements_say_what_they_are(coordinator: Coordinator) -> None:
    for sql in ("BEGIN", "BEGIN TRANSACTION", "COMMIT", "ROLLBACK"):
        with pytest.raises(Unsupported, match=r"is not supported: .* atomic on its own"):
            coordinator.execute(sql)
    for sql, word in (
        ("CREATE SEQUENCE s", "CREATE SEQUENCE"),
        ("EXPLAIN CREATE TABLE x (k INTEGER)", "EXPLAIN"),
        ("CREATE TEMP TABLE t (k INTEGER)", "temporary"),
        ("SET threads = 2", "SET"),
    ):
        with pytest.raises(Unsupported, match=word):
            coordinator.execute(sql)
    with pytest.raises(Refused, match="'strong' or 'stale'"):
        coordinator.execute("SET dcluster_consistency = 'eventual'")
    with pytest.raises(Unsupported, match="parameters"):
        coordinator.execute("CREATE TABLE t (k INTEGER)", [1])


def test_malformed_sql_gets_duckdbs_parser_error(pair: Pair) -> None:
    for sql in (
        "SELEC 1",
        "CREATE TABLE (k INTEGER)",
        "INSERT INTO VALUES (1)",
        "SELECT 'unterminated",
    ):
        pair.run(sql, fails=True)
    with pytest.raises(ParseFailed) as raised:
        pair.coordinator.execute("SELEC 1")
    assert raised.value.duckdb_error == "ParserException"


def test_scripts_run_in_order_and_return_the_last_result(coordinator: Coordinator) -> None:
    result = coordinator.execute_script(
        """
        CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY LIST(k) ((1, 2), (3));  -- a ; in a comment
        INSERT INTO t VALUES (1, 'semi;colon'), (3, $$dollar;quoted$$);
        SELECT v FROM t WHERE k = ? ORDER BY v;
        """,
        [3],
    )
    assert result.fetchall() == [("dollar;quoted",)]
    with pytest.raises(Unsupported, match="no statement"):
        coordinator.execute_script("  -- nothing here\n ; ;")
    with pytest.raises(BindFailed):
        coordinator.execute_script(
            "INSERT INTO t VALUES (2, 'b'); SELECT nope FROM t; INSERT INTO t VALUES (9, 'x')"
        )
    assert coordinator.execute("SELECT count(*) FROM t").fetchall() == [(3,)], (
        "stopped at the error"
    )
