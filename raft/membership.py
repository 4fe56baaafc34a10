"""Membership changes, one server at a time.

A change takes effect on a node when its entry commits there (see `RaftNode`). Only one
change may be uncommitted at once, and a new leader accepts none until an entry of its
own term commits; with those two rules any two configurations in effect at once differ
by one server, so their majorities overlap and two leaders of one term cannot be elected.
"""

from __future__ import annotations

import msgspec

from raft.types import ConfChange, ConfChangeKind, ConfState, InvalidConfChange


def validate_conf_change(conf: ConfState, change: ConfChange) -> None:
    """Raise InvalidConfChange when `change` makes no sense against `conf`."""
    node = change.node
    if node <= 0:
        raise InvalidConfChange(f"node ids are positive, got {node}")
    if change.kind == ConfChangeKind.ADD_VOTER and node in conf.voters:
        raise InvalidConfChange(f"node {node} is already a voter")
    if change.kind == ConfChangeKind.ADD_LEARNER and node in conf.learners:
        raise InvalidConfChange(f"node {node} is already a learner")
    if change.kind == ConfChangeKind.REMOVE and node not in conf.members():
        raise InvalidConfChange(f"node {node} is not a member")
    remaining_voters = set(apply_conf_change(conf, change).voters)
    if not remaining_voters:
        raise InvalidConfChange("the last voter cannot be removed or demoted")


def is_conf_change_data(data: bytes) -> bool:
    """Whether `data` could be the payload of a CONF_CHANGE entry a correct leader wrote:
    it decodes, and names a real node. Checked on receipt, because a payload that failed to
    decode at commit time would leave the node no way forward."""
    try:
        change = ConfChange.decode(data)
    except msgspec.DecodeError:  # ValidationError (e.g. an unknown kind) is a DecodeError
        return False
    return change.node > 0


def apply_conf_change(conf: ConfState, change: ConfChange) -> ConfState:
    """The configuration after `change` (pure; an already-true change is a no-op)."""
    voters = set(conf.voters)
    learners = set(conf.learners)
    voters.discard(change.node)
    learners.discard(change.node)
    if change.kind == ConfChangeKind.ADD_VOTER:
        voters.add(change.node)
    elif change.kind == ConfChangeKind.ADD_LEARNER:
        learners.add(change.node)
    return ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))
