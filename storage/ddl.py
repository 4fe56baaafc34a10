"""dcluster's SQL surface: classify one statement, and strip and check dcluster's clauses on
CREATE TABLE.

Plain DuckDB `CREATE TABLE` works unchanged. dcluster adds optional clauses, written after
the column list (or, for `CREATE TABLE … AS SELECT`, between the table name and `AS`):

    PARTITION BY HASH(col)
    PARTITION BY RANGE(col) (bound, bound, …)      -- bounds strictly increasing
    PARTITION BY LIST(col) ((v1, v2), (v3), …)      -- one parenthesised list per partition
    PARTITIONS P
    REPLICAS R
    REFERENCE                                       -- copied to every worker

`REFERENCE` is a trailing clause rather than `CREATE REFERENCE TABLE` so that every dcluster
addition lives in one region of the statement, found and cut out by one rule. It excludes
the other clauses: a reference table has one partition held by every worker.

Text is split with DuckDB's own lexer (`duckdb.tokenize`), so string literals (`'…'`, `E'…'`,
`$$…$$`), quoted identifiers and comments are never mistaken for clauses; the only parsing
done here is of the clause region. What remains must pass DuckDB's own parser
(`duckdb.extract_statements`), whose error is surfaced unchanged.

Key invariant: `parse` is a pure function of the text; `table_spec` is a pure function of the
parsed statement, the table's columns, the worker count and DuckDB's evaluation of constant
bound expressions — so every worker that derives a spec from the same log entry derives the
same one. Bounds and list values are stored as DuckDB's canonical text of the value cast to
the key column's type, which makes specs serializable and placement SQL reproducible.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import msgspec

PARTITIONS_MAX = 4096
"""Most partitions one table may have (bounds the placement and the RANGE/LIST CASE
expression)."""
REPLICAS_DEFAULT_MAX = 3
"""Default replicas: min(REPLICAS_DEFAULT_MAX, workers)."""
LIST_VALUES_MAX = 65536
"""Most values all of a LIST table's lists may hold together."""
STATEMENT_CHARS_MAX = 1 << 20
"""Longest statement text accepted (1 MiB); bulk rows never travel as SQL text."""

PartitionKind = Literal["hash", "range", "list", "reference"]


class DdlError(Exception):
    """A statement dcluster refuses before it reaches the log: the client's fault."""


class SqlSyntaxError(DdlError):
    """DuckDB's parser refused the statement; the message is DuckDB's, unchanged."""


class ClauseError(DdlError):
    """A dcluster clause is malformed or repeated (PARTITION BY, PARTITIONS, …)."""


class UnsupportedStatement(DdlError):
    """The statement is valid DuckDB but dcluster does not run it (yet)."""


class UnknownKeyColumn(DdlError):
    """The partition key names no column of the table."""


class BadPartitionCount(DdlError):
    """PARTITIONS is below 1, above PARTITIONS_MAX, or disagrees with the RANGE/LIST."""


class TooManyReplicas(DdlError):
    """REPLICAS is below 1 or above the number of workers."""


class BoundsNotIncreasing(DdlError):
    """RANGE bounds are not strictly increasing (or one is NULL)."""


class RepeatedListValue(DdlError):
    """A value appears in more than one LIST partition, or twice in one."""


class BadPartitionValue(DdlError):
    """A RANGE bound or LIST value does not evaluate to a constant of the key's type."""


class StatementKind(enum.Enum):
    CREATE_TABLE = "create_table"
    CREATE_TABLE_AS = "create_table_as"
    CREATE_VIEW = "create_view"
    DROP_TABLE = "drop_table"
    DROP_VIEW = "drop_view"
    ALTER_TABLE_ADD_COLUMN = "alter_table_add_column"
    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    COPY = "copy"


DDL_KINDS = frozenset(
    {
        StatementKind.CREATE_TABLE,
        StatementKind.CREATE_TABLE_AS,
        StatementKind.CREATE_VIEW,
        StatementKind.DROP_TABLE,
        StatementKind.DROP_VIEW,
        StatementKind.ALTER_TABLE_ADD_COLUMN,
    }
)


class Clauses(msgspec.Struct, frozen=True):
    """dcluster's clauses as written; bound and list items are raw SQL expressions."""

    partitioning: Literal["hash", "range", "list"] | None = None
    key: str | None = None
    bounds: tuple[str, ...] = ()
    lists: tuple[tuple[str, ...], ...] = ()
    partitions: int | None = None
    replicas: int | None = None
    reference: bool = False


