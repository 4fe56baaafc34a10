"""The frame codec: what goes in comes back out, and every bad frame is refused by type.

Round trips cover every Raft message shape and arbitrary registered Structs (built by
hypothesis from a small grammar of field types). Each refusal path is checked for its
typed error and its `reason` (the name transports count it under). The fuzz tests hold
the codec to its promise: `decode` raises only `RemoteProtocolError` subclasses, whatever
bytes it is given.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipc.errors
from ipc.codec import (
    FRAME_BYTES_MAX_DEFAULT,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    NODE_ID_MAX,
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_MIN,
    Codec,
    Frame,
    cluster_id_for,
)
from ipc.errors import (
    CorruptFrame,
    FrameTooLarge,
    LocalError,
    MalformedBody,
    MessageTooLarge,
    NewerVersion,
    RemoteProtocolError,
    TransportError,
    TruncatedFrame,
    UnknownTag,
    WrongCluster,
)
from raft import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageType,
    SnapshotMeta,
)
from tests.conformance.harness import TEST_MESSAGES, Header, Ping

CLUSTER = "codec-test"
CLUSTER_ID = cluster_id_for(CLUSTER)
MESSAGES: dict[str, type[msgspec.Struct]] = {**TEST_MESSAGES, "raft.message": Message}
SOURCE, TARGET = 3, 7

FUZZ_SETTINGS = settings(
    derandomize=True,
    max_examples=300,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _codec(frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> Codec:
    return Codec(CLUSTER_ID, MESSAGES, frame_bytes_max=frame_bytes_max)


def _raw_frame(
    body: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
    cluster_id: int = CLUSTER_ID,
    body_bytes: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A frame built by hand, so each header field can be made wrong on its own."""
    fields = (
        magic,
        version,
        flags,
        cluster_id,
        SOURCE,
        TARGET,
        len(body) if body_bytes is None else body_bytes,
    )
    if crc is None:
        crc = _checksum(HEADER.pack(*fields, 0), body)
    return HEADER.pack(*fields, crc) + body


def _checksum(header: bytes, body: bytes) -> int:
    """The codec's checksum: the 24 header bytes before the checksum field, then the body."""
    return zlib.crc32(body, zlib.crc32(header[: HEADER_BYTES - 4]))


def _body(*items: Any) -> bytes:
    return msgspec.msgpack.encode(list(items))


def _refusal(codec: Codec, frame: bytes | bytearray | memoryview) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(frame)
    return caught.value


# ---- round trips ----

CONF = ConfState(voters=(1, 2, 3), learners=(4,))
META = SnapshotMeta(index=41, term=5, conf=CONF)
ENTRIES = (
    Entry(term=5, index=40),
    Entry(term=5, index=41, data=b"\x00payload\xff" * 10),
    Entry(
        term=6,
        index=42,
        kind=EntryKind.CONF_CHANGE,
        data=ConfChange(ConfChangeKind.ADD_LEARNER, 4, b"ctx").encode(),
    ),
)
RAFT_MESSAGES = [
    Message(MessageType.APPEND, 1, 2, 6, log_term=5, index=39, entries=ENTRIES, commit=40),
    Message(MessageType.APPEND, 1, 2, 6, log_term=5, index=42, commit=42),
    Message(MessageType.APPEND_RESPONSE, 2, 1, 6, index=42),
    Message(
        MessageType.APPEND_RESPONSE, 2, 1, 6, index=39, reject=True, reject_hint=30, hint_term=4
    ),
    Message(MessageType.VOTE, 2, 1, 7, log_term=6, index=42, context=b"transfer"),
    Message(MessageType.VOTE_RESPONSE, 1, 2, 7, reject=True),
    Message(MessageType.PRE_VOTE, 2, 3, 8, log_term=6, index=42),
    Message(MessageType.PRE_VOTE_RESPONSE, 3, 2, 8),
    Message(MessageType.HEARTBEAT, 1, 3, 6, commit=40, context=b"\x01\x02read-round"),
    Message(MessageType.HEARTBEAT_RESPONSE, 3, 1, 6, context=b"\x01\x02read-round"),
    Message(
        MessageType.SNAPSHOT,
        1,
        4,
        6,
        snapshot_meta=META,
        snapshot_size=1 << 40,
        chunk_offset=1 << 20,
        chunk=bytes(range(256)) * 16,
        chunk_done=False,
    ),
    Message(
        MessageType.SNAPSHOT,
        1,
        4,
        6,
        snapshot_meta=META,
        snapshot_size=3,
        chunk=b"end",
        chunk_done=True,
    ),
    Message(
        MessageType.SNAPSHOT_RESPONSE,
        4,
        1,
        6,
        snapshot_meta=SnapshotMeta(index=41),
        chunk_offset=4096,
    ),
    Message(MessageType.SNAPSHOT_RESPONSE, 4, 1, 6, snapshot_meta=META, reject=True),
    Message(MessageType.TIMEOUT_NOW, 1, 2, 6),
    Message(MessageType.READ_INDEX, 3, 1, 6, context=b"request-17"),
    Message(MessageType.READ_INDEX_RESPONSE, 1, 3, 6, index=42, context=b"request-17"),
]


