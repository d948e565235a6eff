"""Frame header codec and the sans-IO frame reader (docs/protocol.md §2)."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import ProtocolError
from transport.frame import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    PROTOCOL_VERSION,
    FrameFlags,
    FrameHeader,
    FrameType,
    pack_header,
    unpack_header,
)
from transport.reader import FrameReader

U64 = (1 << 64) - 1


def raw_header(type_: int, length: int, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION,
               flags: int = 0, reserved: int = 0, tag: int = 0, seq: int = 0, offset: int = 0,
               total: int = 0) -> bytes:
    """A header built field by field with struct, independent of pack_header's checks."""
    return struct.pack("<2sBBHHQQQQQ", magic, version, type_, flags, reserved, tag, seq, offset, total, length)


def test_header_layout_is_48_little_endian_bytes() -> None:
    assert HEADER_SIZE == HEADER.size == 48
    data = pack_header(FrameType.DATA, 5, tag=1, seq=2, offset=3, total=8)
    assert data == raw_header(7, 5, tag=1, seq=2, offset=3, total=8)
    assert data[:2] == b"PC" and data[2] == PROTOCOL_VERSION and data[3] == 7


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_every_frame_type_round_trips(frame_type: FrameType) -> None:
    if frame_type is FrameType.DATA:
        fields = dict(tag=U64, seq=12345, offset=10, total=10 + MAX_DATA_PAYLOAD)
        length = MAX_DATA_PAYLOAD
    else:
        fields = {}
        length = {FrameType.HEARTBEAT: 0, FrameType.CONTROL: MAX_CONTROL_PAYLOAD}.get(
            frame_type, MAX_HANDSHAKE_PAYLOAD)
    flags = FrameFlags.COMPRESSED if frame_type is FrameType.CONTROL else 0
    header = unpack_header(pack_header(frame_type, length, flags=flags, **fields))
    assert header == FrameHeader(frame_type, flags, fields.get("tag", 0), fields.get("seq", 0),
                                 fields.get("offset", 0), fields.get("total", 0), length)
    assert header.compressed == bool(flags)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (raw_header(6, 0)[:47], "needs 48 bytes"),
        (raw_header(6, 0, magic=b"XX"), "magic"),
        (raw_header(6, 0, version=PROTOCOL_VERSION + 1), f"peer speaks {PROTOCOL_VERSION + 1}"),
        (raw_header(0, 0), "unknown frame type 0"),
        (raw_header(11, 0), "unknown frame type 11"),
        (raw_header(6, 0, flags=2), "unknown frame flags"),
        (raw_header(7, 0, flags=1), "may not be compressed"),
        (raw_header(6, 0, reserved=1), "reserved"),
        (raw_header(6, MAX_CONTROL_PAYLOAD + 1), "exceeds"),
        (raw_header(7, MAX_DATA_PAYLOAD + 1, total=U64), "exceeds"),
        (raw_header(8, 1), "exceeds"),
        (raw_header(1, MAX_HANDSHAKE_PAYLOAD + 1), "exceeds"),
        (raw_header(9, U64), "exceeds"),
        (raw_header(7, 10, offset=5, total=14), "outside"),
        (raw_header(7, 1, offset=U64, total=10), "outside"),
        (raw_header(6, 0, tag=1), "non-zero transfer fields"),
        (raw_header(8, 0, total=1), "non-zero transfer fields"),
        (raw_header(9, 0, tag=1), "non-zero transfer fields"),
        (raw_header(10, 0, tag=1, seq=1), "non-zero transfer fields"),
        (raw_header(10, 0, tag=1, total=1), "non-zero transfer fields"),
        (raw_header(10, MAX_HANDSHAKE_PAYLOAD + 1, tag=1), "exceeds"),
    ],
)
def test_bad_headers_raise_protocol_error(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        unpack_header(data)


def test_abort_tag_frame_carries_its_tag_only() -> None:
    header = unpack_header(raw_header(10, 7, tag=U64))
    assert (header.type, header.tag, header.seq, header.offset, header.total, header.length) == (
        FrameType.ABORT_TAG, U64, 0, 0, 0, 7)


def test_version_is_readable_without_enforcing_it() -> None:
    header = unpack_header(raw_header(1, 10, version=9), check_version=False)
    assert header.version == 9 and header.type is FrameType.HELLO


@pytest.mark.parametrize("bad", [dict(tag=-1), dict(seq=U64 + 1), dict(offset=-5), dict(total=1 << 64)])
def test_pack_refuses_out_of_range_fields(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        pack_header(FrameType.DATA, 0, **bad)


def test_pack_refuses_payload_over_limit() -> None:
    with pytest.raises(ValueError):
        pack_header(FrameType.CONTROL, MAX_CONTROL_PAYLOAD + 1)
    with pytest.raises(ValueError):
        pack_header(FrameType.HEARTBEAT, 1)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 8))
