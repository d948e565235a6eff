"""The fault-injecting proxy: frame tracking and garbage alone, then each fault over real
TCP on 127.0.0.1 between two pccl connections (a server behind the proxy, a client in front)."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import warnings
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stress.proxy import GARBAGE_KINDS, HEADER_SIZE, FaultProxy, FrameTracker, make_garbage
from transport.connection import Connection, open_connection
from transport.errors import PeerLostError, ProtocolError
from transport.frame import unpack_header
from transport.link import Link, connect_link
from transport.loop import new_event_loop
from transport.message import decode, message
from transport.server import start_server
from transport.frame import PROTOCOL_VERSION

T = TypeVar("T")
HOST = "127.0.0.1"


def arun(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run ``coro`` on a fresh uvloop; a test that leaves sockets open fails."""
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftovers:
            task.cancel()

        async def settle() -> None:
            await asyncio.gather(*leftovers, return_exceptions=True)

        loop.run_until_complete(settle())
        # uvloop hangs in close() when its unclosed-resource warning is raised as an
        # error (filterwarnings = error): record the warnings instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            loop.close()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks and not leftovers, (leaks, leftovers)
    return result


def frame(length: int) -> bytes:
    """A frame as §2 lays it out: 48-byte header whose last u64 is the payload length."""
    return struct.pack("<2sBBHHQQQQQ", b"PC", PROTOCOL_VERSION, 7, 0, 0, 1, 2, 0, length, length) + bytes(length)


