"""Narrow gathers: which columns and rows of each table a query can possibly use.

When a query has no distributed plan (query.planner returns `Gather`), the coordinator
still runs it on its own DuckDB over the tables' rows. `plan_scans(con, sql, …)` reads
DuckDB's parse tree of the query (query._ast) and says, for every cluster table it reads:

- **columns**: the table's stored columns the query may name: unqualified anywhere (in
  any column reference, USING list or subquery), or qualified by the table's alias or
  name. `*` and `COLUMNS(…)` keep all of the tables they expand over (none in an EXISTS
  subquery's select list); a whole-row reference (`SELECT t FROM t`), renamed columns
  (`t AS x(a, b)`) or a NATURAL join keep all of every table. An unqualified name keeps the column
  of every table that has it, which costs bytes, never correctness.
- **filter**: the conditions every row of the table must meet to affect the result. A
  conjunct of a WHERE clause, or of an inner join's ON, that refers to one table only,
  where that table is not on the NULL-supplying side of an outer join under it (an ON of a
  LEFT JOIN also filters its right side, whose failing rows can never match). A table read
  in several places gets the OR of each place's conditions, and none when one place has
  none. From `(p1 AND q1) OR (p2 AND q2)` over two tables, each gets the OR of its own
  parts (`p1 OR p2`), which every row passing the whole condition meets. Conditions with
  a subquery or a parameter stay behind, and no condition moves when the query calls a
  volatile function (it must run once, on the coordinator).

- **key links**: a join `t.a = s.b` on integers lets `t`'s scan keep only rows whose `a`
  is among the `b`s of `s`'s scan; so does a conjunct `t.a IN (SELECT s.b FROM s …)`.
  When `s` is a reference table (held on every node), the scan checks that in its own
  SQL against the rows of `s` that meet the conditions of the place it is joined at
  (`inline_references`); otherwise the key set is sent from an earlier round
  (`schedule`, `read_scans`).

The query itself is then run unchanged over tables that hold just those columns and rows,
so its answer is the one over whole tables: every row left out fails a condition that the
query applies to every result row it could have produced.

`plan_scans` returns a reason (str) instead of a plan when it cannot be sure: a view, a
table function (which may name a table in a string), `rowid`, a table with generated
columns, a name that is both a CTE and a table, or a parse tree DuckDB cannot print back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from query import _ast
from query._ast import Node
from query.port import CatalogView, Fragment, FragmentResult
from storage import ddl
from storage.ddl import TableSpec, quote_identifier
from storage.partitions import partition_table_name

_TRANSPARENT_JOINS = frozenset({"REGULAR", "CROSS", "NATURAL"})
"""Join reference types whose rows are pairs of input rows (no position or nearest match)."""
_KEY_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
)
"""Join columns whose values travel as key sets (exact through Arrow; `=` is plain)."""
_FROM_KINDS = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "EMPTY", "EXPRESSION_LIST"})


@dataclass(frozen=True)
class KeyLink:
    """`column = source.source_column` filters every row of the scanned table at one place
    it is read: a row whose `column` is not among the values of `source_column` in
    `source`'s scan can never reach the result (both columns are integers)."""

    column: str
    source: str
    """The table key of the other side."""
    source_column: str
    place: int = 0
    """Which place the other side is read at (an index into its scan's `places`): only
    rows meeting that place's conditions can be the partner."""


KeysNames = Mapping[tuple[str, str], str]
"""(source table key, source column) -> the name the key set is sent under."""


