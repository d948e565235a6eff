"""Ring collectives over a :class:`RingPeers`: all-reduce, reduce-scatter, all-gather, broadcast.

These coroutines check their arguments, then hand the bytes to :mod:`collectives.engine`; the
wire layout is ``docs/protocol.md`` §7. Every rank of the ring must call the same operation with
the same ``tag``, dtype, length, op, quantization and ``piece_bytes`` (``window`` and ``offload``
are local choices). Each returns ``(tx_bytes, rx_bytes)``: payload bytes this rank sent and
received (with quantization, the encoded size).

After a **failure** (an exception; ``peers.abort(tag, reason)`` has been called, so the
neighbours fail too, and no transfer of the operation touches any buffer any more):

- ``ring_all_reduce``: ``src`` is unchanged unless it *is* ``dst``. Each element of ``dst`` holds
  its previous value, a partial reduction, or its final value; an element whose bytes were
  arriving when the link broke may hold a mix of those bytes. In place, the caller must restore
  its own copy (the pccl Communicator does).
- ``ring_reduce_scatter``: ``dst`` is unspecified in the same way; ``src`` outside ``dst`` is
  unchanged.
- ``ring_all_gather``: the caller's own block of ``dst`` holds ``src``; the others are unspecified.
- ``ring_broadcast``: the root's tensor is unchanged; the others' are unspecified.

Memory: scratch comes from a :class:`BufferPool` the caller keeps across calls (one is made per
call if none is given). An out-of-place all-reduce needs none: every receive lands in ``dst``.
In place, each worker has up to two pieces to land reduce-scatter data in; a standalone
reduce-scatter two pieces; quantization adds a few encoded pieces. ``window`` workers run at
once (default: 16 MiB of pieces in flight), and fewer when their scratch would exceed half the
tensor, so scratch stays at most ``2 * window * piece_bytes`` and, except for tensors too small
to split, at most half the tensor.

Reductions run inline on the event loop by default: on this 2-core machine a worker thread
lost (measured, ``docs/protocol.md`` §7.5); ``offload=True`` runs them in the loop's executor.

CUDA tensors are staged through pinned host memory (the device copy is updated only after
success); any other device is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from transport.errors import InvalidUsageError

from .buffers import BufferPool
from .engine import AllGather, Broadcast, RingPeers, WriteGuard
from .reduce import AllReduce, ReduceScatter
from .schedule import DEFAULT_PIECE_BYTES, chunk_bounds
from .types import Quantization, ReduceOp, check_dtype

__all__ = [
    "DEFAULT_PIECE_BYTES",
    "BufferPool",
    "RingPeers",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_broadcast",
    "ring_reduce_scatter",
]

# Default window: bytes of pieces in flight per operation. Two 4 MiB pieces already kept loopback
# busy; four leave room for a link whose latency is a sizeable part of a piece's transfer time.
_IN_FLIGHT_BYTES = 16 << 20


def _window(window: int | None, piece_bytes: int) -> int:
    if piece_bytes < 1:
        raise InvalidUsageError(f"piece_bytes must be positive, got {piece_bytes}; pass e.g. 4 << 20")
    if window is None:
        return max(2, _IN_FLIGHT_BYTES // piece_bytes)
    if window < 1:
        raise InvalidUsageError(f"window must be at least 1, got {window}")
    return window


def _check_peers(peers: RingPeers) -> None:
    if peers.world_size < 1 or not 0 <= peers.rank < peers.world_size:
        raise InvalidUsageError(f"bad ring position: rank {peers.rank} of world size {peers.world_size}")


def _check_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a CPU tensor and return it as a flat, detached view."""
    if not isinstance(t, torch.Tensor):
        raise InvalidUsageError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise InvalidUsageError(f"{name} is on {t.device}; pass a CPU or CUDA tensor")
    if not t.is_contiguous():
        raise InvalidUsageError(f"{name} is not contiguous; pass {name}.contiguous()")
    check_dtype(t.dtype)
    return t.detach().view(-1)


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1 and a.numel() > 0 and b.numel() > 0


def _check_quant(quant: Quantization | None, dtype: torch.dtype) -> None:
    if quant is not None and not isinstance(quant, Quantization):
        raise InvalidUsageError(f"quantization must be a Quantization or None, got {type(quant).__name__}")
    if quant is not None and not dtype.is_floating_point:
        raise InvalidUsageError(f"quantization applies to floating-point tensors, not {dtype}; pass quantization=None")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a CUDA tensor (``docs/protocol.md`` §7.6); CPU tensors as they are."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


