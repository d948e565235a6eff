"""DistributedDataParallel over the torch.distributed backend "pccl".

Run it as it is on one machine (the script starts the ranks itself), or let torchrun start them:

    python examples/ddp_backend.py                          # 2 local ranks
    python examples/ddp_backend.py --ranks 3 --steps 60
    torchrun --nproc-per-node 2 examples/ddp_backend.py     # one rank per process, env://

Every rank trains the same small MLP on its own samples of one regression task (a fixed random
"teacher" network). ``import pccl.distributed`` registers the backend; rank 0 hosts pccl's
master inside its process (``PCCL_MASTER=host:port`` would name an external one instead), and
DDP's gradient buckets are all-reduced over pccl's ring. Rank 0 prints the loss on a held-out
set before and after training, and whether every rank ended with bit-identical parameters;
the exit status is 0 only if the loss fell and the parameters agree.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from datetime import timedelta

DIM, HIDDEN, BATCH = 16, 64, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace) -> int:
    """Start ``args.ranks`` copies of this script as ranks 0..N-1 (what torchrun would do)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(args.ranks),
               OMP_NUM_THREADS="1")  # several ranks share this machine's cores
    argv = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--lr", str(args.lr)]
    procs = [subprocess.Popen(argv, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(args.ranks)]
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(abs(c) for c in codes)


def train(args: argparse.Namespace) -> int:
    """One rank: join the "pccl" process group, train with DDP, check the outcome."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pccl.distributed  # noqa: F401  (registers the backend "pccl")

    dist.init_process_group("pccl", timeout=timedelta(seconds=60))  # env:// (RANK, WORLD_SIZE, MASTER_*)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    teacher = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(DIM, HIDDEN, generator=teacher), torch.randn(HIDDEN, 1, generator=teacher) / HIDDEN ** 0.5

    def batch(g: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DIM, generator=g)
        return x, torch.tanh(x @ w1) @ w2

    x_eval, y_eval = batch(torch.Generator().manual_seed(99), 512)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x_eval), y_eval))

    before = eval_loss()
    data = torch.Generator().manual_seed(1000 + rank)  # every rank its own samples
    for step in range(1, args.steps + 1):
        x, y = batch(data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()  # DDP all-reduces the gradients here
        opt.step()
        if rank == 0 and step % max(1, args.steps // 4) == 0:
            print(f"step {step:4d}  eval loss {eval_loss():.4f}", flush=True)
    after = eval_loss()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    identical = bool(torch.equal(low, high))
    dist.destroy_process_group()
    ok = after < before and identical
    if rank == 0:
        print(f"{world} ranks, {args.steps} DDP steps over pccl: eval loss {before:.4f} -> {after:.4f}; "
              f"parameters bit-identical on every rank: {'yes' if identical else 'NO'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="ranks to start when not run by torchrun (default 2)")
    ap.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    ap.add_argument("--timeout", type=float, default=120.0, help="launcher: give up after SECONDS")
    args = ap.parse_args()
    return train(args) if "RANK" in os.environ else launch(args)


if __name__ == "__main__":
    sys.exit(main())
