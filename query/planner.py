"""The distributed plan of a SELECT: what runs on the partitions, what the coordinator merges.

`plan_select(con, sql, view, specs, columns_of)` reads DuckDB's parse tree of the query
(query._ast) and picks the cheapest tier that is exactly right:

- **pushdown**: the query is correct run per partition and concatenated — its base tables
  are one group of co-located partitioned tables (same partitioning, same holders, joined
  by equality on their partition keys) plus reference tables, with no aggregation across
  partitions (none, or grouped by the partition key), and window functions only when each
  one's PARTITION BY names a partition key (`_check_windows`). DISTINCT runs on the partitions and
  again on the merge; ORDER BY … LIMIT k runs as a top-k on each partition (LIMIT k +
  OFFSET) and once more on the merge.
- **two-phase aggregation**: the same FROM/WHERE, aggregated on each partition into
  partial states per group (COUNT, SUM, MIN, MAX, AVG as sum and count, BOOL_AND/OR,
  STDDEV/VARIANCE as count, sum and sum of squares), merged by a final GROUP BY on the
  coordinator, with GROUPING SETS/ROLLUP/CUBE, HAVING, ORDER BY and LIMIT applied there.
  FILTER clauses stay on the partials.
- **router**: either of the above restricted to the partitions the WHERE clause pins by
  the partition key (`key = c`, `key IN (c, …)`).
- **repartition** and **broadcast** (with either): partitioned tables not co-located
  with the main group (`_choose_moves`) are scanned first and moved to its fragments
  (`Broadcast`): dealt out by a column joined to a main partition key (`Split`: each
  fragment gets its partition's rows, and the table plans as a co-located one), or sent
  whole with every fragment, counting as a reference table — when small enough and never
  on an outer join's preserved side. A moved table's conditions applied by its scan read
  TRUE in the fragment, and its scan keeps only the columns the fragment names. A
  repartitioned table whose other columns the grouped query reads only in COUNT, SUM,
  MIN and MAX is aggregated by its split column where it is scanned (eager aggregation,
  `_eager_aggregated`): partial aggregates are dealt out, not rows.
- **WITH** queries are put in place of their references, as DuckDB inlines them
  (`_inlined_ctes`; not recursive ones), and the statement is planned so.
- **UNION [ALL]** of SELECTs that each push down as they are: every side's fragments, cast
  to the union's types, and one merge (`_union`); **INTERSECT/EXCEPT [ALL]** of two such
  SELECTs over one partitioning, each selecting its key at the same position: per
  partition, both sides in one fragment (`_paired`).
- subqueries in expressions run inside the fragments when each sees only the outer row's
  partition (`_check_subqueries`), and a query reading one derived table that is a plain
  join, or a join grouped by a partition key, is planned over that join's FROM and WHERE
  (`_core`).
- otherwise **gather** (the caller's fallback): `plan_select` returns a `Gather` saying
  why, and the coordinator pulls the base tables and runs the query itself.

Guarantee: a `Distributed` plan's merge over its fragments' rows returns what the query
returns on the whole data (rows as a multiset; in order where ORDER BY fixes it); any
shape this module is not sure of becomes `Gather`. Fragments name physical partition
tables (`storage.partitions.partition_table_sql`), so a worker runs them as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import msgspec

from query import _ast
from query._ast import Node
from query.port import CatalogView, Fragment
from query.scans import ScanPlan, TableScan, condition_sql
from storage import ddl
from storage.ddl import TableSpec, quote_identifier
from storage.partitions import partition_table_name
from storage.placement import partition_expression

FRAGMENTS_RELATION = "dcluster_fragments"
"""The name the merge SQL reads the fragments' concatenated rows by."""
BROADCAST_ROWS_MAX = 2_000_000
"""A table estimated to have more rows is never broadcast."""
REPARTITION_ROWS_MAX = 50_000_000
"""A table estimated to have more rows is never repartitioned (its scanned rows pass
through the coordinator's memory at once)."""
BROADCAST_RATIO = 2
"""A broadcast table is estimated to have this many times fewer rows than the largest
table of the partitions the fragments run on, or it is not broadcast."""
BROADCAST_INPUT = "dcluster_rows_{}"
"""The input name a broadcast table travels under (`FRAGMENT_INPUT_NAME`)."""
EXACT_THROUGH_ARROW = re.compile(
    r"BOOLEAN|TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT"
    r"|FLOAT|DOUBLE|DECIMAL\(\d+,\d+\)|VARCHAR|BLOB|DATE|TIME|TIMESTAMP|TIMESTAMP_S"
    r"|TIMESTAMP_MS|TIMESTAMP_NS|TIMESTAMP WITH TIME ZONE|INTERVAL"
)
"""DuckDB column types (full match) that come back from Arrow as themselves, or as a type
they cast back from exactly: what a broadcast table, or a WITH query's answer, may hold."""
_SUBQUERY_POSITION = 1_000_000
"""Positions of subqueries' tables start here (never broadcast)."""
PINNED_VALUES_MAX = 1_000
"""IN-lists longer than this are not used to route (every partition is read)."""

AGGREGATE_NAMES_CACHED_MAX = 10_000
_AGGREGATE_NAMES: dict[str, bool] = {}
"""Function name -> is it an aggregate, for every DuckDB connection of this process (the
built-in functions are the same for all; a user macro's name is looked up each time)."""
_EAGER_SUMMED = re.compile(
    r"TINYINT|SMALLINT|INTEGER|BIGINT|UTINYINT|USMALLINT|UINTEGER|DECIMAL\(([1-9]|1[0-8]),\d+\)"
)
"""Column types whose partial sums a scan may take for eager aggregation: no partial can
overflow (a HUGEINT or 38-digit sum of them), and none is a float."""
_SIMPLE_AGGREGATES = {"min": "min", "max": "max", "bool_and": "bool_and", "bool_or": "bool_or"}
_VARIANCES = {
    "var_samp": "samp",
    "variance": "samp",
    "stddev": "samp",
    "stddev_samp": "samp",
    "var_pop": "pop",
    "stddev_pop": "pop",
}


@dataclass(frozen=True)
class Gather:
    """No distributed plan: the coordinator gathers the tables. `reason` says why."""

    reason: str


@dataclass(frozen=True)
class SortMerge:
    """A pushdown's merge in terms pyarrow can carry out (`query.results.sort_merged`):
    the first `columns` columns of the fragments' rows, ordered by `keys` ((column,
    descending, NULLs first) triples), then `offset` rows skipped and at most `limit`
    kept. The same as `merge_sql`, which stays the reference."""

    columns: int
    keys: tuple[tuple[int, bool, bool], ...]
    limit: int | None
    offset: int


MergeExpression = tuple[Any, ...]
"""An `AggregateMerge` output computed from aggregates of the partials, as nested tuples:
("sum" | "min" | "max" | "count", column), ("constant", SQL text, DuckDB type),
("*" | "/", left, right) or ("double", operand) — a cast to DOUBLE."""


@dataclass(frozen=True)
class AggregateMerge:
    """A two-phase merge in terms pyarrow can carry out (`query.results.aggregate_merged`):
    the partials grouped by their first `groups` columns, each output either a group
    column or one aggregate of one partial column — ("group", i), ("sum", i), ("min", i),
    ("max", i), ("count", i): a sum of counts, 0 for none, ("avg", i): the sum of partial
    sums i over the sum of partial counts i + 1, as a DOUBLE, or ("count_distinct", i):
    how many distinct non-NULL values column i holds (the partials of distinct
    pre-aggregation) — then ordered and cut by `sort` (keys on the outputs), if any. No
    HAVING, DISTINCT modifier, grouping sets or expressions around the aggregates;
    `merge_sql` stays the reference."""

    groups: int
    outputs: tuple[tuple[str, int], ...]
    sort: SortMerge | None
    expressions: tuple[MergeExpression, ...] = ()
    """The outputs ("expression", k): `*` and `/` over aggregates of the partials and
    constants, computed as DuckDB computes them (`query.results.aggregate_merged`)."""


@dataclass(frozen=True)
class Distributed:
    tier: str
    """'pushdown' or 'two_phase' (with ' + router' when partitions were pruned)."""
    fragments: tuple[Fragment, ...]
    fragment_sql: str
    """The fragment's SQL with logical table names (for EXPLAIN)."""
    merge_sql: str
    """Runs over FRAGMENTS_RELATION, whose columns are c0, c1, …"""
    fragment_types: tuple[str, ...]
    """DuckDB's types of the fragment's columns (Arrow loses some, e.g. ENUM's order)."""
    partitions: tuple[int, ...]
    """The partitions read (all of them unless routed)."""
    partitions_total: int
    tables: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    broadcasts: tuple[Broadcast, ...] = ()
    """Tables scanned first and sent with every fragment (`Fragment.inputs`)."""
    sort_merge: SortMerge | None = None
    """The merge as a sort (and cut) of the fragments' rows, when it is one."""
    aggregate_merge: AggregateMerge | None = None
    """The merge as plain aggregates of the partials, when it is one."""

    @property
    def concatenates(self) -> bool:
        """The merge only puts the fragments' rows one after another: all their columns,
        in order, nothing sorted, cut or made distinct."""
        columns = ", ".join(f"c{i}" for i in range(len(self.fragment_types)))
        return self.merge_sql == f"SELECT {columns} FROM {FRAGMENTS_RELATION}"


class _NotDistributable(Exception):
    pass


@dataclass(frozen=True)
class Split:
    """How a repartitioned table's rows are dealt out: each goes to the fragment of the
    partition its `column`'s value falls in under `spec`'s partitioning (the main group's:
    `partition_expression(spec, column)`)."""

    column: str
    spec: TableSpec


@dataclass(frozen=True)
class Broadcast:
    """A table moved to the fragments (as scanned: `scan`'s columns and rows) under the
    input name `name`, read there as a table: sent whole with every fragment, or, with
    `split`, repartitioned: each fragment gets only the rows of its own partition."""

    scan: TableScan
    name: str
    split: Split | None = None


@dataclass(frozen=True)
class _Move:
    """How one table of the FROM clause reaches the main group's fragments: broadcast
    (`split` None) or repartitioned; `rows` is its estimated size."""

    split: Split | None
    placed_as: str
    """The main table whose placement a repartitioned table takes."""
    rows: int


@dataclass(frozen=True)
class _Option:
    """One way to move the tables not co-located with a main group (`_choose_moves`)."""

    rows: int
    """Estimated rows moved, a broadcast table's once per fragment."""
    order: int
    """The main group's place, largest first (the tie-break)."""
    moves: dict[int, _Move]
    copies: int
    """Fragments: how many times a broadcast table is sent."""


@dataclass
class _Leaf:
    node: Node
    key: str
    spec: TableSpec
    alias: str
    position: int
    """Its place among the FROM clause's tables, left to right (stable across copies)."""
    broadcast: bool = False
    repartitioned: bool = False
    """Its rows are dealt out to the fragments by `spec`'s key (`Split`): `spec` is then
    the main group's partitioning over that column, and `placed_as` the main table whose
    placement it takes — it plans as a table co-located with the main group."""
    placed_as: str = ""

    @property
    def replicated(self) -> bool:
        """Every fragment reads all of its rows (a reference table, or broadcast)."""
        return self.spec.reference or self.broadcast

    @property
    def moved(self) -> bool:
        """Its rows travel with the fragments (`Broadcast`), not read where they are."""
        return self.broadcast or self.repartitioned

    @property
    def placement(self) -> str:
        """The table key whose placement this table's partitions follow."""
        return self.placed_as or self.key


