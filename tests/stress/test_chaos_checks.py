"""The chaos run's checks on their own: they pass on right data and fail on wrong data.

References here are computed with Python integers or float64 numpy, independently of
the checkers' own reference code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stress import chaos_report as R
from stress import chaos_values as V
from stress.chaos import ALL_FAULTS, WARMUP, build_schedule, parse_args

SPECS = [V.TensorSpec("float64", 301), V.TensorSpec("float32", 257), V.TensorSpec("int64", 199)]


def summed(spec: V.TensorSpec, peers: list[int], step: int, index: int) -> np.ndarray:
    """The ring's SUM, computed element by element with Python ints (wrapped for int64)."""
    parts = [V.contribution(spec, p, step, index) for p in peers]
    if spec.dtype == "int64":
        vals = [sum(int(x[j]) for x in parts) for j in range(spec.numel)]
        wrapped = [(v + 2**63) % 2**64 - 2**63 for v in vals]
        return np.array(wrapped, dtype=np.int64)
    return np.array([sum(float(x[j]) for x in parts) for j in range(spec.numel)], dtype=spec.dtype)


@pytest.mark.parametrize("spec", SPECS, ids=[s.dtype for s in SPECS])
@settings(max_examples=20, deadline=None)
@given(peers=st.sets(st.integers(1, V.SLOTS - 1), min_size=2, max_size=8), step=st.integers(0, 10**6))
def test_a_right_sum_passes_and_reveals_its_peers(spec: V.TensorSpec, peers: set[int], step: int) -> None:
    ids = sorted(peers)
    result = summed(spec, ids, step, 2)
    verdict = V.check_exact(spec, result, step, 2, ids[0])
    assert verdict.error is None and verdict.participants == tuple(ids)


@pytest.mark.parametrize("spec", SPECS, ids=[s.dtype for s in SPECS])
def test_every_kind_of_wrong_sum_is_caught(spec: V.TensorSpec) -> None:
    ids, step = [3, 5, 9], 17
    good = summed(spec, ids, step, 0)
    off = good.copy()
    off[V.SLOTS + 100] += 1
    assert "differ from the reference" in (V.check_exact(spec, off, step, 0, 3).error or "")
    twice = good + V.contribution(spec, 5, step, 0)  # a contribution counted twice
    assert "slot 5 holds" in (V.check_exact(spec, twice, step, 0, 3).error or "")
    assert "missing from the participants" in (V.check_exact(spec, good, step, 0, 4).error or "")
    wrong_step = summed(spec, ids, step + 1, 0)
    assert V.check_exact(spec, wrong_step, step, 0, 3).error is not None
    alone = V.contribution(spec, 3, step, 0)
    assert "needs 2" in (V.check_exact(spec, alone, step, 0, 3).error or "")


def test_int64_contributions_really_wrap() -> None:
    spec = V.TensorSpec("int64", 4000)
    vals = [int(v) for v in V.data_values(spec, 1, 0, 0)] + [int(v) for v in V.data_values(spec, 2, 0, 0)]
    assert max(vals) > 2**62 and min(vals) < -(2**62)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_quantized_check_accepts_errors_within_the_bound_and_refuses_beyond(dtype: str) -> None:
    spec, ids, step = V.TensorSpec(dtype, 5000), [2, 4, 6, 8], 3
    exact = np.sum([V.contribution(spec, p, step, 1, quantized=True).astype(np.float64) for p in ids], axis=0)
    s_max = max(1.0, float(np.abs(np.stack([V.data_values(spec, p, step, 1, True) for p in ids])).sum(0).max()))
    bound = V.quantized_bound(len(ids), s_max, dtype)
    rng = np.random.default_rng(0)
    noisy = exact + rng.uniform(-0.9, 0.9, exact.shape) * bound
    verdict = V.check_quantized(spec, noisy.astype(dtype), step, 1, 2, max_world=8)
    assert verdict.error is None and verdict.participants == tuple(ids) and verdict.max_error <= bound
    noisy[V.SLOTS + 7] = exact[V.SLOTS + 7] + 1.5 * bound
    assert "over the §7.4 bound" in (V.check_quantized(spec, noisy.astype(dtype), step, 1, 2, 8).error or "")
    noisy[V.SLOTS + 7] = np.nan
    assert V.check_quantized(spec, noisy.astype(dtype), step, 1, 2, 8).error is not None


