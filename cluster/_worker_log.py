"""The worker's structured log: one JSON object per line, per event, in its run directory.

Every line carries the wall time (from the worker's clock, skew included, so a skewed
worker's log shows it), the level, the node, the incarnation and the current Raft term, then
the event's name and fields. Library loggers (the WAL, the transport) land in the same file
in the same shape, as event "log". Only rare events are logged (role changes, restarts,
faults, a periodic stats line): never one line per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from clock import Clock

LOGGER_NAME = "dcluster.worker"
LINE_BYTES_MAX = 16 * 1024
"""A longer line is cut, so one odd value cannot flood the log."""


def _default(value: object) -> object:
    return repr(value)


_encoder = msgspec.json.Encoder(enc_hook=_default)


class WorkerLogFormatter(logging.Formatter):
    """Renders a record as one JSON line with the worker's identity and term."""

    def __init__(self, node: int, incarnation: int, clock: Clock, term: Callable[[], int]) -> None:
        super().__init__()
        self.node = node
        self.incarnation = incarnation
        self.clock = clock
        self.term = term

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        line: dict[str, Any] = {
            "wall_ns": self.clock.wall_ns(),
            "level": record.levelname.lower(),
            "node": self.node,
            "incarnation": self.incarnation,
            "term": self.term(),
        }
        if record.name == LOGGER_NAME:
            line["event"] = record.getMessage()
        else:
            line["event"] = "log"
            line["logger"] = record.name
            line["message"] = record.getMessage()
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = _encoder.encode(line).decode(errors="replace")
        return text if len(text) <= LINE_BYTES_MAX else text[:LINE_BYTES_MAX]


class EventLog:
    """Where the worker says what happened: `log.event("became_leader", term=3)`."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def event(self, name: str, **fields: object) -> None:
        self._logger.info(name, extra={"fields": fields})

    def warning(self, name: str, **fields: object) -> None:
        self._logger.warning(name, extra={"fields": fields})

    def error(self, name: str, **fields: object) -> None:
        self._logger.error(name, extra={"fields": fields})


class TermSource:
    """The term the formatter stamps; the loop points it at its RaftNode once it has one."""

    def __init__(self) -> None:
        self.read: Callable[[], int] = lambda: 0

    def __call__(self) -> int:
        return self.read()


def open_worker_log(
    path: Path, node: int, incarnation: int, clock: Clock, term: Callable[[], int]
) -> tuple[EventLog, logging.Handler]:
    """Send every log record of this process to `path` (appending), as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(WorkerLogFormatter(node, incarnation, clock, term))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)  # inherited from a supervisor across fork
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return EventLog(logging.getLogger(LOGGER_NAME)), handler
