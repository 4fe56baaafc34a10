"""The read path: exact results and Python values, what is scanned, one snapshot per
strong read, stale reads, COPY … TO."""

from __future__ import annotations

import datetime
import decimal
import uuid
from pathlib import Path

import duckdb
import pytest

from query.coordinator import Coordinator
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import Pair

TYPED_TABLE = """CREATE TABLE typed (
    k INTEGER, big HUGEINT, price DECIMAL(12,3), when_day DATE, at_time TIMESTAMP,
    span INTERVAL, id UUID, raw BLOB, tags VARCHAR[], point STRUCT(x INTEGER, y VARCHAR),
    mood ENUM('sad', 'ok', 'happy'), flag BOOLEAN, ratio DOUBLE, clock TIMETZ,
    props MAP(VARCHAR, INTEGER)
) PARTITION BY HASH(k) PARTITIONS 3"""

TYPED_ROWS = """INSERT INTO typed VALUES
    (1, 170141183460469231731687303715884105727, 12.5, '2024-02-29', '2024-02-29 12:34:56.789',
     INTERVAL '1 month 2 days 3 seconds', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00\\xffab',
     ['x', NULL, 'ü'], {'x': 1, 'y': 'why'}, 'happy', true, 0.5, '12:00:00+05:30', MAP {'a': 1}),
    (2, -1, -0.001, NULL, NULL, NULL, NULL, NULL, [], NULL, NULL, NULL, -0.0, NULL, MAP {}),
    (NULL, NULL, NULL, '1970-01-01', '1970-01-01', INTERVAL 0 SECONDS, NULL, '', NULL,
     {'x': NULL, 'y': NULL}, 'sad', false, 1e300, '23:59:59-01', NULL)"""


def test_python_values_and_arrow_are_duckdbs(pair: Pair) -> None:
    pair.run(TYPED_TABLE)
    pair.run(TYPED_ROWS)
    plain = duckdb.connect()
    plain.execute(TYPED_TABLE.split(" PARTITION BY")[0]).fetchall()
    plain.execute(TYPED_ROWS).fetchall()
    for query in (
        "SELECT * FROM typed ORDER BY k NULLS LAST",
        "SELECT k, big - 1 AS smaller, price * 2, tags[1], point.y, mood, props['a'] FROM typed ORDER BY k",
        "SELECT mood, count(*) FROM typed GROUP BY mood ORDER BY mood",
        "SELECT 1 AS a, 2 AS a, 'x'::ENUM('x', 'y') AS e, [1, 2]::INTEGER[2] AS arr",
    ):
        result = pair.run(query, ordered=True)
        assert result is not None, f"DuckDB refused {query}"
        expected = plain.sql(query)
        assert result.fetchall() == expected.fetchall(), query
        assert result.fetchone() == expected.fetchall()[0]
        ours_arrow, theirs_arrow = result.arrow(), expected.to_arrow_table()
        assert ours_arrow is not None and ours_arrow.schema == theirs_arrow.schema, query
        assert ours_arrow.equals(theirs_arrow), query
        assert result.types == [str(t) for t in expected.types]
    row = pair.run("SELECT big, price, id, when_day, at_time, span FROM typed WHERE k = 1")
    assert row is not None
    values = row.fetchall()[0]
    assert values[0] == 2**127 - 1 and values[1] == decimal.Decimal("12.500")
    assert values[2] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert values[3] == datetime.date(2024, 2, 29)
    assert values[4] == datetime.datetime(2024, 2, 29, 12, 34, 56, 789000)
    assert isinstance(values[5], datetime.timedelta) or values[5] is not None


