"""The coordinator remembers plans (query.coordinator PLANS_CACHED_MAX): a query text
asked again against the same catalog view is not bound and planned again — and any
change that could change its plan (DDL, a write, a fresh catalog view) plans it anew, so
the answer is always single-node DuckDB's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from query import coordinator as coordinator_module
from tests.unit.query.harness import Pair

SETUP = [
    "CREATE TABLE t (k INTEGER, v VARCHAR) PARTITION BY HASH(k) PARTITIONS 3",
    "INSERT INTO t SELECT i, 'v' || (i % 7) FROM range(100) t(i)",
]
QUERY = "SELECT v, count(*) FROM t GROUP BY v ORDER BY v"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as pair:
        yield pair


def calls_of(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """The query texts the coordinator passes to `query.coordinator.<name>(con, sql, …)`."""
    texts: list[str] = []
    real = getattr(coordinator_module, name)

    def counting(con: Any, sql: str, *args: Any) -> Any:
        texts.append(sql)
        return real(con, sql, *args)

    monkeypatch.setattr(coordinator_module, name, counting)
    return texts


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The query texts the coordinator plans (calls of the planner)."""
    return calls_of(monkeypatch, "plan_select")


def test_a_repeated_query_is_planned_once(pair: Pair, plans: list[str]) -> None:
    for _ in range(3):
        pair.run(QUERY, ordered=True)
    assert plans == [QUERY]
    pair.run(QUERY.replace("ORDER BY v", "ORDER BY v DESC"), ordered=True)
    assert len(plans) == 2


def test_a_write_or_ddl_plans_it_again(pair: Pair, plans: list[str]) -> None:
    pair.run(QUERY, ordered=True)
    pair.run("INSERT INTO t VALUES (1000, 'new')")
    pair.run(QUERY, ordered=True)
    assert plans == [QUERY, QUERY]
    pair.run("ALTER TABLE t ADD COLUMN w INTEGER")
    pair.run(QUERY, ordered=True)
    pair.run("SELECT * FROM t ORDER BY k", ordered=True)  # the new column is there
    assert plans.count(QUERY) == 3


def test_a_fresh_view_plans_it_again_only_when_the_placements_changed(
    pair: Pair, plans: list[str]
) -> None:
    """Views are fetched again every second: one with the same catalog, placements and
    members keeps the plan (row estimates only choose among exact plans); one where a
    partition's primary moved (a failover) plans anew, so fragments go to the new one."""
    pair.run(QUERY, ordered=True)
    pair.port.catalog(refresh=True)
    pair.run(QUERY, ordered=True)
    assert plans == [QUERY]
    placed = pair.port._placements["main.t"]
    pair.port._placements["main.t"] = tuple(holders[1:] + holders[:1] for holders in placed)
    pair.port.catalog(refresh=True)
    before = len(pair.port.fragment_calls)
    pair.run(QUERY, ordered=True)
    assert plans == [QUERY, QUERY]
    (_, fragments), *_ = pair.port.fragment_calls[before:]
    firsts = {fragment.holders[0] for fragment in fragments}
    assert firsts == {holders[1] for holders in placed}  # the new primaries


def test_the_cache_is_bounded(
    pair: Pair, plans: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "PLANS_CACHED_MAX", 2)
    texts = [f"SELECT count(*) FROM t WHERE k > {n}" for n in range(3)]
    for text in texts:
        pair.run(text)
    pair.run(texts[2])  # still remembered
    pair.run(texts[0])  # forgotten: planned again
    assert plans == [*texts, texts[0]]


SCALAR = "SELECT k FROM t WHERE k > (SELECT avg(k) FROM t) + 40 ORDER BY k"


def test_scalar_subqueries_are_found_once_and_answered_every_time(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = calls_of(monkeypatch, "ScalarSubqueries")
    for _ in range(2):
        pair.run(SCALAR, ordered=True)
    assert found == [SCALAR]
    pair.run("INSERT INTO t SELECT i, 'w' FROM range(100, 160) t(i)")  # a new average
    pair.run(SCALAR, ordered=True)
    assert found == [SCALAR, SCALAR]
    pair.port.catalog(refresh=True)  # the same catalog and placements: still known
    pair.run(SCALAR, ordered=True)
    assert len(found) == 2


def test_narrowed_scans_are_planned_once_per_view(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gathered query's scans, and its WITH queries, are worked out once for a view."""
    planned = calls_of(monkeypatch, "plan_scans")
    gathered = "SELECT v FROM t WHERE k < 20 INTERSECT SELECT v FROM t WHERE k > 5"
    with_query = "WITH s AS (SELECT v, count(*) AS n FROM t GROUP BY v) SELECT * FROM s"
    for sql in (gathered, with_query):
        pair.run(sql)
        count = len(planned)
        pair.run(sql)
        assert len(planned) == count, planned  # remembered
    pair.run("INSERT INTO t VALUES (2000, 'later')")
    count = len(planned)
    pair.run(gathered)
    assert len(planned) > count  # forgotten after a write
