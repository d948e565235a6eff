"""The Communicator's collectives: all-reduce (blocking, async, several with retry), reduce-scatter,
all-gather and broadcast (``docs/protocol.md`` §5.6.1).

Every call is checked in the caller's thread, staged (:mod:`pccl.collective_staging`), then run
as one collective of the master's protocol: the descriptor (kind, dtype, numel, op,
quantization, ...) travels with ``collective_initiate`` so members that disagree fail instead of
reducing mismatched bytes, and the op's ``op_id`` is the transfer tag on the links, so a retry
never meets bytes of an earlier attempt. :class:`CollectivesMixin` holds the methods;
:class:`pccl.Communicator` inherits them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

import torch

from collectives import BufferPool, Quantization, ReduceInfo, ReduceOp
from collectives.ring import ring_all_gather, ring_all_reduce, ring_broadcast, ring_reduce_scatter
from collectives.schedule import chunk_bounds
from pccl.collective_retry import reduce_multiple_with_retry
from pccl.collective_staging import (
    HostBuffers,
    Staged,
    check_op,
    check_quantization,
    check_tag,
    check_tensor,
    descriptor,
    overlap,
    same_memory,
    stage_in_place,
    stage_out_of_place,
)
from pccl.errors import InvalidUsageError, MasterConnectionError, PCCLError, TooFewPeersError
from pccl.peer_session import CollectiveContext, PeerSession
from transport.loop import LoopThread

__all__ = ["CollectivesMixin", "ReduceHandle"]

T = TypeVar("T")
Body = Callable[[CollectiveContext], Awaitable[T]]


class ReduceHandle:
    """An all-reduce in flight (from :meth:`CollectivesMixin.all_reduce_async`)."""

    def __init__(self, future: concurrent.futures.Future[ReduceInfo], tag: int) -> None:
        self._future = future
        self.tag = tag

    def done(self) -> bool:
        """Whether the operation has ended (successfully or not); never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """Block until the operation ends; its :class:`ReduceInfo`.

        May be called again after a ``TimeoutError``; the operation keeps running meanwhile.

        Raises:
            TimeoutError: it did not end within ``timeout`` seconds.
            PeerLostError, TooFewPeersError, InvalidUsageError, MasterConnectionError:
                as :meth:`CollectivesMixin.all_reduce`.
        """
        return self._future.result(timeout)


