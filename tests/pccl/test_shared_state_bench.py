"""``pccl bench shared-state`` runs end to end on a small state and writes sane rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pccl.cli import main


@pytest.mark.timeout(120)
def test_bench_shared_state_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    rc = main(["bench", "shared-state", "--size-mib", "4", "--repeats", "1", "--slow-hashes-mib", "1",
               "--connections", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    whats = [r["what"] for r in rows]
    assert any(w.startswith("pccl hash") for w in whats)
    assert "catch-up of a fresh peer, 1 connection(s)" in whats
    for r in rows:
        assert set(r) == {"what", "mib", "seconds", "gbps"}
        assert r["seconds"] > 0
        # gbps is GB/s of the row's own bytes and time (independent recomputation)
        assert r["gbps"] == pytest.approx(r["mib"] * (1 << 20) / r["seconds"] / 1e9)
    assert "best pccl hash" in capsys.readouterr().out
