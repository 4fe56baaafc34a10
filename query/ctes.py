"""WITH queries over partitioned tables: answered first, then read by the statement.

A query with a WITH clause has no distributed plan (query.planner gathers it), and a
narrowed gather would move every row the WITH query reads to the coordinator: TPC-H q15
sends 225,000 lineitem rows to sum them into 10,000 per supplier there. But a WITH query
of the statement's own WITH clause refers to nothing outside itself, so the coordinator
can answer it as a query of its own — planned on the partitions like any other — at the
statement's read barrier (the same snapshot), and run the statement over that answer.

- `WithQueries(con, sql, specs)` finds the candidates: the statement's top-level WITH
  queries that read a partitioned table and name no WITH query of the statement (so not
  recursive ones either). `texts` are their queries as statements of their own.
- `statement(bodies)` prints the statement with each named WITH query replaced by the
  given SELECT text (the same name, the same column aliases).

Guarantee: when each replacement gives exactly the rows and types its WITH query gives in
the same snapshot, the statement answers what it answers as written — a WITH query is
evaluated as if once (DuckDB may inline one, but a query without a volatile function,
which the caller checks, gives the same rows either way).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import duckdb

from query import _ast
from query.scalars import names_partitioned_table
from storage.ddl import TableSpec

PRINTED_KEPT_MAX = 8
"""Statements printed with given replacements, remembered per statement."""


class WithQueries:
    def __init__(
        self, con: duckdb.DuckDBPyConnection, sql: str, specs: Mapping[str, TableSpec]
    ) -> None:
        self._con = con
        self._tree = _ast.parse(con, sql)
        entries = (self._tree.get("cte_map") or {}).get("map") or []
        names = {str(entry["key"]).lower() for entry in entries}
        self._printed: dict[tuple[tuple[str, str], ...], str] = {}
        self._found: dict[str, str] = {}
        """The WITH query's name -> its query as a statement of its own."""
        for entry in entries:
            query = entry["value"].get("query_node")
            if not isinstance(query, dict):
                continue
            tables = [node for node in _ast.walk(query) if node.get("type") == "BASE_TABLE"]
            names_a_cte = any(
                not node.get("schema_name") and str(node["table_name"]).lower() in names
                for node in tables
            )
            if not names_a_cte and any(names_partitioned_table(node, specs) for node in tables):
                self._found[str(entry["key"])] = _ast.to_sql(con, query)

    @property
    def texts(self) -> dict[str, str]:
        """Each candidate's name -> its query as a statement of its own."""
        return dict(self._found)

    def statement(self, bodies: Mapping[str, str]) -> str:
        """The statement with each WITH query named in `bodies` replaced by that SELECT
        (remembered: a repeated query replaces them by the same texts)."""
        key = tuple(sorted(bodies.items()))
        known = self._printed.get(key)
        if known is not None:
            return known
        tree = copy.deepcopy(self._tree)
        for entry in (tree.get("cte_map") or {}).get("map") or []:
            body = bodies.get(str(entry["key"]))
            if body is not None:
                entry["value"]["query_node"] = _ast.parse(self._con, body)
        if len(self._printed) >= PRINTED_KEPT_MAX:
            self._printed.clear()
        self._printed[key] = text = _ast.to_sql(self._con, tree)
        return text
