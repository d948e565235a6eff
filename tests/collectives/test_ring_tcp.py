"""The ring executor over real striped TCP links on 127.0.0.1, all ranks in one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from collectives.buffers import BufferPool
from collectives.peers import LinkRingPeers
from collectives.ring import ring_all_reduce, ring_broadcast
from collectives.types import Quantization, ReduceOp
from transport import Link, Server, connect_link, new_event_loop, start_server
from transport.errors import PeerLostError

T = TypeVar("T")


class Ring:
    """``world`` ranks; rank r's outbound link goes to rank r + 1's server."""

    def __init__(self, servers: list[Server], outbound: list[Link], inbound: list[Link]) -> None:
        self.servers, self.outbound, self.inbound = servers, outbound, inbound
        world = len(servers)
        self.peers = [LinkRingPeers(r, world, outbound[r], inbound[r]) for r in range(world)]

    @classmethod
    async def build(cls, world: int, connections: int) -> Ring:
        loop = asyncio.get_running_loop()
        arrived: list[asyncio.Future[Link]] = [loop.create_future() for _ in range(world)]
        servers = [
            await start_server("127.0.0.1", 0, None, on_link=arrived[r].set_result, peer_id=r) for r in range(world)
        ]
        outbound = [
            await connect_link("127.0.0.1", servers[(r + 1) % world].port, connections=connections, peer_id=r)
            for r in range(world)
        ]
        inbound = [await f for f in arrived]
        return cls(servers, outbound, inbound)

    def kill(self, rank: int) -> None:
        """What a rank's death looks like to its neighbours: both its links drop."""
        self.outbound[rank].abort()
        self.inbound[rank].abort()

    async def close(self) -> None:
        for link in self.outbound + self.inbound:
            link.close()
        for server in self.servers:
            server.close()
        await asyncio.gather(*(link.wait_closed() for link in self.outbound + self.inbound))
        await asyncio.gather(*(server.wait_closed() for server in self.servers))


def _run(world: int, connections: int, body: Callable[[Ring], Awaitable[T]]) -> T:
    async def main() -> T:
        ring = await Ring.build(world, connections)
        try:
            return await asyncio.wait_for(body(ring), 60)
        finally:
            await ring.close()

    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("quant", [None, Quantization(torch.uint8, "zero_point")], ids=["plain", "uint8"])
def test_all_reduce_over_three_striped_links(quant: Quantization | None) -> None:
    world, n = 3, (3 << 20) // 4 + 5  # a few MiB, not divisible by the world size
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(n, generator=g) for _ in range(world)]
    srcs = [x.clone() for x in xs]
    dsts = [srcs[0], torch.empty(n), srcs[2]]  # ranks 0 and 2 in place, rank 1 out of place
    pools = [BufferPool() for _ in range(world)]

    async def body(ring: Ring) -> list[tuple[int, int]]:
        infos = []
        for tag in (1, 2):  # twice: the second call reuses the pooled scratch
            for r in (0, 2):  # the in-place ranks start again from their inputs
                srcs[r].copy_(xs[r])
            infos = await asyncio.gather(
                *(
                    ring_all_reduce(
                        ring.peers[r], tag, srcs[r], dsts[r], ReduceOp.AVG, quant, piece_bytes=256 << 10, pool=pools[r]
                    )
                    for r in range(world)
                )
            )
        return infos

    infos = _run(world, 3, body)
    ref = np.stack([x.double().numpy() for x in xs]).mean(0)
    got = dsts[0].double().numpy()
    raw = [d.numpy().tobytes() for d in dsts]
    assert raw[1] == raw[0] and raw[2] == raw[0]
    if quant is None:
        assert np.abs(got - ref).max() <= 3 * 2**-24 * np.abs(np.stack([x.numpy() for x in xs])).sum(0).max()
    else:
        span = 2 * np.abs(np.stack([x.double().numpy() for x in xs])).sum(0).max()
        assert np.abs(got - ref).max() <= span / 255 + 2 * np.abs(ref).max() / 255
        assert infos[0][0] < 0.3 * 2 * n * 4 * (world - 1) / world  # encoded bytes on the wire
    assert torch.equal(srcs[1], xs[1])


@pytest.mark.timeout(60)
def test_broadcast_over_links() -> None:
    world, n = 3, 300_001
    ts = [torch.full((n,), float(r)) for r in range(world)]

    async def body(ring: Ring) -> None:
        await asyncio.gather(*(ring_broadcast(ring.peers[r], 9, ts[r], 2, piece_bytes=256 << 10) for r in range(world)))

    _run(world, 2, body)
    assert all(torch.equal(t, torch.full((n,), 2.0)) for t in ts)


class _DiesAfter:
    """Wraps one rank's peers: after ``sends`` sends it 'dies' (its links drop)."""

    def __init__(self, inner: LinkRingPeers, ring: Ring, sends: int) -> None:
        self.inner, self.ring, self.left = inner, ring, sends
        self.rank, self.world_size = inner.rank, inner.world_size

    async def send_next(self, tag: int, seq: int, buf: memoryview) -> None:
        self.left -= 1
        if self.left == 0:
            self.ring.kill(self.rank)
        await self.inner.send_next(tag, seq, buf)

    async def recv_prev(self, tag: int, seq: int, buf: memoryview) -> None:
        await self.inner.recv_prev(tag, seq, buf)

    def forget(self, tag: int) -> None:
        self.inner.forget(tag)

    def abort(self, tag: int, reason: str) -> None:
        self.inner.abort(tag, reason)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world,victim", [(3, 1), (2, 0)])
@pytest.mark.parametrize("sends", [1, 4])
def test_a_dying_peer_fails_every_rank_without_hanging(world: int, victim: int, sends: int) -> None:
    n = (8 << 20) // 4
    xs = [torch.full((n,), float(r + 1)) for r in range(world)]
    before = [x.clone() for x in xs]

    async def body(ring: Ring) -> list[Any]:
        peers: list[Any] = list(ring.peers)
        peers[victim] = _DiesAfter(ring.peers[victim], ring, sends)
        return await asyncio.gather(
            *(ring_all_reduce(peers[r], 1, xs[r], torch.empty(n), ReduceOp.SUM, piece_bytes=256 << 10) for r in range(world)),
            return_exceptions=True,
        )

    results = _run(world, 2, body)
    assert all(isinstance(res, PeerLostError) for res in results), results
    for x, b in zip(xs, before):
        assert torch.equal(x, b)  # out of place: the inputs are untouched


@pytest.mark.timeout(60)
def test_one_broken_link_fails_every_rank_of_a_ring_of_three() -> None:
    world, n = 3, (8 << 20) // 4
    xs = [torch.ones(n) for _ in range(world)]

    async def body(ring: Ring) -> list[Any]:
        async def breaker() -> None:
            while ring.outbound[0].tx_bytes < 1 << 20:  # mid-op: some data went out first
                await asyncio.sleep(0.001)
            ring.outbound[0].abort()

        ops = [
            ring_all_reduce(ring.peers[r], 1, xs[r], torch.empty(n), ReduceOp.SUM, piece_bytes=256 << 10)
            for r in range(world)
        ]
        results = await asyncio.wait_for(asyncio.gather(*ops, breaker(), return_exceptions=True), 1.5)
        return results[:world]

    results = _run(world, 2, body)
    assert all(isinstance(res, PeerLostError) for res in results), results
    assert "aborted tag 1" in str(results[2])  # rank 2 is on no broken link: a neighbour told it
