"""Narrow gathers (query.scans): a gathered query reads only the columns and rows it can
use, and still answers exactly as single-node DuckDB.

What each scan keeps is read from EXPLAIN (one `scan <table>` row per table, with the
SELECT it runs on the partitions), and every query also runs on plain DuckDB over the same
rows. The generated queries mix inner, outer, semi and anti joins with conditions that do
and do not reject NULLs, the shapes where moving a filter below a join goes wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from query import planner
from query.coordinator import Coordinator, ExecutionFailed
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import beside_duckdb

SETUP = [
    "CREATE TABLE a (k INTEGER, x INTEGER, s VARCHAR, extra VARCHAR) "
    "PARTITION BY HASH(k) PARTITIONS 3",
    "CREATE TABLE b (k INTEGER, y INTEGER, s VARCHAR) PARTITION BY HASH(y) PARTITIONS 2",
    "CREATE TABLE r (k INTEGER, z VARCHAR) REFERENCE",
    "CREATE TABLE g (k INTEGER, twice INTEGER GENERATED ALWAYS AS (k * 2)) "
    "PARTITION BY HASH(k) PARTITIONS 2",
    "CREATE VIEW av AS SELECT k, x FROM a WHERE x > 2",
    "INSERT INTO a SELECT i % 12, CASE WHEN i % 5 = 0 THEN NULL ELSE i % 9 END, "
    "CASE WHEN i % 4 = 0 THEN NULL ELSE 'a' || (i % 6) END, 'unused ' || i FROM range(60) t(i)",
    "INSERT INTO b SELECT i % 10, CASE WHEN i % 7 = 0 THEN NULL ELSE i % 6 END, "
    "CASE WHEN i % 3 = 0 THEN NULL ELSE 'b' || (i % 4) END FROM range(45) t(i)",
    "INSERT INTO r SELECT i, CASE WHEN i % 3 = 0 THEN NULL ELSE 'r' || i END FROM range(8) t(i)",
    "INSERT INTO g SELECT i FROM range(10) t(i)",
]


@pytest.fixture(autouse=True)
def nothing_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joins these tests gather would otherwise be broadcast or repartitioned joins
    (query.planner)."""
    monkeypatch.setattr(planner, "BROADCAST_ROWS_MAX", -1)
    monkeypatch.setattr(planner, "REPARTITION_ROWS_MAX", -1)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection]]:
    with beside_duckdb(SETUP) as pair:
        yield pair


Pair = tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection]


def scans(coordinator: Coordinator, sql: str) -> dict[str, str] | str:
    """Table -> the SELECT its scan runs; or why whole tables were gathered."""
    rows = coordinator.execute("EXPLAIN " + sql).fetchall()
    assert rows[0][0] == "gather", rows
    whole = [row[2] for row in rows if row[0] == "whole tables"]
    if whole:
        return str(whole[0])
    return {
        str(row[0]).removeprefix("scan "): str(row[2])
        for row in rows[1:]
        if str(row[0]).startswith("scan ")
    }


def same_answer(pair: Pair, sql: str, parameters: Any = None) -> None:
    coordinator, _, reference = pair
    expected = sorted(reference.execute(sql, parameters).fetchall(), key=repr)
    assert sorted(coordinator.execute(sql, parameters).fetchall(), key=repr) == expected, sql


# ---- what each scan keeps ----

