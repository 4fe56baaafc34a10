"""An in-process ClusterPort with the cluster's semantics, for testing the coordinator.

One log index grows with every barrier and commit. The catalog is a real
`storage.catalog.Catalog` changed only by `apply_ddl`; placements come from
`storage.placement.place` over `members`; each (table, partition) holds an immutable Arrow
table in DuckDB's exact encoding, so a barrier's snapshot is a copy of a dict and scans at
that index stay consistent whatever commits follow. Staged batches travel as Arrow IPC
bytes with a CRC, as they would over the bulk transport. A commit is refused with
`Conflict` when a version it expects moved, and applies all its batches or none: each
partition's new rows are computed by DuckDB from a real table built from the table's DDL
(deletes by equality on every column, IS NOT DISTINCT FROM), then swapped in together.

Fragments run as a worker runs them: refused unless DuckDB's parser finds exactly one
SELECT (the worker's own check), then run in a scratch DuckDB where each partition the
fragment reads — and only those — is a table in schema main under its physical name
(`"main.t__p0"`), created from the table's DDL at the index as a worker creates it, holding
the partition's rows at the index, and with the fragment's inputs registered under their
names — after the round trip through Arrow IPC and the checks a worker makes (a bad or
repeated name, too many bytes: `FragmentFailed` with an empty class) — and unregistered
after; DuckDB's errors become `FragmentFailed` with DuckDB's message and class. The answer
is the first holder's. The catalog view's `table_rows` are the exact counts.

Test hooks: `refuse_stages` (the next N stage calls raise WriteRefused), `before_commit`
(runs at the start of every commit, e.g. to land a competing write first), `before_scan`
(runs before every scan, and before each fragment for every table it reads), `log` (every
command committed), `scans` (every (index, table) scanned), `fragment_calls` (every (index,
fragments) run), `releases` (every index released). `client()` gives another session over the same cluster with its own cached
catalog view, as a second client process would have.

Not modelled: replicas (a partition is stored once; every holder of the real cluster
applies the same staged bytes), failures of holders, expiry of snapshots and stages.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import duckdb
import msgspec
import pyarrow as pa

from cluster._applier import select_refusal
from cluster.sql_protocol import (
    CommandKind,
    FragmentInputError,
    StagedBatch,
    decode_fragment_inputs,
    encode_fragment_input,
    table_key,
)
from query.port import (
    Barrier,
    CatalogChanged,
    CatalogView,
    Command,
    Committed,
    Conflict,
    Fragment,
    FragmentFailed,
    FragmentResult,
    PortError,
    SnapshotMissing,
    WriteRefused,
    estimated_rows,
    write_quorum,
)
from storage.catalog import (
    AlterTable,
    Catalog,
    CatalogConflict,
    CreateTable,
    Ddl,
    DropTable,
)
from storage.ddl import TableSpec, partition_columns_sql, quote_identifier
from storage.partitions import partition_table_sql
from storage.placement import place

Partitions = tuple[pa.Table, ...]


@dataclass(frozen=True)
class _Staged:
    table: str
    partition: int
    data: bytes
    rows: int
    delete: bool


class FakePort:
    def __init__(self, members: Sequence[int] = (1, 2, 3)) -> None:
        self.members = tuple(sorted(members))
        self.index = 0
        self.catalog_version = 0
        self._catalog = Catalog()
        self._versions: dict[str, int] = {}
        self._schema_versions: dict[str, int] = {}
        self._placements: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._specs: dict[str, TableSpec] = {}
        self._data: dict[str, Partitions] = {}
        self._barriers: dict[int, tuple[dict[str, Partitions], dict[str, TableSpec]]] = {}
        self._staged: dict[str, _Staged] = {}
        self._stage_ids = itertools.count(1)
        self._engine = duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})
        self._scratch: duckdb.DuckDBPyConnection | None = None
        self._view: CatalogView | None = None
        self._columns: dict[str, list[str]] = {}
        self.refuse_stages = 0
        self.before_commit: Callable[[Command], None] | None = None
        self.before_scan: Callable[[int, str], None] | None = None
        self.log: list[Command] = []
        self.scans: list[tuple[int, str]] = []
        self.fragment_calls: list[tuple[int, list[Fragment]]] = []
        self.releases: list[int] = []
        self.open_reads = False
        self.opened_reads = 0
        self.missing_snapshots = 0
        """The next this many reads at a point `open_read` gave find no snapshot there
        (`SnapshotMissing`), as on a holder that did not answer the point in time."""
        self._opened: set[int] = set()

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
        self._engine.close()
        self._catalog.close()

    # -- ClusterPort -------------------------------------------------------------------------

    def catalog(self, refresh: bool = False) -> CatalogView:
        if self._view is None or refresh:
            self._view = self.fresh_view()
        return self._view

    def fresh_view(self) -> CatalogView:
        return CatalogView(
            index=self.index,
            catalog_version=self.catalog_version,
            catalog=Catalog.restore(self._catalog.snapshot()),
            placements=dict(self._placements),
            versions=dict(self._versions),
            schema_versions=dict(self._schema_versions),
            members=self.members,
            table_rows={
                key: sum(rows.num_rows for rows in parts) for key, parts in self._data.items()
            },
        )

    def client(self) -> FakeClient:
        return FakeClient(self)

    def barrier(self) -> Barrier:
        self.index += 1
        self._barriers[self.index] = (dict(self._data), dict(self._specs))
        return Barrier(self.index, dict(self._versions), self.catalog_version)

    def open_read(self) -> Barrier | None:
        """None (reads take `barrier`) unless `open_reads`: then a read point with no
        versions, like the cluster's."""
        if not self.open_reads:
            return None
        self.opened_reads += 1
        point = dataclasses.replace(self.barrier(), versions={})
        self._opened.add(point.index)
        return point

    def _snapshot_at(self, index: int) -> None:
        if index in self._opened and self.missing_snapshots > 0:
            self.missing_snapshots -= 1
            raise SnapshotMissing(f"node 1: no read snapshot at index {index} here")

    def release(self, index: int) -> None:
        self.releases.append(index)
        self._barriers.pop(index, None)

    def scan(
        self,
        index: int,
        table: str,
        partitions: Sequence[int],
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        if self.before_scan is not None:
            self.before_scan(index, table)
        self._snapshot_at(index)
        self.scans.append((index, table))
        parts = self._partitions_at(index, table)
        assert all(0 <= p < len(parts) for p in partitions), (partitions, len(parts))
        result = pa.concat_tables([parts[p] for p in partitions])
        return result.select(list(columns)) if columns is not None else result

    def fragments(self, index: int, fragments: Sequence[Fragment]) -> list[FragmentResult]:
        self._snapshot_at(index)
        self.fragment_calls.append((index, list(fragments)))
        results = []
        for fragment in fragments:
            if self.before_scan is not None:
                for table in sorted({table for table, _ in fragment.reads}):
                    self.before_scan(index, table)
            results.append(FragmentResult(self._run_fragment(index, fragment), fragment.holders[0]))
        return results

    def stage(
        self,
        table: str,
        rows_by_partition: Mapping[int, pa.Table],
        delete: bool = False,
        placement: tuple[tuple[int, ...], ...] | None = None,
    ) -> list[StagedBatch]:
        known = self._placements.get(table)
        # A placement is given exactly for a table the catalog does not have yet (CTAS);
        # OR REPLACE of an existing table gives the new table's.
        assert known is not None or placement is not None, f"no placement for {table}"
        holders_of = placement if placement is not None else known
        assert holders_of is not None
        if self.refuse_stages:
            self.refuse_stages -= 1
            replicas = len(holders_of[0])
            raise WriteRefused(
                f"partition {min(rows_by_partition)} of {table}: 1 holder acknowledged, "
                f"{write_quorum(replicas)} needed; nothing was written"
            )
        batches: list[StagedBatch] = []
        for partition, rows in sorted(rows_by_partition.items()):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, rows.schema) as writer:
                writer.write_table(rows)
            data = sink.getvalue().to_pybytes()
            stage_id = f"stage-{next(self._stage_ids)}"
            self._staged[stage_id] = _Staged(table, partition, data, rows.num_rows, delete)
            assert 0 <= partition < len(holders_of), (partition, len(holders_of))
            batches.append(
                StagedBatch(
                    stage_id,
                    partition,
                    rows.num_rows,
                    zlib.crc32(data),
                    holders_of[partition],
                    delete,
                )
            )
        return batches

    def commit(self, command: Command) -> Committed:
        if self.before_commit is not None:
            self.before_commit(command)
        for key, version in command.expected_versions:
            if self._versions.get(key) != version:
                raise Conflict(f"{key} moved from version {version} to {self._versions.get(key)}")
        for key, version in command.expected_schemas:
            if self._schema_versions.get(key) != version:
                raise Conflict(f"{key}'s schema moved from {version}")
        assert command.kind in (CommandKind.DDL, CommandKind.WRITE), command.kind
        index = self.index + 1
        if command.ddl is not None:
            self._apply_ddl(msgspec.msgpack.decode(command.ddl, type=Ddl), index)
        changed = self._apply_writes(command)
        self._data.update(changed)
        for key in changed:
            self._versions[key] = index
        self.index = index
        self.log.append(command)
        return Committed(index, self.catalog_version, dict(self._versions))

    def _partitions_at(self, index: int, table: str) -> Partitions:
        """The table's partitions at barrier `index` (0: now)."""
        return self._table_at(index, table)[0]

    def _table_at(self, index: int, table: str) -> tuple[Partitions, TableSpec]:
        if index == 0:
            data, specs = self._data, self._specs
        elif index in self._barriers:
            data, specs = self._barriers[index]
        else:
            raise PortError(f"no read snapshot at index {index} (released or expired)")
        if table not in data:
            raise PortError(f"no table {table} at index {index}")
        return data[table], specs[table]

    def estimates(self, index: int, fragments: Sequence[Fragment]) -> list[int | None]:
        self._snapshot_at(index)
        return [estimated_rows(self._run_fragment(index, f, explain=True)) for f in fragments]

    def _run_fragment(self, index: int, fragment: Fragment, explain: bool = False) -> pa.Table:
        assert fragment.holders, f"a fragment without holders: {fragment.sql}"
        if self._scratch is None:  # one connection; each fragment's tables are rolled back
            self._scratch = duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})
        scratch = self._scratch
        scratch.execute("BEGIN TRANSACTION")
        registered: list[str] = []
        try:
            refusal = select_refusal(scratch, fragment.sql)
            if refusal is not None:
                raise FragmentFailed(str(refusal), refusal.duckdb_error)
            inputs = _worker_inputs(fragment)
            for table, partition in fragment.reads:
                parts, spec = self._table_at(index, table)
                assert 0 <= partition < len(parts), (table, partition, len(parts))
                placed = self._placements.get(table)
                if placed is not None:  # every holder named must hold the partition
                    assert set(fragment.holders) <= set(placed[partition]), (fragment, placed)
                _load_partition(
                    scratch, partition_table_sql(table, partition), spec, parts[partition]
                )
            try:
                for name, rows in inputs.items():
                    scratch.register(name, rows)
                    registered.append(name)
                sql = f"EXPLAIN (FORMAT json) {fragment.sql}" if explain else fragment.sql
                return scratch.sql(sql).to_arrow_table()
            except duckdb.Error as error:
                raise FragmentFailed(str(error), type(error).__name__) from error
        finally:
            for name in registered:
                try:
                    scratch.unregister(name)
                except duckdb.Error:
                    pass  # the failed statement aborted the transaction; ROLLBACK drops it
            scratch.execute("ROLLBACK")

    # -- what tests look at ------------------------------------------------------------------

    def partitions(self, table: str) -> Partitions:
        return self._data[table]

    def spec(self, table: str) -> TableSpec:
        return self._specs[table]

    def open_barriers(self) -> list[int]:
        return sorted(self._barriers)

    def tables(self) -> list[str]:
        return sorted(self._data)

    # -- applying ----------------------------------------------------------------------------

    def _apply_ddl(self, change: Ddl, index: int) -> None:
        old = None
        if isinstance(change, AlterTable | DropTable):
            old = self._specs.get(table_key(change.schema, change.name))
        try:
            self._catalog.apply_ddl(change)
        except CatalogConflict as error:
            raise CatalogChanged(str(error)) from error
        self.catalog_version = index
        if isinstance(change, CreateTable):
            spec = change.spec
            key = table_key(spec.schema, spec.name)
            if key in self._data and change.if_not_exists:
                return
            self._specs[key] = spec
            self._placements[key] = place(spec, self.members).holders
            self._data[key] = tuple(
                self._rebuild(spec, None, [], []) for _ in range(spec.partitions)
            )
        elif isinstance(change, DropTable):
            key = table_key(change.schema, change.name)
            self._specs.pop(key, None)
            self._placements.pop(key, None)
            self._data.pop(key, None)
            self._versions.pop(key, None)
            self._schema_versions.pop(key, None)
            return
        elif isinstance(change, AlterTable):
            assert old is not None
            key = table_key(change.schema, change.name)
            self._specs[key] = self._catalog.table(change.name, change.schema)
            self._data[key] = tuple(
                self._rebuild(old, rows, [], [], alter=change.sql) for rows in self._data[key]
            )
        else:
            return
        self._versions[key] = index
        self._schema_versions[key] = index

    def _apply_writes(self, command: Command) -> dict[str, Partitions]:
        changed: dict[str, Partitions] = {}
        for write in command.writes:
            spec = self._specs[write.table]
            deletes: dict[int, list[pa.Table]] = {}
            inserts: dict[int, list[pa.Table]] = {}
            seen_insert: set[int] = set()
            for batch in write.batches:
                staged = self._staged.pop(batch.stage_id)
                assert staged.table == write.table and staged.partition == batch.partition
                assert staged.rows == batch.rows and zlib.crc32(staged.data) == batch.crc
                assert staged.delete == batch.delete
                assert batch.holders == self._placements[write.table][batch.partition]
                rows = pa.ipc.open_stream(staged.data).read_all()
                if batch.delete:
                    assert batch.partition not in seen_insert, "deletes come before inserts"
                    deletes.setdefault(batch.partition, []).append(rows)
                else:
                    seen_insert.add(batch.partition)
                    inserts.setdefault(batch.partition, []).append(rows)
            parts = list(self._data[write.table])
            for partition in sorted(set(deletes) | set(inserts)):
                parts[partition] = self._rebuild(
                    spec,
                    parts[partition],
                    deletes.get(partition, []),
                    inserts.get(partition, []),
                )
            changed[write.table] = tuple(parts)
        return changed

    def _rebuild(
        self,
        spec: TableSpec,
        rows: pa.Table | None,
        deletes: list[pa.Table],
        inserts: list[pa.Table],
        alter: str | None = None,
    ) -> pa.Table:
        """One partition's rows after deletes, inserts or an ALTER, computed by DuckDB on a
        real table (the spec's DDL) in a transaction that is rolled back."""
        con = self._engine
        table = f"{quote_identifier(spec.schema)}.{quote_identifier(spec.name)}"
        con.execute("BEGIN TRANSACTION").fetchall()
        try:
            con.execute(spec.ddl).fetchall()
            stored = self._stored_columns(spec)
            if rows is not None and rows.num_rows:
                self._insert(table, stored, rows)
            for number, batch in enumerate(deletes):
                con.register(f"deleted_{number}", batch)
                same = " AND ".join(
                    f"t.{c} IS NOT DISTINCT FROM d.{c}" for c in map(quote_identifier, stored)
                )
                con.execute(
                    f"DELETE FROM {table} AS t WHERE EXISTS "
                    f"(SELECT 1 FROM deleted_{number} AS d WHERE {same})"
                ).fetchall()
                con.unregister(f"deleted_{number}")
            for batch in inserts:
                self._insert(table, stored, batch)
            if alter is not None:
                con.execute(alter).fetchall()
                stored = self._stored_columns(spec, cached=False)
            columns = ", ".join(map(quote_identifier, stored))
            return con.sql(f"SELECT {columns} FROM {table}").to_arrow_table()
        finally:
            con.execute("ROLLBACK").fetchall()

    def _stored_columns(self, spec: TableSpec, cached: bool = True) -> list[str]:
        if cached and spec.ddl in self._columns:
            return self._columns[spec.ddl]
        rows = self._engine.execute(
            "SELECT column_name FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? "
            "AND NOT is_generated ORDER BY column_index",
            [spec.schema, spec.name],
        ).fetchall()
        columns = [str(row[0]) for row in rows]
        if cached:
            self._columns[spec.ddl] = columns
        return columns

    def _insert(self, table: str, stored: list[str], rows: pa.Table) -> None:
        columns = ", ".join(map(quote_identifier, stored))
        self._engine.register("inserted_rows", rows)
        try:
            self._engine.execute(
                f"INSERT INTO {table} ({columns}) SELECT {columns} FROM inserted_rows"
            ).fetchall()
        finally:
            self._engine.unregister("inserted_rows")


