"""``ring_all_reduce(guard=...)``: no element of ``dst`` is written, and no receive into it is
posted, before the guard allowed it (what lets a caller copy a backup while the ring runs).

The guard here releases random spans of the tensor, in random order, a few loop turns apart;
every time it is consulted and every time it releases, every rank's not-yet-released elements
must still hold their values from before the call. Results are checked against float64 numpy.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from collectives.buffers import BufferPool
from collectives.ring import ring_all_reduce
from collectives.types import ReduceOp
from ring_fakes import FakeRing
from transport.errors import PeerLostError


class ReleasingGuard:
    """Allows ``dst`` span by span; checks that nothing outside the allowed spans was written."""

    def __init__(self, dst: torch.Tensor, rng: random.Random, spans: int) -> None:
        self.dst, self.original = dst, dst.clone()
        self.allowed = torch.zeros(dst.numel(), dtype=torch.bool)
        n = dst.numel()
        cuts = sorted(rng.sample(range(1, n), spans - 1))
        self.pending = list(zip([0, *cuts], [*cuts, n]))
        rng.shuffle(self.pending)
        self.changed = asyncio.Event()
        self.calls = 0

    def check(self) -> None:
        untouched = ~self.allowed
        assert torch.equal(self.dst[untouched], self.original[untouched]), "written before allowed"

    def is_writable(self, start: int, stop: int) -> bool:
        self.check()
        return bool(self.allowed[start:stop].all())

    async def writable(self, start: int, stop: int) -> None:
        self.calls += 1
        while not self.is_writable(start, stop):
            self.changed.clear()
            await self.changed.wait()

    async def release_all(self, rng: random.Random) -> None:
        while self.pending:
            for _ in range(rng.randint(0, 6)):
                await asyncio.sleep(0)
            self.check()
            a, b = self.pending.pop()
            self.allowed[a:b] = True
            self.changed.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
@pytest.mark.parametrize("window", [2, None], ids=["window2", "every_piece"])
@pytest.mark.parametrize("seed", range(3))
def test_nothing_is_written_before_the_guard_allows_it_and_the_result_is_exact(
    world: int, in_place: bool, window: int | None, seed: int
) -> None:
    rng = random.Random(seed)
    n = 10_007  # many 1 KiB pieces per chunk, chunks of unequal length
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-1000, 1000, (n,), generator=g).to(torch.float32) for _ in range(world)]
    ref = np.sum([x.double().numpy() for x in xs], axis=0)  # exact: small integers
    dsts = [x.clone() if in_place else torch.full((n,), 7.0) for x in xs]
    guards = [ReleasingGuard(d, rng, spans=rng.randint(2, 40)) for d in dsts]
    ring = FakeRing(world, seed=seed)

    async def rank(r: int) -> None:
        src = dsts[r] if in_place else xs[r]
        # A window of two: each worker posts its next piece's receives early, if allowed.
        await ring_all_reduce(ring.peers(r), 5, src, dsts[r], ReduceOp.SUM, piece_bytes=1024,
                              pool=BufferPool(), window=window, guard=guards[r])

    async def main() -> None:
        await asyncio.wait_for(
            asyncio.gather(*(rank(r) for r in range(world)), *(gd.release_all(rng) for gd in guards)), 20
        )

    asyncio.run(main())
    for d, gd in zip(dsts, guards):
        assert np.array_equal(d.double().numpy(), ref)
        assert gd.calls > 0
    assert ring.leftovers() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_after_a_failure_what_the_guard_held_back_is_still_untouched(world: int) -> None:
    rng = random.Random(world)
    n = 20_011
    xs = [torch.arange(n, dtype=torch.float64) * (r + 1) for r in range(world)]
    dsts = [x.clone() for x in xs]
    guards = [ReleasingGuard(d, rng, spans=30) for d in dsts]
    ring = FakeRing(world, seed=world)
    ring.fail_after = 12  # link 0 breaks after a dozen transfers

    async def rank(r: int) -> BaseException | None:
        try:
            await ring_all_reduce(ring.peers(r), 9, dsts[r], dsts[r], ReduceOp.SUM, piece_bytes=2048,
                                  pool=BufferPool(), guard=guards[r])
        except PeerLostError as exc:
            return exc
        return None

    async def main() -> list[BaseException | None]:
        releases = [asyncio.ensure_future(gd.release_all(rng)) for gd in guards]
        try:
            return await asyncio.wait_for(asyncio.gather(*(rank(r) for r in range(world))), 20)
        finally:
            for task in releases:
                task.cancel()
            await asyncio.gather(*releases, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, PeerLostError) for o in outcomes), outcomes
    for gd in guards:
        gd.check()  # what was never allowed was never written, failure or not
        assert gd.pending, "the failure came after everything was released: nothing was tested"
