"""A worker that was down while the cluster moved on catches up from the log, and reads at
both consistencies.

- Catch-up: one worker is SIGKILLed while its supervisor is SIGSTOPped (so it stays down);
  meanwhile bulk writes, an ALTER TABLE ADD COLUMN, a CREATE TABLE with rows and a DROP
  TABLE go through the other two, plus many key-value log entries. Once the supervisor
  continues and restarts it, its partitions equal the others' (it fetched the batches it
  never received), it holds the new table and not the dropped one, and `status --json`
  counts its partitions and rows like `partitions --json` does.

  The same again with snapshots every 50 entries (`DCLUSTER_SNAPSHOT_ENTRIES`): the log is
  compacted past the down worker, so it gets the leader's snapshot and copies the
  partitions that changed from live replicas at a read barrier of its own. Appends the
  leader sent after it saw the worker die wait in its transport for the next incarnation
  (a delayed message, which Raft allows); so that none of them carries a SQL write, the
  leader's window of unacknowledged appends to the dead worker is first filled with
  key-value entries.

- Strong and stale: while a writer commits statement after statement, a strong read sees
  every statement acknowledged before it began, whole; a stale read (the Python API's
  consistency, `SET dcluster_consistency`, and `dcluster sql --consistency stale`) returns
  a subset of the rows written, never a row twice; once settled both agree.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest

import cluster.session
from cluster import control
from raft.config import RaftConfig
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import (
    assert_replicas_agree,
    connect,
    current_leader,
    holder_copy,
    placements,
    run_cli,
    same_multiset,
    settled,
)

KV_ENTRIES = 200
SNAPSHOT_ENTRIES = 50
# Past this many unacknowledged appends the leader sends a follower none until it answers.
WINDOW_FILL = 2 * RaftConfig.inflight_messages_max


@pytest.fixture
def three_compacting(cluster: CliCluster, monkeypatch: pytest.MonkeyPatch) -> CliCluster:
    monkeypatch.setenv("DCLUSTER_SNAPSHOT_ENTRIES", str(SNAPSHOT_ENTRIES))
    cluster.up("--cores", "3", "--oversubscribe")
    return cluster


def test_a_worker_down_during_many_writes_catches_up_from_the_log(
    three: CliCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = _down_while_the_cluster_moves_on(three, monkeypatch)
    log = three.run.worker_log(down).read_text()
    assert '"catch_up_copying"' not in log  # the log was enough


def test_a_worker_down_past_compaction_copies_from_replicas(
    three_compacting: CliCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    three = three_compacting
    down = _down_while_the_cluster_moves_on(three, monkeypatch, compacted=True)
    log = three.run.worker_log(down).read_text()
    assert '"snapshot_installed"' in log, "the log was not compacted past the down worker"
    assert '"catch_up_copying"' in log and '"catch_up_done"' in log, _story(three)


def _compacted_through(three: CliCluster, node: int) -> int:
    through = [
        int(event["compacted_through"])
        for event in map(json.loads, three.run.worker_log(node).read_text().splitlines())
        if event["event"] == "snapshot_taken"
    ]
    return max(through, default=0)


def _story(three: CliCluster) -> str:
    """Every worker's snapshot and catch-up events, for a failure's message."""
    lines = []
    for node in range(3):
        for line in three.run.worker_log(node).read_text().splitlines():
            event = json.loads(line)
            if event["event"].startswith(("snapshot", "catch_up", "started", "stopped")):
                fields = {k: v for k, v in event.items() if k not in ("wall_ns", "level", "pid")}
                lines.append(json.dumps(fields))
    return "\n".join(lines)


def _down_while_the_cluster_moves_on(
    three: CliCluster, monkeypatch: pytest.MonkeyPatch, compacted: bool = False
) -> int:
    """`compacted`: before the down worker restarts, wait until both live workers have
    compacted their logs past every SQL write (else it may catch up on those from the log
    and only the key-value tail from the snapshot, which needs no copy)."""
    # Each write waits this long for the dead holder's ack before going on with the other
    # two (30 s by default): shortened so the test stays short.
    monkeypatch.setattr(cluster.session, "STAGE_TIMEOUT_MS", 1_500)
    with connect(three) as con:
        con.execute("CREATE TABLE c (id BIGINT, g INTEGER) PARTITION BY HASH(id) PARTITIONS 4")
        con.execute("CREATE TABLE gone (id BIGINT) PARTITION BY HASH(id)")
        con.execute("INSERT INTO c SELECT i, 0 FROM range(1000) t(i)")
        con.execute("INSERT INTO gone VALUES (1), (2)")
        with three.client() as client:
            leader = current_leader(client)
        down = (leader + 1) % 3
        supervisor = three.info().supervisor_pid
        assert supervisor is not None
        os.kill(supervisor, signal.SIGSTOP)
        try:
            control.signal_node(three.info(), down, signal.SIGKILL)  # `dcluster chaos kill`
            if compacted:
                with three.client() as client:
                    for number in range(WINDOW_FILL):
                        client.put(f"window-{number}", str(number))
            for batch in range(1, 4):
                con.execute(
                    f"INSERT INTO c SELECT {batch * 10_000} + i, {batch} FROM range(5000) t(i)"
                )
                assert con.fetchall() == [(5000,)]
            con.execute("ALTER TABLE c ADD COLUMN note VARCHAR DEFAULT 'old'")
            con.execute("INSERT INTO c SELECT 90000 + i, 9, 'new' FROM range(500) t(i)")
            con.execute("CREATE TABLE d (k INTEGER, v VARCHAR) PARTITION BY RANGE(k) (100)")
            con.execute("INSERT INTO d SELECT i, 'v' || i FROM range(300) t(i)")
            con.execute("DROP TABLE gone")
            with three.client() as client:
                written = min(
                    client.put(f"while-down-{number}", str(number)) for number in range(KV_ENTRIES)
                )  # the first put's index: every SQL write is below it
                if compacted:
                    live = [node for node in range(3) if node != down]
                    three.wait_for(
                        lambda: all(_compacted_through(three, node) >= written for node in live),
                        "the live workers to compact their logs past the SQL writes",
                    )
        finally:
            os.kill(supervisor, signal.SIGCONT)
        three.wait_for(lambda: three.info().nodes[down].restarts == 1, "the worker restarted")
        status = settled(three)
        relation = con.sql("SELECT count(*), count(DISTINCT id), count(note) FROM c")
        assert relation is not None
        assert relation.fetchall() == [(16_500, 16_500, 16_500)]
    assert_replicas_agree(three, "main.c")
    assert_replicas_agree(three, "main.d")
    with three.client() as client:
        holders_of = placements(client)
        assert "main.gone" not in holders_of
        for table in ("main.c", "main.d"):
            for partition, holders in enumerate(holders_of[table]):
                if down in holders:
                    copy = holder_copy(client, down, table, partition)
                    other = next(node for node in holders if node != down)
                    assert same_multiset(copy, holder_copy(client, other, table, partition))
        assert client.get(f"while-down-{KV_ENTRIES - 1}", stale=True) is not None
    held = [
        entry
        for entry in json.loads(run_cli(three, "partitions", "--json").stdout)
        if down in [holder["node"] for holder in entry["holders"]]
    ]
    assert {entry["table"] for entry in held} <= {"main.c", "main.d"}

    def counted() -> bool:
        node = three.status()["nodes"][down]
        return node["partitions"] == len(held) and node["rows"] == sum(
            next(h["rows"] for h in entry["holders"] if h["node"] == down) or 0
            for entry in json.loads(run_cli(three, "partitions", "--json").stdout)
            if down in [holder["node"] for holder in entry["holders"]]
        )

    three.wait_for(counted, "the restarted worker to count its partitions", timeout_s=20)
    assert status["nodes"][down]["restarts"] == 1
    return down


STATEMENTS = 20
ROWS = 50
READS_MAX = 200
TEST_TIME_S = 30.0


def batch_of(row_id: int) -> int:
    return row_id // 1000


def test_strong_sees_every_acknowledged_write_and_stale_a_subset(three: CliCluster) -> None:
    acknowledged = [0]
    issued = [0]
    failures: list[BaseException] = []
    deadline = time.monotonic() + TEST_TIME_S

    def write() -> None:
        try:
            with connect(three) as writer:
                for k in range(1, STATEMENTS + 1):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"only {k - 1} statements in {TEST_TIME_S} s")
                    issued[0] = k
                    writer.execute(f"INSERT INTO s SELECT {k * 1000} + i FROM range({ROWS}) t(i)")
                    acknowledged[0] = k
        except BaseException as error:  # noqa: BLE001 - re-raised by the test thread
            failures.append(error)

    with connect(three) as strong, connect(three, consistency="stale") as stale:
        strong.execute("CREATE TABLE s (id BIGINT) PARTITION BY HASH(id) PARTITIONS 3")
        writer = threading.Thread(target=write, name="writer")
        writer.start()
        try:
            for number in range(READS_MAX):
                if not writer.is_alive() or time.monotonic() > deadline:
                    break
                done_before = acknowledged[0]
                if number % 2:
                    ids = [row[0] for row in strong.execute("SELECT id FROM s").fetchall()]
                    batches = Counter(batch_of(row_id) for row_id in ids)
                    assert all(count == ROWS for count in batches.values()), "a partial write"
                    assert set(range(1, done_before + 1)) <= set(batches), (
                        f"a strong read missed acknowledged writes (acked {done_before})"
                    )
                else:
                    ids = [row[0] for row in stale.execute("SELECT id FROM s").fetchall()]
                    assert len(ids) == len(set(ids)), "a stale read returned a row twice"
                    assert all(1 <= batch_of(row_id) <= issued[0] for row_id in ids)
        finally:
            writer.join(TEST_TIME_S)
        assert not writer.is_alive()
        if failures:
            raise failures[0]
        settled(three)
        everything = sorted(k * 1000 + i for k in range(1, STATEMENTS + 1) for i in range(ROWS))
        assert sorted(row[0] for row in strong.execute("SELECT id FROM s").fetchall()) == everything
        assert sorted(row[0] for row in stale.execute("SELECT id FROM s").fetchall()) == everything
        strong.execute("SET dcluster_consistency = 'stale'")
        assert strong.execute("SELECT count(*) FROM s").fetchall() == [(len(everything),)]
    answer: dict[str, Any] = json.loads(
        run_cli(
            three,
            "sql",
            "SELECT count(*) AS n FROM s",
            "--format",
            "json",
            "--consistency",
            "stale",
        ).stdout
    )
    assert answer == {"n": len(everything)}
