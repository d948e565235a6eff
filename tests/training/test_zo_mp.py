"""ZerothOrder with workers as separate processes over pccl on 127.0.0.1 (a master in this process).

Workers are forked from a fork server that imported torch and pccl once (as in
:mod:`training.harness`), run :func:`training.zo_peer.worker` and write JSON lines.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

import pccl
from pccl import SharedState, SyncInfo, SyncStrategy
from training.data import BatchSampler
from training.zo import ZerothOrder
from training.zo_peer import CharMLP, WorkerConfig, evaluate, mlp_loss, small_corpus, worker

STEPS, LR, WORKERS = 2000, 0.02, 4
SINGLE_LRS = (0.01, 0.015)  # the single worker diverges at the group's lr; these are its best


def _reported_step(path: Path) -> int:
    """The highest step worker file ``path`` reported so far."""
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()[:-1]]
    return max(steps, default=0)


def _connected(path: Path) -> bool:
    return path.exists() and '"connected"' in path.read_text()


def _launch(configs: list[WorkerConfig], directory: Path, timeout: float,
            start_after: dict[int, int] | None = None) -> list[list[dict[str, Any]]]:
    """Run the workers; ``start_after[i] = s``: worker ``i`` starts once worker 0 reported step ``s``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pccl", "training.zo", "training.zo_peer"])
    start_after = start_after or {}
    with pccl.Master("127.0.0.1", port=0, heartbeat_timeout=2.0) as master:
        procs: list[Any] = [None] * len(configs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, cfg in enumerate(configs):
                # Founders start one after the other once the previous one connected, so that
                # peer ids (and with them the directions) pair with the same data streams in every run.
                ready = i == 0 or (i not in start_after and _connected(directory / f"w{i - 1}.jsonl"))
                if i in start_after:
                    ready = _reported_step(directory / "w0.jsonl") >= start_after[i]
                if procs[i] is None and ready:
                    cfg = WorkerConfig(**{**cfg.__dict__, "master": master.address,
                                          "out": str(directory / f"w{i}.jsonl")})
                    procs[i] = ctx.Process(target=worker, args=(cfg,))
                    procs[i].start()
            if all(p is not None and not p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        alive = [p for p in procs if p is not None and p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        assert not alive, "workers did not finish in time"
    out = []
    for i in range(len(configs)):
        path = directory / f"w{i}.jsonl"
        out.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return out


def _done(records: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in records if r["event"] == "done"]
    assert done, records[-3:]
    return done[0]


def _check_parity(runs: list[list[dict[str, Any]]]) -> int:
    """Digests agree at every reported step; returns how many steps were compared across >= 2 peers."""
    by_step: dict[int, set[str]] = defaultdict(set)
    count: dict[int, int] = defaultdict(int)
    for records in runs:
        for r in records:
            if r["event"] == "step":
                by_step[r["step"]].add(r["digest"])
                count[r["step"]] += 1
    for step, digests in by_step.items():
        assert len(digests) == 1, f"parity broken at step {step}"
    return sum(1 for s in count if count[s] >= 2)


class _Solo:
    world_size, peer_id, ring = 1, 0, [0]

    def are_peers_pending(self) -> bool:
        return False

    def update_topology(self) -> None:
        raise AssertionError

    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncInfo:
        return SyncInfo(0, 0, state.revision)

    def all_gather(self, tensor: torch.Tensor, *, tag: int = 0) -> list[torch.Tensor]:
        return [tensor]


def _single(lr: float) -> float:
    corpus = small_corpus()
    model = CharMLP(seed=0)
    sampler = BatchSampler(corpus.train, batch_size=64, context=model.context, seed=0, worker=0)
    zo = ZerothOrder(_Solo(), model, mlp_loss, lr=lr, seed=0)
    for _ in range(STEPS):
        zo.step(sampler.next())
    return evaluate(model, corpus)


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[list[dict[str, Any]]]]:
    runs = {}
    for bits in (8, 32):
        directory = tmp_path_factory.mktemp(f"zo{bits}")
        configs = [WorkerConfig("", "", worker=w, steps=STEPS, lr=LR, bits=bits, min_peers=WORKERS,
                                report_every=50) for w in range(WORKERS)]
        runs[bits] = _launch(configs, directory, timeout=120)
    return runs


@pytest.mark.timeout(300)
def test_four_peers_beat_best_single_worker_and_byte_matches_float(
    group_runs: dict[int, list[list[dict[str, Any]]]],
) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = min(_single(lr) for lr in SINGLE_LRS)
    finally:
        torch.set_num_threads(previous)
    q8 = [_done(r) for r in group_runs[8]]
    f32 = [_done(r) for r in group_runs[32]]
    assert len({d["digest"] for d in q8}) == 1 and len({d["digest"] for d in f32}) == 1
    loss8, loss32 = q8[0]["val_loss"], f32[0]["val_loss"]
    print(f"single {single:.4f}  4 peers byte {loss8:.4f}  float {loss32:.4f}")
    assert loss8 <= single - 0.1, (loss8, single)
    assert abs(loss8 - loss32) <= 0.02, (loss8, loss32)
    assert q8[0]["digest"] != f32[0]["digest"]


@pytest.mark.timeout(60)
def test_parity_every_50_steps_and_bytes_per_step(group_runs: dict[int, list[list[dict[str, Any]]]]) -> None:
    for bits, record_bytes in ((8, 2), (32, 5)):
        runs = group_runs[bits]
        assert _check_parity(runs) == STEPS // 50
        for records in runs:
            steps = [r for r in records if r["event"] == "step"]
            assert all(r["world_size"] == WORKERS and r["sync_rx_bytes"] == 0 for r in steps)
            done = _done(records)
            assert done["gathers"] == STEPS
            assert done["payload_bytes"] == record_bytes * STEPS
            # A ring all-gather forwards the other peers' records: (W - 1) records sent per step.
            assert (WORKERS - 1) * record_bytes <= 16


@pytest.mark.timeout(120)
def test_peer_lost_and_newcomer_keep_parity(tmp_path: Path) -> None:
    steps = 800
    configs = [
        WorkerConfig("", "", worker=0, steps=steps, lr=LR, min_peers=3, report_every=16),
        WorkerConfig("", "", worker=1, steps=steps, lr=LR, min_peers=3, report_every=16, die_at_step=150),
        WorkerConfig("", "", worker=2, steps=steps, lr=LR, min_peers=3, report_every=16),
        WorkerConfig("", "", worker=3, steps=steps, lr=LR, report_every=16),
    ]
    runs = _launch(configs, tmp_path, timeout=90, start_after={3: 300})
    survivors = [runs[0], runs[2], runs[3]]
    for records in survivors:
        _done(records)
    assert not any(r["event"] == "done" for r in runs[1])
    joined = next(r for r in runs[3] if r["event"] == "joined")
    assert 300 <= joined["step"] < steps, joined
    assert _check_parity(runs) >= steps // 16 - 1
    sizes = [r["world_size"] for r in runs[0] if r["event"] == "step"]
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3, sizes
    assert len({_done(r)["digest"] for r in survivors}) == 1
