"""The process the crash test SIGKILLs: it appends and syncs in a loop, forever.

`python -m tests.real.storage.wal_child DIRECTORY SEED` opens (or creates) the log, takes a
new term, and then repeats: append a few entries of that term, set the hard state, now and
then snapshot and compact, `sync()`, and only then print `synced FIRST LAST TERM`. Every
index the parent reads from such a line must survive the kill. Entry data is a function of
(index, term) repeated a random number of times, so the parent can check it.
"""

from __future__ import annotations

import hashlib
import random
import sys

from raft import ConfState, Entry, HardState
from storage import Wal, WalConfig

CONFIG = WalConfig(
    segment_bytes_max=32 * 1024,
    record_bytes_max=4 * 1024,
    read_bytes_max=4 * 1024,
    cache_bytes_max=64 * 1024,
)
"""Small segments: a run of a few hundred syncs rolls over and compacts many times."""
CONF = ConfState(voters=(1,))


def payload(index: int, term: int, repeats: int) -> bytes:
    return hashlib.sha256(f"{index}:{term}".encode()).digest() * repeats


def main(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    wal = Wal.open(directory, CONF, config=CONFIG)
    term = wal.hard_state().term + 1
    wal.set_hard_state(HardState(term=term, vote=1, commit=wal.hard_state().commit))
    wal.sync()
    while True:
        first = wal.last_index() + 1
        last = first + rng.randrange(8)
        wal.append(
            [
                Entry(term=term, index=index, data=payload(index, term, rng.randrange(1, 40)))
                for index in range(first, last + 1)
            ]
        )
        wal.set_hard_state(HardState(term=term, vote=1, commit=last))
        if rng.random() < 0.05 and last - 20 > wal.snapshot().meta.index:
            wal.create_snapshot(last - 20, CONF, f"image at {last - 20}".encode())
            wal.compact(last - 30 if last - 30 >= wal.first_index() else last - 20)
        wal.sync()
        print(f"synced {first} {last} {term}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