class Statement(msgspec.Struct, frozen=True):
    """One classified statement. `sql` is what DuckDB runs (dcluster clauses cut out, no
    trailing semicolon). `name` is the object the statement creates, drops, alters or writes
    (unquoted, as written; None when not found, e.g. a SELECT or a DML led by WITH)."""

    kind: StatementKind
    sql: str
    name: str | None = None
    schema: str | None = None
    clauses: Clauses = Clauses()
    or_replace: bool = False
    if_not_exists: bool = False
    if_exists: bool = False
    select_sql: str | None = None
    """For CREATE TABLE … AS and CREATE VIEW: the query after AS."""
    pivots: bool = False
    """DuckDB runs it as several statements: each PIVOT … ON without an IN list first
    creates an ENUM type of the values it finds in the data (a MULTI statement)."""


class Column(msgspec.Struct, frozen=True):
    name: str
    type: str


class TableSpec(msgspec.Struct, frozen=True):
    """Everything every worker needs to create and place a table; goes into the log.

    `ddl` is DuckDB's own canonical `CREATE TABLE` (schema only, no rows). For RANGE,
    partition i holds keys in [bounds[i-1], bounds[i]); `bounds` has partitions-1 items. For
    LIST, partition i holds the values of `lists[i]` (None stands for NULL)."""

    schema: str
    name: str
    ddl: str
    columns: tuple[Column, ...]
    kind: PartitionKind
    key: str | None
    key_type: str | None
    partitions: int
    replicas: int
    bounds: tuple[str, ...] = ()
    lists: tuple[tuple[str | None, ...], ...] = ()

    @property
    def reference(self) -> bool:
        return self.kind == "reference"


# ---------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    kind: str  # "keyword", "identifier", "string_const", "numeric_const", "operator"
    start: int
    end: int

    def word(self) -> str:
        """Upper-cased text of an unquoted word, "" for anything else."""
        if self.kind in ("keyword", "identifier") and not self.text.startswith('"'):
            return self.text.upper()
        return ""

    def name(self) -> str | None:
        """The lower-cased name a word stands for (DuckDB matches names case-insensitively,
        quoted or not); None for anything but a word."""
        if self.kind not in ("keyword", "identifier"):
            return None
        if self.text.startswith('"'):
            return self.text[1:-1].replace('""', '"').lower()
        return self.text.lower()


def lex(sql: str) -> list[Token]:
    """DuckDB's lexer's tokens without comments; each token's text is its exact span, and
    runs of punctuation holding '(' ')' ',' ';' are split into single characters.
    Raises duckdb.Error for text the lexer refuses."""
    raw = duckdb.tokenize(sql)
    if not sql.isascii():  # the lexer counts UTF-8 bytes; the spans here count characters
        characters = [0] * (len(sql.encode()) + 1)
        at = 0
        for index, character in enumerate(sql):
            width = len(character.encode())
            characters[at : at + width] = [index] * width
            at += width
        characters[at] = len(sql)
        raw = [(characters[start], token_type) for start, token_type in raw]
    tokens: list[Token] = []
    for position, (start, token_type) in enumerate(raw):
        limit = raw[position + 1][0] if position + 1 < len(raw) else len(sql)
        text = sql[start:limit].rstrip()
        kind = str(token_type).rsplit(".", 1)[-1]
        if kind == "comment":
            continue
        if kind == "operator" and len(text) > 1 and any(c in text for c in "(),;"):
            # The lexer reports runs like ")," or "-(" as one operator; split them.
            tokens.extend(
                Token(character, "operator", start + offset, start + offset + 1)
                for offset, character in enumerate(text)
                if not character.isspace()
            )
            continue
        tokens.append(Token(text, kind, start, start + len(text)))
    return tokens


def _unquote(token: Token) -> str:
    if token.text.startswith('"'):
        return token.text[1:-1].replace('""', '"')
    return token.text


def _is_name(token: Token) -> bool:
    return token.kind in ("keyword", "identifier")


def _qualified_name(tokens: Sequence[Token], at: int) -> tuple[list[str], int]:
    """The dotted name starting at tokens[at] and the index after it."""
    parts: list[str] = []
    while at < len(tokens) and _is_name(tokens[at]):
        parts.append(_unquote(tokens[at]))
        at += 1
        if at < len(tokens) and tokens[at].text == ".":
            at += 1
            continue
        break
    return parts, at


def _matching_paren(tokens: Sequence[Token], at: int) -> int:
    """Index of the ')' that closes the '(' at tokens[at]."""
    assert tokens[at].text == "("
    depth = 0
    for index in range(at, len(tokens)):
        if tokens[index].text == "(":
            depth += 1
        elif tokens[index].text == ")":
            depth -= 1
            if depth == 0:
                return index
    raise ClauseError("unbalanced parentheses")