# (query, table -> (columns kept, the WHERE of its scan or None))
NARROWED = [
    (
        "SELECT a.k, b.s FROM a JOIN b ON a.k = b.k WHERE a.x > 3 AND b.s LIKE 'b%'",
        {"main.a": ('"k", "x"', "x > 3"), "main.b": ('"k", "s"', "s ~~ 'b%'")},
    ),
    (  # ON of a LEFT JOIN filters its right side; WHERE on the right side does not move
        "SELECT a.k, b.y FROM a LEFT JOIN b ON a.k = b.k AND b.y > 2 AND a.x = 1 "
        "WHERE b.s IS NULL OR b.s = 'b1'",
        {"main.a": ('"k", "x"', None), "main.b": ('"k", "y", "s"', "y > 2")},
    ),
    (
        "SELECT count(*) FROM a RIGHT JOIN b ON a.k = b.k AND a.x = 1 WHERE b.y = 3",
        {"main.a": ('"k", "x"', "x = 1"), "main.b": ('"k", "y"', "y = 3")},
    ),
    (
        "SELECT count(*) FROM a FULL JOIN b ON a.k = b.k AND a.x = 1 AND b.y = 3",
        {"main.a": ('"k", "x"', None), "main.b": ('"k", "y"', None)},
    ),
    (  # one table, two places: the OR of their conditions
        "SELECT count(*) FROM a a1 JOIN a a2 ON a1.k = a2.x WHERE a1.x > 5 AND a2.s = 'a1'",
        {"main.a": ('"k", "x", "s"', "(s = 'a1') OR (x > 5)")},
    ),
    (  # one of the places has no condition: every row
        "SELECT count(*) FROM a WHERE x > 5 AND k IN (SELECT x FROM a)",
        {"main.a": ('"k", "x"', None)},
    ),
    (  # a correlated condition stays in the subquery; the subquery's own one moves
        "SELECT k FROM a WHERE EXISTS (SELECT 1 FROM b WHERE b.k = a.k AND b.y IS NOT NULL)",
        {"main.a": ('"k"', None), "main.b": ('"k", "y"', "y IS NOT NULL")},
    ),
    (  # an unqualified name that binds inside the subquery moves with it (an unqualified
        # name anywhere keeps that column of every table: k of b too)
        "SELECT k FROM a WHERE x = (SELECT max(y) FROM b WHERE s = 'b2')",
        {"main.a": ('"k", "x", "s"', None), "main.b": ('"k", "y", "s"', "s = 'b2'")},
    ),
    (
        "SELECT * FROM a JOIN b USING (k) WHERE b.y = 1",
        {"main.a": ("*", None), "main.b": ("*", "y = 1")},
    ),
    ("SELECT a FROM a, b WHERE a.k = b.k", {"main.a": ("*", None), "main.b": ('"k"', None)}),
    (
        "SELECT count(*) FROM a, r WHERE a.k = r.k AND a.k IN (SELECT y FROM b)",
        {"main.a": ('"k"', None), "main.b": ('"y"', None), "main.r": ('"k"', None)},
    ),
    (  # a star expands over the tables of its own FROM only; an EXISTS list reads nothing
        "SELECT a.*, b.y FROM a JOIN b ON a.k = b.k WHERE EXISTS "
        "(SELECT * FROM r WHERE r.k = b.y AND r.z IS NOT NULL)",
        {
            "main.a": ("*", None),
            "main.b": ('"k", "y"', None),
            "main.r": ('"k", "z"', "z IS NOT NULL"),
        },
    ),
    (
        "SELECT * FROM (SELECT k, x FROM a WHERE x < 4) sub JOIN b ON sub.k = b.k",
        {"main.a": ('"k", "x"', "x < 4"), "main.b": ("*", None)},
    ),
    (  # an output column named like a table is not that table's whole row
        "SELECT b FROM (SELECT a.s AS b FROM a JOIN b ON a.k = b.k WHERE b.y = 1) AS sub",
        {"main.a": ('"k", "s"', None), "main.b": ('"k", "y"', "y = 1")},
    ),
    (  # an OR of branches over both tables: each table gets the OR of its own parts
        "SELECT count(*) FROM a JOIN b ON a.k = b.k WHERE (a.x = 1 AND b.y = 2 AND a.s = 'a1') "
        "OR (a.x > 5 AND b.s IS NULL) OR (a.k = 3 AND a.x + b.y = 4)",
        {
            "main.a": ('"k", "x", "s"', "x = 1 AND s = 'a1' OR x > 5 OR k = 3"),
            "main.b": ('"k", "y", "s"', None),
        },
    ),
    (  # a volatile function anywhere: no condition moves (it must run once)
        "SELECT count(*) FROM a JOIN b ON a.k = b.k WHERE a.x > random() * 0",
        {"main.a": ('"k", "x"', None), "main.b": ('"k"', None)},
    ),
]


@pytest.mark.parametrize(("sql", "expected"), NARROWED, ids=[q[:50] for q, _ in NARROWED])
def test_each_scan_keeps_what_the_query_can_use(
    pair: Pair, sql: str, expected: dict[str, tuple[str, str | None]]
) -> None:
    coordinator, _, _ = pair
    shown = scans(coordinator, sql)
    assert isinstance(shown, dict), shown
    assert sorted(shown) == sorted(expected)
    columns_of = {
        "main.a": '"k", "x", "s", "extra"',
        "main.b": '"k", "y", "s"',
        "main.r": '"k", "z"',
    }
    for table, (columns, condition) in expected.items():
        wanted_columns = columns_of[table] if columns == "*" else columns
        scan = shown[table]
        assert scan.startswith(f"SELECT {wanted_columns} FROM "), scan
        where = scan.split(" WHERE ", 1)[1] if " WHERE " in scan else None
        if condition is None:
            assert where is None, scan
        else:
            assert where is not None and re.sub(r"[()]", "", where) == re.sub(
                r"[()]", "", condition
            ), scan
    same_answer(pair, sql)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT count(*) FROM av JOIN b ON av.k = b.k", "not one cluster table"),
        ("SELECT count(*) FROM query_table('a') JOIN b USING (k)", "TABLE_FUNCTION"),
        ("SELECT count(rowid) FROM a WHERE k IN (SELECT y FROM b)", "rowid"),
        ("WITH b AS (SELECT 1 AS k) SELECT count(*) FROM a JOIN b USING (k)", "CTE and a table"),
        ("SELECT count(*) FROM g JOIN b ON g.twice = b.y", "generated columns"),
    ],
)
def test_shapes_it_cannot_be_sure_of_gather_whole_tables(pair: Pair, sql: str, reason: str) -> None:
    coordinator, _, _ = pair
    shown = scans(coordinator, sql)
    assert isinstance(shown, str) and reason in shown, shown
    same_answer(pair, sql)