def test_quantized_bound_is_the_documented_formula() -> None:
    # docs/protocol.md §7.4 with min_max (k = 1/2), uint8 (L = 255), float32 compute and tensor dtype.
    world, s = 4, 3.0
    u, tiny = 2.0**-24, 2.0**-149
    step = 2 * s / 255
    one = 0.5 * step + 8 * u * s + u * (s + 0.5 * step) + 4 * tiny
    assert V.quantized_bound(world, s, "float32") == pytest.approx(world * one + world * u * s, rel=1e-6)


def test_shared_state_advances_to_its_closed_form_and_any_change_is_caught() -> None:
    state = {k: v.copy() for k, v in V.state_content(1).items()}
    for revision in range(2, 40):
        V.advance_state(state)
        assert V.state_problem(state, revision) is None
    state["m"][123] += 1
    assert "key 'm' differs" in (V.state_problem(state, 39) or "")
    assert V.state_problem(V.state_content(39), 40) is not None


# -- the report ---------------------------------------------------------------------------------


def proc(name: str, events: list[dict[str, object]], **kw: object) -> R.Process:
    p = R.Process(name, 0, started=0.0, **kw)  # type: ignore[arg-type]
    p.events = events
    return p


def step_event(
    t: float, step: int, me: int, parts: list[int], digest: str, error: str | None = None
) -> dict[str, object]:
    return {"ev": "step", "t": t, "step": step, "peer_id": me,
            "checks": [{"participants": parts, "digest": digest, "error": error, "max_error": 0.0, "bound": 0.0}]}


def test_value_and_parity_violations_are_reported() -> None:
    a = proc("a", [step_event(1, 5, 1, [1, 2], "x"), step_event(2, 6, 1, [1, 2], "y")])
    b = proc("b", [step_event(1, 5, 2, [1, 2], "x"), step_event(2, 6, 2, [1, 2], "z", "element 3 is off")])
    summary, violations = R.check_values([a, b])
    assert summary["reduce_parity_checks"] == 1 and summary["tensors_checked"] == 4
    assert sorted(v["kind"] for v in violations) == ["parity", "value"]
    c = proc("c", [step_event(1, 5, 3, [1, 2], "x")])  # claims a result it is not part of
    assert any("does not include them" in v["detail"] for v in R.check_values([a, c])[1])


def test_shared_state_violations_are_reported() -> None:
    sync = {"ev": "sync", "t": 1.0, "rx": 0, "perturbed": False, "problem": None}
    a = proc("a", [dict(sync, revision=4, hash="h1"), dict(sync, revision=5, hash="h2")])
    b = proc("b", [dict(sync, revision=4, hash="h1"), dict(sync, revision=5, hash="h3", problem="key 'w' differs")])
    summary, violations = R.check_syncs([a, b])
    assert summary["sync_parity_checks"] == 1 and summary["max_revision"] == 5
    assert len(violations) == 2 and {v["kind"] for v in violations} == {"shared_state"}


def test_stalls_count_progress_but_not_time_spent_stopped() -> None:
    limits = R.Limits(stall=5.0)
    events = [{"ev": "step", "t": t} for t in (1.0, 2.0, 10.0, 11.0)]
    stopped = proc("a", events, stops=[(2.5, 8.0)])
    assert R.check_stalls([stopped], limits, run_end=12.0)[1] == []
    stuck = proc("b", events)
    summary, violations = R.check_stalls([stuck], limits, run_end=12.0)
    assert summary["max_stall_s"] == 8.0 and len(violations) == 1
    hung_at_end = proc("c", events[:2], ended=20.0)
    assert R.check_stalls([hung_at_end], limits, run_end=20.0)[1]