def _split_commas(tokens: Sequence[Token], open_at: int, close_at: int) -> list[tuple[int, int]]:
    """Spans [first, last) of the comma-separated items between two matching parens."""
    items: list[tuple[int, int]] = []
    depth = 0
    first = open_at + 1
    for index in range(open_at + 1, close_at):
        text = tokens[index].text
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
        elif text == "," and depth == 0:
            items.append((first, index))
            first = index + 1
    items.append((first, close_at))
    return items


# ---------------------------------------------------------------------------------------
# parse


def parse(sql: str) -> Statement:
    """Classify one statement and cut out its dcluster clauses.

    Raises SqlSyntaxError (DuckDB's parser's message), ClauseError or UnsupportedStatement."""
    if len(sql) > STATEMENT_CHARS_MAX:
        raise UnsupportedStatement(f"statement longer than {STATEMENT_CHARS_MAX} characters")
    try:
        tokens = lex(sql)
    except duckdb.Error as error:
        raise SqlSyntaxError(str(error)) from error
    while tokens and tokens[-1].text == ";":
        tokens.pop()
    if not tokens:
        raise UnsupportedStatement("empty statement")
    if any(token.text == ";" for token in tokens):
        raise UnsupportedStatement("one statement at a time, please (found a ';' inside)")
    body = sql[: tokens[-1].end]
    words = [token.word() for token in tokens]
    if words[0] == "CREATE":
        return _parse_create(body, tokens, words)
    _check_duckdb_parses(body)
    if words[0] == "DROP":
        return _parse_drop(body, tokens, words)
    if words[0] == "ALTER":
        return _parse_alter(body, tokens, words)
    return _parse_other(body, tokens, words)


