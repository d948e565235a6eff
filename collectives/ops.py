"""Element-wise reductions on flat tensors, for every supported integer and float dtype.

The executor calls these on 1-D views of the caller's tensor and of scratch buffers, so nothing
here allocates a tensor-sized temporary. Semantics (``docs/protocol.md`` §7.3):

- Floats reduce in their own dtype (float16 sums stay float16), like NCCL and Gloo. MAX / MIN
  propagate NaN.
- Integer SUM and PROD wrap around modulo ``2**bits`` (two's complement for signed types), the
  same as torch's integer arithmetic; no error is raised on overflow.
- AVG is SUM during the ring and a single division by the world size at the chunk's owner
  (:func:`finalize`), so every peer ends with the owner's bits. Floats use true division;
  integers divide the (wrapped) sum rounding toward zero, as C does: AVG of int ``[-3, 0]`` over 2
  peers is ``-1``.

Every dtype numpy has is reduced through numpy views of the same memory (same IEEE results and
wrap-around): single-threaded numpy was as fast as torch on a piece, and it never enters
torch's intra-op thread pool, which stalled a 1 MiB add for ~50 ms when the cores were busy
with other peers (DESIGN.md §5). float16 and bfloat16 stay on torch (numpy lacks bfloat16 and
its float16 arithmetic is slow). torch also lacks CPU add / max / min for uint16/32/64.
"""

from __future__ import annotations

import numpy as np
import torch

from .types import ReduceOp

__all__ = ["finalize", "reduce", "typed_view"]

_TORCH_ONLY = (torch.float16, torch.bfloat16)
_NUMPY_REDUCE = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.PROD: np.multiply,
    ReduceOp.MAX: np.maximum,
    ReduceOp.MIN: np.minimum,
}
_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def typed_view(raw: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of a flat uint8 buffer, reinterpreted as ``dtype`` (no copy).

    Raises:
        ValueError: ``raw`` is shorter than ``numel`` elements of ``dtype``.
    """
    nbytes = numel * dtype.itemsize
    if raw.numel() < nbytes:
        raise ValueError(f"scratch of {raw.numel()} bytes cannot hold {numel} x {dtype}")
    return raw[:nbytes].view(dtype)


def reduce(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, op: ReduceOp) -> None:
    """``out = a (op) b`` element-wise; all 1-D, same dtype and length; ``out`` may be ``a`` or ``b``.

    ``AVG`` adds here; the division happens once, in :func:`finalize`.

    Raises:
        ValueError: the tensors differ in dtype or length.
    """
    n = out.numel()
    if not (a.dtype == b.dtype == out.dtype and a.numel() == b.numel() == n):
        raise ValueError(f"cannot reduce {a.dtype}[{a.numel()}] and {b.dtype}[{b.numel()}] into {out.dtype}[{n}]")
    if n == 0:
        return
    if out.dtype not in _TORCH_ONLY:
        with np.errstate(all="ignore"):  # overflow to inf and NaN are results here, not errors
            _NUMPY_REDUCE[op](a.numpy(), b.numpy(), out=out.numpy())
    elif op is ReduceOp.SUM or op is ReduceOp.AVG:
        torch.add(a, b, out=out)
    elif op is ReduceOp.PROD:
        torch.mul(a, b, out=out)
    elif op is ReduceOp.MAX:
        torch.maximum(a, b, out=out)
    else:
        torch.minimum(a, b, out=out)


def finalize(t: torch.Tensor, op: ReduceOp, world_size: int) -> None:
    """Turn a reduced chunk into the op's final value, in place: divides by ``world_size`` for AVG.

    Every other op is already final. Integer AVG rounds toward zero.
    """
    if op is not ReduceOp.AVG or world_size == 1 or t.numel() == 0:
        return
    if t.dtype in _TORCH_ONLY:
        t.div_(world_size)
    elif t.dtype.is_floating_point:
        a = t.numpy()
        np.divide(a, a.dtype.type(world_size), out=a)
    elif t.dtype in _UNSIGNED:
        a = t.numpy()
        np.floor_divide(a, a.dtype.type(world_size), out=a)  # unsigned: floor == toward zero
    else:
        t.div_(world_size, rounding_mode="trunc")  # signed: numpy only floors
