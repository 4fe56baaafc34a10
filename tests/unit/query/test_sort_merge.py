"""`query.results.sort_merged` orders and cuts as DuckDB's merge SQL does, and
`aggregate_merged` groups and adds up as it does.

Generated fragments' rows (integers, decimals, unicode strings, dates, timestamps with a
time zone, NULLs everywhere, many ties; booleans beside them) are merged both ways: by DuckDB running
the SQL the planner writes for the merge, and by `sort_merged`. The keys come out in the
same order, and without a cut the rows are the same multiset; with a cut, the rows kept
are rows DuckDB could have kept (ties at the cut may go either way). Key types whose
order pyarrow might give otherwise (floats, intervals, lists) are left to DuckDB.
Generated partials (string and integer groups with NULLs; decimal and integer sums,
counts, min and max, counts of distinct values) give DuckDB's rows and Arrow schema; a
sum that could pass 38 digits, or a float group, is left to DuckDB."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import Decimal

import duckdb
import pyarrow as pa
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from query.planner import AggregateMerge, SortMerge
from query.results import aggregate_merged, sort_merged

COLUMNS = (
    ("c0", pa.int64(), st.integers(-3, 3)),
    ("c1", pa.string(), st.sampled_from(["", "a", "A", "ä", "b", "ab", "😀", "a\u0301", "Z"])),
    (
        "c2",
        pa.decimal128(15, 2),
        st.sampled_from([Decimal("-1.50"), Decimal("0.00"), Decimal("2.25")]),
    ),
    (
        "c3",
        pa.date32(),
        st.sampled_from([dt.date(1992, 1, 1), dt.date(1998, 12, 1), dt.date(1, 1, 1)]),
    ),
    (
        "c4",
        pa.timestamp("us", "UTC"),
        st.sampled_from(
            [
                dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC),
            ]
        ),
    ),
    ("c5", pa.bool_(), st.booleans()),
)
KEYS = 5
"""Columns that may be keys: not c5, a BOOLEAN, which DuckDB sends as the `arrow.bool8`
extension type (an extension is left to DuckDB)."""


def _rows(draw: st.DrawFn) -> pa.Table:
    count = draw(st.integers(0, 40))
    columns = {}
    for name, kind, values in COLUMNS:
        column = draw(st.lists(st.one_of(st.none(), values), min_size=count, max_size=count))
        columns[name] = pa.array(column, kind)
    return pa.table(columns)


@st.composite
def cases(draw: st.DrawFn) -> tuple[pa.Table, SortMerge]:
    rows = _rows(draw)
    positions = draw(st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=3, unique=True))
    keys = tuple((p, draw(st.booleans()), draw(st.booleans())) for p in positions)
    limit = draw(st.one_of(st.none(), st.integers(0, 12)))
    offset = draw(st.integers(0, 5))
    columns = draw(st.integers(1, len(COLUMNS)))
    return rows, SortMerge(columns, keys, limit, offset)


def _duckdb_sql(sort: SortMerge) -> str:
    """The merge SQL the planner writes for `sort`."""
    orders = ", ".join(
        f"c{p}{' DESC' if down else ' ASC'}{' NULLS FIRST' if first else ' NULLS LAST'}"
        for p, down, first in sort.keys
    )
    columns = ", ".join(f"c{i}" for i in range(sort.columns))
    cut = (f" LIMIT {sort.limit}" if sort.limit is not None else "") + (
        f" OFFSET {sort.offset}" if sort.offset else ""
    )
    return f"SELECT {columns} FROM dcluster_fragments ORDER BY {orders}{cut}"


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_sorted_and_cut_as_duckdb_does(con: duckdb.DuckDBPyConnection, case: tuple) -> None:
    generated, sort = case
    rows = con.from_arrow(generated).to_arrow_table()  # as DuckDB sends fragments' rows
    ours = sort_merged(rows, sort)
    assert ours is not None
    con.register("dcluster_fragments", rows)
    try:
        theirs = con.sql(_duckdb_sql(sort)).to_arrow_table()
        # What DuckDB's cut could have kept: every row that sorts at the cut's keys.
        everything = con.sql(_duckdb_sql(SortMerge(len(COLUMNS), sort.keys, None, 0)))
        whole = everything.to_arrow_table()
    finally:
        con.unregister("dcluster_fragments")
    assert ours.schema == theirs.schema
    assert ours.num_rows == theirs.num_rows
    shown = [p for p, _, _ in sort.keys if p < sort.columns]
    assert [ours.column(p).to_pylist() for p in shown] == [
        theirs.column(p).to_pylist() for p in shown
    ]
    kept = Counter(_tuples(ours))
    if sort.limit is None and sort.offset == 0:
        assert kept == Counter(_tuples(theirs))
    else:
        assert not kept - Counter(_tuples(whole.select(range(sort.columns))))


def _tuples(rows: pa.Table) -> list[tuple]:
    return list(zip(*(column.to_pylist() for column in rows.columns), strict=True))


@pytest.mark.parametrize(
    "kind, values",
    [
        (pa.float64(), [1.0, float("nan"), None, -0.0]),
        (
            pa.month_day_nano_interval(),
            [pa.scalar((1, 0, 0), pa.month_day_nano_interval()).as_py()],
        ),
        (pa.list_(pa.int64()), [[1], [0, 2], None]),
        (pa.dictionary(pa.int8(), pa.string()), ["b", "a"]),
        (pa.bool8(), [1, 0, None]),
    ],
)
def test_keys_pyarrow_may_order_otherwise_are_left_to_duckdb(
    kind: pa.DataType, values: list
) -> None:
    rows = pa.table({"c0": pa.array(values, kind), "c1": pa.array(range(len(values)))})
    assert sort_merged(rows, SortMerge(2, ((0, False, False),), None, 0)) is None
    assert sort_merged(rows, SortMerge(2, ((1, True, False),), 1, 0)) is not None


@st.composite
def partials(draw: st.DrawFn) -> pa.Table:
    count = draw(st.integers(0, 30))

    def column(values: st.SearchStrategy, kind: pa.DataType) -> pa.Array:
        drawn = draw(st.lists(st.one_of(st.none(), values), min_size=count, max_size=count))
        return pa.array(drawn, kind)

    return pa.table(
        {
            "c0": column(st.sampled_from(["a", "ä", "", "b"]), pa.string()),
            "c1": column(st.integers(-2, 2), pa.int32()),
            "c2": column(st.decimals(-(10**20), 10**20, places=4), pa.decimal128(38, 4)),
            "c3": column(st.integers(0, 10**9), pa.int64()),
            "c4": column(st.dates(), pa.date32()),
            "c5": column(st.text(max_size=3), pa.string()),
        }
    )


GROUPED = (
    "SELECT g0, g1, sum(a0) AS s, CAST(coalesce(sum(a1), 0) AS BIGINT) AS n, min(a2) AS lo, "
    "max(a3) AS hi FROM (SELECT c0 AS g0, c1 AS g1, c2 AS a0, c3 AS a1, c4 AS a2, c5 AS a3 "
    "FROM dcluster_fragments) GROUP BY g0, g1"
)
WHOLE = (
    "SELECT sum(a0) AS s, CAST(coalesce(sum(a1), 0) AS BIGINT) AS n, min(a2) AS lo, "
    "max(a3) AS hi FROM (SELECT c2 AS a0, c3 AS a1, c4 AS a2, c5 AS a3 FROM dcluster_fragments)"
)
GROUPED_MERGE = AggregateMerge(
    2, (("group", 0), ("group", 1), ("sum", 2), ("count", 3), ("min", 4), ("max", 5)), None
)


DISTINCTS = (
    "SELECT g0, count(DISTINCT a0) AS n, min(a0) AS lo, max(a0) AS hi "
    "FROM (SELECT c0 AS g0, c1 AS a0 FROM dcluster_fragments) GROUP BY g0"
)
DISTINCTS_MERGE = AggregateMerge(
    1, (("group", 0), ("count_distinct", 1), ("min", 1), ("max", 1)), None
)


@settings(max_examples=200, deadline=None)
@given(rows=partials())
def test_aggregates_as_duckdb_does(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
    con.register("dcluster_fragments", rows)
    try:
        theirs = con.sql(GROUPED).to_arrow_table()
        whole_theirs = con.sql(WHOLE).to_arrow_table()
    finally:
        con.unregister("dcluster_fragments")
    ours = aggregate_merged(rows, GROUPED_MERGE, theirs.schema)
    assert ours is not None and ours.schema == theirs.schema
    assert Counter(_tuples(ours)) == Counter(_tuples(theirs))
    no_groups = AggregateMerge(0, (("sum", 0), ("count", 1), ("min", 2), ("max", 3)), None)
    ours_whole = aggregate_merged(rows.select(range(2, 6)), no_groups, whole_theirs.schema)
    assert ours_whole is not None and _tuples(ours_whole) == _tuples(whole_theirs)
    for distinct in ("c1", "c2", "c5"):  # integers, decimals, unicode strings
        partials = rows.select(["c0", distinct]).rename_columns(["c0", "c1"])
        con.register("dcluster_fragments", partials)
        try:
            theirs = con.sql(DISTINCTS).to_arrow_table()
        finally:
            con.unregister("dcluster_fragments")
        ours = aggregate_merged(partials, DISTINCTS_MERGE, theirs.schema)
        assert ours is not None and Counter(_tuples(ours)) == Counter(_tuples(theirs))


def test_a_sum_that_could_overflow_or_a_float_group_is_left_to_duckdb() -> None:
    big = Decimal("60000000000000000000000000000000000000")
    rows = pa.table({"c0": pa.array([big, big], pa.decimal128(38, 0))})
    shape = pa.schema([("s", pa.decimal128(38, 0))])
    assert aggregate_merged(rows, AggregateMerge(0, (("sum", 0),), None), shape) is None
    assert aggregate_merged(rows.slice(0, 1), AggregateMerge(0, (("sum", 0),), None), shape)
    floats = pa.table({"c0": pa.array([0.0, -0.0]), "c1": pa.array([1, 2], pa.int64())})
    merge = AggregateMerge(1, (("group", 0), ("count", 1)), None)
    assert (
        aggregate_merged(floats, merge, pa.schema([("g", pa.float64()), ("n", pa.int64())])) is None
    )


@st.composite
def averaged(draw: st.DrawFn) -> tuple[pa.Table, int]:
    """Partials of AVG: a group, then per total type (DECIMAL(38, s) — what DuckDB's sum
    of decimals and of integers gives — and BIGINT) a partial sum and a partial count;
    NULL sums come with a count of 0, as from a partition whose group had no values."""
    count = draw(st.integers(0, 30))
    scale = draw(st.sampled_from([0, 2, 4, 12]))
    digits = draw(st.sampled_from([6, 15, 17]))  # 17: past 2^53, left to DuckDB
    groups, sums, counts, ints, int_counts = [], [], [], [], []
    for _ in range(count):
        groups.append(draw(st.one_of(st.none(), st.sampled_from(["a", "b", "ä"]))))
        value = draw(st.one_of(st.none(), st.integers(-(10**digits), 10**digits)))
        sums.append(None if value is None else Decimal(value).scaleb(-scale))
        counts.append(0 if value is None else draw(st.integers(1, 10**6)))
        whole = draw(st.one_of(st.none(), st.integers(-(10**12), 10**12)))
        ints.append(whole)
        int_counts.append(0 if whole is None else draw(st.integers(1, 1000)))
    rows = pa.table(
        {
            "c0": pa.array(groups, pa.string()),
            "c1": pa.array(sums, pa.decimal128(38, scale)),
            "c2": pa.array(counts, pa.int64()),
            "c3": pa.array(ints, pa.int64()),
            "c4": pa.array(int_counts, pa.int64()),
        }
    )
    return rows, digits


AVERAGES = (
    "SELECT g0, (CAST(sum(a0) AS DOUBLE) / sum(a1)) AS x, (CAST(sum(a2) AS DOUBLE) / sum(a3)) "
    "AS y FROM (SELECT c0 AS g0, c1 AS a0, c2 AS a1, c3 AS a2, c4 AS a3 FROM dcluster_fragments) "
    "GROUP BY g0"
)


@settings(max_examples=300, deadline=None)
@given(case=averaged())
def test_averages_as_duckdb_does_bit_for_bit(con: duckdb.DuckDBPyConnection, case: tuple) -> None:
    """The merge SQL the planner writes for AVG, and `aggregate_merged`'s ("avg", i), give
    the same DOUBLEs, not merely close ones; sums past 2^53 are left to DuckDB."""
    rows, digits = case
    con.register("dcluster_fragments", rows)
    try:
        theirs = con.sql(AVERAGES).to_arrow_table()
    finally:
        con.unregister("dcluster_fragments")
    merge = AggregateMerge(1, (("group", 0), ("avg", 1), ("avg", 3)), None)
    ours = aggregate_merged(rows, merge, theirs.schema)
    if ours is None:
        assert digits > 15 and rows.num_rows  # left to DuckDB only past 2^53
        return
    assert ours.schema == theirs.schema
    assert Counter(_tuples(ours)) == Counter(_tuples(theirs))


def test_an_average_past_2_to_the_53_is_left_to_duckdb() -> None:
    """Above 2^53 a DOUBLE cannot hold the sum's integer, and DuckDB's rounding of it is
    not Arrow's: such a merge goes to DuckDB."""
    rows = pa.table(
        {
            "c0": pa.array([Decimal(2**53).scaleb(-2)], pa.decimal128(38, 2)),
            "c1": pa.array([3], pa.int64()),
        }
    )
    shape = pa.schema([("x", pa.float64())])
    assert aggregate_merged(rows, AggregateMerge(0, (("avg", 0),), None), shape) is None
    smaller = rows.set_column(
        0, "c0", pa.array([Decimal(2**53 - 1).scaleb(-2)], pa.decimal128(38, 2))
    )
    merged = aggregate_merged(smaller, AggregateMerge(0, (("avg", 0),), None), shape)
    assert merged is not None and merged.column(0).to_pylist() == [(2**53 - 1) / 100 / 3]


