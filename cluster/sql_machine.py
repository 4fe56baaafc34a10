"""The SQL half of the replicated state machine: catalog, placement, table versions, and the
store work each SQL command means for this worker.

Every worker applies every SQL command of the cluster log here, in log order, on its loop
thread. This part is deterministic and cheap — no rows pass through it: it checks the
command against the versions it expects, applies DDL to the shadow catalog, places new
tables, moves versions, and returns the `StoreWork` for the partitions THIS node holds
(creating, dropping, altering partition tables, and the staged batches to delete and
insert). The worker's applier thread then runs that work on the DuckDB partition store.

Versions (all are log indexes): a table's `version` moves with every change to its rows or
schema; its `schema_version` with every DDL; `catalog_version` with every DDL of any object;
each partition remembers the last index that changed it (`partition_changed`), which tells
a worker that fell behind which partitions it must copy from a replica.

Exactly once: every command carries (client_id, request_id); each client's last
`RESULTS_PER_CLIENT_MAX` results are kept, so a retried command is answered from the table
and not applied twice.

Invariant: the state after applying index i is a pure function of the log prefix 1..i (the
member list at each index is part of that prefix); a refused command changes nothing but
its client's result table, identically on every worker.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from cluster.sql_protocol import CommandKind, SqlCommand, SqlResult, StagedBatch, table_key
from storage import catalog as catalog_module
from storage.catalog import AlterTable, Catalog, CatalogConflict, CreateTable, Ddl, DropTable
from storage.ddl import added_column_sql, partition_columns_sql
from storage.partitions import AddColumn, DropPartition
from storage.partitions import CreateTable as CreatePartition
from storage.partitions import DropTable as DropPartitions
from storage.placement import PlacementError, place

RESULTS_PER_CLIENT_MAX = 256
CLIENTS_MAX = 4096
IMAGE_VERSION = 1
EXPIRED = "expired: the request id is older than the results kept for this client"


@dataclass(frozen=True, slots=True)
class StagedRows:
    """Store work: the staged batch `batch` goes into (or out of) `table`'s `partition`."""

    table: str
    partition: int
    batch: StagedBatch


StoreOp = CreatePartition | DropPartitions | DropPartition | AddColumn | StagedRows


@dataclass(frozen=True, slots=True)
class StoreWork:
    """What one applied command means for this node."""

    index: int
    result: SqlResult
    ops: tuple[StoreOp, ...] = ()
    barrier: bool = False
    duplicate: bool = False
    """The command was applied before (a retry): nothing happened now."""
    client_id: int = 0
    request_id: int = 0
    state_index: int = 0
    """The machine's `state_index` after this command (the same on every node)."""
    catalog_version: int = 0
    """The machine's catalog version after this command."""


class _Image(msgspec.Struct, frozen=True, array_like=True):
    version: int
    catalog: bytes
    catalog_version: int
    placements: dict[str, tuple[tuple[int, ...], ...]]
    versions: dict[str, int]
    schema_versions: dict[str, int]
    partition_changed: dict[str, list[int]]
    sessions: list[tuple[int, int, list[tuple[int, SqlResult]]]]


_ddl_decoder: msgspec.msgpack.Decoder[Ddl] = msgspec.msgpack.Decoder(Ddl)
_image_encoder = msgspec.msgpack.Encoder()
_image_decoder = msgspec.msgpack.Decoder(_Image)


class _Session:
    __slots__ = ("floor", "results")

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self.results: OrderedDict[int, SqlResult] = OrderedDict()

    def record(self, request_id: int, result: SqlResult) -> None:
        self.results[request_id] = result
        while len(self.results) > RESULTS_PER_CLIENT_MAX:
            forgotten, _ = self.results.popitem(last=False)
            self.floor = max(self.floor, forgotten)


