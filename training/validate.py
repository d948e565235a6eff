"""The DiLoCo validation: every claim of the issue, with workers as separate processes over pccl.

``python -m training.validate`` runs the scaled-down setting the test suite uses;
``python -m training.validate --full`` the full-size one (4 workers, H=20, 600 inner steps,
AdamW 3e-3, batch 16 per worker, warm start of 200 single-worker steps). It prints a table and
the claims, and exits with status 1 if any claim fails.

Runs (each a local master plus worker processes, :mod:`training.harness`):

- ``single``: one worker, in this process (the baseline every other run is compared with);
- ``ddp``: W workers over pccl, one gradient all-reduce per step;
- ``diloco``: W workers, DiLoCo with Nesterov(0.7, 0.9), float32 pseudo-gradients;
- ``diloco-uint8``: the same with uint8-quantized pseudo-gradients;
- ``sync-sgd``, ``async-sgd``: outer SGD 0.7 without momentum, sync and async; the async run
  delays every reduce by half a round's inner-step compute time (an artificial slow link sized
  to the machine) to show that the inner steps hide it;
- ``churn``: a shorter run where one worker dies mid-round and a new one joins later.

``--plot PATH`` draws every run's training-loss curve (the workers' mean per round; the
single worker's mean per ``inner_steps`` window) and the final validation losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from training.baselines import Recipe, evaluate, load_or_warm_start, train_single
from training.data import load_corpus
from training.harness import PeerResult, PeerSpec, run_group

__all__ = [
    "FULL",
    "QUICK",
    "Claim",
    "Scale",
    "check_churn",
    "check_claims",
    "check_parity",
    "final_losses",
    "hidden_fraction",
    "loss_curves",
    "main",
    "run_all",
    "run_churn",
    "run_kind",
]


@dataclass(frozen=True)
class Scale:
    """Sizes of one validation setting."""

    steps: int
    inner_steps: int = 20
    workers: int = 4
    batch_size: int = 16
    comm_delay: float = 0.5  # every async reduce sleeps this fraction of a round's inner compute
    churn_steps: int = 60
    churn_inner_steps: int = 5
    timeout: float = 600.0


QUICK = Scale(steps=200)
FULL = Scale(steps=600, churn_steps=200, churn_inner_steps=10, timeout=1800.0)


@dataclass(frozen=True)
class Claim:
    """One checked statement: what, whether it holds, and the numbers behind it."""

    text: str
    ok: bool
    detail: str


def default_cache() -> Path:
    """Where the warm start is cached: ``$XDG_CACHE_HOME/pccl`` or ``~/.cache/pccl``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pccl"


def _common(scale: Scale, cache: Path) -> list[str]:
    return ["--steps", str(scale.steps), "--inner-steps", str(scale.inner_steps),
            "--batch-size", str(scale.batch_size), "--min-peers", str(scale.workers), "--cache", str(cache)]


KINDS: dict[str, tuple[str, ...]] = {
    "ddp": ("--mode", "ddp"),
    "diloco": (),
    "diloco-uint8": ("--quantize", "uint8"),
    "sync-sgd": ("--outer-momentum", "0"),
    "async-sgd": ("--outer-momentum", "0", "--async"),
}


def run_kind(kind: str, scale: Scale, workdir: Path, cache: Path) -> list[PeerResult]:
    """Run one of :data:`KINDS` with ``scale.workers`` founders; raises ``GroupTimeout`` on a hang."""
    extra = KINDS[kind]
    if kind == "async-sgd" and scale.comm_delay > 0:
        extra = extra + ("--comm-delay-fraction", str(scale.comm_delay))
    # Only worker 0 evaluates: the others hold the same bits (checked through the digests).
    specs = [PeerSpec(w, extra=extra + (("--no-eval",) if w else ())) for w in range(scale.workers)]
    return run_group(specs, _common(scale, cache), workdir / kind, timeout=scale.timeout)


