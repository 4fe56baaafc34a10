"""Key links in narrowed gathers (query.scans): a small table's scan runs first, and the
distinct values of its join column go with the scan of a big table joined to it on that
column, which then sends only rows that can find a partner.

Each shape is checked two ways: what EXPLAIN says each scan runs (which scans wait for
key sets, and which must not), and the answer beside single-node DuckDB. Row counts come
from the fake cluster's exact `table_rows`; the least size worth reducing is lowered to
fit these small tables.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import duckdb
import pyarrow as pa
import pytest

from query import planner, scans
from query.coordinator import Coordinator
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import beside_duckdb
from tests.unit.query.test_scans import generated_query

SETUP = [
    "CREATE TABLE fact (id BIGINT, dk INTEGER, pk BIGINT, v INTEGER) "
    "PARTITION BY HASH(id) PARTITIONS 3",
    "CREATE TABLE dim (k BIGINT, name VARCHAR, grp INTEGER) PARTITION BY HASH(k) PARTITIONS 2",
    "CREATE TABLE tiny (g INTEGER, label VARCHAR) REFERENCE",
    "CREATE TABLE prod (pk UBIGINT, kind VARCHAR) PARTITION BY HASH(pk) PARTITIONS 2",
    "INSERT INTO fact SELECT i, CASE WHEN i % 11 = 0 THEN NULL ELSE i % 40 END, "
    "i % 17, i % 7 FROM range(600) t(i)",
    "INSERT INTO dim SELECT CASE WHEN i = 3 THEN NULL ELSE i END, 'n' || (i % 5), i % 4 "
    "FROM range(40) t(i)",
    "INSERT INTO tiny VALUES (0, 'zero'), (1, 'one'), (2, NULL), (NULL, 'none')",
    "INSERT INTO prod SELECT i, CASE WHEN i % 3 = 0 THEN 'a' ELSE 'b' END FROM range(17) t(i)",
    "CREATE TABLE zone (zg INTEGER, tag VARCHAR) REFERENCE",
    "INSERT INTO zone VALUES (0, 'x'), (1, 'y')",
    "CREATE TABLE sale (id BIGINT, amt INTEGER) PARTITION BY HASH(id) PARTITIONS 2",
    "INSERT INTO sale SELECT i * 2, i % 9 FROM range(300) t(i)",
]

Pair = tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection]


@pytest.fixture(autouse=True)
def small_tables_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tables are far below the size a real cluster reduces; and the joins these
    tests gather would be broadcast or repartitioned joins (query.planner) otherwise."""
    monkeypatch.setattr(scans, "TARGET_ROWS_MIN", 0)
    monkeypatch.setattr(planner, "BROADCAST_ROWS_MAX", -1)
    monkeypatch.setattr(planner, "REPARTITION_ROWS_MAX", -1)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with beside_duckdb(SETUP) as pair:
        pair[1].catalog(refresh=True)  # row counts after the inserts
        yield pair


def explained(coordinator: Coordinator, sql: str) -> dict[str, tuple[str, str]]:
    """Step -> (where, SQL) of EXPLAIN's rows."""
    rows = coordinator.execute("EXPLAIN " + sql).fetchall()
    assert rows[0][0] == "gather", rows
    return {str(row[0]): (str(row[1]), str(row[2])) for row in rows[1:]}


def same_answer(pair: Pair, sql: str) -> None:
    coordinator, _, reference = pair
    expected = sorted(reference.execute(sql).fetchall(), key=repr)
    assert sorted(coordinator.execute(sql).fetchall(), key=repr) == expected, sql


def fact_rows_sent(pair: Pair, sql: str) -> int:
    coordinator, _, _ = pair
    rows = coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    return sum(int(row[3]) for row in rows if row[0] == "scanned main.fact")


NOT_JOINED = "SELECT count(*) FROM fact WHERE v = 1"


