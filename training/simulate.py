"""DiLoCo simulated in one process (no networking), and the table of the issue's baselines.

The W workers run one after the other; the all-reduce is replaced by a plain torch mean of the
pseudo-gradients (optionally passed through a min-max uint8 emulation of the quantized ring), and
the outer step is :class:`training.outer.OuterState`'s, the same code the networked trainer runs.
This confirms the issue's numbers on this code before networking exists, and it is the reference
the multi-process tests compare the networked runs with.

``python -m training.simulate`` prints the table (single worker, DDP, DiLoCo Nesterov, uint8,
FedAvg, sync and async SGD 0.7) for the recipe's full-size setting; ``--steps`` / ``--inner-steps``
scale it down. It sets one torch thread (the measurements assume one thread per worker).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from training.baselines import (
    Recipe,
    evaluate,
    load_or_warm_start,
    make_inner_optimizer,
    new_model,
    train_ddp_equivalent,
    train_single,
    train_steps,
)
from training.data import BatchSampler, Corpus, load_corpus
from training.model import TinyGPT
from training.outer import OuterState

__all__ = ["SimConfig", "SimResult", "minmax_uint8", "ring_mean_uint8", "simulate_diloco", "main"]


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. ``total_steps`` counts inner steps per worker."""

    workers: int = 4
    inner_steps: int = 20
    total_steps: int = 600
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    quantize: bool = False
    asynchronous: bool = False

    def outer_optimizer(self) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        """The outer optimizer factory this config describes."""
        return lambda ps: torch.optim.SGD(
            ps, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov and self.outer_momentum > 0
        )


@dataclass(frozen=True)
class SimResult:
    """Validation loss of the final outer parameters, rounds run, and wall seconds."""

    val_loss: float
    rounds: int
    seconds: float


