"""Nothing outside clock/ reads time: every other package takes a `Clock` instead.

Scans the source of every package the project ships (except clock/) for calls that read
the operating system's clocks. Sleeping is not reading time and is not flagged here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

TIME_READERS = frozenset(
    {
        "time",
        "time_ns",
        "monotonic",
        "monotonic_ns",
        "perf_counter",
        "perf_counter_ns",
        "process_time",
        "process_time_ns",
        "thread_time",
        "thread_time_ns",
        "clock_gettime",
        "clock_gettime_ns",
    }
)
DATETIME_READERS = frozenset({"now", "utcnow", "today"})
DATETIME_NAMES = frozenset({"datetime", "date"})


def _time_reads(tree: ast.AST) -> list[str]:
    """Descriptions of each place `tree` reads a clock."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            for alias in node.names:
                if alias.name in TIME_READERS or alias.name == "*":
                    found.append(f"line {node.lineno}: from time import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = node.value.id
            if module == "time" and node.attr in TIME_READERS:
                found.append(f"line {node.lineno}: time.{node.attr}")
            if module in DATETIME_NAMES and node.attr in DATETIME_READERS:
                found.append(f"line {node.lineno}: {module}.{node.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if node.value.attr in DATETIME_NAMES and node.attr in DATETIME_READERS:
                found.append(f"line {node.lineno}: datetime.{node.value.attr}.{node.attr}")
    return found


def _shipped_packages() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as pyproject:
        packages: list[str] = tomllib.load(pyproject)["tool"]["setuptools"]["packages"]
    return sorted(package for package in packages if package != "clock")


def test_the_scanner_finds_each_kind_of_read() -> None:
    source = (
        "import time, datetime\n"
        "from time import monotonic_ns\n"
        "a = time.time()\n"
        "b = datetime.datetime.now()\n"
        "c = datetime.date.today()\n"
        "time.sleep(0)\n"
    )
    assert _time_reads(ast.parse(source)) == [
        "line 2: from time import monotonic_ns",
        "line 3: time.time",
        "line 4: datetime.datetime.now",
        "line 5: datetime.date.today",
    ]


def test_no_package_but_clock_reads_time() -> None:
    offenders: list[str] = []
    for package in _shipped_packages():
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            relative = path.relative_to(ROOT)
            offenders.extend(f"{relative} {read}" for read in _time_reads(tree))
    assert offenders == [], "read time through an injected clock.Clock instead:\n" + "\n".join(
        offenders
    )
