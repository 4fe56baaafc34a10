"""The operations a log entry applies to local partitions, and how each becomes DuckDB SQL.

Each operation is a frozen value; `run` executes one inside the caller's open transaction
(`PartitionStore.apply` owns the transaction and the applied-index update). Partition
tables live in DuckDB's `main` schema under `partition_table_name(table, partition)`:
`<table>__p<partition>`, quoted. The mapping is injective (the suffix is all digits, so the
last `__p` splits it back) and the store's catalog of local partitions is DuckDB's own
catalog read back through `local_partitions` — there is no second list that could disagree.

SQL fragments (`columns_sql`, `where_sql`, …) come from the coordinator, which bound them
against the shadow catalog before proposing; the store trusts its log. Rows always arrive
as Arrow and reach DuckDB through one registered view (a zero-copy Arrow scan), never row
by row in Python. Key invariant: an operation touches only partition tables of its own
table, and only through the connection it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import duckdb
import pyarrow as pa

TABLE_NAME_CHARS_MAX = 200
"""Longer names are refused: DuckDB has no limit, but a log entry should be small."""
PARTITION_MAX = (1 << 20) - 1
"""Partition numbers are 0..PARTITION_MAX."""
ROWS_VIEW = "__dcluster_rows"
"""The name an Arrow table is registered under for the one statement that reads it."""

_PARTITION_NAME = re.compile(r"^(.*)__p(0|[1-9][0-9]*)$", re.DOTALL)


class InvalidName(ValueError):
    """A table name or partition number the store cannot map to a DuckDB table."""


def quote_identifier(name: str) -> str:
    """`name` as a DuckDB quoted identifier (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def check_table(table: str) -> None:
    if not isinstance(table, str) or not table:
        raise InvalidName(f"table name must be a non-empty string, got {table!r}")
    if len(table) > TABLE_NAME_CHARS_MAX:
        raise InvalidName(f"table name longer than {TABLE_NAME_CHARS_MAX} characters")
    if "\x00" in table:
        raise InvalidName("table name contains NUL")


def check_partition(partition: int) -> None:
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise InvalidName(f"partition must be an int, got {partition!r}")
    if not 0 <= partition <= PARTITION_MAX:
        raise InvalidName(f"partition {partition} outside 0..{PARTITION_MAX}")


def partition_table_name(table: str, partition: int) -> str:
    """The unquoted DuckDB table name holding `partition` of `table`."""
    check_table(table)
    check_partition(partition)
    return f"{table}__p{partition}"


def partition_table_sql(table: str, partition: int) -> str:
    """The quoted DuckDB table name, ready to splice into SQL."""
    return quote_identifier(partition_table_name(table, partition))


def local_partitions(connection: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """Every (table, partition) held in this database, sorted, as seen by `connection`'s
    transaction (so DDL earlier in the same transaction counts)."""
    rows = connection.execute(
        "SELECT table_name FROM duckdb_tables() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall()
    held: list[tuple[str, int]] = []
    for (name,) in rows:
        match = _PARTITION_NAME.match(name)
        assert match is not None, f"table {name!r} in main is not a partition table"
        held.append((match.group(1), int(match.group(2))))
    return sorted(held)


def partitions_of(connection: duckdb.DuckDBPyConnection, table: str) -> list[int]:
    check_table(table)
    return [partition for name, partition in local_partitions(connection) if name == table]


@dataclass(frozen=True, slots=True)
class CreateTable:
    """Create one local partition of `table` with the table's column list (and constraints)."""

    table: str
    partition: int
    columns_sql: str


@dataclass(frozen=True, slots=True)
class DropTable:
    """Drop every local partition of `table` (none held: nothing to do)."""

    table: str


@dataclass(frozen=True, slots=True)
class DropPartition:
    """Drop one local partition (it moved away); absent: nothing to do."""

    table: str
    partition: int


@dataclass(frozen=True, slots=True)
class AddColumn:
    """`ALTER TABLE … ADD COLUMN column_sql` on every local partition of `table`."""

    table: str
    column_sql: str


@dataclass(frozen=True, slots=True)
class Insert:
    """Append Arrow rows, matched to columns by name (absent columns take their defaults)."""

    table: str
    partition: int
    data: pa.Table


@dataclass(frozen=True, slots=True)
class Delete:
    table: str
    partition: int
    where_sql: str


@dataclass(frozen=True, slots=True)
class DeleteRows:
    """Delete every row of the partition equal to some row of `data`: all of `data`'s
    columns, matched by name, compared with IS NOT DISTINCT FROM (NULL matches NULL, NaN
    matches NaN, as DuckDB's `=` on nested values does). Every copy of an equal row goes;
    rows of `data` matching nothing are ignored; empty `data` does nothing."""

    table: str
    partition: int
    data: pa.Table


@dataclass(frozen=True, slots=True)
class Update:
    table: str
    partition: int
    set_sql: str
    where_sql: str


@dataclass(frozen=True, slots=True)
class ImportPartition:
    """Replace every row of an existing local partition with `data` (catch-up from a replica)."""

    table: str
    partition: int
    data: pa.Table


Operation = (
    CreateTable
    | DropTable
    | DropPartition
    | AddColumn
    | Insert
    | Delete
    | DeleteRows
    | Update
    | ImportPartition
)


def _insert_arrow(connection: duckdb.DuckDBPyConnection, target_sql: str, data: pa.Table) -> None:
    assert isinstance(data, pa.Table), f"rows must be a pyarrow.Table, got {type(data)}"
    connection.register(ROWS_VIEW, data)
    connection.execute(f"INSERT INTO {target_sql} BY NAME SELECT * FROM {ROWS_VIEW}")
    # On failure the transaction is aborted and refuses even this: the caller releases
    # the view after its rollback (`release_rows`).
    connection.unregister(ROWS_VIEW)


def _delete_arrow(connection: duckdb.DuckDBPyConnection, target_sql: str, data: pa.Table) -> None:
    assert isinstance(data, pa.Table), f"rows must be a pyarrow.Table, got {type(data)}"
    if data.num_rows == 0:
        return
    assert data.num_columns > 0, "rows to delete must have at least one column"
    connection.register(ROWS_VIEW, data)
    connection.execute(delete_rows_sql(target_sql, data.column_names))
    connection.unregister(ROWS_VIEW)  # on failure `release_rows` does it, as for inserts


def delete_rows_sql(target_sql: str, columns: list[str]) -> str:
    """One DELETE joining the partition to the distinct rows of ROWS_VIEW. DuckDB plans the
    conjunction of IS NOT DISTINCT FROM conditions as a hash join (build side: the distinct
    rows); DISTINCT keeps many copies of one row from multiplying the join's output."""
    assert columns, "at least one column"
    matches = " AND ".join(
        f"target.{name} IS NOT DISTINCT FROM doomed.{name}"
        for name in map(quote_identifier, columns)
    )
    return (
        f"DELETE FROM {target_sql} AS target "
        f"USING (SELECT DISTINCT * FROM {ROWS_VIEW}) AS doomed WHERE {matches}"
    )


def release_rows(connection: duckdb.DuckDBPyConnection) -> None:
    """Drop the registered Arrow view, if any, so the rows it references can be freed."""
    connection.unregister(ROWS_VIEW)


def _check_fragment(sql: str, what: str) -> None:
    assert isinstance(sql, str) and sql.strip(), f"{what} must be non-empty SQL"


def run(connection: duckdb.DuckDBPyConnection, operation: Operation) -> None:
    """Execute `operation` on `connection`, inside the caller's transaction."""
    match operation:
        case CreateTable(table, partition, columns_sql):
            _check_fragment(columns_sql, "columns_sql")
            connection.execute(
                f"CREATE TABLE {partition_table_sql(table, partition)} ({columns_sql})"
            )
        case DropTable(table):
            for partition in partitions_of(connection, table):
                connection.execute(f"DROP TABLE {partition_table_sql(table, partition)}")
        case DropPartition(table, partition):
            connection.execute(f"DROP TABLE IF EXISTS {partition_table_sql(table, partition)}")
        case AddColumn(table, column_sql):
            _check_fragment(column_sql, "column_sql")
            for partition in partitions_of(connection, table):
                target = partition_table_sql(table, partition)
                connection.execute(f"ALTER TABLE {target} ADD COLUMN {column_sql}")
        case Insert(table, partition, data):
            _insert_arrow(connection, partition_table_sql(table, partition), data)
        case Delete(table, partition, where_sql):
            _check_fragment(where_sql, "where_sql")
            connection.execute(
                f"DELETE FROM {partition_table_sql(table, partition)} WHERE {where_sql}"
            )
        case DeleteRows(table, partition, data):
            _delete_arrow(connection, partition_table_sql(table, partition), data)
        case Update(table, partition, set_sql, where_sql):
            _check_fragment(set_sql, "set_sql")
            _check_fragment(where_sql, "where_sql")
            target = partition_table_sql(table, partition)
            connection.execute(f"UPDATE {target} SET {set_sql} WHERE {where_sql}")
        case ImportPartition(table, partition, data):
            target = partition_table_sql(table, partition)
            connection.execute(f"DELETE FROM {target}")
            _insert_arrow(connection, target, data)
        case _:
            raise AssertionError(f"not an operation: {operation!r}")
