"""Writes: run INSERT/UPDATE/DELETE/COPY FROM once, in the coordinator's DuckDB, and ship
only the rows that changed.

The statement runs against the rows it reads (gathered at one read barrier) in the work
database, so DuckDB itself evaluates every expression once — random(), now() and uuid()
included — and raises every constraint and cast error before anything is staged. What
changed is then computed in DuckDB over the target's stored columns. `before` is a copy of
the target (with its rowids) taken before the statement ran; a row of `before` and a row
of `after` with the same rowid and the identical value are the same, unchanged row (any
such pairing gives a correct answer; the rowid makes it cheap). Then, under the workers'
delete semantics — "delete every row equal (IS NOT DISTINCT FROM) to one of these":

    gone     = DISTINCT rows of before without an identical partner in after
    deleted  = gone                       -- every row equal to one of these goes …
    inserted = rows of after without a partner in before, unless equal to a `gone` row
               UNION ALL rows of after equal to a `gone` row   -- … and those come back

So a statement that treats identical rows differently (by rowid, LIMIT, a random
condition) is written exactly as DuckDB left the table, and so is a change DuckDB's
equality cannot see (0.0 to -0.0, '1 month' to '30 days', 'a' to 'A' under NOCASE):
"identical" compares such values by their text. For a blind insert (no key, nothing read
from the target) there is no `before`: the target holds just the inserted rows.
Rows are split by partition with the table's
`partition_expression`, evaluated by DuckDB in one ORDER BY, and cut into zero-copy slices
of at most ROWS_PER_BATCH_MAX rows or about BYTES_PER_BATCH_MAX bytes; the commit names
each partition's deletes before its inserts, so applying it can never fail half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from cluster.sql_protocol import StagedBatch, table_key
from query._reads import (
    NotPlaceable,
    Token,
    Unsupported,
    WorkDatabase,
    from_duckdb,
    qualified,
    run,
)
from query.port import ClusterPort
from storage.ddl import StatementKind, TableSpec, quote_identifier
from storage.placement import partition_expression

ROWS_PER_BATCH_MAX = 1_000_000
"""Most rows in one staged batch of one partition."""
BYTES_PER_BATCH_MAX = 64 * 1024 * 1024
"""About the most Arrow bytes in one staged batch of one partition."""
PARTITION_COLUMN = "dcluster_partition_id"
_BEFORE = "temp.main.dcluster_before"
_FEWER = "temp.main.dcluster_fewer"
_ROWID = "dcluster_rowid"


@dataclass(frozen=True)
class Target:
    """The table a write names, as written, and the positions of its name's tokens."""

    schema: str | None
    name: str
    positions: tuple[int, ...]


def find_target(words: list[Token]) -> Target | None:
    """The table an INSERT/UPDATE/DELETE/COPY … FROM writes (after any leading WITH); None
    for a COPY that reads (COPY t TO, COPY (query) TO)."""
    depth = 0
    for at, token in enumerate(words):
        if token.text in ("(", ")"):
            depth += 1 if token.text == "(" else -1
            continue
        verb = token.word()
        if depth or verb not in ("INSERT", "UPDATE", "DELETE", "COPY"):
            continue
        if verb == "COPY" and at + 1 < len(words) and words[at + 1].text == "(":
            return None
        name_at = at + 1
        if verb in ("INSERT", "DELETE"):
            name_at = _next_word(words, at, "INTO" if verb == "INSERT" else "FROM") + 1
        target = _name_at(words, name_at)
        if verb == "COPY" and _copy_reads(words, target.positions[-1] + 1):
            return None
        return target
    raise Unsupported("dcluster could not find the table this statement writes")


def _next_word(words: list[Token], at: int, word: str) -> int:
    for index in range(at + 1, len(words)):
        if words[index].word() == word:
            return index
    raise Unsupported(f"dcluster could not find {word} in the statement")


def _name_at(words: list[Token], at: int) -> Target:
    parts: list[str] = []
    positions: list[int] = []
    while at < len(words) and words[at].name() is not None:
        text = words[at].text
        parts.append(text[1:-1].replace('""', '"') if text.startswith('"') else text)
        positions.append(at)
        if at + 1 < len(words) and words[at + 1].text == ".":
            positions.append(at + 1)
            at += 2
            continue
        break
    if not parts:
        raise Unsupported("dcluster could not find the table this statement writes")
    return Target(parts[-2] if len(parts) > 1 else None, parts[-1], tuple(positions))


def _copy_reads(words: list[Token], at: int) -> bool:
    """After `COPY name`: True for TO (a read), False for FROM (a write)."""
    depth = 0
    for token in words[at:]:
        if token.text in ("(", ")"):
            depth += 1 if token.text == "(" else -1
        elif depth == 0 and token.word() in ("FROM", "TO"):
            return token.word() == "TO"
    raise Unsupported("COPY needs FROM or TO")


