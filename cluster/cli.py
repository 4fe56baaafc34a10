"""The `dcluster` command line. Each subcommand is a thin wrapper: the work lives in the
package that owns it (the simulator in chaos/)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

app = typer.Typer(
    name="dcluster",
    help="dcluster: a distributed DuckDB. Today: the Raft simulator and host facts.",
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


if __name__ == "__main__":
    app()