def test_random_headers_only_raise_protocol_error(data: bytes) -> None:
    try:
        header = unpack_header(data)
    except ProtocolError:
        return
    assert header.length <= MAX_DATA_PAYLOAD


@given(st.builds(
    lambda t, o, n: (t, o, n),
    st.integers(0, U64), st.integers(0, 1 << 40), st.integers(0, MAX_DATA_PAYLOAD),
))
def test_data_headers_round_trip(fields: tuple[int, int, int]) -> None:
    tag, offset, length = fields
    header = unpack_header(pack_header(FrameType.DATA, length, tag=tag, seq=U64 - tag, offset=offset,
                                       total=offset + length))
    assert (header.tag, header.seq, header.offset, header.total, header.length) == (
        tag, U64 - tag, offset, offset + length, length)


# --- reader -----------------------------------------------------------------------


class Recorder:
    """FrameHandler that records events and receives DATA into one destination buffer."""

    def __init__(self, dest_size: int = 64) -> None:
        self.events: list[tuple[str, object]] = []
        self.dest = bytearray(dest_size)
        self.discard_tags: set[int] = set()

    def on_frame(self, header: FrameHeader, payload: bytearray) -> None:
        self.events.append((header.type.name, bytes(payload)))

    def data_begin(self, header: FrameHeader) -> memoryview | None:
        if header.tag in self.discard_tags:
            return None
        return memoryview(self.dest)[header.offset : header.offset + header.length]

    def data_end(self, header: FrameHeader) -> None:
        self.events.append(("DATA", (header.tag, header.offset, header.length)))


def frame(frame_type: FrameType, payload: bytes = b"", **fields: int) -> bytes:
    return pack_header(frame_type, len(payload), **fields) + payload


STREAM = (
    frame(FrameType.CONTROL, b"hello")
    + frame(FrameType.HEARTBEAT)
    + frame(FrameType.DATA, b"abcdef", tag=3, seq=1, offset=10, total=16)
    + frame(FrameType.DATA, b"", tag=4, seq=0, offset=0, total=0)
    + frame(FrameType.DATA, b"0123456789", tag=3, seq=1, offset=0, total=16)
    + frame(FrameType.ABORT_TAG, b"gave up", tag=3)
    + frame(FrameType.CLOSE, "bye ✓".encode())
)
EXPECTED = [
    ("CONTROL", b"hello"),
    ("HEARTBEAT", b""),
    ("DATA", (3, 10, 6)),
    ("DATA", (4, 0, 0)),
    ("DATA", (3, 0, 10)),
    ("ABORT_TAG", b"gave up"),
    ("CLOSE", "bye ✓".encode()),
]


def feed(reader: FrameReader, data: bytes, chunk: int | list[int]) -> None:
    """Copy ``data`` into the reader's buffers, at most ``chunk`` bytes per call."""
    sizes = chunk if isinstance(chunk, list) else [chunk]
    pos = 0
    i = 0
    while pos < len(data):
        buf = reader.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), sizes[i % len(sizes)], len(data) - pos)
        buf[:n] = data[pos : pos + n]
        reader.buffer_updated(n)
        pos += n
        i += 1


@pytest.mark.parametrize("chunk", [len(STREAM), 1, 7, 48, 49])
def test_reader_parses_stream_in_any_chunking(chunk: int) -> None:
    rec = Recorder(16)
    feed(FrameReader(rec), STREAM, chunk)
    assert rec.events == EXPECTED
    assert bytes(rec.dest) == b"0123456789abcdef"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=20))
def test_reader_random_chunking(sizes: list[int]) -> None:
    rec = Recorder(16)
    feed(FrameReader(rec), STREAM, sizes)
    assert rec.events == EXPECTED
    assert bytes(rec.dest) == b"0123456789abcdef"


