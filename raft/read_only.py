"""ReadIndex bookkeeping on the leader (Raft thesis §6.4).

A read request is stamped with the leader's commit index, then confirmed by a round of
heartbeats: once a quorum of voters answers a heartbeat carrying the round's context, no
other leader can have committed anything newer, so the stamped index is safe to read at.
Rounds are confirmed in order: a quorum for round k confirms every earlier round too.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PendingRead:
    index: int
    requester: int
    request_id: bytes
    acks: set[int] = field(default_factory=set)


class ReadOnlyQueue:
    def __init__(self, pending_max: int) -> None:
        self.pending_max = pending_max
        self._next_round = 1
        self._pending: dict[bytes, PendingRead] = {}  # insertion-ordered: oldest first

    def full(self) -> bool:
        return len(self._pending) >= self.pending_max

    def add(self, index: int, requester: int, request_id: bytes) -> bytes:
        """Start a round; returns the heartbeat context that confirms it."""
        assert not self.full()
        context = self._next_round.to_bytes(8, "big")
        self._next_round += 1
        self._pending[context] = PendingRead(index, requester, request_id)
        return context

    def last_context(self) -> bytes:
        if not self._pending:
            return b""
        return next(reversed(self._pending))

    def ack(self, context: bytes, node: int) -> set[int] | None:
        """Record `node`'s answer to round `context`; the round's acks, or None if unknown."""
        pending = self._pending.get(context)
        if pending is None:
            return None
        pending.acks.add(node)
        return pending.acks

    def release_through(self, context: bytes) -> list[PendingRead]:
        """Pop every round up to and including `context`, oldest first."""
        if context not in self._pending:
            return []
        released: list[PendingRead] = []
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            del self._pending[key]
            released.append(pending)
            if key == context:
                break
        return released

    def clear(self) -> None:
        self._pending.clear()
