"""Membership latencies: joining a busy run, and detecting a killed or stopped peer.

A master runs in this process; every peer is its own process on this machine.

- **join**: ``--peers`` peers loop ``update_topology()`` back to back; a newcomer
  process calls ``connect()``. The time runs from just before ``connect()`` to its
  return, measured in the newcomer. The newcomer then leaves; ``--repeat`` newcomers.
- **sigkill / sigstop detection**: ``--peers`` peers (one of them the victim) all
  run a collective whose body waits for data that never comes. The victim gets
  SIGKILL (or SIGSTOP); the time runs from the signal to the moment the last
  survivor's call raised ``PeerLostError`` (both read CLOCK_MONOTONIC). A new victim
  joins for each of ``--repeat`` rounds.

Goals (loopback): join < 0.5 s, SIGKILL detection < 1 s, SIGSTOP detection
<= heartbeat timeout + 0.5 s. The table shows the median, min and max of the repeats;
``--plot PATH`` draws them as bars with the goals.

examples:
  pccl bench membership --json membership.json
  pccl bench membership --peers 8 --repeat 10 --heartbeat-timeout 1 --plot membership.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from pccl.bench.common import add_plot_argument, check_plot, format_table, thread_env, write_json, write_plot
from pccl.progress import Progress, progress

COLUMNS = [
    ("event", "event", "s"), ("peers", "peers", "d"), ("seconds", "median s", ".3f"),
    ("min", "min s", ".3f"), ("max", "max s", ".3f"), ("goal", "goal s", ".2f"),
]
_REPLY_TIMEOUT = 60.0


# --- the peer process -------------------------------------------------------------------


def _worker(master: str) -> int:
    """A peer driven by JSON commands on stdin; each reply carries the monotonic time it ended."""
    import asyncio

    from pccl.communicator import Communicator
    from pccl.peer_session import CollectiveContext

    async def hang(ctx: CollectiveContext) -> None:
        assert ctx.peers is not None
        await ctx.peers.recv_prev(ctx.op_id, 1, memoryview(bytearray(8)))  # nobody sends it

    comm = Communicator(master, connections=1)
    print(json.dumps({"ok": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        reply: dict[str, Any] = {"ok": True}
        start = time.monotonic()
        try:
            if cmd == "connect":
                comm.connect()
            elif cmd == "loop":
                while True:
                    comm.update_topology()
            elif cmd == "update_topology":
                comm.update_topology()
            elif cmd == "hang":
                comm._collective_blocking(0, {"kind": "hang"}, hang)
            elif cmd == "close":
                comm.close()
        except Exception as exc:  # reported to the driver, which checks the kind
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        reply.update(start=start, end=time.monotonic(), world=None if not reply["ok"] or cmd == "close"
                     else comm.world_size)
        print(json.dumps(reply), flush=True)
        if cmd == "close":
            return 0
    return 0


class _Peer:
    def __init__(self, master: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl.bench.membership", "--worker", master],
            # Workers report errors in their replies; their log lines would bury the table.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=thread_env(1),
        )
        self._replies: list[dict[str, Any]] = []
        self._ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.reply()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._ready:
                self._replies.append(json.loads(line))
                self._ready.notify_all()

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        with self._ready:
            if not self._ready.wait_for(lambda: self._replies, _REPLY_TIMEOUT):
                raise RuntimeError(f"peer process {self.proc.pid} did not answer")
            return self._replies.pop(0)

    def call(self, cmd: str) -> dict[str, Any]:
        self.send(cmd)
        reply = self.reply()
        if not reply["ok"]:
            raise RuntimeError(f"{cmd} failed: {reply}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def _wait(predicate: Any, what: str, timeout: float = _REPLY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- the measurements -------------------------------------------------------------------


def _accept(master: Any, voters: list[_Peer], newcomer: _Peer) -> None:
    """Let ``newcomer`` in: it connects while the ``voters`` vote."""
    pending = len(master.status()["pending"])
    newcomer.send("connect")
    _wait(lambda: len(master.status()["pending"]) > pending, "the newcomer to register")
    for voter in voters:
        voter.send("update_topology")
    for peer in (newcomer, *voters):
        if not peer.reply()["ok"]:
            raise RuntimeError("accepting a peer failed")


def measure_join(master: Any, peers: int, repeat: int, bar: Progress[Any] | None = None) -> list[float]:
    """Join latencies (seconds) of ``repeat`` newcomers to a run of ``peers`` busy peers."""
    loopers = [_Peer(master.address)]
    procs = list(loopers)
    try:
        loopers[0].call("connect")
        while len(loopers) < peers:
            newcomer = _Peer(master.address)
            procs.append(newcomer)
            _accept(master, loopers, newcomer)
            loopers.append(newcomer)
        for looper in loopers:
            looper.send("loop")
        samples = []
        for _ in range(repeat):
            newcomer = _Peer(master.address)  # started (imports done) before the clock runs
            procs.append(newcomer)
            reply = newcomer.call("connect")
            if reply["world"] != peers + 1:
                raise RuntimeError(f"newcomer saw world size {reply['world']}, expected {peers + 1}")
            samples.append(reply["end"] - reply["start"])
            newcomer.call("close")
            if bar is not None:
                bar.update(1, event="join")
        return samples
    finally:
        for proc in procs:
            proc.kill()


def measure_detection(
    master: Any, peers: int, repeat: int, how: signal.Signals, bar: Progress[Any] | None = None
) -> list[float]:
    """Seconds from signalling a victim (``how``) to the last survivor's ``PeerLostError``."""
    survivors = [_Peer(master.address)]
    procs = list(survivors)
    try:
        survivors[0].call("connect")
        while len(survivors) < peers - 1:
            newcomer = _Peer(master.address)
            procs.append(newcomer)
            _accept(master, survivors, newcomer)
            survivors.append(newcomer)
        samples = []
        for _ in range(repeat):
            victim = _Peer(master.address)
            procs.append(victim)
            _accept(master, survivors, victim)
            everyone = [*survivors, victim]
            for peer in everyone:
                peer.send("hang")
            _wait(lambda: len(master.status()["collectives"].get(0, {}).get(0, [])) == peers, "the op to start")
            fault = time.monotonic()
            victim.proc.send_signal(how)
            replies = [peer.reply() for peer in survivors]
            if any(r.get("error") != "PeerLostError" for r in replies):
                raise RuntimeError(f"survivors did not see the abort: {replies}")
            samples.append(max(r["end"] for r in replies) - fault)
            victim.kill()
            if bar is not None:
                bar.update(1, event=how.name.lower())
        return samples
    finally:
        for proc in procs:
            proc.kill()


