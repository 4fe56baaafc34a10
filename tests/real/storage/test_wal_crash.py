"""SIGKILL during group commit loses nothing that was synced.

A child process (wal_child.py) appends and syncs in a loop and prints each range of
indexes after `sync()` returns. The parent kills it with SIGKILL after a random number of
lines — mid-append, mid-write, mid-fsync or mid-rollover — reopens the log and checks every
printed index is there with the right term and data. It repeats on the same directory, so
each incarnation also recovers whatever the previous kill left behind."""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from storage import Wal
from tests.real.storage.wal_child import CONFIG, payload

REPO = Path(__file__).resolve().parents[3]
KILLS = 5
LINES_BEFORE_KILL_MAX = 120
LINE_TIMEOUT_S = 30.0
"""Only a hung child waits this long; a healthy one prints a line every millisecond or so."""


def _start(directory: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.real.storage.wal_child", directory, str(seed)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_synced(child: subprocess.Popen[str], lines: int) -> dict[int, int]:
    """Read `lines` lines from the child: index -> term of every entry it reported synced."""
    assert child.stdout is not None
    synced: dict[int, int] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        for _ in range(lines):
            if not selector.select(LINE_TIMEOUT_S):
                raise AssertionError("the child stopped printing")
            line = child.stdout.readline()
            if not line:
                assert child.stderr is not None
                raise AssertionError(f"the child died: {child.stderr.read()}")
            word, first, last, term = line.split()
            assert word == "synced", line
            synced.update(dict.fromkeys(range(int(first), int(last) + 1), int(term)))
    return synced


def _check(directory: str, synced: dict[int, int]) -> int:
    """Reopen the log; every synced index is there (or compacted under the snapshot)."""
    with Wal.open(directory, config=CONFIG) as wal:
        first, last = wal.first_index(), wal.last_index()
        for index, term in sorted(synced.items()):
            if index < first:
                continue  # compacted: covered by the snapshot
            assert index <= last, f"synced index {index} lost (last index {last})"
            assert wal.term(index) == term, index
        live = [index for index in sorted(synced) if index >= first]
        for entry in wal.entries(live[0], live[-1] + 1, 2**40) if live else []:
            if entry.index in synced:
                assert entry.term == synced[entry.index]
                repeats = len(entry.data) // 32
                assert entry.data == payload(entry.index, entry.term, repeats), entry.index
        hard_state = wal.hard_state()
        assert hard_state.commit <= last
        return last


def test_sigkill_during_group_commit_loses_no_synced_entry() -> None:
    rng = random.Random(4)
    synced: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="wal-crash-") as directory:
        last = 0
        for kill in range(KILLS):
            child = _start(directory, seed=kill)
            try:
                synced.update(_read_synced(child, rng.randrange(1, LINES_BEFORE_KILL_MAX)))
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                child.communicate()
            assert child.returncode == -signal.SIGKILL
            reopened_last = _check(directory, synced)
            assert reopened_last >= last
            last = reopened_last
        assert len(synced) > KILLS
