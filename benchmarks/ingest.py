"""Bulk ingest speed: a Parquet file loaded into a cluster table with two replicas, beside
single-process DuckDB's `CREATE TABLE AS` from the same file, measured in the same run.

Rows:
- DuckDB: a fresh database *file* (durable, like the cluster), default threads,
  `CREATE TABLE t AS SELECT * FROM read_parquet(file)`, timed from `connect` to the end of
  `close` (which checkpoints: the rows are on disk);
- dcluster: `COPY t FROM file` through the Python API (`dcluster.connect`) into
  `CREATE TABLE t (...) REPLICAS 2` on a cluster of `--cores` workers started with
  `dcluster up` (fsync on: every copy is on disk when the statement returns), timed around
  the statement alone.

The dataset is generated once per run by DuckDB (seeded, single-threaded so the same seed
gives the same file): a BIGINT id 0..N-1, a skewed INTEGER key, a short VARCHAR, a DOUBLE,
a DATE, a DECIMAL(12,2) and a TIMESTAMP, about 40 bytes a row. The two sides take turns
(DuckDB, cluster, DuckDB, cluster, ...) so a machine busy with other work slows both alike;
the best of `--repeat` is reported for each. The cluster stays up (idle) while DuckDB runs.
Every load is checked: the COPY's count, then `count(*)` and `sum(id)` of the table.

Target: the cluster's time within 3x of DuckDB's, while it writes two copies.

Every process started here is stopped in a finally (`dcluster down --purge`, then by pid
whatever it left), also on Ctrl-C or SIGTERM; every temp directory is removed (the dataset's
too, unless `--keep-dir`), and every wait is bounded.

Usage: python -m benchmarks.ingest [--rows N] [--cores C] [--repeat K] [--json] [--keep-dir]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

import dcluster
from benchmarks import _cluster
from clock import Clock, SystemClock
from cluster.protocol import NODES_MAX

ROWS_DEFAULT = 5_000_000
ROWS_MAX = 200_000_000
CORES_DEFAULT = 2
REPEAT_DEFAULT = 3
REPEAT_MAX = 20
REPLICAS = 2
TARGET_RATIO = 3.0
"""The cluster's best time over DuckDB's best time, at most."""
SEED = 0.42
"""DuckDB's setseed() for the dataset."""
TABLE = "t"
COLUMNS = (
    ("id", "BIGINT"),
    ("key", "INTEGER"),
    ("label", "VARCHAR"),
    ("amount", "DOUBLE"),
    ("day", "DATE"),
    ("price", "DECIMAL(12,2)"),
    ("seen_at", "TIMESTAMP"),
)
GENERATOR = """
    SELECT
        i AS id,
        CAST(floor(pow(random(), 4) * 10000) AS INTEGER) AS key,
        'c' || CAST(floor(random() * 100000) AS INTEGER) AS label,
        random() * 1000 AS amount,
        DATE '2020-01-01' + CAST(floor(random() * 1827) AS INTEGER) AS day,
        CAST(round(random() * 1000000, 2) AS DECIMAL(12,2)) AS price,
        TIMESTAMP '2020-01-01'
            + to_microseconds(CAST(floor(random() * 157766400000000) AS BIGINT)) AS seen_at
    FROM range({rows}) AS r(i)
"""
"""key = floor(u^4 * 10000): key 0 holds about a tenth of the rows, most keys very few."""


# ---- the dataset ----


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def generate(path: Path, rows: int) -> None:
    """`rows` rows of COLUMNS in a Parquet file at `path`, checked after writing."""
    assert rows >= 1, rows
    with contextlib.closing(duckdb.connect()) as connection:
        connection.execute("SET threads = 1")  # random() repeats its sequence on one thread
        connection.execute(f"SELECT setseed({SEED})")
        body = GENERATOR.format(rows=rows)
        connection.execute(f"COPY ({body}) TO {_literal(path)} (FORMAT parquet)")
        written = connection.execute(
            f"DESCRIBE SELECT * FROM read_parquet({_literal(path)})"
        ).fetchall()
        assert [(name, kind) for name, kind, *_ in written] == list(COLUMNS), written
        counted = connection.execute(
            f"SELECT count(*), sum(id) FROM read_parquet({_literal(path)})"
        ).fetchone()
    assert counted == (rows, _id_sum(rows)), counted


def _id_sum(rows: int) -> int:
    return rows * (rows - 1) // 2


def _check_arrived(counted: tuple[Any, ...] | None, rows: int, who: str) -> None:
    """Every row arrived once: the count and the sum of the ids 0..rows-1."""
    if counted is None or tuple(counted) != (rows, _id_sum(rows)):
        raise RuntimeError(
            f"{who}: count(*), sum(id) is {counted}, expected {(rows, _id_sum(rows))}"
        )


