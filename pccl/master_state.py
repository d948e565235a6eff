"""The master's membership logic as a sans-IO state machine (``docs/protocol.md`` §5).

:class:`MasterState` takes events (a registration request, a decoded message from a
peer, a lost connection, a clock tick) and returns actions (bind a connection to a
peer id, refuse it, send a message, kick a peer, log a line). It never touches a
socket, an event loop or the clock: the server passes ``now`` with every event.

The rules live in three places: this module (peers, registration, rings and links,
heartbeats, removal), :mod:`pccl.master_votes` (membership and shared-state rounds,
deadlock breaking) and :mod:`pccl.master_collectives` (collective rounds). After
every event :meth:`MasterState.handle` *settles* the state: it rebuilds the rings
that changed, then lets every open round make progress, until nothing changes.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from pccl import master_collectives as colls
from pccl import master_votes as votes
from pccl import protocol as P
from pccl.master_rings import choose_drop, find_ring, neighbours

ElectFn = Callable[[Mapping[int, Any], "int | None"], Any]
Optimizer = Callable[[int, list[int]], list[int]]

DEFAULT_HEARTBEAT_TIMEOUT = 5.0
# Seconds each bandwidth probe of optimize_topology transfers for (§5.12).
DEFAULT_PROBE_SECONDS = 0.5
# Heartbeats are sent this many times per timeout, so a few lost ones are tolerated.
HEARTBEATS_PER_TIMEOUT = 5
# How long a group with no valid ring waits for a departure before dropping a peer.
MAX_DROP_GRACE = 1.0
MAX_GROUP = 2**31 - 1
# Kicks and departures kept for the status page (``pccl.status``): enough to see a
# recent incident, bounded so a long run with churn does not grow the master.
RECENT_REMOVALS = 32


# --- events ---------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterRequest:
    """Connection ``conn`` (a token chosen by the server) sent :class:`~pccl.protocol.Register`.

    ``observed_host`` is the address the master sees the connection come from.
    """

    conn: int
    msg: P.Register
    observed_host: str


@dataclass(frozen=True)
class Received:
    """Peer ``peer`` sent ``msg``."""

    peer: int
    msg: Any


@dataclass(frozen=True)
class PeerLost:
    """The connection of ``peer`` closed or failed."""

    peer: int
    reason: str


@dataclass(frozen=True)
class Tick:
    """Time passed: check heartbeats (§5.8)."""


Event = Union[RegisterRequest, Received, PeerLost, Tick]


# --- actions --------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """Connection ``conn`` now belongs to peer ``peer``."""

    conn: int
    peer: int


@dataclass(frozen=True)
class Refuse:
    """Tell connection ``conn`` why it is refused (a :class:`~pccl.protocol.Kicked`), then close it."""

    conn: int
    reason: str


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to ``peer``."""

    peer: int
    msg: Any


@dataclass(frozen=True)
class Kick:
    """Send ``peer`` a :class:`~pccl.protocol.Kicked` with ``reason``, then close its connection."""

    peer: int
    reason: str
    error: str = P.ERROR_MASTER