@dataclass(frozen=True)
class TableScan:
    """The part of one table a query reads."""

    key: str
    spec: TableSpec
    columns: tuple[tuple[str, str], ...]
    """(name, DuckDB type) of the columns kept, in the table's order."""
    places: tuple[tuple[tuple[str, ...], tuple[KeyLink, ...]], ...]
    """Per place the table is read: its conditions (SQL over the unqualified column names)
    and its key links (a place with neither keeps every row)."""
    partitions: tuple[tuple[int, tuple[int, ...]], ...]
    """(partition, holders) of each partition read (one for a reference table)."""
    inline: tuple[tuple[KeyLink, TableScan], ...] = ()
    """Links whose source is a reference table, with its scan: checked in this scan's own
    SQL (`column IN (SELECT source_column FROM source WHERE …)`), on a node that holds the
    reference table too, so no round waits for their key sets (see `inline_references`)."""
    extra: tuple[str, ...] = ()
    """SQL expressions over the table's columns, selected after `columns` (e.g. the
    partition a repartitioned row goes to)."""
    aggregates: tuple[tuple[str, str, str], ...] = ()
    """(name, SQL, DuckDB type) of aggregates selected after `columns`, which the rows
    are then grouped by (eager aggregation, query.planner): one row per value of
    `columns` per partition. Before `extra`, which must then be over `columns` only."""

    @property
    def output_columns(self) -> tuple[tuple[str, str], ...]:
        """(name, DuckDB type) of every row the scan sends, `extra` aside."""
        return self.columns + tuple((name, kind) for name, _, kind in self.aggregates)

    @property
    def filter(self) -> str | None:
        """The condition without key sets; None: every row."""
        return self.condition({})

    @property
    def links(self) -> tuple[KeyLink, ...]:
        """Every key link of every place (a link helps only when each place has one),
        but those checked inline."""
        if not all(terms or links for terms, links in self.places):
            return ()
        inline = {link for link, _ in self.inline}
        every = (link for _, links in self.places for link in links)
        return tuple(dict.fromkeys(link for link in every if link not in inline))

    def condition(self, keys: KeysNames, physical: bool = True) -> str | None:
        """The scan's condition with the key sets named in `keys` (others left out), and
        the inline links; their reference tables by their stored names when `physical`,
        else by their logical names (for EXPLAIN)."""
        alternatives = []
        for place in range(len(self.places)):
            alternative = self.place_condition(place, keys, physical)
            if alternative is None:
                return None
            alternatives.append(alternative)
        unique = sorted(set(alternatives))
        if not unique:
            return None
        return unique[0] if len(unique) == 1 else " OR ".join(f"({a})" for a in unique)

    def place_condition(self, place: int, keys: KeysNames, physical: bool = True) -> str | None:
        """What every row read at one place meets (`condition`'s parts); None: nothing."""
        terms, links = self.places[place]
        inline = dict(self.inline)
        parts = [f"({term})" for term in terms]
        for link in links:
            column = quote_identifier(link.column)
            source = inline.get(link)
            name = keys.get((link.source, link.source_column))
            if source is not None:
                table = source.table_name(0) if physical else source.logical_name
                where = source.place_condition(link.place, {}, physical)
                scan = _select_sql(((link.source_column, ""),), where, table)
                parts.append(f"({column} IN ({scan}))")
            elif name is not None:
                parts.append(f"({column} IN (SELECT k FROM {name}))")
        return " AND ".join(parts) if parts else None

    @property
    def logical_name(self) -> str:
        return f"{quote_identifier(self.spec.schema)}.{quote_identifier(self.spec.name)}"

    def table_name(self, partition: int) -> str:
        """The stored table of one partition, as fragments name it."""
        return f"main.{quote_identifier(partition_table_name(self.key, partition))}"

    def select_sql(self, keys: KeysNames | None = None) -> str:
        """The scan with the tables' logical names (for EXPLAIN)."""
        condition = self.condition(keys or {}, False)
        return _select_sql(self.columns, condition, self.logical_name, (), self.aggregates)

    def inline_sources(self) -> dict[str, TableScan]:
        """Table key -> scan of every reference table the condition reads (inline links,
        and theirs)."""
        found: dict[str, TableScan] = {}
        for _, source in self.inline:
            found[source.key] = source
            found.update(source.inline_sources())
        return found

    def fragments(
        self, keys: KeysNames | None = None, inputs: Mapping[str, pa.Table] | None = None
    ) -> tuple[Fragment, ...]:
        """One fragment per partition; `inputs` holds the key sets `keys` names."""
        condition = self.condition(keys or {})
        used = tuple(
            (name, table)
            for name, table in sorted((inputs or {}).items())
            if condition is not None and name in condition
        )
        sources = self.inline_sources().values()
        fragments = []
        for partition, holders in self.partitions:
            table = self.table_name(partition)
            sql = _select_sql(self.columns, condition, table, self.extra, self.aggregates)
            reads = ((self.key, partition), *((source.key, 0) for source in sources))
            held = [n for n in holders if all(n in s.partitions[0][1] for s in sources)]
            fragments.append(Fragment(sql, reads, tuple(held), used))
        return tuple(fragments)


def condition_sql(con: duckdb.DuckDBPyConnection, term: Node) -> str:
    """A single-table conjunct as a scan's `places` hold it: printed by DuckDB with every
    column reference by its last name (query.planner matches a fragment's conjuncts
    against these texts)."""

    def unqualify(item: Node) -> Node | None:
        if _ast.is_column_ref(item):
            return _ast.column_ref(str(item["column_names"][-1]))
        return None

    return _ast.expression_sql(con, _ast.replaced(term, unqualify))


def _select_sql(
    columns: Sequence[tuple[str, str]],
    condition: str | None,
    table: str,
    extra: Sequence[str] = (),
    aggregates: Sequence[tuple[str, str, str]] = (),
) -> str:
    kept = [quote_identifier(name) for name, _ in columns]
    computed = [f"{sql} AS {quote_identifier(name)}" for name, sql, _ in aggregates]
    where = "" if condition is None else f" WHERE {condition}"
    grouped = f" GROUP BY {', '.join(kept)}" if aggregates and kept else ""
    return f"SELECT {', '.join(kept + computed + list(extra))} FROM {table}{where}{grouped}"


@dataclass(frozen=True)
class ScanPlan:
    scans: tuple[TableScan, ...]

    @property
    def fragments(self) -> tuple[Fragment, ...]:
        """Every scan's fragments, without key sets."""
        return tuple(fragment for scan in self.scans for fragment in scan.fragments())


