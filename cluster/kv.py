"""The replicated key-value state machine every worker applies the cluster log to.

Pure: no IO, no time, no randomness. Each NORMAL entry with data is one encoded
`KvCommand` (PUT, CAS or DELETE over str keys and bytes values); an empty entry is a new
leader's no-op; a CONF_CHANGE entry changes the membership the machine tracks, and the
address book of members (TCP), so a snapshot taken at the applied index records both as of
that index. Reads never enter the log: the worker serves them from `get` once the machine
has applied the read's index (ReadIndex) or at once (stale).

Exactly once: every write carries (client_id, request_id). Per client the machine keeps the
results of its last `RESULTS_PER_CLIENT_MAX` requests, so a write a client retries (after a
lost reply, or at a new leader) is answered from the table instead of applied twice, even
with many writes of one client in flight. A request id older than that window and not in
it is refused ("expired"), never applied. At most `CLIENTS_MAX` clients are remembered; the
one that wrote least recently is forgotten first.

Invariant: the machine's state at applied index i is a pure function of the bootstrap
snapshot and the log entries up to i, applied in strictly consecutive order; `snapshot()`
then `restore()` gives a machine that applies every later entry identically.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from cluster.protocol import KEY_BYTES_MAX, VALUE_BYTES_MAX, Address, KvCommand, KvOp
from raft import ConfChange, ConfChangeKind, ConfState, Entry, EntryKind, apply_conf_change

RESULTS_PER_CLIENT_MAX = 256
"""Results remembered per client: more than any client keeps writes in flight."""
CLIENTS_MAX = 4096
"""Clients whose results are remembered; beyond it the least recently writing goes."""
IMAGE_VERSION = 1

EXPIRED = "expired: the request id is older than the results kept for this client"


class KvResult(msgspec.Struct, frozen=True, array_like=True):
    """What one write did. `ok`: PUT/DELETE applied, CAS matched and applied."""

    ok: bool
    found: bool = False
    """DELETE: the key existed. CAS: the key existed before."""
    value: bytes | None = None
    """CAS that did not match: the current value (None: absent). Not kept for retries."""
    error: str | None = None
    """The command was refused, not applied (malformed, too large, expired id)."""


class _Session(msgspec.Struct, array_like=True):
    client_id: int
    floor: int
    """Every request id at or below this that is not in `results` has been forgotten."""
    results: list[tuple[int, KvResult]]
    """(request id, result), oldest applied first."""


class _Image(msgspec.Struct, frozen=True, array_like=True):
    version: int
    applied_index: int
    conf: ConfState
    items: dict[str, bytes]
    sessions: list[_Session]
    addresses: dict[int, Address]


_command_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(KvCommand)
_image_encoder = msgspec.msgpack.Encoder()
_image_decoder = msgspec.msgpack.Decoder(_Image)
_address_decoder = msgspec.msgpack.Decoder(tuple[str, int])


def encode_command(command: KvCommand) -> bytes:
    return _command_encoder.encode(command)


def encode_address(address: Address) -> bytes:
    """A ConfChange's context: where the added node's transport listens (TCP)."""
    return _command_encoder.encode(address)


def decode_address(context: bytes) -> Address | None:
    if not context:
        return None
    try:
        host, port = _address_decoder.decode(context)
    except msgspec.DecodeError:
        return None
    return host, port


class _Results:
    """One client's window of results, keyed by request id."""

    __slots__ = ("floor", "by_request")

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self.by_request: OrderedDict[int, KvResult] = OrderedDict()

    def record(self, request_id: int, result: KvResult) -> None:
        self.by_request[request_id] = result
        while len(self.by_request) > RESULTS_PER_CLIENT_MAX:
            forgotten, _ = self.by_request.popitem(last=False)
            self.floor = max(self.floor, forgotten)


