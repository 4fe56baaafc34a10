"""Runs the conformance suite once per transport implementation.

Every implementation must be present: a missing harness module is a failure, not a skip,
so the suite can never pass by testing nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest

from tests.conformance.harness import TransportHarness

IMPLEMENTATIONS = {
    "local": "tests.conformance.harness_local:LocalHarness",
    "tcp": "tests.conformance.harness_tcp:TcpHarness",
    "sim": "tests.conformance.harness_sim:SimHarness",
}


def _load(spec: str) -> type:
    module_name, class_name = spec.split(":")
    cls: type = getattr(importlib.import_module(module_name), class_name)
    return cls


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def harness(request: pytest.FixtureRequest) -> Iterator[TransportHarness]:
    instance: TransportHarness = _load(IMPLEMENTATIONS[request.param])()
    try:
        yield instance
    finally:
        instance.close()
    assert instance.leaks() == [], f"{request.param} left resources behind"
