"""TPC-H for dcluster: the 8 tables as Parquet, the 22 query texts, dcluster's DDL for the
tables, and the rule by which two answers to a query count as identical.

DuckDB's `tpch` extension (dbgen and the query texts) cannot be loaded into the project's
DuckDB: it ships on the package index only for duckdb 1.5.5 (`duckdb-extension-tpch`). So
on first use a *side environment* is made — a venv at `.tpch-env/` in the project
(`DCLUSTER_TPCH_ENV` overrides), holding duckdb 1.5.5 and that package, installed by pip
from whatever index pip is configured with, as `make` installs the project. It is only ever
run as a subprocess: it loads the extension from the package's own file, runs
`CALL dbgen(sf=…)`, writes each table to Parquet and each of `tpch_queries()` to a file.

Output is cached per scale factor in `$DCLUSTER_TPCH_DIR/sf<sf>/` (default
`$XDG_CACHE_HOME/dcluster/tpch/`, i.e. `~/.cache/dcluster/tpch/`), so it is generated
once; the side environment is needed only while a scale factor is missing.

Guarantees: `ensure_dataset` returns only a complete dataset — it is written into a
temporary directory and renamed into place last, under a file lock, so concurrent callers
(pytest workers, a benchmark) generate it once and never see half of it; every table's
Parquet schema, read back by the project's DuckDB, has exactly the column names and types
in `TABLES` (which are dbgen's), and the row counts dbgen reported. `TpchUnavailable` is
raised, with the reason, when the side environment cannot be made (e.g. no index); any
other failure is a `TpchDataError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from clock import Clock, SystemClock

SIDE_PACKAGES = ("duckdb==1.5.5", "duckdb-extension-tpch==1.5.5")
"""What the side environment holds: the only duckdb the tpch extension package loads into."""
SCALE_FACTOR_MAX = 30.0
"""Largest scale factor accepted (sf 30 is ~10 GB of Parquet; the machine has 24 GiB)."""
QUERY_COUNT = 22
INSTALL_S_MAX = 900.0
"""Making the side environment (venv + pip install) takes at most this long."""
GENERATE_S_MAX_BASE = 120.0
GENERATE_S_MAX_PER_SF = 600.0
"""dbgen plus writing the Parquet files: at most base + per_sf × sf seconds."""
LOCK_WAIT_S_MAX = 3600.0
"""How long a caller waits for another that is generating the same data."""
LOCK_POLL_S = 0.2
OUTPUT_TAIL_CHARS = 2000
"""How much of a failed subprocess's output an error quotes."""
DOUBLE_RELATIVE_TOLERANCE = 1e-9
"""DOUBLE values compare within this relative tolerance: a sum over partitions adds in
another order than single-node DuckDB. Every other type compares exactly."""

ROOT = Path(__file__).resolve().parents[1]
ENV_DIRECTORY_DEFAULT = ROOT / ".tpch-env"
MANIFEST = "manifest.json"
INSTALLED_MARKER = ".installed"

