"""Launch a local run: a master in this process and worker processes (:mod:`training.peer`).

Used by the multi-process tests, ``python -m training.validate`` and the demo. Everything is on
127.0.0.1. Faults are declared up front in the :class:`PeerSpec` list: a worker may be started
only once the group has completed a given round (a late joiner), and may be SIGKILLed by this
launcher once the group reached a round (or kill itself at an inner step, ``--die-at-step``).

Workers are separate processes forked from a ``multiprocessing`` fork server that has imported
torch, pccl and the training code once: each worker then starts in milliseconds instead of
paying torch's import (about 3 s of CPU on a busy 2-core machine) — a run of five workers would
otherwise spend more CPU importing than training. The fork server forks before any torch
thread pool exists. Each worker writes its stderr to its own file.

Progress is read from each worker's JSON-lines file as it grows; :func:`run_group` returns when
every worker exited, and kills them all if ``timeout`` passes first.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.context
import multiprocessing.synchronize
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pccl

__all__ = ["GroupTimeout", "PeerResult", "PeerSpec", "run_group"]

_POLL = 0.05  # seconds between looks at the result files while waiting for events
_PRELOAD = ["torch", "torch._dynamo", "numpy", "pccl", "training.peer"]


class GroupTimeout(RuntimeError):
    """The run did not finish in time; every worker was killed. The message shows their output."""


@dataclass(frozen=True)
class PeerSpec:
    """One worker: its data index, extra ``training.peer`` options, and declared faults."""

    worker: int
    extra: tuple[str, ...] = ()
    start_after_round: int | None = None  # start once some worker reported this round
    kill_at_round: int | None = None  # SIGKILL once some worker reported this round
    prestart: bool = False  # late joiner: start at once, connect only once start_after_round came


@dataclass
class PeerResult:
    """What one worker wrote, and how it ended (``returncode`` -9: killed)."""

    spec: PeerSpec
    returncode: int | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """The ``round`` records, in order."""
        return [r for r in self.records if r.get("event") == "round"]

    @property
    def done(self) -> dict[str, Any] | None:
        """The final ``done`` record, if the worker finished."""
        return next((r for r in self.records if r.get("event") == "done"), None)

    @property
    def joined(self) -> dict[str, Any] | None:
        """The ``joined`` record, if the worker joined."""
        return next((r for r in self.records if r.get("event") == "joined"), None)


def _worker_entry(argv: list[str], err_path: str, go: multiprocessing.synchronize.Event | None) -> None:
    """Body of a worker process: stderr to its file, then ``training.peer.main``."""
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    from training import peer

    code = peer.main(argv, go=go.wait if go is not None else None)
    raise SystemExit(code)


@dataclass
class _Running:
    result: PeerResult
    out: Path
    err: Path
    proc: multiprocessing.process.BaseProcess | None = None
    go: multiprocessing.synchronize.Event | None = None  # set: a prestarted worker may connect
    offset: int = 0
    partial: str = ""
    killed: bool = False  # SIGKILL sent (the process may look alive until it is reaped)


def _read_new(run: _Running) -> list[dict[str, Any]]:
    try:
        with open(run.out, encoding="utf-8") as f:
            f.seek(run.offset)
            chunk = f.read()
            run.offset = f.tell()
    except FileNotFoundError:
        return []
    lines = (run.partial + chunk).split("\n")
    run.partial = lines.pop()
    fresh = [json.loads(line) for line in lines if line.strip()]
    run.result.records.extend(fresh)
    return fresh


def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _start(ctx: multiprocessing.context.ForkServerContext, run: _Running, master: str, common: Sequence[str]) -> None:
    spec = run.result.spec
    argv = ["--master", master, "--worker", str(spec.worker), "--out", str(run.out), *common, *spec.extra]
    run.go = ctx.Event() if spec.prestart else None
    run.proc = ctx.Process(target=_worker_entry, args=(argv, str(run.err), run.go), name=f"worker{spec.worker}")
    run.proc.start()


def run_group(
    specs: Sequence[PeerSpec],
    common: Sequence[str],
    workdir: str | os.PathLike[str],
    *,
    timeout: float,
    on_record: Callable[[PeerSpec, dict[str, Any]], None] | None = None,
    heartbeat_timeout: float = 2.0,
) -> list[PeerResult]:
    """Run a master and the workers of ``specs`` (each with ``common`` options) to the end.

    ``on_record`` is called for every record as it appears (live progress), and with
    ``{"event": "started"}`` / ``{"event": "killed"}`` when this launcher starts or kills a worker.

    Raises:
        GroupTimeout: not every worker exited within ``timeout`` seconds.
    """
    directory = Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    runs = [
        _Running(PeerResult(s), directory / f"peer{i}-w{s.worker}.jsonl", directory / f"peer{i}-w{s.worker}.err")
        for i, s in enumerate(specs)
    ]
    deadline = time.monotonic() + timeout
    ctx = _context()
    with pccl.Master("127.0.0.1", port=0, heartbeat_timeout=heartbeat_timeout) as master:
        try:
            _drive(ctx, runs, master.address, common, deadline, on_record)
        finally:
            for run in runs:
                if run.proc is not None:
                    if run.proc.is_alive():
                        run.proc.kill()
                    run.proc.join()
                    run.result.returncode = run.proc.exitcode
                run.result.stderr = run.err.read_text(errors="replace") if run.err.exists() else ""
                _read_new(run)
    return [r.result for r in runs]


def _drive(
    ctx: multiprocessing.context.ForkServerContext,
    runs: list[_Running],
    master: str,
    common: Sequence[str],
    deadline: float,
    on_record: Callable[[PeerSpec, dict[str, Any]], None] | None,
) -> None:
    group_round = 0

    def note(spec: PeerSpec, record: dict[str, Any]) -> None:
        if on_record is not None:
            on_record(spec, record)

    while True:
        for run in runs:
            spec = run.result.spec
            due = (spec.start_after_round or 0) <= group_round
            if run.proc is None and (due or spec.prestart):
                _start(ctx, run, master, common)
                if not spec.prestart:
                    note(spec, {"event": "started", "after_round": group_round})
            if run.go is not None and due and not run.go.is_set():
                run.go.set()
                note(spec, {"event": "started", "after_round": group_round})
            for record in _read_new(run) if run.proc is not None else []:
                if record.get("event") == "round":
                    group_round = max(group_round, int(record["round"]))
                note(spec, record)
            if (run.proc is not None and spec.kill_at_round is not None and group_round >= spec.kill_at_round
                    and not run.killed and run.proc.is_alive()):
                run.proc.kill()
                run.killed = True
                note(spec, {"event": "killed", "after_round": group_round})
        if all(r.proc is not None and not r.proc.is_alive() for r in runs):
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"worker {r.result.spec.worker}: {r.err.read_text(errors='replace')[-2000:]}"
                              for r in runs if r.err.exists())
            raise GroupTimeout(f"the run did not finish in time\n{tails}")
        time.sleep(_POLL)
