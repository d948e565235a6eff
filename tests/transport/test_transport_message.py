"""Control message registry and codec (docs/protocol.md §3)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import InvalidUsageError, ProtocolError
from transport.frame import MAX_CONTROL_PAYLOAD
from transport.message import COMPRESS_THRESHOLD, decode, encode, encode_payload, message, message_name


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@message("test.scalars")
class Scalars:
    i: int
    f: float
    s: str
    b: bytes
    flag: bool
    nothing: None = None


@message("test.nested")
class Nested:
    peers: list[Endpoint]
    table: dict[str, list[int]]
    by_id: dict[int, str]
    pair: tuple[int, str]
    many: tuple[float, ...]
    maybe: int | None
    either: int | str
    color: Color = Color.RED
    extra: list[list[bytes]] = field(default_factory=list)


@message("test.empty")
class Empty:
    pass


@message("test.checked")
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


SAMPLES = [
    Scalars(-(1 << 63), 1.5, "ünïcode", b"\x00\xff", True),
    Scalars((1 << 64) - 1, float("inf"), "", b"", False, None),
    Nested([Endpoint("10.0.0.1", 1), Endpoint("h", 65535)], {"a": [1, 2], "": []}, {5: "x", -1: "y"},
           (7, "seven"), (0.25, -1.0), None, "s", Color.GREEN, [[b"a"], []]),
    Nested([], {}, {}, (0, ""), (), 3, 4),
    Empty(),
    Checked(0),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg
    payload, compressed = encode_payload(msg)
    assert decode(payload, compressed) == msg


def test_wire_form_is_name_and_field_map() -> None:
    assert msgpack.unpackb(encode(Checked(3))) == ["test.checked", {"n": 3}]
    assert message_name(Checked) == message_name(Checked(1)) == "test.checked"


def test_large_messages_are_compressed_and_flagged() -> None:
    msg = Nested([Endpoint("host", i) for i in range(5000)], {}, {}, (1, "a"), (), None, 1)
    plain = encode(msg)
    payload, compressed = encode_payload(msg)
    assert len(plain) >= COMPRESS_THRESHOLD
    assert compressed and len(payload) < len(plain)
    assert zstandard.ZstdDecompressor().decompress(payload) == plain
    assert decode(payload, True) == msg
    small, small_compressed = encode_payload(Checked(1))
    assert not small_compressed and small == encode(Checked(1))


def test_incompressible_large_messages_stay_plain() -> None:
    import os

    msg = Scalars(1, 1.0, "", os.urandom(COMPRESS_THRESHOLD * 2), True)
    payload, compressed = encode_payload(msg)
    assert not compressed and decode(payload) == msg


def wire(name: object, body: object) -> bytes:
    return msgpack.packb([name, body], use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (wire("test.checked", {"n": 1}) + b"\x00", "not valid msgpack"),  # trailing bytes
        (msgpack.packb({"n": 1}), "pair"),
        (msgpack.packb(["test.checked"]), "pair"),
        (wire("nope", {}), "unknown message type"),
        (wire(b"test.checked", {"n": 1}), "pair"),
        (wire("test.checked", [1]), "map of fields"),
        (wire("test.checked", {}), "missing fields"),
        (wire("test.checked", {"n": 1, "m": 2}), "unknown fields"),
        (wire("test.checked", {"n": "1"}), "expected int"),
        (wire("test.checked", {"n": True}), "expected int"),
        (wire("test.checked", {"n": 1.0}), "expected int"),
        (wire("test.checked", {"n": -1}), "rejected"),
        (wire("test.scalars", {"i": 1, "f": "x", "s": "", "b": b"", "flag": True}), "expected float"),
        (wire("test.scalars", {"i": 1, "f": 1, "s": b"", "b": b"", "flag": True}), "expected str"),
        (wire("test.scalars", {"i": 1, "f": 1, "s": "", "b": "", "flag": True}), "expected bytes"),
        (wire("test.scalars", {"i": 1, "f": 1, "s": "", "b": b"", "flag": 1}), "expected bool"),
        (wire("test.scalars", {"i": 1, "f": 1, "s": "", "b": b"", "flag": True, "nothing": 0}), "None"),
        (wire("test.nested", {"peers": [{"host": "h"}], "table": {}, "by_id": {}, "pair": [1, ""],
                              "many": [], "maybe": None, "either": 1}), "missing fields"),
        (wire("test.nested", {"peers": [], "table": {"a": [1, "2"]}, "by_id": {}, "pair": [1, ""],
                              "many": [], "maybe": None, "either": 1}), "expected int"),
        (wire("test.nested", {"peers": [], "table": {}, "by_id": {"1": "x"}, "pair": [1, ""],
                              "many": [], "maybe": None, "either": 1}), "expected int"),
        (wire("test.nested", {"peers": [], "table": {}, "by_id": {}, "pair": [1, "", 3],
                              "many": [], "maybe": None, "either": 1}), "2-tuple"),
        (wire("test.nested", {"peers": [], "table": {}, "by_id": {}, "pair": [1, ""],
                              "many": [], "maybe": None, "either": 1.5}), "matches none"),
        (wire("test.nested", {"peers": [], "table": {}, "by_id": {}, "pair": [1, ""],
                              "many": [], "maybe": None, "either": 1, "color": 9}), "not a Color"),
        (msgpack.packb(["test.checked", {"n": msgpack.ExtType(5, b"x")}]), "expected int"),
    ],
)
def test_invalid_payloads_raise_protocol_error(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(payload)


def test_expect_restricts_the_class() -> None:
    assert decode(encode(Checked(2)), expect=Checked) == Checked(2)
    with pytest.raises(ProtocolError, match="expected message 'test.empty'"):
        decode(encode(Checked(2)), expect=Empty)


def test_bad_zstd_and_zip_bombs_are_refused() -> None:
    with pytest.raises(ProtocolError, match="zstd"):
        decode(b"definitely not zstd", True)
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (MAX_CONTROL_PAYLOAD + 10))
    assert len(bomb) < 4096
    with pytest.raises(ProtocolError, match="inflates beyond"):
        decode(bomb, True)
    with pytest.raises(ProtocolError):
        decode(zstandard.ZstdCompressor().compress(encode(Checked(1))) + b"junk", True)


def test_encode_validates_fields() -> None:
    with pytest.raises(InvalidUsageError, match=r"test.scalars.i: value: expected int"):
        encode(Scalars("3", 1.0, "", b"", True))  # type: ignore[arg-type]
    with pytest.raises(InvalidUsageError, match=r"Endpoint.port: value: expected int"):
        encode(Nested([Endpoint("h", None)], {}, {}, (1, ""), (), None, 1))  # type: ignore[arg-type]
    with pytest.raises(InvalidUsageError, match="not a declared message"):
        encode(Endpoint("h", 1))
    with pytest.raises(InvalidUsageError, match="64-bit"):
        encode(Checked(1 << 64))
    with pytest.raises(InvalidUsageError, match="control limit"):
        encode(Scalars(1, 1.0, "", b"x" * MAX_CONTROL_PAYLOAD, True))


def test_declaration_errors() -> None:
    with pytest.raises(TypeError, match="already taken"):
        message("test.checked")(type("Other", (), {"__annotations__": {"n": int}}))

    @dataclass
    class Mutable:
        n: int

    with pytest.raises(TypeError, match="frozen"):
        message("test.mutable")(Mutable)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_only_raise_protocol_error(data: bytes, compressed: bool) -> None:
    try:
        decode(data, compressed)
    except ProtocolError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=4) | st.integers(-(1 << 63), (1 << 63) - 1), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["test.scalars", "test.nested", "test.empty", "test.checked", "x"]), _values)
def test_random_structures_only_raise_protocol_error(name: str, body: object) -> None:
    try:
        msg = decode(msgpack.packb([name, body], use_bin_type=True))
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg  # anything accepted re-encodes to the same message


_endpoints = st.builds(Endpoint, st.text(max_size=8), st.integers(0, 65535))
_nested = st.builds(
    Nested,
    st.lists(_endpoints, max_size=3),
    st.dictionaries(st.text(max_size=3), st.lists(st.integers(-5, 5), max_size=3), max_size=3),
    st.dictionaries(st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=3), max_size=3),
    st.tuples(st.integers(0, 9), st.text(max_size=3)),
    st.lists(st.floats(allow_nan=False), max_size=3).map(tuple),
    st.none() | st.integers(-(1 << 63), (1 << 64) - 1),
    st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=3),
    st.sampled_from(Color),
    st.lists(st.lists(st.binary(max_size=3), max_size=2), max_size=2),
)


@settings(max_examples=100, deadline=None)
@given(_nested)
def test_generated_messages_round_trip(msg: Nested) -> None:
    payload, compressed = encode_payload(msg, threshold=64)
    assert decode(payload, compressed) == msg


def test_unsupported_field_types_fail_at_declaration() -> None:
    with pytest.raises(TypeError, match="unsupported message field type"):
        @message("test.bad-field")
        class BadField:
            value: set[int]
