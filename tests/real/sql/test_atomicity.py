"""Every statement is atomic across partitions: a reader running strong
`SELECT count(*), sum(x) …` in a loop while a writer commits statements that each insert
rows into every partition (INSERT VALUES, INSERT … SELECT and COPY FROM Parquet in turn)
only ever sees whole statements — after k statements exactly their rows — never fewer
statements than were acknowledged before the read began, and never goes back in time.
Both ways a strong read gets its point: opened without a log entry (every read tries,
with no back-off after one that could not be opened while writes moved the state) and
the log barrier alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

import cluster.session
from cluster.session import TransportPort
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import connect, holder_copy, placements

STATEMENTS = 24
ROWS = 60
"""Rows per statement: spread by HASH(x) over all PARTITIONS (checked at the end)."""
PARTITIONS = 6
READS_MAX = 400
TEST_TIME_S = 40.0
STEP = 100_000


def rows_sql(k: int) -> str:
    return f"SELECT {k * STEP} + i AS x, {k} AS w, 'pad' || i AS pad FROM range({ROWS}) t(i)"


def prefix_sum(k: int) -> int:
    """sum(x) once statements 1..k applied."""
    return sum(j * STEP * ROWS + ROWS * (ROWS - 1) // 2 for j in range(1, k + 1))


def statement(k: int, files: Path) -> str:
    if k % 3 == 0:
        return f"INSERT INTO t {rows_sql(k)}"
    if k % 3 == 1:
        values = ", ".join(f"({k * STEP + i}, {k}, 'pad{i}')" for i in range(ROWS))
        return f"INSERT INTO t VALUES {values}"
    return f"COPY t FROM '{files / f'{k}.parquet'}'"


@pytest.mark.parametrize("read_points", ["opened", "log barriers"])
def test_strong_reads_never_see_part_of_a_statement(
    three: CliCluster, tmp_path: Path, read_points: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if read_points == "opened":
        monkeypatch.setattr(cluster.session, "OPEN_READ_BACKOFF_MS", 0)
    else:
        monkeypatch.setattr(TransportPort, "open_read", lambda self: None)
    scratch = duckdb.connect(":memory:")
    for k in range(1, STATEMENTS + 1):
        scratch.execute(f"COPY ({rows_sql(k)}) TO '{tmp_path / f'{k}.parquet'}' (FORMAT parquet)")
    scratch.close()
    deadline = time.monotonic() + TEST_TIME_S
    acknowledged = [0]
    """The last statement whose commit returned (written by the writer thread)."""
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with connect(three) as writer:
                for k in range(1, STATEMENTS + 1):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"only {k - 1} statements within {TEST_TIME_S} s")
                    writer.execute(statement(k, tmp_path))
                    assert writer.fetchall() == [(ROWS,)]
                    acknowledged[0] = k
        except BaseException as error:  # noqa: BLE001 - re-raised by the test thread
            failures.append(error)

    with connect(three) as reader:
        reader.execute(
            "CREATE TABLE t (x BIGINT, w INTEGER, pad VARCHAR) "
            f"PARTITION BY HASH(x) PARTITIONS {PARTITIONS} REPLICAS 2"
        )
        writer_thread = threading.Thread(target=write, name="writer")
        writer_thread.start()
        seen: list[int] = []
        try:
            for _ in range(READS_MAX):
                done_before = acknowledged[0]
                finished = not writer_thread.is_alive()
                reader.execute("SELECT count(*), sum(x), count(DISTINCT w), max(w) FROM t")
                count, total, statements, last = reader.fetchall()[0]
                k, partial = divmod(count, ROWS)
                assert partial == 0, f"{count} rows: part of a statement is visible"
                assert (total or 0) == prefix_sum(k), f"{count} rows but sum {total}"
                assert statements == k and (last or 0) == k, (count, statements, last)
                assert k >= done_before, f"saw {k} statements after {done_before} were acked"
                assert not seen or k >= seen[-1], f"went back from {seen[-1]} to {k}"
                seen.append(k)
                if finished or time.monotonic() > deadline:
                    break
        finally:
            writer_thread.join(timeout=TEST_TIME_S)
        assert not writer_thread.is_alive()
        if failures:
            raise failures[0]
        assert seen[-1] == STATEMENTS
        port = reader._port
        assert isinstance(port, TransportPort)
        if read_points == "opened":
            assert port.reads_opened >= len(seen) // 2, (port.reads_opened, len(seen))
        else:
            assert port.reads_opened == 0
        assert len(set(seen)) >= 3, f"the reads saw too few states to prove much: {set(seen)}"
    with three.client() as client:
        for partition, holders in enumerate(placements(client)["main.t"]):
            copy = holder_copy(client, holders[0], "main.t", partition)
            statements_seen = set(copy.column("w").to_pylist())
            assert statements_seen == set(range(1, STATEMENTS + 1)), (
                f"partition {partition} lacks rows of some statement: not a multi-partition test"
            )
