"""The asyncio side of a Communicator: master connection, votes, links, collectives (``docs/protocol.md`` §5).

A :class:`PeerSession` lives on the Communicator's event-loop thread. One task reads
the master connection and resolves the futures the API coroutines wait on; one task
sends heartbeats; one task (re)builds the ring links whenever a ``RingUpdate``
arrives. Anything fatal — a kick, the master gone or silent — fails every waiting
call with the same error, so no call ever waits for something that cannot come.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from pccl import protocol as P
from pccl.bandwidth import BANDWIDTH_ROLE, BandwidthServer, answer_probe
from pccl.collective_session import Collective, CollectiveContext, CollectiveRunner, error_for
from pccl.errors import InvalidUsageError, MasterConnectionError, PCCLError, PeerLostError
from pccl.ring_links import LinkSetupError, RingLinks
from transport.connection import Connection, open_connection

log = logging.getLogger("pccl.communicator")

T = TypeVar("T")

@dataclass
class Settings:
    """A Communicator's configuration (validated by the Communicator)."""

    master_host: str
    master_port: int
    group: int
    connections: int
    secret: bytes | None
    advertise_host: str | None
    p2p_host: str
    congestion: str | None
    connect_timeout: float = 10.0
    p2p_port: int = 0  # where to listen for peers; 0 picks a free port
    advertise_port: int | None = None  # the port peers dial, if not the listening one (§5.3)
    encrypt: bool = False  # AES-GCM on every connection: master and p2p (docs/protocol.md §2.1)


