"""DuckDB's own parse tree of a statement, as JSON, and the few edits the planner makes.

`parse(con, sql)` is DuckDB's `json_serialize_sql`: the parser's tree, with every node a
dict carrying `class`/`type`. `to_sql(con, tree)` is `json_deserialize_sql`: DuckDB prints
the (edited) tree back as SQL. So the planner never parses or prints SQL itself; it only
reads the tree, swaps subtrees and renames base tables.

Guarantee: `to_sql(con, parse(con, sql))` is a statement DuckDB binds to the same meaning;
an edit made here keeps every other node as DuckDB parsed it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import duckdb

Node = dict[str, Any]

_POSITION_KEYS = frozenset({"query_location", "query_location_length"})


class NotATree(Exception):
    """DuckDB could not serialize the statement (not a SELECT, or a parse error)."""


CACHED_MAX = 2_048
"""Texts remembered by `parse` and `to_sql` (each), for this process: DuckDB's parser
depends on no catalog or setting, so the same text always gives the same tree, and a
round trip through DuckDB costs about a millisecond."""
_PARSED: dict[str, str] = {}
_PRINTED: dict[str, str] = {}


def _remember(cache: dict[str, str], key: str, value: str) -> None:
    if len(cache) >= CACHED_MAX:
        cache.pop(next(iter(cache)))  # the oldest
    cache[key] = value


def parse(con: duckdb.DuckDBPyConnection, sql: str) -> Node:
    """The single SELECT statement's query node (`statements[0].node`), a fresh copy the
    caller may edit."""
    text = _PARSED.get(sql)
    if text is None:
        try:
            rows = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
        except duckdb.Error as error:
            raise NotATree(str(error)) from error
        text = str(rows[0][0])
        _remember(_PARSED, sql, text)
    tree = json.loads(text)
    if tree.get("error") or len(tree.get("statements", ())) != 1:
        raise NotATree(str(tree.get("error_message", "not one SELECT statement")))
    node: Node = tree["statements"][0]["node"]
    return node


def to_sql(con: duckdb.DuckDBPyConnection, node: Node) -> str:
    tree = json.dumps({"error": False, "statements": [{"node": node, "named_param_map": []}]})
    sql = _PRINTED.get(tree)
    if sql is None:
        rows = con.execute("SELECT json_deserialize_sql(?)", [tree]).fetchall()
        sql = str(rows[0][0])
        _remember(_PRINTED, tree, sql)
    return sql


def expression(con: duckdb.DuckDBPyConnection, sql: str) -> Node:
    """The tree of one scalar expression, e.g. `sum("a3")`."""
    item: Node = parse(con, f"SELECT {sql}")["select_list"][0]
    return item


def expression_sql(con: duckdb.DuckDBPyConnection, node: Node) -> str:
    """One expression printed by DuckDB (through a one-item SELECT)."""
    select = parse(con, "SELECT 1")
    select["select_list"] = [dict(node, alias="")]
    return to_sql(con, select).removeprefix("SELECT ").strip()


def walk(value: Any) -> Iterator[Node]:
    """Every node under `value` (itself included), depth first."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from walk(child)


def same(left: Any, right: Any) -> bool:
    """Structural equality, ignoring where in the text each node was and aliases."""
    return _canonical(left) == _canonical(right)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _canonical(child)
            for key, child in value.items()
            if key not in _POSITION_KEYS and key != "alias"
        }
    if isinstance(value, list):
        return [_canonical(child) for child in value]
    return value


def replaced(value: Any, swap: Callable[[Node], Node | None]) -> Any:
    """A deep copy of `value` where each node `swap` returns something for is replaced
    (and not descended into)."""
    if isinstance(value, dict):
        new = swap(value)
        if new is not None:
            return copy.deepcopy(new)
        return {key: replaced(child, swap) for key, child in value.items()}
    if isinstance(value, list):
        return [replaced(child, swap) for child in value]
    return value


def column_ref(*names: str) -> Node:
    return {
        "class": "COLUMN_REF",
        "type": "COLUMN_REF",
        "alias": "",
        "query_location": 18446744073709551615,
        "column_names": list(names),
    }


def is_column_ref(node: Node) -> bool:
    return node.get("class") == "COLUMN_REF"


def conjuncts(node: Node | None) -> list[Node]:
    """The AND-ed terms of a condition (itself when it is not an AND)."""
    if node is None:
        return []
    if node.get("class") == "CONJUNCTION" and node.get("type") == "CONJUNCTION_AND":
        terms: list[Node] = []
        for child in node["children"]:
            terms.extend(conjuncts(child))
        return terms
    return [node]