def _check_duckdb_parses(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise SqlSyntaxError(str(error)) from error
    assert len(statements) == 1, statements


def _parse_create(sql: str, tokens: list[Token], words: list[str]) -> Statement:
    at = 1
    or_replace = words[at : at + 2] == ["OR", "REPLACE"]
    if or_replace:
        at += 2
    if at < len(words) and words[at] in ("TEMP", "TEMPORARY"):
        raise UnsupportedStatement("temporary tables and views are per-session: not supported")
    if at < len(words) and words[at] == "VIEW":
        _check_duckdb_parses(sql)
        if_not_exists = words[at + 1 : at + 4] == ["IF", "NOT", "EXISTS"]
        parts, after = _qualified_name(tokens, at + 4 if if_not_exists else at + 1)
        as_at = _first_top_level(tokens, words, after, "AS")
        schema, name = _split_name(parts)
        return Statement(
            kind=StatementKind.CREATE_VIEW,
            sql=sql,
            name=name,
            schema=schema,
            or_replace=or_replace,
            if_not_exists=if_not_exists,
            select_sql=sql[tokens[as_at + 1].start :] if as_at is not None else None,
        )
    if at >= len(words) or words[at] != "TABLE":
        _check_duckdb_parses(sql)
        raise UnsupportedStatement(
            "dcluster runs CREATE TABLE and CREATE VIEW; not " + " ".join(words[: at + 1])
        )
    if_not_exists = words[at + 1 : at + 4] == ["IF", "NOT", "EXISTS"]
    parts, after = _qualified_name(tokens, at + 4 if if_not_exists else at + 1)
    if not parts:
        _check_duckdb_parses(sql)
        raise SqlSyntaxError("CREATE TABLE without a table name")
    schema, name = _split_name(parts)
    region_start = after
    if after < len(tokens) and tokens[after].text == "(":
        region_start = _matching_paren(tokens, after) + 1
    as_at = _first_top_level(tokens, words, region_start, "AS")
    region_end = as_at if as_at is not None else len(tokens)
    clauses = _parse_clauses(tokens[region_start:region_end], words[region_start:region_end])
    if region_start < region_end:
        cut_from = tokens[region_start].start
        cut_to = tokens[region_end].start if region_end < len(tokens) else len(sql)
        stripped = (sql[:cut_from].rstrip() + " " + sql[cut_to:]).rstrip()
    else:
        stripped = sql
    _check_duckdb_parses(stripped)
    return Statement(
        kind=StatementKind.CREATE_TABLE_AS if as_at is not None else StatementKind.CREATE_TABLE,
        sql=stripped,
        name=name,
        schema=schema,
        clauses=clauses,
        or_replace=or_replace,
        if_not_exists=if_not_exists,
        select_sql=sql[tokens[as_at + 1].start :] if as_at is not None else None,
    )


def _first_top_level(
    tokens: Sequence[Token], words: Sequence[str], at: int, word: str
) -> int | None:
    depth = 0
    for index in range(at, len(tokens)):
        if tokens[index].text == "(":
            depth += 1
        elif tokens[index].text == ")":
            depth -= 1
        elif depth == 0 and words[index] == word:
            return index
    return None


def _split_name(parts: list[str]) -> tuple[str | None, str | None]:
    if not parts:
        return None, None
    if len(parts) == 1:
        return None, parts[0]
    return parts[-2], parts[-1]


def _parse_clauses(tokens: Sequence[Token], words: Sequence[str]) -> Clauses:
    """The clause region: any order, each clause at most once."""
    fields: dict[str, object] = {}
    at = 0

    def claim(field: str, value: object) -> None:
        if field in fields:
            raise ClauseError(f"{field.upper()} given twice")
        fields[field] = value

    while at < len(tokens):
        if words[at] == "PARTITION":
            at = _parse_partition_by(tokens, words, at, claim)
        elif words[at] in ("PARTITIONS", "REPLICAS"):
            if at + 1 >= len(tokens) or tokens[at + 1].kind != "numeric_const":
                raise ClauseError(f"{words[at]} needs a whole number, e.g. {words[at]} 4")
            text = tokens[at + 1].text
            if not text.isdigit():
                raise ClauseError(f"{words[at]} needs a whole number, not {text}")
            claim(words[at].lower(), int(text))
            at += 2
        elif words[at] == "REFERENCE":
            claim("reference", True)
            at += 1
        else:
            raise ClauseError(
                f"unexpected {tokens[at].text!r} after the column list; dcluster's clauses are "
                "PARTITION BY HASH|RANGE|LIST(col) …, PARTITIONS P, REPLICAS R, REFERENCE"
            )
    if fields.get("reference") and len(fields) > 1:
        raise ClauseError(
            "a REFERENCE table is on every worker: no PARTITION BY/PARTITIONS/REPLICAS"
        )
    return Clauses(**fields)  # type: ignore[arg-type]


def _parse_partition_by(
    tokens: Sequence[Token], words: Sequence[str], at: int, claim: Callable[[str, object], None]
) -> int:
    if words[at + 1 : at + 2] != ["BY"] or at + 2 >= len(tokens):
        raise ClauseError("PARTITION must be followed by BY HASH|RANGE|LIST(col)")
    method = words[at + 2]
    if method not in ("HASH", "RANGE", "LIST"):
        raise ClauseError(f"PARTITION BY {tokens[at + 2].text}: expected HASH, RANGE or LIST")
    open_at = at + 3
    if open_at >= len(tokens) or tokens[open_at].text != "(":
        raise ClauseError(f"PARTITION BY {method} needs (column)")
    close_at = _matching_paren(tokens, open_at)
    if close_at != open_at + 2 or not _is_name(tokens[open_at + 1]):
        raise ClauseError(f"PARTITION BY {method} takes one column name")
    claim("partitioning", method.lower())
    claim("key", _unquote(tokens[open_at + 1]))
    at = close_at + 1
    if method == "HASH":
        return at
    if at >= len(tokens) or tokens[at].text != "(":
        example = "(10, 20)" if method == "RANGE" else "((1, 2), (3))"
        raise ClauseError(f"PARTITION BY {method}(col) needs its values, e.g. {example}")
    close_at = _matching_paren(tokens, at)
    sql_of = _span_text(tokens)
    items = _split_commas(tokens, at, close_at)
    if method == "RANGE":
        claim("bounds", tuple(sql_of(first, last) for first, last in items))
    else:
        lists: list[tuple[str, ...]] = []
        for first, last in items:
            if last - first < 2 or tokens[first].text != "(" or tokens[last - 1].text != ")":
                raise ClauseError("each LIST partition is a parenthesised list, e.g. ((1, 2), (3))")
            inner = _split_commas(tokens, first, last - 1)
            lists.append(tuple(sql_of(a, b) for a, b in inner))
        claim("lists", tuple(lists))
    return close_at + 1


def _span_text(tokens: Sequence[Token]) -> Callable[[int, int], str]:
    def text(first: int, last: int) -> str:
        if first >= last:
            raise ClauseError("empty value in a RANGE or LIST clause")
        return " ".join(token.text for token in tokens[first:last])

    return text


def _parse_drop(sql: str, tokens: list[Token], words: list[str]) -> Statement:
    if words[1:2] not in (["TABLE"], ["VIEW"]):
        raise UnsupportedStatement(f"dcluster drops tables and views, not {tokens[1].text}")
    if_exists = words[2:4] == ["IF", "EXISTS"]
    parts, _ = _qualified_name(tokens, 4 if if_exists else 2)
    schema, name = _split_name(parts)
    kind = StatementKind.DROP_TABLE if words[1] == "TABLE" else StatementKind.DROP_VIEW
    return Statement(kind=kind, sql=sql, name=name, schema=schema, if_exists=if_exists)


def _parse_alter(sql: str, tokens: list[Token], words: list[str]) -> Statement:
    if words[1:2] != ["TABLE"]:
        raise UnsupportedStatement(f"dcluster alters tables only, not {tokens[1].text}")
    if_exists = words[2:4] == ["IF", "EXISTS"]
    parts, after = _qualified_name(tokens, 4 if if_exists else 2)
    if words[after : after + 1] != ["ADD"] or words[after + 1 : after + 2] in (
        ["CONSTRAINT"],
        ["PRIMARY"],
        ["UNIQUE"],
        ["FOREIGN"],
        ["CHECK"],
    ):
        raise UnsupportedStatement("dcluster's ALTER TABLE supports ADD [COLUMN] only")
    schema, name = _split_name(parts)
    return Statement(
        kind=StatementKind.ALTER_TABLE_ADD_COLUMN,
        sql=sql,
        name=name,
        schema=schema,
        if_exists=if_exists,
    )


_DML_NAME_AFTER = {"INSERT": "INTO", "DELETE": "FROM"}
# The words a query (not a write) can start with, when not with a "(".
_QUERY_FIRST_WORDS = frozenset(
    {"SELECT", "WITH", "FROM", "PIVOT", "PIVOT_WIDER", "VALUES", "TABLE"}
)


def _parse_other(sql: str, tokens: list[Token], words: list[str]) -> Statement:
    statement_type = duckdb.extract_statements(sql)[0].type
    kinds = {
        duckdb.StatementType.SELECT: StatementKind.SELECT,
        duckdb.StatementType.INSERT: StatementKind.INSERT,
        duckdb.StatementType.UPDATE: StatementKind.UPDATE,
        duckdb.StatementType.DELETE: StatementKind.DELETE,
        duckdb.StatementType.COPY: StatementKind.COPY,
    }
    kind = kinds.get(statement_type)
    pivots = statement_type == duckdb.StatementType.MULTI
    if pivots:
        query = words[0] in _QUERY_FIRST_WORDS or tokens[0].text == "("
        kind = StatementKind.SELECT if query else None
    if kind is None:
        if pivots:
            raise UnsupportedStatement(
                "dcluster runs a PIVOT without an IN list (DuckDB makes it several "
                "statements) only as a query; write the values out: PIVOT … ON col IN (…)"
            )
        raise UnsupportedStatement(f"dcluster does not run {statement_type.name} statements")
    name_at: int | None = None
    if words[0] in ("UPDATE", "COPY"):
        name_at = 1
    elif words[0] in _DML_NAME_AFTER and _DML_NAME_AFTER[words[0]] in words:
        name_at = words.index(_DML_NAME_AFTER[words[0]]) + 1
    parts, _ = _qualified_name(tokens, name_at) if name_at is not None else ([], 0)
    schema, name = _split_name(parts)
    return Statement(kind=kind, sql=sql, name=name, schema=schema, pivots=pivots)


# ---------------------------------------------------------------------------------------
# table_spec


def table_spec(
    statement: Statement,
    *,
    schema: str,
    name: str,
    ddl: str,
    columns: Sequence[Column],
    worker_count: int,
    con: duckdb.DuckDBPyConnection,
) -> TableSpec:
    """Resolve a parsed CREATE TABLE against its columns (as DuckDB bound them) and the
    cluster's size: defaults filled in, every clause checked. `con` evaluates bound and list
    expressions and touches no table."""
    assert statement.kind in (StatementKind.CREATE_TABLE, StatementKind.CREATE_TABLE_AS)
    assert worker_count >= 1, worker_count
    assert columns, "DuckDB tables have at least one column"
    clauses = statement.clauses
    if clauses.reference:
        return TableSpec(
            schema=schema,
            name=name,
            ddl=ddl,
            columns=tuple(columns),
            kind="reference",
            key=None,
            key_type=None,
            partitions=1,
            replicas=worker_count,
        )
    key_column = _key_column(clauses.key, columns, name)
    bounds: tuple[str, ...] = ()
    lists: tuple[tuple[str | None, ...], ...] = ()
    kind: PartitionKind = clauses.partitioning or "hash"
    if kind == "range":
        bounds = _range_bounds(clauses.bounds, key_column, con)
        implied = len(bounds) + 1
    elif kind == "list":
        lists = _list_values(clauses.lists, key_column, con)
        implied = len(lists)
    else:
        implied = clauses.partitions if clauses.partitions is not None else worker_count
    partitions = clauses.partitions if clauses.partitions is not None else implied
    if not 1 <= partitions <= PARTITIONS_MAX:
        raise BadPartitionCount(
            f"PARTITIONS must be between 1 and {PARTITIONS_MAX}, not {partitions}"
        )
    if partitions != implied:
        raise BadPartitionCount(
            f"PARTITIONS {partitions} disagrees with the {kind.upper()} clause, which makes "
            f"{implied} partition(s)"
        )
    replicas = (
        clauses.replicas
        if clauses.replicas is not None
        else min(REPLICAS_DEFAULT_MAX, worker_count)
    )
    if not 1 <= replicas <= worker_count:
        raise TooManyReplicas(
            f"REPLICAS {replicas}: must be between 1 and the number of workers ({worker_count})"
        )
    return TableSpec(
        schema=schema,
        name=name,
        ddl=ddl,
        columns=tuple(columns),
        kind=kind,
        key=key_column.name,
        key_type=key_column.type,
        partitions=partitions,
        replicas=replicas,
        bounds=bounds,
        lists=lists,
    )


def _key_column(key: str | None, columns: Sequence[Column], table: str) -> Column:
    if key is None:
        return columns[0]
    for column in columns:
        # DuckDB matches identifiers case-insensitively, quoted or not.
        if column.name.lower() == key.lower():
            return column
    names = ", ".join(column.name for column in columns)
    raise UnknownKeyColumn(f"partition key {key!r} is not a column of {table} ({names})")


def _canonical(
    expressions: Sequence[str], key: Column, con: duckdb.DuckDBPyConnection
) -> list[str | None]:
    """Each constant expression cast to the key's type, as DuckDB's text of the value."""
    if not expressions:
        return []
    select = ", ".join(
        f"CAST(CAST(({expression}) AS {key.type}) AS VARCHAR)" for expression in expressions
    )
    try:
        row = one_row(con, f"SELECT {select}")
    except duckdb.Error as error:
        raise BadPartitionValue(
            f"a partition value is not a constant {key.type}: {error}"
        ) from error
    assert row is not None
    return list(row)


def _range_bounds(
    expressions: Sequence[str], key: Column, con: duckdb.DuckDBPyConnection
) -> tuple[str, ...]:
    if len(expressions) + 1 > PARTITIONS_MAX:
        raise BadPartitionCount(f"RANGE makes more than {PARTITIONS_MAX} partitions")
    values = _canonical(expressions, key, con)
    if any(value is None for value in values):
        raise BoundsNotIncreasing("a RANGE bound is NULL (NULL keys always go to partition 0)")
    bounds = tuple(value for value in values if value is not None)
    for position in range(len(bounds) - 1):
        lower, upper = (literal(value, key.type) for value in bounds[position : position + 2])
        row = one_row(con, f"SELECT {lower} < {upper}")
        assert row is not None
        if not row[0]:
            raise BoundsNotIncreasing(
                f"RANGE bounds must be strictly increasing: {bounds[position]!r} is followed by "
                f"{bounds[position + 1]!r}"
            )
    return bounds


def _list_values(
    lists: Sequence[Sequence[str]], key: Column, con: duckdb.DuckDBPyConnection
) -> tuple[tuple[str | None, ...], ...]:
    if not 1 <= len(lists) <= PARTITIONS_MAX:
        raise BadPartitionCount(f"LIST must make between 1 and {PARTITIONS_MAX} partitions")
    if sum(len(values) for values in lists) > LIST_VALUES_MAX:
        raise ClauseError(f"LIST holds more than {LIST_VALUES_MAX} values")
    canonical = _canonical([expression for values in lists for expression in values], key, con)
    result: list[tuple[str | None, ...]] = []
    seen: dict[str | None, int] = {}
    at = 0
    for partition, values in enumerate(lists):
        group = tuple(canonical[at : at + len(values)])
        at += len(values)
        for value in group:
            # Canonical text is unique per value of one type, so equal text is equal value.
            if value in seen:
                raise RepeatedListValue(
                    f"LIST value {value!r} is in partition {seen[value]} and partition {partition}"
                )
            seen[value] = partition
        result.append(group)
    return tuple(result)


def one_row(
    con: duckdb.DuckDBPyConnection, sql: str, parameters: Sequence[object] | None = None
) -> tuple[Any, ...]:
    """The single row a query returns. Fetches everything: DuckDB refuses further work on a
    connection while a result is unfinished."""
    rows = con.execute(sql, parameters).fetchall()
    assert len(rows) == 1, (sql, len(rows))
    return tuple(rows[0])


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str | None, type_sql: str) -> str:
    """SQL for a value stored as canonical text (see TableSpec), cast back to its type."""
    if text is None:
        return f"CAST(NULL AS {type_sql})"
    return "CAST('" + text.replace("'", "''") + f"' AS {type_sql})"


