"""The torch.distributed backend "pccl": ``import pccl.distributed``, then
``dist.init_process_group("pccl", ...)``.

Torch cannot subclass its C++ ``Backend`` from Python, so :class:`ProcessGroupPCCL`
subclasses ``torch.distributed.ProcessGroup`` and torch uses it as the group itself. The
rendezvous (:mod:`pccl.distributed_rendezvous`) makes ring position == rank; each torch
call then runs one or two pccl collectives (:mod:`pccl.distributed_ops`) on the
Communicator's event loop, in call order, with a tag from a per-group counter (the same
on every rank because torch requires every rank to issue the same collectives in the same
order). All-reduces may overlap each other (DDP buckets); any other call waits for the
calls before it, and later calls wait for it (``docs/protocol.md`` §5.6, concurrency).

Failures: any pccl error (a lost rank, the master gone, a timeout) fails that call's Work
with ``torch.distributed.DistBackendError`` carrying pccl's reason, and marks the group
broken, so every later call fails at once with the same reason (torch's world size cannot
shrink). ``send``/``recv`` go through the torch ``Store`` (functional, not fast).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from collectives import BufferPool, Quantization
from pccl.distributed_ops import (
    HostTensor,
    Step,
    all_gather_step,
    barrier_step,
    broadcast_step,
    check_reducible,
    flat_bytes,
    reduce_op,
    reduce_scatter_step,
    reduce_step,
)
from pccl.distributed_rendezvous import Joined, join
from pccl.errors import PCCLError

__all__ = ["Options", "ProcessGroupPCCL", "BACKEND_NAME"]

BACKEND_NAME = "pccl"


@dataclass
class Options:
    """Backend options: ``dist.init_process_group("pccl", pg_options=Options(...))``.

    ``quantization``: applied to floating-point all-reduces (SUM/AVG); ``connections``:
    TCP connections per ring link; ``heartbeat_timeout``: seconds of silence after which
    the embedded master drops a rank; ``secret``: shared secret of the run (default
    ``PCCL_SECRET``); ``encrypt``: seal every connection with AES-GCM (needs a secret;
    default ``PCCL_ENCRYPT=1``; see docs/security.md).
    """

    quantization: Quantization | None = None
    connections: int = 4
    heartbeat_timeout: float = 5.0
    secret: str | None = None
    encrypt: bool | None = None


class _Work(dist.Work):
    """A torch Work over a ``torch.futures.Future`` whose value is the list of output tensors."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.future: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        self._outputs = outputs
        self._error: BaseException | None = None
        self._done = threading.Event()

    def finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()
        if error is None:
            self.future.set_result(self._outputs)
        else:
            self.future.set_exception(error)  # type: ignore[arg-type]

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Block until the call ended. Raises DistBackendError when it failed."""
        self._done.wait(None if timeout is None or not timeout else timeout.total_seconds())
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        return self.future

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs


def _failed_work(error: BaseException) -> _Work:
    work = _Work([])
    work.finish(error)
    return work


class ProcessGroupPCCL(dist.ProcessGroup):
    """A torch process group whose collectives run over a pccl ring (see the module docstring)."""

    def __init__(self, joined: Joined, rank: int, size: int, timeout: timedelta, options: Options,
                 store: Any, group_name: str) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]
        self._rank, self._size = rank, size
        self._group_name = self._group_desc = str(group_name)
        self._joined = joined
        self._comm = joined.comm
        self._timeout = timeout.total_seconds()
        self._options = options
        self._store = store
        self._pool = BufferPool()
        self._tags = itertools.count()
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Loop-thread state: calls not finished yet, and whether each may overlap others.
        self._pending: dict[asyncio.Future[None], bool] = {}
        self._p2p_seq: dict[tuple[int, int, int], int] = {}
        self._recv_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pccl-dist-recv")

    # -- identity ---------------------------------------------------------------------------

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    # Torch's C++ group asks its registered backend for these; this group has none.
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_name(self) -> str:  # type: ignore[override]
        return self._group_name

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def group_desc(self) -> str:
        return self._group_desc

    @property
    def ring(self) -> list[int]:
        """Peer ids in rank order (the pccl ring)."""
        return list(self._joined.peer_ids)

    # -- running calls ------------------------------------------------------------------------

    def _launch(self, method: str, outputs: list[torch.Tensor], steps: Sequence[Step | Callable[[], Step]],
                publish: Callable[[], None] = lambda: None, overlap: bool = False, count: int = 1) -> _Work:
        """Run ``count`` pccl collectives (``steps``; a callable builds its step once the earlier
        ones ran) in call order and return the Work; ``publish`` runs after success, on the loop."""
        with self._lock:
            if self._broken is not None:
                return _failed_work(dist.DistBackendError(f"pccl backend {method}: group is broken: {self._broken}"))
            tags = [next(self._tags) for _ in range(count)]
        work = _Work(outputs)
        thread = self._comm._thread
        assert thread is not None
        cf = thread.submit(self._ordered(method, tags, steps, publish, overlap))
        cf.add_done_callback(lambda f: work.finish(f.exception()))
        return work

    async def _ordered(self, method: str, tags: list[int], steps: Sequence[Step | Callable[[], Step]],
                       publish: Callable[[], None], overlap: bool) -> None:
        before = [f for f, ov in self._pending.items() if not (overlap and ov)]
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[mine] = overlap
        try:
            if before:
                await asyncio.gather(*before, return_exceptions=True)
            try:
                await asyncio.wait_for(self._run(method, tags, steps), self._timeout)
            except (PCCLError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"timed out after {self._timeout:.0f} s"
                self._break(reason)
                raise dist.DistBackendError(f"pccl backend {method} failed: {reason}") from exc
            publish()
        finally:
            del self._pending[mine]
            mine.set_result(None)

    async def _run(self, method: str, tags: list[int], steps: Sequence[Step | Callable[[], Step]]) -> None:
        if self._broken is not None:
            raise PCCLError(f"group is broken: {self._broken}")
        for tag, step in zip(tags, steps):
            desc, body = step() if callable(step) else step  # built once the earlier steps ran
            await self._comm._run_collective(tag, desc, body)

    def _break(self, reason: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = reason

    # -- all-reduce -------------------------------------------------------------------------------

    def _quant(self, t: torch.Tensor, op: Any) -> Quantization | None:
        q = self._options.quantization
        if q is None or not t.dtype.is_floating_point or op not in ("sum", "avg"):
            return None
        return q

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> _Work:  # type: ignore[override]
        """All-reduce each tensor in place (``opts.reduceOp``). Raises NotImplementedError for
        BAND/BOR/BXOR, dtypes that cannot be reduced, and more than one tensor."""
        op_in = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if len(tensors) != 1:
            raise NotImplementedError("pccl backend allreduce: exactly one tensor per call (use allreduce_coalesced)")
        return self._allreduce_flat("allreduce", list(tensors), op_in)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> _Work:
        """All-reduce several tensors of one dtype as one operation."""
        op_in = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        if len({t.dtype for t in tensors}) > 1:
            raise NotImplementedError("pccl backend allreduce_coalesced: tensors must share one dtype")
        return self._allreduce_flat("allreduce_coalesced", list(tensors), op_in)

    def _allreduce_flat(self, method: str, tensors: list[torch.Tensor], op_in: Any) -> _Work:
        op, factor = reduce_op(op_in, method)
        for t in tensors:
            check_reducible(t, method)
        single = len(tensors) == 1
        hosts = [HostTensor(t, load=True) for t in tensors]
        flat = hosts[0].flat if single else torch.cat([h.flat for h in hosts])
        if factor is not None:
            flat.mul_(factor)
        step = reduce_step(flat, op, self._quant(flat, op.value), self._size, self._pool)

        def publish() -> None:
            offset = 0
            for h in hosts:
                n = h.host.numel()
                if not single:
                    h.flat.copy_(flat[offset : offset + n])
                offset += n
                h.publish()

        return self._launch(method, tensors, [step], publish, overlap=True)

    # -- broadcast, barrier ---------------------------------------------------------------------

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> _Work:  # type: ignore[override]
        """Overwrite each tensor with rank ``opts.rootRank``'s (any dtype)."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        hosts = [HostTensor(t, load=True) for t in tensors]
        steps = [broadcast_step(flat_bytes(h.host), root, self._size, self._pool) for h in hosts]

        def publish() -> None:
            for h in hosts:
                h.publish()

        return self._launch("broadcast", list(tensors), steps, publish, count=len(steps))

    def barrier(self, opts: Any = None) -> _Work:
        """Returns once every rank called it (a pccl collective that moves no data)."""
        return self._launch("barrier", [], [barrier_step(self._size)])

    # -- all-gather -------------------------------------------------------------------------------

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],  # type: ignore[override]
                  opts: Any = None) -> _Work:
        """``output_tensors[0][r]`` receives rank ``r``'s ``input_tensors[0]`` (any dtype)."""
        if len(input_tensors) != 1 or len(output_tensors) != 1:
            raise NotImplementedError("pccl backend allgather: exactly one input and one output list")
        outs = output_tensors[0]
        self._check_sizes("allgather", [input_tensors[0]] * self._size, outs)
        src = HostTensor(input_tensors[0], load=True)
        hosts = [HostTensor(o, load=False) for o in outs]
        step = all_gather_step(flat_bytes(src.host), [flat_bytes(h.host) for h in hosts], self._size, self._pool)

        def publish() -> None:
            for h in hosts:
                h.publish()

        return self._launch("allgather", list(outs), [step], publish)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        """``output`` (``size * input.numel()`` elements) receives every rank's ``input``, by rank."""
        return self._gather_into("_allgather_base", [output], [input])

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        """Same as :meth:`_allgather_base`."""
        return self._gather_into("all_gather_single", [output], [input])

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> _Work:
        """:meth:`_allgather_base` for several pairs, as one operation."""
        return self._gather_into("allgather_into_tensor_coalesced", list(outputs), list(inputs))

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> _Work:
        """Same as :meth:`allgather_into_tensor_coalesced`."""
        return self._gather_into("all_gather_single_coalesced", list(outputs), list(inputs))

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                            opts: Any = None) -> _Work:
        """Each ``output_lists[r][i]`` receives rank ``r``'s ``inputs[i]``."""
        raise NotImplementedError("pccl backend allgather_coalesced is not supported; use allgather per tensor")

    def _gather_into(self, method: str, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> _Work:
        if len(outputs) != len(inputs):
            raise ValueError(f"pccl backend {method}: {len(outputs)} outputs for {len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            if o.numel() != i.numel() * self._size or o.dtype != i.dtype:
                raise ValueError(f"pccl backend {method}: output must be {i.dtype}[{i.numel() * self._size}], "
                                 f"got {o.dtype}[{o.numel()}]")
        # Pack every input's bytes into one buffer, gather it once, unpack rank by rank.
        srcs = [flat_bytes(HostTensor(i, load=True).host) for i in inputs]
        src = srcs[0] if len(srcs) == 1 else torch.cat(srcs)
        hosts = [HostTensor(o, load=False) for o in outputs]
        packed = len(srcs) == 1
        dst = flat_bytes(hosts[0].host) if packed else torch.empty(src.numel() * self._size, dtype=torch.uint8)
        step = all_gather_step(src, dst, self._size, self._pool)

        def publish() -> None:
            if not packed:
                per_rank = dst.view(self._size, -1)
                offset = 0
                for h, s in zip(hosts, srcs):
                    n = s.numel()
                    flat_bytes(h.host).view(self._size, n).copy_(per_rank[:, offset : offset + n])
                    offset += n
            for h in hosts:
                h.publish()

        return self._launch(method, list(outputs), [step], publish)

    def _check_sizes(self, method: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        if len(outputs) != self._size:
            raise ValueError(f"pccl backend {method}: {len(outputs)} tensors for a group of {self._size}")
        for o, i in zip(outputs, inputs):
            if o.numel() != i.numel() or o.dtype != i.dtype:
                raise ValueError(f"pccl backend {method}: tensor sizes or dtypes differ ({o.dtype}[{o.numel()}] "
                                 f"vs {i.dtype}[{i.numel()}])")

    # -- reduce-scatter -------------------------------------------------------------------------

    def reduce_scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],  # type: ignore[override]
                       opts: Any = None) -> _Work:
        """``output_tensors[0]`` receives the reduction of every rank's ``input_tensors[0][rank]``."""
        if len(output_tensors) != 1 or len(input_tensors) != 1:
            raise NotImplementedError("pccl backend reduce_scatter: exactly one output and one input list")
        self._check_sizes("reduce_scatter", [output_tensors[0]] * self._size, input_tensors[0])
        src = torch.cat([HostTensor(t, load=True).flat for t in input_tensors[0]])
        return self._reduce_scatter("reduce_scatter", [output_tensors[0]], [src], opts)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        """``output`` receives chunk ``rank`` of the reduction of every rank's ``input``."""
        return self._reduce_scatter("_reduce_scatter_base", [output], [HostTensor(input, load=True).flat], opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        """Same as :meth:`_reduce_scatter_base`."""
        return self._reduce_scatter("reduce_scatter_single", [output], [HostTensor(input, load=True).flat], opts)

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> _Work:
        """:meth:`_reduce_scatter_base` for several pairs, as one operation."""
        return self._reduce_scatter("reduce_scatter_tensor_coalesced", list(outputs),
                                    [HostTensor(i, load=True).flat for i in inputs], opts)

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> _Work:
        """Same as :meth:`reduce_scatter_tensor_coalesced`."""
        return self._reduce_scatter("reduce_scatter_single_coalesced", list(outputs),
                                    [HostTensor(i, load=True).flat for i in inputs], opts)

    def _reduce_scatter(self, method: str, outputs: list[torch.Tensor], srcs: list[torch.Tensor],
                        opts: Any) -> _Work:
        op, factor = reduce_op(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, method)
        if len({t.dtype for t in [*outputs, *srcs]}) > 1:
            raise NotImplementedError(f"pccl backend {method}: every tensor must share one dtype")
        for o, s in zip(outputs, srcs):
            check_reducible(o, method)
            if s.numel() != o.numel() * self._size:
                raise ValueError(f"pccl backend {method}: input has {s.numel()} elements, output "
                                 f"{o.numel()}; the input must be {self._size} x the output")
        hosts = [HostTensor(o, load=False) for o in outputs]
        if len(srcs) == 1:
            src, dst = srcs[0], hosts[0].flat
        else:
            # Interleave so chunk r of the packed input holds chunk r of every input.
            src = torch.cat([s.view(self._size, -1) for s in srcs], dim=1).reshape(-1)
            dst = torch.empty(src.numel() // self._size, dtype=src.dtype)
        if factor is not None:
            src = src * factor
        step = reduce_scatter_step(src, dst, op, self._size, self._pool)

        def publish() -> None:
            offset = 0
            for h in hosts:
                n = h.host.numel()
                if len(srcs) > 1:
                    h.flat.copy_(dst[offset : offset + n])
                offset += n
                h.publish()

        return self._launch(method, list(outputs), [step], publish)

    # -- all-to-all -------------------------------------------------------------------------------

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: Any = None) -> _Work:
        """Rank ``r`` sends split ``d`` of ``input`` (dim 0) to rank ``d``; ``output`` holds the
        splits received, by source rank. Two collectives: all-gather the split sizes, then
        all-gather every input padded to the longest (each rank keeps what is addressed to it)."""
        if input.dtype != output.dtype:
            raise ValueError("pccl backend alltoall_base: input and output dtypes differ")
        W = self._size
        row = (input[0].numel() if input.dim() > 0 and input.shape[0] > 0 else 1) * input.element_size()
        in_splits = list(input_split_sizes) or [input.shape[0] // W] * W if input.dim() > 0 else [0] * W
        out_splits = list(output_split_sizes) or [output.shape[0] // W] * W if output.dim() > 0 else [0] * W
        if len(in_splits) != W or len(out_splits) != W:
            raise ValueError(f"pccl backend alltoall_base: split sizes must have {W} entries")
        src = flat_bytes(HostTensor(input, load=True).host)
        out = HostTensor(output, load=False)
        sizes = torch.tensor([s * row for s in in_splits], dtype=torch.int64)
        all_sizes = torch.empty(W * W, dtype=torch.int64)
        first = all_gather_step(flat_bytes(sizes), flat_bytes(all_sizes), W, self._pool)
        gathered: list[torch.Tensor] = []

        def second() -> Step:
            table = all_sizes.view(W, W).tolist()  # table[s][d]: bytes rank s sends to rank d
            longest = max(sum(r) for r in table)
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[: src.numel()] = src
            gathered.append(torch.empty(W * longest, dtype=torch.uint8))
            return all_gather_step(padded, gathered[0], W, self._pool)

        def publish() -> None:
            table = all_sizes.view(W, W).tolist()
            longest = gathered[0].numel() // W
            dst, at = flat_bytes(out.host), 0
            for s in range(W):
                start = s * longest + sum(table[s][: self._rank])
                n = table[s][self._rank]
                dst[at : at + n] = gathered[0][start : start + n]
                at += n
            out.publish()

        if sum(out_splits) * row != output.numel() * output.element_size():
            raise ValueError("pccl backend alltoall_base: output split sizes do not cover the output")
        return self._launch("alltoall_base", [output], [first, second], publish, count=2)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int], opts: Any = None) -> _Work:
        """Same as :meth:`alltoall_base`."""
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    # -- point to point (through the torch Store) ----------------------------------------------

    def _p2p_key(self, src: int, dst: int, tag: int) -> str:
        with self._lock:
            seq = self._p2p_seq.get((src, dst, tag), 0)
            self._p2p_seq[(src, dst, tag)] = seq + 1
        return f"pccl/p2p/{src}/{dst}/{tag}/{seq}"

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> _Work:
        """Send ``tensors[0]`` to rank ``dst``; the bytes go through the group's torch Store."""
        t = tensors[0]
        key = self._p2p_key(self._rank, dst, tag)
        self._store.set(key, flat_bytes(HostTensor(t, load=True).host).numpy().tobytes())
        work = _Work(list(tensors))
        work.finish(None)
        return work

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> _Work:
        """Receive ``tensors[0]`` from rank ``src`` (see :meth:`send`); fails with
        DistBackendError when nothing arrives within the group's timeout."""
        t = tensors[0]
        key = self._p2p_key(src, self._rank, tag)
        work = _Work(list(tensors))
        host = HostTensor(t, load=False)

        def fetch() -> None:
            try:
                data = self._store.get(key)
                self._store.delete_key(key)
                flat_bytes(host.host).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                host.publish()
            except Exception as exc:
                work.finish(dist.DistBackendError(f"pccl backend recv from rank {src} failed: {exc}"))
                return
            work.finish(None)

        self._recv_pool.submit(fetch)
        return work

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> _Work:
        raise NotImplementedError("pccl backend recv_anysource is not supported; name the source rank")

    # -- unsupported ------------------------------------------------------------------------------

    def alltoall(self, *args: Any, **kwargs: Any) -> _Work:
        raise NotImplementedError("pccl backend alltoall (list form) is not supported; use all_to_all_single")

    def gather(self, *args: Any, **kwargs: Any) -> _Work:
        raise NotImplementedError("pccl backend gather is not supported; use all_gather")

    def scatter(self, *args: Any, **kwargs: Any) -> _Work:
        raise NotImplementedError("pccl backend scatter is not supported; use broadcast")

    def reduce(self, *args: Any, **kwargs: Any) -> _Work:
        raise NotImplementedError("pccl backend reduce is not supported; use all_reduce")

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> _Work:
        raise NotImplementedError("pccl backend monitored_barrier is not supported; use barrier")

    # -- lifecycle ------------------------------------------------------------------------------

    def abort(self) -> None:
        """Fail every pending and later call, and leave the run at once."""
        self._break("the process group was aborted")
        self._close()

    def shutdown(self) -> None:
        """Leave the run (rank 0 also stops the embedded master). Idempotent."""
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._comm.close()
        if self._joined.master is not None:
            self._joined.master.stop()
        self._recv_pool.shutdown(wait=False, cancel_futures=True)


def _create(backend_opts: Any, options: Options | None) -> ProcessGroupPCCL:
    """The creation function torch calls for ``init_process_group("pccl")`` / ``new_group``.

    Raises:
        DistBackendError: the rendezvous failed (pccl's reason in the message).
    """
    options = options if isinstance(options, Options) else Options()
    secret = options.secret or os.environ.get("PCCL_SECRET") or None
    encrypt = options.encrypt if options.encrypt is not None else os.environ.get("PCCL_ENCRYPT") == "1"
    rank, size, timeout = backend_opts.group_rank, backend_opts.group_size, backend_opts.timeout
    try:
        joined = join(backend_opts.store, rank, size, timeout, connections=options.connections,
                      heartbeat_timeout=options.heartbeat_timeout, secret=secret, encrypt=encrypt)
    except PCCLError as exc:
        raise dist.DistBackendError(f"pccl backend rendezvous failed: {type(exc).__name__}: {exc}") from exc
    return ProcessGroupPCCL(joined, rank, size, timeout, options, backend_opts.store, backend_opts.group_id)


def _register() -> None:
    if BACKEND_NAME.upper() not in dist.Backend._plugins:  # importing twice is harmless
        dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu", "cuda"])


_register()