def test_the_sample_covers_every_raft_message_type() -> None:
    assert {message.type for message in RAFT_MESSAGES} == set(MessageType)


@pytest.mark.parametrize("message", RAFT_MESSAGES, ids=lambda m: m.type.name)
def test_every_raft_message_shape_round_trips(message: Message) -> None:
    codec = _codec()
    frame = codec.encode(SOURCE, TARGET, message)
    assert codec.decode(frame) == Frame(SOURCE, TARGET, message)
    decoded = codec.decode(frame).message
    assert type(decoded) is Message
    assert type(decoded.type) is MessageType
    assert all(type(entry.kind) is EntryKind for entry in decoded.entries)


small_ints = st.integers(min_value=0, max_value=2**63 - 1)
conf_states = st.builds(
    ConfState,
    voters=st.lists(small_ints, max_size=5).map(tuple),
    learners=st.lists(small_ints, max_size=3).map(tuple),
)
snapshot_metas = st.builds(SnapshotMeta, index=small_ints, term=small_ints, conf=conf_states)
entries = st.builds(
    Entry,
    term=small_ints,
    index=small_ints,
    kind=st.sampled_from(list(EntryKind)),
    data=st.binary(max_size=64),
)
raft_messages = st.builds(
    Message,
    type=st.sampled_from(list(MessageType)),
    source=small_ints,
    target=small_ints,
    term=small_ints,
    log_term=small_ints,
    index=small_ints,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=small_ints,
    reject=st.booleans(),
    reject_hint=small_ints,
    hint_term=small_ints,
    context=st.binary(max_size=16),
    snapshot_meta=st.none() | snapshot_metas,
    snapshot_size=small_ints,
    chunk_offset=small_ints,
    chunk=st.binary(max_size=256),
    chunk_done=st.booleans(),
)


@FUZZ_SETTINGS
@given(
    message=raft_messages, source=st.integers(0, NODE_ID_MAX), target=st.integers(0, NODE_ID_MAX)
)
def test_any_raft_message_round_trips(message: Message, source: int, target: int) -> None:
    codec = _codec()
    assert codec.decode(codec.encode(source, target, message)) == Frame(source, target, message)


# A small grammar of field types, each with a strategy for its values. Floats exclude NaN
# only because NaN != NaN would make the equality check meaningless.
_LEAVES: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (int, st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    (float, st.floats(allow_nan=False)),
    (str, st.text(max_size=12)),
    (bytes, st.binary(max_size=24)),
    (bool, st.booleans()),
]


# Generic aliases built at run time from drawn types (mypy cannot check those as types).
_TUPLE: Any = tuple
_LIST: Any = list
_DICT: Any = dict


@st.composite
def _field_types(draw: st.DrawFn, depth: int = 0) -> tuple[Any, st.SearchStrategy[Any]]:
    kind = draw(st.sampled_from(["leaf", "leaf", "optional", "tuple", "list", "dict", "struct"]))
    if kind == "leaf" or depth >= 2:
        return draw(st.sampled_from(_LEAVES))
    inner, values = draw(_field_types(depth + 1))
    if kind == "optional":
        return inner | None, st.none() | values
    if kind == "tuple":
        return _TUPLE[inner, ...], st.lists(values, max_size=4).map(tuple)
    if kind == "list":
        return _LIST[inner], st.lists(values, max_size=4)
    if kind == "dict":
        return _DICT[str, inner], st.dictionaries(st.text(max_size=6), values, max_size=3)
    return draw(_struct_types(depth + 1))


