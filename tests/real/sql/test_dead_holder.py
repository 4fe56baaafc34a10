"""A holder that is dead — SIGKILLed, its supervisor SIGSTOPped so it stays down, its
registry lock released so every transport sees it gone — should cost reads and writes
nothing once the client's transport knows it: DESIGN §5.4 "Fragments go to one live
replica per partition", §4.3 "Fewer live holders than required → refused", so a quorum of
live holders is enough.

The client hedges: a holder (or node) silent for a few hundred milliseconds is not waited
out; the next one is asked too and the first answer counts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

import cluster.session
from cluster import control
from tests.real.cluster.conftest import CliCluster
from tests.real.sql.support import connect, current_leader, placements

TIMEOUT_MS = 5_000
"""The client's stage and scan timeouts in these tests (set here, so that what they measure
does not move with the defaults). A live holder answers in well under half of it."""
BOUND_S = TIMEOUT_MS / 2 / 1000


@pytest.fixture
def dead_primary(three: CliCluster) -> Iterator[tuple[CliCluster, int]]:
    """Table `t` (3 partitions, 3 replicas, 300 rows) and a dead node that is the primary
    of one of its partitions and not the leader; the supervisor continues at the end."""
    with connect(three) as con:
        con.execute("CREATE TABLE t (id BIGINT) PARTITION BY HASH(id) PARTITIONS 3")
        con.execute("INSERT INTO t SELECT i FROM range(300) t(i)")
        assert con.execute("SELECT count(*) FROM t").fetchall() == [(300,)]
    with three.client() as client:
        leader = current_leader(client)
        holders_of = placements(client)["main.t"]
    victim = next(holders[0] for holders in holders_of if holders[0] != leader)
    supervisor = three.info().supervisor_pid
    assert supervisor is not None
    os.kill(supervisor, signal.SIGSTOP)
    try:
        control.signal_node(three.info(), victim, signal.SIGKILL)
        yield three, victim
    finally:
        os.kill(supervisor, signal.SIGCONT)


def test_reads_with_a_dead_primary_are_not_slowed_by_it(
    dead_primary: tuple[CliCluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.session, "SCAN_TIMEOUT_MS", TIMEOUT_MS)
    three, _ = dead_primary
    with connect(three) as con:
        for consistency in ("strong", "stale"):
            started = time.monotonic()
            relation = con.sql("SELECT count(*) FROM t", consistency=consistency)
            assert relation is not None and relation.fetchall() == [(300,)]
            elapsed = time.monotonic() - started
            assert elapsed < BOUND_S, f"a {consistency} read took {elapsed:.1f} s"


def test_strong_reads_with_a_dead_node_still_open_without_a_log_entry(
    dead_primary: tuple[CliCluster, int],
) -> None:
    """The dead node never answers `OpenRead`: the live nodes' answers agree and make the
    read point, and after the first read the dead node is not waited for at all."""
    three, dead = dead_primary
    with connect(three) as con:
        port = con._port
        assert isinstance(port, cluster.session.TransportPort)
        for _ in range(5):
            assert con.execute("SELECT count(*), sum(id) FROM t").fetchall() == [(300, 44850)]
        assert port.reads_opened == 5 and port.reads_not_opened == 0
        assert port._silent == {dead}


def test_writes_with_a_dead_holder_go_on_with_the_live_quorum(
    dead_primary: tuple[CliCluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.session, "STAGE_TIMEOUT_MS", TIMEOUT_MS)
    three, _ = dead_primary
    with connect(three) as con:
        started = time.monotonic()
        con.execute("INSERT INTO t SELECT 1000 + i FROM range(300) t(i)")
        assert con.fetchall() == [(300,)]
        elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, f"the write took {elapsed:.1f} s"
