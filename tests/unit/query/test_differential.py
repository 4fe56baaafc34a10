"""Differential tests: generated tables and statement sequences, run on the coordinator
over the fake cluster and on plain DuckDB; every result and every table compared after
every statement (see harness.Pair)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.query.harness import Pair
from tests.unit.query.workload import PARTITIONINGS, TYPES, Step, Table, steps_for

COLUMN_KINDS = sorted(TYPES)


Workload = tuple[Table, Table, list[tuple[int, int, int, int]]]


@st.composite
def workloads(draw: st.DrawFn, primary_key: bool) -> Workload:
    kinds = draw(st.lists(st.sampled_from(COLUMN_KINDS), min_size=1, max_size=4, unique=True))
    table = Table(
        "t",
        tuple((f"c_{kind}", kind) for kind in kinds),
        draw(st.sampled_from(PARTITIONINGS)),
        primary_key,
    )
    other = Table(
        "u",
        (("c_int", "int"), ("c_varchar", "varchar")),
        draw(st.sampled_from(PARTITIONINGS)),
        False,
    )
    choices = st.tuples(
        st.integers(0, 40), st.integers(0, 20), st.integers(0, 20), st.integers(0, 3)
    )
    return table, other, draw(st.lists(choices, min_size=2, max_size=7))


def run_step(pair: Pair, step: Step, folder: Path, number: int) -> None:
    sql = step.sql
    if step.file_query is not None:
        path = folder / f"rows_{number}.{step.file_format}"
        with duckdb.connect() as writer:
            writer.execute(
                f"COPY ({step.file_query}) TO '{path}' (FORMAT {step.file_format})"
            ).fetchall()
        sql = sql.replace("{path}", str(path))
    pair.run(sql, ordered=step.ordered, fails=None)


SETTINGS = settings(
    # Derandomized: the same examples every run, so the suite is deterministic. Explore
    # with e.g. DCLUSTER_QUERY_EXAMPLES=300 (random examples, not derandomized).
    max_examples=int(os.environ.get("DCLUSTER_QUERY_EXAMPLES", "12")),
    derandomize="DCLUSTER_QUERY_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(workloads(primary_key=False))
def test_statement_sequences_match_duckdb(workload: Workload) -> None:
    run_workload(workload)


@SETTINGS
@given(workloads(primary_key=True))
def test_statement_sequences_on_keyed_tables_match_duckdb(workload: Workload) -> None:
    """With a PRIMARY KEY: every write reads the table; upserts, key collisions."""
    run_workload(workload)


def run_workload(workload: Workload) -> None:
    table, other, choices = workload
    pair = Pair()
    try:
        with tempfile.TemporaryDirectory() as folder:
            pair.run(other.create())
            pair.run(f"INSERT INTO u {other.select_rows(0, 30, 99)}")
            pair.run(table.create())
            pair.run(f"INSERT INTO t {table.select_rows(0, 40, 1)}")
            for number, (choice, a, b, seed) in enumerate(choices):
                run_step(pair, steps_for(table, other, choice, a, b, seed), Path(folder), number)
    finally:
        pair.close()


def test_every_type_and_partitioning_round_trips() -> None:
    """All column types in one table, under each partitioning: load, update every column,
    move keys across partitions, delete — compared after each statement."""
    for partitioning in PARTITIONINGS:
        if partitioning in ("", "PARTITION BY HASH(k) PARTITIONS 1"):
            continue  # the default and one hash partition: left to the generated workloads
        table = Table("t", tuple((f"c_{kind}", kind) for kind in COLUMN_KINDS), partitioning, True)
        other = Table("u", (("c_int", "int"), ("c_varchar", "varchar")), "", False)
        pair = Pair()
        try:
            pair.run(other.create())
            pair.run(table.create())
            pair.run(f"INSERT INTO t {table.select_rows(0, 60, 5)}")
            for choice in range(1, 4):
                pair.run(steps_for(table, other, choice, 3, 2, 0).sql)
            pair.run("SELECT * FROM t")
        finally:
            pair.close()
