"""`dcluster chaos` against real workers: a killed leader is replaced and writes resume,
the supervisor restarts a SIGKILLed worker, a paused worker catches up after SIGCONT, and
a partitioned leader is deposed until `heal`."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.real.cluster.conftest import CliCluster


@pytest.fixture
def three(cluster: CliCluster) -> CliCluster:
    """Three workers without fsync: these tests break links and processes, not disks."""
    result = cluster.up("--cores", "3", "--oversubscribe", "--fsync", "off")
    assert "WARNING: --fsync off" in result.stderr
    assert "fsync off" in result.stdout
    return cluster


def leader_other_than(cluster: CliCluster, old: int | None) -> bool:
    """True once a node other than `old` leads (node 0 is a leader too: test for None)."""
    with cluster.client() as client:
        leader = client.leader()
    return leader is not None and leader != old


def test_killing_the_leader_elects_another_and_writes_resume(three: CliCluster) -> None:
    with three.client() as client:
        client.put("k", "before")
        old = client.leader()
    assert old is not None
    old_pid = three.info().nodes[old].pid
    result = three.cli("chaos", "kill", "leader")
    assert f"killed node {old} (pid {old_pid}) with SIGKILL" in result.stdout
    three.wait_for(lambda: leader_other_than(three, old), "a new leader")
    with three.client() as client:
        client.put("k", "after")
        assert client.get("k") == b"after"


def test_the_supervisor_restarts_a_sigkilled_worker(three: CliCluster) -> None:
    old_pid = three.info().nodes[1].pid
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        node = three.info().nodes[1]
        return node.restarts == 1 and node.pid not in (None, old_pid) and node.state == "running"

    three.wait_for(restarted, "node 1 restarted")
    node = three.info().nodes[1]
    assert node.incarnation == 2
    three.wait_for(
        lambda: three.status()["nodes"][1]["role"] in ("leader", "follower"), "node 1 serving"
    )
    assert three.status()["nodes"][1]["restarts"] == 1


def test_a_paused_worker_misses_writes_then_catches_up(three: CliCluster) -> None:
    with three.client() as client:
        leader = client.leader()
        assert leader is not None
        follower = (leader + 1) % 3
        pid = three.info().nodes[follower].pid
        result = three.cli("chaos", "pause", str(follower))
        assert f"paused node {follower} (pid {pid}) with SIGSTOP" in result.stdout
        assert client.status_all(300)[follower] is None, "a stopped worker cannot answer"
        for index in range(10):
            client.put(f"paused-{index}", "x")
        resumed = three.cli("chaos", "resume", str(follower))
        assert f"resumed node {follower} (pid {pid}) with SIGCONT" in resumed.stdout

        def caught_up() -> bool:
            statuses = client.status_all()
            mine, theirs = statuses[follower], statuses[leader]
            return bool(mine and theirs and mine.applied_index >= theirs.commit_index)

        three.wait_for(caught_up, "the paused follower to catch up")
    assert three.info().nodes[follower].restarts == 0, "a pause is not a crash"


def test_pause_with_seconds_resumes_by_itself(three: CliCluster) -> None:
    result = three.cli("chaos", "pause", "leader", "--seconds", "0.5")
    match = re.search(r"paused node (\d) \(pid (\d+)\)", result.stdout)
    assert match is not None, result.stdout
    assert "with SIGCONT after 0.5 s" in result.stdout
    assert os.waitid is not None
    with open(f"/proc/{match.group(2)}/stat") as stat:
        assert stat.read().split(") ")[1][0] != "T", "the worker is running again"


def test_a_partitioned_leader_is_replaced_and_heal_reunites(three: CliCluster) -> None:
    with three.client() as client:
        old = client.leader()
    assert old is not None
    others = [node for node in range(3) if node != old]
    spec = f"{old}|{others[0]},{others[1]}"
    result = three.cli("chaos", "partition", spec)
    assert result.stdout.count(": ok") == 3, result.stdout
    three.cli("chaos", "partition", "0|7", expect=2)

    def majority_leader() -> bool:
        status = three.status()
        return any(status["nodes"][n]["role"] == "leader" for n in others)

    three.wait_for(majority_leader, "a leader on the majority side")
    with three.client() as client:
        client.put("during-partition", "majority")
    assert three.cli("chaos", "heal").stdout.count(": ok") == 3

    def reunited() -> bool:
        status = three.status()
        terms = {node["term"] for node in status["nodes"]}
        roles = sorted(node["role"] for node in status["nodes"])
        return len(terms) == 1 and roles == ["follower", "follower", "leader"]

    three.wait_for(reunited, "one leader and one term after heal")
    with three.client() as client:
        assert client.get("during-partition") == b"majority"


def test_skew_reaches_one_worker(three: CliCluster) -> None:
    result = three.cli("chaos", "skew", "2", "--ms", "250")
    assert "node 2" in result.stdout and ": ok" in result.stdout
    with three.client() as client:
        status = client.status_all()[2]
    assert status is not None and status.clock_skew_ms == 250