# dbgen's schema (duckdb 1.5.5, checked on every generation): every column is NOT NULL.
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "region": (("r_regionkey", "INTEGER"), ("r_name", "VARCHAR"), ("r_comment", "VARCHAR")),
    "nation": (
        ("n_nationkey", "INTEGER"),
        ("n_name", "VARCHAR"),
        ("n_regionkey", "INTEGER"),
        ("n_comment", "VARCHAR"),
    ),
    "supplier": (
        ("s_suppkey", "BIGINT"),
        ("s_name", "VARCHAR"),
        ("s_address", "VARCHAR"),
        ("s_nationkey", "INTEGER"),
        ("s_phone", "VARCHAR"),
        ("s_acctbal", "DECIMAL(15,2)"),
        ("s_comment", "VARCHAR"),
    ),
    "customer": (
        ("c_custkey", "BIGINT"),
        ("c_name", "VARCHAR"),
        ("c_address", "VARCHAR"),
        ("c_nationkey", "INTEGER"),
        ("c_phone", "VARCHAR"),
        ("c_acctbal", "DECIMAL(15,2)"),
        ("c_mktsegment", "VARCHAR"),
        ("c_comment", "VARCHAR"),
    ),
    "part": (
        ("p_partkey", "BIGINT"),
        ("p_name", "VARCHAR"),
        ("p_mfgr", "VARCHAR"),
        ("p_brand", "VARCHAR"),
        ("p_type", "VARCHAR"),
        ("p_size", "INTEGER"),
        ("p_container", "VARCHAR"),
        ("p_retailprice", "DECIMAL(15,2)"),
        ("p_comment", "VARCHAR"),
    ),
    "partsupp": (
        ("ps_partkey", "BIGINT"),
        ("ps_suppkey", "BIGINT"),
        ("ps_availqty", "BIGINT"),
        ("ps_supplycost", "DECIMAL(15,2)"),
        ("ps_comment", "VARCHAR"),
    ),
    "orders": (
        ("o_orderkey", "BIGINT"),
        ("o_custkey", "BIGINT"),
        ("o_orderstatus", "VARCHAR"),
        ("o_totalprice", "DECIMAL(15,2)"),
        ("o_orderdate", "DATE"),
        ("o_orderpriority", "VARCHAR"),
        ("o_clerk", "VARCHAR"),
        ("o_shippriority", "INTEGER"),
        ("o_comment", "VARCHAR"),
    ),
    "lineitem": (
        ("l_orderkey", "BIGINT"),
        ("l_partkey", "BIGINT"),
        ("l_suppkey", "BIGINT"),
        ("l_linenumber", "BIGINT"),
        ("l_quantity", "DECIMAL(15,2)"),
        ("l_extendedprice", "DECIMAL(15,2)"),
        ("l_discount", "DECIMAL(15,2)"),
        ("l_tax", "DECIMAL(15,2)"),
        ("l_returnflag", "VARCHAR"),
        ("l_linestatus", "VARCHAR"),
        ("l_shipdate", "DATE"),
        ("l_commitdate", "DATE"),
        ("l_receiptdate", "DATE"),
        ("l_shipinstruct", "VARCHAR"),
        ("l_shipmode", "VARCHAR"),
        ("l_comment", "VARCHAR"),
    ),
}
"""Table -> its columns (name, DuckDB type), in dbgen's order; smallest table first."""
PARTITION_KEYS = {
    "region": "r_regionkey",
    "nation": "n_nationkey",
    "supplier": "s_suppkey",
    "customer": "c_custkey",
    "part": "p_partkey",
    "partsupp": "ps_partkey",
    "orders": "o_orderkey",
    "lineitem": "l_orderkey",
}
"""The HASH key of each table that is not a reference table. lineitem and orders hash on
the order key with the same partition count, so they are co-located."""
REFERENCE_TABLES = frozenset({"supplier", "nation", "region"})
"""Copied to every worker by default."""


class TpchUnavailable(RuntimeError):
    """The side environment (duckdb 1.5.5 + the tpch extension) cannot be made here."""


class TpchDataError(RuntimeError):
    """The side environment ran but its output is not the dataset promised."""


@dataclass(frozen=True)
class Dataset:
    """One generated scale factor: a Parquet file per table and the 22 query texts."""

    scale_factor: float
    directory: Path
    tables: Mapping[str, Path]
    """Table name -> its Parquet file, for every table of TABLES."""
    rows: Mapping[str, int]
    """Table name -> its row count."""
    queries: Mapping[int, str]
    """1..22 -> DuckDB's text of that TPC-H query."""


# ---- where things live ----


def cache_directory() -> Path:
    """The base directory that holds one `sf<sf>/` directory per scale factor."""
    override = os.environ.get("DCLUSTER_TPCH_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dcluster" / "tpch"


def env_directory() -> Path:
    override = os.environ.get("DCLUSTER_TPCH_ENV")
    return Path(override) if override else ENV_DIRECTORY_DEFAULT


def scale_label(scale_factor: float) -> str:
    """`sf0.01`, `sf0.1`, `sf1`: the directory name of a scale factor."""
    return f"sf{scale_factor:g}"


# ---- the dataset ----


def ensure_dataset(scale_factor: float, clock: Clock | None = None) -> Dataset:
    """The dataset at `scale_factor`, generated (and the side environment made) if it is
    not cached yet."""
    if not (0 < scale_factor <= SCALE_FACTOR_MAX):
        raise ValueError(f"scale factor must be in (0, {SCALE_FACTOR_MAX:g}], not {scale_factor}")
    clock = clock or SystemClock()
    base = cache_directory()
    target = base / scale_label(scale_factor)
    if (target / MANIFEST).is_file():
        return _read_dataset(target, scale_factor)
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / ".lock", clock):
        if not (target / MANIFEST).is_file():  # nobody generated it while we waited
            _generate(target, scale_factor, clock)
    return _read_dataset(target, scale_factor)


def _read_dataset(directory: Path, scale_factor: float) -> Dataset:
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("scale_factor") != scale_factor:
        raise TpchDataError(f"{directory / MANIFEST} is for sf {manifest.get('scale_factor')}")
    tables = {name: directory / f"{name}.parquet" for name in TABLES}
    rows = {name: int(manifest["tables"][name]["rows"]) for name in TABLES}
    queries = {
        number: (directory / "queries" / f"q{number:02d}.sql").read_text()
        for number in range(1, QUERY_COUNT + 1)
    }
    missing = [str(path) for path in tables.values() if not path.is_file()]
    if missing:
        raise TpchDataError(f"dataset {directory} lacks {', '.join(missing)}; remove it")
    return Dataset(scale_factor, directory, tables, rows, queries)


