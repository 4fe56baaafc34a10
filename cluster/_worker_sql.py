"""The worker's SQL service on the loop thread: staging, scans, catalog answers, fetching
missing batches, and feeding the applier.

Everything here runs on the loop thread; slow work goes to the applier's lanes, whose
answers come back through the mailbox (see cluster._threads). Requests it serves:

- bulk `StageHeader` + rows from a client: written durably on the stage lane, then
  acknowledged with the rows' count and CRC (only after the fsync).
- `ScanRequest`: at barrier index b, parked until the store has applied b (bounded by
  `SCAN_WAIT_MS`), then read on the scan lane from the snapshot opened at b and sent back as
  bulk; index 0 reads what is applied now.
- `FragmentRequest`: parked and answered like a scan, but what runs in the snapshot is the
  request's SQL — refused unless DuckDB's parser finds exactly one SELECT, its inputs are
  acceptable (checked and decoded on the scan lane, not here), and every partition it
  names is held here (see `Applier.fragment`); refused if it names a file or URL, and
  interrupted by `tick` once it has run for its time limit
  (`DCLUSTER_FRAGMENT_TIME_LIMIT_MS`, see cluster._fragment_watch).
- `CatalogRequest`: the applied catalog, placements and versions, and each table's rows
  as estimated from the partitions held here (`estimated_table_rows`; as fresh as the
  partition counts kept for status, refreshed some time after writes).
- `FetchStage` from another worker: the staged rows, if this node has a good copy.
- `OpenRead`: a read point without a log entry. Parked until the state machine has
  applied the request's `at_least` and, when it asks to linearize, a ReadIndex point this
  node asked the leader for (`READ_INDEX_PREFIX` request ids); then the applier opens, or
  joins, the snapshot of the store's current state and the node answers `ReadOpened`
  with its state index. Refused (retryable) while the store catches up from replicas.
- `ReleaseRead`: the client is done with a barrier's snapshots, or with its hold on a
  shared one.

Invariant: a stage is acknowledged only after its rows are on disk; a scan or fragment at
barrier b is answered only from the snapshot taken when b was applied, never from later
state; an `OpenRead` names a state index only for a snapshot holding exactly the writes
and DDL up to it, opened after every entry up to the index it waited for was applied.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import psutil
import pyarrow as pa

from clock import Clock
from cluster._applier import Applier, PartitionAnswer, ReadFailure
from cluster._fragment_watch import fragment_time_limit_ms_from
from cluster._threads import Mailbox
from cluster._worker_log import EventLog
from cluster.config import worker_memory_bytes_from
from cluster.protocol import CLIENT_ID_MIN, PartitionInfo, raft_id
from cluster.rundir import RunDir
from cluster.sql_machine import StoreWork
from cluster.sql_protocol import (
    CatalogRequest,
    CatalogResponse,
    FetchStage,
    FragmentHeader,
    FragmentRequest,
    OpenRead,
    ReadOpened,
    ReleaseRead,
    ScanError,
    ScanHeader,
    ScanRequest,
    StageAck,
    StagedBatch,
    StageHeader,
    write_quorum,
)
from cluster.state import ClusterState
from ipc.errors import Backpressure, TransportError
from ipc.transport import BulkReceived, Transport
from raft.types import ProposalRefused
from storage.partitions import PartitionStore, PartitionStoreConfig
from storage.staging import StagedFile, StagingArea

SCAN_WAIT_MS = 5_000
"""A scan or fragment at a barrier this node has not applied yet waits this long, then is
refused."""
OUTBOX_RETRY_MS = 5_000
"""A reply the transport pushed back on is retried for this long, then dropped."""
STATS_REFRESH_MS = 500
"""Partition counts (for status) are refreshed this often while the store changes."""
STAGING_COLLECT_MS = 60_000
STAGING_KEEP_MS = 3_600_000
"""Staged files older than this are removed (a holder that still needs one catches up
from a replica instead)."""
FORWARD_WAIT_MS_MIN = 2_000
"""After its own copy is stored, a holder waits at least this long (and at least twice
as long as its own copy took) for the holders it forwarded to..."""
QUORUM_GRACE_MS_MIN = 100
"""...or, once a write quorum has stored the rows, this long (at least half its own
copy's time) for the rest: a slow or paused holder fetches the batch when it applies."""
NS_PER_MS = 1_000_000
READ_INDEX_PREFIX = b"sql:"
"""ReadIndex request ids of `OpenRead`s start with this (the key-value reads' ids are 8
bytes, so the two never meet)."""


ReadRequest = ScanRequest | FragmentRequest


@dataclass(slots=True)
class _ParkedRead:
    source: int
    request: ReadRequest
    deadline_ns: int


@dataclass(slots=True)
class _ParkedOpen:
    source: int
    request: OpenRead
    deadline_ns: int
    read_index: int = 0
    """The confirmed ReadIndex point (0: not yet, or not asked)."""


@dataclass(slots=True)
class _Outgoing:
    target: int
    header: msgspec.Struct
    rows: pa.Table | None
    deadline_ns: int


@dataclass(eq=False)
class _Forward:
    """A client's stage this node stores and passes on to the partition's other holders."""

    source: int
    header: StageHeader
    waiting: dict[int, int] = field(default_factory=dict)
    """Request id of a forward -> the node it went to."""
    acks: list[tuple[int, StageAck]] = field(default_factory=list)
    local: tuple[StagedFile | None, str | None] | None = None
    began_ns: int = 0
    quorum: int = 1
    """Copies (this node's included) that make the stage committable."""
    deadline_ns: int = 0
    quorum_deadline_ns: int = 0
    answered: bool = False


def _ack(
    header: StageHeader,
    node: int,
    staged: StagedFile | None,
    error: str | None,
    others: tuple[int, ...],
) -> StageAck:
    if staged is None:
        return StageAck(
            header.request_id, header.stage_id, False, error=error, retryable=True, holders=others
        )
    return StageAck(
        header.request_id, header.stage_id, True, staged.rows, staged.crc, holders=(node, *others)
    )


@dataclass
class SqlStats:
    staged: int = 0
    stage_failures: int = 0
    scans: int = 0
    scan_refusals: int = 0
    fragments: int = 0
    fragment_refusals: int = 0
    """Fragments answered with an error (retryable or not)."""
    fetches_sent: int = 0
    fetches_served: int = 0
    replies_dropped: int = 0


class SqlService:
    def __init__(
        self,
        node: int,
        run: RunDir,
        transport: Transport,
        clock: Clock,
        log: EventLog,
        state: Callable[[], ClusterState],
        reply: Callable[[int, msgspec.Struct], None],
        on_failure: Callable[[str], None],
        on_caught_up: Callable[[int, bool], None],
        read_index: Callable[[bytes], None] | None = None,
        catching_up: Callable[[], bool] = lambda: False,
        fragment_time_limit_ms: int | None = None,
    ) -> None:
        """`read_index(request_id)` asks Raft for a ReadIndex point (None: `OpenRead`s that
        ask to linearize are refused); `catching_up()`: the store is being copied from
        replicas; `fragment_time_limit_ms` None: from the environment (or the default)."""
        if fragment_time_limit_ms is None:
            fragment_time_limit_ms = fragment_time_limit_ms_from(os.environ)
        self.node = node
        self._transport = transport
        self._clock = clock
        self._log = log
        self._state = state
        self._reply = reply
        self._on_failure = on_failure
        self._on_caught_up = on_caught_up
        self._read_index = read_index
        self._catching_up = catching_up
        self._opens: dict[bytes, _ParkedOpen] = {}
        """ReadIndex request id (or, not linearizing, a made-up key) -> the open waiting."""
        self._open_ids = itertools.count(1)
        self._partition_fetches: dict[int, PartitionAnswer] = {}
        """Request id of a catch-up ScanRequest this node sent -> where the rows go."""
        self.mailbox = Mailbox()
        self._closed = False
        staging_dir = run.staging_dir(node)
        staging_dir.mkdir(parents=True, exist_ok=True)
        memory = worker_memory_bytes_from(
            os.environ, psutil.virtual_memory().total, os.cpu_count() or 1
        )
        self.store = PartitionStore.open(
            run.store_file(node), PartitionStoreConfig(memory_limit_bytes=memory)
        )
        self.staging = StagingArea(staging_dir)
        self.applier = Applier(self.store, self.staging, self, clock, fragment_time_limit_ms)
        self.stats = SqlStats()
        self._parked: list[_ParkedRead] = []
        self._outbox: list[_Outgoing] = []
        self._fetch_ids = itertools.count(1)
        self._forwards: dict[int, _Forward] = {}
        """Request id of a forwarded stage -> the client's stage it belongs to."""
        self._fetching: dict[int, str] = {}
        """Request id of a FetchStage this node sent -> the stage id it asked for."""
        self.partition_infos: tuple[PartitionInfo, ...] = ()
        self._stats_due_ns = 0
        self._stats_running = False
        self._stats_index = -1
        self._collect_due_ns = 0

    # ---- the applier's Host (called from lanes: everything goes through the mailbox) ----

    def fetch_stage(self, table: str, batch: StagedBatch, attempt: int) -> None:
        self.mailbox.post(lambda: self._send_fetch(table, batch, attempt))

    def fetch_partition(
        self, index: int, table: str, partition: int, holder: int, answer: PartitionAnswer
    ) -> None:
        self.mailbox.post(
            lambda: self._send_partition_fetch(index, table, partition, holder, answer)
        )

    def caught_up(self, index: int, ok: bool) -> None:
        self.mailbox.post(lambda: self._on_caught_up(index, ok))

    def applied(self, index: int) -> None:
        self.mailbox.post(lambda: self._serve_parked(index))

    def failed(self, message: str) -> None:
        self.mailbox.post(lambda: self._on_failure(message))

    def log_event(self, event: str, **fields: object) -> None:
        self.mailbox.post(lambda: self._log.event(event, **fields))

    # ---- the loop ----

    @property
    def store_applied_index(self) -> int:
        return self.applier.done_index

    def submit(self, work: StoreWork) -> None:
        # A write or DDL that changes nothing here still moves the store's state index.
        if work.ops or work.barrier or work.state_index == work.index:
            self.applier.submit(work)

    def run_mailbox(self) -> None:
        for work in self.mailbox.drain():
            work()

    def on_message(self, source: int, message: msgspec.Struct) -> bool:
        """Handle an SQL message; False if it is not one."""
        if isinstance(message, ScanRequest | FragmentRequest):
            self._on_read(source, message)
        elif isinstance(message, CatalogRequest):
            self._reply(source, self._catalog_response(message.request_id))
        elif isinstance(message, OpenRead):
            self._on_open(source, message)
        elif isinstance(message, ReleaseRead):
            self.applier.release(message.index, message.reader)
        elif isinstance(message, FetchStage):
            self._on_fetch(source, message)
        elif isinstance(message, StageAck) and message.request_id in self._forwards:
            self._on_forward_ack(message)
        elif isinstance(message, StageAck):
            self._fetching.pop(message.request_id, None)  # the holder has no good copy
        elif isinstance(message, ScanError) and source < CLIENT_ID_MIN:
            answer = self._partition_fetches.pop(message.request_id, None)
            if answer is not None:
                answer.set(None)
        else:
            return False
        return True

    def on_bulk(self, delivery: BulkReceived) -> None:
        header = delivery.header
        if isinstance(header, ScanHeader):
            answer = self._partition_fetches.pop(header.request_id, None)
            if answer is None:
                delivery.release()
            else:
                answer.set(delivery.table, lambda: self.mailbox.post(delivery.release))
            return
        if not isinstance(header, StageHeader):
            delivery.release()
            return
        fetched = header.request_id in self._fetching
        if fetched and self._fetching.pop(header.request_id) != header.stage_id:
            delivery.release()  # an answer nobody waits for any more
            return
        group = None if fetched else self._forward(delivery, header)

        def done(staged: StagedFile | None, error: str | None) -> None:
            self.mailbox.post(lambda: self._staged(delivery, fetched, group, staged, error))

        self.applier.stage(header.stage_id, delivery.table, done)

    def _forward(self, delivery: BulkReceived, header: StageHeader) -> _Forward | None:
        """Pass the rows on to the partition's other holders (the transport copies them
        before `send_bulk` returns); the ack to the sender waits for theirs."""
        targets = [node for node in header.forward_to if node != self.node]
        if not targets:
            return None
        group = _Forward(
            delivery.source,
            header,
            began_ns=self._clock.monotonic_ns(),
            quorum=write_quorum(len(targets) + 1),
        )
        for node in targets:
            request_id = next(self._fetch_ids)
            forwarded = StageHeader(request_id, header.stage_id, header.table, header.partition)
            try:
                self._transport.send_bulk(raft_id(node), forwarded, delivery.table)
            except TransportError:  # Backpressure included: that holder is not keeping up
                continue
            group.waiting[request_id] = node
            self._forwards[request_id] = group
        return group

    def tick(self) -> None:
        """Deadlines, retries and the occasional partition count; every wake-up."""
        self.applier.interrupt_overdue()
        now = self._clock.monotonic_ns()
        if self._parked:
            self._expire_parked(now)
        if self._opens:
            self._expire_opens(now)
        if self._outbox:
            self._flush_outbox(now)
        if self._forwards:
            self._expire_forwards(now)
        # Only after writes: the count runs on the apply lane, and every query's read
        # barrier advances done_index, so counting on that would delay the next barrier.
        changed = self.applier.changed_index != self._stats_index or self.applier.dirty
        if changed and now >= self._stats_due_ns and not self._stats_running:
            self._stats_due_ns = now + STATS_REFRESH_MS * NS_PER_MS
            self._stats_index = self.applier.changed_index
            self._refresh_partition_infos()
        if now >= self._collect_due_ns:
            self._collect_due_ns = now + STAGING_COLLECT_MS * NS_PER_MS
            self._collect_staging()

    def close(self) -> None:
        """Finish the lanes' work, run what they posted back, close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.applier.close()
        self.run_mailbox()
        self.store.close()
        self.mailbox.close()

    # ---- staging ----

    def _staged(
        self,
        delivery: BulkReceived,
        fetched: bool,
        group: _Forward | None,
        staged: StagedFile | None,
        error: str | None,
    ) -> None:
        delivery.release()
        header = delivery.header
        assert isinstance(header, StageHeader)
        if staged is None:
            self.stats.stage_failures += 1
            self._log.error("stage_failed", stage=header.stage_id, error=error)
        else:
            self.stats.staged += 1
        if fetched:
            return
        if group is None:
            self._reply(delivery.source, _ack(header, self.node, staged, error, ()))
            return
        group.local = (staged, error)
        now = self._clock.monotonic_ns()
        took = now - group.began_ns
        group.deadline_ns = now + max(FORWARD_WAIT_MS_MIN * NS_PER_MS, 2 * took)
        group.quorum_deadline_ns = now + max(QUORUM_GRACE_MS_MIN * NS_PER_MS, took // 2)
        self._finish_forward(group, now)

    def _on_forward_ack(self, ack: StageAck) -> None:
        group = self._forwards.pop(ack.request_id, None)
        if group is None:
            return
        node = group.waiting.pop(ack.request_id, None)
        if node is not None and ack.ok:
            group.acks.append((node, ack))
        self._finish_forward(group)

    def _finish_forward(self, group: _Forward, now: int | None = None) -> None:
        """Answer the sender once the local copy is done and every forward answered (or
        its time is up)."""
        if group.local is None or group.answered:
            return
        if group.waiting:
            if now is None:
                return
            stored = len(group.acks) + (group.local[0] is not None)
            quorum_met = stored >= group.quorum and now >= group.quorum_deadline_ns
            if not quorum_met and now < group.deadline_ns:
                return
        group.answered = True
        for request_id in group.waiting:
            self._forwards.pop(request_id, None)
        staged, error = group.local
        others = tuple(
            node
            for node, ack in group.acks
            if staged is not None and ack.crc == staged.crc and ack.rows == staged.rows
        )
        self._reply(group.source, _ack(group.header, self.node, staged, error, others))

    def _expire_forwards(self, now: int) -> None:
        for group in {id(g): g for g in self._forwards.values()}.values():
            self._finish_forward(group, now)

    def _send_fetch(self, table: str, batch: StagedBatch, attempt: int) -> None:
        others = [holder for holder in batch.holders if holder != self.node]
        if not others:
            return
        holder = others[attempt % len(others)]
        request_id = next(self._fetch_ids)
        self._fetching[request_id] = batch.stage_id
        request = FetchStage(
            request_id, batch.stage_id, table, batch.partition, batch.rows, batch.crc
        )
        try:
            self._transport.send(raft_id(holder), request)
            self.stats.fetches_sent += 1
        except TransportError:
            self._fetching.pop(request_id, None)

    def _on_fetch(self, source: int, request: FetchStage) -> None:
        def read() -> None:
            rows = self.staging.open(request.stage_id, request.crc, request.rows)
            self.mailbox.post(lambda: self._answer_fetch(source, request, rows))

        self.applier.run_on_stage_lane(read)

    def _answer_fetch(self, source: int, request: FetchStage, rows: pa.Table | None) -> None:
        if rows is None:
            self._reply(source, StageAck(request.request_id, request.stage_id, False))
            return
        header = StageHeader(request.request_id, request.stage_id, request.table, request.partition)
        self.stats.fetches_served += 1
        self._send_bulk(source, header, rows)

    def _send_partition_fetch(
        self, index: int, table: str, partition: int, holder: int, answer: PartitionAnswer
    ) -> None:
        request_id = next(self._fetch_ids)
        self._partition_fetches[request_id] = answer
        try:
            self._transport.send(raft_id(holder), ScanRequest(request_id, index, table, partition))
            self.stats.fetches_sent += 1
        except TransportError:
            self._partition_fetches.pop(request_id, None)
            answer.set(None)

    # ---- scans and fragments ----

    def _on_read(self, source: int, request: ReadRequest) -> None:
        if isinstance(request, ScanRequest):
            self.stats.scans += 1
        else:
            self.stats.fragments += 1
        if request.index > self.applier.done_index:
            deadline = self._clock.monotonic_ns() + SCAN_WAIT_MS * NS_PER_MS
            self._parked.append(_ParkedRead(source, request, deadline))
            return
        self._start_read(source, request)

    def _start_read(self, source: int, request: ReadRequest) -> None:
        started_ns = self._clock.monotonic_ns()

        def done(rows: pa.Table | None, index: int, failure: ReadFailure | None) -> None:
            elapsed_ns = self._clock.monotonic_ns() - started_ns
            self.mailbox.post(
                lambda: self._read_done(source, request, rows, index, failure, elapsed_ns)
            )

        if isinstance(request, ScanRequest):
            self.applier.scan(
                request.index, request.table, request.partition, request.columns, done
            )
        else:
            self.applier.fragment(
                request.index, request.sql, request.reads, done, request.inputs, request.explain
            )

    def _read_done(
        self,
        source: int,
        request: ReadRequest,
        rows: pa.Table | None,
        index: int,
        failure: ReadFailure | None,
        elapsed_ns: int = 0,
    ) -> None:
        if rows is None:
            self._refuse_read(source, request, failure or ReadFailure("read failed"))
            return
        header: msgspec.Struct
        if isinstance(request, ScanRequest):
            header = ScanHeader(request.request_id, request.table, request.partition, index)
        else:
            header = FragmentHeader(request.request_id, index, elapsed_ns // 1000)
        self._send_bulk(source, header, rows)

    def _refuse_read(self, source: int, request: ReadRequest, failure: ReadFailure) -> None:
        if isinstance(request, ScanRequest):
            self.stats.scan_refusals += 1
        else:
            self.stats.fragment_refusals += 1
        error = ScanError(
            request.request_id,
            failure.error,
            failure.retryable,
            failure.duckdb_error,
            failure.snapshot_missing,
        )
        self._reply(source, error)

    def _serve_parked(self, applied: int) -> None:
        if not self._parked:
            return
        ready = [parked for parked in self._parked if parked.request.index <= applied]
        if not ready:
            return
        self._parked = [parked for parked in self._parked if parked.request.index > applied]
        for parked in ready:
            self._start_read(parked.source, parked.request)

    def _expire_parked(self, now: int) -> None:
        expired = [parked for parked in self._parked if parked.deadline_ns <= now]
        if not expired:
            return
        self._parked = [parked for parked in self._parked if parked.deadline_ns > now]
        for parked in expired:
            why = f"node {self.node} has not applied index {parked.request.index} yet"
            self._refuse_read(parked.source, parked.request, ReadFailure(why))

    # ---- read points without a log entry ----

    def _on_open(self, source: int, request: OpenRead) -> None:
        if self._catching_up():
            self._refuse_open(source, request, "this node's store is catching up")
            return
        key = READ_INDEX_PREFIX + next(self._open_ids).to_bytes(8, "little")
        deadline = self._clock.monotonic_ns() + SCAN_WAIT_MS * NS_PER_MS
        parked = _ParkedOpen(source, request, deadline)
        if request.linearize:
            if self._read_index is None:
                self._refuse_open(source, request, "this node cannot ask for a read index")
                return
            try:
                self._read_index(key)
            except ProposalRefused as error:  # no leader known, or too many reads waiting
                self._refuse_open(source, request, f"no read index: {error}")
                return
        self._opens[key] = parked
        self.serve_opens()

    def on_read_states(self, read_states: Iterable[tuple[bytes, int]]) -> None:
        """(request id, index) of ReadIndex points Raft confirmed; others' are ignored."""
        for request_id, index in read_states:
            parked = self._opens.get(request_id)
            if parked is not None:
                parked.read_index = index

    def serve_opens(self) -> None:
        """Open for every parked `OpenRead` whose points the state machine has applied
        (the loop calls this after applying entries)."""
        if not self._opens:
            return
        applied = self._state().applied_index
        ready = [
            key
            for key, parked in self._opens.items()
            if parked.request.at_least <= applied
            and (parked.read_index > 0 or not parked.request.linearize)
            and parked.read_index <= applied
        ]
        for key in ready:
            parked = self._opens.pop(key)
            if self._catching_up():
                self._refuse_open(parked.source, parked.request, "this node's store is catching up")
                continue
            self._open(parked, applied)

    def _open(self, parked: _ParkedOpen, applied: int) -> None:
        request = parked.request

        def done(state_index: int, catalog_version: int, why: str | None) -> None:
            self.mailbox.post(lambda: answer(state_index, catalog_version, why))

        def answer(state_index: int, catalog_version: int, why: str | None) -> None:
            if why is not None:
                self._refuse_open(parked.source, request, why)
                return
            opened = ReadOpened(
                request.request_id, state_index, catalog_version, applied, parked.read_index
            )
            self._reply(parked.source, opened)

        self.applier.open_current(request.reader, done)

    def on_leadership_lost(self) -> None:
        """ReadIndex points asked of this node as leader and not yet confirmed never will
        be: refuse them now (the client reads at a log barrier instead)."""
        lost = [key for key, p in self._opens.items() if p.request.linearize and not p.read_index]
        for key in lost:
            parked = self._opens.pop(key)
            self._refuse_open(parked.source, parked.request, "leadership changed")

    def _expire_opens(self, now: int) -> None:
        expired = [key for key, parked in self._opens.items() if parked.deadline_ns <= now]
        for key in expired:
            parked = self._opens.pop(key)
            self._refuse_open(parked.source, parked.request, "no read point within the wait")

    def _refuse_open(self, source: int, request: OpenRead, why: str) -> None:
        self._reply(source, ScanError(request.request_id, f"node {self.node}: {why}"))

    # ---- catalog ----

    def _catalog_response(self, request_id: int) -> CatalogResponse:
        state = self._state()
        sql = state.sql
        return CatalogResponse(
            request_id,
            ok=True,
            index=state.applied_index,
            catalog_version=sql.catalog_version,
            catalog=sql.catalog.snapshot(),
            placements=tuple(sorted(sql.placements.items())),
            versions=tuple(sorted(sql.versions.items())),
            schema_versions=tuple(sorted(sql.schema_versions.items())),
            members=state.members(),
            table_rows=estimated_table_rows(self.partition_infos, sql.placements),
        )

    def _collect_staging(self) -> None:
        now_ns = self._clock.wall_ns()

        def collect() -> None:
            removed = self.staging.collect(STAGING_KEEP_MS * NS_PER_MS, now_ns)
            if removed:
                self.log_event("staging_collected", files=removed)

        self.applier.run_on_stage_lane(collect)

    # ---- partition counts for status ----

    def _refresh_partition_infos(self) -> None:
        self._stats_running = True
        placements = dict(self._state().sql.placements)

        def count() -> None:
            self.applier.maybe_checkpoint()
            try:
                stats = self.store.partition_stats()
            except Exception as error:  # noqa: BLE001 - status must not kill the worker
                self.log_event("partition_stats_failed", error=str(error))
                stats = []
            infos = tuple(
                PartitionInfo(
                    s.table,
                    s.partition,
                    s.rows,
                    s.bytes,
                    _is_primary(placements, s.table, s.partition, self.node),
                )
                for s in stats
            )
            self.mailbox.post(lambda: self._set_infos(infos))

        self.applier.run_on_apply_lane(count)

    def _set_infos(self, infos: tuple[PartitionInfo, ...]) -> None:
        self.partition_infos = infos
        self._stats_running = False

    # ---- sending ----

    def _send_bulk(self, target: int, header: msgspec.Struct, rows: pa.Table) -> None:
        deadline = self._clock.monotonic_ns() + OUTBOX_RETRY_MS * NS_PER_MS
        outgoing = _Outgoing(target, header, rows, deadline)
        if not self._try_send(outgoing):
            self._outbox.append(outgoing)

    def _try_send(self, outgoing: _Outgoing) -> bool:
        try:
            if outgoing.rows is None:
                self._transport.send(outgoing.target, outgoing.header)
            else:
                self._transport.send_bulk(outgoing.target, outgoing.header, outgoing.rows)
        except Backpressure:
            return False
        except TransportError:
            self.stats.replies_dropped += 1
        return True

    def _flush_outbox(self, now: int) -> None:
        waiting, self._outbox = self._outbox, []
        for outgoing in waiting:
            if self._try_send(outgoing):
                continue
            if outgoing.deadline_ns <= now:
                self.stats.replies_dropped += 1
                continue
            self._outbox.append(outgoing)


def estimated_table_rows(
    held: Iterable[PartitionInfo], placements: Mapping[str, tuple[tuple[int, ...], ...]]
) -> tuple[tuple[str, int], ...]:
    """(table key, estimated rows), by table key: the rows of the partitions of each table
    held here, scaled by (the table's partitions / partitions held), rounded to the nearest
    row. A reference table has one partition, so its estimate is its count. Tables held
    nothing of, partitions the placements no longer have (a table dropped or re-created
    since the counts were taken) and repeated partitions are left out."""
    rows_of: dict[str, dict[int, int]] = {}
    for info in held:
        holders = placements.get(info.table)
        if holders is not None and 0 <= info.partition < len(holders):
            rows_of.setdefault(info.table, {})[info.partition] = info.rows
    estimates = []
    for table, rows_by_partition in sorted(rows_of.items()):
        partitions = len(placements[table])
        counted = len(rows_by_partition)
        rows = sum(rows_by_partition.values())
        estimates.append((table, (rows * partitions + counted // 2) // counted))
    return tuple(estimates)


def _is_primary(
    placements: dict[str, tuple[tuple[int, ...], ...]], table: str, partition: int, node: int
) -> bool:
    holders = placements.get(table)
    if holders is None or partition >= len(holders):
        return False
    return holders[partition][0] == node
