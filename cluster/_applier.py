"""The worker's partition store, driven from three lanes beside the loop.

- apply lane: runs each command's `StoreWork` on the DuckDB partition store, strictly in
  log order, resolving staged batches to rows first (a batch this node does not hold, or
  holds corrupt, is fetched from another holder through the loop before the entry is
  applied); opens a read snapshot when it applies a read barrier, or when a read asks for
  the current state (`open_current`: one snapshot per state index, shared by the reads
  that hold it); runs checkpoints. It alone opens and closes snapshots.
- scan lane: reads partitions, and runs fragments (one read-only SELECT over the physical
  partition tables, checked by DuckDB's own parser to be exactly one SELECT, and over the
  fragment's named Arrow inputs, checked and decoded before any SQL runs), inside those
  snapshots and hands the rows to the loop. A fragment's inputs are registered on the
  snapshot's cursor only while its SQL runs: the next read on that cursor never sees
  them. A fragment may not reach outside the store (the store's DuckDB has external
  access off: a file or URL it names is refused) and may run for at most its time limit,
  after which the loop interrupts it (cluster._fragment_watch).
- stage lane: writes staged rows durably (fsync) and tells the loop to acknowledge.

Exactly once: the store skips any entry at or below its applied index (committed in the
same DuckDB transaction as the entry's effects), so replay after a crash neither doubles
nor skips an entry; staged rows are not even read for a skipped entry.

Read snapshots live until released (a shared one: by all its holders, and only once a
later write or DDL has made it stale), until idle for `SNAPSHOT_IDLE_MS`, or until
`SNAPSHOTS_KEPT_MAX` newer ones push them out; a scan of a vanished snapshot is refused
as retryable (the client takes a new barrier). DuckDB aborts a transaction when a
statement fails while running (a bad cast in a fragment, an interrupt), so a snapshot a
failed read left unusable is dropped at once: later reads at its barrier are refused as
retryable here and served by another holder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import duckdb
import pyarrow as pa

from clock import Clock
from cluster._fragment_watch import FRAGMENT_TIME_LIMIT_MS, FragmentWatch, Interrupted
from cluster._threads import LANE_CLOSE_TIMEOUT_S, Lane
from cluster.sql_machine import StagedRows, StoreWork
from cluster.sql_protocol import FragmentInputError, StagedBatch, decode_fragment_inputs
from storage.partitions import (
    CreateTable,
    DeleteRows,
    DropPartition,
    Insert,
    Operation,
    OperationRejected,
    PartitionStore,
    PartitionStoreError,
    ReadSnapshot,
    StoreFailed,
    partition_table_sql,
    quote_identifier,
)
from storage.staging import StagedFile, StagingArea, StagingError

SNAPSHOT_IDLE_MS = 30_000
SNAPSHOTS_KEPT_MAX = 32
SELECTS_KEPT_MAX = 256
"""Fragment texts remembered as parsed to one SELECT: a coordinator sends the same texts
again and again (one per partition, and a remembered plan's on every run)."""
FETCH_WAIT_MS = 2_000
"""How long the apply lane waits for one fetch of a missing batch before asking again."""
CHECKPOINT_INTERVAL_MS = 500
"""At most this often, after applying writes, DuckDB's WAL is checkpointed into the file."""
FRAGMENT_SQL_CHARS_MAX = 1 << 20
"""A fragment's SQL longer than this is refused before it is parsed."""
CLOSE_INTERRUPT_INTERVAL_MS = 20
"""While closing, the running fragment is interrupted again this often until it stops."""
NS_PER_MS = 1_000_000


class Host(Protocol):
    """What the applier needs from the loop. Called from lanes: implementations post to
    the loop's mailbox."""

    def fetch_stage(self, table: str, batch: StagedBatch, attempt: int) -> None: ...

    def fetch_partition(
        self, index: int, table: str, partition: int, holder: int, answer: PartitionAnswer
    ) -> None:
        """Ask node `holder` for the partition's rows at barrier `index`; `answer` gets
        them (with a release callback) or None."""
        ...

    def caught_up(self, index: int, ok: bool) -> None: ...

    def applied(self, index: int) -> None: ...

    def failed(self, message: str) -> None: ...

    def log_event(self, event: str, **fields: object) -> None: ...


class PartitionAnswer:
    """A one-shot slot the loop fills with a fetched partition (or None) for a lane."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self.rows: pa.Table | None = None
        self.release: Callable[[], None] | None = None

    def set(self, rows: pa.Table | None, release: Callable[[], None] | None = None) -> None:
        self.rows, self.release = rows, release
        self._ready.set()

    def wait(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)


@dataclass(frozen=True, slots=True)
class CatchUpItem:
    table: str
    partition: int
    columns_sql: str
    holders: tuple[int, ...]
    """The other holders (never this node) to copy from."""


CATCH_UP_WAIT_MS = 15_000
"""How long one holder has to send one partition during a catch-up."""


@dataclass(slots=True)
class _Snapshot:
    snapshot: ReadSnapshot | None
    """None: this node holds no partition (nothing to read, but the state is named)."""
    last_used_ns: int
    readers: int = 0
    """Reads running in it now (on the scan lane)."""
    holders: set[int] | None = None
    """The readers holding a shared snapshot of the current state; None: a barrier's."""


class ScanRefused(Exception):
    """The scan cannot be served here (no snapshot, partition not held); retryable."""


class FragmentRefused(Exception):
    """The fragment's SQL is not exactly one SELECT, its inputs are not acceptable
    (`cluster.sql_protocol.decode_fragment_inputs`), DuckDB refused it while running, it
    named a file or URL, or it ran past its time limit: every holder would do the same, so
    it is not retryable. `duckdb_error` is DuckDB's
    exception class name when DuckDB raised (`str(error)` is then DuckDB's message)."""

    def __init__(self, message: str, duckdb_error: str = "") -> None:
        super().__init__(message)
        self.duckdb_error = duckdb_error


@dataclass(frozen=True, slots=True)
class ReadFailure:
    """Why a scan or a fragment was not answered with rows."""

    error: str
    retryable: bool = True
    """True: another holder (or a new barrier) may serve it."""
    duckdb_error: str = ""
    """DuckDB's exception class name when DuckDB refused a fragment's SQL."""
    snapshot_missing: bool = False
    """No snapshot at the read's index here (`ScanError.snapshot_missing`)."""


OpenDone = Callable[[int, int, str | None], None]
"""`done(state_index, catalog_version, None)` or `done(0, 0, why)`; called from a lane."""
ReadDone = Callable[[pa.Table | None, int, ReadFailure | None], None]
"""`done(rows, index, None)` or `done(None, 0, failure)`; called from a lane."""
Read = Callable[[ReadSnapshot], pa.Table]
"""What a scan or a fragment does inside a snapshot (on the scan lane)."""


def select_refusal(parser: duckdb.DuckDBPyConnection, sql: str) -> FragmentRefused | None:
    """Why `sql` may not run as a fragment, or None when DuckDB's parser finds exactly one
    SELECT statement in it. `parser` only parses (any connection; it runs nothing)."""
    if len(sql) > FRAGMENT_SQL_CHARS_MAX:
        return FragmentRefused(
            f"a fragment's SQL may be at most {FRAGMENT_SQL_CHARS_MAX} characters long, "
            f"this one is {len(sql)}"
        )
    try:
        statements = parser.extract_statements(sql)
    except duckdb.Error as error:
        return FragmentRefused(str(error), type(error).__name__)
    if len(statements) != 1:
        return FragmentRefused(
            f"a fragment must be exactly one SELECT statement, not {len(statements)} statements"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        return FragmentRefused(f"a fragment must be a SELECT statement, not {kind.name}")
    return None


class Applier:
    def __init__(
        self,
        store: PartitionStore,
        staging: StagingArea,
        host: Host,
        clock: Clock,
        fragment_time_limit_ms: int = FRAGMENT_TIME_LIMIT_MS,
    ) -> None:
        self.store = store
        self.staging = staging
        self._host = host
        self._clock = clock
        self._apply = Lane("dcluster-apply", self._lane_error)
        self._scan = Lane("dcluster-scan", self._lane_error)
        self._stage = Lane("dcluster-stage", self._lane_error)
        self.done_index = store.applied_index()
        """The last index whose work the apply lane finished (read by the loop)."""
        self.changed_index = self.done_index
        """The last index whose entry changed the store (a barrier changes nothing)."""
        self._state: tuple[int, int] | None = None
        """(state index, catalog version) the store is at (the apply lane's alone); None
        until the loop seeds it (reads of the current state are refused until then)."""
        self._snapshots: OrderedDict[int, _Snapshot] = OrderedDict()
        self._snapshots_lock = threading.Lock()
        self._arrived = threading.Condition()
        self._closing = False
        self._failed = False
        self.rejected = 0
        self._checkpointed_ns = clock.monotonic_ns()
        self._dirty = False
        self._parser: duckdb.DuckDBPyConnection | None = None
        """Parses fragments' SQL (never runs any); the scan lane's alone."""
        self._selects: OrderedDict[str, None] = OrderedDict()
        """Fragment texts the parser found to be one SELECT (the scan lane's alone)."""
        self._fragment_watch = FragmentWatch(clock, fragment_time_limit_ms)

    # ---- from the loop ----

    @property
    def fragment_time_limit_ms(self) -> int:
        return self._fragment_watch.limit_ms

    @property
    def fragment_running(self) -> bool:
        """The scan lane is running a fragment now."""
        return self._fragment_watch.watching

    def interrupt_overdue(self) -> None:
        """On every wake-up: interrupt the fragment that has run past its time limit (the
        scan lane then refuses it and serves the next read)."""
        self._fragment_watch.interrupt_overdue()

    def submit(self, work: StoreWork) -> None:
        self._apply.submit(lambda: self._run(work))

    def submit_checkpoint(self, index: int, done: Callable[[], None]) -> None:
        """After every earlier submission: make the store's applied index at least `index`
        (a snapshot of the state machine at `index` is about to replace the log), then
        call `done` (from the lane)."""
        self._apply.submit(lambda: self._checkpoint(index, done))

    def stage(
        self,
        stage_id: str,
        rows: pa.Table,
        done: Callable[[StagedFile | None, str | None], None],
    ) -> None:
        """Write `rows` durably as `stage_id`; `done(file, None)` or `done(None, error)`."""

        def write() -> None:
            try:
                staged = self.staging.write(stage_id, rows)
            except (StagingError, ValueError) as error:
                done(None, str(error))
                return
            with self._arrived:
                self._arrived.notify_all()
            done(staged, None)

        self._stage.submit(write)

    def scan(
        self,
        index: int,
        table: str,
        partition: int,
        columns: tuple[str, ...] | None,
        done: ReadDone,
    ) -> None:
        """Read one partition at barrier `index` (0: now). Barrier scans must only be asked
        once `done_index >= index`. Every failure is retryable."""

        def read(snapshot: ReadSnapshot) -> pa.Table:
            return _scan_rows(snapshot, table, partition, columns)

        self._submit_read(index, read, done)

    def fragment(
        self,
        index: int,
        sql: str,
        reads: tuple[tuple[str, int], ...],
        done: ReadDone,
        inputs: tuple[tuple[str, bytes], ...] = (),
        explain: bool = False,
    ) -> None:
        """Run `sql` (with `explain`: DuckDB's `EXPLAIN (FORMAT json)` of it), which must be
        exactly one SELECT, in the snapshot at barrier `index`
        (0: now) once every (table, partition) of `reads` is found held there; only once
        `done_index >= index`, like scans. `inputs` are (name, Arrow IPC stream) pairs the
        SQL reads as tables by those names. SQL that is not one SELECT, inputs refused by
        `decode_fragment_inputs`, or SQL DuckDB refuses while running fail as not retryable
        (with DuckDB's class and message when DuckDB raised); a partition not held or a
        snapshot that is gone fails as retryable."""

        def read(snapshot: ReadSnapshot) -> pa.Table:
            return self._run_fragment(snapshot, sql, reads, inputs, explain)

        self._submit_read(index, read, done)

    def _submit_read(self, index: int, read: Read, done: ReadDone) -> None:
        if index == 0:
            self._apply.submit(lambda: self._open_for_stale(read, done))
            return
        self._scan.submit(lambda: self._read(index, read, done))

    def submit_catch_up(
        self,
        index: int,
        items: list[CatchUpItem],
        keep: set[tuple[str, int]],
        state: tuple[int, int],
    ) -> None:
        """After every earlier submission: copy each item's partition as of barrier `index`
        from another holder, then in ONE store transaction at `index` replace those local
        partitions with the copies and drop local partitions not in `keep`; the store is
        then at `state` (state index, catalog version). Ends with
        `host.caught_up(index, ok)`; on failure the store is unchanged."""
        self._apply.submit(lambda: self._catch_up(index, items, keep, state))

    def run_on_stage_lane(self, work: Callable[[], None]) -> None:
        self._stage.submit(work)

    def run_on_apply_lane(self, work: Callable[[], None]) -> None:
        """After every earlier submission (the store is the apply lane's alone)."""
        self._apply.submit(work)

    def release(self, index: int, reader: int = 0) -> None:
        """`reader` 0: the barrier at `index` is done with; else that reader's hold on the
        shared snapshot at `index` ends."""
        self._apply.submit(lambda: self._release(index, reader))

    def seed_state(self, state_index: int, catalog_version: int) -> None:
        """After every earlier submission, the store is at this state (the machine was
        restored, or a snapshot installed, and the store is not behind it)."""

        def seed() -> None:
            self._state = (state_index, catalog_version)

        self._apply.submit(seed)

    def open_current(self, reader: int, done: OpenDone) -> None:
        """After every earlier submission: hold the snapshot of the store's current state
        for `reader`, opening it if no read holds one yet; `done(state_index,
        catalog_version, None)`, or `done(0, 0, why)` when the state is not known here."""
        self._apply.submit(lambda: self._open_current(reader, done))

    def close(self) -> None:
        self._closing = True
        self._fragment_watch.interrupt_now()
        with self._arrived:
            self._arrived.notify_all()
        self._stage.close()
        # DuckDB forgets an interrupt that lands just before its statement starts: repeat
        # it while the scan lane finishes (later fragments are refused without running).
        deadline_ns = self._clock.monotonic_ns() + int(LANE_CLOSE_TIMEOUT_S * 1000) * NS_PER_MS
        while not self._scan.close(CLOSE_INTERRUPT_INTERVAL_MS / 1000):
            if self._clock.monotonic_ns() >= deadline_ns:
                break
            self._fragment_watch.interrupt_now()
        self._apply.close()
        if self._parser is not None:
            self._parser.close()
            self._parser = None
        with self._snapshots_lock:
            snapshots = list(self._snapshots.values())
            self._snapshots.clear()
        for held in snapshots:
            if held.snapshot is not None:
                held.snapshot.close()

    # ---- apply lane ----

    def _run(self, work: StoreWork) -> None:
        if self._failed:
            return
        before = self._state
        self._state = (work.state_index, work.catalog_version)
        if before is not None and before[0] != work.state_index:
            self._close_stale_shared()
        if work.barrier:
            self._open_barrier(work.index)
        elif work.ops and work.index > self.store.applied_index():
            operations = self._resolve(work)
            if operations is None:
                return  # closing
            self._apply_ops(work.index, operations)
        self._expire_snapshots()
        self.done_index = work.index
        if work.ops:
            self.changed_index = work.index
        self._host.applied(work.index)
        if work.ops:
            self._dirty = True
            self.maybe_checkpoint()

    @property
    def dirty(self) -> bool:
        """Writes applied since the last checkpoint."""
        return self._dirty

    def maybe_checkpoint(self) -> None:
        """On the apply lane: checkpoint if something was written and the last checkpoint is
        older than CHECKPOINT_INTERVAL_MS."""
        now = self._clock.monotonic_ns()
        if not self._dirty or now - self._checkpointed_ns < CHECKPOINT_INTERVAL_MS * NS_PER_MS:
            return
        self._checkpointed_ns = now
        self._dirty = False
        try:
            self.store.checkpoint()
        except PartitionStoreError as error:
            self._host.log_event("checkpoint_failed", error=str(error))

    def _apply_ops(self, index: int, operations: list[Operation]) -> None:
        try:
            self.store.apply(index, operations)
        except OperationRejected as error:
            # The coordinator ran the statement before proposing it, so this is a bug, not
            # bad input; every holder of the partition rejects it alike (the replicas stay
            # equal), but the statement did not apply everywhere. Say so loudly.
            self.rejected += 1
            self._host.log_event("apply_rejected", index=index, error=str(error))
            self.store.apply(index, ())
        except (StoreFailed, PartitionStoreError) as error:
            self._fail(f"partition store failed at index {index}: {error}")

    def _resolve(self, work: StoreWork) -> list[Operation] | None:
        operations: list[Operation] = []
        for op in work.ops:
            if not isinstance(op, StagedRows):
                operations.append(op)
                continue
            rows = self._staged_rows(op)
            if rows is None:
                return None
            if op.batch.delete:
                operations.append(DeleteRows(op.table, op.partition, rows))
            else:
                operations.append(Insert(op.table, op.partition, rows))
        return operations

    def _staged_rows(self, op: StagedRows) -> pa.Table | None:
        """The batch's rows from the staging area, fetched from another holder first if this
        node has no good copy. None only when the worker is closing."""
        batch = op.batch
        attempt = 0
        while not self._closing:
            rows = self.staging.open(batch.stage_id, batch.crc, batch.rows)
            if rows is not None:
                return rows
            if attempt % 10 == 0:
                self._host.log_event("stage_missing", stage=batch.stage_id, attempt=attempt)
            self._host.fetch_stage(op.table, batch, attempt)
            attempt += 1
            with self._arrived:
                if not self.staging.has(batch.stage_id) and not self._closing:
                    self._arrived.wait(FETCH_WAIT_MS / 1000)
        return None

    def _checkpoint(self, index: int, done: Callable[[], None]) -> None:
        if self._failed:
            return
        if index > self.store.applied_index():
            try:
                self.store.apply(index, ())
            except PartitionStoreError as error:
                self._fail(f"partition store failed at checkpoint {index}: {error}")
                return
        done()

    def _catch_up(
        self,
        index: int,
        items: list[CatchUpItem],
        keep: set[tuple[str, int]],
        state: tuple[int, int],
    ) -> None:
        if self._failed:
            return
        fetched: list[tuple[CatchUpItem, PartitionAnswer]] = []
        try:
            for item in items:
                answer = self._fetch_partition(index, item)
                if answer is None:
                    self._host.log_event(
                        "catch_up_fetch_failed",
                        index=index,
                        table=item.table,
                        partition=item.partition,
                    )
                    self._host.caught_up(index, False)
                    return
                fetched.append((item, answer))
            held = set(self.store.partitions())
            ops: list[Operation] = [
                DropPartition(table, partition) for table, partition in sorted(held - keep)
            ]
            for item, answer in fetched:
                assert answer.rows is not None
                ops += [
                    DropPartition(item.table, item.partition),
                    CreateTable(item.table, item.partition, item.columns_sql),
                    Insert(item.table, item.partition, answer.rows),
                ]
            if index > self.store.applied_index():
                self.store.apply(index, ops)
        except PartitionStoreError as error:
            self._fail(f"partition store failed during catch-up at {index}: {error}")
            return
        finally:
            for _, answer in fetched:
                if answer.release is not None:
                    answer.release()
        self.done_index = self.changed_index = index
        self._close_stale_shared()
        self._state = state
        self._host.caught_up(index, True)
        self._host.applied(index)

    def _fetch_partition(self, index: int, item: CatchUpItem) -> PartitionAnswer | None:
        others = item.holders
        for attempt in range(len(others) * 2):
            if self._closing:
                return None
            answer = PartitionAnswer()
            holder = others[attempt % len(others)]
            self._host.fetch_partition(index, item.table, item.partition, holder, answer)
            if answer.wait(CATCH_UP_WAIT_MS / 1000) and answer.rows is not None:
                return answer
        return None

    def _fail(self, message: str) -> None:
        self._failed = True
        self._host.failed(message)

    def _lane_error(self, lane: str, error: BaseException) -> None:
        self._fail(f"{lane}: {type(error).__name__}: {error}")

    # ---- snapshots (opened and closed on the apply lane only) ----

    def _open_barrier(self, index: int) -> None:
        try:
            snapshot = self._snapshot_if_holding()
        except PartitionStoreError as error:
            self._host.log_event("snapshot_failed", index=index, error=str(error))
            return
        if snapshot is None:
            return
        with self._snapshots_lock:
            self._snapshots[index] = _Snapshot(snapshot, self._clock.monotonic_ns())
        self._trim_snapshots()

    def _snapshot_if_holding(self) -> ReadSnapshot | None:
        """A snapshot of the store now, or None when it holds no partition (nothing to read
        there): one transaction, whose partition list the reads then use."""
        snapshot = self.store.snapshot()
        if snapshot.partitions():
            return snapshot
        snapshot.close()
        return None

    def _open_for_stale(self, read: Read, done: ReadDone) -> None:
        try:
            snapshot = self.store.snapshot()
        except PartitionStoreError as error:
            done(None, 0, ReadFailure(str(error)))
            return

        def read_and_close() -> None:
            try:
                rows, failure = _attempt(snapshot, read)
            finally:
                self._apply.submit(snapshot.close)
            done(rows, snapshot.applied_index if rows is not None else 0, failure)

        self._scan.submit(read_and_close)

    def _open_current(self, reader: int, done: OpenDone) -> None:
        state = self._state
        if state is None or self._failed:
            done(0, 0, "this node does not know its store's state yet")
            return
        index = state[0]
        now = self._clock.monotonic_ns()
        with self._snapshots_lock:
            held = self._snapshots.get(index)
        if held is not None and held.holders is None:  # never: barriers are not writes
            done(0, 0, f"index {index} is a barrier's here")
            return
        if held is None:
            try:
                snapshot = self._snapshot_if_holding()
            except PartitionStoreError as error:
                done(0, 0, f"no snapshot: {error}")
                return
            held = _Snapshot(snapshot, now, holders=set())
            with self._snapshots_lock:
                self._snapshots[index] = held
        assert held.holders is not None
        held.holders.add(reader)
        held.last_used_ns = now
        self._trim_snapshots()  # after the hold: never the snapshot just opened for it
        done(index, state[1], None)

    def _release(self, index: int, reader: int) -> None:
        with self._snapshots_lock:
            held = self._snapshots.get(index)
        if held is None:
            return
        if held.holders is None:
            if reader == 0:
                self._close_snapshot(index)
            return
        held.holders.discard(reader)
        if not held.holders and (self._state is None or self._state[0] != index):
            self._close_snapshot(index)

    def _close_stale_shared(self) -> None:
        """The state moves on: shared snapshots no read holds are of no further use (and
        an open transaction would keep the next checkpoint from freeing old versions)."""
        with self._snapshots_lock:
            stale = [i for i, held in self._snapshots.items() if held.holders == set()]
        for index in stale:
            self._close_snapshot(index)

    def _close_snapshot(self, index: int) -> None:
        with self._snapshots_lock:
            held = self._snapshots.get(index)
            if held is None or held.readers:
                return
            del self._snapshots[index]
        if held.snapshot is not None:
            held.snapshot.close()

    def _expire_snapshots(self) -> None:
        now = self._clock.monotonic_ns()
        with self._snapshots_lock:
            idle = [
                index
                for index, held in self._snapshots.items()
                if not held.readers and now - held.last_used_ns > SNAPSHOT_IDLE_MS * NS_PER_MS
            ]
        for index in idle:
            self._close_snapshot(index)

    def _trim_snapshots(self) -> None:
        with self._snapshots_lock:
            extra = len(self._snapshots) - SNAPSHOTS_KEPT_MAX
            oldest = [
                index
                for index, held in self._snapshots.items()
                if not held.readers and not held.holders  # a shared one a read holds stays
            ][: max(0, extra)]
        for index in oldest:
            self._close_snapshot(index)

    # ---- scan lane ----

    def _read(self, index: int, read: Read, done: ReadDone) -> None:
        with self._snapshots_lock:
            held = self._snapshots.get(index)
            if held is not None and held.snapshot is not None:
                held.readers += 1
                held.last_used_ns = self._clock.monotonic_ns()
        if held is None or held.snapshot is None:
            why = f"no read snapshot at index {index} here (expired or never opened)"
            done(None, 0, ReadFailure(why, snapshot_missing=True))
            return
        try:
            rows, failure = _attempt(held.snapshot, read)
            if failure is not None and not _still_open(held.snapshot):
                self._drop_snapshot(index, held)
        finally:
            with self._snapshots_lock:
                held.readers -= 1
        done(rows, index if rows is not None else 0, failure)

    def _drop_snapshot(self, index: int, held: _Snapshot) -> None:
        """Forget a snapshot whose transaction DuckDB aborted; the apply lane closes it."""
        with self._snapshots_lock:
            if self._snapshots.get(index) is not held:
                return  # closing: the applier closes every snapshot itself
            del self._snapshots[index]
        self._host.log_event("snapshot_aborted", index=index)
        assert held.snapshot is not None
        self._apply.submit(held.snapshot.close)

    def _run_fragment(
        self,
        snapshot: ReadSnapshot,
        sql: str,
        reads: tuple[tuple[str, int], ...],
        inputs: tuple[tuple[str, bytes], ...] = (),
        explain: bool = False,
    ) -> pa.Table:
        if sql not in self._selects:
            if self._parser is None:
                self._parser = duckdb.connect(":memory:", config={"threads": 1})
            refusal = select_refusal(self._parser, sql)
            if refusal is not None:
                raise refusal
            self._selects[sql] = None
            if len(self._selects) > SELECTS_KEPT_MAX:
                self._selects.popitem(last=False)
        self._selects.move_to_end(sql)
        try:
            tables = decode_fragment_inputs(inputs)
        except FragmentInputError as error:
            raise FragmentRefused(str(error)) from error
        held = set(snapshot.partitions())
        for table, partition in reads:
            if (table, partition) not in held:
                raise ScanRefused(f"partition {partition} of {table} is not held here")
        limit_ms = self._fragment_watch.limit_ms
        ago_ms = self._fragment_watch.interrupted_ago_ms(sql)
        if ago_ms is not None:
            raise FragmentRefused(
                f"the fragment ran past its time limit of {limit_ms} ms here {ago_ms} ms ago "
                "and was interrupted; it is not run again so soon"
            )
        watched = self._fragment_watch.start(snapshot)
        try:
            if watched.why is Interrupted.CLOSING:
                raise ScanRefused("this node is stopping")
            return snapshot.query(f"EXPLAIN (FORMAT json) {sql}" if explain else sql, tables)
        except PartitionStoreError as error:
            why = self._fragment_error(sql, watched.why, error)
            if why is None:
                raise  # StoreFailed: memory, IO, an aborted transaction; another holder may do
            raise why from error
        except pa.ArrowException as error:  # rows DuckDB made but Arrow cannot hold
            raise FragmentRefused(f"the fragment's rows cannot be sent: {error}") from error
        finally:
            self._fragment_watch.stop(watched)

    def _fragment_error(
        self, sql: str, interrupted: Interrupted | None, error: PartitionStoreError
    ) -> Exception | None:
        """What a fragment that failed while running is refused with (None: the store's
        error as it is)."""
        cause = error.__cause__
        if interrupted is Interrupted.TIME_LIMIT and isinstance(cause, duckdb.InterruptException):
            self._fragment_watch.remember(sql)
            self._host.log_event("fragment_interrupted", limit_ms=self._fragment_watch.limit_ms)
            return FragmentRefused(
                f"the fragment ran past its time limit of {self._fragment_watch.limit_ms} ms "
                "and was interrupted (it would run as long on any holder)"
            )
        if interrupted is Interrupted.CLOSING:
            return ScanRefused("this node is stopping")
        if isinstance(cause, duckdb.PermissionException):  # external access is off
            return FragmentRefused(
                "a fragment may read only the partition tables of the store, not files or "
                f"the network: {error}"
            )
        if isinstance(error, OperationRejected):  # DuckDB's deterministic errors: a cast, a binder
            name = type(cause).__name__ if isinstance(cause, duckdb.Error) else ""
            return FragmentRefused(str(error), name)
        return None


def _attempt(snapshot: ReadSnapshot, read: Read) -> tuple[pa.Table | None, ReadFailure | None]:
    """Run `read`; a failure DuckDB's environment caused (StoreFailed: memory, IO, an
    aborted transaction) is retryable — another holder may well succeed."""
    try:
        return read(snapshot), None
    except FragmentRefused as error:
        return None, ReadFailure(str(error), retryable=False, duckdb_error=error.duckdb_error)
    except (PartitionStoreError, ScanRefused) as error:
        return None, ReadFailure(str(error))


def _still_open(snapshot: ReadSnapshot) -> bool:
    """False when a failed statement left the snapshot's transaction aborted."""
    try:
        snapshot.query("SELECT 1")
    except PartitionStoreError:
        return False
    return True


def _scan_rows(
    snapshot: ReadSnapshot, table: str, partition: int, columns: tuple[str, ...] | None
) -> pa.Table:
    if (table, partition) not in snapshot.partitions():
        raise ScanRefused(f"partition {partition} of {table} is not held here")
    if columns is None:
        return snapshot.scan(table, partition)
    projection = ", ".join(quote_identifier(column) for column in columns) or "*"
    return snapshot.query(f"SELECT {projection} FROM {partition_table_sql(table, partition)}")