def _generate(target: Path, scale_factor: float, clock: Clock) -> None:
    """Run dbgen in the side environment into a temporary directory beside `target`,
    check what it wrote, then rename it into place."""
    python = ensure_side_env(clock)
    for stale in sorted(target.parent.glob(f".{target.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # a generation that was killed; we hold the lock
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}"
    scratch.mkdir()
    try:
        timeout_s = GENERATE_S_MAX_BASE + GENERATE_S_MAX_PER_SF * scale_factor
        _run([str(python), "-c", _GENERATOR, str(scratch), repr(scale_factor)], timeout_s)
        _check_generated(scratch, scale_factor)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_generated(directory: Path, scale_factor: float) -> None:
    """dbgen's schema is TABLES', and each Parquet file reads back, in the project's
    DuckDB, with exactly those names and types and dbgen's row count."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest["scale_factor"] != scale_factor:
        raise TpchDataError(f"generated sf {manifest['scale_factor']}, asked for {scale_factor}")
    with contextlib.closing(duckdb.connect()) as connection:
        for name, columns in TABLES.items():
            described = manifest["tables"][name]
            generated = [(column, kind) for column, kind, _ in described["columns"]]
            if generated != list(columns) or any(null for *_, null in described["columns"]):
                raise TpchDataError(f"dbgen's {name} is {described['columns']}, not {columns}")
            path = _literal(directory / f"{name}.parquet")
            read = connection.execute(f"DESCRIBE SELECT * FROM read_parquet({path})").fetchall()
            if [(column, kind) for column, kind, *_ in read] != list(columns):
                raise TpchDataError(f"{name}.parquet reads back as {read}, not {columns}")
            counted = connection.execute(f"SELECT count(*) FROM read_parquet({path})").fetchone()
            if counted != (described["rows"],):
                raise TpchDataError(f"{name}.parquet has {counted} rows, dbgen made {described}")
    texts = sorted(path.name for path in (directory / "queries").glob("q*.sql"))
    if texts != [f"q{number:02d}.sql" for number in range(1, QUERY_COUNT + 1)]:
        raise TpchDataError(f"expected the {QUERY_COUNT} query texts, found {texts}")


_GENERATOR = r"""
import importlib.util, json, pathlib, shutil, sys
import duckdb

out, scale_factor = pathlib.Path(sys.argv[1]), float(sys.argv[2])
spec = importlib.util.find_spec("duckdb_extension_tpch")
assert spec is not None and spec.submodule_search_locations, "no duckdb_extension_tpch"
package = pathlib.Path(list(spec.submodule_search_locations)[0])
found = sorted(package.rglob("tpch.duckdb_extension"))
assert len(found) == 1, f"expected one tpch.duckdb_extension under {package}, found {found}"
connection = duckdb.connect(config={"extension_directory": str(out / ".extensions")})
connection.execute("INSTALL '" + str(found[0]).replace("'", "''") + "'")
connection.execute("LOAD tpch")
connection.execute(f"CALL dbgen(sf={scale_factor!r})")
tables = {}
for (name,) in connection.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
    columns = connection.execute(
        "SELECT column_name, data_type, is_nullable FROM duckdb_columns() "
        "WHERE table_name = ? ORDER BY column_index", [name]
    ).fetchall()
    rows = connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
    path = str(out / f"{name}.parquet").replace("'", "''")
    connection.execute(f"COPY \"{name}\" TO '{path}' (FORMAT parquet)")
    tables[name] = {"rows": rows, "columns": columns}
(out / "queries").mkdir()
for number, text in connection.execute("SELECT query_nr, query FROM tpch_queries()").fetchall():
    (out / "queries" / f"q{number:02d}.sql").write_text(text)
connection.close()
shutil.rmtree(out / ".extensions")
manifest = {"scale_factor": scale_factor, "duckdb": duckdb.__version__, "tables": tables}
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
"""
"""Run by the side environment's python: argv is the output directory and the scale
factor. The extension is installed from the package's file into a directory inside the
output, removed before the manifest is written, so nothing is written to ~/.duckdb."""


# ---- the side environment ----


def ensure_side_env(clock: Clock | None = None) -> Path:
    """The side environment's python, making the environment first if needed."""
    clock = clock or SystemClock()
    directory = env_directory()
    python = directory / "bin" / "python"
    marker = directory / INSTALLED_MARKER
    wanted = "\n".join(SIDE_PACKAGES)
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    # The lock lives in the cache, not beside the environment: no stray file in the project.
    cache_directory().mkdir(parents=True, exist_ok=True)
    with _locked(cache_directory() / ".side-env.lock", clock):
        if marker.is_file() and marker.read_text() == wanted and python.exists():
            return python
        shutil.rmtree(directory, ignore_errors=True)
        try:
            _run([sys.executable, "-m", "venv", str(directory)], INSTALL_S_MAX)
            _run([str(python), "-m", "pip", "install", "--quiet", *SIDE_PACKAGES], INSTALL_S_MAX)
        except TpchDataError as error:
            shutil.rmtree(directory, ignore_errors=True)
            raise TpchUnavailable(
                f"cannot make the TPC-H side environment at {directory} "
                f"({' '.join(SIDE_PACKAGES)}): {error}"
            ) from error
        marker.write_text(wanted)  # last: a half-made environment has no marker
    return python


def _run(command: Sequence[str], timeout_s: float) -> None:
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise TpchDataError(f"{' '.join(command[:4])} … took over {timeout_s:.0f} s") from error
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-OUTPUT_TAIL_CHARS:]
        raise TpchDataError(f"{' '.join(command[:4])} … exited {done.returncode}:\n{output}")


