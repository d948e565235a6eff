"""Membership and shared-state rounds of the master state machine (``docs/protocol.md`` §5.5, §5.9).

Every round is unanimous among the live peers it needs: it resolves as soon as the
last of them has voted, and a peer that disappears is simply no longer needed, so a
round never waits for a dead peer. :func:`break_deadlocks` fails rounds that wait on
each other in a cycle (peers calling operations in different orders), so a program
error shows up as an error on every peer involved instead of a hang (§5.10).
An ``optimize_topology`` round of a measuring master has a phase between voting and
linking in which the peers measure the bandwidths the master lacks (§5.12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pccl import master_collectives as colls
from pccl import protocol as P
from pccl.bandwidth import probe_time_bound
from pccl.master_rings import Probe, ProbePlan, missing_pairs, optimize_ring

if TYPE_CHECKING:
    from pccl.master_state import GroupState, MasterState

# Lazily imported election types (pccl.election is pure; the import is only deferred
# so that a custom ``elect`` in tests needs nothing else).
NO_REVISION = -1
# The master gives up on a probe this long after the peer's own bound (§5.12).
PROBE_SLACK = 2.0
# A measured ring replaces the current one only if it is better by more than this
# fraction: noise between two measurements must not re-wire a ring (§5.12).
REWIRE_MARGIN = 0.1


@dataclass
class MembershipRound:
    """The open membership round (global: every accepted peer votes).

    A round first collects votes; once all live accepted peers voted it applies its
    change and enters the *linking* phase, which ends when every ring of every group
    reported links ready. ``concerned`` maps voters touched by a failed link to the
    reason they get (their call raises ``TopologyUpdateError``).
    """

    kind: str
    voters: set[int] = field(default_factory=set)
    linking: bool = False
    joiners: set[int] = field(default_factory=set)
    concerned: dict[int, str] = field(default_factory=dict)
    # optimize_topology: the bandwidth measurements between voting and linking (§5.12).
    probes: ProbePlan | None = None


@dataclass
class SyncRound:
    """One group's shared-state sync: reports, then (after the election) fetches."""

    sync_id: int
    reports: dict[int, Any] = field(default_factory=dict)
    fetching: bool = False
    revision: int = NO_REVISION
    plans: set[int] = field(default_factory=set)
    done: dict[int, tuple[bool, str]] = field(default_factory=dict)


# --- membership -----------------------------------------------------------------


def _may_start_blocking_call(state: MasterState, peer: int, what: str) -> bool:
    """Kick ``peer`` (and return False) if it may not start a blocking call now (§5.7)."""
    info = state.peers[peer]
    if not info.accepted or info.joining:
        state.kick(peer, f"sent {what} before its connect() completed")
        return False
    if info.in_flight:
        tags = ", ".join(str(t) for t in sorted(info.in_flight))
        state.kick(peer, f"sent {what} while collectives (tags {tags}) were in flight", P.ERROR_USAGE)
        return False
    blocked = state.blocked_in(peer)
    if blocked is not None:
        state.kick(peer, f"sent {what} while waiting in {blocked}", P.ERROR_USAGE)
        return False
    return True


def on_vote(state: MasterState, peer: int, msg: P.Vote) -> None:
    """A membership vote (§5.5)."""
    if msg.kind not in P.VOTE_KINDS:
        state.kick(peer, f"unknown vote kind {msg.kind!r}")
        return
    if not _may_start_blocking_call(state, peer, f"a {msg.kind} vote"):
        return
    rnd = state.round
    if rnd is None:
        state.round = MembershipRound(msg.kind, {peer})
        state.log("vote_open", kind=msg.kind, peer=peer)
        return
    if rnd.kind != msg.kind:
        # Both calls block until everyone joins them: neither can ever complete.
        reason = (
            f"peers disagree on the membership operation: peer {peer} called {msg.kind} while "
            f"peers {sorted(rnd.voters)} called {rnd.kind}; every peer must call membership "
            f"operations in the same order"
        )
        fail_membership(state, reason)
        state.send(peer, P.VoteResult(msg.kind, False, reason, P.ERROR_USAGE))
        return
    rnd.voters.add(peer)