def _worker_inputs(fragment: Fragment) -> dict[str, pa.Table]:
    """The fragment's inputs as a worker gets them: through Arrow IPC, checked."""
    encoded = [(name, encode_fragment_input(rows)) for name, rows in fragment.inputs]
    try:
        return decode_fragment_inputs(encoded)
    except FragmentInputError as error:
        raise FragmentFailed(str(error), "") from error


def _load_partition(
    con: duckdb.DuckDBPyConnection, physical: str, spec: TableSpec, rows: pa.Table
) -> None:
    """Table `main.<physical>` as a worker creates a partition (the spec's columns and
    constraints), holding `rows`."""
    con.execute(f"CREATE TABLE main.{physical} ({partition_columns_sql(spec.ddl)})").fetchall()
    columns = ", ".join(map(quote_identifier, rows.column_names))
    con.register("partition_rows", rows)
    try:
        con.execute(
            f"INSERT INTO main.{physical} ({columns}) SELECT {columns} FROM partition_rows"
        ).fetchall()
    finally:
        con.unregister("partition_rows")


class FakeClient:
    """Another client of the same fake cluster: its own cached catalog view, everything
    else shared."""

    def __init__(self, port: FakePort) -> None:
        self.port = port
        self._view: CatalogView | None = None

    def catalog(self, refresh: bool = False) -> CatalogView:
        if self._view is None or refresh:
            self._view = self.port.fresh_view()
        return self._view

    def barrier(self) -> Barrier:
        return self.port.barrier()

    def open_read(self) -> Barrier | None:
        return self.port.open_read()

    def release(self, index: int) -> None:
        self.port.release(index)

    def scan(
        self,
        index: int,
        table: str,
        partitions: Sequence[int],
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        return self.port.scan(index, table, partitions, columns)

    def fragments(self, index: int, fragments: Sequence[Fragment]) -> list[FragmentResult]:
        return self.port.fragments(index, fragments)

    def estimates(self, index: int, fragments: Sequence[Fragment]) -> list[int | None]:
        return self.port.estimates(index, fragments)

    def stage(
        self,
        table: str,
        rows_by_partition: Mapping[int, pa.Table],
        delete: bool = False,
        placement: tuple[tuple[int, ...], ...] | None = None,
    ) -> list[StagedBatch]:
        return self.port.stage(table, rows_by_partition, delete, placement)

    def commit(self, command: Command) -> Committed:
        return self.port.commit(command)
