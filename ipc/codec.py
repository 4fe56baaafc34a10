"""The frame codec: msgspec Structs in, bytes out, and back. Pure: no IO, no time.

A frame is a fixed binary header followed by a msgpack body:

    magic "DC" | version u8 | flags u8 | cluster_id u64 | source u32 | target u32
    | body_bytes u32 | crc32 u32                              (little-endian, 28 bytes)

The checksum covers the 24 header bytes before it and the body, so a flipped bit in the
source, target or length is caught as surely as one in the message.

The body is the msgpack array `[tag, message]`: `tag` names the message type in the
codec's registry, so messages form a tagged union that the registry can grow without the
types themselves knowing. Decoding first checks the header (magic, version, cluster,
length, checksum), then reads the tag, then decodes the body as that tag's type. Every
refusal is a typed `RemoteProtocolError` (see `ipc.errors`); `decode` never raises
anything else, whatever bytes it is given.

Invariant: `decode(encode(s, t, m)) == Frame(s, t, m)` for every registered message, and
a frame is accepted only if it was encoded for this cluster by a version we understand.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from ipc.errors import (
    CorruptFrame,
    FrameTooLarge,
    MalformedBody,
    MessageTooLarge,
    NewerVersion,
    TruncatedFrame,
    UnknownTag,
    WrongCluster,
)

PROTOCOL_VERSION = 1
PROTOCOL_VERSION_MIN = 1
"""Frames of versions in [MIN, current] are understood; newer ones are refused."""

MAGIC = b"DC"
HEADER = struct.Struct("<2sBBQIIII")
HEADER_BYTES = HEADER.size
_CHECKED = struct.Struct("<2sBBQIII")
"""The header fields the checksum covers: all but the checksum itself."""
_PREFIX = struct.Struct("<2sBBQ")
"""Magic, version, flags and cluster id: the bytes every frame we accept starts with."""
_ROUTE = struct.Struct("<IIII")
"""Source, target, body bytes and checksum: the rest of the header."""
FRAME_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
"""Largest control frame. Bulk data never travels as a control frame."""
FRAME_BYTES_MAX_LIMIT = 1 << 31
NODE_ID_MAX = (1 << 32) - 1
TAG_BYTES_MAX = 64
_BODY_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
"""What msgspec raises on hostile msgpack: DecodeError (ValidationError is one), a str
that is not UTF-8, nesting deeper than the interpreter's recursion limit."""


def cluster_id_for(name: str) -> int:
    """The 64-bit cluster id every frame carries, derived from the cluster's name."""
    assert name, "a cluster needs a name"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class Header(NamedTuple):
    """A checked frame header. (Tuples: decoding is on every message's path.)"""

    version: int
    flags: int
    cluster_id: int
    source: int
    target: int
    body_bytes: int
    crc: int

    @property
    def frame_bytes(self) -> int:
        return HEADER_BYTES + self.body_bytes


class Frame(NamedTuple):
    source: int
    target: int
    message: Any