def run_churn(
    scale: Scale, workdir: Path, cache: Path, *, asynchronous: bool = False, workers: int | None = None
) -> list[PeerResult]:
    """Founders 0..W-1; worker 1 dies in the middle of round R/2; worker W, started and ready
    from the beginning, connects once the group completed round R/2 (so it joins at R/2+1 or
    soon after, whatever its start-up time). With ``workers=2`` the group shrinks to one peer,
    which trains alone until the newcomer arrives."""
    n = scale.workers if workers is None else workers
    rounds = scale.churn_steps // scale.churn_inner_steps
    die_at = (rounds // 2) * scale.churn_inner_steps - scale.churn_inner_steps // 2
    extra: tuple[str, ...] = ("--outer-momentum", "0", "--async") if asynchronous else ()
    specs = [PeerSpec(w, extra=extra + (("--die-at-step", str(die_at)) if w == 1 else ())) for w in range(n)]
    specs.append(PeerSpec(n, extra=extra, start_after_round=rounds // 2, prestart=True))
    common = ["--steps", str(scale.churn_steps), "--inner-steps", str(scale.churn_inner_steps),
              "--batch-size", str(scale.batch_size), "--min-peers", str(n), "--cache", str(cache)]
    name = f"churn{n}" + ("-async" if asynchronous else "")
    return run_group(specs, common, workdir / name, timeout=scale.timeout)


def check_parity(results: Sequence[PeerResult]) -> tuple[bool, str]:
    """Every round: the same digest on every peer that reported it, and no shared-state bytes
    received by a peer after its first sync. Returns (ok, explanation)."""
    by_round: dict[int, set[str]] = {}
    received = 0
    for r in results:
        for rec in r.rounds:
            by_round.setdefault(int(rec["round"]), set()).add(rec["digest"])
            received += int(rec["sync_rx_bytes"])
    split = sorted(k for k, v in by_round.items() if len(v) > 1)
    finals = {r.done["digest"] for r in results if r.done is not None}
    ok = bool(by_round) and not split and received == 0 and len(finals) == 1
    return ok, f"{len(by_round)} rounds, rounds with differing digests {split}, rx after join {received} B, " \
               f"{len(finals)} distinct final digest(s)"


def _loss(results: Sequence[PeerResult]) -> float:
    losses = [r.done["val_loss"] for r in results if r.done is not None and "val_loss" in r.done]
    if not losses:
        raise RuntimeError("no worker finished: " + "; ".join(r.stderr[-500:] for r in results))
    return float(losses[0])


def hidden_fraction(result: PeerResult, *, drain: bool = False) -> float:
    """Share of the delay injected into a worker's reduces that it never waited for.

    Waiting is measured at the round boundaries (the wait for the in-flight reduce), so it also
    includes real reduce time that was not hidden: a conservative measure. The last reduce has
    no following round to overlap — the pipeline drain, waited for by ``flush()`` — so it is
    left out unless ``drain``; over R rounds it caps the overall share at about 1 - 1/R.
    """
    assert result.done is not None
    delays = result.done["delays"]
    waited = sum(rec["wait_seconds"] for rec in result.rounds)
    if drain:
        return 1.0 - (waited + result.done["flush_wait"]) / sum(delays)
    return 1.0 - waited / sum(delays[:-1])


def _hidden(results: Sequence[PeerResult], drain: bool = False) -> float:
    """The worst worker's :func:`hidden_fraction`."""
    return min(hidden_fraction(r, drain=drain) for r in results if r.done is not None)


def run_all(scale: Scale, workdir: Path, cache: Path, kinds: Sequence[str] = tuple(KINDS)) -> dict[str, Any]:
    """Run the single-worker baseline and ``kinds``; returns the raw results by name."""
    torch.set_num_threads(1)
    recipe = replace(Recipe(), batch_size=scale.batch_size)
    corpus = load_corpus()
    start = load_or_warm_start(corpus, recipe, cache)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    model, losses = train_single(corpus, recipe, start, scale.steps)
    out["single"] = {"val_loss": evaluate(model, corpus, recipe), "seconds": time.perf_counter() - t0,
                     "losses": [float(x) for x in losses]}
    for kind in kinds:
        t0 = time.perf_counter()
        out[kind] = run_kind(kind, scale, workdir, cache)
        print(f"  {kind}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def check_claims(res: dict[str, Any], scale: Scale) -> list[Claim]:
    """The issue's claims on the results of :func:`run_all` (and ``churn`` if present)."""
    single = res["single"]["val_loss"]
    ddp, dil, q8 = _loss(res["ddp"]), _loss(res["diloco"]), _loss(res["diloco-uint8"])
    sync_sgd, async_sgd = _loss(res["sync-sgd"]), _loss(res["async-sgd"])
    ddp_reduces = res["ddp"][0].done["all_reduces"]
    dil_reduces = res["diloco"][0].done["all_reduces"]
    parity, why = check_parity(res["diloco"])
    hidden = _hidden(res["async-sgd"])
    claims = [
        Claim("DiLoCo <= single - 0.12", dil <= single - 0.12, f"{dil:.4f} vs {single:.4f}"),
        Claim("DiLoCo <= DDP + 0.06", dil <= ddp + 0.06, f"{dil:.4f} vs {ddp:.4f}"),
        Claim(f"{scale.inner_steps}x fewer all-reduces than DDP", ddp_reduces == scale.inner_steps * dil_reduces,
              f"{dil_reduces} vs {ddp_reduces}"),
        Claim("uint8 within 0.02 of float32", abs(q8 - dil) <= 0.02, f"{q8:.4f} vs {dil:.4f}"),
        Claim("async within 0.1 of sync (SGD 0.7)", abs(async_sgd - sync_sgd) <= 0.1,
              f"{async_sgd:.4f} vs {sync_sgd:.4f}"),
        Claim(">= 80% of the reduce delay hidden (async)", hidden >= 0.8,
              f"{100 * hidden:.0f}% hidden behind inner steps; {100 * _hidden(res['async-sgd'], True):.0f}% "
              "counting the final drain"),
        Claim("outer parameters bit-identical after every round", parity, why),
    ]
    for name in ("churn", "churn-async"):
        if name in res:
            ok, detail = check_churn(res[name])
            claims.append(Claim(f"{name}: training continues, newcomer bit-identical", ok, detail))
    return claims


def check_churn(results: Sequence[PeerResult]) -> tuple[bool, str]:
    """The churn run: the killed worker died, every other worker (the newcomer too) finished with
    the same final digest and agreed on every round's digest."""
    killed = [r for r in results if "--die-at-step" in r.spec.extra]
    others = [r for r in results if r not in killed]
    newcomer = results[-1]
    finished = all(r.done is not None for r in others)
    parity, why = check_parity(others)
    died = all(r.returncode not in (0, None) and r.done is None for r in killed)
    joined_late = newcomer.joined is not None and newcomer.joined["round"] > 0
    ok = finished and died and joined_late and parity
    return ok, f"finished={finished} died={died} newcomer joined at round " \
               f"{newcomer.joined['round'] if newcomer.joined else None}; {why}"


def loss_curves(res: dict[str, Any], inner_steps: int) -> dict[str, list[tuple[int, float]]]:
    """Training-loss curves of the results of :func:`run_all`: ``name -> [(inner step, loss)]``.

    A multi-worker run's point at round r is the mean over the workers that reported round r
    of their mean loss over that round's inner steps (x = r * ``inner_steps``); the single
    worker's points are the means of its per-step losses over windows of ``inner_steps``.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    single = res.get("single", {}).get("losses") or []
    windows = len(single) // inner_steps
    if windows:
        curves["single"] = [((w + 1) * inner_steps, sum(single[w * inner_steps:(w + 1) * inner_steps]) / inner_steps)
                            for w in range(windows)]
    for kind in KINDS:
        if kind not in res:
            continue
        by_round: dict[int, list[float]] = {}
        for result in res[kind]:
            for rec in result.rounds:
                by_round.setdefault(int(rec["round"]), []).append(float(rec["loss"]))
        curves[kind] = [(r * inner_steps, sum(v) / len(v)) for r, v in sorted(by_round.items())]
    return curves


def final_losses(res: dict[str, Any]) -> dict[str, float]:
    """Final validation loss of every run in ``res`` (single worker and :data:`KINDS`) that finished."""
    final = {"single": float(res["single"]["val_loss"])} if "single" in res else {}
    for kind in KINDS:
        if kind in res:
            try:
                final[kind] = _loss(res[kind])
            except RuntimeError:  # no worker finished: there is no final loss to show
                continue
    return final


def _save_plot(path: Path, res: dict[str, Any], scale: Scale) -> None:
    from pccl import plot

    title = (f"DiLoCo vs baselines: {scale.workers} workers, H={scale.inner_steps}, {scale.steps} inner steps, "
             f"batch {scale.batch_size}")
    plot.save(plot.loss_curves_figure(loss_curves(res, scale.inner_steps), final_losses(res), title=title), path)
    print(f"plot written to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.validate``; returns 0 if every claim holds."""
    ap = argparse.ArgumentParser(prog="python -m training.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full-size runs (several minutes)")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="warm-start cache directory")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workers' files here")
    ap.add_argument("--plot", type=Path, default=None, metavar="PATH",
                    help="draw the loss curves and final validation losses to PATH (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.plot is not None:
        from pccl.plot import PlotUnavailableError, require

        try:
            require()  # before minutes of training, not after
        except PlotUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    scale = FULL if args.full else QUICK
    with tempfile.TemporaryDirectory(prefix="pccl-validate-") as tmp:
        workdir = args.workdir or Path(tmp)
        res = run_all(scale, workdir, args.cache)
        res["churn"] = run_churn(scale, workdir, args.cache)
        res["churn-async"] = run_churn(scale, workdir, args.cache, asynchronous=True, workers=2)
    print(f"\n{'run':<14} {'val loss':>9} {'all-reduces':>12} {'reduce MB sent/peer':>20}")
    print(f"{'single':<14} {res['single']['val_loss']:9.4f} {'-':>12} {'-':>20}")
    for kind in KINDS:
        done = res[kind][0].done or {}
        print(f"{kind:<14} {_loss(res[kind]):9.4f} {done.get('all_reduces', 0):12d} "
              f"{done.get('reduce_tx_bytes', 0) / 1e6:20.2f}")
    claims = check_claims(res, scale)
    print()
    for c in claims:
        print(f"[{'ok' if c.ok else 'FAIL'}] {c.text}: {c.detail}")
    if args.plot is not None:
        _save_plot(args.plot, res, scale)
    return 0 if all(c.ok for c in claims) else 1


if __name__ == "__main__":
    raise SystemExit(main())
