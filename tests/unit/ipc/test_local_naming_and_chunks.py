"""Resource names of the local transport, and how bulk data is cut into chunks (pure)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from ipc import registry, shm
from ipc.local import LocalOptions

# ---- names ----


def test_token_names_the_cluster_and_differs_per_run_dir(tmp_path: Path) -> None:
    one = registry.resource_token("orders", tmp_path / "a")
    assert one.startswith("orders-")
    assert one == registry.resource_token("orders", tmp_path / "a")
    assert one != registry.resource_token("orders", tmp_path / "b")
    assert one != registry.resource_token("orders2", tmp_path / "a")


def test_names_are_safe_and_short_whatever_the_cluster_name(tmp_path: Path) -> None:
    hostile = "../weird name/ü" * 40
    token = registry.resource_token(hostile, tmp_path)
    assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    name = registry.queue_name(token, 2**32 - 1, registry.INCARNATION_MAX)
    assert len(name) <= registry.NAME_BYTES_MAX
    assert name.count("/") == 1 and name.startswith("/")
    segment = registry.segment_prefix(token, 2**32 - 1, registry.INCARNATION_MAX) + "99999999"
    assert len(segment) <= registry.NAME_BYTES_MAX
    assert "/" not in segment


def test_two_clusters_that_sanitise_alike_get_different_tokens(tmp_path: Path) -> None:
    assert registry.resource_token("a b", tmp_path) != registry.resource_token("a_b", tmp_path)


def test_node_prefixes_do_not_capture_other_nodes(tmp_path: Path) -> None:
    token = registry.resource_token("c", tmp_path)
    node_1 = registry.node_prefix(token, 1)
    assert not registry.segment_prefix(token, 12, 1).startswith(node_1)
    assert not registry.segment_prefix(token, 1, 12).startswith(
        registry.segment_prefix(token, 1, 1)
    )
    assert registry.node_of_segment(token, registry.segment_prefix(token, 12, 3) + "0") == 12
    assert registry.node_of_segment(token, "dc.other-0123456789.1.1.0") is None


# ---- chunks ----


def ints(start: int, rows: int) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(range(start, start + rows), pa.int64())})


def test_one_small_table_is_one_last_chunk() -> None:
    chunks = list(shm.plan_chunks(pa.table({"x": [1, 2]}).to_batches(), 1 << 20))
    assert len(chunks) == 1
    assert chunks[0][1] is True


def test_no_batches_still_make_one_chunk() -> None:
    assert list(shm.plan_chunks([], 1 << 20)) == [([], True)]


def test_big_batches_are_sliced_to_fit_and_nothing_is_lost() -> None:
    chunk_bytes_max = 1 << 20
    batches = [ints(0, 300_000), ints(300_000, 10), ints(300_010, 200_000)]
    schema = batches[0].schema
    chunks = list(shm.plan_chunks(batches, chunk_bytes_max))
    assert len(chunks) > 3
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    for chunk, _ in chunks:
        assert shm.measure_stream(schema, chunk) <= chunk_bytes_max
    joined = pa.Table.from_batches([b for chunk, _ in chunks for b in chunk], schema)
    assert joined.equals(pa.Table.from_batches(batches))


def test_a_stream_yields_chunks_before_it_ends() -> None:
    consumed: list[int] = []

    def stream() -> Iterator[pa.RecordBatch]:
        for index in range(10):
            consumed.append(index)
            yield ints(index * 100_000, 100_000)

    chunks = shm.plan_chunks(stream(), 1 << 20)
    first, last = next(chunks)
    assert not last
    assert len(consumed) < 10


def test_a_row_larger_than_a_chunk_travels_alone() -> None:
    big = pa.record_batch({"b": pa.array([b"x" * (3 << 20), b"y"], pa.binary())})
    chunks = list(shm.plan_chunks([big], 1 << 20))
    assert [sum(b.num_rows for b in chunk) for chunk, _ in chunks] == [1, 1]


def test_measured_size_is_the_written_size() -> None:
    batches = [ints(0, 1000), ints(1000, 7)]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    assert shm.measure_stream(batches[0].schema, batches) == sink.getvalue().size


# ---- options ----


@pytest.mark.parametrize(
    "overrides",
    [
        {"segment_bytes_max": 4 << 30},  # bigger than what may be lent at once
        {"queue_message_bytes_min": 100},  # reference frames would not fit
        {"outbound_frames_max": 0},
        {"liveness_check_ns": 0},
    ],
)
def test_options_reject_nonsense(overrides: dict[str, int]) -> None:
    with pytest.raises(AssertionError):
        LocalOptions(**overrides)  # type: ignore[arg-type]
