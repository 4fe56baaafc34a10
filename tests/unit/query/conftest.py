from __future__ import annotations

import random
from collections.abc import Iterator

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
