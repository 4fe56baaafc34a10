"""Statements the cluster refuses, on real processes: each refusal carries single-node
DuckDB's message (bad SQL, unknown tables and columns, NOT NULL, CHECK and PRIMARY KEY
violations) and writes nothing; a write whose partitions have fewer live holders than the
write quorum (a paused holder, or a killed one the supervisor cannot restart yet) is
refused with "nothing was written", and nothing of it appears once the holder is back.

The client's stage timeout (how long it waits for a holder's durable ack) is shortened from
30 s to 2 s in this process, so that a refusal comes within seconds; the path is the same.
"""

from __future__ import annotations

import os
import signal

import pytest

import cluster.session
import dcluster
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import (
    Mirror,
    assert_replicas_agree,
    connect,
    current_leader,
    holder_copy,
    placements,
    settled,
)

STAGE_TIMEOUT_MS_SHORT = 2_000


@pytest.fixture
def short_stage_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.session, "STAGE_TIMEOUT_MS", STAGE_TIMEOUT_MS_SHORT)


def test_refusals_carry_duckdbs_messages_and_write_nothing(three: CliCluster) -> None:
    with connect(three) as con:
        mirror = Mirror(con)
        try:
            mirror.create(
                "p",
                "id INTEGER PRIMARY KEY, v VARCHAR NOT NULL, n INTEGER CHECK (n > 0)",
                "PARTITION BY HASH(id) PARTITIONS 3",
            )
            mirror.create("q", "a INTEGER, b VARCHAR", "PARTITION BY RANGE(a) (10)")
            mirror.write("INSERT INTO p VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)")
            mirror.write("INSERT INTO q VALUES (1, 'x'), (20, NULL)")
            refused = (
                "SELEC * FROM p",
                "SELECT * FROM p WHERE",
                "SELECT * FROM nope",
                "SELECT nope FROM p",
                "INSERT INTO nope VALUES (1)",
                "UPDATE nope SET a = 1",
                "DELETE FROM nope",
                "INSERT INTO p VALUES (1, 'dup', 5)",
                "INSERT INTO p VALUES (7, 'x', 1), (7, 'y', 2)",
                "INSERT INTO p VALUES (8, NULL, 1)",
                "INSERT INTO p VALUES (9, 'x', 0)",
                "INSERT INTO p SELECT a + 100, b, a FROM q",  # one NULL b among good rows
                "INSERT INTO p SELECT i, 'r', i - 5 FROM range(4, 40) t(i)",  # CHECK, late row
                "UPDATE p SET n = n - 2",
                "UPDATE p SET v = NULL WHERE id = 2",
                "UPDATE p SET id = 1",
                "INSERT INTO q VALUES ('not a number', 'x')",
                "INSERT INTO q (a, nope) VALUES (1, 2)",
            )
            for sql in refused:
                with pytest.raises(dcluster.Error):
                    con.execute(sql)
                mirror.write(sql)  # the same message as DuckDB's; nothing written anywhere
            mirror.write("INSERT INTO p VALUES (4, 'd', 4)")  # the table still takes writes
        finally:
            mirror.close()


def pick_victim(three: CliCluster, table: str) -> tuple[int, list[int]]:
    """A node other than the leader and the partitions of `table` it holds."""
    with three.client() as client:
        leader = current_leader(client)
        holders_of = placements(client)[table]
    victim = next(node for holders in holders_of for node in holders if node != leader)
    return victim, [p for p, holders in enumerate(holders_of) if victim in holders]


def table_rows(con: dcluster.Connection, table: str) -> list[tuple[object, ...]]:
    relation = con.sql(f"SELECT * FROM {table} ORDER BY ALL")
    assert relation is not None
    return relation.fetchall()


def test_a_write_with_a_paused_holder_of_two_is_refused_and_leaves_nothing(
    three: CliCluster, short_stage_timeout: None
) -> None:
    with connect(three) as con:
        con.execute(
            "CREATE TABLE w (id BIGINT, v VARCHAR) PARTITION BY HASH(id) PARTITIONS 3 REPLICAS 2"
        )
        con.execute("INSERT INTO w SELECT i, 'before' FROM range(30) t(i)")
        before = table_rows(con, "w")
        victim, held = pick_victim(three, "main.w")
        three.cli("chaos", "pause", str(victim))
        try:
            with pytest.raises(dcluster.StageRefused) as refused:
                con.execute("INSERT INTO w SELECT i, 'during' FROM range(100, 160) t(i)")
            message = str(refused.value)
            assert message.endswith("nothing was written"), message
            assert f"no answer from node(s) {victim}" in message, message
            assert "2 needed" in message, message
        finally:
            three.cli("chaos", "resume", str(victim))
        settled(three)
        assert table_rows(con, "w") == before
        assert_replicas_agree(three, "main.w")
        with three.client() as client:
            for partition in held:  # the victim's own copies hold none of it either
                copy = holder_copy(client, victim, "main.w", partition)
                assert "during" not in copy.column("v").to_pylist()
        con.execute("INSERT INTO w VALUES (1000, 'after')")
        assert len(table_rows(con, "w")) == len(before) + 1


def test_a_write_with_a_killed_holder_is_refused_until_it_is_back(
    three: CliCluster, short_stage_timeout: None
) -> None:
    with connect(three) as con:
        con.execute(
            "CREATE TABLE k (id BIGINT, v VARCHAR) PARTITION BY HASH(id) PARTITIONS 3 REPLICAS 2"
        )
        con.execute("INSERT INTO k SELECT i, 'before' FROM range(30) t(i)")
        before = table_rows(con, "k")
        victim, _ = pick_victim(three, "main.k")
        supervisor = three.info().supervisor_pid
        assert supervisor is not None
        os.kill(supervisor, signal.SIGSTOP)
        try:
            killed = three.cli("chaos", "kill", str(victim))
            assert f"killed node {victim}" in killed.stdout
            with pytest.raises(dcluster.StageRefused) as refused:
                con.execute("INSERT INTO k SELECT i, 'during' FROM range(100, 160) t(i)")
            assert str(refused.value).endswith("nothing was written")
            assert table_rows(con, "k") == before, "reads still served by the live holders"
        finally:
            os.kill(supervisor, signal.SIGCONT)
        three.wait_for(lambda: three.info().nodes[victim].restarts == 1, "the victim restarted")
        settled(three)
        assert table_rows(con, "k") == before
        assert_replicas_agree(three, "main.k")
        con.execute("INSERT INTO k VALUES (1000, 'after')")
        assert len(table_rows(con, "k")) == len(before) + 1
