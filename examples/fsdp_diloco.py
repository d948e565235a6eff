"""FSDP2 replicas trained together with DiLoCo over pccl.

A *replica* is an ordinary FSDP2 job: ``--shards`` ranks with a Gloo process group of their
own, the model ``fully_shard``ed across them. Several replicas (other machines, other data
centres) train the same model; between them, pccl runs DiLoCo. Each rank is one pccl peer in
peer group = its shard index, so rank k of every replica averages and syncs shard k only
(``training.fsdp``). A rank that dies takes its whole replica out; the others go on.

    python examples/fsdp_diloco.py                          # local master + 2 replicas x 2 ranks
    python examples/fsdp_diloco.py --replicas 3 --shards 2 --rounds 6

Across machines, one replica per machine against a master on A (``pccl master --port 48148``):

    python examples/fsdp_diloco.py --master 10.0.0.1:48148 --replicas 2 --shards 2

Every rank prints its result; the script checks that each replica's held-out loss fell and that
every replica ended with the same full (all-gathered) model, bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from typing import Any

# FSDP2 shards every parameter along its first dimension, and pccl needs a non-empty shard of
# each on every rank: every first dimension (OUT included) must be at least --shards.
DIM, HIDDEN, OUT, BATCH = 16, 64, 4, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(args: argparse.Namespace) -> int:
    """One FSDP rank of one replica; prints ``RESULT {json}`` at the end."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from training.fsdp import ReplicaLostError, connect_shard, replica_guard, shard_diloco, wait_for_replicas

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.gloo_port}", rank=args.rank,
                            world_size=args.shards, timeout=datetime.timedelta(seconds=120))
    result: dict[str, Any] = {"replica": args.replica, "rank": args.rank}
    try:
        torch.manual_seed(args.replica)  # replicas start differently; the first sync equalizes them
        model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        teacher = torch.Generator().manual_seed(1234)
        w1, w2 = torch.randn(DIM, HIDDEN, generator=teacher), torch.randn(HIDDEN, OUT, generator=teacher) / 8

        def batch(g: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, DIM, generator=g)
            return x, torch.tanh(x @ w1) @ w2

        x_eval, y_eval = batch(torch.Generator().manual_seed(99), 512)

        def eval_loss() -> float:
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(model(x_eval), y_eval))

        comm = connect_shard(args.master)  # peer group = this rank's shard index
        with comm, replica_guard(comm):
            wait_for_replicas(comm, args.shards, args.replicas, timeout=120.0)  # before any FSDP forward
            diloco = shard_diloco(comm, model, torch.optim.AdamW(model.parameters(), lr=args.lr), args.inner_steps)
            result["before"] = eval_loss()
            data = torch.Generator().manual_seed(1000 * args.replica + args.rank)
            for _ in range(args.rounds * args.inner_steps):
                x, y = batch(data)
                torch.nn.functional.mse_loss(model(x), y).backward()
                info = diloco.step()
                if info is not None and args.rank == 0:
                    print(f"replica {args.replica}: round {info.round}  replicas {info.world_size}  "
                          f"eval loss {eval_loss():.4f}", flush=True)
                elif info is not None:
                    eval_loss()  # FSDP forwards are collective: every rank of the replica runs them
            result["after"] = eval_loss()
            full = hashlib.blake2b(digest_size=16)
            for p in model.parameters():
                assert isinstance(p, DTensor)  # fully_shard made every parameter one: gather it whole
                full.update(p.full_tensor().detach().numpy().tobytes())
            result["full_digest"] = full.hexdigest()
            diloco.close()
    except ReplicaLostError as exc:
        result["error"] = str(exc)
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


def launch(args: argparse.Namespace, master: str, replicas: list[int]) -> list[dict[str, Any]]:
    """Start every rank of ``replicas`` against ``master``; their results."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for replica in replicas:
        port = _free_port()  # each replica's own Gloo group
        for rank in range(args.shards):
            argv = [sys.executable, os.path.abspath(__file__), "--worker", "--master", master,
                    "--replica", str(replica), "--rank", str(rank), "--gloo-port", str(port),
                    "--replicas", str(args.replicas), "--shards", str(args.shards), "--rounds", str(args.rounds),
                    "--inner-steps", str(args.inner_steps), "--lr", str(args.lr)]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=args.timeout)
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT "):]))
                else:
                    print(line)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def report(args: argparse.Namespace, results: list[dict[str, Any]], expected: int) -> int:
    """Print the summary; 0 if every rank finished, every loss fell and the replicas agree."""
    finished = [r for r in results if "full_digest" in r]
    digests = {r["full_digest"] for r in finished}
    fell = all(float(r["after"]) < float(r["before"]) for r in finished)
    for r in results:
        if "error" in r:
            print(f"replica {r['replica']} rank {r['rank']}: {r['error']}")
    if finished:
        worst = max(finished, key=lambda r: float(r["after"]))
        print(f"{len(finished)} of {expected} ranks finished {args.rounds} rounds: eval loss "
              f"{float(worst['before']):.4f} -> {float(worst['after']):.4f} (worst rank); "
              f"full model bit-identical across replicas: {'yes' if len(digests) == 1 else 'NO'}")
    return 0 if len(finished) == expected and fell and len(digests) == 1 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--master", help="an external master's host:port: run one replica here (default: a local "
                                     "master and every replica on this machine)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas in the run (default 2)")
    ap.add_argument("--shards", type=int, default=2, help="FSDP ranks per replica (default 2)")
    ap.add_argument("--rounds", type=int, default=4, help="DiLoCo outer rounds (default 4)")
    ap.add_argument("--inner-steps", type=int, default=10, help="H: inner steps per round (default 10)")
    ap.add_argument("--lr", type=float, default=1e-2, help="inner AdamW learning rate (default 0.01)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after SECONDS")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--replica", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gloo-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.shards <= OUT:
        ap.error(f"--shards must be between 1 and {OUT} (the smallest sharded dimension of the model)")
    if args.worker:
        return worker(args)
    if args.master:
        return report(args, launch(args, args.master, [0]), args.shards)
    import pccl

    with pccl.Master(host="127.0.0.1", port=0) as master:
        results = launch(args, master.address, list(range(args.replicas)))
    return report(args, results, args.replicas * args.shards)


if __name__ == "__main__":
    sys.exit(main())
