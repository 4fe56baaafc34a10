"""Fragments on the applier's scan lane, over a real partition store (DuckDB in a temporary
directory) with the test standing in for the worker's loop (it calls `interrupt_overdue`
while it waits for answers, as the loop does every wake-up).

What is checked: a fragment that runs past its time limit is interrupted, refused as not
retryable with a message naming the limit, and the lane then serves the next read; the
barrier snapshot the interrupt aborted is dropped (reads at it are refused as retryable,
not answered from a broken transaction); copies of the same runaway fragment queued behind
it are refused without running; a fragment naming a file or URL is refused before it
reads anything; closing the applier interrupts the fragment it is running. Inputs: a
fragment reads its named Arrow inputs, which are gone from the snapshot's cursor once it
ran (also when it failed); a bad or repeated name, bytes that are not exactly one intact
Arrow IPC stream, or too many bytes are refused as not retryable before any SQL runs, and
the lane serves on."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clock import SystemClock
from cluster._applier import Applier, PartitionAnswer, ReadFailure
from cluster.sql_machine import StoreWork
from cluster.sql_protocol import (
    FRAGMENT_INPUTS_BYTES_MAX,
    SqlResult,
    StagedBatch,
    encode_fragment_input,
)
from storage.partitions import CreateTable, Insert, PartitionStore, partition_table_sql
from storage.staging import StagingArea

TABLE = "main.t"
ROWS = 300
LIMIT_MS = 300
ANSWER_TIMEOUT_S = 20.0
"""Far beyond any answer's time here: only a hung lane gets near it."""
BARRIER = 2
READS = ((TABLE, 0),)
PARTITION = partition_table_sql(TABLE, 0)
RUNAWAY = f"SELECT count(*) FROM {PARTITION} a, {PARTITION} b, {PARTITION} c, range(1000000)"
COUNT = f"SELECT count(*) AS n FROM {PARTITION}"

Answer = tuple[pa.Table | None, int, ReadFailure | None]


class Host:
    """The loop's side of the applier, recording what the lanes tell it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.failures: list[str] = []
        self.applied_index = 0
        self._applied = threading.Condition()

    def fetch_stage(self, table: str, batch: StagedBatch, attempt: int) -> None:
        raise AssertionError("nothing is staged here")

    def fetch_partition(
        self, index: int, table: str, partition: int, holder: int, answer: PartitionAnswer
    ) -> None:
        raise AssertionError("nothing is caught up here")

    def caught_up(self, index: int, ok: bool) -> None:
        raise AssertionError("nothing is caught up here")

    def applied(self, index: int) -> None:
        with self._applied:
            self.applied_index = index
            self._applied.notify_all()

    def wait_applied(self, index: int) -> None:
        with self._applied:
            assert self._applied.wait_for(lambda: self.applied_index >= index, ANSWER_TIMEOUT_S)

    def failed(self, message: str) -> None:
        self.failures.append(message)

    def log_event(self, event: str, **fields: object) -> None:
        self.events.append(event)


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def applier(tmp_path: Path, host: Host) -> Iterator[Applier]:
    """An applier whose store holds partition 0 of `main.t` (x = 0..299) with a read
    snapshot open at BARRIER."""
    store = PartitionStore.open(tmp_path / "worker.duckdb")
    store.apply(1, [CreateTable(TABLE, 0, "x BIGINT"), Insert(TABLE, 0, _rows())])
    opened = Applier(store, StagingArea(tmp_path / "staging"), host, SystemClock(), LIMIT_MS)
    try:
        opened.submit(StoreWork(BARRIER, SqlResult(True), barrier=True))
        host.wait_applied(BARRIER)
        yield opened
    finally:
        opened.close()
        store.close()
    assert host.failures == []


def _rows() -> pa.Table:
    return pa.table({"x": pa.array(range(ROWS), pa.int64())})


def _ask(
    applier: Applier, index: int, sql: str, inputs: tuple[tuple[str, bytes], ...] = ()
) -> queue.SimpleQueue[Answer]:
    answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
    applier.fragment(index, sql, READS, lambda *answer: answers.put(answer), inputs)
    return answers


def _answer(applier: Applier, answers: queue.SimpleQueue[Answer]) -> Answer:
    """Wait for the answer, interrupting overdue fragments meanwhile as the loop does."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while time.monotonic() < deadline:
        applier.interrupt_overdue()
        try:
            return answers.get(timeout=0.005)
        except queue.Empty:
            continue
    raise AssertionError(f"no answer within {ANSWER_TIMEOUT_S} s: the scan lane is held")


def _count(answer: Answer) -> int:
    rows, _, failure = answer
    assert failure is None and rows is not None, failure
    return int(rows.column("n")[0].as_py())


