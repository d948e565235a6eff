"""DiLoCo's round logic over an in-memory group, against the in-process simulation, bit for bit.

The simulation (:func:`training.simulate.simulate_diloco`) writes the algorithm down as plain
loops; DiLoCo runs it through the communicator API with threads, background reduces and shared
state. Same seeds and data streams, same mean: the outer parameters must come out identical.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch

from fake_comm import FakeGroup
from training.baselines import Recipe, make_inner_optimizer, new_model
from training.data import BatchSampler, Corpus, load_corpus
from training.diloco import DiLoCo, outer_digest
from training.model import GPTConfig
from training.simulate import SimConfig, simulate_diloco

TINY = Recipe(batch_size=2, eval_sequences=4, eval_batch=4,
              model=GPTConfig(context=16, n_layer=1, d_model=16, n_head=2))
SGD07 = lambda ps: torch.optim.SGD(ps, lr=0.7)  # noqa: E731 - outer optimizer factory


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(128 << 10)


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    """The workers are threads of this process: one intra-op thread each, as in a real run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def _train(group: FakeGroup, corpus: Corpus, start: dict[str, torch.Tensor], rank: int, steps: int, h: int,
           **kwargs: Any) -> DiLoCo:
    model = new_model(TINY)
    model.load_state_dict(start)
    sampler = BatchSampler(corpus.train, batch_size=TINY.batch_size, context=TINY.model.context,
                           seed=TINY.data_seed, worker=rank)
    diloco = DiLoCo(group.comm(rank), model, make_inner_optimizer(model.parameters(), TINY), h, **kwargs)
    infos = []
    for _ in range(steps):
        model(sampler.next()).loss.backward()
        info = diloco.step()
        if info is not None:
            infos.append(info)
            # The model continues from the outer parameters after every round.
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), diloco.outer.params))
    diloco.flush()
    diloco.close()
    diloco.infos = infos  # type: ignore[attr-defined]
    return diloco


@pytest.mark.parametrize("asynchronous", [False, True])
def test_diloco_equals_the_simulation(corpus: Corpus, asynchronous: bool) -> None:
    start = new_model(TINY).state_dict()
    group = FakeGroup(2)
    runs = _in_threads(2, lambda r: _train(group, corpus, start, r, 9, 3, outer_optimizer=SGD07,
                                           asynchronous=asynchronous))
    sim, _ = simulate_diloco(corpus, TINY, start, SimConfig(workers=2, inner_steps=3, total_steps=9,
                                                            outer_momentum=0.0, asynchronous=asynchronous))
    for d in runs:
        assert all(torch.equal(p, q) for p, q in zip(d.outer.params, sim.parameters()))
        assert d.round == 3 and [i.round for i in d.infos] == [1, 2, 3]
        assert all(i.sync_rx_bytes == 0 and i.world_size == 2 and not i.joined for i in d.infos)
    assert outer_digest(runs[0]) == outer_digest(runs[1])
    # Sync: 3 reduces, all at the boundaries; async: the third one is applied by flush().
    assert runs[0].all_reduces == 3
    assert group.calls[0] == group.calls[1]


def test_nesterov_default_equals_the_simulation(corpus: Corpus) -> None:
    start = new_model(TINY).state_dict()
    group = FakeGroup(3)
    runs = _in_threads(3, lambda r: _train(group, corpus, start, r, 8, 4))
    sim, _ = simulate_diloco(corpus, TINY, start, SimConfig(workers=3, inner_steps=4, total_steps=8))
    assert all(torch.equal(p, q) for p, q in zip(runs[2].outer.params, sim.parameters()))


def test_alone_the_mean_is_the_own_pseudo_gradient(corpus: Corpus) -> None:
    start = new_model(TINY).state_dict()
    (run,) = _in_threads(1, lambda r: _train(FakeGroup(1), corpus, start, r, 6, 2))
    sim, _ = simulate_diloco(corpus, TINY, start, SimConfig(workers=1, inner_steps=2, total_steps=6))
    assert all(torch.equal(p, q) for p, q in zip(run.outer.params, sim.parameters()))
    assert run.all_reduces == 0  # nothing to reduce with


def test_async_with_momentum_warns(corpus: Corpus) -> None:
    model = new_model(TINY)
    with pytest.warns(RuntimeWarning, match="momentum"):
        d = DiLoCo(FakeGroup(1).comm(0), model, make_inner_optimizer(model.parameters(), TINY), 2,
                   asynchronous=True)
    d.close()
    with pytest.raises(ValueError):
        DiLoCo(FakeGroup(1).comm(0), model, make_inner_optimizer(model.parameters(), TINY), 0)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_checkpoint_resume_continues_identically(corpus: Corpus, asynchronous: bool) -> None:
    """Run 4 rounds straight, or 2 rounds + state_dict + a fresh DiLoCo + 2 rounds: same bits."""
    start = new_model(TINY).state_dict()

    def run(split: bool) -> torch.Tensor:
        model = new_model(TINY)
        model.load_state_dict(start)
        opt = make_inner_optimizer(model.parameters(), TINY)
        sampler = BatchSampler(corpus.train, batch_size=2, context=16, seed=0)
        d = DiLoCo(FakeGroup(1).comm(0), model, opt, 2, outer_optimizer=SGD07, asynchronous=asynchronous)
        for i in range(8):
            if split and i == 4:
                ckpt = d.state_dict()
                d.close()
                d = DiLoCo(FakeGroup(1).comm(0), model, opt, 2, outer_optimizer=SGD07, asynchronous=asynchronous)
                d.load_state_dict(ckpt)
                assert d.round == 2 and d.inner_step == 4
            model(sampler.next()).loss.backward()
            d.step()
        d.flush()
        d.close()
        return torch.cat([p.reshape(-1) for p in d.outer.params])

    assert torch.equal(run(False), run(True))
