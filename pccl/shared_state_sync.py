"""The peer side of a shared-state sync (``docs/protocol.md`` §5.9, §6).

One call of ``Communicator.sync_shared_state``:

1. Hash every entry (caller's thread) and start serving (:class:`ShareServer`, the
   p2p server's handler for links of role :data:`SHARE_ROLE`).
2. Send ``pccl.sync_report`` to the master; wait for ``pccl.sync_plan`` (or a kick /
   failed ``pccl.sync_result``). The master elects with :func:`pccl.election.elect`.
3. Fetch the plan's dirty keys (:class:`Fetcher`): one striped link per distributor,
   ``pccl.share_request{sync_id, tag, keys}`` answered by ``pccl.share_reply{tag, ok,
   reason}`` and then transfer ``(tag, i)`` carrying ``keys[i]``'s raw bytes, received
   straight into the tensor (CUDA: into a pinned staging buffer). Each key is hashed on
   arrival and must equal the elected hash; a distributor that dies, refuses, goes
   silent for :data:`SILENCE_TIMEOUT` or serves a wrong hash is dropped and its keys
   move to the next distributor of the plan (:class:`FetchSchedule`).
4. Send ``pccl.sync_done`` (ok, or the reason) and keep serving until the master's
   ``pccl.sync_result``: only if every peer of the round succeeded is the new revision
   adopted and the call successful. A failed call leaves the revision unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pccl import protocol as P
from pccl.errors import (
    AuthenticationError,
    InvalidUsageError,
    PeerLostError,
    ProtocolError,
    SharedStateError,
)
from pccl.shared_state import SharedState, SyncInfo, SyncStrategy, hash_bytes
from transport.link import Link, connect_link
from transport.message import message

if TYPE_CHECKING:
    from pccl.communicator import Communicator
    from pccl.peer_session import PeerSession

log = logging.getLogger("pccl.shared_state")


@dataclass
class FetchSchedule:
    """Assignment of dirty keys to distributors, with fail-over.

    ``fetch`` maps each key to its distributors in preference order (the master's
    :class:`pccl.election.SyncPlan`). Each key is asked of one distributor at a time.
    A distributor that is lost or served a bad key is never asked again (for any key):
    its remaining keys move to their next distributor. A key with no distributor left
    fails the schedule; :attr:`failure` says why.
    """

    fetch: Mapping[str, Sequence[int]]
    _pending: dict[str, list[int]] = field(init=False)
    _asked: dict[str, int] = field(init=False, default_factory=dict)
    _done: set[str] = field(init=False, default_factory=set)
    _excluded: dict[int, str] = field(init=False, default_factory=dict)
    failure: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._pending = {k: list(dict.fromkeys(d)) for k, d in sorted(self.fetch.items())}
        for key, dists in self._pending.items():
            if not dists:
                self._fail(f"no distributor for shared-state key {key!r}")

    @property
    def done(self) -> bool:
        """True once every key was fetched and verified."""
        return self.failure is None and len(self._done) == len(self._pending)

    @property
    def finished(self) -> bool:
        """True once there is nothing more to do: done, or failed."""
        return self.done or self.failure is not None

    def take(self) -> dict[int, list[str]]:
        """Keys to request now, by distributor (each key is handed out once per attempt)."""
        if self.failure is not None:
            return {}
        out: dict[int, list[str]] = {}
        for key, dists in self._pending.items():
            if key in self._done or key in self._asked:
                continue
            out.setdefault(dists[0], []).append(key)
            self._asked[key] = dists[0]
        return out

    def verified(self, key: str, distributor: int) -> None:
        """``key`` from ``distributor`` arrived and hashed to the elected value."""
        if self._asked.get(key) == distributor:
            self._done.add(key)
            del self._asked[key]

    def bad_content(self, key: str, distributor: int) -> None:
        """``key`` from ``distributor`` did not hash to the elected value."""
        self._exclude(distributor, f"peer {distributor} served shared-state key {key!r} with a wrong hash")

    def lost(self, distributor: int, reason: str) -> None:
        """``distributor`` can no longer serve (connection lost, refused)."""
        self._exclude(distributor, f"distributor {distributor} lost: {reason}")

    def _exclude(self, distributor: int, reason: str) -> None:
        self._excluded.setdefault(distributor, reason)
        for key, dists in self._pending.items():
            if key in self._done or distributor not in dists:
                continue
            dists.remove(distributor)
            if self._asked.get(key) == distributor:
                del self._asked[key]
            if not dists:
                self._fail(f"shared-state key {key!r} has no distributor left ({reason})")

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason

    def outstanding(self, distributor: int) -> list[str]:
        """Keys handed to ``distributor`` and not yet verified."""
        return [k for k, d in self._asked.items() if d == distributor]


# --------------------------------------------------------------------------- the wire (§6)

SHARE_ROLE = "shared_state"
HEARTBEAT_INTERVAL = 0.5
# A distributor that sends nothing (no data, no heartbeat) for this long is lost.
SILENCE_TIMEOUT = 5.0
# Transfers a distributor keeps in flight on one link (keeps every connection busy
# with many small entries; one big entry is striped by the link itself).
SEND_WINDOW = 4
# How long a distributor waits for its own plan when a request overtakes it.
PLAN_WAIT = 30.0


@message("pccl.share_request")
class ShareRequest:
    """Fetching peer -> distributor: send ``keys`` of sync round ``sync_id`` as transfers (tag, i) (§6)."""

    sync_id: int
    tag: int
    keys: list[str]


@message("pccl.share_reply")
class ShareReply:
    """Distributor -> fetching peer: whether the keys of request ``tag`` follow (§6)."""

    tag: int
    ok: bool
    reason: str = ""


# --------------------------------------------------------------------------- serving


class ShareServer:
    """Serves this peer's entries to fetching peers for the duration of one sync call.

    Registered as the p2p server's handler for :data:`SHARE_ROLE` links before the
    report goes to the master (a request can only follow the election, which needs
    that report) and removed when the call ends, closing every link it served.
    """

    def __init__(self, state: SharedState, strategy: SyncStrategy) -> None:
        self.state = state
        self.strategy = strategy
        self.tx_bytes = 0  # DATA bytes sent on links that are done
        self._sync_id: int | None = None
        self._fetching: frozenset[str] = frozenset()
        self._planned = asyncio.Event()
        self._links: set[Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def planned(self, sync_id: int, fetching: Sequence[str]) -> None:
        """This peer's own plan arrived: serve round ``sync_id``, never keys it fetches itself."""
        self._sync_id, self._fetching = sync_id, frozenset(fetching)
        self._planned.set()

    def on_link(self, link: Link) -> None:
        """p2p server callback for an incoming :data:`SHARE_ROLE` link."""
        if self._closed:
            link.close("no shared-state sync in progress")
            return
        self._links.add(link)
        link.start_heartbeat(HEARTBEAT_INTERVAL)
        task = asyncio.get_running_loop().create_task(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop serving: close every link and wait for the serving tasks. Raises nothing."""
        self._closed = True
        self._planned.set()
        for link in list(self._links):
            link.close("shared-state sync finished")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, link: Link) -> None:
        try:
            while True:
                request = await link.recv_message()
                if not isinstance(request, ShareRequest):
                    link.close(f"expected {SHARE_ROLE} requests, got {type(request).__name__}")
                    return
                refusal = await self._refusal(request)
                await link.send_message(ShareReply(request.tag, refusal is None, refusal or ""))
                if refusal is None:
                    await self._send_keys(link, request)
        except PeerLostError:
            pass  # the fetching peer went away or gave up on us; it retries elsewhere
        finally:
            self._links.discard(link)
            self.tx_bytes += link.tx_bytes

    async def _refusal(self, request: ShareRequest) -> str | None:
        try:
            await asyncio.wait_for(self._planned.wait(), PLAN_WAIT)
        except TimeoutError:
            return "this peer has no plan for a shared-state sync"
        if self._closed or request.sync_id != self._sync_id:
            return f"this peer is not in sync round {request.sync_id}"
        if self.strategy is SyncStrategy.RECEIVE_ONLY:
            return "this peer syncs receive_only and never sends"
        for key in request.keys:
            if key not in self.state:
                return f"no shared-state key {key!r}"
            if key in self._fetching:
                return f"this peer does not hold the elected content of {key!r}"
        return None

    async def _send_keys(self, link: Link, request: ShareRequest) -> None:
        window: set[asyncio.Task[None]] = set()
        try:
            for seq, key in enumerate(request.keys):
                if len(window) >= SEND_WINDOW:
                    done, window = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                window.add(asyncio.get_running_loop().create_task(self._send_one(link, request.tag, seq, key)))
            for pending in asyncio.as_completed(window):
                await pending
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)

    async def _send_one(self, link: Link, tag: int, seq: int, key: str) -> None:
        await link.send(tag, seq, self.state.host_buffer(key))


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class _Dialer:
    """How to reach the distributors of one plan."""

    me: int
    addresses: Mapping[int, tuple[str, int]]
    connections: int
    secret: bytes | None
    congestion: str | None
    timeout: float
    encrypt: bool = False


class Fetcher:
    """Fetches this peer's dirty keys from their distributors, verifying every one.

    One request at a time per distributor (one link each, keys striped over its
    connections); distributors work in parallel. A key is committed (CUDA: copied
    to the device) only once its bytes hash to the elected value.
    """

    def __init__(
        self, state: SharedState, sync_id: int, schedule: FetchSchedule, popular: Mapping[str, bytes], dialer: _Dialer
    ) -> None:
        self.state = state
        self.sync_id = sync_id
        self.schedule = schedule
        self.popular = popular
        self.dialer = dialer
        self.rx_bytes = 0  # DATA bytes received on links that are closed
        self._links: dict[int, Link] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._next_tag = 1

    async def run(self) -> str | None:
        """Fetch everything; None on success, else the reason. Raises only cancellation."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                for dist, keys in self.schedule.take().items():
                    tasks.add(loop.create_task(self._from(dist, keys)))
                if self.schedule.finished or not tasks:
                    break
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # _from handles transport errors; anything else is a bug to surface
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for dist in list(self._links):
                self._drop(dist, None)
        if self.schedule.done:
            return None
        return self.schedule.failure or "shared-state fetch ended with keys missing"

    async def _from(self, dist: int, keys: list[str]) -> None:
        async with self._locks.setdefault(dist, asyncio.Lock()):
            keys = [k for k in keys if k in self.schedule.outstanding(dist)]
            if not keys:
                return
            try:
                link = await self._link(dist)
                await self._request(link, dist, keys)
            except (PeerLostError, ProtocolError, AuthenticationError) as exc:
                self._drop(dist, exc)
                log.warning("shared-state distributor %d: %s", dist, exc)
                self.schedule.lost(dist, str(exc))

    def _drop(self, dist: int, error: Exception | None) -> None:
        """Close the link to ``dist`` (abort it on ``error``) and count what it received."""
        link = self._links.pop(dist, None)
        if link is None:
            return
        if error is None:
            link.close("shared-state fetch finished")
        else:
            link.abort(error)
        self.rx_bytes += link.rx_bytes

    async def _link(self, dist: int) -> Link:
        link = self._links.get(dist)
        if link is not None and not link.closed:
            return link
        d = self.dialer
        host, port = d.addresses[dist]
        link = await connect_link(
            host, port, connections=d.connections, peer_id=d.me, secret=d.secret,
            role=SHARE_ROLE, timeout=d.timeout, congestion=d.congestion, encrypt=d.encrypt,
        )
        link.start_heartbeat(HEARTBEAT_INTERVAL, SILENCE_TIMEOUT)
        self._links[dist] = link
        return link

    async def _request(self, link: Link, dist: int, keys: list[str]) -> None:
        loop = asyncio.get_running_loop()
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        bufs = [self.state.receive_buffer(k) for k in keys]
        # Post every receive first: the bytes land in place, never in the side buffer.
        recvs = [loop.create_task(link.recv_into(tag, i, buf)) for i, buf in enumerate(bufs)]
        try:
            await link.send_message(ShareRequest(self.sync_id, tag, keys))
            reply = await link.recv_message()
            if not isinstance(reply, ShareReply) or reply.tag != tag:
                raise ProtocolError(f"peer {dist} answered a share request with {reply!r}")
            if not reply.ok:
                raise PeerLostError(f"peer {dist} refused to serve: {reply.reason}")
            for key, buf, recv in zip(keys, bufs, recvs):
                await recv
                digest = await loop.run_in_executor(None, hash_bytes, buf)
                if digest != self.popular[key]:
                    self._drop(dist, ProtocolError(f"served {key!r} with a wrong hash"))
                    log.warning("shared-state distributor %d served %r with a wrong hash", dist, key)
                    self.schedule.bad_content(key, dist)
                    return
                self.state.commit_host_buffer(key)
                self.schedule.verified(key, dist)
        finally:
            link.forget(tag)
            for recv in recvs:
                recv.cancel()
            await asyncio.gather(*recvs, return_exceptions=True)


# --------------------------------------------------------------------------- the call


def _report(state: SharedState, strategy: SyncStrategy, metas: Mapping[str, Any]) -> P.SyncReport:
    keys = list(state.keys())
    return P.SyncReport(
        revision=state.revision,
        strategy=strategy.value,
        keys=keys,
        hashes=[metas[k].hash for k in keys],
        dtypes=[metas[k].dtype for k in keys],
        shapes=[list(metas[k].shape) for k in keys],
        nbytes=[metas[k].nbytes for k in keys],
        allow_inequality=[metas[k].allow_content_inequality for k in keys],
    )


def _check_plan(state: SharedState, plan: P.SyncPlan) -> str | None:
    if set(plan.popular_keys) != set(state.keys()) or not set(plan.fetch_keys) <= set(state.keys()):
        return "the master's plan does not match this peer's shared-state keys"
    known = set(plan.peer_ids)
    if any(not dists or not set(dists) <= known for dists in plan.fetch_from):
        return "the master's plan names a distributor without an address"
    return None


async def run_sync(
    session: PeerSession, state: SharedState, strategy: SyncStrategy, metas: Mapping[str, Any]
) -> SyncInfo:
    """One sync on the session's loop: report, fetch the plan's keys, serve others, finish (§5.9, §6).

    Raises:
        SharedStateError: refused by the master (revision, keys, strategy: the
            reason says which), or the round failed on some peer.
        InvalidUsageError: collectives are in flight or another blocking call runs.
        MasterConnectionError: kicked for another reason, or the master is gone.
    """
    server = ShareServer(state, strategy)
    handlers = session.links.handlers
    handlers[SHARE_ROLE] = server.on_link
    try:
        answer = await session.sync_request(_report(state, strategy, metas))
        if isinstance(answer, P.SyncResult):
            raise SharedStateError(f"shared-state sync failed: {answer.reason}")
        plan: P.SyncPlan = answer
        server.planned(plan.sync_id, plan.fetch_keys)
        failure = _check_plan(state, plan)
        rx = 0
        if failure is None and plan.fetch_keys:
            fetcher = Fetcher(
                state,
                plan.sync_id,
                FetchSchedule(dict(zip(plan.fetch_keys, plan.fetch_from))),
                dict(zip(plan.popular_keys, plan.popular_hashes)),
                _dialer(session, plan),
            )
            try:
                failure = await fetcher.run()
            except Exception as exc:  # a bug: fail the round (and this call) with it, never hang it
                log.exception("shared-state fetch failed")
                failure = f"internal error while fetching: {exc!r}"
            rx = fetcher.rx_bytes
        result = await session.sync_finish(P.SyncDone(plan.sync_id, failure is None, failure or ""))
        if not result.ok:
            raise SharedStateError(f"shared-state sync of round {plan.sync_id} failed: {result.reason}")
        state.revision = result.revision
        await server.close()  # every peer is done: nobody fetches from us any more
        return SyncInfo(tx_bytes=server.tx_bytes, rx_bytes=rx, revision=result.revision)
    finally:
        if handlers.get(SHARE_ROLE) == server.on_link:
            del handlers[SHARE_ROLE]
        await server.close()


def _dialer(session: PeerSession, plan: P.SyncPlan) -> _Dialer:
    s = session.settings
    assert session.peer_id is not None
    return _Dialer(
        me=session.peer_id,
        addresses={p: (h, port) for p, h, port in zip(plan.peer_ids, plan.peer_hosts, plan.peer_ports)},
        connections=s.connections,
        secret=s.secret,
        congestion=s.congestion,
        timeout=s.connect_timeout,
        encrypt=s.encrypt,
    )


def sync_shared_state(comm: Communicator, state: SharedState, strategy: SyncStrategy) -> SyncInfo:
    """Blocking entry point behind :meth:`pccl.Communicator.sync_shared_state`.

    Hashes in the calling thread, then runs :func:`run_sync` on the loop thread.

    Raises:
        InvalidUsageError: not a SharedState / SyncStrategy, before connect or after close,
            or while collectives are in flight.
        SharedStateError, MasterConnectionError: see :func:`run_sync`.
    """
    if not isinstance(state, SharedState):
        raise InvalidUsageError(f"sync_shared_state needs a pccl.SharedState, got {type(state).__name__}")
    if not isinstance(strategy, SyncStrategy):
        raise InvalidUsageError(f"strategy must be a pccl.SyncStrategy, got {strategy!r}")
    comm._live("sync_shared_state")  # noqa: SLF001 - fail fast, before hashing
    metas = state.metas()
    return comm._blocking("sync_shared_state", lambda s: run_sync(s, state, strategy, metas))  # noqa: SLF001
