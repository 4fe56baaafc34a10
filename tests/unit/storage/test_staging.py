"""The staging area: round trips of every common Arrow type, canonical bytes, idempotent
rewrites, verification on open, disk errors, collection by age, and crash safety under
SIGKILL of a real writer process."""

from __future__ import annotations

import datetime
import decimal
import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from storage import staging
from storage.staging import (
    STAGE_BATCH_ROWS,
    StagedFile,
    StagingArea,
    StagingError,
    StagingFull,
)

REPOSITORY = Path(__file__).resolve().parents[3]


@pytest.fixture
def area(tmp_path: Path) -> StagingArea:
    return StagingArea(tmp_path / "staging")


def names(area: StagingArea) -> list[str]:
    return sorted(os.listdir(area.directory))


def every_type() -> pa.Table:
    utc = datetime.UTC
    return pa.table(
        {
            "bool": pa.array([True, None, False]),
            "int8": pa.array([-128, None, 127], pa.int8()),
            "int64": pa.array([-(2**63), None, 2**63 - 1], pa.int64()),
            "uint32": pa.array([0, None, 2**32 - 1], pa.uint32()),
            "float32": pa.array([1.5, None, float("inf")], pa.float32()),
            "float64": pa.array([float("nan"), None, -0.0], pa.float64()),
            "decimal": pa.array(
                [decimal.Decimal("-12345.678"), None, decimal.Decimal("0.001")],
                pa.decimal128(18, 3),
            ),
            "string": pa.array(["héllo", None, "日本語 🦆 ')"]),
            "large_string": pa.array(["", None, "x" * 1000], pa.large_string()),
            "binary": pa.array([b"\x00\xff", None, b""]),
            "date": pa.array([datetime.date(1970, 1, 1), None, datetime.date(9999, 12, 31)]),
            "time": pa.array([datetime.time(0, 0), None, datetime.time(23, 59, 59, 999999)]),
            "timestamp_tz": pa.array(
                [datetime.datetime(2024, 2, 29, 12, 0, tzinfo=utc), None, None],
                pa.timestamp("us", tz="Europe/Amsterdam"),
            ),
            "timestamp_ns": pa.array([0, None, 2**62 - 2**62 % 1000], pa.timestamp("ns")),
            "duration": pa.array([datetime.timedelta(seconds=-1), None, None], pa.duration("ms")),
            "list": pa.array([[1, None, 3], None, []], pa.list_(pa.int32())),
            "nested_list": pa.array([[["a"], []], None, [None]], pa.list_(pa.list_(pa.string()))),
            "struct": pa.array(
                [{"x": 1, "y": "a"}, None, {"x": None, "y": None}],
                pa.struct([("x", pa.int64()), ("y", pa.string())]),
            ),
            "map": pa.array([[("k", 1)], None, []], pa.map_(pa.string(), pa.int64())),
            "fixed_list": pa.array([[1, 2], None, [None, 4]], pa.list_(pa.int16(), 2)),
            "dictionary": pa.array(["red", None, "red"]).dictionary_encode(),
            "null": pa.array([None, None, None], pa.null()),
        }
    )


def test_round_trip_of_every_common_type(area: StagingArea) -> None:
    data = every_type()
    staged = area.write("types", data)
    assert staged == StagedFile(
        "types", 3, staged.crc, (area.directory / "types.arrow").stat().st_size
    )
    read = area.open("types", staged.crc, staged.rows)
    assert read is not None
    assert read.schema == data.schema
    # Arrow's equals() holds NaN unequal to itself: compare that column apart.
    assert read.drop_columns(["float64"]).equals(data.drop_columns(["float64"]))
    assert read.drop_columns(["float64"]).to_pylist() == data.drop_columns(["float64"]).to_pylist()
    floats = read.column("float64").to_pylist()
    assert floats[0] != floats[0] and floats[1:] == [None, -0.0]  # NaN, NULL, -0.0
    assert str(floats[2]) == "-0.0"