def test_statements_without_rows_return_duckdbs_shapes(pair: Pair) -> None:
    for sql in (
        "CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)",
        "CREATE TABLE IF NOT EXISTS t (k INTEGER)",
        "CREATE VIEW v AS SELECT * FROM t",
        "ALTER TABLE t ADD COLUMN w VARCHAR",
        "DROP VIEW v",
        "DROP VIEW IF EXISTS v",
        "SELECT * FROM t",
        "SELECT count(*) FROM t",
    ):
        result = pair.run(sql)
        assert result is not None and result.rowcount == -1


def test_views_are_expanded_and_only_named_tables_scanned(pair: Pair) -> None:
    pair.run("CREATE TABLE a (k INTEGER, v VARCHAR) PARTITION BY HASH(k)")
    pair.run("CREATE TABLE b (k INTEGER, w VARCHAR) REFERENCE")
    pair.run("CREATE TABLE unrelated (k INTEGER) PARTITION BY HASH(k)")
    pair.run("INSERT INTO a SELECT i, 'a' || i FROM range(20) AS s(i)")
    pair.run("INSERT INTO b SELECT i, 'b' || i FROM range(0, 20, 3) AS s(i)")
    pair.run("CREATE VIEW joined AS SELECT a.k, v, w FROM a JOIN b USING (k)")
    pair.run('CREATE VIEW "Top" AS SELECT * FROM joined WHERE k > 5')
    pair.port.scans.clear()
    pair.run('SELECT * FROM "top" ORDER BY k', ordered=True)
    assert sorted({table for _, table in pair.port.scans}) == ["main.a", "main.b"]
    pair.port.scans.clear()
    pair.run("SELECT count(*) FROM query_table('b')")
    pair.run("SELECT * FROM query('SELECT max(k) FROM a')")
    assert sorted({table for _, table in pair.port.scans}) == ["main.a", "main.b"]
    pair.port.scans.clear()
    pair.run("SELECT 42, 'unrelated' AS name")
    assert pair.port.scans == [] and pair.port.open_barriers() == []


def test_strong_reads_see_one_snapshot_and_stale_reads_need_not(port: FakePort) -> None:
    ours = Coordinator(port)
    mover = Coordinator(port.client())
    ours.execute("CREATE TABLE a (n INTEGER) PARTITION BY HASH(n)")
    ours.execute("CREATE TABLE b (n INTEGER) REFERENCE")
    ours.execute("INSERT INTO a VALUES (100)")
    ours.execute("INSERT INTO b VALUES (0)")
    moves = [0]

    def move_between_scans(index: int, table: str) -> None:
        # After the first table is scanned, move 30 from a to b.
        if table == "main.b" and moves[0] == 0:
            moves[0] += 1
            port.before_scan = None
            mover.execute_script("UPDATE a SET n = n - 30; UPDATE b SET n = n + 30")
            port.before_scan = move_between_scans

    total = "SELECT (SELECT sum(n) FROM a) + (SELECT sum(n) FROM b)"
    port.before_scan = move_between_scans
    assert ours.execute(total).fetchall() == [(100,)]
    assert moves == [1] and port.open_barriers() == []
    moves[0] = 0
    # A new text, so the subquery is answered in a round of its own before b is scanned
    # (run again, a text sends it with b's scan, and the move may fall on either side).
    stale = total + " AS total"
    assert ours.execute(stale, consistency="stale").fetchall() == [(130,)], "a before, b after"
    assert moves == [1]
    port.before_scan = None
    assert ours.execute(total).fetchall() == [(100,)]
    ours.close()
    mover.close()


def test_session_consistency_is_set_by_sql(coordinator: Coordinator, port: FakePort) -> None:
    coordinator.execute("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)")
    result = coordinator.execute("SET dcluster_consistency = 'STALE'")
    assert result.columns == ["Success"] and result.types == ["BOOLEAN"] and len(result) == 0
    assert coordinator.consistency == "stale"
    port.fragment_calls.clear()
    coordinator.execute("SELECT * FROM t")
    assert [index for index, _ in port.fragment_calls] == [0]
    coordinator.execute("SET SESSION dcluster_consistency TO strong")
    coordinator.execute("SELECT * FROM t")
    assert port.fragment_calls[-1][0] > 0