class _State:
    """Per-Communicator memory and bookkeeping of the collectives."""

    def __init__(self) -> None:
        self.pool = BufferPool()  # ring scratch; used on the loop thread only
        self.backups = HostBuffers()  # in-place backups; taken in callers' threads
        self.tags: set[int] = set()  # user tags in flight; touched on the loop thread only
        self._pinned: HostBuffers | None = None
        self._copier: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pinned(self) -> HostBuffers:
        with self._lock:
            if self._pinned is None:
                self._pinned = HostBuffers(pinned=True)
            return self._pinned

    def copier(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that copies large in-place backups while their ring runs."""
        with self._lock:
            if self._copier is None:
                self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pccl-backup")
            return self._copier

    def clear(self) -> None:
        self.pool.clear()
        self.backups.clear()
        if self._pinned is not None:
            self._pinned.clear()
        with self._lock:
            copier, self._copier = self._copier, None
        if copier is not None:
            copier.shutdown(wait=True)


_CLOSED_MIDWAY = "the communicator was closed while the operation ran"


def _settle(cf: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    """Hand a loop task's outcome to the caller's future."""
    if task.cancelled():
        cf.set_exception(MasterConnectionError(_CLOSED_MIDWAY))
    elif task.exception() is not None:
        cf.set_exception(task.exception())
    else:
        cf.set_result(task.result())


class CollectivesMixin:
    """Collective operations for :class:`pccl.Communicator` (which provides ``_live`` and ``_thread``)."""

    _thread: LoopThread | None
    _coll: _State

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the communicator's loop and wait for it (``LoopThread.run``).

        Raises:
            MasterConnectionError: :meth:`close` (from another thread) stopped the loop
                first; the coroutine's clean-up has run, so a tensor is restored.
            Whatever ``coro`` raises, and TimeoutError after ``timeout``.
        """
        assert self._thread is not None
        try:
            return self._thread.run(coro, timeout)
        except asyncio.CancelledError:  # only stop() cancels it: say so, as a catchable error
            raise MasterConnectionError(_CLOSED_MIDWAY) from None

    def _live(self, what: str) -> PeerSession:
        raise NotImplementedError  # provided by the Communicator

    def _init_collectives(self) -> None:
        self._coll = _State()

    def _release_collectives(self) -> None:
        """Drop cached buffers (after the loop stopped)."""
        self._coll.clear()

    # -- all-reduce --------------------------------------------------------------------------

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp = ReduceOp.SUM,
        out: torch.Tensor | None = None,
        tag: int = 0,
        quantization: Quantization | None = None,
    ) -> ReduceInfo:
        """Reduce ``tensor`` over this peer's group; every member ends with bit-identical values.

        In place by default; with ``out`` (same shape, dtype and device) the result goes
        there and ``tensor`` is only read. Every member must pass the same dtype, numel,
        ``op``, ``quantization`` and ``tag``. With a group of one the result is the input
        itself (``ReduceInfo(1, 0, 0)``). ``quantization`` (float tensors) sends 8- or 4-bit
        codes; ``tx_bytes`` counts what really went on the wire.

        On failure the tensor holds exactly its value from before the call (in place);
        with ``out``, ``out`` is unspecified and ``tensor`` untouched.

        Raises:
            PeerLostError: a member was lost or a link broke; retry (the group shrank).
            InvalidUsageError: bad arguments, ``tag`` in flight, members disagree on the
                descriptor (the message names the key), a membership or shared-state
                operation is running, before connect or after close.
            MasterConnectionError: kicked, or the master is gone.
        """
        session, tag, desc, staged, body = self._prepare_reduce(tensor, op, out, tag, quantization, 1)
        return self._run_blocking(session, tag, desc, staged, body, _replayable(staged))

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: ReduceOp = ReduceOp.SUM,
        out: torch.Tensor | None = None,
        tag: int = 0,
        quantization: Quantization | None = None,
    ) -> ReduceHandle:
        """Start :meth:`all_reduce` and return at once; ``handle.wait()`` gives its ReduceInfo.

        Several may be in flight with distinct tags (nothing else of the group may overlap
        them). Do not touch ``tensor`` (or ``out``) until the handle is done.

        Raises:
            InvalidUsageError: as :meth:`all_reduce`, at once (``tag`` in flight included);
                a descriptor mismatch is only known later, from ``wait()``.
            MasterConnectionError: kicked, or the master is gone.
        """
        session, tag, desc, staged, body = self._prepare_reduce(tensor, op, out, tag, quantization, 1)
        return ReduceHandle(self._run_async(session, tag, desc, staged, body, _replayable(staged)), tag)

    def all_reduce_multiple_with_retry(
        self,
        tensors: Sequence[torch.Tensor],
        op: ReduceOp = ReduceOp.SUM,
        max_in_flight: int = 4,
        quantization: Quantization | None = None,
    ) -> ReduceInfo:
        """All-reduce each tensor in place, up to ``max_in_flight`` at once, retrying lost ones.

        Tensor ``i`` uses tag ``i`` (none of ``0..len(tensors)-1`` may be in flight). An
        operation that fails with ``PeerLostError`` is retried once the master has re-ringed
        the group, until every tensor is reduced; each tensor is reduced by exactly one
        attempt, so after a loss different tensors may have been averaged over different
        groups. The result: ``world_size`` is the smallest ring that produced a result,
        ``tx_bytes`` / ``rx_bytes`` sum the successful attempts.

        A group of one cannot reduce: with one peer left (at the call, or after the others
        were lost) this raises ``TooFewPeersError``. On any error, tensors not yet reduced
        hold their values from before the call; the others hold their results.

        Raises:
            TooFewPeersError: this peer is alone in its group.
            InvalidUsageError: bad arguments (also tensors sharing memory), a tag in flight,
                members disagree on a descriptor, before connect or after close.
            MasterConnectionError: kicked, or the master is gone.
        """
        session = self._live("all_reduce_multiple_with_retry")
        check_op(op)
        tensors = list(tensors)
        for i, t in enumerate(tensors):
            check_tensor(t, f"tensors[{i}]")
            check_quantization(quantization, t.dtype)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise InvalidUsageError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        _check_disjoint(tensors)
        if len(session.ring) < 2:
            raise TooFewPeersError(
                f"all_reduce_multiple_with_retry needs at least 2 peers in the group; it has {len(session.ring)}"
            )
        if not tensors:
            return ReduceInfo(len(session.ring), 0, 0)

        def start(i: int) -> concurrent.futures.Future[ReduceInfo]:
            _, tag, desc, staged, body = self._prepare_reduce(tensors[i], op, None, i, quantization, 2)
            return self._run_async(session, tag, desc, staged, body, _replayable(staged))

        return reduce_multiple_with_retry(len(tensors), max_in_flight, start)

    def _prepare_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp,
        out: torch.Tensor | None,
        tag: int,
        quantization: Quantization | None,
        min_world: int,
    ) -> tuple[PeerSession, int, dict[str, Any], Staged, Body[ReduceInfo]]:
        session = self._live("all_reduce")
        check_tensor(tensor)
        check_op(op)
        check_tag(tag)
        quant = check_quantization(quantization, tensor.dtype)
        if out is not None and not same_memory(out, tensor):
            check_tensor(out, "out")
            if out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device:
                raise InvalidUsageError(
                    f"out must match tensor: {tensor.dtype}{list(tensor.shape)} on {tensor.device}, "
                    f"got {out.dtype}{list(out.shape)} on {out.device}"
                )
            if overlap(out, tensor):
                raise InvalidUsageError("out partly overlaps tensor; pass out=None (in place) or a separate tensor")
            staged = stage_out_of_place(tensor, out, self._coll.pinned)
        else:
            # A large backup is copied while the ring already runs (in place, so the call is
            # not replayable and waits for the master's start, docs/protocol.md §5.6.2).
            background = (self._coll.copier(), len(session.ring))
            staged = stage_in_place(tensor, self._coll.backups, self._coll.pinned, overlap=background)
        desc = descriptor("all_reduce", tensor, op, quant)
        return session, tag, desc, staged, self._reduce_body(staged, op, quant, min_world)

    def _reduce_body(
        self, staged: Staged, op: ReduceOp, quant: Quantization | None, min_world: int
    ) -> Body[ReduceInfo]:
        pool = self._coll.pool

        async def body(ctx: CollectiveContext) -> ReduceInfo:
            if ctx.world_size < min_world:
                raise TooFewPeersError(f"the group has {ctx.world_size} peer(s); this operation needs {min_world}")
            if ctx.peers is None:
                if not staged.in_place:
                    staged.dst.copy_(staged.src)
                return ReduceInfo(1, 0, 0)
            tx, rx = await ring_all_reduce(
                ctx.peers, ctx.op_id, staged.src, staged.dst, op, quant, pool=pool, guard=staged.guard
            )
            return ReduceInfo(ctx.world_size, tx, rx)

        return body

    # -- reduce-scatter, all-gather, broadcast ---------------------------------------------

    def reduce_scatter(
        self,
        tensor: torch.Tensor,
        out: torch.Tensor,
        op: ReduceOp = ReduceOp.SUM,
        *,
        tag: int = 0,
        quantization: Quantization | None = None,
    ) -> ReduceInfo:
        """Reduce ``tensor`` over the group; ``out`` receives this peer's chunk of the result.

        The chunk of ring position ``r`` in a group of ``W`` is
        ``collectives.schedule.chunk_bounds(tensor.numel(), W, r)`` (the first
        ``numel % W`` chunks are one element longer); ``out`` must have exactly that many
        elements for the ring the operation runs on, and must not overlap ``tensor``.
        ``tensor`` is never written; ``out`` is unspecified after a failure.

        Raises:
            PeerLostError, MasterConnectionError: as :meth:`all_reduce`.
            InvalidUsageError: as :meth:`all_reduce`, or ``out`` of the wrong size for the ring.
        """
        session = self._live("reduce_scatter")
        check_tensor(tensor)
        check_tensor(out, "out")
        check_op(op)
        check_tag(tag)
        quant = check_quantization(quantization, tensor.dtype)
        if out.dtype != tensor.dtype or out.device != tensor.device or overlap(out, tensor):
            raise InvalidUsageError("out must be a separate tensor of the same dtype and device as tensor")
        staged = stage_out_of_place(tensor, out, self._coll.pinned)
        pool, n = self._coll.pool, tensor.numel()

        async def body(ctx: CollectiveContext) -> ReduceInfo:
            lo, hi = chunk_bounds(n, ctx.world_size, ctx.rank)
            if staged.dst.numel() != hi - lo:
                raise InvalidUsageError(
                    f"out has {staged.dst.numel()} elements; ring position {ctx.rank} of {ctx.world_size} "
                    f"owns {hi - lo} of {n}"
                )
            if ctx.peers is None:
                staged.dst.copy_(staged.src)
                return ReduceInfo(1, 0, 0)
            tx, rx = await ring_reduce_scatter(ctx.peers, ctx.op_id, staged.src, staged.dst, op, quant, pool=pool)
            return ReduceInfo(ctx.world_size, tx, rx)

        desc = descriptor("reduce_scatter", tensor, op, quant)
        return self._run_blocking(session, tag, desc, staged, body, _replayable(staged))

    def all_gather(self, tensor: torch.Tensor, *, tag: int = 0) -> list[torch.Tensor]:
        """Every member's ``tensor`` (same dtype and numel everywhere), in ring order.

        Element ``r`` of the result is the tensor of the peer at ring position ``r`` of
        the group the operation ran on (``comm.ring`` until the membership changes),
        shaped like ``tensor``, on its device. ``tensor`` is never written.

        Raises:
            PeerLostError, InvalidUsageError, MasterConnectionError: as :meth:`all_reduce`.
        """
        session = self._live("all_gather")
        check_tensor(tensor)
        check_tag(tag)
        staged = stage_in_place(tensor, self._coll.backups, self._coll.pinned, keep=False)
        pool, n = self._coll.pool, tensor.numel()

        async def body(ctx: CollectiveContext) -> tuple[int, torch.Tensor]:
            flat = torch.empty(ctx.world_size * n, dtype=tensor.dtype)
            if ctx.peers is None:
                flat.copy_(staged.src)
            else:
                await ring_all_gather(ctx.peers, ctx.op_id, staged.src, flat, pool=pool)
            return ctx.world_size, flat

        # Replayable: the body only reads the input and fills a tensor of its own.
        world, flat = self._run_blocking(session, tag, descriptor("all_gather", tensor), staged, body, True)
        if tensor.device.type == "cuda":
            flat = flat.to(tensor.device)
        return [flat[r * n : (r + 1) * n].view(tensor.shape) for r in range(world)]

    def broadcast(self, tensor: torch.Tensor, root_peer: int, *, tag: int = 0) -> ReduceInfo:
        """Overwrite ``tensor`` on every member with the tensor of peer ``root_peer`` (a peer id).

        Every member passes the same ``root_peer``, dtype and numel. The root's tensor is
        only read; on failure every other member's tensor holds its value from before.

        Raises:
            InvalidUsageError: ``root_peer`` is not in the group, or as :meth:`all_reduce`.
            PeerLostError, MasterConnectionError: as :meth:`all_reduce`.
        """
        session = self._live("broadcast")
        check_tensor(tensor)
        check_tag(tag)
        if isinstance(root_peer, bool) or not isinstance(root_peer, int) or root_peer < 0:
            raise InvalidUsageError(f"root_peer must be a peer id (an int), got {root_peer!r}")
        is_root = root_peer == session.peer_id
        staged = stage_in_place(tensor, self._coll.backups, self._coll.pinned, keep=not is_root)
        pool = self._coll.pool

        async def body(ctx: CollectiveContext) -> ReduceInfo:
            if root_peer not in ctx.ring:
                raise InvalidUsageError(f"broadcast root {root_peer} is not in the group (ring {ctx.ring})")
            if ctx.peers is None:
                return ReduceInfo(1, 0, 0)
            root = ctx.ring.index(root_peer)
            tx, rx = await ring_broadcast(ctx.peers, ctx.op_id, staged.dst, root, pool=pool)
            return ReduceInfo(ctx.world_size, tx, rx)

        desc = descriptor("broadcast", tensor, root=root_peer)
        # Replayable: the root only reads, the others overwrite all of their tensor.
        return self._run_blocking(session, tag, desc, staged, body, True)

    # -- running an operation ------------------------------------------------------------------

    def _run_blocking(
        self, session: PeerSession, tag: int, desc: dict[str, Any], staged: Staged, body: Body[T], replayable: bool
    ) -> T:
        return self._on_loop(self._reserved(session, tag, desc, staged, body, replayable))

    def _run_async(
        self, session: PeerSession, tag: int, desc: dict[str, Any], staged: Staged, body: Body[T], replayable: bool
    ) -> concurrent.futures.Future[T]:
        return self._on_loop(self._start(session, tag, desc, staged, body, replayable))

    async def _reserved(
        self, session: PeerSession, tag: int, desc: dict[str, Any], staged: Staged, body: Body[T], replayable: bool
    ) -> T:
        self._reserve(session, tag, staged)
        return await self._execute(session, tag, desc, staged, body, replayable)

    async def _start(
        self, session: PeerSession, tag: int, desc: dict[str, Any], staged: Staged, body: Body[T], replayable: bool
    ) -> concurrent.futures.Future[T]:
        """Reserve ``tag`` (so misuse raises at the call) and run the operation as a task."""
        self._reserve(session, tag, staged)
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()
        cf.set_running_or_notify_cancel()
        task = asyncio.get_running_loop().create_task(self._execute(session, tag, desc, staged, body, replayable))
        task.add_done_callback(lambda t: _settle(cf, t))
        return cf

    def _reserve(self, session: PeerSession, tag: int, staged: Staged) -> None:
        """Claim ``tag`` on the loop thread; on refusal the staging buffers go back.

        Raises:
            InvalidUsageError: ``tag`` is in flight, or a membership/sync call runs.
            MasterConnectionError: the session is dead.
        """
        try:
            session.check_alive()
            if tag in self._coll.tags or tag in session.collectives:
                raise InvalidUsageError(f"collective tag {tag} is already in flight; wait for it or use another tag")
            if session.busy is not None:
                raise InvalidUsageError(f"collective tag {tag} while {session.busy} is running; call them one at a time")
        except PCCLError:
            staged.release()
            raise
        self._coll.tags.add(tag)

    async def _execute(
        self, session: PeerSession, tag: int, desc: dict[str, Any], staged: Staged, body: Body[T], replayable: bool
    ) -> T:
        """Run a reserved operation; restore the caller's tensor on any failure (§5.6.1).

        ``replayable``: ``body`` may run twice, so it may start before the master's answer
        (``docs/protocol.md`` §5.6.2).
        """
        try:
            try:
                result = await session.run_collective(tag, desc, body, replayable=replayable)
            except BaseException:
                # Nothing writes into the buffers any more: a failed or cancelled body has
                # been waited for and its tag forgotten before run_collective raises.
                staged.failed()
                raise
            staged.succeeded()
            return result
        finally:
            self._coll.tags.discard(tag)
            staged.release()


def _replayable(staged: Staged) -> bool:
    """A reduction may run twice (an optimistic start that the master does not confirm is
    run again, ``docs/protocol.md`` §5.6.2) when it never writes what it reads."""
    return not overlap(staged.src, staged.dst)


def _check_disjoint(tensors: list[torch.Tensor]) -> None:
    """Raises InvalidUsageError if two tensors share memory (they are reduced concurrently)."""
    spans = sorted(
        (str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
        for i, t in enumerate(tensors)
        if t.numel() > 0
    )
    end, last, device = 0, -1, ""
    for dev, start, stop, i in spans:
        if dev == device and start < end:
            raise InvalidUsageError(f"tensors[{last}] and tensors[{i}] share memory; pass separate tensors")
        if dev != device or stop > end:
            end, last, device = stop, i, dev
