"""SIGKILL during apply: the partition store neither loses nor repeats an applied entry.

A child process (the script in CHILD) opens the store and applies entries applied+1, … in a
loop; entry i inserts rows tagged i into two partitions in one `apply`, and the child prints
i only after `apply` returns. The parent kills it with SIGKILL after a random number of
lines — mid-insert, mid-commit, mid-checkpoint — reopens the store and checks that the
applied index covers every printed index and that the rows are exactly those of entries
1..applied_index(): each entry's rows once, none missing, none beyond. It repeats on the
same file, so each incarnation also recovers whatever the previous kill left behind."""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from storage.partitions import PartitionStore

REPO = Path(__file__).resolve().parents[3]
KILLS = 8
LINES_BEFORE_KILL_MAX = 200
LINE_TIMEOUT_S = 30.0
"""Only a hung child waits this long; a healthy one applies an entry every millisecond or so."""
KILL_DELAY_S_MAX = 0.02
"""The kill lands a random moment after the last line read: without the delay it would
always land just after a print, i.e. while the child builds its next batch in Python."""

CHILD = """
import sys
import pyarrow as pa
from storage.partitions import CreateTable, Insert, PartitionStore

COLUMNS = "entry BIGINT NOT NULL, seq INTEGER NOT NULL, note VARCHAR"
store = PartitionStore.open(sys.argv[1])
if store.applied_index() == 0:
    store.apply(1, [CreateTable("t", 0, COLUMNS), CreateTable("t", 1, COLUMNS)])
    print(1, flush=True)
index = store.applied_index()
while True:
    index += 1
    count = index % 97 * 10 + 1
    rows = pa.table({
        "entry": pa.array([index] * count, pa.int64()),
        "seq": pa.array(range(count), pa.int32()),
        "note": [f"entry {index}"] * count,
    })
    single = pa.table({"entry": pa.array([index], pa.int64()), "seq": pa.array([0], pa.int32())})
    assert store.apply(index, [Insert("t", 0, rows), Insert("t", 1, single)])
    print(index, flush=True)
"""


def rows_of_entry(index: int) -> int:
    """Rows entry `index` puts in partition 0 (partition 1 gets one); entry 1 creates."""
    return 0 if index == 1 else index % 97 * 10 + 1


def _start(path: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, path],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_applied(child: subprocess.Popen[str], lines: int) -> int:
    """Read `lines` lines from the child; the highest index it reported applied."""
    assert child.stdout is not None
    highest = 0
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        for _ in range(lines):
            if not selector.select(LINE_TIMEOUT_S):
                raise AssertionError("the child stopped printing")
            line = child.stdout.readline()
            if not line:
                assert child.stderr is not None
                raise AssertionError(f"the child died: {child.stderr.read()}")
            index = int(line)
            assert index == highest + 1 or highest == 0, (highest, index)
            highest = index
    return highest


def _check(path: str, reported: int) -> int:
    """Reopen the store; the rows are exactly those of entries 1..applied_index()."""
    with PartitionStore.open(path) as store:
        applied = store.applied_index()
        assert applied >= reported, f"entry {reported} was reported applied, store at {applied}"
        with store.read_at(applied) as snapshot:
            counts = snapshot.query(
                "SELECT entry, count(*) AS n, count(DISTINCT seq) AS seqs "
                'FROM "t__p0" GROUP BY entry ORDER BY entry'
            ).to_pylist()
            singles = snapshot.query('SELECT entry FROM "t__p1" ORDER BY entry')
    expected = [
        {"entry": index, "n": rows_of_entry(index), "seqs": rows_of_entry(index)}
        for index in range(2, applied + 1)
    ]
    assert counts == expected
    assert singles.column("entry").to_pylist() == list(range(2, applied + 1))
    return applied


def test_sigkill_during_apply_neither_loses_nor_repeats_an_entry() -> None:
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="partitions-crash-") as directory:
        path = str(Path(directory) / "worker.duckdb")
        applied = 0
        for _ in range(KILLS):
            child = _start(path)
            try:
                reported = _read_applied(child, rng.randrange(1, LINES_BEFORE_KILL_MAX))
                time.sleep(rng.random() * KILL_DELAY_S_MAX)
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                child.communicate()
            assert child.returncode == -signal.SIGKILL
            reopened = _check(path, reported)
            assert reopened >= applied
            applied = reopened
        assert applied > KILLS