class PeerSession:
    """All asynchronous state of one peer; every method runs on its event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.links = RingLinks(connections=settings.connections, secret=settings.secret, congestion=settings.congestion,
                               encrypt=settings.encrypt)
        # The receiving end of bandwidth probes, and the group's last measured matrix (§5.12).
        self.links.handlers[BANDWIDTH_ROLE] = BandwidthServer().serve
        self.bandwidths: dict[tuple[int, int], float] = {}
        self.conn: Connection | None = None
        self.peer_id: int | None = None
        self.ring: list[int] = []
        self.epoch = 0
        self.world = P.WorldInfo(0, 0, 0)
        self.accepted = False
        self.fatal: PCCLError | None = None
        self.busy: str | None = None  # the blocking membership/sync call in progress
        self.collectives: dict[int, Collective] = {}
        self.links_epoch = -1  # the epoch whose links this peer holds (reported links_ready)
        self._loop = asyncio.get_running_loop()
        self._accepted: asyncio.Future[None] = self._loop.create_future()
        self._vote: asyncio.Future[P.VoteResult] | None = None
        self._sync_inbox: deque[Any] = deque()
        self._sync_waiter: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._relink: asyncio.Task[None] | None = None
        self._closing = False
        self.runner = CollectiveRunner(self._send, self.links, self._me)

    # -- connect ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Register with the master and wait until the run accepts this peer (§5.3).

        Raises:
            MasterConnectionError: the master cannot be reached, refused us or went away.
            AuthenticationError: the master refused our secret.
            TopologyUpdateError: this peer could not be linked into its ring and was dropped.
        """
        s = self.settings
        try:
            self.conn = await open_connection(
                s.master_host, s.master_port, role="peer", peer_id=None, secret=s.secret,
                timeout=s.connect_timeout, congestion=None, encrypt=s.encrypt,
            )
        except PeerLostError as exc:
            raise MasterConnectionError(f"cannot reach the master at {s.master_host}:{s.master_port}: {exc}") from exc
        try:
            await self.links.start(s.p2p_host, s.p2p_port)
        except OSError as exc:
            raise MasterConnectionError(f"cannot listen for peers on {s.p2p_host}:{s.p2p_port}: {exc}") from exc
        self._spawn(self._read_loop())
        self._send(P.Register(s.group, s.advertise_port or self.links.port, s.advertise_host))
        await self._accepted
        self.accepted = True

    # -- membership (§5.5) -------------------------------------------------------------

    async def vote(self, kind: str) -> P.VoteResult:
        """Cast a membership vote and wait for the round's result.

        Raises:
            InvalidUsageError: collectives are in flight, or another blocking call is running.
            TopologyUpdateError: the round failed for this peer (it may retry).
            MasterConnectionError: kicked, or the master is gone.
        """
        self._check_blocking_call(kind)
        self.busy = kind
        self._vote = vote = self._loop.create_future()
        try:
            self._send(P.Vote(kind))
            result = await vote
        finally:
            self._vote, self.busy = None, None
            if vote.done() and not vote.cancelled():
                vote.exception()  # a failed send failed it too: that error is the one raised
        if not result.ok:
            raise error_for(result.error, result.reason)
        return result

    def _check_blocking_call(self, what: str) -> None:
        self.check_alive()
        if self.collectives:
            tags = ", ".join(str(t) for t in sorted(self.collectives))
            raise InvalidUsageError(
                f"{what} while collectives (tags {tags}) are in flight; wait for them to finish first"
            )
        if self.busy is not None:
            raise InvalidUsageError(f"{what} while {self.busy} is still running; call them one at a time")

    def check_alive(self) -> None:
        """Raise the fatal error (a fresh copy) if the session is dead."""
        if self.fatal is not None:
            raise type(self.fatal)(str(self.fatal))

    # -- collectives (§5.6) ---------------------------------------------------------------

    async def run_collective(
        self,
        tag: int,
        descriptor: dict[str, Any],
        body: Callable[[CollectiveContext], Awaitable[T]],
        *,
        replayable: bool = False,
    ) -> T:
        """Initiate collective ``tag``, run ``body`` once the master starts it, report, wait for the outcome.

        ``replayable``: ``body`` may run twice (it never writes what it reads). It is then
        started at once, before the master's answer, when this peer holds the links of
        its current ring (an optimistic start, ``docs/protocol.md`` §5.6.2); the answer
        confirms it, or it is dropped and ``body`` runs again under the master's op id.

        Raises:
            InvalidUsageError: ``tag`` is already in flight, a blocking call is running,
                or the master found the descriptors differ between peers.
            PeerLostError: a peer was lost (the master aborted the operation); retry it.
            MasterConnectionError: kicked, or the master is gone.
            Whatever ``body`` raised if it was not a :class:`PeerLostError`.
        """
        self.check_alive()
        if tag in self.collectives:
            raise InvalidUsageError(f"collective tag {tag} is already in flight; wait for it or use another tag")
        if self.busy is not None:
            raise InvalidUsageError(f"collective tag {tag} while {self.busy} is running; call them one at a time")
        coll = Collective.create(self._loop)
        self.collectives[tag] = coll
        try:
            epoch, xtag = 0, 0
            if replayable and self.links_epoch == self.epoch:
                epoch, xtag = self.runner.attempt(coll, tag, self.epoch, self.ring, self.collectives.values(), body)
            self._send(P.CollectiveInitiate(tag, descriptor, epoch, xtag))
            return await self.runner.finish(coll, await coll.start, body)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self.runner.drop(coll, "cancelled by the caller" if cancelled else f"{type(exc).__name__}: {exc}")
            if cancelled:
                self._orphan(tag, coll)
            raise
        finally:
            if not coll.orphan:
                self.collectives.pop(tag, None)
            for fut in (coll.start, coll.done):
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: an abort nobody awaited is not an error to log

    def _orphan(self, tag: int, coll: Collective) -> None:
        """The caller gave up on ``tag``: keep it reserved until the master's outcome and answer for it."""
        if self.fatal is not None or coll.done.done():
            return
        if coll.start.done():
            first = coll.start.result()
            if isinstance(first, P.CollectiveDone):
                return  # it failed before starting: over
            if not coll.reported:
                coll.reported = True
                self._send_quietly(P.CollectiveComplete(tag, first.op_id, False, "cancelled by the caller"))
        coll.orphan = True

    # -- shared state (§5.9): used by the shared-state sync -----------------------------

    async def sync_request(self, report: P.SyncReport) -> Any:
        """Send a sync report; the master's answer (``SyncPlan``, or ``SyncResult`` on failure).

        Raises:
            InvalidUsageError: collectives are in flight or another blocking call runs.
            MasterConnectionError: kicked, or the master is gone.
        """
        self._check_blocking_call("sync_shared_state")
        self.busy = "sync_shared_state"
        try:
            self._send(report)
            answer = await self._next_sync_message()
        except BaseException:
            self.busy = None
            raise
        if isinstance(answer, P.SyncResult):
            self.busy = None  # the round ended before any fetch
        return answer

    async def sync_finish(self, done: P.SyncDone) -> P.SyncResult:
        """Report the end of this peer's fetches; the round's result.

        Raises:
            MasterConnectionError: kicked, or the master is gone.
        """
        try:
            self._send(done)
            return await self._next_sync_message()
        finally:
            self.busy = None

    async def _next_sync_message(self) -> Any:
        while not self._sync_inbox:
            self.check_alive()
            self._sync_waiter = self._loop.create_future()
            await self._sync_waiter
        return self._sync_inbox.popleft()

    # -- the master connection ------------------------------------------------------------

    def _me(self) -> int:
        assert self.peer_id is not None
        return self.peer_id

    def _send(self, msg: Any) -> None:
        """Queue ``msg`` to the master. Raises MasterConnectionError if it is gone."""
        self.check_alive()
        assert self.conn is not None
        try:
            self.conn.write_message(msg)
        except PeerLostError as exc:
            error = MasterConnectionError(f"lost the connection to the master: {exc}")
            self.fail(error)
            raise error from exc

    def _send_quietly(self, msg: Any) -> None:
        try:
            self._send(msg)
        except PCCLError:
            pass  # already recorded as fatal

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self._loop.create_task(coro)
        self._tasks.append(task)
        return task

    async def _read_loop(self) -> None:
        assert self.conn is not None
        try:
            while True:
                self._dispatch(await self.conn.recv_message())
        except PeerLostError as exc:
            if not self._closing:
                self.fail(MasterConnectionError(f"lost the connection to the master: {exc}"))

    def _dispatch(self, msg: Any) -> None:
        handler = _DISPATCH.get(type(msg))
        if handler is None:
            log.warning("ignoring unexpected %s from the master", type(msg).__name__)
            return
        handler(self, msg)

    def _on_welcome(self, msg: P.Welcome) -> None:
        assert self.conn is not None
        self.peer_id = self.links.peer_id = msg.peer_id
        self.links.heartbeat = (msg.heartbeat_interval, msg.heartbeat_timeout)
        self._spawn(self._heartbeats(msg.heartbeat_interval, msg.heartbeat_timeout))

    async def _heartbeats(self, interval: float, timeout: float) -> None:
        """Tell the master we live; fail everything when the master is silent too long (§5.8)."""
        conn = self.conn
        assert conn is not None
        last = self._loop.time()
        while self.fatal is None:
            await asyncio.sleep(interval)
            if self._loop.time() - last > 2 * interval:
                # This process was stopped or starved. Read what arrived meanwhile before
                # writing: writing to a master that closed the connection (a kick) makes the
                # kernel drop the unread bytes, and with them the kick's reason.
                await asyncio.sleep(min(interval, 0.05))
            silent = self._loop.time() - conn.last_received
            if self.fatal is None and silent > timeout:
                self.fail(MasterConnectionError(
                    f"the master was silent for {silent:.1f} s (heartbeat timeout {timeout:g} s)"
                ))
            self._send_quietly(P.Heartbeat())
            last = self._loop.time()

    def _on_ring(self, msg: P.RingUpdate) -> None:
        self.ring, self.epoch = list(msg.ring), msg.epoch
        if self._relink is not None:
            self._relink.cancel()
        self._relink = self._spawn(self._link_epoch(msg))

    async def _link_epoch(self, msg: P.RingUpdate) -> None:
        try:
            await self.links.relink(list(msg.ring), list(msg.hosts), list(msg.ports))
        except LinkSetupError as exc:
            log.warning("epoch %d: %s", msg.epoch, exc)
            self._send_quietly(P.LinkFailed(msg.epoch, exc.peer, exc.reason))
            return
        self.links_epoch = msg.epoch  # collectives may start optimistically on this ring (§5.6.2)
        self._send_quietly(P.LinksReady(msg.epoch))
        self._watch_next_link(msg)

    def _watch_next_link(self, msg: P.RingUpdate) -> None:
        """Link again if the link to NEXT dies while ``msg``'s epoch is current (§5.4).

        NEXT may be waiting for a fresh inbound link from us (it dropped the old one) while
        the master waits for NEXT's ``links_ready``: without a new link no collective of
        the group could ever start again.
        """
        ring = list(msg.ring)
        if len(ring) < 2:
            return
        link = self.links.outbound.get(ring[(ring.index(self._me()) + 1) % len(ring)])
        if link is None:
            return

        def closed(_conn: Connection, _error: PeerLostError) -> None:
            if self.fatal is None and not self._closing and self.epoch == msg.epoch:
                if self._relink is not None:
                    self._relink.cancel()
                self._relink = self._spawn(self._link_epoch(msg))

        link.connections[0].add_close_callback(closed)

    def _on_world(self, msg: P.WorldInfo) -> None:
        self.world = msg

    def _on_accepted(self, msg: P.Accepted) -> None:
        if not self._accepted.done():
            self._accepted.set_result(None)

    def _on_vote_result(self, msg: P.VoteResult) -> None:
        if self._vote is not None and not self._vote.done():
            self._vote.set_result(msg)
        else:
            log.warning("ignoring a %s result nobody waits for", msg.kind)

    def _on_collective_start(self, msg: P.CollectiveStart) -> None:
        self.runner.tags.started(msg.epoch, msg.tag)  # every member counts every start alike (§5.6.2)
        coll = self.collectives.get(msg.tag)
        if coll is None or coll.start.done():
            log.warning("ignoring CollectiveStart for tag %d nobody waits for", msg.tag)
        elif coll.orphan:
            coll.start.set_result(msg)
            coll.reported = True
            self._send_quietly(P.CollectiveComplete(msg.tag, msg.op_id, False, "cancelled by the caller"))
        else:
            coll.start.set_result(msg)

    def _on_collective_done(self, msg: P.CollectiveDone) -> None:
        coll = self.collectives.get(msg.tag)
        if coll is None:
            log.warning("ignoring CollectiveDone for tag %d nobody waits for", msg.tag)
            return
        if not coll.start.done() and msg.op_id and msg.op_id == coll.transfer_tag:
            self.runner.tags.started(coll.epoch, msg.tag)  # a confirmed attempt: no start came (§5.6.2)
        if coll.orphan:
            del self.collectives[msg.tag]
        elif not coll.start.done():
            coll.start.set_result(msg)  # failed before it started
        elif not coll.done.done():
            coll.done.set_result(msg)

    def _on_sync(self, msg: Any) -> None:
        self._sync_inbox.append(msg)
        if self._sync_waiter is not None and not self._sync_waiter.done():
            self._sync_waiter.set_result(None)

    def _on_kicked(self, msg: P.Kicked) -> None:
        self.fail(error_for(msg.error, f"removed by the master: {msg.reason}"))

    def _on_heartbeat(self, msg: P.Heartbeat) -> None:
        pass

    def _on_bandwidth_probe(self, msg: P.BandwidthProbe) -> None:
        self._spawn(self._probe(msg))

    async def _probe(self, msg: P.BandwidthProbe) -> None:
        self._send_quietly(await answer_probe(self.links, msg))

    def _on_bandwidths(self, msg: P.Bandwidths) -> None:
        self.bandwidths = dict(zip(zip(msg.senders, msg.receivers), msg.bytes_per_second))

    # -- failure and shutdown ---------------------------------------------------------------

    def fail(self, error: PCCLError) -> None:
        """Make the session dead: every waiting and later call raises ``error``. Idempotent."""
        if self.fatal is not None:
            return
        self.fatal = error
        if not self._closing:
            log.warning("peer %s: %s", self.peer_id, error)
        orphans = [c for c in self.collectives.values() if c.orphan]
        futures: list[asyncio.Future[Any] | None] = [self._accepted, self._vote, self._sync_waiter]
        for coll in self.collectives.values():
            futures += [coll.start, coll.done]
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(type(error)(str(error)))
        for coll in orphans:  # nobody awaits these any more
            for fut in (coll.start, coll.done):
                fut.exception()
        if self._relink is not None:
            self._relink.cancel()
        if self.conn is not None and not self._closing:
            self.conn.abort(str(error))

    async def close(self) -> None:
        """Leave the run and release every socket. Raises nothing."""
        self._closing = True
        if self.conn is not None and self.fatal is None:
            self._send_quietly(P.Leave())
            self.conn.close("peer closing")
        self.fail(MasterConnectionError("the communicator was closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.links.close()
        if not self._accepted.done():
            self._accepted.cancel()
        elif not self._accepted.cancelled():
            self._accepted.exception()


_DISPATCH: dict[type, Callable[[PeerSession, Any], None]] = {
    P.Welcome: PeerSession._on_welcome,
    P.RingUpdate: PeerSession._on_ring,
    P.WorldInfo: PeerSession._on_world,
    P.Accepted: PeerSession._on_accepted,
    P.VoteResult: PeerSession._on_vote_result,
    P.CollectiveStart: PeerSession._on_collective_start,
    P.CollectiveDone: PeerSession._on_collective_done,
    P.SyncPlan: PeerSession._on_sync,
    P.SyncResult: PeerSession._on_sync,
    P.Kicked: PeerSession._on_kicked,
    P.Heartbeat: PeerSession._on_heartbeat,
    P.BandwidthProbe: PeerSession._on_bandwidth_probe,
    P.Bandwidths: PeerSession._on_bandwidths,
}
