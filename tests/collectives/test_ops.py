"""Reductions for every op x dtype against references computed independently.

Floats: one IEEE operation on two values of a dtype is the exact (float64 / Python int) result
rounded once to the dtype, so the reference is exact; integers: Python ints, wrapped modulo 2**bits.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from collectives.ops import finalize, reduce, typed_view
from collectives.types import FLOAT_DTYPES, INTEGER_DTYPES, ReduceOp

OPS = list(ReduceOp)
N = 257  # odd, and longer than any vector width


def _bits(dtype: torch.dtype) -> int:
    return dtype.itemsize * 8


def _wrap(value: int, dtype: torch.dtype) -> int:
    """Two's complement / modular wrap of a Python int into ``dtype``'s range."""
    bits = _bits(dtype)
    value %= 1 << bits
    signed = dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def _ints(dtype: torch.dtype, rng: random.Random, n: int) -> list[int]:
    info = torch.iinfo(dtype)
    edges = [info.min, info.max, 0, 1, info.max // 2 + 1, info.min + 1]
    return edges + [rng.randint(info.min, info.max) for _ in range(n - len(edges))]


def _int_tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Build the tensor through its raw little-endian bytes (independent of torch's casts)."""
    raw = b"".join(_wrap(v, dtype).to_bytes(dtype.itemsize, "little", signed=_wrap(v, dtype) < 0) for v in values)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).clone()


def _int_values(t: torch.Tensor) -> list[int]:
    raw = t.view(torch.uint8).numpy().tobytes()
    k = t.dtype.itemsize
    signed = t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    return [int.from_bytes(raw[i : i + k], "little", signed=signed) for i in range(0, len(raw), k)]


def _int_reference(a: list[int], b: list[int], op: ReduceOp, dtype: torch.dtype) -> list[int]:
    fn = {
        ReduceOp.SUM: lambda x, y: x + y,
        ReduceOp.AVG: lambda x, y: x + y,
        ReduceOp.PROD: lambda x, y: x * y,
        ReduceOp.MAX: max,
        ReduceOp.MIN: min,
    }[op]
    return [_wrap(fn(x, y), dtype) for x, y in zip(a, b)]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_integer_reduce_wraps_like_twos_complement(dtype: torch.dtype, op: ReduceOp) -> None:
    rng = random.Random(_bits(dtype) * 7 + OPS.index(op))
    a, b = _ints(dtype, rng, N), _ints(dtype, rng, N)[::-1]
    ta, tb = _int_tensor(a, dtype), _int_tensor(b, dtype)
    out = torch.empty_like(ta)
    reduce(ta, tb, out, op)
    assert _int_values(out) == _int_reference(a, b, op, dtype)
    reduce(ta, tb, ta, op)  # in place into the first operand
    assert _int_values(ta) == _int_values(out)


def test_integer_overflow_examples() -> None:
    a = torch.tensor([100, -128, 127], dtype=torch.int8)
    reduce(a, torch.tensor([100, -1, 1], dtype=torch.int8), a, ReduceOp.SUM)
    assert a.tolist() == [-56, 127, -128]
    u = torch.tensor([65535, 2], dtype=torch.uint16)
    reduce(u, torch.tensor([1, 65535], dtype=torch.uint16), u, ReduceOp.SUM)
    assert _int_values(u) == [0, 1]
    u = torch.tensor([2**31 + 5, 7], dtype=torch.int64).to(torch.uint32)
    reduce(u, u.clone(), u, ReduceOp.MAX)  # unsigned order, not signed: 2**31 + 5 stays the max
    assert _int_values(u) == [2**31 + 5, 7]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_integer_avg_divides_the_wrapped_sum_toward_zero(dtype: torch.dtype, world: int) -> None:
    rng = random.Random(world)
    values = _ints(dtype, rng, N)
    t = _int_tensor(values, dtype)
    finalize(t, ReduceOp.AVG, world)
    expected = [_wrap(abs(v) // world * (1 if v >= 0 else -1), dtype) for v in values]
    assert _int_values(t) == expected


def _float_inputs(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    special = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.eps, float("inf"), float("nan")],
        dtype=torch.float64,
    )
    scale = torch.exp(torch.randn(N - special.numel(), generator=g, dtype=torch.float64) * 4)
    body = torch.randn(N - special.numel(), generator=g, dtype=torch.float64) * scale
    a = torch.cat([special, body]).to(dtype)
    b = torch.cat([special.flip(0), body.flip(0) * 0.37]).to(dtype)
    return a, b


def _same_floats(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(np.all((x == y) | (np.isnan(x) & np.isnan(y))))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_float_reduce_is_the_correctly_rounded_result(dtype: torch.dtype, op: ReduceOp) -> None:
    a, b = _float_inputs(dtype, OPS.index(op))
    a64, b64 = a.double().numpy(), b.double().numpy()
    with np.errstate(all="ignore"):
        exact = {
            ReduceOp.SUM: a64 + b64,
            ReduceOp.AVG: a64 + b64,
            ReduceOp.PROD: a64 * b64,
            ReduceOp.MAX: np.where(np.isnan(a64) | np.isnan(b64), np.nan, np.maximum(a64, b64)),
            ReduceOp.MIN: np.where(np.isnan(a64) | np.isnan(b64), np.nan, np.minimum(a64, b64)),
        }[op]
    # exact (float64, itself exact for these formats) rounded once to the dtype
    expected = torch.from_numpy(exact).to(dtype).double().numpy()
    out = torch.empty_like(a)
    reduce(a, b, out, op)
    assert _same_floats(out.double().numpy(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_float_avg_divides_once(dtype: torch.dtype, world: int) -> None:
    a, _ = _float_inputs(dtype, world)
    expected = torch.from_numpy(a.double().numpy() / world).to(dtype).double().numpy()
    finalize(a, ReduceOp.AVG, world)
    assert _same_floats(a.double().numpy(), expected)


@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN])
def test_finalize_leaves_other_ops_alone(op: ReduceOp) -> None:
    t = torch.tensor([3.0, -7.5])
    finalize(t, op, 4)
    assert t.tolist() == [3.0, -7.5]


def test_mismatched_operands_are_refused() -> None:
    with pytest.raises(ValueError):
        reduce(torch.zeros(3), torch.zeros(4), torch.zeros(3), ReduceOp.SUM)
    with pytest.raises(ValueError):
        reduce(torch.zeros(3), torch.zeros(3, dtype=torch.float64), torch.zeros(3), ReduceOp.SUM)


def test_empty_operands_are_fine() -> None:
    e = torch.empty(0, dtype=torch.uint64)
    reduce(e, e, e, ReduceOp.SUM)
    finalize(e, ReduceOp.AVG, 3)
    assert e.numel() == 0


def test_typed_view_reinterprets_scratch_without_copy() -> None:
    raw = torch.zeros(64, dtype=torch.uint8)
    v = typed_view(raw, torch.float32, 3)
    v.fill_(1.0)
    assert raw[:12].numpy().tobytes() == np.ones(3, dtype="<f4").tobytes()
    with pytest.raises(ValueError):
        typed_view(raw, torch.float64, 9)