# ---------------------------------------------------------------------------------------
# Pieces of DuckDB's own SQL text, for building the operations a worker applies


def columns_sql(table_ddl: str) -> str:
    """The text inside the outer parentheses of a CREATE TABLE (columns and table
    constraints), e.g. of DuckDB's canonical `duckdb_tables().sql`, exactly as written.

    Raises ValueError for text that is not CREATE TABLE with a column list."""
    tokens = lex(table_ddl)
    words = [token.word() for token in tokens]
    table_at = _first_top_level(tokens, words, 0, "TABLE")
    if words[:1] != ["CREATE"] or table_at is None:
        raise ValueError(f"not a CREATE TABLE statement: {table_ddl[:80]!r}")
    at = table_at + 1
    if words[at : at + 3] == ["IF", "NOT", "EXISTS"]:
        at += 3
    parts, open_at = _qualified_name(tokens, at)
    if not parts or open_at >= len(tokens) or tokens[open_at].text != "(":
        raise ValueError(f"CREATE TABLE without a column list: {table_ddl[:80]!r}")
    close_at = _matching_paren(tokens, open_at)
    return table_ddl[tokens[open_at].end : tokens[close_at].start].strip()


def partition_columns_sql(table_ddl: str) -> str:
    """`columns_sql` without FOREIGN KEY constraints: the column list a partition table is
    created with. A partition cannot check rows other workers hold; the coordinator checks
    foreign keys instead, over whole tables (it reads the referenced tables)."""
    inner = columns_sql(table_ddl)
    wrapped = f"({inner})"
    tokens = lex(wrapped)
    kept = []
    for first, last in _split_commas(tokens, 0, _matching_paren(tokens, 0)):
        if first == last:
            continue
        words = [token.word() for token in tokens[first : first + 4]]
        foreign = words[:2] == ["FOREIGN", "KEY"] or (
            words[:1] == ["CONSTRAINT"] and words[2:4] == ["FOREIGN", "KEY"]
        )
        if not foreign:
            kept.append(wrapped[tokens[first].start : tokens[last - 1].end])
    return ", ".join(kept)


