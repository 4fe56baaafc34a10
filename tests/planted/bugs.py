"""Deliberately broken variants of the Raft core, for proving the seed bank has teeth.

Each is a test-only subclass overriding one rule; the real code path has no flag for any
of them. `tests/planted/test_planted.py` shows the simulator's seed bank catches each.
"""

from __future__ import annotations

from raft import RaftNode, ReadState, Role
from raft.types import Message, MessageType


class CommitsOldTermEntries(RaftNode):
    """Breaks §5.4.2: commits whatever a quorum holds, whatever its term (Figure 8)."""

    def _maybe_commit(self) -> bool:
        matches = sorted(
            (self.progress[v].match if v in self.progress else 0 for v in self.conf.voters),
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        if candidate <= self.log.committed:
            return False
        self._commit_to(candidate)
        self._release_waiting_reads()
        return True


class VotesForStaleLogs(RaftNode):
    """Breaks §5.4.1: grants votes without checking the candidate's log is up to date."""

    def _handle_vote_request(self, m: Message) -> None:
        response = (
            MessageType.VOTE_RESPONSE if m.type == MessageType.VOTE
            else MessageType.PRE_VOTE_RESPONSE
        )
        can_vote = (
            self.vote == m.source
            or (self.vote == 0 and self.leader == 0)
            or (m.type == MessageType.PRE_VOTE and m.term > self.term)
        )
        if can_vote:
            self._send(response, m.source, term=m.term)
            if m.type == MessageType.VOTE:
                self._election_elapsed = 0
                self.vote = m.source
        else:
            self._send(response, m.source, reject=True)


class VotesTwicePerTerm(RaftNode):
    """Breaks election safety: grants every up-to-date candidate, even after voting."""

    def _handle_vote_request(self, m: Message) -> None:
        response = (
            MessageType.VOTE_RESPONSE if m.type == MessageType.VOTE
            else MessageType.PRE_VOTE_RESPONSE
        )
        if self.role != Role.LEADER and self.log.is_up_to_date(m.index, m.log_term):
            self._send(response, m.source, term=m.term)
            if m.type == MessageType.VOTE:
                self._election_elapsed = 0
                self.vote = m.source
        else:
            self._send(response, m.source, reject=True)


class ReadsWithoutQuorum(RaftNode):
    """Breaks ReadIndex: the leader answers reads at once, without confirming it still
    leads, so a deposed leader behind a partition serves stale reads."""

    def _leader_read_index(self, requester: int, request_id: bytes) -> None:
        self._answer_read(requester, request_id, self.log.committed)


class IgnoresLogMismatch(RaftNode):
    """Breaks the AppendEntries consistency check: accepts entries whatever precedes them."""

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(MessageType.APPEND_RESPONSE, m.source, index=self.log.committed)
            return
        if m.index > self.log.last_index():
            super()._handle_append(m)  # cannot fake a gap; behave
            return
        entries = [e for e in m.entries if e.index > self.log.committed]
        if entries:
            self.log.append(entries)
        last_new = m.index + len(m.entries)
        self._commit_to(min(m.commit, last_new, self.log.last_index()))
        self._send(MessageType.APPEND_RESPONSE, m.source, index=last_new)


class ForgetsVoteOnRestart(RaftNode):
    """Breaks durability of votes: the vote is never part of the persisted hard state."""

    def hard_state(self):  # type: ignore[no-untyped-def]
        hard_state = super().hard_state()
        return type(hard_state)(term=hard_state.term, vote=0, commit=hard_state.commit)


PLANTED_NODE_BUGS: dict[str, type[RaftNode]] = {
    "commits_old_term_entries": CommitsOldTermEntries,
    "votes_for_stale_logs": VotesForStaleLogs,
    "votes_twice_per_term": VotesTwicePerTerm,
    "reads_without_quorum": ReadsWithoutQuorum,
    "ignores_log_mismatch": IgnoresLogMismatch,
    "forgets_vote_on_restart": ForgetsVoteOnRestart,
}

__all__ = ["PLANTED_NODE_BUGS", "ReadState"]