@st.composite
def _struct_types(draw: st.DrawFn, depth: int = 0) -> tuple[Any, st.SearchStrategy[Any]]:
    fields = draw(st.lists(_field_types(depth), min_size=0, max_size=5))
    struct_type = msgspec.defstruct(
        f"Fuzzed{depth}",
        [(f"f{index}", field_type) for index, (field_type, _) in enumerate(fields)],
        array_like=draw(st.booleans()),
        frozen=draw(st.booleans()),
    )
    return struct_type, st.builds(struct_type, *(values for _, values in fields))


@st.composite
def _registered_messages(draw: st.DrawFn) -> tuple[type[msgspec.Struct], msgspec.Struct]:
    struct_type, values = draw(_struct_types())
    return struct_type, draw(values)


@FUZZ_SETTINGS
@given(registered=_registered_messages(), tag=st.text(min_size=1, max_size=16))
def test_any_registered_struct_round_trips(
    registered: tuple[type[msgspec.Struct], msgspec.Struct], tag: str
) -> None:
    struct_type, message = registered
    codec = Codec(CLUSTER_ID)
    codec.register(tag, struct_type)
    decoded = codec.decode(codec.encode(SOURCE, TARGET, message))
    assert decoded == Frame(SOURCE, TARGET, message)
    assert type(decoded.message) is struct_type


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_decode_takes_any_buffer(wrap: Any) -> None:
    codec = _codec()
    frame = codec.encode(SOURCE, TARGET, Ping(1, b"x"))
    assert codec.decode(wrap(frame)) == Frame(SOURCE, TARGET, Ping(1, b"x"))


def test_node_ids_at_both_ends_of_their_range_round_trip() -> None:
    codec = _codec()
    for source, target in [(0, NODE_ID_MAX), (NODE_ID_MAX, 0)]:
        assert codec.decode(codec.encode(source, target, Header("h"))).source == source


def test_decode_header_reads_the_header_alone() -> None:
    codec = _codec()
    frame = codec.encode(SOURCE, TARGET, Ping(9, b"abc"))
    header = codec.decode_header(frame[:HEADER_BYTES])
    assert (header.version, header.flags, header.cluster_id) == (PROTOCOL_VERSION, 0, CLUSTER_ID)
    assert (header.source, header.target) == (SOURCE, TARGET)
    assert header.frame_bytes == len(frame)
    assert header.crc == _checksum(frame[:HEADER_BYTES], frame[HEADER_BYTES:])


def test_the_header_layout_is_fixed() -> None:
    """Peers of other builds read these bytes: the layout is part of the protocol."""
    frame = _codec().encode(0x01020304, 0x0A0B0C0D, Header("n"))
    assert HEADER_BYTES == 28
    assert frame[:2] == b"DC"
    assert frame[2] == PROTOCOL_VERSION
    assert frame[4:12] == CLUSTER_ID.to_bytes(8, "little")
    assert frame[12:20] == bytes([4, 3, 2, 1, 0x0D, 0x0C, 0x0B, 0x0A])
    assert struct.unpack_from("<I", frame, 20)[0] == len(frame) - HEADER_BYTES


# ---- registration ----


def test_an_unregistered_type_is_a_programming_error() -> None:
    class Unknown(msgspec.Struct):
        value: int = 0

    codec = _codec()
    assert not codec.knows(Unknown)
    with pytest.raises(KeyError):
        codec.encode(SOURCE, TARGET, Unknown())


def test_a_message_registered_only_by_the_sender_is_an_unknown_tag_to_the_receiver() -> None:
    class Later(msgspec.Struct):
        value: int = 0

    sender, receiver = _codec(), _codec()
    sender.register("test.later", Later)
    assert sender.knows(Later) and not receiver.knows(Later)
    frame = sender.encode(SOURCE, TARGET, Later(5))
    assert isinstance(_refusal(receiver, frame), UnknownTag)
    receiver.register("test.later", Later)
    assert receiver.decode(frame).message == Later(5)


