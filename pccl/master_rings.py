"""Ring order for one peer group: pure functions, no I/O (``docs/protocol.md`` §5.4, §5.12).

A ring is the list of a group's accepted peer ids; each peer sends to the next one
and receives from the previous one (the last wraps to the first). Pairs of peers that
could not connect (a *forbidden* directed edge ``(sender, receiver)``) are avoided
when another order exists; when none exists the master drops one peer
(:func:`choose_drop`) and tries again.

``optimize_topology`` measures the directed bandwidths the master lacks
(:func:`missing_pairs`, scheduled by :class:`ProbePlan`) and re-orders each ring with
:func:`optimize_ring`, which wraps the solver of :mod:`pccl.topology`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Mapping, Sequence

from pccl.topology import ring_score, solve_ring

# Upper bound on search steps: rings are small and forbidden edges rare, so the
# search almost always succeeds at once; the bound keeps a pathological case from
# stalling the master's event loop.
SEARCH_BUDGET = 20_000


def ring_edges(ring: Sequence[int]) -> list[tuple[int, int]]:
    """The directed (sender, receiver) pairs a ring uses; none for a ring of one."""
    if len(ring) < 2:
        return []
    return [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]


def neighbours(ring: Sequence[int], peer: int) -> tuple[int, int]:
    """``(prev, next)`` of ``peer`` in ``ring``. Raises ``ValueError`` if it is not a member."""
    i = list(ring).index(peer)
    return ring[i - 1], ring[(i + 1) % len(ring)]


def find_ring(preferred: Sequence[int], forbidden: AbstractSet[tuple[int, int]]) -> list[int] | None:
    """A ring over ``preferred``'s peers that uses no forbidden edge, or ``None``.

    The result stays as close as cheaply possible to ``preferred``: ``preferred``
    itself when it is valid, otherwise the first valid order of a depth-first
    search that tries candidates in ``preferred`` order. ``None`` means no valid
    ring exists (or none was found within :data:`SEARCH_BUDGET` steps).
    """
    order = list(preferred)
    if len(order) < 2:
        return order
    if not any(edge in forbidden for edge in ring_edges(order)):
        return order
    start = order[0]
    path = [start]
    used = {start}
    steps = 0

    def extend() -> bool:
        nonlocal steps
        steps += 1
        if steps > SEARCH_BUDGET:
            return False
        if len(path) == len(order):
            return (path[-1], start) not in forbidden
        for cand in order:
            if cand in used or (path[-1], cand) in forbidden:
                continue
            path.append(cand)
            used.add(cand)
            if extend():
                return True
            path.pop()
            used.discard(cand)
        return False

    return path if extend() else None


def choose_drop(
    members: Sequence[int],
    forbidden: AbstractSet[tuple[int, int]],
    accept_seq: Mapping[int, int],
) -> int:
    """The peer to drop when no ring avoids the forbidden edges.

    The peer involved in most failed connections goes first (it is most likely the
    one whose network is broken); ties go to the most recently accepted peer, so a
    newcomer that cannot link does not evict peers that worked together before.
    ``members`` must be non-empty.
    """

    def involvement(peer: int) -> int:
        return sum(1 for a, b in forbidden if peer in (a, b) and a in members and b in members)

    return max(members, key=lambda p: (involvement(p), accept_seq.get(p, 0), p))


# --- bandwidth measurement and ring optimisation (§5.12) ---------------------------


def missing_pairs(ring: Sequence[int], bandwidth: Mapping[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Directed pairs of ``ring``'s peers without a successful measurement, in probe order.

    A pair counts as missing when it was never measured or its measurement failed
    (recorded as 0), so a retried ``optimize_topology`` measures it again. The order
    goes through the offsets 1, 2, ... of the ring: within one offset every peer
    sends once and receives once, so a whole offset can be measured at the same time.
    """
    n = len(ring)
    return [
        (ring[i], ring[(i + d) % n])
        for d in range(1, n)
        for i in range(n)
        if not bandwidth.get((ring[i], ring[(i + d) % n]), 0.0) > 0
    ]


@dataclass(frozen=True)
class Probe:
    """One running measurement: ``src`` sends to ``dst``; the master gives up at ``deadline``."""

    probe_id: int
    src: int
    dst: int
    deadline: float


@dataclass
class ProbePlan:
    """The measurements of one ``optimize_topology`` round: pairs to do, and those running.

    A peer sends at most one probe and receives at most one probe at a time, so
    no two measurements share a sender's uplink or a receiver's downlink.
    """

    todo: list[tuple[int, int]]
    running: dict[int, Probe] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Nothing left to start and nothing running."""
        return not self.todo and not self.running

    def start(self, now: float, next_id: int, timeout: float) -> list[Probe]:
        """Start every pair whose sender and receiver are free, with ids from ``next_id`` on."""
        sending = {p.src for p in self.running.values()}
        receiving = {p.dst for p in self.running.values()}
        started: list[Probe] = []
        for pair in list(self.todo):
            src, dst = pair
            if src in sending or dst in receiving:
                continue
            probe = Probe(next_id + len(started), src, dst, now + timeout)
            started.append(probe)
            self.running[probe.probe_id] = probe
            self.todo.remove(pair)
            sending.add(src)
            receiving.add(dst)
        return started

    def finish(self, probe_id: int) -> Probe | None:
        """The running probe ``probe_id``, now finished; None if it is not running."""
        return self.running.pop(probe_id, None)

    def expired(self, now: float) -> list[Probe]:
        """Running probes past their deadline, now given up."""
        late = [p for p in self.running.values() if now >= p.deadline]
        for probe in late:
            del self.running[probe.probe_id]
        return late

    def drop_peer(self, peer: int) -> None:
        """Forget every pair of a peer that left (a running probe's late report is ignored)."""
        self.todo = [pair for pair in self.todo if peer not in pair]
        for probe_id in [i for i, p in self.running.items() if peer in (p.src, p.dst)]:
            del self.running[probe_id]


def optimize_ring(
    ring: Sequence[int],
    bandwidth: Mapping[tuple[int, int], float],
    forbidden: AbstractSet[tuple[int, int]],
    rel_tol: float,
) -> tuple[list[int] | None, str]:
    """The ring to apply after measuring, or ``(None, reason)`` when no usable ring exists.

    Pairs that failed to link (``forbidden``) count as unreachable. The solver's ring
    (:func:`pccl.topology.solve_ring`) replaces ``ring`` only if it is better by more
    than ``rel_tol`` (measurement noise alone never re-wires a ring); the returned
    reason says what was decided, for the log.
    """
    usable = {pair: bw for pair, bw in bandwidth.items() if pair not in forbidden}
    best = solve_ring(ring, usable)
    new, old = ring_score(best, usable), ring_score(ring, usable)
    if not new.reachable:
        pairs = ", ".join(f"{a}->{b}" for a, b in ring_edges(best) if not usable.get((a, b), 0.0) > 0)
        return None, f"no ring of peers {sorted(ring)} avoids the unreachable pairs (e.g. {pairs})"
    if not old.reachable or new.better_than(old, rel_tol):
        return best, f"bottleneck {old.bottleneck:.4g} -> {new.bottleneck:.4g} bytes/s"
    return list(ring), f"kept: bottleneck {old.bottleneck:.4g} bytes/s, no ring better by over {rel_tol:.0%}"
