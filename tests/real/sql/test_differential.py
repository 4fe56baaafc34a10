"""The cluster answers as single-node DuckDB does, through the Python API: every statement
runs on a three-worker cluster and on one DuckDB database; results and errors must be the
same, and after every write every table's full contents (sorted) must be the same.

Covers hash, range, list and reference tables with PARTITIONS and REPLICAS, rows of common
types with NULLs, INSERT VALUES and INSERT … SELECT, COPY FROM Parquet and CSV, UPDATE (of
the partition key too, moving rows between partitions), DELETE, CREATE TABLE … AS, views,
ALTER TABLE ADD COLUMN, parameters, and queries over all of it. A short hypothesis run
drives random rows, writes and queries against one table the same way.

"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import Mirror, connect

COLUMNS = (
    "id BIGINT, k INTEGER, s VARCHAR, d DOUBLE, m DECIMAL(10, 2), dt DATE, ts TIMESTAMP, b BOOLEAN"
)
REGIONS = ("eu", "uk", "us", "apac", None)


def literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def generated_rows(rng: random.Random, first_id: int, count: int) -> str:
    """A VALUES list of `count` rows of COLUMNS (SQL text), about one value in six NULL."""

    def maybe(text: str) -> str:
        return "NULL" if rng.random() < 1 / 6 else text

    rows = []
    for number in range(first_id, first_id + count):
        values = (
            str(number),
            maybe(str(rng.randint(-500, 5000))),
            maybe(literal(rng.choice(["a", "b'q", "ünï", "", "long " * 5]))),
            maybe(repr(round(rng.uniform(-1e3, 1e3), 3))),
            maybe(f"{rng.randint(-99999, 99999) / 100:.2f}"),
            maybe(f"DATE '2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}'"),
            maybe(f"TIMESTAMP '2025-01-01' + INTERVAL {rng.randint(0, 10**6)} SECOND"),
            maybe(literal(rng.random() < 0.5)),
        )
        rows.append("(" + ", ".join(values) + ")")
    return ", ".join(rows)


def create_tables(mirror: Mirror) -> None:
    mirror.create("h", COLUMNS, "PARTITION BY HASH(id) PARTITIONS 5 REPLICAS 2")
    mirror.create("r", COLUMNS, "PARTITION BY RANGE(k) (0, 100, 1000) REPLICAS 3")
    mirror.create(
        "l",
        "region VARCHAR, id BIGINT, amount DECIMAL(12, 2)",
        "PARTITION BY LIST(region) (('eu', 'uk'), ('us'), ('apac', NULL)) REPLICAS 1",
    )
    mirror.create("ref", "code INTEGER, name VARCHAR", "REFERENCE")


def insert_rows(mirror: Mirror, tmp_path: Path) -> None:
    rng = random.Random(20240601)
    mirror.run("SELECT * FROM h")  # empty
    mirror.write(f"INSERT INTO h VALUES {generated_rows(rng, 0, 200)}")
    mirror.write(f"INSERT INTO r VALUES {generated_rows(rng, 1000, 150)}")
    mirror.write(
        "INSERT INTO r SELECT id + 10000, k * 3, s || '!', d / 2, m, dt, ts, NOT b "
        "FROM h WHERE id % 3 = 0"
    )
    mirror.write(
        "INSERT INTO l SELECT (['eu', 'uk', 'us', 'apac', NULL])[1 + i % 5], i, "
        "CASE WHEN i % 7 = 0 THEN NULL ELSE i * 1.25 END FROM range(300) t(i)"
    )
    mirror.write("INSERT INTO ref VALUES (1, 'one'), (2, 'two'), (3, NULL), (NULL, 'x')")
    mirror.write("INSERT INTO h VALUES (?, ?, ?, NULL, NULL, NULL, NULL, ?)", [9001, 7, "p", True])
    parquet = tmp_path / "extra.parquet"
    csv = tmp_path / "extra.csv"
    mirror.duck.execute(f"COPY (SELECT * FROM h WHERE id < 50) TO '{parquet}' (FORMAT parquet)")
    mirror.duck.execute(f"COPY (SELECT * FROM r WHERE k > 10) TO '{csv}' (HEADER)")
    mirror.write(f"COPY h FROM '{parquet}'")  # copies of rows h holds already
    mirror.write(f"COPY r FROM '{csv}' (HEADER)")


def test_tables_inserts_copies_views_and_alter_match_duckdb(
    three: CliCluster, tmp_path: Path
) -> None:
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            create_tables(mirror)
            insert_rows(mirror, tmp_path)
            mirror.run(
                "CREATE VIEW joined AS SELECT h.id, h.s, h.b, r.k, ref.name FROM h "
                "JOIN r ON h.k = r.k LEFT JOIN ref ON ref.code = h.k % 4"
            )
            mirror.run("SELECT * FROM joined")
            mirror.write("ALTER TABLE h ADD COLUMN extra INTEGER DEFAULT 42")
            mirror.write("ALTER TABLE l ADD COLUMN note VARCHAR")
            mirror.write("INSERT INTO h SELECT * EXCLUDE (extra), id % 5 FROM h WHERE id < 20")
            mirror.write("INSERT INTO l SELECT region, id + 1000, amount, region || id FROM l")
            mirror.run("INSERT INTO ref SELECT * FROM nope")  # both refuse, alike
            for query in QUERIES:
                mirror.run(query, ordered="ORDER BY" in query)
        finally:
            mirror.close()


def test_updates_and_deletes_match_duckdb(three: CliCluster, tmp_path: Path) -> None:
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            create_tables(mirror)
            insert_rows(mirror, tmp_path)
            mirror.write("DELETE FROM ref WHERE code = 2")
            mirror.write("UPDATE h SET s = upper(s), d = d * 2 WHERE k > 100")
            mirror.write("UPDATE r SET k = k + 600 WHERE k BETWEEN 0 AND 500")  # moves rows
            mirror.write("UPDATE h SET id = id + 100000 WHERE id % 4 = 1")  # the hash key
            mirror.write("UPDATE l SET region = 'us' WHERE region = 'eu' AND id % 2 = 0")
            mirror.write("UPDATE ref SET name = name || '?' WHERE code IS NOT NULL")
            mirror.write("DELETE FROM h WHERE b IS NULL OR m < 0")
            mirror.write("DELETE FROM r WHERE k IN (SELECT k FROM h WHERE k IS NOT NULL)")
            mirror.write("DELETE FROM l WHERE amount IS NULL")
            for query in QUERIES[:4]:
                mirror.run(query, ordered="ORDER BY" in query)
        finally:
            mirror.close()


def test_create_table_as_select_from_a_table_matches_duckdb(three: CliCluster) -> None:
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            mirror.create("r", "k INTEGER, m DECIMAL(10, 2)", "PARTITION BY HASH(k)")
            mirror.write("INSERT INTO r SELECT i % 17, i / 4 FROM range(200) t(i)")
            select = "SELECT k, count(*) AS n, sum(m) AS total FROM r GROUP BY k"
            expected = mirror.duck.execute(f"CREATE TABLE agg AS {select}").fetchall()
            con.execute(f"CREATE TABLE agg PARTITION BY HASH(k) PARTITIONS 3 AS {select}")
            assert con.fetchall() == expected
            mirror.tables.append("agg")
            mirror.check_tables()
        finally:
            mirror.close()


def test_foreign_keys_are_checked_over_whole_tables_like_duckdb(three: CliCluster) -> None:
    """Partitions cannot check a foreign key (the referenced rows live on other workers);
    the coordinator does, over the whole tables, with DuckDB's own messages."""
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            mirror.create("parent", "id INTEGER PRIMARY KEY", "PARTITION BY HASH(id)")
            mirror.create("child", "id INTEGER, pid INTEGER REFERENCES parent(id)", "")
            mirror.write("INSERT INTO parent SELECT i FROM range(20) t(i)")
            mirror.write("INSERT INTO child SELECT i, i % 10 FROM range(30) t(i)")
            mirror.run("INSERT INTO child VALUES (99, 42)")  # both refuse, same message
            mirror.run("DELETE FROM parent WHERE id = 3")  # still referenced: refused
            mirror.write("DELETE FROM parent WHERE id >= 10")
            mirror.check_tables()
        finally:
            mirror.close()


