"""Bugs the chaos runs found, each reproduced on its own with in-process peers and a fault proxy.

1. A link that dies after its peer reported the ring epoch ready: the other end waits for a
   fresh inbound link that never comes, no collective can start, and the group hangs until
   the membership changes (seen in a 6-peer run as a 25 s stall of everyone). The proxy's
   partition fault holds the reset back, as a lossy path or a busy middlebox can.
2. A ring link that goes silent (a path that drops everything while both peers still reach
   the master): nothing noticed it, so the collective waited as long as the partition
   lasted. Ring links now carry heartbeats and give up after the heartbeat timeout.
3. An ABORT_TAG sent on a link the accepting side has just assembled (an optimistic
   collective that failed at once) could reach a connection of the connecting side before
   its ``connect_link`` had built the Link: a protocol error that broke the new link.
4. A peer resumed after a SIGSTOP long enough to be kicked, whose next call was a vote:
   sending the vote failed, and the vote's future was left holding the error with nobody
   to read it ("Future exception was never retrieved" in its log).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

import pccl
from pccl import protocol as P
from stress.chaos_fuzz import free_port
from stress.proxy import FaultProxy
from transport.errors import PeerLostError
from transport.link import Link, connect_link
from transport.loop import LoopThread, new_event_loop
from transport.server import start_server


def both(*calls: Callable[[], Any], timeout: float) -> list[Any]:
    """Run blocking calls at once; each result or exception. A hang fails the test (the
    calls still blocked end when the fixture closes the Communicators)."""
    pool = concurrent.futures.ThreadPoolExecutor(len(calls))
    futures = [pool.submit(call) for call in calls]
    try:
        out = []
        for fut in futures:
            try:
                out.append(fut.result(timeout))
            except concurrent.futures.TimeoutError:
                raise AssertionError(f"no outcome within {timeout} s: the group hangs") from None
            except Exception as exc:
                out.append(exc)
        return out
    finally:
        pool.shutdown(wait=False)


class ProxiedPair:
    """Peers A and B; everything A sends B passes B's proxy (B registers the proxy's port)."""

    def __init__(self) -> None:
        self.master = pccl.Master("127.0.0.1", 0, heartbeat_timeout=2.0)
        self.master.start()
        self.thread = LoopThread("proxy")
        port = free_port()
        self.proxy = FaultProxy("127.0.0.1", port, seed=1)
        self.thread.run(self.proxy.start())
        self.a = pccl.Communicator(self.master.address, connections=1)
        self.b = pccl.Communicator(self.master.address, connections=1, p2p_port=port, advertise_port=self.proxy.port)
        self.a.connect(timeout=20)
        joiner = threading.Thread(target=self.b.connect, kwargs={"timeout": 20})
        joiner.start()
        while not self.a.are_peers_pending():
            pass
        self.a.update_topology()
        joiner.join(20)

    def on_proxy(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.thread.run(call())

    def reduce(self, timeout: float = 15.0) -> list[Any]:
        xa, xb = torch.full((1000,), 1.0, dtype=torch.float64), torch.full((1000,), 2.0, dtype=torch.float64)
        got = both(lambda: self.a.all_reduce(xa), lambda: self.b.all_reduce(xb), timeout=timeout)
        if not any(isinstance(g, Exception) for g in got):
            assert np.array_equal(xa.numpy(), np.full(1000, 3.0)) and np.array_equal(xb.numpy(), np.full(1000, 3.0))
        return got

    def close(self) -> None:
        self.a.close()
        self.b.close()
        self.thread.run(self.proxy.close())
        self.thread.stop()
        self.master.stop()


@pytest.fixture
def pair() -> Iterator[ProxiedPair]:
    p = ProxiedPair()
    try:
        yield p
    finally:
        p.close()


@pytest.mark.timeout(60)
def test_a_link_lost_after_the_epoch_was_reported_ready_is_reopened(pair: ProxiedPair) -> None:
    assert pair.reduce() == [pccl.ReduceInfo(2, 8000, 8000)] * 2
    # A cannot hear anything from B's side for a while...
    assert pair.on_proxy(lambda: pair.proxy.partition(2.0)) is not None
    # ...when B drops its inbound link from A (as it does on a protocol error on it).
    session = pair.b._session  # noqa: SLF001 - reaching B's link table is the point
    assert session is not None and pair.a.peer_id in session.links.inbound
    pair.b._thread.run(_abort_inbound(session.links, pair.a.peer_id))  # type: ignore[union-attr]  # noqa: SLF001
    # The next operation fails on both (B has no link from A) and the ring is re-linked:
    # A still sees its old link open and reports the new epoch ready, B waits for A.
    assert all(isinstance(g, pccl.PeerLostError) for g in pair.reduce()), "the broken link went unnoticed"
    # Once the partition heals A learns its link is gone; it must link again, or nothing
    # can ever start in this group. An operation A starts before it learned that runs on the
    # dead link and fails on both peers, like any operation a link loss overlaps; the one
    # after it must succeed.
    deadline = time.monotonic() + 20
    got = pair.reduce(timeout=20)
    if any(isinstance(g, Exception) for g in got):
        assert all(isinstance(g, pccl.PeerLostError) for g in got), got
        got = pair.reduce(timeout=max(1.0, deadline - time.monotonic()))
    assert got == [pccl.ReduceInfo(2, 8000, 8000)] * 2


async def _abort_inbound(links: Any, peer: int) -> None:
    links.inbound[peer].abort()


@pytest.mark.timeout(60)
def test_a_silent_link_fails_the_collective_within_the_heartbeat_timeout(pair: ProxiedPair) -> None:
    assert pair.reduce() == [pccl.ReduceInfo(2, 8000, 8000)] * 2
    assert pair.on_proxy(lambda: pair.proxy.partition(30.0)) is not None  # far longer than the test
    start = time.monotonic()
    got = pair.reduce(timeout=15)
    assert all(isinstance(g, pccl.PeerLostError) for g in got), got
    assert time.monotonic() - start < 2 * 2.0 + 2  # heartbeat timeout 2 s, checked every 0.4 s
    # A new link (a new connection, not partitioned) carries the retry.
    assert pair.reduce() == [pccl.ReduceInfo(2, 8000, 8000)] * 2


def test_an_abort_right_after_the_link_is_assembled_reaches_the_connecting_side() -> None:
    async def main() -> None:
        links: asyncio.Queue[Link] = asyncio.Queue()

        def on_link(link: Link) -> None:
            link.abort_tag(7, "given up at once")  # before the other side can have built its Link
            links.put_nowait(link)

        server = await start_server("127.0.0.1", 0, None, on_link=on_link)
        try:
            for _ in range(5):
                client = await connect_link("127.0.0.1", server.port, connections=4, peer_id=1, timeout=5)
                remote = await asyncio.wait_for(links.get(), 5)
                with pytest.raises(PeerLostError, match="given up at once"):
                    await client.recv_into(7, 0, bytearray(4))
                got = bytearray(4)
                await asyncio.gather(client.send(8, 0, b"abcd"), remote.recv_into(8, 0, got))
                assert got == b"abcd" and not client.closed and not remote.closed
                client.close()
                remote.close()
        finally:
            server.close()
            await server.wait_closed()

    loop = new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()


@pytest.mark.timeout(30)
def test_a_vote_whose_message_cannot_be_sent_leaves_no_unretrieved_error(caplog: pytest.LogCaptureFixture) -> None:
    with pccl.Master("127.0.0.1", 0, heartbeat_timeout=2.0) as master:
        comm = pccl.Communicator(master.address, connections=1)
        comm.connect(timeout=20)
        session, thread = comm._session, comm._thread  # noqa: SLF001 - the race is inside the session
        assert session is not None and thread is not None

        async def vote_on_a_dead_connection() -> None:
            assert session.conn is not None
            session.conn.abort("the master closed it while this process was stopped")
            # The session has not read the loss yet: the vote gets as far as sending.
            with pytest.raises(pccl.MasterConnectionError):
                await session.vote(P.PEERS_PENDING)
            gc.collect()
            await asyncio.sleep(0)  # the loop reports unretrieved exceptions from here

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            thread.run(vote_on_a_dead_connection())
        comm.close()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
