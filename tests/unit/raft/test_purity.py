"""raft/ is pure (STYLE.md, "the algorithm does no IO"): no module of it imports anything
that does IO, reads time, starts threads or uses the global random generator. A seeded
`random.Random` handed in through RaftConfig is the only randomness allowed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RAFT_DIR = Path(__file__).resolve().parents[3] / "raft"

FORBIDDEN_MODULES = frozenset(
    {
        "socket",
        "selectors",
        "asyncio",
        "threading",
        "time",
        "os",
        "duckdb",
        "pyarrow",
        "posix_ipc",
        "subprocess",
        "multiprocessing",
        "concurrent",
        "signal",
        "select",
        "shutil",
        "tempfile",
        "pathlib",
        "io",
        "datetime",
        "secrets",
        "uuid",
        "logging",
    }
)
FORBIDDEN_BUILTIN_CALLS = frozenset({"open", "print", "input", "exec", "eval", "__import__"})
ALLOWED_RANDOM_NAMES = frozenset({"Random"})  # as a type, never called inside raft/


def impurities(source: str, filename: str = "<source>") -> list[str]:
    """Every way `source` breaks purity, as readable strings (empty when pure)."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            top = node.module.split(".")[0]
            if top in FORBIDDEN_MODULES:
                found.append(f"{where} imports from {node.module}")
            if top == "random":
                for alias in node.names:
                    if alias.name not in ALLOWED_RANDOM_NAMES:
                        found.append(f"{where} imports random.{alias.name} (global generator)")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "random":
                if node.attr not in ALLOWED_RANDOM_NAMES:
                    found.append(f"{where} uses random.{node.attr} (global generator)")
        elif isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in FORBIDDEN_BUILTIN_CALLS:
                found.append(f"{where} calls {function.id}()")
            if (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and function.value.id == "random"
                and function.attr == "Random"
            ):
                found.append(f"{where} builds its own random.Random (must be passed in)")
    return found


def _raft_sources() -> list[Path]:
    sources = sorted(RAFT_DIR.glob("*.py"))
    assert len(sources) >= 8, f"raft/ sources not found under {RAFT_DIR}"
    return sources


@pytest.mark.parametrize("path", _raft_sources(), ids=lambda p: p.name)
def test_raft_module_is_pure(path: Path) -> None:
    assert impurities(path.read_text(), path.name) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "from socket import socket",
        "from asyncio import sleep",
        "import threading as t",
        "import duckdb",
        "from pyarrow import table",
        "import posix_ipc",
        "import subprocess",
        "import random\nx = random.random()",
        "import random\ndef f():\n    return random.randrange(10)",
        "from random import choice",
        "import random\nr = random.Random()",
        "print('hello')",
        "open('f')",
    ],
)
def test_the_purity_scan_catches_impurities(source: str) -> None:
    assert impurities(source) != []


def test_the_purity_scan_allows_an_injected_random() -> None:
    source = (
        "import random\n"
        "def timeout(rng: random.Random, base: int) -> int:\n"
        "    return base + rng.randrange(base)\n"
    )
    assert impurities(source) == []
