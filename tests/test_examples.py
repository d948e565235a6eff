"""The scripts in examples/ run as they are, with their smallest settings, as a user would run
them (a subprocess from the repository root), and print a meaningful result."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
LOSS = re.compile(r"eval loss (\d+\.\d+) -> (\d+\.\d+)")


def _run(script: str, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def _losses(text: str) -> list[tuple[float, float]]:
    found = [(float(a), float(b)) for a, b in LOSS.findall(text)]
    assert found, text
    return found


@pytest.mark.timeout(120)
def test_ddp_backend_trains_with_identical_ranks() -> None:
    out = _run("ddp_backend.py", "--ranks", "2", "--steps", "20").stdout
    assert "2 ranks, 20 DDP steps over pccl" in out
    assert "parameters bit-identical on every rank: yes" in out
    (before, after), = _losses(out)
    assert after < before


@pytest.mark.timeout(120)
def test_diloco_across_machines_local_run() -> None:
    out = _run("diloco_across_machines.py", "--local", "2", "--rounds", "3", "--inner-steps", "5").stdout
    # Each peer prints its own digest: compare them here rather than trust the summary alone.
    digests = re.findall(r"peer \d+: eval loss .* outer digest ([0-9a-f]+)", out)
    assert len(digests) == 2 and len(set(digests)) == 1, out
    rounds = re.findall(r"peer \d+: round +(\d+) +peers (\d+)", out)
    assert sorted(rounds) == sorted([(str(r), "2") for r in (1, 2, 3)] * 2), out
    assert "2 of 2 peers finished 3 rounds" in out and "bit-identical on every peer: yes" in out
    assert all(after < before for before, after in _losses(out))


@pytest.mark.timeout(120)
def test_fsdp_diloco_two_replicas() -> None:
    out = _run("fsdp_diloco.py", "--replicas", "2", "--shards", "2", "--rounds", "2", "--inner-steps", "5").stdout
    assert "4 of 4 ranks finished 2 rounds" in out, out
    assert "full model bit-identical across replicas: yes" in out
    # Rank 0 of each replica reports every round, with both replicas in the run.
    assert sorted(re.findall(r"replica (\d): round (\d)  replicas (\d)", out)) == [
        ("0", "1", "2"), ("0", "2", "2"), ("1", "1", "2"), ("1", "2", "2")]
    (before, after), = _losses(out)
    assert after < before
