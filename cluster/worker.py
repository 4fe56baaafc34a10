"""A worker process: one Raft peer of the cluster log with its WAL, transport and
key-value state machine, driven by one event loop (cluster/_loop.py).

    main(config)                              # the supervisor, in a freshly forked child
    python -m cluster.worker --config FILE    # tests and tools (FILE: WorkerConfig JSON)

The supervisor forks before importing pyarrow or duckdb, so this module imports neither:
the loop (and, through the transport, pyarrow) is imported inside `main`, after the fork.

Exit codes: 0 after SIGTERM/SIGINT (the last Ready finished and synced, WAL and transport
closed, queue and segments removed); 3 when the WAL could not be opened or written (a
corrupt log, a full disk, a failed fsync: nothing unsynced was ever acknowledged, and the
next incarnation recovers from what reached the disk); 4 when the transport could not
start. Anything else is a bug, logged with its traceback.

Invariant: everything a worker knows after a restart comes from its WorkerConfig and its
run directory (the WAL); the previous incarnation's queue and segments are reclaimed by
the new transport.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec

from clock import SystemClock
from cluster import config as worker_config
from cluster._worker_log import TermSource, open_worker_log
from cluster._worker_stop import StopSignal
from cluster.config import WorkerConfig
from cluster.rundir import RunDir

EXIT_OK = 0
"""Stopped by SIGTERM/SIGINT, everything synced and released."""
EXIT_CRASHED = 1
"""A bug: logged with its traceback as event "crashed"."""
EXIT_WAL_FAILED = 3
"""The WAL could not be opened or written (corrupt, disk full, failed fsync)."""
EXIT_START_FAILED = 4
"""The transport could not start (another incarnation alive, host limits)."""
EXIT_STORE_FAILED = 5
"""The partition store (DuckDB) failed: restart and replay from the applied index."""


def main(config: WorkerConfig) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the process exit code."""
    stop = StopSignal()
    clock = SystemClock()
    run_dir = RunDir(config.run_path)
    term = TermSource()
    log, handler = open_worker_log(
        run_dir.worker_log(config.node), config.node, config.incarnation, clock, term
    )
    try:
        from cluster import _loop  # pyarrow arrives here, after the supervisor's fork

        return _loop.serve(config, clock, log, term, stop)
    except Exception:
        logging.getLogger("dcluster.worker").exception("crashed")
        return EXIT_CRASHED
    finally:
        handler.flush()
        handler.close()
        stop.close()


def _parse(argv: list[str]) -> WorkerConfig:
    """The WorkerConfig named on the command line; a bad one exits 2 with the reason."""
    parser = argparse.ArgumentParser(
        prog="python -m cluster.worker", description="Run one dcluster worker."
    )
    parser.add_argument("--config", required=True, type=Path, help="WorkerConfig as JSON")
    arguments = parser.parse_args(argv)
    try:
        return worker_config.load(arguments.config)
    except (OSError, msgspec.DecodeError, AssertionError) as error:
        parser.error(f"cannot use {arguments.config}: {type(error).__name__} {error}")


if __name__ == "__main__":
    sys.exit(main(_parse(sys.argv[1:])))
