"""Argument checks, descriptors and host staging for the Communicator's collectives.

The ring executor (:mod:`collectives.ring`) works on flat CPU tensors and leaves its
destination unspecified after a failure. This module turns a user's call into what
the executor needs and back (``docs/protocol.md`` §5.6.1):

- **In place on the CPU**: the input is copied into a backup buffer first (in the
  caller's thread, so the event loop stays free), the ring runs *out of place* from
  the backup into the tensor (received data lands straight in the tensor, without the
  scratch pieces an in-place ring needs), and a failure copies the backup back. The
  copy is one pass over the tensor, 15-35 % of a loopback all-reduce here (``pccl bench
  allreduce --out`` shows it): the price of a failed call leaving the tensor exactly
  as it was. Filling the backup piece by piece during the ring was measured too and
  used as much CPU, so the simple copy stays.
- **``out=`` on the CPU**: the ring reads the input and writes ``out``; the input is
  never written, ``out`` is unspecified after a failure; no copy at all.
- **CUDA**: the input is copied into a pinned host buffer, the ring runs there, and
  the device tensor is written only after success, so no backup is needed.

Backup and pinned buffers come from a :class:`HostBuffers` cache the Communicator
keeps, so a training loop does not allocate (and page-fault) every step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from collectives import DEFAULT_PIECE_BYTES, Quantization, ReduceOp
from collectives.types import check_dtype
from pccl.errors import InvalidUsageError
from pccl.master_collectives import MAX_TAG

__all__ = [
    "HostBuffers",
    "Staged",
    "check_op",
    "check_quantization",
    "check_tag",
    "check_tensor",
    "descriptor",
    "stage_in_place",
    "stage_out_of_place",
]

_GRANULE = 64 * 1024  # buffer sizes are rounded up to this, so similar sizes share buffers
_KEEP_FREE = 8  # idle buffers kept per cache; beyond that the smallest are dropped


class HostBuffers:
    """A thread-safe cache of flat uint8 host buffers (optionally pinned for CUDA copies).

    Buffers are taken in the caller's thread and given back on the event loop, hence
    the lock. At most a few idle buffers are kept (the largest), so the cache holds
    roughly what the operations in flight at once needed.
    """

    def __init__(self, pinned: bool = False) -> None:
        self._pinned = pinned
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` bytes (contents undefined); give it back later."""
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        with self._lock:
            fits = [i for i, buf in enumerate(self._free) if buf.numel() >= size]
            if fits:
                best = min(fits, key=lambda i: self._free[i].numel())
                return self._free.pop(best)
        return torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`take`; nothing may use it any more."""
        with self._lock:
            self._free.append(buf)
            if len(self._free) > _KEEP_FREE:
                self._free.remove(min(self._free, key=lambda b: b.numel()))

    def cached_bytes(self) -> int:
        """Bytes held by idle buffers."""
        with self._lock:
            return sum(buf.numel() for buf in self._free)

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self._lock:
            self._free.clear()


# -- argument checks (in the caller's thread, before anything is sent) -------------------


def check_tensor(t: Any, name: str = "tensor") -> torch.Tensor:
    """Refuse what the collectives cannot work on; ``t`` itself is returned.

    Raises:
        InvalidUsageError: not a tensor, not contiguous, not on the CPU or a CUDA
            device, or an unsupported dtype (bool, complex, float8, sub-byte).
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidUsageError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise InvalidUsageError(f"{name} is on {t.device}; collectives take CPU or CUDA tensors")
    if not t.is_contiguous():
        raise InvalidUsageError(f"{name} is not contiguous; pass {name}.contiguous() (and copy the result back)")
    check_dtype(t.dtype)
    return t


def check_op(op: Any) -> ReduceOp:
    """Raises InvalidUsageError unless ``op`` is a :class:`ReduceOp`."""
    if not isinstance(op, ReduceOp):
        raise InvalidUsageError(f"op must be a pccl.ReduceOp (SUM, AVG, PROD, MAX, MIN), got {op!r}")
    return op


def check_quantization(quantization: Any, dtype: torch.dtype) -> Quantization | None:
    """Raises InvalidUsageError unless ``quantization`` is None or a Quantization of a float tensor."""
    if quantization is None:
        return None
    if not isinstance(quantization, Quantization):
        raise InvalidUsageError(
            f"quantization must be a pccl.Quantization or None, got {type(quantization).__name__}"
        )
    if not dtype.is_floating_point:
        raise InvalidUsageError(f"quantization applies to floating-point tensors, not {dtype}; pass quantization=None")
    return quantization


def check_tag(tag: Any) -> int:
    """Raises InvalidUsageError unless ``tag`` is an int in ``0..2**63-1`` (``docs/protocol.md`` §5.7)."""
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
        raise InvalidUsageError(f"tag must be an int in 0..{MAX_TAG}, got {tag!r}")
    return tag


