"""The ring solver (``pccl.topology``) against brute force, and its guarantees on any input."""

from __future__ import annotations

import math
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.master_rings import missing_pairs, optimize_ring, ring_edges
from pccl.topology import EXACT_LIMIT, RingScore, ring_score, solve_ring

# Bandwidths from a few magnitudes, with exact ties and unreachable pairs (0).
RATES = st.sampled_from([0.0, 1.0, 2.0, 5.0, 10.0, 100.0, 1e9]) | st.floats(0.5, 1e10)


def _instance(peers: list[int], draw_rate: st.DataObject) -> dict[tuple[int, int], float]:
    return {(a, b): draw_rate.draw(RATES) for a in peers for b in peers if a != b}


def _reference(ring: list[int], bw: dict[tuple[int, int], float]) -> tuple[float, float]:
    """The objective, computed here independently: (slowest link, sum of 1/bandwidth)."""
    rates = [bw.get(e, 0.0) for e in ring_edges(ring)]
    low = min(rates)
    return low, (math.inf if low <= 0 else sum(1.0 / r for r in rates))


def _best_by_brute_force(peers: list[int], bw: dict[tuple[int, int], float]) -> tuple[float, float]:
    best: tuple[float, float] | None = None
    for rest in permutations(peers[1:]):
        low, inv = _reference([peers[0], *rest], bw)
        if best is None or low > best[0] or (low == best[0] and inv < best[1]):
            best = (low, inv)
    assert best is not None
    return best


peer_lists = st.lists(st.integers(1, 10_000), min_size=1, max_size=7, unique=True)


@given(peer_lists, st.data())
@settings(max_examples=300, deadline=None)
def test_exact_solution_is_optimal_by_brute_force(peers: list[int], data: st.DataObject) -> None:
    bw = _instance(peers, data)
    ring = solve_ring(peers, bw)
    assert sorted(ring) == sorted(peers) and ring[0] == peers[0]
    if len(peers) < 3:
        assert ring == peers  # only one ring exists
        return
    got, best = _reference(ring, bw), _best_by_brute_force(peers, bw)
    assert got[0] == best[0]  # the bottleneck is exactly optimal
    if best[0] > 0:
        assert got[1] == pytest.approx(best[1], rel=1e-9)  # then the inverse sum


