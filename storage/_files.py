"""The file operations the WAL does, behind one small interface, so faults can be injected.

`OsFiles` is the real thing (the `os` module). `FaultyFiles` wraps any `Files` and makes
chosen operations fail with a chosen errno — an `EIO` fsync, an `ENOSPC` write that lands
only its first bytes — so tests and chaos nemeses can break the disk without patching the
WAL's internals. It is a fake, not a mock: with nothing armed it behaves exactly like the
files it wraps. Invariant: every fault fires only because someone armed it.

Every operation raises `OSError` on failure; the WAL turns that into its typed errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field
from typing import Literal, NoReturn, Protocol

Operation = Literal["write", "fsync", "fsync_directory", "rename", "truncate", "unlink", "open"]
OPERATIONS: tuple[Operation, ...] = (
    "write",
    "fsync",
    "fsync_directory",
    "rename",
    "truncate",
    "unlink",
    "open",
)


class Files(Protocol):
    """The whole of the WAL's contact with the file system."""

    def open(self, path: str, *, create: bool) -> int:
        """A read-write descriptor; with `create`, the file must not exist yet."""
        ...

    def close(self, fd: int) -> None: ...

    def write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset` (looping over short writes)."""
        ...

    def read(self, fd: int, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end of the file)."""
        ...

    def size(self, fd: int) -> int: ...

    def fsync(self, fd: int) -> None:
        """Make the file's data (and the size needed to read it back) durable."""
        ...

    def fsync_directory(self, path: str) -> None:
        """Make the names in directory `path` (creations, renames) durable."""
        ...

    def truncate(self, fd: int, length: int) -> None: ...

    def rename(self, source: str, target: str) -> None:
        """Atomically replace `target` by `source`."""
        ...

    def unlink(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def makedirs(self, path: str) -> None: ...

    def lock(self, path: str) -> int:
        """An exclusive lock on file `path` (created if needed), held until its descriptor is
        closed; `BlockingIOError` if another process holds it."""
        ...


class OsFiles:
    """`Files` on the real file system."""

    def open(self, path: str, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        return os.open(path, flags, 0o600)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            count = os.pwrite(fd, view[written:], offset + written)
            assert count > 0, "pwrite wrote nothing without raising"
            written += count

    def read(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fsync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def lock(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd


@dataclass
class _Fault:
    error_number: int
    skip: int
    """Let this many calls of the operation through before failing."""
    times: int
    """Fail this many calls (then disarm)."""
    written_bytes: int
    """For `write`: land this many bytes of the data before failing (a short write)."""


@dataclass
class FaultyFiles:
    """`Files` that fail on command: `arm("fsync", errno.EIO)` fails the next fsync.

    Counts every call per operation in `calls` and every injected failure in `injected`.
    """

    inner: Files = field(default_factory=OsFiles)
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))
    _faults: dict[str, _Fault] = field(default_factory=dict)

    def arm(
        self,
        operation: Operation,
        error_number: int = errno.EIO,
        *,
        skip: int = 0,
        times: int = 1,
        written_bytes: int = 0,
    ) -> None:
        assert operation in OPERATIONS, operation
        assert skip >= 0 and times >= 1 and written_bytes >= 0, (skip, times, written_bytes)
        assert written_bytes == 0 or operation == "write", "only writes can be short"
        self._faults[operation] = _Fault(error_number, skip, times, written_bytes)

    def disarm(self) -> None:
        self._faults.clear()

    def _fault(self, operation: Operation) -> _Fault | None:
        """The armed fault if this call of `operation` must fail, else None."""
        self.calls[operation] += 1
        fault = self._faults.get(operation)
        if fault is None:
            return None
        if fault.skip > 0:
            fault.skip -= 1
            return None
        fault.times -= 1
        if fault.times == 0:
            del self._faults[operation]
        self.injected[operation] += 1
        return fault

    @staticmethod
    def _raise(fault: _Fault, operation: str) -> NoReturn:
        raise OSError(
            fault.error_number, f"{os.strerror(fault.error_number)} (injected {operation})"
        )

    def open(self, path: str, *, create: bool) -> int:
        fault = self._fault("open")
        if fault is not None:
            self._raise(fault, "open")
        return self.inner.open(path, create=create)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        fault = self._fault("write")
        if fault is not None:
            landed = min(fault.written_bytes, len(data))
            if landed:
                self.inner.write(fd, memoryview(data)[:landed], offset)
            self._raise(fault, "write")
        self.inner.write(fd, data, offset)

    def read(self, fd: int, length: int, offset: int) -> bytes:
        return self.inner.read(fd, length, offset)

    def size(self, fd: int) -> int:
        return self.inner.size(fd)

    def fsync(self, fd: int) -> None:
        fault = self._fault("fsync")
        if fault is not None:
            self._raise(fault, "fsync")
        self.inner.fsync(fd)

    def fsync_directory(self, path: str) -> None:
        fault = self._fault("fsync_directory")
        if fault is not None:
            self._raise(fault, "fsync_directory")
        self.inner.fsync_directory(path)

    def truncate(self, fd: int, length: int) -> None:
        fault = self._fault("truncate")
        if fault is not None:
            self._raise(fault, "truncate")
        self.inner.truncate(fd, length)

    def rename(self, source: str, target: str) -> None:
        fault = self._fault("rename")
        if fault is not None:
            self._raise(fault, "rename")
        self.inner.rename(source, target)

    def unlink(self, path: str) -> None:
        fault = self._fault("unlink")
        if fault is not None:
            self._raise(fault, "unlink")
        self.inner.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def makedirs(self, path: str) -> None:
        self.inner.makedirs(path)

    def lock(self, path: str) -> int:
        return self.inner.lock(path)
