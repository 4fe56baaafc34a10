"""The cluster as the statement coordinator sees it: five primitives, nothing about transport.

`query.coordinator` runs every statement against a `ClusterPort`. The real port
(`cluster.session.TransportPort`) talks to the workers over ipc/; tests use an in-process
fake. Keeping the coordinator behind this seam lets its logic — what to read, what to run
locally, which rows change, where they go — be checked against single-node DuckDB without
starting processes.

Contract of every implementation:

- `catalog()` returns a `CatalogView` at some applied index; `refresh=True` fetches anew.
- `barrier()` appends a read barrier to the cluster log and returns its index and every
  table's version there. Reads with that index see exactly the log prefix up to it.
- `scan(index, table, partitions, columns)` returns the rows of those partitions of the
  table at barrier `index` (0: what some holder has applied now), concatenated, each
  partition from one live holder (another holder on failure). The rows may point into
  transport memory: they stay valid until `release(index)`, which the coordinator calls
  once it has loaded them (for stale reads too, with index 0).
- `fragments(index, fragments)` runs each `Fragment` — one read-only SELECT over physical
  partition tables and the fragment's named `inputs` — on one live node of its `holders`
  at barrier `index` (0: what that node has applied now), all in parallel, retrying
  another holder when one dies or is slow, and returns their results in order (valid
  until `release(index)`, like scans). A fragment DuckDB refuses raises `FragmentFailed`
  with DuckDB's message and class name; so do inputs the workers refuse (empty class).
- `stage(table, rows_by_partition, delete)` writes each partition's rows durably on every
  live holder of the partition and returns the batches to name in the commit. It raises
  `WriteRefused` (nothing is committed) when a partition has fewer acknowledging holders
  than `write_quorum(replicas)`.
- `commit(command)` appends the command through the leader and returns once it is applied
  there; a refusal raises `Conflict` (a version the command expected moved: plan again),
  `CatalogChanged` (DDL no longer applies; DuckDB's message) or `CommandRefused`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from cluster.sql_protocol import CommandKind, StagedBatch, TableWrite, write_quorum
from storage.catalog import Catalog

__all__ = ["write_quorum"]  # with every name defined below


class PortError(Exception):
    """Base of what a port raises; `str(error)` is meant for the user."""


class WriteRefused(PortError):
    """Not enough live holders acknowledged the staged rows; nothing was written."""


class Conflict(PortError):
    """A table the statement read or wrote changed before the commit applied."""


class CatalogChanged(PortError):
    """A DDL change no longer applies (the object appeared or vanished)."""


class CommandRefused(PortError):
    """The cluster refused the command (malformed, expired)."""


class Unavailable(PortError):
    """No worker could serve the request within the time bounds."""


class SnapshotMissing(Unavailable):
    """A read found no snapshot at its read point on any holder asked (the point was
    opened without a log entry, and a holder that did not answer in time has moved past
    it): nothing is wrong with the data; the same read at a new point may be served."""


class FragmentFailed(PortError):
    """DuckDB raised while a worker ran a fragment (a cast, a division by zero, …): the
    message is DuckDB's and `duckdb_error` its exception class name. Empty when the worker
    refused the fragment itself: not exactly one SELECT, a read of a file or the network,
    past the worker's time limit (interrupted), or inputs it does not accept (a bad or
    repeated name, unreadable bytes, too many). Retrying elsewhere would fail again;
    the coordinator then runs the query over gathered rows, for DuckDB's own answer."""

    def __init__(self, message: str, duckdb_error: str) -> None:
        super().__init__(message)
        self.duckdb_error = duckdb_error


@dataclass(frozen=True)
class CatalogView:
    """The shadow catalog at `index` and what the coordinator needs beside it. The
    coordinator may run statements on `catalog`'s DuckDB inside a rolled-back transaction
    (`Catalog.scratch()`), never commit to it."""

    index: int
    catalog_version: int
    catalog: Catalog
    placements: Mapping[str, tuple[tuple[int, ...], ...]]
    """Table key -> holders of each partition (node numbers, primary first)."""
    versions: Mapping[str, int]
    schema_versions: Mapping[str, int]
    members: tuple[int, ...]
    table_rows: Mapping[str, int] = field(default_factory=dict)
    """Estimated rows of each table key, from the answering worker's partition counts
    (may be stale or missing)."""


@dataclass(frozen=True)
class Barrier:
    index: int
    versions: Mapping[str, int]
    catalog_version: int


