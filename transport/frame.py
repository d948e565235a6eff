"""The fixed binary frame header every byte on a pccl connection is wrapped in.

Layout and limits are documented in ``docs/protocol.md`` §2 (frame header); this
module is the single place that knows them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from transport.errors import ProtocolError

#: First two bytes of every frame: lets a reader reject a stranger at once.
MAGIC = b"PC"
#: Wire protocol version; a peer speaking another one is refused in the hello (§1).
PROTOCOL_VERSION = 2

#: ``<`` little-endian, no padding: magic, version, type, flags, reserved,
#: tag, seq, offset, total, length (§2).
HEADER = struct.Struct("<2sBBHHQQQQQ")
HEADER_SIZE = HEADER.size  # 48

#: Largest payload of a CONTROL frame (msgpack, maybe zstd-compressed).
MAX_CONTROL_PAYLOAD = 16 * 1024 * 1024
#: Largest payload of one DATA frame; a link splits bigger stripes into several frames.
MAX_DATA_PAYLOAD = 64 * 1024 * 1024
#: Largest payload of a handshake (HELLO/CHALLENGE/AUTH/ACCEPT/REJECT), CLOSE or ABORT_TAG frame.
MAX_HANDSHAKE_PAYLOAD = 4096

_U64_MAX = (1 << 64) - 1


class FrameType(enum.IntEnum):
    """What a frame carries (§2); the value is the ``type`` byte on the wire."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    ACCEPT = 4
    REJECT = 5
    CONTROL = 6
    DATA = 7
    HEARTBEAT = 8
    CLOSE = 9
    ABORT_TAG = 10


class FrameFlags(enum.IntFlag):
    """Bits of the ``flags`` field (§2)."""

    NONE = 0
    #: The payload is a zstd frame (CONTROL only).
    COMPRESSED = 1


HANDSHAKE_TYPES = frozenset(
    {FrameType.HELLO, FrameType.CHALLENGE, FrameType.AUTH, FrameType.ACCEPT, FrameType.REJECT}
)

_TYPE_BY_VALUE = {t.value: t for t in FrameType}
_KNOWN_FLAGS = int(FrameFlags.COMPRESSED)


def max_payload(frame_type: FrameType) -> int:
    """The largest payload a frame of ``frame_type`` may carry (§2 limits)."""
    if frame_type is FrameType.DATA:
        return MAX_DATA_PAYLOAD
    if frame_type is FrameType.CONTROL:
        return MAX_CONTROL_PAYLOAD
    if frame_type is FrameType.HEARTBEAT:
        return 0
    return MAX_HANDSHAKE_PAYLOAD


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One decoded frame header.

    ``tag``/``seq``/``offset``/``total`` are meaningful for DATA frames (the
    transfer, this frame's byte offset in it, and the transfer's full size);
    ABORT_TAG carries the aborted ``tag`` only; the other frame types carry
    zeros there.
    """

    type: FrameType
    flags: int
    tag: int
    seq: int
    offset: int
    total: int
    length: int
    version: int = PROTOCOL_VERSION

    @property
    def compressed(self) -> bool:
        """Whether the payload is zstd-compressed."""
        return bool(self.flags & FrameFlags.COMPRESSED)


def pack_header(
    frame_type: FrameType,
    length: int,
    *,
    flags: int = 0,
    tag: int = 0,
    seq: int = 0,
    offset: int = 0,
    total: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Encode one frame header (§2).

    Raises:
        ValueError: a field is out of range (negative, beyond u64, payload over
            the type's limit) — a bug in the caller, never peer input.
    """
    if not 0 <= length <= max_payload(frame_type):
        raise ValueError(f"{frame_type.name} payload of {length} bytes is over its limit")
    for name, value in (("tag", tag), ("seq", seq), ("offset", offset), ("total", total)):
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"{name}={value} does not fit an unsigned 64-bit field")
    return HEADER.pack(MAGIC, version, frame_type, flags, 0, tag, seq, offset, total, length)


def unpack_header(buf: bytes | bytearray | memoryview, *, check_version: bool = True) -> FrameHeader:
    """Decode and validate one frame header from the first ``HEADER_SIZE`` bytes of ``buf``.

    The length field is checked against the frame type's limit here, before any
    payload is allocated. ``check_version=False`` lets the handshake read a
    peer's version to report a mismatch by name (§1).

    Raises:
        ProtocolError: short buffer, bad magic, version mismatch, unknown frame
            type or flags, non-zero reserved field, payload length over the
            limit, or a DATA frame whose offset/length do not fit its total.
    """
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"frame header needs {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, type_byte, flags, reserved, tag, seq, offset, total, length = (
        HEADER.unpack_from(buf)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if check_version and version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {version}, we speak {PROTOCOL_VERSION}"
        )
    frame_type = _TYPE_BY_VALUE.get(type_byte)
    if frame_type is None:
        raise ProtocolError(f"unknown frame type {type_byte}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags {flags:#06x}")
    if flags & FrameFlags.COMPRESSED and frame_type is not FrameType.CONTROL:
        raise ProtocolError(f"{frame_type.name} frame may not be compressed")
    if reserved:
        raise ProtocolError(f"reserved header field is {reserved}, must be 0")
    limit = max_payload(frame_type)
    if length > limit:
        raise ProtocolError(f"{frame_type.name} payload of {length} bytes exceeds the {limit} limit")
    if frame_type is FrameType.DATA:
        if offset > total or length > total - offset:
            raise ProtocolError(
                f"DATA frame [{offset}, {offset}+{length}) lies outside its {total}-byte transfer"
            )
    elif seq or offset or total or (tag and frame_type is not FrameType.ABORT_TAG):
        raise ProtocolError(f"{frame_type.name} frame has non-zero transfer fields")
    return FrameHeader(frame_type, flags, tag, seq, offset, total, length, version)