def test_registering_the_same_pair_twice_is_harmless() -> None:
    codec = _codec()
    codec.register("test.ping", Ping)
    assert codec.decode(codec.encode(SOURCE, TARGET, Ping(1))).message == Ping(1)


def test_a_tag_cannot_name_two_types() -> None:
    class Other(msgspec.Struct):
        value: int = 0

    codec = _codec()
    with pytest.raises(AssertionError):
        codec.register("test.ping", Other)


def test_a_type_cannot_have_two_tags() -> None:
    codec = _codec()
    with pytest.raises(AssertionError):
        codec.register("test.ping-again", Ping)


# ---- refusals, one per path ----


def _assert_refused(
    error: RemoteProtocolError, kind: type[RemoteProtocolError], reason: str
) -> None:
    assert type(error) is kind, error
    assert error.reason == reason


@pytest.mark.parametrize("length", range(HEADER_BYTES))
def test_a_truncated_header_is_refused(length: int) -> None:
    frame = _codec().encode(SOURCE, TARGET, Ping(1))
    _assert_refused(_refusal(_codec(), frame[:length]), TruncatedFrame, "truncated_frame")
    with pytest.raises(TruncatedFrame):
        _codec().decode_header(frame[:length])


def test_a_truncated_body_is_refused() -> None:
    frame = _codec().encode(SOURCE, TARGET, Ping(1, b"payload"))
    for length in range(HEADER_BYTES, len(frame)):
        _assert_refused(_refusal(_codec(), frame[:length]), TruncatedFrame, "truncated_frame")


def test_trailing_bytes_are_refused() -> None:
    frame = _codec().encode(SOURCE, TARGET, Ping(1))
    _assert_refused(_refusal(_codec(), frame + b"\x00"), CorruptFrame, "corrupt_frame")
    _assert_refused(_refusal(_codec(), frame + frame), CorruptFrame, "corrupt_frame")


@pytest.mark.parametrize("magic", [b"CD", b"\x00\x00", b"dc", b"D\x00"])
def test_bad_magic_is_refused(magic: bytes) -> None:
    frame = _raw_frame(_body("test.ping", Ping(1)), magic=magic)
    _assert_refused(_refusal(_codec(), frame), CorruptFrame, "corrupt_frame")


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 255])
def test_a_newer_version_is_refused(version: int) -> None:
    frame = _raw_frame(_body("test.ping", Ping(1)), version=version)
    _assert_refused(_refusal(_codec(), frame), NewerVersion, "newer_version")


def test_a_version_older_than_the_minimum_is_refused() -> None:
    assert PROTOCOL_VERSION_MIN >= 1, "no older version exists to refuse"
    frame = _raw_frame(_body("test.ping", Ping(1)), version=PROTOCOL_VERSION_MIN - 1)
    _assert_refused(_refusal(_codec(), frame), CorruptFrame, "corrupt_frame")


def test_every_understood_version_is_accepted() -> None:
    for version in range(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION + 1):
        frame = _raw_frame(_body("test.ping", Ping(1)), version=version)
        assert _codec().decode(frame).message == Ping(1)


def test_a_frame_of_another_cluster_is_refused() -> None:
    frame = Codec(cluster_id_for("someone-else"), MESSAGES).encode(SOURCE, TARGET, Ping(1))
    _assert_refused(_refusal(_codec(), frame), WrongCluster, "wrong_cluster")


def test_an_oversize_declared_length_is_refused_from_the_header_alone() -> None:
    """A stream reader learns this before buffering the body."""
    codec = _codec(frame_bytes_max=1024)
    limit_body = 1024 - HEADER_BYTES
    header = _raw_frame(b"", body_bytes=limit_body + 1)
    with pytest.raises(FrameTooLarge) as caught:
        codec.decode_header(header)
    assert caught.value.reason == "frame_too_large"
    _assert_refused(_refusal(codec, header), FrameTooLarge, "frame_too_large")
    huge = _raw_frame(b"", body_bytes=2**32 - 1)
    _assert_refused(_refusal(codec, huge), FrameTooLarge, "frame_too_large")
    assert codec.decode_header(_raw_frame(b"", body_bytes=limit_body)).frame_bytes == 1024


