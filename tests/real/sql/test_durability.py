"""Durability and exactly-once apply under SIGKILL and SIGSTOP, on real processes.

- A holder (a follower, then the leader) SIGKILLed while a COPY of 500 000 rows runs: the
  statement is applied entirely or not at all (whatever the client was told), an
  acknowledged COPY is there, and the restarted worker applies nothing twice.
- A worker SIGKILLed right after a burst of writes (while it applies them), another paused
  and resumed during writes: once the cluster settles, every holder of every partition
  holds the same multiset of rows, with no duplicate, and the rows are exactly those of the
  acknowledged writes.

Holder copies are read one node at a time (`support.holder_copy`). The kill during a COPY
uses `cluster.control.signal_node`, what `dcluster chaos kill` runs, in this process: the
command line takes most of a second to start, longer than the COPY.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import cluster.session
import dcluster
from cluster import control
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import (
    assert_replicas_agree,
    connect,
    current_leader,
    placements,
    replica_copies,
    settled,
)

BIG_ROWS = 500_000
ROUND_IDS = 1_000_000
KILL_DELAYS_S = (0.25, 0.5)
"""After the COPY starts: one kill per round, the last round's victim the leader."""
COPY_WAIT_S = 45.0


def big_file(tmp_path: Path, number: int) -> Path:
    path = tmp_path / f"big-{number}.parquet"
    first = number * ROUND_IDS
    duckdb.sql(
        f"COPY (SELECT {first} + i AS id, i * 0.5 AS v, 'row-' || i AS s "
        f"FROM range({BIG_ROWS}) t(i)) TO '{path}' (FORMAT parquet)"
    )
    return path


def kill(three: CliCluster, node: int) -> None:
    control.signal_node(three.info(), node, signal.SIGKILL)


def restarted(three: CliCluster, node: int, restarts: int) -> None:
    def back() -> bool:
        info = three.info().nodes[node]
        return info.restarts >= restarts and info.state == "running"

    three.wait_for(back, f"node {node} restarted", timeout_s=30)