def plan_select(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    view: CatalogView,
    specs: Mapping[str, TableSpec],
    columns_of: Callable[[TableSpec], Sequence[str]],
    output_names: Sequence[str],
    scans: Callable[[], ScanPlan | str] | None = None,
    whole_bytes: Callable[[TableScan, set[str]], int] | None = None,
    broadcast_bytes_max: int = 0,
) -> Distributed | Gather:
    """The plan of one SELECT bound against `con` (the work database, whose tables match
    `specs`); `columns_of(spec)` lists a table's columns, `output_names` the query's result
    columns as DuckDB binds them. `scans()` gives the query's narrowed scans (query.scans),
    which broadcast tables are read by; without it nothing is broadcast. `whole_bytes(scan,
    moved)` estimates the bytes of a table scanned so (beside the tables `moved`) when it
    is surely read whole, else 0; a broadcast of more than `broadcast_bytes_max` of them
    is sure to be too large (`_Planner._choose_moves`)."""
    try:
        planner = _Planner(con, view, specs, columns_of, output_names, scans)
        planner.whole_bytes, planner.broadcast_bytes_max = whole_bytes, broadcast_bytes_max
        return planner.plan(sql)
    except _NotDistributable as why:
        return Gather(str(why))
    except _ast.NotATree as error:
        return Gather(f"DuckDB cannot print its parse tree back ({error})")


