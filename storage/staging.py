"""The per-worker staging area: bulk rows are made durable here before a commit record in the
cluster log references them, so the log carries a (stage id, crc, rows) triple instead of the
rows themselves.

Each staged table is one file `<stage_id>.arrow` holding an uncompressed Arrow IPC stream in
canonical form: the table's chunks combined, then cut into batches of at most
STAGE_BATCH_ROWS rows. Replicas given equal tables (same schema and values, any chunking)
therefore write byte-identical files, and the crc in a commit record identifies the rows on
every worker. (Arrow writes the bytes beneath NULL slots as they are, so equality here means
equal buffers — which tables decoded from the same message always have.)

Key invariant: a visible `<stage_id>.arrow` is complete. `write` fills a private temporary
file, fsyncs it, renames it into place and fsyncs the directory before it returns, so a crash
at any moment leaves either the old file, the new one, or no file — never a torn one. Files
are never modified in place, so a table memory-mapped by `open` stays valid even if the id is
rewritten or removed meanwhile. `open` checks the crc and row count the caller expects and
moves a mismatching file aside to `<stage_id>.corrupt` for forensics.

The area keeps no state beyond its directory, so it may be used from several threads at once;
writing one id from two threads at once with different rows leaves whichever renamed last.
It never reads the clock: `collect` is told the time. Disk failures raise `StagingError`
(`StagingFull` for ENOSPC/EDQUOT) and leave no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

__all__ = [
    "STAGE_BATCH_ROWS",
    "StagedFile",
    "StagingArea",
    "StagingError",
    "StagingFull",
]

STAGE_BATCH_ROWS = 65_536
"""Most rows in one record batch of a staged file (part of the canonical form)."""
WRITE_CHUNK_BYTES = 1 << 20
"""Small IPC pieces (headers, padding) are gathered into writes of about this size."""
STAGE_ID_CHARS_MAX = 128
STAGED_SUFFIX = ".arrow"
CORRUPT_SUFFIX = ".corrupt"
TEMPORARY_SUFFIX = ".tmp"

_STAGE_ID = re.compile(f"[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{STAGE_ID_CHARS_MAX - 1}}}")
_WRITE_OPTIONS = ipc.IpcWriteOptions(compression=None)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StagingError(Exception):
    """A file operation of the staging area failed (the disk's fault, not the caller's)."""

    def __init__(self, operation: str, path: Path, error: OSError) -> None:
        self.operation = operation
        self.path = path
        self.errno = error.errno
        super().__init__(
            f"staging: {operation} of {path} failed: {error.strerror or error} "
            f"(errno {error.errno})"
        )


class StagingFull(StagingError):
    """ENOSPC or EDQUOT: no room to stage the rows."""


@dataclass(frozen=True, slots=True)
class StagedFile:
    """What a commit record needs to find and verify staged rows."""

    stage_id: str
    rows: int
    crc: int
    """zlib.crc32 of the whole file."""
    bytes: int
    """Size of the file."""


class StagingArea:
    """Durable staged Arrow tables in one directory (created if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        with _os_errors("creating directory", self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def write(self, stage_id: str, data: pa.Table) -> StagedFile:
        """Stage `data` durably under `stage_id`; returns once file and name are on disk.
        Rewriting an id with identical bytes leaves the file as it is; with other bytes it
        replaces the file atomically."""
        _check_stage_id(stage_id)
        assert isinstance(data, pa.Table), f"rows must be a pyarrow.Table, got {type(data)}"
        temporary = self.directory / (
            f"{stage_id}.{os.getpid()}-{threading.get_ident()}{TEMPORARY_SUFFIX}"
        )
        target = self._path(stage_id, STAGED_SUFFIX)
        try:
            staged = _write_stream(temporary, stage_id, data)
            if _holds(target, staged):
                _remove_file(temporary)
            else:
                with _os_errors("renaming into place", target):
                    os.replace(temporary, target)
            # Also on a match: the file may be from a writer that died before this fsync.
            _fsync_directory(self.directory)
        except BaseException:
            _remove_quietly(temporary)
            raise
        return staged

    def open(self, stage_id: str, crc: int, rows: int) -> pa.Table | None:
        """The staged table, memory-mapped (zero-copy), if the file has exactly `crc` and
        `rows`. None if it is missing or differs; a differing file is renamed to
        `<stage_id>.corrupt`."""
        _check_stage_id(stage_id)
        path = self._path(stage_id, STAGED_SUFFIX)
        try:
            source = pa.memory_map(str(path))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _staging_error("memory-mapping", path, error) from error
        try:
            table = _verified(source.read_buffer(), crc, rows)
        finally:
            source.close()  # the table's buffers keep the mapping itself alive
        if table is None:
            self._set_aside(stage_id)
        return table

    def has(self, stage_id: str) -> bool:
        _check_stage_id(stage_id)
        path = self._path(stage_id, STAGED_SUFFIX)
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise _staging_error("checking", path, error) from error
        return True

    def remove(self, stage_id: str) -> None:
        """Delete the staged file if present. Not fsynced: a removal lost in a crash leaves a
        file that `collect` deletes later."""
        _check_stage_id(stage_id)
        _remove_file(self._path(stage_id, STAGED_SUFFIX))

    def collect(self, older_than_ns: int, now_ns: int) -> int:
        """Delete staged, temporary and corrupt files last modified more than `older_than_ns`
        before `now_ns` (wall-clock nanoseconds, as `st_mtime_ns`); returns how many."""
        assert older_than_ns >= 0, older_than_ns
        with _os_errors("listing", self.directory):
            names = sorted(os.listdir(self.directory))
        suffixes = (STAGED_SUFFIX, TEMPORARY_SUFFIX, CORRUPT_SUFFIX)
        removed = 0
        for name in names:
            if name.endswith(suffixes) and self._collect_one(name, older_than_ns, now_ns):
                removed += 1
        return removed

    def _collect_one(self, name: str, older_than_ns: int, now_ns: int) -> bool:
        path = self.directory / name
        try:
            modified_ns = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return False  # removed by another thread meanwhile
        except OSError as error:
            raise _staging_error("checking", path, error) from error
        if now_ns - modified_ns <= older_than_ns:
            return False
        return _remove_file(path)

    def _set_aside(self, stage_id: str) -> None:
        path = self._path(stage_id, STAGED_SUFFIX)
        try:
            os.replace(path, self._path(stage_id, CORRUPT_SUFFIX))
        except FileNotFoundError:
            pass  # removed meanwhile: nothing left to keep
        except OSError as error:
            raise _staging_error("setting aside", path, error) from error

    def _path(self, stage_id: str, suffix: str) -> Path:
        return self.directory / (stage_id + suffix)


class _ChecksummedFile:
    """The write-only file pyarrow's IPC writer writes to: gathers small pieces into larger
    writes and keeps the crc and size of everything written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = bytearray()
        self.crc = 0
        self.size = 0
        self.closed = False

    def write(self, data: bytes | pa.Buffer) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        if len(self._pending) + len(view) < WRITE_CHUNK_BYTES:
            self._pending += view
            return len(view)
        self.flush()
        _write_all(self._fd, view)
        return len(view)

    def flush(self) -> None:
        # Swap before writing: if the write fails, a view of the old buffer may outlive it.
        pending, self._pending = self._pending, bytearray()
        _write_all(self._fd, memoryview(pending))

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


def _write_stream(path: Path, stage_id: str, data: pa.Table) -> StagedFile:
    """Write `data` in canonical form to a fresh file at `path` and fsync it."""
    table = data.combine_chunks()
    with _os_errors("writing", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            sink = _ChecksummedFile(fd)
            with ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
                for batch in table.to_batches(max_chunksize=STAGE_BATCH_ROWS):
                    writer.write_batch(batch)
            sink.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
    assert sink.size > 0, "an IPC stream holds at least its schema"
    return StagedFile(stage_id, data.num_rows, sink.crc, sink.size)


def _write_all(fd: int, view: memoryview) -> None:
    written = 0
    while written < len(view):
        count = os.write(fd, view[written:])
        assert count > 0, "write wrote nothing without raising"
        written += count


def _holds(path: Path, staged: StagedFile) -> bool:
    """Whether `path` already holds exactly the bytes described by `staged`."""
    try:
        source = pa.memory_map(str(path))
    except FileNotFoundError:
        return False
    except OSError as error:
        raise _staging_error("memory-mapping", path, error) from error
    try:
        return source.size() == staged.bytes and zlib.crc32(source.read_buffer()) == staged.crc
    finally:
        source.close()


def _verified(buffer: pa.Buffer, crc: int, rows: int) -> pa.Table | None:
    if zlib.crc32(buffer) != crc:
        return None
    try:
        table = ipc.open_stream(buffer).read_all()
    except pa.ArrowInvalid:
        return None  # a crc collision on damaged bytes, or a writer that was not ours
    if table.num_rows != rows:
        return None
    return table


def _fsync_directory(path: Path) -> None:
    with _os_errors("fsync of directory", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_file(path: Path) -> bool:
    """Unlink `path`; False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise _staging_error("removing", path, error) from error
    return True


def _remove_quietly(path: Path) -> None:
    """Best-effort cleanup on a path that is already failing: the first error is the one
    worth reporting, and `collect` removes what is left."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _check_stage_id(stage_id: str) -> None:
    if not isinstance(stage_id, str) or _STAGE_ID.fullmatch(stage_id) is None:
        raise ValueError(
            f"stage id must be 1..{STAGE_ID_CHARS_MAX} of [A-Za-z0-9_.-], not starting "
            f"with '.'; got {stage_id!r}"
        )


def _staging_error(operation: str, path: Path, error: OSError) -> StagingError:
    kind = StagingFull if error.errno in _FULL_ERRNOS else StagingError
    return kind(operation, path, error)


@contextmanager
def _os_errors(operation: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise _staging_error(operation, path, error) from error
