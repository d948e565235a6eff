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
  as it was. Filling the backup piece by piece *on the event loop* was measured too and
  used as much CPU. So from :data:`OVERLAP_MIN_BYTES` on, the copy runs in a worker
  thread instead (:class:`BackupFill`) while the ring already runs *in place* on the
  tensor: the ring writes a piece only once the thread has copied it, so a region not
  yet copied still holds its old value and a failure restores the copied ones.
- **``out=`` on the CPU**: the ring reads the input and writes ``out``; the input is
  never written, ``out`` is unspecified after a failure; no copy at all.
- **CUDA**: the input is copied into a pinned host buffer, the ring runs there, and
  the device tensor is written only after success, so no backup is needed.

Backup and pinned buffers come from a :class:`HostBuffers` cache the Communicator
keeps, so a training loop does not allocate (and page-fault) every step.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from collectives import DEFAULT_PIECE_BYTES, Quantization, ReduceOp
from collectives.schedule import chunk_bounds, piece_bounds, piece_count
from collectives.types import check_dtype
from pccl.errors import InvalidUsageError
from pccl.master_collectives import MAX_TAG

__all__ = [
    "OVERLAP_MIN_BYTES",
    "BackupFill",
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
#: In-place CPU tensors of at least this many bytes are backed up by a worker thread while
#: the ring runs (:class:`BackupFill`); smaller ones are copied before the call.
OVERLAP_MIN_BYTES = 16 << 20
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
    guard: BackupFill | None = None  # the backup still being copied; pass it to the ring
    _restore: tuple[torch.Tensor, torch.Tensor] | None = None  # (target, backup)
    _publish: tuple[torch.Tensor, torch.Tensor] | None = None  # (device target, host result)
    _buffers: list[tuple[HostBuffers, torch.Tensor]] = field(default_factory=list)

    def failed(self) -> None:
        """Put the user's tensor back as it was before the call (in place only)."""
        if self.guard is not None:
            self.guard.restore()
        elif self._restore is not None:
            target, backup = self._restore
            target.copy_(backup)

    def succeeded(self) -> None:
        """Copy a staged result to its device tensor (CUDA only)."""
        if self._publish is not None:
            target, host = self._publish
            target.copy_(host)

    def release(self) -> None:
        """Give the staging buffers back; idempotent."""
        if self.guard is not None:
            self.guard.finish()  # the thread may be between blocks still
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
    t: torch.Tensor,
    backups: HostBuffers,
    pinned: Callable[[], HostBuffers],
    *,
    keep: bool = True,
    overlap: tuple[concurrent.futures.Executor, int] | None = None,
) -> Staged:
    """Stage an in-place operation on ``t`` (see the module docstring).

    ``keep=False`` skips the backup where the caller's tensor is never written
    (a broadcast root). ``overlap=(executor, world_size)``: for an all-reduce of at
    least :data:`OVERLAP_MIN_BYTES` on the CPU, copy the backup in ``executor`` while the
    ring runs in place (``Staged.guard``), in the order a ring of ``world_size`` writes.
    """
    flat = _flat(t)
    buffers: list[tuple[HostBuffers, torch.Tensor]] = []
    try:
        if t.device.type == "cuda":
            host = _host_copy(pinned(), flat, buffers)
            return Staged(host, host, True, _publish=(flat, host) if keep else None, _buffers=buffers)
        if not keep or flat.numel() == 0:
            return Staged(flat, flat, True)
        nbytes = flat.numel() * flat.element_size()
        if overlap is not None and nbytes >= OVERLAP_MIN_BYTES:
            raw = backups.take(nbytes)
            buffers.append((backups, raw))
            executor, world = overlap
            fill = BackupFill(flat, raw[:nbytes].view(flat.dtype), fill_order(flat, world), executor)
            return Staged(flat, flat, True, guard=fill, _buffers=buffers)
        backup = _host_copy(backups, flat, buffers)
        # Out of place from the backup: the ring reads the backup, writes the tensor.
        return Staged(backup, flat, True, _restore=(flat, backup), _buffers=buffers)
    except BaseException:
        for cache, buf in buffers:
            cache.give(buf)
        raise


def fill_order(t: torch.Tensor, world: int, piece_bytes: int = DEFAULT_PIECE_BYTES) -> list[tuple[int, int]]:
    """Blocks of flat ``t`` in the order an in-place ring of ``world`` ranks first writes them:
    piece 0 of every chunk, then piece 1, ... (``docs/protocol.md`` §7.1)."""
    n, w = t.numel(), max(1, world)
    chunks = [chunk_bounds(n, w, c) for c in range(w)]
    pieces = piece_count(max(b - a for a, b in chunks), t.element_size(), piece_bytes)
    blocks = [piece_bounds(a, b, pieces, p) for p in range(pieces) for a, b in chunks]
    return [(a, b) for a, b in blocks if b > a]


class BackupFill:
    """A backup copied by a worker thread while the ring already runs in place on the tensor.

    The thread copies ``blocks`` (disjoint, covering the tensor) in the given order. It is the
    ring's :class:`collectives.engine.WriteGuard`: ``await writable(a, b)`` returns once every
    block meeting ``[a, b)`` is copied, and the ring writes nothing before. So a block not
    copied yet holds the caller's value, and :meth:`restore` only copies back the others.
    Waiters are woken on their event loop; everything else is thread-safe.
    """

    def __init__(
        self,
        target: torch.Tensor,
        backup: torch.Tensor,
        blocks: list[tuple[int, int]],
        executor: concurrent.futures.Executor,
    ) -> None:
        self._target, self._backup, self._blocks = target, backup, blocks
        by_position = sorted(range(len(blocks)), key=lambda i: blocks[i][0])
        self._starts = [blocks[i][0] for i in by_position]
        self._copy_index = by_position  # the copy index of each block, by position
        self._done = 0  # blocks copied, in copy order
        self._stop = False
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._job = executor.submit(self._copy)

    def _copy(self) -> None:
        for i, (a, b) in enumerate(self._blocks):
            if self._stop:
                break
            self._backup[a:b].copy_(self._target[a:b])  # releases the GIL
            with self._lock:
                self._done = i + 1
                woken = [w for w in self._waiters if w[0] <= i + 1]
                self._waiters = [w for w in self._waiters if w[0] > i + 1]
            for _, loop, fut in woken:
                loop.call_soon_threadsafe(_wake, fut)

    def _needed(self, a: int, b: int) -> int:
        """How many blocks (in copy order) must be copied before ``[a, b)`` may be written."""
        if a >= b:
            return 0
        lo = max(0, bisect.bisect_right(self._starts, a) - 1)
        hi = bisect.bisect_left(self._starts, b)
        return max(self._copy_index[lo:hi], default=-1) + 1

    def is_writable(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` is in the backup already."""
        return self._done >= self._needed(start, stop)

    async def writable(self, start: int, stop: int) -> None:
        """Return once ``[start, stop)`` is in the backup."""
        need = self._needed(start, stop)
        if self._done >= need:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._done >= need:
                return
            self._waiters.append((need, loop, fut))
        await fut

    def finish(self) -> int:
        """Stop after the block being copied and wait for the thread; the blocks copied."""
        self._stop = True
        if not self._job.cancel():  # not queued behind another backup any more: wait for it
            self._job.result()
        return self._done

    def restore(self) -> None:
        """Copy every block that reached the backup back into the tensor (the others were never written)."""
        for a, b in self._blocks[: self.finish()]:
            self._target[a:b].copy_(self._backup[a:b])


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # the waiter may have been cancelled meanwhile
        fut.set_result(None)


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
