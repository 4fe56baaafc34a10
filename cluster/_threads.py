"""Two small pieces that let slow work run beside the worker's event loop.

A `Lane` is one thread that runs the callables given to it in order: the partition store's
applies, the scans and the staging writes each get one, so DuckDB and fsync never stop the
loop from ticking (DuckDB, Arrow and fsync release the GIL while they work). A `Mailbox` is
the way back: a lane posts a callable, the loop's selector wakes on the mailbox's eventfd,
and the loop runs it on its own thread — so the Raft core and the transport are only ever
touched by the loop.

Guarantees: a lane runs its callables one at a time, in submission order; an exception in
one is handed to `on_error` and the lane goes on. `close()` lets the queued work finish (up
to a timeout), then stops the thread; it may be called again to wait longer.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

LANE_CLOSE_TIMEOUT_S = 30.0


class Lane:
    def __init__(self, name: str, on_error: Callable[[str, BaseException], None]) -> None:
        self.name = name
        self._on_error = on_error
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported, the lane goes on
                self._on_error(self.name, error)

    def close(self, timeout_s: float = LANE_CLOSE_TIMEOUT_S) -> bool:
        """Finish the queued work and stop; False if the thread did not end in time (call
        again to wait more). Work submitted after the first call is never run."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class Mailbox:
    """Callables posted from any thread, run by the loop after its selector wakes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def post(self, work: Callable[[], None]) -> None:
        self._queue.put(work)
        try:
            os.eventfd_write(self._fd, 1)
        except OSError:
            pass  # closed: the loop is gone

    def drain(self) -> list[Callable[[], None]]:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        work: list[Callable[[], None]] = []
        while True:
            try:
                work.append(self._queue.get_nowait())
            except queue.Empty:
                return work

    def close(self) -> None:
        os.close(self._fd)
