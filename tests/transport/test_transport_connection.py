"""Connections after the handshake: control messages, close, heartbeats, malformed frames (§2, §3)."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from tp_helpers import CONTROL, HDR, HOST, arun, conn_pair, raw_open
from transport.connection import Connection, open_connection
from transport.errors import InvalidUsageError, PeerLostError
from transport.frame import PROTOCOL_VERSION, FrameType, pack_header
from transport.message import message
from transport.server import start_server


@message("test.conn.note")
class Note:
    n: int
    text: str = ""
    blob: bytes = b""


def test_messages_flow_both_ways_in_order() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            for i in range(200):
                client.write_message(Note(i))
            await client.send_message(Note(200, "last"))
            received = [await remote.recv_message() for _ in range(201)]
            assert received == [Note(i) for i in range(200)] + [Note(200, "last")]
            await remote.send_message(Note(-1, "reply"))
            assert await client.recv_message() == Note(-1, "reply")

    arun(main())


def test_big_message_travels_compressed() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            big = Note(1, "x" * 3_000_000, bytes(1_000_000))
            before = client.tx_bytes
            await client.send_message(big)
            assert await remote.recv_message() == big
            assert client.tx_bytes - before < 100_000  # zstd squeezed 4 MB of repetition

    arun(main())


def test_invalid_message_is_refused_locally_and_connection_survives() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            with pytest.raises(InvalidUsageError):
                await client.send_message(Note("not an int"))  # type: ignore[arg-type]
            await client.send_message(Note(5))
            assert await remote.recv_message() == Note(5)

    arun(main())


def test_close_reason_reaches_the_peer_after_queued_messages() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            await client.send_message(Note(1))
            client.close("going home")
            assert await remote.recv_message() == Note(1)
            with pytest.raises(PeerLostError, match="going home"):
                await remote.recv_message()
            assert remote.closed
            with pytest.raises(PeerLostError, match="closed locally: going home"):
                await client.send_message(Note(2))
            await remote.wait_closed()

    arun(main())


def test_pending_receive_fails_promptly_when_peer_aborts() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(remote.recv_message())
            await asyncio.sleep(0)
            start = loop.time()
            client.abort("test kill")
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(pending, 1.0)
            assert loop.time() - start < 1.0

    arun(main())


def test_heartbeats_keep_last_received_fresh() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            loop = asyncio.get_running_loop()
            client.start_heartbeat(0.02)
            first = remote.last_received
            rx = remote.rx_bytes
            await asyncio.sleep(0.2)
            assert remote.last_received > first
            assert remote.rx_bytes - rx >= 48 * 3  # several HEARTBEAT frames, nothing else
            assert loop.time() - remote.last_received < 0.15

    arun(main())


def test_silent_peer_is_detected_by_heartbeat_timeout() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait) as server:
            raw = await raw_open(server.port)  # completes the handshake, then says nothing
            conn = await asyncio.wait_for(accepted.get(), 5)
            loop = asyncio.get_running_loop()
            start = loop.time()
            beat = asyncio.ensure_future(raw.recv())
            conn.start_heartbeat(0.05, timeout=0.3)
            with pytest.raises(PeerLostError, match="no data or heartbeat"):
                await asyncio.wait_for(conn.recv_message(), 3)
            assert 0.3 <= loop.time() - start < 1.5
            assert beat.done() and beat.result()[1] == FrameType.HEARTBEAT  # it did beat meanwhile
            raw.close()

    arun(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 48,  # bad magic
        HDR.pack(b"PC", PROTOCOL_VERSION, 6, 0, 0, 0, 0, 0, 0, 1 << 30),  # control payload over the limit
        HDR.pack(b"PC", PROTOCOL_VERSION, 1, 0, 0, 0, 0, 0, 0, 0),  # HELLO after the handshake
        HDR.pack(b"PC", PROTOCOL_VERSION, 7, 0, 0, 1, 0, 0, 4, 4) + b"data",  # DATA on a plain connection
        HDR.pack(b"PC", PROTOCOL_VERSION, 6, 0, 0, 0, 0, 0, 0, 3) + b"\xc1\xc1\xc1",  # not msgpack
    ],
    ids=["magic", "oversize", "hello-again", "data", "bad-msgpack"],
)
def test_malformed_frame_closes_only_that_connection(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait) as server:
            good = await open_connection(HOST, server.port, role="peer", peer_id="good")
            good_remote = await asyncio.wait_for(accepted.get(), 5)
            raw = await raw_open(server.port)
            bad_remote = await asyncio.wait_for(accepted.get(), 5)
            with caplog.at_level(logging.WARNING, logger="transport.connection"):
                raw.send_msg(CONTROL, "test.conn.note", {"n": 1})
                assert await bad_remote.recv_message() == Note(1)
                raw.writer.write(garbage)
                with pytest.raises(PeerLostError, match="protocol error"):
                    await asyncio.wait_for(bad_remote.recv_message(), 3)
                assert await asyncio.wait_for(raw.at_eof(), 3)
            assert any("protocol error" in r.getMessage() for r in caplog.records)
            # The server and the other client are unaffected.
            await good.send_message(Note(2))
            assert await good_remote.recv_message() == Note(2)
            await good_remote.send_message(Note(3))
            assert await good.recv_message() == Note(3)
            late = await open_connection(HOST, server.port, role="peer", peer_id="late")
            assert (await asyncio.wait_for(accepted.get(), 5)).peer_id == "late"
            raw.close()
            good.close()
            late.close()

    arun(main())


def test_control_message_with_unknown_name_is_a_protocol_error() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait) as server:
            raw = await raw_open(server.port)
            conn = await asyncio.wait_for(accepted.get(), 5)
            raw.send_msg(CONTROL, "test.conn.no-such-message", {})
            with pytest.raises(PeerLostError, match="unknown message type"):
                await asyncio.wait_for(conn.recv_message(), 3)
            raw.close()

    arun(main())


def test_server_close_closes_accepted_connections() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        server = await start_server(HOST, 0, accepted.put_nowait)
        client = await open_connection(HOST, server.port, role="peer", peer_id=1)
        await asyncio.wait_for(accepted.get(), 5)
        assert len(server.connections) == 1
        server.close()
        await server.wait_closed()
        with pytest.raises(PeerLostError, match="server closing"):
            await asyncio.wait_for(client.recv_message(), 3)
        await client.wait_closed()

    arun(main())


def test_write_after_close_raises() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, _remote):
            client.close()
            with pytest.raises(PeerLostError):
                client.write_frame(pack_header(FrameType.HEARTBEAT, 0))
            with pytest.raises(PeerLostError):
                await client.recv_message()

    arun(main())


def test_async_on_connection_callback_runs_as_task() -> None:
    async def main() -> None:
        seen: asyncio.Queue[object] = asyncio.Queue()

        async def on_connection(conn: Connection) -> None:
            msg = await conn.recv_message()
            await conn.send_message(Note(msg.n + 1))
            await seen.put(msg)

        async with await start_server(HOST, 0, on_connection) as server:
            client = await open_connection(HOST, server.port, role="peer", peer_id=1)
            await client.send_message(Note(41))
            assert await client.recv_message() == Note(42)
            assert await seen.get() == Note(41)
            client.close()

    arun(main())


def test_header_struct_matches_document() -> None:
    # The raw peer used above builds headers from docs/protocol.md §2.
    assert HDR.format == struct.Struct("<2sBBHHQQQQQ").format
    assert pack_header(FrameType.CONTROL, 3) == HDR.pack(b"PC", PROTOCOL_VERSION, 6, 0, 0, 0, 0, 0, 0, 3)