@contextlib.contextmanager
def _locked(path: Path, clock: Clock) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most LOCK_WAIT_S_MAX."""
    deadline_ns = clock.monotonic_ns() + int(LOCK_WAIT_S_MAX * 1e9)
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock.monotonic_ns() > deadline_ns:
                    raise TpchDataError(
                        f"{path} stayed locked for {LOCK_WAIT_S_MAX:.0f} s"
                    ) from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- DDL and loading ----


def create_tables_sql(
    reference: Set[str] = REFERENCE_TABLES, partitions: int = 2, replicas: int | None = None
) -> list[str]:
    """dcluster's CREATE TABLE for each table (smallest first): a table named in
    `reference` is REFERENCE; any other is PARTITION BY HASH(its PARTITION_KEYS column)
    with `partitions` partitions (and `replicas` replicas, or the cluster's default)."""
    assert reference <= TABLES.keys(), reference - TABLES.keys()
    assert partitions >= 1, partitions
    assert replicas is None or replicas >= 1, replicas
    statements: list[str] = []
    for name in TABLES:
        if name in reference:
            clauses = "REFERENCE"
        else:
            clauses = f"PARTITION BY HASH({PARTITION_KEYS[name]}) PARTITIONS {partitions}"
            clauses += "" if replicas is None else f" REPLICAS {replicas}"
        statements.append(f"{_create_table(name)} {clauses}")
    return statements


def plain_create_tables_sql() -> list[str]:
    """Single-node DuckDB's CREATE TABLE for each table (the same columns, no clauses)."""
    return [_create_table(name) for name in TABLES]


def _create_table(name: str) -> str:
    columns = ", ".join(f"{column} {kind} NOT NULL" for column, kind in TABLES[name])
    return f"CREATE TABLE {name} ({columns})"


def insert_sql(name: str, dataset: Dataset) -> str:
    """`INSERT INTO name SELECT * FROM read_parquet(its file)`."""
    return f"INSERT INTO {name} SELECT * FROM read_parquet({_literal(dataset.tables[name])})"


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


# ---- comparing answers ----


@dataclass(frozen=True)
class Answer:
    """What a query returned: column names, DuckDB type names, rows as DuckDB's Python
    values (`fetchall()`), in the order returned."""

    columns: Sequence[str]
    types: Sequence[str]
    rows: Sequence[tuple[Any, ...]]


def answer_difference(expected: Answer, actual: Answer) -> str | None:
    """None when `actual` is `expected`: the same column names, the same DuckDB types and
    the same rows in the same order, values equal exactly except in DOUBLE columns, which
    agree within DOUBLE_RELATIVE_TOLERANCE. Otherwise the first difference, in words."""
    if list(actual.columns) != list(expected.columns):
        return f"columns {list(actual.columns)}, expected {list(expected.columns)}"
    if list(actual.types) != list(expected.types):
        return f"types {list(actual.types)}, expected {list(expected.types)}"
    if len(actual.rows) != len(expected.rows):
        return f"{len(actual.rows)} rows, expected {len(expected.rows)}"
    doubles = [kind == "DOUBLE" for kind in expected.types]
    for number, (mine, theirs) in enumerate(zip(actual.rows, expected.rows, strict=True)):
        same = len(mine) == len(theirs) and all(
            _same_double(a, b) if double else a == b
            for a, b, double in zip(mine, theirs, doubles, strict=True)
        )
        if not same:
            return f"row {number} is {mine!r}, expected {theirs!r}"
    return None


def _same_double(mine: Any, theirs: Any) -> bool:
    if mine is None or theirs is None:
        return mine is theirs
    if math.isnan(mine) or math.isnan(theirs):
        return math.isnan(mine) and math.isnan(theirs)
    return math.isclose(mine, theirs, rel_tol=DOUBLE_RELATIVE_TOLERANCE, abs_tol=0.0)
