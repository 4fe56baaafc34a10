"""The planner pushes each query shape down as far as is correct, and EXPLAIN says so.

Every query here runs on the coordinator over the fake cluster and on plain DuckDB over the
same rows; results must match (DOUBLE values within 1e-9 relative: a distributed sum adds
in another order), and EXPLAIN must name the tier the query is expected to run in. The
fragments the port was asked to run are checked too: a routed query reads only the
partitions its key pins, and no fragment of a pushed-down query is a whole-table scan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from query.coordinator import Coordinator, ExecutionFailed
from query.planner import AggregateMerge, Distributed, SortMerge
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import beside_duckdb

SETUP = [
    "CREATE TABLE o (ok BIGINT, ck INTEGER, total DECIMAL(15,2), d DATE, note VARCHAR) "
    "PARTITION BY HASH(ok) PARTITIONS 4",
    "CREATE TABLE l (lk BIGINT, qty INTEGER, price DECIMAL(15,2), flag VARCHAR, x DOUBLE) "
    "PARTITION BY HASH(lk) PARTITIONS 4",
    "CREATE TABLE c (ck INTEGER, name VARCHAR) PARTITION BY HASH(ck) PARTITIONS 3",
    "CREATE TABLE n (nk INTEGER, name VARCHAR) REFERENCE",
    "CREATE TABLE e (ek BIGINT, v INTEGER) PARTITION BY HASH(ek) PARTITIONS 4",
    "INSERT INTO o SELECT i, i % 17, i * 1.5, DATE '1995-01-01' + (i % 400)::INTEGER, "
    "CASE WHEN i % 5 = 0 THEN NULL ELSE 'ñote ' || (i % 7) END FROM range(1000) t(i)",
    "INSERT INTO l SELECT i % 1000, i % 50, (i % 97) * 1.01, CASE WHEN i % 3 = 0 THEN 'A' "
    "WHEN i % 3 = 1 THEN NULL ELSE 'R' END, (i % 13) / 7.0 FROM range(4000) t(i)",
    "INSERT INTO c SELECT i, 'customer ' || i FROM range(20) t(i)",
    "INSERT INTO n SELECT i, 'nation ' || i FROM range(17) t(i)",
]

# (tier EXPLAIN must show, query)
SHAPES = [
    ("pushdown + router", "SELECT * FROM o WHERE ok = 42"),
    ("pushdown + router", "SELECT ok, total FROM o WHERE ok IN (1, 2, 3) ORDER BY ok"),
    ("pushdown + router", "SELECT ok FROM o WHERE ok = 7 AND ck = 7"),
    ("two_phase + router", "SELECT count(*) FROM o WHERE ok = -5"),
    ("two_phase", "SELECT count(*), sum(total), avg(total), min(d), max(d) FROM o"),
    # GROUP BY a select alias no column of the FROM clause has (TPC-H q15's WITH query)
    ("two_phase", "SELECT ck % 3 AS bucket, count(*) FROM o GROUP BY bucket ORDER BY bucket"),
    ("pushdown (grouped by the key)", "SELECT ok AS key, sum(total) FROM o GROUP BY key"),
    # ... but a column of that name comes first, as DuckDB binds it
    ("gather", "SELECT ck AS note, count(*) FROM o GROUP BY note, ck ORDER BY 1, 2"),
    ("two_phase", "SELECT count(*), sum(v), avg(v) FROM e"),
    (
        "two_phase",
        "SELECT ck, count(*) AS n, sum(total) FROM o GROUP BY ck "
        "HAVING count(*) > 55 ORDER BY n DESC, ck LIMIT 5",
    ),
    (
        "two_phase",
        "SELECT flag, count(qty) FILTER (WHERE qty > 10), stddev(qty), var_pop(price), "
        "bool_or(qty > 48), bool_and(qty < 49) FROM l GROUP BY ROLLUP(flag) "
        "ORDER BY flag NULLS FIRST, 2",
    ),
    ("two_phase", "SELECT grouping(ck), ck, count(*) FROM o GROUP BY CUBE(ck) ORDER BY 1, 2"),
    (
        "two_phase",
        "SELECT ck % 3 AS m, avg(x), variance(x), stddev_pop(x) FROM o JOIN l "
        "ON o.ok = l.lk GROUP BY ck % 3 ORDER BY m",
    ),
    (
        "two_phase",
        "SELECT n.name, sum(l.qty) FROM o, l, n WHERE o.ok = l.lk AND o.ck = n.nk "
        "GROUP BY n.name ORDER BY 1",
    ),
    (
        "two_phase",
        "SELECT note, count(*) FROM o GROUP BY GROUPING SETS ((note), ()) "
        "ORDER BY note NULLS LAST, 2",
    ),
    (
        "pushdown (grouped by the key)",
        "SELECT o.ok, sum(l.price * l.qty) AS rev FROM o "
        "JOIN l ON o.ok = l.lk WHERE o.d < DATE '1995-06-01' GROUP BY o.ok "
        "ORDER BY rev DESC, o.ok LIMIT 10",
    ),
    (
        "pushdown (grouped by the key)",
        "SELECT lk, count(*) FROM l GROUP BY lk HAVING count(*) > 3 ORDER BY lk",
    ),
    ("pushdown", "SELECT DISTINCT flag FROM l ORDER BY flag"),
    ("pushdown", "SELECT ok, total FROM o ORDER BY total DESC, ok LIMIT 3 OFFSET 2"),
    ("pushdown", "SELECT ok FROM o ORDER BY d DESC, ok LIMIT 4"),
    ("pushdown", "SELECT * FROM o ORDER BY ok LIMIT 3"),
    (
        "pushdown",
        "SELECT o.ok, l.qty, n.name FROM o JOIN l ON o.ok = l.lk "
        "JOIN n ON n.nk = o.ck WHERE l.qty = 49 ORDER BY 1, 2 LIMIT 20",
    ),
    (
        "pushdown",
        "SELECT o.ok, l.qty FROM o LEFT JOIN l ON o.ok = l.lk AND l.qty > 48 "
        "ORDER BY 1, 2 NULLS FIRST LIMIT 20",
    ),
    ("pushdown", "SELECT o.ok, n.name FROM o LEFT JOIN n ON o.ck = n.nk + 1 ORDER BY 1 LIMIT 5"),
    ("pushdown", "SELECT upper(note), total * 2 FROM o WHERE note LIKE '%3' ORDER BY 2 LIMIT 7"),
    (
        "two_phase",
        "SELECT o.ck, count(DISTINCT l.flag), approx_count_distinct(l.flag) FROM o "
        "JOIN l ON o.ok = l.lk GROUP BY 1 ORDER BY 1",
    ),
    ("pushdown", "SELECT o.ok, c.name FROM o JOIN c ON o.ck = c.ck ORDER BY 1 LIMIT 5"),
    (
        "pushdown",
        "SELECT o.ok, c.name FROM o LEFT JOIN c ON o.ck = c.ck AND c.name LIKE '%1%' "
        "ORDER BY 1 LIMIT 30",
    ),
    (
        "two_phase",
        "SELECT c.name, n.name, count(*), sum(l.qty) FROM o JOIN l ON o.ok = l.lk "
        "JOIN c ON o.ck = c.ck JOIN n ON n.nk = c.ck WHERE c.ck < 9 GROUP BY 1, 2 "
        "ORDER BY 1, 2",
    ),
    (
        "pushdown (grouped by the key)",
        "SELECT o.ok, max(c.name), count(c.ck) FROM o, c WHERE o.ck = c.ck GROUP BY o.ok "
        "ORDER BY 1 LIMIT 50",
    ),
    ("gather", "SELECT a.ok, b.ok FROM o a JOIN o b ON a.ck = b.ok ORDER BY 1 LIMIT 40"),
    # o is repartitioned by ck (query.planner.Split): then an outer join either way is exact
    ("pushdown", "SELECT c.name, o.ok FROM c LEFT JOIN o ON o.ck = c.ck ORDER BY 2, 1 LIMIT 5"),
    ("pushdown", "SELECT c.name, o.ok FROM o FULL JOIN c ON o.ck = c.ck ORDER BY 2, 1 LIMIT 5"),
    (
        "gather",
        "SELECT n.name, count(o.ok) FROM n LEFT JOIN o ON o.ck = n.nk GROUP BY 1 ORDER BY 1",
    ),
    ("gather", "SELECT ok, rank() OVER (ORDER BY total DESC) FROM o ORDER BY 2, 1 LIMIT 5"),
    # windows partitioned by a partition key: every window partition in one data partition
    ("pushdown", "SELECT ok, ck, rank() OVER (PARTITION BY ok ORDER BY total) FROM o"),
    (
        "pushdown",
        "SELECT o.ok, l.qty, sum(l.price) OVER (PARTITION BY l.lk ORDER BY l.qty, l.price "
        "ROWS 2 PRECEDING) AS s FROM o JOIN l ON o.ok = l.lk ORDER BY s DESC, 1, 2 LIMIT 7",
    ),
    (
        "pushdown",
        "SELECT lk, qty, price FROM l QUALIFY row_number() OVER (PARTITION BY lk, flag "
        "ORDER BY price DESC, qty) = 1",
    ),
    (
        "pushdown (grouped by the key)",
        "SELECT ok, sum(total), count(*) OVER (PARTITION BY ok) FROM o GROUP BY ok",
    ),
    ("gather", "SELECT ok, count(*) OVER (PARTITION BY ck) FROM o"),
    ("gather", "SELECT ok, count(*) OVER (PARTITION BY ok % 2) FROM o"),
    # o.ok of an order with no lines is NULL on the right side: those rows share one window
    ("gather", "SELECT l.lk, count(*) OVER (PARTITION BY l.lk) FROM o LEFT JOIN l ON o.ok = l.lk"),
    ("gather", "SELECT ck, sum(total), rank() OVER (ORDER BY sum(total)) FROM o GROUP BY ck"),
    (
        "gather",
        "SELECT ok FROM o WHERE ck = (SELECT max(ck) OVER (PARTITION BY ok) FROM o LIMIT 1)",
    ),
    ("gather", "SELECT ok FROM o WHERE total > (SELECT avg(total) FROM o) ORDER BY 1 LIMIT 3"),
    ("gather", "WITH t AS (SELECT ck, sum(total) s FROM o GROUP BY ck) SELECT max(s) FROM t"),
    # UNION [ALL]: each side's fragments, cast to the union's types, one merge
    ("pushdown (UNION)", "SELECT ok FROM o UNION SELECT lk FROM l ORDER BY 1 LIMIT 3"),
    (
        "pushdown (UNION ALL)",
        "SELECT ok, note FROM o WHERE ck = 3 UNION ALL SELECT lk, flag FROM l WHERE qty = 7",
    ),
    ("pushdown (UNION)", "SELECT ck FROM o UNION SELECT ck FROM c ORDER BY 1 DESC"),
    (
        "pushdown (UNION ALL)",
        "SELECT ck, total FROM o UNION ALL SELECT lk, price * 2 FROM l "
        "UNION ALL SELECT ek, v FROM e ORDER BY 2 DESC NULLS LAST, 1 LIMIT 9 OFFSET 2",
    ),
    (
        "pushdown (UNION ALL)",
        "SELECT ok AS k FROM o WHERE ok = 5 UNION ALL SELECT lk FROM l WHERE lk = 5",
    ),
    ("gather", "SELECT ck FROM o INTERSECT SELECT ck FROM c ORDER BY 1"),
    ("gather", "SELECT ck FROM c EXCEPT ALL SELECT ck FROM o ORDER BY 1"),
    # INTERSECT/EXCEPT: both sides select one partitioning's key at the same position
    ("pushdown (INTERSECT, paired by the key)", "SELECT ok FROM o INTERSECT SELECT lk FROM l"),
    (
        "pushdown (EXCEPT ALL, paired by the key)",
        "SELECT ok, ck FROM o EXCEPT ALL SELECT lk, qty FROM l ORDER BY 1, 2 LIMIT 30",
    ),
    (
        "pushdown (INTERSECT ALL, paired by the key)",
        "SELECT lk, flag FROM l INTERSECT ALL SELECT lk, flag FROM l WHERE qty > 20 "
        "ORDER BY 1, 2 NULLS FIRST",
    ),
    (
        "pushdown (EXCEPT, paired by the key)",
        "SELECT ek FROM e EXCEPT SELECT ok FROM o WHERE ck > 3",
    ),
    ("gather", "SELECT ok FROM o EXCEPT SELECT ck FROM c ORDER BY 1"),
    ("gather", "SELECT ok, ck FROM o INTERSECT SELECT qty, lk FROM l ORDER BY 1, 2"),
    (
        "gather",
        "SELECT ck, count(*) FROM o GROUP BY ck UNION ALL SELECT ck, 1 FROM c ORDER BY 1, 2",
    ),
    ("gather", "SELECT nk FROM n UNION ALL SELECT ck FROM c ORDER BY 1"),
    ("gather", "(SELECT ok FROM o ORDER BY ok LIMIT 3) UNION ALL SELECT lk FROM l ORDER BY 1"),
    (
        "gather",
        "SELECT ok, ck FROM o UNION ALL BY NAME SELECT qty AS ck, lk AS ok FROM l ORDER BY 1, 2",
    ),
    ("gather", "SELECT ok, random() < 2 FROM o ORDER BY 1 LIMIT 2"),
    ("two_phase", "SELECT count(DISTINCT ck), sum(DISTINCT ck), max(ck) FROM o"),
    ("gather", "SELECT count(DISTINCT ck), count(DISTINCT note) FROM o"),
    ("gather", "SELECT string_agg(note, ',' ORDER BY note) FROM o WHERE ok < 20"),
    ("pushdown (reference tables only: one node)", "SELECT count(*), max(name) FROM n"),
    # a derived table that is a plain join is read on the partitions
    (
        "two_phase",
        "SELECT flag, sum(v) FROM (SELECT l.flag, l.qty * o.total AS v FROM o JOIN l "
        "ON o.ok = l.lk WHERE o.ck < 10) AS x GROUP BY flag ORDER BY 1 NULLS FIRST",
    ),
    (
        "pushdown",
        "SELECT name, ok FROM (SELECT c.name, o.ok FROM o JOIN c ON o.ck = c.ck) AS x "
        "ORDER BY 2 LIMIT 10",
    ),
    ("pushdown + router", "SELECT * FROM (SELECT ok, total FROM o WHERE ok = 42) AS x"),
    ("two_phase", "SELECT ok, count(*) FROM (SELECT ck AS ok FROM o) AS x GROUP BY ok ORDER BY 1"),
    (
        "two_phase",
        "SELECT ok, count(*) FROM (SELECT o.ok FROM o JOIN l ON o.ok = l.lk) AS x "
        "GROUP BY ok ORDER BY 2 DESC, 1 LIMIT 7",
    ),
    ("gather", "SELECT max(s) FROM (SELECT ck, sum(total) s FROM o GROUP BY ck) AS t"),
    # a derived table grouped by the partition key: its groups are whole on each partition
    (
        "two_phase",
        "SELECT n, count(*) FROM (SELECT o.ok, count(l.lk) AS n FROM o LEFT JOIN l "
        "ON o.ok = l.lk WHERE o.ck < 12 GROUP BY o.ok HAVING count(*) > 1) AS t "
        "GROUP BY n ORDER BY 1",
    ),
    (
        "pushdown + router",
        "SELECT * FROM (SELECT ok, max(total) FROM o WHERE ok IN (3, 4) GROUP BY ok) AS t",
    ),
    # … but not by the null-extended side's key (NULL is a group on every partition)
    (
        "gather",
        "SELECT count(*) FROM (SELECT l.lk, count(*) FROM o LEFT JOIN l ON o.ok = l.lk "
        "GROUP BY l.lk) AS t",
    ),
    ("gather", "SELECT count(*) FROM (SELECT ok FROM o ORDER BY ok LIMIT 10) AS t"),
    ("gather", "SELECT count(*) FROM (SELECT DISTINCT ck FROM o) AS t"),
    (
        "gather",
        "SELECT ok FROM (SELECT ok FROM o) AS x WHERE EXISTS (SELECT * FROM l "
        "WHERE l.lk = x.ok) ORDER BY 1",
    ),
    # subqueries that see only the outer row's partition run there
    (
        "pushdown",
        "SELECT ok FROM o WHERE EXISTS (SELECT * FROM l WHERE l.lk = o.ok AND l.qty > 40) "
        "ORDER BY 1",
    ),
    ("pushdown", "SELECT ok FROM o WHERE NOT EXISTS (SELECT * FROM l WHERE lk = ok) ORDER BY 1"),
    (
        "two_phase",
        "SELECT o.ck, count(*) FROM o WHERE NOT EXISTS (SELECT * FROM l WHERE lk = ok "
        "AND flag = 'A') GROUP BY 1 ORDER BY 1",
    ),
    (
        "pushdown",
        "SELECT ok, (SELECT sum(qty) FROM l WHERE l.lk = o.ok) AS s FROM o "
        "ORDER BY s DESC NULLS LAST, ok LIMIT 20",
    ),
    (
        "pushdown",
        "SELECT ok, total FROM o WHERE ok IN (SELECT lk FROM l GROUP BY lk "
        "HAVING sum(qty) > 110) AND ck < 9 ORDER BY 1",
    ),
    (
        "pushdown",
        "SELECT ok FROM o WHERE ck IN (SELECT nk FROM n WHERE name LIKE '%1%') "
        "AND ok NOT IN (SELECT nk FROM n) ORDER BY 1 LIMIT 30",
    ),
    (
        "pushdown",
        "SELECT ok FROM o WHERE EXISTS (SELECT * FROM l WHERE l.lk = o.ok AND l.qty > "
        "(SELECT avg(l2.qty) + 20 FROM l l2 WHERE l2.lk = l.lk)) ORDER BY 1",
    ),
    (
        "gather",
        "SELECT ok FROM o WHERE ok NOT IN (SELECT lk FROM l GROUP BY lk HAVING sum(qty) > 110) "
        "ORDER BY 1",
    ),
    ("gather", "SELECT ok FROM o WHERE ok IN (SELECT qty FROM l) ORDER BY 1"),
    (
        "gather",
        "SELECT ok FROM o WHERE ok IN (SELECT lk FROM l WHERE qty > 48) OR ok < 3 ORDER BY 1",
    ),
    ("gather", "SELECT ok FROM o WHERE EXISTS (SELECT * FROM l WHERE l.qty = o.ck) ORDER BY 1"),
    (
        "gather",
        "SELECT ok FROM o WHERE EXISTS (SELECT * FROM l WHERE l.lk = o.ok AND l.qty > "
        "(SELECT avg(qty) FROM l l2)) ORDER BY 1",
    ),
    ("gather", "SELECT ok FROM o WHERE EXISTS (SELECT * FROM o WHERE o.ok = ck) ORDER BY 1"),
    (
        "gather",
        "SELECT ok FROM o WHERE ok IN (SELECT lk FROM l ORDER BY lk LIMIT 3) ORDER BY 1",
    ),
]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection]]:
    with beside_duckdb(SETUP) as pair:
        pair[1].catalog(refresh=True)  # row counts after the inserts (what is broadcast)
        yield pair


def close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize(("tier", "sql"), SHAPES, ids=[sql[:60] for _, sql in SHAPES])
def test_each_shape_is_planned_as_expected_and_answers_as_duckdb(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection], tier: str, sql: str
) -> None:
    coordinator, port, reference = pair
    explained = coordinator.execute("EXPLAIN " + sql).fetchall()
    shown = explained[0][2] if explained[0][0] == "plan" else "gather"
    assert shown == tier, explained
    expected = reference.execute(sql)
    expected_rows = expected.fetchall()
    result = coordinator.execute(sql)
    assert result.columns == [column[0] for column in expected.description or []]
    rows = result.fetchall()
    if "ORDER BY" not in sql.rsplit(")", 1)[-1]:
        rows, expected_rows = sorted(rows, key=repr), sorted(expected_rows, key=repr)
    assert len(rows) == len(expected_rows)
    assert all(close(a, b) for a, b in zip(rows, expected_rows, strict=True)), (
        rows[:5],
        expected_rows[:5],
    )


def test_types_and_names_are_duckdbs(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
) -> None:
    coordinator, _, reference = pair
    for _, sql in SHAPES:
        ours = coordinator.execute(sql)
        theirs = reference.sql(sql)
        assert ours.columns == theirs.columns, sql
        assert ours.types == [str(t) for t in theirs.types], sql


@pytest.mark.parametrize(
    ("sql", "concatenates"),
    [
        ("SELECT note, ok FROM o WHERE ok > 3", True),
        ("SELECT note FROM o ORDER BY note", False),
        ("SELECT DISTINCT note FROM o", False),
        ("SELECT count(*) FROM o", False),
        ("SELECT note FROM o LIMIT 2", False),
    ],
)
def test_only_a_plain_pushdown_merges_by_concatenating(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection], sql: str, concatenates: bool
) -> None:
    plan, rows, expected = _planned_and_answered(pair, sql)
    assert plan.concatenates is concatenates
    assert sorted(rows, key=repr) == sorted(expected, key=repr)


@pytest.mark.parametrize(
    ("sql", "sort"),
    [
        (
            "SELECT note, d, ok FROM o ORDER BY d DESC NULLS FIRST, 3 LIMIT 4 OFFSET 2",
            SortMerge(3, ((1, True, True), (2, False, False)), 4, 2),
        ),
        (  # keys not in the output: sent beside it, cut off after the sort
            "SELECT ok FROM o ORDER BY total, note NULLS FIRST",
            SortMerge(1, ((1, False, False), (2, False, True)), None, 0),
        ),
        ("SELECT note FROM o ORDER BY note", SortMerge(1, ((0, False, False),), None, 0)),
        ("SELECT DISTINCT note FROM o ORDER BY note", None),
        ("SELECT note FROM o LIMIT 2", None),
    ],
)
def test_a_sorted_pushdown_merges_by_sorting_in_arrow(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
    sql: str,
    sort: SortMerge | None,
) -> None:
    plan, rows, expected = _planned_and_answered(pair, sql)
    assert plan.sort_merge == sort
    if "LIMIT" in sql:  # the keys fix the rows' order, and which rows are kept
        assert rows == expected
    else:
        assert sorted(rows, key=repr) == sorted(expected, key=repr)


@pytest.mark.parametrize(
    ("sql", "merge"),
    [
        (
            "SELECT flag, count(*) AS n, sum(price), min(qty), max(flag), count(x) FROM l "
            "GROUP BY flag ORDER BY n DESC, flag NULLS FIRST LIMIT 2",
            AggregateMerge(
                1,
                (("group", 0), ("count", 1), ("sum", 2), ("min", 3), ("max", 4), ("count", 5)),
                SortMerge(6, ((1, True, False), (0, False, True)), 2, 0),
            ),
        ),
        ("SELECT sum(qty) FILTER (WHERE qty > 3) FROM l", AggregateMerge(0, (("sum", 0),), None)),
        (
            "SELECT d, ck, sum(total) FROM o GROUP BY ck, d",
            AggregateMerge(2, (("group", 1), ("group", 0), ("sum", 2)), None),
        ),
        (  # an expression around the aggregates: computed as DuckDB would
            "SELECT sum(price) * 2 FROM l",
            AggregateMerge(
                0, (("expression", 0),), None, (("*", ("sum", 0), ("constant", "2", "INTEGER")),)
            ),
        ),
        (
            "SELECT flag, 100.00 * sum(price) / count(*) AS r FROM l GROUP BY flag ORDER BY r",
            AggregateMerge(
                1,
                (("group", 0), ("expression", 0)),
                SortMerge(2, ((1, False, False),), None, 0),
                (
                    (
                        "/",
                        ("*", ("constant", "100.00", "DECIMAL(5,2)"), ("sum", 1)),
                        ("count", 2),
                    ),
                ),
            ),
        ),
        ("SELECT sum(price) + 1 FROM l", None),  # only * and / are computed here
        ("SELECT avg(qty) FROM l", AggregateMerge(0, (("avg", 0),), None)),
        (
            "SELECT flag, avg(qty) FILTER (WHERE price > 2) AS a, count(*) FROM l "
            "GROUP BY flag ORDER BY a DESC",
            AggregateMerge(
                1,
                (("group", 0), ("avg", 1), ("count", 3)),
                SortMerge(3, ((1, True, False),), None, 0),  # a DOUBLE key: sorted by DuckDB
            ),
        ),
        ("SELECT avg(qty) + 1 FROM l", None),
        ("SELECT flag, count(*) FROM l GROUP BY flag HAVING count(*) > 1", None),
        (
            "SELECT flag, count(DISTINCT qty) AS n, min(qty), max(DISTINCT qty) FROM l "
            "GROUP BY flag ORDER BY n DESC, flag",
            AggregateMerge(
                1,
                (("group", 0), ("count_distinct", 1), ("min", 1), ("max", 1)),
                SortMerge(4, ((1, True, False), (0, False, False)), None, 0),
            ),
        ),
        ("SELECT count(DISTINCT qty) FROM l", AggregateMerge(0, (("count_distinct", 0),), None)),
        (
            "SELECT count(DISTINCT qty) FROM l WHERE qty < 0",
            AggregateMerge(0, (("count_distinct", 0),), None),
        ),
        ("SELECT flag, sum(DISTINCT qty) FROM l GROUP BY flag", None),
        (
            "SELECT flag, count(DISTINCT qty) FROM l GROUP BY flag HAVING count(DISTINCT qty) > 1",
            None,
        ),
        ("SELECT flag, count(*) FROM l GROUP BY ROLLUP(flag)", None),
        ("SELECT flag, count(*) FROM l GROUP BY flag ORDER BY sum(qty)", None),
        ("SELECT flag, count(*) FROM l GROUP BY flag LIMIT 1", None),
    ],
)
def test_plain_two_phase_merges_aggregate_in_arrow(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
    sql: str,
    merge: AggregateMerge | None,
) -> None:
    plan, rows, expected = _planned_and_answered(pair, sql)
    assert plan.tier.startswith("two_phase")
    assert plan.aggregate_merge == merge
    if "LIMIT 2" in sql:
        assert rows == expected
    elif "LIMIT" not in sql:
        assert sorted(rows, key=repr) == sorted(expected, key=repr)


def _planned_and_answered(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection], sql: str
) -> tuple[Distributed, list[tuple[object, ...]], list[tuple[object, ...]]]:
    """`sql`'s distributed plan, the coordinator's rows and DuckDB's."""
    coordinator, _, reference = pair
    plan, _, _ = coordinator._plan(coordinator._port.catalog(), sql)
    assert isinstance(plan, Distributed)
    return plan, coordinator.execute(sql).fetchall(), reference.execute(sql).fetchall()


