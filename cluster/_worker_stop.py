"""SIGTERM and SIGINT for the worker: a flag the loop checks and a pipe its selector
wakes on. Installed first thing in the worker, before the slow imports and the WAL
recovery, so a stop that arrives while the worker starts still ends in a clean exit 0."""

from __future__ import annotations

import os
import signal
from types import FrameType


class StopSignal:
    """SIGTERM and SIGINT set `requested` and wake the selector (through a pipe)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous = {
            signum: signal.signal(signum, self._handle)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signum

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._read_fd)
        os.close(self._write_fd)
