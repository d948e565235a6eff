"""The Communicator: one peer of a pccl run, with a blocking API (``docs/protocol.md`` §5).

Each Communicator owns one background event-loop thread
(:class:`transport.loop.LoopThread`); every blocking call runs a coroutine of its
:class:`~pccl.peer_session.PeerSession` there and waits for it. The collectives
(``all_reduce``, ``all_reduce_async``, ``all_reduce_multiple_with_retry``,
``reduce_scatter``, ``all_gather``, ``broadcast``) come from
:class:`pccl.collective_api.CollectivesMixin`; they and other collectives are built on
:meth:`Communicator._run_collective` (async) and :meth:`Communicator._collective_blocking`.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import socket
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from pccl import protocol as P
from pccl.collective_api import CollectivesMixin
from pccl.errors import InvalidUsageError
from pccl.master import DEFAULT_PORT, load_secret
from pccl.peer_session import CollectiveContext, PeerSession, Settings
from pccl.shared_state import SharedState, SyncInfo, SyncStrategy
from pccl.shared_state_sync import sync_shared_state as _sync_shared_state
from transport.loop import LoopThread

T = TypeVar("T")

DEFAULT_CONNECTIONS = 4
# Leaving waits at most this long for link attempts in progress to end.
CLOSE_TIMEOUT = 15.0

log = logging.getLogger("pccl.communicator")


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"host"``, ``"[v6]:port"`` or ``(host, port)`` -> ``(host, port)``.

    Raises:
        InvalidUsageError: the address cannot be parsed.
    """
    if isinstance(address, tuple):
        host, port = address
    elif address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
    elif address.count(":") == 1:
        host, _, text = address.partition(":")
        try:
            port = int(text)
        except ValueError:
            raise InvalidUsageError(f"bad master address {address!r}: the port is not a number") from None
    else:
        host, port = address, DEFAULT_PORT
    if not host or not 0 < int(port) < 65536:
        raise InvalidUsageError(f"bad master address {address!r}; use 'host:port'")
    return host, int(port)


def _default_p2p_host(master_host: str) -> str:
    """Listen on loopback only when the master is on loopback, else on every interface."""
    try:
        infos = socket.getaddrinfo(master_host, None, type=socket.SOCK_STREAM)
        addr = ipaddress.ip_address(infos[0][4][0])
    except (OSError, ValueError, IndexError):
        return "0.0.0.0"
    if addr.is_loopback:
        return "::1" if addr.version == 6 else "127.0.0.1"
    return "::" if addr.version == 6 else "0.0.0.0"


