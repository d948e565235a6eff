"""One TCP connection after the handshake: frames in and out, control messages, heartbeats.

Receiving goes through an ``asyncio.BufferedProtocol`` driving a
:class:`~transport.reader.FrameReader`, so DATA payloads land straight in their
destination buffers (``docs/protocol.md`` §2, §4). Sending writes header and
payload as one ``writelines`` call with write-buffer limits of zero, so a send
that returned means the kernel holds the bytes (DESIGN §5, trap 1). An encrypting
connection seals every frame after the handshake with AES-GCM (§2.1,
:mod:`transport.crypto`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from transport.crypto import Opener, Sealer, session_ciphers
from transport.errors import AuthenticationError, PeerLostError, PeerUnreachableError, ProtocolError
from transport.frame import (
    HANDSHAKE_TYPES, MAX_HANDSHAKE_PAYLOAD, PROTOCOL_VERSION, FrameFlags, FrameHeader, FrameType, pack_header,
)
from transport.handshake import Hello, HandshakeResult, PeerId, SessionKeys, check_encrypt, client_handshake
from transport.inbox import Inbox
from transport.loop import on_loop
from transport.message import Message, decode, encode_payload
from transport.reader import FrameReader
from transport.sockopt import connect_socket, peer_gone, reset_on_close, tune

if TYPE_CHECKING:
    from transport.server import Server

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
#: A graceful close() waits this long for queued bytes to flush, then aborts.
CLOSE_GRACE = 5.0
#: ABORT_TAG notices a link connection keeps until its Link is built (more: a protocol error).
MAX_EARLY_ABORTS = 64
#: While reading is paused, the socket's TCP state is checked this often (s).
PAUSED_PROBE_INTERVAL = 0.1

CloseCallback = Callable[["Connection", PeerLostError], None]
_OPEN_TYPES = frozenset({FrameType.CONTROL, FrameType.DATA, FrameType.HEARTBEAT, FrameType.CLOSE, FrameType.ABORT_TAG})


class DataSink(Protocol):
    """Receives the DATA and ABORT_TAG frames of a connection (a :class:`~transport.link.Link` is one)."""

    def data_begin(self, conn: Connection, header: FrameHeader) -> memoryview | None:
        """Destination of exactly ``header.length`` bytes, or None to discard them."""

    def data_end(self, conn: Connection, header: FrameHeader) -> bool:
        """The frame is complete; return False to pause reading on ``conn`` until resumed."""

    def tag_aborted(self, conn: Connection, tag: int, reason: str) -> None:
        """The peer aborted every transfer of ``tag`` (an ABORT_TAG frame, ``docs/protocol.md`` §4)."""


class _Protocol(asyncio.BufferedProtocol):
    """Thin shim between the event loop and its :class:`Connection`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn._connection_made(transport)  # noqa: SLF001 - same module

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._conn._buffer_updated(nbytes)

    def eof_received(self) -> bool:
        return False  # half-closed makes no sense for us: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn._write_paused = True

    def resume_writing(self) -> None:
        self._conn._resume_writing()