KEYS_MAX = 250_000
"""A key set with more distinct values is not sent: its links are dropped."""
REDUCTION_RATIO = 2
"""A table is reduced by another's keys only if it has this many times its rows or more."""
ROUNDS_MAX = 4
"""Scans wait for key sets through at most this many rounds."""
TARGET_ROWS_MIN = 50_000
"""A table estimated smaller is not worth a round's wait (a few ms): it is never reduced."""


def inline_references(plan: ScanPlan, table_rows: Mapping[str, int]) -> ScanPlan:
    """The plan with every key link checked inline that can be: its source is another,
    narrowed reference table, estimated (`table_rows`) REDUCTION_RATIO times smaller than
    the scanned table, held by a holder of each of its partitions. Tables are taken
    smallest first and a source must come earlier, so inline conditions never cycle."""
    unknown = float("inf")

    def size(key: str) -> float:
        return table_rows.get(key, unknown)

    done: dict[str, TableScan] = {}
    for scan in sorted(plan.scans, key=lambda scan: (size(scan.key), scan.key)):
        inline = []
        for link in scan.links:
            source = done.get(link.source)
            if (
                source is not None
                and source.spec.reference
                and source.place_condition(link.place, {}) is not None
                and size(source.key) * REDUCTION_RATIO <= size(scan.key) < unknown
            ):
                inline.append((link, source))
        if inline:
            candidate = replace(scan, inline=tuple(inline))
            if all(fragment.holders for fragment in candidate.fragments()):
                scan = candidate
        done[scan.key] = scan
    return ScanPlan(tuple(done[scan.key] for scan in plan.scans))


def schedule(
    plan: ScanPlan, table_rows: Mapping[str, int]
) -> list[list[tuple[TableScan, tuple[KeyLink, ...]]]]:
    """The scans in rounds: each scan with the key links it uses, all of whose sources are
    scanned in earlier rounds. A link is used when its source is estimated (`table_rows`)
    to be REDUCTION_RATIO times smaller than a table of TARGET_ROWS_MIN rows or more, is
    itself narrowed (a condition, or a link of its own), and using it changes the scan's
    condition. Smaller tables come first, so no two scans wait for each other. A scan
    goes in the first round it has usable keys for, with those only: it does not wait a
    round longer for more (a round costs a few ms; the keys a round later are most often
    the same column's, narrowed a little more)."""
    unknown = float("inf")

    def size(key: str) -> float:
        return table_rows.get(key, unknown)

    round_of: dict[str, int] = {}
    links_of: dict[str, tuple[KeyLink, ...]] = {}
    narrowed: set[str] = set()
    for scan in sorted(plan.scans, key=lambda scan: (size(scan.key), scan.key)):
        links = tuple(
            link
            for link in scan.links
            if link.source in narrowed  # so scanned before this one
            and round_of[link.source] + 1 < ROUNDS_MAX
            and size(link.source) * REDUCTION_RATIO <= size(scan.key) < unknown
            and size(scan.key) >= TARGET_ROWS_MIN
        )
        if links:  # no waiting a round longer for more keys: the earliest round's links
            earliest = min(round_of[link.source] for link in links)
            links = tuple(link for link in links if round_of[link.source] == earliest)
        names = {(link.source, link.source_column): "k" for link in links}
        if links and scan.condition(names) == scan.condition({}):
            links = ()  # some place reads every row whatever the keys
        round_of[scan.key] = max((round_of[link.source] + 1 for link in links), default=0)
        links_of[scan.key] = links
        if links or scan.filter is not None:
            narrowed.add(scan.key)
    _wait_within(plan, round_of, links_of, narrowed, size)
    rounds: list[list[tuple[TableScan, tuple[KeyLink, ...]]]] = [
        [] for _ in range(max(round_of.values(), default=-1) + 1)
    ]
    for scan in plan.scans:  # each round in the plan's order
        rounds[round_of[scan.key]].append((scan, links_of[scan.key]))
    return rounds


def _wait_within(
    plan: ScanPlan,
    round_of: dict[str, int],
    links_of: dict[str, tuple[KeyLink, ...]],
    narrowed: set[str],
    size: Callable[[str], float],
) -> None:
    """`schedule`'s second pass: a partitioned table's scan of TARGET_ROWS_MIN rows or more
    that waits for no keys, and that no scan waits for, takes the keys of a narrowed table however large
    that table is, when they come before the last round the others need anyway: the
    query takes no more rounds, and the scan sends fewer rows (TPC-H q10: customer by
    the customer keys of a quarter's orders, in lineitem's round)."""
    last = max(round_of.values(), default=0)
    waited_for = {link.source for links in links_of.values() for link in links}
    for scan in sorted(plan.scans, key=lambda scan: (size(scan.key), scan.key)):
        if (
            links_of[scan.key]
            or scan.key in waited_for
            or scan.spec.reference  # small by design, and read on one node
            or size(scan.key) < TARGET_ROWS_MIN
        ):
            continue
        links = tuple(
            link
            for link in scan.links
            if link.source in narrowed
            and link.source != scan.key
            and round_of[link.source] < last
            and link.source not in _waiting_on(scan.key, links_of)
        )
        if not links:
            continue
        earliest = min(round_of[link.source] for link in links)
        links = tuple(link for link in links if round_of[link.source] == earliest)
        names = {(link.source, link.source_column): "k" for link in links}
        if scan.condition(names) == scan.condition({}):
            continue
        round_of[scan.key] = earliest + 1
        links_of[scan.key] = links
        narrowed.add(scan.key)
        waited_for |= {link.source for link in links}


