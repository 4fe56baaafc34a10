"""Differential property test: a Wal behaves exactly like MemoryStorage.

Random sequences of append (with conflicting overwrites and compacted prefixes),
set_hard_state, create_snapshot, apply_snapshot, compact, sync and close+reopen run
against both. After every step the Wal reads the same as MemoryStorage; after a reopen it
reads the same as MemoryStorage did at the last sync (close drops unsynced changes, like a
crash). Limits are tiny so segments roll, get compacted away and entries miss the cache.
fsync is off here only to keep the test fast: a close+reopen keeps the page cache, so
fsync changes nothing this test can observe (the crash, torn-tail and fault tests run with
it on). Derandomized: the same examples run every time."""

from __future__ import annotations

import copy
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raft import ConfState, Entry, HardState, MemoryStorage, Snapshot, SnapshotMeta
from storage import Wal, WalConfig
from tests.unit.storage.helpers import CONF, SMALL, state_of

DIFFERENTIAL_SETTINGS = settings(
    derandomize=True,
    max_examples=80,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STEPS_MAX = 60
OPERATIONS = (
    *["append"] * 8,
    "hard_state",
    "hard_state",
    "create_snapshot",
    "create_snapshot",
    "apply_snapshot",
    "compact",
    "compact",
    *["sync"] * 4,
    "reopen",
)
CONFS = (CONF, ConfState(voters=(1,)), ConfState(voters=(1, 2, 3), learners=(4,)))


def _step(data: st.DataObject, model: MemoryStorage, wal: Wal) -> str:
    """Draw one write operation and apply it to both; the operation's name."""
    operation = data.draw(st.sampled_from(OPERATIONS))
    first, last = model.first_index(), model.last_index()
    if operation == "append":
        start = data.draw(st.integers(max(1, first - 2), last + 1))
        count = data.draw(st.integers(0, 6))
        term = data.draw(st.integers(1, 5))
        batch = [
            Entry(term=term, index=start + k, data=data.draw(st.binary(max_size=60)))
            for k in range(count)
        ]
        model.append(batch)
        wal.append(batch)
    elif operation == "hard_state":
        hard_state = HardState(
            term=data.draw(st.integers(0, 9)),
            vote=data.draw(st.integers(0, 3)),
            commit=data.draw(st.integers(0, last)),
        )
        model.set_hard_state(hard_state)
        wal.set_hard_state(hard_state)
    elif operation == "create_snapshot":
        low = max(first - 1, model.snapshot().meta.index - 1)
        if low > last:
            return "skip"
        index = data.draw(st.integers(low, last))
        conf = data.draw(st.sampled_from(CONFS))
        payload = data.draw(st.binary(max_size=30))
        assert wal.create_snapshot(index, conf, payload) == model.create_snapshot(
            index, conf, payload
        )
    elif operation == "apply_snapshot":
        current = model.snapshot().meta.index
        index = data.draw(st.integers(max(1, current - 1), max(current, last) + 4))
        meta = SnapshotMeta(
            index=index, term=data.draw(st.integers(1, 6)), conf=data.draw(st.sampled_from(CONFS))
        )
        snapshot = Snapshot(meta=meta, data=data.draw(st.binary(max_size=30)))
        model.apply_snapshot(snapshot)
        wal.apply_snapshot(snapshot)
    elif operation == "compact":
        index = data.draw(st.integers(first - 1, last))
        model.compact(index)
        wal.compact(index)
    return operation


@DIFFERENTIAL_SETTINGS
@given(
    data=st.data(),
    founder=st.booleans(),
    cache_bytes_max=st.sampled_from([0, 200, 1 << 20]),
)
def test_wal_reads_like_memory_storage_and_reopens_as_of_the_last_sync(
    data: st.DataObject, founder: bool, cache_bytes_max: int
) -> None:
    config = WalConfig(
        segment_bytes_max=2 * SMALL.record_bytes_max,
        record_bytes_max=SMALL.record_bytes_max,
        read_bytes_max=SMALL.read_bytes_max,
        cache_bytes_max=cache_bytes_max,
        fsync=False,
    )
    conf = CONF if founder else None
    with tempfile.TemporaryDirectory(prefix="wal-diff-") as directory:
        model = MemoryStorage(conf)
        synced = copy.deepcopy(model)
        wal = Wal.open(directory, conf, config=config)
        try:
            assert state_of(wal) == state_of(model)
            for _ in range(data.draw(st.integers(1, STEPS_MAX))):
                operation = _step(data, model, wal)
                event(operation)
                if operation == "sync":
                    wal.sync()
                    synced = copy.deepcopy(model)
                elif operation == "reopen":
                    wal.close()
                    wal = Wal.open(directory, CONF, config=config)  # conf is ignored
                    model = copy.deepcopy(synced)
                assert state_of(wal) == state_of(model), operation
                assert wal.initial_state() == model.initial_state()
            wal.sync()
            event(f"segments deleted: {min(wal.stats.segments_deleted, 3)}")
            wal.close()
            wal = Wal.open(directory, config=config)
            assert state_of(wal) == state_of(model)
            event(f"entries at the end: {min(model.last_index() - model.first_index() + 1, 10)}")
        finally:
            wal.close()
