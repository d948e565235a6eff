"""One rank of a torch.distributed test of the "pccl" backend (run by test_distributed.py).

Usage: ``dist_worker.py SCENARIO RANK WORLD PORT OUT_JSON``. The rank joins a default
"pccl" group over ``tcp://127.0.0.1:PORT`` plus a Gloo group of the same ranks, runs the
scenario on both, and writes ``{"failures": [...], "checked": n, ...}`` to OUT_JSON.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import pccl
import pccl.distributed  # registers the backend

DTYPES = [torch.float32, torch.float64, torch.int32]


def data(rank: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rank ``rank``'s input, reproducible on every rank (small values: products stay exact)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return torch.randint(-3, 4, (n,), generator=g).to(dtype)


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checked = 0

    def same(self, what: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
        self.checked += 1
        ok = torch.equal(got, want) if exact else torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)
        if not ok:
            self.failures.append(f"{what}: got {got.flatten()[:6].tolist()} want {want.flatten()[:6].tolist()}")


def both(gloo: Any, fn: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(None), fn(gloo)


def collectives(rank: int, W: int, gloo: Any, c: Checker) -> None:
    n = 37
    for dtype in DTYPES:
        exact = not dtype.is_floating_point
        inputs = [data(r, n, dtype, 1).numpy().astype(np.float64) for r in range(W)]
        ops = {"sum": (dist.ReduceOp.SUM, np.sum), "max": (dist.ReduceOp.MAX, np.max),
               "min": (dist.ReduceOp.MIN, np.min), "prod": (dist.ReduceOp.PRODUCT, np.prod)}
        for name, (op, ref) in ops.items():
            mine, theirs = data(rank, n, dtype, 1), data(rank, n, dtype, 1)
            dist.all_reduce(mine, op)
            dist.all_reduce(theirs, op, group=gloo)
            c.same(f"all_reduce {name} {dtype} vs gloo", mine, theirs, exact)
            c.same(f"all_reduce {name} {dtype} vs numpy", mine.double(),
                   torch.from_numpy(ref(np.stack(inputs), axis=0)), exact)
        if dtype.is_floating_point:
            mine = data(rank, n, dtype, 1)
            dist.all_reduce(mine, dist.ReduceOp.AVG)
            c.same(f"all_reduce avg {dtype}", mine.double(), torch.from_numpy(np.mean(inputs, axis=0)), False)
            mine = data(rank, n, dtype, 1)
            dist.all_reduce(mine, dist._make_nccl_premul_sum(0.25))
            c.same(f"all_reduce premul {dtype}", mine.double(), torch.from_numpy(0.25 * np.sum(inputs, axis=0)), False)
        # coalesced all-reduce (torch has no Gloo counterpart with one call: numpy reference)
        a, b = data(rank, 5, dtype, 2), data(rank, 9, dtype, 3)
        dist.group.WORLD.allreduce_coalesced([a, b], dist.AllreduceCoalescedOptions()).wait()
        for t, seed, m in ((a, 2, 5), (b, 3, 9)):
            want = sum(data(r, m, dtype, seed).double() for r in range(W))
            c.same(f"allreduce_coalesced {dtype}", t.double(), want, exact)
        # all-gather, list and tensor forms
        x = data(rank, n, dtype, 4)
        outs = [[torch.empty(n, dtype=dtype) for _ in range(W)] for _ in range(2)]
        dist.all_gather(outs[0], x)
        dist.all_gather(outs[1], x, group=gloo)
        for r in range(W):
            c.same(f"all_gather {dtype} [{r}]", outs[0][r], outs[1][r], True)
            c.same(f"all_gather {dtype} [{r}] ref", outs[0][r], data(r, n, dtype, 4), True)
        flat = [torch.empty(W * n, dtype=dtype) for _ in range(2)]
        dist.all_gather_into_tensor(flat[0], x)
        dist.all_gather_into_tensor(flat[1], x, group=gloo)
        c.same(f"all_gather_into_tensor {dtype}", flat[0], flat[1], True)
        ys = [data(rank, 3, dtype, 5), data(rank, 8, dtype, 6)]
        outs2 = [torch.empty(W * 3, dtype=dtype), torch.empty(W * 8, dtype=dtype)]
        dist.group.WORLD.allgather_into_tensor_coalesced(outs2, ys).wait()
        c.same(f"allgather_into_tensor_coalesced {dtype} a", outs2[0], torch.cat([data(r, 3, dtype, 5) for r in range(W)]), True)
        c.same(f"allgather_into_tensor_coalesced {dtype} b", outs2[1], torch.cat([data(r, 8, dtype, 6) for r in range(W)]), True)
        # reduce-scatter, list and tensor forms
        m = 6
        full = data(rank, W * m, dtype, 7)
        rs = [torch.empty(m, dtype=dtype) for _ in range(2)]
        dist.reduce_scatter_tensor(rs[0], full.clone())
        dist.reduce_scatter_tensor(rs[1], full.clone(), group=gloo)
        c.same(f"reduce_scatter_tensor {dtype}", rs[0], rs[1], exact)
        want = sum(data(r, W * m, dtype, 7).double() for r in range(W))[rank * m : (rank + 1) * m]
        c.same(f"reduce_scatter_tensor {dtype} ref", rs[0].double(), want, exact)
        c.same(f"reduce_scatter_tensor {dtype} input kept", full, data(rank, W * m, dtype, 7), True)
        lst = [[t.clone() for t in full.chunk(W)] for _ in range(2)]
        dist.reduce_scatter(rs[0], lst[0])
        dist.reduce_scatter(rs[1], lst[1], group=gloo)
        c.same(f"reduce_scatter {dtype}", rs[0], rs[1], exact)
        ins = [data(rank, W * 2, dtype, 8), data(rank, W * 5, dtype, 9)]
        outs3 = [torch.empty(2, dtype=dtype), torch.empty(5, dtype=dtype)]
        dist.group.WORLD.reduce_scatter_tensor_coalesced(outs3, ins, dist.ReduceScatterOptions()).wait()
        for o, seed, k in ((outs3[0], 8, 2), (outs3[1], 9, 5)):
            want = sum(data(r, W * k, dtype, seed).double() for r in range(W))[rank * k : (rank + 1) * k]
            c.same(f"reduce_scatter_tensor_coalesced {dtype}", o.double(), want, exact)
        # broadcast
        bc = [data(rank, n, dtype, 10) for _ in range(2)]
        dist.broadcast(bc[0], W - 1)
        dist.broadcast(bc[1], W - 1, group=gloo)
        c.same(f"broadcast {dtype}", bc[0], bc[1], True)
        c.same(f"broadcast {dtype} ref", bc[0], data(W - 1, n, dtype, 10), True)
        # all-to-all, equal and uneven splits
        a2a_in = data(rank, W * 4, dtype, 11)
        res = [torch.empty(W * 4, dtype=dtype) for _ in range(2)]
        dist.all_to_all_single(res[0], a2a_in)
        dist.all_to_all_single(res[1], a2a_in, group=gloo)
        c.same(f"all_to_all_single {dtype}", res[0], res[1], True)
        in_splits = [(rank + d) % 3 + 1 for d in range(W)]  # rows rank sends to d
        out_splits = [(s + rank) % 3 + 1 for s in range(W)]
        src = data(rank, sum(in_splits) * 2, dtype, 12).view(-1, 2)
        res = [torch.empty(sum(out_splits), 2, dtype=dtype) for _ in range(2)]
        dist.all_to_all_single(res[0], src, out_splits, in_splits)
        dist.all_to_all_single(res[1], src, out_splits, in_splits, group=gloo)
        c.same(f"all_to_all_single uneven {dtype}", res[0], res[1], True)
        # send / recv around the ring
        out = data(rank, n, dtype, 13)
        got = torch.empty(n, dtype=dtype)
        reqs = [dist.isend(out, (rank + 1) % W), dist.irecv(got, (rank - 1) % W)]
        for req in reqs:
            req.wait()
        c.same(f"send/recv {dtype}", got, data((rank - 1) % W, n, dtype, 13), True)
    dist.barrier()
    for method in ("gather", "scatter", "reduce"):
        try:
            getattr(dist.group.WORLD, method)()
        except NotImplementedError as exc:
            c.checked += 1
            if method not in str(exc):
                c.failures.append(f"NotImplementedError for {method} does not name it: {exc}")
        else:
            c.failures.append(f"{method} did not raise NotImplementedError")


def ddp(rank: int, W: int, gloo: Any, c: Checker, out: dict[str, Any]) -> None:
    """10 steps of DDP on pccl and on Gloo from the same seed; parameters must match."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = {}
    for name, group in (("pccl", None), ("gloo", gloo)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        wrapped = DDP(model, process_group=group, bucket_cap_mb=0.001)  # several buckets
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(10):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(wrapped(x), y).backward()
            opt.step()
        params[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    c.checked += 1
    diff = ((params["pccl"] - params["gloo"]).abs() / params["gloo"].abs().clamp_min(1e-3)).max().item()
    out["max_rel_diff"] = diff
    if diff > 1e-6:
        c.failures.append(f"DDP parameters differ from Gloo's: max relative difference {diff}")


def fsdp(rank: int, W: int, gloo: Any, c: Checker, out: dict[str, Any]) -> None:
    """FSDP2 (fully_shard) for 5 steps on pccl and on Gloo; losses fall, parameters match."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    params, losses = {}, {}
    for name, group in (("pccl", dist.group.WORLD), ("gloo", gloo)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        losses[name] = []
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        params[name] = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    c.checked += 2
    out["losses"] = losses["pccl"]
    if not losses["pccl"][-1] < losses["pccl"][0]:
        c.failures.append(f"FSDP loss did not fall: {losses['pccl']}")
    diff = ((params["pccl"] - params["gloo"]).abs() / params["gloo"].abs().clamp_min(1e-3)).max().item()
    out["max_rel_diff"] = diff
    if diff > 1e-5:
        c.failures.append(f"FSDP parameters differ from Gloo's: max relative difference {diff}")


def quant(rank: int, W: int, gloo: Any, c: Checker, out: dict[str, Any]) -> None:
    """All-reduce with 8-bit quantization from the backend options: close to the exact sum."""
    n = 4096
    mine = data(rank, n, torch.float32, 20)
    dist.all_reduce(mine)
    want = sum(data(r, n, torch.float32, 20).double() for r in range(W))
    err = (mine.double() - want).abs().max().item()
    out["max_abs_err"] = err
    out["digest"] = float(mine.double().sum().item())
    c.checked += 1
    if not 0 < err < 0.05 * W:  # quantized (not exact), within a few uint8 steps of [0.5, 1.5)
        c.failures.append(f"quantized all-reduce error {err} out of range")


def fault(rank: int, W: int, gloo: Any, c: Checker, out: dict[str, Any]) -> None:
    """The last rank dies after step 3; the others must get DistBackendError, not hang."""
    t = torch.ones(1000)
    for step in range(100):
        if rank == W - 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        start = time.monotonic()
        try:
            dist.all_reduce(t)
        except dist.DistBackendError as exc:
            out["error"] = str(exc)
            out["step"] = step
            out["latency_s"] = time.monotonic() - start
            break
    else:
        c.failures.append("no error after the last rank died")
        return
    start = time.monotonic()
    try:
        dist.all_reduce(t)
    except dist.DistBackendError as exc:
        out["next_error"] = str(exc)
        out["next_latency_s"] = time.monotonic() - start
    c.checked += 1


def main() -> None:
    scenario, rank, W, port, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=30)
    options = None
    if scenario == "quant":
        options = pccl.distributed.Options(quantization=pccl.Quantization())
    elif scenario == "encrypted":
        options = pccl.distributed.Options(secret="backend-test-secret", encrypt=True)
    dist.init_process_group("pccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W, timeout=timeout,
                            pg_options=options)
    gloo = dist.new_group(backend="gloo")
    c = Checker()
    out: dict[str, Any] = {}
    if scenario in ("collectives", "encrypted"):
        collectives(rank, W, gloo, c)
        backends = [o for o in gc.get_objects() if isinstance(o, pccl.distributed.ProcessGroupPCCL)]
        out["encrypt"] = [b._joined.comm._settings.encrypt for b in backends]
    elif scenario == "ddp":
        ddp(rank, W, gloo, c, out)
    elif scenario == "fsdp":
        fsdp(rank, W, gloo, c, out)
    elif scenario == "quant":
        quant(rank, W, gloo, c, out)
    elif scenario == "fault":
        fault(rank, W, gloo, c, out)
    out.update(failures=c.failures, checked=c.checked)
    with open(path, "w") as f:
        json.dump(out, f)
    if scenario != "fault":
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group is broken; skip the teardown barrier of the Gloo group


if __name__ == "__main__":
    main()
