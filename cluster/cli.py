"""The `dcluster` command line. Each subcommand is a thin wrapper: the work lives in the
package that owns it (the simulator in chaos/, the cluster runtime in cluster.control,
cluster.supervisor and cluster.client).

Exit codes: 0 done; 1 the cluster refused or could not serve (not running, already
running, key not found, no leader in time); 2 bad flags. Nothing here imports ipc/,
duckdb or pyarrow at load time: `up --foreground` forks workers from this process.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import typer

from cluster.control import UP_TIMEOUT_S, UP_TIMEOUT_S_MAX
from cluster.rundir import ClusterInfo, RunDir

app = typer.Typer(
    name="dcluster",
    help="dcluster: a distributed DuckDB. Start a cluster, watch it, break it.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def sim(
    seed: int | None = typer.Option(None, help="Run one seed."),
    seeds: str | None = typer.Option(None, help="Run a range of seeds, A..B inclusive."),
    nodes: int = typer.Option(5, help="Cluster size, 3 to 7."),
    steps: int | None = typer.Option(None, help="Simulated steps in the fault phase."),
    verbose: bool = typer.Option(False, "--verbose", help="Say what each seed checked."),
    trace: bool = typer.Option(False, "--trace", help="Print every event of the trace."),
) -> None:
    """Run the deterministic simulator (same as `python -m chaos.sim`)."""
    from chaos.sim import main

    argv: list[str] = ["--nodes", str(nodes)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if seeds is not None:
        argv += ["--seeds", seeds]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if verbose:
        argv.append("--verbose")
    if trace:
        argv.append("--trace")
    raise typer.Exit(main(argv))


@app.command()
def host(as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Show the host limits the local transport adapts to (POSIX mq, /dev/shm, cores)."""
    import json
    import shutil

    import psutil

    from ipc.local import LocalOptions
    from ipc.mq import choose_queue_size, detect_host_limits

    limits = detect_host_limits()
    options = LocalOptions()
    size = choose_queue_size(
        limits,
        messages_max=options.queue_messages_max,
        message_bytes_max=options.queue_message_bytes_max,
        messages_min=options.queue_messages_min,
        message_bytes_min=options.queue_message_bytes_min,
        queues_expected=options.queues_per_host_expected,
    )
    shm = shutil.disk_usage(options.shm_dir)
    facts = {
        "mq_msg_max": limits.msg_max,
        "mq_msgsize_max": limits.msgsize_max,
        "mq_queues_max": limits.queues_max,
        "rlimit_msgqueue_bytes": limits.rlimit_bytes,
        "queue_messages": size.messages,
        "queue_message_bytes": size.message_bytes,
        "queues_that_fit": limits.queues_that_fit(size),
        "shm_dir": str(options.shm_dir),
        "shm_total_bytes": shm.total,
        "shm_free_bytes": shm.free,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
    }
    if as_json:
        typer.echo(json.dumps(facts))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")


@app.command("version")
def show_version() -> None:
    """Print the installed dcluster version."""
    try:
        typer.echo(version("dcluster"))
    except PackageNotFoundError:
        typer.echo("dcluster (not installed)")


# ---- the cluster runtime ----

DEFAULT_NAME = "dcluster"
EXIT_REFUSED = 1
EXIT_USAGE = 2
PAUSE_SECONDS_MAX = 3600.0

SKEW_MS_MAX = 24 * 3600 * 1000
HANG_SECONDS_MAX = 600.0
"""The longest `chaos hang` (the worker refuses longer ones too)."""

NAME_OPTION = typer.Option(DEFAULT_NAME, "--name", help="The cluster's name.")
DATA_DIR_OPTION = typer.Option(
    None, "--data-dir", help="Its run directory (default: the user's data dir / NAME)."
)

SECRET_FILE_OPTION = typer.Option(
    None, "--secret-file", help="TCP: the cluster's secret (a copy of another host's)."
)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the runtime's typed errors into a message and an exit code."""
    from cluster.client import ClientError
    from cluster.control import ControlError, UsageError

    try:
        yield
    except (UsageError, ValueError) as error:
        _fail(str(error), EXIT_USAGE)
    except (ControlError, ClientError) as error:
        _fail(str(error), EXIT_REFUSED)


def _run_dir(name: str, data_dir: Path | None) -> RunDir:
    from cluster.client import resolve_run_dir

    return resolve_run_dir(name, data_dir)


