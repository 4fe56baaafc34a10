"""The replicated state machine the simulator runs on every node: a map of registers.

Each NORMAL log entry with data is one client write `Op(op_id, key, value)`; an empty
entry is a leader's no-op; a CONF_CHANGE entry changes the membership this machine tracks
(so a snapshot taken at its applied index records the configuration as of that index).
Besides the registers the machine keeps a chained hash of every entry it has applied,
carried inside its snapshots, so two machines at the same applied index can be compared in
O(1) even when one of them was rebuilt from a snapshot.

Invariant: the machine's state at applied index i is a pure function of the log entries
up to i (a founder's log starts after the empty bootstrap snapshot at index 1); entries are applied in strictly consecutive order; snapshot bytes are canonical
(sorted keys), so equal states encode to equal bytes.
"""

from __future__ import annotations

import hashlib

import msgspec

from raft import ConfChange, ConfState, Entry, EntryKind, Snapshot, apply_conf_change

CHAIN_EMPTY = b""
"""The chain hash before any entry: at index 0 (a joiner) and at the bootstrap index."""

CHAIN_DIGEST_BYTES = 16


def chain_hash(previous: bytes, entry: Entry) -> bytes:
    """Hash of a log prefix ending in `entry`, given the hash of the prefix before it."""
    hasher = hashlib.blake2b(previous, digest_size=CHAIN_DIGEST_BYTES)
    hasher.update(entry.index.to_bytes(8, "little"))
    hasher.update(entry.term.to_bytes(8, "little"))
    hasher.update(bytes((int(entry.kind),)))
    hasher.update(entry.data)
    return hasher.digest()


class Op(msgspec.Struct, frozen=True, array_like=True):
    """One client write: set register `key` to `value`. `op_id` is unique per proposal."""

    op_id: int
    key: int
    value: int


class _Image(msgspec.Struct, frozen=True, array_like=True):
    applied_index: int
    chain: bytes
    registers: tuple[tuple[int, int, int], ...]
    """(key, value, op_id), sorted by key."""


_op_encoder = msgspec.msgpack.Encoder()
_op_decoder = msgspec.msgpack.Decoder(Op)
_image_decoder = msgspec.msgpack.Decoder(_Image)


def encode_op(op: Op) -> bytes:
    return _op_encoder.encode(op)


def decode_op(entry: Entry) -> Op | None:
    """The client write an entry carries, or None for a no-op or a membership change."""
    if entry.kind != EntryKind.NORMAL or not entry.data:
        return None
    return _op_decoder.decode(entry.data)


class RegisterMachine:
    """Registers key -> (value, op_id), plus the applied index, chain hash and membership."""

    __slots__ = ("applied_index", "chain", "conf", "_registers")

    def __init__(self, conf: ConfState) -> None:
        self.applied_index = 0
        self.chain = CHAIN_EMPTY
        self.conf = conf
        self._registers: dict[int, tuple[int, int]] = {}

    @staticmethod
    def from_snapshot(snapshot: Snapshot) -> RegisterMachine:
        machine = RegisterMachine(snapshot.meta.conf)
        machine.restore(snapshot)
        return machine

    def value(self, key: int) -> int | None:
        register = self._registers.get(key)
        return None if register is None else register[0]

    def apply(self, entry: Entry) -> Op | None:
        """Apply the next entry; returns the client write it carried, if any."""
        assert entry.index == self.applied_index + 1, (entry.index, self.applied_index)
        op = decode_op(entry)
        if op is not None:
            self._registers[op.key] = (op.value, op.op_id)
        elif entry.kind == EntryKind.CONF_CHANGE:
            self.conf = apply_conf_change(self.conf, ConfChange.decode(entry.data))
        self.chain = chain_hash(self.chain, entry)
        self.applied_index = entry.index
        return op

    def snapshot_bytes(self) -> bytes:
        registers = tuple(
            (key, value, op_id) for key, (value, op_id) in sorted(self._registers.items())
        )
        return _op_encoder.encode(_Image(self.applied_index, self.chain, registers))

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole state by a snapshot image (empty data: the bootstrap state)."""
        self.conf = snapshot.meta.conf
        self.applied_index = snapshot.meta.index
        # A mismatch between the image and `snapshot.meta` is not asserted here: the checker
        # compares the restored chain hash with the one every other node had at that index.
        if not snapshot.data:
            self.chain = CHAIN_EMPTY
            self._registers = {}
            return
        image = _image_decoder.decode(snapshot.data)
        self.chain = image.chain
        self._registers = {key: (value, op_id) for key, value, op_id in image.registers}
