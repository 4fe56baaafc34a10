"""The write path: rows evaluated once, constraints over whole tables, refusals that write
nothing, conflicts retried, bounded staging."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import query._writes
from cluster.sql_protocol import CommandKind
from query._reads import WorkDatabase, tokens
from query._writes import find_target, plan_write
from query.coordinator import (
    WRITE_ATTEMPTS_MAX,
    Coordinator,
    ExecutionFailed,
    NotPlaceable,
    SqlError,
    StageRefused,
    Unsupported,
    WriteConflict,
)
from query.port import Command, Conflict, WriteRefused
from storage import ddl
from storage.catalog import Catalog
from storage.placement import partition_expression
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import Pair


def texts(coordinator: Coordinator, sql: str) -> list[tuple[str | None, ...]]:
    """Rows as DuckDB's text of each value, sorted."""
    casted = coordinator.execute(f"SELECT CAST(COLUMNS(*) AS VARCHAR) FROM ({sql})")
    return sorted(casted.fetchall(), key=lambda row: [(v is None, v or "") for v in row])


def test_volatile_values_are_evaluated_once(coordinator: Coordinator, port: FakePort) -> None:
    coordinator.execute(
        "CREATE TABLE t (k INTEGER, r DOUBLE, ts TIMESTAMPTZ, id UUID) "
        "PARTITION BY HASH(k) PARTITIONS 4 REPLICAS 3"
    )
    result = coordinator.execute(
        "INSERT INTO t SELECT i, random(), now(), uuid() FROM range(60) AS s(i)"
    )
    assert result.fetchall() == [(60,)] and result.rowcount == 60
    first = texts(coordinator, "SELECT * FROM t")
    assert first == texts(coordinator, "SELECT * FROM t"), "stored values, not re-evaluated"
    assert len({row[2] for row in first}) == 1, "now() is one value per statement"
    assert len({row[3] for row in first}) == 60, "uuid() once per row"
    assert all(0 <= float(row[1] or -1) < 1 for row in first)
    assert sum(p.num_rows for p in port.partitions("main.t")) == 60
    coordinator.execute("UPDATE t SET r = random() WHERE k % 2 = 0")
    second = texts(coordinator, "SELECT * FROM t")
    assert second == texts(coordinator, "SELECT * FROM t")
    changed = {row[0] for row in set(second) - set(first)}
    assert changed and all(int(k or 0) % 2 == 0 for k in changed)