def test_a_frame_of_exactly_the_maximum_is_accepted() -> None:
    probe = _codec().encode(SOURCE, TARGET, Ping(1, b""))
    codec = _codec(frame_bytes_max=4096)
    # An empty bin is a bin8 (1 length byte); one of 256..65535 bytes is a bin16 (2).
    payload_bytes = 4096 - len(probe) - 1
    frame = codec.encode(SOURCE, TARGET, Ping(1, bytes(payload_bytes)))
    assert len(frame) == 4096
    assert codec.decode(frame).message == Ping(1, bytes(payload_bytes))
    with pytest.raises(MessageTooLarge):
        codec.encode(SOURCE, TARGET, Ping(1, bytes(payload_bytes + 1)))


def test_an_oversize_message_is_refused_on_encode_as_our_fault() -> None:
    codec = _codec(frame_bytes_max=1024)
    with pytest.raises(MessageTooLarge) as caught:
        codec.encode(SOURCE, TARGET, Ping(1, bytes(1024)))
    assert caught.value.reason == "message_too_large"
    assert isinstance(caught.value, LocalError)
    assert not isinstance(caught.value, RemoteProtocolError)


def test_a_checksum_mismatch_is_refused() -> None:
    frame = bytearray(_codec().encode(SOURCE, TARGET, Ping(1, b"payload")))
    frame[-1] ^= 0x01
    _assert_refused(_refusal(_codec(), frame), CorruptFrame, "corrupt_frame")
    body = _body("test.ping", Ping(1))
    wrong_crc = _raw_frame(body, crc=_checksum(_raw_frame(body), body) ^ 0x8000_0000)
    _assert_refused(_refusal(_codec(), wrong_crc), CorruptFrame, "corrupt_frame")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgspec.msgpack.encode({"tag": "test.ping"}),
        msgspec.msgpack.encode(["test.ping"]),
        msgspec.msgpack.encode(["test.ping", {"seq": 1}, "extra"]),
        msgspec.msgpack.encode([1, {"seq": 1}]),
        msgspec.msgpack.encode([b"test.ping", {"seq": 1}]),
        msgspec.msgpack.encode("test.ping"),
        msgspec.msgpack.encode(["test.ping", {"seq": 1}]) + b"\x00",  # bytes after the pair
        msgspec.msgpack.encode(["test.ping", {"seq": 1}])[:-1],  # the pair cut short
    ],
    ids=[
        "empty",
        "never-used-byte",
        "map",
        "one-item",
        "three-items",
        "int-tag",
        "bytes-tag",
        "bare-string",
        "trailing-in-body",
        "truncated-in-body",
    ],
)
def test_a_body_that_is_not_a_tag_message_pair_is_refused(body: bytes) -> None:
    _assert_refused(_refusal(_codec(), _raw_frame(body)), MalformedBody, "malformed_body")


@pytest.mark.parametrize("tag", ["test.nope", "", "x" * 65, "TEST.PING", "test.ping "])
def test_an_unknown_tag_is_refused(tag: str) -> None:
    frame = _raw_frame(_body(tag, {"seq": 1}))
    _assert_refused(_refusal(_codec(), frame), UnknownTag, "unknown_tag")


@pytest.mark.parametrize(
    "message",
    [
        {"seq": "one"},
        {"payload": b"no seq"},
        {"seq": 1, "payload": "text not bytes"},
        [1, b""],
        None,
        3,
        {"seq": 1.5},
    ],
    ids=[
        "wrong-field-type",
        "missing-field",
        "wrong-payload-type",
        "array-for-map",
        "nil",
        "int",
        "float-for-int",
    ],
)
def test_a_body_that_does_not_decode_as_its_tags_type_is_refused(message: Any) -> None:
    frame = _raw_frame(_body("test.ping", message))
    _assert_refused(_refusal(_codec(), frame), MalformedBody, "malformed_body")


