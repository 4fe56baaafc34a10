"""`dcluster status --json` and `dcluster kv` against a real three-worker cluster."""

from __future__ import annotations

import pytest

from tests.real.cluster.conftest import CliCluster

NODE_FIELDS = {
    "id",
    "host",
    "core",
    "pid",
    "role",
    "term",
    "commit_index",
    "applied_index",
    "last_heartbeat_ms",
    "restarts",
    "cpu_percent",
    "rss_bytes",
}


@pytest.fixture
def three(cluster: CliCluster) -> CliCluster:
    cluster.up("--cores", "3", "--oversubscribe")
    return cluster


def test_status_json_is_one_object_with_every_field(three: CliCluster) -> None:
    status = three.status()
    assert status["name"] == three.name
    assert isinstance(status["leader"], int)
    assert status["term"] >= 1
    assert [node["id"] for node in status["nodes"]] == [0, 1, 2]
    for node in status["nodes"]:
        assert NODE_FIELDS <= node.keys(), NODE_FIELDS - node.keys()
        assert node["role"] in ("leader", "follower")
        assert node["pid"] == three.info().nodes[node["id"]].pid
        assert node["rss_bytes"] > 0
        assert node["cpu_percent"] >= 0
        assert node["restarts"] == 0
    roles = [node["role"] for node in status["nodes"]]
    assert roles.count("leader") == 1
    assert status["nodes"][status["leader"]]["role"] == "leader"
    table = three.cli("status").stdout
    assert "leader" in table and "follower" in table


def test_kv_put_get_cas_delete(three: CliCluster) -> None:
    assert three.cli("kv", "put", "colour", "blue").stdout.startswith("ok")
    assert three.cli("kv", "get", "colour").stdout.strip() == "blue"
    assert three.cli("kv", "get", "colour", "--stale").stdout.strip() in ("blue", "")
    three.cli("kv", "cas", "colour", "blue", "green")
    refused = three.cli("kv", "cas", "colour", "blue", "red", expect=1)
    assert "does not hold" in refused.stderr
    assert three.cli("kv", "get", "colour").stdout.strip() == "green"
    three.cli("kv", "delete", "colour")
    missing = three.cli("kv", "get", "colour", expect=1)
    assert "not found" in missing.stderr
    assert "not found" in three.cli("kv", "delete", "colour", expect=1).stderr


def test_kv_on_a_stopped_cluster_says_it_is_down(three: CliCluster) -> None:
    three.cli("down")
    result = three.cli("kv", "get", "anything", expect=1)
    assert "is down" in result.stderr