LEAVES = (
    ("sum", 1),  # a sum of DECIMAL(38, 4) partials
    ("sum", 2),  # of HUGEINT partials (DECIMAL(38, 0) in Arrow)
    ("count", 3),
    ("max", 1),
    ("constant", "100.00", "DECIMAL(5,2)"),
    ("constant", "0.0001000000", "DECIMAL(11,10)"),
    ("constant", "7.0", "DECIMAL(2,1)"),
    ("constant", "2", "INTEGER"),
)


def _expression(draw: st.DrawFn, depth: int = 0) -> tuple:
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(LEAVES))
    operation = draw(st.sampled_from(["*", "/", "double"]))
    if operation == "double":
        return ("double", _expression(draw, depth + 1))
    return (operation, _expression(draw, depth + 1), _expression(draw, depth + 1))


def _expression_sql(expression: tuple) -> str:
    """The SQL the planner's merge runs for `expression`, over columns c0, c1, …"""
    operation = expression[0]
    if operation == "constant":
        return str(expression[1])
    if operation == "count":
        return f"CAST(coalesce(sum(c{expression[1]}), 0) AS BIGINT)"
    if operation in ("sum", "max"):
        return f"{operation}(c{expression[1]})"
    if operation == "double":
        return f"CAST({_expression_sql(expression[1])} AS DOUBLE)"
    return f"({_expression_sql(expression[1])} {operation} {_expression_sql(expression[2])})"


