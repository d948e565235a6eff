"""The event loop thread and blocking use of the transport through it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tp_helpers import HOST
from transport.connection import Connection, open_connection
from transport.errors import InvalidUsageError, PeerLostError
from transport.link import Link, connect_link
from transport.loop import LoopThread, new_event_loop
from transport.message import message
from transport.server import Server, start_server


@message("test.loop.echo")
class Echo:
    text: str


def test_new_event_loop_is_uvloop() -> None:
    import uvloop

    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_run_returns_results_and_reraises_exceptions() -> None:
    with LoopThread("test-loop") as lt:
        assert lt.run(asyncio.sleep(0, result=42)) == 42

        async def fail() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            lt.run(fail())

        async def where() -> str:
            return threading.current_thread().name

        assert lt.run(where()) == "test-loop"


def test_run_timeout_cancels_and_waits_for_the_coroutine() -> None:
    state: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a moment
            state.append("cleaned up")

    with LoopThread() as lt:
        with pytest.raises(TimeoutError):
            lt.run(slow(), timeout=0.1)
        assert state == ["cleaned up"]  # finished before run() returned


def test_run_passes_through_a_coroutines_own_timeout_error() -> None:
    async def inner_timeout() -> None:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    with LoopThread() as lt:
        with pytest.raises(TimeoutError):
            lt.run(inner_timeout(), timeout=5)


def test_submit_and_call_soon() -> None:
    with LoopThread() as lt:
        future = lt.submit(asyncio.sleep(0, result="x"))
        assert future.result(5) == "x"
        seen = threading.Event()
        names: list[str] = []

        def record(name: str) -> None:
            names.append(name + threading.current_thread().name)
            seen.set()

        lt.call_soon(record, "in ")
        assert seen.wait(5)
        assert names == ["in pccl-loop"]


def test_misuse_is_refused() -> None:
    lt = LoopThread()

    async def nested() -> None:
        lt.run(asyncio.sleep(0))

    with pytest.raises(InvalidUsageError, match="deadlock"):
        lt.run(nested())
    lt.stop()
    lt.stop()  # idempotent
    with pytest.raises(InvalidUsageError, match="after stop"):
        lt.run(asyncio.sleep(0))
    with pytest.raises(InvalidUsageError, match="after stop"):
        lt.submit(asyncio.sleep(0))
    with pytest.raises(InvalidUsageError, match="after stop"):
        lt.call_soon(print)


def test_stop_cancels_remaining_tasks_and_joins() -> None:
    lt = LoopThread()
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lt.submit(forever())
    lt.run(asyncio.sleep(0.01))
    lt.stop()
    assert cancelled.is_set()
    assert not lt._thread.is_alive() and lt.loop.is_closed()  # noqa: SLF001


def test_blocking_callers_can_drive_servers_connections_and_links() -> None:
    with LoopThread() as lt:
        links: list[Link] = []
        conns: list[Connection] = []
        server: Server = lt.run(start_server(HOST, 0, conns.append, on_link=links.append, secret=b"k"))
        conn = lt.run(open_connection(HOST, server.port, role="peer", peer_id=1, secret=b"k"), timeout=5)
        lt.run(conn.send_message(Echo("hi")), timeout=5)
        assert lt.run(conns[0].recv_message(), timeout=5) == Echo("hi")
        link = lt.run(connect_link(HOST, server.port, connections=3, peer_id=1, secret=b"k"), timeout=5)
        data = np.random.default_rng(0).integers(0, 256, 3_000_001, dtype=np.uint8)
        out = np.zeros_like(data)
        receive = lt.submit(links[0].recv_into(1, 0, out))
        lt.run(link.send(1, 0, data), timeout=10)
        receive.result(10)
        assert np.array_equal(out, data)
        lt.call_soon(link.abort)
        with pytest.raises(PeerLostError):
            lt.run(links[0].recv_into(2, 0, bytearray(1)), timeout=5)
        conn.close()
        server.close()
        lt.run(server.wait_closed(), timeout=5)