class _Planner:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        view: CatalogView,
        specs: Mapping[str, TableSpec],
        columns_of: Callable[[TableSpec], Sequence[str]],
        output_names: Sequence[str] = (),
        scans: Callable[[], ScanPlan | str] | None = None,
    ) -> None:
        self.output_names = [name.lower() for name in output_names]
        self._scans = scans
        self.whole_bytes: Callable[[TableScan, set[str]], int] | None = None
        self.broadcast_bytes_max = 0
        self._broadcast: dict[int, Broadcast] = {}
        """FROM position -> how that table is moved to the fragments."""
        self._moves: dict[int, _Move] = {}
        """FROM position -> how that table is moved (while choosing, and once chosen)."""
        self._aggregate_names: dict[str, bool] = {}
        self.con = con
        self.view = view
        self.specs = specs
        self.columns_of = columns_of
        self.by_name: dict[str, list[str]] = {}
        for key, spec in specs.items():
            self.by_name.setdefault(spec.name.lower(), []).append(key)

    # ---- the whole query ----

    def plan(self, sql: str) -> Distributed | Gather:
        node = _ast.parse(self.con, sql)
        if ddl.volatile_functions(sql, self.con):
            raise _NotDistributable("a volatile function must be evaluated once")
        if node.get("cte_map", {}).get("map"):
            inlined = _inlined_ctes(node)
            if inlined is None or inlined.get("type") != "SELECT_NODE":
                raise _NotDistributable("a WITH clause")
            try:  # as DuckDB inlines them: the same rows, without volatile functions
                return self._select(inlined)
            except _NotDistributable as why:
                raise _NotDistributable(f"a WITH clause ({why}, its queries inlined)") from why
        if node.get("type") == "SET_OPERATION_NODE":
            return self._union(node)
        if node.get("type") != "SELECT_NODE":
            raise _NotDistributable(f"a {node.get('type')} at the top")
        return self._select(node)

    def _select(self, node: Node) -> Distributed:
        if node.get("sample") is not None:
            raise _NotDistributable("SAMPLE")
        if any(
            n.get("type") == "DISTINCT_MODIFIER" and n.get("distinct_on_targets")
            for n in node["modifiers"]
        ):
            raise _NotDistributable("DISTINCT ON")
        for item in _ast.walk(node):
            if item.get("class") == "PARAMETER":
                raise _NotDistributable("a prepared parameter")
        core = self._core(node)
        if node.get("qualify") is not None and core is not node:
            raise _NotDistributable("QUALIFY over a derived table")
        self._check_expressions(node, windows_ok=core is node)
        self._check_expressions(core, windows_ok=core is node)
        self._choose_moves(core)
        leaves = self._leaves(core["from_table"])
        partitioned = [leaf for leaf in leaves if not leaf.replicated]
        where = _ast.conjuncts(core.get("where_clause"))
        self._check_subqueries(core, [leaves], partitioned, {id(term) for term in where})
        if core is not node:  # the outer query sees only the derived table's columns
            self._check_subqueries(node, [[]], partitioned, set())
        if not partitioned:
            return self._on_one_node(node, leaves)
        self._check_co_located(core, partitioned)
        self._check_windows(node, partitioned)
        if core is not node and (self._aggregates(core) or core.get("group_expressions")):
            if not self._grouped_by_key(core, partitioned):
                raise _NotDistributable("a SUBQUERY in FROM aggregated across partitions")
        partitions = self._routed(core, partitioned)
        if self._aggregates(node) or node.get("group_expressions"):
            if core is node and self._grouped_by_key(node, partitioned):
                return self._pushdown(node, leaves, partitioned, partitions, "grouped by the key")
            return self._two_phase(node, leaves, partitioned, partitions)
        return self._pushdown(node, leaves, partitioned, partitions, "")

    def _union(self, node: Node) -> Distributed:
        """UNION [ALL] of SELECTs that each run on the partitions as they are (pushdown,
        no aggregation, no ORDER BY, LIMIT or DISTINCT of their own, no moved tables):
        every side's fragments, their columns cast to the union's types, and one merge
        that concatenates them (UNION: distinct, each fragment distinct already), then
        orders and cuts. Exact whatever the sides' partitionings: each row of each side
        comes from exactly one of its fragments. INTERSECT and EXCEPT, whose rows pair up
        across sides, are gathered."""
        if node.get("setop_type") in ("INTERSECT", "EXCEPT"):
            return self._paired(node)
        if node.get("setop_type") != "UNION":
            raise _NotDistributable(f"{node.get('setop_type')}")
        distinct = not node.get("setop_all")
        types = self._types(node)
        fragments: list[Fragment] = []
        partitions: list[int] = []
        texts: list[str] = []
        tables: set[str] = set()
        total = 0
        for side in _sides(node):
            plan = self._side(side)
            for fragment, partition in zip(plan.fragments, plan.partitions, strict=True):
                sql = _cast_to(fragment.sql, types, distinct)
                fragments.append(dataclasses.replace(fragment, sql=sql))
                partitions.append(partition)
            texts.append(plan.fragment_sql)
            tables |= set(plan.tables)
            total = max(total, plan.partitions_total)
        merge, sort = self._union_merge(node, distinct, len(types))
        return Distributed(
            tier="pushdown (UNION)" if distinct else "pushdown (UNION ALL)",
            fragments=tuple(fragments),
            fragment_sql=(" UNION " if distinct else " UNION ALL ").join(
                f"({text})" for text in texts
            ),
            merge_sql=merge,
            fragment_types=types,
            partitions=tuple(partitions),
            partitions_total=total,
            tables=tuple(sorted(tables)),
            sort_merge=sort,
        )

    def _side(self, side: Node) -> Distributed:
        """A set operation's side planned alone: a plain SELECT that pushes down as it is
        (no aggregation, ORDER BY, LIMIT or DISTINCT of its own, no moved tables, not on
        one node), or _NotDistributable."""
        if side.get("type") != "SELECT_NODE" or side.get("modifiers"):
            raise _NotDistributable("a set operation's side that is not a plain SELECT")
        if side.get("cte_map", {}).get("map"):
            raise _NotDistributable("a WITH clause in a set operation's side")
        if self._aggregates(side) or side.get("group_expressions"):
            raise _NotDistributable("an aggregate in a set operation's side")
        plan = self._select(side)
        if not plan.tier.startswith("pushdown") or plan.broadcasts or "one node" in plan.tier:
            raise _NotDistributable(f"a set operation's side planned as {plan.tier}")
        return plan

    def _paired(self, node: Node) -> Distributed:
        """INTERSECT or EXCEPT [ALL] of two SELECTs that push down as they are, over tables
        of one partitioning and the same holders, each selecting its partition key at the
        same position: rows equal across the sides have equal keys, so they lie in the
        same partition, and the operation runs per partition in one fragment (both sides'
        partitions p on one node) — exact, multiplicities too; the partitions' results
        are disjoint, so the merge concatenates (then orders and cuts)."""
        sides = _sides(node)
        if len(sides) != 2:
            raise _NotDistributable(f"{node['setop_type']} of {len(sides)} sides")
        types = self._types(node)
        plans, keys = [], []
        for side in sides:
            plans.append(self._side(side))
            keys.append(self._selected_keys(side))  # with this side's planning state
        left, right = plans
        common = set(keys[0]) & set(keys[1])
        paired = [
            position
            for position in sorted(common)
            if _same_distribution(keys[0][position].spec, keys[1][position].spec)
            and self.view.placements.get(keys[0][position].placement)
            == self.view.placements.get(keys[1][position].placement)
        ]
        if not paired or left.partitions != right.partitions:
            raise _NotDistributable(
                f"{node['setop_type']} whose sides do not select one partition key alike"
            )
        keyword = f" {node['setop_type']}{'' if not node.get('setop_all') else ' ALL'} "
        fragments = []
        for one, other in zip(left.fragments, right.fragments, strict=True):
            holders = tuple(n for n in one.holders if n in other.holders)
            if not holders:
                raise _NotDistributable("no node holds both sides of a partition")
            sql = _cast_to(one.sql, types, False) + keyword + _cast_to(other.sql, types, False)
            reads = tuple(dict.fromkeys(one.reads + other.reads))
            fragments.append(Fragment(sql, reads, holders))
        merge, sort = self._union_merge(node, False, len(types))
        return Distributed(
            tier=f"pushdown ({keyword.strip()}, paired by the key)",
            fragments=tuple(fragments),
            fragment_sql=f"({left.fragment_sql}){keyword}({right.fragment_sql})",
            merge_sql=merge,
            fragment_types=types,
            partitions=left.partitions,
            partitions_total=left.partitions_total,
            tables=tuple(sorted(set(left.tables) | set(right.tables))),
            sort_merge=sort,
        )

    def _selected_keys(self, side: Node) -> dict[int, _Leaf]:
        """Output position -> the table whose partition key the side selects there as a
        plain column (of a table no outer join NULL-extends)."""
        leaves = [leaf for leaf in self._leaves(side["from_table"]) if not leaf.replicated]
        extended = _null_extended(side["from_table"])
        found = {}
        for position, item in enumerate(side["select_list"]):
            leaf = self._key_leaf(item, leaves)
            if leaf is not None and id(leaf.node) not in extended:
                found[position] = leaf
        return found

    def _union_merge(
        self, node: Node, distinct: bool, outputs: int
    ) -> tuple[str, SortMerge | None]:
        """The UNION's merge SQL over the fragments' rows (DISTINCT, ORDER BY by result
        position or name, LIMIT/OFFSET), and the same as a sort when it is one."""
        orders: list[str] = []
        keys: list[tuple[int, bool, bool]] = []
        limit_sql, count, offset = "", None, 0
        for modifier in node["modifiers"]:
            if modifier["type"] == "ORDER_MODIFIER":
                for order in modifier["orders"]:
                    position = self._output_position({"select_list": []}, order["expression"])
                    if position is None:
                        raise _NotDistributable("a UNION ordered by an expression")
                    orders.append(_order_sql(f"c{position}", order))
                    keys.append(_sort_key(position, order))
            elif modifier["type"] == "LIMIT_MODIFIER":
                limit_sql, _, count, offset = self._limit(modifier, bool(orders))
            else:
                raise _NotDistributable(f"a {modifier['type']} on a UNION")
        columns = ", ".join(f"c{i}" for i in range(outputs))
        merge = f"SELECT {'DISTINCT ' if distinct else ''}{columns} FROM {FRAGMENTS_RELATION}"
        if orders:
            merge += " ORDER BY " + ", ".join(orders)
        merge += limit_sql
        if distinct or not keys:
            return merge, None
        return merge, SortMerge(outputs, tuple(keys), count, offset)

    # ---- FROM ----

    def _core(self, node: Node) -> Node:
        """The SELECT whose FROM and WHERE pick the rows: `node` itself, or the derived
        table it reads alone (`SELECT … FROM (SELECT … FROM t JOIN u … WHERE …) AS x`) when
        that is a join, maybe grouped — no DISTINCT, ORDER BY, LIMIT, window or WITH.
        Its rows are the union of its rows on each partition when it is a plain join, or
        grouped by a partition key (`plan` checks that once the tables are known)."""
        ref = node["from_table"]
        if ref.get("type") != "SUBQUERY":
            return node
        body: Node = ref["subquery"]["node"]
        if (
            body.get("type") != "SELECT_NODE"
            or body.get("cte_map", {}).get("map")
            or body.get("modifiers")
            or body.get("qualify") is not None
            or body.get("sample") is not None
            or ref.get("sample") is not None
            or body["from_table"].get("type") not in ("BASE_TABLE", "JOIN")
        ):
            raise _NotDistributable("a SUBQUERY in FROM that is not a join (maybe grouped)")
        return body

    def _leaves(self, ref: Node) -> list[_Leaf]:
        """The tables of a FROM clause, left to right; raises for a shape not planned."""
        positions = {id(table): i for i, table in enumerate(_base_tables(ref))}
        return self._joined(ref, positions)

    def _choose_moves(self, node: Node) -> None:
        """Split the partitioned tables into groups that are co-located and joined on their
        partition keys, pick the group the fragments run on (the main group), and how each
        other partitioned table reaches them:

        - **repartitioned** (`Split`) when it is joined by equality, on a column of the same
          type, to the partition key of a main table (or of a table repartitioned already):
          its scanned rows are dealt out by that column, each to the fragment of the
          partition its value falls in, so it joins as a table co-located with the main
          group — on either side of an outer join;
        - else **broadcast** (sent whole to every fragment) when small enough: estimated at
          most BROADCAST_ROWS_MAX rows and BROADCAST_RATIO times fewer than the main group's
          largest table, and never on the preserved side of an outer join.

        Every group that can be the main one is tried (the FROM clause must then plan as
        co-located tables); the one moving the fewest estimated rows wins, a broadcast
        counting once per partition. But when a way broadcasts a table sure to be too large
        (read whole, over `broadcast_bytes_max`: it would be gathered instead), ways are
        ranked first by the bytes they surely move — tables read whole, a broadcast one
        once per partition; filtered tables count nothing. Repartitioning a filtered table
        then beats broadcasting a large one (TPC-H q14: a month of lineitem dealt out by
        part key, not all of part sent to every fragment), and an unfiltered table larger
        than the broadcast does not. With none, the query is gathered, saying why."""
        self._moves = {}
        self._broadcast = {}
        tables = _base_tables(node["from_table"])
        leaves = [self._leaf(table, position) for position, table in enumerate(tables)]
        partitioned = [leaf for leaf in leaves if not leaf.spec.reference]
        if len(partitioned) < 2:
            return
        parent = {leaf.position: leaf.position for leaf in partitioned}

        def root(position: int) -> int:
            while parent[position] != position:
                position = parent[position]
            return position

        terms = _where_and_on_terms(node)
        for term in terms:
            pair = self._key_equality(term, partitioned)
            if pair is None:
                continue
            a, b = pair
            if _same_distribution(a.spec, b.spec) and (
                self.view.placements.get(a.key) == self.view.placements.get(b.key)
            ):
                parent[root(a.position)] = root(b.position)
        groups: dict[int, list[_Leaf]] = {}
        for leaf in partitioned:
            groups.setdefault(root(leaf.position), []).append(leaf)
        if len(groups) == 1:
            return
        rows = self.view.table_rows
        biggest_first = sorted(
            groups.values(),
            key=lambda group: (-sum(rows.get(leaf.key, 0) for leaf in group), group[0].position),
        )
        options: list[_Option] = []
        reasons: list[str] = []
        for order, main in enumerate(biggest_first):
            others = [leaf for leaf in partitioned if leaf not in main]
            what = (
                f"{', '.join(_named(leaf) for leaf in others)} not co-located with "
                f"{', '.join(_named(leaf) for leaf in main)}"
            )
            moves = self._moves_into(main, others, leaves, terms)
            if isinstance(moves, str):
                reasons.append(f"{what}; {moves}")
                continue
            self._moves = moves
            try:  # the FROM clause must plan with these tables moved
                joined = self._leaves(node["from_table"])
                self._check_co_located(node, [leaf for leaf in joined if not leaf.replicated])
            except _NotDistributable as why:
                reasons.append(f"{what}; moved, {why}")
                continue
            finally:
                self._moves = {}
            copies = main[0].spec.partitions
            cost = sum(move.rows * (1 if move.split else copies) for move in moves.values())
            options.append(_Option(cost, order, moves, copies))
        if not options:
            raise _NotDistributable(reasons[0] if len(reasons) == 1 else "; or ".join(reasons))
        if self._scans is None:
            raise _NotDistributable("no scans to move tables by")
        plan = self._scans()
        if isinstance(plan, str):
            raise _NotDistributable(f"tables not co-located; no scan to move them by: {plan}")
        scans = {scan.key: scan for scan in plan.scans}
        sizes = [self._surely_moved(option, leaves, scans) for option in options]
        if any(oversized for _, oversized in sizes):
            ranked = zip(sizes, options, strict=True)
            moves = min(ranked, key=lambda r: (r[0][0], r[1].rows, r[1].order))[1].moves
        else:
            moves = min(options, key=lambda option: (option.rows, option.order)).moves
        names: dict[tuple[str, str | None], str] = {}
        for leaf in partitioned:
            move = moves.get(leaf.position)
            if move is None:
                continue
            scan = scans.get(leaf.key)
            unsafe = (
                ["not scanned"]
                if scan is None
                else [kind for _, kind in scan.columns if not EXACT_THROUGH_ARROW.fullmatch(kind)]
            )
            if scan is None or unsafe:
                raise _NotDistributable(f"{_named(leaf)} not moved: {unsafe[0]}")
            column = None if move.split is None else move.split.column
            name = names.setdefault((leaf.key, column), BROADCAST_INPUT.format(len(names)))
            self._broadcast[leaf.position] = Broadcast(scan, name, move.split)
        self._moves = moves

    def _surely_moved(
        self, option: _Option, leaves: list[_Leaf], scans: Mapping[str, TableScan]
    ) -> tuple[int, bool]:
        """(The bytes `option` surely moves, whether it broadcasts a table sure to be too
        large): see `_choose_moves`."""
        moved = {leaves[position].key for position in option.moves}
        total, oversized = 0, False
        for position, move in option.moves.items():
            scan = scans.get(leaves[position].key)
            if scan is None or self.whole_bytes is None:
                continue
            size = self.whole_bytes(scan, moved)
            if move.split is None:
                oversized = oversized or size > self.broadcast_bytes_max
                size *= option.copies
            total += size
        return total, oversized

    def _moves_into(
        self, main: list[_Leaf], others: list[_Leaf], leaves: list[_Leaf], terms: list[Node]
    ) -> dict[int, _Move] | str:
        """How each of `others` reaches `main`'s fragments (`_choose_moves`), or why not."""
        rows = self.view.table_rows
        main_rows = max(rows.get(leaf.key, 0) for leaf in main)
        target = main[0].spec
        keyed = list(main)
        moves: dict[int, _Move] = {}
        pending = list(others)
        while pending:
            found = None
            for leaf in pending:
                by = self._split_by(leaf, keyed, leaves, terms)
                if by is not None:
                    found = leaf, by
                    break
            if found is None:
                break
            leaf, (column, into) = found
            pending.remove(leaf)
            split = Split(column, target)
            moves[leaf.position] = _Move(split, into.placement, rows.get(leaf.key, 0))
            keyed.append(self._repartitioned(leaf, split, into.placement))
        for leaf in pending:
            estimate = rows.get(leaf.key)
            if estimate is None or estimate > min(BROADCAST_ROWS_MAX, main_rows / BROADCAST_RATIO):
                size = "unknown" if estimate is None else f"about {estimate:,}"
                return f"{_named(leaf)} too large to broadcast ({size}) and not joined on a key"
            moves[leaf.position] = _Move(None, "", estimate)
        for leaf in others:
            if leaf.node.get("column_name_alias"):
                return f"{_named(leaf)} has its columns renamed"
        return moves

    def _split_by(
        self, leaf: _Leaf, keyed: list[_Leaf], leaves: list[_Leaf], terms: list[Node]
    ) -> tuple[str, _Leaf] | None:
        """(`leaf`'s column, the keyed table) of a term `leaf.column = keyed.key` with both
        of one type, when the main partitioning can deal `leaf`'s rows out by it."""
        target = keyed[0].spec
        if target.kind not in ("hash", "range"):  # a LIST value may be in no partition
            return None
        estimate = self.view.table_rows.get(leaf.key)
        if estimate is None or estimate > REPARTITION_ROWS_MAX:
            return None
        moved = {k.position: k for k in keyed}
        scope = [moved.get(each.position, each) for each in leaves]
        types = {column.name.lower(): column.type.upper() for column in leaf.spec.columns}
        for term in terms:
            if term.get("class") != "COMPARISON" or term.get("type") != "COMPARE_EQUAL":
                continue
            for side, other in ((term["left"], term["right"]), (term["right"], term["left"])):
                into = self._scoped_key_leaf(other, [scope])
                if into is None or not any(into is k for k in keyed):
                    continue
                column = self._column_of(side, leaf, scope)
                if column is not None and types.get(column.lower()) == (
                    (target.key_type or "").upper()
                ):
                    return column, into
        return None

    def _column_of(self, expr: Node, leaf: _Leaf, scope: list[_Leaf]) -> str | None:
        """The name of `leaf`'s column that `expr` is (a column reference bound to it)."""
        if not _ast.is_column_ref(expr):
            return None
        names = [str(name) for name in expr["column_names"]]
        columns = {c.lower(): c for c in self.columns_of(leaf.spec)}
        if len(names) == 2:
            if names[0].lower() != leaf.alias.lower():
                return None
            if sum(1 for other in scope if other.alias.lower() == names[0].lower()) != 1:
                return None
        elif len(names) == 1:
            owners = [
                other
                for other in scope
                if names[0].lower() in (c.lower() for c in self.columns_of(other.spec))
            ]
            if len(owners) != 1 or owners[0].position != leaf.position:
                return None
        else:
            return None
        return columns.get(names[-1].lower())

    def _repartitioned(self, leaf: _Leaf, split: Split, placed_as: str) -> _Leaf:
        """`leaf` as it plans once repartitioned by `split`."""
        spec = msgspec.structs.replace(
            leaf.spec,
            kind=split.spec.kind,
            key=split.column,
            key_type=split.spec.key_type,
            partitions=split.spec.partitions,
            bounds=split.spec.bounds,
            lists=split.spec.lists,
        )
        return dataclasses.replace(leaf, spec=spec, repartitioned=True, placed_as=placed_as)

    def _joined(self, ref: Node, positions: Mapping[int, int]) -> list[_Leaf]:
        kind = ref.get("type")
        if kind == "BASE_TABLE":
            return [self._leaf(ref, positions[id(ref)])]
        if kind == "JOIN":
            if ref.get("ref_type") not in ("REGULAR", "CROSS", "INNER"):
                raise _NotDistributable(f"a {ref.get('ref_type')} join")
            if ref.get("using_columns"):
                raise _NotDistributable("JOIN … USING")
            left = self._joined(ref["left"], positions)
            right = self._joined(ref["right"], positions)
            join_type = ref.get("join_type")
            sides = {"LEFT": right, "RIGHT": left}
            if join_type in sides and any(not leaf.replicated for leaf in sides[join_type]):
                # rows of the preserved side would meet only one partition of the other
                if not all(
                    leaf.replicated for leaf in (left if join_type == "RIGHT" else right)
                ) and not self._keys_joined(ref.get("condition"), left, right):
                    raise _NotDistributable(f"a {join_type} JOIN not on the partition keys")
            elif join_type == "FULL":
                if not self._keys_joined(ref.get("condition"), left, right):
                    raise _NotDistributable("a FULL JOIN not on the partition keys")
            elif join_type not in ("INNER", "LEFT", "RIGHT"):
                raise _NotDistributable(f"a {join_type} join")
            if (
                join_type == "LEFT"
                and all(leaf.replicated for leaf in left)
                and any(not leaf.replicated for leaf in right)
            ):
                raise _NotDistributable("a reference table LEFT JOIN a partitioned table")
            if (
                join_type == "RIGHT"
                and all(leaf.replicated for leaf in right)
                and any(not leaf.replicated for leaf in left)
            ):
                raise _NotDistributable("a partitioned table RIGHT JOIN a reference table")
            return left + right
        raise _NotDistributable(f"a {kind} in FROM")

    def _leaf(self, ref: Node, position: int) -> _Leaf:
        if ref.get("sample") is not None or ref.get("at_clause") is not None:
            raise _NotDistributable("TABLESAMPLE or AT on a table")
        if ref.get("catalog_name"):
            raise _NotDistributable("a table of another database")
        name = str(ref["table_name"]).lower()
        schema = str(ref.get("schema_name") or "").lower()
        keys = [
            key for key in self.by_name.get(name, []) if not schema or key == f"{schema}.{name}"
        ]
        if not schema:
            keys = [key for key in keys if key.startswith("main.")]
        if len(keys) != 1:
            raise _NotDistributable(f"{ref['table_name']} is not one cluster table (a view?)")
        key = keys[0]
        alias = str(ref.get("alias") or ref["table_name"])
        leaf = _Leaf(ref, key, self.specs[key], alias, position)
        move = self._moves.get(position)
        if move is None:
            return leaf
        if move.split is None:
            return dataclasses.replace(leaf, broadcast=True)
        return self._repartitioned(leaf, move.split, move.placed_as)

    def _keys_joined(self, condition: Node | None, left: list[_Leaf], right: list[_Leaf]) -> bool:
        left_keys = {id(leaf) for leaf in left if not leaf.replicated}
        right_keys = {id(leaf) for leaf in right if not leaf.replicated}
        for term in _ast.conjuncts(condition):
            pair = self._key_equality(term, left + right)
            if pair is not None:
                a, b = pair
                if (id(a) in left_keys and id(b) in right_keys) or (
                    id(b) in left_keys and id(a) in right_keys
                ):
                    return True
        return False

    def _check_co_located(self, node: Node, partitioned: list[_Leaf]) -> None:
        first = partitioned[0]
        for leaf in partitioned[1:]:
            if not _same_distribution(first.spec, leaf.spec) or (
                self.view.placements.get(first.placement)
                != self.view.placements.get(leaf.placement)
            ):
                raise _NotDistributable(
                    f"{first.key} and {leaf.key} are not partitioned alike (not co-located)"
                )
        if len(partitioned) == 1:
            return
        # Every partitioned table must be tied to the first by key equalities.
        terms = _ast.conjuncts(node.get("where_clause"))
        terms += [
            t
            for j in _ast.walk(node["from_table"])
            if j.get("type") == "JOIN" and j.get("join_type") == "INNER"
            for t in _ast.conjuncts(j.get("condition"))
        ]
        linked = {id(first)}
        changed = True
        while changed:
            changed = False
            for term in terms:
                pair = self._key_equality(term, partitioned)
                if pair is None:
                    continue
                a, b = pair
                if (id(a) in linked) != (id(b) in linked):
                    linked |= {id(a), id(b)}
                    changed = True
        # outer joins on keys were checked in _leaves; their tables count as linked
        for join in _ast.walk(node["from_table"]):
            if join.get("type") == "JOIN" and join.get("join_type") in ("LEFT", "RIGHT", "FULL"):
                for term in _ast.conjuncts(join.get("condition")):
                    pair = self._key_equality(term, partitioned)
                    if pair is not None:
                        linked |= {id(pair[0]), id(pair[1])}
        missing = [leaf.key for leaf in partitioned if id(leaf) not in linked]
        if missing:
            raise _NotDistributable(f"{', '.join(missing)} not joined on the partition key")

    def _key_equality(self, term: Node, leaves: list[_Leaf]) -> tuple[_Leaf, _Leaf] | None:
        return self._scoped_key_equality(term, [leaves])

    def _key_leaf(self, expr: Node, leaves: list[_Leaf]) -> _Leaf | None:
        """The leaf whose partition key `expr` is (a plain column reference), if any."""
        return self._scoped_key_leaf(expr, [leaves])

    # ---- expressions ----

    def _check_expressions(self, node: Node, windows_ok: bool = False) -> None:
        """Refuse what no tier plans; window functions only where `windows_ok` (the query's
        own SELECT: `_check_windows` then asks more of them)."""
        own = {id(window) for window in self._windows(node)} if windows_ok else set()
        for item in _ast.walk({k: v for k, v in node.items() if k != "from_table"}):
            cls = item.get("class")
            if cls == "WINDOW" and id(item) not in own:
                raise _NotDistributable("a window function")
            if cls == "STAR" or cls == "COLUMNS":
                if item.get("columns") or item.get("expr") is not None:
                    raise _NotDistributable("COLUMNS(…)")
        for join in _ast.walk(node["from_table"]):
            if join.get("type") == "JOIN":
                for item in _ast.walk(join.get("condition")):
                    if item.get("class") in ("SUBQUERY", "WINDOW"):
                        raise _NotDistributable("a subquery in a join condition")

    def _windows(self, node: Node) -> list[Node]:
        """The window functions of `node`'s own SELECT (not of its subqueries)."""
        parts = [node["select_list"], node.get("qualify"), node["modifiers"]]
        return [item for item in _own_items(parts) if item.get("class") == "WINDOW"]

    def _check_windows(self, node: Node, partitioned: list[_Leaf]) -> None:
        """Window functions run on the partitions when each one's PARTITION BY names the
        partition key of a table no outer join NULL-extends: every window partition then
        lies in one data partition, so each fragment computes its rows' windows whole
        (QUALIFY with them too). Else the query is gathered."""
        extended = _null_extended(node["from_table"])
        for window in self._windows(node):
            keyed = [self._key_leaf(expr, partitioned) for expr in window.get("partitions", [])]
            if not any(leaf is not None and id(leaf.node) not in extended for leaf in keyed):
                raise _NotDistributable(
                    f"a window function ({window['function_name']}) not partitioned by a "
                    "partition key"
                )

    # ---- subqueries ----

    def _check_subqueries(
        self,
        node: Node,
        scopes: list[list[_Leaf]],
        local: list[_Leaf],
        top_conjuncts: set[int],
    ) -> None:
        """Raise unless every subquery in `node`'s expressions (not its FROM) gives, on the
        partition that holds an outer row, what it gives on the whole data:

        - it reads only reference tables; or
        - each partitioned table it reads is co-located with the query's and tied by
          equality of partition keys — to an outer table's key by a conjunct of its WHERE
          (`inner.k = outer.k`, correlated), or to another such table by its joins — so
          every row it can see lies in the outer row's partition; or
        - it is `outer.k IN (SELECT inner.k …)`, a conjunct of the query's WHERE, the
          subquery without LIMIT, aggregated (if at all) by a key, its tables tied as
          above to `inner`: every row it returns for key k comes from k's partition.

        `scopes` are the enclosing FROM clauses, innermost first; `local` the partitioned
        tables whose rows in a fragment are exactly its partition's."""
        for subquery in _subqueries(node):
            body = subquery["subquery"]["node"]
            if body.get("type") != "SELECT_NODE" or body.get("cte_map", {}).get("map"):
                raise _NotDistributable("a subquery with a set operation or WITH")
            tables = _base_tables(body["from_table"])
            positions = {id(table): _SUBQUERY_POSITION + i for i, table in enumerate(tables)}
            leaves = self._joined(body["from_table"], positions)
            inner = [leaf for leaf in leaves if not leaf.replicated]
            if inner and not local:
                raise _NotDistributable("a subquery reads a partitioned table")
            for leaf in inner:
                if not _same_distribution(leaf.spec, local[0].spec) or (
                    self.view.placements.get(leaf.placement)
                    != self.view.placements.get(local[0].placement)
                ):
                    raise _NotDistributable(f"a subquery reads {leaf.key}, not co-located")
            inner_scopes = [leaves, *scopes]
            tied: set[int] = set()
            for term in _ast.conjuncts(body.get("where_clause")):
                pair = self._scoped_key_equality(term, inner_scopes)
                if pair is None:
                    continue
                a, b = pair
                for this, other in ((a, b), (b, a)):
                    if any(this is leaf for leaf in inner) and any(other is o for o in local):
                        tied.add(id(this))
            if inner and not tied:
                tied = self._tied_by_in(subquery, body, inner, inner_scopes, scopes, local)
                if id(subquery) not in top_conjuncts:
                    tied = set()
            self._spread_ties(body, inner, inner_scopes, tied)
            untied = [leaf.key for leaf in inner if id(leaf) not in tied]
            if untied:
                raise _NotDistributable(
                    f"a subquery reads {', '.join(untied)} beyond the outer row's partition"
                )
            self._check_subqueries(body, inner_scopes, local + inner, set())

    def _tied_by_in(
        self,
        subquery: Node,
        body: Node,
        inner: list[_Leaf],
        inner_scopes: list[list[_Leaf]],
        scopes: list[list[_Leaf]],
        local: list[_Leaf],
    ) -> set[int]:
        """The inner table an `outer.k IN (SELECT inner.k …)` ties (empty if none)."""
        if (
            subquery.get("subquery_type") != "ANY"
            or subquery.get("comparison_type") != "COMPARE_EQUAL"
            or len(body["select_list"]) != 1
            or any(m.get("type") == "LIMIT_MODIFIER" for m in body.get("modifiers", []))
        ):
            return set()
        outer = self._scoped_key_leaf(subquery["child"], scopes)
        chosen = self._scoped_key_leaf(body["select_list"][0], inner_scopes)
        if outer is None or chosen is None or not any(outer is leaf for leaf in local):
            return set()
        if not any(chosen is leaf for leaf in inner):
            return set()
        if (self._aggregates(body) or body.get("group_expressions")) and not (
            self._grouped_by_key(body, inner)
        ):
            return set()
        return {id(chosen)}

    def _spread_ties(
        self, body: Node, inner: list[_Leaf], scopes: list[list[_Leaf]], tied: set[int]
    ) -> None:
        """Add to `tied` every inner table joined on its key to a tied one."""
        terms = _where_and_on_terms(body)
        inner_ids = {id(leaf) for leaf in inner}
        changed = True
        while changed:
            changed = False
            for term in terms:
                pair = self._scoped_key_equality(term, scopes)
                if pair is None or not {id(pair[0]), id(pair[1])} <= inner_ids:
                    continue
                if (id(pair[0]) in tied) != (id(pair[1]) in tied):
                    tied |= {id(pair[0]), id(pair[1])}
                    changed = True

    def _scoped_key_equality(
        self, term: Node, scopes: list[list[_Leaf]]
    ) -> tuple[_Leaf, _Leaf] | None:
        if term.get("class") != "COMPARISON" or term.get("type") != "COMPARE_EQUAL":
            return None
        a = self._scoped_key_leaf(term["left"], scopes)
        b = self._scoped_key_leaf(term["right"], scopes)
        if a is None or b is None or a is b:
            return None
        return a, b

    def _scoped_key_leaf(self, expr: Node, scopes: list[list[_Leaf]]) -> _Leaf | None:
        """The partitioned table whose partition key `expr` is, a name bound as DuckDB
        binds it: in the innermost scope that has it (None when unsure)."""
        if not _ast.is_column_ref(expr):
            return None
        names = [str(name).lower() for name in expr["column_names"]]
        for scope in scopes:
            if len(names) == 2:
                matches = [leaf for leaf in scope if leaf.alias.lower() == names[0]]
            elif len(names) == 1:
                matches = [
                    leaf
                    for leaf in scope
                    if names[0] in (c.lower() for c in self.columns_of(leaf.spec))
                ]
            else:
                return None
            if len(matches) > 1:
                return None
            if matches:
                leaf = matches[0]
                if leaf.replicated or leaf.spec.key is None:
                    return None
                return leaf if names[-1] == leaf.spec.key.lower() else None
        return None

    def _aggregates(self, node: Node) -> list[Node]:
        found = []
        for item in _own_items([node["select_list"], node.get("having"), node["modifiers"]]):
            if item.get("class") == "FUNCTION" and self._is_aggregate(item):
                found.append(item)
        return found

    def _is_aggregate(self, function: Node) -> bool:
        name = str(function["function_name"]).lower()
        known = _AGGREGATE_NAMES.get(name)
        if known is not None:
            return known
        if name not in self._aggregate_names:
            rows = self.con.execute(
                "SELECT count(*) FROM duckdb_functions() WHERE function_name = ? "
                "AND function_type = 'aggregate'",
                [name],
            ).fetchall()
            self._aggregate_names[name] = bool(rows[0][0])
            if len(_AGGREGATE_NAMES) < AGGREGATE_NAMES_CACHED_MAX:
                _AGGREGATE_NAMES[name] = self._aggregate_names[name]
        return self._aggregate_names[name]

    def _grouped_by_key(self, node: Node, partitioned: list[_Leaf]) -> bool:
        groups = node.get("group_expressions") or []
        if node.get("aggregate_handling") != "STANDARD_HANDLING":
            return False
        # a null-extended table's NULL key comes from every partition: one group, split
        extended = _null_extended(node["from_table"])
        whole = [leaf for leaf in partitioned if id(leaf.node) not in extended]
        key_groups = {
            i
            for i, g in enumerate(groups)
            if self._key_leaf(self._group_expression(node, g), whole)
        }
        sets = node.get("group_sets") or []
        return bool(key_groups) and bool(sets) and all(set(s) & key_groups for s in sets)

    # ---- routing ----

    def _routed(self, node: Node, partitioned: list[_Leaf]) -> tuple[int, ...]:
        total = partitioned[0].spec.partitions
        every = tuple(range(total))
        pinned: set[int] | None = None
        for term in _ast.conjuncts(node.get("where_clause")):
            found = self._pinned_by(term, partitioned)
            if found is not None:
                pinned = found if pinned is None else pinned & found
        return every if pinned is None else tuple(sorted(pinned))

    def _pinned_by(self, term: Node, partitioned: list[_Leaf]) -> set[int] | None:
        constants: list[Node]
        if term.get("class") == "COMPARISON" and term.get("type") == "COMPARE_EQUAL":
            pairs = [(term["left"], term["right"]), (term["right"], term["left"])]
            matches = [
                (c, v) for c, v in pairs if self._key_leaf(c, partitioned) and _is_constant(v)
            ]
            if not matches:
                return None
            column, constant = matches[0]
            constants = [constant]
        elif term.get("class") == "OPERATOR" and term.get("type") == "COMPARE_IN":
            column, *constants = term["children"]
            if not self._key_leaf(column, partitioned) or len(constants) > PINNED_VALUES_MAX:
                return None
            if not all(_is_constant(c) for c in constants):
                return None
        else:
            return None
        leaf = self._key_leaf(column, partitioned)
        assert leaf is not None and leaf.spec.key_type is not None
        found: set[int] = set()
        for constant in constants:
            value = _ast.expression_sql(self.con, constant)
            typed = f"CAST({value} AS {leaf.spec.key_type})"
            try:
                rows = self.con.execute(
                    f"SELECT ({value}) = {typed}, {partition_expression(leaf.spec, value)}"
                ).fetchall()
            except duckdb.Error:
                return None  # a constant that does not cast: let every partition answer
            same, partition = rows[0]
            if same is None:  # NULL never matches
                continue
            if not same:
                return None
            found.add(int(partition))
        return found

    # ---- plans ----

    def _fragments(
        self, node: Node, leaves: list[_Leaf], partitions: Sequence[int]
    ) -> tuple[Fragment, ...]:
        fragments = []
        core = self._core(node)
        inner = self._subquery_leaves(node)
        if core is not node:
            inner += self._subquery_leaves(core, len(inner))
        for partition in partitions:
            reads = []
            held_by: list[tuple[int, ...]] = []
            for leaf in leaves + inner:
                if leaf.moved:
                    continue  # travels with the fragment
                part = 0 if leaf.spec.reference else partition
                reads.append((leaf.key, part))
                held = tuple(self.view.placements[leaf.key][part])
                if leaf.spec.reference:
                    held_by.append(held)
                else:
                    # Its order (primary first) is the one that spreads the fragments over
                    # the nodes; a reference table's is the same for every partition.
                    held_by.insert(0, held)
            holders = [n for n in (held_by[0] if held_by else ()) if all(n in h for h in held_by)]
            if not holders:
                raise _NotDistributable(f"no node holds every table of partition {partition}")
            physical = self._physical(node, self._leaves(core["from_table"]) + inner, partition)
            fragments.append(
                Fragment(_ast.to_sql(self.con, physical), tuple(sorted(set(reads))), tuple(holders))
            )
        return tuple(fragments)

    def _subquery_leaves(self, node: Node, first: int = 0) -> list[_Leaf]:
        """The tables read by the subqueries in `node`'s expressions (checked already)."""
        tables = [
            item
            for item in _ast.walk({k: v for k, v in node.items() if k != "from_table"})
            if item.get("type") == "BASE_TABLE"
        ]
        return [self._leaf(table, _SUBQUERY_POSITION + first + i) for i, table in enumerate(tables)]

    def _pushdown(
        self,
        node: Node,
        leaves: list[_Leaf],
        partitioned: list[_Leaf],
        partitions: tuple[int, ...],
        why: str,
    ) -> Distributed:
        fragment = copy.deepcopy(node)
        fragment["modifiers"] = []
        outputs = len(self.output_names)
        merge_orders: list[str] = []
        sort_keys: list[tuple[int, bool, bool]] = []
        distinct = False
        limit: Node | None = None
        for modifier in node["modifiers"]:
            if modifier["type"] == "DISTINCT_MODIFIER":
                distinct = True
                fragment["modifiers"].append(modifier)
            elif modifier["type"] == "ORDER_MODIFIER":
                for order in modifier["orders"]:
                    position = self._output_position(node, order["expression"])
                    if position is None:
                        if distinct:
                            raise _NotDistributable(
                                "ORDER BY an expression not selected, with DISTINCT"
                            )
                        position = outputs + len(fragment["select_list"]) - len(node["select_list"])
                        fragment["select_list"].append(
                            dict(order["expression"], alias=f"dcluster_sort_{position}")
                        )
                    merge_orders.append(_order_sql(f"c{position}", order))
                    sort_keys.append(_sort_key(position, order))
            elif modifier["type"] == "LIMIT_MODIFIER":
                limit = modifier
            else:
                raise _NotDistributable(f"a {modifier['type']}")
        limit_sql = ""
        count: int | None = None
        offset = 0
        if limit is not None:
            limit_sql, pushed, count, offset = self._limit(limit, bool(merge_orders))
            if pushed is not None:
                if merge_orders:
                    order_modifier = next(
                        m for m in node["modifiers"] if m["type"] == "ORDER_MODIFIER"
                    )
                    fragment["modifiers"].append(
                        self._fragment_orders(order_modifier, node, fragment)
                    )
                fragment["modifiers"].append(pushed)
        columns = ", ".join(f"c{i}" for i in range(outputs))
        merge = f"SELECT {'DISTINCT ' if distinct else ''}{columns} FROM {FRAGMENTS_RELATION}"
        if merge_orders:
            merge += " ORDER BY " + ", ".join(merge_orders)
        merge += limit_sql
        tier = "pushdown" + (f" ({why})" if why else "")
        plan = self._distributed(tier, node, fragment, leaves, partitioned, partitions, merge)
        if distinct or not sort_keys:
            return plan
        sort = SortMerge(outputs, tuple(sort_keys), count, offset)
        return dataclasses.replace(plan, sort_merge=sort)

    def _on_one_node(self, node: Node, leaves: list[_Leaf]) -> Distributed:
        """Only reference tables: any one node answers the whole query."""
        columns = ", ".join(f"c{i}" for i in range(len(self.output_names)))
        fragments = self._fragments(node, leaves, (0,))
        return Distributed(
            tier="pushdown (reference tables only: one node)",
            fragments=fragments,
            fragment_sql=_ast.to_sql(self.con, node),
            fragment_types=self._types(node),
            merge_sql=f"SELECT {columns} FROM {FRAGMENTS_RELATION}",
            partitions=(0,),
            partitions_total=1,
            tables=tuple(sorted({leaf.key for leaf in leaves})),
        )

    def _types(self, node: Node) -> tuple[str, ...]:
        """The result types of a (logical) query, bound over the empty work tables."""
        relation = self.con.sql(_ast.to_sql(self.con, node))
        assert relation is not None
        return tuple(str(type_name) for type_name in relation.types)

    def _fragment_orders(self, order_modifier: Node, node: Node, fragment: Node) -> Node:
        """The ORDER BY for a top-k fragment: by output position, so aliases still work."""
        orders = []
        for order in order_modifier["orders"]:
            position = self._output_position(node, order["expression"])
            if position is None:
                position = next(
                    int(str(item["alias"]).rsplit("_", 1)[1])
                    for item in fragment["select_list"]
                    if str(item.get("alias")).startswith("dcluster_sort_")
                    and _ast.same(item, order["expression"])
                )
            expression = _ast.expression(self.con, str(position + 1))
            orders.append(dict(order, expression=expression))
        return dict(order_modifier, orders=orders)

    def _limit(self, limit: Node, ordered: bool) -> tuple[str, Node | None, int | None, int]:
        """(the merge's LIMIT/OFFSET SQL, the fragments' LIMIT modifier or None, the row
        count or None, the offset)."""
        if (
            limit.get("limit_type", "ROW_COUNT") != "ROW_COUNT"
            or limit.get("type") != "LIMIT_MODIFIER"
        ):
            raise _NotDistributable("a LIMIT that is not a row count")
        values: list[int | None] = []
        for part in ("limit", "offset"):
            expr = limit.get(part)
            if expr is None:
                values.append(None)
                continue
            if expr.get("class") != "CONSTANT" or expr["literal"].get("kind") not in (
                "INTEGER",
                "BIGINT",
            ):
                raise _NotDistributable("a LIMIT or OFFSET that is not a constant")
            values.append(int(expr["literal"]["text"]))
        count, offset = values
        sql = (f" LIMIT {count}" if count is not None else "") + (
            f" OFFSET {offset}" if offset else ""
        )
        if count is None:
            return sql, None, None, offset or 0
        pushed = copy.deepcopy(limit)
        pushed["limit"] = _ast.expression(self.con, str(count + (offset or 0)))
        pushed["offset"] = None
        return sql, pushed, count, offset or 0  # unordered: any `count` rows will do

    def _output_position(self, node: Node, expr: Node) -> int | None:
        """Which result column an ORDER BY item is: a position, a result column's name, or
        a selected expression (None: some other expression)."""
        items = node["select_list"]
        starred = any(item.get("class") in ("STAR", "COLUMNS") for item in items)
        if expr.get("class") == "CONSTANT" and expr["literal"].get("kind") in ("INTEGER", "BIGINT"):
            position = int(expr["literal"]["text"]) - 1
            return position if 0 <= position < len(self.output_names) else None
        if _ast.is_column_ref(expr) and len(expr["column_names"]) == 1:
            name = str(expr["column_names"][0]).lower()
            named = [i for i, output in enumerate(self.output_names) if output == name]
            if len(named) == 1:
                return named[0]
            if named:
                raise _NotDistributable(f"ORDER BY {name}, a name two result columns share")
        if starred:
            return None
        for i, item in enumerate(items):
            if _ast.same(item, expr):
                return i
        return None

    def _two_phase(
        self,
        node: Node,
        leaves: list[_Leaf],
        partitioned: list[_Leaf],
        partitions: tuple[int, ...],
    ) -> Distributed:
        if node.get("aggregate_handling") != "STANDARD_HANDLING":
            raise _NotDistributable("GROUP BY ALL")
        if any(item.get("class") in ("STAR", "COLUMNS") for item in _ast.walk(node["select_list"])):
            raise _NotDistributable("* beside aggregates")
        groups = [self._group_expression(node, g) for g in node.get("group_expressions") or []]
        distinct = self._distinct_argument(node)
        partials: list[Node] = []

        def partial(sql: str, function: Node) -> str:
            expr = _ast.expression(self.con, sql)
            if function.get("filter") is not None:
                expr["filter"] = copy.deepcopy(function["filter"])
            partials.append(expr)
            return f"a{len(partials) - 1}"

        def swap(item: Node) -> Node | None:
            for i, group in enumerate(groups):
                if _ast.same(item, group):
                    return _ast.column_ref(f"g{i}")
            if item.get("class") == "FUNCTION" and self._is_aggregate(item):
                if distinct is not None:  # the same aggregate over the distinct values
                    argument = {"name": "", "expression": _ast.column_ref("a0")}
                    return dict(item, arguments=[argument])
                return _ast.expression(self.con, self._final(item, partial))
            if item.get("class") in ("WINDOW", "SUBQUERY"):
                raise _NotDistributable("a window or subquery beside aggregates")
            if _ast.is_column_ref(item):
                raise _NotDistributable("a column outside GROUP BY (functionally dependent?)")
            return None

        if distinct is not None:
            partials.append(copy.deepcopy(distinct))
        final = copy.deepcopy(node)
        final["select_list"] = []
        plain = not node.get("having") and len(node.get("group_sets") or []) <= 1
        outputs: list[tuple[str, int]] = []
        """What each output is, while the merge stays plain (see AggregateMerge)."""
        expressions: list[MergeExpression] = []
        for item in node["select_list"]:
            before = len(partials)
            swapped = _ast.replaced(item, swap)
            final["select_list"].append(dict(swapped, alias=item.get("alias") or ""))
            if not plain:
                output = None
            elif distinct is not None:
                output = _distinct_output(item, groups)
            else:
                output = _plain_output(item, groups, before, len(partials))
                computed = None if output else self._merge_expression(swapped, len(groups))
                if computed is not None:
                    output = ("expression", len(expressions))
                    expressions.append(computed)
            plain = output is not None
            if output is not None:
                outputs.append(output)
        final["having"] = _ast.replaced(node.get("having"), swap)
        sort_keys: list[tuple[int, bool, bool]] = []
        count: int | None = None
        offset = 0
        modifiers = []
        for modifier in node["modifiers"]:
            if modifier["type"] == "ORDER_MODIFIER":
                orders = []
                for order in modifier["orders"]:
                    position = self._output_position(node, order["expression"])
                    plain = plain and position is not None
                    if position is not None:
                        sort_keys.append(_sort_key(position, order))
                    expression = (
                        _ast.expression(self.con, str(position + 1))
                        if position is not None
                        else _ast.replaced(order["expression"], swap)
                    )
                    orders.append(dict(order, expression=expression))
                modifiers.append(dict(modifier, orders=orders))
            elif modifier["type"] in ("LIMIT_MODIFIER", "DISTINCT_MODIFIER"):
                if modifier["type"] == "LIMIT_MODIFIER":
                    _, _, count, offset = self._limit(modifier, True)  # constants only
                else:
                    plain = False
                modifiers.append(modifier)
            else:
                raise _NotDistributable(f"a {modifier['type']}")
        final["modifiers"] = modifiers
        final["from_table"] = {
            "type": "BASE_TABLE",
            "alias": "",
            "sample": None,
            "query_location": 0,
            "query_location_length": 0,
            "schema_name": "",
            "table_name": FRAGMENTS_RELATION,
            "column_name_alias": [],
            "catalog_name": "",
            "at_clause": None,
            "qualified_name": {"path": [FRAGMENTS_RELATION]},
        }
        final["where_clause"] = None
        final["group_expressions"] = [_ast.column_ref(f"g{i}") for i in range(len(groups))]
        fragment = copy.deepcopy(node)
        fragment["select_list"] = [
            dict(copy.deepcopy(g), alias=f"g{i}") for i, g in enumerate(groups)
        ] + [dict(p, alias=f"a{i}") for i, p in enumerate(partials)]
        fragment["having"] = None
        fragment["modifiers"] = []
        fragment["group_expressions"] = [copy.deepcopy(g) for g in groups]
        fragment["group_sets"] = [list(range(len(groups)))] if groups else []
        if distinct is not None:  # distinct pre-aggregation: the groups' distinct values
            fragment["group_expressions"].append(copy.deepcopy(distinct))
            fragment["group_sets"] = [list(range(len(groups) + 1))]
        # the merge names fragment columns c0, c1, …: the final reads them as g…/a…
        names = [f"g{i}" for i in range(len(groups))] + [f"a{i}" for i in range(len(partials))]
        renamed = ", ".join(f"c{i} AS {name}" for i, name in enumerate(names))
        final_sql = _ast.to_sql(self.con, final).replace(
            f"FROM {FRAGMENTS_RELATION}",
            f"FROM (SELECT {renamed} FROM {FRAGMENTS_RELATION}) AS {FRAGMENTS_RELATION}",
            1,
        )
        plan = self._distributed(
            "two_phase", node, fragment, leaves, partitioned, partitions, final_sql
        )
        if not plain or ((count is not None or offset) and not sort_keys):
            return plan
        sort = SortMerge(len(outputs), tuple(sort_keys), count, offset) if sort_keys else None
        merge = AggregateMerge(len(groups), tuple(outputs), sort, tuple(expressions))
        return dataclasses.replace(plan, aggregate_merge=merge)

    def _merge_expression(self, item: Node, groups: int) -> MergeExpression | None:
        """A final select item (over the partials a… and groups g…) as a `MergeExpression`,
        or None when it is anything but `*` and `/` over sums, counts, min and max of
        partials, numeric constants and casts to DOUBLE."""
        kind = item.get("class")
        if kind == "CONSTANT":
            literal = item.get("literal") or {}
            if literal.get("kind") not in ("NUMERIC", "INTEGER"):
                return None
            text = str(literal["text"])
            return ("constant", text, str(self.con.sql(f"SELECT {text}").types[0]))
        if kind == "CAST":
            counted = _count_final(item)
            if counted is not None:
                return ("count", groups + counted)
            target = (item.get("type_expr") or {}).get("type_name")
            if item.get("try_cast") or str(target).upper() != "DOUBLE":
                return None
            child = self._merge_expression(item["child"], groups)
            return None if child is None else ("double", child)
        if kind != "FUNCTION" or item.get("filter") is not None or item.get("distinct"):
            return None
        name = str(item["function_name"]).lower()
        arguments = [a.get("expression", a) for a in item.get("arguments") or []]
        if item.get("is_operator") and name in ("*", "/") and len(arguments) == 2:
            left, right = (self._merge_expression(a, groups) for a in arguments)
            return None if left is None or right is None else (name, left, right)
        if name in ("sum", "min", "max") and len(arguments) == 1:
            partial = _partial_position(arguments[0])
            return None if partial is None else (name, groups + partial)
        return None

    def _distinct_argument(self, node: Node) -> Node | None:
        """X when every aggregate is f(DISTINCT X), approx_count_distinct(X), min(X) or
        max(X) for one X (none FILTERed): the partitions then send each group's distinct
        X values, and the coordinator aggregates those. None when no aggregate is DISTINCT."""
        functions = self._aggregates(node)
        if not any(
            f.get("distinct") or str(f["function_name"]).lower() == "approx_count_distinct"
            for f in functions
        ):
            return None
        argument: Node | None = None
        for function in functions:
            name = str(function["function_name"]).lower()
            arguments = function.get("arguments") or []
            insensitive = name in ("min", "max", "approx_count_distinct")
            if (
                len(arguments) != 1
                or function.get("filter") is not None
                or function.get("order_bys", {}).get("orders")
                or not (function.get("distinct") or insensitive)
            ):
                raise _NotDistributable("DISTINCT aggregates beside others")
            expression = arguments[0].get("expression", arguments[0])
            if argument is not None and not _ast.same(argument, expression):
                raise _NotDistributable("DISTINCT aggregates of different arguments")
            argument = expression
        return argument

    def _group_expression(self, node: Node, group: Node) -> Node:
        if group.get("class") == "CONSTANT" and group["literal"].get("kind") in (
            "INTEGER",
            "BIGINT",
        ):
            position = int(group["literal"]["text"]) - 1
            if 0 <= position < len(node["select_list"]):
                return dict(node["select_list"][position], alias="")
        if _ast.is_column_ref(group) and len(group["column_names"]) == 1:
            name = str(group["column_names"][0]).lower()
            for item in node["select_list"]:
                if str(item.get("alias") or "").lower() == name:
                    # DuckDB binds the name to a column of the FROM clause first
                    if not self._from_lacks_column(node["from_table"], name):
                        raise _NotDistributable("GROUP BY a select alias")
                    return dict(item, alias="")
        return group

    def _from_lacks_column(self, ref: Node, name: str) -> bool:
        """Surely no input of this FROM clause has a column `name`: all its inputs are
        cluster tables joined without USING or NATURAL, none with such a column."""
        tables = _base_tables(ref)
        joins = [item for item in _ast.walk(ref) if item.get("type") == "JOIN"]
        if len(tables) != 1 + len(joins) or any(
            item.get("ref_type") == "NATURAL" or item.get("using_columns") for item in joins
        ):
            return False  # a subquery, a table function, VALUES, or merged columns
        for table in tables:
            leaf = self._leaf(table, 0)
            if name in (column.lower() for column in self.columns_of(leaf.spec)):
                return False
        return True

    def _final(self, function: Node, partial: Callable[[str, Node], str]) -> str:
        name = str(function["function_name"]).lower()
        args = [a["expression"] if "expression" in a else a for a in function.get("arguments", [])]
        if (
            function.get("distinct")
            or function.get("order_bys", {}).get("orders")
            or function.get("export_state")
        ):
            raise _NotDistributable(f"{name}(DISTINCT …) or an ordered aggregate")
        if function.get("schema") or function.get("catalog"):
            raise _NotDistributable(f"a qualified aggregate {name}")
        arg = [_ast.expression_sql(self.con, a) for a in args]
        # A count is BIGINT, as on one node (a sum of counts would be HUGEINT).
        if name == "count_star" or (name == "count" and not arg):
            return f"CAST(coalesce(sum({partial('count_star()', function)}), 0) AS BIGINT)"
        if len(arg) != 1:
            raise _NotDistributable(f"the aggregate {name} with {len(arg)} arguments")
        x = arg[0]
        if name == "count":
            return f"CAST(coalesce(sum({partial(f'count({x})', function)}), 0) AS BIGINT)"
        if name == "sum":
            return f"sum({partial(f'sum({x})', function)})"
        if name in _SIMPLE_AGGREGATES:
            return f"{name}({partial(f'{name}({x})', function)})"
        if name in ("avg", "mean"):
            total, count = partial(f"sum({x})", function), partial(f"count({x})", function)
            return f"CAST(sum({total}) AS DOUBLE) / sum({count})"
        if name in _VARIANCES:
            n = partial(f"count({x})", function)
            s = partial(f"sum(CAST({x} AS DOUBLE))", function)
            q = partial(f"sum(CAST({x} AS DOUBLE) * CAST({x} AS DOUBLE))", function)
            denominator = f"sum({n})" if _VARIANCES[name] == "pop" else f"(sum({n}) - 1)"
            variance = (
                f"CASE WHEN {denominator} > 0 THEN "
                f"greatest(sum({q}) - sum({s}) * sum({s}) / sum({n}), 0) / {denominator} END"
            )
            return f"sqrt({variance})" if name.startswith("stddev") else variance
        raise _NotDistributable(f"the aggregate {name} is not split into partials")

    def _distributed(
        self,
        tier: str,
        node: Node,
        fragment: Node,
        leaves: list[_Leaf],
        partitioned: list[_Leaf],
        partitions: tuple[int, ...],
        merge: str,
    ) -> Distributed:
        total = partitioned[0].spec.partitions
        if len(partitions) < total:
            tier += " + router"
        if not partitions:  # nothing can match: one partition still answers (the shape)
            partitions = (0,)
        fragment = self._trimmed_moves(fragment)
        types = self._types(fragment)
        fragment = self._eager_aggregated(fragment, types)
        return Distributed(
            tier=tier,
            fragments=self._fragments(fragment, leaves, partitions),
            fragment_sql=_ast.to_sql(self.con, fragment),
            fragment_types=types,
            merge_sql=merge,
            partitions=partitions,
            partitions_total=total,
            tables=tuple(sorted({leaf.key for leaf in leaves})),
            broadcasts=tuple({b.name: b for b in self._broadcast.values()}.values()),
        )

    def _trimmed_moves(self, fragment: Node) -> Node:
        """`fragment` without the conditions the moved tables' scans applied already, and
        those scans keeping only the columns the fragment still names (fewer bytes moved).

        A conjunct naming one moved table alone, which its scan applied (the table read
        at that one place), is TRUE for every row the scan sends; it becomes TRUE where
        no row of that table can be NULL-extended before it is evaluated (in WHERE: by no
        outer join; in an ON: by none inside that join)."""
        if not self._broadcast:
            return fragment
        core = self._core(fragment)
        leaves = self._leaves(core["from_table"])
        moved = [leaf for leaf in leaves if leaf.moved]
        placed: list[tuple[Node, set[int]]] = [
            (term, _null_extended(core["from_table"]))
            for term in _ast.conjuncts(core.get("where_clause"))
        ]
        for join in _ast.walk(core["from_table"]):
            if join.get("type") == "JOIN":
                inside = _null_extended(join["left"]) | _null_extended(join["right"])
                placed += [(term, inside) for term in _ast.conjuncts(join.get("condition"))]
        applied_already: set[int] = set()
        for leaf in moved:
            scan = self._broadcast[leaf.position].scan
            if len(scan.places) != 1 or not scan.places[0][0]:
                continue
            applied = set(scan.places[0][0])
            for term, extended in placed:
                if (
                    id(leaf.node) not in extended
                    and self._sole_leaf(term, leaves) is leaf
                    and condition_sql(self.con, term) in applied
                ):
                    applied_already.add(id(term))
        true = _ast.expression(self.con, "TRUE")
        trimmed: Node = _ast.replaced(
            fragment, lambda item: true if id(item) in applied_already else None
        )
        # the columns the fragment still names, by input (one input may serve two places)
        every = any(item.get("class") in ("STAR", "COLUMNS") for item in _ast.walk(trimmed))
        refs = [
            [str(name).lower() for name in item["column_names"]]
            for item in _ast.walk(trimmed)
            if _ast.is_column_ref(item)
        ]
        named: dict[str, set[str]] = {}
        for leaf in moved:  # positions and aliases are the same in `trimmed`
            broadcast = self._broadcast[leaf.position]
            columns = {name.lower() for name, _ in broadcast.scan.columns}
            found = named.setdefault(broadcast.name, set())
            alias = leaf.alias.lower()
            if every or any(names == [alias] for names in refs):  # a whole row
                found |= columns
            for names in refs:
                found |= {name for name in names if name in columns}
        for position, broadcast in list(self._broadcast.items()):
            scan = broadcast.scan
            kept = tuple(c for c in scan.columns if c[0].lower() in named[broadcast.name])
            scan = dataclasses.replace(scan, columns=kept or scan.columns[:1])
            self._broadcast[position] = dataclasses.replace(broadcast, scan=scan)
        return trimmed

    def _eager_aggregated(self, fragment: Node, types: tuple[str, ...]) -> Node:
        """`fragment` with a repartitioned table's rows aggregated where they are scanned
        (eager aggregation), when that is exact; else as it is.

        The table's scan groups its rows by the split column K and computes each
        aggregate the fragment's grouped SELECT (`_core`) takes over its other columns:
        one row per K per partition scanned, in place of every row (q13: orders counted
        per customer, not dealt out one by one). In the fragment `count(c)` becomes
        `COALESCE(sum(n), 0)` of the partial counts, `count(*)` the same with a
        NULL-extended row counting 1, `sum(c)` the sum of the partial sums, and `min`
        and `max` the least and greatest partial.

        Exact because each row of the join with the grouped rows stands for as many
        rows of the join with the table's own rows as its group holds, all with the same
        values everywhere but in the table's other columns, and those are read only by
        the aggregates rewritten (checked). So every aggregate must be one of those over
        the table's other columns, or min/max of other tables' columns (which repeated
        rows do not change); no DISTINCT, FILTER or ORDER BY in them. `sum` only of
        integers up to BIGINT and decimals of 18 digits or fewer (so no partial can
        overflow, and no float is added in another order). The rewritten fragment is
        bound once over the work tables, with the table's scan as a derived table, and
        used only if its result types are `types`."""
        core = self._core(fragment)
        if not core.get("group_expressions") and not self._aggregates(core):
            return fragment
        names = [b.name for b in self._broadcast.values()]
        for leaf in self._leaves(core["from_table"]):
            broadcast = self._broadcast.get(leaf.position)
            if leaf.repartitioned and broadcast and names.count(broadcast.name) == 1:
                rewritten = self._eager_one(fragment, core, leaf, broadcast, types)
                if rewritten is not None:
                    return rewritten
        return fragment

    def _eager_one(
        self,
        fragment: Node,
        core: Node,
        leaf: _Leaf,
        broadcast: Broadcast,
        types: tuple[str, ...],
    ) -> Node | None:
        """`_eager_aggregated` for one table, or None when it is not exact."""
        assert broadcast.split is not None
        scan = broadcast.scan
        key = broadcast.split.column.lower()
        column_types = {name.lower(): kind.upper() for name, kind in scan.columns}
        grouped = tuple(c for c in scan.columns if c[0].lower() == key)
        if not grouped:
            return None
        others = set(column_types) - {key}
        alias = leaf.alias.lower()

        def owned(item: Node) -> str | None:
            """The table's non-key column a reference surely or maybe names."""
            names = [str(name).lower() for name in item["column_names"]]
            if names[-1] in others and (len(names) == 1 or names[-2] == alias):
                return names[-1]
            return None

        aggregates: dict[str, str] = {}  # scan SQL -> its output name
        swaps: dict[int, Node] = {}
        for function in self._aggregates(core):
            name = str(function["function_name"]).lower()
            arguments = [argument["expression"] for argument in function["arguments"]]
            refs = [item for item in _ast.walk(arguments) if _ast.is_column_ref(item)]
            if (
                function.get("distinct")
                or function.get("filter") is not None
                or function["order_bys"]["orders"]
            ):
                return None
            mine = [owned(ref) for ref in refs]
            if name in ("min", "max") and not any(mine):
                continue  # over other tables' columns: repeated rows change nothing
            if name == "count_star" and not arguments:
                scan_sql, template = "count(*)", "CAST(COALESCE(sum(COALESCE({}, 1)), 0) AS BIGINT)"
            elif (
                name in ("count", "sum", "min", "max")
                and len(arguments) == 1
                and _ast.is_column_ref(arguments[0])
                and mine[0] is not None
            ):
                column = mine[0]
                if name == "sum" and not _EAGER_SUMMED.fullmatch(column_types[column]):
                    return None
                scan_sql = f"{name}({quote_identifier(column)})"
                template = {
                    "count": "CAST(COALESCE(sum({}), 0) AS BIGINT)",
                    "sum": "sum({})",
                }.get(name, f"{name}({{}})")
            else:
                return None
            output = aggregates.setdefault(scan_sql, f"dcluster_eager_{len(aggregates)}")
            reference = f"{quote_identifier(leaf.alias)}.{quote_identifier(output)}"
            swaps[id(function)] = dict(
                _ast.expression(self.con, template.format(reference)), alias=function["alias"]
            )
        if not swaps:
            return None
        rewritten: Node = _ast.replaced(fragment, lambda item: swaps.get(id(item)))
        for item in _ast.walk(rewritten):
            if item.get("class") in ("STAR", "COLUMNS"):
                return None
            if _ast.is_column_ref(item):
                names = [str(name).lower() for name in item["column_names"]]
                if owned(item) is not None or names == [alias]:
                    return None  # read outside the aggregates rewritten, or a whole row
        eager = dataclasses.replace(
            scan,
            columns=grouped,
            aggregates=tuple((output, scan_sql, "") for scan_sql, output in aggregates.items()),
        )
        derived = f"SELECT * FROM ({eager.select_sql()}) AS {quote_identifier(leaf.alias)}"
        table = _ast.parse(self.con, derived)["from_table"]
        check: Node = _ast.replaced(
            fragment,
            lambda item: table if id(item) == id(leaf.node) else swaps.get(id(item)),
        )
        try:
            relation = self.con.sql(_ast.to_sql(self.con, check))
            assert relation is not None
            if tuple(str(kind) for kind in relation.types) != types:
                return None
            typed = self.con.sql(eager.select_sql()).types
        except duckdb.Error:
            return None
        eager = dataclasses.replace(
            eager,
            aggregates=tuple(
                (output, scan_sql, str(kind))
                for (output, scan_sql, _), kind in zip(
                    eager.aggregates, typed[len(grouped) :], strict=True
                )
            ),
        )
        self._broadcast[leaf.position] = dataclasses.replace(broadcast, scan=eager)
        return rewritten

    def _sole_leaf(self, term: Node, leaves: list[_Leaf]) -> _Leaf | None:
        """The one table every column of `term` surely names (None: unsure, or another
        table too, or a subquery inside)."""
        owners: set[int] = set()
        for item in _ast.walk(term):
            if item.get("class") == "SUBQUERY":
                return None
            if not _ast.is_column_ref(item):
                continue
            names = [str(name).lower() for name in item["column_names"]]
            by_alias = [leaf for leaf in leaves if leaf.alias.lower() == names[0]]
            if len(names) >= 2 and len(by_alias) == 1:
                owners.add(by_alias[0].position)
                continue
            if by_alias:
                return None
            having = [
                leaf
                for leaf in leaves
                if names[0] in (c.lower() for c in self.columns_of(leaf.spec))
            ]
            if len(having) != 1:
                return None
            owners.add(having[0].position)
        if len(owners) != 1:
            return None
        position = owners.pop()
        return next(leaf for leaf in leaves if leaf.position == position)

    def _physical(self, node: Node, leaves: list[_Leaf], partition: int) -> Node:
        """`node` with each leaf's table replaced by its physical partition table (the name
        the query used stays as the alias, so qualified column references still bind), or
        by its broadcast input, each column cast back to its type."""
        targets = {id(leaf.node): leaf for leaf in leaves}

        def swap(item: Node) -> Node | None:
            leaf = targets.get(id(item))
            if leaf is None:
                return None
            if leaf.moved:
                broadcast = self._broadcast[leaf.position]
                columns = ", ".join(
                    f"CAST({quote_identifier(name)} AS {kind}) AS {quote_identifier(name)}"
                    for name, kind in broadcast.scan.output_columns
                )
                sql = (
                    f"SELECT * FROM (SELECT {columns} FROM {broadcast.name}) "
                    f"AS {quote_identifier(leaf.alias)}"
                )
                table: Node = _ast.parse(self.con, sql)["from_table"]
                return table
            part = 0 if leaf.spec.reference else partition
            physical = partition_table_name(leaf.key, part)
            return dict(
                item,
                schema_name="main",
                table_name=physical,
                alias=leaf.alias,
                catalog_name="",
                qualified_name={"path": ["main", physical]},
            )

        result: Node = _ast.replaced(node, swap)
        return result