@dataclass(frozen=True)
class Command:
    """A command before the port stamps it with the client id and request id."""

    kind: CommandKind
    ddl: bytes | None = None
    writes: tuple[TableWrite, ...] = ()
    expected_versions: tuple[tuple[str, int], ...] = ()
    expected_schemas: tuple[tuple[str, int], ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Fragment:
    """One piece of a distributed query, run on one node.

    `sql` is a single read-only SELECT whose base tables are physical partition tables,
    named as `storage.partitions.partition_table_sql(table, partition)` spells them (e.g.
    `"main.lineitem__p3"`); `reads` lists every (table key, partition) it reads, and every
    node in `holders` (in order of preference) holds all of them.

    `inputs` are named Arrow tables sent along with the fragment (e.g. the distinct join
    keys of a small table, for a semi-join reduction): the SQL may read each by its name
    as a table (`… WHERE "k" IN (SELECT k FROM dcluster_keys_0)`), and only while it runs.
    A broadcast table travels the same way (`dcluster_rows_<n>`, read in place of the
    table). Each name must match `cluster.sql_protocol.FRAGMENT_INPUT_NAME`,
    no name may repeat, and together they may be at most
    `cluster.sql_protocol.FRAGMENT_INPUTS_BYTES_MAX` bytes as Arrow IPC streams; otherwise
    the fragment fails with `FragmentFailed` (empty class) without running."""

    sql: str
    reads: tuple[tuple[str, int], ...]
    holders: tuple[int, ...]
    inputs: tuple[tuple[str, pa.Table], ...] = ()


@dataclass(frozen=True)
class FragmentResult:
    rows: pa.Table
    node: int
    """The node whose answer was used."""
    elapsed_us: int = 0
    """How long it ran there, as the node measured it (0: not known)."""


@dataclass(frozen=True)
class Committed:
    index: int
    catalog_version: int = 0
    versions: Mapping[str, int] = field(default_factory=dict)


def estimated_rows(explained: pa.Table) -> int | None:
    """The estimated cardinality of the result in DuckDB's `EXPLAIN (FORMAT json)` answer
    (columns explain_key, explain_value): the top operator's, or the first operator below
    it that names one; None when none does."""
    if explained.num_rows == 0 or "explain_value" not in explained.column_names:
        return None
    try:
        nodes = json.loads(str(explained.column("explain_value")[0].as_py()))
    except ValueError:
        return None
    while isinstance(nodes, list) and nodes:
        node = nodes[0]
        if not isinstance(node, dict):
            return None
        text = (node.get("extra_info") or {}).get("Estimated Cardinality")
        if isinstance(text, str) and text.strip().isdigit():
            return int(text.strip())
        nodes = node.get("children")
    return None


class ClusterPort(Protocol):
    def catalog(self, refresh: bool = False) -> CatalogView: ...

    def barrier(self) -> Barrier:
        """A read point through the log: every holder's snapshot as the entry applies."""
        ...

    def open_read(self) -> Barrier | None:
        """A strong read point without a log entry, or None (nothing held): use `barrier`.
        Its `versions` are empty (a write reads at a log barrier, whose versions it
        commits against)."""
        ...

    def scan(
        self,
        index: int,
        table: str,
        partitions: Sequence[int],
        columns: Sequence[str] | None = None,
    ) -> pa.Table: ...

    def fragments(self, index: int, fragments: Sequence[Fragment]) -> list[FragmentResult]: ...

    def estimates(self, index: int, fragments: Sequence[Fragment]) -> list[int | None]:
        """How many rows each fragment would give, as DuckDB's optimizer estimates them on
        a holder from its partitions' own statistics at `index` (the fragment is planned
        there, not run; `estimated_rows`); None where the plan names no estimate. Raises
        as `fragments` does."""
        ...

    def stage(
        self,
        table: str,
        rows_by_partition: Mapping[int, pa.Table],
        delete: bool = False,
        placement: tuple[tuple[int, ...], ...] | None = None,
    ) -> list[StagedBatch]:
        """`placement`: the holders of each partition, for a table the catalog does not
        have yet (CREATE TABLE … AS: `storage.placement.place(spec, view.members)`)."""
        ...

    def commit(self, command: Command) -> Committed: ...

    def release(self, index: int) -> None:
        """The coordinator is done reading at barrier `index` (best effort)."""
        ...
