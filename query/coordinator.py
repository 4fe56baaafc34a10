"""The coordinator of every statement: the client process binds, reads, runs and writes.

`Coordinator(port).execute(sql)` runs one statement against the cluster behind a
`ClusterPort` and returns what single-node DuckDB returns for the same statement on the
same data — same columns, names, types and rows, same errors with the same messages:

- DDL: bound against the shadow catalog (`Catalog.prepare`, DuckDB's own errors) and
  committed as one DDL command. CREATE TABLE … AS runs its query at a read barrier and
  commits the table and its rows in that one command, so both appear atomically.
- Reads (SELECT): at one read barrier ('strong', the default: one consistent snapshot of
  the cluster) or as applied now ('stale'), the SELECT runs as query.planner plans it on
  the partitions (fragments, tables moved to them — broadcast whole or dealt out by a
  join key — and a merge here; plans are remembered per query text while the catalog,
  placements and members stay the same, PLANS_CACHED_MAX); when the plan gathers, its
  uncorrelated scalar subqueries are answered first at that barrier and put in as
  constants (query.scalars) and it is planned again (the next run sends them in one
  round with the statement); its WITH queries over partitioned tables are answered first
  (query.ctes); failing that, it runs here over the narrowed scans of query.scans. Only when none of these can answer (and for COPY … TO,
  and a PIVOT without an IN list, which DuckDB runs as several statements) are the whole
  tables it may read gathered and the statement run in the coordinator's
  DuckDB (query._reads) — also how a fragment's runtime error is raised in DuckDB's words.
- Writes (INSERT, UPDATE, DELETE, COPY … FROM): run once here, only the changed rows are
  staged and one commit names them (query._writes). A commit refused because what the
  statement read has changed (`Conflict`) is planned and run again from the start, up to
  WRITE_ATTEMPTS_MAX times, with jittered exponential backoff.

Each statement is atomic on its own; there are no multi-statement transactions.
`SET dcluster_consistency = 'strong'|'stale'` changes the session's default.

Guarantees: nothing is staged before DuckDB has accepted the whole statement; a statement
that raises wrote nothing, except a `ClusterError` raised by the commit itself, where the
outcome may be unknown (the port's message says so).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from clock import Clock, SystemClock
from cluster.sql_protocol import (
    STATEMENT_TEXT_CHARS_MAX,
    CommandKind,
    TableWrite,
    table_key,
)
from query._ast import NotATree
from query._reads import (
    BindFailed,
    CatalogMoved,
    ClusterError,
    ClusterUnavailable,
    CommandRejected,
    DuckDBError,
    ExecutionFailed,
    NotPlaceable,
    ParseFailed,
    ReadDatabase,
    Refused,
    SqlError,
    StageRefused,
    Token,
    Unsupported,
    WorkDatabase,
    WriteConflict,
    cluster_error,
    gather,
    loaded,
    qualified,
    run,
    setting_assignment,
    split_script,
    tokens,
)
from query._writes import Changes, Target, export, find_target, plan_write, run_write, stage
from query.ctes import WithQueries
from query.planner import (
    EXACT_THROUGH_ARROW,
    FRAGMENTS_RELATION,
    Broadcast,
    Distributed,
    Gather,
    plan_select,
)
from query.port import (
    CatalogChanged,
    CatalogView,
    ClusterPort,
    Command,
    Conflict,
    Fragment,
    FragmentFailed,
    FragmentResult,
    PortError,
    SnapshotMissing,
)
from query.results import (
    Converter,
    FoundTypes,
    StatementResult,
    aggregate_merged,
    sort_merged,
)
from query.scalars import ScalarSubqueries, literal
from query.scans import (
    KEYS_MAX,
    ScanPlan,
    TableScan,
    key_names,
    plan_scans,
    read_scans,
    schedule,
)
from storage import ddl
from storage.catalog import AlterTable, BindError, CatalogError, CreateTable, Ddl, DropTable
from storage.ddl import Statement, StatementKind, quote_identifier
from storage.placement import partition_expression, place

__all__ = [
    "BindFailed",
    "CatalogMoved",
    "ClusterError",
    "ClusterUnavailable",
    "CommandRejected",
    "Coordinator",
    "DuckDBError",
    "ExecutionFailed",
    "NotPlaceable",
    "ParseFailed",
    "Refused",
    "SqlError",
    "StageRefused",
    "StatementResult",
    "Unsupported",
    "WriteConflict",
    "cluster_error",
]

BROADCAST_BYTES_MAX = 4 * 1024 * 1024
"""Broadcast tables scanned to more bytes than this (together) are not sent: the query is
gathered instead, over narrowed scans that reuse the rows already read. Sending costs
about 2 ms per MB per worker and every worker builds its own hash table of them, so a
large broadcast loses to a gather of the (often well filtered) other side. Far below
`cluster.sql_protocol.FRAGMENT_INPUTS_BYTES_MAX`, which bounds a fragment's inputs."""
BROADCAST_WHOLE_BYTES_MAX = 24 * 1024 * 1024
"""A broadcast above BROADCAST_BYTES_MAX is sent all the same, up to this, when the gather
would read tables whole (no condition and no key set narrows them) to more bytes than the
broadcast sends, and a fragment's inputs stay within REPARTITION_BYTES_MAX +
BROADCAST_BYTES_MAX: TPC-H q18 broadcasts 4.5 MB of customer rather than gather 200 MB of
lineitem and orders. (What a gather reads of filtered tables is not known before it
reads them: a broadcast is kept only against a sure cost.)"""
REPARTITION_BYTES_MAX = 32 * 1024 * 1024
"""A repartitioned table's rows dealt to one fragment above this (all such tables
together) are not sent: the query is gathered instead, as for BROADCAST_BYTES_MAX. Below
`cluster.sql_protocol.FRAGMENT_INPUTS_BYTES_MAX` with room for the broadcast tables."""
PLANS_CACHED_MAX = 256
"""Query texts whose plans a coordinator remembers (while the catalog, the placements
and the members stay those they were planned against): a repeated query skips DuckDB's
bind and the planner, 5–10 ms."""
SCALARS_DEPTH_MAX = 3
PIVOTS_GATHER = (
    "a PIVOT without an IN list takes its columns from the data (DuckDB runs it as several "
    "statements), so it runs here as written; PIVOT … ON col IN (…) is planned"
)
"""Scalar subqueries inside scalar subqueries are answered first this many levels deep."""
WRITE_ATTEMPTS_MAX = 8
"""Times a statement is planned and run again after its commit met a Conflict."""
BACKOFF_FIRST_S = 0.002
BACKOFF_MAX_S = 0.25
CONSISTENCIES = ("strong", "stale")
CONSISTENCY_SETTING = "dcluster_consistency"
_TRANSACTION_WORDS = frozenset(
    {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"}
)

T = TypeVar("T")
Step = tuple[str, str, str, str | None, str | None]
"""One row of EXPLAIN: step, where it runs, detail, rows and bytes (ANALYZE)."""


V = TypeVar("V")


class _ViewMemo(Generic[V]):
    """What the coordinator worked out from a query text against a catalog view (a
    function of the two): the newest PLANS_CACHED_MAX texts, each valid while the view's
    `Coordinator._basis` is the one it was worked out against; emptied by any statement
    other than a SELECT."""

    def __init__(self) -> None:
        self._known: collections.OrderedDict[Hashable, tuple[Hashable, V]] = (
            collections.OrderedDict()
        )

    def get(self, key: Hashable, basis: Hashable) -> V | None:
        known = self._known.get(key)
        if known is None or not (known[0] is basis or known[0] == basis):
            return None
        self._known.move_to_end(key)
        return known[1]

    def put(self, key: Hashable, basis: Hashable, value: V) -> V:
        self._known[key] = (basis, value)
        self._known.move_to_end(key)
        if len(self._known) > PLANS_CACHED_MAX:
            self._known.popitem(last=False)
        return value

    def clear(self) -> None:
        self._known.clear()


@dataclasses.dataclass(frozen=True)
class _Planned:
    basis: Hashable
    plan: Distributed | Gather
    names: tuple[str, ...]
    types: tuple[str, ...]
    shape: pa.Schema | None


class Coordinator:
    """Runs statements against the cluster behind `port`. Not thread-safe: one per
    session. `rng` and `sleep` drive the conflict backoff (tests pass their own)."""

    def __init__(
        self,
        port: ClusterPort,
        *,
        consistency: str = "strong",
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Clock | None = None,
    ) -> None:
        self._port = port
        self._clock = clock or SystemClock()
        self._consistency = _checked_consistency(consistency)
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._work = WorkDatabase()
        self._narrow = ReadDatabase()
        self._shape: pa.Schema | None = None
        """The Arrow schema of the last planned query's result (from its run on no rows)."""
        self._converter = Converter()
        self._found_types = FoundTypes()
        """For the work database's connection (fragments' rows at the merge)."""
        self._selects: dict[str, Statement] = {}
        """SELECT texts -> their parse (at most PLANS_CACHED_MAX, oldest dropped first)."""
        self._scalars = _ViewMemo[tuple[ScalarSubqueries | None, list[str]]]()
        """Query text -> its scalar subqueries (`_scalar_candidates`)."""
        self._constants = _ViewMemo[tuple[dict[str, str], dict[str, pa.Table]]]()
        """Query text -> the constants its scalar subqueries gave when it last ran, and
        their answers: `_in_one_round` plans with them and checks them."""
        self._scan_plans = _ViewMemo[ScanPlan | str]()
        """(query text, none_ok) -> its narrowed scans (`_scan_plan`)."""
        self._withs = _ViewMemo[tuple[WithQueries | None]]()
        """Query text -> its WITH queries answered first (`_with_queries`), or (None,)."""
        self._bases: tuple[CatalogView, Hashable] | None = None
        """The last view `_basis` was asked for, and its basis."""
        self._plans: collections.OrderedDict[str, _Planned] = collections.OrderedDict()
        """Query text -> its plan, for the `_basis` of the view it was planned against,
        newest last; emptied by any other statement."""

    @property
    def consistency(self) -> str:
        return self._consistency

    def close(self) -> None:
        self._work.close()
        self._narrow.close()
        self._converter.close()

    def execute_script(
        self, sql: str, parameters: object = None, *, consistency: str | None = None
    ) -> StatementResult:
        """Run each statement of a script in order (each atomic on its own, the first error
        stops it) and return the last one's result; `parameters` go to the last one."""
        statements = split_script(sql)
        if not statements:
            raise Unsupported("no statement to run")
        last = len(statements) - 1
        result: StatementResult | None = None
        for position, text in enumerate(statements):
            values = parameters if position == last else None
            result = self.execute(text, values, consistency=consistency)
        assert result is not None
        return result

    def execute(
        self, sql: str, parameters: object = None, *, consistency: str | None = None
    ) -> StatementResult:
        """Run one statement. Raises SqlError (port errors come wrapped in ClusterError
        subclasses that are also instances of the port's own error classes)."""
        chosen = _checked_consistency(consistency or self._consistency)
        words = tokens(sql)
        if words and words[0].word() == "EXPLAIN":
            return self._explain(sql, words, parameters, chosen)
        value = setting_assignment(words, CONSISTENCY_SETTING)
        if value is not None:
            if value.lower() not in CONSISTENCIES:
                raise Refused(f"{CONSISTENCY_SETTING} is 'strong' or 'stale', not {value!r}")
            self._consistency = value.lower()
            return self._result(pa.table({"Success": pa.array([], pa.bool_())}), ["BOOLEAN"])
        statement = self._parse(sql, words)
        if parameters is not None and statement.kind in ddl.DDL_KINDS:
            raise Unsupported("parameters are not supported in DDL statements")
        try:
            return self._fresh_catalog_on_bind_error(
                lambda: self._dispatch(statement, sql, words, parameters, chosen)
            )
        except PortError as error:
            if isinstance(error, SqlError):
                raise
            raise cluster_error(error) from error

    # -- dispatch ----------------------------------------------------------------------------

    def _parse(self, sql: str, words: list[Token]) -> Statement:
        """The statement classified; a SELECT's is remembered by its text (a parse is a
        function of the text alone, and asks DuckDB's parser)."""
        known = self._selects.get(sql)
        if known is not None:
            return known
        try:
            statement = ddl.parse(sql)
        except ddl.SqlSyntaxError as error:
            raise ParseFailed(str(error), "ParserException") from error
        except ddl.UnsupportedStatement as error:
            first = words[0].word() if words else ""
            if first in _TRANSACTION_WORDS:
                raise Unsupported(
                    f"{first} is not supported: dcluster has no multi-statement transactions; "
                    "every statement is atomic on its own"
                ) from error
            raise Unsupported(str(error)) from error
        except ddl.DdlError as error:
            raise Refused(str(error)) from error
        if statement.kind == StatementKind.SELECT:
            self._selects[sql] = statement
            if len(self._selects) > PLANS_CACHED_MAX:
                self._selects.pop(next(iter(self._selects)))
        return statement

    def _dispatch(
        self,
        statement: Statement,
        sql: str,
        words: list[Token],
        parameters: object,
        consistency: str,
    ) -> StatementResult:
        kind = statement.kind
        if kind != StatementKind.SELECT:
            self._plans.clear()
            for memo in (self._scalars, self._constants, self._scan_plans, self._withs):
                memo.clear()
        ddl_refusals = (Conflict, CatalogChanged)
        if kind == StatementKind.CREATE_TABLE_AS:
            return self._retrying(lambda: self._create_table_as(statement, sql), ddl_refusals)
        if kind in ddl.DDL_KINDS:
            return self._retrying(lambda: self._ddl(statement, sql, words), ddl_refusals)
        target = None if kind == StatementKind.SELECT else find_target(words)
        if target is None:
            return self._read(statement, words, parameters, consistency)
        return self._retrying(lambda: self._write(statement, words, target, parameters))

    def _fresh_catalog_on_bind_error(self, attempt: Callable[[], T]) -> T:
        """A statement DuckDB cannot bind may name what another client just created: when a
        fresh catalog differs from the one used, run it once more."""
        try:
            return attempt()
        except BindFailed:
            used = self._port.catalog().catalog_version
            if self._port.catalog(refresh=True).catalog_version == used:
                raise
        return attempt()

    def _retrying(
        self,
        attempt: Callable[[], StatementResult],
        retry_on: tuple[type[PortError], ...] = (Conflict,),
    ) -> StatementResult:
        """Run `attempt` again on a fresh catalog while its commit is refused for a reason
        that planning again may cure (Conflict; for DDL also CatalogChanged, whose second
        attempt then usually fails to bind, with DuckDB's own message)."""
        last: PortError | None = None
        for number in range(WRITE_ATTEMPTS_MAX):
            try:
                return attempt()
            except retry_on as refused:
                if isinstance(refused, SqlError):
                    raise
                last = refused
            self._port.catalog(refresh=True)
            if number + 1 < WRITE_ATTEMPTS_MAX:
                ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**number)
                self._sleep(self._rng.uniform(0, ceiling))  # full jitter
        if isinstance(last, CatalogChanged):
            raise cluster_error(last)
        raise WriteConflict(
            f"write conflict: what this statement reads changed before it could commit, "
            f"{WRITE_ATTEMPTS_MAX} times in a row ({last}); nothing was written, try again"
        )

    def _result(
        self, table: pa.Table | None, types: Sequence[str], rowcount: int = -1
    ) -> StatementResult:
        return StatementResult(table, types, rowcount, self._converter)

    # -- reads -------------------------------------------------------------------------------

    def _read(
        self, statement: Statement, words: list[Token], parameters: object, consistency: str
    ) -> StatementResult:
        if statement.kind == StatementKind.SELECT and not statement.pivots:
            if parameters is not None:
                self._bind(statement.sql, parameters)
            answered = self._planned_read(statement.sql, parameters, consistency, None)
            if answered is not None:
                table, types = answered
                return self._result(table, types, _rowcount(statement, words, table))
        return self._gathered_read(statement, words, parameters, consistency)

    def _planned_read(
        self, sql: str, parameters: object, consistency: str, trace: list[Step] | None
    ) -> tuple[pa.Table | None, list[str]] | None:
        """A SELECT answered at one read barrier: on the partitions as planned, else over
        narrowed scans (`_answer`); None when the catalog moved or neither could answer
        (the caller gathers whole tables, for DuckDB's own error if there is one).

        A read point opened without a log entry may be missing on a holder that did not
        answer it in time and has moved on (`SnapshotMissing`): the read is done again,
        once, at a log barrier, which every holder applies."""
        for log in (False, True):
            view = self._port.catalog()
            index = self._barrier(view, consistency, log)
            if index is None:  # the catalog moved since the view: once more, with a fresh one
                view = self._port.catalog(refresh=True)
                index = self._barrier(view, consistency, log)
            if index is None:
                return None
            mark = len(trace) if trace is not None else 0
            try:
                return self._answer(view, sql, parameters, index, trace, 0)
            except SnapshotMissing as missing:
                if log or consistency != "strong":
                    raise
                if trace is not None:
                    del trace[mark:]
                    why = f"read again at a log barrier: {missing}"
                    trace.append(("read point", "coordinator", why, None, None))
            finally:
                self._port.release(index)
        raise AssertionError("unreachable: the log barrier's attempt returns or raises")

    def _answer(
        self,
        view: CatalogView,
        sql: str,
        parameters: object,
        index: int,
        trace: list[Step] | None,
        depth: int,
    ) -> tuple[pa.Table | None, list[str]] | None:
        """`sql` at barrier `index`: its distributed plan; or, when it gathers, the same
        query with its uncorrelated scalar subqueries answered first (query.scalars, up to
        SCALARS_DEPTH_MAX deep); or over narrowed scans. None when none of them answered."""
        if parameters is None:
            plan, names, types = self._plan(view, sql)
            shape = self._shape
            if trace is not None:
                trace += self._plan_steps(view, sql, plan, True)
            if isinstance(plan, Distributed):
                answered = self._distributed_run(view, sql, plan, names, types, shape, index, trace)
                if answered is not None:
                    return answered
                if trace is not None:
                    why = "a fragment failed: the query runs as written"
                    trace.append(("gather", "coordinator", why, None, None))
            elif depth < SCALARS_DEPTH_MAX:
                if trace is None and depth == 0:
                    answered = self._in_one_round(view, sql, index)
                    if answered is not None:
                        table = answered[0]
                        return (None if table is None else table.rename_columns(names)), types
                substituted = self._substituted(view, sql, index, trace, depth)
                if substituted is not None:
                    try:
                        answered = self._answer(view, substituted, None, index, trace, depth + 1)
                    except SqlError:
                        answered = None  # raised again below, quoting the query as written
                    if answered is not None:
                        table = answered[0]
                        return (None if table is None else table.rename_columns(names)), types
                answered = self._with_answered_first(view, sql, index, trace, depth)
                if answered is not None:
                    return answered
        return self._scanned_run(view, sql, parameters, index, trace)

    def _with_queries(self, view: CatalogView, sql: str) -> WithQueries | None:
        """The statement's WITH queries over partitioned tables (query.ctes); None when
        there are none, or the statement calls a volatile function (it runs as written).
        Remembered like plans (`_basis`)."""
        known = self._withs.get(sql, self._basis(view))
        if known is not None:
            return known[0]
        work = self._work
        try:
            found: WithQueries | None = WithQueries(work.con, sql, work.specs)
        except NotATree:
            found = None
        if found is not None and (not found.texts or ddl.volatile_functions(sql, work.con)):
            found = None
        return self._withs.put(sql, self._basis(view), (found,))[0]

    def _with_answered_first(
        self, view: CatalogView, sql: str, index: int, trace: list[Step] | None, depth: int
    ) -> tuple[pa.Table | None, list[str]] | None:
        """`sql` with its WITH queries over partitioned tables answered first at barrier
        `index` (each as a query of its own: on the partitions when it plans so), then the
        statement over narrowed scans, each such WITH query reading its answer. None when
        there is none, or one gives a type that does not come back from Arrow exactly, or
        anything raised (the caller runs the query as written, for DuckDB's own error)."""
        found = self._with_queries(view, sql)
        if found is None:
            return None
        if trace is None and depth == 0:
            together = self._with_answered_together(view, found, index)
            if together is not None:
                return together
        answers: dict[str, tuple[pa.Table, list[str]]] = {}
        steps: list[Step] | None = None if trace is None else []  # kept if it answers
        for name, text in found.texts.items():
            if steps is not None:
                steps.append((f"WITH {name}", "first, at the same barrier", text, None, None))
            try:
                answered = self._answer(view, text, None, index, steps, depth + 1)
            except SqlError:
                return None
            table = None if answered is None else answered[0]
            if answered is None or table is None:
                return None
            types = answered[1]
            exact = all(EXACT_THROUGH_ARROW.fullmatch(kind) for kind in types)
            if not exact or len(set(table.column_names)) != table.num_columns:
                return None
            answers[name] = (table, types)

        shapes = {name: (table.column_names, types) for name, (table, types) in answers.items()}
        planning, plan = self._with_statement_scans(view, found, shapes)
        if plan is None:
            return None
        parts: list[tuple[str, ...]] = []
        extra = _with_inputs({name: table for name, (table, _) in answers.items()})
        try:
            answered = self._with_statement_run(view, found, plan, index, shapes, extra, parts)
        except (FragmentFailed, SqlError):
            return None
        if trace is not None and steps is not None:
            trace += steps + self._scan_plan_steps(view, planning) + _scan_steps(parts)
        return answered

    def _with_answered_together(
        self, view: CatalogView, found: WithQueries, index: int
    ) -> tuple[pa.Table | None, list[str]] | None:
        """`_with_answered_first` in one round fewer: when every WITH query plans as
        fragments that move no table, they are sent with the statement's first round of
        scans (whose plan depends only on the WITH queries' column names and types, not
        on their rows). None when that does not apply or anything did not answer (the
        caller then takes the longer way)."""
        planned = []
        for name, text in found.texts.items():
            plan, names, types = self._plan(view, text)
            exact = all(EXACT_THROUGH_ARROW.fullmatch(kind) for kind in types)
            if not isinstance(plan, Distributed) or plan.broadcasts or not exact:
                return None
            if len(set(names)) != len(names):
                return None
            planned.append((name, plan, names, types, self._shape))
        shapes = {name: (names, types) for name, _, names, types, _ in planned}
        _, scans = self._with_statement_scans(view, found, shapes)
        if scans is None or not scans.scans:
            return None
        extra: dict[str, pa.Table] = {}  # the answers, filled by the first round

        def answered(merged: Mapping[str, tuple[pa.Table, list[str]]]) -> None:
            extra.update(_with_inputs({name: table for name, (table, _) in merged.items()}))

        fetch, sent = self._first_round_with(index, planned, answered)
        try:
            answer = self._with_statement_run(view, found, scans, index, shapes, extra, None, fetch)
        except (FragmentFailed, SqlError, _NotTogether):
            return None
        return answer if sent else None

    def _first_round_with(
        self,
        index: int,
        parts: Sequence[tuple[str, Distributed, list[str], list[str], pa.Schema | None]],
        take: Callable[[Mapping[str, tuple[pa.Table, list[str]]]], None],
    ) -> tuple[Callable[[Sequence[Fragment]], list[FragmentResult]], list[bool]]:
        """A `fetch` for `_narrowed_run` that sends the fragments of `parts` ((name, plan,
        names, types, shape) of queries that plan as fragments) with the first round of
        scans, and gives `take` their merged answers by name before returning that
        round's scans; `take` may raise `_NotTogether`, as does a part that does not merge.
        With it, a list that is not empty once they were sent (and taken)."""
        first = [fragment for _, plan, _, _, _ in parts for fragment in plan.fragments]
        sent: list[bool] = []

        def fetch(asked: Sequence[Fragment]) -> list[FragmentResult]:
            if sent:
                return self._port.fragments(index, asked)
            sent.append(True)
            results = self._port.fragments(index, [*first, *asked])
            answers, rest = results[: len(first)], results[len(first) :]
            merged = {}
            for name, plan, names, types, shape in parts:
                count = len(plan.fragments)
                mine, answers = answers[:count], answers[count:]
                answer = self._merged(plan, mine, names, types, shape, None)
                if answer is None:
                    raise _NotTogether
                merged[name] = answer
            take(merged)
            return rest

        return fetch, sent

    def _with_statement_scans(
        self,
        view: CatalogView,
        found: WithQueries,
        shapes: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    ) -> tuple[str, ScanPlan | None]:
        """The statement with each WITH query read from an empty relation of its columns'
        (names, types) in `shapes`, and its narrowed scans (None: none can be planned)."""
        planning = found.statement({name: _with_select(*shapes[name], None) for name in shapes})
        plan = self._scan_plan(view, planning, none_ok=True)
        return planning, None if isinstance(plan, str) else plan

    def _with_statement_run(
        self,
        view: CatalogView,
        found: WithQueries,
        plan: ScanPlan,
        index: int,
        shapes: Mapping[str, tuple[Sequence[str], Sequence[str]]],
        extra: Mapping[str, pa.Table],
        parts: list[tuple[str, ...]] | None,
        fetch: Callable[[Sequence[Fragment]], list[FragmentResult]] | None = None,
    ) -> tuple[pa.Table | None, list[str]]:
        """The statement over `plan`'s scans, each WITH query (of `shapes`: its column
        names and types) reading its answer from `extra` (`_with_inputs`; it may be filled
        by the first `fetch`, before the statement runs)."""
        running = found.statement(
            {
                name: _with_select(names, types, _with_source(number))
                for number, (name, (names, types)) in enumerate(shapes.items())
            }
        )
        return self._narrowed_run(view, plan, index, running, None, parts, extra=extra, fetch=fetch)

    def _substituted(
        self, view: CatalogView, sql: str, index: int, trace: list[Step] | None, depth: int
    ) -> str | None:
        """`sql` with each uncorrelated scalar subquery that reads a partitioned table
        replaced by its answer at barrier `index`; None when there is none (or the query
        calls a volatile function: it must run once, as written)."""
        work = self._work
        candidates, texts = self._scalar_candidates(view, sql)
        if candidates is None or not texts:
            return None
        constants = {}
        answers = {}
        for text in texts:
            if trace is not None:
                trace.append(("scalar subquery", "first, at the same barrier", text, None, None))
            try:
                answered = self._answer(view, text, None, index, trace, depth + 1)
            except SqlError:
                continue  # the query as written says what DuckDB says
            if answered is None or answered[0] is None:
                continue
            constant = literal(work.con, answered[0], answered[1][0])
            if constant is not None:
                constants[text] = constant
                answers[text] = answered[0]
                if trace is not None:
                    trace.append(("constant", "coordinator", constant, None, None))
        if not constants:
            return None
        if depth == 0:
            self._constants.put(sql, self._basis(view), (constants, answers))
        return candidates.substituted(constants)

    def _in_one_round(
        self, view: CatalogView, sql: str, index: int
    ) -> tuple[pa.Table | None, list[str]] | None:
        """`sql` answered in one round of fragments with its scalar subqueries: the
        statement planned with the constants the subqueries gave the last time it ran
        (against this view), its fragments sent together with the subqueries' own. The
        answer counts only when every subquery, merged, gives that same constant again at
        this barrier; then it is the answer `_substituted` would lead to, one round
        sooner. A statement that gathers sends them with its first round of narrowed scans
        (q22). None otherwise (the caller answers the subqueries first), or when a
        subquery does not plan as fragments without moved tables, nor the statement. (A
        DOUBLE sum may differ in its last bit from run to run: then it is not the same
        constant, and the long way is taken.)"""
        known = self._constants.get(sql, self._basis(view))
        if known is None:
            return None
        constants, answers = known
        candidates, _ = self._scalar_candidates(view, sql)
        if candidates is None:
            return None
        subqueries = []
        for text in constants:
            plan, names, types = self._plan(view, text)
            if not isinstance(plan, Distributed) or plan.broadcasts:
                return None
            subqueries.append((text, plan, names, types, self._shape))

        def constants_again(merged: Mapping[str, tuple[pa.Table, list[str]]]) -> None:
            """Raise `_NotTogether` unless the subqueries gave the constants planned with."""
            for text, (table, types) in merged.items():
                if not table.equals(answers[text]):
                    # the same rows give the same constant; other rows might too (a
                    # DECIMAL kept as another width): the constant decides
                    if literal(self._work.con, table, types[0]) != constants[text]:
                        raise _NotTogether  # the data changed since: answer them first

        substituted = candidates.substituted(constants)
        plan, names, types = self._plan(view, substituted)
        shape = self._shape
        try:
            fetch, sent = self._first_round_with(index, subqueries, constants_again)
            if isinstance(plan, Distributed) and not plan.broadcasts:
                return self._merged(plan, fetch(plan.fragments), names, types, shape, None)
            if isinstance(plan, Distributed):
                return None
            scans = self._scan_plan(view, substituted)  # gathered: with its first scans
            if isinstance(scans, str):
                return None
            answered = self._narrowed_run(view, scans, index, substituted, None, None, fetch=fetch)
            return answered if sent else None  # the constants checked, or not used
        except (FragmentFailed, SqlError, _NotTogether):
            return None  # the longer way says it as the query as written would

    def _scanned_run(
        self,
        view: CatalogView,
        sql: str,
        parameters: object,
        index: int,
        trace: list[Step] | None,
    ) -> tuple[pa.Table | None, list[str]] | None:
        """Run a SELECT over just the columns and rows of each table it can use (query.
        scans), read on the partitions at barrier `index`; None when there is no such plan,
        or a scan raised (the caller then gathers whole tables, for DuckDB's own error).
        `trace` (EXPLAIN ANALYZE) receives each scan fragment's node, rows and bytes."""
        plan = self._scan_plan(view, sql)
        if isinstance(plan, str):
            return None
        parts: list[tuple[str, ...]] = []
        try:
            answered = self._narrowed_run(view, plan, index, sql, parameters, parts)
        except FragmentFailed:
            return None
        if trace is not None:
            trace += self._scan_plan_steps(view, sql) + _scan_steps(parts)
        return answered

    def _bind(self, sql: str, parameters: object) -> None:
        """DuckDB's own errors for a statement that does not bind (run over no rows)."""
        self._work.prepare(self._port.catalog().catalog)
        with self._work.session({}) as con:
            run(con, sql, parameters)

    def _scan_plan(self, view: CatalogView, sql: str, none_ok: bool = False) -> ScanPlan | str:
        """The query's narrowed scans (query.scans), or why there are none; remembered
        for `view`."""
        work = self._work
        work.prepare(view.catalog)
        known = self._scan_plans.get((sql, none_ok), self._basis(view))
        if known is not None:
            return known
        generated = work.memo.get(("scans", "generated"))
        if generated is None:
            rows = work.con.execute(
                "SELECT DISTINCT schema_name, table_name FROM duckdb_columns() "
                "WHERE is_generated AND database_name = current_database()"
            ).fetchall()
            generated = {table_key(str(schema), str(name)) for schema, name in rows}
            work.memo[("scans", "generated")] = generated
        planned = plan_scans(
            work.con,
            sql,
            view,
            work.specs,
            work.stored_columns,
            lambda spec: table_key(spec.schema, spec.name) in generated,
            none_ok,
        )
        return self._scan_plans.put((sql, none_ok), self._basis(view), planned)

    def _barrier(self, view: CatalogView, consistency: str, log: bool = False) -> int | None:
        """The index to read at: a new read barrier ('strong'; a log entry's with `log`,
        else a read point opened without one where the port can), or 0 ('stale'); None
        (and nothing held) when the catalog moved since `view`."""
        if consistency != "strong":
            return 0
        barrier = (None if log else self._port.open_read()) or self._port.barrier()
        if barrier.catalog_version != view.catalog_version:
            self._port.release(barrier.index)
            return None
        return barrier.index

    def _narrowed_run(
        self,
        view: CatalogView,
        plan: ScanPlan,
        index: int,
        sql: str,
        parameters: object,
        trace: list[tuple[str, ...]] | None,
        known: Mapping[str, pa.Table] | None = None,
        extra: Mapping[str, pa.Table] | None = None,
        fetch: Callable[[Sequence[Fragment]], list[FragmentResult]] | None = None,
    ) -> tuple[pa.Table | None, list[str]]:
        """Read `plan`'s scans at barrier `index` (the rows in `known` are not read again;
        each round through `fetch`, by default the port's fragments) and run the query
        over them (and over `extra`: Arrow tables it reads by name)."""
        rows = read_scans(
            plan,
            view.table_rows,
            fetch or (lambda asked: self._port.fragments(index, asked)),
            trace,
            known,
        )
        tables = [(scan.spec, scan.columns, rows[scan.key]) for scan in plan.scans]
        try:
            with self._narrow.session(tables) as con, _registered(con, extra or {}):
                return run(con, sql, parameters)
        except DuckDBError:
            with self._narrow.session(tables, copied=True) as con:  # for DuckDB's words
                with _registered(con, extra or {}):
                    return run(con, sql, parameters)

    def _basis(self, view: CatalogView) -> Hashable:
        """What a remembered plan depends on in a catalog view besides the query text: the
        catalog (its version: any DDL bumps it), where each partition is held and the
        members. Row estimates and data versions are left out: estimates only choose among
        plans that are all exact, so a plan outlives a fresh view that differs in them
        alone (views are fetched again every CATALOG_MAX_AGE_MS)."""
        known = self._bases
        if known is not None and known[0] is view:
            return known[1]
        basis = (view.catalog_version, tuple(sorted(view.placements.items())), view.members)
        self._bases = (view, basis)
        return basis

    def _plan(
        self, view: CatalogView, sql: str
    ) -> tuple[Distributed | Gather, list[str], list[str]]:
        """The query's plan, result column names and types (DuckDB binds it over the empty
        work database: its own errors for bad SQL). Remembered (PLANS_CACHED_MAX texts)
        while the view has the same `_basis`: the same text against it plans alike."""
        self._work.prepare(view.catalog)  # what follows runs on it
        cached = self._plans.get(sql)
        if cached is not None and cached.basis == self._basis(view):
            self._plans.move_to_end(sql)
            self._shape = cached.shape
            return cached.plan, list(cached.names), list(cached.types)
        with self._work.session({}) as con:
            empty, types = run(con, sql)
        names = [] if empty is None else list(empty.column_names)
        self._shape = None if empty is None else empty.schema
        work = self._work
        plan = plan_select(
            work.con,
            sql,
            view,
            work.specs,
            lambda spec: [name for name, _ in work.stored_columns(spec)],
            names,
            lambda: self._scan_plan(view, sql),
            lambda scan, moved: _whole_broadcast_bytes(scan, moved, view),
            BROADCAST_BYTES_MAX,
        )
        basis = self._basis(view)
        self._plans[sql] = _Planned(basis, plan, tuple(names), tuple(types), self._shape)
        if len(self._plans) > PLANS_CACHED_MAX:
            self._plans.popitem(last=False)
        return plan, names, types

    def _distributed_run(
        self,
        view: CatalogView,
        sql: str,
        plan: Distributed,
        names: list[str],
        types: list[str],
        shape: pa.Schema | None,
        index: int,
        trace: list[Step] | None,
    ) -> tuple[pa.Table, list[str]] | None:
        """Run a SELECT as planned on the partitions at barrier `index`; None when a
        fragment raised (the query is then run as written, for DuckDB's own error). When
        the broadcast tables came to more than BROADCAST_BYTES_MAX, it is gathered over
        narrowed scans instead — unless the gather would read more of whole tables than
        the broadcast sends (BROADCAST_WHOLE_BYTES_MAX). `trace` (EXPLAIN ANALYZE) receives (step, node, rows,
        bytes) for every broadcast scan and fragment."""
        try:
            fragments = plan.fragments
            if plan.broadcasts:
                scans: ScanPlan | str | None = None
                expected = _expected_broadcast_bytes(plan, view)
                if expected > BROADCAST_BYTES_MAX:  # sure to be too large: gather at once
                    scans = self._scan_plan(view, sql)
                    skip = {b.scan.key for b in plan.broadcasts}
                    if not isinstance(scans, str) and (
                        _whole_bytes(scans, view, skip) <= expected * len(fragments)
                    ):
                        why = (
                            f"gathered: the broadcast tables, read whole, would come to "
                            f"about {expected:,} bytes, over {BROADCAST_BYTES_MAX:,}"
                        )
                        return self._gathered_instead(view, sql, scans, index, types, trace, why)
                moved = self._broadcast(view, index, plan, trace)
                whole = sum(rows.nbytes for b, rows in moved if b.split is None)
                dealt = _dealt(moved, plan.partitions)
                largest = max((sum(t.nbytes for _, t in part) for part in dealt), default=0)
                kept = (
                    BROADCAST_BYTES_MAX < whole <= BROADCAST_WHOLE_BYTES_MAX
                    and whole + largest <= REPARTITION_BYTES_MAX + BROADCAST_BYTES_MAX
                )
                if kept:
                    scans = self._scan_plan(view, sql)
                    sent = whole * len(fragments)
                    skip = {b.scan.key for b, _ in moved}
                    kept = not isinstance(scans, str) and _whole_bytes(scans, view, skip) > sent
                if (whole > BROADCAST_BYTES_MAX and not kept) or largest > REPARTITION_BYTES_MAX:
                    # larger than it was worth sending: gather, with the rows read so far
                    if scans is None:
                        scans = self._scan_plan(view, sql)
                    if isinstance(scans, str):
                        return None
                    columns = {scan.key: scan.columns for scan in scans.scans}
                    known = {  # a moved scan may keep fewer columns than the gather needs
                        b.scan.key: _scanned(b, rows)
                        for b, rows in moved
                        if columns.get(b.scan.key) == b.scan.columns and not b.scan.aggregates
                    }
                    why = (
                        f"gathered: the broadcast tables came to over {BROADCAST_BYTES_MAX:,} bytes"
                        if whole > BROADCAST_BYTES_MAX
                        else f"gathered: a fragment's repartitioned rows came to over "
                        f"{REPARTITION_BYTES_MAX:,} bytes"
                    )
                    return self._gathered_instead(view, sql, scans, index, types, trace, why, known)
                if trace is not None:
                    count = len(fragments)
                    for b, rows in moved:
                        if b.split is None:
                            step, where = "broadcast", f"sent as {b.name} to {count} fragments"
                            sent = rows.nbytes * count
                        else:
                            column = quote_identifier(b.split.column)
                            step = "repartition"
                            where = f"dealt by {column} as {b.name} to {count} fragments"
                            sent = sum(t.nbytes for part in dealt for n, t in part if n == b.name)
                        row = (f"{step} {b.name}", where, "", str(rows.num_rows), str(sent))
                        trace.append(row)
                fragments = tuple(
                    dataclasses.replace(fragment, inputs=fragment.inputs + part)
                    for fragment, part in zip(fragments, dealt, strict=True)
                )
            results = self._port.fragments(index, fragments)
        except FragmentFailed:
            # DuckDB's message quotes the statement it ran: the gather path runs the
            # query as written, for the same error in the same words.
            return None
        return self._merged(plan, results, names, types, shape, trace)

    def _gathered_instead(
        self,
        view: CatalogView,
        sql: str,
        scans: ScanPlan,
        index: int,
        types: list[str],
        trace: list[Step] | None,
        why: str,
        known: Mapping[str, pa.Table] | None = None,
    ) -> tuple[pa.Table, list[str]] | None:
        """A planned query run over narrowed scans instead (the rows in `known` are not
        read again); `why` goes into EXPLAIN ANALYZE."""
        parts: list[tuple[str, ...]] = []
        scanned, _ = self._narrowed_run(view, scans, index, sql, None, parts, known)
        if trace is not None:
            trace.append(("gather", "coordinator", why, None, None))
            trace += _scan_steps(parts)
        return None if scanned is None else (scanned, types)

    def _merged(
        self,
        plan: Distributed,
        results: Sequence[FragmentResult],
        names: list[str],
        types: list[str],
        shape: pa.Schema | None,
        trace: list[Step] | None,
    ) -> tuple[pa.Table, list[str]] | None:
        """The fragments' rows merged as `plan` says, with the query's names and types;
        None when they do not come out as the Arrow single-node DuckDB gives."""
        parts = [
            result.rows.rename_columns([f"c{i}" for i in range(result.rows.num_columns)])
            for result in results
        ]
        rows = pa.concat_tables(parts, promote_options="permissive")
        if trace is not None:
            for result, partition in zip(results, plan.partitions, strict=True):
                rows_sent = result.rows
                ran = f"ran {result.elapsed_us / 1000:.1f} ms there" if result.elapsed_us else ""
                trace.append(
                    (
                        f"partition {partition}",
                        f"node {result.node}",
                        ran,
                        str(rows_sent.num_rows),
                        str(rows_sent.nbytes),
                    )
                )
        if trace is not None:
            trace.append(("merge", "coordinator", plan.merge_sql, None, None))
        con = self._work.con
        found = self._found_types.read(con, rows)
        exact = found == list(plan.fragment_types)
        aggregates = plan.aggregate_merge
        if aggregates is not None and exact and shape is not None:
            table = aggregate_merged(rows, aggregates, shape)
            if table is not None:
                return table, types
        sort = plan.sort_merge
        sorted_rows = sort_merged(rows, sort) if sort is not None and exact else None
        if plan.concatenates and exact:
            merged, merged_types = rows, found  # nothing for DuckDB to do
        elif sort is not None and sorted_rows is not None:
            merged, merged_types = sorted_rows, found[: sort.columns]
        else:
            raw = f"{FRAGMENTS_RELATION}_raw"
            con.register(raw, rows)
            try:
                typed = ", ".join(
                    (f"c{i}" if found[i] == wanted else f"CAST(c{i} AS {wanted}) AS c{i}")
                    for i, wanted in enumerate(plan.fragment_types)
                )
                merged, merged_types = run(
                    con,
                    f"WITH {FRAGMENTS_RELATION} AS (SELECT {typed} FROM {raw}) " + plan.merge_sql,
                )
            finally:
                con.unregister(raw)
        assert merged is not None
        table = _cast(con, merged, merged_types, names, types)
        if shape is not None and table.schema != shape:
            try:  # the Arrow single-node DuckDB gives (an ENUM comes back a dictionary)
                table = table.cast(shape)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                return None
        return table, types

    def _broadcast(
        self, view: CatalogView, index: int, plan: Distributed, trace: list[Step] | None
    ) -> list[tuple[Broadcast, pa.Table]]:
        """The moved tables' scanned rows at barrier `index` (in the order of
        `plan.broadcasts`); a repartitioned table's with one more column, last: the
        partition each row goes to (computed where it was scanned). Scans of different
        tables go in rounds (`query.scans.read_scans`): one narrowed by another's key set
        waits for it (q09's partsupp for part's keys)."""
        scans = []
        for broadcast in plan.broadcasts:
            scan = broadcast.scan
            if broadcast.split is not None:
                split = broadcast.split
                column = quote_identifier(split.column)
                scan = dataclasses.replace(scan, extra=(partition_expression(split.spec, column),))
            scans.append(scan)
        fetch = lambda asked: self._port.fragments(index, asked)  # noqa: E731
        parts: list[tuple[str, ...]] = []
        if len({scan.key for scan in scans}) == len(scans):
            read = read_scans(ScanPlan(tuple(scans)), view.table_rows, fetch, parts)
            moved = [(b, read[scan.key]) for b, scan in zip(plan.broadcasts, scans, strict=True)]
        else:  # one table moved twice (e.g. whole and repartitioned): one round, no key sets
            moved = []
            for broadcast, scan in zip(plan.broadcasts, scans, strict=True):
                read = read_scans(ScanPlan((scan,)), {}, fetch, parts)
                moved.append((broadcast, read[scan.key]))
        if trace is not None:
            trace += _scan_steps(parts)
        return moved

    def _gathered_read(
        self, statement: Statement, words: list[Token], parameters: object, consistency: str
    ) -> StatementResult:
        def keys_for(view: CatalogView) -> list[str]:
            self._work.prepare(view.catalog)
            return self._work.tables_named(words)

        gathered = gather(
            self._port, self._port.catalog(), keys_for, strong=consistency == "strong"
        )
        with loaded(self._work, self._port, gathered) as con:
            table, types = run(con, statement.sql, parameters)
        return self._result(table, types, _rowcount(statement, words, table))

    # -- EXPLAIN -----------------------------------------------------------------------------

    def _explain(
        self, sql: str, words: list[Token], parameters: object, consistency: str
    ) -> StatementResult:
        """EXPLAIN [ANALYZE] SELECT …: the distributed plan, one row per step: what runs,
        where, its SQL, and (ANALYZE) the rows and bytes each step moved."""
        analyze = len(words) > 1 and words[1].word() == "ANALYZE"
        query = sql[words[2 if analyze else 1].start :] if len(words) > 1 + analyze else ""
        statement = self._parse(query, tokens(query)) if query else None
        if statement is None or statement.kind != StatementKind.SELECT or parameters is not None:
            raise Unsupported("EXPLAIN [ANALYZE] takes one SELECT, without parameters")
        if analyze:
            steps = self._analyzed(statement, consistency)
        elif statement.pivots:
            view = self._port.catalog()
            steps = self._whole_tables_steps(PIVOTS_GATHER, statement.sql)
            steps = self._with_estimates(view, statement.sql, None, steps, consistency)
        else:
            view = self._port.catalog()
            plan, _, _ = self._plan(view, statement.sql)
            steps = self._plan_steps(view, statement.sql, plan, False)
            steps = self._with_estimates(view, statement.sql, plan, steps, consistency)
            if isinstance(plan, Gather):
                where = "answered first, at the same barrier"
                for text in self._scalar_candidates(view, statement.sql)[1]:
                    steps.append(("scalar subquery", where, text, None, None))
                found = self._with_queries(view, statement.sql)
                for name, text in ({} if found is None else found.texts).items():
                    steps.append((f"WITH {name}", where, text, None, None))
        columns = ["step", "runs_on", "detail", "rows", "bytes"]
        table = pa.table(
            {
                name: pa.array([step[i] for step in steps], pa.string())
                for i, name in enumerate(columns)
            }
        )
        return self._result(table, ["VARCHAR"] * len(columns))

    def _plan_steps(
        self, view: CatalogView, sql: str, plan: Distributed | Gather, analyze: bool
    ) -> list[Step]:
        """EXPLAIN's rows for one planned query: the tier, broadcasts and fragment (and,
        not analyzing, where each partition may run and the merge); or why it gathers and
        the scans it would read."""
        steps: list[Step] = []
        if isinstance(plan, Gather):
            steps.append(("gather", "coordinator", f"gathered: {plan.reason}", None, None))
            if not analyze:  # analyzing: written where the scans are read
                steps += self._scan_plan_steps(view, sql)
            return steps
        where = f"partitions {_ranges(plan.partitions)} of {plan.partitions_total}"
        steps.append(("plan", "coordinator", plan.tier, None, None))
        for broadcast in plan.broadcasts:
            detail = f"{broadcast.scan.select_sql()}, sent as {broadcast.name}"
            if broadcast.split is None:
                step, to = f"broadcast {broadcast.scan.key}", "every fragment"
            else:
                step = f"repartition {broadcast.scan.key}"
                to = f"each fragment its rows, by {quote_identifier(broadcast.split.column)}"
            steps.append((step, to, detail, None, None))
        steps.append(("fragment", where, plan.fragment_sql, None, None))
        if not analyze:
            for fragment, partition in zip(plan.fragments, plan.partitions, strict=True):
                holders = ", ".join(str(node) for node in fragment.holders)
                steps.append((f"partition {partition}", f"one of nodes {holders}", "", None, None))
            steps.append(("merge", "coordinator", plan.merge_sql, None, None))
        return steps

    def _with_estimates(
        self,
        view: CatalogView,
        sql: str,
        plan: Distributed | Gather | None,
        steps: list[Step],
        consistency: str,
    ) -> list[Step]:
        """Plain EXPLAIN's steps with the rows and bytes each would move, estimated: a
        table read whole by its row count; a scan, a moved table's scan and a fragment by
        DuckDB's optimizer on their holders, from the partitions' own statistics
        (`ClusterPort.estimates`: planned at a read point, not run), bytes by column
        widths. "~" marks an estimate; "at most ~" a scan that also waits for key sets
        (estimated without them). A fragment that reads moved tables (DuckDB cannot plan
        it without them), or estimates the cluster does not give, stay blank."""
        wanted: list[tuple[int, list[Fragment], int, str]] = []
        """(step position, fragments whose estimates add up, bytes per row, prefix)"""
        moved = iter(plan.broadcasts if isinstance(plan, Distributed) else ())
        partitions = iter(plan.fragments if isinstance(plan, Distributed) else ())
        narrowed = self._scan_plan(view, sql) if isinstance(plan, Gather) else None
        scans = (
            {}
            if isinstance(narrowed, str) or narrowed is None
            else {scan.key: scan for scan in narrowed.scans}
        )
        for position, (name, _, detail, _, _) in enumerate(steps):
            if name.startswith(("broadcast ", "repartition ")) and isinstance(plan, Distributed):
                scan = next(moved).scan
                wanted.append((position, list(scan.fragments()), _width(scan.output_columns), "~"))
            elif name.startswith("partition ") and isinstance(plan, Distributed):
                fragment = next(partitions)
                if not plan.broadcasts:
                    width = _width([("", kind) for kind in plan.fragment_types])
                    wanted.append((position, [fragment], width, "~"))
            elif name.startswith("scan ") and detail == "all rows":
                key = name.removeprefix("scan ")
                spec = self._work.specs.get(key)
                rows = view.table_rows.get(key)
                if spec is not None and rows is not None:
                    width = _width(self._work.stored_columns(spec))
                    steps[position] = _estimated(steps[position], rows, width, "~")
            elif name.startswith("scan ") and name.removeprefix("scan ") in scans:
                scan = scans[name.removeprefix("scan ")]
                prefix = "at most ~" if "dcluster_keys_" in detail else "~"
                wanted.append((position, list(scan.fragments()), _width(scan.columns), prefix))
        if not wanted:
            return steps
        index = self._barrier(view, consistency)
        if index is None:
            return steps
        try:
            asked = [fragment for _, fragments, _, _ in wanted for fragment in fragments]
            found = iter(self._port.estimates(index, asked))
        except PortError:
            return steps  # EXPLAIN still shows the plan
        finally:
            self._port.release(index)
        for position, fragments, width, prefix in wanted:
            values = [next(found) for _ in fragments]
            if any(value is None for value in values):
                continue
            rows = sum(value or 0 for value in values)
            steps[position] = _estimated(steps[position], rows, width, prefix)
        return steps

    def _scan_plan_steps(self, view: CatalogView, sql: str) -> list[Step]:
        """EXPLAIN's rows for the narrowed scans of a gathered query, round by round."""
        steps: list[Step] = []
        scans = self._scan_plan(view, sql)
        if isinstance(scans, str):
            return self._whole_tables_steps(scans, sql)
        rounds = schedule(scans, view.table_rows)
        names = key_names(rounds)
        for number, scans_in_round in enumerate(rounds):
            for scan, links in scans_in_round:
                where = "one node" if scan.spec.reference else "every partition"
                if number:
                    where += f", round {number + 1}"
                pairs = [(link.source, link.source_column) for link in links]
                used = {pair: names[pair] for pair in pairs}
                steps.append((f"scan {scan.key}", where, scan.select_sql(used), None, None))
        for (source, column), name in names.items():
            why = f"{name}: distinct {column} of the {source} scan, if at most {KEYS_MAX:,}"
            steps.append((f"keys of {source}.{column}", "coordinator", why, None, None))
        return steps

    def _whole_tables_steps(self, why: str, sql: str) -> list[Step]:
        """EXPLAIN's rows for a query run here over the whole tables it may read."""
        steps: list[Step] = [("whole tables", "coordinator", why, None, None)]
        self._work.prepare(self._port.catalog().catalog)
        for key in self._work.tables_named(tokens(sql)):
            steps.append((f"scan {key}", "every partition", "all rows", None, None))
        return steps

    def _analyzed(self, statement: Statement, consistency: str) -> list[Step]:
        """EXPLAIN ANALYZE's steps: the query run as `_read` runs it, with each planned
        query's steps and what every scan, fragment and broadcast moved."""
        started = self._clock.monotonic_ns()
        steps: list[Step] = []
        answered = None
        why = f"whole tables: {PIVOTS_GATHER}"
        if not statement.pivots:
            answered = self._planned_read(statement.sql, None, consistency, steps)
            why = "whole tables"
        if answered is None:
            steps.append(("gather", "coordinator", why, None, None))
            result = self._gathered_read(statement, tokens(statement.sql), None, consistency)
            rows = len(result)
        else:
            rows = 0 if answered[0] is None else answered[0].num_rows
        elapsed = (self._clock.monotonic_ns() - started) / 1e9
        steps.append(("result", "coordinator", f"{elapsed:.6f} s", str(rows), None))
        return steps

    def _scalar_candidates(
        self, view: CatalogView, sql: str
    ) -> tuple[ScalarSubqueries | None, list[str]]:
        """The query's scalar subqueries, and the texts of those `_substituted` would
        answer first (they bind alone). Remembered like plans (`_basis`)."""
        known = self._scalars.get(sql, self._basis(view))
        return (
            known
            if known is not None
            else self._scalars.put(sql, self._basis(view), self._find_scalar_candidates(sql))
        )

    def _find_scalar_candidates(self, sql: str) -> tuple[ScalarSubqueries | None, list[str]]:
        work = self._work
        try:
            candidates = ScalarSubqueries(work.con, sql, work.specs)
        except NotATree:
            return None, []
        if not candidates.texts or ddl.volatile_functions(sql, work.con):
            return candidates, []
        found = []
        for text in candidates.texts:
            try:
                with work.session({}) as con:
                    _, types = run(con, text)
            except SqlError:
                continue
            if len(types) == 1:
                found.append(text)
        return candidates, found

    # -- writes ------------------------------------------------------------------------------

    def _write(
        self, statement: Statement, words: list[Token], target: Target, parameters: object
    ) -> StatementResult:
        def keys_for(view: CatalogView) -> tuple[str, ...]:
            self._work.prepare(view.catalog)
            plan = plan_write(self._work, statement.kind, words, target)
            return plan.reads if plan is not None else ()

        gathered = gather(self._port, self._port.catalog(), keys_for, strong=True)
        with loaded(self._work, self._port, gathered) as con:
            plan = plan_write(self._work, statement.kind, words, target)
            if plan is None:  # DuckDB's own error: an unknown table, or a view
                run(con, statement.sql, parameters)
                raise BindFailed(f"Catalog Error: no table {target.name!r}", "CatalogException")
            table, types, changes = run_write(con, plan, statement.sql, parameters)
        result = self._result(table, types, _rowcount(statement, words, table))
        if changes.empty():
            return result
        batches = stage(self._port, plan.key, changes)
        expected_schemas: tuple[tuple[str, int], ...] = ()
        if plan.key not in plan.reads:
            expected_schemas = ((plan.key, gathered.view.schema_versions[plan.key]),)
        command = Command(
            CommandKind.WRITE,
            writes=(TableWrite(plan.key, batches),),
            expected_versions=_versions(gathered.versions, plan.reads),
            expected_schemas=expected_schemas,
            text=statement.sql[:STATEMENT_TEXT_CHARS_MAX],
        )
        self._port.commit(command)
        return result

    def _raise_duckdb_error(self, statement: Statement, parameters: object) -> None:
        """Run the statement against empty tables for DuckDB's own error (an unknown table,
        or one that is a view)."""
        with self._work.session({}) as con:
            run(con, statement.sql, parameters)

    # -- DDL ---------------------------------------------------------------------------------

    def _prepare(self, view: CatalogView, sql: str) -> Ddl | None:
        try:
            return view.catalog.prepare(sql, len(view.members))
        except BindError as error:
            raise BindFailed(str(error), error.duckdb_error) from error
        except ddl.SqlSyntaxError as error:
            raise ParseFailed(str(error), "ParserException") from error
        except ddl.UnsupportedStatement as error:
            raise Unsupported(str(error)) from error
        except (ddl.DdlError, CatalogError) as error:
            raise Refused(str(error)) from error

    def _ddl(self, statement: Statement, sql: str, words: list[Token]) -> StatementResult:
        view = self._port.catalog()
        change = self._prepare(view, sql)
        self._work.prepare(view.catalog)
        with self._work.session({}) as con:
            if isinstance(change, AlterTable):
                _refuse_volatile_default(con, statement, words)
            table, types = run(con, statement.sql)
        if change is not None:
            command = Command(
                CommandKind.DDL,
                ddl=msgspec.msgpack.encode(change),
                expected_schemas=_incarnation(view, change),
                text=sql[:STATEMENT_TEXT_CHARS_MAX],
            )
            self._port.commit(command)
            self._port.catalog(refresh=True)
        return self._result(table, types, _rowcount(statement, words, table))

    def _no_op(self, view: CatalogView, statement: Statement) -> StatementResult:
        """DuckDB's result for a DDL statement that changes nothing now."""
        self._work.prepare(view.catalog)
        with self._work.session({}) as con:
            table, types = run(con, statement.sql)
        return self._result(table, types)

    def _create_table_as(self, statement: Statement, sql: str) -> StatementResult:
        assert statement.select_sql is not None
        select_words = tokens(statement.select_sql)

        def keys_for(view: CatalogView) -> list[str]:
            self._work.prepare(view.catalog)
            return self._work.tables_named(select_words)

        first_view = self._port.catalog()
        try:
            prepared = self._prepare(first_view, sql)
        except BindFailed:
            # The catalog binds the query wrapped in a LIMIT 0; DuckDB's own message for the
            # statement as written comes from running it over empty tables.
            self._work.prepare(first_view.catalog)
            self._raise_duckdb_error(statement, None)
            raise
        if prepared is None:
            return self._no_op(first_view, statement)  # IF NOT EXISTS, and it exists
        gathered = gather(self._port, first_view, keys_for, strong=True)
        view = gathered.view
        with loaded(self._work, self._port, gathered) as con:
            change = self._prepare(view, sql)  # again: the catalog may have moved
            table, types = run(con, statement.sql)
            if change is None:
                return self._result(table, types)
            assert isinstance(change, CreateTable), change
            spec = change.spec
            rows = export(con, f"SELECT * FROM {qualified(spec)}", spec)
        key = table_key(spec.schema, spec.name)
        holders = place(spec, view.members).holders  # the catalog has no placement yet
        batches = stage(self._port, key, Changes({}, rows), placement=holders)
        command = Command(
            CommandKind.DDL,
            ddl=msgspec.msgpack.encode(change),
            writes=(TableWrite(key, batches),) if batches else (),
            expected_versions=_versions(gathered.versions, sorted(gathered.tables)),
            expected_schemas=_incarnation(view, change),
            text=sql[:STATEMENT_TEXT_CHARS_MAX],
        )
        self._port.commit(command)
        self._port.catalog(refresh=True)
        return self._result(table, types, _rowcount(statement, select_words, table))