def fail_membership(state: MasterState, reason: str) -> None:
    """Fail the open membership round (voting phase) for all its voters."""
    rnd = state.round
    assert rnd is not None and not rnd.linking
    for voter in sorted(rnd.voters):
        state.send(voter, P.VoteResult(rnd.kind, False, reason, P.ERROR_USAGE))
    state.log("vote_failed", kind=rnd.kind, reason=reason)
    state.round = None


def on_link_failure(state: MasterState, pair: tuple[int, int], reason: str) -> None:
    """Voters touched by a failed link get ``TopologyUpdateError`` when the round ends (§5.4)."""
    rnd = state.round
    if rnd is not None and rnd.linking:
        for peer in pair:
            if peer in rnd.voters:
                rnd.concerned.setdefault(peer, reason)


def on_peer_removed(state: MasterState, peer: int, group: GroupState) -> None:
    """Forget ``peer`` in every round, in the bandwidth matrix and as a holder of its group's revision.

    :func:`progress_membership` and :func:`progress_sync` re-evaluate the rounds.
    """
    rnd = state.round
    if rnd is not None:
        rnd.voters.discard(peer)
        rnd.joiners.discard(peer)
        rnd.concerned.pop(peer, None)
        if rnd.probes is not None:
            rnd.probes.drop_peer(peer)
    # Peer ids are never reused: the peer's measurements can never be used again (§5.12).
    state.bandwidth = {pair: bw for pair, bw in state.bandwidth.items() if peer not in pair}
    sync = group.sync
    if sync is not None:
        sync.reports.pop(peer, None)
        sync.plans.discard(peer)
        sync.done.pop(peer, None)
    group.holders.discard(peer)
    if not group.holders and group.last_revision is not None:
        # No member holds the group's revision any more (the group emptied, or only
        # peers that never synced are left): the next sync is a first sync again, so
        # a newcomer may resume at any revision instead of being judged against the
        # revision of peers that are gone (§5.9).
        state.log("revision_forgotten", group=group.id, revision=group.last_revision)
        group.last_revision = None


def progress_membership(state: MasterState) -> bool:
    """Advance the membership round if it can; True if anything changed."""
    rnd = state.round
    if rnd is None:
        if state.pending() and not state.accepted():
            # Nobody is left to vote: the (empty) electorate accepts at once (§5.5).
            state.round = MembershipRound(P.UPDATE_TOPOLOGY)
            state.log("vote_open", kind=P.UPDATE_TOPOLOGY, peer=None)
            return True
        return False
    if not rnd.linking:
        if rnd.probes is not None:
            return _progress_measuring(state, rnd, rnd.probes)
        if set(state.accepted()) - rnd.voters:
            return False
        _apply(state, rnd)
        return True
    if any(not g.links_ready() for g in state.groups.values()):
        return False
    for voter in sorted(rnd.voters):
        reason = rnd.concerned.get(voter)
        if reason is None:
            state.send(voter, P.VoteResult(rnd.kind, True))
        else:
            state.send(voter, P.VoteResult(rnd.kind, False, reason, P.ERROR_TOPOLOGY))
    for joiner in sorted(rnd.joiners):
        state.peers[joiner].joining = False
        state.send(joiner, P.Accepted())
    state.log("vote_resolved", kind=rnd.kind, voters=sorted(rnd.voters), accepted=sorted(rnd.joiners))
    state.round = None
    return True