def test_trailing_partial_frame_is_kept_pending() -> None:
    rec = Recorder(16)
    reader = FrameReader(rec)
    tail = frame(FrameType.CONTROL, b"later")
    feed(reader, STREAM + tail[:50], 1000)
    assert rec.events == EXPECTED
    feed(reader, tail[50:], 3)
    assert rec.events == EXPECTED + [("CONTROL", b"later")]


def test_trailing_garbage_raises_and_reader_goes_inert() -> None:
    rec = Recorder(16)
    reader = FrameReader(rec)
    with pytest.raises(ProtocolError, match="magic"):
        feed(reader, STREAM + b"\x00" * HEADER_SIZE + b"x" * 100, 1000)
    assert rec.events == EXPECTED
    assert len(reader.get_buffer()) > 0  # still hands out a (scratch) buffer
    feed(reader, frame(FrameType.CONTROL, b"ignored"), 100)
    assert rec.events == EXPECTED


def test_oversize_length_refused_before_allocating() -> None:
    reader = FrameReader(Recorder())
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds"):
            feed(reader, raw_header(6, 1 << 40), 1)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_discarded_data_never_touches_destination() -> None:
    rec = Recorder(16)
    rec.discard_tags.add(9)
    reader = FrameReader(rec)
    feed(reader, frame(FrameType.DATA, b"x" * 16, tag=9, offset=0, total=16) + frame(FrameType.HEARTBEAT), 5)
    assert rec.events == [("HEARTBEAT", b"")]
    assert bytes(rec.dest) == bytes(16)


def test_discard_current_redirects_the_rest_of_a_frame() -> None:
    rec = Recorder(16)
    reader = FrameReader(rec)
    data = frame(FrameType.DATA, b"A" * 16, tag=1, offset=0, total=16) + frame(FrameType.CONTROL, b"next")
    feed(reader, data[: HEADER_SIZE + 4], 100)
    assert reader.current is not None and reader.current.tag == 1
    assert reader.discard_current() is not None
    feed(reader, data[HEADER_SIZE + 4 :], 100)
    assert bytes(rec.dest) == b"AAAA" + bytes(12)
    assert rec.events == [("CONTROL", b"next")]  # no DATA end for the redirected frame


class RefusingHandler(Recorder):
    def on_frame(self, header: FrameHeader, payload: bytearray) -> None:
        raise ProtocolError("refused")


def test_handler_refusal_propagates_as_protocol_error() -> None:
    reader = FrameReader(RefusingHandler())
    with pytest.raises(ProtocolError, match="refused"):
        feed(reader, frame(FrameType.CONTROL, b"x"), 100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_random_streams_only_raise_protocol_error(data: bytes, chunk: int) -> None:
    reader = FrameReader(Recorder(1 << 16))
    try:
        feed(reader, data, chunk)
    except ProtocolError:
        pass


_plausible_frame = st.builds(
    lambda t, rest, payload: MAGIC + bytes([PROTOCOL_VERSION, t]) + rest + payload,
    st.integers(0, 11), st.binary(min_size=44, max_size=44), st.binary(max_size=64),
)
_small_header = st.builds(
    lambda t, tag, off, n, total, payload: raw_header(t, n, tag=tag, offset=off, total=total) + payload,
    st.integers(1, 10), st.integers(0, 3), st.integers(0, 40), st.integers(0, 40), st.integers(0, 80),
    st.binary(max_size=50),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_plausible_frame, _small_header), max_size=6), st.integers(1, 64))
def test_plausible_garbage_only_raises_protocol_error(parts: list[bytes], chunk: int) -> None:
    reader = FrameReader(Recorder(1 << 16))
    try:
        feed(reader, b"".join(parts), chunk)
    except ProtocolError:
        pass


def test_frames_not_accepted_now_are_refused_at_the_header() -> None:
    rec = Recorder()
    reader = FrameReader(rec)
    reader.accept = frozenset({FrameType.HELLO, FrameType.CLOSE})  # as during a handshake
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="CONTROL frame not allowed"):
            feed(reader, raw_header(6, MAX_CONTROL_PAYLOAD), 1000)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and rec.events == []