@dataclass(frozen=True)
class Log:
    """A structured log line: ``event`` plus key/value ``fields``."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = Union[Bind, Refuse, Send, Kick, Log]


# --- state ----------------------------------------------------------------------


@dataclass
class PeerInfo:
    """One live peer: registered (pending) or accepted."""

    id: int
    group: int
    host: str
    port: int
    loopback: bool
    last_seen: float
    accepted: bool = False
    # Accepted by a round whose links are not all ready yet: connect() has not returned.
    joining: bool = False
    accept_seq: int = 0
    # Collective tags this peer initiated that are not done yet.
    in_flight: set[int] = field(default_factory=set)
    # The WorldInfo numbers this peer was last told.
    stats_sent: tuple[int, int, int] | None = None


@dataclass
class GroupState:
    """One peer group: its ring, link readiness, collectives and shared-state bookkeeping."""

    id: int
    ring: list[int] = field(default_factory=list)
    epoch: int = 0
    # Members that reported links ready for ``epoch``.
    ready: set[int] = field(default_factory=set)
    # Directed (sender, receiver) pairs that could not connect: avoided in rings.
    forbidden: set[tuple[int, int]] = field(default_factory=set)
    # The ring's members or order must be re-decided (and the epoch bumped) when settling.
    dirty: bool = False
    # No ring avoids the failed pairs: a peer is dropped at this time unless a departure
    # resolves it first (the unreachable peer is often one that just died, §5.4).
    drop_at: float | None = None
    collectives: dict[int, "colls.CollectiveRound"] = field(default_factory=dict)
    sync: "votes.SyncRound | None" = None
    last_revision: int | None = None
    # Live members that hold ``last_revision`` (the peers of the sync that set it). When
    # the last of them is gone nobody vouches for it any more and it is forgotten (§5.9).
    holders: set[int] = field(default_factory=set)

    def links_ready(self) -> bool:
        """Every member reported its links ready for the current epoch."""
        return not self.dirty and self.drop_at is None and self.ready >= set(self.ring)


@dataclass(frozen=True)
class Removal:
    """A peer that was kicked or left, at master time ``at`` (for the status page)."""

    at: float
    peer: int
    group: int
    reason: str
    error: str = ""  # the error kind of a kick; empty for a departure


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class MasterState:
    """Membership, rings, rounds and collectives of one run; events in, actions out.

    ``heartbeat_timeout``: a peer silent for longer is kicked at the next :class:`Tick`.
    ``elect``: the shared-state election (``pccl.election.elect`` by default).
    ``optimizer``: ``(group, ring) -> new ring`` applied by an ``optimize_topology``
    round. Without one, ``measure_bandwidth`` makes that round measure the directed
    bandwidths the master lacks (probes of ``probe_seconds``) and apply the ring of
    :mod:`pccl.topology` (§5.12); the server enables it. Neither: the order is kept.
    ``bandwidth`` holds the measurements, ``(sender, receiver) -> bytes/s`` (0: failed).
    """

    def __init__(
        self,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        *,
        elect: ElectFn | None = None,
        optimizer: Optimizer | None = None,
        measure_bandwidth: bool = False,
        probe_seconds: float = DEFAULT_PROBE_SECONDS,
    ) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive")
        if elect is None:
            from pccl.election import elect as default_elect

            elect = default_elect
        self.heartbeat_timeout = heartbeat_timeout
        self.elect: ElectFn = elect
        self.optimizer = optimizer
        self.measure_bandwidth = measure_bandwidth
        self.probe_seconds = probe_seconds
        self.bandwidth: dict[tuple[int, int], float] = {}  # measured pairs of live peers (§5.12)
        self.peers: dict[int, PeerInfo] = {}
        self.groups: dict[int, GroupState] = {}
        self.round: votes.MembershipRound | None = None
        self.kicks: dict[int, str] = {}  # every kicked peer and why (never cleared)
        self.departures: dict[int, str] = {}  # peers that left or lost their connection
        self.recent_kicks: deque[Removal] = deque(maxlen=RECENT_REMOVALS)
        self.recent_departures: deque[Removal] = deque(maxlen=RECENT_REMOVALS)
        # Running ops: (group, op_id) -> tag. Optimistic op ids are only unique within a
        # group (its links are its own); counted ones are unique in the run (§5.6.2).
        self.ops: dict[tuple[int, int], int] = {}
        self.next_peer_id = 1
        self.next_op_id = 1
        self.next_sync_id = 1
        self.next_probe_id = 1
        self._accept_seq = 0
        self.now = 0.0
        self._out: list[Action] = []

    # -- public ------------------------------------------------------------------

    def handle(self, now: float, event: Event) -> list[Action]:
        """Apply one event at time ``now`` (seconds, any monotonic origin); return the actions.

        Raises ``TypeError`` for an object that is not an :data:`Event`; peer
        misbehaviour never raises, it kicks that peer.
        """
        self.now = now
        if isinstance(event, Received) and self._collective_fast_path(event.peer, event.msg):
            out, self._out = self._out, []
            return out
        if isinstance(event, Received):
            self._on_received(event.peer, event.msg)
        elif isinstance(event, RegisterRequest):
            self._on_register(event)
        elif isinstance(event, PeerLost):
            if event.peer in self.peers:
                self.log("lost", peer=event.peer, reason=event.reason)
                self.remove(event.peer, event.reason)
        elif isinstance(event, Tick):
            self._on_tick()
        else:
            raise TypeError(f"not a master event: {event!r}")
        self._settle()
        out, self._out = self._out, []
        return out

    def _collective_fast_path(self, peer: int, msg: Any) -> bool:
        """Handle a collective initiate/complete touching only its own round (§5.11); False
        when the message needs the full settle instead."""
        group = colls.quiet_group(self, peer, msg)
        if group is None:
            return False
        kicks = len(self.kicks)
        self.peers[peer].last_seen = self.now
        coll = colls.on_message(self, peer, msg)
        if coll is not None and len(self.kicks) == kicks:
            colls.progress_round(self, group, coll)
        if len(self.kicks) != kicks or group.dirty:
            self._settle()  # a kick or a failed op: rings, rounds and stats may all change
        return True

    @property
    def heartbeat_interval(self) -> float:
        """How often both sides send heartbeats (§5.8)."""
        return self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT

    def accepted(self) -> list[int]:
        """Accepted peer ids, ascending."""
        return sorted(p for p, i in self.peers.items() if i.accepted)

    def pending(self) -> list[int]:
        """Registered peers not accepted yet, ascending."""
        return sorted(p for p, i in self.peers.items() if not i.accepted)

    def stats(self) -> tuple[int, int, int]:
        """``(global_world_size, num_peer_groups, largest_peer_group_size)``."""
        sizes = [len(g.ring) for g in self.groups.values() if g.ring]
        return (sum(sizes), len(sizes), max(sizes, default=0))

    def blocked_in(self, peer: int) -> str | None:
        """The blocking round ``peer`` waits in (a membership vote or a shared-state sync), if any."""
        rnd = self.round
        if rnd is not None and (peer in rnd.voters or peer in rnd.joiners):
            return rnd.kind if peer in rnd.voters else "connect"
        info = self.peers.get(peer)
        if info is not None and info.group in self.groups:
            sync = self.groups[info.group].sync
            if sync is not None and peer in sync.reports:
                return "sync_shared_state"
        return None

    # -- helpers used by the round modules ----------------------------------------

    def send(self, peer: int, msg: Any) -> None:
        """Queue ``msg`` for ``peer`` if it is still live."""
        if peer in self.peers:
            self._out.append(Send(peer, msg))

    def log(self, event: str, **fields: Any) -> None:
        """Queue a structured log line."""
        self._out.append(Log(event, fields))

    def kick(self, peer: int, reason: str, error: str = P.ERROR_MASTER) -> None:
        """Remove ``peer``, recording ``reason`` and telling it (§5.7)."""
        if peer not in self.peers:
            return
        self.kicks[peer] = reason
        self.recent_kicks.append(Removal(self.now, peer, self.peers[peer].group, reason, error))
        self._out.append(Kick(peer, reason, error))
        self.log("kick", peer=peer, reason=reason)
        self.remove(peer, f"kicked: {reason}", record=False)

    def remove(self, peer: int, reason: str, *, record: bool = True) -> None:
        """Forget ``peer`` and re-evaluate everything that waited for it (§5.7)."""
        info = self.peers.pop(peer)
        if record:
            self.departures[peer] = reason
            self.recent_departures.append(Removal(self.now, peer, info.group, reason))
        if not info.accepted:
            return
        group = self.groups[info.group]
        group.ring.remove(peer)
        group.ready.discard(peer)
        group.forbidden = {e for e in group.forbidden if peer not in e}
        group.dirty = True
        colls.abort_group(self, group, f"peer {peer} left the group ({reason})")
        votes.on_peer_removed(self, peer, group)

    def accept(self, peer: int) -> None:
        """Make a pending peer a member of its group's ring (applied when settling)."""
        info = self.peers[peer]
        self._accept_seq += 1
        info.accepted, info.joining, info.accept_seq = True, True, self._accept_seq
        group = self.groups.setdefault(info.group, GroupState(info.group))
        group.ring.append(peer)
        group.dirty = True
        self.log("accept", peer=peer, group=info.group)

    def publish_stats(self) -> None:
        """Tell every accepted peer the run-wide sizes if they changed for it."""
        stats = self.stats()
        for peer in sorted(self.peers):
            info = self.peers[peer]
            if info.accepted and info.stats_sent != stats:
                info.stats_sent = stats
                self.send(peer, P.WorldInfo(*stats))

    # -- event handlers -----------------------------------------------------------

    def _on_register(self, ev: RegisterRequest) -> None:
        msg = ev.msg
        host = msg.advertise_host or ev.observed_host
        reason = self._registration_problem(msg, host)
        if reason is not None:
            self._out.append(Refuse(ev.conn, reason))
            self.log("refuse", host=host, reason=reason)
            return
        peer = self.next_peer_id
        self.next_peer_id += 1
        self.peers[peer] = PeerInfo(peer, msg.group, host, msg.p2p_port, is_loopback(host), self.now)
        self._out.append(Bind(ev.conn, peer))
        self.send(peer, P.Welcome(peer, self.heartbeat_interval, self.heartbeat_timeout))
        self.log("join", peer=peer, group=msg.group, address=f"{host}:{msg.p2p_port}")

    def _registration_problem(self, msg: P.Register, host: str) -> str | None:
        if not 0 <= msg.group <= MAX_GROUP:
            return f"peer group {msg.group} is out of range 0..{MAX_GROUP}"
        if not 0 < msg.p2p_port < 65536:
            return f"p2p port {msg.p2p_port} is not a valid TCP port"
        if not host:
            return "empty advertised host"
        loop = is_loopback(host)
        for other in self.peers.values():
            if other.loopback != loop:
                # Mixing would give the remote peers an address they cannot dial (§5.3).
                kind, their = ("loopback", "remote") if loop else ("remote", "loopback")
                return (
                    f"address {host} is {kind} but peer {other.id} of this run is {their} "
                    f"({other.host}); start every peer with an advertise_host the others can reach"
                )
        return None

    def _on_received(self, peer: int, msg: Any) -> None:
        info = self.peers.get(peer)
        if info is None:
            return  # a message that was in flight when the peer was removed
        info.last_seen = self.now
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            self.kick(peer, f"unexpected message {type(msg).__name__} from a peer")
            return
        handler(self, peer, msg)

    def _on_heartbeat(self, peer: int, msg: P.Heartbeat) -> None:
        pass  # last_seen is updated for every message

    def _on_leave(self, peer: int, msg: P.Leave) -> None:
        self.log("leave", peer=peer)
        self.remove(peer, "left the run")

    def _on_register_again(self, peer: int, msg: P.Register) -> None:
        self.kick(peer, "sent Register twice on one connection")

    def _on_tick(self) -> None:
        for group in self.groups.values():
            if group.drop_at is not None and self.now >= group.drop_at:
                group.dirty = True  # grace over: the rebuild drops a peer
        for peer in sorted(self.peers):
            info = self.peers.get(peer)
            if info is None:
                continue
            silent = self.now - info.last_seen
            if silent > self.heartbeat_timeout:
                self.kick(
                    peer,
                    f"silent for {silent:.2f} s, over the heartbeat timeout of "
                    f"{self.heartbeat_timeout:g} s (hung process or network partition)",
                )

    def _member_group(self, peer: int, what: str) -> GroupState | None:
        """The group of an accepted peer, or kick it for sending ``what`` too early."""
        info = self.peers[peer]
        if not info.accepted:
            self.kick(peer, f"sent {what} before being accepted")
            return None
        return self.groups[info.group]

    def _on_links_ready(self, peer: int, msg: P.LinksReady) -> None:
        group = self._member_group(peer, "LinksReady")
        if group is None or not self._epoch_ok(peer, group, msg.epoch, "LinksReady"):
            return
        group.ready.add(peer)

    def _on_link_failed(self, peer: int, msg: P.LinkFailed) -> None:
        group = self._member_group(peer, "LinkFailed")
        if group is None or not self._epoch_ok(peer, group, msg.epoch, "LinkFailed"):
            return
        if len(group.ring) < 2 or neighbours(group.ring, peer)[1] != msg.peer:
            self.kick(peer, f"reported a failed link to peer {msg.peer}, which is not its next peer")
            return
        target = self.peers[msg.peer]
        reason = (
            f"peer {peer} could not connect to peer {msg.peer} at "
            f"{target.host}:{target.port}: {msg.reason}"
        )
        self.log("link_failed", group=group.id, sender=peer, receiver=msg.peer, reason=msg.reason)
        group.forbidden.add((peer, msg.peer))
        group.dirty = True
        votes.on_link_failure(self, (peer, msg.peer), reason)

    def _epoch_ok(self, peer: int, group: GroupState, epoch: int, what: str) -> bool:
        """True for the current epoch; False (ignored) for an old one; kicks for a future one."""
        if epoch > group.epoch:
            self.kick(peer, f"sent {what} for epoch {epoch}, which the master never announced")
            return False
        # An older epoch is a report that crossed a newer RingUpdate on the wire.
        return epoch == group.epoch and not group.dirty

    # -- settling -----------------------------------------------------------------

    def _settle(self) -> None:
        """Rebuild changed rings and let every round progress until nothing changes."""
        for _ in range(10_000):
            self._rebuild_rings()
            self.publish_stats()
            changed = votes.progress_membership(self)
            for group in list(self.groups.values()):
                changed |= votes.progress_sync(self, group)
                changed |= colls.progress(self, group)
            changed |= votes.break_deadlocks(self)
            if not changed and not any(g.dirty for g in self.groups.values()):
                return
        raise AssertionError("master state did not settle")  # a bug, never peer input

    def _rebuild_rings(self) -> None:
        for gid in sorted(self.groups):
            group = self.groups.get(gid)
            if group is None or not group.dirty:
                continue
            order = find_ring(group.ring, group.forbidden)
            if order is None and (group.drop_at is None or self.now < group.drop_at):
                if group.drop_at is None:
                    group.drop_at = self.now + min(MAX_DROP_GRACE, self.heartbeat_timeout / 2)
                    self.log("ring_blocked", group=gid, pairs=_pairs(group.forbidden), drop_at=group.drop_at)
                group.dirty, group.ready = False, set()
                continue
            group.drop_at = None
            while order is None:
                seqs = {p: self.peers[p].accept_seq for p in group.ring}
                victim = choose_drop(group.ring, group.forbidden, seqs)
                self.kick(
                    victim,
                    f"no ring of group {gid} avoids the peer pairs that could not connect "
                    f"({_pairs(group.forbidden)}); this peer was involved the most",
                    P.ERROR_TOPOLOGY,
                )
                order = find_ring(group.ring, group.forbidden)
            if not order:
                del self.groups[gid]
                continue
            group.ring, group.dirty, group.ready = order, False, set()
            group.epoch += 1
            hosts = [self.peers[p].host for p in order]
            ports = [self.peers[p].port for p in order]
            self.log("ring", group=gid, epoch=group.epoch, ring=order)
            for peer in order:
                self.send(peer, P.RingUpdate(gid, group.epoch, list(order), hosts, ports))


def _pairs(edges: set[tuple[int, int]]) -> str:
    return ", ".join(f"{a}->{b}" for a, b in sorted(edges))


_HANDLERS: dict[type, Callable[[MasterState, int, Any], object]] = {
    P.Heartbeat: MasterState._on_heartbeat,
    P.Leave: MasterState._on_leave,
    P.Register: MasterState._on_register_again,
    P.LinksReady: MasterState._on_links_ready,
    P.LinkFailed: MasterState._on_link_failed,
    P.Vote: votes.on_vote,
    P.SyncReport: votes.on_sync_report,
    P.SyncDone: votes.on_sync_done,
    P.CollectiveInitiate: colls.on_initiate,
    P.CollectiveComplete: colls.on_complete,
    P.BandwidthReport: votes.on_bandwidth_report,
}
