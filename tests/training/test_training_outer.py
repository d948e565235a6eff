"""DiLoCo's pure part (outer step, pseudo-gradient, state layout) and the in-process simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.baselines import Recipe, new_model, train_single
from training.data import Corpus, load_corpus
from training.model import GPTConfig
from training.outer import ROUND_KEY, OuterState, has_momentum, materialize_optimizer_state
from training.simulate import SimConfig, minmax_uint8, ring_mean_uint8, simulate_diloco

TINY = Recipe(batch_size=2, eval_sequences=4, eval_batch=4,
              model=GPTConfig(context=16, n_layer=1, d_model=16, n_head=2))


def _named(seed: int, shapes: list[tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.randn(s, generator=g)) for i, s in enumerate(shapes)]


def _nesterov_reference(theta: np.ndarray, grads: list[np.ndarray], lr: float, mu: float) -> np.ndarray:
    """SGD with Nesterov momentum in float64: b = mu*b + g; theta -= lr * (g + mu*b)."""
    b = np.zeros_like(theta)
    for g in grads:
        b = mu * b + g
        theta = theta - lr * (g + mu * b)
    return theta


def test_outer_steps_match_float64_nesterov() -> None:
    named = _named(0, [(5, 3), (7,)])
    outer = OuterState(named)  # default: SGD lr 0.7, momentum 0.9, Nesterov
    assert has_momentum(outer.optimizer)
    start = [p.double().numpy().copy() for _, p in named]
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) * 0.01 for _, p in named] for _ in range(4)]
    for step_grads in grads:
        outer.step(step_grads)
    for i, (theta, p) in enumerate(zip(start, outer.params)):
        ref = _nesterov_reference(theta, [gs[i].double().numpy() for gs in grads], 0.7, 0.9)
        np.testing.assert_allclose(p.double().numpy(), ref, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in outer.params)


def test_pseudo_gradient_and_copy_back() -> None:
    named = _named(2, [(4, 4), (3,)])
    outer = OuterState(named)
    local = [p.clone() + 0.5 * (i + 1) for i, (_, p) in enumerate(named)]
    delta = outer.pseudo_gradient(local)
    for i, d in enumerate(delta):
        np.testing.assert_allclose(d.double().numpy(), -0.5 * (i + 1), atol=1e-6)
    out = [torch.empty_like(d) for d in delta]
    assert outer.pseudo_gradient(local, out=out)[0] is out[0]
    outer.copy_to(local)
    assert all(torch.equal(l, p) for l, p in zip(local, outer.params))
    # The outer copy is independent of the model's tensors.
    named[0][1].add_(1.0)
    assert not torch.equal(named[0][1], outer.params[0])


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.8, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.1),
    ],
)
def test_materialized_state_behaves_like_a_fresh_optimizer(factory) -> None:
    """torch's own fresh optimizer is the reference: three steps must agree bit for bit."""
    named = _named(3, [(6, 2), (5,)])
    outer = OuterState(named, factory)
    assert outer.optimizer_tensors()  # state exists before any real step
    fresh_params = [p.clone() for _, p in named]
    fresh = factory(fresh_params)
    assert all(torch.equal(a, b) for a, b in zip(outer.params, fresh_params))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in fresh_params]
        outer.step(grads)
        for p, gr in zip(fresh_params, grads):
            p.grad = gr
        fresh.step()
        assert all(torch.equal(a, b) for a, b in zip(outer.params, fresh_params))


def test_materialize_restores_parameters_and_gradients() -> None:
    p = torch.ones(3)
    p.grad = torch.full((3,), 2.0)
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.5)
    materialize_optimizer_state(opt)
    assert torch.equal(p, torch.ones(3)) and torch.equal(p.grad, torch.full((3,), 2.0))
    assert float(opt.state[p]["step"]) == 0.0


