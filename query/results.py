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
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeAlias, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

from query.planner import AggregateMerge, MergeExpression, SortMerge
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
    that could overflow (pyarrow's decimal sums wrap around; DuckDB's fail), arithmetic
    not done here exactly (`_computed`), or a result that does not cast exactly to
    `shape`."""
    schema, names = rows.schema, rows.column_names
    if any(not _sorts_alike(schema.field(i).type) for i in range(merge.groups)):
        return None
    needed: list[tuple[str, int]] = []
    for kind, column in merge.outputs:
        if kind == "expression":
            needed += _aggregates_in(merge.expressions[column])
        elif kind == "avg":
            needed += [("sum", column), ("sum", column + 1)]
        elif kind != "group":
            needed.append((kind, column))
    asked: list[tuple[str, str]] = []
    for kind, column in dict.fromkeys(needed):
        field = schema.field(column)
        if kind in ("min", "max", "count_distinct") and not _sorts_alike(field.type):
            return None
        if kind in ("sum", "count") and not _sum_fits(rows.column(column), field.type):
            return None
        asked.append((names[column], "sum" if kind == "count" else kind))
    asked = list(dict.fromkeys(asked))
    grouped = (
        rows.group_by(names[: merge.groups]).aggregate(asked)
        if merge.groups
        else _aggregated_whole(rows, asked)
    )

    def aggregate(kind: str, column: int) -> pa.ChunkedArray:
        values = grouped.column(f"{names[column]}_{'sum' if kind == 'count' else kind}")
        return pc.fill_null(values, 0) if kind in ("count", "count_distinct") else values

    columns = []
    for (kind, column), wanted in zip(merge.outputs, shape, strict=True):
        if kind == "group":
            columns.append(grouped.column(names[column]))
            continue
        if kind == "avg":
            computed = _average(aggregate("sum", column), aggregate("sum", column + 1))
        elif kind == "expression":
            count = len(grouped) if merge.groups else 1  # no groups: one row, always
            computed = _computed(merge.expressions[column], aggregate, count)
            if computed is not None and not _same_scale(computed.type, wanted.type):
                computed = None
        else:
            computed = aggregate(kind, column)
        if computed is None:
            return None
        columns.append(computed)
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


def _aggregates_in(expression: MergeExpression) -> list[tuple[str, int]]:
    """The (aggregate, partial column) pairs a merge expression reads."""
    if expression[0] in ("sum", "min", "max", "count"):
        return [(expression[0], expression[1])]
    if expression[0] == "constant":
        return []
    return [pair for operand in expression[1:] for pair in _aggregates_in(operand)]


Values: TypeAlias = pa.ChunkedArray | pa.Array | pa.Scalar
"""What a merge expression evaluates to: a column, or a constant."""


def _computed(
    expression: MergeExpression, aggregate: Callable[[str, int], pa.ChunkedArray], rows: int
) -> pa.Array | pa.ChunkedArray | None:
    """A merge expression over the grouped aggregates (`rows` of them), as DuckDB computes
    it, or None where that is not sure here: `*` of integers and decimals is DuckDB's exact
    DECIMAL product (refused past 38 digits), `/` and casts to DOUBLE go through DuckDB's
    decimal-to-DOUBLE cast (`_to_double`: below 2^53)."""
    value = _evaluated(expression, aggregate)
    if value is None:
        return None
    if isinstance(value, pa.Scalar):
        return pa.repeat(value, rows)
    return value


def _evaluated(
    expression: MergeExpression, aggregate: Callable[[str, int], pa.ChunkedArray]
) -> Values | None:
    operation = expression[0]
    if operation in ("sum", "min", "max", "count"):
        return aggregate(operation, expression[1])
    if operation == "constant":
        return _constant(expression[1], expression[2])
    operands = [_evaluated(operand, aggregate) for operand in expression[1:]]
    if any(operand is None for operand in operands):
        return None
    if operation == "double":
        return _to_double(operands[0])
    if operation == "/":
        left, right = (_to_double(operand) for operand in operands)
        return None if left is None or right is None else pc.divide(left, right)
    if operation == "*":
        return _product(operands[0], operands[1])
    return None


def _constant(text: str, kind: str) -> pa.Scalar | None:
    """A numeric literal as DuckDB types it."""
    declared = re.fullmatch(r"DECIMAL\((\d+),(\d+)\)", kind)
    if declared:
        width, scale = int(declared[1]), int(declared[2])
        return pa.scalar(Decimal(text), pa.decimal128(width, scale))
    integers = {"INTEGER": pa.int32(), "BIGINT": pa.int64(), "SMALLINT": pa.int16()}
    if kind in integers:
        return pa.scalar(int(text), integers[kind])
    return None


def _magnitude(values: Values) -> Decimal | None:
    """The largest absolute unscaled value (None: all NULL)."""
    if isinstance(values, pa.Scalar):
        low = high = values.as_py()
    else:
        low, high = (value.as_py() for value in pc.min_max(values).values())
    if low is None:
        return None
    scale = values.type.scale if pt.is_decimal(values.type) else 0
    return max(abs(Decimal(low)), abs(Decimal(high))).scaleb(scale)


def _to_double(values: Values) -> Values | None:
    """CAST(values AS DOUBLE) as DuckDB does it (TryCastDecimalToFloatingPoint): a DOUBLE
    as it is; an integer or decimal below 2^53 unscaled as its unscaled integer over
    10^scale; a decimal of scale 1 to 15 below 2^63 unscaled as the integer part plus the
    fraction over 10^scale, each part converted on its own (both parts below 2^53, so
    each converts exactly); None otherwise."""
    kind = values.type
    if pt.is_floating(kind):
        return values
    if not (pt.is_integer(kind) or pt.is_decimal128(kind)):
        return None
    largest = _magnitude(values)
    if largest is not None and largest >= 2**53:
        return _split_to_double(values, largest)
    if pt.is_integer(kind) or kind.scale == 0:
        return pc.cast(_unscaled(values) if pt.is_decimal(kind) else values, pa.float64())
    return pc.divide(pc.cast(_unscaled(values), pa.float64()), float(f"1e{kind.scale}"))


def _split_to_double(values: Values, largest: Decimal) -> Values | None:
    """`_to_double` of decimals some of which are 2^53 or more unscaled: DuckDB's slow
    path for those (integer part + fraction / 10^scale, C++ division: toward zero), its
    fast path for the others. None where this is not sure to be DuckDB's: integers,
    scale 0 or over 15, 2^63 or more, an integer part of 2^53 or more, or exactly 2^53
    (where the two paths meet)."""
    kind = values.type
    if not pt.is_decimal(kind) or not 1 <= kind.scale <= 15 or largest >= 2**63:
        return None
    if largest // 10**kind.scale >= 2**53 or largest == 2**53:
        return None
    numbers = pc.cast(_unscaled(values), pa.int64())
    power = pa.scalar(10**kind.scale, pa.int64())
    whole = pc.divide(numbers, power)  # Arrow's integer division truncates, as C++'s
    if not isinstance(numbers, pa.Scalar) and pc.any(pc.equal(pc.abs(numbers), 2**53)).as_py():
        return None
    divisor = float(10**kind.scale)
    fast = pc.divide(pc.cast(numbers, pa.float64(), safe=False), divisor)  # where below 2^53
    fraction = pc.subtract(numbers, pc.multiply(whole, power))
    slow = pc.add(pc.cast(whole, pa.float64()), pc.divide(pc.cast(fraction, pa.float64()), divisor))
    return pc.if_else(pc.less(pc.abs(numbers), 2**53), fast, slow)


def _product(left: Values, right: Values) -> Values | None:
    """left * right as DuckDB multiplies integers and decimals: exactly, the scales
    added; None for other types or past 38 digits."""
    narrowed = []
    for values in (left, right):
        kind = values.type
        if not (pt.is_integer(kind) or pt.is_decimal128(kind)):
            return None
        scale = kind.scale if pt.is_decimal(kind) else 0
        largest = _magnitude(values)
        digits = max(1, len(str(int(largest)))) if largest is not None else 1
        narrowed.append((values, digits, scale))
    if narrowed[0][1] + narrowed[1][1] + 1 > 38:
        return None
    cast = []
    for values, digits, scale in narrowed:
        if pt.is_integer(values.type):  # Arrow casts an integer to 19 digits or more
            values = pc.cast(values, pa.decimal128(19, 0))
        cast.append(pc.cast(values, pa.decimal128(digits, scale)))
    return pc.multiply(cast[0], cast[1])


def _same_scale(computed: pa.DataType, wanted: pa.DataType) -> bool:
    """A computed decimal has the scale DuckDB's result has (a cast would round)."""
    if pt.is_decimal(computed) or pt.is_decimal(wanted):
        return pt.is_decimal(computed) and pt.is_decimal(wanted) and computed.scale == wanted.scale
    return True


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
            # pa.repeat, not pa.array([scalar]): that one tries to import numpy every call
            f"{name}_{function}": pa.repeat(functions[function](rows.column(name)), 1)
            for name, function in asked
        }
    )


def _average(total: pa.ChunkedArray, count: pa.ChunkedArray) -> Values | None:
    """`CAST(total AS DOUBLE) / count` as DuckDB computes it (`_to_double`), or None when
    that is not sure. A NULL total (no values) stays NULL."""
    if pt.is_floating(total.type) or not pt.is_integer(count.type):
        return None  # a DOUBLE sum's partials may add up in another order
    numerator, denominator = _to_double(total), _to_double(count)
    if numerator is None or denominator is None:
        return None
    return pc.divide(numerator, denominator)


def _unscaled(values: Values) -> Values:
    """Decimals' unscaled integers, as DECIMAL(38, 0) (the same 128 bits read without the
    scale)."""
    if isinstance(values, pa.Scalar):
        unscaled = None if values.as_py() is None else int(values.as_py().scaleb(values.type.scale))
        return pa.scalar(unscaled, pa.decimal128(38, 0))
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    array = array.cast(pa.decimal128(38, values.type.scale))
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