# (query, the fact scan's WHERE once the dim keys are in)
REDUCED = [
    (
        "SELECT sum(fact.v) FROM fact JOIN dim ON fact.dk = dim.k WHERE dim.name = 'n1'",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # a condition of its own and the link, in one place
        "SELECT count(*) FROM fact, dim WHERE dim.k = fact.dk AND dim.grp = 2 AND fact.v > 2",
        '((v > 2)) AND ("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # a chain: tiny narrows dim, whose keys narrow fact (three rounds)
        "SELECT tiny.label, count(*) FROM fact JOIN dim ON fact.dk = dim.k "
        "JOIN tiny ON dim.grp = tiny.g WHERE tiny.label = 'one' GROUP BY ALL",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # ON of a LEFT JOIN filters its right side
        "SELECT count(*) FROM dim LEFT JOIN fact ON fact.dk = dim.k AND fact.v = 3 "
        "WHERE dim.name = 'n2'",
        '((v = 3)) AND ("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # a correlated subquery: fact rows equal to no dim key are never looked at
        "SELECT count(*) FROM dim WHERE dim.grp = 1 AND EXISTS "
        "(SELECT 1 FROM fact WHERE fact.dk = dim.k)",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (
        "SELECT count(*) FROM dim WHERE grp = 1 AND NOT EXISTS "
        "(SELECT 1 FROM fact WHERE fact.dk = dim.k AND fact.v = 2)",
        '((v = 2)) AND ("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # unqualified: k is not fact's, so it is dim's
        "SELECT k, (SELECT sum(v) FROM fact WHERE dk = k) FROM dim WHERE grp = 2",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # UBIGINT against BIGINT: the key set keeps prod's type, compared as `=` would
        "SELECT count(*) FROM fact JOIN prod ON fact.pk = prod.pk WHERE prod.kind = 'a'",
        '("pk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # IN a subquery's column: its values are dim's keys where name = 'n1'
        "SELECT sum(v) FROM fact WHERE dk IN (SELECT k FROM dim WHERE name = 'n1')",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # DISTINCT, beside a condition of fact's own
        "SELECT count(*) FROM fact WHERE v < 5 AND fact.dk IN "
        "(SELECT DISTINCT dim.k FROM dim WHERE dim.grp = 2)",
        '((v < 5)) AND ("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
    (  # TPC-H q20's chain: tiny narrows dim (inline), whose keys narrow fact
        "SELECT count(*) FROM fact WHERE dk IN (SELECT k FROM dim WHERE grp IN "
        "(SELECT g FROM tiny WHERE label = 'one'))",
        '("dk" IN (SELECT k FROM dcluster_keys_0))',
    ),
]


@pytest.mark.parametrize("sql, condition", REDUCED, ids=range(len(REDUCED)))
def test_a_big_table_waits_for_the_small_ones_keys(pair: Pair, sql: str, condition: str) -> None:
    coordinator, _, _ = pair
    steps = explained(coordinator, sql)
    where, fact_sql = steps["scan main.fact"]
    assert fact_sql.endswith(f"WHERE {condition}"), fact_sql
    assert "round" in where, where
    assert any(step.startswith("keys of ") for step in steps), steps
    same_answer(pair, sql)
    everything = coordinator.execute("SELECT count(*) FROM fact").fetchall()[0][0]
    assert fact_rows_sent(pair, sql) < everything


# Shapes where fact's rows must all be sent (or the link is of no use).
NOT_REDUCED = [
    # fact is on the preserved side of a LEFT JOIN: its rows reach the result unmatched
    "SELECT count(*), sum(fact.v) FROM fact LEFT JOIN dim ON fact.dk = dim.k AND dim.grp = 1",
    # FULL JOIN preserves both
    "SELECT count(*) FROM fact FULL JOIN dim ON fact.dk = dim.k WHERE dim.grp = 1 OR TRUE",
    # an OR: some rows pass without a partner
    "SELECT count(*) FROM fact, dim WHERE fact.dk = dim.k OR fact.v = 1",
    # dim is not narrowed: all its keys would be sent for nothing
    "SELECT count(*) FROM fact JOIN dim ON fact.dk = dim.k",
    # fact read a second time, with no condition there
    "SELECT count(*) FROM fact JOIN dim ON fact.dk = dim.k WHERE dim.grp = 1 "
    "AND fact.v IN (SELECT v FROM fact)",
    # not equality, not integers, or an expression
    "SELECT count(*) FROM fact JOIN dim ON fact.dk < dim.k WHERE dim.grp = 1",
    "SELECT count(*) FROM fact JOIN dim ON CAST(fact.dk AS VARCHAR) = dim.name WHERE dim.grp = 1",
    "SELECT count(*) FROM fact JOIN dim ON fact.dk + 0 = dim.k WHERE dim.grp = 1",
    # a FROM subquery may bind dim laterally: not followed
    "SELECT count(*) FROM dim, (SELECT v FROM fact WHERE fact.dk = dim.k) s WHERE dim.grp = 1",
    # k binds to the inner VALUES-like subquery (7, not a key of dim where grp = 1)
    "SELECT count(*) FROM dim WHERE grp = 1 AND EXISTS "
    "(SELECT 1 FROM fact, (SELECT 7 AS k) z WHERE fact.dk = k)",
    # pk binds to fact's own pk, not prod's: a condition of fact alone
    "SELECT count(*) FROM prod WHERE kind = 'a' AND EXISTS (SELECT 1 FROM fact WHERE dk = pk)",
    # NOT IN, an OR, an expression, an aggregate or a set operation: no key set bounds it
    "SELECT count(*) FROM fact WHERE dk NOT IN (SELECT k FROM dim WHERE grp = 1 AND k > 0)",
    "SELECT count(*) FROM fact WHERE dk IN (SELECT k FROM dim WHERE grp = 1) OR v = 1",
    "SELECT count(*) FROM fact WHERE dk IN (SELECT k + 1 FROM dim WHERE grp = 1)",
    "SELECT count(*) FROM fact WHERE dk IN (SELECT max(k) FROM dim WHERE grp = 1)",
    "SELECT count(*) FROM fact WHERE dk IN (SELECT k FROM dim WHERE grp = 1 UNION SELECT 5)",
    # the subquery's column is fact's own (correlated), not dim's
    "SELECT count(*) FROM fact WHERE dk IN (SELECT v FROM dim WHERE grp = 1)",
]


@pytest.mark.parametrize("sql", NOT_REDUCED, ids=range(len(NOT_REDUCED)))
def test_a_table_whose_rows_can_reach_the_result_unmatched_is_not_reduced(
    pair: Pair, sql: str
) -> None:
    coordinator, _, _ = pair
    steps = explained(coordinator, sql)
    _, fact_sql = steps["scan main.fact"]
    assert "dcluster_keys" not in fact_sql, fact_sql
    same_answer(pair, sql)


def test_a_key_set_over_the_limit_is_not_sent(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    sql = REDUCED[0][0]
    coordinator, _, _ = pair
    reduced = fact_rows_sent(pair, sql)
    monkeypatch.setattr(scans, "KEYS_MAX", 2)
    assert fact_rows_sent(pair, sql) > reduced
    same_answer(pair, sql)


CHAIN = REDUCED[2][0]


def test_a_reference_tables_keys_are_checked_in_the_scan_itself(pair: Pair) -> None:
    """tiny is held wherever dim's partitions are: dim's scan reads it in its own SQL, in
    the first round, so fact waits one round (for dim's keys), not two."""
    coordinator, port, _ = pair
    steps = explained(coordinator, CHAIN)
    where, dim_sql = steps["scan main.dim"]
    inline = """("grp" IN (SELECT "g" FROM "main"."tiny" WHERE (("label" = 'one'))))"""
    assert dim_sql.endswith(f"WHERE {inline}"), dim_sql
    assert "round" not in where, where
    assert steps["scan main.fact"][0] == "every partition, round 2"
    before = len(port.fragment_calls)
    same_answer(pair, CHAIN)
    dim_scans = [
        fragment
        for _, fragments in port.fragment_calls[before:]
        for fragment in fragments
        if ("main.dim", 0) in fragment.reads or ("main.dim", 1) in fragment.reads
    ]
    assert len(dim_scans) == 2
    for fragment in dim_scans:
        assert ("main.tiny", 0) in fragment.reads, fragment
        assert '"main.tiny__p0"' in fragment.sql, fragment.sql


@pytest.mark.parametrize(
    "sql",
    [
        # tiny's only NULL key: no dim row can match (NULL = NULL is not true)
        "SELECT count(*) FROM dim JOIN tiny ON dim.grp = tiny.g WHERE tiny.label = 'none'",
        "SELECT count(*) FROM dim JOIN tiny ON dim.grp = tiny.g WHERE tiny.label IS NULL",
        "SELECT count(*), sum(fact.v) FROM fact JOIN dim ON fact.dk = dim.k, tiny "
        "WHERE dim.grp = tiny.g AND (tiny.label = 'zero' OR tiny.g = 2)",
        "SELECT dim.k FROM dim WHERE dim.grp IN (SELECT g FROM tiny WHERE label LIKE 'o%')",
        "SELECT count(*) FROM dim LEFT JOIN tiny ON dim.grp = tiny.g AND tiny.label = 'one'",
        # tiny at two places with different conditions: each link keeps its own place's
        "SELECT count(*), sum(fact.v) FROM fact JOIN dim ON fact.dk = dim.k "
        "JOIN tiny AS t1 ON dim.grp = t1.g JOIN tiny AS t2 ON fact.v = t2.g "
        "WHERE t1.label = 'one' AND t2.label = 'zero'",
        "SELECT count(*), sum(fact.v) FROM fact JOIN tiny AS t2 ON fact.v = t2.g "
        "JOIN dim ON fact.dk = dim.k JOIN tiny AS t1 ON dim.grp = t1.g "
        "WHERE t1.label = 'one' AND t2.label = 'zero'",
    ],
)
def test_inline_reference_keys_answer_as_duckdb(pair: Pair, sql: str) -> None:
    same_answer(pair, sql)


def test_inline_keys_follow_the_place_and_chain_through_reference_tables(pair: Pair) -> None:
    """tiny is read twice, filtered at one place only (so its scan is whole); dim is linked
    to that place, which is linked to zone's: dim's scan checks both, in one round."""
    coordinator, port, _ = pair
    sql = (
        "SELECT count(*), sum(t2.g) FROM fact JOIN dim ON fact.dk = dim.k "
        "JOIN tiny AS t1 ON dim.grp = t1.g JOIN zone ON t1.g = zone.zg "
        "JOIN tiny AS t2 ON fact.v = t2.g WHERE zone.tag = 'y'"
    )
    steps = explained(coordinator, sql)
    assert steps["scan main.tiny"][1] == 'SELECT "g" FROM "main"."tiny"'
    where, dim_sql = steps["scan main.dim"]
    chained = (
        """("grp" IN (SELECT "g" FROM "main"."tiny" """
        """WHERE ("g" IN (SELECT "zg" FROM "main"."zone" WHERE ((tag = 'y'))))))"""
    )
    assert dim_sql.endswith(f"WHERE {chained}"), dim_sql
    assert "round" not in where
    before = len(port.fragment_calls)
    same_answer(pair, sql)
    reads = {
        read
        for _, fragments in port.fragment_calls[before:]
        for fragment in fragments
        if ("main.dim", 0) in fragment.reads
        for read in fragment.reads
    }
    assert reads == {("main.dim", 0), ("main.tiny", 0), ("main.zone", 0)}


def test_a_link_chains_through_a_partitioned_middle_table(pair: Pair) -> None:
    """dim.k = fact.dk and fact.dk = prod.pk: dim need not wait for fact (the largest)
    to be narrowed by prod's keys — its scan takes them straight from prod (q09's
    partsupp, through lineitem to part). Nor does fact wait for dim's."""
    coordinator, _, _ = pair
    sql = (
        "SELECT count(*), sum(fact.v) FROM fact JOIN dim ON dim.k = fact.dk "
        "JOIN prod ON prod.pk = fact.dk WHERE prod.kind = 'a'"
    )
    steps = explained(coordinator, sql)
    prod_keys = steps["keys of main.prod.pk"][1].split(":")[0]
    assert steps["scan main.dim"] == (
        "every partition, round 2",
        f'SELECT "k" FROM "main"."dim" WHERE ("k" IN (SELECT k FROM {prod_keys}))',
    )
    # fact does not wait a round longer for dim's keys: prod's, on the same column, are
    # there a round earlier
    assert steps["scan main.fact"] == (
        "every partition, round 2",
        f'SELECT "dk", "v" FROM "main"."fact" WHERE ("dk" IN (SELECT k FROM {prod_keys}))',
    )
    same_answer(pair, sql)


def test_a_scan_goes_in_the_first_round_it_has_keys_for(pair: Pair) -> None:
    """fact is linked to prod (first round) and to dim (second, as dim waits for prod's
    keys): fact takes prod's keys in the second round rather than wait for a third
    (q20's lineitem: part's keys, not partsupp's)."""
    coordinator, _, _ = pair
    sql = (
        "SELECT count(*), sum(fact.id) FROM fact JOIN dim ON fact.v = dim.grp "
        "JOIN prod ON dim.k = prod.pk AND fact.pk = prod.pk WHERE prod.kind = 'a'"
    )
    steps = explained(coordinator, sql)
    prod_keys = steps["keys of main.prod.pk"][1].split(":")[0]
    assert steps["scan main.dim"][0] == "every partition, round 2"
    assert steps["scan main.fact"] == (
        "every partition, round 2",
        f'SELECT "id", "pk", "v" FROM "main"."fact" WHERE ("pk" IN (SELECT k FROM {prod_keys}))',
    )
    assert "keys of main.dim.grp" not in steps
    same_answer(pair, sql)


def test_a_scan_takes_a_larger_tables_keys_in_a_round_the_query_needs_anyway(
    pair: Pair,
) -> None:
    """sale (300 rows) is smaller than fact (600), so it would not wait for fact's keys;
    but dim waits a round for prod's anyway, and sale then takes the ids of the fact
    rows with v = 1 in that round (TPC-H q10: customer, by a quarter's orders)."""
    coordinator, _, _ = pair
    sql = (
        "SELECT count(*), sum(sale.amt), max(dim.name) FROM dim JOIN prod ON dim.k = prod.pk "
        "CROSS JOIN (fact JOIN sale ON sale.id = fact.id) WHERE prod.kind = 'a' AND fact.v = 1"
    )
    steps = explained(coordinator, sql)
    assert steps["scan main.dim"][0] == "every partition, round 2"
    assert steps["scan main.fact"][0] == "every partition"
    fact_keys = steps["keys of main.fact.id"][1].split(":")[0]
    assert steps["scan main.sale"] == (
        "every partition, round 2",
        f'SELECT "id", "amt" FROM "main"."sale" WHERE ("id" IN (SELECT k FROM {fact_keys}))',
    )
    assert fact_rows_sent(pair, sql) < 100
    sent = coordinator.execute("EXPLAIN ANALYZE " + sql).fetchall()
    assert sum(int(row[3]) for row in sent if row[0] == "scanned main.sale") < 100
    same_answer(pair, sql)
    # with no later round needed, sale does not wait: its scan is read whole at once
    alone = (
        "SELECT count(*), sum(sale.amt) FROM fact JOIN sale ON sale.id = fact.id WHERE fact.v = 1"
    )
    assert explained(coordinator, alone)["scan main.sale"][0] == "every partition"
    same_answer(pair, alone)


def test_a_reference_table_read_whole_is_not_checked_inline(pair: Pair) -> None:
    coordinator, _, _ = pair
    steps = explained(
        coordinator,
        "SELECT count(*) FROM fact JOIN dim ON fact.dk = dim.k JOIN tiny ON dim.grp = tiny.g "
        "WHERE dim.k > 3",
    )
    assert steps["scan main.dim"][1].endswith("WHERE ((k > 3))"), steps
    same_answer(
        pair,
        "SELECT count(*) FROM fact JOIN dim ON fact.dk = dim.k "
        "JOIN tiny ON dim.grp = tiny.g WHERE dim.k > 3",
    )


def test_key_sets_hold_distinct_values_without_nulls() -> None:
    rows = pa.table({"k": pa.array([3, None, 1, 3, None, 2], pa.int32())})
    keys = scans.key_set(rows, "k")
    assert keys is not None
    assert keys.schema.field("k").type == pa.int32()
    assert sorted(keys.column("k").to_pylist()) == [1, 2, 3]
    assert scans.key_set(rows, "missing") is None


DIM_CONDITIONS = ["dim.grp = 1", "dim.name = 'n2'", "dim.k IS NULL", "dim.grp <> 3", "dim.k > 20"]
FACT_CONDITIONS = ["fact.v = 2", "fact.v IS NULL", "fact.pk > 5", "fact.dk IS NULL", "fact.v < 4"]


def correlated_query(rng: random.Random) -> str:
    """dim (narrowed) outside, fact in a subquery correlated on dk = k: EXISTS, NOT
    EXISTS, IN, scalar, nested, with or without conditions of its own."""
    inner = " AND ".join(["fact.dk = dim.k", *rng.sample(FACT_CONDITIONS, rng.randint(0, 2))])
    subquery = rng.choice(
        [
            f"EXISTS (SELECT 1 FROM fact WHERE {inner})",
            f"NOT EXISTS (SELECT 1 FROM fact WHERE {inner})",
            f"dim.grp IN (SELECT fact.v FROM fact WHERE {inner})",
            f"dim.grp NOT IN (SELECT fact.v FROM fact WHERE {inner})",
            f"coalesce((SELECT sum(fact.v) FROM fact WHERE {inner}), -1) > 3",
            f"(SELECT count(*) FROM fact WHERE {inner}) = 0",
            f"EXISTS (SELECT 1 FROM prod WHERE prod.pk = dim.grp AND "
            f"EXISTS (SELECT 1 FROM fact WHERE {inner} AND fact.pk = prod.pk))",
        ]
    )
    outer = [*rng.sample(DIM_CONDITIONS, rng.randint(1, 2)), subquery]
    select = rng.choice(["count(*)", "dim.k, dim.name", f"dim.k, ({subquery})"])
    return f"SELECT {select} FROM dim WHERE {' AND '.join(outer)}"


@pytest.mark.parametrize("seed", range(60))
def test_generated_correlated_subqueries(pair: Pair, seed: int) -> None:
    same_answer(pair, correlated_query(random.Random(seed)))


@pytest.mark.parametrize("seed", range(60))
def test_generated_queries_with_every_link_taken(
    seed: int, monkeypatch: pytest.MonkeyPatch, generated_pair: Pair
) -> None:
    """test_scans' generated queries (inner, outer, semi, anti and comma joins, ORs,
    subqueries), with any smaller narrowed table allowed to reduce a bigger one."""
    monkeypatch.setattr(scans, "REDUCTION_RATIO", 1)
    same_answer(generated_pair, generated_query(random.Random(seed)))


@pytest.fixture(scope="module")
def generated_pair() -> Iterator[Pair]:
    from tests.unit.query.test_scans import SETUP as SCANS_SETUP

    with beside_duckdb(SCANS_SETUP) as pair:
        pair[1].catalog(refresh=True)  # row counts after the inserts
        yield pair