class Connection:
    """One TCP connection to a peer, usable after its handshake (§1).

    Attributes:
        hello: the connecting side's :class:`~transport.handshake.Hello` (ours on
            the connecting end, the peer's on the accepting end).
        peer_role / peer_id: what the other end declared.
        session_keys: per-connection key material from the handshake.
        encrypted: whether frames after the handshake are sealed with AES-GCM (§2.1).
        last_received: loop time (monotonic) when bytes last arrived, heartbeats included.
        tx_bytes / rx_bytes: bytes written to / read from the socket, headers included.
        sink / inbox: where DATA frames and control messages go (a link rewires them).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, is_client: bool, congestion: str | None) -> None:
        self._loop = loop
        self.is_client = is_client
        self._congestion = congestion
        self.congestion: str | None = None
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(self)
        self._reader.check_version = False  # the handshake reports version mismatches itself
        # Before the handshake completed only its small frames are read (§1, §2).
        self._reader.accept = HANDSHAKE_TYPES | {FrameType.CLOSE}
        self._open = False
        self._handshake_frames: deque[tuple[FrameHeader, bytearray]] = deque()
        self._handshake_waiter: asyncio.Future[None] | None = None
        self._lost_reason: str | None = None
        self._lost_cause: BaseException | None = None
        self._closed_future: asyncio.Future[None] = loop.create_future()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pause_reasons: set[str] = set()
        self._close_callbacks: list[CloseCallback] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._probe: asyncio.TimerHandle | None = None
        self.on_made: Callable[[Connection], None] | None = None
        self.inbox = Inbox(loop)
        self.sink: DataSink | None = None
        # A connecting link connection whose Link is not built yet keeps ABORT_TAG notices
        # here for it (None: such a frame without a sink is a protocol error), §4.
        self.early_aborts: list[tuple[int, str]] | None = None
        self.hello: Hello | None = None
        self.peer_role: str | None = None
        self.peer_id: PeerId = None
        self.session_keys: SessionKeys | None = None
        self.encrypted = False
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None  # armed by the handshake, engaged when traffic opens
        self.peer_address: Any = None
        self.last_received = loop.time()
        self.tx_bytes = 0
        self.rx_bytes = 0

    # --- state -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection was closed by either side or failed."""
        return self._lost_reason is not None

    def describe(self) -> str:
        """A short human-readable name for logs and error messages."""
        who = f"{self.peer_role or 'peer'} {self.peer_id!r}" if self.peer_id is not None else "peer"
        return f"{who} at {self.peer_address}"

    def lost_error(self) -> PeerLostError:
        """A fresh exception describing why the connection is gone."""
        error = PeerLostError(f"connection to {self.describe()} lost: {self._lost_reason}")
        error.__cause__ = self._lost_cause
        return error

    def add_close_callback(self, fn: CloseCallback) -> None:
        """Call ``fn(conn, error)`` once when the connection closes (at once if it already has)."""
        if self.closed:
            self._loop.call_soon(fn, self, self.lost_error())
        else:
            self._close_callbacks.append(fn)

    def _mark_lost(self, reason: str, cause: BaseException | None = None, *, drop_inbox: bool = False) -> None:
        """First reason wins; wakes every waiter with PeerLostError and runs close callbacks."""
        if self._lost_reason is not None:
            return
        self._lost_reason = reason
        self._lost_cause = cause
        self._reader.fail()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(self.lost_error())
        self._drain_waiters.clear()
        self.inbox.fail(self.lost_error, drop=drop_inbox)
        self._wake_handshake()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        callbacks, self._close_callbacks = self._close_callbacks, []
        for fn in callbacks:
            try:
                fn(self, self.lost_error())
            except Exception:  # one broken callback must not keep others from running
                log.exception("close callback of %s failed", self.describe())

    # --- protocol callbacks --------------------------------------------------------

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=0, low=0)
        self.peer_address = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.congestion = tune(sock, self._congestion)
        if self.on_made is not None:
            self.on_made(self)

    def _buffer_updated(self, nbytes: int) -> None:
        self.last_received = self._loop.time()
        self.rx_bytes += nbytes
        try:
            self._reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            log.warning("protocol error from %s, closing that connection: %s", self.describe(), exc)
            self.abort(f"protocol error: {exc}", exc)
        except Exception as exc:  # a bug in a handler must not take the loop down
            log.exception("unexpected error handling a frame from %s", self.describe())
            self.abort(f"internal error: {exc!r}", exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        self._mark_lost(f"connection closed by the network ({exc})" if exc else "connection closed by peer", exc)
        if not self._closed_future.done():
            self._closed_future.set_result(None)

    def _resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and self._transport.is_closing():
            # The loop empties the buffer of a failing transport and resumes us before
            # connection_lost: nothing reached the kernel, let connection_lost fail the waiters.
            return
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- FrameHandler ------------------------------------------------------------------

    def on_frame(self, header: FrameHeader, payload: bytearray) -> None:
        """FrameReader callback for complete non-DATA frames (§2, §3)."""
        kind = header.type
        if kind is FrameType.CLOSE:
            reason = bytes(payload).decode("utf-8", "replace")
            self._mark_lost(f"peer closed the connection: {reason or 'no reason given'}")
            self._close_transport()
        elif not self._open:
            if kind not in HANDSHAKE_TYPES:
                raise ProtocolError(f"{kind.name} frame before the handshake completed")
            if kind is FrameType.ACCEPT and self.is_client:
                # Open at once: the server may send ordinary frames right behind
                # ACCEPT, before the handshake coroutine runs again (§1).
                self._open_for_traffic()
            self._handshake_frames.append((header, payload))
            self._wake_handshake()
        elif kind is FrameType.CONTROL:
            self.inbox.put(decode(payload, header.compressed), self)
        elif kind is FrameType.ABORT_TAG:
            reason = bytes(payload).decode("utf-8", "replace")
            if self.sink is not None:
                self.sink.tag_aborted(self, header.tag, reason)
            elif self.early_aborts is not None and len(self.early_aborts) < MAX_EARLY_ABORTS:
                # The accepting side may use the link as soon as it assembled it, before
                # connect_link built the Link of this connection: keep it for the Link.
                self.early_aborts.append((header.tag, reason))
            else:
                raise ProtocolError("ABORT_TAG frame on a connection that carries no transfers")
        elif kind is not FrameType.HEARTBEAT:
            raise ProtocolError(f"unexpected {kind.name} frame after the handshake")

    def data_begin(self, header: FrameHeader) -> memoryview | None:
        """FrameReader callback: where a DATA payload goes (§4)."""
        if not self._open or self.sink is None:
            raise ProtocolError("DATA frame on a connection that carries no transfers")
        return self.sink.data_begin(self, header)

    def data_end(self, header: FrameHeader) -> None:
        """FrameReader callback: a DATA payload is complete (§4)."""
        assert self.sink is not None
        if not self.sink.data_end(self, header):
            self.pause_reading("side-buffer")

    def discard_current(self, tag: int, seq: int | None = None) -> bool:
        """Stop writing the DATA frame being received if it belongs to ``tag`` (and ``seq``)."""
        header = self._reader.current
        if header is None or header.type is not FrameType.DATA or header.tag != tag:
            return False
        if seq is not None and header.seq != seq:
            return False
        return self._reader.discard_current() is not None

    # --- handshake channel -----------------------------------------------------------

    def send_handshake(self, frame_type: FrameType, payload: bytes, *, version: int = PROTOCOL_VERSION) -> None:
        """Write one handshake frame (§1). Raises PeerLostError when closed."""
        self.write_frame(pack_header(frame_type, len(payload), version=version), payload)

    async def recv_handshake(self) -> tuple[FrameHeader, bytearray]:
        """The next handshake frame (§1). Raises PeerLostError when closed first."""
        while not self._handshake_frames:
            if self.closed:
                raise self.lost_error()
            self._handshake_waiter = self._loop.create_future()
            await self._handshake_waiter
        return self._handshake_frames.popleft()

    def _wake_handshake(self) -> None:
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)

    def start_encryption(self, keys: SessionKeys) -> None:
        """Handshake channel: seal from now on; open the peer's frames once traffic opens (§2.1)."""
        self._sealer, self._opener = session_ciphers(keys.client_to_server, keys.server_to_client,
                                                     is_client=self.is_client)
        self.encrypted = True
        if not self.is_client:
            self._open_for_traffic()  # the client's AUTH was its last frame in clear

    def _open_for_traffic(self) -> None:
        self._open = True
        self._reader.check_version = True
        self._reader.accept = _OPEN_TYPES
        if self._opener is not None and not self._reader.decrypting:
            self._reader.decrypt_with(self._opener)

    def _complete(self, result: HandshakeResult) -> None:
        self.hello = result.hello
        self.peer_role = result.peer_role
        self.peer_id = result.peer_id
        self.session_keys = result.keys
        self._open_for_traffic()

    # --- sending ------------------------------------------------------------------------

    def write_frame(self, header: bytes, payload: Any = None) -> None:
        """Queue one frame with the transport without waiting; pair with :meth:`drain`.

        ``payload`` may be any bytes-like object; the transport keeps a reference
        (no copy) until it reaches the kernel.

        Raises:
            PeerLostError: the connection is closed.
        """
        if self._lost_reason is not None or self._transport is None:
            raise self.lost_error()
        if self._transport.is_closing():  # failing: the loop would drop the bytes silently
            raise PeerLostError(f"connection to {self.describe()} is failing")
        if self._sealer is not None:
            if not self._transport.get_write_buffer_size():
                self._sealer.recycle()  # the kernel has every frame sealed before
            try:
                sealed = self._sealer.seal(header, payload)
            except ProtocolError as exc:  # nonce space used up: never reuse a nonce (§2.1)
                self.abort(str(exc), exc)
                raise self.lost_error() from exc
            self._transport.write(sealed)
            self.tx_bytes += len(sealed)
        elif payload is not None and len(payload):
            self._transport.writelines([header, payload])
            self.tx_bytes += len(header) + len(payload)
        else:
            self._transport.write(header)
            self.tx_bytes += len(header)

    async def drain(self) -> None:
        """Wait until everything written so far is in the kernel (flow control, §4).

        Raises:
            PeerLostError: the connection closed first.
        """
        if self._lost_reason is not None:
            raise self.lost_error()
        if self._transport is not None and self._transport.is_closing():
            await asyncio.shield(self._closed_future)  # connection_lost tells why
            raise self.lost_error()
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def send_message(self, msg: Message) -> None:
        """Send one control message (§3); returns once the kernel has it.

        Raises:
            PeerLostError: the connection is closed or breaks.
            InvalidUsageError: ``msg`` is not a valid declared message or is too large.
        """
        await self.drain()
        self.write_message(msg)
        await self.drain()

    def write_message(self, msg: Message) -> None:
        """Queue one control message without waiting for flow control (§3).

        Raises:
            PeerLostError: the connection is closed.
            InvalidUsageError: ``msg`` is not a valid declared message or is too large.
        """
        payload, compressed = encode_payload(msg)
        flags = FrameFlags.COMPRESSED if compressed else FrameFlags.NONE
        self.write_frame(pack_header(FrameType.CONTROL, len(payload), flags=flags), payload)

    async def recv_message(self) -> Message:
        """The next control message; those received before a close are still delivered.

        Raises:
            PeerLostError: the connection is closed and nothing is left to read.
        """
        return await self.inbox.get()

    # --- reading control -------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the socket until every pause ``reason`` is resumed."""
        if not self._pause_reasons and self._transport is not None and not self.closed:
            self._transport.pause_reading()
            self._schedule_probe()
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        """Undo one ``pause_reading(reason)``."""
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self._transport is not None and not self.closed:
            self._transport.resume_reading()
            if self._probe is not None:
                self._probe.cancel()
                self._probe = None

    def _schedule_probe(self) -> None:
        self._probe = self._loop.call_later(PAUSED_PROBE_INTERVAL, self._probe_while_paused)

    def _probe_while_paused(self) -> None:
        # While reading is paused the loop does not watch the socket, so a peer
        # that closed or reset would go unnoticed: ask the kernel instead (§4).
        self._probe = None
        if self.closed or not self._pause_reasons or self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None and peer_gone(sock):
            self.abort("peer closed the connection while reading was paused")
        else:
            self._schedule_probe()

    # --- heartbeats ------------------------------------------------------------------

    def start_heartbeat(self, interval: float, timeout: float | None = None) -> None:
        """Send a HEARTBEAT every ``interval`` s while idle; with ``timeout``, abort the
        connection when nothing arrived for that long (silent peer, §2)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if not self.closed:
            self._heartbeat = self._loop.create_task(self._beat(interval, timeout))

    async def _beat(self, interval: float, timeout: float | None) -> None:
        header = pack_header(FrameType.HEARTBEAT, 0)
        while not self.closed:
            await asyncio.sleep(interval)
            if self.closed:
                return
            silent = self._loop.time() - self.last_received
            if timeout is not None and silent > timeout:
                log.warning("%s silent for %.1f s, closing the connection", self.describe(), silent)
                self.abort(f"no data or heartbeat for {silent:.1f} s (timeout {timeout} s)")
                return
            if not self._write_paused:  # bytes already queued show we are alive
                try:
                    self.write_frame(header)
                except PeerLostError:
                    return  # failing; connection_lost follows

    # --- closing -------------------------------------------------------------------

    def close(self, reason: str = "") -> None:
        """Close gracefully: send CLOSE with ``reason``, flush, close. Idempotent, raises nothing.

        Pending and later operations on this connection raise PeerLostError.
        Safe to call from any thread (from another one it only schedules the close).
        """
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.close, reason)
            return
        transport = self._transport
        if self._lost_reason is None and self._open and transport is not None and not transport.is_closing():
            data = reason.encode("utf-8")[:MAX_HANDSHAKE_PAYLOAD]
            with contextlib.suppress(PeerLostError):  # could not say why; the close still happens
                self.write_frame(pack_header(FrameType.CLOSE, len(data)), data)
        self._mark_lost(f"closed locally{': ' + reason if reason else ''}", drop_inbox=True)
        self._close_transport()

    def _close_transport(self) -> None:
        """Flush and close; a peer that does not take the bytes within CLOSE_GRACE gets a reset."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
            self._loop.call_later(CLOSE_GRACE, self._abort_transport)

    def abort(self, reason: str = "aborted", cause: BaseException | None = None) -> None:
        """Drop the connection at once (no flush). Idempotent, raises nothing.

        Safe to call from any thread (from another one it only schedules the abort).
        """
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.abort, reason, cause)
            return
        self._mark_lost(reason, cause)
        self._abort_transport()

    def _abort_transport(self) -> None:
        if self._transport is not None and not self._closed_future.done():
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                reset_on_close(sock)  # RST now, even if the peer is not reading (§4)
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the socket is really closed. Raises nothing."""
        await asyncio.shield(self._closed_future)


async def open_connection(
    host: str,
    port: int,
    *,
    role: str,
    peer_id: PeerId,
    secret: bytes | None = None,
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    congestion: str | None = "cubic",
    link_id: int | None = None,
    index: int = 0,
    pool_size: int = 1,
    encrypt: bool = False,
) -> Connection:
    """Connect to ``host:port`` and run the handshake (§1) within ``timeout`` seconds.

    ``peer_id`` is this side's identity (an int or a short string; None when
    anonymous); ``link_id``/``index``/``pool_size`` place the connection in a link's pool.
    ``encrypt``: seal every frame after the handshake with AES-GCM (§2.1); needs
    ``secret``, and the server must encrypt too.

    Raises:
        PeerUnreachableError: could not connect, or the handshake timed out.
        AuthenticationError: refused by the server, wrong/missing secret, encryption
            settings that differ, version mismatch.
        ProtocolError: the server does not speak this protocol.
        PeerLostError: the server closed the connection during the handshake.
        InvalidUsageError: invalid ``role``/``peer_id``/pool arguments, ``encrypt`` without ``secret``.
    """
    check_encrypt(encrypt, secret)
    loop = asyncio.get_running_loop()
    conn = Connection(loop, is_client=True, congestion=congestion)
    if link_id is not None:
        conn.early_aborts = []
    try:
        async with asyncio.timeout(timeout):
            try:
                sock = await connect_socket(loop, host, port, congestion)
                await loop.create_connection(lambda: _Protocol(conn), sock=sock)
            except OSError as exc:
                raise PeerUnreachableError(f"cannot connect to {host}:{port}: {exc}") from exc
            result = await client_handshake(
                conn, role=role, peer_id=peer_id, secret=secret,
                link_id=link_id, index=index, pool_size=pool_size, encrypt=encrypt,
            )
    except TimeoutError as exc:
        conn.abort("handshake timed out")
        raise PeerUnreachableError(f"connecting to {host}:{port} took longer than {timeout} s") from exc
    except BaseException as exc:
        if isinstance(exc, (AuthenticationError, ProtocolError)):
            log.debug("handshake with %s:%s failed: %s", host, port, exc)
        conn.abort(f"handshake failed: {exc}", exc)
        raise
    conn._complete(result)  # noqa: SLF001
    return conn


async def start_server(
    host: str | None, port: int, on_connection: Callable[[Connection], Any], **options: Any
) -> Server:
    """Listen on ``host:port``; see :func:`transport.server.start_server` (re-exported here)."""
    from transport.server import start_server as _start_server  # server.py builds on this module

    return await _start_server(host, port, on_connection, **options)
