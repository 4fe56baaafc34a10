"""The `dcluster` console script: `dcluster sim` is the simulator's command line."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from cluster.cli import app

LAST_LINE = re.compile(r"^seed=5 steps=500 trace=[0-9a-f]{64} result=ok$")


def test_sim_runs_one_seed_and_ends_with_the_scriptable_line() -> None:
    result = CliRunner().invoke(app, ["sim", "--seed", "5", "--nodes", "3", "--steps", "500"])
    assert result.exit_code == 0, result.output
    assert LAST_LINE.match(result.output.strip().splitlines()[-1])


def test_sim_range_ends_with_the_summary() -> None:
    result = CliRunner().invoke(app, ["sim", "--seeds", "1..2", "--nodes", "3", "--steps", "300"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "seeds=2 failed=0"


def test_sim_rejects_a_bad_group_size_with_exit_2() -> None:
    result = CliRunner().invoke(app, ["sim", "--seed", "1", "--nodes", "9"])
    assert result.exit_code == 2


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "sim" in result.output


def test_host_reports_the_limits_the_transport_adapts_to() -> None:
    import json

    from ipc.mq import detect_host_limits

    result = CliRunner().invoke(app, ["host", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    limits = detect_host_limits(raise_soft=False)
    assert facts["mq_msg_max"] == limits.msg_max
    assert 1 <= facts["queue_messages"] <= limits.msg_max
    assert 1 <= facts["queue_message_bytes"] <= limits.msgsize_max
    assert facts["shm_total_bytes"] > 0
    assert facts["cores_logical"] >= 1