def _row(event: str, peers: int, samples: Sequence[float], goal: float) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "event": event, "peers": peers, "seconds": ordered[len(ordered) // 2],
        "min": ordered[0], "max": ordered[-1], "goal": goal, "samples": list(samples),
    }


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``pccl bench membership`` options."""
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--peers", type=int, default=4, help="peers in the run (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="measurements per event (default 5)")
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0, help="master heartbeat timeout (s)")
    add_plot_argument(parser, "the latencies as bars with their goals")
    parser.add_argument("--worker", metavar="MASTER", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``args.json`` (and ``args.plot``); returns the
    exit status.

    Raises:
        pccl.plot.PlotUnavailableError: ``--plot`` without matplotlib (before anything runs).
        RuntimeError: a peer process misbehaved or did not answer.
    """
    from pccl.master import Master

    if args.worker:
        return _worker(args.worker)
    check_plot(args)
    if args.peers < 2 or args.repeat < 1:
        print("pccl bench membership: needs --peers >= 2 and --repeat >= 1", file=sys.stderr)
        return 2
    if not getattr(args, "verbose", False):
        # One log line per join/vote/kick would bury the table; -v shows them.
        logging.getLogger("pccl").setLevel(logging.WARNING)
    hb = args.heartbeat_timeout
    with progress(3 * args.repeat, "membership", unit="measurement") as bar:
        with Master("127.0.0.1", 0, heartbeat_timeout=hb) as master:
            rows = [_row("join", args.peers, measure_join(master, args.peers, args.repeat, bar), 0.5)]
        with Master("127.0.0.1", 0, heartbeat_timeout=hb) as master:
            kill = measure_detection(master, args.peers, args.repeat, signal.SIGKILL, bar)
            rows.append(_row("sigkill_detection", args.peers, kill, 1.0))
            stop = measure_detection(master, args.peers, args.repeat, signal.SIGSTOP, bar)
            rows.append(_row("sigstop_detection", args.peers, stop, hb + 0.5))
    meta = {"heartbeat_timeout": hb, "repeat": args.repeat, "cpus": os.cpu_count(), "statistic": "median"}
    print(f"membership latencies on loopback, heartbeat timeout {hb:g} s, median of {args.repeat}")
    print(format_table(rows, COLUMNS))
    if args.json:
        write_json(args.json, {"rows": rows, "meta": meta})
    if args.plot:
        from pccl import plot

        title = f"membership latencies, {args.peers} peers, heartbeat timeout {hb:g} s"
        write_plot(args.plot, plot.membership_figure(rows, title=title))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pccl.bench.membership")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
