"""The WAL's typed errors, split by cause: the disk failed (DiskError, DiskFull), the data on
it is wrong (CorruptLog), the log is unusable after an earlier failure (WalFailed), or
another process holds it (WalLocked). All are expected operating conditions, never
assertions: the caller logs them and lets the worker exit; a restart recovers."""

from __future__ import annotations


class WalError(Exception):
    """Base of every error the WAL raises (besides Raft's CompactedError/UnavailableError)."""


class DiskError(WalError):
    """A file operation failed. The log refuses further use; restart to recover."""

    def __init__(self, operation: str, path: str, error: OSError) -> None:
        self.operation = operation
        self.path = path
        self.errno = error.errno
        super().__init__(
            f"{operation} of {path} failed: {error.strerror or error} (errno {error.errno}); "
            "the log refuses further writes — restart to recover from what is on disk"
        )


class DiskFull(DiskError):
    """ENOSPC or EDQUOT: no room for the log."""


class CorruptLog(WalError):
    """Synced data is damaged or missing: refusing to start from a wrong log."""


class WalFailed(WalError):
    """A previous disk error left memory and disk possibly disagreeing: reopen the log."""


class WalLocked(WalError):
    """Another process has this log open."""