@st.composite
def computed(draw: st.DrawFn) -> tuple[pa.Table, tuple, bool]:
    count = draw(st.integers(1, 12))
    digits = draw(st.sampled_from([4, 10, 16, 30]))
    grouped = draw(st.booleans())
    groups, sums, wholes, counts = [], [], [], []
    for _ in range(count):
        groups.append(draw(st.sampled_from(["a", "b", None])))
        value = draw(st.one_of(st.none(), st.integers(-(10**digits), 10**digits)))
        sums.append(None if value is None else Decimal(value).scaleb(-4))
        wholes.append(draw(st.one_of(st.none(), st.integers(-(10**digits), 10**digits))))
        counts.append(draw(st.integers(0, 10**6)))
    rows = pa.table(
        {
            "c0": pa.array(groups, pa.string()),
            "c1": pa.array(sums, pa.decimal128(38, 4)),
            "c2": pa.array(wholes, pa.decimal128(38, 0)),
            "c3": pa.array(counts, pa.int64()),
        }
    )
    return rows, _expression(draw), grouped


def _same(ours: list[tuple], theirs: list[tuple]) -> bool:
    """Equal, NaN equal to NaN."""
    key = lambda row: tuple("nan" if v != v else repr(v) for v in row)  # noqa: E731
    return sorted(map(key, ours)) == sorted(map(key, theirs))


