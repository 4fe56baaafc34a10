"""TPC-H on dcluster beside single-process DuckDB, measured in the same run.

The 22 queries (DuckDB's texts; data from dbgen, see benchmarks.tpch_data) run on:
- dcluster: a cluster of `--cores` workers started with `dcluster up`, the tables created
  by `tpch_data.create_tables_sql` (lineitem and orders co-located by order key, customer,
  part and partsupp hashed, supplier, nation and region REFERENCE; `--partitions` each)
  and loaded from the Parquet files with `INSERT … SELECT * FROM read_parquet(…)`, queried
  through the Python API (`dcluster.connect`);
- DuckDB: one process, `threads = 2`, over a DuckDB file database loaded from the same
  Parquet files.
Each query is timed from the call until its rows are Python tuples in the caller's hand
(`fetchall()`), the two sides in turns (DuckDB, cluster, DuckDB, …) so a busy machine slows
both alike; the best of `--runs` counts. Every answer is checked against DuckDB's by
`tpch_data.answer_difference` (same names, types and rows in order; DOUBLE within a
relative 1e-9). A query the cluster refuses or fails (any exception) is reported in the
table, not fatal.

Printed per query: both times, their ratio, whether the answers are identical, and the
bytes moved between the workers and the coordinator for it, both ways (`bytes_moved`, from
EXPLAIN ANALYZE); then
the geometric mean and the largest ratio, against the targets: all identical, geometric
mean at most 1.3, no query over 3x.

Every process started here is stopped in a finally (benchmarks._cluster), also on Ctrl-C or
SIGTERM; the temporary directory (cluster and DuckDB file) is removed unless `--keep-dir`.
The generated data stays cached (tpch_data.cache_directory()).

Usage: python -m benchmarks.tpch [--sf 1] [--queries 1,3,…] [--runs N] [--cores C]
       [--partitions P] [--json] [--keep-dir]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

import dcluster
from benchmarks import _cluster, ingest, tpch_data
from clock import Clock, SystemClock
from cluster.protocol import NODES_MAX
from storage.ddl import PARTITIONS_MAX

SCALE_FACTOR_DEFAULT = 1.0
CORES_DEFAULT = 2
RUNS_DEFAULT = 5
"""Best of five: on a shared 2-core VM single runs of either side move 10-30%."""
RUNS_MAX = 20
DUCKDB_THREADS = 2
TARGET_GEOMEAN_RATIO = 1.3
TARGET_MAX_RATIO = 3.0


@dataclass
class QueryFigures:
    """One query's figures. Times are the best of the runs, in seconds; None when that
    side failed."""

    query: int
    cluster_s: float | None = None
    duckdb_s: float | None = None
    ratio: float | None = None
    identical: bool = False
    difference: str | None = None
    """Why the answers are not identical (or the cluster's error); None when they are."""
    bytes_moved: int | None = None
    cluster_s_all: list[float] = field(default_factory=list)
    duckdb_s_all: list[float] = field(default_factory=list)


def bytes_moved(connection: dcluster.Connection, sql: str) -> int | None:
    """Bytes the workers sent the coordinator to answer `sql` (the Arrow size of every
    fragment's and scan's result), from one more run under EXPLAIN ANALYZE; None when it
    reports none (the query gathered whole tables)."""
    relation = connection.sql("EXPLAIN ANALYZE " + sql)
    assert relation is not None
    sizes = [int(row[4]) for row in relation.fetchall() if row[4] is not None]
    return sum(sizes) if sizes else None


# ---- loading ----


def load_duckdb(database: Path, dataset: tpch_data.Dataset) -> duckdb.DuckDBPyConnection:
    """A DuckDB file database holding the dataset, open with DUCKDB_THREADS threads."""
    connection = duckdb.connect(str(database))
    try:
        connection.execute(f"SET threads = {DUCKDB_THREADS}")
        for statement in tpch_data.plain_create_tables_sql():
            connection.execute(statement)
        for name in tpch_data.TABLES:
            connection.execute(tpch_data.insert_sql(name, dataset))
            counted = connection.execute(f"SELECT count(*) FROM {name}").fetchone()
            if counted != (dataset.rows[name],):
                raise RuntimeError(f"DuckDB: {name} has {counted} rows, not {dataset.rows[name]}")
        connection.execute("CHECKPOINT")
    except BaseException:
        connection.close()
        raise
    return connection


def load_cluster(
    connection: dcluster.Connection, dataset: tpch_data.Dataset, partitions: int
) -> None:
    """The tables created with dcluster's clauses and loaded from the Parquet files."""
    for statement in tpch_data.create_tables_sql(partitions=partitions):
        connection.sql(statement)
    for name in tpch_data.TABLES:
        inserted = connection.sql(tpch_data.insert_sql(name, dataset))
        said = None if inserted is None else inserted.fetchall()
        if said != [(dataset.rows[name],)]:
            raise RuntimeError(f"dcluster: loading {name} said {said}, not {dataset.rows[name]}")


# ---- one query on each side ----


def _timed(action: Callable[[], tpch_data.Answer], clock: Clock) -> tuple[int, tpch_data.Answer]:
    began_ns = clock.monotonic_ns()
    answer = action()
    return clock.monotonic_ns() - began_ns, answer


def _duckdb_answer(connection: duckdb.DuckDBPyConnection, sql: str) -> tpch_data.Answer:
    relation = connection.sql(sql)
    assert relation is not None, sql
    return tpch_data.Answer(
        relation.columns, [str(kind) for kind in relation.types], relation.fetchall()
    )


def _cluster_answer(connection: dcluster.Connection, sql: str) -> tpch_data.Answer:
    relation = connection.sql(sql)
    assert relation is not None, sql
    return tpch_data.Answer(relation.columns, relation.types, relation.fetchall())


def measure_query(
    number: int,
    sql: str,
    reference: duckdb.DuckDBPyConnection,
    cluster: dcluster.Connection,
    runs: int,
    clock: Clock,
) -> QueryFigures:
    """Both sides `runs` times in turns; the best time of each, and the answers compared."""
    figures = QueryFigures(number)
    expected: tpch_data.Answer | None = None
    actual: tpch_data.Answer | None = None
    for _ in range(runs):
        elapsed_ns, expected = _timed(lambda: _duckdb_answer(reference, sql), clock)
        figures.duckdb_s_all.append(elapsed_ns / 1e9)
        if figures.difference is not None:
            continue  # the cluster failed this query once: no use timing it again
        try:
            elapsed_ns, actual = _timed(lambda: _cluster_answer(cluster, sql), clock)
        except Exception as error:  # reported in the table; the other queries still run
            figures.difference = f"dcluster failed: {type(error).__name__}: {error}"
            continue
        figures.cluster_s_all.append(elapsed_ns / 1e9)
    assert expected is not None
    figures.duckdb_s = min(figures.duckdb_s_all)
    if actual is not None and figures.difference is None:
        figures.cluster_s = min(figures.cluster_s_all)
        figures.ratio = figures.cluster_s / figures.duckdb_s
        figures.difference = tpch_data.answer_difference(expected, actual)
        figures.identical = figures.difference is None
        figures.bytes_moved = bytes_moved(cluster, sql)
    return figures


# ---- the run ----


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Get the data, load both sides, and time every chosen query on both."""
    clock = SystemClock()
    began_ns = clock.monotonic_ns()
    figures: dict[str, Any] = {"load_avg_1m_before": os.getloadavg()[0]}
    dataset = tpch_data.ensure_dataset(args.sf, clock)
    figures["prepare_s"] = (clock.monotonic_ns() - began_ns) / 1e9
    results: list[QueryFigures] = []
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="bench-tpch-"))
        if args.keep_dir:
            print(f"cluster and DuckDB file kept in {base}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        loading_ns = clock.monotonic_ns()
        reference = stack.enter_context(contextlib.closing(load_duckdb(base / "tpch.db", dataset)))
        figures["duckdb_load_s"] = (clock.monotonic_ns() - loading_ns) / 1e9
        name = f"bench-tpch-{os.getpid()}"
        cluster = stack.enter_context(_cluster.running(name, args.cores, base / "cluster"))
        connection = stack.enter_context(dcluster.connect(str(cluster.run.path)))
        loading_ns = clock.monotonic_ns()
        load_cluster(connection, dataset, args.partitions)
        ingest._until_applied_everywhere(cluster.run.path, clock)
        figures["cluster_load_s"] = (clock.monotonic_ns() - loading_ns) / 1e9
        for number in args.queries:
            sql = dataset.queries[number]
            results.append(measure_query(number, sql, reference, connection, args.runs, clock))
            if not args.json:
                print(f"  q{number:02d} done", file=sys.stderr, flush=True)
        cluster.note()  # the client's queue too, for the leftover check
    figures["oversubscribe"] = cluster.oversubscribe
    figures["load_avg_1m_after"] = os.getloadavg()[0]
    figures["elapsed_s"] = (clock.monotonic_ns() - began_ns) / 1e9
    return summarize(args, dataset, results) | figures


def summarize(
    args: argparse.Namespace, dataset: tpch_data.Dataset, results: list[QueryFigures]
) -> dict[str, Any]:
    """The geometric mean and largest ratio over the queries the cluster answered, the
    count of identical answers, and the verdict against the targets."""
    ratios = [result.ratio for result in results if result.ratio is not None]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    largest = max(ratios) if ratios else None
    identical = sum(result.identical for result in results)
    return {
        "scale_factor": args.sf,
        "cores": args.cores,
        "partitions": args.partitions,
        "runs": args.runs,
        "duckdb_threads": DUCKDB_THREADS,
        "rows": dict(dataset.rows),
        "geomean_ratio": geomean,
        "max_ratio": largest,
        "queries_identical": identical,
        "queries_run": len(results),
        "target_geomean_ratio": TARGET_GEOMEAN_RATIO,
        "target_max_ratio": TARGET_MAX_RATIO,
        "met": (
            identical == len(results)
            and geomean is not None
            and largest is not None
            and geomean <= TARGET_GEOMEAN_RATIO
            and largest <= TARGET_MAX_RATIO
        ),
        "queries": [asdict(result) for result in results],
    }


# ---- output ----


def print_table(f: dict[str, Any]) -> None:
    rows = [("query", "dcluster s", "DuckDB s", "ratio", "identical", "bytes moved")]
    for q in f["queries"]:
        rows.append(
            (
                f"q{q['query']:02d}",
                _number(q["cluster_s"], ".3f"),
                _number(q["duckdb_s"], ".3f"),
                _number(q["ratio"], ".2f", "x"),
                "yes" if q["identical"] else "NO",
                _number(q["bytes_moved"], ",d"),
            )
        )
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    for q in f["queries"]:
        if q["difference"] is not None:
            print(f"q{q['query']:02d} differs: {q['difference']}")
    verdict = "met" if f["met"] else "NOT met"
    print(
        f"\ngeometric mean ratio {_number(f['geomean_ratio'], '.2f', 'x')}, "
        f"max {_number(f['max_ratio'], '.2f', 'x')}; "
        f"identical {f['queries_identical']}/{f['queries_run']}; targets: all identical, "
        f"geomean <= {f['target_geomean_ratio']:g}x, max <= {f['target_max_ratio']:g}x: "
        f"{verdict}"
    )
    workers = f"{f['cores']} workers" + (", oversubscribed" if f["oversubscribe"] else "")
    print(
        f"\nTPC-H sf {f['scale_factor']:g} ({f['rows']['lineitem']:,} lineitem rows); "
        f"dcluster: {workers}, {f['partitions']} partitions per hashed table, Python API; "
        f"DuckDB: one process, threads={f['duckdb_threads']}, file database. "
        f"Best of {f['runs']}, the sides in turns, until fetchall() returns."
    )
    print(
        f"load: DuckDB {f['duckdb_load_s']:.1f} s, dcluster {f['cluster_load_s']:.1f} s "
        f"(until applied on every worker); data ready in {f['prepare_s']:.1f} s; "
        f"load average {f['load_avg_1m_before']:.2f} before, {f['load_avg_1m_after']:.2f} "
        f"after; whole run {f['elapsed_s']:.0f} s."
    )


def _number(value: float | int | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _queries(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of query numbers: {text!r}") from error
    if not numbers or not all(1 <= n <= tpch_data.QUERY_COUNT for n in numbers):
        raise argparse.ArgumentTypeError(f"query numbers are 1 to {tpch_data.QUERY_COUNT}")
    return sorted(set(numbers))


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tpch")
    parser.add_argument("--sf", type=float, default=SCALE_FACTOR_DEFAULT, help="scale factor")
    parser.add_argument(
        "--queries",
        type=_queries,
        default=list(range(1, tpch_data.QUERY_COUNT + 1)),
        help="comma-separated query numbers (default: all 22)",
    )
    parser.add_argument("--runs", type=int, default=RUNS_DEFAULT, help="runs per side; best")
    parser.add_argument(
        "--cores", type=int, default=CORES_DEFAULT, help="cluster workers (dcluster up --cores)"
    )
    parser.add_argument(
        "--partitions", type=int, default=None, help="partitions per hashed table (default: cores)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object, nothing else")
    parser.add_argument(
        "--keep-dir", action="store_true", help="keep the cluster's and DuckDB's directory"
    )
    args = parser.parse_args(argv)
    if not 0 < args.sf <= tpch_data.SCALE_FACTOR_MAX:
        parser.error(f"--sf is above 0 and at most {tpch_data.SCALE_FACTOR_MAX:g}")
    if not 1 <= args.runs <= RUNS_MAX:
        parser.error(f"--runs is 1 to {RUNS_MAX}")
    if not 1 <= args.cores <= NODES_MAX:
        parser.error(f"--cores is 1 to {NODES_MAX}")
    args.partitions = args.cores if args.partitions is None else args.partitions
    if not 1 <= args.partitions <= PARTITIONS_MAX:
        parser.error(f"--partitions is 1 to {PARTITIONS_MAX}")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: nothing is left behind


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        figures = measure(args)
    except tpch_data.TpchUnavailable as error:
        print(f"no TPC-H data: {error}", file=sys.stderr)
        return 1
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