class KvStateMachine:
    """Keys -> values, per-client results, membership and member addresses, applied index."""

    __slots__ = ("applied_index", "conf", "addresses", "_items", "_sessions")

    def __init__(self, applied_index: int = 0, conf: ConfState = ConfState()) -> None:  # noqa: B008
        self.applied_index = applied_index
        self.conf = conf
        self.addresses: dict[int, Address] = {}
        """Raft id -> where its transport listens, for members added with an address."""
        self._items: dict[str, bytes] = {}
        self._sessions: OrderedDict[int, _Results] = OrderedDict()

    # ---- reads ----

    def get(self, key: str) -> tuple[bytes | None, bool]:
        """(value, found) as of `applied_index`."""
        value = self._items.get(key)
        return value, value is not None

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> dict[str, bytes]:
        """A copy of every key and value (for tests and tools)."""
        return dict(self._items)

    # ---- apply ----

    def apply(self, entry: Entry) -> KvResult | None:
        """Apply the next committed entry; the write's result, or None for a no-op or a
        membership change."""
        assert entry.index == self.applied_index + 1, (entry.index, self.applied_index)
        self.applied_index = entry.index
        if entry.kind == EntryKind.CONF_CHANGE:
            self._apply_conf_change(ConfChange.decode(entry.data))
            return None
        if not entry.data:
            return None
        try:
            command = _command_decoder.decode(entry.data)
        except msgspec.DecodeError:
            return KvResult(ok=False, error="undecodable command")
        return self.apply_command(command)

    def apply_command(self, command: KvCommand) -> KvResult:
        """One write, at most once per (client_id, request_id)."""
        session = self._sessions.get(command.client_id)
        if session is not None:
            self._sessions.move_to_end(command.client_id)
            cached = session.by_request.get(command.request_id)
            if cached is not None:
                return cached
            if command.request_id <= session.floor:
                return KvResult(ok=False, error=EXPIRED)
        else:
            session = self._new_session(command.client_id)
        result = self._execute(command)
        session.record(command.request_id, _without_value(result))
        return result

    def _new_session(self, client_id: int) -> _Results:
        session = _Results()
        self._sessions[client_id] = session
        while len(self._sessions) > CLIENTS_MAX:
            self._sessions.popitem(last=False)
        return session

    def _execute(self, command: KvCommand) -> KvResult:
        refusal = _refusal(command)
        if refusal is not None:
            return KvResult(ok=False, error=refusal)
        items, key = self._items, command.key
        current = items.get(key)
        if command.op == KvOp.PUT:
            assert command.value is not None
            items[key] = command.value
            return KvResult(ok=True, found=current is not None)
        if command.op == KvOp.DELETE:
            items.pop(key, None)
            return KvResult(ok=True, found=current is not None)
        assert command.op == KvOp.CAS, command.op
        if current != command.expected:
            return KvResult(ok=False, found=current is not None, value=current)
        if command.value is None:
            items.pop(key, None)
        else:
            items[key] = command.value
        return KvResult(ok=True, found=current is not None)

    def _apply_conf_change(self, change: ConfChange) -> None:
        self.conf = apply_conf_change(self.conf, change)
        if change.kind == ConfChangeKind.REMOVE:
            self.addresses.pop(change.node, None)
            return
        address = decode_address(change.context)
        if address is not None:
            self.addresses[change.node] = address

    # ---- snapshots ----

    def snapshot(self) -> bytes:
        sessions = [
            _Session(client_id, results.floor, list(results.by_request.items()))
            for client_id, results in self._sessions.items()
        ]
        image = _Image(
            version=IMAGE_VERSION,
            applied_index=self.applied_index,
            conf=self.conf,
            items=self._items,
            sessions=sessions,
            addresses=self.addresses,
        )
        return _image_encoder.encode(image)

    @classmethod
    def restore(cls, data: bytes, index: int, conf: ConfState) -> KvStateMachine:
        """The machine a snapshot at `index` with membership `conf` holds. Empty `data` is
        the bootstrap snapshot (or none at all): no keys."""
        machine = cls(applied_index=index, conf=conf)
        if not data:
            return machine
        image = _image_decoder.decode(data)
        assert image.version == IMAGE_VERSION, image.version
        assert image.applied_index == index, (image.applied_index, index)
        machine._items = dict(image.items)
        machine.addresses = dict(image.addresses)
        for session in image.sessions:
            results = _Results(session.floor)
            results.by_request.update(session.results)
            machine._sessions[session.client_id] = results
        return machine


def _refusal(command: KvCommand) -> str | None:
    """Why a write cannot apply (checked identically on every node), or None."""
    if len(command.key.encode()) > KEY_BYTES_MAX:
        return f"key longer than {KEY_BYTES_MAX} bytes"
    for value in (command.value, command.expected):
        if value is not None and len(value) > VALUE_BYTES_MAX:
            return f"value longer than {VALUE_BYTES_MAX} bytes"
    if command.op == KvOp.PUT and command.value is None:
        return "PUT needs a value"
    if command.op not in (KvOp.PUT, KvOp.CAS, KvOp.DELETE):
        return f"{command.op.name} is not a write"
    return None


def _without_value(result: KvResult) -> KvResult:
    """The result kept for retries: a CAS mismatch's current value is not worth the memory."""
    if result.value is None:
        return result
    return KvResult(ok=result.ok, found=result.found, error=result.error)