def test_a_sum_past_38_digits_fails_as_in_duckdb(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
) -> None:
    """Partials that each fit DECIMAL(38) but whose sum does not: pyarrow's sum would wrap
    around, so DuckDB merges them, and fails as single-node DuckDB does."""
    coordinator, _, reference = pair
    big = "CAST('60000000000000000000000000000000000000' AS DECIMAL(38,0))"
    sql = f"SELECT sum(CASE WHEN ok % 250 = 0 THEN {big} ELSE 0 END) FROM o"
    with pytest.raises(duckdb.Error) as theirs:
        reference.execute(sql).fetchall()
    with pytest.raises(ExecutionFailed) as ours:
        coordinator.execute(sql).fetchall()
    # the same error in the same words; the two addends it names depend on the order
    # DuckDB's threads added the values in, on either side
    assert _without_numbers(str(ours.value)) == _without_numbers(str(theirs.value))


def _without_numbers(message: str) -> str:
    return re.sub(r"\d+", "N", message)


def test_a_routed_query_reads_only_the_pinned_partitions(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
) -> None:
    coordinator, port, _ = pair
    before = len(port.fragment_calls)
    assert coordinator.execute("SELECT note FROM o WHERE ok IN (5, 6)").fetchall()
    ((index, fragments),) = port.fragment_calls[before:]
    assert 1 <= len(fragments) <= 2
    assert all("WHERE" in fragment.sql for fragment in fragments)


