"""AES-GCM frame sealing, sans IO (docs/protocol.md §2.1).

The reference sealer below is written from the protocol document with the
``cryptography`` primitive directly (not ``transport.crypto``): nonce = the
per-direction item counter as 12 little-endian bytes; the header's tag is GCM of
an empty message with the header as associated data; payload records of at most
256 KiB are sealed with the header as associated data too.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import crypto
from transport.crypto import COUNTER_LIMIT, Opener, Sealer, session_ciphers
from transport.errors import ProtocolError
from transport.frame import HEADER_SIZE, FrameHeader, FrameType, pack_header
from transport.reader import FrameReader

KEY_C2S, KEY_S2C = bytes(range(32)), bytes(range(32, 64))
RECORD = 256 * 1024  # the record size §2.1 documents
TAG = 16


def reference_seal(key: bytes, counter: int, header: bytes, payload: bytes) -> tuple[bytes, int]:
    """One frame sealed as §2.1 describes; returns (wire bytes, next counter)."""
    aead = AESGCM(key)
    out = [header, aead.encrypt(counter.to_bytes(12, "little"), b"", header)]
    counter += 1
    for start in range(0, len(payload), RECORD):
        out.append(aead.encrypt(counter.to_bytes(12, "little"), payload[start : start + RECORD], header))
        counter += 1
    return b"".join(out), counter


@dataclass
class Recorder:
    """A frame handler that writes DATA into one destination and logs every completed frame."""

    size: int = 1 << 20
    discard: bool = False
    dest: bytearray = field(default_factory=bytearray)
    events: list[tuple[str, Any]] = field(default_factory=list)
    begun: list[int] = field(default_factory=list)  # tags of DATA frames whose destination was asked for

    def __post_init__(self) -> None:
        self.dest = bytearray(self.size)

    def on_frame(self, header: FrameHeader, payload: bytearray) -> None:
        self.events.append((header.type.name, bytes(payload)))

    def data_begin(self, header: FrameHeader) -> memoryview | None:
        self.begun.append(header.tag)
        if self.discard:
            return None
        return memoryview(self.dest)[header.offset : header.offset + header.length]

    def data_end(self, header: FrameHeader) -> None:
        self.events.append(("DATA", (header.tag, header.offset, header.length)))


def feed(reader: FrameReader, data: bytes, sizes: list[int]) -> None:
    """Copy ``data`` into the reader's buffers, ``sizes[i % len]`` bytes at most per call."""
    pos, i = 0, 0
    while pos < len(data):
        buf = reader.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), sizes[i % len(sizes)], len(data) - pos)
        buf[:n] = data[pos : pos + n]
        reader.buffer_updated(n)
        pos += n
        i += 1


def decrypting_reader(handler: Recorder, key: bytes = KEY_C2S) -> FrameReader:
    reader = FrameReader(handler)
    reader.decrypt_with(Opener(key))
    return reader


def data_header(tag: int, length: int, offset: int = 0, total: int | None = None) -> bytes:
    total = offset + length if total is None else total
    return pack_header(FrameType.DATA, length, tag=tag, offset=offset, total=total)


def test_constants_are_the_documented_ones() -> None:
    assert (crypto.RECORD_SIZE, crypto.TAG_SIZE, crypto.NONCE_SIZE, COUNTER_LIMIT) == (RECORD, TAG, 12, 1 << 64)


@pytest.mark.parametrize("length", [0, 1, RECORD - 1, RECORD, RECORD + 1, 3 * RECORD + 5])
def test_sealer_output_is_the_documented_format(length: int) -> None:
    payload = os.urandom(length)
    header = data_header(7, length)
    sealer = Sealer(KEY_C2S, counter=41)
    got = bytes(sealer.seal(header, payload))
    want, counter = reference_seal(KEY_C2S, 41, header, payload)
    assert got == want
    assert sealer.counter == counter
    assert len(got) == HEADER_SIZE + TAG + length + TAG * -(-length // RECORD)


def test_reader_opens_frames_sealed_by_the_reference() -> None:
    frames = [
        (pack_header(FrameType.CONTROL, 5), b"hello"),
        (pack_header(FrameType.HEARTBEAT, 0), b""),
        (data_header(3, RECORD + 10, offset=100, total=RECORD + 110), os.urandom(RECORD + 10)),
        (data_header(4, 0), b""),
        (data_header(3, 100, offset=0, total=RECORD + 110), os.urandom(100)),
        (pack_header(FrameType.CLOSE, 3), b"bye"),
    ]
    stream, counter = b"", 0
    for header, payload in frames:
        sealed, counter = reference_seal(KEY_C2S, counter, header, payload)
        stream += sealed
    rec = Recorder(RECORD + 110)
    feed(decrypting_reader(rec), stream, [len(stream)])
    assert rec.events == [
        ("CONTROL", b"hello"), ("HEARTBEAT", b""), ("DATA", (3, 100, RECORD + 10)), ("DATA", (4, 0, 0)),
        ("DATA", (3, 0, 100)), ("CLOSE", b"bye"),
    ]
    assert bytes(rec.dest) == frames[4][1] + frames[2][1]


_frame = st.one_of(
    st.builds(lambda p: (pack_header(FrameType.CONTROL, len(p)), p), st.binary(max_size=300)),
    st.just((pack_header(FrameType.HEARTBEAT, 0), b"")),
    st.builds(lambda n, seed: (n, seed), st.integers(0, 2 * RECORD + 3), st.integers(0, 1000)),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_frame, min_size=1, max_size=5), st.lists(st.integers(1, 70_000), min_size=1, max_size=8))
