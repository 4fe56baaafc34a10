"""The Raft consensus state machine: messages and ticks in, a `Ready` out. No IO.

The caller's loop (cluster/ in production, chaos/ in simulation) drives it:

    node.step(message) / node.tick() / node.propose(data) / node.read_index(id) ...
    if node.has_ready():
        ready = node.ready()
        persist ready.snapshot, ready.entries, ready.hard_state; fsync   # BEFORE sending
        send ready.messages
        apply ready.committed_entries; serve ready.read_states
        node.advance(ready)

It follows the Raft paper and thesis (Ongaro) and etcd's raft: randomized election
timeouts, pre-vote, check-quorum with step-down, fast log backtracking, pipelined appends
with an in-flight limit, commit only by counting entries of the current term (§5.4.2),
learners, one-at-a-time membership change, leadership transfer, ReadIndex and chunked
InstallSnapshot. Roles are swapped step functions, not subclasses.

Safety invariants (checked by chaos/ after every simulated step): at most one leader per
term; logs that share an (index, term) share the whole prefix; a leader holds every
committed entry; every node applies the same entry at each index; commit never regresses.

Bad input from the network (unknown sender, impossible fields) is dropped and counted in
`dropped`, never applied and never raised.
"""

from __future__ import annotations

from collections.abc import Callable

from raft.config import RaftConfig
from raft.log import RaftLog
from raft.membership import apply_conf_change, is_conf_change_data, validate_conf_change
from raft.progress import Progress, ProgressState
from raft.read_only import ReadOnlyQueue
from raft.storage import entry_size
from raft.types import (
    NO_NODE,
    CompactedError,
    ConfChange,
    ConfChangeInProgress,
    Entry,
    EntryKind,
    HardState,
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
    SoftState,
)

TRANSFER_CONTEXT = b"transfer"
"""Marks the votes of an election that follows a leadership transfer."""

_M = MessageType


class _PartialSnapshot:
    """Chunks of an incoming snapshot received so far (follower side).

    Keyed by the sending leader's term and the image size as well as the snapshot's
    (index, term): two leaders' images of one index need not be byte-identical, so chunks
    from different transfers must never be joined (and a size mismatch must restart the
    transfer rather than be rejected forever)."""

    def __init__(self, index: int, term: int, leader_term: int, size: int) -> None:
        self.key = (index, term, leader_term, size)
        self.size = size
        self.buffer = bytearray()


