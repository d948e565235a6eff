"""Encrypted connections and links over real loopback TCP (docs/protocol.md §1, §2.1).

A relay between client and server records the client's bytes and, knowing the
frame layout from the document (plaintext HELLO and AUTH, then header ‖ tag ‖
sealed records), can flip one chosen byte of one chosen frame.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tp_helpers import ACCEPT, AUTH, CHALLENGE, HDR, HELLO, HOST, REJECT, RawPeer, arun, hello_fields
from transport.connection import Connection, open_connection
from transport.crypto import COUNTER_LIMIT
from transport.errors import AuthenticationError, InvalidUsageError, PeerLostError
from transport.link import Link, LinkReady, connect_link
from transport.frame import PROTOCOL_VERSION
from transport.server import start_server

SECRET = b"correct horse battery staple"
RECORD, TAG, DATA = 256 * 1024, 16, 7


def sealed_length(length: int) -> int:
    return length + TAG * -(-length // RECORD)


class FrameCutter:
    """Splits the client→server byte stream into whole frames, as §1/§2.1 lay them out."""

    def __init__(self, encrypted: bool) -> None:
        self.encrypted = encrypted
        self.sealed = False  # frames after the client's AUTH are sealed
        self.buf = bytearray()

    def frames(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every complete (frame type, frame bytes) now available."""
        self.buf += data
        out = []
        while len(self.buf) >= HDR.size:
            *_x, length = HDR.unpack_from(self.buf)
            kind = self.buf[3]
            size = HDR.size + TAG + sealed_length(length) if self.sealed else HDR.size + length
            if len(self.buf) < size:
                break
            out.append((kind, bytes(self.buf[:size])))
            del self.buf[:size]
            if kind == AUTH and self.encrypted:
                self.sealed = True
        return out


