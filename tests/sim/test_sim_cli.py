"""`python -m chaos.sim`: the exact last lines, exit codes, and clear refusals of bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.sim import main, range_summary
from chaos.simulator import SimResult, SimStats

ROOT = Path(__file__).resolve().parents[2]
ONE_SEED_LINE = re.compile(
    r"^seed=(\d+) steps=(\d+) trace=([0-9a-f]{64}) result=(ok|violation:[a-z_]+)$"
)


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos.sim", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_one_seed_ends_with_the_exact_line_and_exits_zero() -> None:
    completed = cli("--seed", "7", "--nodes", "3", "--steps", "800")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    match = ONE_SEED_LINE.match(completed.stdout.splitlines()[-1])
    assert match is not None, completed.stdout
    assert match.group(1, 2, 4) == ("7", "800", "ok")


def test_a_range_prints_a_line_per_seed_then_the_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--seeds", "3..5", "--steps", "400", "--nodes", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "seeds=3 failed=0"
    seed_lines = [line for line in lines if ONE_SEED_LINE.match(line)]
    assert [ONE_SEED_LINE.match(line).group(1) for line in seed_lines] == ["3", "4", "5"]  # type: ignore[union-attr]


def test_verbose_and_trace_print_before_the_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "2", "--steps", "300", "--verbose", "--trace"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ONE_SEED_LINE.match(lines[-1])
    assert any("elections=" in line for line in lines)
    assert any(line.endswith(" tick") for line in lines)


def test_summary_formats() -> None:
    assert range_summary(10, []) == "seeds=10 failed=0"
    assert range_summary(10, [3, 8]) == "seeds=10 failed=2 3,8"
    result = SimResult(
        seed=4,
        steps=17,
        trace_digest="ab" * 32,
        violation="log_matching",
        detail="",
        stats=SimStats(),
    )
    assert (
        result.summary_line() == f"seed=4 steps=17 trace={'ab' * 32} result=violation:log_matching"
    )
    assert ONE_SEED_LINE.match(result.summary_line())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seed", "1", "--nodes", "2"], "nodes must be between 3 and 7"),
        (["--seed", "1", "--nodes", "8"], "nodes must be between 3 and 7"),
        (["--seed", "1", "--nodes", "five"], "nodes must be an integer"),
        (["--seed", "-1"], "seed must not be negative"),
        (["--seed", "x"], "seed must be an integer"),
        (["--seeds", "5..1"], "need 0 <= A <= B"),
        (["--seeds", "5"], "expected A..B"),
        (["--seeds", "a..b"], "seeds must be integers"),
        (["--seed", "1", "--steps", "-3"], "steps must be between"),
        (["--seed", "1", "--seeds", "1..2"], "not allowed with argument"),
        ([], "one of the arguments --seed --seeds is required"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_2_from_the_command_line() -> None:
    completed = cli("--seed", "1", "--nodes", "9")
    assert completed.returncode == 2
    assert "nodes must be between 3 and 7" in completed.stderr
    assert completed.stdout == ""