def test_a_runaway_fragment_is_interrupted_and_the_lane_serves_on(
    applier: Applier, host: Host
) -> None:
    started = time.monotonic()
    rows, index, failure = _answer(applier, _ask(applier, BARRIER, RUNAWAY))
    elapsed_s = time.monotonic() - started
    assert rows is None and index == 0 and failure is not None
    assert not failure.retryable
    assert f"time limit of {LIMIT_MS} ms" in failure.error
    assert elapsed_s < ANSWER_TIMEOUT_S / 4, f"interrupted after {elapsed_s:.1f} s"

    # The interrupt aborted the barrier's transaction: that snapshot is gone, not broken.
    _, _, gone = _answer(applier, _ask(applier, BARRIER, COUNT))
    assert gone is not None and gone.retryable
    assert f"no read snapshot at index {BARRIER}" in gone.error
    assert "snapshot_aborted" in host.events

    # The lane serves the next read at once.
    assert _count(_answer(applier, _ask(applier, 0, COUNT))) == ROWS


def test_copies_of_an_interrupted_fragment_are_refused_without_running(
    applier: Applier,
) -> None:
    first = _ask(applier, 0, RUNAWAY)
    second = _ask(applier, 0, RUNAWAY)  # a hedged copy, queued behind the first
    _, _, interrupted = _answer(applier, first)
    assert interrupted is not None and "was interrupted" in interrupted.error
    _, _, refused = _answer(applier, second)
    assert refused is not None and not refused.retryable
    assert "it is not run again so soon" in refused.error
    assert _count(_answer(applier, _ask(applier, 0, COUNT))) == ROWS


