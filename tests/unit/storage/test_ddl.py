"""dcluster's CREATE TABLE clauses and statement classification (storage/ddl.py)."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import ddl
from storage.ddl import Column, StatementKind


def spec_of(sql: str, worker_count: int = 3) -> ddl.TableSpec:
    """Resolve a CREATE TABLE the way the catalog does, in a scratch DuckDB."""
    statement = ddl.parse(sql)
    con = duckdb.connect(config={"threads": 1})
    con.execute(statement.sql).fetchall()
    columns = [
        Column(str(name), str(kind))
        for name, kind in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() ORDER BY column_index"
        ).fetchall()
    ]
    table_ddl = con.execute("SELECT sql FROM duckdb_tables()").fetchall()[0][0]
    return ddl.table_spec(
        statement,
        schema="main",
        name=str(statement.name),
        ddl=table_ddl,
        columns=columns,
        worker_count=worker_count,
        con=con,
    )


def test_plain_create_table_is_unchanged_and_defaults_apply() -> None:
    statement = ddl.parse("CREATE TABLE t (a INTEGER, b VARCHAR);")
    assert statement.kind == StatementKind.CREATE_TABLE
    assert statement.sql == "CREATE TABLE t (a INTEGER, b VARCHAR)"
    assert statement.clauses == ddl.Clauses()
    spec = spec_of("CREATE TABLE t (a INTEGER, b VARCHAR)", worker_count=5)
    assert (spec.kind, spec.key, spec.key_type) == ("hash", "a", "INTEGER")
    assert (spec.partitions, spec.replicas) == (5, 3)
    assert spec_of("CREATE TABLE t (a INTEGER)", worker_count=2).replicas == 2


def test_clauses_are_cut_out_around_tricky_literals_comments_and_quotes() -> None:
    sql = (
        'CREATE TABLE "Partition By" ("PARTITIONS" VARCHAR DEFAULT \'PARTITION BY HASH(x) (\','
        " /* REPLICAS 9 ) */ y INT -- PARTITIONS 7\n"
        ") PARTITION BY RANGE(\"PARTITIONS\") ('a', E'b\\'', $$c)$$) /* ( */ REPLICAS 2;"
    )
    statement = ddl.parse(sql)
    assert statement.name == "Partition By"
    assert statement.clauses.partitioning == "range"
    assert statement.clauses.key == "PARTITIONS"
    assert statement.clauses.bounds == ("'a'", "E'b\\''", "$$c)$$")
    assert statement.clauses.replicas == 2
    assert "REPLICAS 2" not in statement.sql and "REPLICAS 9" in statement.sql
    duckdb.connect().execute(statement.sql).fetchall()  # DuckDB's parser takes the rest
    spec = spec_of(sql)
    assert spec.bounds == ("a", "b'", "c)")
    assert spec.partitions == 4


def test_every_clause_kind() -> None:
    spec = spec_of("CREATE TABLE t (a INT, b INT) PARTITION BY HASH(b) PARTITIONS 7 REPLICAS 1")
    assert (spec.kind, spec.key, spec.partitions, spec.replicas) == ("hash", "b", 7, 1)
    spec = spec_of(
        "CREATE TABLE t (d DATE) PARTITION BY RANGE(d) ('2020-01-01', DATE '2021-06-30')"
    )
    assert spec.bounds == ("2020-01-01", "2021-06-30") and spec.partitions == 3
    spec = spec_of("CREATE TABLE t (k VARCHAR) PARTITION BY LIST(k) (('a', 'b'), ('c'), (NULL))")
    assert spec.lists == (("a", "b"), ("c",), (None,)) and spec.partitions == 3
    spec = spec_of("CREATE TABLE dim (k INT, label VARCHAR) REFERENCE", worker_count=4)
    assert spec.reference and (spec.partitions, spec.replicas, spec.key) == (1, 4, None)


def test_create_table_as_takes_clauses_before_as() -> None:
    statement = ddl.parse("CREATE TABLE t PARTITIONS 2 AS SELECT 1 AS partitions")
    assert statement.kind == StatementKind.CREATE_TABLE_AS
    assert statement.sql == "CREATE TABLE t AS SELECT 1 AS partitions"
    assert statement.select_sql == "SELECT 1 AS partitions"
    assert statement.clauses.partitions == 2


@pytest.mark.parametrize(
    ("sql", "kind", "name"),
    [
        ("DROP TABLE IF EXISTS s.t", StatementKind.DROP_TABLE, "t"),
        ("DROP VIEW v", StatementKind.DROP_VIEW, "v"),
        ("ALTER TABLE t ADD COLUMN c INT", StatementKind.ALTER_TABLE_ADD_COLUMN, "t"),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", StatementKind.CREATE_VIEW, "v"),
        ("INSERT INTO t VALUES (1)", StatementKind.INSERT, "t"),
        ("UPDATE t SET a = 1", StatementKind.UPDATE, "t"),
        ("DELETE FROM t", StatementKind.DELETE, "t"),
        ("COPY t FROM 'x.csv'", StatementKind.COPY, "t"),
        ("SELECT 1", StatementKind.SELECT, None),
        ("WITH x AS (SELECT 1) SELECT * FROM x", StatementKind.SELECT, None),
    ],
)
def test_statements_are_classified(sql: str, kind: StatementKind, name: str | None) -> None:
    statement = ddl.parse(sql)
    assert (statement.kind, statement.name) == (kind, name)


@pytest.mark.parametrize(
    ("sql", "error", "words"),
    [
        ("CREATE TABLE t (a INT) PARTITION BY HASH(zz)", ddl.UnknownKeyColumn, "zz"),
        ("CREATE TABLE t (a INT) PARTITION BY RANGE(a) (5, 5)", ddl.BoundsNotIncreasing, "5"),
        ("CREATE TABLE t (a INT) PARTITION BY RANGE(a) (5, NULL)", ddl.BoundsNotIncreasing, "NULL"),
        ("CREATE TABLE t (a INT) PARTITIONS 0", ddl.BadPartitionCount, "PARTITIONS"),
        ("CREATE TABLE t (a INT) PARTITIONS 99999", ddl.BadPartitionCount, "4096"),
        (
            "CREATE TABLE t (a INT) PARTITION BY RANGE(a) (1) PARTITIONS 3",
            ddl.BadPartitionCount,
            "2",
        ),
        ("CREATE TABLE t (a INT) REPLICAS 4", ddl.TooManyReplicas, "workers (3)"),
        ("CREATE TABLE t (a INT) REPLICAS 0", ddl.TooManyReplicas, "REPLICAS 0"),
        ("CREATE TABLE t (a INT) PARTITION BY LIST(a) ((1, 2), (2))", ddl.RepeatedListValue, "'2'"),
        ("CREATE TABLE t (a INT) PARTITION BY LIST(a) ((1, '01'))", ddl.RepeatedListValue, "'1'"),
        ("CREATE TABLE t (a INT) PARTITION BY RANGE(a) ('x')", ddl.BadPartitionValue, "INTEGER"),
    ],
)
def test_bad_clause_values(sql: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=None) as raised:
        spec_of(sql)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("CREATE TABLE t (a INT) PARTITIONS 2 PARTITIONS 3", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITIONS x", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITIONS 2.5", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITION BY MAGIC(a)", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITION BY HASH(a, a)", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITION BY RANGE(a)", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITION BY LIST(a) (1, 2)", ddl.ClauseError),
        ("CREATE TABLE t (a INT) PARTITION BY RANGE(a) (1, , 2)", ddl.ClauseError),
        ("CREATE TABLE t (a INT) REFERENCE REPLICAS 2", ddl.ClauseError),
        ("CREATE TABLE t (a INT) WITHOUT ROWID", ddl.ClauseError),
        ("CREATE TABLE t (a INTT", ddl.ClauseError),
        ("CREATE TABLE t (a NOT_A_TYPE NOT NULL NULL x)", ddl.SqlSyntaxError),
        ("SELEC 1", ddl.SqlSyntaxError),
        ("SELECT 1; SELECT 2", ddl.UnsupportedStatement),
        ("", ddl.UnsupportedStatement),
        ("CREATE TEMP TABLE t (a INT)", ddl.UnsupportedStatement),
        ("CREATE SEQUENCE s", ddl.UnsupportedStatement),
        ("ALTER TABLE t DROP COLUMN a", ddl.UnsupportedStatement),
        ("DROP SCHEMA s", ddl.UnsupportedStatement),
        ("PRAGMA version", ddl.UnsupportedStatement),
    ],
)
def test_refused_statements(sql: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        ddl.parse(sql)


def test_duckdb_parser_message_is_surfaced_unchanged() -> None:
    with pytest.raises(duckdb.ParserException) as direct:
        duckdb.extract_statements("SELEC 1")
    with pytest.raises(ddl.SqlSyntaxError) as ours:
        ddl.parse("SELEC 1")
    assert str(ours.value) == str(direct.value)


literal_text = st.text(alphabet=st.sampled_from("ab'\"();,-*/$ \nPARTIONSBYHASH"), max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    default=literal_text,
    comment=literal_text,
    bounds=st.lists(literal_text, max_size=4, unique=True),
)
def test_clauses_survive_any_literal_or_comment_text(
    default: str, comment: str, bounds: list[str]
) -> None:
    quoted_default = "'" + default.replace("'", "''") + "'"
    safe_comment = comment.replace("/", "")  # no comment ends or nested opens
    quoted_bounds = ", ".join("'" + b.replace("'", "''") + "'" for b in sorted(bounds))
    range_clause = f"PARTITION BY RANGE(k) ({quoted_bounds})" if bounds else ""
    sql = (
        f"CREATE TABLE t (k VARCHAR DEFAULT {quoted_default} /*{safe_comment}*/, v INT) "
        f"{range_clause} REPLICAS 1"
    )
    statement = ddl.parse(sql)
    assert statement.clauses.replicas == 1
    con = duckdb.connect()
    con.execute(statement.sql).fetchall()
    assert con.execute("INSERT INTO t (v) VALUES (1) RETURNING k").fetchall() == [(default,)]
    if bounds:
        increasing = sorted(bounds) == sorted(bounds, key=lambda b: b.encode())
        try:
            spec = spec_of(sql)
        except ddl.BoundsNotIncreasing:
            assert not increasing
        else:
            assert spec.bounds == tuple(sorted(bounds))
