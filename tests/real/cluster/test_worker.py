"""Workers as real processes: election, the key-value API, exactly-once retries,
failover, pauses, restarts, SIGKILL during group commit, snapshots sent to a lagging
follower, a torn WAL tail, a corrupt WAL, a failed fsync, SIGTERM, partitions, and a
worker joining over TCP as a learner and promoted to voter.

Every test starts its own small cluster in a temporary run directory (tests/real/cluster/
workers.py) and tears it down — processes, queues, segments — whatever happens. Waits are
on conditions with bounded timeouts.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clock import SystemClock
from cluster import _loop
from cluster._worker_log import EventLog, TermSource
from cluster._worker_stop import StopSignal
from cluster.config import WorkerConfig
from cluster.protocol import KvOp, KvRequest, MembershipOp
from cluster.worker import EXIT_WAL_FAILED
from ipc import mq, registry
from ipc.local import reclaim_cluster
from storage import FaultyFiles
from tests.real.cluster.workers import (
    EXIT_WAIT_S,
    QUEUES_PER_HOST_EXPECTED,
    TestClient,
    Workers,
    running,
    wait_until,
)

VALUE = b"v" * 128
CATCH_UP_WAIT_S = 10.0
PAUSE_S = 2.0
KILL_AFTER_ACKS = 250


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Workers, TestClient]]:
    with running(tmp_path, 3) as (workers, client):
        client.find_leader()
        yield workers, client


def applied_everywhere(client: TestClient, nodes: list[int], index: int) -> bool:
    for node in nodes:
        status = client.status(node)
        if status is None or status.applied_index < index:
            return False
    return True


def others(workers: Workers, node: int) -> list[int]:
    return [other for other in range(workers.size) if other != node]


# ---- the API ----


def test_three_workers_elect_one_leader_and_serve_the_kv_api(
    three: tuple[Workers, TestClient],
) -> None:
    workers, client = three
    statuses = [client.status(node) for node in range(3)]
    assert all(status is not None for status in statuses)
    leaders = [status.id for status in statuses if status is not None and status.role == "leader"]
    assert leaders == [client.leader]
    assert client.put("a", b"1").found is False
    assert client.get("a").value == b"1"
    cas_miss = client.kv(KvOp.CAS, "a", b"2", expected=b"0")
    assert (cas_miss.ok, cas_miss.value) == (False, b"1")
    assert client.kv(KvOp.CAS, "a", b"2", expected=b"1").ok
    assert client.get("a").value == b"2"
    deleted = client.kv(KvOp.DELETE, "a")
    assert deleted.ok and deleted.found
    missing = client.get("a")
    assert missing.ok and not missing.found


def test_a_write_sent_twice_is_applied_once(three: tuple[Workers, TestClient]) -> None:
    workers, client = three
    assert client.leader is not None
    request = KvRequest(client.request_id(), KvOp.PUT, "once", b"first")
    first = client.attempt(client.leader, request, 2.0)
    assert first is not None and first.ok
    client.put("once", b"second")  # another request in between
    again = client.attempt(client.leader, request, 2.0)  # a retry after a lost answer
    assert again is not None and (again.ok, again.found) == (first.ok, first.found)
    assert client.get("once").value == b"second"


def test_a_follower_redirects_and_serves_stale_reads(three: tuple[Workers, TestClient]) -> None:
    workers, client = three
    assert client.leader is not None
    written = client.put("k", b"x")
    follower = others(workers, client.leader)[0]
    redirected = client.kv(KvOp.GET, "k", node=follower, follow=False)
    assert (redirected.ok, redirected.error) == (False, "not leader")
    assert redirected.retryable and redirected.leader_hint == client.leader
    refused_write = client.kv(KvOp.PUT, "k", b"y", node=follower, follow=False)
    assert refused_write.leader_hint == client.leader and not refused_write.ok
    wait_until(lambda: applied_everywhere(client, [follower], written.index), 5, "apply")
    stale = client.kv(KvOp.GET, "k", node=follower, stale=True)
    assert (stale.ok, stale.value) == (True, b"x")
    assert stale.index >= written.index


# ---- failures ----


def test_leader_sigkill_elects_a_new_leader_and_keeps_every_acknowledged_write(
    three: tuple[Workers, TestClient],
) -> None:
    workers, client = three
    old = client.leader
    assert old is not None

    def kill_leader_mid_flight(done: list[str]) -> None:
        if len(done) >= KILL_AFTER_ACKS and workers.alive(old):
            workers.kill(old)

    keys = [f"before{i}" for i in range(1000)]
    acknowledged, _ = client.pipeline_puts(old, keys, VALUE, 32, between=kill_leader_mid_flight)
    assert KILL_AFTER_ACKS <= len(acknowledged) < len(keys)
    new = client.find_leader(others(workers, old))
    assert new != old
    after, failed = client.pipeline_puts(new, [f"after{i}" for i in range(100)], VALUE, 32)
    assert (len(after), failed) == (100, [])
    for key in acknowledged + after:
        assert client.get(key).value == VALUE, key


def test_a_paused_follower_catches_up_after_sigcont(three: tuple[Workers, TestClient]) -> None:
    workers, client = three
    assert client.leader is not None
    follower = others(workers, client.leader)[0]
    workers.signal(follower, signal.SIGSTOP)
    try:
        clock = SystemClock()
        paused_until = clock.monotonic_ns() + int(PAUSE_S * 1e9)
        written = 0
        while clock.monotonic_ns() < paused_until:
            acknowledged, _ = client.pipeline_puts(
                client.leader, [f"p{written + i}" for i in range(50)], VALUE, 16
            )
            written += len(acknowledged)
        assert written > 0
    finally:
        workers.signal(follower, signal.SIGCONT)
    leader_status = client.status(client.leader)
    assert leader_status is not None
    target = leader_status.applied_index
    wait_until(lambda: applied_everywhere(client, [follower], target), CATCH_UP_WAIT_S, "catch up")
    status = client.status(follower)
    assert status is not None and status.role == "follower"


def test_every_acknowledged_write_survives_killing_every_worker(tmp_path: Path) -> None:
    """With snapshots every 100 entries, so a restart restores the state machine from the
    WAL's snapshot and replays the committed entries after it."""
    with running(tmp_path, 3, snapshot_entries=100) as (workers, client):
        leader = client.find_leader()
        acknowledged, _ = client.pipeline_puts(leader, [f"k{i}" for i in range(300)], VALUE, 32)
        assert len(acknowledged) == 300
        workers.kill(0, 1, 2)
        workers.start(0, 1, 2)
        client.find_leader()
        for key in acknowledged:
            assert client.get(key).value == VALUE, key


