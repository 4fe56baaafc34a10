"""A statement's result, and its rows turned into what single-node DuckDB gives.

`StatementResult` holds a statement's rows as exact Arrow (DuckDB's lossless encoding)
with the DuckDB types of its columns; `fetchall()`, `arrow()` and `df()` give what
DuckDB's own relation gives for them. Rows go through a DuckDB connection of default
settings (`Converter`), except columns whose Python values pyarrow makes exactly as
DuckDB does (`python_alike`, held to that type by type by tests/unit/query/
test_converter.py), which skip it. `FoundTypes` remembers how DuckDB reads an Arrow
schema, asked once per schema. `sort_merged` and `aggregate_merged` merge a pushdown's
sorted, cut fragments, and a two-phase aggregate's plain partials, in pyarrow where it
orders, groups and adds up as DuckDB does (tests/unit/query/test_sort_merge.py): a merge
in DuckDB costs 2-4 ms of Python API calls, in pyarrow a few hundred microseconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

from query.planner import AggregateMerge, SortMerge
from storage.ddl import quote_identifier

SCHEMAS_KEPT_MAX = 256
"""Arrow schemas whose DuckDB types a `FoundTypes` remembers."""

T = TypeVar("T")


def sort_merged(rows: pa.Table, sort: SortMerge) -> pa.Table | None:
    """`sort` done on `rows` (the fragments' rows, columns as DuckDB types them), or None
    when a key's type is one whose order pyarrow might not give as DuckDB does: only
    integers, decimals, strings (byte order: DuckDB's without a collation), dates,
    timestamps and booleans are sorted here — not floats (NaN), intervals, ENUMs, lists.
    Rows equal on every key may come in any order, as from DuckDB's own sort."""
    schema = rows.schema
    if any(not _sorts_alike(schema.field(position).type) for position, _, _ in sort.keys):
        return None
    names = rows.column_names
    keys = [
        (names[i], "descending" if down else "ascending", "at_start" if first else "at_end")
        for i, down, first in sort.keys
    ]
    ordered = rows.sort_by(keys)
    return ordered.slice(sort.offset, sort.limit).select(range(sort.columns))


def aggregate_merged(rows: pa.Table, merge: AggregateMerge, shape: pa.Schema) -> pa.Table | None:
    """`merge` done on `rows` (the partials, columns as DuckDB types them), with the
    result's Arrow schema `shape` (names and types as single-node DuckDB gives them); None
    when pyarrow might not do it as DuckDB does: a group or min/max column of a type not
    sorted here (floats: -0.0 and NaN), a sum that is not of integers or decimals, a sum
    that could overflow (pyarrow's decimal sums wrap around; DuckDB's fail), or a result
    that does not cast exactly to `shape`."""
    schema, names = rows.schema, rows.column_names
    if any(not _sorts_alike(schema.field(i).type) for i in range(merge.groups)):
        return None
    asked: list[tuple[str, str]] = []
    for kind, column in merge.outputs:
        field = schema.field(column)
        if kind in ("min", "max", "count_distinct") and not _sorts_alike(field.type):
            return None
        summed = (column, column + 1) if kind == "avg" else (column,)
        if kind in ("sum", "count", "avg"):
            if not all(_sum_fits(rows.column(i), schema.field(i).type) for i in summed):
                return None
            asked += [(names[i], "sum") for i in summed]
        elif kind != "group":
            asked.append((names[column], kind))
    grouped = (
        rows.group_by(names[: merge.groups]).aggregate(asked)
        if merge.groups
        else _aggregated_whole(rows, asked)
    )
    columns = []
    for kind, column in merge.outputs:
        if kind == "group":
            columns.append(grouped.column(names[column]))
            continue
        values = grouped.column(f"{names[column]}_{'sum' if kind in ('count', 'avg') else kind}")
        if kind == "avg":
            average = _average(values, grouped.column(f"{names[column + 1]}_sum"))
            if average is None:
                return None
            values = average
        counted = kind in ("count", "count_distinct")
        columns.append(pc.fill_null(values, 0) if counted else values)
    table = pa.Table.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))])
    if merge.sort is not None:
        sorted_table = sort_merged(table, merge.sort)
        if sorted_table is None:
            return None
        table = sorted_table
    try:
        return table.rename_columns(shape.names).cast(shape)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
        return None


def _sum_fits(column: pa.ChunkedArray, kind: pa.DataType) -> bool:
    """The column's sum is an integer or decimal that cannot overflow its Arrow type: at
    most (rows x the largest magnitude) below 2^63 (integers) or 10^38 unscaled."""
    if not (pt.is_integer(kind) or pt.is_decimal128(kind)):
        return False
    low, high = pc.min_max(column).values()
    if low.as_py() is None:
        return True
    largest = max(abs(Decimal(low.as_py())), abs(Decimal(high.as_py())))
    if pt.is_integer(kind):
        return largest * len(column) < 2**63
    return largest.scaleb(kind.scale) * len(column) < Decimal(10) ** 38


