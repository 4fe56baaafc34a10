"""The real `query.port.ClusterPort`: the coordinator's primitives over a `cluster.client`
transport session.

One `TransportPort` per client session. It keeps the catalog it last fetched (and refetches
when a barrier or commit shows a newer one), sends the log commands through the leader
(following leader hints, retrying with the same request id so a command applies once),
stages rows on every holder of a partition in parallel, and reads partitions from one
holder each, moving to the next holder when one fails or is slow.

Guarantees: `stage` returns only batches that a write quorum of holders acknowledged
durably; `commit` returns only after the leader applied the command; scan results at a
barrier all come from snapshots taken at that barrier. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
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
    encode_command,
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
    Unavailable,
    WriteRefused,
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
SCAN_HEDGE_MS = 400
"""A partition not answered this long is asked of its next holder too."""
"""How long one holder has to answer one partition scan before the next is asked."""
SCAN_ROUNDS_MAX = 3
"""Passes over a partition's holders before the scan gives up."""
COMMIT_HEDGE_MS = 500
"""How long a node may stay silent about a command before the next node is asked too
(same request id: the command still applies at most once)."""
CATALOG_HEDGE_MS = 300
NS_PER_MS = 1_000_000


class TransportPort:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._clock = client._clock
        self._rng = random.Random()
        self._ids = itertools.count(client._clock.wall_ns())
        self._view: CatalogView | None = None
        self._known_index = 0
        """The highest log index this session has seen applied (commit or barrier)."""
        self._held: dict[int, list[BulkReceived]] = {}
        """Barrier index -> scan deliveries whose memory the coordinator may still read."""

    # ---- catalog ----

    def catalog(self, refresh: bool = False) -> CatalogView:
        view = self._view
        if view is not None and not refresh and view.index >= self._known_index:
            return view
        response = self._fetch_catalog()
        # The replaced view is not closed here: a statement in progress may still bind
        # against it; its DuckDB closes when the last reference goes.
        self._view = _catalog_view(response)
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
        response = self._append(Command(CommandKind.BARRIER))
        return Barrier(response.index, dict(response.versions), response.catalog_version)

    def commit(self, command: Command) -> Committed:
        response = self._append(command)
        return Committed(response.index, response.catalog_version, dict(response.versions))

    def _append(self, command: Command) -> SqlResponse:
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
        results: dict[int, pa.Table] = {}
        tries = {p: 0 for p in partitions}
        errors: dict[int, str] = {}
        pending: dict[int, int] = {}
        """request id -> partition; several per partition once a slow holder is hedged."""
        asked_ns: dict[int, int] = {}

        def ask(partition: int) -> bool:
            """Ask the partition's next holder (primary first); False when every holder has
            been asked SCAN_ROUNDS_MAX times."""
            holders = holders_of[partition]
            while tries[partition] < len(holders) * SCAN_ROUNDS_MAX:
                holder = holders[tries[partition] % len(holders)]
                tries[partition] += 1
                request_id = next(self._ids)
                request = ScanRequest(
                    request_id, index, table, partition, wanted, self.client._reply_address
                )
                if self.client._send(holder, request):
                    pending[request_id] = partition
                    asked_ns[partition] = self._clock.monotonic_ns()
                    return True
            return False

        for partition in partitions:
            if not ask(partition):
                errors[partition] = "no holder could be reached"

        def take(delivery: Any) -> bool:
            if isinstance(delivery, BulkReceived) and isinstance(delivery.header, ScanHeader):
                partition = pending.pop(delivery.header.request_id, None)
                if partition is not None and partition not in results:
                    self._held.setdefault(index, []).append(delivery)
                    results[partition] = delivery.table
            elif isinstance(delivery, Received) and isinstance(delivery.message, ScanError):
                partition = pending.pop(delivery.message.request_id, None)
                if partition is not None and partition not in results:
                    errors[partition] = delivery.message.error
                    if delivery.message.retryable and ask(partition):
                        errors.pop(partition, None)
            return _answered_all(partitions, results, errors)

        # A holder that is slow, paused or dead (a dead one's frames wait for its next
        # incarnation) is hedged: after SCAN_HEDGE_MS the next holder is asked too, and
        # the first answer wins.
        deadline_ns = self._clock.monotonic_ns() + SCAN_TIMEOUT_MS * NS_PER_MS * SCAN_ROUNDS_MAX
        while not _answered_all(partitions, results, errors):
            now = self._clock.monotonic_ns()
            if now >= deadline_ns:
                break
            self._receive(take, SCAN_HEDGE_MS)
            now = self._clock.monotonic_ns()
            for partition in partitions:
                if partition in results or partition in errors:
                    continue
                if now - asked_ns.get(partition, 0) >= SCAN_HEDGE_MS * NS_PER_MS:
                    if not ask(partition) and partition not in pending.values():
                        errors[partition] = "no holder answered"
        missing = sorted(set(partitions) - set(results))
        if missing:
            detail = "; ".join(f"partition {p}: {errors.get(p, 'no answer')}" for p in missing)
            raise Unavailable(f"could not read {table} at index {index}: {detail}")
        tables = [results[p] for p in partitions]
        if not tables:
            raise CommandRefused(f"no partitions of {table} were asked for")
        return pa.concat_tables(tables)

    def release(self, index: int) -> None:
        for delivery in self._held.pop(index, []):
            delivery.release()
        if index > 0:
            for node in self.client.nodes:
                try:
                    self.client._transport.send(raft_id(node), ReleaseRead(index))
                except TransportError:
                    pass

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
        transport = self.client._transport
        deadline_ns = self._clock.monotonic_ns() + STAGE_TIMEOUT_MS * NS_PER_MS
        while True:
            try:
                transport.send_bulk(raft_id(node), header, rows)
                return True
            except Backpressure:
                if self._clock.monotonic_ns() >= deadline_ns:
                    return False
                self._receive(lambda delivery: False, 5)
            except TransportError:
                return False

    def _receive(self, take: Callable[[Any], bool], timeout_ms: int) -> None:
        """Poll until `take` says it has what it wanted or `timeout_ms` passes. Bulk data
        `take` does not keep is released."""
        client = self.client
        transport = client._transport
        deadline_ns = self._clock.monotonic_ns() + timeout_ms * NS_PER_MS
        while True:
            for delivery in transport.poll():
                kept_before = _held_count(self._held)
                done = take(delivery)
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


def _answered_all(
    partitions: Sequence[int], results: Mapping[int, Any], errors: Mapping[int, str]
) -> bool:
    return all(p in results or p in errors for p in partitions)


def _held_count(held: dict[int, list[BulkReceived]]) -> int:
    return sum(len(deliveries) for deliveries in held.values())


def _catalog_view(response: CatalogResponse) -> CatalogView:
    return CatalogView(
        index=response.index,
        catalog_version=response.catalog_version,
        catalog=Catalog.restore(response.catalog),
        placements={key: tuple(map(tuple, holders)) for key, holders in response.placements},
        versions=dict(response.versions),
        schema_versions=dict(response.schema_versions),
        members=tuple(response.members),
    )


def open_port(target: str | Path, *, data_dir: Path | None = None) -> TransportPort:
    """A port to the cluster named `target` (or whose run directory is the Path `target`)."""
    try:
        client = Client(target, data_dir=data_dir)
    except ClientError as error:
        raise Unavailable(str(error)) from error
    return TransportPort(client)


__all__ = ["TransportPort", "open_port", "node_of"]
