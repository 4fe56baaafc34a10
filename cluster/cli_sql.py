"""`dcluster sql`, `dcluster partitions` and `dcluster load`: the SQL side of the command line.

Thin wrappers over the Python API (`dcluster.connect`) and the status requests. Output of
`sql` is a table (default), csv, json (one object per line) or a Parquet file; errors are
DuckDB's own messages for bad SQL, and exit 1. Nothing is imported from duckdb or pyarrow
until a command runs (the supervisor forks from the CLI's process).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS_SHOWN_MAX = 10_000
"""A table printed to the terminal stops here (use --format csv for everything)."""
SHELL_PROMPT = "dcluster> "
SHELL_CONTINUE = "       -> "
STATS_SETTLE_S = 1.0


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def connection(name: str, data_dir: Path | None, consistency: str) -> Iterator[Any]:
    import dcluster
    from cluster import control
    from cluster.client import ClientError, resolve_run_dir

    run = resolve_run_dir(name, data_dir)
    try:
        control.running_cluster(run)
        con = dcluster.connect(str(run.path), consistency=consistency)
    except (control.ControlError, ClientError, dcluster.Error) as error:
        _fail(str(error))
    try:
        yield con
    finally:
        con.close()


def run_sql(
    sql: str | None,
    file: Path | None,
    name: str,
    data_dir: Path | None,
    output_format: str,
    output: Path | None,
    consistency: str,
) -> None:
    if output_format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}", 2)
    if output_format == "parquet" and output is None:
        _fail("--format parquet needs --output FILE", 2)
    if consistency not in ("strong", "stale"):
        _fail("--consistency must be strong or stale", 2)
    if sql is not None and file is not None:
        _fail("give SQL or -f FILE, not both", 2)
    if file is not None:
        try:
            sql = file.read_text()
        except OSError as error:
            _fail(f"cannot read {file}: {error.strerror}", 2)
    with connection(name, data_dir, consistency) as con:
        if sql is None:
            _shell(con, output_format)
            return
        _run_one(con, sql, output_format, output)


def _run_one(con: Any, sql: str, output_format: str, output: Path | None) -> bool:
    import dcluster

    try:
        result = con.sql(sql)
        table = result.arrow() if result is not None else None
    except dcluster.Error as error:
        typer.echo(f"error: {error}", err=True)
        if sys.stdin.isatty():
            return False
        raise typer.Exit(1) from None
    if table is not None:
        _print(table, output_format, output)
    return True


def _shell(con: Any, output_format: str) -> None:
    """Statements end with ';' (or an empty line); Ctrl-D leaves."""
    typer.echo("dcluster SQL shell — end statements with ';', Ctrl-D to leave.")
    lines: list[str] = []
    while True:
        try:
            line = input(SHELL_CONTINUE if lines else SHELL_PROMPT)
        except EOFError:
            typer.echo("")
            return
        except KeyboardInterrupt:
            typer.echo("")
            lines.clear()
            continue
        lines.append(line)
        text = "\n".join(lines).strip()
        if not text:
            lines.clear()
            continue
        if text.endswith(";") or not line.strip():
            lines.clear()
            with contextlib.suppress(typer.Exit):
                _run_one(con, text, output_format, None)


def _print(table: Any, output_format: str, output: Path | None) -> None:
    if output_format == "parquet":
        import pyarrow.parquet as pq

        assert output is not None
        pq.write_table(table, output)
        typer.echo(f"wrote {table.num_rows} rows to {output}")
        return
    if output_format == "csv":
        import pyarrow.csv as pa_csv

        target = output.open("wb") if output is not None else sys.stdout.buffer
        with contextlib.ExitStack() as stack:
            if output is not None:
                stack.enter_context(target)
            pa_csv.write_csv(table, target)
            target.flush()
        return
    if output_format == "json":
        import json

        stream = output.open("w") if output is not None else sys.stdout
        for row in table.to_pylist():
            stream.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        if output is not None:
            stream.close()
        return
    _print_table(table)


def _print_table(table: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = table.slice(0, TABLE_ROWS_SHOWN_MAX)
    view = Table(show_lines=False)
    for field in table.schema:
        view.add_column(f"{field.name}\n{field.type}", overflow="fold")
    for row in shown.to_pylist():
        view.add_row(*("NULL" if value is None else str(value) for value in row.values()))
    console = Console(width=max(80, shutil.get_terminal_size().columns))
    console.print(view)
    more = "" if table.num_rows <= TABLE_ROWS_SHOWN_MAX else f" ({TABLE_ROWS_SHOWN_MAX} shown)"
    console.print(f"{table.num_rows} rows{more}")


def show_partitions(name: str, data_dir: Path | None, as_json: bool) -> None:
    import json

    from cluster import control
    from cluster.client import Client, ClientError, resolve_run_dir
    from cluster.session import TransportPort
    from query.port import PortError

    run = resolve_run_dir(name, data_dir)
    try:
        control.running_cluster(run)
        with Client(run.path) as client:
            statuses = client.status_all()
            port = TransportPort(client)
            placements = dict(port.catalog().placements)
            view = control.partition_view(placements, statuses)
    except (control.ControlError, ClientError, PortError) as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(view))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"partitions of cluster {name}")
    for header in ("table", "partition", "primary", "holders", "rows", "bytes"):
        table.add_column(header, justify="left" if header in ("table", "holders") else "right")
    for entry in view:
        holders = ", ".join(f"{h['node']}{'' if h['up'] else ' (down)'}" for h in entry["holders"])
        counted = [h for h in entry["holders"] if h["rows"] is not None]
        rows = str(counted[0]["rows"]) if counted else "-"
        size = str(counted[0]["bytes"]) if counted else "-"
        table.add_row(
            entry["table"], str(entry["partition"]), str(entry["primary"]), holders, rows, size
        )
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)
    if not view:
        typer.echo("no tables yet")


def load_files(
    table: str, files: list[Path], name: str, data_dir: Path | None, file_format: str | None
) -> None:
    """One COPY per file, each atomic; a progress bar over files and rows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    import dcluster

    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        _fail(f"no such file: {', '.join(missing)}", 2)
    loaded = 0
    with connection(name, data_dir, "strong") as con:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(f"loading {table}", total=len(files))
            for path in files:
                progress.update(task, description=f"loading {path.name} into {table}")
                options = f" (FORMAT {file_format})" if file_format else ""
                quoted = str(path.resolve()).replace("'", "''")
                try:
                    result = con.sql(f"COPY {table} FROM '{quoted}'{options}")
                    rows = result.fetchone()[0] if result is not None else 0
                except dcluster.Error as error:
                    progress.stop()
                    _fail(f"{path}: {error} ({loaded} rows from earlier files stay loaded)")
                loaded += rows
                progress.advance(task)
    typer.echo(f"loaded {loaded} rows into {table} from {len(files)} file(s)")


