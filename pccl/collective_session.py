"""One peer's side of a collective: optimistic start, confirmation, body, report, outcome.

``docs/protocol.md`` §5.6 and §5.6.2. After ``collective_initiate`` the master answers
``collective_start`` (run the body as ``op_id`` on ``ring``, then report) or
``collective_done`` (the outcome). With an **optimistic start** the body is already
running by then, with a transfer tag every member derives alike from the epoch, the user
tag and how often that tag was started in the epoch, and its end is reported at once under
that tag. If the master confirms the attempt, no start comes: its ``collective_done``
carries the attempt's tag and the outcome. Any other answer drops the attempt: its body
is cancelled and waited for, its tag aborted on both links (so bytes already sent are
discarded on both sides) and never proposed again, and the body runs again under the
master's ``op_id`` — or the call raises the master's error. Nothing of an attempt is
committed before the master announced success, so only bodies that may run twice (they
never write what they read) are started optimistically.

:class:`CollectiveRunner` holds this logic; :class:`pccl.peer_session.PeerSession` owns
the master connection and feeds it the master's answers.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from collectives.peers import LinkRingPeers
from pccl import protocol as P
from pccl.errors import (
    InvalidUsageError,
    MasterConnectionError,
    PCCLError,
    PeerLostError,
    SharedStateError,
    TopologyUpdateError,
)
from pccl.master_collectives import OPTIMISTIC_BIT
from pccl.ring_links import RingLinks

__all__ = ["Collective", "CollectiveContext", "CollectiveRunner", "TransferTags", "error_for", "optimistic_tag"]

T = TypeVar("T")

# Field widths of an optimistic transfer tag below bit 63 (§5.6.2): epoch, user tag, use.
# The epoch field never wraps in practice, so tags of different epochs never meet.
_EPOCH_BITS, _TAG_BITS, _USE_BITS = 32, 19, 12
# Started-tag counts kept per epoch; beyond this the least recently started tag is
# forgotten. Every member sees the same starts in the same order, so all forget alike.
MAX_COUNTED_TAGS = 4096
# Burnt tags skipped at most per proposal; beyond that the operation waits for the master.
_MAX_SKIPS = 16
# After k dropped attempts of a tag in a row, its next 2**k - 1 uses (at most this many) wait
# for the master: a member that never starts optimistically (a CUDA tensor reduced in place)
# would otherwise cost every operation a wasted attempt.
MAX_BACKOFF = 1024
# Unconfirmed attempts at once. An attempt sends at most its window (16 MiB by default) before
# it needs its neighbour, and a neighbour that does not run it holds those bytes until the
# attempt's ABORT_TAG comes (§4): this keeps them far below a link's side buffer (1 GiB), which
# once full would stop reading the very connections that ABORT_TAG travels on.
MAX_ATTEMPTS = 8


def optimistic_tag(epoch: int, tag: int, use: int) -> int:
    """The transfer tag of the ``use``-th start of user ``tag`` in ``epoch`` (§5.6.2).

    Bit 63 is set, so it never equals an op id the master counts (those stay below 2**63).
    """
    return (
        OPTIMISTIC_BIT
        | (epoch % (1 << _EPOCH_BITS)) << (_TAG_BITS + _USE_BITS)
        | (tag % (1 << _TAG_BITS)) << _USE_BITS
        | use % (1 << _USE_BITS)
    )


_ERRORS: dict[str, type[PCCLError]] = {
    P.ERROR_MASTER: MasterConnectionError,
    P.ERROR_TOPOLOGY: TopologyUpdateError,
    P.ERROR_USAGE: InvalidUsageError,
    P.ERROR_SHARED_STATE: SharedStateError,
    P.ERROR_PEER_LOST: PeerLostError,
}


def error_for(kind: str, message: str) -> PCCLError:
    """The pccl error an error kind of the protocol stands for (§5.7)."""
    return _ERRORS.get(kind, MasterConnectionError)(message)


@dataclass(frozen=True)
class CollectiveContext:
    """What a collective body gets: where it runs and how to reach its neighbours.

    Use ``op_id`` as the transfer tag on ``peers`` (no other operation running on these
    links uses it). ``peers`` is None when ``world_size`` is 1.
    """

    tag: int
    op_id: int
    epoch: int
    ring: list[int]
    rank: int
    world_size: int
    peers: LinkRingPeers | None


@dataclass
class _Attempt:
    """A body started before the master's answer (an optimistic start)."""

    ctx: CollectiveContext
    task: asyncio.Task[Any]


