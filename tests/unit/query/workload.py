"""Generated tables and statements for the differential tests.

Values come from SQL expressions over `h`, a hash of the row number, a seed and the
column, evaluated by DuckDB — the same text run on the coordinator and on plain DuckDB
yields the same rows, NULLs, NaNs, unicode, nested values and skewed keys included.
Every column type has an UPDATE expression that keeps the value in its type."""

from __future__ import annotations

from dataclasses import dataclass

KEY_VALUES = 40
"""Keys are in 0..KEY_VALUES-1 or NULL, skewed: most rows have key 7."""


@dataclass(frozen=True)
class ColumnType:
    sql: str
    value: str
    """An expression of `@h` (a UBIGINT hash) giving this column's value, NULLs included."""
    update: str
    """An expression of the column `{c}` giving a new value of the same type."""

    def updated(self, column: str) -> str:
        return self.update.replace("{c}", column)


TYPES: dict[str, ColumnType] = {
    "int": ColumnType(
        "INTEGER", "CASE WHEN @h % 9 = 0 THEN NULL ELSE (@h % 2001)::INTEGER - 1000 END", "{c} - 3"
    ),
    "bigint": ColumnType(
        "BIGINT",
        "CASE WHEN @h % 11 = 0 THEN NULL ELSE (@h % 1000003)::BIGINT * 9000 - 4000000000 END",
        "{c} // 2",
    ),
    "hugeint": ColumnType(
        "HUGEINT",
        "CASE WHEN @h % 7 = 0 THEN NULL ELSE @h::HUGEINT * 100000000000 - 5 END",
        "-{c}",
    ),
    "decimal": ColumnType(
        "DECIMAL(18,3)",
        "CASE WHEN @h % 8 = 0 THEN NULL ELSE CAST(((@h % 2000001)::BIGINT - 1000000) / 1000.0 AS DECIMAL(18,3)) END",
        "{c} + 0.125",
    ),
    "double": ColumnType(
        "DOUBLE",
        "CASE @h % 13 WHEN 0 THEN 'nan'::DOUBLE WHEN 1 THEN NULL WHEN 2 THEN '-inf'::DOUBLE "
        "WHEN 3 THEN '-0.0'::DOUBLE WHEN 4 THEN 0.0 ELSE (@h % 100000) / 7.0 END",
        "-{c} * 2",
    ),
    "varchar": ColumnType(
        "VARCHAR",
        "CASE WHEN @h % 10 = 0 THEN NULL ELSE ['', 'α', 'duck 🦆', '日本語', 'x''y', 'plain']"
        "[(@h % 6)::INTEGER + 1] || (@h % 17)::VARCHAR END",
        "{c} || 'é'",
    ),
    "bool": ColumnType(
        "BOOLEAN", "CASE @h % 3 WHEN 0 THEN NULL WHEN 1 THEN true ELSE false END", "NOT {c}"
    ),
    "date": ColumnType(
        "DATE",
        "CASE WHEN @h % 12 = 0 THEN NULL ELSE DATE '1990-01-01' + (@h % 20000)::INTEGER END",
        "{c} + 1",
    ),
    "timestamp": ColumnType(
        "TIMESTAMP",
        "CASE WHEN @h % 12 = 1 THEN NULL ELSE TIMESTAMP '2000-01-01' + to_microseconds((@h % 10000000000000)::BIGINT) END",
        "{c} + INTERVAL 1 HOUR",
    ),
    "timestamptz": ColumnType(
        "TIMESTAMPTZ",
        "CASE WHEN @h % 12 = 2 THEN NULL ELSE TIMESTAMPTZ '2020-01-01 00:00:00+00' + to_seconds((@h % 100000000)::BIGINT) END",
        "{c} - INTERVAL 1 DAY",
    ),
    "interval": ColumnType(
        "INTERVAL",
        "CASE WHEN @h % 12 = 3 THEN NULL ELSE to_months((@h % 30)::INTEGER) + to_days((@h % 40)::INTEGER) + to_microseconds((@h % 1000000)::BIGINT) END",
        "{c} + INTERVAL 1 MINUTE",
    ),
    "uuid": ColumnType(
        "UUID",
        "CASE WHEN @h % 8 = 0 THEN NULL ELSE ('00000000-0000-4000-8000-' || lpad(hex(@h % 281474976710655), 12, '0'))::UUID END",
        "CASE WHEN {c} IS NULL THEN '10000000-0000-4000-8000-000000000000'::UUID END",
    ),
    "blob": ColumnType(
        "BLOB",
        "CASE WHEN @h % 7 = 0 THEN NULL ELSE '\\x00\\xFF'::BLOB || encode((@h % 1000)::VARCHAR) END",
        "{c} || '\\x01'::BLOB",
    ),
    "list": ColumnType(
        "INTEGER[]",
        "CASE @h % 6 WHEN 0 THEN NULL WHEN 1 THEN [] ELSE [(@h % 5)::INTEGER, NULL, (@h % 3)::INTEGER] END",
        "list_append({c}, 9)",
    ),
    "struct": ColumnType(
        "STRUCT(a INTEGER, b VARCHAR)",
        "CASE WHEN @h % 5 = 0 THEN NULL ELSE {'a': (@h % 10)::INTEGER, 'b': CASE WHEN @h % 4 = 0 THEN NULL ELSE 'v' || (@h % 3)::VARCHAR END} END",
        "{'a': {c}.a + 1, 'b': {c}.b}",
    ),
    "enum": ColumnType(
        "ENUM('x', 'y', 'z')",
        "CASE WHEN @h % 5 = 0 THEN NULL ELSE ['x', 'y', 'z'][(@h % 3)::INTEGER + 1] END",
        "CASE WHEN {c} = 'x' THEN 'z' ELSE {c} END",
    ),
    "timetz": ColumnType(
        "TIMETZ",
        "CASE WHEN @h % 6 = 0 THEN NULL ELSE ('12:' || lpad((@h % 60)::VARCHAR, 2, '0') || ':00+0' || (@h % 9)::VARCHAR)::TIMETZ END",
        "{c}",
    ),
}