DEMO_QUERY = (
    "SELECT payment, count(*) AS trips, round(avg(fare), 2) AS avg_fare, "
    "round(sum(distance_km), 1) AS km FROM trips GROUP BY payment ORDER BY payment"
)


def run_demo(name: str, data_dir: Path | None, rows: int) -> None:
    """Generate a demo dataset (seeded, so every run is the same), create a table, load
    it, answer a query, and show where each partition lives."""
    import duckdb

    from cluster.client import resolve_run_dir

    run = resolve_run_dir(name, data_dir)
    demo_dir = run.path / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    dataset = demo_dir / f"trips-{rows}.parquet"
    if not dataset.exists():
        typer.echo(f"generating {rows} demo rows in {dataset}")
        scratch = duckdb.connect()
        scratch.execute("SELECT setseed(0.42)")
        scratch.execute(
            f"COPY (SELECT i AS trip_id, "
            f"TIMESTAMP '2026-01-01' + to_seconds(i * 37) AS started_at, "
            f"['card', 'cash', 'app'][1 + (hash(i) % 3)::INTEGER] AS payment, "
            f"round(2 + random() * 40, 2)::DECIMAL(8, 2) AS fare, "
            f"round(random() * 25, 3) AS distance_km "
            f"FROM range({rows}) t(i)) TO '{dataset}' (FORMAT parquet)"
        )
        scratch.close()
    with connection(name, data_dir, "strong") as con:
        typer.echo('$ dcluster sql "DROP TABLE IF EXISTS trips"')
        con.sql("DROP TABLE IF EXISTS trips")
        create = (
            "CREATE TABLE trips (trip_id BIGINT, started_at TIMESTAMP, payment VARCHAR, "
            "fare DECIMAL(8, 2), distance_km DOUBLE) PARTITION BY HASH(trip_id)"
        )
        typer.echo(f'$ dcluster sql "{create}"')
        con.sql(create)
    typer.echo(f"$ dcluster load trips {dataset}")
    load_files("trips", [dataset], name, data_dir, None)
    typer.echo(f'$ dcluster sql "{DEMO_QUERY}"')
    with connection(name, data_dir, "strong") as con:
        _print_table(con.sql(DEMO_QUERY).arrow())
    time.sleep(STATS_SETTLE_S)  # workers recount their partitions twice a second
    typer.echo("$ dcluster partitions")
    show_partitions(name, data_dir, as_json=False)