def test_primary_key_is_checked_over_the_whole_table(pair: Pair) -> None:
    pair.run("CREATE TABLE t (id INTEGER PRIMARY KEY, v VARCHAR) PARTITION BY HASH(v) PARTITIONS 8")
    pair.run("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    spec = pair.port.spec("main.t")
    where_a, where_zz = (partition_expression(spec, value) for value in ("'a'", "'zz'"))
    placed = pair.text.sql(f"SELECT {where_a}, {where_zz}").fetchall()[0]
    assert placed[0] != placed[1], "the colliding rows must live in different partitions"
    commits = len(pair.port.log)
    pair.run("INSERT INTO t VALUES (1, 'zz')", fails=True)  # DuckDB's error, word for word
    pair.run("UPDATE t SET id = 1 WHERE v = 'b'", fails=True)
    pair.run("INSERT INTO t VALUES (3, 'c'), (3, 'zz')", fails=True)
    assert len(pair.port.log) == commits, "refused statements commit nothing"


def test_constraint_and_cast_errors_are_duckdbs(pair: Pair) -> None:
    pair.run(
        "CREATE TABLE t (k INTEGER NOT NULL, v VARCHAR CHECK (length(v) < 4), d DATE) "
        "PARTITION BY RANGE(k) (10, 20)"
    )
    pair.run("INSERT INTO t VALUES (1, 'ab', '2024-01-02'), (15, 'x', NULL), (25, NULL, NULL)")
    for sql in (
        "INSERT INTO t VALUES (NULL, 'a', NULL)",
        "INSERT INTO t VALUES (3, 'abcdef', NULL)",
        "INSERT INTO t VALUES ('three', 'a', NULL)",
        "INSERT INTO t VALUES (3, 'a', 'not a date')",
        "UPDATE t SET v = v || 'long' WHERE k > 10",
        "UPDATE t SET k = NULL",
        "INSERT INTO t VALUES (1, 2)",
        "INSERT INTO nope VALUES (1)",
        "UPDATE nope SET a = 1",
        "DELETE FROM nope",
        "UPDATE t SET nope = 1",
    ):
        pair.run(sql, fails=True)
    pair.run("SELECT * FROM t")


def test_write_refused_passes_through_and_writes_nothing(
    coordinator: Coordinator, port: FakePort
) -> None:
    coordinator.execute("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(k)")
    coordinator.execute("INSERT INTO t VALUES (1, 'a')")
    commits = len(port.log)
    port.refuse_stages = 1
    with pytest.raises(StageRefused) as raised:
        coordinator.execute("UPDATE t SET v = 'b'")
    assert isinstance(raised.value, WriteRefused) and isinstance(raised.value, SqlError)
    assert "nothing was written" in str(raised.value)
    assert len(port.log) == commits
    assert coordinator.execute("SELECT * FROM t").fetchall() == [(1, "a")]


def test_conflict_is_retried_then_succeeds(port: FakePort, sleeps: list[float]) -> None:
    ours = Coordinator(port, rng=random.Random(1), sleep=sleeps.append)
    theirs = Coordinator(port.client())
    ours.execute(
        "CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER) PARTITION BY HASH(id)"
    )
    ours.execute("INSERT INTO acct VALUES (1, 100), (2, 0)")
    competing = ["UPDATE acct SET balance = balance - 30 WHERE id = 1"]

    def land_competing_write(command: Command) -> None:
        if competing and command.kind == CommandKind.WRITE:
            sql = competing.pop()
            port.before_commit = None
            theirs.execute(sql)
            port.before_commit = land_competing_write

    port.before_commit = land_competing_write
    result = ours.execute("UPDATE acct SET balance = balance * 2")
    port.before_commit = None
    assert result.fetchall() == [(2,)]
    # Serial order: theirs (100 - 30), then ours, re-run on what theirs left.
    assert ours.execute("SELECT * FROM acct ORDER BY id").fetchall() == [(1, 140), (2, 0)]
    assert len(sleeps) == 1
    ours.close()
    theirs.close()


def test_conflict_after_every_attempt_raises_write_conflict(
    port: FakePort, sleeps: list[float]
) -> None:
    ours = Coordinator(port, rng=random.Random(1), sleep=sleeps.append)
    theirs = Coordinator(port.client())
    ours.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, n INTEGER) REFERENCE")
    ours.execute("INSERT INTO c VALUES (1, 0)")
    commits = len(port.log)

    def land_competing_write(command: Command) -> None:
        port.before_commit = None
        theirs.execute("UPDATE c SET n = n + 1")
        port.before_commit = land_competing_write

    port.before_commit = land_competing_write
    with pytest.raises(WriteConflict) as raised:
        ours.execute("UPDATE c SET n = n + 100")
    port.before_commit = None
    assert isinstance(raised.value, Conflict) and "nothing was written" in str(raised.value)
    assert len(port.log) == commits + WRITE_ATTEMPTS_MAX, "only the competing writes landed"
    assert ours.execute("SELECT n FROM c").fetchall() == [(WRITE_ATTEMPTS_MAX,)]
    assert len(sleeps) == WRITE_ATTEMPTS_MAX - 1
    ceilings = [min(0.25, 0.002 * 2**n) for n in range(len(sleeps))]
    assert all(0 <= slept <= ceiling for slept, ceiling in zip(sleeps, ceilings, strict=True))
    ours.close()
    theirs.close()


def test_blind_insert_reads_nothing_and_replans_on_a_new_schema(port: FakePort) -> None:
    ours = Coordinator(port)
    theirs = Coordinator(port.client())
    ours.execute("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(k)")
    ours.execute("INSERT INTO t VALUES (1, 'a')")
    command = port.log[-1]
    assert command.expected_versions == () and command.expected_schemas == (("main.t", 1),)
    assert port.scans == [] and port.open_barriers() == []
    theirs.execute("ALTER TABLE t ADD COLUMN w INTEGER DEFAULT 5")
    # Our cached catalog still has two columns: the commit is refused, re-planned, applied.
    assert ours.execute("INSERT INTO t (k, v) VALUES (2, 'b')").fetchall() == [(1,)]
    assert ours.execute("SELECT * FROM t ORDER BY k").fetchall() == [(1, "a", 5), (2, "b", 5)]
    ours.close()
    theirs.close()


