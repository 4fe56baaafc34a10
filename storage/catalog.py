"""The shadow catalog: every table's and view's schema in an in-memory DuckDB with no rows,
plus each table's TableSpec (partitioning and placement inputs).

Coordinators use it to bind statements before proposing them (`bind`, `prepare`), so bad SQL
gets DuckDB's own error message; every worker keeps one in its Raft state machine, changed
only by `apply_ddl` on DDL entries of the cluster log, and saved with `snapshot`/`restore`.

Binding never touches data: DDL runs inside a transaction that is rolled back, CREATE TABLE
… AS SELECT binds its query under `LIMIT 0`, and SELECT/INSERT/UPDATE/DELETE/COPY are
bound with `EXPLAIN` (planned, not executed — no file is written by COPY … TO).

Key invariant: the catalog's state is a pure function of the sequence of `apply_ddl` calls.
The same sequence gives byte-identical snapshots, and `apply_ddl` either applies a change
or raises `CatalogConflict` on every worker alike (e.g. a table created twice by concurrent
coordinators: both prepared fine, the second one in log order conflicts everywhere).

Not thread-safe: one worker's event loop owns it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import duckdb
import msgspec

from storage import ddl
from storage.ddl import Column, Statement, StatementKind, TableSpec

SNAPSHOT_VERSION = 1
OBJECTS_MAX = 100_000
"""Most tables and views one catalog holds."""
VIEW_RESTORE_ROUNDS_MAX = 1_000
"""Restore retries views whose dependencies come later; bounded so a bad snapshot ends."""


class CatalogError(Exception):
    """Base of the catalog's expected errors."""


class BindError(CatalogError):
    """DuckDB refused the statement against the shadow catalog. `str(error)` is DuckDB's own
    message, unchanged; `duckdb_error` is its exception class name (e.g. "BinderException")."""

    def __init__(self, message: str, duckdb_error: str) -> None:
        super().__init__(message)
        self.duckdb_error = duckdb_error


class CatalogConflict(CatalogError):
    """A logged DDL change no longer applies (the object appeared or vanished since it was
    prepared). Deterministic: every worker raises it at the same log index."""


class UnknownTable(CatalogError):
    """No such table in the catalog."""


class CreateTable(msgspec.Struct, frozen=True, tag="create_table"):
    """Create a table. `populate_sql`, for CREATE TABLE … AS, is the query whose rows the
    write path inserts afterwards (a bulk write, not part of this catalog change)."""

    spec: TableSpec
    or_replace: bool = False
    if_not_exists: bool = False
    populate_sql: str | None = None


class DropTable(msgspec.Struct, frozen=True, tag="drop_table"):
    schema: str
    name: str
    if_exists: bool = False


class AlterTable(msgspec.Struct, frozen=True, tag="alter_table"):
    """ALTER TABLE … ADD COLUMN, as written (DuckDB runs it verbatim)."""

    schema: str
    name: str
    sql: str


class CreateView(msgspec.Struct, frozen=True, tag="create_view"):
    schema: str
    name: str
    sql: str
    or_replace: bool = False
    if_not_exists: bool = False


class DropView(msgspec.Struct, frozen=True, tag="drop_view"):
    schema: str
    name: str
    if_exists: bool = False


Ddl = CreateTable | DropTable | AlterTable | CreateView | DropView


class _Object(msgspec.Struct, frozen=True):
    """One catalog object in a snapshot. `seq` is its creation order (kept across
    OR REPLACE), which restore follows so dependencies exist before their dependants."""

    seq: int
    kind: Literal["table", "view"]
    schema: str
    name: str
    sql: str
    spec: TableSpec | None = None


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    next_seq: int
    objects: tuple[_Object, ...]


_LINE = re.compile(r"^LINE (\d+):", re.MULTILINE)


