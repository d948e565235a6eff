"""Chaos orchestrator: a master and peers in real processes, faults at seeded random moments,
and every value checked (``python -m stress.chaos``).

::

    python -m stress.chaos --peers 4 --duration 60 --seed 7 --report chaos.json     # about 75 s
    python -m stress.chaos --peers 6 --duration 600 --faults kill,stop,join,proxy --report soak.json
    python -m stress.chaos --peers 4 --duration 60 --quantize uint8 --report q.json

The orchestrator starts ``pccl master`` and ``--peers`` peer processes
(:mod:`stress.chaos_peer`: votes, shared-state syncs, several concurrent all-reduces with
retry, each result checked). With the ``proxy`` faults on, every peer registers the port
of its own :class:`stress.proxy.FaultProxy` (``advertise_port``), so every byte other peers
send it passes the proxy. The fault schedule is a pure function of ``--seed``
(:func:`build_schedule`): kinds, times, targets and parameters; whether a fault can act
depends on the run (a kill is skipped when it would leave fewer than two healthy peers, a
connection fault when the target has no open connection), and the report says which did.

Faults: ``kill`` (SIGKILL, the slot is refilled by a new process a moment later), ``stop``
(SIGSTOP, then SIGCONT; alternately shorter than the heartbeat timeout, which the peer
must survive, and longer, which gets it kicked, and it must notice and rejoin), ``join`` (an extra peer joins, later
leaves gracefully), and through the proxies ``latency``, ``throttle``, ``reset``,
``partition`` (one connection silent both ways for a while, its resets held back too),
``truncate``, ``garbage`` (``proxy`` names all six).

After ``--duration`` seconds every peer is told to leave; then the logs are analysed
(:mod:`stress.chaos_report`): values and cross-peer parity of every step, shared-state
content and parity of every revision, stalls, unexpected errors, file descriptor and RSS
growth, and the master's file descriptors once everyone left. The report goes to
``--report`` (JSON) and a summary to stdout (and ``--report`` with ``.txt``); the exit code is
1 when anything was violated.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from pccl.progress import progress
from stress import chaos_report as R
from stress.chaos_fuzz import free_port, launch_master
from stress.proxy import FaultProxy
from transport.loop import new_event_loop

REPO = Path(__file__).resolve().parents[1]
PROCESS_FAULTS = ("kill", "stop", "join")
PROXY_FAULTS = ("latency", "throttle", "reset", "partition", "truncate", "garbage")
ALL_FAULTS = PROCESS_FAULTS + PROXY_FAULTS
MAX_EXTRA = 2  # extra peers (the "join" fault) alive at once
WARMUP = 8.0  # seconds before the first fault: peers start and join
SAMPLE_EVERY = 1.0
STOP_GRACE = 45.0  # seconds peers get to leave after the stop file appears


@dataclass
class ChaosConfig:
    """Options of one chaos run."""

    peers: int = 6
    duration: float = 600.0
    seed: int = 0
    faults: tuple[str, ...] = ALL_FAULTS
    quantize: str | None = None
    report: Path = Path("chaos-report.json")
    run_dir: Path | None = None
    heartbeat_timeout: float = 2.0
    interval: float = 3.0
    connections: int = 2
    settle: float = 10.0
    corrupt_step: int | None = None
    limits: R.Limits = field(default_factory=R.Limits)

    @property
    def proxied(self) -> bool:
        return any(f in PROXY_FAULTS for f in self.faults)

    @property
    def max_world(self) -> int:
        return self.peers + (MAX_EXTRA if "join" in self.faults else 0)


@dataclass(frozen=True)
class Fault:
    """One planned fault: when (seconds from the start), what, which peer slot, parameters."""

    at: float
    kind: str
    slot: int
    seconds: float = 0.0  # how long it lasts (stop, latency, throttle) or until respawn (kill) / leave (join)
    value: float = 0.0  # latency in seconds, throttle in bytes/s


def build_schedule(seed: int, duration: float, kinds: tuple[str, ...], slots: int, interval: float,
                   heartbeat_timeout: float, settle: float) -> list[Fault]:
    """The run's faults, a pure function of its arguments.

    Faults fall between the warm-up and ``duration - settle``, about ``interval`` apart;
    kinds go round in a shuffled order (reshuffled every round), so each kind appears
    early and about equally often.
    """
    rng = random.Random(seed)
    out: list[Fault] = []
    t, stops = WARMUP, 0
    cycle: list[str] = []
    while kinds:
        t += rng.uniform(0.5, 1.5) * interval
        if t > duration - settle:
            break
        if not cycle:
            cycle = list(kinds)
            rng.shuffle(cycle)
        kind, slot = cycle.pop(), rng.randrange(slots)
        if kind == "stop":
            # Alternately shorter than the heartbeat timeout (the peer must carry on) and
            # longer (it is kicked, and must notice and rejoin).
            factor = rng.uniform(1.5, 3.0) if stops % 2 == 0 else rng.uniform(0.2, 0.7)
            out.append(Fault(t, kind, slot, factor * heartbeat_timeout))
            stops += 1
        elif kind == "kill":
            out.append(Fault(t, kind, slot, rng.uniform(0.5, 3.0)))
        elif kind == "join":
            out.append(Fault(t, kind, slot, rng.uniform(6.0, 15.0)))
        elif kind == "latency":
            out.append(Fault(t, kind, slot, rng.uniform(2.0, 6.0), rng.uniform(0.02, 0.15)))
        elif kind == "throttle":
            out.append(Fault(t, kind, slot, rng.uniform(2.0, 6.0), rng.uniform(2e6, 2e7)))
        elif kind == "partition":
            out.append(Fault(t, kind, slot, rng.uniform(0.5, 3.0)))
        else:
            out.append(Fault(t, kind, slot))
    return out


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(open file descriptors, RSS KiB) of ``pid`` from /proc, None if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return fds, rss
    except (OSError, StopIteration, ValueError):
        return None


class Instance:
    """One peer process and its proxy."""

    def __init__(self, record: R.Process, popen: subprocess.Popen[bytes], stderr: IO[bytes],
                 proxy: FaultProxy | None, extra: bool) -> None:
        self.record = record
        self.popen = popen
        self.stderr = stderr
        self.proxy = proxy
        self.extra = extra
        self.stopped_at: float | None = None
        self.dumped = False  # asked for its stacks during the current quiet spell

    @property
    def alive(self) -> bool:
        return self.record.ended is None

    def healthy(self, now: float) -> bool:
        return self.alive and self.stopped_at is None and now - self.record.started > WARMUP


class Orchestrator:
    """Runs one chaos run on an asyncio loop; :meth:`run` returns the report."""

    def __init__(self, cfg: ChaosConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.dir = run_dir
        self.stop_file = run_dir / "stop"
        self.env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.slots: dict[int, Instance] = {}
        self.instances: list[Instance] = []
        self.faults: list[dict[str, Any]] = []
        self.extra_violations: list[dict[str, Any]] = []
        self.counter = 0
        self.master_addr = ""
        self.master: subprocess.Popen[bytes] | None = None
        self.master_record = R.Process("master", -1, time.time())
        self.stopping = False
        self.timers: list[asyncio.TimerHandle] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- processes --------------------------------------------------------------------

    async def start_master(self) -> None:
        self.master, self.master_addr = await asyncio.to_thread(
            launch_master, self.dir / "master.log", self.cfg.heartbeat_timeout, self.env)
        self.master_record.started = time.time()
        await asyncio.sleep(0.5)  # let it settle before the baseline is taken
        sample = proc_sample(self.master.pid) if self.master is not None else None
        self.master_fds = sample[0] if sample else 0

    async def spawn(self, slot: int, extra: bool = False, leave_after: float | None = None) -> Instance:
        self.counter += 1
        name = f"s{slot}i{self.counter}"
        p2p = free_port()
        cmd = [sys.executable, "-m", "stress.chaos_peer", "--master", self.master_addr,
               "--log", str(self.dir / f"{name}.jsonl"), "--stop-file", str(self.stop_file),
               "--p2p-port", str(p2p), "--connections", str(self.cfg.connections),
               "--max-world", str(self.cfg.max_world)]
        proxy = None
        if self.cfg.proxied:
            proxy = FaultProxy("127.0.0.1", p2p, seed=self.cfg.seed * 1000 + self.counter, name=name)
            await proxy.start()
            cmd += ["--advertise-port", str(proxy.port)]
        if self.cfg.quantize:
            cmd += ["--quantize", self.cfg.quantize]
        if leave_after is not None:
            cmd += ["--leave-after", f"{leave_after:.1f}"]
        if self.cfg.corrupt_step is not None and slot == 0:
            cmd += ["--corrupt-step", str(self.cfg.corrupt_step)]
        stderr = (self.dir / f"{name}.err").open("wb")
        popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=self.env, cwd=REPO)
        inst = Instance(R.Process(name, slot, time.time()), popen, stderr, proxy, extra)
        self.instances.append(inst)
        self.slots[slot] = inst
        return inst

    def reap(self) -> None:
        """Notice processes that ended; refill base slots that died on their own."""
        for inst in self.instances:
            if inst.alive and inst.popen.poll() is not None:
                self.ended(inst)
                if not inst.record.killed and not inst.extra and not self.stopping:
                    self.later(0.0, functools.partial(self.spawn, inst.record.slot))

    def ended(self, inst: Instance) -> None:
        inst.record.ended = time.time()
        inst.record.exit_code = inst.popen.returncode
        if inst.stopped_at is not None:
            inst.record.stops.append((inst.stopped_at, inst.record.ended))
            inst.stopped_at = None
        inst.stderr.close()
        if inst.proxy is not None:
            self.task(inst.proxy.close())

    def watch_stalls(self) -> None:
        """A peer whose log went quiet: have it print its stacks (once per quiet spell) for the post-mortem."""
        now = time.time()
        for inst in self.instances:
            if not inst.alive or inst.stopped_at is not None:
                continue
            try:
                quiet = now - (self.dir / f"{inst.record.name}.jsonl").stat().st_mtime
            except OSError:
                continue
            if quiet > self.cfg.limits.stall / 2 and not inst.dumped:
                inst.dumped = True
                inst.popen.send_signal(signal.SIGUSR1)
            elif quiet < 1.0:
                inst.dumped = False

    def sample(self) -> None:
        now = time.time()
        self.watch_stalls()
        for inst in self.instances:
            if inst.alive:
                s = proc_sample(inst.popen.pid)
                if s is not None:
                    inst.record.samples.append((now, *s))
        if self.master is not None and self.master.poll() is None:
            s = proc_sample(self.master.pid)
            if s is not None:
                self.master_record.samples.append((now, *s))

    def task(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` after ``delay`` s (a coroutine it returns runs as a task), unless the run is ending."""
        def fire() -> None:
            if self.stopping:
                return
            result = fn()
            if asyncio.iscoroutine(result):
                self.task(result)

        self.timers.append(asyncio.get_running_loop().call_later(delay, fire))

    # -- faults -----------------------------------------------------------------------

    def apply(self, fault: Fault) -> None:
        now = time.time()
        rec: dict[str, Any] = {"t": now, **asdict(fault), "done": False}
        self.faults.append(rec)
        if fault.kind == "join":
            self.join(fault, rec)
            return
        inst, why = self.target(fault, now)
        if inst is None:
            rec["why_not"] = why
            return
        rec.update(done=True, process=inst.record.name)
        if fault.kind == "kill":
            inst.record.killed = True
            inst.popen.send_signal(signal.SIGKILL)
            self.later(fault.seconds, functools.partial(self.spawn, inst.record.slot))
        elif fault.kind == "stop":
            inst.popen.send_signal(signal.SIGSTOP)
            inst.stopped_at = now
            self.later(fault.seconds, functools.partial(self.resume, inst))
        else:
            self.apply_proxy(fault, inst, rec)

    def target(self, fault: Fault, now: float) -> tuple[Instance | None, str]:
        """The peer a fault acts on: its planned slot, else the next base slot that can take it
        (so every planned fault happens when some peer can take it); or None and why not."""
        why = ""
        for k in range(self.cfg.peers):
            inst = self.slots.get((fault.slot + k) % self.cfg.peers)
            problem = self.unfit(fault.kind, inst, now)
            if problem is None:
                return inst, ""
            why = why or problem
        return None, why

    def unfit(self, kind: str, inst: Instance | None, now: float) -> str | None:
        """Why ``inst`` cannot take a fault of ``kind`` now, or None if it can."""
        if inst is None or not inst.alive:
            return "target not running"
        if kind in ("kill", "stop"):
            if not inst.healthy(now):
                return "target not healthy"
            if sum(1 for i in self.instances if i is not inst and i.healthy(now)) < 2:
                return "would leave fewer than two healthy peers"
            return None
        if inst.proxy is None:
            return "no proxy"
        if kind not in ("latency", "throttle") and not any(
            c.pipes and not c.ended for c in inst.proxy.connections.values()
        ):
            return "no open connection"
        return None

    def join(self, fault: Fault, rec: dict[str, Any]) -> None:
        extras = {i.record.slot for i in self.instances if i.extra and i.alive}
        if len(extras) >= MAX_EXTRA:
            rec["why_not"] = f"{MAX_EXTRA} extra peers already running"
            return
        slot = next(self.cfg.peers + k for k in range(MAX_EXTRA) if self.cfg.peers + k not in extras)
        self.task(self.spawn(slot, extra=True, leave_after=fault.seconds))
        rec.update(done=True, process=f"slot {slot}")

    def apply_proxy(self, fault: Fault, inst: Instance, rec: dict[str, Any]) -> None:
        proxy = inst.proxy
        assert proxy is not None
        if fault.kind == "latency":
            proxy.latency = fault.value
            self.later(fault.seconds, lambda: setattr(proxy, "latency", 0.0))
        elif fault.kind == "throttle":
            proxy.rate = fault.value
            self.later(fault.seconds, lambda: setattr(proxy, "rate", None))
        else:
            actions: dict[str, Callable[[], int | None]] = {
                "reset": proxy.reset, "truncate": proxy.truncate, "garbage": proxy.inject_garbage,
                "partition": functools.partial(proxy.partition, fault.seconds),
            }
            rec["connection"] = actions[fault.kind]()

    def resume(self, inst: Instance) -> None:
        if inst.alive and inst.stopped_at is not None:
            inst.popen.send_signal(signal.SIGCONT)
            inst.record.stops.append((inst.stopped_at, time.time()))
            inst.stopped_at = None

    # -- the run ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        await self.start_master()
        start = time.time()
        for slot in range(cfg.peers):
            await self.spawn(slot)
        schedule = build_schedule(cfg.seed, cfg.duration, cfg.faults, cfg.peers, cfg.interval,
                                  cfg.heartbeat_timeout, cfg.settle)
        pending = list(schedule)
        shown = 0  # whole seconds of the run the progress display has counted
        with progress(int(cfg.duration), "chaos", unit="s") as bar:
            while time.time() - start < cfg.duration:
                self.reap()
                self.sample()
                while pending and time.time() - start >= pending[0].at:
                    self.apply(pending.pop(0))
                elapsed = min(int(time.time() - start), int(cfg.duration))
                if elapsed > shown:
                    bar.update(elapsed - shown, faults=len(self.faults),
                               alive=sum(1 for i in self.instances if i.alive))
                    shown = elapsed
                nxt = pending[0].at if pending else cfg.duration
                await asyncio.sleep(max(0.01, min(SAMPLE_EVERY, nxt - (time.time() - start))))
            bar.update(int(cfg.duration) - shown)
        await self.shutdown()
        return self.analyze(schedule, start)

    async def shutdown(self) -> None:
        """Undo every fault, tell the peers to leave, wait for them, then stop the master."""
        self.stopping = True
        for timer in self.timers:
            timer.cancel()
        for inst in self.instances:
            self.resume(inst)
            if inst.proxy is not None:
                inst.proxy.clear()
        self.stop_file.touch()
        deadline = time.monotonic() + STOP_GRACE
        while any(i.alive for i in self.instances) and time.monotonic() < deadline:
            self.reap()
            self.sample()
            await asyncio.sleep(0.2)
        for inst in self.instances:
            if inst.alive:
                self.extra_violations.append(R.violation(
                    "shutdown", f"{inst.record.name} did not leave within {STOP_GRACE:g} s", process=inst.record.name))
                inst.record.killed = True
                inst.popen.kill()
                inst.popen.wait()
                self.ended(inst)
        await self.check_master_fds()
        assert self.master is not None
        self.master.send_signal(signal.SIGTERM)
        try:
            self.master_record.exit_code = await asyncio.to_thread(self.master.wait, 20)
        except subprocess.TimeoutExpired:
            self.master.kill()
            self.master_record.exit_code = self.master.wait()
            self.extra_violations.append(R.violation("shutdown", "the master did not stop on SIGTERM"))
        self.master_record.ended = time.time()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def check_master_fds(self) -> None:
        """Once every peer left, the master holds no more file descriptors than before the first joined."""
        assert self.master is not None
        if self.master.poll() is not None:
            self.extra_violations.append(R.violation("master", f"the master died (code {self.master.returncode})"))
            return
        deadline, fds = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            s = proc_sample(self.master.pid)
            fds = s[0] if s else None
            if fds is not None and fds <= self.master_fds + 1:
                return
            await asyncio.sleep(0.2)
        self.extra_violations.append(R.violation(
            "master_fds", f"the master holds {fds} file descriptors after every peer left, {self.master_fds} "
                          "before the first joined"))

    def analyze(self, schedule: list[Fault], start: float) -> dict[str, Any]:
        for inst in self.instances:
            path = self.dir / f"{inst.record.name}.jsonl"
            inst.record.events = R.read_events(path) if path.exists() else []
            inst.record.stderr = (self.dir / f"{inst.record.name}.err").read_text(errors="replace")
        master_text = (self.dir / "master.log").read_text(errors="replace")
        self.master_record.stderr = master_text
        procs = [i.record for i in self.instances]
        faults_end = start + self.cfg.duration - self.cfg.settle
        late_steps = sum(1 for p in procs for e in p.events if e.get("ev") == "step" and e["t"] > faults_end)
        extra = list(self.extra_violations)
        if late_steps == 0:
            extra.append(R.violation("recovery", "no step completed after the last fault"))
        report = R.analyze(procs, self.faults, master_text, self.master_record, self.cfg.limits,
                           time.time(), extra)
        report["steps_after_faults"] = late_steps
        report["config"] = {**asdict(self.cfg), "report": str(self.cfg.report), "run_dir": str(self.dir)}
        report["schedule"] = [asdict(f) for f in schedule]
        report["fault_log"] = self.faults
        report["processes"] = [
            {"name": p.name, "slot": p.slot, "life_s": round((p.ended or time.time()) - p.started, 1),
             "exit_code": p.exit_code, "killed": p.killed, "stops": len(p.stops), "events": len(p.events),
             **_series(p)} for p in [*procs, self.master_record]
        ]
        report["master_fds_baseline"] = self.master_fds
        return report