def _aggregated_whole(rows: pa.Table, asked: list[tuple[str, str]]) -> pa.Table:
    """`rows.group_by([]).aggregate(asked)` (one row, the same column names) without
    starting an Acero plan for it: a third of a millisecond a query."""
    functions: dict[str, Callable[[pa.ChunkedArray], pa.Scalar]] = {
        "sum": pc.sum,
        "min": pc.min,
        "max": pc.max,
        "count_distinct": lambda column: pc.count_distinct(column, mode="only_valid"),
    }
    return pa.table(
        {
            f"{name}_{function}": pa.array([functions[function](rows.column(name))])
            for name, function in asked
        }
    )


def _average(total: pa.ChunkedArray, count: pa.ChunkedArray) -> pa.Array | None:
    """`CAST(total AS DOUBLE) / count` as DuckDB computes it, or None when that is not
    sure: DuckDB casts a decimal to DOUBLE as its unscaled integer over 10^scale (Arrow's
    cast rounds differently), done here alike while the integer is below 2^53 (exact as a
    DOUBLE). A NULL total (no values) stays NULL."""
    kind = total.type
    if not (pt.is_integer(kind) or pt.is_decimal128(kind)) or not pt.is_integer(count.type):
        return None
    scale = kind.scale if pt.is_decimal128(kind) else 0
    for column, places in ((total, scale), (count, 0)):
        low, high = pc.min_max(column).values()
        if low.as_py() is None:
            continue
        largest = max(abs(Decimal(low.as_py())), abs(Decimal(high.as_py())))
        if largest.scaleb(places) >= 2**53:
            return None
    numerator = total.cast(pa.float64()) if scale == 0 else _unscaled(total).cast(pa.float64())
    if scale:
        numerator = pc.divide(numerator, float(f"1e{scale}"))
    return pc.divide(numerator, count.cast(pa.float64()))


def _unscaled(column: pa.ChunkedArray) -> pa.Array:
    """A decimal column's unscaled integers, as DECIMAL(38, 0) (the same 128 bits read
    without the scale)."""
    array = column.combine_chunks().cast(pa.decimal128(38, column.type.scale))
    return pa.Array.from_buffers(
        pa.decimal128(38, 0), len(array), array.buffers(), offset=array.offset
    )


def _sorts_alike(kind: pa.DataType) -> bool:
    return (
        pt.is_integer(kind)
        or pt.is_decimal(kind)
        or pt.is_string(kind)
        or pt.is_large_string(kind)
        or pt.is_string_view(kind)
        or pt.is_date(kind)
        or pt.is_timestamp(kind)
        or pt.is_boolean(kind)
    )


class FoundTypes:
    """The DuckDB types DuckDB reads an Arrow schema as, asked of DuckDB once per schema
    (a bind costs about half a millisecond; the same schemas come back query after query).
    Keyed by the serialized schema: field metadata (extension types) decides types too."""

    def __init__(self) -> None:
        self._types: dict[bytes, list[str]] = {}

    def read(self, con: duckdb.DuckDBPyConnection, table: pa.Table) -> list[str]:
        """The types DuckDB (`con`) reads `table`'s columns as."""
        key = table.schema.serialize().to_pybytes()
        found = self._types.get(key)
        if found is None:
            con.register("dcluster_typed", table.slice(0, 0))
            try:
                relation = con.sql("SELECT * FROM dcluster_typed")
                found = [str(type_name) for type_name in relation.types]
            finally:
                con.unregister("dcluster_typed")
            self._types[key] = found
            if len(self._types) > SCHEMAS_KEPT_MAX:
                self._types.pop(next(iter(self._types)))
        return found


PYTHON_ALIKE: dict[str, tuple[pa.DataType, ...]] = {
    "BOOLEAN": (pa.bool_(),),
    "TINYINT": (pa.int8(),),
    "SMALLINT": (pa.int16(),),
    "INTEGER": (pa.int32(),),
    "BIGINT": (pa.int64(),),
    "UTINYINT": (pa.uint8(),),
    "USMALLINT": (pa.uint16(),),
    "UINTEGER": (pa.uint32(),),
    "UBIGINT": (pa.uint64(),),
    "FLOAT": (pa.float32(),),
    "DOUBLE": (pa.float64(),),
    "VARCHAR": (pa.string(), pa.large_string(), pa.string_view()),
    "DATE": (pa.date32(),),
    "TIMESTAMP": (pa.timestamp("us"),),
}
"""DuckDB types whose Arrow column (of these types) pyarrow turns into the very Python
values DuckDB's `fetchall()` gives (tests/unit/query/test_converter.py holds them to it).
Not here: HUGEINT (a decimal in Arrow), time zones (DuckDB's TimeZone setting), INTERVAL,
nested and extension types. Dates and timestamps beyond Python's range make pyarrow
raise, and DuckDB is asked then."""


