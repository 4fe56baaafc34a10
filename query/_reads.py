"""What a statement reads, and the DuckDB it runs in: shared by reads, writes and DDL.

Every statement runs in the coordinator's own DuckDB, the *work database*: the cluster's
tables (exact schemas and constraints, from the shadow catalog's specs) and views, rebuilt
whenever the catalog changes, holding no rows between statements. For one statement the
coordinator gathers the rows of every table the statement may read — for 'strong'
consistency all at one read barrier, so they are one snapshot of the whole cluster — loads
them committed (as single-node DuckDB would hold them), runs the statement inside a
transaction that is always rolled back, and empties the tables again. Results, errors and
error messages are therefore DuckDB's own. Scanned rows may live in transport memory: the
port's read state is released as soon as they are loaded (copied), and on every error. (The catalog's `scratch()` is not used for
this: rows loaded inside its transaction are transaction-local, and DuckDB words a
duplicate-key error against such rows differently from one against committed rows.)

Which tables a statement reads is found lexically with DuckDB's tokenizer: every table
whose name appears as a word of the statement, or of a view it names (recursively), or in
`query_table('…')`/`query('…')`. This over-approximates — an alias or column that shares a
table's name costs a scan — but never misses a table the text names. (`duckdb.
get_table_names` binds DML against a connection and fails on it, and its qualified output
keeps aliases, e.g. "t AS x".)

Also holds the errors of `query` (re-exported by `query.coordinator`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from cluster.sql_protocol import table_key
from query.port import (
    CatalogChanged,
    CatalogView,
    ClusterPort,
    CommandRefused,
    Conflict,
    PortError,
    Unavailable,
    WriteRefused,
)
from query.results import FoundTypes
from storage.catalog import Catalog
from storage.ddl import TableSpec, Token, lex, quote_identifier

BARRIER_ATTEMPTS_MAX = 8
"""Read barriers taken before giving up on a catalog that keeps changing under them."""
VIEW_EXPANSIONS_MAX = 100_000
"""Views expanded while finding what a statement reads (each view at most once)."""
STATEMENTS_PER_SCRIPT_MAX = 100_000
VIEW_ROUNDS_MAX = 1_000
"""Passes over views whose dependencies are created later, when building the work DB."""


# ---------------------------------------------------------------------------------------
# Errors


class SqlError(Exception):
    """Base of every error a statement raises; `str(error)` is meant for the user."""


class DuckDBError(SqlError):
    """DuckDB refused the statement; the message is DuckDB's, unchanged, and
    `duckdb_error` names its exception class (e.g. "ConstraintException")."""

    def __init__(self, message: str, duckdb_error: str) -> None:
        super().__init__(message)
        self.duckdb_error = duckdb_error


class ParseFailed(DuckDBError):
    """DuckDB's parser refused the text."""


class BindFailed(DuckDBError):
    """DuckDB's binder refused the statement: unknown table, column, function or type."""


class ExecutionFailed(DuckDBError):
    """DuckDB raised while running the statement: a constraint, a cast, a file, …"""


class Unsupported(SqlError):
    """Valid DuckDB that dcluster does not run (transactions, most non-DML statements)."""


class Refused(SqlError):
    """dcluster refuses the statement as written (a malformed dcluster clause, a volatile
    DEFAULT in ALTER TABLE, …). Nothing was written."""


class NotPlaceable(Refused):
    """A row's key is in no LIST partition of its table. Nothing was written."""


class WriteConflict(SqlError, Conflict):
    """The tables a statement read kept changing before it could commit; nothing was
    written."""


class ClusterError(SqlError, PortError):
    """The cluster refused or failed the request; the port's message is kept."""


class StageRefused(ClusterError, WriteRefused):
    """Too few holders acknowledged staged rows; nothing was written."""


class CatalogMoved(ClusterError, CatalogChanged):
    """A DDL change no longer applies (DuckDB's message)."""


class CommandRejected(ClusterError, CommandRefused):
    pass


class ClusterUnavailable(ClusterError, Unavailable):
    pass