Mutate = Callable[[int, int, bytes], bytes]  # (frame index, frame type, frame) -> bytes to forward


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``target``; records and may alter client→server frames."""

    def __init__(self, target: int, *, encrypted: bool, mutate: Mutate | None = None) -> None:
        self.target, self.encrypted, self.mutate = target, encrypted, mutate
        self.upstream: list[bytes] = []  # every client→server frame as received from the client
        self.wire = bytearray()  # every byte of both directions, as relayed
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        tasks = [asyncio.ensure_future(self._up(reader, up_writer)),
                 asyncio.ensure_future(self._pipe(up_reader, writer))]
        self.tasks.update(tasks)
        await asyncio.wait(tasks)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cutter = FrameCutter(self.encrypted)
        try:
            while data := await reader.read(1 << 20):
                for kind, frame in cutter.frames(data):
                    index = len(self.upstream)
                    self.upstream.append(frame)
                    out = self.mutate(index, kind, frame) if self.mutate else frame
                    self.wire += out
                    writer.write(out)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 20):
                self.wire += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@asynccontextmanager
async def encrypted_links(
    connections: int = 2, *, relay: bool = False, mutate: Mutate | None = None, encrypt: bool = True
) -> AsyncIterator[tuple[Link, Link, Relay | None]]:
    """(client link, server link, relay or None) with ``secret`` and ``encrypt``; all closed afterwards."""
    accepted: asyncio.Queue[Link] = asyncio.Queue()
    server = await start_server(HOST, 0, None, on_link=accepted.put_nowait, secret=SECRET, encrypt=encrypt)
    proxy = await Relay(server.port, encrypted=encrypt, mutate=mutate).start() if relay else None
    try:
        client = await connect_link(HOST, proxy.port if proxy else server.port, connections=connections,
                                    peer_id="c", secret=SECRET, encrypt=encrypt, timeout=5)
        remote = await asyncio.wait_for(accepted.get(), 5)
        try:
            yield client, remote, proxy
        finally:
            client.close()
            remote.close()
            await client.wait_closed()
            await remote.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
        if proxy is not None:
            await proxy.close()


def test_encrypted_links_carry_transfers_and_messages_both_ways() -> None:
    async def main() -> None:
        async with encrypted_links(connections=3) as (client, remote, _relay):
            assert all(c.encrypted for c in client.connections + remote.connections)
            for seq, n in enumerate([0, 1, 1000, RECORD, RECORD + 7, 5 * 1024 * 1024 + 3]):
                data, back = os.urandom(n), os.urandom(n)
                got, got_back = bytearray(n), bytearray(n)
                await asyncio.gather(client.send(1, seq, data), remote.recv_into(1, seq, got),
                                     remote.send(2, seq, back), client.recv_into(2, seq, got_back))
                assert got == data and got_back == back
            await client.send_message(LinkReady(123))
            await remote.send_message(LinkReady(456))
            assert await remote.recv_message() == LinkReady(123)
            assert await client.recv_message() == LinkReady(456)
            wire = sum(c.tx_bytes for c in client.connections)
            assert wire > client.tx_bytes  # header tags and record tags travel too

    arun(main(), timeout=60)


MARKER = b"PLAINTEXT-MARKER-0123456789"


@pytest.mark.parametrize("encrypt", [False, True])
def test_only_ciphertext_is_on_the_wire(encrypt: bool) -> None:
    async def main() -> None:
        async with encrypted_links(connections=1, relay=True, encrypt=encrypt) as (client, remote, relay):
            assert relay is not None
            data = MARKER * (RECORD // len(MARKER) * 3)
            got = bytearray(len(data))
            await asyncio.gather(client.send(1, 0, data), remote.recv_into(1, 0, got))
            await remote.send_message(LinkReady(int.from_bytes(MARKER[:8], "little")))
            await client.recv_message()
            assert got == data
            # The plain run is the control: the relay does see the marker when nothing encrypts.
            assert (MARKER in relay.wire) is (not encrypt)
            assert (MARKER[:8] in relay.wire) is (not encrypt)

    arun(main())


@pytest.mark.parametrize("server_encrypts", [True, False])
def test_encrypt_settings_that_differ_fail_the_handshake_by_name(
    server_encrypts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        accepted: list[Connection] = []
        async with await start_server(HOST, 0, accepted.append, secret=SECRET, encrypt=server_encrypts) as server:
            with caplog.at_level(logging.WARNING, logger="transport.server"):
                with pytest.raises(AuthenticationError, match="encrypt") as err:
                    await open_connection(HOST, server.port, role="peer", peer_id=1, secret=SECRET,
                                          encrypt=not server_encrypts)
            assert ("this server encrypts" in str(err.value)) is server_encrypts
            assert "both ends must set encrypt alike" in str(err.value)
            assert any("encrypt=" in r.getMessage() for r in caplog.records)
            good = await open_connection(HOST, server.port, role="peer", peer_id=2, secret=SECRET,
                                         encrypt=server_encrypts)
            assert good.encrypted is server_encrypts
            good.close()
        assert [c.peer_id for c in accepted] == [2]

    arun(main())


def test_encrypt_without_a_secret_is_invalid_usage() -> None:
    async def main() -> None:
        with pytest.raises(InvalidUsageError, match="needs a shared secret"):
            await start_server(HOST, 0, lambda c: None, encrypt=True)
        with pytest.raises(InvalidUsageError, match="needs a shared secret"):
            await open_connection(HOST, 1, role="peer", peer_id=1, encrypt=True)
        with pytest.raises(InvalidUsageError, match="needs a shared secret"):
            await connect_link(HOST, 1, peer_id=1, encrypt=True)

    arun(main())


def flip(offset: Callable[[bytes], int]) -> Mutate:
    """Flip one byte of the first DATA frame, at ``offset(frame)``."""
    done: list[int] = []

    def mutate(index: int, kind: int, frame: bytes) -> bytes:
        if kind != DATA or done:
            return frame
        done.append(index)
        out = bytearray(frame)
        out[offset(frame)] ^= 0x20
        return bytes(out)

    return mutate


WHERE = {
    "header-tag-field": lambda f: 8,
    "header-length-field": lambda f: 40,
    "header-tag": lambda f: 48 + 5,
    "payload": lambda f: 64 + 1000,
    "second-record": lambda f: 64 + RECORD + TAG + 3,
    "record-tag": lambda f: 64 + RECORD + 2,
    "last-tag": lambda f: len(f) - 1,
}


@pytest.mark.parametrize("where", sorted(WHERE))
def test_a_tampered_byte_drops_the_connection_and_fails_the_transfer(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with encrypted_links(connections=1, relay=True, mutate=flip(WHERE[where])) as (client, remote, _r):
            n = 2 * RECORD + 100
            data = os.urandom(n)
            got = bytearray(n)
            back = bytearray(8)
            with caplog.at_level(logging.WARNING, logger="transport.connection"):
                recv = asyncio.ensure_future(remote.recv_into(1, 0, got))
                client_recv = asyncio.ensure_future(client.recv_into(2, 0, back))
                await client.send(1, 0, data)
                with pytest.raises(PeerLostError):
                    await asyncio.wait_for(recv, 5)  # never a silently corrupted buffer
                with pytest.raises(PeerLostError):  # the sender's side sees the drop too
                    await asyncio.wait_for(client_recv, 5)
            assert remote.closed and client.closed
            assert any("failed authentication" in r.getMessage() for r in caplog.records)

    arun(main())


def test_a_tampered_control_message_is_never_delivered() -> None:
    def mutate(index: int, kind: int, frame: bytes) -> bytes:
        if kind != 6:  # the first CONTROL frame comes after the handshake
            return frame
        return frame[:-1] + bytes([frame[-1] ^ 1])

    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=SECRET, encrypt=True) as server:
            relay = await Relay(server.port, encrypted=True, mutate=mutate).start()
            client = await open_connection(HOST, relay.port, role="peer", peer_id=1, secret=SECRET, encrypt=True)
            remote = await asyncio.wait_for(accepted.get(), 5)
            client.write_message(LinkReady(1))
            with pytest.raises(PeerLostError, match="failed authentication"):
                await asyncio.wait_for(remote.recv_message(), 5)
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(client.recv_message(), 5)
            client.close()
            await relay.close()

    arun(main())


def test_replayed_sessions_and_spliced_frames_are_refused() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=SECRET, encrypt=True) as server:
            relay = await Relay(server.port, encrypted=True).start()
            first = await open_connection(HOST, relay.port, role="peer", peer_id=1, secret=SECRET, encrypt=True)
            first_remote = await asyncio.wait_for(accepted.get(), 5)
            await first.send_message(LinkReady(7))
            assert await first_remote.recv_message() == LinkReady(7)
            recorded = list(relay.upstream)  # HELLO, AUTH, the sealed CONTROL frame
            assert [f[3] for f in recorded] == [HELLO, AUTH, 6]
            # 1. Replaying the whole recorded session: the server's fresh nonce changes the transcript.
            replay = await RawPeer.connect(server.port)
            replay.writer.write(recorded[0])
            assert (await replay.recv())[1] == CHALLENGE
            replay.writer.write(recorded[1])
            _version, kind, (_name, fields) = await replay.recv()
            assert kind == REJECT and fields["reason"] == "authentication failed"
            assert await asyncio.wait_for(replay.at_eof(), 5)
            replay.close()
            # 2. Splicing a sealed frame of the first session into a second, authenticated one:
            # its keys differ, so the frame fails authentication and the connection drops.
            second = await open_connection(HOST, server.port, role="peer", peer_id=2, secret=SECRET, encrypt=True)
            second_remote = await asyncio.wait_for(accepted.get(), 5)
            assert second.session_keys != first.session_keys
            assert second._transport is not None  # noqa: SLF001 - write raw bytes on it
            second._transport.write(recorded[2])  # noqa: SLF001
            with pytest.raises(PeerLostError, match="failed authentication"):
                await asyncio.wait_for(second_remote.recv_message(), 5)
            assert accepted.empty()  # neither attempt produced a connection
            for conn in (first, second):
                conn.close()
            await relay.close()

    arun(main())


def test_a_connection_whose_nonces_run_out_closes_instead_of_reusing_one() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=SECRET, encrypt=True) as server:
            client = await open_connection(HOST, server.port, role="peer", peer_id=1, secret=SECRET, encrypt=True)
            remote = await asyncio.wait_for(accepted.get(), 5)
            sealer = client._sealer  # noqa: SLF001 - jump to the end of the nonce space
            assert sealer is not None
            sealer.counter = COUNTER_LIMIT - 1
            with pytest.raises(PeerLostError, match="nonce counter"):
                client.write_message(LinkReady(1))
            assert client.closed and sealer.counter == COUNTER_LIMIT - 1
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(remote.recv_message(), 5)

    arun(main())


def test_heartbeats_and_close_reasons_travel_sealed() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()
        async with await start_server(HOST, 0, accepted.put_nowait, secret=SECRET, encrypt=True) as server:
            client = await open_connection(HOST, server.port, role="peer", peer_id=1, secret=SECRET, encrypt=True)
            remote = await asyncio.wait_for(accepted.get(), 5)
            before = remote.rx_bytes
            client.start_heartbeat(0.01)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while remote.rx_bytes < before + 3 * 64 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert remote.rx_bytes >= before + 3 * 64 and not remote.closed  # 48-byte header + 16-byte tag each
            client.close("done with it")
            with pytest.raises(PeerLostError, match="done with it"):
                await asyncio.wait_for(remote.recv_message(), 5)

    arun(main())



def test_a_client_written_from_the_document_talks_to_an_encrypting_server() -> None:
    """Keys from X25519 and HKDF as §1 defines them, frames as §2.1 lays them out, both directions."""

    def nonce(i: int) -> bytes:
        return i.to_bytes(12, "little")

    async def main() -> None:
        accepted: asyncio.Queue[Connection] = asyncio.Queue()

        def on_connection(conn: Connection) -> None:
            conn.write_message(LinkReady(99))  # sealed right behind ACCEPT
            accepted.put_nowait(conn)

        async with await start_server(HOST, 0, on_connection, secret=SECRET, encrypt=True) as server:
            peer = await RawPeer.connect(server.port)
            ours_dh = X25519PrivateKey.generate()
            fields = hello_fields(True) | {"encrypt": True, "ephemeral": ours_dh.public_key().public_bytes_raw()}
            hello = peer.send_msg(HELLO, "transport.hello", fields)
            _v, kind, (_n, challenge) = await peer.recv()
            assert kind == CHALLENGE and len(challenge["ephemeral"]) == 32
            t = hashlib.sha256(msgpack.packb(["pccl handshake v2", hello, challenge["nonce"], challenge["role"],
                                              challenge["peer_id"], challenge["ephemeral"]],
                                             use_bin_type=True)).digest()
            assert hmac.compare_digest(challenge["proof"], hmac.new(SECRET, b"server" + t, hashlib.sha256).digest())
            peer.send_msg(AUTH, "transport.auth", {"proof": hmac.new(SECRET, b"client" + t, hashlib.sha256).digest()})
            assert (await peer.recv())[1] == ACCEPT
            shared = ours_dh.exchange(X25519PublicKey.from_public_bytes(challenge["ephemeral"]))
            okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=fields["nonce"] + challenge["nonce"],
                       info=b"pccl session keys v2" + t).derive(SECRET + shared)
            c2s, s2c = AESGCM(okm[:32]), AESGCM(okm[32:])
            # What a member who holds the secret and recorded every handshake byte could derive:
            # without one side's ephemeral private key, not the session keys (forward secrecy).
            recorded = HKDF(algorithm=hashes.SHA256(), length=64, salt=fields["nonce"] + challenge["nonce"],
                            info=b"pccl session keys v2" + t).derive(SECRET)
            # The server's first sealed frame: header ‖ tag, then one record.
            header = await peer.reader.readexactly(HDR.size)
            header_tag = await peer.reader.readexactly(TAG)
            with pytest.raises(InvalidTag):
                AESGCM(recorded[32:]).decrypt(nonce(0), header_tag, header)
            s2c.decrypt(nonce(0), header_tag, header)
            length = HDR.unpack(header)[-1]
            assert header[3] == 6 and 0 < length < RECORD
            plain = s2c.decrypt(nonce(1), await peer.reader.readexactly(length + TAG), header)
            assert msgpack.unpackb(plain) == ["transport.link_ready", {"link_id": 99}]
            # And a sealed frame of ours reaches the server's inbox.
            payload = msgpack.packb(["transport.link_ready", {"link_id": 5}], use_bin_type=True)
            ours = HDR.pack(b"PC", PROTOCOL_VERSION, 6, 0, 0, 0, 0, 0, 0, len(payload))
            peer.writer.write(ours + c2s.encrypt(nonce(0), b"", ours) + c2s.encrypt(nonce(1), payload, ours))
            conn = await asyncio.wait_for(accepted.get(), 5)
            assert conn.encrypted and await asyncio.wait_for(conn.recv_message(), 5) == LinkReady(5)
            peer.close()

    arun(main())


@pytest.mark.parametrize("ephemeral", [b"", bytes(32)], ids=["missing", "low-order-point"])
def test_an_encrypting_client_without_a_usable_ephemeral_key_is_refused(
    ephemeral: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that knows the secret but sends no X25519 key (or the all-zero point, which
    would make the exchange's result known to anyone) never gets an encrypted connection."""

    async def main() -> None:
        accepted: list[Connection] = []
        async with await start_server(HOST, 0, accepted.append, secret=SECRET, encrypt=True) as server:
            with caplog.at_level(logging.WARNING, logger="transport.server"):
                peer = await RawPeer.connect(server.port)
                fields = hello_fields(True) | {"encrypt": True, "ephemeral": ephemeral}
                hello = peer.send_msg(HELLO, "transport.hello", fields)
                if ephemeral:  # a well-formed hello: the server answers, then refuses the key
                    _v, kind, (_n, challenge) = await peer.recv()
                    assert kind == CHALLENGE
                    t = hashlib.sha256(msgpack.packb(
                        ["pccl handshake v2", hello, challenge["nonce"], challenge["role"], challenge["peer_id"],
                         challenge["ephemeral"]], use_bin_type=True)).digest()
                    peer.send_msg(AUTH, "transport.auth",
                                  {"proof": hmac.new(SECRET, b"client" + t, hashlib.sha256).digest()})
                assert await asyncio.wait_for(peer.reader.read(), 5) == b""  # closed without ACCEPT
                peer.close()
            assert any("ephemeral" in r.getMessage() for r in caplog.records)
            good = await open_connection(HOST, server.port, role="peer", peer_id=2, secret=SECRET, encrypt=True)
            assert good.encrypted
            good.close()
        assert [c.peer_id for c in accepted] == [2]

    arun(main())
