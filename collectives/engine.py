"""The pipelined ring engine: moves pieces between neighbours as :mod:`.schedule` says.

Each operation runs ``window`` workers; worker ``i`` of ``K`` carries pieces ``i, i+K, …`` in
order through every step of the operation (``docs/protocol.md`` §7.2): a received piece is
reduced and forwarded at once, so sending, receiving and reducing of different pieces overlap.
Pieces start in order on every rank, so the lowest unfinished piece is always being worked on
everywhere and the pipeline cannot deadlock. Receives are posted before their data can arrive,
so it lands in place instead of in the link's side buffer.

This module holds the machinery every operation shares, plus all-gather and broadcast;
all-reduce and reduce-scatter are in :mod:`collectives.reduce`. What the destination holds
after a failure is specified in :mod:`collectives.ring`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import ops
from .buffers import BufferPool
from .quantize import Workspace
from .schedule import Phase, ag_recv_chunk, ag_send_chunk, piece_bounds, piece_count, transfer_seq

__all__ = ["AllGather", "Broadcast", "Operation", "RingPeers", "Scratch", "WriteGuard", "byte_view"]

RS, AG, BCAST = Phase.REDUCE_SCATTER, Phase.ALL_GATHER, Phase.BROADCAST


class RingPeers(Protocol):
    """A rank's two neighbours in the ring, as the executor needs them.

    - ``send_next(tag, seq, buf)`` sends ``buf`` to rank ``rank + 1`` as transfer ``(tag, seq)``
      and returns once ``buf`` may be reused.
    - ``recv_prev(tag, seq, buf)`` completes when exactly ``len(buf)`` bytes of transfer
      ``(tag, seq)`` from rank ``rank - 1`` were written into ``buf`` (``ProtocolError`` on a
      size mismatch). A cancelled receive must never write into ``buf`` afterwards.
    - ``forget(tag)`` drops data held for ``tag`` and refuses its late frames; after it returns
      nothing writes into a buffer posted for ``tag``. The neighbours are not told.
    - ``abort(tag, reason)`` forgets ``tag`` like ``forget`` and makes both neighbours' transfers
      of ``tag`` fail with ``PeerLostError`` naming ``reason``, so a failure travels around the
      ring (``docs/protocol.md`` §4, §7.6). Called when an operation fails or is cancelled.
    Both coroutines raise ``PeerLostError`` when the neighbour is gone or aborted the tag.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    async def send_next(self, tag: int, seq: int, buf: memoryview) -> None: ...

    async def recv_prev(self, tag: int, seq: int, buf: memoryview) -> None: ...

    def forget(self, tag: int) -> None: ...

    def abort(self, tag: int, reason: str) -> None: ...


class WriteGuard(Protocol):
    """Says when elements of an all-reduce's destination may be written (``ring_all_reduce(guard=)``).

    - ``is_writable(start, stop)``: whether ``dst[start:stop]`` may be written now;
    - ``writable(start, stop)``: returns once it may.
    The executor neither writes ``dst[start:stop]`` nor posts a receive into it before then,
    so a caller can still be copying the original values out (a backup made while the ring
    already runs in place).
    """

    def is_writable(self, start: int, stop: int) -> bool: ...

    async def writable(self, start: int, stop: int) -> None: ...


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous 1-D tensor, writable, without a copy."""
    return t.view(torch.uint8).numpy().data


@dataclass
class Scratch:
    """One worker's buffers, taken from the pool for the whole operation."""

    raw: list[torch.Tensor] = field(default_factory=list)
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    ws: Workspace | None = None
    # Receives posted ahead into this worker's scratch, by (piece, step), and how many so far.
    posted: dict[tuple[int, int], tuple[asyncio.Future[None] | None, torch.Tensor]] = field(default_factory=dict)
    slots: int = 0

    def add(self, pool: BufferPool, name: str, dtype: torch.dtype, numel: int) -> None:
        buf = pool.take(max(1, numel * dtype.itemsize))
        self.raw.append(buf)
        self.views[name] = ops.typed_view(buf, dtype, numel)


