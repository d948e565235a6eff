"""Failures on a link: one connection of the pool lost, or the peer process killed (§4).

Every pending send and receive must fail with PeerLostError on both sides within 1 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tp_helpers import HOST, arun, link_pair
from transport.errors import PeerLostError
from transport.link import Link
from transport.server import start_server

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a progress condition (not a race fix: the test needs bytes in flight first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def assert_all_lost(futures: Sequence[asyncio.Future[Any]], start: float) -> None:
    loop = asyncio.get_running_loop()
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 2.0)
    elapsed = loop.time() - start
    assert all(isinstance(r, PeerLostError) for r in results), [repr(r)[:60] for r in results]
    assert elapsed < 1.0, elapsed


def kill_close(link: Link, index: int) -> None:
    link.connections[index].close("test closes one connection")


def kill_abort(link: Link, index: int) -> None:
    link.connections[index].abort("test aborts one connection")


def kill_socket(link: Link, index: int) -> None:
    # Below our code: the socket dies as if the network reset it.
    transport = link.connections[index]._transport  # noqa: SLF001
    assert transport is not None
    fd = transport.get_extra_info("socket").fileno()
    with socket.socket(fileno=os.dup(fd)) as dup:  # the loop's wrapper has no shutdown()
        dup.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("kill", [kill_close, kill_abort, kill_socket])
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_losing_one_connection_aborts_the_link_on_both_sides(kill: Callable[[Link, int], None], side: str) -> None:
    async def main() -> None:
        async with link_pair(4, side_buffer_limit=MiB) as (client, remote):
            client.frame_size = 256 * 1024
            loop = asyncio.get_running_loop()
            big = np.ones(256 * MiB, np.uint8)  # more than 4 connections of kernel buffers hold
            ops = [
                asyncio.ensure_future(client.send(1, 0, big)),  # stalls: remote never posts it
                asyncio.ensure_future(client.recv_into(2, 0, bytearray(10))),
                asyncio.ensure_future(remote.recv_into(3, 0, bytearray(10))),
                asyncio.ensure_future(remote.recv_message()),
            ]
            await wait_until(lambda: remote.rx_bytes >= MiB)  # mid-transfer
            assert not any(op.done() for op in ops)
            start = loop.time()
            kill(client if side == "sender" else remote, 2)
            await assert_all_lost(ops, start)
            assert client.closed and remote.closed
            with pytest.raises(PeerLostError):
                await client.send(5, 0, b"x")
            with pytest.raises(PeerLostError):
                await remote.recv_into(5, 0, bytearray(1))

    arun(main())


@pytest.mark.timeout(30)
def test_peer_process_killed_mid_transfer() -> None:
    async def main() -> None:
        links: asyncio.Queue[Link] = asyncio.Queue()
        async with await start_server(HOST, 0, None, on_link=links.put_nowait) as server:
            env = dict(os.environ, PYTHONPATH=str(REPO))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).with_name("tp_peer.py")), str(server.port),
                stdout=asyncio.subprocess.PIPE, env=env,
            )
            try:
                assert (await asyncio.wait_for(proc.stdout.readline(), 15)).strip() == b"ready"  # type: ignore[union-attr]
                link = await asyncio.wait_for(links.get(), 5)
                first = np.zeros(4 * MiB, np.uint8)
                await asyncio.wait_for(link.recv_into(1, 0, first), 5)
                assert np.array_equal(first, np.tile(np.arange(256, dtype=np.uint8), 4 * MiB // 256))
                ops = [
                    asyncio.ensure_future(link.send(9, 0, np.ones(256 * MiB, np.uint8))),  # never received
                    asyncio.ensure_future(link.recv_into(1, 10**9, bytearray(4 * MiB))),  # never sent
                ]
                await wait_until(lambda: link.tx_bytes >= 8 * MiB)
                loop = asyncio.get_running_loop()
                start = loop.time()
                proc.send_signal(signal.SIGKILL)
                await assert_all_lost(ops, start)
                assert link.closed
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            assert proc.returncode == -signal.SIGKILL

    arun(main(), timeout=25)
