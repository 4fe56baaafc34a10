"""Repartition joins (query.planner `Split`): a partitioned table joined on another's
partition key (a column of the same type) is scanned first and dealt out by that column,
each row to the fragment of the partition its value falls in — and the query still answers
exactly as single-node DuckDB: the same columns, DuckDB types, Arrow types and rows
(query.harness.Pair).

EXPLAIN must show the repartition for the shapes where it is right (either side of an
outer join, a chain through a repartitioned table, a self-join, a RANGE partitioning),
and not where it is wrong (LIST partitions, a key of another type); each fragment must
receive exactly the rows of its own partition; generated queries mixing join kinds,
conditions, groupings and derived tables must agree with DuckDB; and rows dealt out past
the limit at run time fall back to a gather.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import duckdb
import pytest

from query import coordinator as coordinator_module
from query import planner, scans
from storage.placement import partition_expression
from tests.unit.query.harness import Pair

SETUP = [
    "CREATE TABLE c (ck INTEGER, name VARCHAR, seg VARCHAR, joined TIMESTAMPTZ) "
    "PARTITION BY HASH(ck) PARTITIONS 3",
    "CREATE TABLE o (ok BIGINT, ck INTEGER, total DECIMAL(15,2), note VARCHAR, d DATE) "
    "PARTITION BY HASH(ok) PARTITIONS 3",
    "CREATE TABLE li (ok BIGINT, qty INTEGER, price DECIMAL(15,2)) PARTITION BY HASH(ok) PARTITIONS 3",
    "CREATE TABLE rc (ck INTEGER, limit_ DECIMAL(10,2)) PARTITION BY RANGE(ck) (10, 30)",
    "CREATE TABLE lc (ck INTEGER, tag VARCHAR) PARTITION BY LIST(ck) ((1, 2, 3), (4, 5, NULL))",
    "CREATE TABLE wide (ck BIGINT, w VARCHAR) PARTITION BY HASH(ck) PARTITIONS 3",
    "CREATE TABLE e (ek BIGINT, parent BIGINT, label VARCHAR) PARTITION BY HASH(ek) PARTITIONS 2",
    "CREATE TABLE r (rk INTEGER, region VARCHAR) REFERENCE",
    # customers 0..398 and one NULL key: too many to broadcast beside 600 orders; skewed
    # orders: every fifth on customer 1, some on no customer, some with a NULL customer
    "INSERT INTO c SELECT CASE WHEN i = 399 THEN NULL ELSE i END, 'cüstomer ' || i, "
    "['BUILDING', 'AUTO', NULL][i % 3 + 1], "
    "TIMESTAMPTZ '2024-01-01 00:00:00+01' + INTERVAL (i) DAY FROM range(400) t(i)",
    "INSERT INTO o SELECT i, CASE WHEN i % 5 = 0 THEN 1 WHEN i % 11 = 0 THEN NULL "
    "ELSE i % 450 END, (i * 37 % 1000) / 4.0, CASE WHEN i % 4 = 0 THEN NULL "
    "ELSE 'nöte ' || (i % 9) END, DATE '1995-01-01' + (i % 300)::INTEGER FROM range(600) t(i)",
    "INSERT INTO li SELECT i % 600, i % 50, (i % 97) * 1.01 FROM range(1800) t(i)",
    "INSERT INTO rc SELECT i, i * 2.5 FROM range(45) t(i)",
    "INSERT INTO lc SELECT i % 5 + 1, 'tag ' || i FROM range(12) t(i)",
    "INSERT INTO wide SELECT i, 'w' || i FROM range(50) t(i)",
    "INSERT INTO e SELECT i, CASE WHEN i % 7 = 0 THEN NULL ELSE i // 3 END, 'node ' || i "
    "FROM range(200) t(i)",
    "INSERT INTO r SELECT i, 'région ' || i FROM range(5) t(i)",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as pair:  # row estimates after the inserts
        yield pair


def plan_of(pair: Pair, sql: str) -> tuple[str, list[str], list[str]]:
    """(the plan's tier, or 'gather'; the tables EXPLAIN says are repartitioned; those
    it says are broadcast)."""
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    tier = str(rows[0][2]) if rows[0][0] == "plan" else "gather"
    steps = [str(row[0]) for row in rows]
    moved = [s.removeprefix("repartition ") for s in steps if s.startswith("repartition ")]
    whole = [s.removeprefix("broadcast ") for s in steps if s.startswith("broadcast ")]
    return tier, moved, whole


Q13 = (
    "SELECT c_count, count(*) AS custdist FROM (SELECT c.ck, count(o.ok) FROM c "
    "LEFT OUTER JOIN o ON c.ck = o.ck AND o.note NOT LIKE '%3%' GROUP BY c.ck) "
    "AS c_orders (c_ck, c_count) GROUP BY c_count ORDER BY custdist DESC, c_count DESC"
)

# (tier, repartitioned tables, broadcast tables, query)
SHAPES = [
    # TPC-H q13's shape: the preserved side (c) cannot be broadcast; o is dealt out by ck
    ("two_phase", ["main.o"], [], Q13),
    (
        "pushdown (grouped by the key)",
        ["main.o"],
        [],
        "SELECT c.ck, c.name, count(o.ok), sum(o.total) FROM c LEFT JOIN o ON o.ck = c.ck "
        "GROUP BY c.ck, c.name ORDER BY 1 NULLS FIRST",
    ),
    (  # o preserved and repartitioned: its NULL and unmatched customers appear once
        "pushdown",
        ["main.o"],
        [],
        "SELECT o.ok, o.ck, c.name FROM c RIGHT JOIN o ON o.ck = c.ck ORDER BY 1",
    ),
    (
        "two_phase",
        ["main.o"],
        [],
        "SELECT count(*), count(o.ok), count(c.ck), sum(o.total) FROM o FULL JOIN c "
        "ON o.ck = c.ck AND c.seg = 'AUTO'",
    ),
    (  # grouped by the null-extended side's key: its NULL group comes from every partition
        "two_phase",
        ["main.o"],
        [],
        "SELECT c.ck, count(*) FROM o FULL JOIN c ON o.ck = c.ck GROUP BY c.ck ORDER BY 1",
    ),
    (
        "two_phase",
        ["main.o"],
        [],
        "SELECT c.seg, count(DISTINCT o.ck), max(o.ck) FROM c, o "
        "WHERE c.ck = o.ck AND o.d < DATE '1995-06-01' GROUP BY c.seg ORDER BY 1 NULLS LAST",
    ),
    (  # routed: only the partition of customer 7 answers, with o's rows for it
        "pushdown + router",
        ["main.o"],
        [],
        "SELECT o.ok, c.name FROM c JOIN o ON o.ck = c.ck WHERE c.ck = 7 ORDER BY 1",
    ),
    (  # a chain: li is dealt out by qty through o.ck, o itself repartitioned by ck
        "two_phase",
        ["main.o", "main.li"],
        [],
        "SELECT c.seg, count(*), sum(li.price) FROM c JOIN o ON o.ck = c.ck "
        "JOIN li ON li.qty = o.ck GROUP BY 1 ORDER BY 1 NULLS FIRST",
    ),
    (  # a self-join: the children are dealt out by their parent
        "pushdown",
        ["main.e"],
        [],
        "SELECT child.ek, child.label, parent.label FROM e child JOIN e parent "
        "ON child.parent = parent.ek ORDER BY 1",
    ),
    (
        "two_phase",
        ["main.o"],
        [],
        "SELECT r.region, count(*), sum(o.total) FROM c JOIN o ON o.ck = c.ck "
        "JOIN r ON r.rk = c.ck % 5 GROUP BY 1 ORDER BY 1",
    ),
    (  # a RANGE partitioning deals out as well
        "two_phase",
        ["main.o"],
        [],
        "SELECT rc.limit_, count(o.ok) FROM rc LEFT JOIN o ON o.ck = rc.ck GROUP BY 1 ORDER BY 1",
    ),
    (  # o and li stay co-located; c is small: broadcast, not repartitioned
        "two_phase",
        [],
        ["main.c"],
        "SELECT c.seg, sum(li.price) FROM li JOIN o ON o.ok = li.ok JOIN c ON c.ck = o.ck "
        "GROUP BY 1 ORDER BY 1",
    ),
    # a LIST partition may hold none of a value: o is not dealt out into it
    ("gather", [], [], "SELECT lc.tag, count(o.ok) FROM lc LEFT JOIN o ON o.ck = lc.ck GROUP BY 1"),
    # an INTEGER is not hashed as a BIGINT: no repartition by a key of another type
    (
        "gather",
        [],
        [],
        "SELECT wide.w, count(o.ok) FROM wide LEFT JOIN o ON o.ck = wide.ck GROUP BY 1",
    ),
    # the derived table groups across partitions (by seg): gathered
    (
        "gather",
        [],
        [],
        "SELECT max(n) FROM (SELECT c.seg, count(*) AS n FROM c JOIN o ON o.ck = c.ck "
        "GROUP BY c.seg) AS t",
    ),
]


@pytest.mark.parametrize(
    ("tier", "moved", "whole", "sql"), SHAPES, ids=[s[:50] for *_, s in SHAPES]
)
def test_each_shape_is_planned_as_expected_and_answers_as_duckdb(
    pair: Pair, tier: str, moved: list[str], whole: list[str], sql: str
) -> None:
    assert plan_of(pair, sql) == (tier, moved, whole)
    pair.run(sql, ordered="ORDER BY" in sql)


def test_each_fragment_gets_exactly_its_partitions_rows(pair: Pair) -> None:
    """Dealt out by ck: every row of o scanned reaches one fragment, the one of the
    partition its ck hashes to under c's partitioning (a NULL ck too: it hashes)."""
    sql = "SELECT c.name, o.ok FROM c RIGHT JOIN o ON o.ck = c.ck"
    calls = len(pair.port.fragment_calls)
    pair.run(sql)
    scan_call, fragment_call = pair.port.fragment_calls[calls:]
    assert len(scan_call[1]) == 3  # o's partitions, scanned
    spec = pair.coordinator._work.specs["main.c"]
    hashed = duckdb.connect()
    dealt = 0
    for fragment in fragment_call[1]:
        ((name, rows),) = fragment.inputs
        partition = int(fragment.reads[0][1])
        assert all(table == "main.c" for table, _ in fragment.reads), fragment.reads
        hashed.register("dealt", rows)
        found = hashed.execute(
            f"SELECT DISTINCT {partition_expression(spec, 'ck')} FROM dealt"
        ).fetchall()
        hashed.unregister("dealt")
        assert found in ([(partition,)], []), (name, partition, found)
        dealt += rows.num_rows
    assert dealt == 600