def test_a_raft_message_with_an_unknown_type_is_refused() -> None:
    fields = list(msgspec.to_builtins(Message(MessageType.APPEND, 1, 2, 3)))
    fields[0] = 99
    frame = _raw_frame(_body("raft.message", fields))
    _assert_refused(_refusal(_codec(), frame), MalformedBody, "malformed_body")


def test_the_receiver_keeps_working_after_a_refusal() -> None:
    codec = _codec()
    good = codec.encode(SOURCE, TARGET, Ping(2))
    for bad in [b"", good[:-1], good + b"\x00", _raw_frame(b"\xc1")]:
        _refusal(codec, bad)
        assert codec.decode(good).message == Ping(2)


# These bodies make msgspec raise RecursionError (nesting deeper than the interpreter's
# recursion limit, even inside a value the envelope only skips as Raw) and
# UnicodeDecodeError (a str that is not UTF-8), neither a DecodeError. One 8 KiB mq
# message carries either.
HOSTILE_BODIES = [
    b"\x92\xa9test.ping" + b"\x91" * 2_000 + b"\xc0",
    b"\x92\xa9test.ping" + b"\x81\xa1k" * 2_000 + b"\xc0",
    b"\x92\xa2\xff\xfe\x80",
    b"\x92\xabtest.header\x81\xa4name\xa2\xff\xfe",
    b"\x92\xabtest.header\x81\xa2\xff\xfe\xa1a",
]


@pytest.mark.parametrize(
    "body",
    HOSTILE_BODIES,
    ids=["nested-arrays", "nested-maps", "bad-utf8-tag", "bad-utf8-field", "bad-utf8-key"],
)
def test_hostile_bodies_are_refused_as_malformed(body: bytes) -> None:
    _assert_refused(_refusal(_codec(), _raw_frame(body)), MalformedBody, "malformed_body")


# ---- fuzz: decode raises only RemoteProtocolError ----


def _decode_refuses_or_accepts(codec: Codec, frame: bytes) -> None:
    """Either a Frame or a RemoteProtocolError: anything else escapes this helper."""
    try:
        decoded = codec.decode(frame)
    except RemoteProtocolError:
        return
    assert isinstance(decoded, Frame)


@FUZZ_SETTINGS
@given(frame=st.binary(max_size=256))
def test_decode_of_arbitrary_bytes_raises_only_remote_protocol_errors(frame: bytes) -> None:
    _decode_refuses_or_accepts(_codec(), frame)


@FUZZ_SETTINGS
@given(body=st.binary(max_size=256))
def test_decode_of_arbitrary_bodies_behind_a_valid_header(body: bytes) -> None:
    """Random bytes rarely pass the header; this reaches the body decoder directly."""
    _decode_refuses_or_accepts(_codec(), _raw_frame(body))


@FUZZ_SETTINGS
@given(tag=st.sampled_from(sorted(MESSAGES)), message=st.binary(max_size=64))
def test_decode_of_a_known_tag_and_arbitrary_message_bytes(tag: str, message: bytes) -> None:
    body = b"\x92" + msgspec.msgpack.encode(tag) + message
    _decode_refuses_or_accepts(_codec(), _raw_frame(body))


# Raw msgpack tokens, spliced without regard to grammar: container headers whose counts
# need not match, strings whose bytes need not be UTF-8, runs of nesting deeper than any
# decoder should recurse, the real tags, and plain noise.
_msgpack_tokens = st.one_of(
    st.integers(0, 15).map(lambda count: bytes([0x90 | count])),
    st.integers(0, 15).map(lambda count: bytes([0x80 | count])),
    st.binary(max_size=31).map(lambda text: bytes([0xA0 | len(text)]) + text),
    st.sampled_from([msgspec.msgpack.encode(tag) for tag in sorted(MESSAGES)]),
    st.integers(1, 3_000).map(lambda depth: b"\x91" * depth),
    st.binary(max_size=8),
)


@FUZZ_SETTINGS
@given(tokens=st.lists(_msgpack_tokens, max_size=12))
def test_decode_of_spliced_msgpack_tokens(tokens: list[bytes]) -> None:
    _decode_refuses_or_accepts(_codec(), _raw_frame(b"\x92" + b"".join(tokens)))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ_SETTINGS