def test_a_holder_killed_during_a_big_copy_leaves_all_of_it_or_none(
    three: CliCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The killed holder loses the rows staged on it (and those it was to pass on): the
    # client waits this long for its ack before staging on the others directly (30 s by
    # default, shortened so the test stays short).
    monkeypatch.setattr(cluster.session, "STAGE_TIMEOUT_MS", 4_000)
    files = [big_file(tmp_path, number) for number in range(len(KILL_DELAYS_S))]
    outcomes: dict[int, object] = {}
    killed_during: list[bool] = []
    with connect(three) as con:
        con.execute("CREATE TABLE big (id BIGINT, v DOUBLE, s VARCHAR) PARTITION BY HASH(id)")
        for number, delay in enumerate(KILL_DELAYS_S):
            with three.client() as client:
                leader = current_leader(client)
            last = number == len(KILL_DELAYS_S) - 1
            victim = leader if last else (leader + 1 + number) % 3
            restarts = three.info().nodes[victim].restarts

            def copy(path: Path = files[number], number: int = number) -> None:
                try:
                    with connect(three) as copier:
                        copier.execute(f"COPY big FROM '{path}'")
                        outcomes[number] = copier.fetchall()
                except BaseException as error:  # noqa: BLE001 - judged by check_round
                    outcomes[number] = error

            copier = threading.Thread(target=copy, name=f"copy-{number}")
            copier.start()
            time.sleep(delay)
            killed_during.append(copier.is_alive())
            kill(three, victim)
            copier.join(COPY_WAIT_S)
            assert not copier.is_alive(), "the COPY did not end"
            restarted(three, victim, restarts + 1)
            settled(three)
            check_round(con, number, outcomes.get(number))
        total = count_of(con, "big")
    assert any(killed_during), "every COPY ended before its kill: nothing was proven"
    copies = assert_replicas_agree(three, "main.big")
    assert sum(copy.num_rows for copy in copies.values()) == total


def count_of(con: dcluster.Connection, table: str) -> int:
    relation = con.sql(f"SELECT count(*) FROM {table}")
    assert relation is not None
    return int(relation.fetchall()[0][0])


def check_round(con: dcluster.Connection, number: int, outcome: object) -> None:
    """The round's rows: all or none; all when acknowledged; never twice. A refusal must
    be one of dcluster's errors (the outcome may then be unknown, hence all or none)."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, dcluster.Error):
        raise AssertionError(f"round {number}: the COPY failed oddly") from outcome
    assert outcome is not None, f"round {number}: the COPY thread recorded nothing"
    first = number * ROUND_IDS
    relation = con.sql(
        f"SELECT count(*), count(DISTINCT id) FROM big WHERE id BETWEEN {first} "
        f"AND {first + ROUND_IDS - 1}"
    )
    assert relation is not None
    rows, distinct = relation.fetchall()[0]
    assert rows == distinct, f"round {number}: {rows - distinct} rows applied twice"
    assert rows in (0, BIG_ROWS), f"round {number}: {rows} of {BIG_ROWS} rows: half a COPY"
    if isinstance(outcome, list):
        assert outcome == [(BIG_ROWS,)]
        assert rows == BIG_ROWS, f"round {number}: acknowledged but {rows} rows there"


def ids_of(table: pa.Table) -> list[int]:
    return sorted(table.column("id").to_pylist())


def test_replicas_hold_the_same_rows_exactly_once_after_kills_and_pauses(
    three: CliCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A paused holder makes the client wait this long for its ack (then it goes on with
    # the quorum of the other two): shortened from 30 s so the test stays short.
    monkeypatch.setattr(cluster.session, "STAGE_TIMEOUT_MS", 2_000)
    acknowledged: set[int] = set()
    with connect(three) as con:
        con.execute(
            "CREATE TABLE e (id BIGINT, g INTEGER, s VARCHAR) "
            "PARTITION BY HASH(id) PARTITIONS 5 REPLICAS 3"
        )
        con.execute("CREATE TABLE f (id BIGINT, s VARCHAR) PARTITION BY RANGE(id) (500, 5000)")

        def burst(first_batch: int, batches: int, both: bool = True) -> None:
            for batch in range(first_batch, first_batch + batches):
                first = batch * 1000
                con.execute(
                    f"INSERT INTO e SELECT {first} + i, {batch}, 'b' || i FROM range(400) t(i)"
                )
                assert con.fetchall() == [(400,)]
                acknowledged.update(range(first, first + 400))
                if both:
                    con.execute(f"INSERT INTO f VALUES ({batch * 7}, 'x'), ({batch * 500}, 'y')")

        with three.client() as client:
            leader = current_leader(client)
        follower, other = (leader + 1) % 3, (leader + 2) % 3
        burst(0, 12)
        killed = three.cli("chaos", "kill", str(follower))  # while it applies the burst
        assert f"killed node {follower}" in killed.stdout
        burst(12, 6)
        restarted(three, follower, 1)
        paused = three.cli("chaos", "pause", str(other))
        assert f"paused node {other}" in paused.stdout
        try:
            burst(18, 2, both=False)  # each write waits for the paused holder
        finally:
            three.cli("chaos", "resume", str(other))
        burst(21, 3)
        settled(three)
        assert count_of(con, "e") == len(acknowledged)
    for partition, copies in replica_copies(three, "main.e").items():
        for node, copy in copies.items():
            ids = ids_of(copy)
            assert len(ids) == len(set(ids)), f"node {node} partition {partition}: duplicates"
    primaries = assert_replicas_agree(three, "main.e")
    every_id = sorted(i for copy in primaries.values() for i in ids_of(copy))
    assert every_id == sorted(acknowledged), "the rows are not exactly the acknowledged ones"
    assert_replicas_agree(three, "main.f")
    with three.client() as client:
        assert len(placements(client)["main.e"]) == 5
