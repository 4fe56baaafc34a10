"""Uncorrelated scalar subqueries answered first (query.scalars): the subquery runs as a
query of its own at the statement's barrier, its answer goes into the statement as a
typed constant, and the statement is planned again — and answers exactly as single-node
DuckDB (harness.Pair: columns, DuckDB types, Arrow types, rows; errors in the same
words).

EXPLAIN ANALYZE must show the subquery answered first and the plan the statement got with
the constant; a subquery that is correlated, names an outer CTE, returns more than one
row, raises, or has a value that does not survive the round trip through text is left as
written (the statement gathers).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from query import scalars
from tests.unit.query.harness import Pair

SETUP = [
    "CREATE TABLE t (k BIGINT, grp INTEGER, v DECIMAL(12,3), x DOUBLE, name VARCHAR, "
    "d DATE, ts TIMESTAMPTZ, span INTERVAL, flag BOOLEAN, big HUGEINT, raw BLOB, "
    "mood ENUM('sad', 'ok')) PARTITION BY HASH(k) PARTITIONS 3",
    "CREATE TABLE u (uk INTEGER, k BIGINT, w DOUBLE) PARTITION BY HASH(uk) PARTITIONS 2",
    "CREATE TABLE r (grp INTEGER, label VARCHAR) REFERENCE",
    "INSERT INTO t SELECT i, i % 7, (i * 37 % 1000) / 8.0, (i % 13) / 3.0, "
    "CASE WHEN i % 9 = 0 THEN NULL ELSE 'n''ame ñ ' || (i % 11) END, "
    "DATE '2021-01-01' + (i % 300)::INTEGER, "
    "TIMESTAMPTZ '2024-03-01 12:00:00+00' + INTERVAL (i) MINUTE, "
    "INTERVAL (i) DAY + INTERVAL (i % 5) MONTH, i % 4 = 0, "
    "170141183460469231731687303715884105727 - i, encode('b' || i), "
    "['sad', 'ok'][i % 2 + 1] FROM range(400) t(i)",
    "INSERT INTO u SELECT i, i % 400, i / 7.0 FROM range(250) t(i)",
    "INSERT INTO r SELECT i, 'grp ' || i FROM range(7) t(i)",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as pair:  # row estimates after the inserts
        yield pair


def analyzed(pair: Pair, sql: str) -> list[tuple[str, str, str]]:
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    return [(str(row[0]), str(row[1]), str(row[2])) for row in rows]


# (the tier the statement gets with the constant, query)
SUBSTITUTED = [
    (  # TPC-H q11's shape: HAVING against a fraction of the whole
        "pushdown (grouped by the key)",
        "SELECT k, sum(v) AS total FROM t GROUP BY k "
        "HAVING sum(v) > (SELECT sum(v) * 0.004 FROM t) ORDER BY total DESC, k",
    ),
    ("pushdown", "SELECT k, x FROM t WHERE x > (SELECT avg(x) FROM t) ORDER BY k"),
    ("pushdown + router", "SELECT k, name FROM t WHERE k = (SELECT max(k) FROM t)"),
    ("two_phase", "SELECT count(*) FROM t WHERE name = (SELECT max(name) FROM t)"),
    ("two_phase", "SELECT count(*) FROM t WHERE d < (SELECT min(d) + 30 FROM t)"),
    ("two_phase", "SELECT count(*) FROM t WHERE ts >= (SELECT max(ts) FROM t) - INTERVAL 1 HOUR"),
    ("two_phase", "SELECT count(*) FROM t WHERE span > (SELECT avg(uk) FROM u) * INTERVAL 1 DAY"),
    ("two_phase", "SELECT count(*) FROM t WHERE flag = (SELECT bool_or(w > 30) FROM u)"),
    ("two_phase", "SELECT count(*), max(big) FROM t WHERE big > (SELECT max(big) - 50 FROM t)"),
    ("two_phase", "SELECT count(*) FROM t WHERE raw < (SELECT max(raw) FROM t)"),
    (  # no row: NULL of the subquery's type
        "two_phase",
        "SELECT count(*), count(v) FROM t WHERE v > (SELECT v FROM t WHERE k = -1)",
    ),
    (  # in the select list, unaliased: the column keeps DuckDB's name for it
        "pushdown",
        "SELECT k, (SELECT max(w) FROM u), x - (SELECT min(x) FROM t) AS off FROM t "
        "WHERE k < 5 ORDER BY k",
    ),
    (  # the same subquery twice, in GROUP BY and the select list
        "two_phase",
        "SELECT x > (SELECT avg(w) FROM u) AS high, count(*) FROM t "
        "GROUP BY x > (SELECT avg(w) FROM u) ORDER BY 1",
    ),
    (  # a scalar subquery inside one: both answered first
        "two_phase",
        "SELECT count(*) FROM t WHERE v > (SELECT avg(v) FROM t WHERE x > (SELECT avg(w) FROM u))",
    ),
    (  # inside a derived table, beside a reference join
        "two_phase",
        "SELECT label, count(*) FROM (SELECT grp, v FROM t WHERE v > (SELECT avg(v) FROM t)) s "
        "JOIN r ON r.grp = s.grp GROUP BY label ORDER BY label",
    ),
    (  # its own WITH travels with it
        "two_phase",
        "SELECT count(*) FROM t WHERE x < (WITH m AS (SELECT avg(w) AS a FROM u) SELECT a FROM m)",
    ),
]


@pytest.mark.parametrize(("tier", "sql"), SUBSTITUTED, ids=[sql[:60] for _, sql in SUBSTITUTED])
def test_the_subquery_is_answered_first_and_the_statement_planned_with_it(
    pair: Pair, tier: str, sql: str
) -> None:
    steps = analyzed(pair, sql)
    names = [step for step, _, _ in steps]
    assert names[0] == "gather", steps  # as written
    assert "scalar subquery" in names and "constant" in names, steps
    plans = [detail for step, _, detail in steps if step == "plan"]
    assert plans[-1] == tier, steps  # the statement's, after its subqueries' own
    pair.run(sql, ordered="ORDER BY" in sql)


# Left as written: the statement gathers, and must still answer as DuckDB.
NOT_SUBSTITUTED = [
    # correlated: u.k names the outer t
    "SELECT k FROM t WHERE x > (SELECT avg(w) FROM u WHERE u.k = t.k) ORDER BY k",
    # correlated by an unqualified name only t has
    "SELECT k FROM t WHERE x > (SELECT avg(w) FROM u WHERE uk = grp) ORDER BY k",
    # names the statement's CTE
    "WITH big AS (SELECT * FROM t WHERE x > 2) SELECT count(*) FROM big "
    "WHERE v > (SELECT avg(v) FROM big)",
    # an ENUM does not come back from Arrow as itself
    "SELECT count(*) FROM t WHERE mood = (SELECT max(mood) FROM t)",
    # a volatile function: the statement runs once, as written
    "SELECT count(*) FROM t WHERE x > (SELECT avg(w) FROM u) + random() - 2",
    # reads only a reference table: planned on the partitions as it is
    "SELECT count(*) FROM t WHERE grp = (SELECT max(grp) FROM r)",
]


@pytest.mark.parametrize("sql", NOT_SUBSTITUTED, ids=range(len(NOT_SUBSTITUTED)))
def test_a_subquery_that_cannot_be_answered_alone_is_left_as_written(pair: Pair, sql: str) -> None:
    names = [step for step, _, _ in analyzed(pair, sql)]
    assert "constant" not in names, names
    if "random()" not in sql:
        pair.run(sql, ordered="ORDER BY" in sql)


@pytest.mark.parametrize(
    "sql",
    [
        # more than one row: DuckDB's own error
        "SELECT count(*) FROM t WHERE x > (SELECT x FROM t WHERE k < 3)",
        # the subquery raises (on one row: which row DuckDB names is its scan's order)
        "SELECT count(*) FROM t WHERE grp > (SELECT max(CAST(name AS INTEGER)) FROM t WHERE k = 7)",
        # the statement raises after the constant is in
        "SELECT CAST(name AS INTEGER) FROM t WHERE k = 7 AND x > (SELECT avg(x) FROM t)",
    ],
)
def test_errors_are_duckdbs(pair: Pair, sql: str) -> None:
    pair.run(sql, fails=True)


def test_the_subquery_and_the_statement_read_one_snapshot(pair: Pair) -> None:
    """One barrier for both (each released index was one barrier taken), every fragment at
    it."""
    sql = "SELECT count(*) FROM t WHERE x > (SELECT avg(x) FROM t)"
    releases, calls = len(pair.port.releases), len(pair.port.fragment_calls)
    pair.run(sql)
    (index,) = pair.port.releases[releases:]
    asked = pair.port.fragment_calls[calls:]
    assert len(asked) >= 2  # the subquery's fragments, then the statement's
    assert {at for at, _ in asked} == {index}


def test_literal_is_exact_or_none() -> None:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    cases = [
        (pa.table({"v": pa.array([0.1 + 0.2])}), "DOUBLE"),
        (pa.table({"v": pa.array([float("-inf")])}), "DOUBLE"),
        (pa.table({"v": pa.array(["it's"])}), "VARCHAR"),
        (pa.table({"v": pa.array([None], pa.int64())}), "BIGINT"),
    ]
    for rows, type_ in cases:
        constant = scalars.literal(con, rows, type_)
        assert constant is not None
        (value,) = con.execute(f"SELECT {constant}").fetchall()[0]
        assert value == rows.column(0)[0].as_py()
        assert str(con.sql(f"SELECT {constant}").types[0]) == type_
    two = pa.table({"v": pa.array([1, 2])})
    assert scalars.literal(con, two, "BIGINT") is None
    empty = pa.table({"v": pa.array([], pa.int32())})
    assert scalars.literal(con, empty, "INTEGER") == "CAST(NULL AS INTEGER)"
    con.close()


ONE_ROUND = [
    SUBSTITUTED[0][1],  # q11's shape
    # (a DOUBLE sum may differ in its last bit from run to run, the order of its rows
    # unfixed: the constant is then not the same, and the long way is taken — so not here)
    "SELECT k, v FROM t WHERE v > (SELECT avg(v) FROM t) ORDER BY k",
    "SELECT k, (SELECT max(w) FROM u), x - (SELECT min(x) FROM t) AS off FROM t "
    "WHERE k < 5 ORDER BY k",
    "SELECT count(*), count(v) FROM t WHERE v > (SELECT v FROM t WHERE k = -1)",
]


@pytest.mark.parametrize("sql", ONE_ROUND, ids=range(len(ONE_ROUND)))
def test_run_again_the_subqueries_go_in_one_round_with_the_statement(pair: Pair, sql: str) -> None:
    pair.run(sql, ordered=True)
    calls = len(pair.port.fragment_calls)
    pair.run(sql, ordered=True)
    asked = pair.port.fragment_calls[calls:]
    assert len(asked) == 1, asked
    texts = [fragment.sql for fragment in asked[0][1]]
    assert any("CAST(" in text for text in texts), texts  # the statement, with a constant


def test_run_again_a_gathered_statement_reads_the_subqueries_with_its_first_scans(
    pair: Pair,
) -> None:
    """TPC-H q22's shape: the statement gathers (NOT EXISTS over u, partitioned on
    another key); run again, the subquery's fragments go with its first round of narrowed
    scans, planned with the constant it gave last time — one round fewer."""
    sql = (
        "SELECT k, v FROM t WHERE v > (SELECT avg(v) FROM t WHERE v > 10) "
        "AND NOT EXISTS (SELECT * FROM u WHERE u.k = t.k) ORDER BY k"
    )
    fresh = sql.replace("ORDER BY", "ORDER  BY")  # not run before: the long way first
    calls = len(pair.port.fragment_calls)
    pair.run(fresh, ordered=True)
    long_way = len(pair.port.fragment_calls) - calls  # the subquery, then the scans
    calls = len(pair.port.fragment_calls)
    pair.run(fresh, ordered=True)
    asked = pair.port.fragment_calls[calls:]
    assert len(asked) == long_way - 1, asked
    texts = [fragment.sql for fragment in asked[0][1]]
    assert any("avg(v)" in text or "sum(v)" in text for text in texts), texts  # subquery
    assert any('"main.t__p0"' in text and "CAST(" in text for text in texts), texts


def test_a_constant_that_changed_is_not_used() -> None:
    """Another client's write changes what the subquery gives: the round run with the old
    constant is thrown away and the subquery answered first again."""
    from query.coordinator import Coordinator

    with Pair.loaded(SETUP[:1] + SETUP[3:4]) as pair:
        sql = SUBSTITUTED[0][1]
        pair.run(sql, ordered=True)
        pair.run(sql, ordered=True)  # one round, with the constant
        theirs = Coordinator(pair.port.client())
        try:
            for statement in [
                "INSERT INTO t (k, v) SELECT i, 900 FROM range(400, 430) t(i)",
                "DELETE FROM t WHERE k < 40",
            ]:
                theirs.execute(statement)
                pair.reference.execute(statement)
                calls = len(pair.port.fragment_calls)
                pair.run(sql, ordered=True)
                assert len(pair.port.fragment_calls) - calls == 3  # tried, then two rounds
                calls = len(pair.port.fragment_calls)
                pair.run(sql, ordered=True)
                assert len(pair.port.fragment_calls) - calls == 1
        finally:
            theirs.close()
