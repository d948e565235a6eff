"""The demo job: a local master and 4 peers train the tiny GPT with DiLoCo; one peer is killed
and a new one joins midway.

Every peer is its own process (``python -m training.peer``) talking to the others over pccl on
127.0.0.1. A line per outer round shows the round, the peers in the group, the mean training
loss over the round's inner steps, and the bytes the reporting peer sent for the pseudo-gradient
reduce. The summary compares the final validation loss with a single worker trained for the same
number of steps, the communication volume with what DDP would have sent (one all-reduce of the
same size per step), and checks that every peer ended with bit-identical parameters.
On a terminal a progress bar of the rounds stays below those lines; in a log, a plain
progress line with the time left appears every few seconds instead.

examples:
  pccl demo
  pccl demo --peers 3 --steps 200 --inner-steps 10 --quantize uint8
  pccl demo --async --timeout 600
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from pccl.progress import Progress, progress
from training.baselines import Recipe, evaluate, load_or_warm_start, new_model, train_single
from training.data import load_corpus
from training.harness import PeerResult, PeerSpec, run_group
from training.validate import check_parity, default_cache

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pccl demo``."""
    parser.add_argument("--peers", type=int, default=4, help="peers at the start")
    parser.add_argument("--steps", type=int, default=600, help="inner steps of the run")
    parser.add_argument("--inner-steps", type=int, default=20, help="H: inner steps per outer round")
    parser.add_argument("--quantize", choices=("none", "uint8", "uint4"), default="none")
    parser.add_argument("--async", dest="asynchronous", action="store_true",
                        help="async DiLoCo (outer SGD 0.7 without momentum)")
    parser.add_argument("--cache", type=Path, default=None, help="warm-start cache directory")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")


class _Progress:
    """Prints one line per round (from the first peer that reports it) and membership events,
    and advances ``bar`` (a :class:`pccl.progress.Progress` of the rounds) with them."""

    def __init__(self, rounds: int, out: TextIO, bar: Progress[Any]) -> None:
        self.rounds = rounds
        self.out = out
        self.bar = bar
        self.printed = 0
        self.start = time.perf_counter()

    def __call__(self, spec: PeerSpec, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        name = f"peer w{spec.worker}"
        if event == "killed":
            self._line(f"  !! {name} killed (SIGKILL) after round {rec['after_round']}")
        elif event == "started" and spec.start_after_round:
            self._line(f"  ++ {name} started after round {rec['after_round']}")
        elif event == "joined" and rec["round"] > 0:
            self._line(f"  ++ {name} joined at round {rec['round']} (group of {rec['world_size']})")
        elif event == "round" and rec["round"] > self.printed:
            self.bar.update(rec["round"] - self.printed, peers=rec["world_size"], loss=f"{rec['loss']:.3f}")
            self.printed = rec["round"]
            self._line(f"round {rec['round']:3d}/{self.rounds}  peers {rec['world_size']}  "
                       f"loss {rec['loss']:.3f}  sent/peer {rec['reduce_tx_bytes'] / 1024:6.1f} KiB  "
                       f"t {time.perf_counter() - self.start:6.1f}s")

    def _line(self, text: str) -> None:
        self.bar.write(text, file=self.out)  # on a terminal: above the bar, never through it


def _summary(results: list[PeerResult], single: float, warm: float, steps: int, out: TextIO) -> bool:
    finished = [r for r in results if r.done is not None]
    dones = [r.done for r in finished if r.done is not None]
    loss = next(d["val_loss"] for d in dones if "val_loss" in d)
    sent = sum(d["reduce_tx_bytes"] + d["sync_tx_bytes"] for d in dones)
    per_reduce = max((rec["reduce_tx_bytes"] for r in finished for rec in r.rounds), default=0)
    ddp = per_reduce * steps * len(finished)
    parity, why = check_parity(finished)
    rows = [
        ("validation loss, warm start", f"{warm:.4f}"),
        ("validation loss, single worker", f"{single:.4f}"),
        ("validation loss, DiLoCo", f"{loss:.4f}  ({loss - single:+.4f} vs single)"),
        ("bytes sent by finishing peers", f"{sent / 1e6:.1f} MB"),
        ("DDP would send (1 all-reduce/step)", f"{ddp / 1e6:.1f} MB  ({ddp / max(sent, 1):.0f}x more)"),
        ("bit parity of outer parameters", ("OK: " if parity else "FAILED: ") + why),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nsummary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    return parity


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when the run finished with bit-identical peers."""
    out = sys.stdout
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The master's per-vote and per-collective INFO lines would drown the progress lines.
        for name in ("pccl", "transport", "collectives"):
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rounds = args.steps // args.inner_steps
    cache = args.cache or default_cache()
    recipe = Recipe()
    corpus = load_corpus()
    print(f"corpus: {corpus.nbytes / 1e6:.1f} MB of standard-library Python; warm start "
          f"({recipe.warm_start_steps} AdamW steps, cached in {cache})...", file=out, flush=True)
    start = load_or_warm_start(corpus, recipe, cache)
    warm = new_model(recipe)
    warm.load_state_dict(start)
    warm_loss = evaluate(warm, corpus, recipe)
    extra: tuple[str, ...] = ("--quantize", args.quantize)
    if args.asynchronous:
        extra += ("--async", "--outer-momentum", "0")
    specs = [PeerSpec(w, extra=extra, kill_at_round=rounds // 3 if w == 1 else None) for w in range(args.peers)]
    specs.append(PeerSpec(args.peers, extra=extra, start_after_round=rounds // 2))
    common = ["--steps", str(args.steps), "--inner-steps", str(args.inner_steps), "--min-peers", str(args.peers),
              "--cache", str(cache)]
    print(f"{args.peers} peers, DiLoCo H={args.inner_steps}, {rounds} rounds; peer w1 is killed after round "
          f"{rounds // 3}, peer w{args.peers} joins after round {rounds // 2}", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="pccl-demo-") as tmp, \
            progress(rounds, "demo", unit="round") as bar:
        results = run_group(specs, common, tmp, timeout=args.timeout, on_record=_Progress(rounds, out, bar))
    print("single-worker baseline...", file=out, flush=True)
    model, _ = train_single(corpus, replace(recipe), start, args.steps)
    ok = _summary(results, evaluate(model, corpus, recipe), warm_loss, args.steps, out)
    return 0 if ok else 1


def main() -> int:
    """``python -m training.demo``: the same as ``pccl demo``."""
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