def test_group_by_moves_groups_times_partitions_not_rows(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
) -> None:
    coordinator, _, _ = pair
    explained = coordinator.execute(
        "EXPLAIN ANALYZE SELECT flag, sum(qty) FROM l GROUP BY flag"
    ).fetchall()
    moved = [int(row[3]) for row in explained if row[0].startswith("partition ")]
    assert len(moved) == 4 and all(rows <= 3 for rows in moved), (
        explained
    )  # 3 groups, not 1000 rows


def test_a_runtime_error_in_a_fragment_is_duckdbs(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection],
) -> None:
    coordinator, _, reference = pair
    sql = "SELECT CAST(note AS INTEGER) FROM o WHERE ok = 1"
    with pytest.raises(duckdb.ConversionException) as theirs:
        reference.execute(sql).fetchall()
    with pytest.raises(ExecutionFailed) as ours:
        coordinator.execute(sql)
    assert str(ours.value) == str(theirs.value)
    assert ours.value.duckdb_error == "ConversionException"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT n.name, sum(l.qty) FROM n, o, l WHERE o.ok = l.lk AND o.ck = n.nk GROUP BY 1",
        "SELECT count(*) FROM o WHERE ck IN (SELECT nk FROM n)",
        "SELECT o.ok FROM n JOIN o ON o.ck = n.nk ORDER BY 1 LIMIT 3",
    ],
)
def test_each_fragment_goes_first_to_its_partitions_primary(
    pair: tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection], sql: str
) -> None:
    """Not to the first holder of a reference table listed first: every fragment would go
    to the same node, and the others would idle."""
    coordinator, port, _ = pair
    placements = port.catalog().placements
    before = len(port.fragment_calls)
    coordinator.execute(sql).fetchall()
    ((_, fragments),) = port.fragment_calls[before:]
    assert len(fragments) == 4
    for fragment in fragments:
        (partition,) = {part for table, part in fragment.reads if table == "main.o"}
        assert fragment.holders[0] == placements["main.o"][partition][0], fragment
    assert len({fragment.holders[0] for fragment in fragments}) > 1
