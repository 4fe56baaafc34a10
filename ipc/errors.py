"""Typed transport errors, split by whose fault they are (h11's habit).

`RemoteProtocolError`s describe bytes a peer sent us: the receiver counts them under
their `reason`, logs them, drops the frame (or the connection, when the byte stream can
no longer be trusted) and keeps serving. `LocalError`s describe what this process asked
for and could not have: a full outbound queue, an unknown peer, a host limit.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error the ipc package raises on purpose."""

    reason = "transport_error"


# ---- the peer's fault: bad frames ----


class RemoteProtocolError(TransportError):
    """A peer sent something we refuse. `reason` is the counter name."""

    reason = "remote_protocol_error"


class TruncatedFrame(RemoteProtocolError):
    reason = "truncated_frame"


class FrameTooLarge(RemoteProtocolError):
    reason = "frame_too_large"


class CorruptFrame(RemoteProtocolError):
    """Bad magic, a checksum mismatch, or a body that is not what its header says."""

    reason = "corrupt_frame"


class NewerVersion(RemoteProtocolError):
    reason = "newer_version"


class WrongCluster(RemoteProtocolError):
    reason = "wrong_cluster"


class MisroutedFrame(RemoteProtocolError):
    """A frame addressed to another node arrived here."""

    reason = "misrouted_frame"


class UnknownTag(RemoteProtocolError):
    reason = "unknown_tag"


class MalformedBody(RemoteProtocolError):
    """The tag is known but the body does not decode as that message type."""

    reason = "malformed_body"


class AuthenticationFailed(RemoteProtocolError):
    """A TCP peer did not prove it holds the cluster secret."""

    reason = "authentication_failed"


class CorruptBulk(RemoteProtocolError):
    """Bulk bytes that do not read back as an Arrow IPC stream."""

    reason = "corrupt_bulk"


# ---- our side: what we asked for and could not have ----


class LocalError(TransportError):
    reason = "local_error"


class Backpressure(LocalError):
    """The bounded outbound queue to `target` is full; the caller decides to drop or wait."""

    reason = "backpressure"

    def __init__(self, target: int, queued: int) -> None:
        super().__init__(f"outbound queue to node {target} is full ({queued} frames)")
        self.target = target
        self.queued = queued


class UnknownPeer(LocalError):
    reason = "unknown_peer"

    def __init__(self, target: int) -> None:
        super().__init__(f"node {target} is not a known peer")
        self.target = target


class MessageTooLarge(LocalError):
    """An outgoing control message larger than the codec's frame maximum."""

    reason = "message_too_large"


class HostLimitError(LocalError):
    """The host refused a resource (queue count or bytes, shm space). The message says
    which limit and how to raise it."""

    reason = "host_limit"


class TransportClosed(LocalError):
    reason = "transport_closed"
