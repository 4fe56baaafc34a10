"""Uncorrelated scalar subqueries: answered first, then put in the query as constants.

`x > (SELECT avg(y) FROM big)` makes a query gather: the subquery reads a partitioned table
beyond the outer row. But it refers to nothing outside itself, so it has one value for the
whole statement. The coordinator answers it as a query of its own, at the same read
barrier (the same snapshot), and plans the statement with the subquery replaced by that
value as a typed constant — which the planner can push down like any other.

- `ScalarSubqueries(con, sql, specs)` finds the candidates: scalar subqueries (outermost
  ones; anywhere in the statement) that read a partitioned table and name no CTE of the
  statement around them. Whether one refers to an outer column is for the caller to check:
  it binds as a statement of its own only if every name in it binds inside it, and DuckDB
  binds names innermost first, so it then means the same thing in place.
- `literal(con, rows, type_)` is the constant for a subquery's answer: `CAST('…' AS type)`,
  only when DuckDB casts the text back to exactly the value (NULL for no rows); None when
  there is more than one row or column (DuckDB's own error then comes from the query as
  written), or the value does not survive the round trip.
- `substituted(constants)` prints the statement with each subquery replaced.

Guarantee: the substituted statement answers what the statement answers, when each
constant is the subquery's answer in the same snapshot and the statement calls no volatile
function (the caller checks). Its result columns may be named differently (an unaliased
subquery in the select list is named by its text): the caller keeps the original names.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import pyarrow as pa

from query import _ast
from query._ast import Node
from storage.ddl import TableSpec

LITERAL_CHARS_MAX = 16_384
"""A longer constant is not put in the statement (the query is planned as written)."""
SUBSTITUTED_KEPT_MAX = 8
"""Statements printed with given constants, remembered per statement."""


class ScalarSubqueries:
    def __init__(
        self, con: duckdb.DuckDBPyConnection, sql: str, specs: Mapping[str, TableSpec]
    ) -> None:
        self._con = con
        self._tree = _ast.parse(con, sql)
        ctes = _cte_names(self._tree)
        self._found: list[tuple[Node, str]] = []
        """(the SUBQUERY node, its SELECT as a statement of its own)."""
        self._collect(self._tree, specs, ctes)
        self._substituted: dict[tuple[tuple[str, str], ...], str] = {}
        """Constants -> the statement printed with them (a remembered query's constants
        are usually those of its last run)."""

    @property
    def texts(self) -> list[str]:
        """Each candidate's SELECT as a statement of its own, once, in the order found."""
        return list(dict.fromkeys(text for _, text in self._found))

    def substituted(self, constants: Mapping[str, str]) -> str:
        """The statement with every candidate whose text is in `constants` replaced by
        that SQL constant (kept as written otherwise)."""
        key = tuple(sorted(constants.items()))
        known = self._substituted.get(key)
        if known is not None:
            return known
        by_id = {id(node): constants[text] for node, text in self._found if text in constants}

        def swap(node: Node) -> Node | None:
            constant = by_id.get(id(node))
            if constant is None:
                return None
            return dict(_ast.expression(self._con, constant), alias=node.get("alias", ""))

        text = _ast.to_sql(self._con, _ast.replaced(self._tree, swap))
        if len(self._substituted) >= SUBSTITUTED_KEPT_MAX:
            self._substituted.clear()
        self._substituted[key] = text
        return text

    def _collect(self, value: object, specs: Mapping[str, TableSpec], ctes: set[str]) -> None:
        if isinstance(value, list):
            for child in value:
                self._collect(child, specs, ctes)
            return
        if not isinstance(value, dict):
            return
        if value.get("class") == "SUBQUERY" and value.get("subquery_type") == "SCALAR":
            inner = value["subquery"]["node"]
            outer_ctes = ctes - _cte_names(inner)
            tables = [node for node in _ast.walk(inner) if node.get("type") == "BASE_TABLE"]
            names_a_cte = any(
                not node.get("schema_name") and str(node["table_name"]).lower() in outer_ctes
                for node in tables
            )
            if not names_a_cte and any(names_partitioned_table(node, specs) for node in tables):
                self._found.append((value, _ast.to_sql(self._con, inner)))
                return  # its own subqueries are answered with it
        for child in value.values():
            self._collect(child, specs, ctes)


def literal(con: duckdb.DuckDBPyConnection, rows: pa.Table, type_: str) -> str | None:
    """`rows` (a scalar subquery's answer, of DuckDB type `type_`) as a SQL constant."""
    if rows.num_columns != 1 or rows.num_rows > 1:
        return None
    if rows.num_rows == 0:
        return f"CAST(NULL AS {type_})"
    name = "dcluster_scalar"
    con.register(name, rows.rename_columns(["v"]))
    try:
        if str(con.sql(f"SELECT v FROM {name}").types[0]) != type_:
            return None  # Arrow brought it back as another type (an ENUM, say)
        text, exact = con.execute(
            f"SELECT CAST(v AS VARCHAR), "
            f"CAST(CAST(v AS VARCHAR) AS {type_}) IS NOT DISTINCT FROM v FROM {name}"
        ).fetchall()[0]
    except duckdb.Error:
        return None
    finally:
        con.unregister(name)
    if text is None:
        return f"CAST(NULL AS {type_})"
    if not exact or len(text) > LITERAL_CHARS_MAX or "\x00" in text:
        return None
    quoted = str(text).replace("'", "''")
    return f"CAST('{quoted}' AS {type_})"


def _cte_names(tree: Node) -> set[str]:
    return {
        str(entry["key"]).lower()
        for node in _ast.walk(tree)
        for entry in (node.get("cte_map") or {}).get("map") or ()
    }


def names_partitioned_table(node: Node, specs: Mapping[str, TableSpec]) -> bool:
    """A BASE_TABLE node naming a partitioned cluster table."""
    if node.get("catalog_name"):
        return False
    schema = str(node.get("schema_name") or "main").lower()
    spec = specs.get(f"{schema}.{str(node['table_name']).lower()}")
    return spec is not None and not spec.reference
