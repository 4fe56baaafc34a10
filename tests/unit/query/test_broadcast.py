"""Broadcast joins (query.planner): a query over partitioned tables that are not co-located
runs on the partitions of its largest group of co-located tables, with every other table
scanned first and sent whole to each fragment — and still answers exactly as single-node
DuckDB: the same columns, DuckDB types, Arrow types and rows (query.harness.Pair).

EXPLAIN must show the broadcast for the shapes where it is right (the preserved side of an
outer join is never broadcast, nor a table as large as the one it joins), generated
queries mixing join kinds, conditions and aggregates must agree with DuckDB, and a
broadcast that comes out too large at run time falls back to a gather.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from query import coordinator as coordinator_module
from tests.unit.query.harness import Pair

SETUP = [
    "CREATE TABLE f (fk BIGINT, dk INTEGER, amount DECIMAL(18,3), seen TIMESTAMPTZ, "
    "label VARCHAR, d DATE, x DOUBLE) PARTITION BY HASH(fk) PARTITIONS 3",
    "CREATE TABLE g (fk BIGINT, qty INTEGER, note VARCHAR) PARTITION BY HASH(fk) PARTITIONS 3",
    "CREATE TABLE dim (dk INTEGER, name VARCHAR, since TIMESTAMPTZ, price DECIMAL(10,2), "
    "big HUGEINT, span INTERVAL, raw BLOB, flag BOOLEAN, t TIME) "
    "PARTITION BY HASH(dk) PARTITIONS 2",
    "CREATE TABLE em (dk INTEGER, m ENUM('sad', 'ok', 'happy')) PARTITION BY HASH(dk) PARTITIONS 2",
    "CREATE TABLE r (rk INTEGER, region VARCHAR) REFERENCE",
    "CREATE TABLE z (dk INTEGER, w VARCHAR) PARTITION BY HASH(dk) PARTITIONS 2",
    "INSERT INTO f SELECT i, CASE WHEN i % 13 = 0 THEN NULL ELSE i % 45 END, "
    "(i * 7 % 1000) / 8.0, TIMESTAMPTZ '2024-03-01 12:00:00+00' + INTERVAL (i) MINUTE, "
    "CASE WHEN i % 6 = 0 THEN NULL ELSE 'ñ€' || (i % 9) END, DATE '2020-01-01' + (i % 50)::INTEGER, "
    "(i % 17) / 3.0 FROM range(900) t(i)",
    "INSERT INTO g SELECT i % 900, i % 40, 'g' || (i % 5) FROM range(1500) t(i)",
    "INSERT INTO dim SELECT CASE WHEN i = 7 THEN NULL ELSE i % 38 END, "
    "CASE WHEN i % 5 = 0 THEN NULL ELSE 'dím ' || (i % 11) END, "
    "TIMESTAMPTZ '2023-06-01 00:00:00+02' + INTERVAL (i) HOUR, i * 1.25, "
    "170141183460469231731687303715884105727 - i, INTERVAL (i) DAY + INTERVAL 3 MONTH, "
    "encode('b' || i), i % 3 = 0, TIME '10:00:00' + INTERVAL (i) MINUTE FROM range(40) t(i)",
    "INSERT INTO em SELECT i, ['sad', 'ok', 'happy'][i % 3 + 1] FROM range(30) t(i)",
    "INSERT INTO r SELECT i, 'région ' || i FROM range(5) t(i)",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as pair:  # row estimates after the inserts
        yield pair


def plan_of(pair: Pair, sql: str) -> tuple[str, list[str]]:
    """(the plan's tier, or 'gather'; the tables EXPLAIN says are broadcast)."""
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    tier = str(rows[0][2]) if rows[0][0] == "plan" else "gather"
    broadcast = [
        str(row[0]).removeprefix("broadcast ") for row in rows if row[1] == "every fragment"
    ]
    return tier, broadcast


# (tier, broadcast tables, query)
SHAPES = [
    (
        "pushdown",
        ["main.dim"],
        "SELECT f.fk, dim.name, dim.since, dim.price, dim.big, dim.span, dim.raw, dim.flag, "
        "dim.t FROM f JOIN dim ON f.dk = dim.dk ORDER BY 1, 2 NULLS FIRST",
    ),
    (
        "pushdown",
        ["main.dim"],
        "SELECT f.fk, f.seen, f.label, d.name FROM f LEFT JOIN dim d ON f.dk = d.dk "
        "AND d.flag WHERE f.x > 2 ORDER BY 1, 4 NULLS LAST",
    ),
    (
        "pushdown",
        ["main.dim"],
        "SELECT f.*, dim.* FROM dim RIGHT JOIN f ON f.dk = dim.dk ORDER BY f.fk, dim.name",
    ),
    (
        "two_phase",
        ["main.dim"],
        "SELECT dim.name, count(*), sum(f.amount), max(f.x), min(f.seen), max(dim.since) "
        "FROM f, dim WHERE f.dk = dim.dk AND dim.price > 10 GROUP BY dim.name "
        "ORDER BY 1 NULLS FIRST",
    ),
    (
        "pushdown (grouped by the key)",
        ["main.dim"],
        "SELECT f.fk, count(dim.dk), string_agg(dim.name, ',' ORDER BY dim.name) "
        "FROM f JOIN g ON f.fk = g.fk LEFT JOIN dim ON dim.dk = g.qty GROUP BY f.fk "
        "ORDER BY 2 DESC, 1 LIMIT 25",
    ),
    (
        "two_phase",
        ["main.dim", "main.z"],
        "SELECT r.region, count(*), sum(g.qty) FROM g JOIN f ON f.fk = g.fk "
        "JOIN dim ON dim.dk = f.dk LEFT JOIN z ON z.dk = f.dk JOIN r ON r.rk = f.dk % 5 "
        "GROUP BY ROLLUP (r.region) ORDER BY 1 NULLS FIRST",
    ),
    (
        "pushdown",
        ["main.dim"],
        "SELECT DISTINCT dim.name FROM f JOIN dim ON f.dk = dim.dk WHERE f.fk < 300 "
        "ORDER BY 1 NULLS FIRST",
    ),
    (
        "pushdown",
        ["main.dim"],
        "SELECT f.fk, d1.name, d2.name FROM f JOIN dim d1 ON d1.dk = f.dk "
        "JOIN dim d2 ON d2.dk = f.dk + 1 ORDER BY 1, 2, 3 LIMIT 40 OFFSET 3",
    ),
    # the preserved side of an outer join is never broadcast
    (  # the preserved side is not broadcast: f is repartitioned by dk instead
        "pushdown (grouped by the key)",
        [],
        "SELECT dim.dk, count(f.fk) FROM dim LEFT JOIN f ON f.dk = dim.dk GROUP BY 1 ORDER BY 1",
    ),
    ("gather", [], "SELECT count(*), count(f.fk), count(dim.dk) FROM f FULL JOIN dim USING (dk)"),
    # an ENUM does not travel exactly
    ("gather", [], "SELECT em.m, count(*) FROM f JOIN em ON em.dk = f.dk GROUP BY 1 ORDER BY 1"),
    # as large as the other side
    ("gather", [], "SELECT count(*) FROM f a JOIN f b ON a.dk = b.fk"),
]


@pytest.mark.parametrize(("tier", "broadcast", "sql"), SHAPES, ids=[s[:50] for *_, s in SHAPES])
def test_each_shape_is_planned_as_expected_and_answers_as_duckdb(
    pair: Pair, tier: str, broadcast: list[str], sql: str
) -> None:
    assert plan_of(pair, sql) == (tier, broadcast)
    pair.run(sql, ordered="ORDER BY" in sql)


def test_explain_analyze_shows_the_scan_and_what_was_sent(pair: Pair) -> None:
    sql = (
        "SELECT dim.name, count(*) FROM f JOIN dim ON f.dk = dim.dk WHERE dim.price < 20 "
        "GROUP BY 1 ORDER BY 1"
    )
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = {str(row[0]): row for row in rows}
    assert steps["broadcast main.dim"][2] == (
        'SELECT "dk", "name" FROM "main"."dim" WHERE ((price < 20)), sent as dcluster_rows_0'
    )  # price is not sent: the scan applied the only condition naming it
    scanned = [row for row in rows if row[0] == "scanned main.dim"]
    assert len(scanned) == 2  # one per partition of dim
    assert sum(int(row[3]) for row in scanned) == 16  # price = i * 1.25 < 20: i < 16
    sent = steps["broadcast dcluster_rows_0"]
    assert sent[1] == "sent as dcluster_rows_0 to 3 fragments"
    assert sent[3] == "16"
    assert [row[0] for row in rows if str(row[0]).startswith("partition ")] == [
        "partition 0",
        "partition 1",
        "partition 2",
    ]


def test_a_broadcast_scan_keeps_only_rows_a_filtered_reference_table_can_join(
    pair: Pair,
) -> None:
    """r is held wherever dim is: dim's scan joins it there, and sends one row, not 40."""
    sql = (
        "SELECT r.region, dim.name, sum(f.amount) FROM f JOIN dim ON f.dk = dim.dk "
        "JOIN r ON dim.dk = r.rk WHERE r.region = 'région 2' GROUP BY 1, 2"
    )
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = {str(row[0]): row for row in rows}
    assert steps["broadcast main.dim"][2] == (
        'SELECT "dk", "name" FROM "main"."dim" WHERE ("dk" IN (SELECT "rk" FROM "main"."r" '
        "WHERE ((region = 'région 2')))), sent as dcluster_rows_0"
    )
    assert steps["broadcast dcluster_rows_0"][3] == "1"
    pair.run(sql)


def test_a_broadcast_too_large_at_run_time_is_gathered(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "BROADCAST_BYTES_MAX", 1)
    sql = (  # f is filtered: what a gather reads of it is not known, so it may be little;
        # dim is filtered too: how large it comes out is known only once it is read
        "SELECT dim.name, sum(f.amount) FROM f JOIN dim ON f.dk = dim.dk "
        "WHERE f.fk % 3 = 1 AND dim.name <> 'zz' GROUP BY 1"
    )
    steps = [row[0] for row in pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    assert "gather" in steps and "broadcast dcluster_rows_0" not in steps, steps
    assert "scanned main.f" in steps and "merge" not in steps, steps  # then gathered
    assert steps.count("scanned main.dim") == 2, steps  # its rows read once, and reused
    pair.run(sql)


def test_a_broadcast_sure_to_be_too_large_is_not_read_first(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dim read whole: its estimated size (rows times column widths) is over the limit
    before it is read, so the query gathers at once — one round fewer, and dim narrowed
    by f's keys rather than read whole. (Joined on an expression of dim's key, f cannot be
    dealt out to dim's partitions instead.)"""
    monkeypatch.setattr(coordinator_module, "BROADCAST_BYTES_MAX", 1)
    sql = (
        "SELECT dim.name, sum(f.amount) FROM f JOIN dim ON f.dk = dim.dk + 0 "
        "WHERE f.fk % 3 = 1 GROUP BY 1"
    )
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = [row[0] for row in rows]
    assert "gather" in steps and "merge" not in steps, steps
    assert any("would come to about" in str(row[2]) for row in rows), rows
    assert steps.index("gather") < steps.index("scanned main.dim"), steps  # read once, after
    assert "scanned main.f" in steps, steps
    pair.run(sql)


def test_a_filtered_table_is_repartitioned_rather_than_a_large_one_broadcast(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As TPC-H q14: dim read whole is sure to be too large to send to every fragment, but
    f, filtered, can be dealt out by dk to dim's partitions: its filtered rows move once,
    dim stays where it is, and nothing is gathered."""
    monkeypatch.setattr(coordinator_module, "BROADCAST_BYTES_MAX", 1)
    sql = (
        "SELECT dim.name, sum(f.amount) FROM f JOIN dim ON f.dk = dim.dk "
        "WHERE f.fk % 3 = 1 GROUP BY 1"
    )
    rows = pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    steps = [row[0] for row in rows]
    assert "gather" not in steps and "repartition main.f" in steps, steps
    assert "scanned main.dim" not in steps and "merge" in steps, steps
    pair.run(sql)
    monkeypatch.setattr(coordinator_module, "BROADCAST_BYTES_MAX", 10**9)  # not too large
    fresh = sql.replace("GROUP BY", "GROUP  BY")  # a new text: plans are remembered by text
    plan = pair.coordinator.execute("EXPLAIN " + fresh).fetchall()
    assert "broadcast main.dim" in [row[0] for row in plan], plan  # fewer rows moved


def test_a_large_broadcast_is_sent_when_a_gather_would_read_more_of_whole_tables(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f read whole (no condition): the gather would move all of it, more than the
    broadcast of dim sends to every fragment — so dim is sent, though over the limit."""
    monkeypatch.setattr(coordinator_module, "BROADCAST_BYTES_MAX", 1)
    sql = "SELECT dim.name, sum(f.amount) FROM f JOIN dim ON f.dk = dim.dk GROUP BY 1"
    steps = [row[0] for row in pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    assert "gather" not in steps and "broadcast dcluster_rows_0" in steps, steps
    assert "merge" in steps and "scanned main.f" not in steps, steps
    pair.run(sql)
    monkeypatch.setattr(coordinator_module, "BROADCAST_WHOLE_BYTES_MAX", 1)  # not that large
    steps = [row[0] for row in pair.coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    assert "gather" in steps and "merge" not in steps, steps
    pair.run(sql)


def test_an_error_on_a_broadcast_column_is_duckdbs(pair: Pair) -> None:
    sql = "SELECT f.fk FROM f JOIN dim ON f.dk = dim.dk WHERE CAST(dim.name AS INTEGER) > 0"
    assert plan_of(pair, sql) == ("pushdown", ["main.dim"])
    pair.run(sql, fails=True)


def test_an_empty_broadcast_table_joins_nothing(pair: Pair) -> None:
    sql = "SELECT f.fk, z.w FROM f LEFT JOIN z ON z.dk = f.dk WHERE f.fk < 5 ORDER BY 1"
    assert plan_of(pair, sql) == ("pushdown", ["main.z"])
    pair.run(sql, ordered=True)
    inner = "SELECT count(*), sum(f.x) FROM f JOIN z ON z.dk = f.dk"
    assert plan_of(pair, inner) == ("two_phase", ["main.z"])
    pair.run(inner)


# ---- generated queries ----

F_CONDITIONS = ["f.x > 2", "f.label IS NULL", "f.label LIKE '%3'", "f.fk % 4 = 1", "f.dk < 20"]
DIM_CONDITIONS = [
    "dim.flag",
    "dim.name IS NULL",
    "dim.price > 20",
    "coalesce(dim.name, '-') <> 'dím 3'",
    "dim.since < TIMESTAMPTZ '2023-06-02 00:00:00+00'",
]
JOINS = ["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN", ","]
SELECTS = [
    "f.fk, f.amount, dim.name, dim.big",
    "count(*), count(dim.dk), sum(f.amount), max(dim.span), min(dim.raw)",
    "dim.name, count(*), max(f.x), bool_or(dim.flag)",
    "f.fk, max(dim.name), sum(dim.price)",
]


def generated_query(rng: random.Random) -> str:
    join = rng.choice(JOINS)
    on_terms = ["f.dk = dim.dk"] + rng.sample(F_CONDITIONS + DIM_CONDITIONS, rng.randint(0, 2))
    where_terms = rng.sample(F_CONDITIONS + DIM_CONDITIONS, rng.randint(0, 2))
    left, right = ("dim", "f") if rng.random() < 0.25 else ("f", "dim")
    if join == ",":
        source = f"{left}, {right}"
        where_terms = on_terms + where_terms
    else:
        source = f"{left} {join} {right} ON {' AND '.join(on_terms)}"
    if rng.random() < 0.3:
        source += " JOIN g ON g.fk = f.fk"
        where_terms.append(rng.choice(["g.qty > 5", "g.note <> 'g2'", "g.qty IS NOT NULL"]))
    select = rng.choice(SELECTS)
    where = f" WHERE {' AND '.join(where_terms)}" if where_terms else ""
    group = ""
    if select.startswith("dim.name"):
        group = " GROUP BY dim.name"
    elif select.startswith("f.fk, max"):
        group = " GROUP BY f.fk"
    return f"SELECT {select} FROM {source}{where}{group}"


@pytest.mark.parametrize("seed", range(100))
def test_generated_queries_answer_as_duckdb(pair: Pair, seed: int) -> None:
    pair.run(generated_query(random.Random(seed)))


def test_most_generated_queries_are_broadcast(pair: Pair) -> None:
    """The generated queries above do exercise broadcast plans, not only gathers."""
    plans = [plan_of(pair, generated_query(random.Random(seed))) for seed in range(100)]
    broadcast = sum(1 for _, tables in plans if tables == ["main.dim"])
    assert broadcast >= 50, plans
