"""A peer's p2p links to its ring neighbours (``docs/protocol.md`` §5.4).

Each peer runs one p2p server. For every ring epoch it keeps exactly one outbound
:class:`~transport.link.Link` (to its NEXT peer, opened by itself) and waits for one
inbound link (from its PREV peer, opened by that peer). A link to a peer that stays
a neighbour is reused across epochs; an outbound link to a peer that is no longer
NEXT is closed, which also tears down the other side's inbound end. Links of other
roles (e.g. shared-state transfers) are handed to the handler registered for that
role.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from collectives.peers import LinkRingPeers
from transport.loop import invoke_callback
from transport.errors import AuthenticationError, PeerLostError, ProtocolError
from transport.link import Link, connect_link
from transport.server import Server, start_server

log = logging.getLogger("pccl.links")

RING_ROLE = "p2p"
DEFAULT_LINK_TIMEOUT = 10.0


class LinkSetupError(Exception):
    """The outbound link to ``peer`` could not be opened (reported to the master, §5.4)."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"could not link to peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class RingLinks:
    """The p2p server and the ring links of one peer; lives on one event loop."""

    def __init__(
        self,
        *,
        connections: int,
        secret: bytes | None,
        congestion: str | None,
        timeout: float = DEFAULT_LINK_TIMEOUT,
        encrypt: bool = False,
    ) -> None:
        self.connections = connections
        self.secret = secret
        self.encrypt = encrypt  # AES-GCM on every link, both directions (docs/protocol.md §2.1)
        self.congestion = congestion
        self.timeout = timeout
        self.peer_id: int | None = None
        self.inbound: dict[int, Link] = {}
        self.outbound: dict[int, Link] = {}
        self.handlers: dict[str, Callable[[Link], Any]] = {}
        # (interval, timeout) of the heartbeats every ring link carries once set (§5.8): a
        # link that goes silent fails its collectives instead of holding them forever.
        self.heartbeat: tuple[float, float] | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._connecting: dict[int, asyncio.Task[Link]] = {}
        self._server: Server | None = None
        self._closed = False
        self._ring_peers: LinkRingPeers | None = None

    @property
    def port(self) -> int:
        """The p2p server's port (0 before :meth:`start`)."""
        return self._server.port if self._server is not None else 0

    async def start(self, host: str, port: int = 0) -> None:
        """Listen for p2p links on ``host:port`` (``port`` 0: ephemeral).

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await start_server(
            host, port, None, on_link=self._on_link, secret=self.secret, role=RING_ROLE, congestion=self.congestion,
            encrypt=self.encrypt,
        )

    def _on_link(self, link: Link) -> None:
        role = link.connections[0].peer_role
        if role != RING_ROLE:
            handler = self.handlers.get(role or "")
            if handler is None:
                link.close(f"no handler for links of role {role!r}")
            else:
                invoke_callback(handler, link, f"{role} link handler")
            return
        peer = link.peer_id
        if not isinstance(peer, int):
            link.close("ring links must declare an integer peer id")
            return
        old = self.inbound.get(peer)
        self.inbound[peer] = link
        self._beat(link)
        # Forget it once it closes: links from peers that never become PREV (a stranger, a
        # peer that left) would otherwise pile up until the next re-link.
        link.connections[0].add_close_callback(lambda _conn, _err: self._forget_inbound(peer, link))
        if old is not None and old is not link:
            old.close("replaced by a newer link from the same peer")
        for waiter in self._waiters.pop(peer, []):
            if not waiter.done():
                waiter.set_result(None)

    def _forget_inbound(self, peer: int, link: Link) -> None:
        if self.inbound.get(peer) is link:
            del self.inbound[peer]

    async def wait_inbound(self, peer: int) -> Link:
        """The open inbound link from ``peer``, waiting for it to arrive. Raises nothing but cancellation."""
        loop = asyncio.get_running_loop()
        while True:
            link = self.inbound.get(peer)
            if link is not None and not link.closed:
                return link
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(peer, []).append(waiter)
            await waiter

    async def relink(self, ring: list[int], hosts: list[str], ports: list[int]) -> None:
        """Make the links match ``ring``: outbound to NEXT open, inbound from PREV arrived.

        Raises:
            LinkSetupError: the outbound link to NEXT could not be opened.
        """
        me = self.peer_id
        assert me is not None and me in ring
        self._prune()
        if len(ring) == 1:
            for peer in list(self.outbound):
                self.outbound.pop(peer).close("ring changed")
            return
        i = ring.index(me)
        nxt, prv = ring[(i + 1) % len(ring)], ring[i - 1]
        for peer in [p for p in self.outbound if p != nxt]:
            self.outbound.pop(peer).close("no longer the next peer in the ring")
        if nxt not in self.outbound:
            j = (i + 1) % len(ring)
            try:
                await self._connect(nxt, hosts[j], ports[j])
            except (PeerLostError, AuthenticationError, ProtocolError) as exc:
                raise LinkSetupError(nxt, f"{hosts[j]}:{ports[j]}: {exc}") from exc
        await self.wait_inbound(prv)

    async def _connect(self, peer: int, host: str, port: int) -> None:
        """Open the outbound link to ``peer``; stored in ``outbound`` even if the caller gives up.

        The attempt runs as its own task that is never cancelled half-way (a connection
        pool cut off mid-handshake would leak sockets); it ends within ``timeout``.
        """
        task = self._connecting.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(connect_link(
                host, port, connections=self.connections, peer_id=self.peer_id, secret=self.secret,
                role=RING_ROLE, timeout=self.timeout, congestion=self.congestion, encrypt=self.encrypt,
            ))
            self._connecting[peer] = task
            task.add_done_callback(lambda t: self._connected(peer, t))
        await asyncio.shield(task)

    def _connected(self, peer: int, task: asyncio.Task[Link]) -> None:
        self._connecting.pop(peer, None)
        if task.cancelled() or task.exception() is not None:
            return  # the error goes to whoever awaited the attempt
        link = task.result()
        current = self.outbound.get(peer)
        if self._closed or (current is not None and not current.closed):
            link.close("not needed any more")
        else:
            # Kept even if the relink that asked for it was superseded: the next one
            # reuses it when ``peer`` is still NEXT and closes it otherwise.
            self.outbound[peer] = link
            self._beat(link)

    def _beat(self, link: Link) -> None:
        if self.heartbeat is not None:
            link.start_heartbeat(*self.heartbeat)

    def _prune(self) -> None:
        for table in (self.inbound, self.outbound):
            for peer in [p for p, link in table.items() if link.closed]:
                del table[peer]

    def ring_peers(self, ring: list[int]) -> LinkRingPeers | None:
        """The :class:`RingPeers` for ``ring`` (None for a ring of one).

        Raises:
            PeerLostError: a neighbour's link is missing or closed.
        """
        me = self.peer_id
        assert me is not None
        if len(ring) == 1:
            return None
        i = ring.index(me)
        nxt, prv = ring[(i + 1) % len(ring)], ring[i - 1]
        out, inb = self.outbound.get(nxt), self.inbound.get(prv)
        if out is None or out.closed or inb is None or inb.closed:
            raise PeerLostError(f"the link to peer {nxt} or from peer {prv} is gone")
        cached = self._ring_peers  # every collective of an epoch asks for the same one
        if cached is None or (cached.rank, cached.world_size, cached.next_link, cached.prev_link) != (
            i, len(ring), out, inb
        ):
            cached = self._ring_peers = LinkRingPeers(i, len(ring), out, inb)
        return cached

    async def close(self) -> None:
        """Close every link and the p2p server. Raises nothing."""
        self._closed = True
        if self._connecting:
            # Let attempts in progress end (within the link timeout) so no socket leaks.
            await asyncio.wait(list(self._connecting.values()), timeout=self.timeout)
        links = list(self.outbound.values()) + list(self.inbound.values())
        self.outbound.clear()
        self.inbound.clear()
        for link in links:
            link.close("peer closing")
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.cancel()
        self._waiters.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
