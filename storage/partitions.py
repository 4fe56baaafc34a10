"""The per-worker partition store: one DuckDB database file holding this worker's partitions.

Every worker applies the cluster log in order; each committed entry becomes a call to
`apply(index, operations)`, which runs the entry's operations on the local partitions and
records `index` as the applied index — all in ONE DuckDB transaction. Key invariant: the
database always holds exactly the effects of the entries 1..applied_index() that touched
local partitions, each once. An entry whose index is <= the stored applied index is skipped
(`apply` returns False), so replay after a crash or restart never double-applies, and since
the index is committed with the effects it never skips one either. DuckDB commits through
its own WAL; a SIGKILL at any moment leaves either the whole entry or none of it.

Layout: partition tables in schema `main`, named by `partition_table_name` ("t__p3",
quoted); one metadata row in `dcluster.store_state` (format version, applied index).
DuckDB runs with `threads=1` and a bounded `memory_limit`, never installs or autoloads
extensions (no network in the apply path), and uses UTC where the ICU extension exists,
so that an entry's SQL means the same on every replica. External access is off for the
whole database (`enable_external_access`): no SQL run on it — an entry's or a read's —
reads or writes a file other than the store's own (its WAL, its spill files) or reaches
the network; the store's rows arrive as registered Arrow, which needs none.

Reads. `scan`/`query` read what is applied now (consistency `stale`). For `strong` reads
the worker applies the read-barrier entry and at once calls `read_at(index)`: that opens a
second DuckDB connection (a cursor on the same database), runs `BEGIN TRANSACTION READ
ONLY` and reads the applied index inside it. DuckDB assigns a transaction's snapshot at its
first statement, so that read pins the snapshot at exactly `index`; later applies commit on
the main connection and DuckDB's MVCC keeps the snapshot unchanged until it is closed. Every
local partition read through one `ReadSnapshot` is therefore at the same log index. At most
`snapshots_open_max` snapshots are open at once (each pins old row versions in memory).

Errors from DuckDB surface as `OperationRejected` (deterministic: every replica fails the
entry the same way) or `StoreFailed` (the environment: the store refuses further use), each
carrying DuckDB's message unchanged; see `_partition_errors`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import duckdb
import pyarrow as pa

from storage._partition_errors import (
    OperationRejected,
    PartitionStoreError,
    SnapshotUnavailable,
    StoreClosed,
    StoreFailed,
    TooManySnapshots,
    classify,
)
from storage._partition_ops import (
    AddColumn,
    CreateTable,
    Delete,
    DeleteRows,
    DropPartition,
    DropTable,
    ImportPartition,
    Insert,
    InvalidName,
    Operation,
    Update,
    local_partitions,
    partition_table_name,
    partition_table_sql,
    quote_identifier,
    release_rows,
    run,
)

__all__ = [
    "AddColumn",
    "CreateTable",
    "Delete",
    "DeleteRows",
    "DropPartition",
    "DropTable",
    "ImportPartition",
    "Insert",
    "InvalidName",
    "Operation",
    "OperationRejected",
    "PartitionStats",
    "PartitionStore",
    "PartitionStoreConfig",
    "PartitionStoreError",
    "ReadSnapshot",
    "SnapshotUnavailable",
    "StoreClosed",
    "StoreFailed",
    "TooManySnapshots",
    "Update",
    "partition_table_name",
    "partition_table_sql",
    "quote_identifier",
]

FORMAT_VERSION = 1
THREADS = 1
"""DuckDB threads per worker: one worker per core, and the event loop owns that core."""
MEMORY_LIMIT_BYTES_MIN = 16 * 1024 * 1024
OPERATIONS_PER_ENTRY_MAX = 65_536
APPLIED_INDEX_MAX = (1 << 63) - 1
EXPORT_INDEX_KEY = b"dcluster.applied_index"
"""Schema metadata key of an exported partition: the applied index it was read at."""
_STATE = "dcluster.store_state"


DISABLED_OPTIMIZERS = "partial_aggregate_pushdown"
"""DuckDB optimizers the store runs without (see `PartitionStore.open`)."""


@dataclass(frozen=True, slots=True)
class PartitionStoreConfig:
    memory_limit_bytes: int = 512 * 1024 * 1024
    """DuckDB's memory_limit; beyond it DuckDB spills to `<path>.tmp` or fails the entry."""
    snapshots_open_max: int = 64

    def __post_init__(self) -> None:
        if self.memory_limit_bytes < MEMORY_LIMIT_BYTES_MIN:
            raise ValueError(f"memory_limit_bytes must be >= {MEMORY_LIMIT_BYTES_MIN}")
        if self.snapshots_open_max < 1:
            raise ValueError("snapshots_open_max must be >= 1")