@dataclass
class Collective:
    """One collective of this peer, from initiate to outcome."""

    start: asyncio.Future[Any]  # the master's first answer: CollectiveStart or CollectiveDone
    done: asyncio.Future[P.CollectiveDone]
    orphan: bool = False  # the caller gave up; answer the master, raise nothing
    reported: bool = False  # collective_complete was sent for the op the master started
    transfer_tag: int = 0  # the optimistic tag proposed (0: none)
    epoch: int = 0  # the epoch it was proposed for
    attempt_reported: bool = False  # collective_complete was sent under transfer_tag
    attempt: _Attempt | None = field(default=None, repr=False)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> Collective:
        """A collective whose futures belong to ``loop``. Raises nothing."""
        return cls(loop.create_future(), loop.create_future())


@dataclass
class _TagUses:
    """One user tag in the newest epoch: starts counted, and the back-off after dropped attempts."""

    uses: int = 0
    misses: int = 0  # dropped attempts in a row
    skip: int = 0  # uses left that wait for the master


class TransferTags:
    """The optimistic transfer tags of one peer (§5.6.2), for the newest epoch it knows.

    Counts how often each user tag was started in that epoch; every member receives the
    same starts, so every member proposes the same tag for the next use. A tag whose
    attempt did not end in a confirmed success is *burnt* (its bytes may still be on a
    link) and never proposed again in the epoch; tags of other epochs differ anyway. A
    tag whose attempts keep being dropped backs off exponentially.
    """

    def __init__(self) -> None:
        self.epoch = -1
        self._tags: dict[int, _TagUses] = {}  # least recently started first
        self._burnt: set[int] = set()

    def _advance(self, epoch: int) -> bool:
        """Move on to ``epoch`` if it is newer; False if it is older than the newest known."""
        if epoch > self.epoch:
            self.epoch, self._tags, self._burnt = epoch, {}, set()
        return epoch == self.epoch

    def started(self, epoch: int, tag: int) -> None:
        """Count a start of ``tag`` in ``epoch``: a ``collective_start``, or the
        ``collective_done`` of a confirmed attempt (which has no start)."""
        if not self._advance(epoch):
            return
        state = self._tags.pop(tag, None) or _TagUses()
        state.uses += 1
        self._tags[tag] = state  # re-inserted: the most recently started is last
        if len(self._tags) > MAX_COUNTED_TAGS:
            del self._tags[next(iter(self._tags))]

    def propose(self, epoch: int, tag: int, in_flight: Iterable[int]) -> int:
        """The tag to start ``tag`` with on the ring of ``epoch``; 0 if it should wait for the master.

        Burnt tags are skipped (the next use's tag is tried): an operation that failed
        before it started, say on a descriptor mismatch, burnt its tag on every member
        without being counted, and its retry must not be stuck with it. A tag held by an
        operation of this peer still in flight is never proposed.
        """
        if not self._advance(epoch):
            return 0  # the master starts nothing on an older ring
        state = self._tags.get(tag)
        uses = 0 if state is None else state.uses
        if state is not None and state.skip:
            state.skip -= 1
            return 0
        for skip in range(_MAX_SKIPS):
            xtag = optimistic_tag(epoch, tag, uses + skip)
            if xtag not in self._burnt:
                return 0 if xtag in set(in_flight) else xtag
        return 0

    def settled(self, epoch: int, tag: int, xtag: int, confirmed: bool) -> None:
        """An attempt of ``tag`` under ``xtag`` was confirmed or dropped; a dropped one is
        burnt and makes the tag back off."""
        if not confirmed and self._advance(epoch):
            self._burnt.add(xtag)
            state = self._tags.setdefault(tag, _TagUses())
            state.misses += 1
            state.skip = min(2**state.misses - 1, MAX_BACKOFF)
        elif confirmed and epoch == self.epoch and tag in self._tags:
            self._tags[tag].misses = 0

    def burn(self, epoch: int, xtag: int) -> None:
        """Never propose ``xtag`` again (a confirmed operation under it failed)."""
        if self._advance(epoch):
            self._burnt.add(xtag)

    def burnt(self, xtag: int) -> bool:
        """Whether ``xtag`` is burnt in the newest epoch."""
        return xtag in self._burnt