_ADDED_CONSTRAINT_WORDS = frozenset({"CONSTRAINT", "PRIMARY", "UNIQUE", "FOREIGN", "CHECK"})


def added_column_sql(alter_sql: str) -> str:
    """From `ALTER TABLE t ADD [COLUMN] [IF NOT EXISTS] c TYPE …`, the text from IF NOT
    EXISTS (when given) or the column's name to the end, without a trailing ';' — ready for
    `ALTER TABLE <partition> ADD COLUMN <this>`.

    Raises ValueError for any other statement."""
    tokens = lex(alter_sql)
    while tokens and tokens[-1].text == ";":
        tokens.pop()
    words = [token.word() for token in tokens]
    if words[:2] != ["ALTER", "TABLE"]:
        raise ValueError(f"not an ALTER TABLE statement: {alter_sql[:80]!r}")
    at = 4 if words[2:4] == ["IF", "EXISTS"] else 2
    parts, at = _qualified_name(tokens, at)
    if not parts or words[at : at + 1] != ["ADD"]:
        raise ValueError(f"not ALTER TABLE … ADD [COLUMN]: {alter_sql[:80]!r}")
    at += 1
    if words[at : at + 1] == ["COLUMN"]:
        at += 1  # COLUMN is reserved: as a column name it would be quoted
    if at >= len(tokens) or words[at] in _ADDED_CONSTRAINT_WORDS:
        raise ValueError(f"ALTER TABLE … ADD without a column: {alter_sql[:80]!r}")
    return alter_sql[tokens[at].start : tokens[-1].end]


