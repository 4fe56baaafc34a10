"""The partition store's typed errors, split by whether every replica would fail the same way.

`OperationRejected`: the entry itself is wrong against the state (a missing table, a bad
cast, a violated constraint). The state is a pure function of the log prefix, so every
replica rejects the same entry with the same message; the caller may record the entry as
applied with no effect (`apply(index, ())`) and report the message to the client.
`StoreFailed`: the environment failed (disk, memory, DuckDB internals) — another replica may
have succeeded, so the entry must NOT be skipped; the store refuses further use and the
worker restarts and replays. Any DuckDB error class not known to be deterministic counts as
a failure: a crash loop is visible, a silently diverged replica is not.

Every error built from a DuckDB exception carries DuckDB's message unchanged as `str(error)`.
"""

from __future__ import annotations

import duckdb

DETERMINISTIC_DUCKDB_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ProgrammingError,  # catalog, binder, parser, syntax, invalid input
    duckdb.DataError,  # conversion, out of range, type mismatch
    duckdb.IntegrityError,  # constraints
    duckdb.NotSupportedError,
    duckdb.DependencyException,
    duckdb.SequenceException,
)
"""DuckDB errors that depend only on the statement and the data, never on the machine."""


class PartitionStoreError(Exception):
    """Base of every error the partition store raises."""


class OperationRejected(PartitionStoreError):
    """The entry's operation failed deterministically; nothing of the entry was applied."""

    def __init__(self, message: str, operation_number: int | None = None) -> None:
        self.duckdb_message = message
        self.operation_number = operation_number
        """Position of the failing operation in the entry's list (None: not an operation)."""
        super().__init__(message)


class StoreFailed(PartitionStoreError):
    """DuckDB failed for a reason outside the entry; reopen the store (restart) to recover."""

    def __init__(self, message: str) -> None:
        self.duckdb_message = message
        super().__init__(message)


class StoreClosed(PartitionStoreError):
    """The store (or snapshot) was closed, or refused further use after `StoreFailed`."""


class SnapshotUnavailable(PartitionStoreError):
    """`read_at(index)` was asked for an index other than the one applied right now."""


class TooManySnapshots(PartitionStoreError):
    """`snapshots_open_max` read snapshots are open; close one first."""


def classify(error: duckdb.Error, operation_number: int | None = None) -> PartitionStoreError:
    """The typed error for a DuckDB exception, keeping DuckDB's message unchanged."""
    if isinstance(error, DETERMINISTIC_DUCKDB_ERRORS):
        return OperationRejected(str(error), operation_number)
    return StoreFailed(str(error))
