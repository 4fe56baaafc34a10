"""Durable state. Today: the Raft WAL (`Wal`, a durable `raft.LogStorage`) and the file layer
it goes through (`Files`; `FaultyFiles` injects disk faults for tests and chaos). Catalog,
partitions, staging and snapshots of DuckDB data arrive with the cluster runtime and
partitioned-tables issues."""

from storage._errors import CorruptLog, DiskError, DiskFull, WalError, WalFailed, WalLocked
from storage._files import FaultyFiles, Files, OsFiles
from storage.wal import Recovery, Wal, WalConfig, WalStats

__all__ = [
    "CorruptLog",
    "DiskError",
    "DiskFull",
    "FaultyFiles",
    "Files",
    "OsFiles",
    "Recovery",
    "Wal",
    "WalConfig",
    "WalError",
    "WalFailed",
    "WalLocked",
    "WalStats",
]