class Catalog:
    def __init__(self) -> None:
        self._con = duckdb.connect(":memory:", config={"threads": 1})
        self._objects: dict[tuple[str, str], _Object] = {}
        self._next_seq = 0

    def close(self) -> None:
        self._con.close()

    # -- reading ---------------------------------------------------------------------------

    def tables(self) -> list[TableSpec]:
        """Every table's spec, in creation order."""
        objects = sorted(self._objects.values(), key=lambda item: item.seq)
        return [item.spec for item in objects if item.spec is not None]

    def views(self) -> list[str]:
        objects = sorted(self._objects.values(), key=lambda item: item.seq)
        return [item.name for item in objects if item.kind == "view"]

    def table(self, name: str, schema: str | None = None) -> TableSpec:
        found = self._objects.get(_key(schema or "main", name))
        if found is None or found.spec is None:
            raise UnknownTable(f"no table {name!r} in the catalog")
        return found.spec

    @contextmanager
    def scratch(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The catalog's DuckDB inside a transaction that is always rolled back: a
        coordinator fills tables with rows it read and runs a statement there, with every
        schema, constraint and view exactly as the cluster has them. Nothing it does
        outlives the block. Not re-entrant."""
        with self._rolled_back():
            yield self._con

    # -- binding ---------------------------------------------------------------------------

    def bind(self, sql: str, worker_count: int = 1) -> Statement:
        """Check any statement against the catalog without changing it or touching data.
        Raises BindError with DuckDB's message, or a ddl.DdlError for dcluster's clauses."""
        statement = ddl.parse(sql)
        if statement.kind in ddl.DDL_KINDS:
            self.prepare(sql, worker_count)
            return statement
        # EXPLAIN on a line of its own keeps DuckDB's "LINE n:" context identical but for n.
        self._run_or_bind_error(f"EXPLAIN\n{statement.sql}", line_shift=1)
        return statement

    def prepare(self, sql: str, worker_count: int) -> Ddl | None:
        """Bind a DDL statement and return the change to put into the log, or None when it
        is a no-op now (IF NOT EXISTS on an existing object, IF EXISTS on a missing one)."""
        statement = ddl.parse(sql)
        if statement.kind not in ddl.DDL_KINDS:
            raise ddl.UnsupportedStatement(f"{statement.kind.value} is not DDL")
        with self._rolled_back():
            if statement.kind in (StatementKind.CREATE_TABLE, StatementKind.CREATE_TABLE_AS):
                return self._prepare_create_table(statement, worker_count)
            schema = self._schema_of(statement)
            name = statement.name
            assert name is not None
            exists = self._exists(schema, name, statement.kind)
            self._run_or_bind_error(statement.sql)
            if statement.kind == StatementKind.DROP_TABLE:
                return DropTable(schema, name, statement.if_exists) if exists else None
            if statement.kind == StatementKind.DROP_VIEW:
                return DropView(schema, name, statement.if_exists) if exists else None
            if statement.kind == StatementKind.ALTER_TABLE_ADD_COLUMN:
                return AlterTable(schema, name, statement.sql) if exists else None
            assert statement.kind == StatementKind.CREATE_VIEW
            if exists and statement.if_not_exists:
                return None
            return CreateView(
                schema, name, statement.sql, statement.or_replace, statement.if_not_exists
            )

    def _prepare_create_table(self, statement: Statement, worker_count: int) -> CreateTable | None:
        schema = self._schema_of(statement)
        name = statement.name
        assert name is not None
        if statement.if_not_exists and self._exists(schema, name, statement.kind):
            return None
        create_sql = statement.sql
        if statement.select_sql is not None:
            # Bind the query without running it: a CTAS over read_parquet must not load it.
            prefix = statement.sql[: len(statement.sql) - len(statement.select_sql)]
            assert statement.sql.endswith(statement.select_sql)
            create_sql = f"{prefix}SELECT * FROM (\n{statement.select_sql}\n) LIMIT 0"
        self._run_or_bind_error(create_sql)
        canonical_name, table_ddl, columns = self._describe(schema, name)
        spec = ddl.table_spec(
            statement,
            schema=schema,
            name=canonical_name,
            ddl=table_ddl,
            columns=columns,
            worker_count=worker_count,
            con=self._con,
        )
        return CreateTable(
            spec, statement.or_replace, statement.if_not_exists, statement.select_sql
        )

    # -- applying --------------------------------------------------------------------------

    def apply_ddl(self, change: Ddl) -> None:
        """Apply one logged DDL change, atomically: on CatalogConflict nothing changed."""
        with self._transaction():
            if isinstance(change, CreateTable):
                self._apply_create_table(change)
            elif isinstance(change, DropTable | DropView):
                self._apply_drop(change)
            elif isinstance(change, AlterTable):
                self._apply_alter(change)
            else:
                self._apply_create_view(change)

    def _apply_create_table(self, change: CreateTable) -> None:
        spec = change.spec
        key = _key(spec.schema, spec.name)
        existing = self._objects.get(key)
        if existing is not None:
            if change.if_not_exists:
                return
            if not change.or_replace or existing.kind != "table":
                raise CatalogConflict(f"{existing.kind} {spec.name!r} already exists")
            self._execute_or_conflict(f"DROP TABLE {_qualified(existing)}")
        self._execute_or_conflict(spec.ddl)
        seq = existing.seq if existing is not None else self._take_seq()
        self._objects[key] = _Object(seq, "table", spec.schema, spec.name, spec.ddl, spec)

    def _apply_drop(self, change: DropTable | DropView) -> None:
        kind = "table" if isinstance(change, DropTable) else "view"
        existing = self._objects.get(_key(change.schema, change.name))
        if existing is None or existing.kind != kind:
            if change.if_exists:
                return
            raise CatalogConflict(f"no {kind} {change.name!r} to drop")
        self._execute_or_conflict(f"DROP {kind.upper()} {_qualified(existing)}")
        del self._objects[_key(change.schema, change.name)]

    def _apply_alter(self, change: AlterTable) -> None:
        existing = self._objects.get(_key(change.schema, change.name))
        if existing is None or existing.spec is None:
            raise CatalogConflict(f"no table {change.name!r} to alter")
        self._execute_or_conflict(change.sql)
        _, table_ddl, columns = self._describe(existing.schema, existing.name)
        spec = msgspec.structs.replace(existing.spec, ddl=table_ddl, columns=tuple(columns))
        self._objects[_key(change.schema, change.name)] = msgspec.structs.replace(
            existing, sql=table_ddl, spec=spec
        )

    def _apply_create_view(self, change: CreateView) -> None:
        key = _key(change.schema, change.name)
        existing = self._objects.get(key)
        if existing is not None:
            if change.if_not_exists:
                return
            if not change.or_replace or existing.kind != "view":
                raise CatalogConflict(f"{existing.kind} {change.name!r} already exists")
        self._execute_or_conflict(change.sql)
        row = ddl.one_row(
            self._con,
            "SELECT schema_name, view_name, sql FROM duckdb_views() WHERE NOT internal "
            "AND lower(schema_name) = lower(?) AND lower(view_name) = lower(?)",
            [change.schema, change.name],
        )
        seq = existing.seq if existing is not None else self._take_seq()
        self._objects[key] = _Object(seq, "view", row[0], row[1], row[2])

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        objects = tuple(sorted(self._objects.values(), key=lambda item: item.seq))
        return msgspec.msgpack.encode(_Snapshot(SNAPSHOT_VERSION, self._next_seq, objects))

    @classmethod
    def restore(cls, data: bytes) -> Catalog:
        snapshot = msgspec.msgpack.decode(data, type=_Snapshot)
        if snapshot.version != SNAPSHOT_VERSION:
            raise CatalogError(f"catalog snapshot version {snapshot.version} is not supported")
        catalog = cls()
        tables = [item for item in snapshot.objects if item.kind == "table"]
        pending = [item for item in snapshot.objects if item.kind == "view"]
        for item in tables:
            catalog._con.execute(item.sql).fetchall()
            catalog._objects[_key(item.schema, item.name)] = item
        for _ in range(VIEW_RESTORE_ROUNDS_MAX):
            if not pending:
                break
            waiting: list[_Object] = []
            for item in pending:
                try:
                    catalog._con.execute(item.sql).fetchall()
                except duckdb.Error:
                    waiting.append(item)  # Depends on a view later in the list.
                    continue
                catalog._objects[_key(item.schema, item.name)] = item
            if len(waiting) == len(pending):
                raise CatalogError(f"views that cannot be restored: {[v.name for v in waiting]}")
            pending = waiting
        catalog._next_seq = snapshot.next_seq
        assert catalog.snapshot() == data or not _is_canonical(snapshot)
        return catalog

    # -- helpers ---------------------------------------------------------------------------

    def _take_seq(self) -> int:
        if len(self._objects) >= OBJECTS_MAX:
            raise CatalogConflict(f"the catalog holds at most {OBJECTS_MAX} tables and views")
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _schema_of(self, statement: Statement) -> str:
        if statement.schema is not None:
            return statement.schema
        row = ddl.one_row(self._con, "SELECT current_schema()")
        return str(row[0])

    def _exists(self, schema: str, name: str, kind: StatementKind) -> bool:
        existing = self._objects.get(_key(schema, name))
        if existing is None:
            return False
        wants_view = kind in (StatementKind.CREATE_VIEW, StatementKind.DROP_VIEW)
        return (existing.kind == "view") == wants_view

    def _describe(self, schema: str, name: str) -> tuple[str, str, list[Column]]:
        row = ddl.one_row(
            self._con,
            "SELECT table_name, sql FROM duckdb_tables() WHERE lower(schema_name) = lower(?) "
            "AND lower(table_name) = lower(?) AND database_name = current_database()",
            [schema, name],
        )
        columns = self._con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE lower(schema_name) = "
            "lower(?) AND table_name = ? AND database_name = current_database() "
            "ORDER BY column_index",
            [schema, row[0]],
        ).fetchall()
        return str(row[0]), str(row[1]), [Column(str(c[0]), str(c[1])) for c in columns]

    def _run_or_bind_error(self, sql: str, line_shift: int = 0) -> None:
        try:
            self._con.execute(sql).fetchall()
        except duckdb.Error as error:
            message = str(error)
            if line_shift:
                message = _LINE.sub(lambda m: f"LINE {int(m.group(1)) - line_shift}:", message)
            raise BindError(message, type(error).__name__) from error

    def _execute_or_conflict(self, sql: str) -> None:
        try:
            self._con.execute(sql).fetchall()
        except duckdb.Error as error:
            raise CatalogConflict(str(error)) from error

    @contextmanager
    def _rolled_back(self) -> Iterator[None]:
        self._con.execute("BEGIN TRANSACTION")
        try:
            yield
        finally:
            self._con.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        objects = dict(self._objects)
        next_seq = self._next_seq
        self._con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            self._objects = objects
            self._next_seq = next_seq
            raise
        self._con.execute("COMMIT")


def _key(schema: str, name: str) -> tuple[str, str]:
    # DuckDB matches identifiers case-insensitively, quoted or not.
    return schema.lower(), name.lower()


def _qualified(item: _Object) -> str:
    return f"{ddl.quote_identifier(item.schema)}.{ddl.quote_identifier(item.name)}"


def _is_canonical(snapshot: _Snapshot) -> bool:
    """Whether a snapshot is in the order `snapshot()` writes (restore then re-encodes it
    byte for byte)."""
    seqs = [item.seq for item in snapshot.objects]
    return seqs == sorted(seqs)
