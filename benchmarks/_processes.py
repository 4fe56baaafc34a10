"""Child processes of the benchmarks: spawned, talked to over a pipe, always reaped.

Invariant: a child started through `child()` is gone when its `with` block ends (told to
stop, then SIGTERM, then SIGKILL, each wait bounded), whatever happened inside.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

JOIN_S_MAX = 10.0
"""How long a child gets to exit after each of: the stop message, SIGTERM, SIGKILL."""

_CONTEXT = multiprocessing.get_context("spawn")


@contextlib.contextmanager
def child(target: Callable[..., None], *args: Any) -> Iterator[Connection]:
    """A spawned process running `target(*args, connection)`; yields our end of the pipe."""
    ours, theirs = _CONTEXT.Pipe()
    process: BaseProcess = _CONTEXT.Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    theirs.close()
    try:
        yield ours
    finally:
        with contextlib.suppress(OSError, ValueError):
            ours.send(("stop",))
        ours.close()
        reap(process)


def reap(process: BaseProcess) -> None:
    process.join(JOIN_S_MAX)
    for stop in (process.terminate, process.kill):
        if not process.is_alive():
            break
        stop()
        process.join(JOIN_S_MAX)
    assert not process.is_alive(), f"child {process.pid} survived SIGKILL"


def expect(connection: Connection, tag: str, timeout_s: float, who: str) -> Any:
    """The next message from a child, which must be tagged `tag`, within `timeout_s`."""
    if not connection.poll(timeout_s):
        raise TimeoutError(f"no {tag!r} from {who} in {timeout_s} s")
    try:
        message = connection.recv()
    except EOFError:
        raise RuntimeError(f"{who} exited before saying {tag!r}") from None
    if message[0] != tag:
        raise RuntimeError(f"{who} said {message!r}, expected {tag!r}")
    return message