def test_explain_analyze_shows_what_was_dealt_out(pair: Pair) -> None:
    sql = "SELECT c.name, o.ok FROM c JOIN o ON o.ck = c.ck WHERE o.total > 100"
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = {str(row[0]): row for row in rows}
    assert steps["repartition main.o"][1] == 'each fragment its rows, by "ck"'
    assert steps["repartition main.o"][2] == (
        'SELECT "ok", "ck" FROM "main"."o" WHERE ((total > 100)), sent as dcluster_rows_0'
    )
    scanned = [row for row in rows if row[0] == "scanned main.o"]
    total = sum(int(row[3]) for row in scanned)
    expected = pair.reference.execute("SELECT count(*) FROM o WHERE total > 100").fetchall()
    assert total == expected[0][0]
    sent = steps["repartition dcluster_rows_0"]
    assert sent[1] == 'dealt by "ck" as dcluster_rows_0 to 3 fragments'
    assert int(sent[3]) == total
    pair.run(sql)


def test_rows_dealt_past_the_limit_are_gathered(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "REPARTITION_BYTES_MAX", 1)
    sql = "SELECT c.ck, o.ok, o.note FROM c LEFT JOIN o ON o.ck = c.ck"
    steps = [row[0] for row in pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    assert "gather" in steps and "merge" not in steps, steps
    assert steps.count("scanned main.o") == 3, steps  # its rows read once, and reused
    pair.run(sql)
    # o's moved scan left out a column the gather needs (and sent counts): read again
    steps = [row[0] for row in pair.coordinator.execute("EXPLAIN ANALYZE " + Q13).fetchall()]
    assert "gather" in steps and steps.count("scanned main.o") == 6, steps
    pair.run(Q13, ordered=True)


def test_a_moved_table_sends_only_what_its_scan_did_not_apply(pair: Pair) -> None:
    """q13's ON condition on o is applied by o's scan: the fragment reads TRUE in its
    place, and the note column, named nowhere else, is not sent (nor is ok: its counts
    per customer are, test_eager)."""
    rows = pair.coordinator.execute("EXPLAIN " + Q13).fetchall()
    steps = {str(row[0]): str(row[2]) for row in rows}
    assert steps["repartition main.o"] == (
        'SELECT "ck", count("ok") AS "dcluster_eager_0" FROM "main"."o" '
        "WHERE ((note !~~ '%3%')) GROUP BY \"ck\", sent as dcluster_rows_0"
    )
    assert "note" not in steps["fragment"] and "(c.ck = o.ck) AND true" in steps["fragment"]


@pytest.mark.parametrize(
    "sql",
    [  # o is NULL-extended before the WHERE: its condition must stay in the fragment
        "SELECT c.ck, o.ok FROM c LEFT JOIN o ON o.ck = c.ck WHERE o.total > 100 "
        "OR o.total IS NULL",
        "SELECT c.ck, count(o.ok) FROM c LEFT JOIN o ON o.ck = c.ck WHERE o.total > 100 GROUP BY 1",
        "SELECT count(*) FROM o FULL JOIN c ON o.ck = c.ck WHERE o.note LIKE '%4'",
        # … and inside the ON of an outer join above
        "SELECT count(*), count(o.ok) FROM c x LEFT JOIN (c LEFT JOIN o ON o.ck = c.ck) "
        "ON x.ck = c.ck AND o.total > 10",
    ],
)
def test_a_condition_after_an_outer_join_stays(pair: Pair, sql: str) -> None:
    assert plan_of(pair, sql)[1] == ["main.o"]
    pair.run(sql)


def test_a_moved_table_waits_for_the_keys_of_a_smaller_one(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c and wide are both broadcast to o and li; c's scan is narrowed by the keys of the
    filtered wide (read first, query.scans.read_scans), as q09's partsupp by part's."""
    monkeypatch.setattr(scans, "TARGET_ROWS_MIN", 0)  # these tables are tiny
    sql = (
        "SELECT c.seg, count(*), sum(li.price) FROM li JOIN o ON o.ok = li.ok "
        "JOIN c ON c.ck = o.ck JOIN wide ON wide.ck = c.ck WHERE wide.w LIKE 'w1%' "
        "GROUP BY 1 ORDER BY 1 NULLS FIRST"
    )
    assert plan_of(pair, sql) == ("two_phase", [], ["main.c", "main.wide"])
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = [str(row[0]) for row in rows]
    keys = steps.index("keys of main.wide.ck")
    assert steps.index("scanned main.wide") < keys < steps.index("scanned main.c")
    scanned = sum(int(row[3]) for row in rows if row[0] == "scanned main.c")
    assert scanned == 11  # w1, w10 … w19: 11 keys, one customer each
    pair.run(sql, ordered=True)


def test_an_error_in_a_repartitioned_column_is_duckdbs(pair: Pair) -> None:
    sql = "SELECT c.name FROM c JOIN o ON o.ck = c.ck WHERE CAST(left(o.note, 4) AS INTEGER) > 0"
    assert plan_of(pair, sql)[:2] == ("pushdown", ["main.o"])
    pair.run(sql, fails=True)


def test_without_repartitioning_the_preserved_side_is_gathered(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner, "REPARTITION_ROWS_MAX", -1)
    q13 = "select" + Q13.removeprefix("SELECT")  # another text: Q13's plan is remembered
    tier, moved, whole = plan_of(pair, q13)
    assert (tier, moved, whole) == ("gather", [], [])
    pair.run(q13, ordered=True)


# ---- generated queries ----

C_CONDITIONS = ["c.seg = 'AUTO'", "c.seg IS NULL", "c.name LIKE '%1%'", "c.ck % 4 = 1"]
O_CONDITIONS = ["o.total > 120", "o.note IS NULL", "o.note <> 'nöte 2'", "o.d > DATE '1995-05-01'"]
JOINS = ["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN", ","]
SELECTS = [
    ("c.ck, c.name, o.ok, o.total", ""),
    ("count(*), count(o.ok), count(c.ck), sum(o.total), max(c.joined)", ""),
    ("c.seg, count(*), avg(o.total), bool_or(o.note IS NULL)", " GROUP BY c.seg"),
    ("c.ck, count(o.ok), max(o.d)", " GROUP BY c.ck"),
    ("o.ck, count(*), min(c.name)", " GROUP BY o.ck"),
]


def generated_query(rng: random.Random) -> str:
    join = rng.choice(JOINS)
    on_terms = ["o.ck = c.ck"] + rng.sample(C_CONDITIONS + O_CONDITIONS, rng.randint(0, 2))
    where_terms = rng.sample(C_CONDITIONS + O_CONDITIONS, rng.randint(0, 2))
    left, right = ("o", "c") if rng.random() < 0.5 else ("c", "o")
    if join == ",":
        source = f"{left}, {right}"
        where_terms = on_terms + where_terms
    else:
        source = f"{left} {join} {right} ON {' AND '.join(on_terms)}"
    if rng.random() < 0.25:
        source += " LEFT JOIN r ON r.rk = c.ck % 5"
    select, group = rng.choice(SELECTS)
    where = f" WHERE {' AND '.join(where_terms)}" if where_terms else ""
    query = f"SELECT {select} FROM {source}{where}{group}"
    if group and rng.random() < 0.3:  # aggregate its groups again, as q13 does
        return f"SELECT count(*), sum(n) FROM (SELECT count(*) AS n FROM ({query}) AS g) AS t"
    if group == " GROUP BY c.ck" and rng.random() < 0.5:
        inner = query.replace("count(o.ok)", "count(o.ok) AS k", 1)
        return f"SELECT k, count(*) FROM ({inner}) AS t GROUP BY k"
    return query


@pytest.mark.parametrize("seed", range(100))
def test_generated_queries_answer_as_duckdb(pair: Pair, seed: int) -> None:
    pair.run(generated_query(random.Random(seed)))


def test_many_generated_queries_are_repartitioned(pair: Pair) -> None:
    """The generated queries above do exercise repartitioned plans, not only gathers."""
    plans = [plan_of(pair, generated_query(random.Random(seed))) for seed in range(100)]
    repartitioned = sum(1 for _, moved, _ in plans if moved == ["main.o"])
    assert repartitioned >= 40, plans
