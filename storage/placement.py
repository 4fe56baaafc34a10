"""Where partitions live and which partition each row belongs to.

Holders: on the sorted worker list W (N workers), partition p's R copies go to
W[(p·R + k) % N] for k in 0..R-1 — copy number c = p·R + k lands on W[c % N] — so one
partition's copies are on R distinct workers and every worker holds ⌊PR/N⌋ or ⌈PR/N⌉
copies. Of its holders, the one with the fewest primaries so far becomes the primary (ties to
the nearest at or after W[p % N]); primaries spread within two of each other (the tests
check it over N ≤ 12, P ≤ 64), exactly evenly when R = 1; not always when P = N (e.g.
N=5, R=3). An exactly-even primary choice is a small matching problem, left for later. The simpler
W[(p + k) % N] rule is uneven whenever P is not a multiple of N (P=2, R=2, N=4 leaves a
worker empty and gives another two copies). We chose a fixed rule over rendezvous hashing
because it spreads evenly by construction and is easy to check; rendezvous hashing's
advantage, little movement when the worker set changes, does not apply: the placement is
computed once and recorded in the cluster log, and later changes are explicit placement
entries, not recomputation. The rule sorts the workers first, so it depends on the set of
workers, not on the order they were listed.

Rows: the partition of a row is computed by DuckDB, in SQL, never row by row in Python:

- HASH: `hash(CAST(key AS <key type>)) % P`. The cast pins the hash to the column's
  declared type (an Arrow int64 and the table's INTEGER must hash alike). DuckDB's hash of
  NULL is a constant, so NULL keys all land in one partition. DuckDB does not promise its
  hash is stable across versions: every worker of a cluster must run the same DuckDB.
- RANGE: the index of the first bound greater than the key — partition i holds
  [bounds[i-1], bounds[i]). NULL keys go to partition 0 (they sort first, as NULLS FIRST).
- LIST: the partition whose list holds the key (a NULL key matches a list holding NULL).
  A key in no list makes DuckDB raise, surfaced as `RowNotPlaceable` for the write to report.
- REFERENCE: one partition, 0.

Key invariant: `holders` and `partition_expression` are pure functions of their inputs;
every worker computes the same placement and the same partition for every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import msgspec
import pyarrow as pa

from storage.ddl import TableSpec, literal, one_row, quote_identifier

WORKERS_MAX = 4096
"""Most workers a placement is computed for."""
_ARROW_VIEW = "dcluster_partition_input"


class PlacementError(Exception):
    """Placement cannot be computed with these inputs (the caller's fault)."""


class RowNotPlaceable(Exception):
    """A row's key is in no LIST partition; the write is refused. The message is DuckDB's
    error text carrying dcluster's explanation and the key."""


class TablePlacement(msgspec.Struct, frozen=True):
    """Holders of each partition of one table, primary first. Recorded in the cluster log."""

    table: str
    holders: tuple[tuple[int, ...], ...]

    def primary(self, partition: int) -> int:
        return self.holders[partition][0]

    def partitions_of(self, worker: int) -> tuple[int, ...]:
        return tuple(p for p, held_by in enumerate(self.holders) if worker in held_by)


def holders(partitions: int, replicas: int, workers: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Each partition's holders, primary first, R distinct workers (see the module doc)."""
    ordered = sorted(workers)
    count = len(ordered)
    if len(set(ordered)) != count:
        raise PlacementError(f"worker ids repeat: {ordered}")
    if not 1 <= count <= WORKERS_MAX:
        raise PlacementError(f"need between 1 and {WORKERS_MAX} workers, have {count}")
    if not 1 <= replicas <= count:
        raise PlacementError(f"{replicas} replicas need at least as many workers, have {count}")
    if partitions < 1:
        raise PlacementError(f"a table has at least one partition, not {partitions}")
    primaries = [0] * count  # partitions each worker is primary of so far, by index
    result: list[tuple[int, ...]] = []
    for partition in range(partitions):
        # Copy number c = p·R + k goes to worker c % N: consecutive, so R ≤ N copies of one
        # partition are on distinct workers and all copies spread within one of each other.
        chosen = [(partition * replicas + k) % count for k in range(replicas)]
        primary = min(chosen, key=lambda index: (primaries[index], (index - partition) % count))
        primaries[primary] += 1
        chosen.remove(primary)
        result.append((ordered[primary], *(ordered[index] for index in chosen)))
    assert all(len(set(held_by)) == replicas for held_by in result)
    return tuple(result)


def place(spec: TableSpec, workers: Sequence[int]) -> TablePlacement:
    """The placement of a table: a reference table's single partition is on every worker."""
    if spec.reference:
        return TablePlacement(spec.name, holders(1, len(workers), workers))
    return TablePlacement(spec.name, holders(spec.partitions, spec.replicas, workers))


def partition_expression(spec: TableSpec, column_sql: str | None = None) -> str:
    """A DuckDB SQL expression of type INTEGER giving each row's partition id.

    `column_sql` is the SQL for the key (default: the spec's key column, quoted)."""
    if spec.reference:
        return "CAST(0 AS INTEGER)"
    assert spec.key is not None and spec.key_type is not None
    key = column_sql if column_sql is not None else quote_identifier(spec.key)
    typed = f"CAST({key} AS {spec.key_type})"
    if spec.kind == "hash":
        return f"CAST(hash({typed}) % {spec.partitions} AS INTEGER)"
    if spec.kind == "range":
        cases = [f"WHEN {typed} IS NULL THEN 0"]
        cases += [
            f"WHEN {typed} < {literal(bound, spec.key_type)} THEN {index}"
            for index, bound in enumerate(spec.bounds)
        ]
        return f"CAST(CASE {' '.join(cases)} ELSE {len(spec.bounds)} END AS INTEGER)"
    assert spec.kind == "list", spec.kind
    cases = []
    for index, values in enumerate(spec.lists):
        members = ", ".join(literal(value, spec.key_type) for value in values)
        test = f"{typed} IN ({members})"
        if any(value is None for value in values):
            test = f"({typed} IS NULL OR {test})"
        cases.append(f"WHEN {test} THEN {index}")
    message = (
        f"'dcluster: key ' || coalesce(CAST({typed} AS VARCHAR), 'NULL') || "
        f"' of table {spec.name.replace(chr(39), chr(39) * 2)} is in no LIST partition'"
    )
    return f"CAST(CASE {' '.join(cases)} ELSE error({message}) END AS INTEGER)"


def partition_of_table(
    con: duckdb.DuckDBPyConnection, table: pa.Table, spec: TableSpec
) -> pa.Array:
    """Each row's partition id (int32), in row order, computed by DuckDB over the Arrow
    table. Raises RowNotPlaceable for a LIST key in no list."""
    names = {name.lower() for name in table.column_names}
    if spec.key is not None and spec.key.lower() not in names:
        raise PlacementError(f"the rows have no column {spec.key!r} to partition on")
    row = one_row(con, "SELECT current_setting('preserve_insertion_order')")
    assert row[0], "partition ids must come back in row order"
    con.register(_ARROW_VIEW, table)
    try:
        # A plain projection keeps row order under DuckDB's default
        # preserve_insertion_order = true (checked below, and by the tests).
        relation = con.sql(f"SELECT {partition_expression(spec)} AS partition FROM {_ARROW_VIEW}")
        assert relation is not None
        result = relation.to_arrow_table()
    except duckdb.InvalidInputException as error:
        if "is in no LIST partition" in str(error):
            raise RowNotPlaceable(str(error)) from error
        raise
    finally:
        con.unregister(_ARROW_VIEW)
    column = result.column("partition")
    assert len(column) == table.num_rows
    return column.combine_chunks()