def _inlined_ctes(node: Node) -> Node | None:
    """`node` with its WITH queries put in place of every reference to them (a derived
    table of the same alias and column names), or None when that may not mean the same:
    a recursive or USING KEY WITH query, a WITH clause nested anywhere else, a reference
    with a TABLESAMPLE or schema."""
    queries: dict[str, tuple[Node, list[str]]] = {}
    for entry in node["cte_map"]["map"]:
        value = entry["value"]
        query = value.get("query_node") or (value.get("query") or {}).get("node")
        if not isinstance(query, dict) or query.get("type") not in (
            "SELECT_NODE",
            "SET_OPERATION_NODE",
        ):
            return None  # RECURSIVE_CTE_NODE and anything unknown
        if value.get("key_targets"):
            return None
        inlined = _with_references(query, queries)
        if inlined is None:
            return None
        queries[str(entry["key"]).lower()] = (inlined, list(value.get("aliases") or []))
    body = {key: child for key, child in node.items() if key != "cte_map"}
    result = _with_references(body, queries)
    if result is None:
        return None
    result["cte_map"] = {"map": []}
    return result


def _with_references(value: Node, queries: Mapping[str, tuple[Node, list[str]]]) -> Node | None:
    """`value` with each reference to one of `queries` replaced by it as a derived
    table; None when a WITH clause nests inside or a reference is not plain."""
    unsure = False

    def swap(item: Node) -> Node | None:
        nonlocal unsure
        if item.get("cte_map", {}).get("map"):
            unsure = True
        if item.get("type") != "BASE_TABLE":
            return None
        name = str(item.get("table_name", "")).lower()
        if name not in queries or item.get("schema_name") or item.get("catalog_name"):
            return None
        if item.get("sample") is not None or item.get("at_clause") is not None:
            unsure = True
            return None
        query, aliases = queries[name]
        return {
            "type": "SUBQUERY",
            "alias": item.get("alias") or item["table_name"],
            "sample": None,
            "query_location": item.get("query_location", 0),
            "subquery": {"node": query, "named_param_map": []},
            "column_name_alias": list(item.get("column_name_alias") or aliases),
        }

    result: Node = _ast.replaced(value, swap)
    return None if unsure else result


