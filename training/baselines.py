"""Single-process training helpers: the inner optimizer, evaluation, warm start, baselines.

Everything the DiLoCo validation compares against is defined here once, so the networked runs,
the in-process simulation (:mod:`training.simulate`) and the tests share one recipe:

- :class:`Recipe`: batch size, AdamW learning rate / betas / weight decay, seeds, eval size.
- :func:`make_inner_optimizer`: the AdamW every worker uses between outer rounds.
- :func:`evaluate`: mean validation loss over fixed, evenly spaced windows (no sampling noise, so
  two models are always compared on exactly the same text).
- :func:`warm_start`: 200 single-worker AdamW steps from the seeded init, optionally cached in a
  file keyed by everything that determines the result (recipe, model shape, corpus digest, torch
  version), so a cache can never be silently stale.
- :func:`train_single` / :func:`train_ddp_equivalent`: the single-worker and the DDP baseline
  (DDP with W workers of batch B computes the gradient of one batch of W x B, which is exactly
  what the DDP-equivalent does in one process).

Callers set ``torch.set_num_threads`` themselves (the library never changes global torch
settings); the measurements in the docs use one thread per worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from training.data import BatchSampler, Corpus, eval_windows
from training.model import GPTConfig, TinyGPT

__all__ = [
    "Batches",
    "Recipe",
    "StepLog",
    "evaluate",
    "load_or_warm_start",
    "make_inner_optimizer",
    "new_model",
    "train_ddp_equivalent",
    "train_single",
    "train_steps",
    "warm_start",
]


@dataclass(frozen=True)
class Recipe:
    """The training recipe of the DiLoCo validation (defaults are the issue's numbers).

    ``seed`` seeds the model init and the warm-start data stream (worker index 0 of seed
    ``seed + 1000``, a stream no DiLoCo worker uses); workers of a run use
    ``BatchSampler(seed=data_seed, worker=i)``.
    """

    batch_size: int = 16
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warm_start_steps: int = 200
    seed: int = 0
    data_seed: int = 1
    eval_sequences: int = 512
    eval_batch: int = 128
    model: GPTConfig = field(default_factory=GPTConfig)

    def key(self) -> str:
        """A short digest of every field that changes the warm-start result."""
        blob = json.dumps(
            {
                "recipe": {k: v for k, v in asdict(self).items() if k not in ("eval_sequences", "eval_batch")},
                "torch": torch.__version__,
            },
            sort_keys=True,
        )
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


class Batches(Protocol):
    """Anything with ``next() -> batch`` (a :class:`BatchSampler`, or several concatenated)."""

    def next(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepLog:
    """One training step: its index (from 0), loss, and wall seconds it took."""

    step: int
    loss: float
    seconds: float


def new_model(recipe: Recipe) -> TinyGPT:
    """A freshly initialised model (the same bits for the same recipe, in any process)."""
    return TinyGPT(recipe.model, seed=recipe.seed)


def make_inner_optimizer(params: Iterable[torch.nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    """The recipe's AdamW."""
    return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Batches,
    steps: int,
    *,
    on_step: Callable[[StepLog], None] | None = None,
) -> list[float]:
    """Run ``steps`` plain steps (zero_grad, forward, backward, step); return the losses."""
    losses: list[float] = []
    for i in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(sampler.next()).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(StepLog(i, losses[-1], time.perf_counter() - start))
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, recipe: Recipe) -> float:
    """Mean next-token loss (nats) over the recipe's fixed validation windows."""
    windows = eval_windows(corpus.val, sequences=recipe.eval_sequences, context=recipe.model.context)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, windows.shape[0], recipe.eval_batch):
        chunk = windows[start : start + recipe.eval_batch]
        total += float(model(chunk).loss) * chunk.shape[0]
    model.train(was_training)
    return total / windows.shape[0]


def warm_start(corpus: Corpus, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The model's state after ``recipe.warm_start_steps`` single-worker AdamW steps."""
    model = new_model(recipe)
    sampler = BatchSampler(
        corpus.train, batch_size=recipe.batch_size, context=recipe.model.context, seed=recipe.seed + 1000
    )
    train_steps(model, make_inner_optimizer(model.parameters(), recipe), sampler, recipe.warm_start_steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_or_warm_start(
    corpus: Corpus, recipe: Recipe, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`warm_start`, read from / written to ``cache_dir`` when one is given.

    The file name holds the recipe key and the corpus digest; it is written atomically
    (temporary file + ``os.replace``) so concurrent workers never read a half-written file.

    Raises ``OSError`` if the cache directory cannot be created or written.
    """
    if cache_dir is None:
        return warm_start(corpus, recipe)
    directory = Path(cache_dir)
    path = directory / f"warm-{recipe.key()}-{corpus.digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    state = warm_start(corpus, recipe)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        torch.save(state, f)
    os.replace(tmp, path)
    return state


def train_single(
    corpus: Corpus,
    recipe: Recipe,
    start: dict[str, torch.Tensor],
    steps: int,
    *,
    worker: int = 0,
) -> tuple[TinyGPT, list[float]]:
    """The single-worker baseline: ``steps`` AdamW steps from ``start`` on worker ``worker``'s data."""
    model = new_model(recipe)
    model.load_state_dict(start)
    sampler = BatchSampler(
        corpus.train, batch_size=recipe.batch_size, context=recipe.model.context, seed=recipe.data_seed, worker=worker
    )
    losses = train_steps(model, make_inner_optimizer(model.parameters(), recipe), sampler, steps)
    return model, losses


class _ConcatSampler:
    """Concatenates one batch of each worker's sampler: the global batch of a DDP step."""

    def __init__(self, samplers: list[BatchSampler]) -> None:
        self.samplers = samplers

    def next(self) -> torch.Tensor:
        return torch.cat([s.next() for s in self.samplers])


def train_ddp_equivalent(
    corpus: Corpus, recipe: Recipe, start: dict[str, torch.Tensor], steps: int, workers: int
) -> tuple[TinyGPT, list[float]]:
    """DDP with ``workers`` workers of the recipe's batch, run as one process on the global batch.

    The mean loss over the concatenated batch has exactly the averaged gradient DDP applies,
    and every worker draws from its own stream as it would in a DDP run.
    """
    model = new_model(recipe)
    model.load_state_dict(start)
    samplers = [
        BatchSampler(corpus.train, batch_size=recipe.batch_size, context=recipe.model.context,
                     seed=recipe.data_seed, worker=w)
        for w in range(workers)
    ]
    opt = make_inner_optimizer(model.parameters(), recipe)
    losses = train_steps(model, opt, _ConcatSampler(samplers), steps)
    return model, losses
