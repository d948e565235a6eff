"""With a secret, frames from a party that has not authenticated are never processed.

Checked on the three endpoints a stranger can reach (``docs/security.md``): the
master, a peer's p2p link server, and the shared-state endpoint behind it. A raw
client written from ``docs/protocol.md`` (struct + msgpack) sends well-formed frames
that a handler would act on — a ``pccl.register``, DATA, a ``pccl.share_request`` —
before or instead of authenticating; each time the connection closes and the
handler behind the endpoint never sees anything. Positive controls show the same
endpoint does act on those frames from an authenticated party.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgpack
import pytest
import torch

from pccl import protocol as P
from pccl.master import Master
from pccl.ring_links import RING_ROLE, RingLinks
from pccl.shared_state import SharedState, SyncStrategy, byte_view
from pccl.shared_state_sync import SHARE_ROLE, ShareReply, ShareRequest, ShareServer
from transport.errors import AuthenticationError
from transport.link import Link, connect_link
from transport.loop import new_event_loop
from transport.message import encode
from transport.frame import PROTOCOL_VERSION

T = TypeVar("T")
HOST = "127.0.0.1"
SECRET = b"run secret"
HDR = struct.Struct("<2sBBHHQQQQQ")
HELLO, CHALLENGE, AUTH, ACCEPT, REJECT, CONTROL, DATA = 1, 2, 3, 4, 5, 6, 7


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run ``coro`` on a fresh event loop in this thread."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


class Stranger:
    """A raw protocol speaker that may skip or fake authentication."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Stranger:
        return cls(*await asyncio.open_connection(HOST, port))

    def frame(self, kind: int, payload: bytes = b"", tag: int = 0, total: int = 0) -> None:
        self.writer.write(HDR.pack(b"PC", PROTOCOL_VERSION, kind, 0, 0, tag, 0, 0, total, len(payload)) + payload)

    def msg(self, kind: int, name: str, fields: dict[str, Any]) -> None:
        self.frame(kind, msgpack.packb([name, fields], use_bin_type=True))

    def hello(self, role: str, peer_id: Any, *, auth: bool = True, link: bool = False) -> None:
        fields: dict[str, Any] = {"version": PROTOCOL_VERSION, "role": role, "peer_id": peer_id,
                                  "nonce": os.urandom(32), "auth": auth}
        if link:
            fields.update(link_id=12345, index=0, pool_size=1)
        self.msg(HELLO, "transport.hello", fields)

    async def frames_until_closed(self, timeout: float = 10) -> list[int]:
        """Types of the frames received until the server closed the connection (it must)."""
        kinds = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    header = await self.reader.readexactly(HDR.size)
                    kinds.append(header[3])
                    await self.reader.readexactly(HDR.unpack(header)[-1])
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        self.writer.close()
        return kinds


async def attacks(port: int, role: str, peer_id: Any, bait: list[tuple[int, bytes, int]], link: bool) -> None:
    """Every way of sending ``bait`` frames without a valid proof; each connection must close."""

    def send_bait(s: Stranger) -> None:
        for kind, payload, total in bait:
            s.frame(kind, payload, total=total)

    # 1. The bait instead of a hello.
    s = await Stranger.connect(port)
    send_bait(s)
    assert await s.frames_until_closed() == []
    # 2. A hello claiming a secret, then the bait instead of AUTH.
    s = await Stranger.connect(port)
    s.hello(role, peer_id, link=link)
    send_bait(s)
    assert await s.frames_until_closed() in ([], [CHALLENGE])
    # 3. A wrong proof with the bait pipelined behind it.
    s = await Stranger.connect(port)
    s.hello(role, peer_id, link=link)
    header = await s.reader.readexactly(HDR.size)
    assert header[3] == CHALLENGE
    await s.reader.readexactly(HDR.unpack(header)[-1])
    s.msg(AUTH, "transport.auth", {"proof": os.urandom(32)})
    send_bait(s)
    assert set(await s.frames_until_closed()) <= {REJECT}
    # 4. A hello without a secret, then the bait.
    s = await Stranger.connect(port)
    s.hello(role, peer_id, auth=False, link=link)
    send_bait(s)
    assert set(await s.frames_until_closed()) <= {REJECT}
    # 5. The real client with the wrong secret.
    with pytest.raises(AuthenticationError):
        await connect_link(HOST, port, connections=1, peer_id=peer_id, secret=b"guess", role=role, timeout=5)