class Codec:
    """Encodes and decodes frames of one cluster. `messages` maps tag -> Struct type;
    transports add their own `ipc.*` tags with `register`."""

    def __init__(
        self,
        cluster_id: int,
        messages: Mapping[str, type[msgspec.Struct]] | None = None,
        frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT,
    ) -> None:
        assert 0 <= cluster_id < 1 << 64, cluster_id
        assert HEADER_BYTES < frame_bytes_max <= FRAME_BYTES_MAX_LIMIT, frame_bytes_max
        self.cluster_id = cluster_id
        self.frame_bytes_max = frame_bytes_max
        self._prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, cluster_id)
        self._encoder = msgspec.msgpack.Encoder()
        self._envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}
        self._tags: dict[type, str] = {}
        self._types: dict[str, type] = {}
        for tag, message_type in (messages or {}).items():
            self.register(tag, message_type)

    def register(self, tag: str, message_type: type[msgspec.Struct]) -> None:
        assert 0 < len(tag) <= TAG_BYTES_MAX, tag
        assert self._types.get(tag, message_type) is message_type, tag
        assert self._tags.get(message_type, tag) == tag, message_type
        self._types[tag] = message_type
        self._tags[message_type] = tag
        self._decoders[tag] = msgspec.msgpack.Decoder(message_type)

    def knows(self, message_type: type) -> bool:
        return message_type in self._tags

    # ---- encode ----

    def encode(self, source: int, target: int, message: msgspec.Struct) -> bytes:
        """One frame. Raises `MessageTooLarge` past `frame_bytes_max` (our fault, not the
        receiver's) and KeyError for an unregistered type (a programming error)."""
        assert 0 <= source <= NODE_ID_MAX and 0 <= target <= NODE_ID_MAX, (source, target)
        tag = self._tags[type(message)]
        body = self._encoder.encode((tag, message))
        if HEADER_BYTES + len(body) > self.frame_bytes_max:
            raise MessageTooLarge(
                f"{tag} message of {len(body)} bytes exceeds the frame maximum "
                f"of {self.frame_bytes_max} bytes"
            )
        checked = _CHECKED.pack(
            MAGIC, PROTOCOL_VERSION, 0, self.cluster_id, source, target, len(body)
        )
        crc = zlib.crc32(body, zlib.crc32(checked))
        return b"".join((checked, crc.to_bytes(4, "little"), body))

    # ---- decode ----

    def decode_header(self, buffer: bytes | bytearray | memoryview) -> Header:
        """Checks everything the header alone can tell: enough bytes, magic, version,
        flags, cluster and the declared length. Stream readers call this to learn how
        many more bytes the frame needs."""
        source, target, body_bytes, crc = self._checked_header(buffer)
        version, flags = buffer[2], buffer[3]
        return Header(version, flags, self.cluster_id, source, target, body_bytes, crc)

    def decode(self, buffer: bytes | bytearray | memoryview) -> Frame:
        """Exactly one whole frame. Raises only `RemoteProtocolError` subclasses."""
        source, target, body_bytes, crc = self._checked_header(buffer)
        frame_bytes = HEADER_BYTES + body_bytes
        if len(buffer) < frame_bytes:
            raise TruncatedFrame(f"frame declares {frame_bytes} bytes, only {len(buffer)} arrived")
        if len(buffer) > frame_bytes:
            raise CorruptFrame(f"frame declares {frame_bytes} bytes but {len(buffer)} arrived")
        view = memoryview(buffer)
        body = view[HEADER_BYTES:]
        if zlib.crc32(body, zlib.crc32(view[: _CHECKED.size])) != crc:
            raise CorruptFrame("frame checksum mismatch")
        return Frame(source, target, self._decode_body(body))

    def _checked_header(self, buffer: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
        """(source, target, body_bytes, crc) of a header that passes every check. The
        common case (our magic, version, flags and cluster) is one comparison."""
        if len(buffer) >= HEADER_BYTES and buffer[: _PREFIX.size] == self._prefix:
            fields: tuple[int, int, int, int] = _ROUTE.unpack_from(buffer, _PREFIX.size)
            if HEADER_BYTES + fields[2] <= self.frame_bytes_max:
                return fields
        return self._refuse_header(buffer)

    def _refuse_header(self, buffer: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
        """The slow path: find what is wrong with the header and say so."""
        if len(buffer) < HEADER_BYTES:
            raise TruncatedFrame(f"frame of {len(buffer)} bytes is shorter than its header")
        magic, version, flags, cluster_id, source, target, body_bytes, crc = HEADER.unpack_from(
            buffer, 0
        )
        if magic != MAGIC:
            raise CorruptFrame(f"bad magic {bytes(magic)!r}")
        if version > PROTOCOL_VERSION:
            raise NewerVersion(f"frame version {version} is newer than ours ({PROTOCOL_VERSION})")
        if version < PROTOCOL_VERSION_MIN:
            raise CorruptFrame(f"frame version {version} is no longer understood")
        if flags != 0:
            raise CorruptFrame(f"frame sets unknown flags {flags:#x}")
        if cluster_id != self.cluster_id:
            raise WrongCluster(
                f"frame for cluster {cluster_id:#x}, this is cluster {self.cluster_id:#x}"
            )
        if HEADER_BYTES + body_bytes > self.frame_bytes_max:
            raise FrameTooLarge(
                f"frame declares {body_bytes} body bytes; the maximum frame is "
                f"{self.frame_bytes_max} bytes"
            )
        return source, target, body_bytes, crc

    def _decode_body(self, body: memoryview) -> Any:
        try:
            tag, raw = self._envelope.decode(body)
        except _BODY_ERRORS as error:
            raise MalformedBody(f"body is not a [tag, message] pair: {error}") from None
        decoder = self._decoders.get(tag)
        if decoder is None:
            raise UnknownTag(f"unknown message tag {tag[:TAG_BYTES_MAX]!r}")
        try:
            return decoder.decode(raw)
        except _BODY_ERRORS as error:
            raise MalformedBody(f"{tag} body does not decode: {error}") from None
