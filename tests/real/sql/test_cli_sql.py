"""The SQL command line on a real cluster, against single-node DuckDB: `dcluster sql` (one
statement, `-f` scripts, `--format table|csv|json|parquet`, `-o`, `--consistency stale`),
its errors (DuckDB's message, exit 1), `dcluster load`, `dcluster partitions --json` (every
partition with its holders, primary first, and their row counts) and `dcluster status
--json` (each node's partitions and rows)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from tests.real.cluster.conftest import ROOT, CliCluster
from tests.real.sql.support import run_cli, settled

TRIPS = "id BIGINT, payment VARCHAR, fare DECIMAL(8, 2), km DOUBLE, started TIMESTAMP"
SCRIPT = """
CREATE TABLE zones (zone INTEGER, name VARCHAR){reference};
INSERT INTO zones VALUES (0, 'north'), (1, 'south'), (2, NULL);
CREATE TABLE ranges (k INTEGER, v VARCHAR){range};
INSERT INTO ranges SELECT i, 'v' || i FROM range(30) t(i) WHERE i % 7 <> 3;
SELECT count(*) AS n FROM ranges;
"""
QUERIES = (
    "SELECT payment, count(*) AS trips, sum(fare) AS fares, round(sum(km), 3) AS km, "
    "min(started) AS first FROM trips GROUP BY payment ORDER BY payment NULLS FIRST",
    "SELECT t.id, t.fare, z.name FROM trips t LEFT JOIN zones z ON z.zone = t.id % 4 "
    "WHERE t.id < 40 ORDER BY t.id",
    "SELECT k, v FROM ranges WHERE k BETWEEN 5 AND 25 ORDER BY k",
)
FORMATS_PER_QUERY = (("csv", "json", "parquet"), ("json", "parquet"), ("csv",))


def write_files(duck: duckdb.DuckDBPyConnection, tmp_path: Path) -> tuple[Path, Path]:
    """A Parquet and a CSV file of trips, some values NULL."""
    parquet, csv = tmp_path / "trips.parquet", tmp_path / "trips.csv"
    rows = (
        "SELECT i AS id, CASE WHEN i % 9 = 0 THEN NULL ELSE ['card', 'cash', 'app'][1 + i % 3] "
        "END AS payment, CASE WHEN i % 11 = 0 THEN NULL ELSE (i % 500) * 0.25 END::DECIMAL(8, 2) "
        "AS fare, i * 0.125 AS km, TIMESTAMP '2026-01-01' + to_seconds(i * 37) AS started "
        "FROM range({first}, {last}) t(i)"
    )
    duck.execute(f"COPY ({rows.format(first=0, last=3000)}) TO '{parquet}' (FORMAT parquet)")
    duck.execute(f"COPY ({rows.format(first=3000, last=3500)}) TO '{csv}' (HEADER)")
    return parquet, csv


def arrow_csv(table: pa.Table) -> str:
    out = io.BytesIO()
    pa_csv.write_csv(table, out)
    return out.getvalue().decode()


def json_lines(table: pa.Table) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(row, default=str)) for row in table.to_pylist()]


def duck_messages(duck: duckdb.DuckDBPyConnection, sql: str) -> set[str]:
    """DuckDB's messages for a statement it refuses (`execute` and `sql` word binder errors
    a little differently)."""
    messages = set()
    for run in (duck.execute, duck.sql):
        with pytest.raises(duckdb.Error) as refused:
            run(sql)
        messages.add(f"error: {refused.value}")
    return messages


def test_sql_scripts_formats_load_partitions_and_status(three: CliCluster, tmp_path: Path) -> None:
    duck = duckdb.connect(":memory:")
    run_cli(
        three, "sql", f"CREATE TABLE trips ({TRIPS}) PARTITION BY HASH(id) PARTITIONS 4 REPLICAS 2"
    )
    duck.execute(f"CREATE TABLE trips ({TRIPS})")

    script = tmp_path / "setup.sql"
    script.write_text(
        SCRIPT.format(reference=" REFERENCE", range=" PARTITION BY RANGE(k) (10, 20)")
    )
    result = run_cli(three, "sql", "-f", str(script), "--format", "csv")
    expected = duck.sql(SCRIPT.format(reference="", range="").strip().rstrip(";"))
    assert expected is not None
    assert result.stdout == arrow_csv(expected.to_arrow_table())

    parquet, csv = write_files(duck, tmp_path)
    loaded = run_cli(three, "load", "trips", str(parquet), str(csv))
    assert "loaded 3500 rows into trips from 2 file(s)" in loaded.stdout
    duck.execute(f"COPY trips FROM '{parquet}'")
    duck.execute(f"COPY trips FROM '{csv}'")

    for number, (query, formats) in enumerate(zip(QUERIES, FORMATS_PER_QUERY, strict=True)):
        expected_table = duck.sql(query).to_arrow_table()
        if "csv" in formats:
            as_csv = run_cli(three, "sql", query, "--format", "csv")
            assert as_csv.stdout == arrow_csv(expected_table), query
        if "json" in formats:
            as_json = run_cli(three, "sql", query, "--format", "json")
            lines = [json.loads(line) for line in as_json.stdout.splitlines()]
            assert lines == json_lines(expected_table), query
        if "parquet" in formats:
            target = tmp_path / f"q{number}.parquet"
            wrote = run_cli(three, "sql", query, "--format", "parquet", "-o", str(target))
            assert f"wrote {expected_table.num_rows} rows to {target}" in wrote.stdout
            got = pq.read_table(target)
            assert got.schema.types == expected_table.schema.types, query
            assert got.to_pylist() == expected_table.to_pylist(), query

    csv_out = tmp_path / "out.csv"
    run_cli(three, "sql", QUERIES[0], "--format", "csv", "-o", str(csv_out))
    assert csv_out.read_text() == arrow_csv(duck.sql(QUERIES[0]).to_arrow_table())
    shown = run_cli(three, "sql", "SELECT * FROM zones ORDER BY zone")
    assert "3 rows" in shown.stdout and "north" in shown.stdout and "NULL" in shown.stdout
    run_cli(three, "sql", "SELECT 1", "--format", "parquet", expect=2)

    for bad in ("SELEC * FROM trips", "SELECT * FROM nope", "INSERT INTO trips VALUES (1)"):
        refused = run_cli(three, "sql", bad, expect=1)
        assert refused.stdout == ""
        assert refused.stderr.strip() in {m.strip() for m in duck_messages(duck, bad)}, bad

    settled(three)
    count = duck.sql("SELECT count(*) FROM trips").fetchall()[0][0]
    for consistency in ("strong", "stale"):
        answer = run_cli(
            three,
            "sql",
            "SELECT count(*) AS n FROM trips",
            "--format",
            "json",
            "--consistency",
            consistency,
        )
        assert json.loads(answer.stdout) == {"n": count}, consistency
    check_partitions_and_status(three, duck)
    duck.close()


def check_partitions_and_status(three: CliCluster, duck: duckdb.DuckDBPyConnection) -> None:
    """`partitions --json`: every partition, holders primary first, each holder's row count
    the partition's; `status --json`: each node's partitions and rows add up to what it
    holds."""
    expected_holders = {"main.trips": (4, 2), "main.zones": (1, 3), "main.ranges": (3, 3)}
    totals = {
        "main.trips": duck.sql("SELECT count(*) FROM trips").fetchall()[0][0],
        "main.zones": 3,
        "main.ranges": duck.sql("SELECT count(*) FROM ranges").fetchall()[0][0],
    }

    def counted() -> list[dict[str, Any]] | None:
        view: list[dict[str, Any]] = json.loads(run_cli(three, "partitions", "--json").stdout)
        for entry in view:
            rows = {holder["rows"] for holder in entry["holders"]}
            if None in rows or len(rows) != 1:
                return None  # a holder has not recounted yet (twice a second)
        sums = {}
        for entry in view:
            sums[entry["table"]] = sums.get(entry["table"], 0) + entry["holders"][0]["rows"]
        return view if sums == totals else None

    view = three.wait_for(counted, "partition row counts", timeout_s=20)
    by_table: dict[str, list[dict[str, Any]]] = {}
    for entry in view:
        by_table.setdefault(entry["table"], []).append(entry)
        assert entry["primary"] == entry["holders"][0]["node"], entry
        nodes = [holder["node"] for holder in entry["holders"]]
        assert len(set(nodes)) == len(nodes), entry
        assert all(holder["up"] for holder in entry["holders"]), entry
    assert sorted(by_table) == sorted(expected_holders)
    for table, (partitions, replicas) in expected_holders.items():
        entries = by_table[table]
        assert [entry["partition"] for entry in entries] == list(range(partitions))
        assert all(len(entry["holders"]) == replicas for entry in entries), entries
    held: dict[int, tuple[int, int]] = {}
    for entry in view:
        for holder in entry["holders"]:
            partitions_held, rows = held.get(holder["node"], (0, 0))
            held[holder["node"]] = (partitions_held + 1, rows + holder["rows"])

    def status_matches() -> bool:
        nodes = three.status()["nodes"]
        return all(held[node["id"]] == (node["partitions"], node["rows"]) for node in nodes)

    three.wait_for(status_matches, "status --json to count every node's partitions and rows")


def test_python_dash_m_cluster_cli_knows_the_sql_commands() -> None:
    for command in ("sql", "partitions", "load"):
        result = subprocess.run(
            [sys.executable, "-m", "cluster.cli", command, "--help"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_partitions_report_the_bytes_their_rows_take(three: CliCluster) -> None:
    run_cli(three, "sql", "CREATE TABLE b (id BIGINT, s VARCHAR) PARTITION BY HASH(id)")
    run_cli(three, "sql", "INSERT INTO b SELECT i, repeat('x', 100) FROM range(20000) t(i)")

    def counted() -> list[dict[str, Any]] | None:
        view: list[dict[str, Any]] = json.loads(run_cli(three, "partitions", "--json").stdout)
        holders = [holder for entry in view for holder in entry["holders"]]
        return view if all(holder["rows"] for holder in holders) else None

    view = three.wait_for(counted, "partition row counts", timeout_s=20)
    for entry in view:
        for holder in entry["holders"]:
            assert holder["bytes"] > 0, f"{entry['table']} {entry['partition']}: {holder}"