@given(st.lists(st.integers(1, 10_000), min_size=3, max_size=24, unique=True), st.data(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_result_is_a_permutation_never_worse_than_the_input(
    peers: list[int], data: st.DataObject, heuristic: bool
) -> None:
    bw = _instance(peers, data)
    ring = solve_ring(peers, bw, exact_limit=2 if heuristic else EXACT_LIMIT)
    assert sorted(ring) == sorted(peers) and len(ring) == len(peers) and ring[0] == peers[0]
    new, old = _reference(ring, bw), _reference(peers, bw)
    assert new[0] >= old[0]
    if new[0] == old[0]:
        assert new[1] <= old[1] * (1 + 1e-12) or old[1] == math.inf
    if ring != peers:
        assert ring_score(ring, bw).better_than(ring_score(peers, bw))  # changed only to improve


@given(st.integers(3, 7), st.data())
@settings(max_examples=100, deadline=None)
def test_heuristic_reaches_the_exact_bottleneck_on_small_instances(n: int, data: st.DataObject) -> None:
    peers = list(range(1, n + 1))
    bw = _instance(peers, data)
    exact = _reference(solve_ring(peers, bw), bw)
    heur = _reference(solve_ring(peers, bw, exact_limit=2), bw)
    # Up to 7 peers the depth-first search is exhaustive within its budget, so the
    # threshold search is exact; only the inverse sum is heuristic.
    assert heur[0] == exact[0]
    assert heur[1] >= exact[1] * (1 - 1e-9) or exact[1] == math.inf


def test_avoids_slow_pairs_when_a_ring_exists() -> None:
    fast, slow = 1e9, 1e7
    peers = [1, 2, 3, 4]
    bw = {(a, b): fast for a in peers for b in peers if a != b}
    for a, b in ((1, 2), (2, 1), (3, 4), (4, 3)):
        bw[(a, b)] = slow
    ring = solve_ring(peers, bw)
    assert not {(1, 2), (2, 1), (3, 4), (4, 3)} & set(ring_edges(ring))
    score = ring_score(ring, bw)
    assert score.bottleneck == fast and score.inverse_sum == pytest.approx(4 / fast)


def test_unreachable_pairs_are_avoided_and_reported_when_unavoidable() -> None:
    peers = [5, 6, 7]
    bw = {(a, b): 10.0 for a in peers for b in peers if a != b}
    bw[(5, 6)] = 0.0  # forces the ring 5 -> 7 -> 6 -> 5
    assert solve_ring(peers, bw) == [5, 7, 6]
    bw[(5, 7)] = 0.0  # peer 5 can send nowhere
    assert not ring_score(solve_ring(peers, bw), bw).reachable
    order, reason = optimize_ring(peers, bw, set(), 0.1)
    assert order is None and "5->" in reason


def test_large_ring_uses_the_heuristic_and_finds_the_only_fast_ring() -> None:
    n = 40
    peers = list(range(100, 100 + n))
    hidden = [peers[0]] + sorted(peers[1:], key=lambda p: (p * 7919) % 97)  # a scrambled ring
    bw = {(a, b): 1.0 for a in peers for b in peers if a != b}
    for a, b in ring_edges(hidden):
        bw[(a, b)] = 1000.0
    ring = solve_ring(peers, bw)
    assert sorted(ring) == sorted(peers)
    assert ring_score(ring, bw).bottleneck == 1000.0  # exactly the hidden ring's links


def test_missing_pairs_skips_measured_and_orders_by_offset() -> None:
    ring = [1, 2, 3]
    assert missing_pairs(ring, {}) == [(1, 2), (2, 3), (3, 1), (1, 3), (2, 1), (3, 2)]
    # A failed measurement (0) counts as missing, a positive one does not.
    assert missing_pairs(ring, {(1, 2): 5.0, (2, 3): 0.0}) == [(2, 3), (3, 1), (1, 3), (2, 1), (3, 2)]


def test_optimize_ring_keeps_the_ring_within_the_margin() -> None:
    peers = [1, 2, 3]
    bw = {(a, b): 100.0 for a in peers for b in peers if a != b}
    bw[(1, 2)] = 95.0  # the reverse ring is 5 % faster: noise, not worth re-wiring
    assert optimize_ring(peers, bw, set(), 0.1)[0] == [1, 2, 3]
    bw[(1, 2)] = 50.0
    assert optimize_ring(peers, bw, set(), 0.1)[0] == [1, 3, 2]
    # A pair that failed to link is never used, whatever its measured bandwidth.
    bw[(1, 2)] = 100.0
    assert optimize_ring(peers, bw, {(1, 3)}, 0.1)[0] == [1, 2, 3]
    assert optimize_ring(peers, bw, {(1, 3), (1, 2)}, 0.1)[0] is None


def test_score_comparison_with_margin() -> None:
    a, b = RingScore(110.0, 1.0), RingScore(100.0, 1.0)
    assert a.better_than(b) and a.better_than(b, 0.05) and not a.better_than(b, 0.2)
    assert RingScore(100.0, 0.5).better_than(b, 0.5) and not RingScore(100.0, 0.9).better_than(b, 0.5)
    assert not RingScore(99.0, 0.1).better_than(b)  # a slower bottleneck never wins
    assert ring_score([1], {}) == RingScore(math.inf, 0.0)


def test_solve_ring_refuses_repeated_peers() -> None:
    with pytest.raises(ValueError, match="repeats"):
        solve_ring([1, 2, 1], {})