def cluster_error(error: PortError) -> ClusterError:
    """The port's error as a SqlError that is still an instance of the port's class."""
    for port_class, ours in (
        (WriteRefused, StageRefused),
        (CatalogChanged, CatalogMoved),
        (CommandRefused, CommandRejected),
        (Unavailable, ClusterUnavailable),
    ):
        if isinstance(error, port_class):
            return ours(str(error))
    return ClusterError(str(error))


def from_duckdb(error: duckdb.Error) -> DuckDBError:
    name = type(error).__name__
    if isinstance(error, duckdb.ParserException):
        return ParseFailed(str(error), name)
    if isinstance(error, duckdb.BinderException | duckdb.CatalogException):
        return BindFailed(str(error), name)
    return ExecutionFailed(str(error), name)


# ---------------------------------------------------------------------------------------
# Statement text


TOKENS_CACHED_MAX = 256
"""Statement texts whose tokens `tokens` remembers (the lexer depends on the text alone;
a script is lexed to split it, then each statement again)."""
_TOKENS: dict[str, tuple[Token, ...]] = {}


def tokens(sql: str) -> list[Token]:
    """`storage.ddl.lex` (a fresh list), with the lexer's refusal as dcluster's error."""
    known = _TOKENS.get(sql)
    if known is None:
        try:
            known = tuple(lex(sql))
        except duckdb.Error as error:
            raise from_duckdb(error) from error
        if len(_TOKENS) >= TOKENS_CACHED_MAX:
            _TOKENS.pop(next(iter(_TOKENS)))  # the oldest
        _TOKENS[sql] = known
    return list(known)


def split_script(sql: str) -> list[str]:
    """The statements of a script, cut at top-level ';' by DuckDB's lexer (so dcluster's
    clauses, which DuckDB's own `extract_statements` cannot parse, pass through)."""
    statements: list[str] = []
    current: list[Token] = []
    for token in [*tokens(sql), Token(";", "operator", len(sql), len(sql))]:
        if token.kind == "operator" and token.text == ";":
            if current:
                statements.append(sql[current[0].start : current[-1].end])
            current = []
            continue
        current.append(token)
    if len(statements) > STATEMENTS_PER_SCRIPT_MAX:
        raise Unsupported(f"a script holds at most {STATEMENTS_PER_SCRIPT_MAX} statements")
    return statements


def setting_assignment(words: Sequence[Token], setting: str) -> str | None:
    """The value of `SET [SESSION|GLOBAL|LOCAL] <setting> (=|TO) value`, or None when the
    statement is not that."""
    at = 1
    if len(words) > at and words[at].word() in ("SESSION", "GLOBAL", "LOCAL"):
        at += 1
    if len(words) != at + 3 or not words or words[0].word() != "SET":
        return None
    if words[at].name() != setting or words[at + 1].text not in ("=", "TO", "to"):
        return None
    value = words[at + 2]
    if value.kind == "string_const" and value.text.startswith("'"):
        return value.text[1:-1].replace("''", "'")
    return value.name() or value.text


def _string_value(token: Token) -> str:
    text = token.text
    if text.startswith("$"):
        tag_end = text.index("$", 1) + 1
        return text[tag_end : len(text) - tag_end]
    if text[:1] in ("E", "e"):
        text = text[1:]
    return text[1:-1].replace("''", "'")


def named_words(words: Sequence[Token], skip: Collection[int] = ()) -> set[str]:
    """Every lower-cased name the statement's words could refer to an object by."""
    names: set[str] = set()
    for at, token in enumerate(words):
        if at in skip:
            continue
        name = token.name()
        if name is not None:
            names.add(name)
            continue
        if token.kind != "string_const" or at < 2 or words[at - 1].text != "(":
            continue
        function = words[at - 2].word()
        if function == "QUERY_TABLE":
            names.add(_string_value(token).rsplit(".", 1)[-1].strip('"').lower())
        elif function == "QUERY":
            names |= named_words(tokens(_string_value(token)))
    return names


# ---------------------------------------------------------------------------------------
# The work database


def qualified(spec: TableSpec) -> str:
    return f"{quote_identifier(spec.schema)}.{quote_identifier(spec.name)}"


def specs_by_key(catalog: Catalog) -> dict[str, TableSpec]:
    """Every table's spec by table key, in creation order (parents before FK children)."""
    return {table_key(spec.schema, spec.name): spec for spec in catalog.tables()}