_SQL_VALUE_FUNCTIONS: dict[str, str] = {
    "current_catalog": "current_catalog",
    "current_date": "current_date",
    "current_role": "current_role",
    "current_schema": "current_schema",
    "current_time": "get_current_time",
    "current_timestamp": "get_current_timestamp",
    "current_user": "current_user",
    "localtime": "get_current_time",
    "localtimestamp": "get_current_timestamp",
    "session_user": "session_user",
    "user": "user",
}
"""Names DuckDB's binder turns into function calls when written without parentheses (and
no column has the name), each with the function whose stability it has. DuckDB binds
localtime/localtimestamp to ICU's current_localtime/current_localtimestamp, which
`duckdb_functions()` lists as CONSISTENT although they read the transaction's start time;
they are judged as the get_current_* functions they derive from."""
_JUDGED_AS: dict[str, str] = {
    "current_localtime": "get_current_time",
    "current_localtimestamp": "get_current_timestamp",
}
_OBJECT_WORDS = frozenset({"TABLE", "INTO", "VIEW", "EXISTS", "REFERENCES"})
"""A name right after one of these is a table whose column list follows, not a call."""


def volatile_functions(sql: str, con: duckdb.DuckDBPyConnection) -> list[str]:
    """Lower-cased, sorted, unique names of the functions `sql` calls whose result may differ
    between two runs of the same statement: `stability` other than CONSISTENT in `con`'s
    `duckdb_functions()` (VOLATILE, e.g. random, uuid, nextval; CONSISTENT_WITHIN_QUERY,
    e.g. now, current_date), including the SQL value keywords written without parentheses
    (current_timestamp, localtimestamp, …) and macros whose definition calls one.

    Names in string literals, comments and quoted identifiers not followed by '(' are never
    calls. A column named like a SQL value keyword (a column `current_date`) is reported
    too: the text alone does not say which one it is, and reporting is the safe side."""
    called = _called_functions(sql)
    loaded = tuple(str(row[0]) for row in con.execute(_LOADED_SQL).fetchall())
    known = _KNOWN.get(con)
    if known is None or known.extensions != loaded:
        known = _Known(loaded, _function_stabilities(con))
        _KNOWN[con] = known
    return sorted(name for name in called if _is_volatile(name, known.stabilities, set()))


