"""Quantization codecs: documented error bound, exact bytes, 4-bit packing, special values."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collectives.quantize import Workspace, decode, encode, encoded_size
from collectives.types import FLOAT_DTYPES, Quantization
from transport.errors import InvalidUsageError

QUANTS = [Quantization(d, a) for d in (torch.uint8, torch.uint4) for a in ("min_max", "zero_point")]
QIDS = [f"{q.algorithm}-{q.bits}bit" for q in QUANTS]


def _roundtrip(x: torch.Tensor, q: Quantization) -> tuple[torch.Tensor, bytes]:
    ws = Workspace()
    enc = torch.empty(encoded_size(x.numel(), q), dtype=torch.uint8)
    encode(x, q, enc, ws)
    out = torch.empty_like(x)
    decode(enc, q, out, ws)
    return out, enc.numpy().tobytes()


def _bound(x64: np.ndarray, q: Quantization, dtype: torch.dtype) -> float:
    """The bound stated in collectives/quantize.py, computed here from the raw values."""
    lo, hi = float(x64.min()), float(x64.max())
    k = 0.5
    if q.algorithm == "zero_point":
        lo, hi, k = min(lo, 0.0), max(hi, 0.0), 1.0
    step = (hi - lo) / ((1 << q.bits) - 1)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    u_c, u_o = torch.finfo(cdt).eps / 2, torch.finfo(dtype).eps / 2
    tiny = torch.finfo(cdt).smallest_normal * torch.finfo(cdt).eps
    m = max(abs(lo), abs(hi))
    return k * step + 8 * u_c * m + u_o * (m + k * step) + 4 * tiny


def _range_overflows(x64: np.ndarray, q: Quantization, dtype: torch.dtype) -> bool:
    lo, hi = float(x64.min()), float(x64.max())
    if q.algorithm == "zero_point":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    with np.errstate(over="ignore"):
        return not math.isfinite(hi - lo) or hi - lo > torch.finfo(cdt).max


def _floats(width: int) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        dtype=np.dtype(f"<f{width // 8}"),
        shape=st.integers(1, 300),
        elements=st.floats(width=width, allow_nan=False, allow_infinity=False),
    )


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_roundtrip_error_within_documented_bound(q: Quantization, dtype: torch.dtype, data: st.DataObject) -> None:
    width = {torch.float16: 16, torch.bfloat16: 32, torch.float32: 32, torch.float64: 64}[dtype]
    arr = data.draw(_floats(width))
    x = torch.from_numpy(arr.copy()).to(dtype)
    x64 = x.double().numpy()
    out, _ = _roundtrip(x, q)
    got = out.double().numpy()
    if _range_overflows(x64, q, dtype) or not np.all(np.isfinite(x64)):
        assert np.all(np.isnan(got))  # documented: such a piece decodes to NaN
        return
    err = np.abs(got - x64).max()
    assert err <= _bound(x64, q, dtype), (err, _bound(x64, q, dtype))


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
def test_bound_is_tight_enough_to_mean_something(q: Quantization) -> None:
    x = torch.linspace(-3.0, 5.0, 10_001)
    out, _ = _roundtrip(x, q)
    step = 8.0 / ((1 << q.bits) - 1)
    err = (out.double() - x.double()).abs().max().item()
    assert step * 0.3 < err <= step * (0.5 if q.algorithm == "min_max" else 1.0) + 1e-5


def _reference_codes(x: np.ndarray, q: Quantization) -> tuple[bytes, np.ndarray]:
    """The spec of collectives/quantize.py for float32 input, in numpy float32 arithmetic."""
    levels = (1 << q.bits) - 1
    lo, hi = float(x.min()), float(x.max())
    if q.algorithm == "zero_point":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = np.float32((hi - lo) / levels)
    if step == 0:  # a constant piece: every code is 0 (min_max) or the zero point 0 (zero_point)
        return struct.pack("<dd", *((lo, 0.0) if q.algorithm == "min_max" else (0.0, 0.0))), np.zeros(len(x), np.uint8)
    if q.algorithm == "min_max":
        header = struct.pack("<dd", lo, float(step))
        t = np.round((x - np.float32(lo)) / step)
    else:
        zp = float(min(max(round(-lo / float(step)), 0), levels))
        header = struct.pack("<dd", float(step), zp)
        t = np.round(x / step) + np.float32(zp)
    return header, np.clip(t, 0, levels).astype(np.uint8)


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_bytes_follow_the_spec_exactly(q: Quantization, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3 + 0.5).astype(np.float32)
    if n == 1:
        x[0] = 2.5
    _, got = _roundtrip(torch.from_numpy(x), q)
    header, codes = _reference_codes(x, q)
    if q.bits == 4:  # value 2i in the low nibble of byte i, value 2i+1 in the high nibble
        padded = np.concatenate([codes, np.zeros(len(codes) % 2, np.uint8)])
        codes = padded[0::2] | (padded[1::2] << 4)
    assert got == header + codes.tobytes()
    assert len(got) == encoded_size(n, q) == 16 + (n if q.bits == 8 else (n + 1) // 2)


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
def test_encoding_is_deterministic_and_decoding_depends_on_bytes_only(q: Quantization) -> None:
    x = torch.randn(4099, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    a, bytes_a = _roundtrip(x, q)
    b, bytes_b = _roundtrip(x.clone(), q)
    assert bytes_a == bytes_b
    # decoding the same bytes into a misaligned destination gives the same bits
    big = torch.empty(4100)
    decode(torch.frombuffer(bytearray(bytes_a), dtype=torch.uint8), q, big[1:], Workspace())
    assert big[1:].numpy().tobytes() == a.numpy().tobytes()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 255])
def test_four_bit_packing_of_odd_lengths(n: int) -> None:
    q = Quantization(torch.uint4, "min_max")
    values = [(i * 7) % 16 for i in range(n)]
    if n >= 2:
        values[0], values[1] = 0, 15  # range [0, 15]: step 1, so each code equals its value
    out, raw = _roundtrip(torch.tensor(values, dtype=torch.float32), q)
    assert len(raw) == 16 + (n + 1) // 2
    if n % 2:
        assert raw[-1] >> 4 == 0  # the unused high nibble is zero
    codes = [(raw[16 + i // 2] >> (4 * (i % 2))) & 0xF for i in range(n)]
    assert codes == values
    assert out.tolist() == [float(v) for v in values]


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25e-3, 6.0e4])
def test_constant_pieces_decode_exactly(q: Quantization, value: float) -> None:
    x = torch.full((33,), value, dtype=torch.float32)
    out, _ = _roundtrip(x, q)
    if q.algorithm == "zero_point" and value != 0.0:
        # the widened range [min(v, 0), max(v, 0)] makes v an end point: exact up to rounding
        assert torch.allclose(out, x, rtol=1e-6, atol=0)
    else:
        assert torch.equal(out, x)


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
def test_zero_point_keeps_zero_exact(q: Quantization) -> None:
    x = torch.tensor([-1.7, 0.0, 0.3, 2.9, 0.0])
    out, _ = _roundtrip(x, q)
    if q.algorithm == "zero_point":
        assert out[1].item() == 0.0 and out[4].item() == 0.0


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pieces_decode_to_nan(q: Quantization, bad: float) -> None:
    x = torch.tensor([1.0, bad, 3.0])
    out, raw = _roundtrip(x, q)
    assert torch.isnan(out).all()
    assert all(math.isnan(v) for v in struct.unpack("<dd", raw[:16]))


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
def test_a_range_too_wide_for_the_compute_dtype_decodes_to_nan(q: Quantization) -> None:
    x = torch.tensor([-3.0e38, 3.0e38])
    out, _ = _roundtrip(x, q)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("q", QUANTS, ids=QIDS)
@settings(max_examples=50, deadline=None)
@given(raw=st.binary(min_size=16, max_size=80))
def test_any_bytes_decode_without_error(q: Quantization, raw: bytes) -> None:
    n = (len(raw) - 16) if q.bits == 8 else 2 * (len(raw) - 16)
    out = torch.empty(n, dtype=torch.float32)
    decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), q, out, Workspace())


def test_wrong_sizes_are_refused() -> None:
    q = Quantization()
    with pytest.raises(ValueError):
        encode(torch.zeros(4), q, torch.empty(5, dtype=torch.uint8), Workspace())
    with pytest.raises(ValueError):
        decode(torch.empty(5, dtype=torch.uint8), q, torch.zeros(4), Workspace())
    with pytest.raises(ValueError):
        encode(torch.zeros(4, dtype=torch.int32), q, torch.empty(20, dtype=torch.uint8), Workspace())


def test_quantization_arguments_are_validated() -> None:
    assert Quantization().bits == 8 and Quantization(torch.uint4).bits == 4
    with pytest.raises(InvalidUsageError, match="min_max"):
        Quantization(algorithm="fancy")
    with pytest.raises(InvalidUsageError, match="uint4"):
        Quantization(dtype=torch.int8)