@dataclass(frozen=True, slots=True)
class PartitionStats:
    table: str
    partition: int
    rows: int
    bytes: int
    """Bytes of the storage blocks holding the partition's checkpointed data (a block shared
    with another partition counts for each); rows not yet checkpointed count zero."""


class ReadSnapshot:
    """A read-only DuckDB transaction pinned at `applied_index`; close it (or use `with`)."""

    def __init__(self, store: PartitionStore, cursor: duckdb.DuckDBPyConnection) -> None:
        self._store = store
        self._cursor: duckdb.DuckDBPyConnection | None = cursor
        with _duckdb_errors():
            cursor.execute("BEGIN TRANSACTION READ ONLY")
            # The first statement assigns the snapshot: from here on it is fixed.
            self.applied_index: int = _read_applied_index(cursor)
        self._partitions: list[tuple[str, int]] | None = None

    def query(self, sql: str, inputs: Mapping[str, pa.Table] | None = None) -> pa.Table:
        """Run any read-only SQL over the local partition tables (see `partition_table_sql`)
        and `inputs`: Arrow tables the SQL reads by name, registered on this snapshot's
        cursor only while it runs (unregistered after it, whether it succeeds or fails)."""
        cursor = self._open_cursor()
        with _duckdb_errors():
            if not inputs:
                return cursor.sql(sql).to_arrow_table()
            return _query_with_inputs(cursor, sql, inputs)

    def scan(self, table: str, partition: int, sql_suffix: str = "") -> pa.Table:
        """`SELECT * FROM <partition> <sql_suffix>`, e.g. suffix "WHERE x > 1 ORDER BY x"."""
        return self.query(f"SELECT * FROM {partition_table_sql(table, partition)} {sql_suffix}")

    def partitions(self) -> list[tuple[str, int]]:
        """The (table, partition) pairs this snapshot holds; read once (the transaction's
        catalog is fixed, like its rows)."""
        if self._partitions is None:
            with _duckdb_errors():
                self._partitions = local_partitions(self._open_cursor())
        return list(self._partitions)

    def export_partition(self, table: str, partition: int) -> pa.Table:
        """Every row of the partition, tagged with this snapshot's applied index in the
        schema metadata (`EXPORT_INDEX_KEY`)."""
        data = self.scan(table, partition)
        metadata = {**(data.schema.metadata or {}), EXPORT_INDEX_KEY: b"%d" % self.applied_index}
        return data.replace_schema_metadata(metadata)

    def partition_stats(self) -> list[PartitionStats]:
        cursor = self._open_cursor()
        stats = []
        with _duckdb_errors():
            for table, partition in local_partitions(cursor):
                name = quote_identifier(partition_table_name(table, partition))
                rows = _scalar(cursor, f"SELECT count(*) FROM {name}")
                blocks = _scalar(cursor, _BLOCKS_SQL, [name, name])
                block_bytes = _scalar(cursor, "SELECT block_size FROM pragma_database_size()")
                stats.append(PartitionStats(table, partition, rows, blocks * block_bytes))
        return stats

    def interrupt(self) -> None:
        """From any thread: make the statement running in this snapshot raise
        (`StoreFailed`, from DuckDB's InterruptException) soon. DuckDB then aborts the
        snapshot's transaction, so the snapshot serves nothing more: close it. Harmless when
        no statement runs (DuckDB clears the flag when the next one starts)."""
        cursor = self._cursor
        if cursor is not None:
            cursor.interrupt()

    def close(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is None:
            return
        self._store._forget(self)
        try:
            cursor.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the transaction is gone with the store's database; nothing to release
        finally:
            cursor.close()

    def _open_cursor(self) -> duckdb.DuckDBPyConnection:
        if self._cursor is None:
            raise StoreClosed("read snapshot is closed")
        return self._cursor

    def __enter__(self) -> ReadSnapshot:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_BLOCKS_SQL = """
SELECT count(DISTINCT block) FROM (
    SELECT block_id AS block FROM pragma_storage_info(?) WHERE block_id >= 0
    UNION ALL
    SELECT unnest(additional_block_ids) FROM pragma_storage_info(?)
)
"""


class PartitionStore:
    """The local partitions of one worker in one DuckDB file. Not thread-safe: one caller
    (the worker's loop) applies; a `ReadSnapshot` may be read from another thread."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, config: PartitionStoreConfig) -> None:
        self._connection: duckdb.DuckDBPyConnection | None = connection
        self._config = config
        self._failed = False
        self._snapshots: list[ReadSnapshot] = []
        self._applied_index = _read_applied_index(connection)

    @classmethod
    def open(cls, path: str | Path, config: PartitionStoreConfig | None = None) -> PartitionStore:
        """Open (or create) the database file at `path`; its directory must exist."""
        config = config or PartitionStoreConfig()
        with _duckdb_errors():
            connection = duckdb.connect(
                str(path),
                config={
                    "threads": THREADS,
                    "memory_limit": f"{config.memory_limit_bytes}B",
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                    # Scans hand rows to coordinators as Arrow: UUID, HUGEINT, TIMETZ and
                    # BIT keep their DuckDB types instead of decaying to strings/decimals.
                    "arrow_lossless_conversion": True,
                    # Reads run SQL that coordinators wrote (fragments): read_csv, COPY,
                    # ATTACH, glob, replacement scans of file names and of Python objects
                    # all fail with a PermissionException. DuckDB refuses to turn this
                    # back on while the database is open.
                    "enable_external_access": False,
                    # Fragments join a partition of each table and aggregate. On half of
                    # TPC-H's orders and lineitem DuckDB pre-aggregates orders by key
                    # below the join (750,000 groups) where the whole tables would not:
                    # q12's fragment took 139 ms instead of 26 ms. Results are the same.
                    "disabled_optimizers": DISABLED_OPTIMIZERS,
                },
            )
        try:
            _use_utc(connection)
            with _duckdb_errors():
                _create_state(connection)
            return cls(connection, config)
        except BaseException:
            connection.close()
            raise

    # -- writes -------------------------------------------------------------------------

    def apply(self, index: int, operations: Sequence[Operation]) -> bool:
        """Apply the operations of log entry `index` and record `index` as applied, in one
        transaction. False (and nothing done) if `index` <= applied_index(). An empty list
        just records the index. On `OperationRejected` nothing is applied and the index is
        unchanged: the caller may then `apply(index, ())` to pass over the entry."""
        assert isinstance(index, int) and 1 <= index <= APPLIED_INDEX_MAX, index
        assert len(operations) <= OPERATIONS_PER_ENTRY_MAX, len(operations)
        connection = self._writable()
        if index <= self._applied_index:
            return False
        self._transaction(connection, index, operations)
        self._applied_index = index
        return True

    def create_table(self, index: int, table: str, partition: int, columns_sql: str) -> bool:
        return self.apply(index, [CreateTable(table, partition, columns_sql)])

    def drop_table(self, index: int, table: str) -> bool:
        return self.apply(index, [DropTable(table)])

    def drop_partition(self, index: int, table: str, partition: int) -> bool:
        return self.apply(index, [DropPartition(table, partition)])

    def add_column(self, index: int, table: str, column_sql: str) -> bool:
        return self.apply(index, [AddColumn(table, column_sql)])

    def insert(self, index: int, table: str, partition: int, data: pa.Table) -> bool:
        return self.apply(index, [Insert(table, partition, data)])

    def delete(self, index: int, table: str, partition: int, where_sql: str) -> bool:
        return self.apply(index, [Delete(table, partition, where_sql)])

    def delete_rows(self, index: int, table: str, partition: int, data: pa.Table) -> bool:
        """Delete every row of the partition equal to a row of `data` (see `DeleteRows`)."""
        return self.apply(index, [DeleteRows(table, partition, data)])

    def update(self, index: int, table: str, partition: int, set_sql: str, where_sql: str) -> bool:
        return self.apply(index, [Update(table, partition, set_sql, where_sql)])

    def import_partition(self, index: int, table: str, partition: int, data: pa.Table) -> bool:
        """Replace the rows of an existing local partition with `data` (from
        `export_partition` on a live replica). A partition new to this worker is created in
        the same entry: `apply(index, [CreateTable(...), ImportPartition(...)])`."""
        return self.apply(index, [ImportPartition(table, partition, data)])

    # -- reads --------------------------------------------------------------------------

    def applied_index(self) -> int:
        self._open()
        return self._applied_index

    def snapshot(self) -> ReadSnapshot:
        """A read snapshot at the index applied now."""
        connection = self._writable()
        if len(self._snapshots) >= self._config.snapshots_open_max:
            raise TooManySnapshots(f"{len(self._snapshots)} read snapshots are open")
        snapshot = ReadSnapshot(self, connection.cursor())
        self._snapshots.append(snapshot)
        return snapshot

    def read_at(self, index: int) -> ReadSnapshot:
        """A read snapshot at exactly `index`: call it right after applying entry `index`
        (the read barrier), before applying the next one."""
        if index != self.applied_index():
            raise SnapshotUnavailable(f"asked for index {index}, applied {self._applied_index}")
        snapshot = self.snapshot()
        assert snapshot.applied_index == index, (snapshot.applied_index, index)
        return snapshot

    def scan(self, table: str, partition: int, sql_suffix: str = "") -> pa.Table:
        """Stale read of one partition: what is applied now."""
        with self.snapshot() as snapshot:
            return snapshot.scan(table, partition, sql_suffix)

    def export_partition(self, table: str, partition: int) -> pa.Table:
        with self.snapshot() as snapshot:
            return snapshot.export_partition(table, partition)

    def partitions(self) -> list[tuple[str, int]]:
        with self.snapshot() as snapshot:
            return snapshot.partitions()

    def partition_stats(self) -> list[PartitionStats]:
        """Rows and bytes of every local partition, sorted by (table, partition)."""
        with self.snapshot() as snapshot:
            return snapshot.partition_stats()

    def checkpoint(self) -> None:
        """Write what DuckDB still holds only in its WAL into the database file (so the
        WAL replayed at restart stays short and `partition_stats` counts the bytes).
        Open read snapshots keep their view."""
        connection = self._writable()
        with _duckdb_errors():
            connection.execute("CHECKPOINT")

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close every open snapshot, CHECKPOINT (unless the store failed), close DuckDB."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        for snapshot in list(self._snapshots):
            snapshot.close()
        try:
            if not self._failed:
                with _duckdb_errors():
                    connection.execute("CHECKPOINT")
        finally:
            connection.close()

    def __enter__(self) -> PartitionStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _transaction(
        self, connection: duckdb.DuckDBPyConnection, index: int, operations: Sequence[Operation]
    ) -> None:
        connection.begin()
        number: int | None = None  # the operation running now, for the error
        try:
            for position, operation in enumerate(operations):
                number = position
                run(connection, operation)
            number = None
            connection.execute(f"UPDATE {_STATE} SET applied_index = ?", [index])
            connection.commit()
        except InvalidName as error:
            self._rollback(connection)
            raise OperationRejected(str(error), number) from error
        except duckdb.Error as error:
            typed = classify(error, number)
            if isinstance(typed, StoreFailed):
                self._failed = True  # a failed commit may or may not be on disk: reopen
            self._rollback(connection)
            raise typed from error
        except BaseException:
            self._rollback(connection)
            raise

    def _rollback(self, connection: duckdb.DuckDBPyConnection) -> None:
        try:
            connection.rollback()
            release_rows(connection)
        except duckdb.Error as error:
            self._failed = True
            raise StoreFailed(str(error)) from error

    def _open(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            raise StoreClosed("partition store is closed")
        return self._connection

    def _writable(self) -> duckdb.DuckDBPyConnection:
        connection = self._open()
        if self._failed:
            raise StoreClosed("partition store failed earlier; reopen it to recover")
        return connection

    def _forget(self, snapshot: ReadSnapshot) -> None:
        self._snapshots.remove(snapshot)


@contextmanager
def _duckdb_errors() -> Iterator[None]:
    try:
        yield
    except duckdb.Error as error:
        raise classify(error) from error


def _query_with_inputs(
    cursor: duckdb.DuckDBPyConnection, sql: str, inputs: Mapping[str, pa.Table]
) -> pa.Table:
    registered: list[str] = []
    try:
        for name, rows in inputs.items():
            cursor.register(name, rows)
            registered.append(name)
        result = cursor.sql(sql).to_arrow_table()
    except BaseException:
        # A statement that failed while running aborted the transaction, and DuckDB then
        # refuses to unregister; the names go with the rollback that closes the snapshot.
        for name in registered:
            try:
                cursor.unregister(name)
            except duckdb.Error:
                pass
        raise
    for name in registered:
        cursor.unregister(name)
    return result


def _scalar(
    cursor: duckdb.DuckDBPyConnection, sql: str, parameters: list[str] | None = None
) -> int:
    row = cursor.execute(sql, parameters).fetchone()
    assert row is not None and isinstance(row[0], int), (sql, row)
    return row[0]


def _read_applied_index(connection: duckdb.DuckDBPyConnection) -> int:
    rows = connection.execute(f"SELECT format_version, applied_index FROM {_STATE}").fetchall()
    assert len(rows) == 1, f"{_STATE} must hold one row, holds {len(rows)}"
    format_version, applied_index = rows[0]
    assert format_version == FORMAT_VERSION, f"unknown store format {format_version}"
    assert 0 <= applied_index <= APPLIED_INDEX_MAX, applied_index
    return int(applied_index)


def _create_state(connection: duckdb.DuckDBPyConnection) -> None:
    connection.begin()
    connection.execute("CREATE SCHEMA IF NOT EXISTS dcluster")
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {_STATE} "
        "(format_version INTEGER NOT NULL, applied_index BIGINT NOT NULL)"
    )
    if _scalar(connection, f"SELECT count(*) FROM {_STATE}") == 0:
        connection.execute(f"INSERT INTO {_STATE} VALUES (?, 0)", [FORMAT_VERSION])
    connection.commit()


def _use_utc(connection: duckdb.DuckDBPyConnection) -> None:
    """TIMESTAMPTZ casts and date parts follow the session time zone; pin it to UTC so the
    same SQL gives the same rows on every replica. Without the ICU extension DuckDB has no
    session time zone and already works in UTC."""
    try:
        connection.execute("SET TimeZone = 'UTC'")
    except duckdb.InvalidInputException:
        pass