def test_identical_rows_are_written_exactly(pair: Pair) -> None:
    """Deletes ship as "every row equal to one of these": when some copies of a row stay,
    they are deleted and shipped again, so the table ends as DuckDB left it."""
    pair.run("CREATE TABLE t (k INTEGER, flag BOOLEAN) PARTITION BY HASH(k)")
    pair.run(
        "INSERT INTO t VALUES (1, true), (1, true), (1, true), (1, false), (2, NULL), (2, NULL)"
    )
    pair.run("DELETE FROM t WHERE rowid = (SELECT min(rowid) FROM t WHERE flag)")
    command = pair.port.log[-1]
    layout = [(batch.delete, batch.rows) for batch in command.writes[0].batches]
    assert layout == [(True, 1), (False, 2)], "one distinct row deleted, two copies back"
    assert pair.table_rows("main.t") == [
        ("1", "false"),
        ("1", "true"),
        ("1", "true"),
        ("2", None),
        ("2", None),
    ]
    # Two groups of identical rows trading places: the net difference alone is wrong.
    pair.run("UPDATE t SET flag = NOT flag WHERE k = 1")
    pair.run("UPDATE t SET flag = true WHERE rowid IN (SELECT rowid FROM t WHERE k = 2 LIMIT 1)")
    pair.run("DELETE FROM t WHERE k = 1 AND NOT flag")
    pair.run("SELECT * FROM t")


