"""Collective bodies and host staging for the torch.distributed backend "pccl".

Each torch collective becomes one or two pccl collectives (``docs/protocol.md`` §5.6); the
bodies here run on the Communicator's event loop with the ring neighbours in ``ctx.peers``.
Ring position equals torch rank (:mod:`pccl.distributed_rendezvous` makes it so), so rank
``r`` owns chunk ``r`` of a reduce-scatter exactly as torch expects. Tensors are moved as
flat CPU buffers; data that is only copied (gather, broadcast, all-to-all) travels as bytes,
so every dtype works there.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

import torch
import torch.distributed as dist

from collectives import BufferPool, Quantization, ReduceOp
from collectives.ring import ring_all_gather, ring_all_reduce, ring_broadcast, ring_reduce_scatter
from collectives.types import SUPPORTED_DTYPES
from pccl.errors import PeerLostError
from pccl.peer_session import CollectiveContext

__all__ = [
    "HostTensor",
    "Step",
    "all_gather_step",
    "barrier_step",
    "broadcast_step",
    "flat_bytes",
    "reduce_op",
    "reduce_scatter_step",
    "reduce_step",
]

Body = Callable[[CollectiveContext], Awaitable[None]]
# One pccl collective: (descriptor, body).
Step = tuple[dict[str, Any], Body]

_OPS = {
    dist.ReduceOp.SUM: ReduceOp.SUM,
    dist.ReduceOp.AVG: ReduceOp.AVG,
    dist.ReduceOp.PRODUCT: ReduceOp.PROD,
    dist.ReduceOp.MIN: ReduceOp.MIN,
    dist.ReduceOp.MAX: ReduceOp.MAX,
}


def reduce_op(op: Any, method: str) -> tuple[ReduceOp, float | None]:
    """The pccl op for a torch ``ReduceOp``, and the PREMUL_SUM factor (else None).

    Raises:
        NotImplementedError: BAND, BOR, BXOR or an unknown op.
    """
    if op == dist.ReduceOp.PREMUL_SUM:
        factor = op.factor if hasattr(op, "factor") else None
        if isinstance(factor, torch.Tensor):
            factor = float(factor.item())
        if factor is None:
            raise NotImplementedError(f"pccl backend {method}: PREMUL_SUM without a factor")
        return ReduceOp.SUM, float(factor)
    for torch_op, ours in _OPS.items():
        if op == torch_op:
            return ours, None
    raise NotImplementedError(f"pccl backend {method}: reduce op {op} is not supported")


def check_reducible(t: torch.Tensor, method: str) -> None:
    """Raises NotImplementedError for a dtype the ring cannot reduce (bool, complex, float8)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"pccl backend {method}: dtype {t.dtype} cannot be reduced")


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor (a fresh empty one when it is empty)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.detach().reshape(-1).view(torch.uint8)


class HostTensor:
    """A user tensor as a contiguous CPU tensor the ring can work on.

    CPU contiguous tensors are used as they are; others (CUDA, non-contiguous) get a host
    copy (``load=True`` copies the current value in) that :meth:`publish` writes back.
    """

    def __init__(self, t: torch.Tensor, load: bool) -> None:
        self.user = t
        self.direct = t.device.type == "cpu" and t.is_contiguous()
        if self.direct:
            self.host = t.detach()
        elif load:
            self.host = t.detach().to("cpu", copy=True).contiguous()
        else:
            self.host = torch.empty(t.shape, dtype=t.dtype)

    @property
    def flat(self) -> torch.Tensor:
        if self.host.numel() == 0:
            return torch.empty(0, dtype=self.host.dtype)
        return self.host.reshape(-1)

    def publish(self) -> None:
        """Copy the host result to the user's tensor (nothing to do when it is used directly)."""
        if not self.direct:
            with torch.no_grad():
                self.user.copy_(self.host)


def _check_world(ctx: CollectiveContext, size: int) -> None:
    # A lost rank shrinks the pccl ring; torch's world size is fixed, so the group is broken.
    if ctx.world_size != size:
        raise PeerLostError(f"the pccl ring has {ctx.world_size} of the group's {size} ranks; a rank was lost")


def _desc(kind: str, t: torch.Tensor, **extra: int | float | str | bool | None) -> dict[str, Any]:
    return {"kind": "dist." + kind, "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel(), **extra}


def reduce_step(
    flat: torch.Tensor, op: ReduceOp, quant: Quantization | None, size: int, pool: BufferPool
) -> Step:
    """All-reduce ``flat`` in place."""

    async def body(ctx: CollectiveContext) -> None:
        _check_world(ctx, size)
        if ctx.peers is not None:
            await ring_all_reduce(ctx.peers, ctx.op_id, flat, flat, op, quant, pool=pool)

    q = None if quant is None else f"uint{quant.bits}:{quant.algorithm}"
    return _desc("allreduce", flat, op=op.value, quantization=q), body


def reduce_scatter_step(src: torch.Tensor, dst: torch.Tensor, op: ReduceOp, size: int, pool: BufferPool) -> Step:
    """Reduce ``src`` (``size`` equal chunks); ``dst`` receives this rank's chunk."""

    async def body(ctx: CollectiveContext) -> None:
        _check_world(ctx, size)
        if ctx.peers is None:
            dst.copy_(src)
        else:
            await ring_reduce_scatter(ctx.peers, ctx.op_id, src, dst, op, pool=pool)

    return _desc("reduce_scatter", src, op=op.value), body


def all_gather_step(src: torch.Tensor, dst: torch.Tensor | Sequence[torch.Tensor], size: int, pool: BufferPool) -> Step:
    """Gather every rank's ``src`` bytes into ``dst`` (flat ``size * len(src)`` or a list), by rank."""

    async def body(ctx: CollectiveContext) -> None:
        _check_world(ctx, size)
        if ctx.peers is None:
            target = dst if isinstance(dst, torch.Tensor) else dst[0]
            target.copy_(src)
        else:
            await ring_all_gather(ctx.peers, ctx.op_id, src, dst, pool=pool)

    return _desc("allgather", src), body


def broadcast_step(flat: torch.Tensor, root: int, size: int, pool: BufferPool) -> Step:
    """Overwrite ``flat`` with rank ``root``'s."""

    async def body(ctx: CollectiveContext) -> None:
        _check_world(ctx, size)
        if ctx.peers is not None:
            await ring_broadcast(ctx.peers, ctx.op_id, flat, root, pool=pool)

    return _desc("broadcast", flat, root=root), body


def barrier_step(size: int) -> Step:
    """Nothing moves: the master starts the op once every rank initiated it, and reports
    success once every rank completed it, which is a barrier (``docs/protocol.md`` §5.6)."""

    async def body(ctx: CollectiveContext) -> None:
        _check_world(ctx, size)

    return {"kind": "dist.barrier"}, body