@settings(max_examples=400, deadline=None)
@given(case=computed())
def test_expressions_over_aggregates_as_duckdb_does(
    con: duckdb.DuckDBPyConnection, case: tuple
) -> None:
    """`*` and `/` over sums, counts, max and constants, and casts to DOUBLE: what
    `aggregate_merged` computes is what DuckDB's merge SQL gives, bit for bit, or it is
    left to DuckDB (None) — always when DuckDB fails (a product past 38 digits)."""
    rows, expression, grouped = case
    sql = _expression_sql(expression)
    assume(grouped or "(c" in sql)  # without an aggregate or a GROUP BY: not an aggregate query
    con.register("dcluster_fragments", rows)
    try:
        if grouped:
            theirs = con.sql(f"SELECT c0, {sql} AS x FROM dcluster_fragments GROUP BY c0")
        else:
            theirs = con.sql(f"SELECT {sql} AS x FROM dcluster_fragments")
        their_rows = theirs.to_arrow_table()
    except duckdb.Error:
        their_rows = None
    finally:
        con.unregister("dcluster_fragments")
    outputs = ((("group", 0),) if grouped else ()) + (("expression", 0),)
    merge = AggregateMerge(1 if grouped else 0, outputs, None, (expression,))
    if their_rows is None:
        shape = pa.schema(([("c0", pa.string())] if grouped else []) + [("x", pa.float64())])
        assert aggregate_merged(rows, merge, shape) is None
        return
    ours = aggregate_merged(rows, merge, their_rows.schema)
    if ours is not None:
        assert ours.schema == their_rows.schema
        assert _same(_tuples(ours), _tuples(their_rows)), (sql, ours, their_rows)


