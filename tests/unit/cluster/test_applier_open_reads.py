"""Snapshots of the current state (`Applier.open_current`), over a real partition store
with the test standing in for the worker's loop.

What is checked: the state is unknown until seeded, and opening is refused until then;
the snapshot is named by the state index and shared by every reader that opens while
the state stays the same; a reader's snapshot keeps its rows while writes move the state
on, until its last holder releases it; one no reader holds stays open for the next reader
until a write makes it stale; a write that changes nothing on this node still moves the
state index (every node names the same state by the same index); a seeded state or a
catch-up sets it."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clock import SystemClock
from cluster import _applier
from cluster._applier import Applier, ReadFailure
from cluster.sql_machine import StagedRows, StoreWork
from cluster.sql_protocol import SqlResult, StagedBatch
from storage.partitions import CreateTable, PartitionStore, partition_table_sql
from storage.staging import StagingArea
from tests.unit.cluster.test_applier_fragments import ANSWER_TIMEOUT_S, Host

TABLE = "main.t"
READS = ((TABLE, 0),)
COUNT = f"SELECT count(*) AS n FROM {partition_table_sql(TABLE, 0)}"
CATALOG_VERSION = 1


class Node:
    """An applier over a store holding partition 0 of `main.t` with 3 rows, applied at
    index 1 (a DDL with rows: state index 1, catalog version 1)."""

    def __init__(self, tmp_path: Path) -> None:
        self.host = Host()
        self.store = PartitionStore.open(tmp_path / "worker.duckdb")
        self.staging = StagingArea(tmp_path / "staging")
        self.applier = Applier(self.store, self.staging, self.host, SystemClock(), 5_000)
        self._stage_ids = itertools.count(1)
        self.index = 1
        self.state_index = 1
        self.store.apply(1, [CreateTable(TABLE, 0, "x BIGINT")])
        self.insert(3, state_moves=True)

    def insert(self, rows: int, state_moves: bool, here: bool = True) -> None:
        """The next log entry: a write of `rows` rows into partition 0 (`here`: this
        node holds it, else the work has no ops); `state_moves` False: a barrier-like
        entry that changes no state (a duplicate, a refused command)."""
        self.index += 1
        ops: tuple[StagedRows, ...] = ()
        if here:
            stage_id = f"s{next(self._stage_ids)}"
            staged = self.staging.write(
                stage_id, pa.table({"x": pa.array(range(rows), pa.int64())})
            )
            batch = StagedBatch(stage_id, 0, staged.rows, staged.crc, (1,))
            ops = (StagedRows(TABLE, 0, batch),)
        state = self.index if state_moves else self.state_index
        self.state_index = state
        work = StoreWork(
            self.index, SqlResult(True), ops, state_index=state, catalog_version=CATALOG_VERSION
        )
        self.applier.submit(work)
        self.host.wait_applied(self.index)

    def open(self, reader: int) -> tuple[int, int, str | None]:
        answers: queue.SimpleQueue[tuple[int, int, str | None]] = queue.SimpleQueue()
        self.applier.open_current(reader, lambda *answer: answers.put(answer))
        return answers.get(timeout=ANSWER_TIMEOUT_S)

    def count(self, index: int) -> int | None:
        """Rows in partition 0 at `index`; None when no snapshot is there."""
        answers: queue.SimpleQueue[tuple[pa.Table | None, int, ReadFailure | None]]
        answers = queue.SimpleQueue()
        self.applier.fragment(index, COUNT, READS, lambda *answer: answers.put(answer))
        rows, _, failure = answers.get(timeout=ANSWER_TIMEOUT_S)
        if rows is None:
            assert failure is not None and failure.retryable, failure
            assert failure.snapshot_missing, "the coordinator reads again at a new point"
            return None
        return int(rows.column("n")[0].as_py())

    def release(self, index: int, reader: int) -> None:
        self.applier.release(index, reader)
        done: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.applier.run_on_apply_lane(lambda: done.put(None))
        done.get(timeout=ANSWER_TIMEOUT_S)

    def close(self) -> None:
        self.applier.close()
        self.store.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    opened = Node(tmp_path)
    try:
        yield opened
    finally:
        opened.close()
    assert opened.host.failures == []


def test_the_state_is_unknown_until_seeded(tmp_path: Path) -> None:
    host = Host()
    store = PartitionStore.open(tmp_path / "worker.duckdb")
    applier = Applier(store, StagingArea(tmp_path / "staging"), host, SystemClock(), 5_000)
    answers: queue.SimpleQueue[tuple[int, int, str | None]] = queue.SimpleQueue()
    try:
        applier.open_current(7, lambda *answer: answers.put(answer))
        index, _, why = answers.get(timeout=ANSWER_TIMEOUT_S)
        assert index == 0 and why is not None and "state" in why
        applier.seed_state(5, 4)
        applier.open_current(7, lambda *answer: answers.put(answer))
        assert answers.get(timeout=ANSWER_TIMEOUT_S) == (5, 4, None)
    finally:
        applier.close()
        store.close()


def test_readers_share_the_snapshot_of_a_state(node: Node) -> None:
    assert node.open(1) == (2, CATALOG_VERSION, None)
    assert node.open(2) == (2, CATALOG_VERSION, None)
    assert node.count(2) == 3


def test_a_held_snapshot_keeps_its_rows_while_writes_move_on(node: Node) -> None:
    first, _, _ = node.open(1)
    node.open(2)
    node.insert(5, state_moves=True)
    assert node.count(first) == 3, "a held snapshot must not see later writes"
    second, _, _ = node.open(3)
    assert second == node.index and node.count(second) == 8
    node.release(first, 1)
    assert node.count(first) == 3, "still held by reader 2"
    node.release(first, 2)
    assert node.count(first) is None, "stale and no longer held: closed"
    assert node.count(second) == 8


def test_an_unheld_snapshot_serves_until_a_write_makes_it_stale(node: Node) -> None:
    index, _, _ = node.open(1)
    node.release(index, 1)
    assert node.count(index) == 3, "the current state's snapshot stays for the next reader"
    assert node.open(2)[0] == index
    node.release(index, 2)
    node.insert(1, state_moves=True)
    assert node.count(index) is None


def test_entries_that_change_no_state_keep_the_index(node: Node) -> None:
    index, _, _ = node.open(1)
    node.insert(0, state_moves=False, here=False)
    assert node.open(2)[0] == index


def test_a_write_elsewhere_moves_the_index_but_not_the_rows(node: Node) -> None:
    before, _, _ = node.open(1)
    node.insert(4, state_moves=True, here=False)
    after, _, _ = node.open(2)
    assert after == node.index and after != before
    assert node.count(after) == 3


def test_a_snapshot_opened_past_the_limit_is_kept_for_its_reader(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots past SNAPSHOTS_KEPT_MAX are closed oldest first, but never one a read
    holds, nor the one just opened for a reader (it was, while not yet marked held)."""
    monkeypatch.setattr(_applier, "SNAPSHOTS_KEPT_MAX", 1)
    first, _, _ = node.open(1)
    node.insert(5, state_moves=True)
    second, _, _ = node.open(2)
    assert second != first
    assert node.count(first) == 3 and node.count(second) == 8