class Communicator(CollectivesMixin):
    """One peer of a pccl run.

    ``master``: ``"host:port"`` of the master. ``peer_group``: collectives and shared
    state are per group. ``connections``: TCP connections per neighbour link (one
    operation's bytes are striped over all). ``secret``: shared secret proven to
    the master and to other peers. ``advertise_host``: the address other peers
    should dial (NAT, several interfaces); by default the one the master sees.
    ``p2p_host``: where to listen for peers (default: loopback if the master is on
    loopback, else every interface). ``p2p_port``: the port to listen on (0: a free
    one). ``advertise_port``: the port other peers should dial, when it differs
    from the listening one (a port forward or proxy in front of this peer; by
    default the listening port). ``congestion``: TCP congestion control for p2p
    links (``None`` keeps the system's). ``secret_file``: read the secret from this
    file instead of ``secret`` (0600). ``encrypt``: AES-GCM encryption of all this
    peer's traffic, to the master and to peers; needs a secret, and the master must
    encrypt too (``docs/security.md``).

    Raises:
        InvalidUsageError: a bad argument (the message says which), ``encrypt``
            without a secret, or an unreadable secret file.
    """

    def __init__(
        self,
        master: str | tuple[str, int],
        peer_group: int = 0,
        connections: int = DEFAULT_CONNECTIONS,
        secret: bytes | str | None = None,
        advertise_host: str | None = None,
        *,
        p2p_host: str | None = None,
        p2p_port: int = 0,
        advertise_port: int | None = None,
        congestion: str | None = "cubic",
        secret_file: str | os.PathLike[str] | None = None,
        encrypt: bool = False,
    ) -> None:
        host, port = parse_address(master)
        key = load_secret(secret, secret_file, encrypt)
        if not isinstance(peer_group, int) or peer_group < 0:
            raise InvalidUsageError(f"peer_group must be a non-negative int, got {peer_group!r}")
        if not isinstance(connections, int) or not 1 <= connections <= 256:
            raise InvalidUsageError(f"connections must be an int in 1..256, got {connections!r}")
        for name, value, low in (("p2p_port", p2p_port, 0), ("advertise_port", advertise_port, 1)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 65536:
                raise InvalidUsageError(f"{name} must be an int in {low}..65535, got {value!r}")
        self._settings = Settings(
            master_host=host,
            master_port=port,
            group=peer_group,
            connections=connections,
            secret=key,
            advertise_host=advertise_host,
            p2p_host=p2p_host or _default_p2p_host(host),
            congestion=congestion,
            p2p_port=p2p_port,
            advertise_port=advertise_port,
            encrypt=encrypt,
        )
        self._thread: LoopThread | None = None
        self._session: PeerSession | None = None
        self._connected = False
        self._closed = False
        self._connect_error: str | None = None
        self._init_collectives()

    # -- attributes -------------------------------------------------------------------

    @property
    def peer_id(self) -> int:
        """This peer's id in the run (assigned by the master; never reused)."""
        return self._live("peer_id").peer_id or 0

    @property
    def peer_group(self) -> int:
        """The group this peer belongs to."""
        return self._settings.group

    @property
    def world_size(self) -> int:
        """Members of this peer's group (its ring)."""
        return len(self._live("world_size").ring)

    @property
    def global_world_size(self) -> int:
        """Accepted peers in the whole run."""
        return self._live("global_world_size").world.global_world_size

    @property
    def num_peer_groups(self) -> int:
        """Groups with at least one accepted peer."""
        return self._live("num_peer_groups").world.num_peer_groups

    @property
    def largest_peer_group_size(self) -> int:
        """Size of the largest group."""
        return self._live("largest_peer_group_size").world.largest_peer_group_size

    @property
    def ring(self) -> list[int]:
        """Peer ids of this peer's group in ring order (current epoch)."""
        return list(self._live("ring").ring)

    @property
    def bandwidths(self) -> dict[tuple[int, int], float]:
        """The group's directed bandwidths ``(sender, receiver) -> bytes/s`` as of the last
        :meth:`optimize_topology` (empty before one); 0 marks a pair whose measurement failed."""
        return dict(self._live("bandwidths").bandwidths)

    # -- lifecycle -------------------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> None:
        """Join the run; returns once the run accepted this peer and its links are ready.

        The first peer of a run is accepted at once; later ones when the accepted
        peers call :meth:`update_topology`.

        Raises:
            MasterConnectionError: the master cannot be reached, refused us, or went away.
            AuthenticationError: the master refused our secret.
            TopologyUpdateError: this peer could not be linked into its ring.
            TimeoutError: not accepted within ``timeout`` seconds.
            InvalidUsageError: called twice, or after :meth:`close`.
        """
        if self._closed:
            raise InvalidUsageError("connect() after close(); create a new Communicator")
        if self._thread is not None:
            raise InvalidUsageError("connect() was already called; create a new Communicator to join again")
        self._thread = LoopThread(f"pccl-peer-g{self._settings.group}")
        try:
            self._session = self._thread.run(self._new_session())
            self._on_loop(self._session.connect(), timeout)
        except BaseException as exc:
            self._connect_error = f"{type(exc).__name__}: {exc}"
            self.close()
            raise
        self._connected = True

    async def _new_session(self) -> PeerSession:
        return PeerSession(self._settings)

    def close(self) -> None:
        """Leave the run and release the thread and sockets. Idempotent; raises nothing."""
        if self._closed:
            return
        self._closed = True
        thread, session = self._thread, self._session
        if thread is None:
            return
        if session is not None:
            try:
                thread.run(session.close(), timeout=CLOSE_TIMEOUT)
            except Exception as exc:  # closing never fails the caller; say what went wrong
                log.warning("closing the communicator: %r", exc)
        try:
            thread.stop()
        except Exception as exc:
            log.warning("stopping the communicator's loop: %r", exc)
        self._release_collectives()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- membership ---------------------------------------------------------------------

    def update_topology(self) -> None:
        """Vote to accept pending peers; returns once they are accepted and every ring is linked.

        Raises:
            TopologyUpdateError: a link of this peer could not be set up (the ring was
                rebuilt without it or a peer dropped); retry.
            InvalidUsageError: collectives are in flight, or the peers called
                different membership operations.
            MasterConnectionError: kicked, or the master is gone.
        """
        self._blocking("update_topology", lambda s: s.vote(P.UPDATE_TOPOLOGY))

    def are_peers_pending(self) -> bool:
        """Vote: are peers waiting to be accepted? Every peer gets the same answer.

        Raises:
            InvalidUsageError: collectives are in flight, or peers disagree on the call.
            MasterConnectionError: kicked, or the master is gone.
        """
        result = self._blocking("are_peers_pending", lambda s: s.vote(P.PEERS_PENDING))
        return bool(result.peers_pending)

    def optimize_topology(self) -> None:
        """Vote to re-order the rings for speed; returns once the new rings are linked.

        Every accepted peer must call it. The master then has the peers measure the
        directed bandwidths it does not know yet (short multi-connection transfers,
        one at a time per sender and per receiver), picks for every group the ring
        whose slowest link is fastest (ties: least summed 1/bandwidth;
        :mod:`pccl.topology`) and every peer re-wires to its new neighbours.
        Afterwards :attr:`ring` is the new order and :attr:`bandwidths` the matrix.
        A failed measurement makes that pair unreachable, not the call a failure.

        Raises:
            TopologyUpdateError: no ring avoids the unreachable pairs (the ring is kept;
                a retry measures them again), or a new link could not be opened.
            InvalidUsageError, MasterConnectionError: as :meth:`update_topology`.
        """
        self._blocking("optimize_topology", lambda s: s.vote(P.OPTIMIZE_TOPOLOGY))

    # -- shared state -----------------------------------------------------------------------

    def sync_shared_state(
        self, state: SharedState, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR
    ) -> SyncInfo:
        """Make ``state`` bit-identical across this peer's group; see :mod:`pccl.shared_state_sync`.

        Set ``state.revision`` to the group's last revision + 1 first (any revision on
        the group's first sync). Dirty entries are overwritten in place; on success
        ``state.revision`` is the group's new revision. On failure retry with the same
        revision; entries being fetched may hold partial content until a sync succeeds.

        Raises:
            SharedStateError: refused by the master (revision, keys, dtype, shape or
                strategy conflict: the message says which; this peer is removed), or
                the round failed (a distributor was lost or served corrupt bytes).
            InvalidUsageError: not a SharedState/SyncStrategy, collectives in flight,
                before connect or after close.
            MasterConnectionError: kicked for another reason, or the master is gone.
        """
        return _sync_shared_state(self, state, strategy)

    # -- collective machinery (used by the collectives built on top) -----------------------

    async def _run_collective(
        self, tag: int, descriptor: dict[str, Any], body: Callable[[CollectiveContext], Awaitable[T]]
    ) -> T:
        """Run collective ``tag`` on the loop thread (await it there); see :meth:`PeerSession.run_collective`."""
        return await self._live("collective").run_collective(tag, descriptor, body)

    def _collective_blocking(
        self,
        tag: int,
        descriptor: dict[str, Any],
        body: Callable[[CollectiveContext], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """Run collective ``tag`` and block until its outcome.

        Raises:
            PeerLostError: a peer was lost and the operation aborted; retry it.
            InvalidUsageError: misuse (tag in flight, descriptors differ, after close).
            MasterConnectionError: kicked, or the master is gone.
            TimeoutError: no outcome within ``timeout`` (the operation is abandoned
                and reported as failed to the group).
        """
        return self._blocking("collective", lambda s: s.run_collective(tag, descriptor, body), timeout)

    def _collective_async(
        self, tag: int, descriptor: dict[str, Any], body: Callable[[CollectiveContext], Awaitable[T]]
    ) -> concurrent.futures.Future[T]:
        """Start collective ``tag`` without waiting; the future holds its outcome.

        Raises:
            InvalidUsageError: before connect or after close.
        """
        session = self._live("collective")
        assert self._thread is not None
        return self._thread.submit(session.run_collective(tag, descriptor, body))

    # -- internals -----------------------------------------------------------------------

    def _live(self, what: str) -> PeerSession:
        if self._closed:
            detail = f" (connect failed: {self._connect_error})" if self._connect_error else ""
            raise InvalidUsageError(f"{what} after close(){detail}; create a new Communicator")
        if not self._connected or self._session is None:
            raise InvalidUsageError(f"{what} before connect(); call connect() first")
        return self._session

    def _blocking(
        self, what: str, make: Callable[[PeerSession], Coroutine[Any, Any, T]], timeout: float | None = None
    ) -> T:
        return self._on_loop(make(self._live(what)), timeout)
