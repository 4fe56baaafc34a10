"""The whole replicated state machine of a worker: the key-value machine (membership,
addresses, keys) and the SQL machine (catalog, placement, versions), applied together.

An entry whose data starts with `SQL_ENTRY_MARK` is an SQL command; every other entry is
the key-value machine's (writes, no-ops, membership changes). Both halves advance one
applied index, and a snapshot holds both, so a restored worker applies every later entry
exactly as one that never stopped.

Invariant: `applied_index` is the index of the last entry applied to both halves; the
state is a pure function of the log prefix up to it.
"""

from __future__ import annotations

import msgspec

from cluster.kv import KvResult, KvStateMachine
from cluster.protocol import node_of
from cluster.sql_machine import SqlStateMachine, StoreWork
from cluster.sql_protocol import SqlResult, decode_command, is_sql_entry
from raft import ConfState, Entry

IMAGE_VERSION = 1


class _Image(msgspec.Struct, frozen=True, array_like=True):
    version: int
    kv: bytes
    sql: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Image)


class ClusterState:
    __slots__ = ("kv", "sql")

    def __init__(self, kv: KvStateMachine, sql: SqlStateMachine) -> None:
        self.kv = kv
        self.sql = sql

    @property
    def applied_index(self) -> int:
        return self.kv.applied_index

    @property
    def conf(self) -> ConfState:
        return self.kv.conf

    def members(self) -> tuple[int, ...]:
        """Node numbers of every voter and learner, sorted."""
        conf = self.kv.conf
        return tuple(sorted(node_of(member) for member in (*conf.voters, *conf.learners)))

    def apply(self, entry: Entry) -> KvResult | StoreWork | None:
        """Apply the next committed entry: a key-value result, the SQL command's store work,
        or None (no-op, membership change)."""
        if not is_sql_entry(entry.data):
            return self.kv.apply(entry)
        self.kv.apply(msgspec.structs.replace(entry, data=b""))  # moves the applied index
        try:
            command = decode_command(entry.data[1:])
        except msgspec.DecodeError as error:
            return StoreWork(entry.index, SqlResult(False, f"undecodable: {error}", "refused"))
        return self.sql.apply(entry.index, command, self.members())

    def snapshot(self) -> bytes:
        return _encoder.encode(_Image(IMAGE_VERSION, self.kv.snapshot(), self.sql.snapshot()))

    @classmethod
    def restore(cls, data: bytes, index: int, conf: ConfState, node: int) -> ClusterState:
        """The state a snapshot at `index` holds; empty `data` is the bootstrap state."""
        if not data:
            return cls(KvStateMachine.restore(b"", index, conf), SqlStateMachine(node))
        image = _decoder.decode(data)
        assert image.version == IMAGE_VERSION, image.version
        kv = KvStateMachine.restore(image.kv, index, conf)
        return cls(kv, SqlStateMachine.restore(image.sql, node))

    def close(self) -> None:
        self.sql.close()
