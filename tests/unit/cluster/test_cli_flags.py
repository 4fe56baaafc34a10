"""The cluster commands refuse bad flags with a clear message and exit code 2, and a
missing cluster with exit code 1 — before any process, queue or file is created."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster import control
from cluster.cli import app
from cluster.topology import Topology

HOST = Topology(cpus=(0, 1), source="sys")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cores", "0"], "--cores must be 1"),
        (["--cores", "64"], "--oversubscribe"),
        (["--fsync", "maybe"], "--fsync is on or off"),
        (["--transport", "udp"], "--transport is shm or tcp"),
        (["--transport", "tcp", "--bind", "127.0.0.1"], "HOST:PORT"),
        (["--transport", "tcp", "--bind", "127.0.0.1:99999"], "HOST:PORT"),
        (["--bind", "127.0.0.1:7000"], "need --transport tcp"),
        (["--join", "127.0.0.1:7000"], "need --transport tcp"),
        (["--cores", "2", "--voters", "3", "--oversubscribe"], "--voters must be 1 to"),
        (["--cores", "2", "--voters", "0", "--oversubscribe"], "--voters must be 1 to"),
        (["--name", "no/slashes"], "--name"),
    ],
)
def test_up_refuses_bad_flags_with_exit_2(tmp_path: Path, flags: list[str], message: str) -> None:
    data_dir = tmp_path / "cluster"
    code, output = run("up", "--data-dir", str(data_dir), *flags)
    assert code == 2, output
    assert message in output
    assert not data_dir.exists(), "a refused `up` must not create anything"


def plan(**overrides: object) -> control.UpPlan:
    flags: dict[str, object] = {
        "name": "flags",
        "data_dir": Path("/nonexistent/flags"),
        "cores": None,
        "transport": None,
        "bind": None,
        "join": None,
        "voters": None,
        "oversubscribe": False,
        "fsync": "on",
        "topology": HOST,
    }
    flags.update(overrides)
    return control.plan_up(**flags)  # type: ignore[arg-type]


def test_defaults_are_one_worker_per_physical_core_all_voting() -> None:
    chosen = plan()
    assert (chosen.workers, chosen.cores, chosen.voters) == (2, (0, 1), 2)
    assert (chosen.transport, chosen.fsync, chosen.bind) == ("shm", True, None)


def test_oversubscribed_workers_share_cores_round_robin_and_voters_cap_at_five() -> None:
    chosen = plan(cores=7, oversubscribe=True)
    assert chosen.cores == (0, 1, 0, 1, 0, 1, 0)
    assert chosen.voters == control.VOTERS_DEFAULT_MAX


def test_fsync_off_and_tcp_bind_parse() -> None:
    chosen = plan(fsync="off", transport="tcp", bind="127.0.0.2:7100")
    assert chosen.fsync is False
    assert chosen.bind == ("127.0.0.2", 7100)


def test_a_restart_keeps_the_previous_size_and_transport() -> None:
    first = plan(cores=3, oversubscribe=True, transport="tcp")
    previous = control._cluster_info(first, None)
    again = plan(previous=previous)
    assert (again.workers, again.transport, again.oversubscribe) == (3, "tcp", True)


@pytest.mark.parametrize(
    ("spec", "groups"),
    [("0,1|2", ((0, 1), (2,))), (" 2 | 0 , 1 ", ((2,), (0, 1))), ("0|1|2", ((0,), (1,), (2,)))],
)
def test_partition_specs_parse(spec: str, groups: tuple[tuple[int, ...], ...]) -> None:
    assert control.parse_partition(spec, [0, 1, 2]) == groups


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0,1", "at least two sides"),
        ("0,1|", "every side needs a node"),
        ("0,1|3", "'3' is not a node"),
        ("0,1|x", "'x' is not a node"),
        ("0,1|1,2", "node 1 is on two sides"),
    ],
)
def test_bad_partition_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(control.UsageError, match=message):
        control.parse_partition(spec, [0, 1, 2])


def test_node_numbers_are_checked() -> None:
    assert control.resolve_node([0, 1, 2], "2", lambda: None) == 2
    assert control.resolve_node([0, 1, 2], "leader", lambda: 1) == 1
    with pytest.raises(control.UsageError, match="0 to 2"):
        control.resolve_node([0, 1, 2], "3", lambda: None)
    with pytest.raises(control.UsageError, match="0, 4, 5"):
        control.resolve_node([0, 4, 5], "1", lambda: None)
    with pytest.raises(control.ControlError, match="no leader"):
        control.resolve_node([0, 1, 2], "leader", lambda: None)


def test_join_flags() -> None:
    joining = plan(transport="tcp", bind="127.0.0.3:0", join="2@127.0.0.2:7000", voters=7)
    assert (joining.join_node, joining.join, joining.voters) == (2, ("127.0.0.2", 7000), 7)
    assert plan(transport="tcp", bind="127.0.0.3:0", join="127.0.0.2:7000").join_node == 0
    with pytest.raises(control.UsageError, match="--join needs --bind"):
        plan(transport="tcp", join="127.0.0.2:7000")
    with pytest.raises(control.UsageError, match="NODE@"):
        plan(transport="tcp", bind="127.0.0.3:0", join="x@127.0.0.2:7000")
    with pytest.raises(control.UsageError, match="--secret-file"):
        plan(transport="tcp", secret_file=Path("/nonexistent/secret"))


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["kv", "get", "k"],
        ["kv", "put", "k", "v"],
        ["chaos", "kill", "0"],
        ["chaos", "heal"],
        ["down"],
    ],
)
def test_commands_on_a_missing_cluster_exit_1_with_a_message(
    tmp_path: Path, command: list[str]
) -> None:
    code, output = run(*command, "--data-dir", str(tmp_path / "none"))
    assert code == 1, output
    assert "no cluster at" in output


def test_chaos_flags_out_of_range_exit_2(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "none")
    assert run("chaos", "pause", "0", "--seconds", "0", "--data-dir", data_dir)[0] == 2
    assert run("chaos", "skew", "0", "--ms", str(10**12), "--data-dir", data_dir)[0] == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DCLUSTER_WORKER_MEMORY_MB", "lots"),
        ("DCLUSTER_FRAGMENT_TIME_LIMIT_MS", "0"),
        ("DCLUSTER_SNAPSHOT_ENTRIES", "none"),
    ],
)
def test_up_refuses_a_bad_setting_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    data_dir = tmp_path / "cluster"
    code, output = run("up", "--data-dir", str(data_dir))
    assert code == 2, output
    assert variable in output
    assert not data_dir.exists(), "a refused `up` must not create anything"