def _waiting_on(key: str, links_of: Mapping[str, tuple[KeyLink, ...]]) -> set[str]:
    """The scans that wait, through any chain of key sets, for `key`'s."""
    waiting: set[str] = set()
    pending = [key]
    while pending:
        source = pending.pop()
        for other, links in links_of.items():
            if other not in waiting and any(link.source == source for link in links):
                waiting.add(other)
                pending.append(other)
    return waiting


def key_names(
    rounds: list[list[tuple[TableScan, tuple[KeyLink, ...]]]],
) -> dict[tuple[str, str], str]:
    """The name each key set the rounds use is sent under: (table key, column) -> name."""
    pairs = sorted(
        {(link.source, link.source_column) for r in rounds for _, ls in r for link in ls}
    )
    return {pair: f"dcluster_keys_{number}" for number, pair in enumerate(pairs)}


def key_set(rows: pa.Table, column: str) -> pa.Table | None:
    """The distinct non-NULL values of `column` as a one-column table `k`; None when the
    column is missing or has more than KEYS_MAX values."""
    if column not in rows.column_names:
        return None
    values = pc.drop_null(pc.unique(rows.column(column).combine_chunks()))
    if len(values) > KEYS_MAX:
        return None
    return pa.table({"k": values})


Fetch = Callable[[Sequence[Fragment]], Sequence[FragmentResult]]


def read_scans(
    plan: ScanPlan,
    table_rows: Mapping[str, int],
    fetch: Fetch,
    trace: list[tuple[str, ...]] | None = None,
    known: Mapping[str, pa.Table] | None = None,
) -> dict[str, pa.Table]:
    """Every scan's rows (table key -> rows), read round by round (`schedule`) through
    `fetch` (one call per round); the key sets of a round's scans go with the next
    rounds' scans that link to them. `trace` gets (table key, node, rows, bytes) for every
    fragment, and (`keys of <table>.<column>`, name, values, bytes) for each key set.
    `known` holds rows already read at the same barrier by a scan's `fragments()` (no
    key sets): those scans are not read again."""
    rounds = schedule(plan, table_rows)
    names = key_names(rounds)
    inputs: dict[str, pa.Table] = {}
    rows: dict[str, pa.Table] = dict(known or {})
    for scans in rounds:
        asked = []
        for scan, links in scans:
            if scan.key in rows:
                continue
            pairs = [(link.source, link.source_column) for link in links]
            usable = {pair: names[pair] for pair in pairs if names[pair] in inputs}
            asked.append((scan, scan.fragments(usable, inputs)))
        wanted = [fragment for _, fragments in asked for fragment in fragments]
        results = iter(fetch(wanted) if wanted else ())
        for scan, fragments in asked:
            parts = [next(results) for _ in fragments]
            if trace is not None:
                for part in parts:
                    trace.append(
                        (scan.key, str(part.node), str(part.rows.num_rows), str(part.rows.nbytes))
                    )
            tables = [part.rows for part in parts]
            rows[scan.key] = pa.concat_tables(tables, promote_options="permissive")
        for (source, column), name in names.items():
            if name in inputs or source not in {scan.key for scan, _ in scans}:
                continue
            keys = key_set(rows[source], column)
            if keys is not None:
                inputs[name] = keys
                if trace is not None:
                    label = f"keys of {source}.{column}"
                    trace.append((label, name, str(keys.num_rows), str(keys.nbytes)))
    return rows


class _Unsure(Exception):
    pass


@dataclass
class _Reference:
    """One place the query reads a table: a BASE_TABLE node."""

    node: Node
    key: str
    name: str
    """The name its columns are qualified by in the query (the alias, else the table)."""
    every_column: bool = False
    renamed: bool = False
    """Its columns are renamed (`t AS x(a, b)`): names in the query do not match them."""
    conditions: list[Node] | None = None
    """Conjuncts pushed to this place; None until its SELECT has been looked at."""
    links: list[KeyLink] = field(default_factory=list)


def plan_scans(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    view: CatalogView,
    specs: Mapping[str, TableSpec],
    columns_of: Callable[[TableSpec], Sequence[tuple[str, str]]],
    has_generated: Callable[[TableSpec], bool],
    none_ok: bool = False,
) -> ScanPlan | str:
    """The scans of the query `sql` (see the module doc), or why there are none.
    `columns_of(spec)` gives a table's stored (name, type) columns in order. A query that
    reads no cluster table has no plan, unless `none_ok` (then: no scans)."""
    try:
        tree = _ast.parse(con, sql)
        return _Scans(con, view, specs, columns_of, has_generated).plan(tree, sql, none_ok)
    except _Unsure as why:
        return str(why)
    except _ast.NotATree as error:
        return f"DuckDB cannot print its parse tree back ({error})"