# -- pure parts ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=12), data=st.data())
def test_tracker_finds_every_frame_start_in_any_chunking(lengths: list[int], data: st.DataObject) -> None:
    stream = b"".join(frame(n) for n in lengths)
    expected, pos = [], 0
    for n in lengths:
        expected.append(pos)
        pos += HEADER_SIZE + n
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    tracker, found, start = FrameTracker(), [], 0
    for end in [*cuts, len(stream)]:
        found += [start + i for i in tracker.advance(stream[start:end])]
        start = end
    assert found == expected
    assert tracker.at_boundary


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
def test_every_garbage_kind_is_refused_by_a_pccl_reader(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(200):
        junk = make_garbage(kind, rng)
        stream = junk + frame(0)  # garbage shorter than a header runs into the next frame
        if kind == "bad_control":
            header = unpack_header(stream[:HEADER_SIZE])
            with pytest.raises(ProtocolError):
                decode(stream[HEADER_SIZE : HEADER_SIZE + header.length])
        else:
            with pytest.raises(ProtocolError):
                unpack_header(stream[:HEADER_SIZE])


def test_unknown_garbage_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown garbage kind"):
        make_garbage("gentle", random.Random(0))


# -- over TCP --------------------------------------------------------------------------------


@asynccontextmanager
async def proxied(**kwargs: Any) -> AsyncIterator[tuple[FaultProxy, Connection, Connection]]:
    """(proxy, client connection, server-side connection), the client dialling the proxy."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    server = await start_server(HOST, 0, accepted.put_nowait)
    proxy = FaultProxy(HOST, server.port, seed=1, **kwargs)
    await proxy.start()
    client = await open_connection(HOST, proxy.port, role="peer", peer_id=1)
    remote = await asyncio.wait_for(accepted.get(), 5)
    try:
        yield proxy, client, remote
    finally:
        client.abort("test over")
        remote.abort("test over")
        await proxy.close()
        server.close()
        await server.wait_closed()


async def echo_once(client: Connection, remote: Connection, payload: bytes) -> float:
    """Seconds for one message client -> remote -> client."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await client.send_message(_Blob(payload))
    got = await remote.recv_message()
    await remote.send_message(got)
    back = await client.recv_message()
    assert back == _Blob(payload)
    return loop.time() - start


@message("test.proxy_blob")
@dataclass(frozen=True)
class _Blob:
    data: bytes


def test_forwards_both_ways_and_adds_latency() -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            fast = await echo_once(client, remote, b"x" * 1000)
            proxy.latency = 0.1
            slow = await echo_once(client, remote, b"y" * 1000)
            assert slow >= 0.2 > fast  # one delay each way
            proxy.clear()
            assert await echo_once(client, remote, b"z") < 0.2
            assert proxy.stats.accepted == 1 and proxy.stats.bytes_forwarded > 4000

    arun(main())


def test_throttle_limits_the_rate() -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            proxy.rate = 4e6
            took = await echo_once(client, remote, random.Random(0).randbytes(1 << 20))  # 1 MiB each way
            # Each direction sends its first 20 ms slice at once, then keeps to the rate.
            assert took >= 2 * ((1 << 20) / 4e6 - 0.02)
            proxy.rate = None
            assert await echo_once(client, remote, b"fast again") < 0.2

    arun(main())


async def both_lost(client: Connection, remote: Connection) -> None:
    for conn in (client, remote):
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(conn.recv_message(), 3)


def test_reset_breaks_both_ends_at_once() -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            assert proxy.reset() == 1
            await both_lost(client, remote)
            assert proxy.stats.resets == 1
            assert proxy.reset() is None  # nothing left to reset

    arun(main())


def test_partition_holds_data_and_resets_back_until_it_heals() -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            loop = asyncio.get_running_loop()
            assert proxy.partition(0.5) == 1
            start = loop.time()
            await client.send_message(_Blob(b"held back"))
            assert await asyncio.wait_for(remote.recv_message(), 3) == _Blob(b"held back")
            assert loop.time() - start >= 0.45
            proxy.partition(0.5)
            start = loop.time()
            remote.abort("the far end gives up during the partition")
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(client.recv_message(), 3)
            assert loop.time() - start >= 0.45  # the reset waited for the path to heal
            assert proxy.stats.partitions == 2

    arun(main())


@pytest.mark.parametrize("direction", ["to_target", "to_client"])
def test_truncated_frame_is_never_delivered_and_ends_the_connection(direction: str) -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            assert proxy.truncate(direction) is not None  # type: ignore[arg-type]
            sender, receiver = (client, remote) if direction == "to_target" else (remote, client)
            await sender.send_message(_Blob(b"q" * 5000))
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(receiver.recv_message(), 3)
            assert proxy.stats.truncations == 1

    arun(main())


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
def test_garbage_is_detected_logged_and_closes_the_connection(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with proxied() as (proxy, client, remote):
            with caplog.at_level(logging.WARNING, logger="transport"):
                assert proxy.inject_garbage(kind, "to_target") is not None
                await client.send_message(_Blob(b"after the garbage"))
                with pytest.raises(PeerLostError):
                    await asyncio.wait_for(remote.recv_message(), 3)
            assert proxy.stats.garbage == 1 and proxy.stats.garbage_kinds == {kind: 1}
            assert any("protocol error" in r.getMessage() for r in caplog.records)

    arun(main())


def test_a_link_through_the_proxy_carries_data_and_a_reset_aborts_it_on_both_sides() -> None:
    async def main() -> None:
        links: asyncio.Queue[Link] = asyncio.Queue()
        server = await start_server(HOST, 0, None, on_link=links.put_nowait)
        proxy = FaultProxy(HOST, server.port, seed=3)
        await proxy.start()
        client = await connect_link(HOST, proxy.port, connections=4, peer_id=1, timeout=5)
        remote = await asyncio.wait_for(links.get(), 5)
        try:
            src = np.arange(3 << 18, dtype=np.int64)
            dst = np.zeros_like(src)
            await asyncio.gather(client.send(5, 0, src), remote.recv_into(5, 0, dst))
            assert np.array_equal(src, dst)
            assert proxy.stats.accepted == 4
            pending = asyncio.ensure_future(remote.recv_into(6, 0, bytearray(8)))
            proxy.reset()
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(pending, 3)
            with pytest.raises(PeerLostError):
                await client.send(7, 0, b"12345678")
        finally:
            client.close()
            remote.close()
            await proxy.close()
            server.close()
            await server.wait_closed()

    arun(main())


def test_target_down_resets_the_client() -> None:
    async def main() -> None:
        server = await start_server(HOST, 0, lambda c: None)
        port = server.port
        server.close()
        await server.wait_closed()
        proxy = FaultProxy(HOST, port)
        await proxy.start()
        try:
            with pytest.raises(PeerLostError):
                await open_connection(HOST, proxy.port, role="peer", peer_id=1, timeout=3)
            assert proxy.stats.target_refused == 1
        finally:
            await proxy.close()

    arun(main())