# ---- one load on each side ----


def duckdb_once(dataset: Path, database: Path, rows: int, clock: Clock) -> int:
    """Nanoseconds for a fresh DuckDB file database to load `dataset` and close."""
    _remove_database(database)
    began_ns = clock.monotonic_ns()
    connection = duckdb.connect(str(database))
    try:
        connection.execute(
            f"CREATE TABLE {TABLE} AS SELECT * FROM read_parquet({_literal(dataset)})"
        )
    finally:
        connection.close()
    elapsed_ns = clock.monotonic_ns() - began_ns
    with contextlib.closing(duckdb.connect(str(database), read_only=True)) as check:
        _check_arrived(
            check.execute(f"SELECT count(*), sum(id) FROM {TABLE}").fetchone(), rows, "DuckDB"
        )
    _remove_database(database)
    return elapsed_ns


def _remove_database(database: Path) -> None:
    for path in (database, database.with_name(database.name + ".wal")):
        path.unlink(missing_ok=True)


def cluster_once(
    connection: dcluster.Connection, dataset: Path, rows: int, clock: Clock, run_path: Path
) -> tuple[int, int]:
    """Nanoseconds for `COPY t FROM dataset` into a new table with REPLICAS replicas to be
    acknowledged (rows durable on every holder, commit in the log), and until every worker
    has also applied it into its DuckDB partitions."""
    columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    connection.sql(f"CREATE TABLE {TABLE} ({columns}) REPLICAS {REPLICAS}")
    began_ns = clock.monotonic_ns()
    copied = connection.sql(f"COPY {TABLE} FROM {_literal(dataset)}")
    elapsed_ns = clock.monotonic_ns() - began_ns
    _until_applied_everywhere(run_path, clock)
    applied_ns = clock.monotonic_ns() - began_ns
    said = None if copied is None else copied.fetchall()
    if said != [(rows,)]:
        raise RuntimeError(f"dcluster: COPY returned {said}, expected [({rows},)]")
    counted = connection.sql(f"SELECT count(*), sum(id) FROM {TABLE}")
    _check_arrived(None if counted is None else counted.fetchone(), rows, "dcluster")
    connection.sql(f"DROP TABLE {TABLE}")
    return elapsed_ns, applied_ns


APPLIED_WAIT_S = 120.0


def _until_applied_everywhere(run_path: Path, clock: Clock) -> None:
    """Wait until every worker's partition store has applied the log as far as the
    highest applied index any worker reports now."""
    from cluster.client import Client

    deadline_ns = clock.monotonic_ns() + int(APPLIED_WAIT_S * 1e9)
    with Client(run_path) as client:
        target = max(s.applied_index for s in client.status_all().values() if s is not None)
        while clock.monotonic_ns() < deadline_ns:
            statuses = client.status_all()
            if all(s is not None and s.store_applied_index >= target for s in statuses.values()):
                return
            time.sleep(0.01)
    raise RuntimeError(f"the workers did not apply index {target} within {APPLIED_WAIT_S} s")


