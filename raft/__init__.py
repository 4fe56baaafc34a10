"""Pure Raft consensus: a state machine that takes messages and ticks and returns a Ready.

No IO, no clocks, no global randomness: the caller injects ticks and a seeded Random and
does all persistence and sending (see `RaftNode` and `Ready`).
"""

from raft.config import ConfigError, RaftConfig
from raft.membership import apply_conf_change, validate_conf_change
from raft.node import TRANSFER_CONTEXT, RaftNode
from raft.progress import ProgressState
from raft.storage import BOOTSTRAP_INDEX, LogStorage, MemoryStorage, bootstrap_snapshot
from raft.types import (
    NO_NODE,
    CompactedError,
    ConfChange,
    ConfChangeInProgress,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    InvalidConfChange,
    LeadershipTransferInProgress,
    Message,
    MessageType,
    NotLeader,
    ProposalRefused,
    ProposalTooLarge,
    RaftError,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StorageError,
    UnavailableError,
)

__all__ = [
    "BOOTSTRAP_INDEX", "bootstrap_snapshot", "NO_NODE", "TRANSFER_CONTEXT", "CompactedError", "ConfChange", "ConfChangeInProgress",
    "ConfChangeKind", "ConfState", "ConfigError", "Entry", "EntryKind", "HardState",
    "InvalidConfChange", "LeadershipTransferInProgress", "LogStorage", "MemoryStorage",
    "Message", "MessageType", "NotLeader", "ProgressState", "ProposalRefused",
    "ProposalTooLarge", "RaftConfig", "RaftError", "RaftNode", "ReadState", "Ready", "Role",
    "Snapshot", "SnapshotMeta", "SoftState", "StorageError", "UnavailableError",
    "apply_conf_change", "validate_conf_change",
]