def test_round_trip_in_any_chunking(frames: list[Any], sizes: list[int]) -> None:
    sealer, rec = Sealer(KEY_C2S), Recorder(2 * RECORD + 3)
    reader = decrypting_reader(rec)
    stream, expected, last_data = b"", [], b""
    for item in frames:
        if isinstance(item[0], int):  # a DATA frame of n bytes, all written at offset 0
            n, seed = item
            payload = random.Random(seed).randbytes(n)
            header = data_header(seed, n)
            expected.append(("DATA", (seed, 0, n)))
            last_data = payload
        else:
            header, payload = item
            expected.append((FrameType(header[3]).name, payload))
        stream += bytes(sealer.seal(header, payload))
    feed(reader, stream, sizes)
    assert rec.events == expected
    assert bytes(rec.dest[: len(last_data)]) == last_data


def _three_frames() -> tuple[bytes, list[tuple[int, int, str]]]:
    """A sealed stream of CONTROL, DATA (2 records), HEARTBEAT, and each frame's (start, end, name)."""
    sealer = Sealer(KEY_C2S)
    parts = [
        ("CONTROL", bytes(sealer.seal(pack_header(FrameType.CONTROL, 9), b"123456789"))),
        ("DATA", bytes(sealer.seal(data_header(5, RECORD + 77), os.urandom(RECORD + 77)))),
        ("HEARTBEAT", bytes(sealer.seal(pack_header(FrameType.HEARTBEAT, 0)))),
    ]
    spans, pos = [], 0
    for name, data in parts:
        spans.append((pos, pos + len(data), name))
        pos += len(data)
    return b"".join(data for _name, data in parts), spans


STREAM3, SPANS3 = _three_frames()
DATA_START = SPANS3[1][0]
# Header, header tag, first and last ciphertext byte and tag of both records of the DATA frame.
_EDGES = [DATA_START + d for d in (0, 8, 40, 47, 48, 63, 64, 64 + RECORD - 1, 64 + RECORD, 64 + RECORD + 15,
                                   64 + RECORD + 16, 64 + RECORD + 16 + 76, 64 + RECORD + 16 + 77,
                                   64 + RECORD + 16 + 77 + 15)]


def _check_tampered(position: int, bit: int) -> None:
    stream = bytearray(STREAM3)
    stream[position] ^= 1 << bit
    rec = Recorder(RECORD + 77)
    with pytest.raises(ProtocolError, match="failed authentication"):
        feed(decrypting_reader(rec), bytes(stream), [4096])
    index = next(i for i, (start, end, _name) in enumerate(SPANS3) if start <= position < end)
    # Every frame before the tampered one arrived intact; it and everything after never did.
    assert [name for name, _ in rec.events] == [name for _s, _e, name in SPANS3[:index]]
    start = SPANS3[index][0]
    if position < start + HEADER_SIZE + TAG:  # a forged header is refused before anything acts on it
        assert rec.begun == ([] if index <= 1 else [5])


@pytest.mark.parametrize("position", _EDGES)
def test_tampering_at_frame_edges_is_detected(position: int) -> None:
    _check_tampered(position, 0)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(STREAM3) - 1), st.integers(0, 7))
def test_any_flipped_bit_is_detected(position: int, bit: int) -> None:
    _check_tampered(position, bit)


def test_replayed_or_reordered_frames_are_refused() -> None:
    sealer = Sealer(KEY_C2S)
    first = bytes(sealer.seal(pack_header(FrameType.CONTROL, 1), b"a"))
    second = bytes(sealer.seal(pack_header(FrameType.CONTROL, 1), b"b"))
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]  # same header and length, fresh nonce
    for stream in (first + first, second + first, first + first[:10] + second):
        rec = Recorder()
        with pytest.raises(ProtocolError):
            feed(decrypting_reader(rec), stream, [len(stream)])
        assert rec.events in ([], [("CONTROL", b"a")])


def test_truncated_frame_makes_the_next_one_fail() -> None:
    sealer = Sealer(KEY_C2S)
    cut = bytes(sealer.seal(pack_header(FrameType.CONTROL, 40), os.urandom(40)))[:-TAG]
    after = bytes(sealer.seal(pack_header(FrameType.HEARTBEAT, 0)))
    rec = Recorder()
    with pytest.raises(ProtocolError):
        feed(decrypting_reader(rec), cut + after + after, [1000])
    assert rec.events == []