_LOADED_SQL = "SELECT extension_name FROM duckdb_extensions() WHERE loaded ORDER BY 1"


@dataclass(frozen=True)
class _Known:
    """`duckdb_functions()` as read while `extensions` were loaded (reading it costs
    ~20 ms; listing the loaded extensions ~0.5 ms)."""

    extensions: tuple[str, ...]
    stabilities: dict[str, list[_Stability]]


_KNOWN: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _Known] = weakref.WeakKeyDictionary()
"""Per connection. A macro created on a connection after its first statement is not seen:
dcluster's connections never get macros after that (the catalog and work databases are
rebuilt from scratch when the catalog changes)."""


_Stability = tuple[str, str | None, str | None]
"""(function_type, stability, macro_definition) of one overload."""


def _function_stabilities(con: duckdb.DuckDBPyConnection) -> dict[str, list[_Stability]]:
    """Every overload in `duckdb_functions()`, by lower-cased name. One full read: the
    table function costs ~20 ms however it is filtered, so looking names up one round of
    macros at a time would only cost more."""
    rows = con.execute(
        "SELECT lower(function_name), function_type, stability, macro_definition "
        "FROM duckdb_functions()"
    ).fetchall()
    stabilities: dict[str, list[_Stability]] = {}
    for name, function_type, stability, definition in rows:
        stabilities.setdefault(name, []).append((function_type, stability, definition))
    return stabilities


def _judged_as(name: str) -> str:
    return _SQL_VALUE_FUNCTIONS.get(name) or _JUDGED_AS.get(name) or name


def _called_functions(sql: str) -> set[str]:
    """Lower-cased names of everything `sql` calls, with or without parentheses."""
    tokens = lex(sql)
    words = [token.word() for token in tokens]
    called: set[str] = set()
    for at, token in enumerate(tokens):
        if not _is_name(token):
            continue
        after = tokens[at + 1].text if at + 1 < len(tokens) else ""
        if after == "(":
            if not _names_table(tokens, words, at):
                called.add(_unquote(token).lower())
        elif words[at].lower() in _SQL_VALUE_FUNCTIONS and after != ".":
            if at == 0 or tokens[at - 1].text != ".":
                called.add(words[at].lower())
    return called


def _names_table(tokens: Sequence[Token], words: Sequence[str], at: int) -> bool:
    """Whether the (possibly dotted) name ending at tokens[at] follows an _OBJECT_WORDS."""
    while at >= 2 and tokens[at - 1].text == "." and _is_name(tokens[at - 2]):
        at -= 2
    return at > 0 and words[at - 1] in _OBJECT_WORDS


def _is_volatile(name: str, stabilities: dict[str, list[_Stability]], seen: set[str]) -> bool:
    """Whether any overload of `name` is not CONSISTENT; a macro is judged by the functions
    its definition calls (`seen` stops macros that refer to each other in a loop)."""
    judged = _judged_as(name)
    if judged in seen:
        return False
    seen.add(judged)
    for function_type, stability, definition in stabilities.get(judged, []):
        if function_type in ("macro", "table_macro"):
            called = _called_functions(definition or "")
            if any(_is_volatile(inner, stabilities, seen) for inner in sorted(called)):
                return True
        elif stability is not None and stability != "CONSISTENT":
            return True
    return False