def _previous_run(name: str, data_dir: Path | None) -> ClusterInfo | None:
    """The cluster's table from its last run, if it left one (and it is readable)."""
    import msgspec

    try:
        return _run_dir(name, data_dir).read_cluster()
    except (OSError, msgspec.DecodeError):
        return None


@app.command()
def up(
    cores: int | None = typer.Option(
        None, "--cores", help="Workers to start (default: one per physical core)."
    ),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
    transport: str | None = typer.Option(
        None, "--transport", help="shm (one host, the default) or tcp."
    ),
    bind: str | None = typer.Option(
        None,
        "--bind",
        help="TCP: HOST:PORT this host's first worker listens on (the next ones: PORT+1...).",
    ),
    join: str | None = typer.Option(
        None,
        "--join",
        help="TCP: join the cluster whose node N (default 0) listens at [N@]HOST:PORT.",
    ),
    voters: int | None = typer.Option(None, "--voters", help="Voters (default min(N, 5))."),
    oversubscribe: bool = typer.Option(
        False, "--oversubscribe", help="Allow more workers than physical cores."
    ),
    foreground: bool = typer.Option(
        False, "--foreground", help="Run the supervisor in this process until stopped."
    ),
    fsync: str = typer.Option("on", "--fsync", help="on, or off (benchmark mode only)."),
    timeout: float = typer.Option(
        UP_TIMEOUT_S, "--timeout", help="Give up (and stop everything) if no leader by then."
    ),
    secret_file: Path | None = SECRET_FILE_OPTION,
) -> None:
    """Start a cluster and return once it has a leader."""
    import os

    from cluster import control, topology
    from cluster._fragment_watch import fragment_time_limit_ms_from
    from cluster.config import snapshot_entries_from, worker_memory_bytes_from

    with _errors():
        # a bad value fails here, not in every worker the supervisor starts
        snapshot_entries_from(os.environ)
        fragment_time_limit_ms_from(os.environ)
        worker_memory_bytes_from(os.environ, 0, 1)
        try:
            host = topology.detect()
        except topology.TopologyError as error:
            raise control.UsageError(str(error)) from error
        plan = control.plan_up(
            name=name,
            data_dir=data_dir,
            cores=cores,
            transport=transport,
            bind=bind,
            join=join,
            voters=voters,
            oversubscribe=oversubscribe,
            fsync=fsync,
            topology=host,
            previous=_previous_run(name, data_dir),
            secret_file=secret_file,
        )
        if not plan.fsync:
            typer.secho(
                "WARNING: --fsync off: acknowledged writes can be LOST on a crash. "
                "Benchmark mode only; never for data you keep.",
                err=True,
                fg="red",
                bold=True,
            )
        if foreground:
            typer.echo(f"cluster {plan.name}: run directory {plan.run_dir} (Ctrl-C stops it)")
            raise typer.Exit(control.up_foreground(plan))
        if not 0 < timeout <= UP_TIMEOUT_S_MAX:
            raise control.UsageError(f"--timeout must be above 0 and at most {UP_TIMEOUT_S_MAX}")
        result = control.up(plan, timeout)
    for line in result.cleaned:
        typer.echo(f"previous run was killed; cleaned up: {line}")
    typer.echo(
        f"cluster {plan.name} is up: {plan.workers} workers ({plan.voters} voters, "
        f"{plan.transport}, fsync {'on' if plan.fsync else 'off'}), "
        f"leader node {result.leader} (term {result.term})"
    )
    typer.echo(f"run directory: {result.run_dir}")
    typer.echo(f"supervisor: pid {result.supervisor_pid}, log {result.run_dir / 'supervisor.log'}")
    typer.echo(f"worker logs: {result.run_dir}/node-<n>/worker.log")
    for line in result.joined:
        typer.echo(line)
    for node, address in result.addresses:
        typer.echo(f"node {node} listens on {address[0]}:{address[1]}")


@app.command()
def down(
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
    purge: bool = typer.Option(False, "--purge", help="Also delete the data (WALs, secret)."),
) -> None:
    """Stop every worker and remove the cluster's queues and shm segments."""
    from cluster import control

    with _errors():
        run = _run_dir(name, data_dir)
        result = control.down(run, purge=purge)
    typer.echo(result.supervisor)
    for line in result.killed:
        typer.echo(f"killed leftover {line}")
    for item in result.removed:
        typer.echo(f"removed {item}")
    typer.echo(f"removed {len(result.removed)} queues, segments and registry entries")
    if purge:
        typer.echo(f"purged {run.path}")
    else:
        typer.echo(f"data kept in {run.path} (`down --purge` deletes it)")


