"""Striped links over loopback: reassembly, concurrency, early data, forget (docs/protocol.md §4)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tp_helpers import HOST, arun, link_pair
from transport.connection import open_connection
from transport.errors import AuthenticationError, InvalidUsageError, PeerLostError, PeerUnreachableError, ProtocolError
from transport.link import MIN_STRIPE, Link, connect_link
from transport.message import message
from transport.server import start_server

MiB = 1 << 20


@message("test.link.marker")
class Marker:
    n: int


def payload(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


async def transfer(sender: Link, receiver: Link, tag: int, seq: int, data: np.ndarray) -> np.ndarray:
    out = np.zeros(len(data), np.uint8)
    await asyncio.gather(sender.send(tag, seq, data), receiver.recv_into(tag, seq, out))
    return out


SIZES = [0, 1, 17, MIN_STRIPE - 1, MIN_STRIPE + 1, 3 * MIN_STRIPE + 7, MiB + 3, 5 * MiB + 11]


@pytest.mark.parametrize("connections", [1, 2, 3, 8])
def test_random_sizes_reassemble_exactly(connections: int) -> None:
    async def main() -> None:
        async with link_pair(connections) as (client, remote):
            assert len(client.connections) == len(remote.connections) == connections
            client.frame_size = 256 * 1024  # several frames per stripe
            sent = 0
            for seq, size in enumerate(SIZES):
                data = payload(size, seq)
                out = await transfer(client, remote, 1, seq, data)
                assert np.array_equal(out, data), size
                back = await transfer(remote, client, 2, seq, data[::-1].copy())
                assert np.array_equal(back, data[::-1]), size
                sent += size
            assert client.tx_bytes == remote.rx_bytes == sent
            assert remote.tx_bytes == client.rx_bytes == sent
            assert remote.held_bytes == client.held_bytes == 0

    arun(main())


def test_large_transfer_spans_many_frames_and_all_connections() -> None:
    async def main() -> None:
        async with link_pair(4) as (client, remote):
            data = payload(24 * MiB + 5, 7)
            before = [c.rx_bytes for c in remote.connections]
            out = await transfer(client, remote, 3, 0, data)
            assert np.array_equal(out, data)
            moved = [c.rx_bytes - b for c, b in zip(remote.connections, before)]
            assert all(m >= 6 * MiB for m in moved), moved  # one stripe per connection

    arun(main())


def test_concurrent_tagged_transfers_in_both_directions_do_not_mix() -> None:
    async def main() -> None:
        async with link_pair(3) as (client, remote):
            client.frame_size = remote.frame_size = 128 * 1024
            rng = np.random.default_rng(1)
            jobs = []
            expected = {}
            outputs = {}
            for i in range(12):
                size = int(rng.integers(0, 3 * MiB))
                sender, receiver = (client, remote) if i % 2 else (remote, client)
                key = (100 + i % 3, i)
                expected[key] = payload(size, 50 + i)
                outputs[key] = np.zeros(size, np.uint8)
                jobs.append(sender.send(*key, expected[key]))
                jobs.append(receiver.recv_into(*key, outputs[key]))
            order = rng.permutation(len(jobs))
            await asyncio.gather(*(jobs[i] for i in order))
            for key, data in expected.items():
                assert np.array_equal(outputs[key], data), key

    arun(main())


def test_receive_posted_after_data_arrived_is_served_from_side_buffer() -> None:
    async def main() -> None:
        async with link_pair(1) as (client, remote):
            data = payload(3 * MiB + 1, 3)
            await client.send(9, 1, data)
            await client.send_message(Marker(1))  # same (only) connection: after the data
            assert await remote.recv_message() == Marker(1)
            assert remote.held_bytes == len(data)
            out = np.zeros(len(data), np.uint8)
            await remote.recv_into(9, 1, out)
            assert np.array_equal(out, data)
            assert remote.held_bytes == 0

    arun(main())


def test_receive_posted_before_data_arrives() -> None:
    async def main() -> None:
        async with link_pair(4) as (client, remote):
            data = payload(2 * MiB, 4)
            out = np.zeros(len(data), np.uint8)
            pending = asyncio.ensure_future(remote.recv_into(5, 5, out))
            await asyncio.sleep(0)
            assert not pending.done()
            await client.send(5, 5, data)
            await asyncio.wait_for(pending, 5)
            assert np.array_equal(out, data)
            assert remote.held_bytes == 0  # went straight into the posted buffer

    arun(main())


def test_any_bytes_like_buffer_works() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            values = np.arange(100_000, dtype=np.float32)
            out = np.zeros_like(values)
            await asyncio.gather(client.send(1, 0, values), remote.recv_into(1, 0, out))
            assert np.array_equal(out, values)
            raw = bytearray(1000)
            await asyncio.gather(client.send(1, 1, b"z" * 1000), remote.recv_into(1, 1, memoryview(raw)))
            assert raw == b"z" * 1000

    arun(main())


def test_size_mismatch_fails_that_receive_only() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            # Receive posted first, sender sends a different size.
            out = np.zeros(1000, np.uint8)
            pending = asyncio.ensure_future(remote.recv_into(1, 0, out))
            await asyncio.sleep(0)
            await client.send(1, 0, payload(999, 0))
            with pytest.raises(ProtocolError, match="carries 999 bytes but the receive buffer holds 1000"):
                await asyncio.wait_for(pending, 5)
            # Data first, then a receive of the wrong size.
            await client.send(1, 1, payload(10, 1))
            await client.send_message(Marker(2))
            assert await remote.recv_message() == Marker(2)
            with pytest.raises(ProtocolError, match="carries 10 bytes"):
                await remote.recv_into(1, 1, bytearray(11))
            # The link is still fine.
            data = payload(5000, 2)
            assert np.array_equal(await transfer(client, remote, 1, 2, data), data)

    arun(main())


def test_forget_drops_held_data_and_late_frames() -> None:
    async def main() -> None:
        async with link_pair(1) as (client, remote):
            pending = asyncio.ensure_future(remote.recv_into(7, 99, bytearray(10)))
            await client.send(7, 1, payload(MiB, 1))
            await client.send_message(Marker(1))
            assert await remote.recv_message() == Marker(1)
            assert remote.held_bytes == MiB
            remote.forget(7)
            assert remote.held_bytes == 0
            with pytest.raises(PeerLostError, match="forgotten"):
                await pending
            await client.send(7, 2, payload(MiB, 2))  # late frames of the aborted operation
            await client.send_message(Marker(2))
            assert await remote.recv_message() == Marker(2)
            assert remote.held_bytes == 0
            with pytest.raises(InvalidUsageError, match="forgotten"):
                await remote.recv_into(7, 3, bytearray(1))
            client.forget(7)
            with pytest.raises(InvalidUsageError, match="forgotten"):
                await client.send(7, 3, b"x")
            data = payload(1000, 3)
            assert np.array_equal(await transfer(client, remote, 8, 0, data), data)

    arun(main())


def test_cancelled_receive_never_writes_its_buffer() -> None:
    async def main() -> None:
        async with link_pair(1) as (client, remote):
            out = np.zeros(MiB, np.uint8)
            pending = asyncio.ensure_future(remote.recv_into(4, 0, out))
            await asyncio.sleep(0)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            await client.send(4, 0, payload(MiB, 9))
            await client.send_message(Marker(3))
            assert await remote.recv_message() == Marker(3)
            assert not out.any() and remote.held_bytes == 0
            with pytest.raises(InvalidUsageError, match="cancelled"):
                await remote.recv_into(4, 0, out)

    arun(main())


def test_side_buffer_limit_pushes_back_on_the_sender() -> None:
    async def main() -> None:
        limit = MiB
        async with link_pair(1, side_buffer_limit=limit) as (client, remote):
            client.frame_size = 256 * 1024
            data = payload(64 * MiB, 5)
            send = asyncio.ensure_future(client.send(1, 0, data))
            # 64 MiB cannot fit the kernel buffers plus a 1 MiB side buffer: the
            # sender must still be blocked after the receiver stopped reading.
            done, _ = await asyncio.wait([send], timeout=0.5)
            assert not done
            assert limit <= remote.held_bytes <= limit + client.frame_size
            out = np.zeros(len(data), np.uint8)
            await asyncio.wait_for(asyncio.gather(send, remote.recv_into(1, 0, out)), 10)
            assert np.array_equal(out, data)
            assert remote.held_bytes == 0

    arun(main())


def test_link_control_messages_both_ways() -> None:
    async def main() -> None:
        async with link_pair(3) as (client, remote):
            for i in range(5):
                await client.send_message(Marker(i))
            assert [await remote.recv_message() for _ in range(5)] == [Marker(i) for i in range(5)]
            await remote.send_message(Marker(-1))
            assert await client.recv_message() == Marker(-1)
            assert remote.peer_id == "client" and remote.link_id == client.link_id

    arun(main())


def test_invalid_usage() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            with pytest.raises(InvalidUsageError, match="unsigned 64-bit"):
                await client.send(-1, 0, b"x")
            with pytest.raises(InvalidUsageError, match="writable"):
                await remote.recv_into(1, 0, b"readonly")
            with pytest.raises(InvalidUsageError, match="contiguous"):
                await remote.recv_into(1, 0, np.zeros((4, 4), np.uint8)[:, 1])
            with pytest.raises(InvalidUsageError, match="bytes-like"):
                await client.send(1, 0, "text")
            pending = asyncio.ensure_future(remote.recv_into(1, 1, bytearray(4)))
            await asyncio.sleep(0)
            with pytest.raises(InvalidUsageError, match="already posted"):
                await remote.recv_into(1, 1, bytearray(4))
            await client.send(1, 1, b"abcd")
            await pending

    arun(main())


def test_incomplete_pool_is_dropped_after_the_link_timeout() -> None:
    async def main() -> None:
        links: list[Link] = []
        async with await start_server(HOST, 0, None, on_link=links.append, link_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            start = loop.time()
            lonely = await open_connection(HOST, server.port, role="p2p", peer_id=1, link_id=77, index=0,
                                           pool_size=2)
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(lonely.recv_message(), 3)
            assert 0.25 <= loop.time() - start < 2
            assert links == []

    arun(main())


def test_inconsistent_pool_is_dropped() -> None:
    async def main() -> None:
        links: list[Link] = []
        async with await start_server(HOST, 0, None, on_link=links.append) as server:
            first = await open_connection(HOST, server.port, role="p2p", peer_id=1, link_id=5, index=0,
                                          pool_size=3)
            twin = await open_connection(HOST, server.port, role="p2p", peer_id=1, link_id=5, index=0,
                                         pool_size=3)
            for conn in (first, twin):
                with pytest.raises(PeerLostError):
                    await asyncio.wait_for(conn.recv_message(), 3)
            assert links == []

    arun(main())


def test_connect_link_refused_cleanly() -> None:
    async def main() -> None:
        links: list[Link] = []
        async with await start_server(HOST, 0, None, on_link=links.append, secret=b"a") as server:
            with pytest.raises(AuthenticationError):
                await connect_link(HOST, server.port, connections=3, peer_id=1, secret=b"b")
            link = await connect_link(HOST, server.port, connections=3, peer_id=1, secret=b"a")
            assert len(links) == 1 and links[0].link_id == link.link_id
            link.close()
        plain = await start_server(HOST, 0, lambda c: None)  # takes no links
        try:
            with pytest.raises(PeerUnreachableError, match="not accepted"):
                await connect_link(HOST, plain.port, connections=2, peer_id=1, timeout=0.5)
        finally:
            plain.close()
            await plain.wait_closed()

    arun(main())


def test_closing_a_link_tells_the_peer_why() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            pending = asyncio.ensure_future(remote.recv_into(1, 0, bytearray(8)))
            await asyncio.sleep(0)
            client.close("shutting down")
            with pytest.raises(PeerLostError, match="shutting down"):
                await asyncio.wait_for(pending, 2)
            with pytest.raises(PeerLostError, match="closed locally: shutting down"):
                await client.send(1, 0, b"x")

    arun(main())