def _sides(node: Node) -> list[Node]:
    """A set operation's sides, left to right."""
    children = node.get("children") or [node.get("left"), node.get("right")]
    if any(child is None for child in children):
        raise _NotDistributable("a set operation without both sides")
    return list(children)


def _cast_to(sql: str, types: Sequence[str], distinct: bool) -> str:
    """A UNION side's fragment with its columns cast to the union's `types`, named c0, …
    (DISTINCT: its rows made distinct where they are)."""
    names = [f"c{i}" for i in range(len(types))]
    casts = ", ".join(f"CAST(c{i} AS {kind}) AS c{i}" for i, kind in enumerate(types))
    keyword = "DISTINCT " if distinct else ""
    return f"SELECT {keyword}{casts} FROM ({sql}) AS dcluster_side({', '.join(names)})"


def _where_and_on_terms(node: Node) -> list[Node]:
    """The conjuncts of `node`'s WHERE and of every join condition in its FROM."""
    return _ast.conjuncts(node.get("where_clause")) + [
        term
        for join in _ast.walk(node["from_table"])
        if join.get("type") == "JOIN"
        for term in _ast.conjuncts(join.get("condition"))
    ]


def _own_items(value: object) -> Iterator[Node]:
    """Every node of `value` but those inside its subqueries (their own SELECTs)."""
    if isinstance(value, dict):
        yield value
        if value.get("class") == "SUBQUERY":
            return
        for item in value.values():
            yield from _own_items(item)
    elif isinstance(value, list):
        for item in value:
            yield from _own_items(item)


