"""The ring order that makes a ring all-reduce fastest: a pure solver (``docs/protocol.md`` §5.12).

Input: the peers of one group and the measured directed bandwidths
``(sender, receiver) -> bytes/s``. A pair that is missing or not positive is
*unreachable* and never used when any ring avoids it.

**Objective.** A pipelined ring all-reduce moves the same number of bytes over every
link of the ring at the same time, so its duration is set by the slowest link. The
solver therefore

1. maximises the **bottleneck** (the smallest bandwidth on the ring), and
2. among the rings with that bottleneck, minimises the **sum of 1/bandwidth** over
   the ring's links (seconds per byte summed: the ring's total transfer cost, which
   separates rings whose bottleneck ties and keeps slow links out where it can).

Rings compare lexicographically by ``(bottleneck, -inverse_sum)``
(:class:`RingScore`). The problem is an asymmetric travelling-salesman problem with
a bottleneck objective:

- up to :data:`EXACT_LIMIT` peers it is solved exactly by two Held-Karp dynamic
  programmes over subsets (a max-min one for the bottleneck, then a min-sum one
  restricted to links at least that fast);
- beyond that, a threshold search finds a ring whose links are all at least as fast
  as possible (bounded depth-first search, tightest peer first), then 2-opt and
  Or-opt moves lower the sum of 1/bandwidth without using a slower link.

Every result is a permutation of the input peers, rotated to start at the first
peer of the input ring, and never worse than the input ring by the objective.
No randomness, no clock: the same input always gives the same ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

Bandwidth = Mapping[tuple[int, int], float]

# Exact solving costs about 2^(n-1) * (n-1)^2 steps: ~0.06 s of Python at 13 peers,
# 1 s at 16 (the master runs it on its event loop).
EXACT_LIMIT = 13
# Depth-first steps allowed per bottleneck threshold tried by the heuristic.
SEARCH_BUDGET = 20_000
# Improving moves allowed in the heuristic's local search (each costs O(n) to apply).
MOVE_BUDGET = 10_000
# Starting tours the heuristic improves (fastest link first from this many peers).
MULTI_START = 8


@dataclass(frozen=True)
class RingScore:
    """How good a ring is: its slowest link and its summed inverse bandwidth.

    ``bottleneck`` is in bytes/s (0: the ring uses an unreachable pair);
    ``inverse_sum`` in seconds per byte (``inf`` when a pair is unreachable).
    """

    bottleneck: float
    inverse_sum: float

    @property
    def reachable(self) -> bool:
        """Every link of the ring has a positive measured bandwidth."""
        return self.bottleneck > 0

    def better_than(self, other: RingScore, rel_tol: float = 0.0) -> bool:
        """Whether this ring beats ``other`` by more than the relative margin ``rel_tol``.

        With ``rel_tol = 0`` this is the strict lexicographic order of the objective:
        a faster bottleneck, or the same bottleneck and a smaller inverse sum. With a
        margin, measurement noise does not count as an improvement: the bottleneck
        must be faster by more than the factor ``1 + rel_tol``, or no slower and the
        inverse sum smaller by more than that factor.
        """
        if self.bottleneck > other.bottleneck * (1.0 + rel_tol):
            return True
        if self.bottleneck < other.bottleneck:
            return False
        return self.inverse_sum * (1.0 + rel_tol) < other.inverse_sum


def _rate(bandwidth: Bandwidth, a: int, b: int) -> float:
    value = bandwidth.get((a, b), 0.0)
    return value if value > 0 and math.isfinite(value) else 0.0


def ring_score(ring: Sequence[int], bandwidth: Bandwidth) -> RingScore:
    """The :class:`RingScore` of ``ring`` (a ring of one or none has no links: infinitely fast)."""
    if len(ring) < 2:
        return RingScore(math.inf, 0.0)
    rates = [_rate(bandwidth, ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]
    low = min(rates)
    return RingScore(low, math.inf if low == 0 else sum(1.0 / r for r in rates))


def solve_ring(
    ring: Sequence[int], bandwidth: Bandwidth, *, exact_limit: int = EXACT_LIMIT
) -> list[int]:
    """The best ring over ``ring``'s peers found for ``bandwidth`` (see the module docstring).

    ``ring`` is the current order: the result starts with ``ring[0]`` and is
    ``list(ring)`` itself unless another order scores strictly better. Exact for up
    to ``exact_limit`` peers. The result may still use an unreachable pair when no
    ring avoids one (check ``ring_score(result, bandwidth).reachable``).

    Raises:
        ValueError: ``ring`` repeats a peer.
    """
    order = list(ring)
    if len(set(order)) != len(order):
        raise ValueError(f"ring repeats a peer: {order}")
    if len(order) < 3:
        return order  # one order only (a ring of two uses both directions either way)
    rates = [[_rate(bandwidth, a, b) if a != b else 0.0 for b in order] for a in order]
    if len(order) <= exact_limit:
        found = _exact(rates)
    else:
        found = _heuristic(rates)
    best = [order[i] for i in found] if found is not None else order
    if ring_score(best, bandwidth).better_than(ring_score(order, bandwidth)):
        return best
    return order


# --- exact: Held-Karp over subsets of the peers other than index 0 --------------------


def _exact(rates: list[list[float]]) -> list[int] | None:
    """Optimal tour as indices starting at 0, or None if every tour uses an unreachable pair."""
    n = len(rates)
    bottleneck = _max_bottleneck(rates)
    if bottleneck <= 0:
        return None
    # Only links at least as fast as the best bottleneck may be used; among those
    # tours, the one with the least summed inverse bandwidth (min-sum Held-Karp).
    cost = [[1.0 / r if r >= bottleneck else math.inf for r in row] for row in rates]
    full = (1 << (n - 1)) - 1
    inf = math.inf
    best: list[list[float]] = [[inf] * n for _ in range(full + 1)]
    parent: list[list[int]] = [[-1] * n for _ in range(full + 1)]
    for j in range(1, n):
        best[1 << (j - 1)][j] = cost[0][j]
    for mask in range(1, full + 1):
        row = best[mask]
        for j in range(1, n):
            here = row[j]
            if here == inf or not mask & (1 << (j - 1)):
                continue
            cj = cost[j]
            for k in range(1, n):
                bit = 1 << (k - 1)
                if mask & bit:
                    continue
                value = here + cj[k]
                nxt = mask | bit
                if value < best[nxt][k]:
                    best[nxt][k] = value
                    parent[nxt][k] = j
    last = min(range(1, n), key=lambda j: (best[full][j] + cost[j][0], j))
    if best[full][last] + cost[last][0] == inf:
        return None  # unreachable here: the bottleneck pass found a tour
    tour = [last]
    mask = full
    while True:
        prev = parent[mask][tour[-1]]
        mask &= ~(1 << (tour[-1] - 1))
        if prev == -1:
            break
        tour.append(prev)
    return [0] + tour[::-1]


def _max_bottleneck(rates: list[list[float]]) -> float:
    """The largest bottleneck any tour reaches (max-min Held-Karp); 0 if none is reachable."""
    n = len(rates)
    full = (1 << (n - 1)) - 1
    best: list[list[float]] = [[0.0] * n for _ in range(full + 1)]
    for j in range(1, n):
        best[1 << (j - 1)][j] = rates[0][j]
    for mask in range(1, full + 1):
        row = best[mask]
        for j in range(1, n):
            here = row[j]
            if here <= 0 or not mask & (1 << (j - 1)):
                continue
            rj = rates[j]
            for k in range(1, n):
                bit = 1 << (k - 1)
                if mask & bit:
                    continue
                value = here if here < rj[k] else rj[k]
                if value > best[mask | bit][k]:
                    best[mask | bit][k] = value
    return max(min(best[full][j], rates[j][0]) for j in range(1, n))


# --- heuristic: bottleneck threshold search, then 2-opt / Or-opt -------------------------


def _heuristic(rates: list[list[float]]) -> list[int] | None:
    """A good tour as indices starting at 0, or None if none avoiding unreachable pairs was found."""
    n = len(rates)
    levels = sorted({r for row in rates for r in row if r > 0})
    identity = list(range(n))
    found: tuple[float, list[int]] | None = None
    lo, hi = 0, len(levels) - 1
    # Binary search on the threshold: a tour with every link >= levels[mid] exists?
    while lo <= hi:
        mid = (lo + hi) // 2
        tour = _tour_at_least(rates, levels[mid], identity)
        if tour is None:
            hi = mid - 1
        else:
            found = (levels[mid], tour)
            lo = mid + 1
    if found is None:
        return None
    threshold, tour = found
    cost = [[1.0 / r if r >= threshold else math.inf for r in row] for row in rates]
    # Local search from the feasible tour and from fastest-link-first tours started at
    # a few peers; the cheapest result wins (ties: the earliest, for determinism).
    starts = [tour] + [t for s in range(min(n, MULTI_START)) if (t := _tour_at_least(rates, threshold, None, s))]
    results = [_local_search(t, cost) for t in starts]
    return min(results, key=lambda t: _tour_cost(t, cost))


def _tour_at_least(
    rates: list[list[float]], threshold: float, hint: list[int] | None, start: int = 0
) -> list[int] | None:
    """A tour using only links >= ``threshold`` (bounded depth-first search), or None.

    ``hint`` is returned when it qualifies; otherwise the search runs from ``start``,
    trying the tightest peer first (Warnsdorff's rule: fewest onward options) when
    a hint is given, else the fastest link first (nearest neighbour with backtracking).
    """
    n = len(rates)
    if hint is not None and all(rates[hint[i]][hint[(i + 1) % n]] >= threshold for i in range(n)):
        return list(hint)
    out = [[j for j in range(n) if j != i and rates[i][j] >= threshold] for i in range(n)]
    into = [[i for i in range(n) if i != j and rates[i][j] >= threshold] for j in range(n)]
    if any(not links for links in out) or any(not links for links in into):
        return None  # some peer cannot send, or cannot receive, that fast
    onward = [len(links) for links in out]  # unvisited peers each peer could send to
    used = [False] * n
    tightest = hint is not None

    def visit(u: int) -> None:
        used[u] = True
        for i in into[u]:
            onward[i] -= 1

    def leave(u: int) -> None:
        used[u] = False
        for i in into[u]:
            onward[i] += 1

    def candidates(u: int) -> list[int]:
        free = (j for j in out[u] if not used[j])
        if tightest:
            return sorted(free, key=lambda j: (onward[j], -rates[u][j], j))
        return sorted(free, key=lambda j: (-rates[u][j], j))

    path = [start]
    visit(start)
    stack = [iter(candidates(start))]  # stack[k]: the untried ways to extend path[: k + 1]
    for _ in range(SEARCH_BUDGET):
        if not stack:
            return None
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            if len(path) > 1:
                leave(path.pop())
            continue
        path.append(nxt)
        visit(nxt)
        if len(path) == n:
            if rates[nxt][start] >= threshold:
                k = path.index(0)
                return path[k:] + path[:k]
            leave(path.pop())
            continue
        stack.append(iter(candidates(nxt)))
    return None


def _tour_cost(tour: list[int], cost: list[list[float]]) -> float:
    return sum(cost[tour[i]][tour[(i + 1) % len(tour)]] for i in range(len(tour)))


def _local_search(tour: list[int], cost: list[list[float]]) -> list[int]:
    """Lower the tour's cost with Or-opt and 2-opt moves (first improvement, bounded)."""
    moves = 0
    improved = True
    while improved and moves < MOVE_BUDGET:
        improved = False
        for move in (_or_opt, _two_opt):
            better = move(tour, cost)
            if better is not None:
                tour, improved = better, True
                moves += 1
                break
    start = tour.index(0)
    return tour[start:] + tour[:start]


def _or_opt(tour: list[int], cost: list[list[float]]) -> list[int] | None:
    """Move a segment of 1-3 peers elsewhere, keeping its direction; the first improving move."""
    n = len(tour)
    eps = 1e-12 * _tour_cost(tour, cost)
    for length in (1, 2, 3):
        if length > n - 2:
            break
        for i in range(n):
            seg = [tour[(i + k) % n] for k in range(length)]
            before, after = tour[(i - 1) % n], tour[(i + length) % n]
            if cost[before][after] == math.inf:
                continue  # closing the gap would need a link that is too slow
            removed = cost[before][seg[0]] + cost[seg[-1]][after] - cost[before][after]
            rest = [tour[(i + length + k) % n] for k in range(n - length)]
            for p in range(len(rest) - 1):
                a, b = rest[p], rest[p + 1]
                added = cost[a][seg[0]] + cost[seg[-1]][b] - cost[a][b]
                if added - removed < -eps and math.isfinite(added):
                    return rest[: p + 1] + seg + rest[p + 1 :]
    return None


def _two_opt(tour: list[int], cost: list[list[float]]) -> list[int] | None:
    """Reverse a segment (asymmetric costs: the reversed links are re-priced); the first improving move."""
    n = len(tour)
    forward = [cost[tour[k]][tour[(k + 1) % n]] for k in range(n)]
    backward = [cost[tour[(k + 1) % n]][tour[k]] for k in range(n)]
    eps = 1e-12 * sum(forward)
    # Prefix sums over the links inside a segment (infinite costs make these inf).
    pf, pb = [0.0], [0.0]
    for k in range(n):
        pf.append(pf[-1] + forward[k])
        pb.append(pb[-1] + backward[k])
    for i in range(1, n - 1):
        for j in range(i + 1, n):
            # Reverse tour[i..j]: links tour[i-1]->tour[i] and tour[j]->tour[j+1] are
            # replaced by tour[i-1]->tour[j] and tour[i]->tour[j+1]; inner links flip.
            a, b, c, d = tour[i - 1], tour[i], tour[j], tour[(j + 1) % n]
            if d == a:
                continue  # reversing all but one peer only flips the whole ring
            old_inner = pf[j] - pf[i]
            new_inner = pb[j] - pb[i]
            if not math.isfinite(new_inner):
                continue
            delta = cost[a][c] + cost[b][d] + new_inner - (cost[a][b] + cost[c][d] + old_inner)
            if delta < -eps:
                return tour[:i] + tour[i : j + 1][::-1] + tour[j + 1 :]
    return None
