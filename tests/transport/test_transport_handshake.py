"""Handshake and authentication over real loopback sockets (docs/protocol.md §1).

A raw client written from the protocol document (struct + msgpack + hmac, not
the library's handshake code) checks the server against the spec.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import msgpack
import pytest

from tp_helpers import ACCEPT, AUTH, CHALLENGE, HELLO, HOST, REJECT, RawPeer, arun, conn_pair, hello_fields
from transport.connection import Connection, open_connection
from transport.errors import AuthenticationError, PeerUnreachableError
from transport.frame import PROTOCOL_VERSION
from transport.server import start_server


def transcript(hello_payload: bytes, challenge: dict[str, object]) -> bytes:
    packed = msgpack.packb(["pccl handshake v2", hello_payload, challenge["nonce"], challenge["role"],
                            challenge["peer_id"], challenge["ephemeral"]], use_bin_type=True)
    return hashlib.sha256(packed).digest()


async def raw_authenticate(peer: RawPeer, secret: bytes) -> tuple[bytes, bytes]:
    """Run §1 with ``secret`` from the document; returns (hello payload, AUTH payload) sent."""
    hello = peer.send_msg(HELLO, "transport.hello", hello_fields(True))
    version, kind, (name, challenge) = await peer.recv()
    assert (version, kind, name) == (PROTOCOL_VERSION, CHALLENGE, "transport.challenge")
    assert challenge["ephemeral"] == b""  # no key exchange without encryption
    t = transcript(hello, challenge)
    assert hmac.compare_digest(challenge["proof"], hmac.new(secret, b"server" + t, hashlib.sha256).digest())
    auth = peer.send_msg(AUTH, "transport.auth", {"proof": hmac.new(secret, b"client" + t, hashlib.sha256).digest()})
    return hello, auth


def test_right_secret_connects_and_agrees_on_keys() -> None:
    async def main() -> None:
        async with conn_pair(secret=b"s3cret", peer_id="master-1", role="master") as (_srv, client, remote):
            assert remote.hello is not None and remote.hello.peer_id == 7 and remote.hello.role == "peer"
            assert remote.peer_id == 7 and client.peer_id == "master-1" and client.peer_role == "master"
            assert client.session_keys == remote.session_keys
            assert client.session_keys is not None
            keys = client.session_keys
            assert len(keys.client_to_server) == 32 and keys.client_to_server != keys.server_to_client

    arun(main())


def test_session_keys_differ_per_connection() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=b"k") as server:
            a = await open_connection(HOST, server.port, role="peer", peer_id=1, secret=b"k")
            b = await open_connection(HOST, server.port, role="peer", peer_id=1, secret=b"k")
            assert a.session_keys != b.session_keys
            a.close()
            b.close()

    arun(main())


async def _refused_then_server_still_serves(server_secret: bytes | None, client_secret: bytes | None,
                                            client_error: str, server_log: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    async with await start_server(HOST, 0, accepted.put_nowait, secret=server_secret) as server:
        with caplog.at_level(logging.WARNING, logger="transport.server"):
            with pytest.raises(AuthenticationError, match=client_error):
                await open_connection(HOST, server.port, role="peer", peer_id=1, secret=client_secret)
            good = await open_connection(HOST, server.port, role="peer", peer_id=2, secret=server_secret)
            conn = await asyncio.wait_for(accepted.get(), 5)
        assert conn.peer_id == 2 and accepted.empty()  # the refused one never reached the callback
        assert any(server_log in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        good.close()


def test_wrong_secret_refused_on_both_ends(caplog: pytest.LogCaptureFixture) -> None:
    arun(_refused_then_server_still_serves(b"right", b"wrong", "could not prove", "handshake with", caplog))


def test_missing_client_secret_refused(caplog: pytest.LogCaptureFixture) -> None:
    arun(_refused_then_server_still_serves(b"right", None, "requires a shared secret", "without the shared secret",
                                           caplog))


def test_missing_server_secret_refused(caplog: pytest.LogCaptureFixture) -> None:
    arun(_refused_then_server_still_serves(None, b"mine", "no shared secret configured", "does not have", caplog))


def test_raw_client_following_the_spec_is_accepted_and_replay_is_refused() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=b"k") as server:
            peer = await RawPeer.connect(server.port)
            hello, auth = await raw_authenticate(peer, b"k")
            assert (await peer.recv())[1] == ACCEPT
            conn = await asyncio.wait_for(accepted.get(), 5)
            assert conn.peer_id == "raw"
            # Replaying the captured HELLO and AUTH on a new connection must fail:
            # the server's fresh nonce changes the transcript.
            replay = await RawPeer.connect(server.port)
            replay.send(HELLO, hello)
            assert (await replay.recv())[1] == CHALLENGE
            replay.send(AUTH, auth)
            version, kind, (name, fields) = await replay.recv()
            assert kind == REJECT and fields["reason"] == "authentication failed"
            assert await replay.at_eof()
            assert accepted.empty()
            peer.close()
            replay.close()

    arun(main())


def test_version_mismatch_server_side_names_both_versions() -> None:
    async def main() -> None:
        async with await start_server(HOST, 0, lambda c: None) as server:
            peer = await RawPeer.connect(server.port)
            peer.send_msg(HELLO, "transport.hello", hello_fields(False, version=9), version=9)
            version, kind, (name, fields) = await peer.recv()
            assert (version, kind) == (PROTOCOL_VERSION, REJECT)
            assert "client speaks 9" in fields["reason"] and f"server speaks {PROTOCOL_VERSION}" in fields["reason"]
            assert await peer.at_eof()
            peer.close()

    arun(main())


def test_version_mismatch_client_side_names_both_versions() -> None:
    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        await peer.recv()
        peer.send_msg(REJECT, "transport.reject", {"reason": "upgrade", "version": 9}, version=9)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(fake_server, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(AuthenticationError, match=f"we speak {PROTOCOL_VERSION}, the server speaks 9"):
            await open_connection(HOST, port, role="peer", peer_id=1)
        server.close()
        await server.wait_closed()

    arun(main())


def test_stalled_handshakes_are_dropped_and_do_not_block_others() -> None:
    async def main() -> None:
        async with await start_server(HOST, 0, lambda c: None, handshake_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            stalled = [await RawPeer.connect(server.port) for _ in range(20)]
            stalled[0].writer.write(b"PC\x01")  # a partial header does not help either
            start = loop.time()
            good = await open_connection(HOST, server.port, role="peer", peer_id=1)
            assert loop.time() - start < 0.3  # served while the others stall
            for peer in stalled:
                assert await asyncio.wait_for(peer.at_eof(), 3)
                peer.close()
            assert loop.time() - start < 3
            assert not good.closed
            good.close()

    arun(main())


def test_garbage_instead_of_hello_closes_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait) as server:
            with caplog.at_level(logging.WARNING):
                peer = await RawPeer.connect(server.port)
                peer.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 40)
                assert await asyncio.wait_for(peer.at_eof(), 3)
                peer.close()
            assert any("protocol error" in r.getMessage() for r in caplog.records)
            good = await open_connection(HOST, server.port, role="peer", peer_id=1)
            assert (await asyncio.wait_for(accepted.get(), 5)).peer_id == 1
            good.close()

    arun(main())


def test_unreachable_server_raises_peer_unreachable() -> None:
    async def main() -> None:
        server = await start_server(HOST, 0, lambda c: None)
        port = server.port
        server.close()
        await server.wait_closed()
        with pytest.raises(PeerUnreachableError, match="cannot connect"):
            await open_connection(HOST, port, role="peer", peer_id=1, timeout=2)

    arun(main())