def test_sigkill_during_group_commit_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Kill every worker while 64 writes are in flight (so fsyncs are in progress), then
    restart them: each write that was acknowledged is there."""
    with running(tmp_path, 3) as (workers, client):
        leader = client.find_leader()
        keys = [f"g{i}" for i in range(2000)]

        def kill_after_some(done: list[str]) -> None:
            if len(done) >= KILL_AFTER_ACKS and workers.alive(leader):
                workers.kill(leader, *others(workers, leader))

        acknowledged, _ = client.pipeline_puts(leader, keys, VALUE, 64, between=kill_after_some)
        assert KILL_AFTER_ACKS <= len(acknowledged) < len(keys)
        workers.start(0, 1, 2)
        client.find_leader()
        for key in acknowledged:
            assert client.get(key).value == VALUE, key


def test_a_torn_wal_tail_is_cut_and_the_node_rejoins(three: tuple[Workers, TestClient]) -> None:
    workers, client = three
    assert client.leader is not None
    client.pipeline_puts(client.leader, [f"t{i}" for i in range(100)], VALUE, 16)
    follower = others(workers, client.leader)[0]
    workers.kill(follower)
    segments = sorted(workers.run_dir.wal_dir(follower).glob("segment-*.wal"))
    assert segments
    with segments[-1].open("ab") as segment:
        segment.write(b"\x5a" * 37)  # half a record: what a crash mid-write leaves
    acknowledged, _ = client.pipeline_puts(client.leader, [f"u{i}" for i in range(50)], VALUE, 16)
    workers.start(follower)
    leader_status = client.status(client.leader)
    assert leader_status is not None
    target = leader_status.applied_index
    wait_until(lambda: applied_everywhere(client, [follower], target), CATCH_UP_WAIT_S, "rejoin")
    started = [line for line in workers.log_lines(follower) if line["event"] == "started"]
    assert started[-1]["torn_bytes"] == 37, started[-1]
    assert started[-1]["incarnation"] == 2
    stale = client.kv(KvOp.GET, acknowledged[-1], node=follower, stale=True)
    assert stale.value == VALUE


def test_sigterm_exits_zero_and_leaves_no_queue_or_segment(
    three: tuple[Workers, TestClient],
) -> None:
    workers, client = three
    assert client.leader is not None
    client.put("before-stop", VALUE)
    follower = others(workers, client.leader)[0]
    assert workers.stop(follower) == 0
    assert workers.leftovers(follower) == []
    assert workers.stop(client.leader) == 0  # the leader hands off first, then exits
    assert workers.leftovers(client.leader) == []
    last = others(workers, follower)
    survivor = [node for node in last if node != client.leader][0]
    assert workers.stop(survivor) == 0
    assert workers.leftovers(survivor) == []
    events = [line["event"] for line in workers.log_lines(follower)]
    assert events[-2:] == ["stopping", "stopped"]


def test_a_partitioned_minority_stops_committing_and_converges_after_heal(
    three: tuple[Workers, TestClient],
) -> None:
    workers, client = three
    old = client.leader
    assert old is not None
    client.put("p0", VALUE)
    majority = others(workers, old)
    client.partition(list(range(3)), (old,), tuple(majority))
    stuck = client.attempt(old, KvRequest(client.request_id(), KvOp.PUT, "lost?", VALUE), 1.0)
    assert stuck is None or not stuck.ok, stuck
    new = client.find_leader(majority)
    client.put("p1", VALUE, node=new)
    old_status = client.status(old)
    new_status = client.status(new)
    assert old_status is not None and new_status is not None
    assert old_status.commit_index < new_status.commit_index
    assert old_status.faults and old_status.role != "leader"
    client.heal(list(range(3)))
    target = new_status.commit_index
    wait_until(lambda: applied_everywhere(client, list(range(3)), target), CATCH_UP_WAIT_S, "heal")
    assert client.kv(KvOp.GET, "p1", node=old, stale=True).value == VALUE


def test_a_follower_too_far_behind_is_sent_a_snapshot(tmp_path: Path) -> None:
    with running(tmp_path, 3, snapshot_entries=50) as (workers, client):
        leader = client.find_leader()
        follower = others(workers, leader)[0]
        workers.kill(follower)
        acknowledged, _ = client.pipeline_puts(leader, [f"s{i}" for i in range(300)], VALUE, 32)
        assert len(acknowledged) == 300
        workers.start(follower)
        leader_status = client.status(leader)
        assert leader_status is not None
        target = leader_status.applied_index
        wait_until(lambda: applied_everywhere(client, [follower], target), CATCH_UP_WAIT_S, "snap")
        events = [line["event"] for line in workers.log_lines(follower)]
        assert "snapshot_installed" in events
        assert "snapshot_taken" in [line["event"] for line in workers.log_lines(leader)]
        for key in (acknowledged[0], acknowledged[-1]):
            assert client.kv(KvOp.GET, key, node=follower, stale=True).value == VALUE


def test_a_corrupt_wal_stops_the_worker_with_exit_3(three: tuple[Workers, TestClient]) -> None:
    workers, client = three
    assert client.leader is not None
    client.pipeline_puts(client.leader, [f"c{i}" for i in range(200)], VALUE, 1)
    follower = others(workers, client.leader)[0]
    workers.kill(follower)
    segment = sorted(workers.run_dir.wal_dir(follower).glob("segment-*.wal"))[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF  # synced history, not a torn tail
    segment.write_bytes(bytes(data))
    workers.start(follower)
    assert workers.processes[follower].wait(EXIT_WAIT_S) == EXIT_WAL_FAILED
    failed = [line for line in workers.log_lines(follower) if line["event"] == "wal_open_failed"]
    assert failed and failed[-1]["kind"] == "CorruptLog", failed


def test_over_tcp_a_joining_worker_is_added_as_learner_then_promoted(tmp_path: Path) -> None:
    with running(tmp_path, 4, founders=3, transport="tcp") as (workers, client):
        leader = client.find_leader()
        client.put("before", VALUE)
        joiner = 3
        learner = client.membership(MembershipOp.ADD_LEARNER, joiner, workers.addresses[joiner])
        assert learner.ok, learner
        leader_status = client.status(leader)
        assert leader_status is not None and leader_status.learners == (joiner,)
        target = leader_status.applied_index
        wait_until(lambda: applied_everywhere(client, [joiner], target), CATCH_UP_WAIT_S, "learn")
        status = client.status(joiner)
        assert status is not None and status.role == "learner" and status.transport == "tcp"
        assert status.address == workers.addresses[joiner]
        assert client.membership(MembershipOp.PROMOTE, joiner).ok
        written = client.put("after", VALUE)
        wait_until(lambda: applied_everywhere(client, [joiner], written.index), 5, "apply")
        status = client.status(joiner)
        assert status is not None and status.voters == (0, 1, 2, 3) and status.role == "follower"
        assert client.kv(KvOp.GET, "before", node=joiner, stale=True).value == VALUE


def test_a_failed_fsync_ends_the_worker_with_exit_3(tmp_path: Path) -> None:
    """In process, one voter: the fsync of its first Ready (its own election) fails. The
    worker reports the WAL failure and stops with exit code 3 (the supervisor restarts
    it), having sent and acknowledged nothing; its queue is gone."""
    name = f"fsync{os.getpid()}"
    config = WorkerConfig(
        name=name,
        node=0,
        run_dir=str(tmp_path),
        founders=(0,),
        incarnation=1,
        queues_per_host_expected=QUEUES_PER_HOST_EXPECTED,
    )
    _loop.open_wal(config).close()  # a brand-new log, created with working fsyncs
    probe = FaultyFiles()
    _loop.open_wal(config, probe).close()
    files = FaultyFiles()
    files.arm("fsync", errno.EIO, skip=probe.calls["fsync"])  # the first one after reopening
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("tests.real.cluster.fsync")
    handler = CallbackHandler(records.append)
    logger.addHandler(handler)
    stop = StopSignal()
    watchdog = threading.Timer(CATCH_UP_WAIT_S, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.start()  # a worker that never fails would otherwise run forever
    try:
        code = _loop.serve(config, SystemClock(), EventLog(logger), TermSource(), stop, files)
    finally:
        watchdog.cancel()
        stop.close()
        logger.removeHandler(handler)
        reclaim_cluster(name, tmp_path, include_live=True)
    assert code == EXIT_WAL_FAILED
    assert files.injected["fsync"] == 1
    failures = [r for r in records if r.getMessage() == "wal_failed"]
    assert failures and failures[0].fields["kind"] == "DiskError"  # type: ignore[attr-defined]
    token = registry.resource_token(name, tmp_path)
    assert not mq.queue_exists(registry.queue_name(token, 1, 1))


class CallbackHandler(logging.Handler):
    def __init__(self, callback: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        self.callback(record)
