"""DiLoCo over FSDP2 replicas: 2 replicas × 2 FSDP ranks (Gloo inside a replica), 4 processes.

Each rank is a pccl peer in group = its shard index; the master runs in the test process and
everything is on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import pccl

REPLICAS, SHARDS, ROUNDS, INNER_STEPS = 2, 2, 4, 10
DIM, HIDDEN, BATCH = 8, 32, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(tensors: list[torch.Tensor]) -> str:
    h = xxhash.xxh3_128()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _batch(seed: int, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, torch.tanh(x @ teacher)


def _worker(replica: int, rank: int, master: str, gloo_port: int, out: str, die_at: int | None) -> None:
    """One FSDP rank of one replica: join, train ROUNDS DiLoCo rounds, write a JSON record.

    ``die_at``: this rank exits abruptly (no cleanup) at that inner step.
    """
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from training.diloco import outer_digest
    from training.fsdp import ReplicaLostError, connect_shard, replica_guard, shard_diloco, wait_for_replicas

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank,
                            world_size=SHARDS, timeout=datetime.timedelta(seconds=60))
    record: dict[str, Any] = {"rounds": []}
    try:
        torch.manual_seed(replica * 7 + 1)  # different inits: the first sync must make them equal
        model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 2))
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        comm = connect_shard(master)
        with comm, replica_guard(comm):
            wait_for_replicas(comm, SHARDS, REPLICAS, timeout=60.0)
            record.update(peer_group=comm.peer_group, global_world=comm.global_world_size)
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
            diloco = shard_diloco(comm, model, inner, INNER_STEPS)
            teacher = torch.randn(DIM, 2, generator=torch.Generator().manual_seed(42))
            ex, ey = _batch(10_000, teacher)
            with torch.no_grad():
                record["loss_before"] = float(torch.nn.functional.mse_loss(model(ex), ey))
            for step in range(ROUNDS * INNER_STEPS):
                if step == die_at:
                    os._exit(17)
                x, y = _batch(1000 * replica + 100 * rank + step, teacher)  # each rank its own data
                torch.nn.functional.mse_loss(model(x), y).backward()
                info = diloco.step()
                if info is not None:
                    shared = diloco.outer.shared_tensors()
                    record["rounds"].append({
                        "round": info.round, "world_size": info.world_size, "sync_rx": info.sync_rx_bytes,
                        "outer": outer_digest(diloco),
                        "state": _digest([shared[k] for k in sorted(shared)]),
                        "momentum": _digest(list(diloco.outer.optimizer_tensors().values())),
                    })
            with torch.no_grad():
                record["loss_after"] = float(torch.nn.functional.mse_loss(model(ex), ey))
            # The full (all-gathered) model: the outer step really reached FSDP's shard storage.
            record["full"] = _digest([p.full_tensor() for p in model.parameters()])  # type: ignore[attr-defined]
            record["shard_numel"] = sum(p.numel() for p in diloco.outer.params)
            diloco.close()
    except ReplicaLostError as exc:
        record["error"] = str(exc)
    finally:
        Path(out).write_text(json.dumps(record))
        dist.destroy_process_group()


def _run(tmp_path: Path, die: tuple[int, int, int] | None = None) -> dict[tuple[int, int], dict[str, Any]]:
    """Start REPLICAS × SHARDS workers against a local master; their records by (replica, rank).

    ``die``: (replica, rank, inner step) of a rank that exits abruptly.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pccl", "training.fsdp"])
    procs: list[tuple[int, int, multiprocessing.process.BaseProcess]] = []
    with pccl.Master("127.0.0.1", port=0, heartbeat_timeout=2.0) as master:
        try:
            for replica in range(REPLICAS):
                port = _free_port()
                for rank in range(SHARDS):
                    out = str(tmp_path / f"r{replica}k{rank}.json")
                    die_at = die[2] if die is not None and die[:2] == (replica, rank) else None
                    proc = ctx.Process(target=_worker, args=(replica, rank, master.address, port, out, die_at))
                    proc.start()
                    procs.append((replica, rank, proc))
            for _, _, running in procs:
                running.join(60)
        finally:
            for _, _, left in procs:
                if left.is_alive():
                    left.kill()
                    left.join()
    codes = {(r, k): p.exitcode for r, k, p in procs}
    assert codes == {(r, k): 17 if die is not None and die[:2] == (r, k) else 0 for r, k, _ in procs}
    return {(r, k): json.loads((tmp_path / f"r{r}k{k}.json").read_text())
            for r, k, _ in procs if (r, k) != (die or (-1, -1, 0))[:2]}


@pytest.mark.timeout(90)
def test_two_replicas_of_two_fsdp_ranks(tmp_path: Path) -> None:
    rec = _run(tmp_path)
    for (r, k), d in rec.items():
        assert d["peer_group"] == k and d["global_world"] == REPLICAS * SHARDS
        assert [x["round"] for x in d["rounds"]] == list(range(1, ROUNDS + 1))
        assert all(x["world_size"] == REPLICAS and x["sync_rx"] == 0 for x in d["rounds"])
        assert d["loss_after"] < 0.5 * d["loss_before"], d
    for k in range(SHARDS):
        a, b = rec[(0, k)], rec[(1, k)]
        for key in ("outer", "state", "momentum"):
            assert [x[key] for x in a["rounds"]] == [x[key] for x in b["rounds"]], (k, key)
        assert len({x["outer"] for x in a["rounds"]}) == ROUNDS  # the outer state moved every round
    # Shards hold different halves; together they are one model, the same in both replicas.
    assert rec[(0, 0)]["rounds"][-1]["outer"] != rec[(0, 1)]["rounds"][-1]["outer"]
    assert rec[(0, 0)]["shard_numel"] + rec[(0, 1)]["shard_numel"] == DIM * HIDDEN + HIDDEN + HIDDEN * 2 + 2
    assert len({d["full"] for d in rec.values()}) == 1
    assert rec[(0, 0)]["loss_before"] == rec[(1, 0)]["loss_before"]  # the join sync equalized the inits


@pytest.mark.timeout(90)
def test_a_dead_rank_removes_its_whole_replica(tmp_path: Path) -> None:
    """Replica 1's rank 1 dies in round 2: its sibling leaves with ReplicaLostError instead of
    hanging, and replica 0 finishes every round alone in both groups."""
    rec = _run(tmp_path, die=(1, 1, INNER_STEPS + INNER_STEPS // 2))
    lost = rec[(1, 0)]
    assert "loss_after" not in lost and "a rank of this replica is gone" in lost["error"], lost
    assert [x["round"] for x in lost["rounds"]] == [1]
    for k in range(SHARDS):
        d = rec[(0, k)]
        assert "error" not in d and [x["round"] for x in d["rounds"]] == list(range(1, ROUNDS + 1))
        assert [x["world_size"] for x in d["rounds"]] == [REPLICAS] + [1] * (ROUNDS - 1)
        assert d["loss_after"] < 0.5 * d["loss_before"], d
    # Round 1 was still bit-identical across the replicas in both shards.
    assert rec[(0, 0)]["rounds"][0]["state"] == lost["rounds"][0]["state"]