def _apply(state: MasterState, rnd: MembershipRound) -> None:
    """Everyone voted: apply the round's change and start linking (or answer at once)."""
    if rnd.kind == P.PEERS_PENDING:
        pending = bool(state.pending())
        for voter in sorted(rnd.voters):
            state.send(voter, P.VoteResult(rnd.kind, True, peers_pending=pending))
        state.log("vote_resolved", kind=rnd.kind, voters=sorted(rnd.voters), peers_pending=pending)
        state.round = None
        return
    if rnd.kind == P.UPDATE_TOPOLOGY:
        for peer in state.pending():
            state.accept(peer)
            rnd.joiners.add(peer)
    elif rnd.kind == P.OPTIMIZE_TOPOLOGY and state.optimizer is not None:
        for group in state.groups.values():
            order = list(state.optimizer(group.id, list(group.ring)))
            if sorted(order) == sorted(group.ring) and order != group.ring:
                group.ring = order
                group.dirty = True
    elif rnd.kind == P.OPTIMIZE_TOPOLOGY and state.measure_bandwidth:
        todo = [pair for g in sorted(state.groups) for pair in missing_pairs(state.groups[g].ring, state.bandwidth)]
        rnd.probes = ProbePlan(todo)
        state.log("measure", pairs=len(todo))
        return  # measuring first; progress_membership solves and links afterwards
    rnd.linking = True


# --- optimize_topology: measure, solve, re-wire (§5.12) ------------------------------


def _progress_measuring(state: MasterState, rnd: MembershipRound, plan: ProbePlan) -> bool:
    """Give up late probes, start the ones that may run, solve once all are done."""
    changed = False
    for probe in plan.expired(state.now):
        _record(state, probe, 0.0, "no report before the master's deadline")
        changed = True
    timeout = probe_time_bound(state.probe_seconds) + PROBE_SLACK
    started = plan.start(state.now, state.next_probe_id, timeout)
    state.next_probe_id += len(started)
    for probe in started:
        dst = state.peers[probe.dst]
        state.send(probe.src, P.BandwidthProbe(probe.probe_id, probe.dst, dst.host, dst.port, state.probe_seconds))
        changed = True
    if not plan.done:
        return changed
    rnd.probes = None
    _solve_rings(state, rnd)
    rnd.linking = True
    return True


def _record(state: MasterState, probe: Probe, rate: float, reason: str) -> None:
    state.bandwidth[(probe.src, probe.dst)] = rate
    state.log("bandwidth", sender=probe.src, receiver=probe.dst, bytes_per_second=rate, reason=reason)


def _solve_rings(state: MasterState, rnd: MembershipRound) -> None:
    """Re-order every ring for the measured bandwidths and tell its members the matrix.

    A group whose every ring uses an unreachable pair keeps its ring, and its voters
    get ``TopologyUpdateError`` once the round ends (a retry measures those pairs again).
    """
    for gid in sorted(state.groups):
        group = state.groups[gid]
        ring = list(group.ring)
        if len(ring) < 2:
            continue
        pairs = {(a, b): state.bandwidth.get((a, b), 0.0) for a in ring for b in ring if a != b}
        order, decision = optimize_ring(ring, pairs, group.forbidden, REWIRE_MARGIN)
        state.log("topology", group=gid, ring=ring, new_ring=order, decision=decision)
        if order is None:
            for peer in ring:
                if peer in rnd.voters:
                    rnd.concerned.setdefault(peer, f"optimize_topology of group {gid} failed: {decision}")
        elif order != ring:
            group.ring, group.dirty = order, True
        matrix = sorted(pairs.items())
        msg = P.Bandwidths([a for (a, _), _ in matrix], [b for (_, b), _ in matrix], [bw for _, bw in matrix])
        for peer in ring:
            state.send(peer, msg)


def on_bandwidth_report(state: MasterState, peer: int, msg: P.BandwidthReport) -> None:
    """A peer measured (or failed to measure) the bandwidth a probe asked for (§5.12)."""
    rnd = state.round
    plan = rnd.probes if rnd is not None else None
    probe = plan.running.get(msg.probe_id) if plan is not None else None
    if probe is None:
        if not 0 < msg.probe_id < state.next_probe_id:
            state.kick(peer, f"sent a bandwidth report for probe {msg.probe_id}, which never existed")
        return  # given up, or its peers left meanwhile
    if probe.src != peer:
        state.kick(peer, f"sent a bandwidth report for probe {msg.probe_id}, which peer {probe.src} runs")
        return
    if not (math.isfinite(msg.bytes_per_second) and msg.bytes_per_second >= 0):
        state.kick(peer, f"reported an impossible bandwidth {msg.bytes_per_second!r}")
        return
    assert plan is not None
    plan.finish(msg.probe_id)
    _record(state, probe, msg.bytes_per_second if msg.ok else 0.0, msg.reason)