def test_schema_metadata_and_empty_tables_round_trip(area: StagingArea) -> None:
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())], metadata={b"k": b"v"})
    empty = schema.empty_table()
    staged = area.write("empty", empty)
    assert staged.rows == 0
    read = area.open("empty", staged.crc, 0)
    assert read is not None
    assert read.num_rows == 0
    assert read.schema.equals(schema, check_metadata=True)


def test_a_file_is_one_uncompressed_stream_of_bounded_batches(area: StagingArea) -> None:
    rows = 2 * STAGE_BATCH_ROWS + 5
    staged = area.write("big", pa.table({"a": pa.array(range(rows), pa.int64())}))
    reader = pa.ipc.open_stream(pa.memory_map(str(area.directory / "big.arrow")))
    sizes = [batch.num_rows for batch in reader]
    assert sizes == [STAGE_BATCH_ROWS, STAGE_BATCH_ROWS, 5]
    # Uncompressed int64 data: the file is at least the raw values.
    assert staged.bytes >= rows * 8


def test_equal_tables_in_any_chunking_give_byte_identical_files(tmp_path: Path) -> None:
    rows = STAGE_BATCH_ROWS + 1000
    values = pa.array([f"v{i % 977}" if i % 5 else None for i in range(rows)])
    numbers = pa.array([i * 3 if i % 7 else None for i in range(rows)], pa.int64())
    whole = pa.table({"s": values, "n": numbers})
    cuts = [0, 1, 999, 40_000, STAGE_BATCH_ROWS, rows]
    chunked = pa.Table.from_batches(
        [whole.slice(low, high - low).to_batches()[0] for low, high in itertools.pairwise(cuts)]
    )
    assert chunked.column("s").num_chunks == len(cuts) - 1
    # A table that is a slice (non-zero offsets) of a bigger one.
    padded = pa.concat_tables([whole.slice(0, 7), whole]).combine_chunks().slice(7)
    assert padded.equals(whole)
    files = []
    for number, table in enumerate([whole, chunked, padded]):
        area = StagingArea(tmp_path / f"holder{number}")
        staged = area.write("same", table)
        files.append((staged, (area.directory / "same.arrow").read_bytes()))
    assert files[0][0] == files[1][0] == files[2][0]
    assert files[0][1] == files[1][1] == files[2][1]


def test_rewriting_equal_rows_is_a_no_op(area: StagingArea) -> None:
    data = every_type()
    first = area.write("again", data)
    before = os.stat(area.directory / "again.arrow")
    second = area.write("again", pa.concat_tables([data.slice(0, 1), data.slice(1)]))
    after = os.stat(area.directory / "again.arrow")
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert names(area) == ["again.arrow"]


def test_rewriting_other_rows_replaces_the_file(area: StagingArea) -> None:
    old = area.write("id", pa.table({"a": [1, 2]}))
    held = area.open("id", old.crc, old.rows)
    new = area.write("id", pa.table({"a": [3]}))
    assert new.crc != old.crc
    assert area.open("id", old.crc, old.rows) is None  # set aside as corrupt
    assert names(area) == ["id.corrupt"]
    new = area.write("id", pa.table({"a": [3]}))
    read = area.open("id", new.crc, 1)
    assert read is not None and read.column("a").to_pylist() == [3]
    # A table opened earlier is untouched by the replacement: files never change in place.
    assert held is not None and held.column("a").to_pylist() == [1, 2]


def test_open_is_zero_copy_and_outlives_the_file(area: StagingArea) -> None:
    data = pa.table({"a": pa.array(range(500_000), pa.int64())})
    staged = area.write("mapped", data)
    del data
    allocated = pa.total_allocated_bytes()
    read = area.open("mapped", staged.crc, staged.rows)
    assert read is not None
    assert pa.total_allocated_bytes() - allocated < 64 * 1024
    area.remove("mapped")
    assert not area.has("mapped")
    assert read.column("a")[499_999].as_py() == 499_999


