"""Plain EXPLAIN's estimated rows and bytes per step (`Coordinator._with_estimates`): a
table read whole by its row count; scans, moved tables' scans and fragments by DuckDB's
optimizer on a holder (`ClusterPort.estimates`, planned at a read point, not run); "~"
marks an estimate and "at most ~" a scan estimated without the key sets it waits for.
Estimates the cluster cannot give leave the plan as it is."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from query import planner, scans
from query.port import Unavailable
from tests.unit.query.harness import Pair

SETUP = (
    "CREATE TABLE big (id BIGINT, k INTEGER, v INTEGER) PARTITION BY HASH(id) PARTITIONS 3",
    "INSERT INTO big SELECT i, i % 40, i % 7 FROM range(3000) r(i)",
    "CREATE TABLE small (k BIGINT, name VARCHAR) PARTITION BY HASH(k) PARTITIONS 2",
    "INSERT INTO small SELECT i, 'n' || i FROM range(40) r(i)",
    "CREATE TABLE ref (k INTEGER, label VARCHAR) REFERENCE",
    "INSERT INTO ref SELECT i, 'l' || i FROM range(5) r(i)",
)
ESTIMATE = re.compile(r"(at most )?~[\d,]+")


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Pair.loaded(SETUP) as made:
        yield made


def explained(pair: Pair, sql: str) -> dict[str, tuple[str | None, str | None]]:
    rows = pair.coordinator.execute("EXPLAIN " + sql).fetchall()
    assert pair.port.open_barriers() == [], "the estimates' read point is released"
    return {str(row[0]): (row[3], row[4]) for row in rows}


def number(text: str | None) -> int:
    assert text is not None and ESTIMATE.fullmatch(text), text
    return int(text.rsplit("~", 1)[1].replace(",", ""))


def test_each_partition_of_a_pushdown_is_estimated(pair: Pair) -> None:
    steps = explained(pair, "SELECT * FROM big")
    per_partition = [number(steps[f"partition {p}"][0]) for p in range(3)]
    assert sum(per_partition) == 3000  # a plain scan's estimate is the partition's rows
    assert number(steps["partition 0"][1]) == per_partition[0] * (8 + 4 + 4)  # the widths


def test_a_reference_query_is_estimated_on_its_node(pair: Pair) -> None:
    assert number(explained(pair, "SELECT * FROM ref")["partition 0"][0]) == 5


def test_narrowed_scans_are_estimated_and_linked_ones_say_at_most(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scans, "TARGET_ROWS_MIN", 0)
    monkeypatch.setattr(planner, "BROADCAST_ROWS_MAX", -1)
    monkeypatch.setattr(planner, "REPARTITION_ROWS_MAX", -1)
    steps = explained(
        pair,
        "SELECT small.name, count(*) FROM big JOIN small ON big.k = small.k "
        "WHERE small.name LIKE 'n1%' GROUP BY 1",
    )
    assert ESTIMATE.fullmatch(str(steps["scan main.small"][0]))
    linked = str(steps["scan main.big"][0])
    assert linked.startswith("at most ~") and number(linked) == 3000


def test_a_moved_tables_scan_is_estimated_and_its_fragments_are_not(pair: Pair) -> None:
    steps = explained(pair, "SELECT small.name, big.v FROM big JOIN small ON big.k = small.k")
    moved = [name for name in steps if name.startswith(("broadcast ", "repartition "))]
    assert moved, steps
    assert number(steps[moved[0]][0]) == 40
    assert steps["partition 0"] == (None, None)  # DuckDB cannot plan it without the rows


def test_whole_tables_are_estimated_by_their_row_counts(pair: Pair) -> None:
    steps = explained(pair, "PIVOT big ON v USING count(*) GROUP BY k")
    assert number(steps["scan main.big"][0]) == 3000


def test_without_estimates_the_plan_is_shown_all_the_same(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*_args: object) -> list[int | None]:
        raise Unavailable("no holder answered")

    monkeypatch.setattr(pair.port, "estimates", unavailable)
    steps = explained(pair, "SELECT * FROM big")
    assert steps["partition 0"] == (None, None) and "merge" in steps
