"""Eager aggregation (query.planner `_eager_aggregated`): a repartitioned table whose
other columns a grouped query reads only inside COUNT, SUM, MIN and MAX is aggregated by
its split column where it is scanned, and its partial counts, sums, minima and maxima are
dealt out instead of its rows (TPC-H q13: orders counted per customer).

EXPLAIN must show the grouped scan where the rewrite is exact, and the plain scan where it
is not (an aggregate repeated rows would change, DISTINCT, FILTER, a float sum, the
table's column read outside an aggregate); every query answers as single-node DuckDB
(query.harness.Pair compares columns, DuckDB types, Arrow types and rows), also over
generated queries mixing join kinds, NULL keys and values, and empty groups.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from storage.placement import partition_expression
from tests.unit.query.harness import Pair
from tests.unit.query.test_repartition import SETUP, plan_of

SETUP_MORE = [
    "CREATE TABLE n (ok BIGINT, ck INTEGER, x DOUBLE, small TINYINT, big HUGEINT, "
    "wide DECIMAL(38,2), flag BOOLEAN) PARTITION BY HASH(ok) PARTITIONS 3",
    "INSERT INTO n SELECT i, CASE WHEN i % 13 = 0 THEN NULL ELSE i % 300 END, i / 7, "
    "(i % 100)::TINYINT, i::HUGEINT * 1000000000000, i * 1.25, i % 3 = 0 FROM range(500) t(i)",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP + SETUP_MORE) as pair:
        yield pair


def moved_scan(pair: Pair, sql: str, table: str = "main.o") -> str:
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    found = [str(row[2]) for row in rows if row[0] == f"repartition {table}"]
    assert len(found) == 1, rows
    return found[0]


EAGER = [
    (  # q13: counts per customer, a customer without orders counts 0
        "SELECT c_count, count(*) AS custdist FROM (SELECT c.ck, count(o.ok) FROM c "
        "LEFT JOIN o ON c.ck = o.ck AND o.note NOT LIKE '%3%' GROUP BY c.ck) "
        "AS c_orders (c_ck, c_count) GROUP BY c_count ORDER BY custdist DESC, c_count DESC",
        'SELECT "ck", count("ok") AS "dcluster_eager_0" FROM "main"."o" '
        "WHERE ((note !~~ '%3%')) GROUP BY \"ck\"",
    ),
    (  # count(*) over a NULL-extended side counts the customer's one row
        "SELECT c.seg, count(*), count(o.ok), sum(o.total), min(o.d), max(o.note) "
        "FROM c LEFT JOIN o ON o.ck = c.ck GROUP BY c.seg",
        'SELECT "ck", count(*) AS "dcluster_eager_0", count("ok") AS "dcluster_eager_1", '
        'sum("total") AS "dcluster_eager_2", min("d") AS "dcluster_eager_3", '
        'max("note") AS "dcluster_eager_4" FROM "main"."o" GROUP BY "ck"',
    ),
    (  # no groups; min and max of the other table's columns are left as they are
        "SELECT count(*), sum(o.total), max(c.name), min(c.joined) FROM o JOIN c "
        "ON o.ck = c.ck WHERE o.d > DATE '1995-03-01'",
        'SELECT "ck", count(*) AS "dcluster_eager_0", sum("total") AS "dcluster_eager_1" '
        'FROM "main"."o" WHERE ((d > CAST(\'1995-03-01\' AS DATE))) GROUP BY "ck"',
    ),
    (  # the preserved side: its unmatched rows and its NULL keys keep their counts
        "SELECT c.ck, count(*), count(o.note), avg(o.total) FROM o FULL JOIN c "
        "ON o.ck = c.ck GROUP BY c.ck HAVING count(*) > 1 ORDER BY 2 DESC, 1 LIMIT 7",
        'SELECT "ck", count(*) AS "dcluster_eager_0", count("note") AS "dcluster_eager_1", '
        'sum("total") AS "dcluster_eager_2", count("total") AS "dcluster_eager_3" '
        'FROM "main"."o" GROUP BY "ck"',
    ),
    (  # small integers sum to HUGEINT either way
        "SELECT c.seg, sum(n.small), count(n.flag) FROM c JOIN n ON n.ck = c.ck GROUP BY 1",
        'SELECT "ck", sum("small") AS "dcluster_eager_0", count("flag") AS "dcluster_eager_1" '
        'FROM "main"."n" GROUP BY "ck"',
    ),
]


@pytest.mark.parametrize("sql, scan", EAGER, ids=range(len(EAGER)))
def test_the_scan_aggregates_and_the_answer_is_duckdbs(pair: Pair, sql: str, scan: str) -> None:
    table = "main.n" if " n " in sql else "main.o"
    assert moved_scan(pair, sql, table) == f"{scan}, sent as dcluster_rows_0"
    pair.run(sql, ordered="ORDER BY" in sql)


NOT_EAGER = [
    # a sum over the other table's rows counts each of them once per order
    "SELECT c.seg, count(o.ok), sum(c.ck) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
    "SELECT c.seg, count(DISTINCT o.note) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
    "SELECT c.seg, count(o.ok) FILTER (WHERE c.ck > 5) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
    "SELECT c.seg, sum(o.total * 2) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
    # o's column outside an aggregate: grouped by, or in a condition its scan cannot apply
    "SELECT o.note, count(*) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
    "SELECT c.seg, count(*) FROM c JOIN o ON o.ck = c.ck AND o.ok > c.ck GROUP BY 1",
    "SELECT c.seg, count(*) FROM c LEFT JOIN o ON o.ck = c.ck WHERE o.total > 100 "
    "OR o.total IS NULL GROUP BY 1",
    # floats add in another order; a HUGEINT or 38-digit partial sum could overflow alone
    "SELECT c.seg, round(sum(n.x), 6) FROM c JOIN n ON n.ck = c.ck GROUP BY 1",
    "SELECT c.seg, sum(n.big) FROM c JOIN n ON n.ck = c.ck GROUP BY 1",
    "SELECT c.seg, sum(n.wide) FROM c JOIN n ON n.ck = c.ck GROUP BY 1",
    # not grouped: every row goes to the result
    "SELECT c.ck, o.ok FROM c JOIN o ON o.ck = c.ck",
    "SELECT c.seg, bool_or(o.note IS NULL) FROM c JOIN o ON o.ck = c.ck GROUP BY 1",
]


@pytest.mark.parametrize("sql", NOT_EAGER)
def test_no_eager_aggregation_where_it_is_not_exact(pair: Pair, sql: str) -> None:
    table = "main.n" if " n " in sql else "main.o"
    assert "GROUP BY" not in moved_scan(pair, sql, table)
    pair.run(sql)


def test_the_scan_sends_one_row_per_key_and_partition(pair: Pair) -> None:
    sql = EAGER[1][0]
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    sent = sum(int(row[3]) for row in rows if row[0] == "scanned main.o")
    spec = pair.coordinator._work.specs["main.o"]
    partition = partition_expression(spec, "ok")  # where each row of o is stored
    groups = pair.reference.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT {partition}, ck FROM o)"
    ).fetchall()[0][0]
    assert sent == groups < 600
    pair.run(sql)


# ---- generated queries ----

JOINS = ["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"]
AGGREGATES = [
    "count(*)",
    "count(o.ok)",
    "count(o.note)",
    "sum(o.total)",
    "min(o.d)",
    "max(o.note)",
    "avg(o.total)",
    "max(c.name)",
    "min(c.ck)",
    "max(o.ck)",
]
GROUPS = ["", "c.ck", "c.seg", "o.ck", "c.seg, c.ck"]
CONDITIONS = ["o.total > 120", "o.note IS NULL", "c.seg = 'AUTO'", "o.d > DATE '1995-05-01'"]


def eager_query(rng: random.Random) -> str:
    join = rng.choice(JOINS)
    left, right = ("o", "c") if rng.random() < 0.5 else ("c", "o")
    on = " AND ".join(["o.ck = c.ck"] + rng.sample(CONDITIONS, rng.randint(0, 1)))
    where = rng.sample(CONDITIONS, rng.randint(0, 1))
    group = rng.choice(GROUPS)
    aggregates = rng.sample(AGGREGATES, rng.randint(1, 4))
    select = ", ".join(([group] if group else []) + aggregates)
    query = f"SELECT {select} FROM {left} {join} {right} ON {on}"
    if where:
        query += f" WHERE {where[0]}"
    if group:
        query += f" GROUP BY {group}"
        if rng.random() < 0.3:
            query += f" HAVING {rng.choice(['count(*) > 1', 'count(o.ok) < 4'])}"
    if group == "c.ck" and rng.random() < 0.5:  # q13's two levels
        return f"SELECT n, count(*) FROM (SELECT count(o.ok) AS n {query[len(select) + 7 :]}) GROUP BY n"
    return query


@pytest.mark.parametrize("seed", range(60))
def test_generated_queries_answer_as_duckdb(pair: Pair, seed: int) -> None:
    pair.run(eager_query(random.Random(seed)))


def test_many_generated_queries_aggregate_eagerly(pair: Pair) -> None:
    """The generated queries above do exercise the rewrite, not only plain scans."""
    eager = 0
    for seed in range(60):
        sql = eager_query(random.Random(seed))
        tier, moved, _ = plan_of(pair, sql)
        if moved == ["main.o"] and "GROUP BY" in moved_scan(pair, sql):
            eager += 1
    assert eager >= 20, eager