def _cast(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    found: Sequence[str],
    names: Sequence[str],
    types: Sequence[str],
) -> pa.Table:
    """The merged rows with the query's own column names and DuckDB types."""
    assert len(found) == len(types) == len(names), (found, types, names)
    if list(found) == list(types):
        return table.rename_columns(list(names))  # what the SELECT below would give
    renamed = table.rename_columns([f"m{i}" for i in range(table.num_columns)])
    con.register("dcluster_merged", renamed)
    try:
        select = ", ".join(
            (f"m{i}" if found[i] == types[i] else f"CAST(m{i} AS {types[i]})")
            + f" AS {quote_identifier(name)}"
            for i, name in enumerate(names)
        )
        result, _ = run(con, f"SELECT {select} FROM dcluster_merged")
    finally:
        con.unregister("dcluster_merged")
    assert result is not None
    return result


_FIXED_WIDTHS = {
    "BOOLEAN": 1,
    "TINYINT": 1,
    "SMALLINT": 2,
    "INTEGER": 4,
    "DATE": 4,
    "FLOAT": 4,
    "BIGINT": 8,
    "DOUBLE": 8,
    "TIMESTAMP": 8,
    "HUGEINT": 16,
}


class _NotTogether(Exception):
    """What was sent with a statement's first round of scans (WITH queries, scalar
    subqueries) did not give what the statement was planned with."""


