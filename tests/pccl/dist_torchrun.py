"""A plain torch script launched by ``torchrun --nproc-per-node 2`` in test_distributed.py."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import pccl.distributed  # noqa: F401  (registers the backend)

dist.init_process_group("pccl")  # env:// as torchrun sets it
t = torch.full((5,), float(dist.get_rank() + 1))
dist.all_reduce(t)
expected = float(sum(range(1, dist.get_world_size() + 1)))
ok = bool(torch.all(t == expected)) and dist.get_backend() == "pccl"
dist.barrier()
dist.destroy_process_group()
print(f"rank ok={ok}")
sys.exit(0 if ok else 1)
