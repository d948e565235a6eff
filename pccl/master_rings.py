"""Ring order for one peer group: pure functions, no state (``docs/protocol.md`` §5.4).

A ring is the list of a group's accepted peer ids; each peer sends to the next one
and receives from the previous one (the last wraps to the first). Pairs of peers that
could not connect (a *forbidden* directed edge ``(sender, receiver)``) are avoided
when another order exists; when none exists the master drops one peer
(:func:`choose_drop`) and tries again.
"""

from __future__ import annotations

from typing import AbstractSet, Mapping, Sequence

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
