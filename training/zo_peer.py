"""The validation kit of :mod:`training.zo`: a char-level MLP on the stdlib corpus and a worker process.

:class:`CharMLP` predicts the next byte from the previous ``context`` bytes (about 6k
parameters with the defaults). :func:`worker` is the body of one training process: it connects
to a master, trains with :class:`training.zo.ZerothOrder` and writes one JSON object per line:

- ``{"event": "connected", "peer_id"}`` once the master accepted it
- ``{"event": "joined", "step", "world_size", "peer_id"}``
- ``{"event": "step", "step", "world_size", "digest", "loss", "sync_rx_bytes", "payload_bytes",
  "retries"}`` every ``report_every`` steps (the digest is taken after that step's update)
- ``{"event": "done", "step", "val_loss", "digest", "payload_bytes", "gathers", "elapsed"}``
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from training.data import BatchSampler, Corpus, eval_windows, load_corpus

__all__ = ["CharMLP", "WorkerConfig", "evaluate", "mlp_loss", "small_corpus", "worker"]

CORPUS_BYTES = 400_000


class CharMLP(torch.nn.Module):
    """Embedding of ``context`` bytes → one tanh hidden layer → logits over 128 bytes."""

    def __init__(self, context: int = 3, embed: int = 8, hidden: int = 32, *, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.context = context
        self.embed = torch.nn.Parameter(torch.randn(128, embed, generator=gen) * 0.5)
        self.w1 = torch.nn.Parameter(torch.randn(context * embed, hidden, generator=gen) / (context * embed) ** 0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, 128, generator=gen) / hidden**0.5 * 0.1)
        self.b2 = torch.nn.Parameter(torch.zeros(128))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 128)`` for the byte after each row of ``tokens`` ``(B, context)``."""
        x = self.embed[tokens].reshape(tokens.shape[0], -1)
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


def mlp_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting the last column of ``batch`` from the ones before."""
    return torch.nn.functional.cross_entropy(model(batch[:, :-1]), batch[:, -1])


def small_corpus() -> Corpus:
    """The stdlib corpus cut to :data:`CORPUS_BYTES` (loads in well under a second)."""
    return load_corpus(CORPUS_BYTES)


@torch.no_grad()
def evaluate(model: CharMLP, corpus: Corpus, windows: int = 4096) -> float:
    """Mean validation cross-entropy over fixed, evenly spaced windows."""
    batch = eval_windows(corpus.val, sequences=windows, context=model.context)
    return float(mlp_loss(model, batch))


@dataclass(frozen=True)
class WorkerConfig:
    """One worker's run: ``steps`` total group steps, ZO settings, data stream ``worker``."""

    master: str
    out: str
    worker: int
    steps: int
    lr: float
    bits: int = 8
    eps: float = 1e-3
    seed: int = 0
    batch_size: int = 64
    sync_every: int = 16
    min_peers: int = 1
    report_every: int = 16
    die_at_step: int | None = None  # SIGKILL itself after computing, before publishing


def _emit(out: Any, record: dict[str, Any]) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def worker(cfg: WorkerConfig) -> None:
    """Connect, train ``cfg.steps`` group steps with ZerothOrder, evaluate, report (module docstring).

    Raises whatever :class:`pccl.Communicator` and :class:`training.zo.ZerothOrder` raise.
    """
    import pccl
    from training.zo import ZerothOrder

    torch.set_num_threads(1)
    corpus = small_corpus()
    model = CharMLP(seed=0)
    sampler = BatchSampler(corpus.train, batch_size=cfg.batch_size, context=model.context, seed=cfg.seed,
                           worker=cfg.worker)
    with open(cfg.out, "a", encoding="utf-8") as out, pccl.Communicator(cfg.master) as comm:
        comm.connect(timeout=60.0)
        _emit(out, {"event": "connected", "peer_id": comm.peer_id})
        zo = ZerothOrder(comm, model, mlp_loss, lr=cfg.lr, eps=cfg.eps, bits=cfg.bits, seed=cfg.seed,
                         sync_every=cfg.sync_every, min_peers=cfg.min_peers)
        _emit(out, {"event": "joined", "step": zo.step_count, "world_size": comm.world_size,
                    "peer_id": comm.peer_id, "digest": zo.digest()})
        t0 = time.perf_counter()
        while zo.step_count < cfg.steps:
            if cfg.die_at_step is not None and zo.step_count >= cfg.die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            loss = zo.step(sampler.next())
            info = zo.last
            assert info is not None
            if zo.step_count % cfg.report_every == 0:
                _emit(out, {"event": "step", "step": zo.step_count, "world_size": len(info.contributors),
                            "digest": zo.digest(), "loss": loss, "sync_rx_bytes": info.sync_rx_bytes,
                            "payload_bytes": info.payload_bytes, "retries": info.retries})
        _emit(out, {"event": "done", "step": zo.step_count, "val_loss": evaluate(model, corpus),
                    "digest": zo.digest(), "payload_bytes": zo.payload_bytes_total, "gathers": zo.gathers,
                    "elapsed": time.perf_counter() - t0})