class SqlStateMachine:
    """Catalog, placements and versions of one worker (node number `node`)."""

    def __init__(self, node: int, catalog: Catalog | None = None) -> None:
        self.node = node
        self.catalog = catalog or Catalog()
        self.catalog_version = 0
        self.placements: dict[str, tuple[tuple[int, ...], ...]] = {}
        """Table key -> holders of each partition (node numbers, primary first)."""
        self.versions: dict[str, int] = {}
        self.schema_versions: dict[str, int] = {}
        self.partition_changed: dict[str, list[int]] = {}
        """Table key -> per partition, the last index that changed its rows or schema."""
        self._sessions: OrderedDict[int, _Session] = OrderedDict()

    # ---- reading ----

    def local_partitions(self) -> list[tuple[str, int]]:
        """(table key, partition) this node holds, sorted."""
        return sorted(
            (table, partition)
            for table, holders in self.placements.items()
            for partition, held_by in enumerate(holders)
            if self.node in held_by
        )

    def columns_sql(self, table: str) -> str:
        return partition_columns_sql(self._spec(table).ddl)

    # ---- applying ----

    def apply(self, index: int, command: SqlCommand, members: tuple[int, ...]) -> StoreWork:
        """Apply one command at log `index`; `members` are the node numbers of every member
        (voters and learners) at that index, sorted."""
        work = self._apply(index, command, members)
        return dataclasses.replace(
            work,
            client_id=command.client_id,
            request_id=command.request_id,
            state_index=self.state_index,
            catalog_version=self.catalog_version,
        )

    @property
    def state_index(self) -> int:
        """The last index whose command changed the SQL state (a DDL or a write, whatever
        partitions it touched): every node's state is the same at the same state index.
        Derived, so a restored image has it too: a DDL sets the catalog version to its
        index and a write its table's version, and a write to a table dropped later is
        below that drop's index."""
        return max(self.catalog_version, max(self.versions.values(), default=0))

    def _apply(self, index: int, command: SqlCommand, members: tuple[int, ...]) -> StoreWork:
        session = self._sessions.get(command.client_id)
        if session is not None:
            self._sessions.move_to_end(command.client_id)
            cached = session.results.get(command.request_id)
            if cached is not None:
                return StoreWork(index, cached, duplicate=True)
            if command.request_id <= session.floor:
                return StoreWork(index, SqlResult(False, EXPIRED, "refused"))
        else:
            session = self._new_session(command.client_id)
        work = self._execute(index, command, members)
        session.record(command.request_id, work.result)
        return work

    def _new_session(self, client_id: int) -> _Session:
        session = _Session()
        self._sessions[client_id] = session
        while len(self._sessions) > CLIENTS_MAX:
            self._sessions.popitem(last=False)
        return session

    def _execute(self, index: int, command: SqlCommand, members: tuple[int, ...]) -> StoreWork:
        if command.kind == CommandKind.BARRIER:
            return StoreWork(index, SqlResult(True), barrier=True)
        conflict = self._conflict(command)
        if conflict is not None:
            return StoreWork(index, SqlResult(False, conflict, "conflict"))
        ops: list[StoreOp] = []
        if command.kind == CommandKind.DDL:
            if command.ddl is None:
                return StoreWork(index, SqlResult(False, "a DDL command without DDL", "refused"))
            try:
                change = _ddl_decoder.decode(command.ddl)
            except msgspec.DecodeError as error:
                return StoreWork(index, SqlResult(False, f"undecodable DDL: {error}", "refused"))
            refusal = self._apply_ddl(index, change, members, ops)
            if refusal is not None:
                return StoreWork(index, refusal)
        elif command.kind != CommandKind.WRITE:
            return StoreWork(index, SqlResult(False, f"unknown command {command.kind}", "refused"))
        missing = [write.table for write in command.writes if write.table not in self.placements]
        if missing:  # only possible for a DDL that failed above, or a malformed command
            return StoreWork(index, SqlResult(False, f"no table {missing[0]!r}", "conflict"))
        bad = self._bad_partition(command)
        if bad is not None:
            return StoreWork(index, SqlResult(False, bad, "refused"))
        for write in command.writes:
            holders = self.placements[write.table]
            changed = self.partition_changed[write.table]
            self.versions[write.table] = index
            for batch in write.batches:
                changed[batch.partition] = index
                if self.node in holders[batch.partition]:
                    ops.append(StagedRows(write.table, batch.partition, batch))
        return StoreWork(index, SqlResult(True), tuple(ops))

    def _conflict(self, command: SqlCommand) -> str | None:
        for table, version in command.expected_versions:
            if self.versions.get(table) != version:
                return f"table {table} changed since the statement read it (at {version})"
        for table, version in command.expected_schemas:
            if self.schema_versions.get(table) != version:
                return f"table {table} was altered, dropped or created since the statement began"
        return None

    def _bad_partition(self, command: SqlCommand) -> str | None:
        for write in command.writes:
            count = len(self.placements[write.table])
            for batch in write.batches:
                if not 0 <= batch.partition < count:
                    return f"table {write.table} has no partition {batch.partition}"
        return None

    # ---- DDL ----

    def _apply_ddl(
        self, index: int, change: Ddl, members: tuple[int, ...], ops: list[StoreOp]
    ) -> SqlResult | None:
        """Apply one catalog change and append this node's store work; a refusal or None."""
        placement: tuple[tuple[int, ...], ...] | None = None
        if isinstance(change, CreateTable):
            key = table_key(change.spec.schema, change.spec.name)
            if change.if_not_exists and key in self.placements:
                return None
            try:
                placement = place(change.spec, members).holders
            except PlacementError as error:
                return SqlResult(False, str(error), "catalog")
        try:
            self.catalog.apply_ddl(change)
        except CatalogConflict as error:
            return SqlResult(False, str(error), "catalog")
        self.catalog_version = index
        if isinstance(change, CreateTable):
            assert placement is not None
            self._create(index, change, placement, ops)
        elif isinstance(change, DropTable):
            self._forget(table_key(change.schema, change.name), ops)
        elif isinstance(change, AlterTable):
            key = table_key(change.schema, change.name)
            self._touch_schema(index, key)
            if self._holds_any(key):
                ops.append(AddColumn(key, added_column_sql(change.sql)))
        return None

    def _create(
        self,
        index: int,
        change: CreateTable,
        placement: tuple[tuple[int, ...], ...],
        ops: list[StoreOp],
    ) -> None:
        key = table_key(change.spec.schema, change.spec.name)
        if key in self.placements:  # OR REPLACE
            self._forget(key, ops)
        self.placements[key] = placement
        self.partition_changed[key] = [index] * len(placement)
        self._touch_schema(index, key)
        columns = partition_columns_sql(change.spec.ddl)
        for partition, held_by in enumerate(placement):
            if self.node in held_by:
                ops.append(CreatePartition(key, partition, columns))

    def _forget(self, key: str, ops: list[StoreOp]) -> None:
        if self._holds_any(key):
            ops.append(DropPartitions(key))
        for table in (self.placements, self.versions, self.schema_versions):
            table.pop(key, None)
        self.partition_changed.pop(key, None)

    def _touch_schema(self, index: int, key: str) -> None:
        self.versions[key] = index
        self.schema_versions[key] = index
        changed = self.partition_changed[key]
        changed[:] = [index] * len(changed)

    def _holds_any(self, key: str) -> bool:
        return any(self.node in held_by for held_by in self.placements.get(key, ()))

    def _spec(self, key: str) -> catalog_module.TableSpec:
        for spec in self.catalog.tables():
            if table_key(spec.schema, spec.name) == key:
                return spec
        raise catalog_module.UnknownTable(f"no table {key!r}")

    # ---- snapshots ----

    def snapshot(self) -> bytes:
        sessions = [
            (client_id, session.floor, list(session.results.items()))
            for client_id, session in self._sessions.items()
        ]
        image = _Image(
            version=IMAGE_VERSION,
            catalog=self.catalog.snapshot(),
            catalog_version=self.catalog_version,
            placements=self.placements,
            versions=self.versions,
            schema_versions=self.schema_versions,
            partition_changed=self.partition_changed,
            sessions=sessions,
        )
        return _image_encoder.encode(image)

    @classmethod
    def restore(cls, data: bytes, node: int) -> SqlStateMachine:
        """The machine a snapshot holds; empty `data` is the empty machine."""
        if not data:
            return cls(node)
        image = _image_decoder.decode(data)
        assert image.version == IMAGE_VERSION, image.version
        machine = cls(node, Catalog.restore(image.catalog))
        machine.catalog_version = image.catalog_version
        machine.placements = {key: tuple(map(tuple, h)) for key, h in image.placements.items()}
        machine.versions = dict(image.versions)
        machine.schema_versions = dict(image.schema_versions)
        machine.partition_changed = {key: list(v) for key, v in image.partition_changed.items()}
        for client_id, floor, results in image.sessions:
            session = _Session(floor)
            session.results.update(results)
            machine._sessions[client_id] = session
        return machine

    def close(self) -> None:
        self.catalog.close()