def _subqueries(node: Node) -> Iterator[Node]:
    """The subqueries of `node`'s expressions, outside its FROM, not those nested in them."""
    outside = {key: value for key, value in node.items() if key != "from_table"}
    return (item for item in _own_items(outside) if item.get("class") == "SUBQUERY")


def _null_extended(ref: Node) -> set[int]:
    """The ids of a FROM clause's base tables on the null-supplying side of an outer join
    (their columns are NULL in the rows it adds)."""
    found: set[int] = set()
    sides = {"LEFT": ("right",), "RIGHT": ("left",), "FULL": ("left", "right")}
    for join in _ast.walk(ref):
        if join.get("type") == "JOIN":
            for side in sides.get(str(join.get("join_type")), ()):
                found |= {id(table) for table in _base_tables(join[side])}
    return found


def _named(leaf: _Leaf) -> str:
    table = leaf.key.removeprefix("main.")
    return table if leaf.alias.lower() == leaf.spec.name.lower() else f"{table} {leaf.alias}"


def _base_tables(ref: Node) -> list[Node]:
    """The base tables of a FROM clause's joins, left to right."""
    if ref.get("type") == "BASE_TABLE":
        return [ref]
    if ref.get("type") == "JOIN":
        return _base_tables(ref["left"]) + _base_tables(ref["right"])
    return []


