"""Helpers shared by the transport tests: run a coroutine on a fresh loop, servers and links."""

from __future__ import annotations

import asyncio
import os
import struct
import warnings
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgpack

from transport.connection import Connection, open_connection
from transport.link import Link, connect_link
from transport.loop import new_event_loop
from transport.server import Server, start_server
from transport.frame import PROTOCOL_VERSION

T = TypeVar("T")
HOST = "127.0.0.1"


def arun(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run ``coro`` on a fresh event loop (uvloop) with a hard timeout; close everything after.

    A passing test that leaves sockets or servers open fails here.
    """
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
    except BaseException:
        _close(loop)
        raise
    leaks = _close(loop)
    if leaks:
        raise AssertionError(f"test left resources open: {leaks}")
    return result


def _close(loop: asyncio.AbstractEventLoop) -> list[str]:
    loop.run_until_complete(_cancel_leftovers())
    loop.run_until_complete(loop.shutdown_asyncgens())
    # uvloop hangs in close() if its "unclosed resource" warning is raised as an
    # error (filterwarnings = error): record such warnings instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        loop.close()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def _cancel_leftovers() -> None:
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@asynccontextmanager
async def link_pair(connections: int = 4, **server_options: Any) -> AsyncIterator[tuple[Link, Link]]:
    """A connected (client link, server link) pair over loopback; both closed afterwards."""
    accepted: asyncio.Queue[Link] = asyncio.Queue()
    server = await start_server(HOST, 0, None, on_link=accepted.put_nowait, **server_options)
    try:
        secret = server_options.get("secret")
        client = await connect_link(HOST, server.port, connections=connections, peer_id="client",
                                    secret=secret, timeout=5.0)
        remote = await asyncio.wait_for(accepted.get(), 5.0)
        try:
            yield client, remote
        finally:
            client.close()
            remote.close()
            await client.wait_closed()
            await remote.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def conn_pair(**server_options: Any) -> AsyncIterator[tuple[Server, Connection, Connection]]:
    """(server, client connection, accepted connection) over loopback; all closed afterwards."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    server = await start_server(HOST, 0, accepted.put_nowait, **server_options)
    try:
        client = await open_connection(HOST, server.port, role="peer", peer_id=7,
                                       secret=server_options.get("secret"), timeout=5.0)
        remote = await asyncio.wait_for(accepted.get(), 5.0)
        try:
            yield server, client, remote
        finally:
            client.close()
            await client.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


HDR = struct.Struct("<2sBBHHQQQQQ")
HELLO, CHALLENGE, AUTH, ACCEPT, REJECT, CONTROL = 1, 2, 3, 4, 5, 6


class RawPeer:
    """A protocol speaker built from the document, on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(*await asyncio.open_connection(HOST, port))

    def send(self, frame_type: int, payload: bytes, version: int = PROTOCOL_VERSION) -> None:
        self.writer.write(HDR.pack(b"PC", version, frame_type, 0, 0, 0, 0, 0, 0, len(payload)) + payload)

    def send_msg(self, frame_type: int, name: str, fields: dict[str, object], version: int = PROTOCOL_VERSION) -> bytes:
        payload = msgpack.packb([name, fields], use_bin_type=True)
        self.send(frame_type, payload, version)
        return payload

    async def recv(self) -> tuple[int, int, Any]:
        """(version, type, decoded payload) of the next frame."""
        header = await self.reader.readexactly(HDR.size)
        magic, version, frame_type, *_rest, length = HDR.unpack(header)
        assert magic == b"PC"
        payload = await self.reader.readexactly(length)
        return version, frame_type, msgpack.unpackb(payload) if payload else None

    async def at_eof(self) -> bool:
        """True if the server closed the stream (after draining what it sent)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def hello_fields(auth: bool, version: int = PROTOCOL_VERSION) -> dict[str, object]:
    return {"version": version, "role": "peer", "peer_id": "raw", "nonce": os.urandom(32), "auth": auth}


async def raw_open(port: int) -> RawPeer:
    """A raw peer that completed the handshake without a secret, by the document."""
    peer = await RawPeer.connect(port)
    peer.send_msg(HELLO, "transport.hello", hello_fields(False))
    assert (await peer.recv())[1] == CHALLENGE
    peer.send_msg(AUTH, "transport.auth", {"proof": b""})
    assert (await peer.recv())[1] == ACCEPT
    return peer