def test_a_flipped_byte_is_set_aside_as_corrupt(area: StagingArea) -> None:
    staged = area.write("flip", every_type())
    path = area.directory / "flip.arrow"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    assert area.open("flip", staged.crc, staged.rows) is None
    assert names(area) == ["flip.corrupt"]
    assert (area.directory / "flip.corrupt").read_bytes() == bytes(damaged)
    assert not area.has("flip")
    assert area.open("flip", staged.crc, staged.rows) is None


def test_a_truncated_file_is_set_aside(area: StagingArea) -> None:
    staged = area.write("cut", every_type())
    path = area.directory / "cut.arrow"
    path.write_bytes(path.read_bytes()[: staged.bytes // 2])
    assert area.open("cut", staged.crc, staged.rows) is None
    assert names(area) == ["cut.corrupt"]


def test_a_wrong_row_count_is_set_aside(area: StagingArea) -> None:
    staged = area.write("count", every_type())
    assert area.open("count", staged.crc, staged.rows + 1) is None
    assert names(area) == ["count.corrupt"]


def test_missing_files(area: StagingArea) -> None:
    assert area.open("nothing", 0, 0) is None
    assert not area.has("nothing")
    area.remove("nothing")
    assert names(area) == []


@pytest.mark.parametrize(
    "stage_id",
    ["", ".hidden", "..", "a/b", "a b", "a\x00", "é", "x" * 129, "a\n", "-\\"],
)
def test_bad_stage_ids_are_refused(area: StagingArea, stage_id: str) -> None:
    data = pa.table({"a": [1]})
    with pytest.raises(ValueError):
        area.write(stage_id, data)
    with pytest.raises(ValueError):
        area.open(stage_id, 0, 1)
    with pytest.raises(ValueError):
        area.has(stage_id)
    with pytest.raises(ValueError):
        area.remove(stage_id)
    assert names(area) == []


@pytest.mark.parametrize("stage_id", ["x" * 128, "a.b-c_D9", "-", "_.", "9"])
def test_good_stage_ids(area: StagingArea, stage_id: str) -> None:
    staged = area.write(stage_id, pa.table({"a": [1]}))
    assert area.has(stage_id)
    assert area.open(stage_id, staged.crc, 1) is not None
    area.remove(stage_id)
    assert not area.has(stage_id)


def failing(error_number: int, after_calls: int = 0) -> Callable[[int, memoryview], int]:
    """A stand-in for os.write that, like a filling disk, lands `after_calls` writes, then
    a short one (when there is something to cut), then fails with `error_number`."""
    real_write = os.write
    calls = [0]

    def write(fd: int, data: memoryview) -> int:
        calls[0] += 1
        if calls[0] <= after_calls:
            return real_write(fd, data)
        if calls[0] == after_calls + 1 and len(data) > 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(error_number, os.strerror(error_number))

    return write


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("after_calls", [0, 1, 2])
def test_a_full_disk_raises_staging_full_and_leaves_no_temporary(
    area: StagingArea, monkeypatch: pytest.MonkeyPatch, error_number: int, after_calls: int
) -> None:
    old = area.write("id", pa.table({"a": [0]}))
    big = pa.table({"a": pa.array(range(8 * STAGE_BATCH_ROWS), pa.int64())})  # 4 MiB
    monkeypatch.setattr(staging.os, "write", failing(error_number, after_calls))
    with pytest.raises(StagingFull) as raised:
        area.write("id", big)
    monkeypatch.undo()
    assert raised.value.errno == error_number
    assert "id." in str(raised.value) and str(area.directory) in str(raised.value)
    assert names(area) == ["id.arrow"]
    assert area.open("id", old.crc, 1) is not None  # the earlier version is intact


def test_an_io_error_is_a_staging_error_but_not_full(
    area: StagingArea, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging.os, "write", failing(errno.EIO))
    with pytest.raises(StagingError) as raised:
        area.write("id", pa.table({"a": [1]}))
    assert not isinstance(raised.value, StagingFull)
    assert raised.value.operation == "writing"
    assert names(area) == []


def test_a_failed_fsync_leaves_nothing_visible(
    area: StagingArea, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(staging.os, "fsync", fsync)
    with pytest.raises(StagingError) as raised:
        area.write("id", pa.table({"a": [1]}))
    assert raised.value.errno == errno.EIO
    assert names(area) == []


def test_collect_removes_only_old_files_of_the_area(area: StagingArea) -> None:
    now_ns = 1_700_000_000 * 10**9
    hour_ns = 3600 * 10**9
    ages_ns = {
        "old.arrow": 3 * hour_ns,
        "old.1-2.tmp": 2 * hour_ns,
        "old2.corrupt": 2 * hour_ns,
        "edge.arrow": hour_ns,  # exactly the limit: kept
        "young.arrow": 1,
        "young.1-2.tmp": 0,
        "unrelated.txt": 5 * hour_ns,
    }
    for name, age_ns in ages_ns.items():
        path = area.directory / name
        path.write_bytes(b"x")
        os.utime(path, ns=(now_ns - age_ns, now_ns - age_ns))
    assert area.collect(hour_ns, now_ns) == 3
    assert names(area) == ["edge.arrow", "unrelated.txt", "young.1-2.tmp", "young.arrow"]
    assert area.collect(hour_ns, now_ns) == 0
    assert area.collect(0, now_ns) == 2
    assert names(area) == ["unrelated.txt", "young.1-2.tmp"]


def test_threads_staging_at_once(area: StagingArea) -> None:
    tables = [pa.table({"t": pa.array([t] * 50_000, pa.int64())}) for t in range(4)]
    results: dict[tuple[int, int], StagedFile] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for round_ in range(5):
                results[thread, round_] = area.write(f"own-{thread}", tables[thread])
                results[thread, -1 - round_] = area.write("shared", tables[0])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({results[key] for key in results if key[1] < 0}) == 1
    for number in range(4):
        staged = results[number, 0]
        read = area.open(f"own-{number}", staged.crc, staged.rows)
        assert read is not None and read.equals(tables[number])
    assert sorted(names(area)) == sorted([f"own-{t}.arrow" for t in range(4)] + ["shared.arrow"])


# -- crash safety ----------------------------------------------------------------------

KILL_ROUNDS = 4
BIG_ROWS = 6 * 1024


def big_table(version: int) -> pa.Table:
    """About 6 MiB whose content depends on `version` (the child writes these)."""
    payload = (b"%08d" % version) * 128
    return pa.table(
        {
            "version": pa.array([version] * BIG_ROWS, pa.int64()),
            "payload": pa.array([payload] * BIG_ROWS, pa.binary()),
        }
    )


_CHILD = """
import sys
from pathlib import Path
from storage.staging import StagingArea
from tests.unit.storage.test_staging import big_table
area = StagingArea(Path(sys.argv[1]))
version = int(sys.argv[2])
while True:
    area.write("big-%d" % (version % 3), big_table(version))
    print(version, flush=True)
    version += 1
"""


def test_a_killed_writer_never_leaves_a_bad_visible_file(tmp_path: Path) -> None:
    directory = tmp_path / "staging"
    expected = StagingArea(tmp_path / "expected")
    rng = random.Random(20240229)
    version = 0
    for _ in range(KILL_ROUNDS):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory), str(version)],
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        )
        try:
            assert child.stdout is not None
            written = int(child.stdout.readline())  # one write done: now kill mid-stream
            threading.Event().wait(rng.uniform(0.0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        assert written == version
        version += 10
        check_every_visible_file(StagingArea(directory), expected)


def check_every_visible_file(area: StagingArea, expected: StagingArea) -> None:
    visible = [name for name in names(area) if name.endswith(".arrow")]
    assert visible, "the child finished at least one write"
    for name in visible:
        stage_id = name.removesuffix(".arrow")
        with pa.memory_map(str(area.directory / name)) as source:
            version = pa.ipc.open_stream(source).read_next_batch().column(0)[0].as_py()
        want = expected.write(f"v{version}", big_table(version))
        read = area.open(stage_id, want.crc, want.rows)
        assert read is not None, f"{name} holds version {version} but does not verify"
        assert read.equals(big_table(version))
