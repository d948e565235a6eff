"""The master's shared-state election (pure): rules by example, invariants by hypothesis."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.election import (
    ENFORCE_POPULAR,
    NO_REVISION,
    RECEIVE_ONLY,
    SEND_ONLY,
    Election,
    EntryMeta,
    SyncReport,
    elect,
)


def h(n: int) -> bytes:
    return bytes([n]) * 16


def meta(n: int, dtype: str = "float32", shape: tuple[int, ...] = (4,), allow: bool = False) -> EntryMeta:
    nbytes = 4 * 4 if dtype == "float32" else 2 * 4
    return EntryMeta(hash=h(n), dtype=dtype, shape=shape, nbytes=nbytes, allow_content_inequality=allow)


def report(rev: int, strategy: str = ENFORCE_POPULAR, /, **hashes: int) -> SyncReport:
    return SyncReport(revision=rev, strategy=strategy, entries={k: meta(v) for k, v in hashes.items()})


# ---------------------------------------------------------------- rules by example


def test_identical_peers_fetch_nothing() -> None:
    e = elect({1: report(3, w=1, b=2), 2: report(3, w=1, b=2)}, last_revision=2)
    assert e.kicks == {}
    assert e.revision == 3
    assert {p: dict(plan.fetch) for p, plan in e.plans.items()} == {1: {}, 2: {}}
    assert e.popular == {"w": h(1), "b": h(2)}


def test_majority_wins_and_only_dirty_keys_move() -> None:
    e = elect({1: report(1, w=1, b=2), 2: report(1, w=1, b=2), 3: report(1, w=9, b=2)}, last_revision=0)
    assert e.popular == {"w": h(1), "b": h(2)}
    assert dict(e.plans[3].fetch).keys() == {"w"}
    assert set(e.plans[3].fetch["w"]) == {1, 2}
    assert not e.plans[1].fetch and not e.plans[2].fetch


def test_tie_goes_to_smallest_signature_not_arrival_order() -> None:
    a = {7: report(0, w=5), 3: report(0, w=2)}
    b = {3: report(0, w=2), 7: report(0, w=5)}
    for reports in (a, b):
        e = elect(reports, None)
        assert e.popular == {"w": h(2)}
        assert dict(e.plans[7].fetch) == {"w": (3,)}


def test_whole_state_is_elected_not_key_by_key() -> None:
    # Per key, w=1 (peers 1, 2) and b=6 (peers 2... no: 3, 4) would both be "popular",
    # but no peer holds (w=1, b=6); the elected state must be one a peer really holds.
    reports = {
        1: report(0, w=1, b=5),
        2: report(0, w=1, b=7),
        3: report(0, w=2, b=6),
        4: report(0, w=3, b=6),
    }
    e = elect(reports, None)
    held = {(r.entries["w"].hash, r.entries["b"].hash) for r in reports.values()}
    assert (e.popular["w"], e.popular["b"]) in held
    assert (e.popular["w"], e.popular["b"]) == (h(1), h(5))  # all tied at 1 -> smallest signature


def test_revision_ahead_is_kicked_with_reason() -> None:
    e = elect({1: report(5), 2: report(5), 3: report(7)}, last_revision=4)
    assert set(e.kicks) == {3}
    assert "revision" in e.kicks[3] and "7" in e.kicks[3] and "5" in e.kicks[3]
    assert set(e.plans) == {1, 2}
    assert e.revision == 5


def test_first_sync_may_start_at_any_revision() -> None:
    e = elect({1: report(13, w=1), 2: report(13, w=1)}, last_revision=None)
    assert e.kicks == {} and e.revision == 13


def test_outdated_peer_receives_and_adopts_revision() -> None:
    # A late joiner at revision 0 while the group is at 40 -> 41.
    e = elect({1: report(41, w=1, b=2), 2: report(41, w=1, b=2), 3: report(0, w=0, b=2)}, 40)
    assert e.kicks == {}
    assert e.plans[3].revision == 41
    assert dict(e.plans[3].fetch).keys() == {"w"}
    # The outdated peer's content never votes, even if it were the majority.
    e = elect({1: report(41, w=1), 2: report(0, w=0), 3: report(0, w=0)}, 40)
    assert e.popular == {"w": h(1)}


def test_checkpoint_resume_beats_fresh_peers_on_first_sync() -> None:
    e = elect({1: report(0, w=0), 2: report(0, w=0), 3: report(13, w=7)}, None)
    assert e.revision == 13 and e.popular == {"w": h(7)}
    assert dict(e.plans[1].fetch) == {"w": (3,)} and dict(e.plans[2].fetch) == {"w": (3,)}


def test_nobody_at_expected_revision_kicks_everyone() -> None:
    e = elect({1: report(3), 2: report(3)}, last_revision=3)
    assert set(e.kicks) == {1, 2} and not e.plans and not e.popular
    assert e.revision == 3
    assert all("revision 4" in reason for reason in e.kicks.values())


def test_key_set_mismatch_names_the_key() -> None:
    e = elect({1: report(1, w=1, b=1), 2: report(1, w=1, b=1), 3: report(1, w=1)}, 0)
    assert set(e.kicks) == {3} and "'b'" in e.kicks[3] and "missing" in e.kicks[3]
    e = elect({1: report(1, w=1), 2: report(1, w=1), 3: report(1, w=1, extra=1)}, 0)
    assert set(e.kicks) == {3} and "'extra'" in e.kicks[3] and "unexpected" in e.kicks[3]


def test_dtype_and_shape_mismatch_name_the_key() -> None:
    good = SyncReport(1, ENFORCE_POPULAR, {"w": meta(1), "b": meta(1)})
    bad_dtype = SyncReport(1, ENFORCE_POPULAR, {"w": meta(1), "b": meta(1, dtype="float16")})
    bad_shape = SyncReport(1, ENFORCE_POPULAR, {"w": meta(1, shape=(2, 2)), "b": meta(1)})
    e = elect({1: good, 2: good, 3: bad_dtype, 4: bad_shape}, 0)
    assert set(e.kicks) == {3, 4}
    assert "'b'" in e.kicks[3] and "dtype float16" in e.kicks[3] and "float32" in e.kicks[3]
    assert "'w'" in e.kicks[4] and "shape [2, 2]" in e.kicks[4]


def test_strategy_conflict_kicks_the_non_enforcing_peers() -> None:
    e = elect(
        {1: report(1), 2: report(1), 3: report(1, RECEIVE_ONLY), 4: report(1, SEND_ONLY)}, 0
    )
    assert set(e.kicks) == {3, 4}
    assert all("conflict" in r for r in e.kicks.values())
    assert set(e.plans) == {1, 2}


def test_send_only_content_is_distributed_to_receive_only() -> None:
    e = elect({1: report(1, SEND_ONLY, w=4), 2: report(1, RECEIVE_ONLY, w=0), 3: report(0, RECEIVE_ONLY, w=0)}, 0)
    assert e.kicks == {}
    assert e.popular == {"w": h(4)}
    assert dict(e.plans[2].fetch) == {"w": (1,)} and dict(e.plans[3].fetch) == {"w": (1,)}
    assert not e.plans[1].fetch


def test_receive_only_never_distributes_and_never_votes() -> None:
    # Peer 2 holds the popular content but is receive_only: it must not be asked to send.
    e = elect({1: report(1, SEND_ONLY, w=4), 2: report(1, RECEIVE_ONLY, w=4), 3: report(1, RECEIVE_ONLY, w=0)}, 0)
    assert dict(e.plans[3].fetch) == {"w": (1,)}
    # Two receive_only peers with the same content are not a majority against one sender.
    e = elect({1: report(1, SEND_ONLY, w=4), 2: report(1, RECEIVE_ONLY, w=0), 3: report(1, RECEIVE_ONLY, w=0)}, 0)
    assert e.popular == {"w": h(4)}


def test_disagreeing_send_only_peers_the_minority_is_kicked() -> None:
    e = elect({1: report(1, SEND_ONLY, w=1), 2: report(1, SEND_ONLY, w=1), 3: report(1, SEND_ONLY, w=2)}, 0)
    assert set(e.kicks) == {3} and "send_only" in e.kicks[3] and "'w'" in e.kicks[3]
    assert e.popular == {"w": h(1)}


def test_outdated_send_only_peer_is_kicked() -> None:
    e = elect({1: report(5, SEND_ONLY, w=1), 2: report(3, SEND_ONLY, w=2)}, 4)
    assert set(e.kicks) == {2} and "send_only" in e.kicks[2]


def test_all_receive_only_kicks_everyone() -> None:
    e = elect({1: report(1, RECEIVE_ONLY), 2: report(1, RECEIVE_ONLY)}, 0)
    assert set(e.kicks) == {1, 2} and "receive_only" in e.kicks[1]
    assert e.plans == {} and e.revision == 0


def test_unknown_strategy_is_kicked() -> None:
    e = elect({1: report(1), 2: report(1, "bogus")}, 0)
    assert set(e.kicks) == {2} and "bogus" in e.kicks[2]


def test_tolerant_entries_only_fetched_by_peers_without_valid_content() -> None:
    def rep(rev: int, strategy: str, w: int, rng: int) -> SyncReport:
        return SyncReport(rev, strategy, {"w": meta(w), "rng": meta(rng, allow=True)})

    ep = ENFORCE_POPULAR
    e = elect({1: rep(1, ep, 1, 10), 2: rep(1, ep, 1, 11), 3: rep(0, ep, 1, 12)}, 0)
    assert e.kicks == {}
    assert not e.plans[1].fetch and not e.plans[2].fetch  # differ only on the tolerant entry
    assert dict(e.plans[3].fetch).keys() == {"rng"}  # outdated: takes it too
    assert e.popular["rng"] == h(10)  # tie among winners -> smallest hash
    assert e.plans[3].fetch["rng"] == (1,)


def test_load_is_spread_over_distributors() -> None:
    keys = {f"k{i}": 1 for i in range(8)}
    reports = {p: report(1, **keys) for p in (1, 2, 3, 4)}
    reports[9] = report(0, **{k: 0 for k in keys})
    e = elect(reports, 0)
    firsts = Counter(plan[0] for plan in e.plans[9].fetch.values())
    assert set(firsts) == {1, 2, 3, 4} and max(firsts.values()) == 2


def test_empty_reports() -> None:
    assert elect({}, None) == Election(NO_REVISION, {}, {}, {})


# ---------------------------------------------------------------- invariants by hypothesis

KEYS = ("a", "b", "c")


@st.composite
def group_reports(draw: st.DrawFn) -> tuple[dict[int, SyncReport], int | None]:
    last = draw(st.one_of(st.none(), st.integers(0, 3)))
    base = 0 if last is None else last + 1
    n = draw(st.integers(1, 7))
    peers = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n, unique=True))
    tolerant = draw(st.sets(st.sampled_from(KEYS), max_size=1))
    strategies = draw(
        st.sampled_from(
            [[ENFORCE_POPULAR], [SEND_ONLY, RECEIVE_ONLY], [ENFORCE_POPULAR, RECEIVE_ONLY, SEND_ONLY]]
        )
    )
    reports: dict[int, SyncReport] = {}
    for p in peers:
        keys = KEYS if draw(st.integers(0, 9)) else KEYS[:2]  # rare key-set mismatch
        dtype = "float16" if draw(st.integers(0, 14)) == 0 else "float32"
        entries = {k: meta(draw(st.integers(0, 2)), dtype=dtype, allow=k in tolerant) for k in keys}
        rev = base + draw(st.sampled_from([0, 0, 0, 0, -1, 1, -5]))
        reports[p] = SyncReport(rev, draw(st.sampled_from(strategies)), entries)
    return reports, last


def _shuffled(reports: dict[int, SyncReport], seed: int) -> dict[int, SyncReport]:
    items = list(reports.items())
    random.Random(seed).shuffle(items)
    return dict(items)


@settings(max_examples=300, deadline=None)
@given(group_reports(), st.integers(0, 2**32))
def test_permutation_invariant(case: tuple[dict[int, SyncReport], int | None], seed: int) -> None:
    reports, last = case
    assert elect(_shuffled(reports, seed), last) == elect(reports, last)


@settings(max_examples=300, deadline=None)
@given(group_reports())
def test_every_peer_is_planned_or_kicked_with_a_reason(case: tuple[dict[int, SyncReport], int | None]) -> None:
    reports, last = case
    e = elect(reports, last)
    assert set(e.plans) | set(e.kicks) == set(reports)
    assert not set(e.plans) & set(e.kicks)
    assert all(isinstance(r, str) and len(r) > 10 for r in e.kicks.values())
    assert all(plan.revision == e.revision for plan in e.plans.values())
    if last is not None and e.plans:
        assert e.revision == last + 1
    for p in e.plans:
        assert reports[p].revision <= e.revision
    # No peer that enforces popular content coexists in the plans with one that does not.
    planned = {reports[p].strategy for p in e.plans}
    assert ENFORCE_POPULAR not in planned or planned == {ENFORCE_POPULAR}


def _reference_winner(reports: dict[int, SyncReport], e: Election) -> tuple[bytes, ...]:
    """Recount by hand: signatures of non-receive-only peers at the elected revision."""
    counts: dict[tuple[bytes, ...], int] = {}
    for p, r in reports.items():
        # Senders kicked for not holding the elected content did vote; other kicks came first.
        voted_then_kicked = e.kicks.get(p, "").startswith("send_only peer does not hold")
        if r.strategy == RECEIVE_ONLY or r.revision != e.revision or p in e.kicks and not voted_then_kicked:
            continue
        sig = tuple(r.entries[k].hash for k in sorted(r.entries) if not r.entries[k].allow_content_inequality)
        counts[sig] = counts.get(sig, 0) + 1
    top = max(counts.values())
    return sorted(s for s, c in counts.items() if c == top)[0]


@settings(max_examples=300, deadline=None)
@given(group_reports())
def test_winner_is_most_popular_and_plans_converge(case: tuple[dict[int, SyncReport], int | None]) -> None:
    reports, last = case
    e = elect(reports, last)
    if not e.plans:
        return
    tolerant = {k for r in (reports[p] for p in e.plans) for k, m in r.entries.items() if m.allow_content_inequality}
    elected_sig = tuple(e.popular[k] for k in sorted(e.popular) if k not in tolerant)
    assert elected_sig == _reference_winner(reports, e)
    for p, plan in e.plans.items():
        r = reports[p]
        assert set(r.entries) == set(e.popular)
        # Plans list only dirty keys ...
        for key in plan.fetch:
            assert r.entries[key].hash != e.popular[key]
        # ... and after fetching, every peer holds the elected content (tolerant keys aside).
        after = {k: (e.popular[k] if k in plan.fetch else r.entries[k].hash) for k in r.entries}
        assert all(after[k] == e.popular[k] for k in after if k not in tolerant)
        if r.revision < e.revision or r.strategy == RECEIVE_ONLY:
            assert after == dict(e.popular)
        if r.strategy == SEND_ONLY:
            assert not plan.fetch


@settings(max_examples=300, deadline=None)
@given(group_reports())
def test_distributors_hold_the_popular_hash(case: tuple[dict[int, SyncReport], int | None]) -> None:
    reports, last = case
    e = elect(reports, last)
    for p, plan in e.plans.items():
        for key, dists in plan.fetch.items():
            assert dists and len(set(dists)) == len(dists) and p not in dists
            for d in dists:
                assert d in e.plans  # not kicked
                assert reports[d].strategy != RECEIVE_ONLY
                assert reports[d].revision == e.revision
                assert reports[d].entries[key].hash == e.popular[key]
