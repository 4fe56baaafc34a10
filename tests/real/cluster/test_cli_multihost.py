"""Multi-host over TCP on loopback addresses: a second "host" (its own run directory and
supervisor, binding 127.0.0.3) joins a cluster founded on 127.0.0.2 with `up --join`:
its workers become learners, then voters, and the cluster keeps serving when the
founding host's worker is killed."""

from __future__ import annotations

from tests.real.cluster.conftest import CliCluster, ClusterFactory


def found(factory: ClusterFactory) -> tuple[CliCluster, int]:
    first = factory("host-a")
    first.up("--transport", "tcp", "--bind", "127.0.0.2:0", "--cores", "1")
    address = first.info().nodes[0].address
    assert address is not None and address[0] == "127.0.0.2"
    return first, address[1]


def test_a_second_host_joins_as_learners_then_voters(cluster_factory: ClusterFactory) -> None:
    first, port = found(cluster_factory)
    second = cluster_factory("host-b", name=first.name)
    result = second.up(
        "--transport", "tcp", "--bind", "127.0.0.3:0", "--join", f"127.0.0.2:{port}",
        "--cores", "2", "--oversubscribe", "--voters", "3",
        "--secret-file", str(first.run.secret_file),
    )  # fmt: skip
    for line in ("added node 1 as a learner", "added node 2 as a learner", "promoted node 2"):
        assert line in result.stdout, result.stdout
    assert [node.id for node in second.info().nodes] == [1, 2]
    status = second.status()
    assert [node["id"] for node in status["nodes"]] == [0, 1, 2]
    assert {node["host"] for node in status["nodes"]} == {"127.0.0.2", "127.0.0.3"}
    with second.client() as client:
        client.put("across", "hosts")
        leader = client.leader()
        assert leader is not None
        leader_status = client.status_all()[leader]
        assert leader_status is not None and leader_status.voters == (0, 1, 2)
    with first.client() as client:
        assert client.get("across") == b"hosts"

    first.cli("chaos", "kill", "0")  # the founding host's only worker

    def serving() -> bool:
        with second.client() as client:
            client.put("after-kill", "yes")
            return client.get("after-kill") == b"yes"

    second.wait_for(serving, "writes through the second host after the kill")


def test_joining_without_the_secret_is_refused_clearly(cluster_factory: ClusterFactory) -> None:
    first, port = found(cluster_factory)
    second = cluster_factory("host-b", name=first.name)
    join = ("--transport", "tcp", "--bind", "127.0.0.3:0", "--join", f"127.0.0.2:{port}")
    missing = second.cli("up", *join, expect=2)
    assert "--secret-file" in missing.stderr
    wrong = second.run_dir.parent / "wrong-secret"
    wrong.write_text("00" * 32)
    refused = second.cli("up", *join, "--secret-file", str(wrong), expect=1)
    assert "no worker of cluster" in refused.stderr
    assert not second.run.secret_file.exists(), "a secret that did not work is not kept"