# ---------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class WritePlan:
    key: str
    spec: TableSpec
    columns: tuple[tuple[str, str], ...]
    """The target's stored columns (name, type): what is compared and shipped."""
    needs_existing: bool
    """The statement's effect depends on the target's rows (UPDATE, DELETE, a key, ON
    CONFLICT, INSERT OR …, or it reads the target): they are read and diffed."""
    reads: tuple[str, ...]
    """Keys of every table read at the barrier, the target included when needs_existing."""


def plan_write(
    work: WorkDatabase, kind: StatementKind, words: list[Token], target: Target
) -> WritePlan | None:
    """What the write reads; None when the target is no table of the catalog."""
    key = table_key(target.schema or "main", target.name)
    spec = work.specs.get(key)
    if spec is None:
        return None
    named = set(work.tables_named(words, skip=target.positions))
    memo_key = ("constraints", key)
    if memo_key not in work.memo:
        work.memo[memo_key] = _constraints(work.con, spec)
    unique, parents, children = work.memo[memo_key]
    texts = [token.word() for token in words]
    on_conflict = any(texts[at : at + 2] == ["ON", "CONFLICT"] for at in range(len(texts)))
    insert_or = any(texts[at : at + 2] == ["INSERT", "OR"] for at in range(len(texts)))
    needs_existing = (
        kind in (StatementKind.UPDATE, StatementKind.DELETE)
        or unique
        or on_conflict
        or insert_or
        or key in named
    )
    reads = named | parents
    if needs_existing:
        reads |= children | {key}
    columns = tuple(work.stored_columns(spec))
    return WritePlan(key, spec, columns, needs_existing, tuple(sorted(reads)))


def _constraints(
    con: duckdb.DuckDBPyConnection, spec: TableSpec
) -> tuple[bool, set[str], set[str]]:
    """Whether the table has a PRIMARY KEY/UNIQUE; the tables its foreign keys reference;
    the tables whose foreign keys reference it (DuckDB checks both on a write)."""
    rows = con.execute(
        "SELECT schema_name, table_name, constraint_type, referenced_table "
        "FROM duckdb_constraints() WHERE database_name = current_database() "
        "AND lower(schema_name) = lower(?) AND (lower(table_name) = lower(?) "
        "OR lower(referenced_table) = lower(?))",
        [spec.schema, spec.name, spec.name],
    ).fetchall()
    unique, parents, children = False, set(), set()
    own = spec.name.lower()
    for schema, table, kind, referenced in rows:
        if str(table).lower() == own and kind in ("PRIMARY KEY", "UNIQUE"):
            unique = True
        elif str(table).lower() == own and kind == "FOREIGN KEY":
            parents.add(table_key(schema, referenced))
        elif kind == "FOREIGN KEY" and referenced is not None and referenced.lower() == own:
            children.add(table_key(schema, table))
    parents.discard(table_key(spec.schema, spec.name))
    children.discard(table_key(spec.schema, spec.name))
    return unique, parents, children


# ---------------------------------------------------------------------------------------
# Running and diffing


@dataclass(frozen=True)
class Changes:
    """Rows to delete and to insert, by partition, each cut into bounded slices."""

    deleted: dict[int, list[pa.Table]]
    inserted: dict[int, list[pa.Table]]

    def empty(self) -> bool:
        return not self.deleted and not self.inserted


def run_write(
    con: duckdb.DuckDBPyConnection, plan: WritePlan, sql: str, parameters: object
) -> tuple[pa.Table | None, list[str], Changes]:
    """Run the statement in a work-database session holding the rows it reads; DuckDB's
    result, its column types and the rows that changed, materialised (see the module doc)."""
    names = [quote_identifier(name) for name, _ in plan.columns]
    columns = ", ".join(names)
    target = qualified(plan.spec)
    if not plan.needs_existing:
        table, types = run(con, sql, parameters)
        return table, types, Changes({}, export(con, f"SELECT {columns} FROM {target}", plan.spec))
    if any(name.lower() in ("rowid", _ROWID) for name, _ in plan.columns):
        raise Unsupported(
            f"{plan.spec.name} has a column named rowid (or {_ROWID}), which hides DuckDB's "
            "row ids; dcluster pairs rows by them to tell what a write changed"
        )
    con.execute(
        f"CREATE TEMP TABLE {_BEFORE.rsplit('.', 1)[1]} AS "
        f"SELECT rowid AS {_ROWID}, {columns} FROM {target}"
    ).fetchall()
    table, types = run(con, sql, parameters)
    collated = "COLLATE" in plan.spec.ddl.upper()
    identical = " AND ".join(
        _identical(f"a.{n}", f"b.{n}", type_name, collated)
        for n, (_, type_name) in zip(names, plan.columns, strict=True)
    )
    equal = " AND ".join(f"a.{n} IS NOT DISTINCT FROM f.{n}" for n in names)
    kept = f"SELECT 1 FROM {_BEFORE} AS b WHERE b.{_ROWID} = a.rowid AND {identical}"
    gone = f"SELECT 1 FROM {target} AS a WHERE a.rowid = b.{_ROWID} AND {identical}"
    alike = f"SELECT 1 FROM {_FEWER} AS f WHERE {equal}"
    con.execute(
        f"CREATE TEMP TABLE {_FEWER.rsplit('.', 1)[1]} AS SELECT DISTINCT {columns} "
        f"FROM {_BEFORE} AS b WHERE NOT EXISTS ({gone})"
    ).fetchall()
    prefixed = ", ".join(f"a.{n}" for n in names)
    # Rows without an identical partner in before, and every row equal to a gone one.
    inserted_sql = (
        f"SELECT {prefixed} FROM {target} AS a WHERE NOT EXISTS ({kept}) OR EXISTS ({alike})"
    )
    deleted = export(con, f"SELECT * FROM {_FEWER}", plan.spec)
    inserted = export(con, inserted_sql, plan.spec)
    return table, types, Changes(deleted, inserted)