# --- shared state ---------------------------------------------------------------


def _election_report(msg: P.SyncReport) -> Any:
    from pccl.election import EntryMeta, SyncReport

    entries = {
        key: EntryMeta(h, dt, tuple(shape), nb, allow)
        for key, h, dt, shape, nb, allow in zip(
            msg.keys, msg.hashes, msg.dtypes, msg.shapes, msg.nbytes, msg.allow_inequality
        )
    }
    return SyncReport(msg.revision, msg.strategy, entries)


def on_sync_report(state: MasterState, peer: int, msg: P.SyncReport) -> None:
    """A peer's vote to sync its group's shared state (§5.9)."""
    if not _may_start_blocking_call(state, peer, "a shared-state sync"):
        return
    columns = (msg.hashes, msg.dtypes, msg.shapes, msg.nbytes, msg.allow_inequality)
    if any(len(c) != len(msg.keys) for c in columns) or len(set(msg.keys)) != len(msg.keys):
        state.kick(peer, "malformed shared-state report (column lengths differ or keys repeat)")
        return
    group = state.groups[state.peers[peer].group]
    if group.sync is None:
        group.sync = SyncRound(state.next_sync_id)
        state.next_sync_id += 1
    group.sync.reports[peer] = _election_report(msg)


def on_sync_done(state: MasterState, peer: int, msg: P.SyncDone) -> None:
    """A peer finished (or failed) the fetches of its plan (§5.9)."""
    info = state.peers[peer]
    group = state.groups.get(info.group) if info.accepted else None
    sync = group.sync if group is not None else None
    if sync is None or msg.sync_id != sync.sync_id:
        if not 0 < msg.sync_id < state.next_sync_id:
            state.kick(peer, f"sent SyncDone for sync round {msg.sync_id}, which never existed")
        return  # a round that already ended
    if not sync.fetching or peer not in sync.plans or peer in sync.done:
        state.kick(peer, f"sent SyncDone out of turn in sync round {msg.sync_id}")
        return
    sync.done[peer] = (msg.ok, msg.reason)


def progress_sync(state: MasterState, group: GroupState) -> bool:
    """Advance ``group``'s sync round if it can; True if anything changed."""
    sync = group.sync
    if sync is None:
        return False
    if not sync.fetching:
        if set(group.ring) - set(sync.reports):
            return False
        _run_election(state, group, sync)
        return True
    if sync.plans - set(sync.done):
        return False
    failures = [f"peer {p}: {sync.done[p][1]}" for p in sorted(sync.done) if not sync.done[p][0]]
    ok = not failures
    reason = "; ".join(failures)
    for peer in sorted(sync.plans):
        state.send(peer, P.SyncResult(sync.sync_id, ok, sync.revision, reason))
    if ok:
        # Everyone still planned holds the new revision; with nobody left, nobody does.
        group.holders = set(sync.plans)
        group.last_revision = sync.revision if group.holders else None
    state.log("sync_resolved", group=group.id, revision=sync.revision, ok=ok, reason=reason)
    group.sync = None
    return True


def _run_election(state: MasterState, group: GroupState, sync: SyncRound) -> None:
    reports = dict(sync.reports)
    if not reports:
        group.sync = None
        return
    try:
        election = state.elect(reports, group.last_revision)
    except Exception as exc:  # noqa: BLE001 - a faulty election must not take the master down
        fail_sync(state, group, f"shared-state election failed: {exc!r}")
        return
    for peer, reason in sorted(election.kicks.items()):
        state.kick(peer, reason, P.ERROR_SHARED_STATE)
    plans = {p: plan for p, plan in election.plans.items() if p in state.peers}
    if not plans:
        fail_sync(state, group, "no shared-state content could be elected")
        return
    sync.fetching, sync.revision, sync.plans = True, election.revision, set(plans)
    popular = sorted(election.popular.items())
    for peer, plan in sorted(plans.items()):
        fetch = sorted(plan.fetch.items())
        sources = sorted({d for _, dists in fetch for d in dists if d in state.peers})
        state.send(
            peer,
            P.SyncPlan(
                sync.sync_id,
                plan.revision,
                [k for k, _ in fetch],
                [[d for d in dists if d in state.peers] for _, dists in fetch],
                [k for k, _ in popular],
                [h for _, h in popular],
                sources,
                [state.peers[d].host for d in sources],
                [state.peers[d].port for d in sources],
            ),
        )
    state.log("sync_elected", group=group.id, revision=election.revision, kicks=dict(election.kicks))