KEY_EXPRESSION = (
    f"CASE WHEN @h % 10 < 5 THEN 7 WHEN @h % 10 = 5 THEN NULL ELSE (@h % {KEY_VALUES})::INTEGER END"
)
"""The skewed INTEGER key: half the rows 7, a tenth NULL, the rest spread."""


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    """(column name, TYPES key); the first is `k`, the partition key."""
    partitioning: str
    primary_key: bool
    """`id BIGINT PRIMARY KEY` as a second column."""

    def create(self) -> str:
        parts = ["k INTEGER"]
        if self.primary_key:
            parts.append("id BIGINT PRIMARY KEY")
        parts += [f"{name} {TYPES[kind].sql}" for name, kind in self.columns]
        return f"CREATE TABLE {self.name} ({', '.join(parts)}) {self.partitioning}"

    def column_names(self) -> list[str]:
        """The columns `create` makes (ALTER TABLE may add more)."""
        return ["k", *(["id"] if self.primary_key else []), *(name for name, _ in self.columns)]

    def select_rows(self, start: int, count: int, seed: int) -> str:
        """A SELECT of `count` generated rows, numbered from `start`."""
        values = [_with_hash(KEY_EXPRESSION, seed, "k")]
        if self.primary_key:
            values.append("i::BIGINT")
        values += [_with_hash(TYPES[kind].value, seed, name) for name, kind in self.columns]
        return f"SELECT {', '.join(values)} FROM range({start}, {start + count}) AS r(i)"


def _with_hash(expression: str, seed: int, column: str) -> str:
    return "(" + expression.replace("@h", f"hash(i, {seed}, '{column}')") + ")"


