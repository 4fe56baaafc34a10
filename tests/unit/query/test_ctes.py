"""WITH clauses. A statement whose WITH queries, put in place of their references (as
DuckDB inlines them), plan on the partitions runs so (`_inlined_ctes`). Otherwise WITH
queries over partitioned tables are answered first (query.ctes): each runs as a query of
its own at the statement's barrier — on the partitions when it plans so — and the
statement then runs over narrowed scans with the WITH query reading that answer — in the
same round as the statement's first scans when the WITH queries plan as fragments that
move no table. Answers
are single-node DuckDB's (harness.Pair: columns, DuckDB types, Arrow types, rows; errors
in the same words); EXPLAIN ANALYZE shows each WITH query answered first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.query.harness import Pair

SETUP = [
    "CREATE TABLE li (ok BIGINT, sk INTEGER, price DECIMAL(12,2), d DATE, note VARCHAR, "
    "mood ENUM('sad', 'ok')) PARTITION BY HASH(ok) PARTITIONS 3",
    "CREATE TABLE sup (sk INTEGER, name VARCHAR) REFERENCE",
    "INSERT INTO li SELECT i, CASE WHEN i % 29 = 0 THEN NULL ELSE i % 37 END, "
    "(i * 7 % 1000) / 10.0, DATE '2020-01-01' + (i % 400)::INTEGER, "
    "CASE WHEN i % 5 = 0 THEN NULL ELSE 'n ñ ' || (i % 9) END, ['sad', 'ok'][i % 2 + 1] "
    "FROM range(3000) t(i)",
    "INSERT INTO sup SELECT i, 's' || i FROM range(40) t(i)",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as pair:
        yield pair


def steps(pair: Pair, sql: str) -> list[tuple[str, str]]:
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    return [(str(row[0]), str(row[2])) for row in rows]


ANSWERED_FIRST = [
    (  # TPC-H q15's shape: the WITH query twice, once in a scalar subquery
        "WITH rev AS (SELECT sk AS supplier_no, sum(price) AS total FROM li "
        "WHERE d >= DATE '2020-03-01' GROUP BY sk) "
        "SELECT s.sk, name, total FROM sup s, rev WHERE s.sk = supplier_no "
        "AND total = (SELECT max(total) FROM rev) ORDER BY s.sk",
        ["rev"],
    ),
    (  # column aliases, and a WITH query over a reference table beside
        "WITH r(k, n) AS (SELECT sk, count(*) FROM li GROUP BY sk), s AS (SELECT * FROM sup) "
        "SELECT s.name, r.n FROM r LEFT JOIN s ON r.k = s.sk ORDER BY r.k NULLS FIRST",
        ["r"],
    ),
    (  # the second names the first: only the first is answered first
        "WITH a AS (SELECT sk, avg(price) AS m FROM li GROUP BY sk), "
        "b AS (SELECT sk FROM a WHERE m > 49) SELECT count(*), sum(sk) FROM b",
        ["a"],
    ),
    (  # read in a subquery only, and empty
        "WITH e AS (SELECT ok FROM li WHERE ok < 0) "
        "SELECT count(*) FROM sup WHERE sk IN (SELECT ok FROM e)",
        ["e"],
    ),
]


@pytest.mark.parametrize(
    ("sql", "first"), ANSWERED_FIRST, ids=[sql[:50] for sql, _ in ANSWERED_FIRST]
)
def test_with_queries_over_partitions_are_answered_first(
    pair: Pair, sql: str, first: list[str]
) -> None:
    shown = steps(pair, sql)
    assert [step for step, _ in shown if step.startswith("WITH ")] == [
        f"WITH {name}" for name in first
    ], shown
    assert ("plan", "two_phase") in shown or ("plan", "pushdown") in shown, shown
    planned = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    assert [str(row[0]) for row in planned if str(row[0]).startswith("WITH ")] == [
        f"WITH {name}" for name in first
    ], planned
    pair.run(sql, ordered="ORDER BY" in sql)


NOT_ANSWERED_FIRST = [
    # recursive
    "WITH RECURSIVE r(n) AS (SELECT min(sk) FROM li UNION ALL SELECT n + 1 FROM r "
    "WHERE n < 5) SELECT * FROM r ORDER BY n",
    # an ENUM does not come back from Arrow as itself
    "WITH m AS (SELECT mood, count(*) AS n FROM li GROUP BY mood) SELECT * FROM m ORDER BY mood",
    # a volatile function: the statement runs once, as written
    "WITH v AS (SELECT ok FROM li WHERE random() < 2) SELECT count(*) FROM v",
    # over a reference table only
    "WITH s AS (SELECT * FROM sup WHERE sk < 4) SELECT count(*) FROM s",
]


@pytest.mark.parametrize("sql", NOT_ANSWERED_FIRST, ids=range(len(NOT_ANSWERED_FIRST)))
def test_other_with_queries_run_as_written(pair: Pair, sql: str) -> None:
    assert not any(step.startswith("WITH ") for step, _ in steps(pair, sql))
    pair.run(sql, ordered="ORDER BY" in sql)


@pytest.mark.parametrize(
    "sql",
    [
        "WITH bad AS (SELECT CAST(note AS INTEGER) AS x FROM li WHERE ok = 7) SELECT * FROM bad",
        "WITH fine AS (SELECT sk, count(*) AS n FROM li GROUP BY sk) "
        "SELECT CAST(name AS INTEGER) FROM fine, sup WHERE fine.sk = sup.sk",
    ],
)
def test_errors_are_duckdbs(pair: Pair, sql: str) -> None:
    pair.run(sql, fails=True)


def test_the_with_query_and_the_statement_read_one_snapshot(pair: Pair) -> None:
    sql, _ = ANSWERED_FIRST[0]
    releases, calls = len(pair.port.releases), len(pair.port.fragment_calls)
    pair.run(sql, ordered=True)
    (index,) = pair.port.releases[releases:]
    asked = pair.port.fragment_calls[calls:]
    assert {at for at, _ in asked} == {index}
    # One round: the WITH query's fragments go with the statement's first scans (their
    # plan needs only the WITH query's column types, not its rows).
    ((_, fragments),) = asked
    assert any("sum(price)" in fragment.sql for fragment in fragments), fragments
    assert any('"main.sup__p0"' in fragment.sql for fragment in fragments), fragments


def test_a_with_query_that_moves_tables_is_answered_first_in_a_round_of_its_own(
    pair: Pair,
) -> None:
    """A WITH query that reads a broadcast or gathered table does not go with the
    statement's scans: it is answered first, then the statement's scans are read."""
    sql = (
        "WITH r AS (SELECT li.sk, sum(li.price) AS total FROM li, li AS other "
        "WHERE li.ok = other.ok + 1 GROUP BY li.sk) "
        "SELECT sup.name, r.total FROM sup JOIN r ON sup.sk = r.sk ORDER BY 1, 2"
    )
    calls = len(pair.port.fragment_calls)
    pair.run(sql, ordered=True)
    assert len(pair.port.fragment_calls[calls:]) >= 2


INLINED = [
    (  # rows of its own, not an aggregate; strings with NULLs and unicode
        "two_phase",
        "WITH x AS (SELECT ok, note FROM li WHERE ok % 97 = 3) "
        "SELECT note, count(*) FROM x GROUP BY note ORDER BY note NULLS LAST",
    ),
    (  # a join with a reference table, grouped: two-phase over the join
        "two_phase",
        "WITH a(k, p, who) AS (SELECT li.ok, li.price, sup.name FROM li JOIN sup "
        "ON li.sk = sup.sk WHERE li.price > 50) "
        "SELECT who, count(*), sum(p) FROM a GROUP BY who ORDER BY who",
    ),
    (  # grouped by the key inside: each group in one partition
        "pushdown",
        "WITH g AS (SELECT ok, count(*) AS n, max(note) AS m FROM li GROUP BY ok) "
        "SELECT ok, n, m FROM g WHERE n > 0 ORDER BY ok DESC LIMIT 5",
    ),
]


@pytest.mark.parametrize(("tier", "sql"), INLINED, ids=[sql[:50] for _, sql in INLINED])
def test_with_queries_put_in_place_plan_on_the_partitions(pair: Pair, tier: str, sql: str) -> None:
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    assert (str(rows[0][0]), str(rows[0][2])) == ("plan", tier), rows
    pair.run(sql, ordered="ORDER BY" in sql)


@pytest.mark.parametrize(
    "sql",
    [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT n, count(*) FROM r JOIN li ON li.sk = r.n GROUP BY n ORDER BY n",
        "WITH x AS MATERIALIZED (SELECT ok FROM li WHERE ok < 10) "
        "SELECT * FROM (WITH x AS (SELECT 1 AS ok) SELECT * FROM x) AS y ORDER BY ok",
    ],
)
def test_with_clauses_not_surely_the_same_inlined_are_not(pair: Pair, sql: str) -> None:
    """A recursive WITH query, or one a nested WITH clause may shadow, stays as written."""
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    assert str(rows[0][0]) == "gather" and "a WITH clause" in str(rows[0][2]), rows
    pair.run(sql, ordered=True)


def test_inlined_but_not_planned_is_answered_first_as_before(pair: Pair) -> None:
    """A WITH query read in a join and in a subquery: put in place, the statement does not
    plan (derived tables there are gathered), so the WITH query is answered first."""
    sql = (
        "WITH y AS (SELECT ok, d FROM li WHERE d < DATE '2020-02-01') "
        "SELECT count(*), min(d) FROM y WHERE ok IN (SELECT ok FROM y WHERE ok % 2 = 0)"
    )
    assert [step for step, _ in steps(pair, sql) if step.startswith("WITH ")] == ["WITH y"]
    pair.run(sql)
