"""The SQL-text helpers at the end of storage.ddl: the column list of DuckDB's canonical
CREATE TABLE (round-tripped through DuckDB), the column of an ALTER TABLE … ADD, and the
functions of a statement whose results may differ between runs."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest

from storage.ddl import (
    added_column_sql,
    columns_sql,
    partition_columns_sql,
    volatile_functions,
)


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


TABLES = [
    'CREATE TABLE "My T"(a INTEGER PRIMARY KEY, "b c" VARCHAR DEFAULT(\'x\'), CHECK((a > 0)))',
    "CREATE TABLE t (a INT, b VARCHAR DEFAULT ')(' || 'x)', c DOUBLE DEFAULT (1.5 * (2 + 3)))",
    'CREATE TABLE t ("e""q" STRUCT(x INT, "y z" VARCHAR[]), m MAP(VARCHAR, INT[]), '
    "l INT[3], u UNION(n INT, s VARCHAR), d DECIMAL(10, 2) CHECK (d > 0) DEFAULT 1.25)",
    "CREATE TABLE t (a INT, b INT, c VARCHAR UNIQUE, PRIMARY KEY (a, b), UNIQUE (b, c), "
    "CHECK (a < b OR c = ')'))",
    "CREATE TABLE t (a INT NOT NULL, b VARCHAR COLLATE nocase, "
    "g INT GENERATED ALWAYS AS (a + 1) VIRTUAL, h TIMESTAMPTZ DEFAULT now())",
    'CREATE TABLE t ("(" INT, ")" VARCHAR DEFAULT \'(\', "\'" INT DEFAULT (-(1)))',
    "CREATE TABLE t (s VARCHAR DEFAULT $$it's ) here$$, e VARCHAR DEFAULT E'\\')')",
]


def table_shape(connection: duckdb.DuckDBPyConnection, schema: str, name: str) -> object:
    """Everything DuckDB records about a table's columns and constraints, minus its name."""
    columns = connection.execute(
        "SELECT column_name, data_type, column_default, is_nullable, numeric_precision "
        "FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? ORDER BY column_index",
        [schema, name],
    ).fetchall()
    constraints = connection.execute(
        "SELECT constraint_type, constraint_text, expression, constraint_column_names "
        "FROM duckdb_constraints() WHERE schema_name = ? AND table_name = ? "
        "ORDER BY constraint_type, constraint_text",
        [schema, name],
    ).fetchall()
    return columns, constraints


def canonical_ddl(connection: duckdb.DuckDBPyConnection, schema: str, name: str) -> str:
    row = connection.execute(
        "SELECT sql FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
        [schema, name],
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("create_sql", TABLES)
def test_columns_sql_round_trips_through_duckdb(
    con: duckdb.DuckDBPyConnection, create_sql: str
) -> None:
    con.execute(create_sql)
    schema, name = "main", con.execute("SELECT table_name FROM duckdb_tables()").fetchall()[0][0]
    columns = columns_sql(canonical_ddl(con, schema, name))
    con.execute("CREATE SCHEMA copy")
    con.execute(f"CREATE TABLE copy.x({columns})")
    assert table_shape(con, "copy", "x") == table_shape(con, schema, name)
    assert columns_sql(canonical_ddl(con, "copy", "x")) == columns
    # Straight from the statement as written, too.
    assert columns_sql(create_sql) == create_sql[create_sql.index("(") + 1 : -1].strip()


def test_columns_sql_of_the_documented_example() -> None:
    ddl = (
        'CREATE TABLE "My T"(a INTEGER PRIMARY KEY, "b c" VARCHAR DEFAULT(\'x\'), CHECK((a > 0)));'
    )
    assert columns_sql(ddl) == (
        "a INTEGER PRIMARY KEY, \"b c\" VARCHAR DEFAULT('x'), CHECK((a > 0))"
    )


def test_columns_sql_of_schema_qualified_and_unusual_headers(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute('CREATE SCHEMA "s (x)"')
    con.execute('CREATE TABLE "s (x)"."t(1)" (a INT DEFAULT (2), "b)" VARCHAR)')
    ddl = canonical_ddl(con, "s (x)", "t(1)")
    assert ddl.startswith('CREATE TABLE "s (x)"."t(1)"(')
    assert columns_sql(ddl) == 'a INTEGER DEFAULT(2), "b)" VARCHAR'
    assert columns_sql("create or replace table if_x . y ( a int ) ;") == "a int"
    assert columns_sql("CREATE TABLE IF NOT EXISTS db.s.t /* ( */ (a INT -- )\n)") == "a INT -- )"
    assert columns_sql("CREATE TEMP TABLE t(a INT)") == "a INT"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "CREATE TABLE t AS SELECT 1 AS a",
        "CREATE VIEW v AS SELECT 1",
        "",
        "CREATE TABLE",
    ],
)
def test_columns_sql_refuses_other_statements(sql: str) -> None:
    with pytest.raises(ValueError):
        columns_sql(sql)