PARTITIONINGS = (
    "PARTITION BY HASH(k) PARTITIONS 4",
    "PARTITION BY HASH(k) PARTITIONS 1",
    "PARTITION BY RANGE(k) (5, 8, 30)",
    "PARTITION BY LIST(k) ((NULL, 0, 1, 2, 3, 4, 5, 6, 7), (8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19), "
    "(20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39))",
    "REFERENCE",
    "",
)


ORDERABLE = frozenset(TYPES) - {"list", "struct"}
"""Types min() and max() are compared on (every one of them has a total order)."""


@dataclass(frozen=True)
class Step:
    sql: str
    ordered: bool = False
    """The result's row order is fixed by ORDER BY (compared in order)."""
    file_query: str | None = None
    """COPY … FROM: the query whose rows are written to `{path}` before the step runs."""
    file_format: str = "parquet"


def steps_for(table: Table, other: Table, choice: int, a: int, b: int, seed: int) -> Step:
    """One statement on `table` (reading `other` sometimes), picked by `choice`; `a`, `b`
    and `seed` parameterise it."""
    name = table.name
    column, kind = table.columns[a % len(table.columns)]
    modulus = 2 + b % 5
    where = f"k % {modulus} = {a % modulus}"
    options: list[Step] = [
        Step(f"INSERT INTO {name} {table.select_rows(a * 100, 1 + b * 7, seed)}"),
        Step(f"UPDATE {name} SET {column} = {TYPES[kind].updated(column)} WHERE {where}"),
        Step(f"UPDATE {name} SET k = (k + 3) % {KEY_VALUES} WHERE {where}"),
        Step(f"DELETE FROM {name} WHERE {where} OR {column} IS NULL"),
        Step(f"SELECT * FROM {name}"),
        Step(
            f"SELECT k, count(*) AS n, count({column}) AS m FROM {name} GROUP BY k "
            "ORDER BY k NULLS FIRST",
            ordered=True,
        ),
        Step(
            f"SELECT t.k, u.c_varchar FROM {name} AS t JOIN {other.name} AS u ON t.k = u.c_int % 40"
        ),
        Step(f"INSERT INTO {name} SELECT * FROM {name} WHERE {where}"),
        Step(
            f"COPY {name} ({', '.join(table.column_names())}) FROM '{{path}}'",
            file_query=table.select_rows(10_000 + a * 100, 1 + b * 5, seed),
            file_format="csv" if kind in ("int", "varchar", "date", "bool") else "parquet",
        ),
        Step(
            f"CREATE OR REPLACE TABLE {name}_copy PARTITION BY HASH(k) PARTITIONS 3 AS "
            f"SELECT * FROM {name} WHERE {where}"
        ),
        Step(f"ALTER TABLE {name} ADD COLUMN extra_{a % 3} INTEGER DEFAULT {b}"),
        Step(f"CREATE OR REPLACE VIEW {name}_view AS SELECT k, {column} FROM {name} WHERE {where}"),
        Step(f"SELECT * FROM {name}_view"),
        Step(f"DELETE FROM {name} WHERE k IN (SELECT c_int % 40 FROM {other.name})"),
    ]
    if kind in ORDERABLE:
        options.append(Step(f"SELECT min({column}), max({column}), count(*) FROM {name}"))
    if table.primary_key:
        options += [
            Step(
                f"INSERT INTO {name} {table.select_rows(a * 50, 1 + b * 3, seed)} "
                f"ON CONFLICT DO UPDATE SET {column} = excluded.{column}"
            ),
            Step(f"INSERT OR IGNORE INTO {name} {table.select_rows(a * 50, 1 + b * 3, seed)}"),
            Step(f"UPDATE {name} SET id = id + 1000000 WHERE id % {modulus} = 0"),
        ]
    else:
        options.append(
            Step(
                f"INSERT INTO {name} (k) SELECT abs(c_int) % 40 FROM {other.name} WHERE {where.replace('k', 'c_int')}"
            )
        )
    return options[choice % len(options)]