def test_a_condition_with_a_parameter_stays_with_the_query(pair: Pair) -> None:
    sql = "SELECT a.k, b.y FROM a JOIN b ON a.k = b.k WHERE a.x = ? AND b.y > 1"
    coordinator, port, _ = pair
    before = len(port.fragment_calls)
    same_answer(pair, sql, [4])
    fragments = [f for _, call in port.fragment_calls[before:] for f in call]
    assert fragments, "read by scans"
    assert all("?" not in f.sql and "$" not in f.sql for f in fragments)
    assert any("(y > 1)" in f.sql for f in fragments)


def test_an_error_in_a_moved_condition_is_duckdbs(pair: Pair) -> None:
    coordinator, _, reference = pair
    sql = (
        "SELECT count(*) FROM a JOIN b ON a.k = b.k "
        "WHERE CAST(CASE WHEN b.s = 'b2' THEN 'oops' ELSE '1' END AS INTEGER) > 0"
    )
    with pytest.raises(duckdb.Error) as theirs:
        reference.execute(sql).fetchall()
    with pytest.raises(ExecutionFailed) as ours:
        coordinator.execute(sql).fetchall()
    assert str(ours.value) == str(theirs.value)


def test_the_narrow_database_is_left_empty(pair: Pair) -> None:
    coordinator, _, _ = pair
    coordinator.execute("SELECT count(*) FROM a JOIN b ON a.k = b.k").fetchall()
    with pytest.raises(ExecutionFailed):
        coordinator.execute("SELECT CAST(a.s AS INTEGER) FROM a JOIN b ON a.k = b.k").fetchall()
    con = coordinator._narrow._con
    assert con is not None
    for listing in ("duckdb_tables()", "duckdb_views() WHERE NOT internal"):
        assert con.execute(f"SELECT count(*) FROM {listing}").fetchall() == [(0,)], listing


# ---- generated queries: every join kind, conditions that do and do not reject NULLs ----

A_CONDITIONS = ["a.x > 3", "a.x IS NULL", "a.s LIKE '%1'", "coalesce(a.x, 0) = 0", "a.k < 6"]
B_CONDITIONS = [
    "b.y = 2",
    "b.y IS NULL",
    "b.y IS NULL OR b.y = 1",
    "coalesce(b.s, 'none') = 'none'",
    "b.s IS DISTINCT FROM 'b1'",
    "b.k >= 5",
]
R_CONDITIONS = ["r.z IS NULL", "r.z <> 'r2'", "r.k % 2 = 0"]
JOINS = ["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"]


def generated_query(rng: random.Random) -> str:
    join = rng.choice(JOINS + ["SEMI JOIN", "ANTI JOIN", ","])
    on_terms = ["a.k = b.k"] + rng.sample(A_CONDITIONS + B_CONDITIONS, rng.randint(0, 2))
    where_pool = A_CONDITIONS + ([] if join in ("SEMI JOIN", "ANTI JOIN") else B_CONDITIONS)
    where_terms = rng.sample(where_pool, rng.randint(0, 3))
    if join == ",":
        source = "a, b"
        where_terms = on_terms + where_terms
    else:
        source = f"a {join} b ON {' AND '.join(on_terms)}"
    if join not in ("SEMI JOIN", "ANTI JOIN") and rng.random() < 0.4:
        source += f" {rng.choice(JOINS)} r ON r.k = b.y AND {rng.choice(R_CONDITIONS)}"
        if rng.random() < 0.5:
            where_terms.append(rng.choice(R_CONDITIONS))
    if rng.random() < 0.3:
        branches = [
            " AND ".join(
                rng.sample(A_CONDITIONS, 1)
                + rng.sample(B_CONDITIONS, rng.randint(0, 1 if where_pool != A_CONDITIONS else 0))
            )
            for _ in range(rng.randint(2, 3))
        ]
        where_terms.append("(" + " OR ".join(f"({branch})" for branch in branches) + ")")
    if rng.random() < 0.3:
        inner = rng.choice(B_CONDITIONS).replace("b.", "b2.")
        where_terms.append(
            rng.choice(
                [
                    f"EXISTS (SELECT * FROM b AS b2 WHERE b2.k = a.x AND {inner})",
                    f"NOT EXISTS (SELECT * FROM b AS b2 WHERE b2.y = a.k AND {inner})",
                    f"a.x IN (SELECT b2.y FROM b AS b2 WHERE {inner})",
                ]
            )
        )
    where = f" WHERE {' AND '.join(where_terms)}" if where_terms else ""
    if join in ("SEMI JOIN", "ANTI JOIN"):
        select = "a.k, a.x, a.s"
    else:
        select = rng.choice(["a.k, a.x, b.y, b.s", "count(*), count(b.y), sum(a.x)"])
    return f"SELECT {select} FROM {source}{where}"


@pytest.mark.parametrize("seed", range(120))
def test_generated_queries_answer_as_duckdb(pair: Pair, seed: int) -> None:
    same_answer(pair, generated_query(random.Random(seed)))