@pytest.mark.parametrize(
    ("alter_sql", "column"),
    [
        ("ALTER TABLE t ADD COLUMN c INTEGER", "c INTEGER"),
        ("alter table t add c integer default (1) ;", "c integer default (1)"),
        (
            'ALTER TABLE IF EXISTS s."t x" ADD COLUMN IF NOT EXISTS "c d" VARCHAR DEFAULT \'a;b\'',
            "IF NOT EXISTS \"c d\" VARCHAR DEFAULT 'a;b'",
        ),
        ("ALTER TABLE t ADD IF NOT EXISTS c INT", "IF NOT EXISTS c INT"),
        ('ALTER TABLE t ADD COLUMN "column" INT', '"column" INT'),
        ("ALTER TABLE t /* add */ ADD COLUMN c STRUCT(x INT)[] -- note", "c STRUCT(x INT)[]"),
    ],
)
def test_added_column_sql(alter_sql: str, column: str) -> None:
    assert added_column_sql(alter_sql) == column


@pytest.mark.parametrize(
    "alter_sql",
    [
        "ALTER TABLE t ADD COLUMN c INTEGER DEFAULT (41 + 1)",
        'ALTER TABLE t ADD "we""ird)" VARCHAR DEFAULT \'(\' COLLATE nocase',
        "ALTER TABLE t ADD d STRUCT(x INT, y VARCHAR[]) DEFAULT ({'x': 1, 'y': [')']})",
        "ALTER TABLE t ADD COLUMN IF NOT EXISTS a VARCHAR",  # exists: nothing happens
        "ALTER TABLE t ADD COLUMN IF NOT EXISTS e DATE",
    ],
)
def test_added_column_sql_applies_like_the_original(
    con: duckdb.DuckDBPyConnection, alter_sql: str
) -> None:
    con.execute("CREATE TABLE t (a INT)")
    con.execute("CREATE TABLE p (a INT)")
    con.execute(alter_sql)
    con.execute(f"ALTER TABLE p ADD COLUMN {added_column_sql(alter_sql)}")
    assert table_shape(con, "main", "p") == table_shape(con, "main", "t")


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD CONSTRAINT c UNIQUE (a)",
        "ALTER TABLE t ADD PRIMARY KEY (a)",
        "ALTER TABLE t ADD COLUMN",
        "ALTER TABLE t DROP COLUMN a",
        "ALTER TABLE t RENAME TO u",
        "CREATE TABLE t (a INT)",
        "ALTER VIEW v ADD a INT",
    ],
)
def test_added_column_sql_refuses_other_statements(sql: str) -> None:
    with pytest.raises(ValueError):
        added_column_sql(sql)


def test_duckdb_has_the_stabilities_this_module_knows(con: duckdb.DuckDBPyConnection) -> None:
    """If DuckDB adds a stability level, volatile_functions counts it as volatile; this test
    says so out loud."""
    rows = con.execute("SELECT DISTINCT stability FROM duckdb_functions()").fetchall()
    assert {row[0] for row in rows} == {"CONSISTENT", "CONSISTENT_WITHIN_QUERY", "VOLATILE", None}


def test_every_non_consistent_scalar_function_is_found(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
        "WHERE function_type = 'scalar' AND stability <> 'CONSISTENT' ORDER BY 1"
    ).fetchall()
    names = [row[0] for row in rows]
    assert {"random", "uuid", "gen_random_uuid", "now", "nextval", "setseed"} <= set(names)
    for name in names:
        assert volatile_functions(f"SELECT {name}(x) FROM t", con) == [name]


@pytest.mark.parametrize("name", ["abs", "lower", "length", "list_value", "coalesce", "sum"])
def test_consistent_functions_are_not_reported(con: duckdb.DuckDBPyConnection, name: str) -> None:
    assert volatile_functions(f"SELECT {name}(a) FROM t", con) == []