class Operation:
    """Worker pool, transfer accounting and failure handling shared by every operation."""

    def __init__(
        self, peers: RingPeers, tag: int, pieces: int, pool: BufferPool, window: int, offload: bool
    ) -> None:
        self.peers, self.tag, self.pieces, self.pool = peers, tag, pieces, pool
        self.rank, self.world = peers.rank, peers.world_size
        self.last = self.world - 2  # the last step of a phase
        self.tx = self.rx = 0
        self._workers = min(window, pieces)
        self._offload = offload
        self._tasks: set[asyncio.Future[Any]] = set()
        self._failed: asyncio.Future[BaseException] | None = None

    def _cap_workers(self, budget: int, per_worker: int) -> None:
        """Run fewer workers where their scratch would exceed ``budget`` (at least one).

        Callers pass half the tensor's size: small tensors trade pipelining for memory.
        """
        if per_worker > 0 and self._workers > 1:
            self._workers = max(1, min(self._workers, budget // per_worker))

    # -- to be provided by each operation -------------------------------------------------
    def _scratch(self) -> Scratch:
        return Scratch()

    async def _piece(self, p: int, st: Scratch) -> None:
        raise NotImplementedError

    # -- transfers ------------------------------------------------------------------------
    async def _send(self, phase: Phase, step: int, piece: int, buf: memoryview) -> None:
        seq = transfer_seq(phase, step, piece, self.world, self.pieces)
        await self.peers.send_next(self.tag, seq, buf)
        self.tx += len(buf)

    async def _recv(self, phase: Phase, step: int, piece: int, buf: memoryview) -> None:
        seq = transfer_seq(phase, step, piece, self.world, self.pieces)
        await self.peers.recv_prev(self.tag, seq, buf)
        self.rx += len(buf)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``coro`` alongside; if it fails, the whole operation fails at once."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failed is not None and not self._failed.done():
            self._failed.set_result(exc)

    async def _compute(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a reduction or codec call inline on the loop, or in the loop's thread pool."""
        if not self._offload:
            fn(*args)
            return
        job = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: wait until it has left the buffers, then give up.
            await asyncio.wait([job])
            raise

    # -- driver ---------------------------------------------------------------------------
    async def execute(self) -> tuple[int, int]:
        """Run the operation to the end; returns ``(tx_bytes, rx_bytes)``.

        Raises:
            PeerLostError, ProtocolError: from the transport; every transfer still pending is
                cancelled and ``peers.abort(tag, reason)`` called before this returns (also when
                the operation is cancelled).
        """
        self._failed = asyncio.get_running_loop().create_future()
        states = [self._scratch() for _ in range(self._workers)]
        try:
            workers = [self._spawn(self._worker(i, st)) for i, st in enumerate(states)]
            await self._wait(workers)
        except BaseException as exc:
            await self._abort(exc)
            raise
        finally:
            for st in states:
                for buf in st.raw:
                    self.pool.give(buf)
                if st.ws is not None:
                    self.pool.give_workspace(st.ws)
        return self.tx, self.rx

    async def _worker(self, i: int, st: Scratch) -> None:
        # Worker i owns pieces i, i + K, i + 2K, ... (K workers), each started in order, so it
        # knows its next piece and can post that piece's receives early.
        for p in range(i, self.pieces, self._workers):
            await self._piece(p, st)

    async def _wait(self, workers: list[asyncio.Future[None]]) -> None:
        assert self._failed is not None
        pending: set[asyncio.Future[Any]] = {*workers, self._failed}
        while len(pending) > 1:  # _failed stays pending unless something failed
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                raise self._failed.result()
        for w in workers:  # a worker's failure may not have reached _failed yet
            w.result()

    async def _abort(self, exc: BaseException) -> None:
        """Cancel every transfer of this operation, tell the neighbours, and wait until no
        transfer can touch a buffer."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Tell the neighbours before waiting for the tasks to unwind (§7.6); the cancelled
        # tasks have not run since, so none of them can start a transfer of the tag any more.
        reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
        try:
            self.peers.abort(self.tag, f"rank {self.rank}: {reason}")
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _post_ag(self, p: int, region: Callable[[int, int], torch.Tensor]) -> list[asyncio.Future[None] | None]:
        """Post the all-gather receives of piece ``p`` straight into their final place.

        Posted when the piece starts, long before the data can arrive (``docs/protocol.md`` §7.2).
        """
        r, w = self.rank, self.world
        recvs: list[asyncio.Future[None] | None] = []
        for s in range(w - 1):
            dst = region(ag_recv_chunk(r, s, w), p)
            recvs.append(self._spawn(self._recv(AG, s, p, byte_view(dst))) if dst.numel() else None)
        return recvs

    async def _ag_plain(
        self, p: int, region: Callable[[int, int], torch.Tensor], recvs: list[asyncio.Future[None] | None]
    ) -> None:
        """All-gather piece ``p``: send this rank's final ``region``, forward each arrival."""
        r, w = self.rank, self.world
        own = region(ag_send_chunk(r, 0, w), p)
        sends = [self._spawn(self._send(AG, 0, p, byte_view(own)))] if own.numel() else []
        for s, recv in enumerate(recvs):
            if recv is None:
                continue
            await recv
            if s < self.last:
                sends.append(self._spawn(self._send(AG, s + 1, p, byte_view(region(ag_recv_chunk(r, s, w), p)))))
        await asyncio.gather(*sends)


class AllGather(Operation):
    """Every rank's ``src`` (same length everywhere) lands in ``views[rank]`` on every rank."""

    def __init__(
        self,
        peers: RingPeers,
        tag: int,
        views: list[torch.Tensor],
        piece_bytes: int,
        pool: BufferPool,
        window: int,
        offload: bool,
    ) -> None:
        self.views = views
        self.length = views[0].numel()
        pieces = piece_count(self.length, views[0].element_size(), piece_bytes)
        super().__init__(peers, tag, pieces, pool, window, offload)

    def region(self, c: int, p: int) -> torch.Tensor:
        a, b = piece_bounds(0, self.length, self.pieces, p)
        return self.views[c][a:b]

    async def _piece(self, p: int, st: Scratch) -> None:
        await self._ag_plain(p, self.region, self._post_ag(p, self.region))


class Broadcast(Operation):
    """``tensor`` (flat) of rank ``root`` overwrites ``tensor`` on every other rank, along the ring."""

    def __init__(
        self,
        peers: RingPeers,
        tag: int,
        tensor: torch.Tensor,
        root: int,
        piece_bytes: int,
        pool: BufferPool,
        window: int,
        offload: bool,
    ) -> None:
        self.tensor = tensor
        self.hops = (peers.rank - root) % peers.world_size  # distance from the root
        pieces = piece_count(tensor.numel(), tensor.element_size(), piece_bytes)
        super().__init__(peers, tag, pieces, pool, window, offload)

    async def _piece(self, p: int, st: Scratch) -> None:
        a, b = piece_bounds(0, self.tensor.numel(), self.pieces, p)
        buf = byte_view(self.tensor[a:b])
        if self.hops > 0:
            await self._recv(BCAST, 0, p, buf)
        if self.hops < self.world - 1:  # the rank just before the root does not forward
            await self._send(BCAST, 0, p, buf)
