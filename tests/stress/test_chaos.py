"""``python -m stress.chaos`` end to end: a short run with every fault kind must pass, and a run
in which one peer corrupts a result must fail (so the checks are proven able to fail).

The long soak is the same command with ``--peers 6 --duration 600`` (README, "Chaos testing").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESS_KINDS = {"kill", "stop", "join"}
PROXY_KINDS = {"latency", "throttle", "reset", "partition", "truncate", "garbage"}


def chaos(tmp_path: Path, *args: str, timeout: float) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stress.chaos", *args, "--report", str(report), "--run-dir", str(tmp_path / "run")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=timeout,
    )
    assert report.exists(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(report.read_text()), proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_minute_of_every_fault_passes_every_check(tmp_path: Path) -> None:
    rc, report, out = chaos(tmp_path, "--peers", "4", "--duration", "60", "--seed", "11",
                            "--faults", "kill,stop,join,proxy", timeout=220)
    assert rc == 0 and report["ok"], out
    assert (tmp_path / "report.txt").read_text().startswith("chaos run: OK")
    injected = report["faults"]["injected"]
    assert set(injected) == PROCESS_KINDS | PROXY_KINDS, report["faults"]  # every kind really happened
    assert report["faults"]["total_injected"] >= 10
    # A stop longer than the heartbeat timeout got its peer kicked; the peer noticed and rejoined.
    long_stops = [f for f in report["fault_log"] if f["kind"] == "stop" and f["done"] and f["seconds"] > 2.0]
    if long_stops:
        assert report["master"]["kicks"].get("heartbeat timeout", 0) >= 1, report["master"]
        assert any(k.endswith("MasterConnectionError") for k in report["errors"]["recoverable_errors"]), report
    values, state = report["values"], report["shared_state"]
    assert report["master"]["collectives_completed"] >= 100
    assert values["tensors_checked"] >= 300 and values["reduce_parity_checks"] >= 100
    assert state["sync_parity_checks"] >= 50 and state["perturbed_and_repaired"] >= 1
    assert report["steps_after_faults"] > 0
    assert report["stall"]["max_stall_s"] < report["stall"]["bound_s"]
    assert report["violations"] == []


@pytest.mark.timeout(120)
def test_a_corrupted_result_is_detected(tmp_path: Path) -> None:
    rc, report, out = chaos(tmp_path, "--peers", "2", "--duration", "10", "--faults", "none", "--corrupt-step", "5",
                            timeout=100)
    assert rc == 1 and not report["ok"], out
    kinds = {v["kind"] for v in report["violations"]}
    assert kinds == {"value", "parity"}, report["violations"]
    assert "VIOLATION [value]" in out and "VIOLATION [parity]" in out
    # Everything else in that run was fine: the checks blame the corruption, nothing more.
    assert report["values"]["tensors_checked"] > 10
