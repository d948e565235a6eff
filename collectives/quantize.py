"""Quantization codecs: one float piece <-> a 16-byte header plus packed 8-bit or 4-bit codes.

Wire layout of one encoded piece (``docs/protocol.md`` §7.4)::

    header   struct "<dd"      min_max: (lo, step)      zero_point: (step, zero_point)
    codes    ceil(n * bits / 8) bytes; 4-bit: value 2i in the low nibble of byte i,
             value 2i+1 in the high nibble; an odd count leaves the last high nibble 0

``L = 2**bits - 1`` levels. Arithmetic runs in the *compute dtype*: float64 for float64 data,
float32 for everything else; header values are stored already rounded to it, so decoding
depends on the bytes alone and every machine decodes the same bits.

- ``min_max``: ``lo, hi = min(x), max(x)``, ``step = (hi - lo) / L``,
  ``q = round((x - lo) / step)``, ``x' = q * step + lo``.
- ``zero_point``: the range is widened to contain 0 (``lo = min(lo, 0)``, ``hi = max(hi, 0)``),
  ``step = (hi - lo) / L``, ``zp = round(-lo / step)``, ``q = clamp(round(x / step) + zp, 0, L)``,
  ``x' = (q - zp) * step``; 0 is reproduced exactly.

Error bound, for finite x in a piece with range ``[lo, hi]`` (after widening, for zero_point),
``M = max(|lo|, |hi|)``, ``u_c`` / ``u_o`` the unit roundoffs (``eps / 2``) of the compute and the
output dtype and ``tiny`` the compute dtype's smallest subnormal::

    |x - x'| <= k * step + 8 * u_c * M + u_o * (M + k * step) + 4 * tiny     k = 1/2 (min_max), 1 (zero_point)

The ``u`` terms are the float roundings of the arithmetic and of the cast back to the output
dtype. A constant piece (``step == 0``) decodes exactly. A piece that holds a NaN or an
infinity, or whose range ``hi - lo`` is not finite in the compute dtype, is encoded as the
header ``(nan, nan)`` with zero codes and decodes to all NaN: non-finite input stays visible
instead of silently becoming a number.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from .types import Quantization

__all__ = ["HEADER", "Workspace", "decode", "encode", "encoded_size"]

HEADER = struct.Struct("<dd")
_U16LE = np.dtype("<u2")  # explicit little-endian, so the nibble order is the same everywhere


class Workspace:
    """Scratch memory for the codecs, grown on demand and reused across calls.

    Not thread-safe: give each thread that encodes or decodes its own workspace.
    """

    def __init__(self) -> None:
        self._floats: dict[torch.dtype, torch.Tensor] = {}
        self._bytes = torch.empty(0, dtype=torch.uint8)
        self._wide = np.empty(0, dtype=_U16LE)

    def floats(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """A float buffer of at least ``n`` elements of ``dtype`` (contents undefined)."""
        buf = self._floats.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._floats[dtype] = buf
        return buf[:n]

    def wide(self, n: int) -> np.ndarray:
        """A little-endian uint16 array of at least ``n`` elements (for 4-bit packing)."""
        if self._wide.size < n:
            self._wide = np.empty(n, dtype=_U16LE)
        return self._wide[:n]

    def codes(self, n: int) -> torch.Tensor:
        """A uint8 buffer of at least ``n`` bytes (contents undefined)."""
        if self._bytes.numel() < n:
            self._bytes = torch.empty(n, dtype=torch.uint8)
        return self._bytes[:n]


def encoded_size(numel: int, quant: Quantization) -> int:
    """Bytes that ``numel`` values occupy on the wire, header included."""
    return HEADER.size + (numel if quant.bits == 8 else (numel + 1) // 2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (float32 or float64), as the kernels will see it."""
    if dtype != torch.float32:
        return value
    with np.errstate(over="ignore"):  # a garbage header may not fit; it then decodes to inf/NaN
        return float(np.float32(value))


def _params(src: torch.Tensor, quant: Quantization, cdt: torch.dtype) -> tuple[float, float] | None:
    """Header values ``(a, b)`` for ``src``, or None when the piece must be sent as all-NaN."""
    if src.dtype in (torch.float32, torch.float64):
        arr = src.numpy()  # numpy's min/max were twice as fast as torch.aminmax here
        lo, hi = float(arr.min()), float(arr.max())
    else:
        lo_t, hi_t = torch.aminmax(src)
        lo, hi = float(lo_t), float(hi_t)
    if quant.algorithm == "zero_point":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = (1 << quant.bits) - 1
    limit = float(torch.finfo(cdt).max)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > limit:
        return None
    step = _round_to((hi - lo) / levels, cdt)
    if hi > lo and step == 0.0:
        step = float(torch.finfo(cdt).smallest_normal) * float(torch.finfo(cdt).eps)  # smallest subnormal
    if quant.algorithm == "min_max":
        return lo, step
    zero_point = float(round(-lo / step)) if step > 0 else 0.0
    return step, min(max(zero_point, 0.0), float(levels))


