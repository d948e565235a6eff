"""Control messages: typed frozen dataclasses on the wire as msgpack, validated on the way in.

A message type is declared once, in the module of the layer that uses it::

    @message("master.register")
    class Register:
        peer_id: int
        address: str
        groups: list[int]
        note: str | None = None

The payload of a CONTROL frame is ``msgpack([name, {field: value, ...}])``,
zstd-compressed (and flagged in the frame header) above a size threshold; see
``docs/protocol.md`` §3. Decoding hostile bytes raises only ``ProtocolError``.

Supported field types: ``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``,
unions of them (``X | None``), ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
``dict[str | int, T]``, ``enum.Enum`` subclasses, and nested frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import msgpack
import zstandard

from transport.errors import InvalidUsageError, ProtocolError
from transport.frame import MAX_CONTROL_PAYLOAD

#: An instance of a class declared with :func:`message`.
Message: TypeAlias = Any

#: Payloads at least this big are offered to zstd (§3); kept only if smaller.
COMPRESS_THRESHOLD = 16 * 1024
_ZSTD_LEVEL = 3
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1

T = TypeVar("T")
_Convert = Callable[[Any], Any]


class _Invalid(Exception):
    """Internal: a value does not match its declared type (``path`` says where)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


@dataclasses.dataclass
class _Schema:
    """Compiled converters of one dataclass, built on first use (annotations may be forward refs)."""

    cls: type
    encoders: dict[str, _Convert] = dataclasses.field(default_factory=dict)
    decoders: dict[str, _Convert] = dataclasses.field(default_factory=dict)
    required: frozenset[str] = frozenset()
    compiled: bool = False


# Declarations are static program structure (like a dispatch table), filled by
# the decorator at import time and never mutated afterwards.
_BY_NAME: dict[str, _Schema] = {}
_NAME_OF: dict[type, str] = {}
_SCHEMAS: dict[type, _Schema] = {}


if TYPE_CHECKING:
    # Tells type checkers that @message(...) classes are frozen dataclasses.
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_kwargs: Any) -> Callable[[T], T]:
        return lambda fn: fn


@dataclass_transform(frozen_default=True)
def message(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator declaring a control message type called ``name`` on the wire.

    The class becomes a frozen dataclass (an existing dataclass must already be frozen).

    Raises:
        TypeError: ``name`` is taken by another class, or the dataclass is not frozen.
    """

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(frozen=True)(cls)
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"message {name!r}: {cls.__qualname__} must be a frozen dataclass")
        if name in _BY_NAME and _BY_NAME[name].cls is not cls:
            raise TypeError(f"message name {name!r} is already taken by {_BY_NAME[name].cls!r}")
        schema = _SCHEMAS.setdefault(cls, _Schema(cls))
        _BY_NAME[name] = schema
        _NAME_OF[cls] = name
        try:
            _schema(cls)  # unsupported field types fail here, at declaration
        except NameError:
            pass  # a forward reference to a class declared later: compiled on first use
        return cls

    return register


def message_name(msg: Any) -> str:
    """The wire name of a message instance or class.

    Raises:
        InvalidUsageError: it was not declared with :func:`message`.
    """
    cls = msg if isinstance(msg, type) else type(msg)
    try:
        return _NAME_OF[cls]
    except KeyError:
        raise InvalidUsageError(f"{cls.__qualname__} is not a declared message type") from None


def encode(msg: Message) -> bytes:
    """Serialize a message to msgpack bytes (uncompressed), validating every field.

    Raises:
        InvalidUsageError: not a declared message, a field does not match its
            declared type, or the result exceeds the control payload limit.
    """
    name = message_name(msg)
    try:
        body = _encode_dataclass(_schema(type(msg)), msg, name)
    except _Invalid as exc:
        raise InvalidUsageError(f"cannot encode {name!r}: {exc}") from exc
    payload: bytes = msgpack.packb([name, body], use_bin_type=True)
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise InvalidUsageError(
            f"message {name!r} encodes to {len(payload)} bytes, over the "
            f"{MAX_CONTROL_PAYLOAD}-byte control limit; send bulk data as a transfer"
        )
    return payload


def encode_payload(msg: Message, *, threshold: int = COMPRESS_THRESHOLD) -> tuple[bytes, bool]:
    """Serialize a message for a CONTROL frame: ``(payload, compressed)`` (§3).

    Payloads of at least ``threshold`` bytes are zstd-compressed when that makes them smaller.

    Raises:
        InvalidUsageError: as :func:`encode`.
    """
    payload = encode(msg)
    if len(payload) >= threshold:
        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(payload)
        if len(packed) < len(payload):
            return packed, True
    return payload, False


def decode(payload: bytes | bytearray | memoryview, compressed: bool = False, *, expect: type[T] | None = None) -> Any:
    """Parse and validate a CONTROL payload into a message instance.

    ``expect`` restricts the accepted message class (used by the handshake).

    Raises:
        ProtocolError: the bytes are not a valid message — bad compression, bad
            msgpack, unknown name, unexpected class, missing/unknown fields or
            wrong field types. Nothing else escapes, whatever the input.
    """
    if compressed:
        payload = _decompress(payload)
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many types on hostile input
        raise ProtocolError(f"control payload is not valid msgpack: {exc}") from exc
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        raise ProtocolError("control payload is not a [name, fields] pair")
    name, body = obj
    schema = _BY_NAME.get(name)
    if schema is None:
        raise ProtocolError(f"unknown message type {name!r}")
    if expect is not None and schema.cls is not expect:
        raise ProtocolError(f"expected message {message_name(expect)!r}, got {name!r}")
    try:
        return _decode_dataclass(_schema(schema.cls), body, name)
    except _Invalid as exc:
        raise ProtocolError(f"invalid message {name!r}: {exc}") from exc


def _decompress(payload: bytes | bytearray | memoryview) -> bytes:
    """Inflate a zstd payload, refusing to produce more than the control limit (zip bombs)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True)
        parts = []
        size = 0
        while size <= MAX_CONTROL_PAYLOAD:
            chunk = reader.read(MAX_CONTROL_PAYLOAD + 1 - size)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"control payload is not valid zstd: {exc}") from exc
    if size > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(f"compressed control payload inflates beyond {MAX_CONTROL_PAYLOAD} bytes")
    return b"".join(parts)