def _with_source(number: int) -> str:
    """The name the statement reads the `number`th WITH query's answer by."""
    return f"dcluster_with_{number}"


def _with_inputs(tables: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """WITH queries' answers (in the order of their WITH clause) by `_with_source`, with
    columns c0, c1, …"""
    return {
        _with_source(number): table.rename_columns([f"c{i}" for i in range(table.num_columns)])
        for number, table in enumerate(tables.values())
    }


def _with_select(names: Sequence[str], types: Sequence[str], source: str | None) -> str:
    """A WITH query's stand-in: its columns (`names`, DuckDB `types`) read from `source`,
    the Arrow of its answer (columns c0, c1, …), or, with None, from no rows."""
    columns = ", ".join(
        f"CAST({'NULL' if source is None else f'c{i}'} AS {kind}) AS {quote_identifier(column)}"
        for i, (column, kind) in enumerate(zip(names, types, strict=True))
    )
    return f"SELECT {columns} " + ("WHERE false" if source is None else f"FROM {source}")


def _expected_broadcast_bytes(plan: Distributed, view: CatalogView) -> int:
    """About how many bytes the plan's broadcast tables read whole will come to, by
    `_width`: at some place no condition narrows them, nor a key set (only other moved
    tables give one). The others count nothing: how much they give is not known before
    they are read."""
    moved = {broadcast.scan.key for broadcast in plan.broadcasts}
    return sum(
        _whole_broadcast_bytes(broadcast.scan, moved, view)
        for broadcast in plan.broadcasts
        if broadcast.split is None
    )


def _whole_broadcast_bytes(scan: TableScan, moved: set[str], view: CatalogView) -> int:
    """About how many bytes a table broadcast as `scan` comes to when it is read whole (at
    some place no condition narrows it, nor a key set of another `moved` table: only those
    are read before it); 0 when it is not surely read whole."""
    if any(
        not terms and not any(link.source in moved for link in links)
        for terms, links in scan.places
    ):
        return (view.table_rows.get(scan.key) or 0) * _width(scan.columns)
    return 0


def _estimated(step: Step, rows: int, width: int, prefix: str) -> Step:
    """`step` with `rows` estimated rows and their bytes at `width` bytes a row."""
    return (*step[:3], f"{prefix}{rows:,}", f"{prefix}{rows * width:,}")


def _width(columns: Sequence[tuple[str, str]]) -> int:
    """Bytes per row of these (name, type) columns, about: a string counted as 16, a
    decimal as 8."""
    return sum(_FIXED_WIDTHS.get(type_, 16 if type_ == "VARCHAR" else 8) for _, type_ in columns)


def _whole_bytes(scans: ScanPlan, view: CatalogView, skip: set[str]) -> int:
    """About how many bytes a gather over `scans` reads of the tables it reads whole,
    besides those in `skip`: estimated rows times `_width`. A table is read whole when at some place no
    condition narrows it and every key set it is narrowed by comes from a table read whole
    (TPC-H q18: orders by the keys of all customers). Other tables count nothing: what
    they give is not known before they are read."""
    by_key = {scan.key: scan for scan in scans.scans}
    whole = {  # (table, place) -> kept every row, assumed until a link says otherwise
        (scan.key, at): not terms
        for scan in scans.scans
        for at, (terms, _) in enumerate(scan.places)
    }
    changed = True
    while changed:
        changed = False
        for scan in scans.scans:
            for at, (_, links) in enumerate(scan.places):
                if whole[scan.key, at] and not all(
                    whole.get((link.source, link.place), False) for link in links
                ):
                    whole[scan.key, at] = False
                    changed = True
    total = 0
    for key, scan in by_key.items():
        if key in skip or not any(whole[key, at] for at in range(len(scan.places))):
            continue
        total += (view.table_rows.get(key) or 0) * _width(scan.columns)
    return total


@contextlib.contextmanager
def _registered(con: duckdb.DuckDBPyConnection, tables: Mapping[str, pa.Table]) -> Iterator[None]:
    """The Arrow tables registered on `con` by name while the block runs."""
    for name, table in tables.items():
        con.register(name, table)
    try:
        yield
    finally:
        for name in tables:
            con.unregister(name)


def _dealt(
    moved: Sequence[tuple[Broadcast, pa.Table]], partitions: Sequence[int]
) -> list[tuple[tuple[str, pa.Table], ...]]:
    """Each fragment's inputs, in the order of `partitions`: every broadcast table whole,
    and of each repartitioned table the rows of that fragment's partition."""
    dealt: list[tuple[tuple[str, pa.Table], ...]] = []
    for partition in partitions:
        inputs = []
        for broadcast, rows in moved:
            if broadcast.split is None:
                inputs.append((broadcast.name, rows))
                continue
            last = rows.num_columns - 1
            mine = rows.filter(pc.equal(rows.column(last), partition)).remove_column(last)
            inputs.append((broadcast.name, mine))
        dealt.append(tuple(inputs))
    return dealt


def _scanned(broadcast: Broadcast, rows: pa.Table) -> pa.Table:
    """A moved table's rows as its scan reads them (without the partition column)."""
    return rows if broadcast.split is None else rows.remove_column(rows.num_columns - 1)


def _scan_steps(parts: Sequence[tuple[str, ...]]) -> list[Step]:
    """EXPLAIN ANALYZE's steps for what `query.scans.read_scans` traced."""
    steps: list[Step] = []
    for key, node, count, size in parts:
        if key.startswith("keys of "):  # a key set sent with later scans
            steps.append((key, f"sent as {node}", "", count, size))
        else:
            steps.append((f"scanned {key}", f"node {node}", "", count, size))
    return steps


def _ranges(numbers: Sequence[int]) -> str:
    """1,2,3,5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _checked_consistency(consistency: str) -> str:
    if consistency.lower() not in CONSISTENCIES:
        raise ValueError(f"consistency is 'strong' or 'stale', not {consistency!r}")
    return consistency.lower()


def _rowcount(statement: Statement, words: Sequence[Token], table: pa.Table | None) -> int:
    """DuckDB's cursor rowcount: the Count of a statement that changes or moves rows."""
    if table is None or statement.kind == StatementKind.SELECT:
        return -1
    if any(token.word() == "RETURNING" for token in words):
        return -1
    if table.column_names == ["Count"] and table.num_rows == 1:
        return int(table.column(0)[0].as_py())
    return -1


def _versions(versions: Any, keys: Sequence[str]) -> tuple[tuple[str, int], ...]:
    missing = [key for key in keys if key not in versions]
    assert not missing, f"the barrier gave no version for {missing}"
    return tuple((key, int(versions[key])) for key in keys)


def _incarnation(view: CatalogView, change: Ddl) -> tuple[tuple[str, int], ...]:
    """The schema version of the table a DROP, ALTER or CREATE OR REPLACE TABLE acts on: a
    table dropped and created again under its name since binding is not the one meant."""
    if isinstance(change, CreateTable):
        key = table_key(change.spec.schema, change.spec.name)
    elif isinstance(change, AlterTable | DropTable):
        key = table_key(change.schema, change.name)
    else:
        return ()
    version = view.schema_versions.get(key)
    return () if version is None else ((key, version),)


def _refuse_volatile_default(
    con: duckdb.DuckDBPyConnection, statement: Statement, words: Sequence[Token]
) -> None:
    """Every holder computes a new column's DEFAULT for its own rows, so one that may
    differ between runs would make replicas differ."""
    if not any(token.word() == "DEFAULT" for token in words):
        return
    names = ddl.volatile_functions(statement.sql, con)
    if names:
        raise Refused(
            f"ALTER TABLE … ADD COLUMN with a DEFAULT that calls {', '.join(names)}: each "
            "holder would compute its own values for the existing rows and replicas would "
            "differ. Add the column without that DEFAULT, then UPDATE it"
        )
