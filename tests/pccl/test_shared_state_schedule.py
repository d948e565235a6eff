"""The peer's fetch schedule (sans-IO): assignment and fail-over between distributors."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.shared_state_sync import FetchSchedule


def test_each_key_goes_to_its_first_distributor() -> None:
    s = FetchSchedule({"a": (1, 2), "b": (2, 1), "c": (1,)})
    assert s.take() == {1: ["a", "c"], 2: ["b"]}
    assert s.take() == {}  # nothing handed out twice
    for key, d in (("a", 1), ("b", 2), ("c", 1)):
        assert not s.done
        s.verified(key, d)
    assert s.done and s.finished and s.failure is None


def test_lost_distributor_moves_its_keys_on() -> None:
    s = FetchSchedule({"a": (1, 2), "b": (1, 3), "c": (2,)})
    s.take()
    s.verified("a", 1)
    s.lost(1, "connection reset")
    assert s.take() == {3: ["b"]}  # "a" stays done; "c" still with 2
    s.verified("b", 3)
    s.verified("c", 2)
    assert s.done


def test_bad_content_excludes_the_distributor_for_every_key() -> None:
    s = FetchSchedule({"a": (1, 2), "b": (1, 2)})
    assert s.take() == {1: ["a", "b"]}
    s.bad_content("a", 1)
    assert s.take() == {2: ["a", "b"]}
    s.verified("b", 1)  # late arrival from the excluded peer: ignored
    assert s.outstanding(2) == ["a", "b"]


def test_no_distributor_left_fails_with_the_key_named() -> None:
    s = FetchSchedule({"a": (1,), "b": (2,)})
    s.take()
    s.lost(1, "killed")
    assert s.failure is not None and "'a'" in s.failure and "killed" in s.failure
    assert s.finished and not s.done and s.take() == {}


def test_empty_plan_is_done_at_once() -> None:
    assert FetchSchedule({}).done


@st.composite
def scenario(draw: st.DrawFn) -> tuple[dict[str, tuple[int, ...]], list[tuple[str, int, int]]]:
    keys = [f"k{i}" for i in range(draw(st.integers(0, 6)))]
    fetch = {k: tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4, unique=True))) for k in keys}
    event = st.tuples(st.sampled_from(["ok", "bad", "lost"]), st.integers(0, 10), st.integers(1, 5))
    events = draw(st.lists(event, max_size=30))
    return fetch, [(kind, i, d) for kind, i, d in events]


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_schedule_invariants(case: tuple[dict[str, tuple[int, ...]], list[tuple[str, int, int]]]) -> None:
    fetch, events = case
    s = FetchSchedule(fetch)
    excluded: set[int] = set()
    asked: dict[str, int] = {}
    verified: set[str] = set()
    failed = False
    for kind, i, d in events:
        for dist, keys in s.take().items():
            assert dist not in excluded
            for k in keys:
                assert dist in fetch[k] and k not in verified
                asked[k] = dist
        outstanding = sorted(asked)
        if kind == "ok" and outstanding:
            key = outstanding[i % len(outstanding)]
            s.verified(key, asked[key])
            verified.add(key)
            del asked[key]
        elif kind == "bad" and outstanding:
            key = outstanding[i % len(outstanding)]
            excluded.add(asked[key])
            s.bad_content(key, asked[key])
        elif kind == "lost":
            excluded.add(d)
            s.lost(d, "gone")
        asked = {k: v for k, v in asked.items() if v not in excluded}
        # A failure is reported exactly once some unverified key lost all its distributors.
        failed = failed or any(k not in verified and set(fetch[k]) <= excluded for k in fetch)
        assert (s.failure is not None) == failed
        assert s.done == (not s.failure and verified == set(fetch))
