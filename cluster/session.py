"""The real `query.port.ClusterPort`: the coordinator's primitives over a `cluster.client`
transport session.

One `TransportPort` per client session. It keeps the catalog it last fetched (and refetches
when a barrier or commit shows a newer one), sends the log commands through the leader
(following leader hints, retrying with the same request id so a command applies once),
stages rows on every holder of a partition in parallel, and reads — partitions (`scan`)
and fragments, the coordinator's SELECTs over physical partition tables and named Arrow
inputs (`fragments`; each input encoded once, whatever the holders and resends) — from
one holder each, all in flight together, moving to the next holder when one fails
or is slow (one loop, `_HedgedReads`, serves both).

Guarantees: `stage` returns only batches that a write quorum of holders acknowledged
durably; `commit` returns only after the leader applied the command; scan and fragment
results at a barrier all come from snapshots taken at that barrier, and stay valid until
`release(index)`. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from cluster.client import (
    OPERATION_TIMEOUT_MS,
    Client,
    ClientError,
    _backoff_ms,
)
from cluster.protocol import node_of, raft_id
from cluster.sql_protocol import (
    CatalogRequest,
    CatalogResponse,
    CommandKind,
    FragmentHeader,
    FragmentInputError,
    FragmentRequest,
    OpenRead,
    ReadOpened,
    ReleaseRead,
    ScanError,
    ScanHeader,
    ScanRequest,
    SqlCommand,
    SqlRequest,
    SqlResponse,
    StageAck,
    StagedBatch,
    StageHeader,
    check_fragment_inputs,
    encode_command,
    encode_fragment_input,
)
from ipc.errors import Backpressure, TransportError
from ipc.transport import BulkReceived, Received
from query.port import (
    Barrier,
    CatalogChanged,
    CatalogView,
    Command,
    CommandRefused,
    Committed,
    Conflict,
    Fragment,
    FragmentFailed,
    FragmentResult,
    SnapshotMissing,
    Unavailable,
    WriteRefused,
    estimated_rows,
    write_quorum,
)
from storage.catalog import Catalog

STAGE_TIMEOUT_MS = 30_000
"""How long holders have to write and fsync one staged batch (the second round)."""
STAGE_FIRST_ROUND_MS = 500
STAGE_MS_PER_MIB = 20
"""The first round (first holder stores and forwards) waits STAGE_FIRST_ROUND_MS plus this
per MiB of the largest batch before sending to the holders that have not answered."""
SCAN_TIMEOUT_MS = 3_000
"""How long one holder has to answer one read (a partition scan, a fragment) before it is
asked again; the whole read gives up after SCAN_ROUNDS_MAX times this."""
SCAN_HEDGE_MS = 400
"""A read not answered this long is asked of its next holder too."""
SCAN_ROUNDS_MAX = 3
"""Passes over a read's holders before the read gives up."""
COMMIT_HEDGE_MS = 500
"""How long a node may stay silent about a command before the next node is asked too
(same request id: the command still applies at most once)."""
CATALOG_MAX_AGE_MS = 1_000
"""A catalog view fetched longer ago is fetched again when next asked for: which holder
of a partition is primary may have moved (a failure) without a write of this session.
Within it a session plans against one view (query.coordinator remembers plans per view);
a barrier's catalog version still refuses a view whose tables changed."""
CATALOG_HEDGE_MS = 300
OPEN_READ_WAIT_MS = 100
"""How long `open_read` waits for a linearized answer before it takes a log barrier."""
OPEN_READ_GRACE_MS = 5
"""Once the linearized answer is in, how long the other nodes' answers are waited for."""
OPEN_READ_BACKOFF_MS = 1_000
"""After a read point could not be opened (writes moving the state, a node refusing), the
session reads at log barriers this long."""
EARLY_MESSAGES_MAX = 4_096
"""Control messages `_send_bulk` keeps while it waits out backpressure (a stage's acks:
one per holder of each batch sent before); later ones are dropped."""
NS_PER_MS = 1_000_000