def test_a_table_created_by_another_client_is_found(port: FakePort) -> None:
    ours = Coordinator(port)
    theirs = Coordinator(port.client())
    ours.execute("SELECT 1")  # caches a catalog with no tables
    theirs.execute("CREATE TABLE fresh (k INTEGER) PARTITION BY HASH(k)")
    theirs.execute("INSERT INTO fresh VALUES (1), (2)")
    assert ours.execute("SELECT count(*) FROM fresh", consistency="stale").fetchall() == [(2,)]
    assert ours.execute("INSERT INTO fresh VALUES (3)").fetchall() == [(1,)]
    ours.close()
    theirs.close()


def test_a_read_after_another_clients_ddl_is_still_planned(port: FakePort) -> None:
    """The barrier's catalog version tells the session its view is behind: it fetches a
    fresh one and plans against it, rather than gathering whole tables."""
    ours = Coordinator(port)
    theirs = Coordinator(port.client())
    ours.execute("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k) PARTITIONS 2")
    ours.execute("INSERT INTO t VALUES (1), (2)")
    assert ours.execute("SELECT sum(k) FROM t").fetchall() == [(3,)]
    theirs.execute("ALTER TABLE t ADD COLUMN v INTEGER DEFAULT 7")
    theirs.execute("INSERT INTO t VALUES (3, 1)")
    port.scans.clear()
    port.fragment_calls.clear()
    assert ours.execute("SELECT sum(k) FROM t").fetchall() == [(6,)]
    assert port.scans == [] and len(port.fragment_calls) == 1  # two-phase, not gathered
    ours.close()
    theirs.close()


def test_copy_to_writes_what_duckdb_writes(pair: Pair, folder: Path) -> None:
    pair.run("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(k) PARTITIONS 2")
    pair.run("INSERT INTO t SELECT i, 'v' || i FROM range(10) AS s(i)")
    ours, theirs = folder / "ours.csv", folder / "theirs.csv"
    result = pair.coordinator.execute(f"COPY (SELECT * FROM t ORDER BY k) TO '{ours}' (HEADER)")
    assert result.fetchall() == [(10,)] and result.rowcount == 10
    pair.reference.execute(f"COPY (SELECT * FROM t ORDER BY k) TO '{theirs}' (HEADER)").fetchall()
    assert ours.read_text() == theirs.read_text()
    parquet = folder / "t.parquet"
    assert pair.coordinator.execute(f"COPY t TO '{parquet}' (FORMAT parquet)").rowcount == 10
    with duckdb.connect() as check:
        assert check.execute(f"SELECT count(*) FROM '{parquet}'").fetchall() == [(10,)]


def test_parameters_and_bad_queries_match_duckdb(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY LIST(k) ((1, 2), (3, NULL))")
    pair.run("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c'), (NULL, 'n')")
    pair.run("SELECT * FROM t WHERE k = ? OR v = ?", [2, "n"])
    pair.run("SELECT * FROM t WHERE k = $key", {"key": 3})
    for bad in (
        "SELECT * FROM nope",
        "SELECT nope FROM t",
        "SELECT * FROM t WHERE k = ?",
        "SELEC 1",
        "SELECT * FROM t WHERE",
        "SELECT k::DATE FROM t",
        "SELECT 1/0, 'a' + 1",
    ):
        pair.run(bad, fails=True)


@pytest.mark.parametrize("consistency", ["strong", "stale"])
def test_reads_release_their_barriers(pair: Pair, consistency: str) -> None:
    pair.run("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)")
    pair.coordinator.execute("SELECT * FROM t", consistency=consistency)
    with pytest.raises(Exception, match="Binder Error"):
        pair.coordinator.execute("SELECT nope FROM t", consistency=consistency)
    assert pair.port.open_barriers() == []
