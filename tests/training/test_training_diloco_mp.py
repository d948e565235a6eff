"""DiLoCo's claims with workers as separate processes over pccl (scaled down: ``training.validate.QUICK``).

Each run is a local master plus worker processes on 127.0.0.1 (:mod:`training.harness`); runs are
shared between the tests of this module and made on first use. The full-size runs are
``python -m training.validate --full``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from training import validate as V
from training.baselines import Recipe, evaluate, load_or_warm_start, train_single
from training.data import load_corpus
from training.harness import PeerResult

SCALE = V.QUICK


class Runs:
    """Lazily made runs, by name."""

    def __init__(self, workdir: Path, cache: Path) -> None:
        self.workdir = workdir
        self.cache = cache
        self._done: dict[str, Any] = {}

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._done:
            self._done[name] = make()
        return self._done[name]

    def kind(self, kind: str) -> list[PeerResult]:
        return self.get(kind, lambda: V.run_kind(kind, SCALE, self.workdir, self.cache))

    def loss(self, kind: str) -> float:
        results = self.kind(kind)
        finished = [r.done for r in results if r.done is not None]
        assert len(finished) == len(results), [r.stderr[-2000:] for r in results if r.done is None]
        if kind != "ddp":  # DDP replicas are identical by construction; DiLoCo's are checked here
            assert len({d["digest"] for d in finished}) == 1
        return float(finished[0]["val_loss"])

    def single(self) -> float:
        def make() -> float:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                recipe = Recipe(batch_size=SCALE.batch_size)
                corpus = load_corpus()
                start = load_or_warm_start(corpus, recipe, self.cache)
                return evaluate(train_single(corpus, recipe, start, SCALE.steps)[0], corpus, recipe)
            finally:
                torch.set_num_threads(previous)

        return float(self.get("single", make))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("diloco-mp")
    r = Runs(base / "runs", base / "cache")
    r.single()  # also writes the warm-start cache the workers read
    return r


@pytest.mark.timeout(300)
def test_diloco_beats_single_and_nears_ddp_with_20x_fewer_all_reduces(runs: Runs) -> None:
    single, ddp, diloco = runs.single(), runs.loss("ddp"), runs.loss("diloco")
    assert diloco <= single - 0.12, (diloco, single)
    assert diloco <= ddp + 0.06, (diloco, ddp)
    rounds = SCALE.steps // SCALE.inner_steps
    for r in runs.kind("diloco"):
        assert r.done is not None and r.done["all_reduces"] == rounds
    for r in runs.kind("ddp"):
        assert r.done is not None and r.done["all_reduces"] == SCALE.steps == SCALE.inner_steps * rounds


@pytest.mark.timeout(120)
def test_outer_parameters_bit_identical_after_every_round(runs: Runs) -> None:
    results = runs.kind("diloco")
    rounds = SCALE.steps // SCALE.inner_steps
    for r in results:
        assert [rec["round"] for rec in r.rounds] == list(range(1, rounds + 1))
        assert all(rec["world_size"] == SCALE.workers for rec in r.rounds)
        assert all(rec["sync_rx_bytes"] == 0 for rec in r.rounds)  # nothing to correct, ever
        assert r.joined is not None and r.joined["round"] == 0
    for i in range(rounds):
        assert len({r.rounds[i]["digest"] for r in results}) == 1, f"round {i + 1} differs"
    # The founders started from the same bits, and training changed them every round.
    assert len({r.joined["digest"] for r in results if r.joined}) == 1
    assert len({rec["digest"] for rec in results[0].rounds}) == rounds
    ok, why = V.check_parity(results)
    assert ok, why


@pytest.mark.timeout(240)
def test_uint8_pseudo_gradients_within_0_02_of_float32(runs: Runs) -> None:
    q8, f32 = runs.loss("diloco-uint8"), runs.loss("diloco")
    assert abs(q8 - f32) <= 0.02, (q8, f32)
    assert q8 != f32  # quantization really happened
    ok, why = V.check_parity(runs.kind("diloco-uint8"))
    assert ok, why
    # uint8 on the wire: about a quarter of float32's reduce traffic (plus per-piece headers).
    sent_q = runs.kind("diloco-uint8")[0].done["reduce_tx_bytes"]  # type: ignore[index]
    sent_f = runs.kind("diloco")[0].done["reduce_tx_bytes"]  # type: ignore[index]
    assert 0.2 < sent_q / sent_f < 0.35


@pytest.mark.timeout(300)
def test_async_within_0_1_of_sync_and_hides_the_delay(runs: Runs) -> None:
    sync, asyn = runs.loss("sync-sgd"), runs.loss("async-sgd")
    assert abs(asyn - sync) <= 0.1, (asyn, sync)
    results = runs.kind("async-sgd")
    ok, why = V.check_parity(results)
    assert ok, why
    for r in results:
        assert r.done is not None
        assert r.done["all_reduces"] == SCALE.steps // SCALE.inner_steps
        # Every reduce really was delayed (by half a round's compute)...
        delays = r.done["delays"]
        assert len(delays) == r.done["all_reduces"] and sum(delays) > 0.3 * r.done["elapsed"]
        # ...and >= 80% of the delay was hidden behind the next round's inner steps. (The last
        # reduce has no next round: flush() waits for it, about one delay.)
        assert V.hidden_fraction(r) >= 0.8, (V.hidden_fraction(r), delays, [x["wait_seconds"] for x in r.rounds])
        assert r.done["flush_wait"] <= delays[-1] + 1.0


def _check_churn(results: list[PeerResult], scale: V.Scale, founders: int) -> None:
    rounds = scale.churn_steps // scale.churn_inner_steps
    killed, newcomer = results[1], results[-1]
    assert killed.done is None and killed.returncode == -9
    survivors = [r for r in results if r is not killed]
    for r in survivors:
        assert r.done is not None, r.stderr[-3000:]
        assert r.done["rounds"] == rounds
    assert newcomer.joined is not None and newcomer.joined["round"] > rounds // 2
    # The group shrank after the kill and grew back with the newcomer.
    sizes = [rec["world_size"] for rec in survivors[0].rounds]
    assert sizes[0] == founders and founders - 1 in sizes and sizes[-1] == founders
    ok, why = V.check_parity(survivors)
    assert ok, why
    assert newcomer.rounds and newcomer.rounds[-1]["digest"] == survivors[0].rounds[-1]["digest"]
    # Training went on: the last rounds' training loss is below the first rounds'.
    losses = [rec["loss"] for rec in survivors[0].rounds]
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.timeout(180)
def test_peer_killed_and_newcomer_joins(runs: Runs) -> None:
    """4 founders; one dies mid-round; a newcomer joins a few rounds later (sync DiLoCo)."""
    _check_churn(runs.get("churn", lambda: V.run_churn(SCALE, runs.workdir, runs.cache)), SCALE, 4)


@pytest.mark.timeout(180)
def test_async_group_shrinks_to_one_then_a_newcomer_joins(runs: Runs) -> None:
    """2 founders, async; one dies: the survivor trains alone, then a newcomer joins through the
    extra RECEIVE_ONLY / SEND_ONLY sync and ends bit-identical."""
    results = runs.get("churn-async", lambda: V.run_churn(SCALE, runs.workdir, runs.cache, asynchronous=True,
                                                          workers=2))
    _check_churn(results, SCALE, 2)
    # While alone, the survivor's own pseudo-gradient was the mean: applied without any traffic.
    alone = [rec for rec in results[0].rounds if rec["reduce_world_size"] == 1]
    assert alone and all(rec["reduce_tx_bytes"] == 0 for rec in alone)
    assert any(rec["world_size"] == 1 for rec in results[0].rounds)