def test_each_direction_has_its_own_key() -> None:
    client_seal, client_open = session_ciphers(KEY_C2S, KEY_S2C, is_client=True)
    server_seal, server_open = session_ciphers(KEY_C2S, KEY_S2C, is_client=False)
    frame = bytes(client_seal.seal(pack_header(FrameType.CONTROL, 2), b"hi"))
    reflected = Recorder()
    reader = FrameReader(reflected)
    reader.decrypt_with(client_open)  # the client's own frame reflected back at it
    with pytest.raises(ProtocolError):
        feed(reader, frame, [100])
    accepted = Recorder()
    reader = FrameReader(accepted)
    reader.decrypt_with(server_open)
    feed(reader, frame, [100])
    assert accepted.events == [("CONTROL", b"hi")] and reflected.events == []
    assert bytes(server_seal.seal(pack_header(FrameType.HEARTBEAT, 0)))[HEADER_SIZE:] != frame[HEADER_SIZE:]


class NonceLog:
    """Wraps an AESGCM and records every nonce it seals with."""

    def __init__(self, aead: AESGCM) -> None:
        self.aead = aead
        self.nonces: list[bytes] = []

    def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        self.nonces.append(nonce)
        self.aead.encrypt_into(nonce, data, aad, out)


def test_nonces_never_repeat_and_count_up() -> None:
    sealer = Sealer(KEY_C2S)
    log = NonceLog(sealer._aead)  # noqa: SLF001 - observe the primitive's inputs
    sealer._aead = log  # type: ignore[assignment]  # noqa: SLF001
    rng = random.Random(3)
    for _ in range(60):
        n = rng.choice([0, 1, 1000, RECORD, RECORD + 1, 3 * RECORD])
        sealer.seal(data_header(1, n), bytes(n))
        sealer.recycle()
    assert len(set(log.nonces)) == len(log.nonces) > 60
    assert [int.from_bytes(n, "little") for n in log.nonces] == list(range(len(log.nonces)))


def test_counter_exhaustion_refuses_to_reuse_a_nonce() -> None:
    sealer = Sealer(KEY_C2S, counter=COUNTER_LIMIT - 3)
    sealer.seal(data_header(1, 10), bytes(10))  # 2 items: counters LIMIT-3, LIMIT-2
    with pytest.raises(ProtocolError, match="nonce counter"):
        sealer.seal(data_header(1, 10), bytes(10))  # would need LIMIT-1 and LIMIT
    assert sealer.counter == COUNTER_LIMIT - 1
    # The header opens with the last counter; its record would need the one past the limit.
    sealed, _next = reference_seal(KEY_C2S, COUNTER_LIMIT - 1, pack_header(FrameType.CONTROL, 1), b"x")
    rec = Recorder()
    reader = FrameReader(rec)
    reader.decrypt_with(Opener(KEY_C2S, counter=COUNTER_LIMIT - 1))
    with pytest.raises(ProtocolError, match="nonce counter"):
        feed(reader, sealed, [100])
    assert rec.events == []


def test_discarded_payloads_are_still_authenticated() -> None:
    sealer = Sealer(KEY_C2S)
    good = bytes(sealer.seal(data_header(2, 300), bytes(300)))
    bad = bytearray(sealer.seal(data_header(2, 300), bytes(300)))
    bad[-TAG - 1] ^= 1
    rec = Recorder(discard=True)
    reader = decrypting_reader(rec)
    feed(reader, good, [64])
    with pytest.raises(ProtocolError, match="payload failed authentication"):
        feed(reader, bytes(bad), [64])
    assert rec.events == [] and rec.begun == [2, 2] and rec.dest == bytearray(len(rec.dest))


def test_discarding_mid_frame_stops_writing_but_keeps_verifying() -> None:
    sealer = Sealer(KEY_C2S)
    payload = os.urandom(2 * RECORD)
    stream = bytes(sealer.seal(data_header(1, 2 * RECORD), payload)) + bytes(
        sealer.seal(pack_header(FrameType.CONTROL, 4), b"next")
    )
    rec = Recorder(2 * RECORD)
    reader = decrypting_reader(rec)
    first_record_end = HEADER_SIZE + TAG + RECORD + TAG
    feed(reader, stream[:first_record_end], [9999])
    assert reader.discard_current() is not None
    feed(reader, stream[first_record_end:], [9999])
    assert bytes(rec.dest[:RECORD]) == payload[:RECORD] and rec.dest[RECORD:] == bytearray(RECORD)
    assert rec.events == [("CONTROL", b"next")]


def test_switching_to_encryption_mid_frame_is_a_protocol_error() -> None:
    reader = FrameReader(Recorder())
    feed(reader, pack_header(FrameType.CONTROL, 3)[:10], [10])
    with pytest.raises(ProtocolError, match="before the handshake completed"):
        reader.decrypt_with(Opener(KEY_C2S))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 80))
def test_random_bytes_on_an_encrypted_reader_only_raise_protocol_error(data: bytes, chunk: int) -> None:
    rec = Recorder()
    try:
        feed(decrypting_reader(rec), data, [chunk])
    except ProtocolError:
        pass
    assert rec.events == [] and rec.begun == []