# --- schema compilation ----------------------------------------------------------


def _schema(cls: type) -> _Schema:
    """The compiled schema of a dataclass (message or nested), compiling it on first use."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS.setdefault(cls, _Schema(cls))
    if not schema.compiled:
        hints = typing.get_type_hints(cls)
        required = set()
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            schema.encoders[f.name], schema.decoders[f.name] = _compile(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)
        schema.required = frozenset(required)
        schema.compiled = True
    return schema


def _encode_dataclass(schema: _Schema, obj: Any, path: str) -> dict[str, Any]:
    if type(obj) is not schema.cls:
        raise _Invalid(path, f"expected {schema.cls.__qualname__}, got {type(obj).__qualname__}")
    body = {}
    for name, enc in schema.encoders.items():
        try:
            body[name] = enc(getattr(obj, name))
        except _Invalid as exc:
            raise _Invalid(f"{path}.{name}", str(exc)) from None
    return body


def _decode_dataclass(schema: _Schema, body: Any, path: str) -> Any:
    if not isinstance(body, dict):
        raise _Invalid(path, f"expected a map of fields, got {type(body).__name__}")
    unknown = body.keys() - schema.decoders.keys()
    if unknown:
        raise _Invalid(path, f"unknown fields {sorted(map(str, unknown))}")
    missing = schema.required - body.keys()
    if missing:
        raise _Invalid(path, f"missing fields {sorted(missing)}")
    kwargs = {}
    for name, value in body.items():
        try:
            kwargs[name] = schema.decoders[name](value)
        except _Invalid as exc:
            raise _Invalid(f"{path}.{name}", str(exc)) from None
    try:
        return schema.cls(**kwargs)
    except Exception as exc:  # a __post_init__ check refusing the values
        raise _Invalid(path, f"rejected by {schema.cls.__qualname__}: {exc}") from exc


def _compile(tp: Any) -> tuple[_Convert, _Convert]:
    """Build (encoder, decoder) converters for one annotation; both validate."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None) or tp is None:
        return _scalar(lambda v: v is None, "None")
    if tp is bool:
        return _scalar(lambda v: type(v) is bool, "bool")
    if tp is int:  # msgpack carries -2**63 .. 2**64-1
        return _scalar(lambda v: type(v) is int and _INT_MIN <= v <= _INT_MAX, "int (64-bit)")
    if tp is str:
        return _scalar(lambda v: type(v) is str, "str")
    if tp is bytes:
        return _scalar(lambda v: type(v) is bytes, "bytes")
    if tp is float:
        return _float()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _nested(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_compile(a) for a in args], tp)
    if origin is list and len(args) == 1:
        return _sequence(_compile(args[0]), list)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_compile(args[0]), tuple)
    if origin is tuple and args:
        return _fixed_tuple([_compile(a) for a in args])
    if origin is dict and len(args) == 2:
        return _mapping(_compile(args[0]), _compile(args[1]))
    raise TypeError(f"unsupported message field type {tp!r}")