def test_create_table_as_select_of_constants_matches_duckdb(three: CliCluster) -> None:
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            expected = mirror.duck.execute("CREATE TABLE c AS SELECT 1 AS x, 'a' AS y").fetchall()
            con.execute("CREATE TABLE c AS SELECT 1 AS x, 'a' AS y")
            assert con.fetchall() == expected
            mirror.tables.append("c")
            mirror.check_tables()
        finally:
            mirror.close()


QUERIES = (
    "SELECT count(*), count(k), sum(k), min(s), max(dt), avg(d) FROM h",
    "SELECT k % 10 AS bucket, count(*), sum(m) FROM r GROUP BY bucket ORDER BY bucket",
    "SELECT region, count(*), sum(amount), string_agg(note, ',' ORDER BY id) FROM l "
    "GROUP BY region ORDER BY region NULLS FIRST",
    "SELECT * FROM h ORDER BY id, extra LIMIT 7 OFFSET 3",
    "SELECT id, extra, row_number() OVER (PARTITION BY b ORDER BY id, extra) FROM h "
    "ORDER BY id, extra",
    "SELECT h.id, ref.name FROM h LEFT JOIN ref ON h.k = ref.code ORDER BY h.id, ref.name",
    "SELECT count(DISTINCT s), approx_count_distinct(k) > 0 FROM r",
    "SELECT b, count(*), sum(k) FROM joined GROUP BY b ORDER BY b",
    "SELECT k FROM h WHERE k IS NOT NULL INTERSECT SELECT k FROM r ORDER BY k",
    "SELECT extra, count(*) FROM h GROUP BY extra ORDER BY extra",
    "SELECT * FROM l WHERE region IS NULL ORDER BY id",
    "SELECT * FROM ref ORDER BY code NULLS FIRST",
    # joins of tables not co-located (a broadcast when one is small enough), subqueries
    # tied to the outer row's partition, a derived table that is a plain join
    "SELECT h.id, r.m, r.s FROM h JOIN r ON h.k = r.k WHERE h.id < 60 ORDER BY 1, 2, 3",
    "SELECT r.k, count(*), sum(h.m) FROM r JOIN h ON h.k = r.k GROUP BY 1 ORDER BY 1",
    "SELECT id, s FROM h WHERE EXISTS (SELECT * FROM h AS h2 WHERE h2.id = h.id "
    "AND h2.k > 3) ORDER BY id, s",
    "SELECT name, count(*) FROM (SELECT h.id, ref.name FROM h LEFT JOIN ref "
    "ON ref.code = h.k % 4) AS x GROUP BY name ORDER BY name NULLS FIRST",
    # uncorrelated scalar subqueries answered first, then pushed down as constants
    "SELECT k, sum(m) AS total FROM h GROUP BY k HAVING sum(m) > (SELECT avg(m) * 3 FROM h) "
    "ORDER BY total DESC, k",
    "SELECT count(*), max(s) FROM r WHERE m > (SELECT avg(m) FROM h WHERE h.k < 5)",
    # repartitioned: h dealt out by k into r's RANGE partitions, the preserved side kept
    "SELECT n, count(*) FROM (SELECT r.k, count(h.id) AS n FROM r LEFT JOIN h ON h.k = r.k "
    "GROUP BY r.k) AS t GROUP BY n ORDER BY n",
    "SELECT h.id, r.id FROM h FULL JOIN r ON h.k = r.k WHERE h.id IS NULL OR h.id < 40 "
    "ORDER BY 1 NULLS FIRST, 2 NULLS FIRST",
    # a WITH query answered first (two-phase), then read twice by the statement
    "WITH t AS (SELECT k, sum(m) AS total FROM h GROUP BY k) SELECT k, total FROM t "
    "WHERE total >= (SELECT max(total) FROM t) / 2 ORDER BY k NULLS FIRST",
    # IN a subquery's column: r's scan narrowed by h's keys
    "SELECT count(*), sum(m) FROM r WHERE k IN (SELECT k FROM h WHERE id < 30)",
)
WRITES = (
    "INSERT INTO {t} SELECT k + 1, n, v FROM {t} WHERE n > 0",
    "INSERT INTO {t} VALUES (0, NULL, NULL), (3, 3, 'c')",
    "INSERT INTO {t} SELECT k, n * 2, v || '!' FROM {t} WHERE v IS NOT NULL",
    "INSERT INTO {t} (k) VALUES (NULL)",
    "INSERT INTO {t} SELECT * FROM {t} LIMIT 0",
    "UPDATE {t} SET k = k + 7 WHERE v IS NOT NULL",
    "UPDATE {t} SET v = coalesce(v, 'n') || 'x' WHERE k % 2 = 0",
    "DELETE FROM {t} WHERE k < -5",
    "DELETE FROM {t} WHERE v IS NULL",
)
_tables = itertools.count()