def python_alike(types: Sequence[str], schema: pa.Schema) -> bool:
    """Whether pyarrow's Python values of `schema` are DuckDB's for these `types`."""
    for type_name, field in zip(types, schema, strict=True):
        if field.metadata:
            return False
        arrow = field.type
        if pa.types.is_decimal128(arrow):
            if type_name != f"DECIMAL({arrow.precision},{arrow.scale})":
                return False
        elif arrow not in PYTHON_ALIKE.get(type_name, ()):
            return False
    return len(types) > 0


class Converter:
    """A DuckDB connection with default settings that turns a result's exact Arrow back
    into DuckDB values, so `arrow()`, `fetchall()` and `df()` come out as single-node
    DuckDB's own (ENUM, which Arrow brings back as VARCHAR, is cast back). Created on first
    use: opening a DuckDB costs ~20 ms."""

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._names = (f"dcluster_result_{n}" for n in itertools.count())
        self._found_types = FoundTypes()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
        self._con = None

    def rows(self, table: pa.Table, types: Sequence[str]) -> list[tuple[Any, ...]]:
        """The rows as DuckDB's `fetchall()` gives them: straight from Arrow when every
        column's Python values are DuckDB's anyway (`_python_alike`), else through DuckDB."""
        if python_alike(types, table.schema):
            try:
                return list(zip(*(column.to_pylist() for column in table.columns), strict=True))
            except (OverflowError, ValueError, pa.ArrowException):
                pass  # a date beyond Python's: DuckDB says what it becomes
        return self.apply(table, types, lambda relation: relation.fetchall())

    def apply(
        self, table: pa.Table, types: Sequence[str], action: Callable[[duckdb.DuckDBPyRelation], T]
    ) -> T:
        if self._con is None:
            self._con = duckdb.connect(":memory:")
        con = self._con
        # Positional names: a result may hold two columns of one name.
        renamed = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
        name = next(self._names)
        con.register(name, renamed)
        try:
            found = self._found_types.read(con, renamed)
            select = ", ".join(
                (f"c{i}" if found[i] == types[i] else f"CAST(c{i} AS {types[i]})")
                + f" AS {quote_identifier(column)}"
                for i, column in enumerate(table.column_names)
            )
            return action(con.sql(f"SELECT {select} FROM {name}"))
        finally:
            con.unregister(name)


class StatementResult:
    """What one statement returned. `table` is None when DuckDB returns no relation.

    `rowcount` is DuckDB's: the "Count" of INSERT/UPDATE/DELETE/COPY/CREATE TABLE … AS,
    -1 for anything else (SELECT, RETURNING, DDL)."""

    def __init__(
        self, table: pa.Table | None, types: Sequence[str], rowcount: int, converter: Converter
    ) -> None:
        assert table is None or len(types) == table.num_columns, (types, table)
        self.table = table
        """The rows in exact Arrow (DuckDB's lossless encoding; see `arrow()`)."""
        self._types = list(types)
        self.rowcount = rowcount
        self._converter = converter

    @property
    def columns(self) -> list[str]:
        return [] if self.table is None else list(self.table.column_names)

    @property
    def types(self) -> list[str]:
        """Column types as DuckDB spells them, e.g. 'DECIMAL(10,2)'."""
        return list(self._types)

    def __len__(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    def arrow(self) -> pa.Table | None:
        """The rows as DuckDB's `to_arrow_table()` returns them."""
        return self._apply(lambda relation: relation.to_arrow_table())

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self.table is None:
            return []
        return self._converter.rows(self.table, self._types)

    def fetchone(self) -> tuple[Any, ...] | None:
        """The first row (None when there is none). Stateless, like a relation: the
        cursor-like `dcluster.Connection` is the one that advances."""
        rows = self.slice(0, 1).fetchall()
        return rows[0] if rows else None

    def df(self) -> Any:
        return self._apply(lambda relation: relation.df())

    def show(self) -> None:
        self._apply(lambda relation: relation.show())

    def slice(self, offset: int, length: int | None = None) -> StatementResult:
        table = None if self.table is None else self.table.slice(offset, length)
        return StatementResult(table, self._types, self.rowcount, self._converter)

    def _apply(self, action: Callable[[duckdb.DuckDBPyRelation], T]) -> T | None:
        if self.table is None:
            return None
        return self._converter.apply(self.table, self._types, action)