async def ring_all_reduce(
    peers: RingPeers,
    tag: int,
    src: torch.Tensor,
    dst: torch.Tensor,
    op: ReduceOp = ReduceOp.SUM,
    quantization: Quantization | None = None,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    pool: BufferPool | None = None,
    window: int | None = None,
    offload: bool = False,
    guard: WriteGuard | None = None,
) -> tuple[int, int]:
    """Reduce ``src`` over the ring into ``dst`` on every rank; ``dst`` may be ``src`` (in place).

    On success every rank's ``dst`` holds bit-identical values. World size 1 copies ``src``.
    ``guard`` (CPU tensors): no element of ``dst`` is written, and no receive into it posted,
    before the guard allows it (``collectives.engine.WriteGuard``).

    Raises:
        InvalidUsageError: tensors of different dtype/length, non-contiguous, partly overlapping,
            an unsupported dtype or device, quantization of integers, bad ``piece_bytes``.
        PeerLostError: a neighbour vanished; see the module docstring for what ``dst`` holds.
        ProtocolError: a neighbour sent a transfer of the wrong size.
    """
    if not isinstance(op, ReduceOp):
        raise InvalidUsageError(f"op must be a ReduceOp, got {op!r}")
    if src.device.type == "cuda" or dst.device.type == "cuda":
        h_src = _to_host(src)
        h_dst = h_src if dst is src else _to_host(dst)
        info = await ring_all_reduce(
            peers, tag, h_src, h_dst, op, quantization,
            piece_bytes=piece_bytes, pool=pool, window=window, offload=offload,
        )  # fmt: skip
        dst.copy_(h_dst)
        return info
    _check_peers(peers)
    s, d = _check_tensor(src, "src"), _check_tensor(dst, "dst")
    if s.dtype != d.dtype or s.numel() != d.numel():
        raise InvalidUsageError(f"src is {s.dtype}[{s.numel()}] but dst is {d.dtype}[{d.numel()}]; make them match")
    if _overlaps(s, d) and _span(s) != _span(d):
        raise InvalidUsageError("src and dst partly overlap; pass the same tensor (in place) or disjoint ones")
    _check_quant(quantization, s.dtype)
    win = _window(window, piece_bytes)
    if peers.world_size == 1:
        if _span(s) != _span(d):
            if guard is not None:
                await guard.writable(0, d.numel())
            d.copy_(s)
        return 0, 0
    engine = AllReduce(peers, tag, s, d, op, quantization, piece_bytes, pool or BufferPool(), win, offload, guard)
    return await engine.execute()


async def ring_reduce_scatter(
    peers: RingPeers,
    tag: int,
    src: torch.Tensor,
    dst: torch.Tensor,
    op: ReduceOp = ReduceOp.SUM,
    quantization: Quantization | None = None,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    pool: BufferPool | None = None,
    window: int | None = None,
    offload: bool = False,
) -> tuple[int, int]:
    """Reduce ``src`` (``n`` elements) over the ring; ``dst`` receives this rank's chunk.

    Chunk ``r`` is ``schedule.chunk_bounds(n, world_size, r)`` (any ``n``; the first
    ``n % world_size`` chunks are one element longer). ``dst`` has exactly that many elements
    and may be that slice of ``src``. With quantization, only the owner holds its chunk, so there
    is no adoption step: the result is the owner's full-precision reduction of decoded partials.

    Raises:
        InvalidUsageError: as for :func:`ring_all_reduce`, or ``dst`` of the wrong length.
        PeerLostError, ProtocolError: as for :func:`ring_all_reduce`.
    """
    if not isinstance(op, ReduceOp):
        raise InvalidUsageError(f"op must be a ReduceOp, got {op!r}")
    if src.device.type == "cuda" or dst.device.type == "cuda":
        h_src, h_dst = _to_host(src), _to_host(dst)
        info = await ring_reduce_scatter(
            peers, tag, h_src, h_dst, op, quantization,
            piece_bytes=piece_bytes, pool=pool, window=window, offload=offload,
        )  # fmt: skip
        dst.copy_(h_dst)
        return info
    _check_peers(peers)
    s, d = _check_tensor(src, "src"), _check_tensor(dst, "dst")
    lo, hi = chunk_bounds(s.numel(), peers.world_size, peers.rank)
    if s.dtype != d.dtype or d.numel() != hi - lo:
        raise InvalidUsageError(
            f"dst must be {s.dtype}[{hi - lo}] (rank {peers.rank}'s chunk of {s.numel()}), got {d.dtype}[{d.numel()}]"
        )
    if _overlaps(s, d) and _span(d) != _span(s[lo:hi]):
        raise InvalidUsageError("dst overlaps src; pass a separate tensor or exactly this rank's chunk of src")
    _check_quant(quantization, s.dtype)
    win = _window(window, piece_bytes)
    if peers.world_size == 1:
        if _span(s) != _span(d):
            d.copy_(s)
        return 0, 0
    engine = ReduceScatter(peers, tag, s, d, op, quantization, piece_bytes, pool or BufferPool(), win, offload)
    return await engine.execute()


