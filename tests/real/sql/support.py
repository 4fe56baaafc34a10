"""Helpers of the SQL tests on real clusters: the SQL command line, a single-node DuckDB
mirror to compare against, and reading one holder's copy of one partition.

`run_cli(cluster, ...)` runs the command line's entry point (`cluster.cli:app`, what the
installed `dcluster` script runs), not `python -m cluster.cli`: see test_cli_sql.py for why.

A `Mirror` runs every statement on the cluster (through the Python API) and on a DuckDB
database, and compares results, errors and, after writes, every table's full contents.

`holder_copy` asks ONE node for its copy of one partition (a `ScanRequest` at index 0, what
that node has applied) and returns the rows as an Arrow table owned by the test; the
transport's memory is released before it returns.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

import dcluster
from cluster.client import Client
from cluster.sql_protocol import CatalogRequest, CatalogResponse, ScanError, ScanHeader, ScanRequest
from ipc.transport import BulkReceived, Received
from tests.real.cluster.conftest import ROOT, CliCluster

CLI_TIMEOUT_S = 60.0
SCAN_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 30.0
_ids = itertools.count(1)


# ---- the command line ----


def run_cli(
    cluster: CliCluster, *args: str, expect: int | None = 0
) -> subprocess.CompletedProcess[str]:
    """`dcluster ARGS --name N --data-dir D` through `cluster.cli:app`."""
    command = [sys.executable, "-c", "from cluster.cli import app; app()", *args]
    command += ["--name", cluster.name, "--data-dir", str(cluster.run_dir)]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    cluster.note_processes()
    if expect is not None:
        assert result.returncode == expect, (
            f"`dcluster {' '.join(args)}` exited {result.returncode}, not {expect}:\n"
            f"{result.stdout}\n{result.stderr}\n{cluster.log_tail()}"
        )
    return result


def connect(cluster: CliCluster, consistency: str = "strong") -> dcluster.Connection:
    return dcluster.connect(str(cluster.run_dir), consistency=consistency)


# ---- comparing rows ----


def _normal(value: Any) -> Any:
    """Values as compared: floats rounded (sums over partitions add in another order)."""
    if isinstance(value, float):
        return value if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, Decimal):
        return value
    if isinstance(value, list | tuple):
        return type(value)(_normal(item) for item in value)
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    return value


def normal_rows(rows: Sequence[tuple[Any, ...]], ordered: bool = False) -> list[tuple[Any, ...]]:
    normal = [tuple(_normal(value) for value in row) for row in rows]
    return normal if ordered else sorted(normal, key=repr)


def row_diff(got: Sequence[tuple[Any, ...]], expected: Sequence[tuple[Any, ...]]) -> str:
    """The rows only one side holds (with multiplicity), a few of each."""
    left = Counter(normal_rows(got))
    right = Counter(normal_rows(expected))
    extra = list((left - right).elements())
    missing = list((right - left).elements())
    return (
        f"{len(got)} rows vs {len(expected)} expected; {len(extra)} extra, e.g. {extra[:3]}; "
        f"{len(missing)} missing, e.g. {missing[:3]}"
    )


class Mirror:
    """The cluster (Python API) beside a single-node DuckDB that runs the same statements.

    `run(sql)` runs `sql` on both (`duck_sql` on DuckDB when dcluster's clauses differ) and
    asserts both succeed with the same rows, or both fail with the same message."""

    def __init__(self, con: dcluster.Connection) -> None:
        self.con = con
        self.duck = duckdb.connect(":memory:")
        self.tables: list[str] = []

    def close(self) -> None:
        self.duck.close()

    def run(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        duck_sql: str | None = None,
        ordered: bool = False,
    ) -> list[tuple[Any, ...]]:
        expected_error: str | None = None
        expected: list[tuple[Any, ...]] = []
        expected_types: list[str] = []
        try:
            cursor = self.duck.execute(duck_sql or sql, params)
            expected = cursor.fetchall() if cursor.description else []
            expected_types = [str(column[1]) for column in cursor.description or []]
        except duckdb.Error as error:
            expected_error = str(error)
        try:
            self.con.execute(sql, params)
        except dcluster.Error as error:
            assert expected_error is not None, f"{sql!r}: dcluster refused ({error}), DuckDB ran"
            assert str(error) in self._messages(duck_sql or sql, params, expected_error), (
                sql,
                str(error),
                expected_error,
            )
            return []
        assert expected_error is None, f"{sql!r}: DuckDB refused ({expected_error}), dcluster ran"
        got = self.con.fetchall()
        assert normal_rows(got, ordered) == normal_rows(expected, ordered), sql
        if expected_types and self.con.description:
            got_types = [str(column[1]) for column in self.con.description]
            assert got_types == expected_types, (sql, got_types, expected_types)
        return got

    def _messages(self, sql: str, params: Sequence[Any] | None, first: str) -> set[str]:
        """DuckDB's messages for a statement it refused: `execute` words some binder
        errors with the statement's LINE, `sql` (what the coordinator runs) without."""
        messages = {first}
        try:
            self.duck.sql(sql, params=params)
        except duckdb.Error as error:
            messages.add(str(error))
        return messages

    def create(self, name: str, columns: str, clauses: str = "") -> None:
        """CREATE TABLE name (columns) clauses — DuckDB gets it without the clauses."""
        self.run(
            f"CREATE TABLE {name} ({columns}) {clauses}",
            duck_sql=f"CREATE TABLE {name} ({columns})",
        )
        self.tables.append(name)

    def check_tables(self) -> None:
        """Every table holds, sorted, exactly what DuckDB's holds."""
        for name in self.tables:
            got = self.con.sql(f"SELECT * FROM {name}")
            got_rows = got.fetchall() if got is not None else []
            expected = self.duck.sql(f"SELECT * FROM {name}").fetchall()
            assert normal_rows(got_rows) == normal_rows(expected), (
                f"table {name} differs: {row_diff(got_rows, expected)}"
            )

    def write(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """A write, then every table compared."""
        rows = self.run(sql, params)
        self.check_tables()
        return rows


# ---- one holder's copy of a partition ----


def current_leader(client: Client) -> int:
    """The node leading now. A loaded machine may be between leaders, or the leader slow
    to answer a status, for a moment: asked again until SETTLE_TIMEOUT_S passes."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        leader = client.leader()
        if leader is not None:
            return leader
        time.sleep(0.1)
    raise AssertionError(f"no leader in {SETTLE_TIMEOUT_S:g} s")


def placements(client: Client) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Table key -> holders of each partition, from the leader's applied catalog. A
    loaded machine may be between leaders, or the leader slow to answer, for a moment:
    asked again until SETTLE_TIMEOUT_S passes, as a client of the cluster would."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: object = "no leader"
    while time.monotonic() < deadline:
        leader = current_leader(client)
        request = CatalogRequest(next(client._request_ids), client._reply_address)
        answer = client._exchange(leader, request, CatalogResponse, 5_000)
        if isinstance(answer, CatalogResponse) and answer.ok:
            return {key: tuple(map(tuple, holders)) for key, holders in answer.placements}
        last = answer if answer is not None else f"node {leader} did not answer"
        time.sleep(0.1)
    raise AssertionError(f"no catalog from a leader in {SETTLE_TIMEOUT_S:g} s: {last}")


def holder_copy(client: Client, node: int, table: str, partition: int) -> pa.Table:
    """Node `node`'s rows of `table`'s `partition`, as it has applied them now. Asked
    again once, as the cluster's own reads are, if no answer comes in SCAN_TIMEOUT_S (a
    busy apply lane on a loaded machine); an answer to either request counts."""
    asked: set[int] = set()
    for _attempt in range(2):
        request_id = next(_ids) + client._clock.wall_ns()
        asked.add(request_id)
        request = ScanRequest(request_id, 0, table, partition, None, client._reply_address)
        assert client._send(node, request), f"node {node} cannot be reached"
        answer = _scan_answer(client, node, asked)
        if answer is not None:
            return answer
    raise AssertionError(f"node {node} did not send {table} partition {partition}")


def _scan_answer(client: Client, node: int, asked: set[int]) -> pa.Table | None:
    deadline = time.monotonic() + SCAN_TIMEOUT_S
    transport = client._transport
    while time.monotonic() < deadline:
        for delivery in transport.poll():
            if isinstance(delivery, BulkReceived):
                try:
                    header = delivery.header
                    if isinstance(header, ScanHeader) and header.request_id in asked:
                        return _owned_copy(delivery.table)
                finally:
                    delivery.release()
            elif isinstance(delivery, Received) and isinstance(delivery.message, ScanError):
                if delivery.message.request_id in asked:
                    raise AssertionError(f"node {node}: {delivery.message.error}")
        client._selector.select(0.05)
    return None


def _owned_copy(table: pa.Table) -> pa.Table:
    """A copy in memory the test owns (the delivery may point into shared memory)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.ipc.open_stream(sink.getvalue()) as reader:
        return reader.read_all()


def same_multiset(left: pa.Table, right: pa.Table) -> bool:
    """True if both tables hold the same rows, each as many times."""
    con = duckdb.connect(":memory:")
    try:
        con.register("l", left)
        con.register("r", right)
        extra = con.sql("SELECT count(*) FROM (SELECT * FROM l EXCEPT ALL SELECT * FROM r)")
        missing = con.sql("SELECT count(*) FROM (SELECT * FROM r EXCEPT ALL SELECT * FROM l)")
        return extra.fetchall() == [(0,)] and missing.fetchall() == [(0,)]
    finally:
        con.close()


def settled(cluster: CliCluster, timeout_s: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
    """Wait until every worker is running, answers, and has applied the leader's commit
    index; the status then. (A stale scan runs on a worker's apply lane after everything
    it has applied, so holder copies read afterwards include all of it.)"""

    def check() -> dict[str, Any] | None:
        status = cluster.status_if_up()
        if status is None:
            return None
        nodes = status["nodes"]
        leader = next(node for node in nodes if node["id"] == status["leader"])
        commit = leader["commit_index"]
        for node in nodes:
            if node["state"] != "running" or node["applied_index"] is None:
                return None
            if node["applied_index"] < commit:
                return None
        return status

    result: dict[str, Any] = cluster.wait_for(check, "every worker applied", timeout_s)
    return result


def replica_copies(cluster: CliCluster, table: str) -> dict[int, dict[int, pa.Table]]:
    """partition -> node -> that holder's copy, for every partition of `table`."""
    with cluster.client() as client:
        holders_of = placements(client)[table]
        return {
            partition: {node: holder_copy(client, node, table, partition) for node in holders}
            for partition, holders in enumerate(holders_of)
        }


def assert_replicas_agree(cluster: CliCluster, table: str) -> dict[int, pa.Table]:
    """Every holder of every partition holds the same multiset of rows; the primary's
    copy of each partition."""
    primaries = {}
    for partition, copies in replica_copies(cluster, table).items():
        nodes = list(copies)
        first = copies[nodes[0]]
        for node in nodes[1:]:
            assert same_multiset(first, copies[node]), (
                f"{table} partition {partition}: node {nodes[0]} holds {first.num_rows} rows, "
                f"node {node} holds {copies[node].num_rows}, not the same rows"
            )
        primaries[partition] = first
    return primaries