_FLOATING = ("DOUBLE", "FLOAT", "REAL")
_NESTED_MARKS = ("[", "STRUCT", "MAP", "UNION")


def _identical(left: str, right: str, type_name: str, collated: bool) -> str:
    """SQL: the two values are the same value, not just equal. DuckDB's equality makes
    0.0 = -0.0, INTERVAL '1 month' = '30 days' and, under a collation, 'a' = 'A'; such
    values are told apart by their sign bit, or else by the bytes of their text (dearer:
    only for intervals, collated tables' strings, and nested values holding either)."""
    upper = type_name.upper()
    equal = f"{left} IS NOT DISTINCT FROM {right}"
    if upper in _FLOATING:
        return f"{equal} AND signbit({left}) IS NOT DISTINCT FROM signbit({right})"
    nested = any(mark in upper for mark in _NESTED_MARKS)
    inexact = ("INTERVAL" in upper) or (collated and "VARCHAR" in upper)
    if inexact or (nested and any(name in upper for name in _FLOATING)):
        text = "encode(CAST({} AS VARCHAR))"
        return f"{equal} AND {text.format(left)} IS NOT DISTINCT FROM {text.format(right)}"
    return equal


def export(con: duckdb.DuckDBPyConnection, sql: str, spec: TableSpec) -> dict[int, list[pa.Table]]:
    """The query's rows by partition of `spec`, computed and ordered by DuckDB."""
    query = (
        f"SELECT *, {partition_expression(spec)} AS {PARTITION_COLUMN} "
        f"FROM ({sql}) AS dcluster_rows ORDER BY {PARTITION_COLUMN}"
    )
    try:
        rows = con.sql(query).to_arrow_table()
    except duckdb.Error as error:
        if "is in no LIST partition" in str(error):
            raise NotPlaceable(f"{error}; nothing was written") from error
        raise from_duckdb(error) from error
    return split_by_partition(rows, spec.partitions)


def split_by_partition(rows: pa.Table, partitions: int) -> dict[int, list[pa.Table]]:
    """Cut rows ordered by PARTITION_COLUMN into bounded zero-copy slices per partition."""
    if rows.num_rows == 0:
        return {}
    ids = rows.column(PARTITION_COLUMN)
    data = rows.drop_columns([PARTITION_COLUMN])
    counts = pc.value_counts(ids)
    runs = sorted(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )
    bytes_per_row = max(1, data.nbytes // data.num_rows)
    rows_max = max(1, min(ROWS_PER_BATCH_MAX, BYTES_PER_BATCH_MAX // bytes_per_row))
    result: dict[int, list[pa.Table]] = {}
    offset = 0
    for partition, count in runs:
        assert 0 <= partition < partitions, (partition, partitions)
        assert ids[offset].as_py() == partition, "rows must come ordered by partition"
        end = offset + count
        result[partition] = [
            data.slice(start, min(rows_max, end - start)) for start in range(offset, end, rows_max)
        ]
        offset = end
    assert offset == data.num_rows
    return result


def stage(
    port: ClusterPort,
    key: str,
    changes: Changes,
    placement: tuple[tuple[int, ...], ...] | None = None,
) -> tuple[StagedBatch, ...]:
    """Stage every slice on its partition's holders (deletes, then inserts, a round of at
    most one slice per partition per call) and return the batches in commit order: each
    partition's deletes before its inserts. `placement`: the holders, for a table the
    catalog does not have yet. WriteRefused passes through."""
    batches: list[StagedBatch] = []
    for delete, chunks in ((True, changes.deleted), (False, changes.inserted)):
        rounds = max((len(slices) for slices in chunks.values()), default=0)
        for round_number in range(rounds):
            batch = {
                partition: slices[round_number]
                for partition, slices in sorted(chunks.items())
                if round_number < len(slices)
            }
            staged = port.stage(key, batch, delete=delete, placement=placement)
            assert all(item.delete == delete for item in staged), staged
            assert sum(item.rows for item in staged) == sum(t.num_rows for t in batch.values())
            batches.extend(staged)
    # A stable sort: slices of one partition keep their order.
    return tuple(sorted(batches, key=lambda item: (item.partition, not item.delete)))