def test_shared_tensors_layout_is_live() -> None:
    named = _named(5, [(2, 2), (3,)])
    outer = OuterState(named)
    shared = outer.shared_tensors()
    assert list(shared) == [
        "outer/p0", "outer/p1", "outer_opt/p0/momentum_buffer", "outer_opt/p1/momentum_buffer", ROUND_KEY,
    ]
    shared["outer/p0"].fill_(3.0)  # a sync writes in place: the outer state sees it
    assert bool((outer.params[0] == 3.0).all())
    outer.step([torch.ones(2, 2), torch.ones(3)])
    assert outer.shared_tensors()["outer_opt/p0/momentum_buffer"] is shared["outer_opt/p0/momentum_buffer"]
    assert all(t.is_contiguous() for t in shared.values())


def test_state_dict_round_trip_keeps_tensor_identity() -> None:
    named = _named(6, [(3, 3)])
    a = OuterState(named)
    a.step([torch.full((3, 3), 0.1)])
    a.round += 4
    saved = a.state_dict()
    b = OuterState(_named(7, [(3, 3)]))
    live = b.shared_tensors()
    b.load_state_dict(saved)
    after = b.shared_tensors()
    assert all(after[k] is live[k] for k in live)
    assert all(torch.equal(after[k], a.shared_tensors()[k]) for k in live)
    # Both continue identically.
    for s in (a, b):
        s.step([torch.full((3, 3), -0.2)])
    assert torch.equal(a.params[0], b.params[0])
    with pytest.raises(ValueError):
        OuterState(_named(8, [(2, 2)])).load_state_dict(saved)


def test_outer_state_refusals() -> None:
    with pytest.raises(ValueError):
        OuterState([])
    with pytest.raises(ValueError):
        OuterState([("a", torch.zeros(2)), ("a", torch.zeros(2))])
    with pytest.raises(ValueError):
        OuterState([("i", torch.zeros(2, dtype=torch.int64))])
    assert not has_momentum(torch.optim.SGD([torch.zeros(1)], lr=1.0))


def test_minmax_uint8_error_is_half_a_step() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    y = minmax_uint8(x)
    lo, hi = x.double().min().item(), x.double().max().item()
    step = (hi - lo) / 255
    assert (y.double() - x.double()).abs().max().item() <= step / 2 + 1e-6
    assert len(torch.unique(y)) <= 256
    assert torch.equal(minmax_uint8(torch.full((4,), 2.5)), torch.full((4,), 2.5))
    ds = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ref = np.mean([d.double().numpy() for d in ds], axis=0)
    err = np.abs(ring_mean_uint8(ds).double().numpy() - ref).max()
    assert 0 < err < 0.05


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(128 << 10)


def test_simulated_fedavg_round_is_the_mean_of_independent_workers(corpus: Corpus) -> None:
    """One round of FedAvg (outer SGD lr 1, no momentum) = the float64 mean of the workers' weights."""
    start = new_model(TINY).state_dict()
    cfg = SimConfig(workers=3, inner_steps=4, total_steps=4, outer_lr=1.0, outer_momentum=0.0)
    final, res = simulate_diloco(corpus, TINY, start, cfg)
    assert res.rounds == 1 and np.isfinite(res.val_loss)
    workers = [train_single(corpus, TINY, start, 4, worker=w)[0].state_dict() for w in range(3)]
    for name, p in final.named_parameters():
        ref = np.mean([w[name].double().numpy() for w in workers], axis=0)
        np.testing.assert_allclose(p.detach().double().numpy(), ref, rtol=0, atol=1e-6)


def test_simulated_async_with_one_round_equals_sync(corpus: Corpus) -> None:
    start = new_model(TINY).state_dict()
    cfg = SimConfig(workers=2, inner_steps=3, total_steps=3)
    sync, _ = simulate_diloco(corpus, TINY, start, cfg)
    delayed, _ = simulate_diloco(corpus, TINY, start, SimConfig(workers=2, inner_steps=3, total_steps=3,
                                                                asynchronous=True))
    assert all(torch.equal(a, b) for a, b in zip(sync.parameters(), delayed.parameters()))
    with pytest.raises(ValueError):
        simulate_diloco(corpus, TINY, start, SimConfig(inner_steps=3, total_steps=4))