async def ring_all_gather(
    peers: RingPeers,
    tag: int,
    src: torch.Tensor,
    dst: torch.Tensor | Sequence[torch.Tensor],
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    pool: BufferPool | None = None,
    window: int | None = None,
) -> tuple[int, int]:
    """Gather every rank's ``src`` (same dtype and length on all ranks) into ``dst``, by rank.

    ``dst`` is either one tensor of ``world_size * len(src)`` elements (rank ``c``'s block at
    ``[c * m, (c + 1) * m)``) or a sequence of ``world_size`` tensors of ``len(src)`` elements.
    ``src`` may be this rank's own block of ``dst``.

    Raises:
        InvalidUsageError: wrong shapes, dtypes, overlaps or devices.
        PeerLostError, ProtocolError: as for :func:`ring_all_reduce` (a rank whose ``src`` length
            differs makes its neighbour fail with ``ProtocolError``).
    """
    outs = [dst] if isinstance(dst, torch.Tensor) else list(dst)
    if any(t.device.type == "cuda" for t in [src, *outs]):
        hosts = [_to_host(t) for t in outs]
        info = await ring_all_gather(
            peers, tag, _to_host(src), hosts[0] if isinstance(dst, torch.Tensor) else hosts,
            piece_bytes=piece_bytes, pool=pool, window=window,
        )  # fmt: skip
        for out, host in zip(outs, hosts):
            out.copy_(host)
        return info
    _check_peers(peers)
    w, s = peers.world_size, _check_tensor(src, "src")
    m = s.numel()
    if isinstance(dst, torch.Tensor):
        flat = _check_tensor(dst, "dst")
        if flat.numel() != w * m or flat.dtype != s.dtype:
            raise InvalidUsageError(
                f"dst must be {s.dtype}[{w * m}] (world size x len(src)), got {flat.dtype}[{flat.numel()}]"
            )
        views = [flat[c * m : (c + 1) * m] for c in range(w)]
    else:
        if len(dst) != w:
            raise InvalidUsageError(f"dst must hold {w} tensors (one per rank), got {len(dst)}")
        views = [_check_tensor(t, f"dst[{c}]") for c, t in enumerate(dst)]
        if any(v.numel() != m or v.dtype != s.dtype for v in views):
            raise InvalidUsageError(f"every dst tensor must be {s.dtype}[{m}] like src")
    for c, v in enumerate(views):
        same = _span(v) == _span(s) and c == peers.rank
        if _overlaps(v, s) and not same:
            raise InvalidUsageError("src overlaps dst other than as this rank's own block; pass disjoint tensors")
    if _span(views[peers.rank]) != _span(s):
        views[peers.rank].copy_(s)
    win = _window(window, piece_bytes)
    if w == 1:
        return 0, 0
    return await AllGather(peers, tag, views, piece_bytes, pool or BufferPool(), win, False).execute()


async def ring_broadcast(
    peers: RingPeers,
    tag: int,
    tensor: torch.Tensor,
    root_rank: int,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    pool: BufferPool | None = None,
    window: int | None = None,
) -> tuple[int, int]:
    """Overwrite ``tensor`` on every rank with the root's, pipelined along the ring.

    Raises:
        InvalidUsageError: ``root_rank`` outside the ring, bad tensor.
        PeerLostError, ProtocolError: as for :func:`ring_all_reduce`.
    """
    _check_peers(peers)
    if not 0 <= root_rank < peers.world_size:
        raise InvalidUsageError(f"root_rank {root_rank} is not in the ring of size {peers.world_size}")
    if tensor.device.type == "cuda":
        host = _to_host(tensor)
        info = await ring_broadcast(peers, tag, host, root_rank, piece_bytes=piece_bytes, pool=pool, window=window)
        tensor.copy_(host)
        return info
    t = _check_tensor(tensor, "tensor")
    win = _window(window, piece_bytes)
    if peers.world_size == 1:
        return 0, 0
    return await Broadcast(peers, tag, t, root_rank, piece_bytes, pool or BufferPool(), win, False).execute()
