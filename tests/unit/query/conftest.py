from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from query.coordinator import Coordinator
from tests.unit.query.fake_port import FakePort
from tests.unit.query.harness import Pair


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


@pytest.fixture
def port() -> Iterator[FakePort]:
    made = FakePort()
    yield made
    made.close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def coordinator(port: FakePort, sleeps: list[float]) -> Iterator[Coordinator]:
    made = Coordinator(port, rng=random.Random(7), sleep=sleeps.append)
    yield made
    made.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    """A private temporary directory. Not `tmp_path`: concurrent pytest sessions on one
    host share and clean up its base directory."""
    with tempfile.TemporaryDirectory(prefix="dcluster-query-") as name:
        yield Path(name)