class CollectiveRunner:
    """Runs the body of each collective once the master answered (see the module docstring).

    ``send(msg)`` queues a message to the master (raising MasterConnectionError if it is
    gone); ``me()`` is this peer's id. ``confirmed`` / ``dropped`` count the optimistic
    attempts the master confirmed and those given up (for tests and diagnostics).
    """

    def __init__(self, send: Callable[[Any], None], links: RingLinks, me: Callable[[], int]) -> None:
        self._send = send
        self._links = links
        self._me = me
        self.tags = TransferTags()
        self.confirmed = 0
        self.dropped = 0

    def attempt(
        self, coll: Collective, tag: int, epoch: int, ring: list[int], others: Iterable[Collective],
        body: Callable[[CollectiveContext], Awaitable[Any]],
    ) -> tuple[int, int]:
        """Start ``body`` optimistically on the ring of ``epoch`` if its tag may be used;
        ``(epoch, transfer tag)`` to send with the initiate, ``(0, 0)`` when not started."""
        me = self._me()
        others = list(others)
        if len(ring) < 2 or me not in ring or sum(c.attempt is not None for c in others) >= MAX_ATTEMPTS:
            return 0, 0
        xtag = self.tags.propose(epoch, tag, (c.transfer_tag for c in others))
        if not xtag:
            return 0, 0
        try:
            peers = self._links.ring_peers(ring)
        except PeerLostError:
            return 0, 0
        ctx = CollectiveContext(tag, xtag, epoch, list(ring), ring.index(me), len(ring), peers)
        coll.transfer_tag, coll.epoch = xtag, epoch
        task = asyncio.get_running_loop().create_task(_call(body, ctx))
        coll.attempt = _Attempt(ctx, task)
        task.add_done_callback(functools.partial(self._attempt_ended, coll))
        return epoch, xtag

    def _attempt_ended(self, coll: Collective, task: asyncio.Task[Any]) -> None:
        """Report how an attempt ended at once, under its tag: if the master confirms it,
        this is the member's report (§5.6.2); if not, the master ignores it."""
        attempt = coll.attempt
        if task.cancelled() or attempt is None or attempt.task is not task or coll.attempt_reported:
            return  # dropped: drop() speaks for it
        failure = task.exception()
        reason = "" if failure is None else f"{type(failure).__name__}: {failure}"
        self._report_attempt(coll, failure is None, reason)

    def _report_attempt(self, coll: Collective, ok: bool, reason: str) -> None:
        attempt = coll.attempt
        assert attempt is not None
        coll.attempt_reported = True
        try:
            self._send(P.CollectiveComplete(attempt.ctx.tag, attempt.ctx.op_id, ok, reason))
        except PCCLError:
            pass  # the master is gone: the session is failing every call already

    async def finish(
        self, coll: Collective, first: Any, body: Callable[[CollectiveContext], Awaitable[T]]
    ) -> T:
        """The outcome, given the master's first answer ``first`` (see :meth:`PeerSession.run_collective`)."""
        attempt = coll.attempt
        if isinstance(first, P.CollectiveDone) and attempt is not None and first.op_id == attempt.ctx.op_id:
            return await self._confirmed(coll, attempt, first)
        if isinstance(first, P.CollectiveDone):
            await self.drop(coll, "the operation failed before it started")
            raise error_for(first.error or P.ERROR_PEER_LOST, first.reason)
        if attempt is not None and _confirms(first, attempt.ctx):
            coll.attempt = None
            self.confirmed += 1
            self.tags.settled(attempt.ctx.epoch, attempt.ctx.tag, attempt.ctx.op_id, True)
            try:
                return await self._await_body(coll, first, attempt.task, attempt.ctx.peers)
            except BaseException:
                self.tags.burn(attempt.ctx.epoch, attempt.ctx.op_id)
                raise
        await self.drop(coll, f"the master started it as op {first.op_id}")
        return await self._run_body(coll, first, body)

    async def _confirmed(self, coll: Collective, attempt: _Attempt, done: P.CollectiveDone) -> Any:
        """The master confirmed the attempt and announced the outcome in one message."""
        coll.attempt = None
        self.confirmed += 1
        ctx, task = attempt.ctx, attempt.task
        if done.success and task.done() and not task.cancelled() and task.exception() is None:
            self.tags.settled(ctx.epoch, ctx.tag, ctx.op_id, True)
            return task.result()
        await _stop(task)  # another member failed: stop waiting for its data
        _forget(ctx.peers, ctx.op_id)
        self.tags.burn(ctx.epoch, ctx.op_id)
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, PeerLostError):
            raise failure
        raise error_for(done.error or P.ERROR_PEER_LOST, done.reason) from failure

    async def drop(self, coll: Collective, reason: str) -> None:
        """Give up an unconfirmed attempt: stop its body, abort its tag on both links. Idempotent.

        The neighbours' attempts of the tag fail at once (they are dropped too: every
        member gets the same answer), and bytes of it held on either side are discarded.
        """
        attempt = coll.attempt
        if attempt is None:
            return
        try:
            await _stop(attempt.task)  # raises only once the task is over
        finally:
            if not coll.start.done() and not coll.attempt_reported:
                # No answer yet (the caller gave up, or the session is failing): should the
                # master confirm the attempt, the op must not wait for this member.
                self._report_attempt(coll, False, reason)
            coll.attempt = None
            self.dropped += 1
            xtag = attempt.ctx.op_id
            self.tags.settled(attempt.ctx.epoch, attempt.ctx.tag, xtag, False)
            if attempt.ctx.peers is not None:
                why = f"peer {self._me()}: optimistic start of tag {attempt.ctx.tag} dropped: {reason}"
                attempt.ctx.peers.abort(xtag, why)

    async def _run_body(
        self, coll: Collective, start: P.CollectiveStart, body: Callable[[CollectiveContext], Awaitable[T]]
    ) -> T:
        try:
            peers = self._links.ring_peers(start.ring)
            me = start.ring.index(self._me())
        except PeerLostError as exc:
            return await self._report(coll, start, None, exc)
        ctx = CollectiveContext(start.tag, start.op_id, start.epoch, list(start.ring), me, len(start.ring), peers)
        task: asyncio.Task[T] = asyncio.get_running_loop().create_task(_call(body, ctx))
        return await self._await_body(coll, start, task, peers)

    async def _await_body(
        self, coll: Collective, start: P.CollectiveStart, task: asyncio.Task[T], peers: LinkRingPeers | None
    ) -> T:
        try:
            await asyncio.wait([task, coll.done], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        except asyncio.CancelledError:
            await _stop(task)
            raise
        if not task.done():
            # The master aborted the operation (or is gone): stop waiting for data.
            await _stop(task)
            _forget(peers, start.op_id)
            done = await coll.done
            raise error_for(done.error or P.ERROR_PEER_LOST, done.reason)
        failure = task.exception()
        if failure is not None:
            _forget(peers, start.op_id)
        return await self._report(coll, start, task, failure)

    async def _report(
        self, coll: Collective, start: P.CollectiveStart, task: asyncio.Task[T] | None, failure: BaseException | None
    ) -> T:
        """Tell the master how this peer's part ended; the operation's outcome."""
        reason = "" if failure is None else f"{type(failure).__name__}: {failure}"
        coll.reported = True
        self._send(P.CollectiveComplete(start.tag, start.op_id, failure is None, reason))
        done = await coll.done
        if done.success and failure is None and task is not None:
            return task.result()
        if failure is not None and not isinstance(failure, PeerLostError):
            raise failure
        raise error_for(done.error or P.ERROR_PEER_LOST, done.reason or reason) from failure


def _confirms(start: P.CollectiveStart, ctx: CollectiveContext) -> bool:
    """Whether the master started the operation exactly as the attempt runs it."""
    return start.op_id == ctx.op_id and start.epoch == ctx.epoch and list(start.ring) == ctx.ring


async def _call(body: Callable[[CollectiveContext], Awaitable[T]], ctx: CollectiveContext) -> T:
    return await body(ctx)


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it really stopped (it may touch caller buffers), even if
    this wait is itself cancelled; that cancellation is re-raised afterwards."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled():
        task.exception()  # retrieved: the attempt's own failure is not the outcome
    if interrupted:
        raise asyncio.CancelledError


def _forget(peers: LinkRingPeers | None, op_id: int) -> None:
    if peers is not None:
        peers.forget(op_id)