# ---- the run ----


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the dataset, start the cluster, and time both sides in turns."""
    clock = SystemClock()
    began_ns = clock.monotonic_ns()
    figures: dict[str, Any] = {"load_avg_1m_before": os.getloadavg()[0]}
    duckdb_ns: list[int] = []
    cluster_ns: list[int] = []
    applied_ns: list[int] = []
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        if args.keep_dir:
            print(f"dataset kept in {base}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        dataset = base / "dataset.parquet"
        generate(dataset, args.rows)
        figures["generate_s"] = (clock.monotonic_ns() - began_ns) / 1e9
        figures["parquet_bytes"] = dataset.stat().st_size
        name = f"bench-ingest-{os.getpid()}"
        cluster = stack.enter_context(_cluster.running(name, args.cores, base / "cluster"))
        connection = stack.enter_context(dcluster.connect(str(cluster.run.path)))
        for _ in range(args.repeat):
            duckdb_ns.append(duckdb_once(dataset, base / "duckdb.db", args.rows, clock))
            acknowledged, applied = cluster_once(
                connection, dataset, args.rows, clock, cluster.run.path
            )
            cluster_ns.append(acknowledged)
            applied_ns.append(applied)
        cluster.note()  # the client's queue too, for the leftover check
    figures["oversubscribe"] = cluster.oversubscribe
    figures["cluster"] = cluster.description()  # all it ever ran, for a leftover check
    figures["load_avg_1m_after"] = os.getloadavg()[0]
    figures["elapsed_s"] = (clock.monotonic_ns() - began_ns) / 1e9
    figures["cluster_applied_s"] = min(applied_ns) / 1e9
    figures["cluster_applied_s_all"] = [value / 1e9 for value in applied_ns]
    figures["applied_ratio"] = figures["cluster_applied_s"] / (min(duckdb_ns) / 1e9)
    return summarize(args, duckdb_ns, cluster_ns) | figures


def summarize(
    args: argparse.Namespace, duckdb_ns: list[int], cluster_ns: list[int]
) -> dict[str, Any]:
    """The best of each side, rows/s, the ratio of the times, and the verdict."""
    assert duckdb_ns and cluster_ns, (duckdb_ns, cluster_ns)
    assert len(duckdb_ns) == len(cluster_ns) == args.repeat, (duckdb_ns, cluster_ns)
    duckdb_s, cluster_s = min(duckdb_ns) / 1e9, min(cluster_ns) / 1e9
    ratio = cluster_s / duckdb_s
    return {
        "cluster_rows_per_s": args.rows / cluster_s,
        "duckdb_rows_per_s": args.rows / duckdb_s,
        "ratio": ratio,
        "cluster_s": cluster_s,
        "duckdb_s": duckdb_s,
        "cluster_s_all": [value / 1e9 for value in cluster_ns],
        "duckdb_s_all": [value / 1e9 for value in duckdb_ns],
        "rows": args.rows,
        "cores": args.cores,
        "replicas": REPLICAS,
        "repeat": args.repeat,
        "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }


# ---- output ----


def print_table(f: dict[str, Any]) -> None:
    workers = f"{f['cores']} workers" + (", oversubscribed" if f["oversubscribe"] else "")
    rows = [
        ("side", "seconds", "rows/s"),
        (
            "DuckDB CREATE TABLE AS, file db",
            f"{f['duckdb_s']:.3f}",
            f"{f['duckdb_rows_per_s']:,.0f}",
        ),
        (
            f"dcluster COPY FROM, R={f['replicas']}, {workers}",
            f"{f['cluster_s']:.3f}",
            f"{f['cluster_rows_per_s']:,.0f}",
        ),
    ]
    if "cluster_applied_s" in f:
        rows.append(
            (
                "  ... and applied into DuckDB on every holder",
                f"{f['cluster_applied_s']:.3f}",
                f"{f['rows'] / f['cluster_applied_s']:,.0f}",
            )
        )
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    verdict = "met" if f["met"] else "NOT met"
    print(
        f"\nratio (cluster time / DuckDB time): {f['ratio']:.2f}x; "
        f"target <= {f['target_ratio']:g}x: {verdict}"
    )
    if "applied_ratio" in f:
        print(f"ratio until applied on every holder: {f['applied_ratio']:.2f}x")
    print(
        f"\n{f['rows']:,} rows from one Parquet file of {f['parquet_bytes'] / 2**20:.1f} MiB "
        f"({f['parquet_bytes'] / f['rows']:.1f} bytes/row); best of {f['repeat']}, the sides "
        f"in turns. All runs, s: DuckDB {_seconds(f['duckdb_s_all'])}; "
        f"dcluster {_seconds(f['cluster_s_all'])}."
    )
    print(
        "DuckDB: one process, default threads, timed from connect to close (checkpointed). "
        f"dcluster: fsync on, {f['replicas']} copies of every row on disk when COPY returns."
    )
    print(
        f"load average {f['load_avg_1m_before']:.2f} before, {f['load_avg_1m_after']:.2f} "
        f"after; dataset generated in {f['generate_s']:.1f} s; whole run {f['elapsed_s']:.0f} s."
    )


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest")
    parser.add_argument("--rows", type=int, default=ROWS_DEFAULT, help="rows in the dataset")
    parser.add_argument(
        "--cores", type=int, default=CORES_DEFAULT, help="cluster workers (dcluster up --cores)"
    )
    parser.add_argument(
        "--repeat", type=int, default=REPEAT_DEFAULT, help="loads per side; the best counts"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object, nothing else")
    parser.add_argument(
        "--keep-dir", action="store_true", help="keep the dataset's directory (path on stderr)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rows <= ROWS_MAX:
        parser.error(f"--rows is 1 to {ROWS_MAX}")
    if not REPLICAS <= args.cores <= NODES_MAX:
        parser.error(f"--cores is {REPLICAS} (the replicas) to {NODES_MAX}")
    if not 1 <= args.repeat <= REPEAT_MAX:
        parser.error(f"--repeat is 1 to {REPEAT_MAX}")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: nothing is left behind


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        figures = measure(args)
    except KeyboardInterrupt:
        print("interrupted; the cluster is stopped and the temp files removed", file=sys.stderr)
        return 128 + signal.SIGINT
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
