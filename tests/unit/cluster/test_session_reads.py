"""What reads that got no rows fail with (`cluster.session._unanswered`): SnapshotMissing,
which the coordinator answers by reading again at a log barrier, only when every such read
met a holder without a snapshot at its point; anything else is Unavailable."""

from __future__ import annotations

from cluster.session import _HedgedRead, _unanswered
from cluster.sql_protocol import FragmentRequest
from query.port import SnapshotMissing, Unavailable


def _read(snapshot_missing: bool) -> _HedgedRead:
    request = FragmentRequest(0, 7, "SELECT 1", (), "reply", ())
    return _HedgedRead((1, 2), request, gave_up=True, snapshot_missing=snapshot_missing)


def test_every_read_missing_its_snapshot_is_snapshot_missing() -> None:
    assert _unanswered([_read(True), _read(True)]) is SnapshotMissing
    assert issubclass(SnapshotMissing, Unavailable)  # callers that do not retry see it so


def test_a_read_that_failed_otherwise_is_unavailable() -> None:
    assert _unanswered([_read(True), _read(False)]) is Unavailable
    assert _unanswered([_read(False)]) is Unavailable