_OBJECTS_SQL = """
SELECT schema_name, table_name, NULL FROM duckdb_tables()
WHERE database_name = current_database() AND NOT temporary AND NOT internal
UNION ALL
SELECT schema_name, view_name, sql FROM duckdb_views()
WHERE database_name = current_database() AND NOT temporary AND NOT internal
"""


class WorkDatabase:
    """The coordinator's own DuckDB (see the module doc). Not thread-safe."""

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._snapshot = b""
        self._specs: dict[str, TableSpec] = {}
        self._objects: dict[str, list[tuple[str, str, str | None]]] = {}
        self._columns: dict[str, list[tuple[str, str]]] = {}
        self.memo: dict[tuple[str, str], Any] = {}
        """What callers derive from the schema (e.g. constraints); emptied on rebuild."""
        self._names = (f"dcluster_rows_{n}" for n in itertools.count())

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
        self._con = None
        self._snapshot = b""
        self._columns = {}
        self.memo = {}

    def prepare(self, catalog: Catalog) -> None:
        """Match the catalog's schema; rebuilt from scratch when it changed."""
        snapshot = catalog.snapshot()
        if self._con is not None and snapshot == self._snapshot:
            return
        self.close()
        with catalog.scratch() as shadow:
            views = shadow.execute(
                "SELECT sql FROM duckdb_views() WHERE NOT internal AND NOT temporary "
                "AND database_name = current_database() ORDER BY view_oid"
            ).fetchall()
        # Exact Arrow both ways: without it UUID, HUGEINT, TIME WITH TIME ZONE, BIT and
        # JSON leave as plain strings or decimals, and a TIMETZ loses its offset.
        con = duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})
        self._specs = specs_by_key(catalog)
        for spec in self._specs.values():
            if spec.schema.lower() != "main":
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(spec.schema)}")
            con.execute(spec.ddl).fetchall()
        _create_views(con, [str(row[0]) for row in views])
        self._objects = {}
        for schema, name, sql in con.execute(_OBJECTS_SQL).fetchall():
            self._objects.setdefault(str(name).lower(), []).append((schema, name, sql))
        self._con, self._snapshot = con, snapshot

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "prepare() first"
        return self._con

    @property
    def specs(self) -> Mapping[str, TableSpec]:
        return self._specs

    def tables_named(self, words: Sequence[Token], skip: Collection[int] = ()) -> list[str]:
        """Keys of the tables the statement may read (see the module doc), sorted."""
        pending = [named_words(words, skip)]
        expanded: set[tuple[str, str]] = set()
        found: set[str] = set()
        while pending:
            for name in sorted(pending.pop()):
                for schema, object_name, view_sql in self._objects.get(name, ()):
                    if view_sql is None:
                        found.add(table_key(schema, object_name))
                    elif (schema, object_name) not in expanded:
                        expanded.add((schema, object_name))
                        assert len(expanded) <= VIEW_EXPANSIONS_MAX
                        pending.append(named_words(tokens(view_sql)))
        return sorted(self._with_referenced(found))

    def _with_referenced(self, keys: set[str]) -> set[str]:
        """`keys` and every table they reference by FOREIGN KEY, transitively: rows of a
        child table can only be loaded into the work database beside its parents'."""
        references = self.memo.get(("fk", "references"))
        if references is None:
            rows = self.con.execute(
                "SELECT schema_name, table_name, referenced_table FROM duckdb_constraints() "
                "WHERE constraint_type = 'FOREIGN KEY' AND database_name = current_database()"
            ).fetchall()
            references = {}
            for schema, table, referenced in rows:
                child = table_key(str(schema), str(table))
                references.setdefault(child, set()).add(table_key(str(schema), str(referenced)))
            self.memo[("fk", "references")] = references
        found = set(keys)
        pending = list(keys)
        while pending:
            for parent in references.get(pending.pop(), ()):
                if parent not in found:
                    found.add(parent)
                    pending.append(parent)
        return found

    def stored_columns(self, spec: TableSpec) -> list[tuple[str, str]]:
        """(name, type) of the table's columns that hold data (not generated), in order."""
        key = table_key(spec.schema, spec.name)
        if key in self._columns:
            return self._columns[key]
        rows = self.con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
            "current_database() AND schema_name = ? AND table_name = ? AND NOT is_generated "
            "ORDER BY column_index",
            [spec.schema, spec.name],
        ).fetchall()
        assert rows, spec.name
        self._columns[key] = [(str(name), str(type_name)) for name, type_name in rows]
        return self._columns[key]

    @contextmanager
    def session(self, tables: Mapping[str, pa.Table]) -> Iterator[duckdb.DuckDBPyConnection]:
        """Load the tables' rows (committed), then yield the connection inside a transaction
        that is rolled back afterwards; the loaded tables are emptied again. Materialise
        every result inside the block."""
        con = self.con
        unknown = sorted(set(tables) - set(self._specs))
        assert not unknown, f"rows for tables the work database does not have: {unknown}"
        loaded: list[TableSpec] = []
        began = False
        try:
            for key, spec in self._specs.items():
                if key in tables:
                    loaded.append(spec)
                    self._load(spec, tables[key])
            con.execute("BEGIN TRANSACTION").fetchall()
            began = True
            yield con
        finally:
            self._empty(loaded, began)

    def register(self, table: pa.Table) -> str:
        name = next(self._names)
        self.con.register(name, table)
        return name

    def _load(self, spec: TableSpec, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        columns = ", ".join(quote_identifier(name) for name, _ in self.stored_columns(spec))
        name = self.register(rows)
        try:
            self.con.execute(
                f"INSERT INTO {qualified(spec)} ({columns}) SELECT {columns} FROM {name}"
            ).fetchall()
        finally:
            self.con.unregister(name)

    def _empty(self, loaded: Sequence[TableSpec], began: bool) -> None:
        con = self.con
        try:
            if began:
                con.execute("ROLLBACK").fetchall()
            for spec in reversed(loaded):  # FK children before their parents
                con.execute(f"DELETE FROM {qualified(spec)}").fetchall()
        except duckdb.Error:
            self.close()  # Rebuilt on the next statement rather than trusted half-emptied.
            raise


class ReadDatabase:
    """A second DuckDB for SELECTs over narrowed tables (query.scans): each table is a view
    named like the cluster's table over the scanned Arrow rows (read in place, not copied),
    with just the columns scanned, typed as in the catalog (cast where Arrow lost the type),
    without constraints (a SELECT cannot see them). Views and rows are dropped after each
    statement. Not thread-safe."""

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._names = (f"dcluster_scanned_{n}" for n in itertools.count())
        self._found_types = FoundTypes()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
        self._con = None

    @contextmanager
    def session(
        self,
        tables: Sequence[tuple[TableSpec, Sequence[tuple[str, str]], pa.Table]],
        copied: bool = False,
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """Each (spec, columns, rows) as a view named like the cluster's table; the rows
        must stay valid until the block ends. Materialise every result inside the block.
        `copied`: tables holding a copy of the rows instead of views, for a statement that
        raised, so that DuckDB words its error as over stored tables (a runtime error's
        position marker differs when the rows are read from Arrow)."""
        if self._con is None:
            self._con = duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})
        con = self._con
        created: list[tuple[str, str]] = []
        kind = "TABLE" if copied else "VIEW"
        try:
            statements = []
            for spec, columns, rows in tables:
                source = next(self._names)
                con.register(source, rows)
                created.append((qualified(spec), source))
                if spec.schema.lower() != "main":
                    statements.append(
                        f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(spec.schema)}"
                    )
                found = self._found_types.read(con, rows)
                typed = []
                for (name, wanted), arrived in zip(columns, found, strict=True):
                    column = quote_identifier(name)
                    same = arrived == wanted
                    typed.append(column if same else f"CAST({column} AS {wanted}) AS {column}")
                statements.append(
                    f"CREATE {kind} {qualified(spec)} AS SELECT {', '.join(typed)} FROM {source}"
                )
            if statements:  # one call for them all: each call costs a few hundred µs
                con.execute("; ".join(statements)).fetchall()
            yield con
        finally:
            try:
                drops = [f"DROP {kind} IF EXISTS {view}" for view, _ in reversed(created)]
                if drops:
                    con.execute("; ".join(drops)).fetchall()
                for _, source in created:
                    con.unregister(source)
            except duckdb.Error:
                self.close()  # opened afresh next time rather than trusted half-emptied