def test_random_rows_writes_and_queries_match_duckdb(three: CliCluster) -> None:
    """Hypothesis picks rows, writes and a query's constants; each example uses a table of
    its own and drops it."""
    with connect(three) as con:
        mirror = Mirror(con)
        try:

            @settings(
                max_examples=6,
                deadline=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: slow
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
            )
            @given(
                rows=st.lists(
                    st.tuples(
                        st.one_of(st.none(), st.integers(-20, 20)),
                        st.one_of(st.none(), st.integers(-(2**40), 2**40)),
                        st.one_of(st.none(), st.text("ab'é", max_size=4)),
                    ),
                    max_size=25,
                ),
                writes=st.lists(st.sampled_from(WRITES), max_size=3),
                bound=st.integers(-20, 20),
            )
            def run(
                rows: list[tuple[int | None, int | None, str | None]],
                writes: list[str],
                bound: int,
            ) -> None:
                table = f"p{next(_tables)}"
                mirror.tables = [table]
                mirror.create(
                    table, "k INTEGER, n BIGINT, v VARCHAR", "PARTITION BY HASH(k) PARTITIONS 3"
                )
                if rows:
                    values = ", ".join(
                        f"({literal(k)}, {literal(n)}, {literal(v)})" for k, n, v in rows
                    )
                    mirror.write(f"INSERT INTO {table} VALUES {values}")
                for write in writes:
                    mirror.write(write.format(t=table))
                mirror.run(
                    f"SELECT k, count(*), sum(n), max(v) FROM {table} WHERE k > ? GROUP BY k",
                    [bound],
                )
                mirror.run(f"SELECT v, n FROM {table} ORDER BY v NULLS FIRST, n", ordered=True)
                mirror.run(f"DROP TABLE {table}")

            run()
        finally:
            mirror.close()
