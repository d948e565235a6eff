"""The tiny GPT and the single-worker helpers (evaluation, warm start and its cache)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.baselines import Recipe, evaluate, load_or_warm_start, make_inner_optimizer, new_model, train_steps
from training.data import BatchSampler, Corpus, eval_windows, load_corpus
from training.model import GPTConfig, TinyGPT

SMALL = Recipe(batch_size=4, warm_start_steps=3, eval_sequences=12, eval_batch=5)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(256 << 10)


def _reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy in float64 numpy: log-sum-exp minus the target's logit."""
    z = logits.detach().double().numpy().reshape(-1, logits.shape[-1])
    t = targets.numpy().reshape(-1)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(t)), t]))


def test_parameter_count_matches_the_architecture() -> None:
    v, c, d, layers = 128, 64, 64, 2
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert TinyGPT().num_parameters() == v * d + c * d + layers * per_block + 2 * d == 112_384


def test_init_is_a_function_of_the_seed_only() -> None:
    before = torch.random.get_rng_state()
    a, b, c = TinyGPT(seed=7), TinyGPT(seed=7), TinyGPT(seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.fc.weight"], sc["blocks.0.fc.weight"])
    w = sa["blocks.1.attn.qkv.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and float(w.mean().abs()) < 0.002
    assert bool((sa["blocks.0.ln1.weight"] == 1).all()) and bool((sa["blocks.0.fc.bias"] == 0).all())


def test_loss_is_next_token_cross_entropy(corpus: Corpus) -> None:
    model = TinyGPT(seed=1)
    batch = BatchSampler(corpus.train, batch_size=3, context=64, seed=0).next()
    out = model(batch)
    assert out.logits.shape == (3, 64, 128)
    assert out.loss.item() == pytest.approx(_reference_loss(out.logits, batch[:, 1:]), abs=1e-5)
    explicit = model(batch[:, :-1], batch[:, 1:])
    assert torch.equal(explicit.logits, out.logits)
    # Near-uniform predictions at init: the loss is close to ln(128).
    assert abs(out.loss.item() - np.log(128)) < 0.3


def test_attention_is_causal() -> None:
    model = TinyGPT(seed=2)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 25] = (changed[:, 25] + 1) % 128
    a, b = model.logits(tokens), model.logits(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_shape_errors() -> None:
    model = TinyGPT(GPTConfig(context=8))
    with pytest.raises(ValueError, match="exceeds the context"):
        model.logits(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        GPTConfig(d_model=30, n_head=4)


def test_training_fits_one_batch(corpus: Corpus) -> None:
    model = new_model(SMALL)
    batch = BatchSampler(corpus.train, batch_size=4, context=64, seed=0).next()

    class Same:
        def next(self) -> torch.Tensor:
            return batch

    losses = train_steps(model, make_inner_optimizer(model.parameters(), SMALL), Same(), 40)
    assert losses[-1] < losses[0] - 1.0


def test_evaluate_matches_a_float64_reference(corpus: Corpus) -> None:
    model = TinyGPT(seed=3)
    windows = eval_windows(corpus.val, sequences=SMALL.eval_sequences, context=64)
    with torch.no_grad():
        per_window = [_reference_loss(model.logits(w[None, :-1]), w[None, 1:]) for w in windows]
    assert evaluate(model, corpus, SMALL) == pytest.approx(float(np.mean(per_window)), abs=1e-5)
    assert model.training  # evaluation restores the mode


def test_warm_start_cache(corpus: Corpus, tmp_path: Path) -> None:
    first = load_or_warm_start(corpus, SMALL, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and SMALL.key() in files[0].name and corpus.digest in files[0].name
    # The cached state is what training produced: a second call reads it back unchanged...
    second = load_or_warm_start(corpus, SMALL, tmp_path)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # ...and it differs from the untrained init (3 AdamW steps moved every weight matrix).
    init = new_model(SMALL).state_dict()
    assert not torch.equal(first["blocks.0.fc.weight"], init["blocks.0.fc.weight"])
    # A different recipe never reads that file.
    other = replace(SMALL, lr=1e-3)
    assert other.key() != SMALL.key()
    load_or_warm_start(corpus, other, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    # Evaluation ignores eval-only fields in the key.
    assert replace(SMALL, eval_sequences=99).key() == SMALL.key()