def _scalar(check: Callable[[Any], bool], label: str) -> tuple[_Convert, _Convert]:
    def convert(v: Any) -> Any:
        if not check(v):
            raise _Invalid("value", f"expected {label}, got {type(v).__name__}")
        return v

    return convert, convert


def _float() -> tuple[_Convert, _Convert]:
    def convert(v: Any) -> float:
        if type(v) is float:
            return v
        if type(v) is int:
            return float(v)
        raise _Invalid("value", f"expected float, got {type(v).__name__}")

    return convert, convert


def _enum(cls: type[enum.Enum]) -> tuple[_Convert, _Convert]:
    def enc(v: Any) -> Any:
        if not isinstance(v, cls):
            raise _Invalid("value", f"expected {cls.__qualname__}, got {type(v).__name__}")
        return v.value

    def dec(v: Any) -> Any:
        if type(v) not in (int, str):
            raise _Invalid("value", f"expected {cls.__qualname__} value, got {type(v).__name__}")
        try:
            return cls(v)
        except ValueError as exc:
            raise _Invalid("value", f"{v!r} is not a {cls.__qualname__}") from exc

    return enc, dec


def _nested(cls: type) -> tuple[_Convert, _Convert]:
    label = cls.__qualname__

    def enc(v: Any) -> Any:
        return _encode_dataclass(_schema(cls), v, label)

    def dec(v: Any) -> Any:
        return _decode_dataclass(_schema(cls), v, label)

    return enc, dec


def _union(alternatives: list[tuple[_Convert, _Convert]], tp: Any) -> tuple[_Convert, _Convert]:
    def pick(index: int) -> _Convert:
        def convert(v: Any) -> Any:
            for alt in alternatives:
                try:
                    return alt[index](v)
                except _Invalid:
                    continue
            raise _Invalid("value", f"{type(v).__name__} matches none of {tp}")

        return convert

    return pick(0), pick(1)


def _sequence(item: tuple[_Convert, _Convert], kind: type) -> tuple[_Convert, _Convert]:
    enc_item, dec_item = item

    def enc(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _Invalid("value", f"expected a sequence, got {type(v).__name__}")
        return [enc_item(x) for x in v]

    def dec(v: Any) -> Any:
        if type(v) is not list:
            raise _Invalid("value", f"expected an array, got {type(v).__name__}")
        return kind(dec_item(x) for x in v)

    return enc, dec


def _fixed_tuple(items: list[tuple[_Convert, _Convert]]) -> tuple[_Convert, _Convert]:
    def pick(index: int, source: tuple[type, ...], build: type) -> _Convert:
        def convert(v: Any) -> Any:
            if not isinstance(v, source) or len(v) != len(items):  # type: ignore[arg-type]
                raise _Invalid("value", f"expected a {len(items)}-tuple")
            return build(conv[index](x) for conv, x in zip(items, v))  # type: ignore[call-overload]

        return convert

    return pick(0, (tuple, list), list), pick(1, (list,), tuple)


def _mapping(key: tuple[_Convert, _Convert], value: tuple[_Convert, _Convert]) -> tuple[_Convert, _Convert]:
    def pick(index: int) -> _Convert:
        def convert(v: Any) -> Any:
            if type(v) is not dict:
                raise _Invalid("value", f"expected a map, got {type(v).__name__}")
            return {key[index](k): value[index](x) for k, x in v.items()}

        return convert

    return pick(0), pick(1)