def encode(src: torch.Tensor, quant: Quantization, out: torch.Tensor, ws: Workspace) -> None:
    """Encode the 1-D float tensor ``src`` into the uint8 tensor ``out`` (``encoded_size`` bytes).

    Deterministic: the same values give the same bytes on every machine.

    Raises:
        ValueError: ``src`` is not floating point, or ``out`` has the wrong size.
    """
    n = src.numel()
    if not src.dtype.is_floating_point or out.numel() != encoded_size(n, quant):
        raise ValueError(f"cannot encode {src.dtype}[{n}] into {out.numel()} bytes with {quant}")
    head = out[: HEADER.size].numpy()
    codes_out = out[HEADER.size :]
    params = _params(src, quant, _compute_dtype(src.dtype)) if n else (0.0, 0.0)
    if params is None:
        head[:] = np.frombuffer(HEADER.pack(math.nan, math.nan), dtype=np.uint8)
        codes_out.zero_()
        return
    head[:] = np.frombuffer(HEADER.pack(*params), dtype=np.uint8)
    levels = (1 << quant.bits) - 1
    if quant.bits == 8:
        codes = codes_out
    else:
        codes = ws.codes(n)
    _quantize(src, quant, params, levels, codes, ws)
    if quant.bits == 4:
        _pack4(codes, codes_out, ws)


def _quantize(
    src: torch.Tensor,
    quant: Quantization,
    params: tuple[float, float],
    levels: int,
    codes: torch.Tensor,
    ws: Workspace,
) -> None:
    """Fill ``codes`` (uint8, one per value) with the integer codes of ``src``."""
    a, b = params
    if quant.algorithm == "min_max" and b == 0.0:
        codes.zero_()  # constant piece: every value equals lo
        return
    if quant.algorithm == "zero_point" and a == 0.0:
        codes.fill_(int(b))  # all zeros: every value is the zero point
        return
    cdt = _compute_dtype(src.dtype)
    t = ws.floats(cdt, src.numel())
    # Separate ops, never fused, so each result is one IEEE rounding everywhere. The first op
    # reads src directly when it already has the compute dtype (saves a copy).
    first = src if src.dtype == cdt else t.copy_(src)
    if quant.algorithm == "min_max":
        torch.sub(first, a, out=t).div_(b).round_()
    else:
        torch.div(first, a, out=t).round_().add_(b)
    t.clamp_(0.0, float(levels))
    # numpy's float -> uint8 cast was ~5x faster than torch's; the values are integral and in range
    np.copyto(codes.numpy(), t.numpy(), casting="unsafe")


def _pack4(codes: torch.Tensor, out: torch.Tensor, ws: Workspace) -> None:
    """Two 4-bit codes per byte: even index low nibble, odd index high nibble.

    Pairs of codes are read as one little-endian uint16 ``hi << 8 | lo``; ``(v | v >> 4)``
    then holds ``hi << 4 | lo`` in its low byte: contiguous numpy ops, no strided access.
    """
    c, o = codes.numpy(), out.numpy()
    pairs = c.size // 2
    v = c[: 2 * pairs].view(_U16LE)
    tmp = ws.wide(pairs)
    np.right_shift(v, 4, out=tmp)
    np.bitwise_or(tmp, v, out=tmp)
    np.copyto(o[:pairs], tmp, casting="unsafe")  # keeps the low byte
    if c.size % 2:
        o[pairs] = c[-1]


def decode(data: torch.Tensor, quant: Quantization, out: torch.Tensor, ws: Workspace) -> None:
    """Decode ``encoded_size(out.numel())`` bytes from ``data`` into the 1-D float tensor ``out``.

    Any byte string decodes to some values (no exception for garbage); a NaN header gives NaN.

    Raises:
        ValueError: ``out`` is not floating point, or ``data`` has the wrong size.
    """
    n = out.numel()
    if not out.dtype.is_floating_point or data.numel() != encoded_size(n, quant):
        raise ValueError(f"cannot decode {data.numel()} bytes into {out.dtype}[{n}] with {quant}")
    if n == 0:
        return
    a, b = HEADER.unpack(data[: HEADER.size].numpy().tobytes())
    cdt = _compute_dtype(out.dtype)
    packed = data[HEADER.size :]
    t = out if out.dtype == cdt else ws.floats(cdt, n)
    if quant.bits == 8:
        t.copy_(packed)
    else:
        _unpack4(packed, t, ws)
    if quant.algorithm == "min_max":
        t.mul_(_round_to(b, cdt)).add_(_round_to(a, cdt))
    else:
        t.sub_(_round_to(b, cdt)).mul_(_round_to(a, cdt))
    if t is not out:
        out.copy_(t)


def _unpack4(packed: torch.Tensor, t: torch.Tensor, ws: Workspace) -> None:
    """Spread 4-bit codes from ``packed`` into the float tensor ``t`` (one code per element).

    Each byte ``hi << 4 | lo`` widens to the little-endian uint16 ``hi << 8 | lo``, i.e. the two
    codes as consecutive bytes (see :func:`_pack4`).
    """
    n = t.numel()
    p = packed.numpy()
    wide = ws.wide(p.size)
    np.copyto(wide, p)
    np.bitwise_or(wide, np.left_shift(wide, 4), out=wide)
    np.bitwise_and(wide, 0x0F0F, out=wide)
    t.copy_(torch.from_numpy(wide.view(np.uint8)[:n]))