def minmax_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` after a min-max uint8 round trip (range [min, max] onto 0..255, round to nearest)."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    if float(step) == 0.0:
        return x.clone()
    return torch.round((x - lo) / step) * step + lo


def ring_mean_uint8(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of ``deltas`` as a quantized ring computes it: every partial sum is re-quantized
    before it is forwarded, and the owner quantizes the final mean once for the all-gather."""
    acc = minmax_uint8(deltas[0])
    for d in deltas[1:-1]:
        acc = minmax_uint8(acc + d)
    total = acc + deltas[-1] if len(deltas) > 1 else deltas[0]
    return minmax_uint8(total / len(deltas))


def _mean(deltas: Sequence[Sequence[torch.Tensor]], quantize: bool) -> list[torch.Tensor]:
    per_param = list(zip(*deltas))
    if quantize:
        return [ring_mean_uint8(ds) for ds in per_param]
    return [torch.stack(ds).mean(0) for ds in per_param]


def simulate_diloco(
    corpus: Corpus, recipe: Recipe, start: dict[str, torch.Tensor], cfg: SimConfig
) -> tuple[TinyGPT, SimResult]:
    """Run DiLoCo with ``cfg.workers`` in-process workers from ``start``; evaluate ``θ_outer``.

    Async mode (one-round-delayed outer update, PCCL's order): at each boundary ``Δ_t`` is taken
    against the current ``θ_outer`` *before* the outer step, the step applies the previous round's
    mean, and the local models restart from the result; the last mean is applied at the end.

    Raises ``ValueError`` if ``total_steps`` is not a multiple of ``inner_steps``.
    """
    if cfg.total_steps % cfg.inner_steps:
        raise ValueError(f"total_steps={cfg.total_steps} is not a multiple of inner_steps={cfg.inner_steps}")
    t0 = time.perf_counter()
    models = [new_model(recipe) for _ in range(cfg.workers)]
    for m in models:
        m.load_state_dict(start)
    outer = OuterState(models[0].named_parameters(), cfg.outer_optimizer())
    opts = [make_inner_optimizer(m.parameters(), recipe) for m in models]
    samplers = [
        BatchSampler(corpus.train, batch_size=recipe.batch_size, context=recipe.model.context,
                     seed=recipe.data_seed, worker=w)
        for w in range(cfg.workers)
    ]
    pending: list[torch.Tensor] | None = None
    rounds = cfg.total_steps // cfg.inner_steps
    for _ in range(rounds):
        for m, o, s in zip(models, opts, samplers):
            train_steps(m, o, s, cfg.inner_steps)
        deltas = [outer.pseudo_gradient(list(m.parameters())) for m in models]
        mean: list[torch.Tensor] | None = _mean(deltas, cfg.quantize)
        if cfg.asynchronous:
            mean, pending = pending, mean  # apply last round's mean; this one is "in flight"
        if mean is not None:
            outer.step(mean)
        outer.round += 1
        for m in models:
            outer.copy_to(list(m.parameters()))
    if pending is not None:
        outer.step(pending)
    final = new_model(recipe)
    outer.copy_to(list(final.parameters()))
    return final, SimResult(evaluate(final, corpus, recipe), rounds, time.perf_counter() - t0)


def _time_inner_step(corpus: Corpus, recipe: Recipe, start: dict[str, torch.Tensor], steps: int = 50) -> float:
    model = new_model(recipe)
    model.load_state_dict(start)
    sampler = BatchSampler(corpus.train, batch_size=recipe.batch_size, context=recipe.model.context, seed=99)
    opt = make_inner_optimizer(model.parameters(), recipe)
    train_steps(model, opt, sampler, 5)
    t = time.perf_counter()
    train_steps(model, opt, sampler, steps)
    return (time.perf_counter() - t) / steps


def main(argv: Sequence[str] | None = None) -> int:
    """Print the baseline table. Returns the process exit status."""
    ap = argparse.ArgumentParser(prog="python -m training.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="inner steps per worker after the warm start")
    ap.add_argument("--inner-steps", type=int, default=20, help="H")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    ap.add_argument("--cache", default=None, help="directory for the warm-start cache")
    ap.add_argument("--only", default=None, help="comma-separated row names to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    corpus = load_corpus()
    recipe = replace(Recipe(), batch_size=args.batch_size)
    start = load_or_warm_start(corpus, recipe, args.cache)
    base = SimConfig(workers=args.workers, inner_steps=args.inner_steps, total_steps=args.steps)
    print(f"corpus {corpus.nbytes} bytes ({corpus.files} files, {corpus.digest}); "
          f"inner step {_time_inner_step(corpus, recipe, start) * 1e3:.1f} ms (1 thread, batch {recipe.batch_size})")
    warm = new_model(recipe)
    warm.load_state_dict(start)
    print(f"warm start ({recipe.warm_start_steps} steps): val {evaluate(warm, corpus, recipe):.4f}")
    rows: dict[str, Callable[[], tuple[float, float]]] = {
        "single": lambda: _timed(lambda: evaluate(train_single(corpus, recipe, start, args.steps)[0], corpus, recipe)),
        "ddp": lambda: _timed(lambda: evaluate(
            train_ddp_equivalent(corpus, recipe, start, args.steps, args.workers)[0], corpus, recipe)),
        "diloco": lambda: _sim(corpus, recipe, start, base),
        "diloco-uint8": lambda: _sim(corpus, recipe, start, replace(base, quantize=True)),
        "fedavg": lambda: _sim(corpus, recipe, start, replace(base, outer_lr=1.0, outer_momentum=0.0)),
        "sync-sgd0.7": lambda: _sim(corpus, recipe, start, replace(base, outer_momentum=0.0)),
        "async-sgd0.7": lambda: _sim(corpus, recipe, start, replace(base, outer_momentum=0.0, asynchronous=True)),
    }
    chosen = args.only.split(",") if args.only else list(rows)
    print(f"{'run':<14} {'val loss':>9} {'seconds':>8}")
    for name in chosen:
        loss, secs = rows[name]()
        print(f"{name:<14} {loss:9.4f} {secs:8.1f}", flush=True)
    return 0


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def _sim(corpus: Corpus, recipe: Recipe, start: dict[str, torch.Tensor], cfg: SimConfig) -> tuple[float, float]:
    _, res = simulate_diloco(corpus, recipe, start, cfg)
    return res.val_loss, res.seconds


if __name__ == "__main__":
    raise SystemExit(main())