@pytest.mark.parametrize(
    "expression",
    [
        ("/", ("*", ("constant", "100.00", "DECIMAL(5,2)"), ("sum", 1)), ("sum", 2)),  # q14
        ("*", ("sum", 1), ("constant", "0.0001000000", "DECIMAL(11,10)")),  # q11
        ("/", ("sum", 1), ("sum", 2)),  # q08
        ("/", ("double", ("sum", 1)), ("count", 3)),
    ],
)
def test_tpch_merge_expressions_are_computed_here(
    con: duckdb.DuckDBPyConnection, expression: tuple
) -> None:
    rows = pa.table(
        {
            "c0": pa.array(["a", "a"]),
            "c1": pa.array([Decimal("12345.6789"), Decimal("-2.5000")], pa.decimal128(38, 4)),
            "c2": pa.array([Decimal(1_000_000), Decimal(3)], pa.decimal128(38, 0)),
            "c3": pa.array([7, 0], pa.int64()),
        }
    )
    _computed_here_as_duckdb_does(con, rows, expression)


def _computed_here_as_duckdb_does(
    con: duckdb.DuckDBPyConnection, rows: pa.Table, expression: tuple
) -> None:
    """`expression` over `rows` without groups: merged in pyarrow, as DuckDB's merge SQL."""
    con.register("dcluster_fragments", rows)
    try:
        theirs = con.sql(f"SELECT {_expression_sql(expression)} AS x FROM dcluster_fragments")
        their_rows = theirs.to_arrow_table()
    finally:
        con.unregister("dcluster_fragments")
    merge = AggregateMerge(0, (("expression", 0),), None, (expression,))
    ours = aggregate_merged(rows, merge, their_rows.schema)
    assert ours is not None and _tuples(ours) == _tuples(their_rows)


def test_q14_sized_decimals_past_2_to_the_53_are_computed_here(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """q14's `100.00 * sum(a0)` at sf 1 is past 2^53 unscaled (scale 6): it is cast to
    DOUBLE as DuckDB does above 2^53 (integer part plus fraction), not left to DuckDB."""
    expression = ("/", ("*", ("constant", "100.00", "DECIMAL(5,2)"), ("sum", 1)), ("sum", 2))
    rows = pa.table(
        {
            "c0": pa.array(["a", "a"]),
            "c1": pa.array([Decimal("612345678.9123"), Decimal("-1.0001")], pa.decimal128(38, 4)),
            "c2": pa.array([Decimal("3456789012.3457"), Decimal(3)], pa.decimal128(38, 4)),
            "c3": pa.array([7, 0], pa.int64()),
        }
    )
    _computed_here_as_duckdb_does(con, rows, expression)
