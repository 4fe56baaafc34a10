"""The `dcluster` command line. Each subcommand is a thin wrapper: the work lives in the
package that owns it (the simulator in chaos/)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

app = typer.Typer(
    name="dcluster",
    help="dcluster: a distributed DuckDB. Today: the deterministic Raft simulator.",
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


@app.command("version")
def show_version() -> None:
    """Print the installed dcluster version."""
    try:
        typer.echo(version("dcluster"))
    except PackageNotFoundError:
        typer.echo("dcluster (not installed)")


if __name__ == "__main__":
    app()