def _same_distribution(a: TableSpec, b: TableSpec) -> bool:
    return (
        a.kind == b.kind
        and a.partitions == b.partitions
        and (a.key_type or "").upper() == (b.key_type or "").upper()
        and a.bounds == b.bounds
        and a.lists == b.lists
    )


def _plain_output(
    item: Node, groups: list[Node], first_partial: int, partials: int
) -> tuple[str, int] | None:
    """A select item of a two-phase query as an `AggregateMerge` output: a group, one
    count, sum, min or max whose final reads the one partial it added (`first_partial`;
    `partials` after it), or an average over the sum and count it added; None for
    anything else."""
    for i, group in enumerate(groups):
        if _ast.same(item, group):
            return ("group", i)
    if item.get("class") != "FUNCTION" or item.get("distinct"):
        return None
    name = str(item["function_name"]).lower()
    if name in ("avg", "mean") and partials == first_partial + 2:
        return ("avg", len(groups) + first_partial)
    if partials != first_partial + 1:
        return None
    kind = {"count_star": "count", "count": "count", "sum": "sum", "min": "min", "max": "max"}
    if name not in kind:
        return None
    return (kind[name], len(groups) + first_partial)


def _partial_position(node: Node) -> int | None:
    """N for a reference to the partial column aN; else None."""
    if not _ast.is_column_ref(node) or len(node["column_names"]) != 1:
        return None
    name = str(node["column_names"][0])
    return int(name[1:]) if re.fullmatch(r"a\d+", name) else None