@given(tag=st.sampled_from(sorted(MESSAGES)), value=msgpack_values)
def test_decode_of_well_formed_msgpack_of_the_wrong_shape(tag: str, value: Any) -> None:
    _decode_refuses_or_accepts(_codec(), _raw_frame(_body(tag, value)))


_valid_frames = st.one_of(
    raft_messages,
    st.builds(Ping, st.integers(0, 2**63), st.binary(max_size=32)),
    st.builds(Header, st.text(max_size=16), st.integers(0, 2**63)),
).map(lambda message: _codec().encode(SOURCE, TARGET, message))


@st.composite
def _damaged_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(_valid_frames))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(frame) - 1))
        frame[position] ^= draw(st.integers(1, 255))
    return bytes(frame)


@FUZZ_SETTINGS
@given(frame=_damaged_frames())
def test_decode_of_valid_frames_with_flipped_bytes(frame: bytes) -> None:
    _decode_refuses_or_accepts(_codec(), frame)


@FUZZ_SETTINGS
@given(frame=_valid_frames, data=st.data())
def test_decode_of_truncated_valid_frames_is_always_refused(
    frame: bytes, data: st.DataObject
) -> None:
    length = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(TruncatedFrame):
        _codec().decode(frame[:length])


@FUZZ_SETTINGS
@given(frame=_valid_frames, data=st.data())
def test_a_damaged_body_is_never_accepted(frame: bytes, data: st.DataObject) -> None:
    """The checksum covers every body byte: one flipped byte there is always refused."""
    position = data.draw(st.integers(HEADER_BYTES, len(frame) - 1))
    damaged = bytearray(frame)
    damaged[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptFrame):
        _codec().decode(damaged)


# ---- cluster ids and the error taxonomy ----


def test_cluster_id_derivation_is_fixed() -> None:
    """Peers built from other commits must agree on it: a change breaks every cluster."""
    assert cluster_id_for("conformance") == 0xE6D954E192922410
    assert cluster_id_for("dcluster") == 0x20A9CC1907CF6F3A
    assert cluster_id_for(CLUSTER) == cluster_id_for("codec-test")


@given(name=st.text(min_size=1, max_size=40))
@settings(derandomize=True, database=None, max_examples=200)
def test_cluster_ids_are_64_bit(name: str) -> None:
    assert 0 <= cluster_id_for(name) < 2**64


def test_cluster_ids_tell_similar_names_apart() -> None:
    names = ["a", "b", "A", "a ", "conformance", "conformance-1", "conformance-2", "é", "e"]
    assert len({cluster_id_for(name) for name in names}) == len(names)
    assert any(cluster_id_for(name) >= 2**63 for name in ["a", "b", "c", "d", "e", "f", "g"])


def _error_classes() -> list[type[TransportError]]:
    return sorted(
        (
            value
            for value in vars(ipc.errors).values()
            if isinstance(value, type) and issubclass(value, TransportError)
        ),
        key=lambda cls: cls.__name__,
    )


def test_every_error_has_its_own_reason() -> None:
    reasons = [cls.reason for cls in _error_classes()]
    assert len(reasons) == len(set(reasons)), reasons
    assert all(reason and reason == reason.lower() for reason in reasons)


def test_every_error_names_whose_fault_it_is() -> None:
    for cls in _error_classes():
        if cls not in (TransportError, RemoteProtocolError, LocalError):
            assert issubclass(cls, RemoteProtocolError) != issubclass(cls, LocalError), cls


@pytest.mark.parametrize("offset", range(2, HEADER_BYTES - 4))
def test_a_flipped_header_byte_is_refused(offset: int) -> None:
    """The checksum covers the header too: a frame never decodes as from another node."""
    frame = bytearray(_codec().encode(SOURCE, TARGET, Ping(1, b"payload")))
    frame[offset] ^= 0x04
    with pytest.raises(RemoteProtocolError):
        _codec().decode(frame)


def test_unknown_flags_are_refused() -> None:
    _assert_refused(
        _refusal(_codec(), _raw_frame(_body("test.ping", Ping(1)), flags=1)),
        CorruptFrame,
        "corrupt_frame",
    )