@app.command()
def status(
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Each worker's role, term, indexes, partitions and rows, heartbeat, restarts, CPU and
    memory."""
    import json

    from cluster import control
    from cluster.client import Client
    from cluster.supervisor import running_supervisor

    with _errors():
        run = _run_dir(name, data_dir)
        cluster = run.read_cluster()
        if cluster is None:
            raise control.ControlError(f"no cluster at {run.path} (run `dcluster up` first)")
        running = running_supervisor(run) is not None
        statuses = {}
        addresses = {}
        if running:
            with Client(run.path) as client:
                statuses = client.status_all()
                addresses = client.addresses
            cluster = run.read_cluster() or cluster
        merged = control.merge_status(cluster, statuses, running, addresses)
    if as_json:
        typer.echo(json.dumps(merged))
    else:
        _print_status(merged)
    if not running:
        _fail(f"cluster {cluster.name} is down (no supervisor running)", EXIT_REFUSED)


STATUS_WIDTH_MIN = 190
STATUS_COLUMNS = (
    ("node", "id"),
    ("host", "host"),
    ("core", "core"),
    ("pid", "pid"),
    ("role", "role"),
    ("state", "state"),
    ("term", "term"),
    ("commit", "commit_index"),
    ("applied", "applied_index"),
    ("stored", "store_applied_index"),
    ("parts", "partitions"),
    ("rows", "rows"),
    ("heartbeat ms", "last_heartbeat_ms"),
    ("restarts", "restarts"),
    ("last exit", "last_exit"),
    ("cpu %", "cpu_percent"),
    ("rss MiB", "rss_bytes"),
)


def _print_status(merged: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    leader = merged["leader"]
    title = (
        f"cluster {merged['name']}: leader "
        f"{'none' if leader is None else f'node {leader}'}, term {merged['term']}"
    )
    table = Table(title=title)
    for header, _ in STATUS_COLUMNS:
        table.add_column(header, justify="right" if header not in ("host", "role") else "left")
    for node in merged["nodes"]:
        table.add_row(*(_cell(key, node[key]) for _, key in STATUS_COLUMNS))
    Console(width=max(STATUS_WIDTH_MIN, shutil.get_terminal_size().columns)).print(table)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "rss_bytes":
        return f"{value / (1 << 20):.0f}"
    if key == "cpu_percent":
        return f"{value:.0f}"
    return str(value)


# ---- kv ----

kv_app = typer.Typer(help="Read and write the replicated key-value store.", no_args_is_help=True)
app.add_typer(kv_app, name="kv")


@contextlib.contextmanager
def _client(name: str, data_dir: Path | None) -> Iterator[Any]:
    from cluster import control
    from cluster.client import Client

    run = _run_dir(name, data_dir)
    control.running_cluster(run)
    with Client(run.path) as client:
        yield client


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="backslashreplace")


@kv_app.command("put")
def kv_put(
    key: str, value: str, name: str = NAME_OPTION, data_dir: Path | None = DATA_DIR_OPTION
) -> None:
    """Store VALUE under KEY."""
    with _errors(), _client(name, data_dir) as client:
        index = client.put(key, value)
    typer.echo(f"ok (index {index})")


@kv_app.command("get")
def kv_get(
    key: str,
    stale: bool = typer.Option(False, "--stale", help="Read one node's state, no ReadIndex."),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Print the value of KEY (exit 1 if there is none)."""
    with _errors(), _client(name, data_dir) as client:
        value = client.get(key, stale=stale)
    if value is None:
        _fail(f"{key}: not found", EXIT_REFUSED)
    typer.echo(_text(value))


@kv_app.command("cas")
def kv_cas(
    key: str,
    expected: str,
    new: str,
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Set KEY to NEW if it holds EXPECTED (exit 1 if it does not)."""
    with _errors(), _client(name, data_dir) as client:
        swapped = client.cas(key, expected, new)
    if not swapped:
        _fail(f"{key}: does not hold {expected!r}; unchanged", EXIT_REFUSED)
    typer.echo("ok")


@kv_app.command("delete")
def kv_delete(key: str, name: str = NAME_OPTION, data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """Remove KEY (exit 1 if it was not there)."""
    with _errors(), _client(name, data_dir) as client:
        found = client.delete(key)
    if not found:
        _fail(f"{key}: not found", EXIT_REFUSED)
    typer.echo("ok")


# ---- chaos ----

chaos_app = typer.Typer(help="Break the cluster on purpose.", no_args_is_help=True)
app.add_typer(chaos_app, name="chaos")


def _signal_target(name: str, data_dir: Path | None, target: str, signum: int) -> tuple[int, int]:
    """Send `signum` to NODE or the leader's worker: (node, pid)."""
    from cluster import control
    from cluster.client import Client

    run = _run_dir(name, data_dir)
    cluster = control.running_cluster(run)
    if target == "leader":
        with Client(run.path) as client:
            node = control.resolve_node(control.node_ids(cluster), target, client.leader)
    else:
        node = control.resolve_node(control.node_ids(cluster), target, lambda: None)
    return node, control.signal_node(cluster, node, signum)


@chaos_app.command("kill")
def chaos_kill(
    target: str = typer.Argument(..., metavar="NODE|leader"),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """SIGKILL a worker (the supervisor restarts it)."""
    with _errors():
        node, pid = _signal_target(name, data_dir, target, signal.SIGKILL)
    typer.echo(f"killed node {node} (pid {pid}) with SIGKILL")


@chaos_app.command("pause")
def chaos_pause(
    target: str = typer.Argument(..., metavar="NODE|leader"),
    seconds: float | None = typer.Option(
        None, "--seconds", help="SIGCONT after this long (the command waits)."
    ),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """SIGSTOP a worker; with --seconds, SIGCONT it afterwards."""
    if seconds is not None and not 0 < seconds <= PAUSE_SECONDS_MAX:
        _fail(f"--seconds must be above 0 and at most {PAUSE_SECONDS_MAX}", EXIT_USAGE)
    with _errors():
        node, pid = _signal_target(name, data_dir, target, signal.SIGSTOP)
    typer.echo(f"paused node {node} (pid {pid}) with SIGSTOP")
    if seconds is None:
        return
    time.sleep(seconds)
    with _errors():
        _signal_target(name, data_dir, str(node), signal.SIGCONT)
    typer.echo(f"resumed node {node} (pid {pid}) with SIGCONT after {seconds:g} s")


@chaos_app.command("resume")
def chaos_resume(
    target: str = typer.Argument(..., metavar="NODE"),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """SIGCONT a paused worker."""
    with _errors():
        node, pid = _signal_target(name, data_dir, target, signal.SIGCONT)
    typer.echo(f"resumed node {node} (pid {pid}) with SIGCONT")


def _chaos_all(
    name: str,
    data_dir: Path | None,
    action: Any,
    nodes: list[int] | None = None,
    **fields: Any,
) -> list[str]:
    """Send one chaos request to `nodes` (default every worker): a line per node."""
    from cluster import control
    from cluster.client import Client

    run = _run_dir(name, data_dir)
    cluster = control.running_cluster(run)
    with Client(run.path) as client:
        answers = client.chaos(action, nodes, **fields)
    lines = []
    for node, answer in answers.items():
        pid = next((n.pid for n in cluster.nodes if n.id == node), None)
        if answer is None:
            lines.append(f"node {node} (pid {pid}): no answer (down, paused or unreachable)")
        else:
            verdict = "ok" if answer.ok else "refused"
            lines.append(f"node {node} (pid {pid}): {verdict} {answer.detail}".rstrip())
    return lines


def _node_ids(name: str, data_dir: Path | None) -> list[int]:
    """Every node of the cluster: this host's, and (TCP) the members on other hosts."""
    from cluster import control
    from cluster.client import Client

    run = _run_dir(name, data_dir)
    cluster = control.running_cluster(run)
    if cluster.transport != "tcp":
        return control.node_ids(cluster)
    with Client(run.path) as client:
        client.status_all()
        return client.nodes


@chaos_app.command("partition")
def chaos_partition(
    spec: str = typer.Argument(..., metavar='"0,1|2"'),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Cut every link between the sides (node numbers, sides split by '|')."""
    from cluster import control
    from cluster.protocol import ChaosAction

    with _errors():
        groups = control.parse_partition(spec, _node_ids(name, data_dir))
        lines = _chaos_all(name, data_dir, ChaosAction.PARTITION, groups=groups)
    sides = " | ".join(",".join(map(str, group)) for group in groups)
    typer.echo(f"partition {sides}:")
    for line in lines:
        typer.echo(f"  {line}")


@chaos_app.command("heal")
def chaos_heal(name: str = NAME_OPTION, data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """Restore every link (undo partition)."""
    from cluster.protocol import ChaosAction

    with _errors():
        lines = _chaos_all(name, data_dir, ChaosAction.HEAL)
    typer.echo("heal:")
    for line in lines:
        typer.echo(f"  {line}")


@chaos_app.command("skew")
def chaos_skew(
    target: str = typer.Argument(..., metavar="NODE"),
    ms: int = typer.Option(..., "--ms", help="Clock skew in milliseconds (negative: behind)."),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Skew one worker's wall clock by M milliseconds."""
    from cluster import control
    from cluster.protocol import ChaosAction

    if abs(ms) > SKEW_MS_MAX:
        _fail(f"--ms must be within ±{SKEW_MS_MAX}", EXIT_USAGE)
    with _errors():
        node = control.resolve_node(_node_ids(name, data_dir), target, lambda: None)
        lines = _chaos_all(name, data_dir, ChaosAction.SKEW, [node], skew_ms=ms)
    typer.echo(f"skew {ms} ms:")
    for line in lines:
        typer.echo(f"  {line}")


@chaos_app.command("hang")
def chaos_hang(
    target: str = typer.Argument(..., metavar="NODE|leader"),
    seconds: float = typer.Option(..., "--seconds", help="How long its loop stops."),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Stop a worker's loop (no heartbeat, no serving) while its process stays alive;
    the supervisor kills and restarts it once it is silent for its hang limit."""
    from cluster import control
    from cluster.client import Client
    from cluster.protocol import ChaosAction

    if not 0 < seconds <= HANG_SECONDS_MAX:
        _fail(f"--seconds must be above 0 and at most {HANG_SECONDS_MAX:g}", EXIT_USAGE)

    def leader() -> int | None:
        with Client(_run_dir(name, data_dir).path) as client:
            return client.leader()

    with _errors():
        node = control.resolve_node(_node_ids(name, data_dir), target, leader)
        hang_ms = round(seconds * 1000)
        lines = _chaos_all(name, data_dir, ChaosAction.HANG, [node], hang_ms=hang_ms)
    typer.echo(f"hang {seconds:g} s:")
    for line in lines:
        typer.echo(f"  {line}")


# ---- SQL ----

FORMAT_OPTION = typer.Option("table", "--format", help="table, csv, json or parquet.")
SQL_FILE_OPTION = typer.Option(None, "-f", "--file", help="Run the SQL in this file.")
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Write the result here.")
LOAD_FILES_ARGUMENT = typer.Argument(..., help="Parquet or CSV files.")
CONSISTENCY_OPTION = typer.Option(
    "strong", "--consistency", help="strong (a read barrier in the log) or stale (local state)."
)


@app.command()
def sql(
    statement: str | None = typer.Argument(None, help="SQL to run; none starts a shell."),
    file: Path | None = SQL_FILE_OPTION,
    output_format: str = FORMAT_OPTION,
    output: Path | None = OUTPUT_OPTION,
    consistency: str = CONSISTENCY_OPTION,
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Run SQL on the cluster: answers are what single-node DuckDB would give."""
    from cluster import cli_sql

    cli_sql.run_sql(statement, file, name, data_dir, output_format, output, consistency)


@app.command()
def partitions(
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON array."),
) -> None:
    """Where each partition lives (primary first), with rows and bytes."""
    from cluster import cli_sql

    cli_sql.show_partitions(name, data_dir, as_json)


@app.command()
def load(
    table: str = typer.Argument(..., help="The table to load into (it must exist)."),
    files: list[Path] = LOAD_FILES_ARGUMENT,
    file_format: str | None = typer.Option(
        None, "--format", help="parquet or csv (default: from the file name)."
    ),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Load files into a table, one atomic COPY per file, with a progress bar."""
    from cluster import cli_sql

    cli_sql.load_files(table, files, name, data_dir, file_format)


@app.command()
def demo(
    rows: int = typer.Option(1_000_000, "--rows", help="Rows in the demo dataset."),
    name: str = NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Create a demo table, load a generated Parquet file, query it, show its partitions."""
    from cluster import cli_sql

    if not 1 <= rows <= 100_000_000:
        _fail("--rows must be between 1 and 100000000", EXIT_USAGE)
    cli_sql.run_demo(name, data_dir, rows)


if __name__ == "__main__":
    app()