def fail_sync(state: MasterState, group: GroupState, reason: str) -> None:
    """End ``group``'s sync round with a failure for every live participant."""
    sync = group.sync
    assert sync is not None
    revision = NO_REVISION if group.last_revision is None else group.last_revision
    for peer in sorted(set(sync.reports) | sync.plans):
        state.send(peer, P.SyncResult(sync.sync_id, False, revision, reason))
    state.log("sync_failed", group=group.id, reason=reason)
    group.sync = None


# --- deadlocks (§5.10) ----------------------------------------------------------

Node = tuple[Any, ...]  # ("membership",), ("sync", group), ("collective", group, tag)


def _describe(node: Node, state: MasterState) -> str:
    if node[0] == "membership":
        assert state.round is not None
        return state.round.kind
    if node[0] == "sync":
        return f"sync_shared_state of group {node[1]}"
    return f"collective tag {node[2]} of group {node[1]}"


def _wait_graph(state: MasterState) -> dict[Node, dict[Node, int]]:
    """Edges ``a -> b -> peer``: open operation ``a`` needs a peer that is blocked in ``b``."""
    blocked: dict[int, list[Node]] = {}
    needs: dict[Node, set[int]] = {}
    rnd = state.round
    if rnd is not None and not rnd.linking:
        needs[("membership",)] = set(state.accepted()) - rnd.voters
        for voter in rnd.voters:
            blocked.setdefault(voter, []).append(("membership",))
    for group in state.groups.values():
        if group.sync is not None:
            if not group.sync.fetching:
                needs[("sync", group.id)] = set(group.ring) - set(group.sync.reports)
            for peer in set(group.sync.reports) | group.sync.plans:
                blocked.setdefault(peer, []).append(("sync", group.id))
        for tag, coll in group.collectives.items():
            node = ("collective", group.id, tag)
            if not coll.op_id:
                needs[node] = set(group.ring) - set(coll.descriptors)
            for peer in coll.participants():
                blocked.setdefault(peer, []).append(node)
    graph: dict[Node, dict[Node, int]] = {}
    for node, peers in needs.items():
        for peer in sorted(peers):
            for target in blocked.get(peer, []):
                # Async collectives may overlap: one waiting on another is no deadlock.
                if node[0] == "collective" and target[0] == "collective":
                    continue
                graph.setdefault(node, {}).setdefault(target, peer)
    return graph


def _cycle_nodes(graph: dict[Node, dict[Node, int]]) -> list[Node]:
    """Nodes that can reach themselves, in a stable order."""
    def reach(start: Node) -> set[Node]:
        seen: set[Node] = set()
        todo = list(graph.get(start, {}))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, {}))
        return seen

    return sorted((n for n in graph if n in reach(n)), key=repr)


def break_deadlocks(state: MasterState) -> bool:
    """Fail every open operation that waits on itself through blocked peers; True if any."""
    graph = _wait_graph(state)
    cycle = _cycle_nodes(graph)
    if not cycle:
        return False
    waits = "; ".join(
        f"{_describe(a, state)} waits for peer {peer}, blocked in {_describe(b, state)}"
        for a in cycle
        for b, peer in sorted(graph[a].items(), key=repr)
        if b in cycle
    )
    reason = (
        f"operations wait on each other ({waits}); every peer must call collectives, "
        f"shared-state syncs and membership operations in the same order"
    )
    for node in cycle:
        if node[0] == "membership":
            fail_membership(state, reason)
        elif node[0] == "sync":
            fail_sync(state, state.groups[node[1]], reason)
        else:
            colls.fail(state, state.groups[node[1]], node[2], reason, P.ERROR_USAGE)
    return True