def _count_final(node: Node) -> int | None:
    """N when `node` is the final of a count, `CAST(coalesce(sum(aN), 0) AS BIGINT)`."""
    if node.get("class") != "CAST" or str(node["type_expr"].get("type_name")).upper() != "BIGINT":
        return None
    inner = node["child"]
    if inner.get("type") != "OPERATOR_COALESCE":
        return None
    arguments = inner.get("children") or []
    if len(arguments) != 2 or arguments[1].get("class") != "CONSTANT":
        return None
    if (arguments[1].get("literal") or {}).get("text") != "0":
        return None
    total = arguments[0]
    if total.get("class") != "FUNCTION" or str(total["function_name"]).lower() != "sum":
        return None
    summed = [a.get("expression", a) for a in total.get("arguments") or []]
    return _partial_position(summed[0]) if len(summed) == 1 else None


def _distinct_output(item: Node, groups: list[Node]) -> tuple[str, int] | None:
    """A select item of a two-phase query with distinct pre-aggregation (the partials: the
    groups, then their distinct values of X) as an `AggregateMerge` output: a group,
    count(DISTINCT X), or min or max of X; None for anything else."""
    for i, group in enumerate(groups):
        if _ast.same(item, group):
            return ("group", i)
    if item.get("class") != "FUNCTION":
        return None
    name = str(item["function_name"]).lower()
    if name == "count" and item.get("distinct"):
        return ("count_distinct", len(groups))
    return (name, len(groups)) if name in ("min", "max") else None


def _sort_key(position: int, order: Node) -> tuple[int, bool, bool]:
    """An ORDER BY item on output `position` as a `SortMerge` key (DuckDB's defaults:
    ascending, NULLs last)."""
    nulls_first = order["null_order"] in ("NULLS_FIRST", "NULLS FIRST")
    return (position, order["type"] == "DESCENDING", nulls_first)


def _order_sql(column: str, order: Node) -> str:
    direction = {"ASCENDING": " ASC", "DESCENDING": " DESC"}.get(order["type"], "")
    nulls = {
        "NULLS_FIRST": " NULLS FIRST",
        "NULLS FIRST": " NULLS FIRST",
        "NULLS_LAST": " NULLS LAST",
        "NULLS LAST": " NULLS LAST",
    }.get(order["null_order"], "")
    return f"{column}{direction}{nulls}"


def _is_constant(node: Node) -> bool:
    """A literal, or a literal cast to a type (how query.scalars writes an answer)."""
    if node.get("class") == "CAST":
        return _is_constant(node["child"])
    return node.get("class") == "CONSTANT"
