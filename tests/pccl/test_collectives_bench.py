"""``pccl bench allreduce``: the ratio table, and one small real run against Gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pccl.bench.allreduce import ratio_rows

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ratios_compare_every_pccl_row_with_gloo_and_variants_with_their_plain_run() -> None:
    rows = [
        {"impl": "gloo", "world": 2, "mib": 1, "seconds": 0.4},
        {"impl": "pccl-cubic", "world": 2, "mib": 1, "seconds": 0.2},
        {"impl": "pccl-cubic-uint8", "world": 2, "mib": 1, "seconds": 0.05},
        {"impl": "pccl-cubic-out", "world": 2, "mib": 1, "seconds": 0.1},
        {"impl": "pccl-cubic", "world": 4, "mib": 1, "seconds": 0.3},  # no Gloo row to compare with
    ]
    got = {(r["impl"], r["baseline"], r["world"]): r["speedup"] for r in ratio_rows(rows)}
    assert got == pytest.approx({
        ("pccl-cubic", "gloo", 2): 2.0,
        ("pccl-cubic-uint8", "gloo", 2): 8.0,
        ("pccl-cubic-uint8", "pccl-cubic", 2): 4.0,
        ("pccl-cubic-out", "gloo", 2): 4.0,
        ("pccl-cubic-out", "pccl-cubic", 2): 2.0,
    })


@pytest.mark.timeout(120)
def test_a_small_run_writes_rows_for_pccl_and_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ar.json"
    cmd = [sys.executable, "-m", "pccl.cli", "bench", "allreduce", "--world", "2", "--sizes-mib", "1",
           "--iters", "1", "--compare-gloo", "--quantize", "uint8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"gloo", "pccl-cubic", "pccl-cubic-uint8"}
    nbytes = 1 << 20
    for row in rows.values():
        assert set(row) == {"impl", "world", "mib", "seconds", "busbw_gbps", "tx_bytes"}
        assert row["seconds"] > 0
        assert row["busbw_gbps"] == pytest.approx(nbytes / row["seconds"] * 2 * (2 - 1) / 2 / 1e9)
    # World 2: each rank sends one half in reduce-scatter and one in all-gather.
    assert rows["gloo"]["tx_bytes"] == rows["pccl-cubic"]["tx_bytes"] == nbytes
    # uint8 codes: a quarter of the bytes, plus a 16-byte header per piece.
    assert nbytes // 4 < rows["pccl-cubic-uint8"]["tx_bytes"] < nbytes // 4 + 1024
    assert {(r["impl"], r["baseline"]) for r in data["ratios"]} == {
        ("pccl-cubic", "gloo"), ("pccl-cubic-uint8", "gloo"), ("pccl-cubic-uint8", "pccl-cubic")
    }
    assert "speedup" in proc.stdout