class _Scans:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        view: CatalogView,
        specs: Mapping[str, TableSpec],
        columns_of: Callable[[TableSpec], Sequence[tuple[str, str]]],
        has_generated: Callable[[TableSpec], bool],
    ) -> None:
        self.con = con
        self.view = view
        self.specs = specs
        self.columns_of = columns_of
        self.has_generated = has_generated
        self.by_name: dict[str, list[str]] = {}
        for key, spec in specs.items():
            self.by_name.setdefault(spec.name.lower(), []).append(key)
        self.references: dict[int, _Reference] = {}
        self.cte_names: set[str] = set()
        self.outer_scopes: dict[int, list[list[Node]]] = {}
        """SELECT node -> the FROM leaves of the SELECTs whose expressions it is a
        subquery of, innermost first (correlated columns bind there)."""
        self._outer: list[list[Node]] = []
        """The outer scopes of the SELECT whose conditions are being pushed."""

    def plan(self, tree: Node, sql: str, none_ok: bool = False) -> ScanPlan:
        nodes = list(_ast.walk(tree))
        for item in nodes:
            for entry in (item.get("cte_map") or {}).get("map") or ():
                self.cte_names.add(str(entry["key"]).lower())
        names: set[str] = set()
        """Names any table's columns may be reached by (unqualified, or a struct column)."""
        paths: list[tuple[str, ...]] = []
        every_table_whole = False
        for item in nodes:
            kind, klass = item.get("type"), item.get("class")
            if kind == "TABLE_FUNCTION" or kind == "PIVOT" or kind == "SHOW_REF":
                raise _Unsure(f"a {kind} in FROM")
            if kind == "BASE_TABLE":
                self._reference(item)
            elif kind == "JOIN":
                names.update(str(name).lower() for name in item.get("using_columns") or ())
                if item.get("ref_type") == "NATURAL":
                    every_table_whole = True
            if klass == "COLUMN_REF":
                parts = tuple(str(name).lower() for name in item["column_names"])
                names.add(parts[0])
                paths.append(parts)
        if any("rowid" in path for path in paths):
            raise _Unsure("the query names rowid")
        if not self.references:
            if none_ok:
                return ScanPlan(())
            raise _Unsure("no cluster table is read")
        if not self._scope_stars(nodes):
            every_table_whole = True
        self._mark_whole_rows(tree, [])
        volatile = bool(ddl.volatile_functions(sql, self.con))
        if not volatile:
            self._note_outer_scopes(tree, [])
            for item in nodes:
                if item.get("type") == "SELECT_NODE":
                    self._push_conditions(item)
            self._chain_links()
        scans = tuple(self._scan(key, names, paths, every_table_whole) for key in self._keys())
        return inline_references(ScanPlan(scans), self.view.table_rows)

    def _chain_links(self) -> None:
        """Links through a middle table: `t.x = m.y` and `m.y = s.z` give `t.x` a link
        to `s.z` (q09: partsupp to part through lineitem's partkey). A row of t meets a
        row of m at that place, which meets one of s there: its x is among s's z values,
        and t need not wait for m's (larger) scan. Not through a reference table: a link
        to one is checked inline, and the chain with it."""
        for _ in range(ROUNDS_MAX):
            added = False
            for reference in self.references.values():
                for link in list(reference.links):
                    if self.specs[link.source].reference:
                        continue  # checked inline, with its own links (inline_references)
                    middle = self._places_of(link.source)[link.place]
                    for onward in list(middle.links):
                        if (
                            onward.column.lower() == link.source_column.lower()
                            and onward.source != reference.key
                        ):
                            chained = KeyLink(
                                link.column, onward.source, onward.source_column, onward.place
                            )
                            if chained not in reference.links:
                                reference.links.append(chained)
                                added = True
            if not added:
                return

    def _mark_whole_rows(self, value: object, scopes: list[list[_Reference]]) -> None:
        """A column reference that may name a table in its own or an enclosing SELECT's
        FROM (`SELECT t FROM t`: the whole row as a struct) reads every column of it."""
        if isinstance(value, list):
            for child in value:
                self._mark_whole_rows(child, scopes)
            return
        if not isinstance(value, dict):
            return
        if value.get("type") == "SELECT_NODE":
            leaves = _leaves(value["from_table"])
            scope = [self.references[id(leaf)] for leaf in leaves if id(leaf) in self.references]
            scopes = [*scopes, scope]
        elif _ast.is_column_ref(value):
            path = tuple(str(name).lower() for name in value["column_names"])
            for scope in scopes:
                for place in scope:
                    if path in ((place.name.lower(),), tuple(place.key.split(".", 1))):
                        place.every_column = True
            return
        for child in value.values():
            self._mark_whole_rows(child, scopes)

    def _scope_stars(self, nodes: list[Node]) -> bool:
        """Mark the tables each `*` / `COLUMNS(…)` expands over as read whole: those of the
        FROM of the SELECT it is written in (only `t`'s for `t.*`). A star in the select
        list of an EXISTS subquery reads nothing. False when a star is left that no SELECT
        owns."""
        stars = {id(item) for item in nodes if item.get("class") == "STAR"}
        if not stars:
            return True
        for item in nodes:
            if item.get("class") == "SUBQUERY" and item.get("subquery_type") == "EXISTS":
                inner = item["subquery"]["node"]
                if inner.get("type") == "SELECT_NODE":
                    stars -= {id(star) for star in _own_nodes(inner["select_list"])}
        for item in nodes:
            if item.get("type") != "SELECT_NODE":
                continue
            own = [star for star in _own_nodes(item) if id(star) in stars]
            if not own:
                continue
            scope = [
                self.references[id(leaf)]
                for leaf in _leaves(item["from_table"])
                if id(leaf) in self.references
            ]
            for star in own:
                stars.discard(id(star))
                relation = str(star.get("relation_name") or "").lower()
                named = [place for place in scope if place.name.lower() == relation]
                for place in named if relation and named else scope:
                    place.every_column = True
        return not stars

    def _keys(self) -> list[str]:
        return sorted({reference.key for reference in self.references.values()})

    # ---- what is read ----

    def _reference(self, node: Node) -> None:
        if node.get("sample") is not None or node.get("at_clause") is not None:
            raise _Unsure("TABLESAMPLE or AT on a table")
        if node.get("catalog_name"):
            raise _Unsure("a table of another database")
        name = str(node["table_name"]).lower()
        schema = str(node.get("schema_name") or "").lower()
        if not schema and name in self.cte_names:
            if name in self.by_name:
                raise _Unsure(f"{node['table_name']} is both a CTE and a table")
            return  # the CTE, planned with its query node
        keys = [key for key in self.by_name.get(name, []) if key == f"{schema or 'main'}.{name}"]
        if len(keys) != 1:
            raise _Unsure(f"{node['table_name']} is not one cluster table (a view?)")
        spec = self.specs[keys[0]]
        if self.has_generated(spec):
            raise _Unsure(f"{node['table_name']} has generated columns")
        alias = str(node.get("alias") or node["table_name"])
        renamed = bool(node.get("column_name_alias"))
        self.references[id(node)] = _Reference(
            node, keys[0], alias, every_column=renamed, renamed=renamed
        )

    def _places_of(self, key: str) -> list[_Reference]:
        """Where the table `key` is read, in the order of its scan's `places`."""
        return [reference for reference in self.references.values() if reference.key == key]

    def _scan(
        self, key: str, names: set[str], paths: list[tuple[str, ...]], every_table_whole: bool
    ) -> TableScan:
        spec = self.specs[key]
        places = self._places_of(key)
        stored = list(self.columns_of(spec))
        if every_table_whole or any(place.every_column for place in places):
            kept = stored
        else:
            # `q.c` reaches this table's c when q names it here; `schema.table.c` likewise
            qualifiers: set[tuple[str, ...]] = {(place.name.lower(),) for place in places}
            qualifiers.add(tuple(key.split(".", 1)))
            wanted = set(names)
            for path in paths:
                for length in (1, 2):
                    if len(path) > length and path[:length] in qualifiers:
                        wanted.add(path[length])
            kept = [(name, kind) for name, kind in stored if name.lower() in wanted] or stored[:1]
        places_read = tuple(
            (
                tuple(self._printed(term, place) for term in place.conditions or ()),
                tuple(dict.fromkeys(place.links)),
            )
            for place in places
        )
        partitions = (0,) if spec.reference else tuple(range(spec.partitions))
        holders = tuple((p, tuple(self.view.placements[key][p])) for p in partitions)
        return TableScan(key, spec, tuple(kept), places_read, holders)

    def _printed(self, term: Node, place: _Reference) -> str:
        """The conjunct as `place`'s scan reads it (its columns name that table alone,
        checked by `_owner`)."""
        return condition_sql(self.con, term)

    # ---- which rows ----

    def _note_outer_scopes(self, value: object, outer: list[list[Node]]) -> None:
        """Fill `outer_scopes`. Only expression subqueries see outer scopes here: a FROM
        subquery (which DuckDB may bind laterally), an ON clause's subquery and a CTE get
        none, so their outer columns link nothing."""
        if isinstance(value, list):
            for child in value:
                self._note_outer_scopes(child, outer)
            return
        if not isinstance(value, dict):
            return
        inside = outer
        if value.get("type") == "SELECT_NODE":
            self.outer_scopes[id(value)] = outer
            inside = [list(_leaves(value["from_table"])), *outer]
        for key, child in value.items():
            if key in ("from_table", "cte_map"):
                self._note_outer_scopes(child, [])
            else:
                self._note_outer_scopes(child, inside)

    def _push_conditions(self, select: Node) -> None:
        """Give each table read in `select`'s FROM the conjuncts that filter it exactly."""
        scope = list(_leaves(select["from_table"]))
        self._outer = self.outer_scopes.get(id(select), [])
        inner = self._join_conditions(select["from_table"], scope)
        for term in _ast.conjuncts(select.get("where_clause")):
            self._push(term, inner, scope)
        for leaf in scope:
            reference = self.references.get(id(leaf))
            if reference is not None and reference.conditions is None:
                reference.conditions = []

    def _join_conditions(self, ref: Node, scope: list[Node]) -> list[Node]:
        """The leaves of `ref` whose rows all reach its output (none NULL-supplied), after
        pushing each join's ON conjuncts to the leaves they filter exactly."""
        kind = ref.get("type")
        if kind != "JOIN":
            return [ref]
        left = self._join_conditions(ref["left"], scope)
        right = self._join_conditions(ref["right"], scope)
        join_type = ref.get("join_type")
        if ref.get("ref_type") not in _TRANSPARENT_JOINS:
            return []
        filtered = {
            "INNER": left + right,
            "LEFT": right,
            "RIGHT": left,
            "SEMI": right,
            "ANTI": right,
        }.get(str(join_type), [])
        for term in _ast.conjuncts(ref.get("condition")):
            self._push(term, filtered, scope)
        preserved = {
            "INNER": left + right,
            "LEFT": left,
            "RIGHT": right,
            "SEMI": left,
            "ANTI": left,
        }
        return preserved.get(str(join_type), [])

    def _push(self, term: Node, targets: list[Node], scope: list[Node]) -> None:
        owner = self._sole_owner(term, scope)
        if owner is None:
            self._link(term, targets, scope)
            self._link_in(term, targets, scope)
            for target, implied in self._implied_by_or(term, scope):
                self._give(target, implied, targets)
            return
        self._give(owner, term, targets)

    def _give(self, owner: Node, term: Node, targets: list[Node]) -> None:
        if not any(owner is target for target in targets):
            return
        reference = self.references.get(id(owner))
        if reference is None:
            return
        if reference.conditions is None:
            reference.conditions = []
        reference.conditions.append(term)

    def _link(self, term: Node, targets: list[Node], scope: list[Node]) -> None:
        """`a.x = b.y` over two cluster tables' integer columns: each side among `targets`
        gets a key link to the other (its rows need an equal value there to pass). The
        other side may be a table of an enclosing SELECT (a correlated subquery): rows
        equal to no value of it are never looked at, whatever the subquery is."""
        if term.get("class") != "COMPARISON" or term.get("type") != "COMPARE_EQUAL":
            return
        sides = [term.get("left"), term.get("right")]
        if not all(isinstance(side, dict) and _ast.is_column_ref(side) for side in sides):
            return
        ends = []
        for side in sides:
            assert isinstance(side, dict)
            leaf = self._owner(side, scope)
            if leaf is None:
                leaf = self._outer_owner(side, scope)
            reference = None if leaf is None else self.references.get(id(leaf))
            if leaf is None or reference is None:
                return
            column = self._key_column(reference, side)
            if not column:
                return
            ends.append((leaf, reference, column))
        (leaf_a, a, column_a), (leaf_b, b, column_b) = ends
        if a.key == b.key:
            return
        for leaf, target, column, source, source_column in (
            (leaf_a, a, column_a, b, column_b),
            (leaf_b, b, column_b, a, column_a),
        ):
            if any(leaf is item for item in targets):
                places = self._places_of(source.key)
                place = next(n for n, item in enumerate(places) if item is source)
                target.links.append(KeyLink(column, source.key, source_column, place))

    def _link_in(self, term: Node, targets: list[Node], scope: list[Node]) -> None:
        """`a.x IN (SELECT s.y FROM s …)` over integer columns: `a` (among `targets`) gets
        a key link to `s` at the place the subquery reads it. Every value the subquery
        gives is a `y` of a row of `s` meeting that place's conditions (or NULL, which
        matches nothing), so a row whose `x` is none of those can never pass."""
        if (
            term.get("class") != "SUBQUERY"
            or term.get("subquery_type") != "ANY"
            or term.get("comparison_type") != "COMPARE_EQUAL"
        ):
            return
        child, node = term.get("child"), term["subquery"]["node"]
        items = node.get("select_list") or []
        if (
            not (isinstance(child, dict) and _ast.is_column_ref(child))
            or node.get("type") != "SELECT_NODE"
            or len(items) != 1
            or not _ast.is_column_ref(items[0])
        ):
            return
        leaf = self._owner(child, scope)
        source_leaf = self._owner(items[0], list(_leaves(node["from_table"])))
        if leaf is None or source_leaf is None or not any(leaf is item for item in targets):
            return
        target = self.references.get(id(leaf))
        source = self.references.get(id(source_leaf))
        if target is None or source is None or target.key == source.key:
            return
        column, source_column = self._key_column(target, child), self._key_column(source, items[0])
        if column and source_column:
            places = self._places_of(source.key)
            place = next(n for n, item in enumerate(places) if item is source)
            target.links.append(KeyLink(column, source.key, source_column, place))

    def _key_column(self, reference: _Reference, column: Node) -> str:
        """The stored name of the table column a reference names, when its values can
        travel as a key set (an integer type); else ''."""
        name = str(column["column_names"][-1]).lower()
        stored = self.columns_of(self.specs[reference.key])
        found, kind = next(((c, k) for c, k in stored if c.lower() == name), ("", ""))
        return found if kind.upper() in _KEY_TYPES else ""

    def _outer_owner(self, column: Node, scope: list[Node]) -> Node | None:
        """The leaf of an enclosing SELECT a column reference surely binds to: it surely
        binds to nothing in `scope` or any scope between, and surely to that leaf."""
        for outer in [scope, *self._outer]:
            if outer is not scope:
                owner = self._owner(column, outer)
                if owner is not None:
                    return owner
            if not self._surely_absent(column, outer):
                return None
        return None

    def _surely_absent(self, column: Node, scope: list[Node]) -> bool:
        """No leaf of `scope` can bind the reference (`c`, or `q.c`: nor a struct `q`)."""
        names = [str(name).lower() for name in column["column_names"]]
        if len(names) > 2:
            return False
        for leaf in scope:
            reference = self.references.get(id(leaf))
            if reference is None or reference.renamed:
                return False
            columns = {name.lower() for name, _ in self.columns_of(self.specs[reference.key])}
            if names[0] in columns or (len(names) == 2 and names[0] == reference.name.lower()):
                return False
            if len(names) == 2 and names[0] == reference.key.split(".", 1)[1]:
                return False
        return True

    def _sole_owner(self, term: Node, scope: list[Node]) -> Node | None:
        """The one table all of a movable condition's columns belong to, else None."""
        if not _movable(term):
            return None
        owners = [self._owner(item, scope) for item in _column_refs(term)]
        owner = owners[0]
        if owner is None or any(other is not owner for other in owners):
            return None
        return owner

    def _implied_by_or(self, term: Node, scope: list[Node]) -> list[tuple[Node, Node]]:
        """For `(p1 AND q1) OR (p2 AND q2) …` over several tables: each table whose
        conditions appear in every branch gets `(its part of branch 1) OR (… of branch 2)
        …`, which every row that passes the whole condition meets (the whole condition
        still runs on the coordinator)."""
        if term.get("class") != "CONJUNCTION" or term.get("type") != "CONJUNCTION_OR":
            return []
        parts: dict[int, list[list[Node]]] = {}
        leaves: dict[int, Node] = {}
        for branch_number, branch in enumerate(term["children"]):
            for conjunct in _ast.conjuncts(branch):
                owner = self._sole_owner(conjunct, scope)
                if owner is None:
                    continue
                leaves[id(owner)] = owner
                branches = parts.setdefault(id(owner), [])
                while len(branches) <= branch_number:
                    branches.append([])
                branches[branch_number].append(conjunct)
        implied = []
        for key, branches in parts.items():
            if len(branches) == len(term["children"]) and all(branches):
                either = [_conjunction("CONJUNCTION_AND", branch) for branch in branches]
                implied.append((leaves[key], _conjunction("CONJUNCTION_OR", either)))
        return implied

    def _owner(self, column: Node, scope: list[Node]) -> Node | None:
        """The leaf of `scope` a column reference surely binds to, else None."""
        names = [str(name).lower() for name in column["column_names"]]
        candidates = []
        for leaf in scope:
            reference = self.references.get(id(leaf))
            if reference is None:
                if len(names) == 1:
                    return None  # a subquery or VALUES might have that column too
                continue
            columns = {name.lower() for name, _ in self.columns_of(self.specs[reference.key])}
            if names[-1] not in columns or reference.renamed:
                continue
            if len(names) == 1:
                candidates.append(leaf)
            elif len(names) == 2 and names[0] == reference.name.lower():
                candidates.append(leaf)
            elif (
                len(names) == 3
                and not leaf.get("alias")
                and f"{names[0]}.{names[1]}" == reference.key
            ):
                candidates.append(leaf)
        return candidates[0] if len(candidates) == 1 else None


