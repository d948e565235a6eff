"""Value types shared by the collectives and the public API: reduce ops, quantization, results.

``pccl`` re-exports :class:`ReduceOp`, :class:`Quantization` and :class:`ReduceInfo`; the checks
here are the ones a user sees, so every refusal says what to pass instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from transport.errors import InvalidUsageError

__all__ = [
    "FLOAT_DTYPES",
    "INTEGER_DTYPES",
    "SUPPORTED_DTYPES",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "check_dtype",
]


class ReduceOp(enum.Enum):
    """How the contributions of all peers are combined, element by element.

    ``AVG`` is ``SUM`` followed by one division by the world size at the owner of each chunk
    (floats: true division; integers: division rounding toward zero, as in C). Integer ``SUM``
    and ``PROD`` wrap around modulo 2**bits like torch's own integer arithmetic.
    """

    SUM = "sum"
    AVG = "avg"
    PROD = "prod"
    MAX = "max"
    MIN = "min"


INTEGER_DTYPES: tuple[torch.dtype, ...] = (
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = INTEGER_DTYPES + FLOAT_DTYPES

_ALGORITHMS = ("min_max", "zero_point")
_QUANT_DTYPES = (torch.uint8, torch.uint4)  # type: ignore[attr-defined]  # torch >= 2.3, not in stubs


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse a tensor dtype the collectives cannot reduce.

    Raises:
        InvalidUsageError: ``dtype`` is not one of :data:`SUPPORTED_DTYPES` (e.g. bool, complex,
            the float8 and sub-byte types).
    """
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise InvalidUsageError(
            f"collectives do not support tensors of dtype {dtype}; convert the tensor to one of: {names}"
        )


@dataclass(frozen=True)
class Quantization:
    """Lossy compression of floating-point data on the wire (``docs/protocol.md`` §7.4).

    ``dtype`` is ``torch.uint8`` (one value per byte) or ``torch.uint4`` (4 bits, two values per
    byte). ``algorithm`` is ``"min_max"`` (the piece's range [min, max] mapped onto 0..2**bits-1;
    error at most half a step) or ``"zero_point"`` (the range widened to contain 0, which is then
    represented exactly; error at most one step). One step is ``(max - min) / (2**bits - 1)`` of
    the piece being encoded; see :mod:`collectives.quantize` for the exact bound.

    Raises:
        InvalidUsageError: an unknown algorithm or a dtype other than uint8 / uint4.
    """

    dtype: torch.dtype = torch.uint8
    algorithm: str = "min_max"

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise InvalidUsageError(
                f"unknown quantization algorithm {self.algorithm!r}; pass algorithm='min_max' or 'zero_point'"
            )
        if self.dtype not in _QUANT_DTYPES:
            raise InvalidUsageError(
                f"cannot quantize to {self.dtype}; pass dtype=torch.uint8 or dtype=torch.uint4 (4-bit)"
            )

    @property
    def bits(self) -> int:
        """Bits per encoded value: 8 or 4."""
        return 8 if self.dtype == torch.uint8 else 4


@dataclass(frozen=True)
class ReduceInfo:
    """What a finished collective did: the ring size it ran on and the payload bytes it moved."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