def test_a_fragment_cannot_read_files_or_the_network(applier: Applier, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("x\n42\n")
    outside = (
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_blob('{secret}')",
        f"SELECT count(*) AS n FROM glob('{tmp_path}/*')",
        f"SELECT x FROM {PARTITION} UNION ALL SELECT x FROM read_csv('{secret}')",
        "SELECT * FROM read_parquet('http://127.0.0.1:9/rows.parquet')",
        "SELECT * FROM read_json('s3://bucket/rows.json')",
    )
    for sql in outside:
        for index in (0, BARRIER):
            rows, _, failure = _answer(applier, _ask(applier, index, sql))
            assert rows is None and failure is not None, sql
            assert not failure.retryable, sql
            assert "not files or the network" in failure.error, (sql, failure.error)
    assert _count(_answer(applier, _ask(applier, BARRIER, COUNT))) == ROWS


def test_closing_interrupts_the_running_fragment(tmp_path: Path, host: Host) -> None:
    store = PartitionStore.open(tmp_path / "worker.duckdb")
    store.apply(1, [CreateTable(TABLE, 0, "x BIGINT"), Insert(TABLE, 0, _rows())])
    forever_ms = 3_600_000
    applier = Applier(store, StagingArea(tmp_path / "staging"), host, SystemClock(), forever_ms)
    try:
        applier.submit(StoreWork(BARRIER, SqlResult(True), barrier=True))
        host.wait_applied(BARRIER)
        answers = _ask(applier, BARRIER, RUNAWAY)
        queued = _ask(applier, BARRIER, COUNT)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not applier.fragment_running:  # the lane has started it
            assert time.monotonic() < deadline and answers.empty(), "the fragment never ran"
            time.sleep(0.001)
        started = time.monotonic()
        applier.close()
        elapsed_s = time.monotonic() - started
    finally:
        applier.close()
        store.close()
    _, _, failure = answers.get(timeout=ANSWER_TIMEOUT_S)
    assert failure is not None and failure.retryable and "stopping" in failure.error
    _, _, later = queued.get(timeout=ANSWER_TIMEOUT_S)  # not run: its snapshot is gone
    assert later is not None and later.retryable
    assert elapsed_s < ANSWER_TIMEOUT_S / 4, f"closing took {elapsed_s:.1f} s"


KEYS = (3, 5, 8, 13, 1000)
"""Three of them (3, 5, 8, 13 minus none: four) are in `main.t`; 1000 is not."""
SEMI_JOIN = f"SELECT count(*) AS n FROM {PARTITION} WHERE x IN (SELECT k FROM dcluster_keys_0)"
READS_KEYS = "SELECT count(*) AS n FROM dcluster_keys_0"


def _keys() -> bytes:
    return encode_fragment_input(pa.table({"k": pa.array(KEYS, pa.int64())}))


def _refusal(answer: Answer) -> ReadFailure:
    rows, _, failure = answer
    assert rows is None and failure is not None
    return failure


def test_a_fragment_reads_its_inputs_and_they_are_gone_after(applier: Applier) -> None:
    inputs = (("dcluster_keys_0", _keys()),)
    for index in (BARRIER, 0):
        assert _count(_answer(applier, _ask(applier, index, SEMI_JOIN, inputs))) == 4
    two = (("dcluster_keys_0", _keys()), ("dcluster_keys_17", _keys()))
    both = "SELECT count(*) AS n FROM dcluster_keys_0 JOIN dcluster_keys_17 USING (k)"
    assert _count(_answer(applier, _ask(applier, BARRIER, both, two))) == len(KEYS)

    # The barrier's snapshot (one cursor, every fragment at BARRIER) no longer has them.
    for name in ("dcluster_keys_0", "dcluster_keys_17"):
        gone = _refusal(_answer(applier, _ask(applier, BARRIER, f"SELECT * FROM {name}")))
        assert not gone.retryable and gone.duckdb_error == "CatalogException", gone
        assert name in gone.error
    assert _count(_answer(applier, _ask(applier, BARRIER, COUNT))) == ROWS


def test_inputs_are_unregistered_when_the_fragment_fails(applier: Applier, host: Host) -> None:
    inputs = (("dcluster_keys_0", _keys()),)
    # Refused while binding: the snapshot serves on, without the input.
    unbound = _refusal(
        _answer(applier, _ask(applier, BARRIER, "SELECT nope FROM dcluster_keys_0", inputs))
    )
    assert unbound.duckdb_error == "BinderException" and not unbound.retryable
    gone = _refusal(_answer(applier, _ask(applier, BARRIER, READS_KEYS)))
    assert gone.duckdb_error == "CatalogException"

    # Failed while running: DuckDB aborted the snapshot's transaction, which is dropped;
    # DuckDB's error comes back (not the aborted transaction's refusal to unregister).
    failing = "SELECT 'x'::INTEGER + count(*) AS n FROM dcluster_keys_0"
    for index in (0, BARRIER):
        cast = _refusal(_answer(applier, _ask(applier, index, failing, inputs)))
        assert cast.duckdb_error == "ConversionException" and not cast.retryable, cast
    assert "snapshot_aborted" in host.events
    stale = _refusal(_answer(applier, _ask(applier, 0, READS_KEYS)))
    assert stale.duckdb_error == "CatalogException"
    assert _count(_answer(applier, _ask(applier, 0, SEMI_JOIN, inputs))) == 4


def _truncated() -> bytes:
    return _keys()[:-8]


BAD_INPUTS = {
    "not a key name": (("keys", _keys()),),
    "no number": (("dcluster_keys_", _keys()),),
    "upper case": (("DCLUSTER_KEYS_0", _keys()),),
    "a trailing newline": (("dcluster_keys_0\n", _keys()),),
    "SQL in the name": (("dcluster_keys_0; DROP TABLE x", _keys()),),
    "a quote": (('dcluster_keys_0"', _keys()),),
    "not ASCII digits": (("dcluster_keys_\u0663", _keys()),),
    "a name twice": (("dcluster_keys_0", _keys()), ("dcluster_keys_0", _keys())),
    "no bytes": (("dcluster_keys_0", b""),),
    "not Arrow": (("dcluster_keys_0", b"garbage!" * 64),),
    "cut short": (("dcluster_keys_0", _keys()[: len(_keys()) // 2]),),
    "no end marker": (("dcluster_keys_0", _truncated()),),
    "two streams": (("dcluster_keys_0", _keys() + _keys()),),
    "bytes after": (("dcluster_keys_0", _keys() + b"\0" * 8),),
    "too many bytes": (("dcluster_keys_0", b"\0" * (FRAGMENT_INPUTS_BYTES_MAX + 1)),),
}


@pytest.mark.parametrize("inputs", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_inputs_are_refused_before_any_sql_runs(
    applier: Applier, inputs: tuple[tuple[str, bytes], ...]
) -> None:
    for index in (BARRIER, 0):
        refused = _refusal(_answer(applier, _ask(applier, index, SEMI_JOIN, inputs)))
        assert not refused.retryable and refused.duckdb_error == "", refused
        assert "fragment input" in refused.error, refused.error
    # Nothing ran, so the barrier's snapshot is whole; the lane serves on.
    assert _count(_answer(applier, _ask(applier, BARRIER, COUNT))) == ROWS


def test_corrupted_input_bytes_never_break_the_lane(applier: Applier) -> None:
    """Every byte of an input flipped in turn: each fragment is answered (refused, or run
    when the damage is in bytes Arrow does not read), and the lane serves on."""
    good = _keys()
    for position in range(0, len(good), 3):
        damaged = bytearray(good)
        damaged[position] ^= 0xFF
        inputs = (("dcluster_keys_0", bytes(damaged)),)
        rows, _, failure = _answer(applier, _ask(applier, 0, READS_KEYS, inputs))
        assert (rows is None) != (failure is None)
        if failure is not None and failure.duckdb_error == "":
            assert "fragment input" in failure.error, failure.error
    assert _count(_answer(applier, _ask(applier, BARRIER, COUNT))) == ROWS