def _create_views(con: duckdb.DuckDBPyConnection, pending: list[str]) -> None:
    for _ in range(VIEW_ROUNDS_MAX):
        if not pending:
            return
        waiting: list[str] = []
        for sql in pending:
            try:
                con.execute(sql).fetchall()
            except duckdb.Error:
                waiting.append(sql)  # Depends on a view created later.
        if len(waiting) == len(pending):
            raise AssertionError(f"views that cannot be created: {waiting}")
        pending = waiting
    raise AssertionError("views kept depending on each other")


# ---------------------------------------------------------------------------------------
# Gathering rows


@dataclass(frozen=True)
class Gathered:
    """The rows of the tables a statement reads, and where they were read."""

    view: CatalogView
    index: int
    """The read barrier's index; 0 when read without one (stale, or nothing to read)."""
    versions: Mapping[str, int]
    """Every table's version at the barrier (empty without one)."""
    tables: dict[str, pa.Table]
    """May point into transport memory: valid until the port's `release(index)`."""
    held: bool
    """The port holds a barrier or scanned rows at `index` until `release(index)`."""


def gather(
    port: ClusterPort,
    view: CatalogView,
    keys_for: Callable[[CatalogView], Sequence[str]],
    *,
    strong: bool,
) -> Gathered:
    """Scan every partition of the tables `keys_for(view)` names. Strong: at one barrier,
    with the catalog as of that barrier (refreshed when it differs, and `keys_for` asked
    again). Stale: what holders have applied now, with the catalog as it is. The caller
    releases what is held (see `loaded`); on an error here it is released already."""
    keys = keys_for(view)
    if not keys:
        return Gathered(view, 0, {}, {}, held=False)
    if not strong:
        try:
            return Gathered(view, 0, {}, _scan(port, view, 0, keys), held=True)
        except BaseException:
            port.release(0)
            raise
    for _ in range(BARRIER_ATTEMPTS_MAX):
        barrier = port.barrier()
        try:
            if barrier.catalog_version != view.catalog_version:
                view = port.catalog(refresh=True)
            if barrier.catalog_version == view.catalog_version:
                tables = _scan(port, view, barrier.index, keys_for(view))
                return Gathered(view, barrier.index, barrier.versions, tables, held=True)
        except BaseException:
            port.release(barrier.index)
            raise
        port.release(barrier.index)
    raise ClusterError(
        f"the catalog changed under {BARRIER_ATTEMPTS_MAX} read barriers in a row; try again"
    )


