"""Hypothesis state-machine test of the sans-IO master (``pccl.master_state``).

Simulated peers drive :class:`MasterState` with every kind of event: registering,
reporting links, voting, collectives, shared-state syncs, dying, going silent, time
passing and illegal messages. Each simulated peer checks that what it receives makes
sense for what it asked (no spurious results, collectives start only on links it
reported ready). Invariants are checked after every step, and at the end all peers
behave and the run must drain completely: nothing ever waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pccl import master_votes
from pccl import protocol as P
from pccl.master_state import (
    Bind,
    Kick,
    Log,
    MasterState,
    PeerLost,
    Received,
    Refuse,
    RegisterRequest,
    Send,
    Tick,
)

TIMEOUT = 2.0
# Faults fire when this draws 0, so runs live long enough to reach deep states.
CHAOS = st.integers(0, 3)
HASHES = [b"\x01" * 16, b"\x02" * 16]


@dataclass
class SimPeer:
    """What one well-behaved peer knows and waits for."""

    conn: int
    group: int
    id: int | None = None
    joined: bool = False
    epoch: int = 0
    ring: list[int] = field(default_factory=list)
    ready_sent: int = 0
    failed_sent: int = 0
    waiting_vote: str | None = None
    in_flight: dict[int, int] = field(default_factory=dict)  # tag -> op_id (0 = not started)
    descriptors: dict[int, dict[str, Any]] = field(default_factory=dict)
    sync: str | None = None  # None | "report" | "plan"
    sync_id: int = 0
    revision: int = 0
    silent: bool = False
    last_sent: float = 0.0
    gone: str | None = None  # why this peer is no longer in the run

    def idle(self) -> bool:
        return self.joined and self.waiting_vote is None and self.sync is None and self.gone is None

    def can_vote(self) -> bool:
        return self.idle() and not self.in_flight


class MasterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = MasterState(TIMEOUT)
        self.now = 0.0
        self.sims: dict[int, SimPeer] = {}  # by conn
        self.by_id: dict[int, SimPeer] = {}
        self.next_conn = 1
        self.kick_actions: list[Kick] = []

    # -- plumbing -------------------------------------------------------------------

    def feed(self, event: Any) -> None:
        for action in self.state.handle(self.now, event):
            self.apply(action)

    def send(self, sim: SimPeer, msg: Any) -> None:
        assert sim.id is not None
        sim.last_sent = self.now
        self.feed(Received(sim.id, msg))

    def apply(self, action: Any) -> None:
        if isinstance(action, Bind):
            sim = self.sims[action.conn]
            sim.id = action.peer
            assert action.peer not in self.by_id, "peer ids are never reused"
            self.by_id[action.peer] = sim
        elif isinstance(action, Refuse):
            assert action.reason
            self.sims[action.conn].gone = f"refused: {action.reason}"
        elif isinstance(action, Kick):
            assert action.reason, "every kick carries a reason"
            assert action.error in P.ERROR_KINDS
            # Every simulated peer reports its own revision + 1, so a round can only lack a
            # holder of the target revision if the master judged a newcomer against the
            # revision of members that are gone (§5.9).
            assert "holds the expected shared-state revision" not in action.reason, action
            self.kick_actions.append(action)
            self.by_id[action.peer].gone = f"kicked: {action.reason}"
        elif isinstance(action, Send):
            sim = self.by_id[action.peer]
            assert sim.gone is None, "nothing is sent to a removed peer"
            self.deliver(sim, action.msg)
        else:
            assert isinstance(action, Log)
            event(action.event)  # coverage of the master's transitions, see --hypothesis-show-statistics

    def deliver(self, sim: SimPeer, msg: Any) -> None:
        if isinstance(msg, P.RingUpdate):
            assert msg.epoch > sim.epoch and sim.id in msg.ring and msg.group == sim.group
            sim.epoch, sim.ring = msg.epoch, list(msg.ring)
        elif isinstance(msg, P.Accepted):
            assert not sim.joined and sim.ready_sent == sim.epoch > 0
            sim.joined = True
        elif isinstance(msg, P.VoteResult):
            assert sim.waiting_vote == msg.kind, (sim, msg)
            assert msg.ok or msg.reason
            sim.waiting_vote = None
        elif isinstance(msg, P.CollectiveStart):
            assert sim.in_flight.get(msg.tag) == 0
            # Started only once this peer reported links ready for that very ring.
            assert msg.epoch == sim.epoch == sim.ready_sent and msg.ring == sim.ring
            sim.in_flight[msg.tag] = msg.op_id
        elif isinstance(msg, P.CollectiveDone):
            assert msg.tag in sim.in_flight and sim.in_flight[msg.tag] in (0, msg.op_id, -msg.op_id)
            assert msg.success or (msg.reason and msg.error in P.ERROR_KINDS)
            del sim.in_flight[msg.tag]
            del sim.descriptors[msg.tag]
        elif isinstance(msg, P.SyncPlan):
            assert sim.sync == "report"
            sim.sync, sim.sync_id = "plan", msg.sync_id
        elif isinstance(msg, P.SyncResult):
            assert sim.sync is not None
            assert msg.ok or msg.reason
            sim.sync = None
            if msg.ok:
                sim.revision = msg.revision
        else:
            assert isinstance(msg, (P.Welcome, P.WorldInfo)), msg

    def live(self) -> list[SimPeer]:
        return [s for s in self.sims.values() if s.id is not None and s.gone is None]

    # -- rules ------------------------------------------------------------------------

    @initialize(groups=st.lists(st.integers(0, 1), min_size=1, max_size=4))
    def establish(self, groups: list[int]) -> None:
        """Start from a running job: peers registered, accepted and linked."""
        for group in groups:
            self._register(group, "127.0.0.1")
        self._drain()
        for sim in self.live():
            if sim.can_vote():
                sim.waiting_vote = P.UPDATE_TOPOLOGY
                self.send(sim, P.Vote(P.UPDATE_TOPOLOGY))
        self._drain()
        assert len(self.state.accepted()) == len(groups)

    @rule(group=st.integers(0, 1))
    def register(self, group: int) -> None:
        self._register(group, "127.0.0.1")

    def _register(self, group: int, host: str) -> SimPeer:
        conn = self.next_conn
        self.next_conn += 1
        sim = SimPeer(conn, group, last_sent=self.now)
        self.sims[conn] = sim
        self.feed(RegisterRequest(conn, P.Register(group, 4000 + conn), host))
        assert (sim.id is None) != (sim.gone is None)
        return sim

    @rule(group=st.integers(0, 1), dice=CHAOS)
    def register_remote(self, group: int, dice: int) -> None:
        if dice == 0:
            loopback_run = any(i.loopback for i in self.state.peers.values())
            sim = self._register(group, "10.0.0.7")
            # Loopback and remote peers are never mixed silently.
            assert (sim.gone is not None) == loopback_run
            assert sim.gone is None or "advertise_host" in sim.gone

    @rule(data=st.data())
    def links_ready(self, data: st.DataObject) -> None:
        cands = [s for s in self.live() if s.epoch > max(s.ready_sent, s.failed_sent)]
        if cands:
            sim = data.draw(st.sampled_from(cands))
            sim.ready_sent = sim.epoch
            self.send(sim, P.LinksReady(sim.epoch))

    @rule(data=st.data(), dice=CHAOS)
    def link_fails(self, data: st.DataObject, dice: int) -> None:
        cands = [s for s in self.live() if s.epoch > max(s.ready_sent, s.failed_sent) and len(s.ring) > 1]
        if cands and dice == 0:
            sim = data.draw(st.sampled_from(cands))
            sim.failed_sent = sim.epoch
            assert sim.id is not None
            nxt = sim.ring[(sim.ring.index(sim.id) + 1) % len(sim.ring)]
            self.send(sim, P.LinkFailed(sim.epoch, nxt, "connection refused"))

    @rule(data=st.data(), kind=st.sampled_from(P.VOTE_KINDS))
    def vote(self, data: st.DataObject, kind: str) -> None:
        cands = [s for s in self.live() if s.can_vote()]
        if cands:
            sim = data.draw(st.sampled_from(cands))
            sim.waiting_vote = kind
            self.send(sim, P.Vote(kind))

    @rule(data=st.data(), tag=st.integers(0, 2), numel=st.sampled_from([4, 4, 4, 8]))
    def initiate(self, data: st.DataObject, tag: int, numel: int) -> None:
        cands = [s for s in self.live() if s.idle() and tag not in s.in_flight]
        if cands:
            sim = data.draw(st.sampled_from(cands))
            self._initiate(sim, tag, {"kind": "all_reduce", "numel": numel})

    def _initiate(self, sim: SimPeer, tag: int, desc: dict[str, Any]) -> None:
        sim.in_flight[tag] = 0
        sim.descriptors[tag] = desc
        self.send(sim, P.CollectiveInitiate(tag, desc))

    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data: st.DataObject, ok: bool) -> None:
        cands = [(s, t) for s in self.live() for t, op in s.in_flight.items() if op > 0]
        if cands:
            sim, tag = data.draw(st.sampled_from(cands))
            op = sim.in_flight[tag]
            sim.in_flight[tag] = -op  # reported: wait for CollectiveDone
            self.send(sim, P.CollectiveComplete(tag, op, ok, "" if ok else "link broke"))

    @rule(data=st.data(), which=st.integers(0, 1))
    def sync_report(self, data: st.DataObject, which: int) -> None:
        cands = [s for s in self.live() if s.can_vote()]
        if cands:
            sim = data.draw(st.sampled_from(cands))
            self._sync_report(sim, HASHES[which])

    def _sync_report(self, sim: SimPeer, digest: bytes) -> None:
        sim.sync = "report"
        report = P.SyncReport(sim.revision + 1, "enforce_popular", ["w"], [digest], ["float32"], [[4]], [16], [False])
        self.send(sim, report)

    @rule(data=st.data(), ok=st.booleans())
    def sync_done(self, data: st.DataObject, ok: bool) -> None:
        cands = [s for s in self.live() if s.sync == "plan"]
        if cands:
            sim = data.draw(st.sampled_from(cands))
            sim.sync = "done"
            self.send(sim, P.SyncDone(sim.sync_id, ok, "" if ok else "distributor vanished"))

    @rule(data=st.data(), graceful=st.booleans(), dice=CHAOS)
    def die(self, data: st.DataObject, graceful: bool, dice: int) -> None:
        cands = self.live()
        if cands and dice == 0:
            sim = data.draw(st.sampled_from(cands))
            assert sim.id is not None
            if graceful:
                self.send(sim, P.Leave())
            else:
                self.feed(PeerLost(sim.id, "connection reset"))
            assert sim.id not in self.state.peers
            sim.gone = "died"

    @rule(data=st.data(), dice=CHAOS)
    def silence(self, data: st.DataObject, dice: int) -> None:
        cands = [s for s in self.live() if not s.silent]
        if cands and dice == 0:
            data.draw(st.sampled_from(cands)).silent = True

    @rule(dt=st.floats(0.05, 1.5))
    def tick(self, dt: float) -> None:
        self.now += dt
        for sim in self.live():
            if not sim.silent:
                self.send(sim, P.Heartbeat())
        self.feed(Tick())
        for sim in self.live():
            # A peer silent for longer than the timeout is gone after a tick.
            assert self.now - sim.last_sent <= TIMEOUT

    @rule(data=st.data(), which=st.integers(0, 6), dice=CHAOS)
    def illegal(self, data: st.DataObject, which: int, dice: int) -> None:
        cands = self.live()
        if not cands or dice != 0:
            return
        sim = data.draw(st.sampled_from(cands))
        msg = [
            P.Register(0, 1),
            P.WorldInfo(1, 1, 1),
            P.Vote("bogus"),
            P.LinksReady(10_000),
            P.CollectiveComplete(0, 10**9, True),
            P.SyncDone(10**9, True),
            P.Accepted(),
        ][which]
        self.send(sim, msg)
        assert sim.gone is not None and sim.gone.startswith("kicked: ")
        assert sim.id in self.state.kicks

    @precondition(lambda self: any(s.in_flight and s.idle() for s in self.live()))
    @rule(data=st.data())
    def vote_while_busy(self, data: st.DataObject) -> None:
        sim = data.draw(st.sampled_from([s for s in self.live() if s.in_flight and s.idle()]))
        self.send(sim, P.Vote(P.UPDATE_TOPOLOGY))
        assert sim.gone is not None and "in flight" in sim.gone

    @rule(moves=st.integers(1, 6))
    def behave(self, moves: int) -> None:
        """Some well-behaved moves (answer rings, complete ops, join open rounds)."""
        for _ in range(moves):
            if not self._behave_once():
                return

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def one_ring_per_group(self) -> None:
        seen: set[int] = set()
        for gid, group in self.state.groups.items():
            assert group.ring and len(set(group.ring)) == len(group.ring)
            assert not seen & set(group.ring)
            seen |= set(group.ring)
            members = {p for p, i in self.state.peers.items() if i.accepted and i.group == gid}
            assert set(group.ring) == members
        assert seen == set(self.state.accepted())

    @invariant()
    def kicked_never_accepted(self) -> None:
        assert not set(self.state.kicks) & set(self.state.peers)
        assert all(self.state.kicks.values())

    @invariant()
    def dead_peers_block_nothing(self) -> None:
        live = set(self.state.peers)
        rnd = self.state.round
        if rnd is not None:
            assert rnd.voters <= live and rnd.joiners <= live
        for group in self.state.groups.values():
            for coll in group.collectives.values():
                assert set(coll.participants()) <= live
                assert set(coll.descriptors) <= live
            if group.sync is not None:
                assert set(group.sync.reports) <= live and group.sync.plans <= live

    @invariant()
    def rounds_resolve_once_everyone_voted(self) -> None:
        rnd = self.state.round
        if rnd is not None and not rnd.linking:
            assert set(self.state.accepted()) - rnd.voters
        if rnd is not None and rnd.linking:
            assert any(not g.links_ready() for g in self.state.groups.values())
        for group in self.state.groups.values():
            # A group is only ever blocked for a bounded grace, waiting for a departure.
            assert group.drop_at is None or group.drop_at <= self.now + 1.0
        for group in self.state.groups.values():
            for coll in group.collectives.values():
                if coll.op_id:
                    # Unfinished, and no failure report left unanswered.
                    assert set(coll.ring) - set(coll.reports)
                    assert all(ok for ok, _ in coll.reports.values())
                else:
                    assert set(group.ring) - set(coll.descriptors) or not group.links_ready()
            if group.sync is not None and not group.sync.fetching:
                assert set(group.ring) - set(group.sync.reports)

    @invariant()
    def revision_is_held_by_a_live_member(self) -> None:
        for group in self.state.groups.values():
            assert group.holders <= set(group.ring)
            # Once no member holds it, the group's revision is forgotten: the next sync is
            # a first sync, at whatever revision the members bring (§5.9).
            assert (group.last_revision is None) == (not group.holders)

    @invariant()
    def no_wait_cycles(self) -> None:
        assert not master_votes._cycle_nodes(master_votes._wait_graph(self.state))

    @invariant()
    def model_matches_master(self) -> None:
        for sim in self.live():
            assert sim.id is not None
            info = self.state.peers[sim.id]
            assert info.accepted or not sim.joined
            assert set(info.in_flight) == set(sim.in_flight)

    # -- liveness: once everyone behaves, everything completes --------------------

    def teardown(self) -> None:
        for sim in self.live():
            if sim.silent:
                assert sim.id is not None
                self.feed(PeerLost(sim.id, "silent"))
                sim.gone = "died"
        self._drain()
        voters = [s for s in self.live() if s.can_vote()]
        for sim in voters:
            sim.waiting_vote = P.UPDATE_TOPOLOGY
            self.send(sim, P.Vote(P.UPDATE_TOPOLOGY))
        self._drain()
        assert self.state.round is None
        for group in self.state.groups.values():
            assert not group.collectives and group.sync is None and group.links_ready()
        for sim in self.live():
            assert sim.waiting_vote is None and not sim.in_flight and sim.sync is None
        if self.state.accepted():
            assert not self.state.pending()
            assert all(s.joined for s in self.live())

    def _drain(self) -> None:
        for _ in range(500):
            if self._behave_once():
                continue
            if not any(g.drop_at is not None for g in self.state.groups.values()):
                return
            self.tick(1.0)  # a group waits out the grace before dropping a peer
        raise AssertionError("the run did not drain")

    def _behave_once(self) -> bool:
        for sim in self.live():
            if sim.epoch > sim.ready_sent:
                sim.ready_sent = sim.epoch
                self.send(sim, P.LinksReady(sim.epoch))
                return True
            for tag, op in sim.in_flight.items():
                if op > 0:
                    sim.in_flight[tag] = -op
                    self.send(sim, P.CollectiveComplete(tag, op, True))
                    return True
            if sim.sync == "plan":
                sim.sync = "done"
                self.send(sim, P.SyncDone(sim.sync_id, True))
                return True
        for sim in self.live():
            rnd = self.state.round
            if rnd is not None and not rnd.linking and sim.can_vote():
                sim.waiting_vote = rnd.kind
                self.send(sim, P.Vote(rnd.kind))
                return True
            group = self.state.groups.get(sim.group)
            if group is None or not sim.idle():
                continue
            for tag, coll in sorted(group.collectives.items()):
                if not coll.op_id and tag not in sim.in_flight:
                    self._initiate(sim, tag, dict(next(iter(coll.descriptors.values()))))
                    return True
            if group.sync is not None and not group.sync.fetching and not sim.in_flight:
                self._sync_report(sim, HASHES[0])
                return True
        return False


MasterMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMasterMachine = MasterMachine.TestCase
