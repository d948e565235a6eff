"""The accepting side: a listening socket that handshakes every client (``docs/protocol.md`` §1).

A client that fails the handshake, times out, floods us with half-open
connections or sends malformed frames loses only its own connection; the server
and every other connection carry on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from transport.connection import Connection, _Protocol
from transport.errors import AuthenticationError, InvalidUsageError, PeerLostError, ProtocolError
from transport.handshake import HANDSHAKE_TIMEOUT, PeerId, check_encrypt, check_identity, server_handshake
from transport.link import DEFAULT_FRAME_SIZE, DEFAULT_SIDE_BUFFER_LIMIT, Link, LinkReady
from transport.loop import invoke_callback, on_loop
from transport.sockopt import tune

log = logging.getLogger(__name__)

#: Connections allowed to sit in the handshake at once; more are dropped on arrival.
MAX_PENDING_HANDSHAKES = 512
#: How long the accepting side waits for all N connections of a link (§4).
DEFAULT_LINK_TIMEOUT = 10.0


class _Group:
    """Connections of one link id seen so far by the accepting side."""

    def __init__(self, size: int, peer_id: PeerId, timer: asyncio.TimerHandle) -> None:
        self.size = size
        self.peer_id = peer_id
        self.timer = timer
        self.conns: dict[int, Connection] = {}


class LinkAssembler:
    """Accepting side: groups connections by link id and hands out complete :class:`Link` s."""

    def __init__(
        self,
        on_link: Callable[[Link], Any],
        *,
        timeout: float = DEFAULT_LINK_TIMEOUT,
        side_buffer_limit: int = DEFAULT_SIDE_BUFFER_LIMIT,
        frame_size: int = DEFAULT_FRAME_SIZE,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_link = on_link
        self._timeout = timeout
        self._side_buffer_limit = side_buffer_limit
        self._frame_size = frame_size
        self._groups: dict[int, _Group] = {}

    def add(self, conn: Connection) -> None:
        """Take a handshaken link connection; the link is built once all its connections arrived."""
        hello = conn.hello
        assert hello is not None and hello.link_id is not None
        link_id = hello.link_id
        group = self._groups.get(link_id)
        if group is None:
            timer = self._loop.call_later(self._timeout, self._expire, link_id)
            group = self._groups[link_id] = _Group(hello.pool_size, hello.peer_id, timer)
        problem = None
        if hello.pool_size != group.size or hello.peer_id != group.peer_id:
            problem = "connections of one link disagree on pool size or peer id"
        elif hello.index in group.conns:
            problem = f"connection index {hello.index} arrived twice"
        if problem is not None:
            log.warning("link %#x from %s: %s; dropping the link", link_id, conn.describe(), problem)
            conn.abort(problem)
            self._drop(link_id, problem)
            return
        group.conns[hello.index] = conn
        conn.add_close_callback(lambda c, e: self._drop(link_id, f"connection lost while assembling: {e}"))
        if len(group.conns) == group.size:
            self._finish(link_id, group)

    def _finish(self, link_id: int, group: _Group) -> None:
        del self._groups[link_id]
        group.timer.cancel()
        conns = [group.conns[i] for i in range(group.size)]
        link = Link(conns, link_id=link_id, peer_id=group.peer_id,
                    side_buffer_limit=self._side_buffer_limit, frame_size=self._frame_size)
        try:
            # Written synchronously, so it precedes anything on_link sends (§4).
            conns[0].write_message(LinkReady(link_id))
        except PeerLostError:
            return  # the link aborted already; the connecting side sees that
        invoke_callback(self._on_link, link, "on_link")

    def _expire(self, link_id: int) -> None:
        group = self._groups.get(link_id)
        if group is not None:
            problem = f"only {len(group.conns)} of {group.size} connections arrived within {self._timeout} s"
            log.warning("link %#x from peer %r: %s", link_id, group.peer_id, problem)
            self._drop(link_id, problem)

    def _drop(self, link_id: int, reason: str) -> None:
        group = self._groups.pop(link_id, None)
        if group is None:
            return
        group.timer.cancel()
        for conn in group.conns.values():
            conn.abort(reason)

    def close(self) -> None:
        """Drop every link still being assembled. Raises nothing."""
        for link_id in list(self._groups):
            self._drop(link_id, "server closing")


class Server:
    """A listening pccl endpoint; create it with :func:`start_server`.

    Attributes:
        port: the bound port (useful with ``port=0``).
        host: the host it was asked to bind.
    """

    def __init__(
        self,
        on_connection: Callable[[Connection], Any] | None,
        *,
        secret: bytes | None,
        congestion: str | None,
        role: str,
        peer_id: PeerId,
        handshake_timeout: float,
        on_link: Callable[[Link], Any] | None,
        link_timeout: float,
        side_buffer_limit: int,
        encrypt: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_connection = on_connection
        self._secret = secret
        self._encrypt = encrypt
        self._congestion = congestion
        self._role = role
        self._peer_id = peer_id
        self._handshake_timeout = handshake_timeout
        self._assembler = (
            LinkAssembler(on_link, timeout=link_timeout, side_buffer_limit=side_buffer_limit)
            if on_link is not None
            else None
        )
        self._pending: dict[Connection, asyncio.Task[None]] = {}
        self._connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self.host: str | None = None
        self.port = 0

    async def _listen(self, host: str | None, port: int) -> None:
        self._server = await self._loop.create_server(
            self._make_protocol, host, port, reuse_address=True, backlog=1024
        )
        for sock in self._server.sockets:
            # Accepted sockets inherit the buffer sizes, which must be in place
            # before the SYN so the window scale is negotiated big enough.
            tune(sock, self._congestion)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    def _make_protocol(self) -> _Protocol:
        conn = Connection(self._loop, is_client=False, congestion=self._congestion)
        conn.on_made = self._accepted
        return _Protocol(conn)

    def _accepted(self, conn: Connection) -> None:
        if self._closing:
            conn.abort("server closing")
            return
        if len(self._pending) >= MAX_PENDING_HANDSHAKES:
            log.warning("%d handshakes pending, dropping %s", len(self._pending), conn.describe())
            conn.abort("too many pending handshakes")
            return
        self._pending[conn] = self._loop.create_task(self._handshake(conn))

    async def _handshake(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                result = await server_handshake(
                    conn, role=self._role, peer_id=self._peer_id, secret=self._secret, encrypt=self._encrypt
                )
        except TimeoutError:
            log.warning("handshake with %s timed out after %s s, dropping it", conn.describe(), self._handshake_timeout)
            conn.abort("handshake timed out")
            return
        except (AuthenticationError, ProtocolError, PeerLostError) as exc:
            log.warning("handshake with %s failed: %s", conn.describe(), exc)
            conn.close(f"handshake failed: {exc}")  # graceful: the REJECT frame is flushed first
            return
        except Exception as exc:  # a bug must cost one connection, never the server
            log.exception("handshake with %s failed unexpectedly", conn.describe())
            conn.abort(f"internal error: {exc!r}", exc)
            return
        finally:
            self._pending.pop(conn, None)
        conn._complete(result)  # noqa: SLF001 - the server finishes what it started
        self._connections.add(conn)
        conn.add_close_callback(lambda c, _e: self._connections.discard(c))
        if result.hello.link_id is not None and self._assembler is not None:
            self._assembler.add(conn)
        elif self._on_connection is not None:
            invoke_callback(self._on_connection, conn, "on_connection")
        else:
            conn.close("this server takes links only")

    @property
    def connections(self) -> frozenset[Connection]:
        """Connections accepted and still open."""
        return frozenset(self._connections)

    def close(self) -> None:
        """Stop listening, drop pending handshakes and links being assembled, and close
        every connection this server accepted. Idempotent, raises nothing; safe to
        call from any thread (it is then scheduled)."""
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.close)
            return
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in self._pending.values():
            task.cancel()
        for conn in list(self._pending):
            conn.abort("server closing")
        if self._assembler is not None:
            self._assembler.close()
        for conn in list(self._connections):
            conn.close("server closing")

    async def wait_closed(self) -> None:
        """Wait until the listening socket and every accepted connection are closed. Raises nothing."""
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.gather(*(conn.wait_closed() for conn in list(self._connections)))

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    host: str | None,
    port: int,
    on_connection: Callable[[Connection], Any] | None,
    *,
    secret: bytes | None = None,
    congestion: str | None = "cubic",
    role: str = "server",
    peer_id: PeerId = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    on_link: Callable[[Link], Any] | None = None,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    side_buffer_limit: int = DEFAULT_SIDE_BUFFER_LIMIT,
    encrypt: bool = False,
) -> Server:
    """Listen on ``host:port`` (``port=0``: ephemeral, see ``server.port``).

    ``on_connection(conn)`` is called for every connection that completed the
    handshake (§1) and is not part of a link; ``on_link(link)`` (when given) for
    every link whose N connections all arrived (§4). Callbacks may be plain
    functions or return awaitables (run as tasks; their errors are logged).
    ``role``/``peer_id`` are what this side declares in its CHALLENGE. With
    ``encrypt`` (needs ``secret``) only clients that encrypt too are accepted, and
    every frame after the handshake is sealed with AES-GCM (§2.1).

    Raises:
        OSError: the address cannot be bound.
        InvalidUsageError: ``role``/``peer_id`` do not fit the hello's limits, or
            ``encrypt`` without ``secret``.
    """
    check_encrypt(encrypt, secret)
    try:
        check_identity(role, peer_id)
    except ValueError as exc:
        raise InvalidUsageError(str(exc)) from exc
    server = Server(
        on_connection, secret=secret, congestion=congestion, role=role, peer_id=peer_id,
        handshake_timeout=handshake_timeout, on_link=on_link, link_timeout=link_timeout,
        side_buffer_limit=side_buffer_limit, encrypt=encrypt,
    )
    await server._listen(host, port)  # noqa: SLF001
    return server