def test_unexpected_errors_tracebacks_and_crashes_are_reported() -> None:
    ok = proc("ok", [{"ev": "error", "t": 1, "op": "reduce", "type": "PeerLostError", "message": "m"}], exit_code=0)
    usage = proc("usage", [{"ev": "error", "t": 1, "op": "vote", "type": "InvalidUsageError", "message": "m"}])
    odd = proc("odd", [{"ev": "unexpected", "t": 1, "op": "sync", "type": "KeyError", "message": "m"}])
    noisy = proc("noisy", [], stderr="...\nTask exception was never retrieved\n...")
    crashed = proc("crashed", [], exit_code=3)
    killed = proc("killed", [], exit_code=-9, killed=True)
    summary, violations = R.check_errors([ok, usage, odd, noisy, crashed, killed])
    assert summary["recoverable_errors"] == {"reduce:PeerLostError": 1, "vote:InvalidUsageError": 1}
    assert sorted(v["process"] for v in violations) == ["crashed", "noisy", "odd", "usage"]


def test_resource_growth_is_reported_for_long_lived_processes_only() -> None:
    limits = R.Limits(fd_growth=10, rss_growth_mib=50, warmup=5, min_life=20)
    flat = [(float(t), 40, 100_000) for t in range(0, 60)]
    leaking = [(float(t), 40 + t, 100_000 + t * 2048) for t in range(0, 60)]
    short = [(float(t), 40 + 10 * t, 100_000) for t in range(0, 15)]
    procs = [proc("flat", [], samples=flat), proc("leak", [], samples=leaking), proc("short", [], samples=short)]
    summary, violations = R.check_resources(procs, limits)
    assert set(summary["judged"]) == {"flat", "leak"}
    assert sorted(v["kind"] for v in violations) == ["fd_growth", "rss_growth"]


def test_master_log_lines_are_parsed_with_their_fields() -> None:
    text = "\n".join([
        '2026-01-01 00:00:00,000 INFO pccl.master: collective_done group=0 tag=2 op_id=7 success=true reason=""',
        '2026-01-01 00:00:00,001 INFO pccl.master: collective_done group=0 tag=1 op_id=8 success=false reason="a b"',
        '2026-01-01 00:00:00,002 INFO pccl.master: kick peer=3 reason="silent for 2.31 s, over the heartbeat"',
        '2026-01-01 00:00:00,003 INFO pccl.master: ring group=0 epoch=4 ring=[1, 2, 4]',
        'not a master line',
    ])
    lines = R.parse_master_log(text)
    assert lines[3] == ("ring", {"group": 0, "epoch": 4, "ring": [1, 2, 4]})
    counts = R.master_counts(lines)
    assert counts["collectives_completed"] == 1 and counts["collectives_aborted"] == 1
    assert counts["kicks"] == {"heartbeat timeout": 1}


def test_read_events_skips_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"ev": "start", "t": 1}) + "\n" + '{"ev": "st')
    assert R.read_events(path) == [{"ev": "start", "t": 1}]


# -- the schedule --------------------------------------------------------------------------------


def test_schedule_is_reproducible_and_covers_every_kind_early() -> None:
    one = build_schedule(42, 120, ALL_FAULTS, 5, 3.0, 2.0, 10.0)
    assert one == build_schedule(42, 120, ALL_FAULTS, 5, 3.0, 2.0, 10.0)
    assert one != build_schedule(43, 120, ALL_FAULTS, 5, 3.0, 2.0, 10.0)
    assert {f.kind for f in one[: len(ALL_FAULTS)]} == set(ALL_FAULTS)
    assert all(WARMUP < f.at <= 110 and 0 <= f.slot < 5 for f in one)
    stops = [f.seconds for f in one if f.kind == "stop"]
    assert stops[0] > 2.0 and stops[1] < 2.0  # the first stop outlasts the heartbeat timeout, the next does not
    assert build_schedule(1, 120, (), 5, 3.0, 2.0, 10.0) == []


def test_cli_expands_proxy_and_refuses_unknown_faults() -> None:
    cfg = parse_args(["--faults", "kill,proxy", "--peers", "3"])
    assert cfg.faults == ("kill", "latency", "throttle", "reset", "partition", "truncate", "garbage") and cfg.proxied
    assert not parse_args(["--faults", "kill,stop"]).proxied
    with pytest.raises(SystemExit):
        parse_args(["--faults", "meteor"])
