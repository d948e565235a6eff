"""An in-memory ring of RingPeers for sans-IO tests of the executor.

Transfers are matched by (link, tag, seq) exactly as a Link does: data sent before the receive is
posted is held (one copy) until it is; a size mismatch raises ProtocolError. A seeded RNG adds
random yields so that tasks interleave differently from run to run of the same seed.

``forget(tag)`` acts locally like ``Link.forget`` (held data dropped, late frames ignored).
``abort(tag, reason)`` does the same and, like ``Link.abort_tag``, tells both neighbours, whose
transfers of the tag then fail with PeerLostError naming the reason: that is what lets a failure
travel around the ring. ``propagate=False`` models neighbours that are never told (``abort`` then
acts like ``forget``), to show what the executor does without it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from transport.errors import PeerLostError, ProtocolError


@dataclass
class _Mailbox:
    held: dict[tuple[int, int], bytes] = field(default_factory=dict)
    posted: dict[tuple[int, int], tuple[memoryview, asyncio.Future[None]]] = field(default_factory=dict)
    seen: set[tuple[int, int]] = field(default_factory=set)
    forgotten: set[int] = field(default_factory=set)  # by the receiving end
    refused: set[int] = field(default_factory=set)  # by both ends: transfers fail
    error: BaseException | None = None


class FakeRing:
    """``world_size`` ranks; link ``r`` carries data from rank ``r`` to rank ``r + 1``."""

    def __init__(self, world_size: int, seed: int = 0, jitter: float = 0.5, propagate: bool = True) -> None:
        self.world_size = world_size
        self.propagate = propagate
        self.links = [_Mailbox() for _ in range(world_size)]
        self.rng = random.Random(seed)
        self.jitter = jitter
        self.sends = 0
        self.fail_after: int | None = None  # abort link 0 when this many sends happened
        self.aborts: list[tuple[int, int, str]] = []  # (rank, tag, reason) of every abort(tag)

    def peers(self, rank: int) -> "FakePeers":
        return FakePeers(self, rank)

    def abort(self, link: int, exc: BaseException | None = None) -> None:
        """Fail every pending and later transfer on ``link`` (both ends see it)."""
        box = self.links[link]
        box.error = exc or PeerLostError(f"link {link} aborted")
        for _, fut in box.posted.values():
            if not fut.done():
                fut.set_exception(box.error)
        box.posted.clear()

    async def _maybe_yield(self) -> None:
        while self.rng.random() < self.jitter:
            await asyncio.sleep(0)

    def leftovers(self) -> list[tuple[int, int, int]]:
        """(link, tag, seq) of data held but never received, and receives never satisfied."""
        out = []
        for i, box in enumerate(self.links):
            out += [(i, *key) for key in box.held]
            out += [(i, *key) for key in box.posted]
        return out


class FakePeers:
    """One rank's view of a :class:`FakeRing`, implementing ``RingPeers``."""

    def __init__(self, ring: FakeRing, rank: int) -> None:
        self.ring = ring
        self.rank = rank
        self.world_size = ring.world_size

    async def send_next(self, tag: int, seq: int, buf: memoryview) -> None:
        ring = self.ring
        await ring._maybe_yield()
        box = ring.links[self.rank]
        if box.error is not None:
            raise box.error
        if tag in box.refused:
            raise PeerLostError(f"transfer {tag}/{seq} was forgotten")
        key = (tag, seq)
        assert key not in box.seen, f"duplicate transfer {key} on link {self.rank}"
        assert len(buf) > 0, "empty transfers are never sent"
        box.seen.add(key)
        ring.sends += 1
        if ring.fail_after is not None and ring.sends >= ring.fail_after:
            ring.abort(0)
        if tag in box.forgotten:
            return
        posted = box.posted.pop(key, None)
        if posted is not None and posted[1].done():  # cancelled, not yet withdrawn: the data is dropped
            posted = None
        elif posted is None:
            box.held[key] = bytes(buf)
        else:
            dest, fut = posted
            if len(dest) != len(buf):
                fut.set_exception(ProtocolError(f"size mismatch {len(buf)} != {len(dest)}"))
            else:
                dest[:] = buf
                fut.set_result(None)
        await ring._maybe_yield()

    async def recv_prev(self, tag: int, seq: int, buf: memoryview) -> None:
        ring = self.ring
        box = ring.links[(self.rank - 1) % ring.world_size]
        await ring._maybe_yield()
        if box.error is not None:
            raise box.error
        if tag in box.refused:
            raise PeerLostError(f"transfer {tag}/{seq} was forgotten")
        key = (tag, seq)
        data = box.held.pop(key, None)
        if data is not None:
            if len(data) != len(buf):
                raise ProtocolError(f"size mismatch {len(data)} != {len(buf)}")
            buf[:] = data
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        box.posted[key] = (buf, fut)
        try:
            await fut
        finally:
            if box.posted.get(key, (None, None))[1] is fut:
                del box.posted[key]  # cancelled: never write into buf afterwards

    def forget(self, tag: int) -> None:
        ring = self.ring
        incoming = ring.links[(self.rank - 1) % ring.world_size]
        incoming.forgotten.add(tag)
        for key in [k for k in incoming.held if k[0] == tag]:
            del incoming.held[key]
        for key in [k for k in incoming.posted if k[0] == tag]:
            _, fut = incoming.posted.pop(key)
            if not fut.done():
                fut.set_exception(PeerLostError(f"transfer {key} was forgotten"))

    def abort(self, tag: int, reason: str) -> None:
        self.ring.aborts.append((self.rank, tag, reason))
        self.forget(tag)
        if not self.ring.propagate:
            return
        for box in (self.ring.links[(self.rank - 1) % self.ring.world_size], self.ring.links[self.rank]):
            box.refused.add(tag)
            for key in [k for k in box.posted if k[0] == tag]:
                _, fut = box.posted.pop(key)
                if not fut.done():
                    fut.set_exception(PeerLostError(f"transfer {key}: a neighbour aborted tag {tag}: {reason}"))
