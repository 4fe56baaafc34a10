"""The values that flow in and out of the Raft state machine.

Everything here is an immutable msgspec Struct: cheap to build, safe to share between the
state machine, the caller's loop and the simulator, and encodable by the ipc codec without
a second definition. Nothing here does IO.

Key rule for callers (see `Ready`): persist `hard_state`, `snapshot` and `entries` to stable
storage BEFORE sending `messages`; apply `committed_entries` after that; then `advance`.
"""

from __future__ import annotations

import enum

import msgspec

NO_NODE = 0
"""Node ids are positive integers; 0 means 'nobody' (no vote, no known leader)."""


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class EntryKind(enum.IntEnum):
    NORMAL = 0
    """Application data. An empty NORMAL entry is the no-op a new leader appends."""
    CONF_CHANGE = 1
    """`data` is an encoded `ConfChange`; takes effect when committed."""


class Entry(msgspec.Struct, frozen=True, array_like=True):
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, frozen=True, array_like=True):
    """What must survive a crash: current term, the vote cast in it, and the commit index."""

    term: int = 0
    vote: int = NO_NODE
    commit: int = 0


class ConfState(msgspec.Struct, frozen=True, array_like=True):
    """Cluster membership: voters count in quorums, learners only receive the log."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    def members(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.voters) | set(self.learners)))


class ConfChangeKind(enum.IntEnum):
    ADD_VOTER = 0
    """Add a new voter, or promote a learner to voter."""
    ADD_LEARNER = 1
    """Add a new learner, or demote a voter to learner."""
    REMOVE = 2


class ConfChange(msgspec.Struct, frozen=True, array_like=True):
    kind: ConfChangeKind
    node: int
    context: bytes = b""

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        return msgspec.msgpack.decode(data, type=ConfChange)


class SnapshotMeta(msgspec.Struct, frozen=True, array_like=True):
    index: int = 0
    term: int = 0
    conf: ConfState = ConfState()


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """A state machine image as of `meta.index`; `data` is opaque to Raft."""

    meta: SnapshotMeta = SnapshotMeta()
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.meta.index == 0


class MessageType(enum.IntEnum):
    APPEND = 0
    APPEND_RESPONSE = 1
    VOTE = 2
    VOTE_RESPONSE = 3
    PRE_VOTE = 4
    PRE_VOTE_RESPONSE = 5
    HEARTBEAT = 6
    HEARTBEAT_RESPONSE = 7
    SNAPSHOT = 8
    """One chunk of an InstallSnapshot transfer."""
    SNAPSHOT_RESPONSE = 9
    TIMEOUT_NOW = 10
    """Leadership transfer: the target campaigns at once."""
    READ_INDEX = 11
    """A follower forwards a ReadIndex request to the leader."""
    READ_INDEX_RESPONSE = 12


class Message(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """One Raft message. Field meaning depends on `type`:

    APPEND: (index, log_term) = the entry before `entries`; commit <= index + len(entries).
    APPEND_RESPONSE: index = last matching index, or on reject the probed index, with
        (reject_hint, hint_term) = where the follower's log may match (fast backtracking).
    VOTE / PRE_VOTE: (index, log_term) = candidate's last entry; context = b"transfer" when
        the election follows a leadership transfer.
    HEARTBEAT: commit = min(leader commit, follower match); context = ReadIndex round id.
    SNAPSHOT: snapshot_meta, chunk_offset, chunk (bytes), chunk_done, snapshot_size.
    SNAPSHOT_RESPONSE: snapshot_meta.index, chunk_offset = next byte wanted; reject resets.
    READ_INDEX / READ_INDEX_RESPONSE: context = request id; index = read index.
    """

    type: MessageType
    source: int
    target: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    hint_term: int = 0
    context: bytes = b""
    snapshot_meta: SnapshotMeta | None = None
    snapshot_size: int = 0
    chunk_offset: int = 0
    chunk: bytes = b""
    chunk_done: bool = False


class ReadState(msgspec.Struct, frozen=True):
    """A ReadIndex result: serve `request_id` once the state machine has applied `index`."""

    index: int
    request_id: bytes


class SoftState(msgspec.Struct, frozen=True):
    """Volatile state worth reporting; not persisted."""

    leader: int
    role: Role


class Ready(msgspec.Struct, frozen=True):
    """Work the caller must do, in this order, then hand back to `RaftNode.advance`.

    1. Persist `snapshot` (if any), then `entries` (replacing any conflicting suffix), then
       `hard_state` (if any), and fsync — all BEFORE any of `messages` leaves the node.
    2. Send `messages`.
    3. Apply `committed_entries` in order to the state machine (a non-None `snapshot` is
       installed into the state machine first); serve `read_states` once applied.
    4. Call `advance(ready)`.
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]

    @property
    def must_sync(self) -> bool:
        return bool(self.entries) or self.hard_state is not None or self.snapshot is not None


# ---- Typed refusals (expected operating conditions, not programmer errors) -------------------


class RaftError(Exception):
    """Base of every error the Raft state machine reports to its caller."""


class ProposalRefused(RaftError):
    """A proposal was not appended; nothing was written. Retry elsewhere or later."""


class NotLeader(ProposalRefused):
    def __init__(self, leader_hint: int) -> None:
        self.leader_hint = leader_hint
        hint = f"node {leader_hint}" if leader_hint != NO_NODE else "unknown"
        super().__init__(f"not the leader; leader is {hint}")


class LeadershipTransferInProgress(ProposalRefused):
    def __init__(self, target: int) -> None:
        self.target = target
        super().__init__(f"leadership is being transferred to node {target}")


class ConfChangeInProgress(ProposalRefused):
    def __init__(self, pending_index: int) -> None:
        self.pending_index = pending_index
        super().__init__(
            f"a membership change at index {pending_index} is not yet committed; "
            "only one change at a time"
        )


class InvalidConfChange(ProposalRefused):
    pass


class ProposalTooLarge(ProposalRefused):
    pass


class StorageError(RaftError):
    pass


class CompactedError(StorageError):
    """The requested index is at or below the snapshot: its entry is gone."""


class UnavailableError(StorageError):
    """The requested index is beyond the last index."""