@contextmanager
def loaded(
    work: WorkDatabase, port: ClusterPort, gathered: Gathered
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A work-database session over the gathered rows, with the schema of the catalog they
    were read with. Loading copies them, so the port's read state is released as soon as
    they are loaded — and in any case on leaving."""
    released = not gathered.held
    try:
        work.prepare(gathered.view.catalog)
        with work.session(gathered.tables) as con:
            if not released:
                released = True
                port.release(gathered.index)
            yield con
    finally:
        if not released:
            port.release(gathered.index)


def _scan(
    port: ClusterPort, view: CatalogView, index: int, keys: Sequence[str]
) -> dict[str, pa.Table]:
    specs = specs_by_key(view.catalog)
    return {key: port.scan(index, key, tuple(range(specs[key].partitions))) for key in keys}


def run(
    con: duckdb.DuckDBPyConnection, sql: str, parameters: object = None
) -> tuple[pa.Table | None, list[str]]:
    """Run one statement; its rows as exact Arrow (None when DuckDB returns no relation)
    and its column types as DuckDB spells them. DuckDB's errors become DuckDBError."""
    try:
        relation = con.sql(sql) if parameters is None else con.sql(sql, params=parameters)
        if relation is None:
            return None, []
        types = [str(type_name) for type_name in relation.types]
        return relation.to_arrow_table(), types
    except duckdb.Error as error:
        raise from_duckdb(error) from error
