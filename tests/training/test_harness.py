"""The launcher's fault schedule: a worker due to be killed is killed once and reported once."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from training.harness import PeerResult, PeerSpec, _drive, _Running


@pytest.mark.timeout(60)
def test_a_kill_is_sent_and_reported_once_while_the_worker_is_reaped(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "w0.jsonl"
    out.write_text(json.dumps({"event": "round", "round": 3}) + "\n")
    proc = ctx.Process(target=time.sleep, args=(60,))
    proc.start()
    # A big worker takes a while to die after SIGKILL (its memory is torn down first), and
    # looks alive meanwhile; this one does so for half a second.
    kills: list[float] = []
    real_kill, real_alive = proc.kill, proc.is_alive

    def kill() -> None:
        kills.append(time.monotonic())
        real_kill()

    def is_alive() -> bool:
        return real_alive() or bool(kills and time.monotonic() - kills[0] < 0.5)

    proc.kill, proc.is_alive = kill, is_alive  # type: ignore[method-assign]
    run = _Running(PeerResult(PeerSpec(0, kill_at_round=2)), out, tmp_path / "w0.err", proc=proc)
    events: list[dict[str, Any]] = []
    _drive(ctx, [run], "127.0.0.1:1", [], time.monotonic() + 30, lambda spec, rec: events.append(rec))  # type: ignore[arg-type]
    proc.join(10)
    assert proc.exitcode == -9 and len(kills) == 1
    assert [e for e in events if e.get("event") == "killed"] == [{"event": "killed", "after_round": 3}]