@dataclass(eq=False)
class _HedgedRead:
    """One read asked of its holders in turn (primary first) until one answers with rows."""

    holders: tuple[int, ...]
    request: ScanRequest | FragmentRequest
    """Sent with a fresh request id each time."""
    sends: int = 0
    turn: int = 0
    """Position in `holders` of the next holder to ask."""
    asked_ns: int = 0
    in_flight: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Request id -> (holder, when sent), for requests not answered yet."""
    rows: pa.Table | None = None
    node: int = -1
    """The holder whose rows these are."""
    elapsed_us: int = 0
    """How long the fragment took on that holder (`FragmentHeader.elapsed_us`)."""
    error: str | None = None
    """The last retryable error (or unreachable holder)."""
    refusal: ScanError | None = None
    """A holder refused it for good (not retryable): every holder would."""
    gave_up: bool = False
    snapshot_missing: bool = False
    """A holder had no snapshot at the read's index (`ScanError.snapshot_missing`)."""

    @property
    def finished(self) -> bool:
        return self.rows is not None or self.refusal is not None or self.gave_up

    def why(self) -> str:
        if self.refusal is not None:
            return self.refusal.error
        return self.error or "no answer"


class TransportPort:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._clock = client._clock
        self._rng = random.Random()
        self._ids = itertools.count(client._clock.wall_ns())
        self._view: CatalogView | None = None
        self._catalog_bytes = b""
        """The snapshot `_view.catalog` was restored from."""
        self._known_index = 0
        """The highest log index this session has seen applied (commit or barrier)."""
        self._view_fetched_ns = 0
        self._held: dict[int, list[BulkReceived]] = {}
        """Barrier index -> scan deliveries whose memory the coordinator may still read."""
        self._readers: dict[int, int] = {}
        """State index of an open read point -> the reader id its snapshots are held for."""
        self._open_read_after_ns = 0
        """After a read point could not be opened, log barriers until then."""
        self._silent: set[int] = set()
        """Nodes that did not answer the last `open_read` in time: not waited for."""
        self.reads_opened = 0
        """Read points `open_read` opened without a log entry."""
        self.reads_not_opened = 0
        """`open_read` calls that tried and gave up (the caller took a log barrier)."""
        self._early: list[Received] = []
        """Control messages that arrived while `_send_bulk` waited out backpressure (the
        acks of stages sent just before): the next `_receive` hands them to its `take`."""

    # ---- catalog ----

    def catalog(self, refresh: bool = False) -> CatalogView:
        view = self._view
        now_ns = self._clock.monotonic_ns()
        if (
            view is not None
            and not refresh
            and view.index >= self._known_index
            and now_ns - self._view_fetched_ns < CATALOG_MAX_AGE_MS * NS_PER_MS
        ):
            return view
        response = self._fetch_catalog()
        self._view_fetched_ns = now_ns
        # The replaced view is not closed here: a statement in progress may still bind
        # against it; its DuckDB closes when the last reference goes. An unchanged catalog
        # keeps its DuckDB (restoring one costs ~25 ms); versions and placements are new.
        same = view is not None and response.catalog == self._catalog_bytes
        self._view = _catalog_view(response, view.catalog if same and view else None)
        self._catalog_bytes = response.catalog
        return self._view

    def _fetch_catalog(self) -> CatalogResponse:
        """From the leader if known, else any node — whose catalog is at least as new as
        what this session has seen applied. A node silent for CATALOG_HEDGE_MS is hedged:
        the next one is asked too."""
        deadline_ns = self._clock.monotonic_ns() + OPERATION_TIMEOUT_MS * NS_PER_MS
        nodes = self._nodes_leader_first()
        request = CatalogRequest(next(self._ids), self.client._reply_address)
        found: list[CatalogResponse] = []

        def take(delivery: Any) -> bool:
            if isinstance(delivery, Received) and isinstance(delivery.message, CatalogResponse):
                answer = delivery.message
                if answer.request_id == request.request_id and answer.ok:
                    if answer.index >= self._known_index:
                        found.append(answer)
                        return True
            return False

        for attempt in itertools.count():
            if self._clock.monotonic_ns() >= deadline_ns:
                break
            self.client._send(nodes[attempt % len(nodes)], request)
            self._receive(take, CATALOG_HEDGE_MS)
            if found:
                return found[0]
            if attempt >= len(nodes):
                time.sleep(_backoff_ms(attempt, self._rng) / 1000)
        raise Unavailable(f"no worker served the catalog within {OPERATION_TIMEOUT_MS} ms")

    # ---- log commands ----

    def barrier(self) -> Barrier:
        # A barrier changes no catalog: the session's catalog view stays usable (the
        # coordinator compares the barrier's catalog version with the view's).
        response = self._append(Command(CommandKind.BARRIER), seen=False)
        return Barrier(response.index, dict(response.versions), response.catalog_version)

    def open_read(self) -> Barrier | None:
        """A strong read point without a log entry, or None (nothing held): then use
        `barrier()`.

        Every node is asked to open the snapshot of its current state once it has applied
        what this session has seen, the leader (every node, when no leader is known) once
        it has also applied a ReadIndex point: the state it names then holds every write
        acknowledged before this call. A node's snapshot at state index s holds exactly
        the writes and DDL up to s (see `cluster.sql_protocol.OpenRead`), so reads at s are
        one snapshot of the cluster wherever they run. The point is the linearized
        answer's s; the nodes that answered must all name it (a node that named another
        could not serve s; a node that did not answer within OPEN_READ_GRACE_MS is not
        waited for, nor next time until it answers: it has no snapshot at s, or the same
        state). Otherwise, or without a
        linearized answer within OPEN_READ_WAIT_MS, the holds are released and the
        session uses log barriers for OPEN_READ_BACKOFF_MS (writes are in flight)."""
        client = self.client
        began_ns = self._clock.monotonic_ns()
        if began_ns < self._open_read_after_ns:
            return None
        reader = self._rng.getrandbits(62) + 1
        leader = client._leader
        asked: dict[int, tuple[int, bool]] = {}
        """Request id -> (node, linearize)."""
        for node in client.nodes:
            linearize = leader is None or node == leader
            request_id = next(self._ids)
            request = OpenRead(
                request_id, reader, self._known_index, linearize, client._reply_address
            )
            try:
                client._transport.send(raft_id(node), request)
            except TransportError:
                continue
            asked[request_id] = (node, linearize)
        opened: dict[int, ReadOpened] = {}
        """Node -> its answer."""
        refused = False

        def done() -> bool:
            linearized = any(answer.read_index > 0 for answer in opened.values())
            waiting = any(node not in self._silent for node, _ in asked.values())
            return refused or (linearized and not waiting)

        def take(delivery: Any) -> bool:
            nonlocal refused
            if isinstance(delivery, Received):
                message = delivery.message
                if isinstance(message, ReadOpened | ScanError) and message.request_id in asked:
                    node, _ = asked.pop(message.request_id)
                    if isinstance(message, ReadOpened):
                        opened[node] = message
                    else:
                        refused = True
            return done()

        wait_ms = OPEN_READ_WAIT_MS
        while True:
            self._receive(take, wait_ms)
            linearized = next((a for a in opened.values() if a.read_index > 0), None)
            waited_ms = (self._clock.monotonic_ns() - began_ns) // NS_PER_MS
            if done() or waited_ms >= OPEN_READ_WAIT_MS:
                break
            if linearized is not None and waited_ms >= OPEN_READ_GRACE_MS:
                break
            wait_ms = max(1, (OPEN_READ_GRACE_MS if linearized else OPEN_READ_WAIT_MS) - waited_ms)
        # A node that did not answer in time is not waited for next time (it is dead,
        # paused or slow: a read it cannot serve is hedged), until it answers again.
        self._silent = (self._silent - set(opened)) | {node for node, _ in asked.values()}
        points = {(a.state_index, a.catalog_version) for a in opened.values()}
        if refused or linearized is None or len(points) != 1:
            for node, answer in opened.items():
                self._send_release(node, answer.state_index, reader)
            self._open_read_after_ns = self._clock.monotonic_ns() + OPEN_READ_BACKOFF_MS * NS_PER_MS
            self.reads_not_opened += 1
            return None
        self.reads_opened += 1
        self._readers[linearized.state_index] = reader
        return Barrier(linearized.state_index, {}, linearized.catalog_version)

    def commit(self, command: Command) -> Committed:
        response = self._append(command)
        return Committed(response.index, response.catalog_version, dict(response.versions))

    def _append(self, command: Command, seen: bool = True) -> SqlResponse:
        """Commit `command` through the log; `seen`: the session's next catalog view must
        be at least as new as its index (a write or DDL it must read back)."""
        client = self.client
        request_id = next(client._request_ids)
        encoded = encode_command(
            SqlCommand(
                client_id=client.client_id,
                request_id=request_id,
                kind=command.kind,
                ddl=command.ddl,
                writes=command.writes,
                expected_versions=command.expected_versions,
                expected_schemas=command.expected_schemas,
                text=command.text,
            )
        )
        request = SqlRequest(request_id, encoded, client._reply_address)
        response = self._until_applied(request)
        if seen:
            self._known_index = max(self._known_index, response.index)
        if response.ok:
            return response
        message = response.error or "refused"
        if response.error_kind == "conflict":
            raise Conflict(message)
        if response.error_kind == "catalog":
            raise CatalogChanged(message)
        raise CommandRefused(message)

    def _until_applied(self, request: SqlRequest) -> SqlResponse:
        """Send to the leader until some node answers with an outcome (ok or a refusal the
        log decided); the same request id every time, so it applies at most once. A node
        that stays silent for COMMIT_HEDGE_MS (dead, paused, or an old leader) is hedged:
        the next node is asked too, and whichever answers first counts."""
        client = self.client
        deadline_ns = self._clock.monotonic_ns() + OPERATION_TIMEOUT_MS * NS_PER_MS
        target = client._leader if client._leader is not None else client.nodes[0]
        last_error = "no answer"
        answers: list[tuple[int, SqlResponse]] = []

        def take(delivery: Any) -> bool:
            if isinstance(delivery, Received) and isinstance(delivery.message, SqlResponse):
                if delivery.message.request_id == request.request_id:
                    answers.append((node_of(delivery.source), delivery.message))
                    return True
            return False

        client._send(target, request)
        for attempt in itertools.count():
            if self._clock.monotonic_ns() >= deadline_ns:
                break
            answers.clear()
            self._receive(take, COMMIT_HEDGE_MS)
            if not answers:  # silent: ask the next node too (the first may still answer)
                last_error = f"node {target}: no answer"
                client._leader = None
                target = client.nodes[(client.nodes.index(target) + 1) % len(client.nodes)]
                client._send(target, request)
                continue
            source, answer = answers[0]
            if answer.ok or answer.error_kind is not None:
                client._leader = source
                return answer
            if not answer.retryable and answer.leader_hint is None:
                raise CommandRefused(f"node {source}: {answer.error}")
            last_error = f"node {source}: {answer.error}"
            hint = answer.leader_hint
            if hint is not None and hint != source and client.learn(hint):
                target = hint
            else:
                client._leader = None
                target = client.nodes[(client.nodes.index(source) + 1) % len(client.nodes)]
                time.sleep(_backoff_ms(attempt, self._rng) / 1000)
            client._send(target, request)
        raise Unavailable(
            f"the cluster did not apply the command within {OPERATION_TIMEOUT_MS} ms "
            f"({last_error}); it may or may not have been applied"
        )

    # ---- staging ----

    def stage(
        self,
        table: str,
        rows_by_partition: Mapping[int, pa.Table],
        delete: bool = False,
        placement: tuple[tuple[int, ...], ...] | None = None,
    ) -> list[StagedBatch]:
        holders_of = placement if placement is not None else self.catalog().placements.get(table)
        if holders_of is None:
            raise CommandRefused(f"no placement known for table {table}")
        # Round one: each partition's rows go once, to its first holder, which stores them
        # and passes them on to the others (so the client ships every row once). Round two,
        # for partitions still short of a quorum when round one's time is up (a paused or
        # dead first holder): straight to each holder that has not answered.
        acks: dict[int, dict[int, StageAck]] = {p: {} for p in rows_by_partition}
        stage_ids = {p: f"{self.client.client_id}-{next(self._ids)}" for p in rows_by_partition}
        pending: dict[int, int] = {}
        """request id -> partition, across both rounds (a late answer still counts)."""
        first_round = []
        for partition in sorted(rows_by_partition):
            first, *rest = holders_of[partition]
            first_round.append((partition, first, tuple(rest)))
        largest = max((rows.nbytes for rows in rows_by_partition.values()), default=0)
        first_wait_ms = STAGE_FIRST_ROUND_MS + largest * STAGE_MS_PER_MIB // (1 << 20)
        self._stage_round(table, rows_by_partition, stage_ids, first_round, pending)
        self._await_stages(holders_of, stage_ids, acks, pending, first_wait_ms, all_holders=True)
        short = [
            (partition, holder, ())
            for partition in sorted(rows_by_partition)
            if len(acks[partition]) < write_quorum(len(holders_of[partition]))
            for holder in holders_of[partition]
            if holder not in acks[partition]
        ]
        if short:
            self._stage_round(table, rows_by_partition, stage_ids, short, pending)
            self._await_stages(
                holders_of, stage_ids, acks, pending, STAGE_TIMEOUT_MS, all_holders=False
            )
        batches = []
        for partition, rows in sorted(rows_by_partition.items()):
            batches.append(self._batch(table, partition, rows, holders_of, acks, delete))
        return batches

    def _stage_round(
        self,
        table: str,
        rows_by_partition: Mapping[int, pa.Table],
        stage_ids: dict[int, str],
        sends: Sequence[tuple[int, int, tuple[int, ...]]],
        pending: dict[int, int],
    ) -> None:
        """Send (partition, holder, forward_to) transfers, all in flight together."""
        for partition, holder, forward_to in sends:
            request_id = next(self._ids)
            header = StageHeader(
                request_id,
                stage_ids[partition],
                table,
                partition,
                self.client._reply_address,
                forward_to,
            )
            if self._send_bulk(holder, header, rows_by_partition[partition]):
                pending[request_id] = partition

    def _await_stages(
        self,
        holders_of: tuple[tuple[int, ...], ...],
        stage_ids: dict[int, str],
        acks: dict[int, dict[int, StageAck]],
        pending: dict[int, int],
        timeout_ms: int,
        all_holders: bool,
    ) -> None:
        """Record every holder each answer says stored the rows, until every partition has
        all its holders (`all_holders`) or a quorum, nothing is pending, or time is up."""

        def enough(partition: int) -> bool:
            holders = holders_of[partition]
            needed = len(holders) if all_holders else write_quorum(len(holders))
            return len(acks[partition]) >= needed

        def take(delivery: Any) -> bool:
            if isinstance(delivery, Received) and isinstance(delivery.message, StageAck):
                ack = delivery.message
                partition = pending.pop(ack.request_id, None)
                if partition is not None and ack.ok and ack.stage_id == stage_ids[partition]:
                    for node in ack.holders:
                        acks[partition][node] = ack
            return not pending or all(enough(partition) for partition in acks)

        if pending and not all(enough(partition) for partition in acks):
            self._receive(take, timeout_ms)

    def _batch(
        self,
        table: str,
        partition: int,
        rows: pa.Table,
        holders_of: tuple[tuple[int, ...], ...],
        acks: dict[int, dict[int, StageAck]],
        delete: bool,
    ) -> StagedBatch:
        holders = holders_of[partition]
        acked = acks[partition]
        needed = write_quorum(len(holders))
        if len(acked) < needed:
            down = sorted(set(holders) - set(acked))
            raise WriteRefused(
                f"partition {partition} of {table}: {len(acked)} of {len(holders)} holders "
                f"stored the rows, {needed} needed (no answer from node(s) "
                f"{', '.join(map(str, down))}); nothing was written"
            )
        crcs = {ack.crc for ack in acked.values()}
        counts = {ack.rows for ack in acked.values()}
        if len(crcs) != 1 or counts != {rows.num_rows}:
            raise WriteRefused(
                f"partition {partition} of {table}: holders stored different bytes; "
                "nothing was written"
            )
        first = next(iter(acked.values()))
        return StagedBatch(
            first.stage_id, partition, rows.num_rows, first.crc, tuple(sorted(acked)), delete
        )

    # ---- scans ----

    def scan(
        self,
        index: int,
        table: str,
        partitions: Sequence[int],
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        holders_of = self.catalog().placements.get(table)
        if holders_of is None:
            raise CommandRefused(f"no placement known for table {table}")
        wanted = tuple(columns) if columns is not None else None
        reply = self.client._reply_address
        reads = {
            partition: _HedgedRead(
                holders_of[partition], ScanRequest(0, index, table, partition, wanted, reply)
            )
            for partition in partitions
        }
        _HedgedReads(self, index, list(reads.values())).run()
        missing = sorted(p for p, read in reads.items() if read.rows is None)
        if missing:
            detail = "; ".join(f"partition {p}: {reads[p].why()}" for p in missing)
            failure = _unanswered([reads[p] for p in missing])
            raise failure(f"could not read {table} at index {index}: {detail}")
        tables = [reads[p].rows for p in partitions]
        if not tables:
            raise CommandRefused(f"no partitions of {table} were asked for")
        return pa.concat_tables(tables)

    def fragments(self, index: int, fragments: Sequence[Fragment]) -> list[FragmentResult]:
        return self._run_fragments(index, fragments, False)

    def estimates(self, index: int, fragments: Sequence[Fragment]) -> list[int | None]:
        explained = self._run_fragments(index, fragments, True)
        return [estimated_rows(result.rows) for result in explained]

    def _run_fragments(
        self, index: int, fragments: Sequence[Fragment], explain: bool
    ) -> list[FragmentResult]:
        reply = self.client._reply_address
        reads = []
        # id(table) -> its IPC stream: an input shared by several fragments (the same keys
        # sent with every partition's scan) is encoded once; every holder asked and every
        # resend reuses the request's bytes.
        encoded: dict[int, bytes] = {}
        for fragment in fragments:
            assert fragment.holders, f"a fragment without holders: {fragment.sql}"
            inputs = _encoded_inputs(fragment, encoded)
            request = FragmentRequest(
                0, index, fragment.sql, tuple(fragment.reads), reply, inputs, explain
            )
            reads.append(_HedgedRead(tuple(fragment.holders), request))
        _HedgedReads(self, index, reads).run()
        for read in reads:
            if read.refusal is not None:
                raise FragmentFailed(read.refusal.error, read.refusal.duckdb_error)
        missing = [number for number, read in enumerate(reads) if read.rows is None]
        if missing:
            detail = "; ".join(f"fragment {n}: {reads[n].why()}" for n in missing)
            failure = _unanswered([reads[n] for n in missing])
            raise failure(
                f"{len(missing)} of {len(reads)} fragments at index {index} got no answer: {detail}"
            )
        results = []
        for read in reads:
            assert read.rows is not None
            results.append(FragmentResult(read.rows, read.node, read.elapsed_us))
        return results

    def release(self, index: int) -> None:
        for delivery in self._held.pop(index, []):
            delivery.release()
        if index > 0:
            reader = self._readers.pop(index, 0)
            for node in self.client.nodes:
                self._send_release(node, index, reader)

    def _send_release(self, node: int, index: int, reader: int) -> None:
        try:
            self.client._transport.send(raft_id(node), ReleaseRead(index, reader))
        except TransportError:
            pass  # its snapshots expire

    def close(self) -> None:
        for index in list(self._held):
            self.release(index)
        if self._view is not None:
            self._view.catalog.close()
            self._view = None
        self.client.close()

    # ---- transport ----

    def _nodes_leader_first(self) -> list[int]:
        nodes = list(self.client.nodes)
        leader = self.client._leader
        if leader in nodes:
            nodes.remove(leader)
            nodes.insert(0, leader)
        return nodes

    def _send_bulk(self, node: int, header: msgspec.Struct, rows: pa.Table) -> bool:
        """Send, waiting out backpressure (polling moves the transport's queues on) for up
        to STAGE_TIMEOUT_MS. Control messages that arrive meanwhile — acks of the stages
        sent just before this one — are kept for the next `_receive`, not dropped."""
        transport = self.client._transport
        deadline_ns = self._clock.monotonic_ns() + STAGE_TIMEOUT_MS * NS_PER_MS
        arrived: list[Received] = []

        def keep(delivery: Any) -> bool:
            if isinstance(delivery, Received) and len(arrived) < EARLY_MESSAGES_MAX:
                arrived.append(delivery)
            return False

        try:
            while True:
                try:
                    transport.send_bulk(raft_id(node), header, rows)
                    return True
                except Backpressure:
                    if self._clock.monotonic_ns() >= deadline_ns:
                        return False
                    self._receive(keep, 5)  # hands over what was kept before, too
                except TransportError:
                    return False
        finally:
            self._early.extend(arrived)

    def _receive(self, take: Callable[[Any], bool], timeout_ms: int) -> None:
        """Poll until `take` says it has what it wanted or `timeout_ms` passes; first, hand
        it what `_send_bulk` kept. Bulk data `take` does not keep is released — also what
        arrived in the same poll after `take` was done: every request id is one call's own,
        so no later call wants it."""
        client = self.client
        transport = client._transport
        deadline_ns = self._clock.monotonic_ns() + timeout_ms * NS_PER_MS
        done = False
        early, self._early = self._early, []
        for message in early:
            done = done or take(message)
        while True:
            for delivery in transport.poll():
                kept_before = _held_count(self._held)
                done = done or take(delivery)
                if isinstance(delivery, BulkReceived) and _held_count(self._held) == kept_before:
                    delivery.release()
            if done:
                return
            now = self._clock.monotonic_ns()
            if now >= deadline_ns:
                return
            wait_ns = deadline_ns - now
            transport_ns = transport.next_timeout_ns()
            if transport_ns is not None:
                wait_ns = min(wait_ns, transport_ns)
            client._selector.select(wait_ns / 1e9)


class _HedgedReads:
    """One round of reads in flight together (`TransportPort.scan` and `.fragments`).

    A read not answered for SCAN_HEDGE_MS is asked of its next holder too, and the first
    answer wins: a holder that is slow, paused or dead (a dead one's frames wait for its
    next incarnation) is not waited out. A retryable error or an unreachable holder moves
    the read on at once. A holder is asked the same read again only once its last request
    is SCAN_TIMEOUT_MS old (so a slow fragment is not queued up on it again and again);
    after SCAN_ROUNDS_MAX passes over its holders a read gives up. `run` returns when
    every read has rows or gave up, when one is refused for good (the caller fails), or
    after SCAN_TIMEOUT_MS × SCAN_ROUNDS_MAX in all. Rows kept are held in the port until
    `release(index)`; answers that come too late are released by the port's `_receive`."""

    def __init__(self, port: TransportPort, index: int, reads: Sequence[_HedgedRead]) -> None:
        self.port = port
        self.index = index
        self.reads = reads
        self.pending: dict[int, _HedgedRead] = {}
        """Request id -> its read, for every request not answered yet."""

    def run(self) -> None:
        clock = self.port._clock
        for read in self.reads:
            self.move_on(read)
        deadline_ns = clock.monotonic_ns() + SCAN_TIMEOUT_MS * NS_PER_MS * SCAN_ROUNDS_MAX
        while not self.settled():
            if clock.monotonic_ns() >= deadline_ns:
                return
            self.port._receive(self.take, SCAN_HEDGE_MS)
            now = clock.monotonic_ns()
            for read in self.reads:
                if not read.finished and now - read.asked_ns >= SCAN_HEDGE_MS * NS_PER_MS:
                    self.move_on(read)

    def settled(self) -> bool:
        reads = self.reads
        return all(read.finished for read in reads) or any(r.refusal is not None for r in reads)

    def move_on(self, read: _HedgedRead) -> None:
        """Ask the next holder; give up when there is none and nothing is in flight."""
        if not self.ask(read, self.port._clock.monotonic_ns()) and not read.in_flight:
            read.gave_up = True

    def ask(self, read: _HedgedRead, now: int) -> bool:
        """Send to the next holder in turn (primary first) that has no fresh request of
        this read; False if there is none or the read has used its rounds."""
        holders = read.holders
        for _ in holders:
            if read.sends >= len(holders) * SCAN_ROUNDS_MAX:
                return False
            holder = holders[read.turn % len(holders)]
            read.turn += 1
            if any(
                node == holder and now - sent_ns < SCAN_TIMEOUT_MS * NS_PER_MS
                for node, sent_ns in read.in_flight.values()
            ):
                continue
            read.sends += 1
            request_id = next(self.port._ids)
            request = msgspec.structs.replace(read.request, request_id=request_id)
            if self.port.client._send(holder, request):
                self.pending[request_id] = read
                read.in_flight[request_id] = (holder, now)
                read.asked_ns = now
                return True
            read.error = f"node {holder} could not be reached"
        return False

    def take(self, delivery: Any) -> bool:
        if isinstance(delivery, BulkReceived) and isinstance(
            delivery.header, ScanHeader | FragmentHeader
        ):
            read = self.pending.pop(delivery.header.request_id, None)
            if read is not None:
                read.in_flight.pop(delivery.header.request_id, None)
                if not read.finished:
                    self.port._held.setdefault(self.index, []).append(delivery)
                    read.rows = delivery.table
                    read.node = node_of(delivery.source)
                    if isinstance(delivery.header, FragmentHeader):
                        read.elapsed_us = delivery.header.elapsed_us
        elif isinstance(delivery, Received) and isinstance(delivery.message, ScanError):
            error = delivery.message
            read = self.pending.pop(error.request_id, None)
            if read is not None:
                holder, _ = read.in_flight.pop(error.request_id)
                if read.finished:
                    pass
                elif not error.retryable:
                    read.refusal = error
                else:
                    read.error = f"node {holder}: {error.error}"
                    read.snapshot_missing = read.snapshot_missing or error.snapshot_missing
                    self.move_on(read)
        return self.settled()


def _unanswered(reads: Sequence[_HedgedRead]) -> type[Unavailable]:
    """What reads that got no rows fail with: SnapshotMissing when a holder of each had
    no snapshot at the read point (a new point may serve them), else Unavailable."""
    return SnapshotMissing if all(read.snapshot_missing for read in reads) else Unavailable


def _held_count(held: dict[int, list[BulkReceived]]) -> int:
    return sum(len(deliveries) for deliveries in held.values())


def _encoded_inputs(fragment: Fragment, encoded: dict[int, bytes]) -> tuple[tuple[str, bytes], ...]:
    """The fragment's inputs as Arrow IPC streams (each table encoded once per `encoded`,
    whose tables outlive it); inputs every worker would refuse (a bad or repeated name,
    too many bytes) fail here, before anything is sent."""
    inputs = []
    for name, rows in fragment.inputs:
        data = encoded.get(id(rows))
        if data is None:
            data = encoded[id(rows)] = encode_fragment_input(rows)
        inputs.append((name, data))
    try:
        check_fragment_inputs(inputs)
    except FragmentInputError as error:
        raise FragmentFailed(str(error), "") from error
    return tuple(inputs)


def _catalog_view(response: CatalogResponse, catalog: Catalog | None) -> CatalogView:
    return CatalogView(
        index=response.index,
        catalog_version=response.catalog_version,
        catalog=Catalog.restore(response.catalog) if catalog is None else catalog,
        placements={key: tuple(map(tuple, holders)) for key, holders in response.placements},
        versions=dict(response.versions),
        schema_versions=dict(response.schema_versions),
        members=tuple(response.members),
        table_rows=dict(response.table_rows),
    )


def open_port(target: str | Path, *, data_dir: Path | None = None) -> TransportPort:
    """A port to the cluster named `target` (or whose run directory is the Path `target`)."""
    try:
        client = Client(target, data_dir=data_dir)
    except ClientError as error:
        raise Unavailable(str(error)) from error
    return TransportPort(client)


__all__ = ["TransportPort", "open_port", "node_of"]