@pytest.mark.parametrize(
    ("sql", "volatile"),
    [
        ("SELECT random(), RANDOM(), Uuid() FROM t", ["random", "uuid"]),
        (
            "INSERT INTO t VALUES (nextval('s'), gen_random_uuid(), setseed(0.5))",
            ["gen_random_uuid", "nextval", "setseed"],
        ),
        ("SELECT main.random() + x.y", ["random"]),
        ("SELECT 'random()', $$uuid()$$, E'now()' -- now()\n/* random() */", []),
        ('SELECT "random", "now", t."uuid" FROM t', []),
        ('SELECT "random"() FROM t', ["random"]),
        ("SELECT random (), now\n(\n)", ["now", "random"]),
        ("UPDATE t SET a = a + 1 WHERE b > today()", ["today"]),
        ("CREATE TABLE uuid(a INT DEFAULT 1)", []),
        ("CREATE TABLE IF NOT EXISTS s.random(a INT)", []),
        ("INSERT INTO random(a) SELECT 1", []),
        ("INSERT INTO t(a) SELECT random()", ["random"]),
        (
            "CREATE TABLE t (a UUID DEFAULT uuid(), b TIMESTAMP DEFAULT current_timestamp)",
            ["current_timestamp", "uuid"],
        ),
        ("SELECT CAST(a AS uuid), a::uuid FROM t", []),
        ("SELECT ago(INTERVAL 1 DAY)", ["ago"]),  # a built-in macro over current_timestamp
        (
            "SELECT current_localtimestamp(), current_localtime()",
            ["current_localtime", "current_localtimestamp"],
        ),
    ],
)
def test_volatile_functions(con: duckdb.DuckDBPyConnection, sql: str, volatile: list[str]) -> None:
    assert volatile_functions(sql, con) == volatile


@pytest.mark.parametrize(
    ("keyword", "volatile"),
    [
        ("current_date", True),
        ("current_time", True),
        ("current_timestamp", True),
        ("localtime", True),
        ("localtimestamp", True),
        ("current_schema", True),
        ("current_catalog", True),
        ("current_user", False),  # macros of the constant 'duckdb'
        ("session_user", False),
        ("current_role", False),
        ("user", False),
    ],
)
def test_keywords_duckdb_calls_without_parentheses(
    con: duckdb.DuckDBPyConnection, keyword: str, volatile: bool
) -> None:
    con.execute(f"SELECT {keyword}::VARCHAR").fetchall()  # DuckDB does take it as a call
    assert volatile_functions(f"SELECT {keyword.upper()} AS x", con) == (
        [keyword] if volatile else []
    )
    assert volatile_functions(f'SELECT t.{keyword}, "{keyword}" FROM t', con) == []


def test_macros_are_judged_by_what_they_call(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE MACRO jitter(x) AS x + random()")
    con.execute("CREATE MACRO wobble(x) AS jitter(x) * 2")
    con.execute("CREATE MACRO stamp() AS current_timestamp")
    con.execute("CREATE MACRO plus_one(x) AS x + 1")
    con.execute("CREATE MACRO rows_now() AS TABLE SELECT now() AS at")
    sql = "SELECT wobble(a), plus_one(a), stamp(), jitter(1) FROM rows_now()"
    assert volatile_functions(sql, con) == ["jitter", "rows_now", "stamp", "wobble"]
    other = duckdb.connect()  # the macros belong to `con`'s catalog only
    assert volatile_functions(sql, other) == []
    other.close()


def test_partition_columns_drop_foreign_keys_and_keep_everything_else() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY, k INTEGER UNIQUE)")
    con.execute(
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id), "
        "k INTEGER, note VARCHAR DEFAULT('a, b'), FOREIGN KEY (k) REFERENCES parent (k), "
        "CHECK (id > 0))"
    )
    table_ddl = con.execute(
        "SELECT sql FROM duckdb_tables() WHERE table_name = 'child'"
    ).fetchall()[0][0]
    columns = partition_columns_sql(table_ddl)
    assert "FOREIGN" not in columns.upper() and "REFERENCES" not in columns.upper()
    con.execute(f"CREATE TABLE alone ({columns})")  # no parent needed
    described = con.execute("DESCRIBE alone").fetchall()
    assert [row[:2] for row in described] == [
        ("id", "INTEGER"),
        ("parent_id", "INTEGER"),
        ("k", "INTEGER"),
        ("note", "VARCHAR"),
    ]
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO alone VALUES (0, 1, 1, 'x')")  # the CHECK stayed
    assert partition_columns_sql("CREATE TABLE t(a INTEGER);") == "a INTEGER"