def _leaves(ref: Node) -> Iterator[Node]:
    """The FROM clause's tables, subqueries and other inputs (the join tree's leaves)."""
    kind = ref.get("type")
    if kind == "JOIN":
        yield from _leaves(ref["left"])
        yield from _leaves(ref["right"])
    elif kind in _FROM_KINDS:
        yield ref
    else:
        raise _Unsure(f"a {kind} in FROM")


def _conjunction(kind: str, children: list[Node]) -> Node:
    if len(children) == 1:
        return children[0]
    return {
        "class": "CONJUNCTION",
        "type": kind,
        "alias": "",
        "query_location": 18446744073709551615,
        "children": children,
    }


def _own_nodes(value: object) -> Iterator[Node]:
    """Every node under `value` that is not inside a nested query (subquery or CTE)."""
    if isinstance(value, dict):
        yield value
        for key, child in value.items():
            if key not in ("subquery", "cte_map"):
                yield from _own_nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _own_nodes(child)


def _column_refs(term: Node) -> Iterator[Node]:
    return (item for item in _ast.walk(term) if _ast.is_column_ref(item))


def _movable(term: Node) -> bool:
    """A condition that may run before the joins: no subquery, parameter, window, lambda
    or aggregate, and at least one column."""
    has_column = False
    for item in _ast.walk(term):
        klass = item.get("class")
        if klass in ("SUBQUERY", "PARAMETER", "WINDOW", "LAMBDA", "STAR", "POSITIONAL_REFERENCE"):
            return False
        if klass == "COLUMN_REF":
            has_column = True
    return has_column