def descriptor(
    kind: str,
    t: torch.Tensor,
    op: ReduceOp | None = None,
    quantization: Quantization | None = None,
    **extra: int | str | None,
) -> dict[str, Any]:
    """What every member of the group must agree on for one operation (``docs/protocol.md`` §5.6, §5.6.1).

    The master compares these key by key, so a peer passing another size, dtype, op or
    quantization fails the call on every member with an error naming the key, instead
    of being reduced with the wrong bytes.
    """
    return {
        "kind": kind,
        "dtype": str(t.dtype).removeprefix("torch."),
        "numel": t.numel(),
        "op": None if op is None else op.value,
        "quantization": None if quantization is None else f"uint{quantization.bits}:{quantization.algorithm}",
        "piece_bytes": DEFAULT_PIECE_BYTES,
        **extra,
    }


# -- staging ----------------------------------------------------------------------------


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` cover exactly the same bytes."""
    return a.device == b.device and _span(a) == _span(b)


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` share at least one byte."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1 and a.numel() > 0 and b.numel() > 0


@dataclass
class Staged:
    """The CPU tensors one operation runs on, and what to do when it ends.

    ``src`` / ``dst``: flat CPU tensors for the ring (``dst`` may be ``src``).
    ``in_place``: the user's tensor is ``dst``'s storage (a world of one has nothing to copy).
    Call :meth:`failed` or :meth:`succeeded` on the event loop, then :meth:`release`.
    """

    src: torch.Tensor
    dst: torch.Tensor
    in_place: bool
    _restore: tuple[torch.Tensor, torch.Tensor] | None = None  # (target, backup)
    _publish: tuple[torch.Tensor, torch.Tensor] | None = None  # (device target, host result)
    _buffers: list[tuple[HostBuffers, torch.Tensor]] = field(default_factory=list)

    def failed(self) -> None:
        """Put the user's tensor back as it was before the call (in place only)."""
        if self._restore is not None:
            target, backup = self._restore
            target.copy_(backup)

    def succeeded(self) -> None:
        """Copy a staged result to its device tensor (CUDA only)."""
        if self._publish is not None:
            target, host = self._publish
            target.copy_(host)

    def release(self) -> None:
        """Give the staging buffers back; idempotent."""
        for cache, buf in self._buffers:
            cache.give(buf)
        self._buffers.clear()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor; an empty one becomes a fresh empty tensor, because
    an empty tensor may have stride 0, which byte views refuse."""
    if t.numel() == 0:
        return torch.empty(0, dtype=t.dtype)
    return t.detach().view(-1)


def _host_copy(cache: HostBuffers, t: torch.Tensor, staged: list[tuple[HostBuffers, torch.Tensor]]) -> torch.Tensor:
    """A flat copy of ``t`` in a buffer from ``cache`` (recorded in ``staged`` for release)."""
    nbytes = t.numel() * t.element_size()
    raw = cache.take(nbytes)
    staged.append((cache, raw))
    host = raw[:nbytes].view(t.dtype)
    host.copy_(t.detach().reshape(-1))
    return host


def stage_in_place(
    t: torch.Tensor, backups: HostBuffers, pinned: Callable[[], HostBuffers], *, keep: bool = True
) -> Staged:
    """Stage an in-place operation on ``t`` (see the module docstring).

    ``keep=False`` skips the backup where the caller's tensor is never written
    (a broadcast root).
    """
    flat = _flat(t)
    buffers: list[tuple[HostBuffers, torch.Tensor]] = []
    try:
        if t.device.type == "cuda":
            host = _host_copy(pinned(), flat, buffers)
            return Staged(host, host, True, _publish=(flat, host) if keep else None, _buffers=buffers)
        if not keep or flat.numel() == 0:
            return Staged(flat, flat, True)
        backup = _host_copy(backups, flat, buffers)
        # Out of place from the backup: the ring reads the backup, writes the tensor.
        return Staged(backup, flat, True, _restore=(flat, backup), _buffers=buffers)
    except BaseException:
        for cache, buf in buffers:
            cache.give(buf)
        raise


def stage_out_of_place(t: torch.Tensor, out: torch.Tensor, pinned: Callable[[], HostBuffers]) -> Staged:
    """Stage an operation reading ``t`` and writing ``out`` (same device; ``t`` never written).

    ``out`` may be shorter than ``t`` (a reduce-scatter writes one chunk).
    """
    src, dst = _flat(t), _flat(out)
    if t.device.type != "cuda":
        return Staged(src, dst, False)
    buffers: list[tuple[HostBuffers, torch.Tensor]] = []
    try:
        host_src = _host_copy(pinned(), src, buffers)
        if dst.numel() == src.numel():
            host_dst = host_src  # the ring runs in place on the staged copy
        else:
            nbytes = dst.numel() * dst.element_size()
            raw = pinned().take(nbytes)
            buffers.append((pinned(), raw))
            host_dst = raw[:nbytes].view(dst.dtype)
        return Staged(host_src, host_dst, False, _publish=(dst, host_dst), _buffers=buffers)
    except BaseException:
        for cache, buf in buffers:
            cache.give(buf)
        raise