def _series(proc: R.Process, points: int = 40) -> dict[str, list[float]]:
    """A process's fd count and RSS (MiB) over its life, thinned to at most ``points`` samples."""
    step = max(1, len(proc.samples) // points)
    kept = proc.samples[::step]
    return {"fds": [float(s[1]) for s in kept], "rss_mib": [round(s[2] / 1024, 1) for s in kept]}


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    p = argparse.ArgumentParser(prog="python -m stress.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=6, help="peer slots kept running (default 6)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds before the peers are told to leave")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--faults", default="kill,stop,join,proxy",
                   help=f"comma-separated: {','.join(ALL_FAULTS)}, proxy (= all proxy faults), none")
    p.add_argument("--quantize", choices=["uint8"], default=None, help="quantize the all-reduces (8-bit min/max)")
    p.add_argument("--report", type=Path, default=Path("chaos-report.json"), help="JSON report path")
    p.add_argument("--run-dir", type=Path, default=None, help="where logs go (default: a new temporary dir)")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0, help="the master's heartbeat timeout")
    p.add_argument("--interval", type=float, default=3.0, help="mean seconds between faults")
    p.add_argument("--connections", type=int, default=2, help="TCP connections per neighbour link (default 2)")
    p.add_argument("--settle", type=float, default=10.0, help="quiet seconds at the end, no faults")
    p.add_argument("--stall-bound", type=float, default=30.0, help="longest allowed time without progress")
    p.add_argument("--corrupt-step", type=int, default=None, help="test hook: slot 0 corrupts a result from this step")
    a = p.parse_args(argv)
    faults: list[str] = []
    for name in a.faults.split(","):
        name = name.strip()
        if name == "proxy":
            faults += PROXY_FAULTS
        elif name in ALL_FAULTS:
            faults.append(name)
        elif name not in ("", "none"):
            p.error(f"unknown fault {name!r}")
    if a.peers < 2 or (a.quantize and a.peers + MAX_EXTRA > 10):
        p.error("--peers must be at least 2 (and at most 8 with --quantize)")
    return ChaosConfig(peers=a.peers, duration=a.duration, seed=a.seed, faults=tuple(dict.fromkeys(faults)),
                       quantize=a.quantize, report=a.report, run_dir=a.run_dir,
                       heartbeat_timeout=a.heartbeat_timeout, interval=a.interval, settle=a.settle,
                       connections=a.connections,
                       corrupt_step=a.corrupt_step, limits=R.Limits(stall=a.stall_bound))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    run_dir = cfg.run_dir or Path(tempfile.mkdtemp(prefix="pccl-chaos-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    loop = new_event_loop()
    orchestrator = Orchestrator(cfg, run_dir)
    try:
        report = loop.run_until_complete(orchestrator.run())
    finally:
        for inst in orchestrator.instances:  # whatever happened, leave no process behind
            if inst.popen.poll() is None:
                inst.popen.send_signal(signal.SIGCONT)
                inst.popen.kill()
        if orchestrator.master is not None and orchestrator.master.poll() is None:
            orchestrator.master.kill()
        loop.close()
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    cfg.report.write_text(json.dumps(report, indent=1, default=str))
    text = R.summary_text(report)
    cfg.report.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"report: {cfg.report} (logs in {run_dir})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