def test_writes_are_staged_in_bounded_batches_deletes_first(
    coordinator: Coordinator, port: FakePort, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(query._writes, "ROWS_PER_BATCH_MAX", 100)
    coordinator.execute("CREATE TABLE t (k INTEGER, v INTEGER) PARTITION BY RANGE(k) (500)")
    coordinator.execute("INSERT INTO t SELECT i, 0 FROM range(1000) AS s(i)")
    batches = port.log[-1].writes[0].batches
    assert [b.rows for b in batches] == [100] * 10
    assert [b.partition for b in batches] == [0] * 5 + [1] * 5
    coordinator.execute("UPDATE t SET v = 1 WHERE k >= 250")
    batches = port.log[-1].writes[0].batches
    layout = [(b.partition, b.delete, b.rows) for b in batches]
    expected = [(0, True, 100)] * 2 + [(0, True, 50)] + [(0, False, 100)] * 2 + [(0, False, 50)]
    expected += [(1, True, 100)] * 5 + [(1, False, 100)] * 5
    assert layout == expected
    assert coordinator.execute("SELECT v, count(*) FROM t GROUP BY v ORDER BY v").fetchall() == [
        (0, 250),
        (1, 750),
    ]


def test_a_key_in_no_list_partition_is_refused(coordinator: Coordinator, port: FakePort) -> None:
    coordinator.execute("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY LIST(k) ((1, 2), (3))")
    commits = len(port.log)
    with pytest.raises(NotPlaceable, match="key 9 of table t is in no LIST partition"):
        coordinator.execute("INSERT INTO t VALUES (1, 'a'), (9, 'b')")
    assert len(port.log) == commits


def test_a_write_that_changes_nothing_commits_nothing(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER PRIMARY KEY, v VARCHAR) PARTITION BY HASH(k)")
    pair.run("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    commits = len(pair.port.log)
    pair.run("UPDATE t SET v = 'x' WHERE k > 10")
    pair.run("UPDATE t SET v = v")
    pair.run("DELETE FROM t WHERE v IS NULL")
    pair.run("INSERT INTO t VALUES (1, 'q') ON CONFLICT DO NOTHING")
    assert len(pair.port.log) == commits
    assert pair.port.open_barriers() == []


def test_upserts_returning_and_parameters_match_duckdb(pair: Pair) -> None:
    pair.run(
        "CREATE TABLE t (k INTEGER PRIMARY KEY, v VARCHAR, n INTEGER DEFAULT 0) PARTITION BY HASH(v)"
    )
    pair.run("INSERT INTO t (k, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    pair.run(
        "INSERT INTO t VALUES (1, 'moved', 5), (4, 'd', 1) ON CONFLICT DO UPDATE SET v = excluded.v, n = t.n + excluded.n"
    )
    pair.run("INSERT OR REPLACE INTO t VALUES (2, 'replaced', 9)")
    pair.run("INSERT OR IGNORE INTO t VALUES (2, 'ignored', 9), (5, 'e', 0)")
    result = pair.run(
        "INSERT INTO t VALUES (6, 'f', 1), (7, 'g', 2) RETURNING k, v || '!' AS shout"
    )
    assert result is not None and result.rowcount == -1 and result.columns == ["k", "shout"]
    result = pair.run("DELETE FROM t WHERE n > ? RETURNING *", [4])
    assert result is not None and len(result) == 2
    result = pair.run("UPDATE t SET n = $n WHERE k = $k", {"n": 42, "k": 3})
    assert result is not None and result.rowcount == 1
    pair.run("INSERT INTO t SELECT k + 100, v, n FROM t WHERE n < 42")
    pair.run("SELECT * FROM t ORDER BY k", ordered=True)


def test_copy_from_files_matches_duckdb(pair: Pair, folder: Path) -> None:
    pair.run(
        "CREATE TABLE t (k INTEGER, name VARCHAR, price DECIMAL(10,2), tags VARCHAR[]) PARTITION BY HASH(k) PARTITIONS 3"
    )
    parquet = folder / "rows.parquet"
    csv = folder / "rows.csv"
    pair.reference.execute(
        f"COPY (SELECT i AS k, 'név ' || i AS name, i * 1.25 AS price, ['a', i::VARCHAR] AS tags "
        f"FROM range(500) AS s(i)) TO '{parquet}' (FORMAT parquet)"
    ).fetchall()
    csv.write_text('k,name,price\n1,one,1.50\n2,"two, too",\n,none,3\n', encoding="utf-8")
    result = pair.run(f"COPY t FROM '{parquet}' (FORMAT parquet)")
    assert result is not None and result.rowcount == 500
    pair.run(f"COPY t (k, name, price) FROM '{csv}' (HEADER)")
    pair.run(f"COPY t FROM '{folder / 'missing.csv'}'", fails=True)
    pair.run("SELECT count(*), sum(price), count(tags) FROM t")


def test_update_moves_rows_across_partitions(pair: Pair) -> None:
    pair.run("CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY RANGE(k) (10, 20, 30)")
    pair.run("INSERT INTO t SELECT i % 40, 'v' || i FROM range(200) AS s(i)")
    pair.run("UPDATE t SET k = k + 10 WHERE k < 30")
    pair.run("UPDATE t SET k = NULL WHERE k = 35")
    pair.run("DELETE FROM t WHERE k >= 30 AND v LIKE '%1'")
    held = [rows.num_rows for rows in pair.port.partitions("main.t")]
    assert held[0] == 10, "keys below 10 all moved up; partition 0 holds the NULL keys"
    assert sum(held) == pair.reference.sql("SELECT count(*) FROM t").fetchall()[0][0]


def test_write_errors_mention_nothing_written_only_when_true(
    coordinator: Coordinator, port: FakePort
) -> None:
    coordinator.execute("CREATE TABLE t (k INTEGER PRIMARY KEY) PARTITION BY HASH(k)")
    coordinator.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ExecutionFailed) as raised:
        coordinator.execute("INSERT INTO t VALUES (2), (1)")
    assert raised.value.duckdb_error == "ConstraintException"
    assert coordinator.execute("SELECT * FROM t").fetchall() == [(1,)]


def test_write_forms_find_their_target(pair: Pair) -> None:
    pair.run('CREATE TABLE "Mixed" (k INTEGER, v VARCHAR) PARTITION BY HASH(k)')
    pair.run("CREATE TABLE u (k INTEGER, w VARCHAR) REFERENCE")
    pair.run("INSERT INTO u SELECT i, 'w' || i FROM range(6) AS s(i)")
    pair.run("INSERT INTO main.mixed SELECT k, w FROM u")
    pair.run('INSERT INTO "MIXED" BY NAME SELECT w AS v, k + 10 AS k FROM u')
    pair.run("WITH fresh AS (SELECT 100 AS k) INSERT INTO Mixed SELECT k, 'cte' FROM fresh")
    pair.run("UPDATE mixed AS m SET v = u.w || '!' FROM u WHERE m.k = u.k + 10")
    pair.run("DELETE FROM mixed USING u WHERE mixed.k = u.k AND u.w > 'w3'")
    pair.run("INSERT INTO mixed VALUES ((SELECT max(k) FROM mixed) + 1, 'self')")
    pair.run("INSERT INTO mixed DEFAULT VALUES")
    pair.run("SELECT * FROM MIXED ORDER BY k NULLS FIRST, v", ordered=True)


def test_generated_columns_are_computed_not_shipped(pair: Pair) -> None:
    pair.run(
        "CREATE TABLE g (k INTEGER, twice INTEGER GENERATED ALWAYS AS (k * 2), v VARCHAR) "
        "PARTITION BY HASH(k)"
    )
    pair.run("INSERT INTO g (k, v) SELECT i, 'v' || i FROM range(10) AS s(i)")
    pair.run("UPDATE g SET k = k + 100 WHERE k % 3 = 0")
    pair.run("SELECT * FROM g")
    pair.run("SELECT twice FROM g WHERE k > 100 ORDER BY twice", ordered=True)
    assert pair.port.partitions("main.g")[0].column_names == ["k", "v"]


def test_foreign_keys_read_the_tables_duckdb_checks() -> None:
    catalog = Catalog()
    for sql in (
        "CREATE TABLE parent (id INTEGER PRIMARY KEY) PARTITION BY HASH(id)",
        "CREATE TABLE child (id INTEGER, parent_id INTEGER REFERENCES parent(id)) PARTITION BY HASH(id)",
        "CREATE TABLE other (id INTEGER) PARTITION BY HASH(id)",
    ):
        change = catalog.prepare(sql, 3)
        assert change is not None
        catalog.apply_ddl(change)
    work = WorkDatabase()
    work.prepare(catalog)

    def reads(sql: str) -> tuple[str, ...]:
        words = tokens(sql)
        target = find_target(words)
        assert target is not None
        plan = plan_write(work, ddl.parse(sql).kind, words, target)
        assert plan is not None
        return plan.reads

    assert reads("INSERT INTO child VALUES (1, 1)") == ("main.parent",)
    assert reads("DELETE FROM parent WHERE id = 1") == ("main.child", "main.parent")
    assert reads("UPDATE child SET parent_id = 2") == ("main.child", "main.parent")
    assert reads("INSERT INTO other SELECT id FROM parent") == ("main.parent",)
    assert reads("INSERT INTO other VALUES (1)") == ()
    work.close()
    catalog.close()


def test_changes_duckdbs_equality_cannot_see_are_written(pair: Pair) -> None:
    """'a' and 'A' under NOCASE, 0.0 and -0.0 are equal to DuckDB but different values:
    the table must end as DuckDB leaves it. (DuckDB itself skips an UPDATE of a DOUBLE or
    an INTERVAL to an equal value, but stores a collated string's new spelling.)"""
    pair.run("CREATE TABLE e (k INTEGER, d DOUBLE, s VARCHAR COLLATE NOCASE) PARTITION BY HASH(k)")
    pair.run("INSERT INTO e VALUES (1, 0.0, 'a'), (1, '-0.0'::DOUBLE, 'a'), (2, 0.0, 'b')")
    commits = len(pair.port.log)
    pair.run("UPDATE e SET s = 'A' WHERE k = 1")
    assert len(pair.port.log) == commits + 1
    pair.run("DELETE FROM e WHERE signbit(d)")
    assert pair.table_rows("main.e") == [("1", "0.0", "A"), ("2", "0.0", "b")]
    pair.run("UPDATE e SET d = '-0.0'::DOUBLE, s = 'B' WHERE k = 2")
    pair.run("SELECT * FROM e")


def test_a_column_named_rowid_is_refused_for_reading_writes(pair: Pair) -> None:
    pair.run("CREATE TABLE r (rowid INTEGER, v VARCHAR) PARTITION BY HASH(v)")
    pair.run("INSERT INTO r VALUES (1, 'a'), (1, 'a')")  # a blind insert needs no row ids
    with pytest.raises(Unsupported, match="column named rowid"):
        pair.coordinator.execute("DELETE FROM r WHERE v = 'a'")
