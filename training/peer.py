"""One training worker process: the tiny GPT trained with DiLoCo (or DDP) over pccl.

``python -m training.peer --master HOST:PORT --worker I --out FILE [options]`` joins the run,
trains until the group completes ``--steps / --inner-steps`` outer rounds (DDP: ``--steps``
steps), evaluates, and writes one JSON object per line to ``--out``:

- ``{"event": "joined", "round", "world_size", "peer_id", "worker"}``
- ``{"event": "round", "round", "world_size", "digest", "sync_rx_bytes", "reduce_tx_bytes",
  "wait_seconds", "loss", "elapsed", ...}`` after each outer round (DDP: every ``--inner-steps``)
- ``{"event": "done", "val_loss", "digest", "all_reduces", "reduce_tx_bytes", "elapsed", ...}``

Faults are declared up front: ``--die-at-step N`` SIGKILLs this process right after inner step
N (a crash, mid-round); ``--comm-delay S`` / ``--comm-delay-fraction F`` add S seconds plus F
times the last round's inner-step compute time to every pseudo-gradient reduce (an artificial
slow link, sized to the machine's speed, to show that async mode hides it).

The process uses one torch thread (several workers share the machine's cores) and reads the
warm start from ``--cache`` (:func:`training.baselines.load_or_warm_start`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence, TextIO

import torch

import pccl
from training.baselines import Recipe, evaluate, load_or_warm_start, make_inner_optimizer, new_model
from training.data import BatchSampler, Corpus, load_corpus
from training.diloco import DiLoCo, outer_digest
from training.model import TinyGPT

__all__ = ["DelayedCommunicator", "Prepared", "add_arguments", "main", "prepare", "recipe_from_args"]


class DelayedCommunicator:
    """Forwards to a Communicator; each all-reduce first sleeps ``delay()`` seconds.

    The sleep runs in whichever thread calls the reduce, exactly like a slow link would;
    ``delays`` lists the seconds slept, reduce by reduce.
    """

    def __init__(self, comm: pccl.Communicator, delay: Callable[[], float]) -> None:
        self._comm = comm
        self._delay = delay
        self.delays: list[float] = []

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def are_peers_pending(self) -> bool:
        return self._comm.are_peers_pending()

    def update_topology(self) -> None:
        self._comm.update_topology()

    def sync_shared_state(
        self, state: pccl.SharedState, strategy: pccl.SyncStrategy = pccl.SyncStrategy.ENFORCE_POPULAR
    ) -> pccl.SyncInfo:
        return self._comm.sync_shared_state(state, strategy)

    def all_reduce_multiple_with_retry(self, tensors: list[torch.Tensor], **kwargs: Any) -> pccl.ReduceInfo:
        delay = self._delay()
        time.sleep(delay)
        self.delays.append(delay)
        return self._comm.all_reduce_multiple_with_retry(tensors, **kwargs)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of one worker (shared with the launcher)."""
    ap.add_argument("--master", required=True, help="master address host:port")
    ap.add_argument("--worker", type=int, required=True, help="data stream index of this worker")
    ap.add_argument("--out", required=True, help="JSON-lines result file")
    ap.add_argument("--mode", choices=("diloco", "ddp"), default="diloco")
    ap.add_argument("--steps", type=int, default=600, help="inner steps of the whole run")
    ap.add_argument("--inner-steps", type=int, default=20, help="H")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--no-nesterov", action="store_true")
    ap.add_argument("--quantize", choices=("none", "uint8", "uint4"), default="none")
    ap.add_argument("--async", dest="asynchronous", action="store_true")
    ap.add_argument("--min-peers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    ap.add_argument("--corpus-bytes", type=int, default=4 << 20)
    ap.add_argument("--cache", default=None, help="warm-start cache directory")
    ap.add_argument("--die-at-step", type=int, default=None)
    ap.add_argument("--comm-delay", type=float, default=0.0, help="seconds added to every reduce")
    ap.add_argument("--comm-delay-fraction", type=float, default=0.0,
                    help="... plus this fraction of the last round's inner-step compute time")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--no-eval", action="store_true")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe the options describe."""
    return replace(Recipe(), batch_size=args.batch_size)


def _emit(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def _outer_factory(args: argparse.Namespace) -> Any:
    lr, momentum, nesterov = args.outer_lr, args.outer_momentum, not args.no_nesterov
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def _quantization(name: str) -> pccl.Quantization | None:
    if name == "none":
        return None
    return pccl.Quantization(torch.uint8 if name == "uint8" else getattr(torch, "uint4"))


def _maybe_die(args: argparse.Namespace, step: int) -> None:
    if args.die_at_step is not None and step == args.die_at_step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Prepared:
    """Everything a worker builds before it connects (so a late joiner can be ready early)."""

    recipe: Recipe
    corpus: Corpus
    model: TinyGPT
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler


def prepare(args: argparse.Namespace) -> Prepared:
    """Corpus, warm-started model, inner optimizer and this worker's data stream."""
    recipe = recipe_from_args(args)
    corpus = load_corpus(args.corpus_bytes)
    model = new_model(recipe)
    model.load_state_dict(load_or_warm_start(corpus, recipe, args.cache))
    opt = make_inner_optimizer(model.parameters(), recipe)
    sampler = BatchSampler(corpus.train, batch_size=recipe.batch_size, context=recipe.model.context,
                           seed=recipe.data_seed, worker=args.worker)
    return Prepared(recipe, corpus, model, opt, sampler)


def run_diloco(args: argparse.Namespace, comm: pccl.Communicator, prep: Prepared, out: TextIO) -> None:
    """Train with DiLoCo until the group has run ``steps / inner_steps`` rounds."""
    model = prep.model
    compute = [0.0, 0.0]  # inner-step seconds of [the round so far, the last complete round]
    delayed = DelayedCommunicator(comm, lambda: args.comm_delay + args.comm_delay_fraction * compute[1])
    t0 = time.perf_counter()
    diloco = DiLoCo(delayed if args.comm_delay or args.comm_delay_fraction else comm, model, prep.optimizer,
                    args.inner_steps, outer_optimizer=_outer_factory(args), quantization=_quantization(args.quantize),
                    asynchronous=args.asynchronous, min_peers=args.min_peers)
    _emit(out, {"event": "joined", "round": diloco.round, "world_size": comm.world_size,
                "peer_id": comm.peer_id, "worker": args.worker, "digest": outer_digest(diloco)})
    rounds = args.steps // args.inner_steps
    losses: list[float] = []
    while diloco.round < rounds:
        t_step = time.perf_counter()
        loss = model(prep.sampler.next()).loss
        loss.backward()
        losses.append(loss.item())
        compute[0] += time.perf_counter() - t_step
        if (diloco.inner_step + 1) % args.inner_steps == 0:  # this step ends the round
            compute[:] = [0.0, compute[0]]
        info = diloco.step()
        _maybe_die(args, diloco.inner_step)
        if info is not None:
            _emit(out, {"event": "round", **asdict(info), "digest": outer_digest(diloco),
                        "loss": sum(losses) / len(losses), "elapsed": time.perf_counter() - t0,
                        "inner_step": diloco.inner_step})
            losses.clear()
    flush_wait = diloco.flush()
    diloco.close()
    done = {"event": "done", "digest": outer_digest(diloco), "flush_wait": flush_wait,
            "all_reduces": diloco.all_reduces, "reduce_tx_bytes": diloco.total_reduce_tx_bytes,
            "sync_tx_bytes": diloco.total_sync_tx_bytes, "elapsed": time.perf_counter() - t0,
            "rounds": diloco.round, "delays": delayed.delays}
    if not args.no_eval:
        final = new_model(prep.recipe)
        diloco.outer.copy_to(list(final.parameters()))
        done["val_loss"] = evaluate(final, prep.corpus, prep.recipe)
    _emit(out, done)


def _all_reduce_avg(comm: pccl.Communicator, flat: torch.Tensor) -> int:
    """AVG all-reduce in place, retried on a lost peer (the tensor is restored on failure)."""
    while True:
        try:
            return comm.all_reduce(flat, op=pccl.ReduceOp.AVG).tx_bytes
        except pccl.PeerLostError:
            if comm.world_size < 2:
                return 0


def run_ddp(args: argparse.Namespace, comm: pccl.Communicator, prep: Prepared, out: TextIO) -> None:
    """Data-parallel baseline over pccl: every step all-reduces (AVG) the gradients."""
    model, opt = prep.model, prep.optimizer
    while comm.world_size < args.min_peers:
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(0.05)
    _emit(out, {"event": "joined", "round": 0, "world_size": comm.world_size, "peer_id": comm.peer_id,
                "worker": args.worker})
    t0 = time.perf_counter()
    reduces = tx = 0
    losses: list[float] = []
    params = list(model.parameters())
    flat = torch.empty(sum(p.numel() for p in params))  # one all-reduce per step, as DDP buckets do
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=False)
        loss = model(prep.sampler.next()).loss
        loss.backward()
        losses.append(loss.item())
        torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None], out=flat)
        tx += _all_reduce_avg(comm, flat)
        reduces += 1
        offset = 0
        for p in params:
            assert p.grad is not None
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
        if step % args.inner_steps == 0:
            _emit(out, {"event": "round", "round": step // args.inner_steps, "world_size": comm.world_size,
                        "loss": sum(losses) / len(losses), "elapsed": time.perf_counter() - t0})
            losses.clear()
    done: dict[str, Any] = {"event": "done", "all_reduces": reduces, "reduce_tx_bytes": tx,
                            "elapsed": time.perf_counter() - t0, "rounds": args.steps // args.inner_steps}
    if not args.no_eval:
        done["val_loss"] = evaluate(model, prep.corpus, prep.recipe)
    _emit(out, done)


def main(argv: Sequence[str] | None = None, go: Callable[[], object] | None = None) -> int:
    """Entry point of ``python -m training.peer``. Returns the exit status.

    ``go``, when given, is called (and may block) after the preparation and before connecting:
    a launcher uses it to let a ready late joiner join at a chosen moment.
    """
    ap = argparse.ArgumentParser(prog="python -m training.peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s w{args.worker} %(name)s: %(message)s")
    torch.set_num_threads(1)
    prep = prepare(args)
    if go is not None:
        go()
    with open(args.out, "a", encoding="utf-8") as out, pccl.Communicator(
        args.master, connections=args.connections
    ) as comm:
        comm.connect(timeout=120.0)
        (run_ddp if args.mode == "ddp" else run_diloco)(args, comm, prep, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