def test_master_processes_nothing_from_an_unauthenticated_party() -> None:
    register = encode(P.Register(0, 4242, None))
    with Master(HOST, 0, secret=SECRET, heartbeat_timeout=5.0) as master:
        server = master._server  # noqa: SLF001 - observe what reaches the state machine
        assert server is not None
        seen: list[Any] = []
        real_handle = server.state.handle

        def handle(now: float, event: Any) -> Any:
            if type(event).__name__ != "Tick":
                seen.append(event)
            return real_handle(now, event)

        server.state.handle = handle  # type: ignore[method-assign]
        run(attacks(master.port, "peer", None, [(CONTROL, register, 0)], link=False))
        assert seen == []
        status = master.status()
        assert status["accepted"] == [] and status["pending"] == [] and status["kicks"] == {}

        async def authenticated() -> None:  # the positive control: the same frame, after a proof
            from transport.connection import open_connection

            conn = await open_connection(HOST, master.port, role="peer", peer_id=None, secret=SECRET)
            conn.write_frame(HDR.pack(b"PC", PROTOCOL_VERSION, CONTROL, 0, 0, 0, 0, 0, 0, len(register)), register)
            assert isinstance(await conn.recv_message(), P.Welcome)
            conn.close()
            await conn.wait_closed()

        run(authenticated())
        assert [type(e).__name__ for e in seen][:1] == ["RegisterRequest"]


async def _p2p_endpoint(share: ShareServer | None) -> tuple[RingLinks, list[Link]]:
    links = RingLinks(connections=1, secret=SECRET, congestion=None)
    links.peer_id = 1
    await links.start(HOST)
    handled: list[Link] = []
    if share is not None:
        def on_share(link: Link) -> None:
            handled.append(link)
            share.on_link(link)

        links.handlers[SHARE_ROLE] = on_share
    return links, handled


def test_p2p_link_server_processes_nothing_from_an_unauthenticated_party() -> None:
    async def main() -> None:
        links, _ = await _p2p_endpoint(None)
        try:
            data = os.urandom(64)
            bait = [(DATA, data, len(data)), (CONTROL, encode(P.Leave()), 0)]
            await attacks(links.port, RING_ROLE, 2, bait, link=True)
            assert links.inbound == {}
            # Positive control: an authenticated neighbour's link arrives and carries data.
            link = await connect_link(HOST, links.port, connections=1, peer_id=2, secret=SECRET, role=RING_ROLE)
            inbound = await asyncio.wait_for(links.wait_inbound(2), 5)
            got = bytearray(64)
            await asyncio.gather(link.send(1, 0, data), inbound.recv_into(1, 0, got))
            assert got == data
            link.close()
        finally:
            await links.close()

    run(main())


def test_shared_state_endpoint_serves_and_takes_nothing_before_authentication() -> None:
    weights = torch.arange(1000, dtype=torch.float32)
    state = SharedState({"w": weights}, revision=3)
    before = bytes(byte_view(weights))

    async def main() -> None:
        share = ShareServer(state, SyncStrategy.ENFORCE_POPULAR)
        share.planned(1, [])
        links, handled = await _p2p_endpoint(share)
        try:
            request = encode(ShareRequest(1, 9, ["w"]))
            bait = [(CONTROL, request, 0), (DATA, bytes(4000), 4000)]
            await attacks(links.port, SHARE_ROLE, 2, bait, link=True)
            assert handled == [] and share.tx_bytes == 0
            # Positive control: with the secret, the same request is answered with the entry.
            link = await connect_link(HOST, links.port, connections=1, peer_id=2, secret=SECRET, role=SHARE_ROLE)
            got = bytearray(len(before))
            recv = asyncio.ensure_future(link.recv_into(9, 0, got))
            await link.send_message(ShareRequest(1, 9, ["w"]))
            assert await link.recv_message() == ShareReply(9, True, "")
            await asyncio.wait_for(recv, 5)
            assert bytes(got) == before and len(handled) == 1
            link.close()
            await share.close()
        finally:
            await links.close()

    run(main())
    assert bytes(byte_view(weights)) == before and state.revision == 3