class RaftNode:
    def __init__(self, config: RaftConfig) -> None:
        config.validate()
        self.config = config
        self.id = config.node_id
        self._rng = config.rng
        self.log = RaftLog(config.storage)
        hard_state, conf_state = config.storage.initial_state()
        assert hard_state.commit <= self.log.last_index(), (
            f"hard state commit {hard_state.commit} beyond last index {self.log.last_index()}"
        )
        self.log.committed = max(self.log.committed, hard_state.commit)
        assert config.applied <= self.log.committed, (config.applied, self.log.committed)
        self.log.applied = max(self.log.applied, config.applied)

        self.term = hard_state.term
        self.vote = hard_state.vote
        self.leader = NO_NODE
        self.role = Role.FOLLOWER
        self.dropped: dict[str, int] = {}

        self.conf = conf_state
        self.progress: dict[int, Progress] = {}
        self._peers: tuple[int, ...] = ()
        self._members: frozenset[int] = frozenset()
        self._votes: dict[int, bool] = {}
        self._read_only = ReadOnlyQueue(config.read_index_pending_max)
        self._waiting_reads: list[tuple[int, bytes]] = []
        self._partial_snapshot: _PartialSnapshot | None = None

        self._messages: list[Message] = []
        self._read_states: list[ReadState] = []
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_ticks
        self._transfer_target = NO_NODE
        self._handing_off = False
        self._pending_conf_index = 0
        self._uncommitted_bytes = 0
        self._broadcast_pending = False
        self._step: Callable[[Message], None] = self._step_follower

        # Membership is a function of the committed log: replay committed changes.
        snapshot_index = self.log.snapshot().meta.index
        self._apply_committed_conf_changes(snapshot_index, self.log.committed)
        self._rebuild_progress()
        self._become_follower(self.term, NO_NODE)
        self._prev_hard_state = self.hard_state()
        self._prev_soft_state = self.soft_state()

    # ------------------------------------------------------------------ introspection

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    @property
    def last_index(self) -> int:
        return self.log.last_index()

    @property
    def is_learner(self) -> bool:
        return self.id in self.conf.learners

    @property
    def transfer_target(self) -> int:
        return self._transfer_target

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(leader=self.leader, role=self.role)

    def _promotable(self) -> bool:
        return self.id in self.conf.voters and not self.log.has_pending_snapshot()

    def _quorum(self) -> int:
        return len(self.conf.voters) // 2 + 1

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (pre-vote first when enabled)."""
        if self.role != Role.LEADER:
            self._hup(transfer=False)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the log; returns its (index, term). Raises ProposalRefused."""
        return self._propose_entry(EntryKind.NORMAL, data)

    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Propose one membership change; raises ProposalRefused (incl. InvalidConfChange)."""
        self._check_can_propose()
        if self._pending_conf_index > self.log.committed:
            raise ConfChangeInProgress(self._pending_conf_index)
        validate_conf_change(self.conf, change)
        index, term = self._propose_entry(EntryKind.CONF_CHANGE, change.encode())
        self._pending_conf_index = index
        return index, term

    def read_index(self, request_id: bytes) -> None:
        """Ask for a linearizable read point; answered later by a ReadState in a Ready."""
        if self.role == Role.LEADER:
            self._leader_read_index(self.id, request_id)
        elif self.leader != NO_NODE:
            self._send(_M.READ_INDEX, self.leader, context=request_id)
        else:
            raise NotLeader(NO_NODE)

    def transfer_leadership(self, target: int) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if target == self.id:
            return
        if target not in self.conf.voters:
            raise ProposalRefused(f"node {target} is not a voter; cannot lead")
        if self._transfer_target == target:
            return
        self._transfer_target = target
        self._election_elapsed = 0  # the transfer must finish within one election timeout
        if self.progress[target].match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target, send_if_empty=True)

    def step(self, message: Message) -> None:
        reason = self._invalid_reason(message)
        if reason is not None:
            self._drop(reason)
            return
        if not self._step_term(message):
            return
        if message.type in (_M.VOTE, _M.PRE_VOTE):
            self._handle_vote_request(message)
            return
        self._step(message)

    # ------------------------------------------------------------------ Ready / advance

    def has_ready(self) -> bool:
        return bool(
            self._broadcast_pending
            or self._messages
            or self._read_states
            or self.log.unstable.entries
            or self.log.has_pending_snapshot()
            or self.log.has_next_committed_entries()
            or self.hard_state() != self._prev_hard_state
            or self.soft_state() != self._prev_soft_state
        )

    def ready(self) -> Ready:
        """Collect the work to do. Messages and read states move into the Ready."""
        if self._broadcast_pending:
            self._broadcast_pending = False
            if self.role == Role.LEADER:
                self._broadcast_append()
        hard_state = self.hard_state()
        soft_state = self.soft_state()
        ready = Ready(
            soft_state=soft_state if soft_state != self._prev_soft_state else None,
            hard_state=hard_state if hard_state != self._prev_hard_state else None,
            entries=tuple(self.log.unstable_entries()),
            snapshot=self.log.unstable.snapshot,
            messages=tuple(self._messages),
            committed_entries=tuple(
                self.log.next_committed_entries(self.config.committed_entries_bytes_max)
            ),
            read_states=tuple(self._read_states),
        )
        self._messages = []
        self._read_states = []
        return ready

    def advance(self, ready: Ready) -> None:
        """The caller has persisted, sent and applied everything in `ready`."""
        if ready.soft_state is not None:
            self._prev_soft_state = ready.soft_state
        if ready.hard_state is not None:
            self._prev_hard_state = ready.hard_state
        if ready.snapshot is not None:
            self.log.stable_snapshot_to(ready.snapshot.meta.index)
            self.log.applied = max(self.log.applied, ready.snapshot.meta.index)
        if ready.entries:
            last = ready.entries[-1]
            self.log.stable_to(last.index, last.term)
        if ready.committed_entries:
            self.log.applied_to(ready.committed_entries[-1].index)

    # ------------------------------------------------------------------ validation

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _invalid_reason(self, m: Message) -> str | None:
        """Why `m` cannot be a message a correct peer sends us, or None if it can."""
        if m.target != self.id:
            return "wrong_target"
        if m.source <= 0 or m.source == self.id:
            return "bad_source"
        if self.id in self._members and m.source not in self._members:
            return "unknown_node"
        if min(m.term, m.log_term, m.index, m.commit, m.reject_hint, m.hint_term) < 0:
            return "negative_field"
        if m.chunk_offset < 0 or m.snapshot_size < 0:
            return "negative_field"
        if m.type in (_M.APPEND, _M.VOTE, _M.PRE_VOTE) and m.log_term > m.term:
            return "log_term_beyond_term"
        if m.type == _M.APPEND:
            return self._invalid_append_reason(m)
        if m.type == _M.SNAPSHOT:
            meta = m.snapshot_meta
            if meta is None or meta.index <= 0 or meta.term > m.term:
                return "bad_snapshot_meta"
            if m.chunk_offset + len(m.chunk) > m.snapshot_size:
                return "chunk_beyond_snapshot"
            if m.snapshot_size > self.config.snapshot_bytes_max:
                return "snapshot_too_large"
        return None

    def _invalid_append_reason(self, m: Message) -> str | None:
        previous_term = m.log_term
        for offset, entry in enumerate(m.entries):
            if entry.index != m.index + 1 + offset:
                return "entries_not_contiguous"
            if entry.term < previous_term or entry.term > m.term:
                return "entry_term_out_of_order"
            if entry.kind == EntryKind.CONF_CHANGE and not is_conf_change_data(entry.data):
                return "bad_conf_change"
            previous_term = entry.term
        if m.commit > m.index + len(m.entries):
            return "commit_beyond_sender_log"
        return None

    # ------------------------------------------------------------------ terms and votes

    def _step_term(self, m: Message) -> bool:
        """Apply the term rules (Figure 2: 'if RPC term > currentTerm …'); False = stop."""
        if m.term > self.term:
            if m.type in (_M.VOTE, _M.PRE_VOTE):
                forced = m.context == TRANSFER_CONTEXT
                in_lease = (
                    self.config.check_quorum
                    and self.leader != NO_NODE
                    and self._election_elapsed < self.config.election_ticks
                )
                if in_lease and not forced:
                    return False  # we heard from a live leader recently: not disruptive
            if m.type == _M.PRE_VOTE:
                return True  # a pre-vote never changes our term
            if m.type == _M.PRE_VOTE_RESPONSE and not m.reject:
                return True  # our term moves when the pre-vote succeeds
            if m.type in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT):
                self._become_follower(m.term, m.source)
            else:
                self._become_follower(m.term, NO_NODE)
            return True
        if m.term < self.term:
            if m.type in (_M.APPEND, _M.HEARTBEAT) and (
                self.config.check_quorum or self.config.pre_vote
            ):
                # A stale leader (perhaps partitioned) must learn the new term to step down.
                self._send(_M.APPEND_RESPONSE, m.source)
            elif m.type == _M.PRE_VOTE:
                self._send(_M.PRE_VOTE_RESPONSE, m.source, reject=True)
            return False
        return True

    def _handle_vote_request(self, m: Message) -> None:
        response = _M.VOTE_RESPONSE if m.type == _M.VOTE else _M.PRE_VOTE_RESPONSE
        can_vote = (
            self.vote == m.source
            or (self.vote == NO_NODE and self.leader == NO_NODE)
            or (m.type == _M.PRE_VOTE and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # A pre-vote grant is answered in the candidate's future term.
            self._send(response, m.source, term=m.term)
            if m.type == _M.VOTE:
                self._election_elapsed = 0
                self.vote = m.source
        else:
            self._send(response, m.source, reject=True)

    # ------------------------------------------------------------------ role changes

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NO_NODE
            # Messages queued in an older term may describe entries the coming Ready will
            # overwrite (an ack for what a newer leader replaced): they must not leave.
            # Losing them is always safe; sending them would break "persist, then send".
            self._messages = [m for m in self._messages if m.term >= term]
        self.leader = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = self.config.election_ticks + self._rng.randrange(
            self.config.election_ticks
        )
        self._transfer_target = NO_NODE
        self._handing_off = False
        self._votes = {}
        self._pending_conf_index = 0
        self._uncommitted_bytes = 0
        self._read_only.clear()
        self._waiting_reads = []
        self._rebuild_progress()

    def _become_follower(self, term: int, leader: int) -> None:
        self._reset(term)
        self._step = self._step_follower
        self.leader = leader
        self.role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # A pre-candidate keeps its term and vote: nothing durable changes.
        self._step = self._step_candidate
        self._votes = {}
        self.leader = NO_NODE
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self._step = self._step_candidate
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        assert self.role == Role.CANDIDATE, "only a candidate becomes leader"
        self._reset(self.term)
        self._step = self._step_leader
        self.leader = self.id
        self.role = Role.LEADER
        own = self.progress[self.id]
        own.become_replicate()
        # No membership change until an entry of our own term (this no-op) commits, and
        # with it everything from earlier terms (membership.py; Ongaro, raft-dev 2015).
        self._pending_conf_index = self._append_entries([Entry(term=self.term, index=0)])

    def _hup(self, transfer: bool) -> None:
        if not self._promotable():
            return
        if self.config.pre_vote and not transfer:
            self._campaign(pre_vote=True, transfer=False)
        else:
            self._campaign(pre_vote=False, transfer=transfer)

    def _campaign(self, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            vote_type, term = _M.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = _M.VOTE, self.term
        if self._record_vote(self.id, granted=True) == "won":
            self._on_election_won(pre_vote)
            return
        context = TRANSFER_CONTEXT if transfer else b""
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        for peer in self.conf.voters:
            if peer != self.id:
                self._send(
                    vote_type, peer, term=term, index=last_index, log_term=last_term,
                    context=context,
                )

    def _record_vote(self, voter: int, granted: bool) -> str:
        """Count a (pre-)vote; returns 'won', 'lost' or 'pending'."""
        self._votes.setdefault(voter, granted)
        granted_count = sum(1 for v in self.conf.voters if self._votes.get(v) is True)
        rejected_count = sum(1 for v in self.conf.voters if self._votes.get(v) is False)
        if granted_count >= self._quorum():
            return "won"
        if rejected_count > len(self.conf.voters) - self._quorum():
            return "lost"
        return "pending"

    def _on_election_won(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False, transfer=False)
        else:
            self._become_leader()
            self._broadcast_append()

    # ------------------------------------------------------------------ ticks

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self.term, NO_NODE)
                    return
                for peer, progress in self.progress.items():
                    if peer != self.id:
                        progress.recent_active = False
            if self._handing_off:
                self._hand_off_leadership()  # try again, perhaps with another voter
            else:
                self._transfer_target = NO_NODE  # a transfer not done in time is abandoned
        if self.role != Role.LEADER:
            return
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(self._read_only.last_context())

    def _quorum_active(self) -> bool:
        active = sum(
            1
            for voter in self.conf.voters
            if voter == self.id or (voter in self.progress and self.progress[voter].recent_active)
        )
        return active >= self._quorum()

    # ------------------------------------------------------------------ role step functions

    def _step_follower(self, m: Message) -> None:
        if m.type in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT):
            self._election_elapsed = 0
            self.leader = m.source
            self._handle_leader_message(m)
        elif m.type == _M.TIMEOUT_NOW:
            self._hup(transfer=True)
        elif m.type == _M.READ_INDEX_RESPONSE:
            self._read_states.append(ReadState(index=m.index, request_id=m.context))
        elif m.type == _M.READ_INDEX:
            self._drop("read_index_not_leader")

    def _step_candidate(self, m: Message) -> None:
        if m.type in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT):
            self._become_follower(m.term, m.source)  # a leader of our term exists
            self._handle_leader_message(m)
            return
        expected = _M.PRE_VOTE_RESPONSE if self.role == Role.PRE_CANDIDATE else _M.VOTE_RESPONSE
        if m.type != expected:
            return
        outcome = self._record_vote(m.source, granted=not m.reject)
        if outcome == "won":
            self._on_election_won(pre_vote=self.role == Role.PRE_CANDIDATE)
        elif outcome == "lost":
            self._become_follower(self.term, NO_NODE)

    def _handle_leader_message(self, m: Message) -> None:
        if m.type == _M.APPEND:
            self._handle_append(m)
        elif m.type == _M.HEARTBEAT:
            self._handle_heartbeat(m)
        else:
            self._handle_snapshot_chunk(m)

    def _step_leader(self, m: Message) -> None:
        progress = self.progress.get(m.source)
        if m.type == _M.READ_INDEX:
            self._leader_read_index(m.source, m.context)
            return
        if progress is None:
            self._drop("not_a_member")
            return
        if m.type == _M.APPEND_RESPONSE:
            progress.recent_active = True
            self._handle_append_response(m, progress)
        elif m.type == _M.HEARTBEAT_RESPONSE:
            progress.recent_active = True
            self._handle_heartbeat_response(m, progress)
        elif m.type == _M.SNAPSHOT_RESPONSE:
            progress.recent_active = True
            self._handle_snapshot_response(m, progress)
        elif m.type in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT):
            self._drop("second_leader_in_term")

    # ------------------------------------------------------------------ follower handlers

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(_M.APPEND_RESPONSE, m.source, index=self.log.committed)
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._commit_to(min(m.commit, last_new))
            self._send(_M.APPEND_RESPONSE, m.source, index=last_new)
            return
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            _M.APPEND_RESPONSE, m.source, index=m.index, reject=True,
            reject_hint=hint_index, hint_term=hint_term,
        )

    def _handle_heartbeat(self, m: Message) -> None:
        if m.commit > self.log.last_index():
            self._drop("commit_beyond_log")
            return
        self._commit_to(m.commit)
        self._send(_M.HEARTBEAT_RESPONSE, m.source, context=m.context)

    def _handle_snapshot_chunk(self, m: Message) -> None:
        meta = m.snapshot_meta
        assert meta is not None  # validated in _invalid_reason
        if meta.index <= self.log.committed:
            self._partial_snapshot = None
            self._send(_M.APPEND_RESPONSE, m.source, index=self.log.committed)
            return
        partial = self._partial_snapshot
        if partial is None or partial.key != (meta.index, meta.term, m.term, m.snapshot_size):
            if m.chunk_offset != 0:
                self._send_snapshot_response(m, received=0, reject=True)
                return
            partial = _PartialSnapshot(meta.index, meta.term, m.term, m.snapshot_size)
            self._partial_snapshot = partial
        if m.snapshot_size != partial.size or m.chunk_offset > len(partial.buffer):
            self._send_snapshot_response(m, received=len(partial.buffer), reject=True)
            return
        if m.chunk_offset < len(partial.buffer):  # a duplicate of a chunk we hold
            self._send_snapshot_response(m, received=len(partial.buffer), reject=False)
            return
        partial.buffer.extend(m.chunk)
        if not m.chunk_done:
            self._send_snapshot_response(m, received=len(partial.buffer), reject=False)
            return
        self._partial_snapshot = None
        if len(partial.buffer) != partial.size:
            self._send_snapshot_response(m, received=0, reject=True)
            return
        snapshot = Snapshot(meta=meta, data=bytes(partial.buffer))
        if self._restore(snapshot):
            self._send(_M.APPEND_RESPONSE, m.source, index=self.log.last_index())
        else:
            self._send(_M.APPEND_RESPONSE, m.source, index=self.log.committed)

    def _send_snapshot_response(self, m: Message, received: int, reject: bool) -> None:
        self._send(
            _M.SNAPSHOT_RESPONSE, m.source, snapshot_meta=m.snapshot_meta,
            chunk_offset=received, reject=reject,
        )

    def _restore(self, snapshot: Snapshot) -> bool:
        """Install a leader's snapshot; False if we already have what it covers."""
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # Our log already holds the snapshot's last entry: just learn the commit.
            self._commit_to(meta.index)
            return False
        self.log.restore(snapshot)
        self.conf = meta.conf
        self._rebuild_progress()
        return True

    # ------------------------------------------------------------------ leader handlers

    def _handle_append_response(self, m: Message, progress: Progress) -> None:
        if m.reject:
            next_probe = m.reject_hint
            if m.hint_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.hint_term)
            if progress.maybe_decrease_to(m.index, next_probe):
                if progress.state == ProgressState.REPLICATE:
                    progress.become_probe()
                self._send_append(m.source, send_if_empty=True)
            return
        if m.index > self.log.last_index():
            self._drop("ack_beyond_log")
            return
        was_paused = progress.is_paused()
        if not progress.maybe_update(m.index):
            return
        if progress.state == ProgressState.PROBE:
            progress.become_replicate()
        elif (
            progress.state == ProgressState.SNAPSHOT
            and progress.match >= progress.pending_snapshot_index()
        ):
            progress.become_probe()
            progress.become_replicate()
        elif progress.state == ProgressState.REPLICATE:
            progress.inflights.free_le(m.index)
        if self._maybe_commit():
            # Committing may have applied a membership change that removed the sender, or
            # us: then there is nobody (or no leader) left to send to.
            if self.role != Role.LEADER or m.source not in self.progress:
                return
            self._broadcast_append()
        elif was_paused:
            self._send_append(m.source, send_if_empty=True)
        while self._send_append(m.source, send_if_empty=False):
            pass
        if m.source == self._transfer_target and progress.match == self.log.last_index():
            self._send_timeout_now(m.source)

    def _handle_heartbeat_response(self, m: Message, progress: Progress) -> None:
        progress.probe_sent = False
        if progress.state == ProgressState.REPLICATE and progress.inflights.full():
            progress.inflights.free_first_one()
        if progress.state == ProgressState.SNAPSHOT:
            self._resend_snapshot_if_stalled(m.source, progress)
        elif progress.match < self.log.last_index():
            self._send_append(m.source, send_if_empty=True)
        if m.context:
            self._handle_read_ack(m.source, m.context)

    def _handle_snapshot_response(self, m: Message, progress: Progress) -> None:
        transfer = progress.transfer
        if (
            progress.state != ProgressState.SNAPSHOT
            or transfer is None
            or m.snapshot_meta is None
            or m.snapshot_meta.index != transfer.snapshot.meta.index
        ):
            return  # a stale answer about an earlier transfer
        if m.chunk_offset > transfer.size:
            self._drop("ack_beyond_snapshot")
            return
        if m.reject:
            transfer.rewind(m.chunk_offset)  # the follower holds exactly this many bytes
        else:
            transfer.acked_bytes = max(transfer.acked_bytes, m.chunk_offset)
            transfer.sent_bytes = max(transfer.sent_bytes, transfer.acked_bytes)
        self._send_snapshot_chunks(m.source, progress)

    def _maybe_commit(self) -> bool:
        """Advance commit to the highest index a quorum of voters holds — but only if that
        entry is from our own term (§5.4.2: never commit older entries by counting)."""
        matches = sorted(
            (self.progress[v].match if v in self.progress else 0 for v in self.conf.voters),
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        if candidate <= self.log.committed or self.log.term_or_zero(candidate) != self.term:
            return False
        was_committed_in_term = self._committed_in_current_term()
        self._commit_to(candidate)
        if not was_committed_in_term:
            self._release_waiting_reads()
        return True

    def _committed_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    # ------------------------------------------------------------------ commit

    def _commit_to(self, index: int) -> None:
        previous = self.log.committed
        if not self.log.commit_to(index):
            return
        conf_changed = self._apply_committed_conf_changes(previous, index)
        if conf_changed and self.role == Role.LEADER and self._maybe_commit():
            self._broadcast_append()  # the quorum changed and with it perhaps the commit

    def _apply_committed_conf_changes(self, low_exclusive: int, high: int) -> bool:
        """Membership takes effect at commit; also frees the leader's uncommitted budget.
        Returns True if any membership change was applied."""
        changed = False
        index = low_exclusive + 1
        while index <= high:
            try:
                batch = self.log.slice(index, high + 1, self.config.committed_entries_bytes_max)
            except CompactedError:
                index = self.log.first_index()
                continue
            for entry in batch:
                if self.role == Role.LEADER and entry.term == self.term:
                    self._uncommitted_bytes = max(0, self._uncommitted_bytes - entry_size(entry))
                if entry.kind == EntryKind.CONF_CHANGE:
                    self._apply_conf_change(ConfChange.decode(entry.data))
                    changed = True
            index = batch[-1].index + 1
        return changed

    def _apply_conf_change(self, change: ConfChange) -> None:
        self.conf = apply_conf_change(self.conf, change)
        self._rebuild_progress()
        if self.role != Role.LEADER:
            return
        if self.id not in self.conf.voters:
            self._hand_off_leadership()
            return
        if self._transfer_target not in self.conf.voters:
            self._transfer_target = NO_NODE

    def _hand_off_leadership(self) -> None:
        """We were removed or demoted: hand leadership to the most caught-up voter left,
        then step down. Stepping down at once could strand the group: the voters left
        learn that the change committed only from us, and until they do they may need our
        vote, which our longer log would refuse (two voters down to one). So we keep
        leading (our own match no longer counts) until the target holds our whole log,
        send it TIMEOUT_NOW, tell everyone the commit, and step down. Proposals are
        refused meanwhile; a stalled hand-off is retried each election timeout, and
        check-quorum still deposes us if we are cut off."""
        if not self.conf.voters:  # validation forbids it; never lead a group of nobody
            self._become_follower(self.term, NO_NODE)
            return
        self._handing_off = True
        target = max(self.conf.voters, key=lambda v: (self.progress[v].match, -v))
        self._transfer_target = target
        if self.progress[target].match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target, send_if_empty=True)

    def _send_timeout_now(self, target: int) -> None:
        self._send(_M.TIMEOUT_NOW, target)
        if self._handing_off:
            self._broadcast_heartbeat(b"")  # carries the commit, capped at each one's match
            self._become_follower(self.term, NO_NODE)

    def _rebuild_progress(self) -> None:
        """Keep one Progress per member (and for ourselves), preserving known ones."""
        members = set(self.conf.members()) | {self.id}
        next_index = self.log.last_index() + 1
        for node in sorted(members):
            existing = self.progress.get(node)
            if existing is None or self.role != Role.LEADER:
                existing = Progress(
                    next_index, self.config.inflight_messages_max,
                    is_learner=node in self.conf.learners,
                )
                if node == self.id:
                    existing.match = self.log.last_index()
                self.progress[node] = existing
            existing.is_learner = node in self.conf.learners
        for node in [n for n in self.progress if n not in members]:
            del self.progress[node]
        self.progress = dict(sorted(self.progress.items()))
        self._peers = tuple(node for node in self.progress if node != self.id)
        self._members = frozenset(self.conf.members())

    # ------------------------------------------------------------------ proposing

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self._transfer_target != NO_NODE:
            raise LeadershipTransferInProgress(self._transfer_target)

    def _propose_entry(self, kind: EntryKind, data: bytes) -> tuple[int, int]:
        self._check_can_propose()
        if len(data) > self.config.entry_bytes_max:
            raise ProposalTooLarge(
                f"entry of {len(data)} bytes exceeds entry_bytes_max={self.config.entry_bytes_max}"
            )
        size = len(data) + 16
        if self._uncommitted_bytes + size > self.config.uncommitted_entries_bytes_max:
            raise ProposalRefused(
                f"{self._uncommitted_bytes} bytes await commit "
                f"(limit {self.config.uncommitted_entries_bytes_max}); retry later"
            )
        entry = Entry(term=self.term, index=0, kind=kind, data=data)
        index = self._append_entries([entry])
        # Batching: proposals made before the caller next asks for a Ready share appends.
        self._broadcast_pending = True
        return index, self.term

    def _append_entries(self, entries: list[Entry]) -> int:
        """Leader: stamp index/term on `entries`, append them, count our own match."""
        last = self.log.last_index()
        stamped = [
            Entry(term=self.term, index=last + 1 + i, kind=e.kind, data=e.data)
            for i, e in enumerate(entries)
        ]
        for entry in stamped:
            self._uncommitted_bytes += entry_size(entry)
        last = self.log.append(stamped)
        self.progress[self.id].maybe_update(last)
        self._maybe_commit()  # a single-voter group commits at once
        return last

    # ------------------------------------------------------------------ sending

    def _send(self, kind: MessageType, target: int, **fields: object) -> None:
        fields.setdefault("term", self.term)
        self._messages.append(Message(type=kind, source=self.id, target=target, **fields))  # type: ignore[arg-type]

    def _broadcast_append(self) -> None:
        for peer in self._peers:
            self._send_append(peer, send_if_empty=True)

    def _broadcast_heartbeat(self, context: bytes) -> None:
        for peer in self._peers:
            progress = self.progress[peer]
            commit = min(progress.match, self.log.committed)
            self._send(_M.HEARTBEAT, peer, commit=commit, context=context)

    def _send_append(self, target: int, send_if_empty: bool) -> bool:
        """Send the entries `target` needs next (or a snapshot); False if nothing was sent."""
        progress = self.progress[target]
        if progress.is_paused():
            return False
        previous = progress.next - 1
        try:
            previous_term = self.log.term(previous)
            entries = self.log.entries_from(
                progress.next, self.config.entries_per_message_bytes_max
            )
        except CompactedError:
            return self._start_snapshot(target, progress)
        if not entries and not send_if_empty:
            return False
        commit = min(self.log.committed, previous + len(entries))
        self._send(
            _M.APPEND, target, index=previous, log_term=previous_term,
            entries=tuple(entries), commit=commit,
        )
        progress.sent_entries(entries[-1].index if entries else None)
        return True

    def _start_snapshot(self, target: int, progress: Progress) -> bool:
        snapshot = self.log.snapshot()
        if snapshot.is_empty():
            raise RaftError("log compacted without a snapshot to send")
        progress.become_snapshot(snapshot)
        self._send_snapshot_chunks(target, progress)
        return True

    def _resend_snapshot_if_stalled(self, target: int, progress: Progress) -> None:
        """Called on each heartbeat answer: if nothing was acknowledged since the last one,
        chunks were probably lost, so send again from the last acknowledged byte."""
        transfer = progress.transfer
        assert transfer is not None
        if transfer.acked_bytes == transfer.acked_bytes_at_last_heartbeat:
            transfer.rewind(transfer.acked_bytes)
            self._send_snapshot_chunks(target, progress)
        transfer.acked_bytes_at_last_heartbeat = transfer.acked_bytes

    def _send_snapshot_chunks(self, target: int, progress: Progress) -> None:
        """Stream chunks from the last one sent, keeping a bounded window unacknowledged."""
        transfer = progress.transfer
        assert transfer is not None
        chunk_max = self.config.snapshot_chunk_bytes_max
        window_bytes = chunk_max * self.config.snapshot_chunks_in_flight_max
        data = transfer.snapshot.data
        while not transfer.all_sent and transfer.sent_bytes - transfer.acked_bytes < window_bytes:
            offset = transfer.sent_bytes
            chunk = data[offset : offset + chunk_max]
            done = offset + len(chunk) >= transfer.size
            self._send(
                _M.SNAPSHOT, target, snapshot_meta=transfer.snapshot.meta,
                snapshot_size=transfer.size, chunk_offset=offset, chunk=chunk, chunk_done=done,
            )
            transfer.sent_bytes = offset + len(chunk)
            transfer.all_sent = done

    # ------------------------------------------------------------------ ReadIndex

    def _leader_read_index(self, requester: int, request_id: bytes) -> None:
        if len(self.conf.voters) == 1 and self.id in self.conf.voters:
            self._answer_read(requester, request_id, self.log.committed)
            return
        if not self._committed_in_current_term():
            # Our commit index may lag the true one until an entry of our term commits.
            if len(self._waiting_reads) >= self.config.read_index_pending_max:
                self._refuse_read(requester, "too many reads waiting")
                return
            self._waiting_reads.append((requester, request_id))
            return
        if self._read_only.full():
            self._refuse_read(requester, "too many reads pending confirmation")
            return
        context = self._read_only.add(self.log.committed, requester, request_id)
        self._handle_read_ack(self.id, context)
        self._broadcast_heartbeat(context)

    def _refuse_read(self, requester: int, why: str) -> None:
        if requester == self.id:
            raise ProposalRefused(f"read refused: {why}")
        self._drop("read_index_overload")

    def _release_waiting_reads(self) -> None:
        waiting, self._waiting_reads = self._waiting_reads, []
        for requester, request_id in waiting:
            self._leader_read_index(requester, request_id)

    def _handle_read_ack(self, node: int, context: bytes) -> None:
        acks = self._read_only.ack(context, node)
        if acks is None:
            return
        if sum(1 for voter in self.conf.voters if voter in acks) < self._quorum():
            return
        for pending in self._read_only.release_through(context):
            self._answer_read(pending.requester, pending.request_id, pending.index)

    def _answer_read(self, requester: int, request_id: bytes, index: int) -> None:
        if requester == self.id:
            self._read_states.append(ReadState(index=index, request_id=request_id))
        else:
            self._send(_M.READ_INDEX_RESPONSE, requester, index=index, context=request_id)

