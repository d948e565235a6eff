"""All-reduce and reduce-scatter on the pipelined ring engine (``docs/protocol.md`` §7.2–7.4).

Only the owner of a chunk computes its final value (the AVG division and, with quantization,
the encode/decode round trip it adopts); every other rank copies the owner's bytes, so all
ranks end bit-identical.
"""

from __future__ import annotations

import asyncio

import torch

from . import ops
from .buffers import BufferPool
from .engine import AG, RS, Operation, RingPeers, Scratch, WriteGuard, byte_view
from .quantize import decode, encode, encoded_size
from .schedule import (
    ag_recv_chunk,
    chunk_bounds,
    piece_bounds,
    piece_count,
    rs_recv_chunk,
    rs_send_chunk,
)
from .types import Quantization, ReduceOp

__all__ = ["AllReduce", "ReduceScatter"]


class AllReduce(Operation):
    """Reduce-scatter then all-gather of ``src`` into ``dst`` (flat, same length; may be the same).

    Partial sums of chunk ``c`` live in ``dst``'s chunk ``c`` until its final value overwrites
    them. Out of place, every receive lands straight in ``dst``; in place, reduce-scatter
    receives land in (up to) two scratch pieces per worker first. With a ``guard``, piece ``p``
    of ``dst`` is written (and receives into it posted) only once the guard allows it.
    """

    def __init__(
        self,
        peers: RingPeers,
        tag: int,
        src: torch.Tensor,
        dst: torch.Tensor,
        op: ReduceOp,
        quant: Quantization | None,
        piece_bytes: int,
        pool: BufferPool,
        window: int,
        offload: bool,
        guard: WriteGuard | None = None,
    ) -> None:
        w = peers.world_size
        self.src, self.dst, self.op, self.quant, self.guard = src, dst, op, quant, guard
        self.inplace = src.data_ptr() == dst.data_ptr()
        self.chunks = [chunk_bounds(src.numel(), w, c) for c in range(w)]
        longest = max(b - a for a, b in self.chunks)
        pieces = piece_count(longest, src.element_size(), piece_bytes)
        super().__init__(peers, tag, pieces, pool, window, offload)
        self.piece_len = -(-longest // pieces) if pieces else 0
        self._dst_posted: dict[int, tuple[list[asyncio.Future[None] | None], list[asyncio.Future[None] | None]]] = {}
        # In place, partial results land in scratch. Two buffers per worker let the next
        # receive (next step, or next piece) be posted before this one is reduced, so its data
        # lands in place (docs/protocol.md §7.2) -- unless that would cost over half the tensor.
        budget = src.numel() * src.element_size() // 2
        piece_bytes_max = self.piece_len * src.element_size()
        self.lands = 2 if quant is None and 2 * piece_bytes_max <= budget else 1
        per_worker = self.lands * piece_bytes_max if self.inplace else 0
        if quant is not None:
            per_worker += 5 * encoded_size(self.piece_len, quant) + 5 * self.piece_len
        self._cap_workers(budget, per_worker)

    def bounds(self, c: int, p: int) -> tuple[int, int]:
        return piece_bounds(*self.chunks[c], self.pieces, p)

    def region(self, c: int, p: int) -> torch.Tensor:
        a, b = self.bounds(c, p)
        return self.dst[a:b]

    def _scratch(self) -> Scratch:
        st = Scratch()
        if self.inplace and self.quant is not None:
            st.add(self.pool, "land0", self.src.dtype, self.piece_len)
        if self.quant is not None:
            e = encoded_size(self.piece_len, self.quant)
            for name in ("qsend", "qrecv", "qown", "qag0", "qag1"):
                st.add(self.pool, name, torch.uint8, e)
            st.ws = self.pool.take_workspace()
        return st

    async def _piece(self, p: int, st: Scratch) -> None:
        if self.guard is not None:
            for c in range(self.world):  # every chunk's piece p may be written from here on
                await self.guard.writable(*self.bounds(c, p))
        if self.quant is None:
            await self._piece_plain(p, st)
        else:
            await self._piece_quant(p, st, self.quant)

    def _writable(self, p: int) -> bool:
        """Whether piece ``p`` of ``dst`` may be written now (always, without a guard)."""
        guard = self.guard
        return guard is None or all(guard.is_writable(*self.bounds(c, p)) for c in range(self.world))

    async def _piece_plain(self, p: int, st: Scratch) -> None:
        r, w = self.rank, self.world
        nxt = p + self._workers if p + self._workers < self.pieces else None
        ag_recvs, rs_recvs = self._post_dst(p)
        if nxt is not None and self._writable(nxt):
            self._post_dst(nxt)  # early, so its data lands in place rather than in a side buffer
        a, b = self.bounds(rs_send_chunk(r, 0, w), p)
        sends = [self._spawn(self._send(RS, 0, p, byte_view(self.src[a:b])))] if b > a else []
        for s in range(w - 1):
            land, follow = None, ((p, s + 1) if s < self.last else (nxt, 0))
            if self.inplace:
                recv, land = self._take_slot(p, s, st)
                if self.lands == 2 and follow[0] is not None:
                    self._post_slot(follow[0], follow[1], st)  # the other buffer is free: post ahead
            else:
                recv = rs_recvs[s]
            if recv is not None:
                await recv
                a, b = self.bounds(rs_recv_chunk(r, s, w), p)
                part = self.dst[a:b]
                if land is not None:  # in place: the local contribution is in part, the partial in land
                    await self._compute(ops.reduce, part, land[: b - a], part, self.op)
                else:
                    await self._compute(ops.reduce, part, self.src[a:b], part, self.op)
                if s < self.last:
                    sends.append(self._spawn(self._send(RS, s + 1, p, byte_view(part))))
                else:  # chunk r is final here; _ag_plain sends it on
                    await self._compute(ops.finalize, part, self.op, w)
            if self.inplace and self.lands == 1 and follow[0] is not None:
                self._post_slot(follow[0], follow[1], st)  # the only buffer was just read
        await self._ag_plain(p, self.region, ag_recvs)
        await asyncio.gather(*sends)

    def _post_dst(self, p: int) -> tuple[list[asyncio.Future[None] | None], list[asyncio.Future[None] | None]]:
        """Post (once) piece ``p``'s receives that land in ``dst``: all-gather, and out of place
        reduce-scatter too. Returns them (all-gather, reduce-scatter) by step.

        Safe however early: the data of a chunk can only arrive after this rank's own
        contribution to it was read and passed on (``docs/protocol.md`` §7.2).
        """
        posted = self._dst_posted.pop(p, None)
        if posted is not None:
            return posted
        ag = self._post_ag(p, self.region)
        rs: list[asyncio.Future[None] | None] = [None] * (self.world - 1)
        if not self.inplace:
            for s in range(self.world - 1):
                part = self.region(rs_recv_chunk(self.rank, s, self.world), p)
                rs[s] = self._spawn(self._recv(RS, s, p, byte_view(part))) if part.numel() else None
        self._dst_posted[p] = (ag, rs)
        return ag, rs

    def _post_slot(self, p: int, s: int, st: Scratch) -> None:
        """In place: post (once) the receive of ``(p, s)`` into one of the worker's land buffers.

        Receives are posted in processing order, cycling through ``lands`` buffers, at most
        ``lands`` at a time, so a buffer is posted again only once the reduction that read it
        is done.
        """
        if (p, s) in st.posted:
            return
        name = f"land{st.slots % self.lands}"
        st.slots += 1
        if name not in st.views:  # allocated on first use: a single piece may never need two
            st.add(self.pool, name, self.src.dtype, self.piece_len)
        land = st.views[name]
        a, b = self.bounds(rs_recv_chunk(self.rank, s, self.world), p)
        recv = self._spawn(self._recv(RS, s, p, byte_view(land[: b - a]))) if b > a else None
        st.posted[(p, s)] = (recv, land)

    def _take_slot(self, p: int, s: int, st: Scratch) -> tuple[asyncio.Future[None] | None, torch.Tensor]:
        """In place: the posted receive of ``(p, s)`` and its land buffer."""
        self._post_slot(p, s, st)
        return st.posted.pop((p, s))

    async def _piece_quant(self, p: int, st: Scratch, q: Quantization) -> None:
        r, w, v, ws = self.rank, self.world, st.views, st.ws
        assert ws is not None
        a, b = self.bounds(rs_send_chunk(r, 0, w), p)
        sends: list[asyncio.Future[None]] = []
        pending: asyncio.Future[None] | None = None  # the send that still reads qsend
        if b > a:
            e = encoded_size(b - a, q)
            await self._compute(encode, self.src[a:b], q, v["qsend"][:e], ws)
            pending = self._spawn(self._send(RS, 0, p, byte_view(v["qsend"][:e])))
            sends.append(pending)
        ag_recvs = [self._post_ag_recv(p, s, st) for s in range(min(2, w - 1))]
        for s in range(w - 1):
            a, b = self.bounds(rs_recv_chunk(r, s, w), p)
            if a == b:
                continue
            e, part = encoded_size(b - a, q), self.dst[a:b]
            await self._recv(RS, s, p, byte_view(v["qrecv"][:e]))
            land = v["land0"][: b - a] if self.inplace else part
            await self._compute(decode, v["qrecv"][:e], q, land, ws)
            await self._compute(ops.reduce, part, land if self.inplace else self.src[a:b], part, self.op)
            if s < self.last:  # re-quantize the partial sum for the next hop
                if pending is not None:
                    await pending
                await self._compute(encode, part, q, v["qsend"][:e], ws)
                pending = self._spawn(self._send(RS, s + 1, p, byte_view(v["qsend"][:e])))
                sends.append(pending)
            else:  # owner: quantize once and adopt the decoded value, as every receiver will
                await self._compute(ops.finalize, part, self.op, w)
                await self._compute(encode, part, q, v["qown"][:e], ws)
                await self._compute(decode, v["qown"][:e], q, part, ws)
                sends.append(self._spawn(self._send(AG, 0, p, byte_view(v["qown"][:e]))))
        await self._ag_quant(p, st, q, ag_recvs, sends)

    def _post_ag_recv(self, p: int, s: int, st: Scratch) -> asyncio.Future[None] | None:
        assert self.quant is not None
        a, b = self.bounds(ag_recv_chunk(self.rank, s, self.world), p)
        if a == b:
            return None
        buf = st.views[f"qag{s % 2}"][: encoded_size(b - a, self.quant)]
        return self._spawn(self._recv(AG, s, p, byte_view(buf)))

    async def _ag_quant(
        self,
        p: int,
        st: Scratch,
        q: Quantization,
        recvs: list[asyncio.Future[None] | None],
        sends: list[asyncio.Future[None]],
    ) -> None:
        """Quantized all-gather of piece ``p``: decode each chunk, forward its bytes unchanged."""
        assert st.ws is not None
        forwards: list[asyncio.Future[None] | None] = [None, None]
        for s in range(self.world - 1):
            a, b = self.bounds(ag_recv_chunk(self.rank, s, self.world), p)
            recv = recvs[s]
            if recv is not None:
                await recv
                buf = st.views[f"qag{s % 2}"][: encoded_size(b - a, q)]
                await self._compute(decode, buf, q, self.dst[a:b], st.ws)
                if s < self.last:
                    forward = self._spawn(self._send(AG, s + 1, p, byte_view(buf)))
                    forwards[s % 2] = forward
                    sends.append(forward)
            if s + 2 < self.world - 1:  # qag[s % 2] is free once its forward is written
                fwd = forwards[s % 2]
                if fwd is not None:
                    await fwd
                recvs.append(self._post_ag_recv(p, s + 2, st))
        await asyncio.gather(*sends)


class ReduceScatter(Operation):
    """Reduce ``src`` (flat, ``n`` elements) so that ``dst`` gets this rank's chunk of the result.

    ``dst`` has the chunk's length; it may be the chunk's own slice of ``src``. Partial sums live
    in scratch: with 3+ ranks two pieces per worker, one being forwarded while the next lands.
    """

    def __init__(
        self,
        peers: RingPeers,
        tag: int,
        src: torch.Tensor,
        dst: torch.Tensor,
        op: ReduceOp,
        quant: Quantization | None,
        piece_bytes: int,
        pool: BufferPool,
        window: int,
        offload: bool,
    ) -> None:
        w = peers.world_size
        self.src, self.dst, self.op, self.quant = src, dst, op, quant
        self.chunks = [chunk_bounds(src.numel(), w, c) for c in range(w)]
        longest = max(b - a for a, b in self.chunks)
        pieces = piece_count(longest, src.element_size(), piece_bytes)
        super().__init__(peers, tag, pieces, pool, window, offload)
        self.piece_len = -(-longest // pieces) if pieces else 0
        # Two accumulators alternate when one is still being forwarded (3+ ranks, plain).
        self.accs = 2 if w >= 3 and quant is None else 1
        per_worker = self.accs * self.piece_len * src.element_size()
        if quant is not None:
            per_worker += 2 * encoded_size(self.piece_len, quant) + 5 * self.piece_len
        self._cap_workers(src.numel() * src.element_size() // 2, per_worker)

    def _scratch(self) -> Scratch:
        st = Scratch()
        for i in range(self.accs):
            st.add(self.pool, f"buf{i}", self.src.dtype, self.piece_len)
        if self.quant is not None:
            e = encoded_size(self.piece_len, self.quant)
            st.add(self.pool, "qsend", torch.uint8, e)
            st.add(self.pool, "qrecv", torch.uint8, e)
            st.ws = self.pool.take_workspace()
        return st

    async def _piece(self, p: int, st: Scratch) -> None:
        r, w, v, q = self.rank, self.world, st.views, self.quant
        sends: list[asyncio.Future[None]] = []
        # The send still reading buf0 / buf1 (plain), or qsend (quantized: index 0).
        held: list[asyncio.Future[None] | None] = [None, None]
        a, b = piece_bounds(*self.chunks[rs_send_chunk(r, 0, w)], self.pieces, p)
        if b > a:
            sends.append(await self._forward(0, p, self.src[a:b], st, held, None))
        for s in range(w - 1):
            a, b = piece_bounds(*self.chunks[rs_recv_chunk(r, s, w)], self.pieces, p)
            if a == b:
                continue
            if q is None:
                slot = s % self.accs
                acc, holder = v[f"buf{slot}"][: b - a], held[slot]
                if holder is not None:
                    await holder
                await self._recv(RS, s, p, byte_view(acc))
            else:  # buf0 is free: its last partial was encoded before its send started
                slot, acc, e = 0, v["buf0"][: b - a], encoded_size(b - a, q)
                await self._recv(RS, s, p, byte_view(v["qrecv"][:e]))
                await self._compute(decode, v["qrecv"][:e], q, acc, st.ws)
            if s < self.last:
                await self._compute(ops.reduce, acc, self.src[a:b], acc, self.op)
                sends.append(await self._forward(s + 1, p, acc, st, held, slot))
            else:
                lo = self.chunks[r][0]
                out = self.dst[a - lo : b - lo]
                await self._compute(ops.reduce, self.src[a:b], acc, out, self.op)
                await self._compute(ops.finalize, out, self.op, w)
        await asyncio.gather(*sends)

    async def _forward(
        self,
        step: int,
        p: int,
        data: torch.Tensor,
        st: Scratch,
        held: list[asyncio.Future[None] | None],
        slot: int | None,
    ) -> asyncio.Future[None]:
        """Start sending ``data`` (encoded first, with quantization); remember what it holds."""
        if self.quant is None:
            task = self._spawn(self._send(RS, step, p, byte_view(data)))
            if slot is not None:
                held[slot] = task
            return task
        if held[0] is not None:
            await held[0]
        qsend = st.views["qsend"][: encoded_size(data.numel(), self.quant)]
        await self._compute(encode, data, self.quant, qsend, st.ws)
        task = self._spawn(self._send(RS, step, p, byte_view(qsend)))
        held[0] = task
        return task
