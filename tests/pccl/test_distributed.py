"""The torch.distributed backend "pccl" against Gloo, in real processes over 127.0.0.1.

Each test starts W ranks of ``dist_worker.py``; every rank joins a "pccl" default group and
a Gloo group of the same ranks, runs the same calls on both and checks the results against
Gloo and against a float64 reference computed from every rank's (reproducible) inputs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
REPO_ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_ranks(scenario: str, world: int, tmp_path: Path, timeout: float = 60) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``scenario``; their JSON reports (None for a rank that wrote none)."""
    port = _free_port()
    outs = [tmp_path / f"{scenario}-{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_worker.py"), scenario, str(r), str(world), str(port), str(outs[r])],
            env=_env(), cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = []
    for r, path in enumerate(outs):
        reports.append(json.loads(path.read_text()) if path.exists() else {"missing": logs[r][-3000:] if r < len(logs) else ""})
    return reports


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_gloo(world: int, tmp_path: Path) -> None:
    reports = run_ranks("collectives", world, tmp_path)
    for rank, rep in enumerate(reports):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == [], f"rank {rank}: {rep['failures']}"
        assert rep["checked"] > 80


@pytest.mark.timeout(90)
def test_encrypted_collectives_from_options(tmp_path: Path) -> None:
    reports = run_ranks("encrypted", 2, tmp_path)
    for rank, rep in enumerate(reports):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == [], f"rank {rank}: {rep['failures']}"
        assert rep["checked"] > 80
        assert rep["encrypt"] == [True]


@pytest.mark.timeout(90)
def test_ddp_matches_gloo(tmp_path: Path) -> None:
    reports = run_ranks("ddp", 2, tmp_path)
    for rank, rep in enumerate(reports):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == [], f"rank {rank}: {rep['failures']}"
        assert rep["max_rel_diff"] <= 1e-6


@pytest.mark.timeout(90)
def test_killed_rank_fails_survivors(tmp_path: Path) -> None:
    reports = run_ranks("fault", 3, tmp_path)
    assert "missing" in reports[2]  # the killed rank wrote nothing
    for rank, rep in enumerate(reports[:2]):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == []
        assert rep["step"] == 3
        assert "PeerLostError" in rep["error"]  # pccl's reason travels in the DistBackendError
        assert rep["latency_s"] < 10  # within the 30 s group timeout (heartbeats: 5 s)
        assert "broken" in rep["next_error"] and rep["next_latency_s"] < 1


@pytest.mark.timeout(90)
def test_torchrun_two_processes() -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(HERE / "dist_torchrun.py")]
    proc = subprocess.run(cmd, env=_env(), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rank ok=True") == 2


def test_backend_registered() -> None:
    import torch.distributed as dist

    import pccl.distributed

    assert "pccl" in dist.Backend.backend_list
    assert dist.Backend.backend_capability["pccl"] == ["cpu", "cuda"]
    assert pccl.distributed.BACKEND_NAME == "pccl"


@pytest.mark.timeout(90)
def test_fsdp2_matches_gloo(tmp_path: Path) -> None:
    reports = run_ranks("fsdp", 2, tmp_path)
    for rank, rep in enumerate(reports):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == [], f"rank {rank}: {rep['failures']}"
        assert rep["losses"][-1] < rep["losses"][0]


@pytest.mark.timeout(90)
def test_quantized_allreduce_from_options(tmp_path: Path) -> None:
    reports = run_ranks("quant", 2, tmp_path)
    for rank, rep in enumerate(reports):
        assert "missing" not in rep, f"rank {rank} wrote no report:\n{rep.get('missing')}"
        assert rep["failures"] == [], f"rank {rank}: {rep['failures']}"
    assert reports[0]["digest"] == reports[1]["digest"]  # every rank holds the same result
