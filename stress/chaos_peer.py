"""One peer process of a chaos run: a training-like loop that checks every value it gets.

``python -m stress.chaos_peer --master HOST:PORT --log FILE --stop-file FILE ...`` (started
by :mod:`stress.chaos`). The loop, as a training job would run it:

1. ``are_peers_pending()`` and, if so, ``update_topology()`` (a newcomer skips this on its
   first round: the peers that just let it in go straight on to the sync);
2. ``sync_shared_state()`` of a state that is a closed-form function of its revision
   (:func:`stress.chaos_values.state_content`), checked exactly after every sync. Now and
   then one peer perturbs its copy first, so the master's popular vote must repair it;
3. ``all_reduce_multiple_with_retry()`` of several tensors at once (one tag each), every
   result checked against the reference for the peers it reveals
   (:mod:`stress.chaos_values`);
4. the state advances one revision.

Recoverable errors (``docs/protocol.md`` §5.6.1, §5.7, §5.8) are logged and the loop goes
on: ``TopologyUpdateError`` (on to the sync), ``SharedStateError`` (sync again),
``TooFewPeersError`` (alone: wait for company). A kick (``MasterConnectionError``, or any
error whose message says the master removed us, as after a SIGSTOP longer than the
heartbeat timeout) makes the process rejoin as a new peer. Anything else is logged as
``unexpected``, which the orchestrator counts as a violation.

Every step writes one JSON line to ``--log`` (wall-clock ``t``, event ``ev``, fields), so
the orchestrator can compare peers, measure stalls and count errors afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

import pccl
from stress import chaos_values as V

log = logging.getLogger("stress.chaos_peer")

#: Pause of a peer that is alone in its group, before it looks for company again.
ALONE_PAUSE = 0.2
#: A peer perturbs its shared state before syncs of revisions divisible by this.
PERTURB_EVERY = 5
#: Perturbing needs this many peers, so two perturbed copies can never outvote the right one.
PERTURB_MIN_WORLD = 4


@dataclass
class PeerConfig:
    """Command-line options of a chaos peer."""

    master: str
    log: Path
    stop_file: Path
    p2p_port: int = 0
    advertise_port: int | None = None
    quantize: str | None = None
    connections: int = 2
    leave_after: float | None = None
    corrupt_step: int | None = None
    max_world: int = 8
    connect_timeout: float = 60.0


class EventLog:
    """One JSON object per line, flushed at once (the process may be SIGKILLed any time)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, ev: str, **fields: Any) -> None:
        fields.update(t=time.time(), ev=ev)
        self._file.write(json.dumps(fields, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Rejoin(Exception):
    """The Communicator is dead (kicked, master gone): leave and join again as a new peer."""


def _kicked(exc: pccl.PCCLError) -> bool:
    # After a kick every call raises the kick's error kind with the master's reason
    # (§5.7); "removed by the master" is how the Communicator words it.
    return isinstance(exc, pccl.MasterConnectionError) or "removed by the master" in str(exc)


class ChaosPeer:
    """The loop of one chaos peer process."""

    def __init__(self, cfg: PeerConfig) -> None:
        # Before the log exists: the orchestrator sends SIGUSR1 only to peers whose log went quiet.
        signal.signal(signal.SIGUSR1, self.dump_stacks)
        self.cfg = cfg
        self.events = EventLog(cfg.log)
        self.started = time.monotonic()
        self.quantization = pccl.Quantization(torch.uint8, "min_max") if cfg.quantize == "uint8" else None
        self.specs = V.QUANTIZED_SPECS if self.quantization else V.EXACT_SPECS
        self.corrupted = False
        self.comm: pccl.Communicator | None = None

    def dump_stacks(self, signum: int, frame: Any) -> None:
        """SIGUSR1 (the orchestrator saw no progress for a while): every thread's and task's stack to stderr."""
        print(f"--- stacks of a stalled peer at {time.time():.3f} ---", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        thread = getattr(self.comm, "_thread", None)  # the Communicator's event loop, if one runs
        if thread is not None:
            thread.loop.call_soon_threadsafe(_print_tasks, thread.loop)

    def stopping(self) -> bool:
        if self.cfg.stop_file.exists():
            return True
        return self.cfg.leave_after is not None and time.monotonic() - self.started > self.cfg.leave_after

    def run(self) -> int:
        self.events.write("start", pid=os.getpid())
        while not self.stopping():
            comm = self.comm = pccl.Communicator(
                self.cfg.master, connections=self.cfg.connections, p2p_port=self.cfg.p2p_port,
                advertise_port=self.cfg.advertise_port,
            )
            try:
                comm.connect(timeout=self.cfg.connect_timeout)
            except (pccl.MasterConnectionError, pccl.TopologyUpdateError, TimeoutError) as exc:
                self.events.write("error", op="connect", type=type(exc).__name__, message=str(exc))
                comm.close()
                continue
            self.events.write("joined", peer_id=comm.peer_id, ring=comm.ring)
            try:
                self.member(comm)
            except Rejoin:
                pass
            finally:
                comm.close()
        self.events.write("exit")
        self.events.close()
        return 0

    # -- one membership -------------------------------------------------------------------

    def member(self, comm: pccl.Communicator) -> None:
        """Run the loop until stopping; raises Rejoin when the Communicator is dead."""
        state = {k: torch.from_numpy(v) for k, v in V.state_content(1).items()}
        shared = pccl.SharedState(state, revision=1)
        phase = "sync"  # a newcomer goes straight to the sync its admitters are heading to
        while not self.stopping():
            if phase == "vote":
                phase = self.guard("vote", lambda: self.vote(comm), on_error="sync")
            elif phase == "sync":
                phase = self.guard("sync", lambda: self.sync(comm, shared), on_error="sync")
            else:
                phase = self.guard("reduce", lambda: self.reduce(comm, shared), on_error="vote")
                if phase == "vote":
                    V.advance_state({k: t.numpy() for k, t in state.items()})
                    shared.revision = shared.revision + 1

    def guard(self, op: str, call: Callable[[], str], on_error: str) -> str:
        """Run one phase; the next phase. Logs every error; raises Rejoin for a dead Communicator."""
        try:
            return call()
        except pccl.PCCLError as exc:
            self.events.write("error", op=op, type=type(exc).__name__, message=str(exc))
            if _kicked(exc):
                raise Rejoin() from exc
            if isinstance(exc, pccl.InvalidUsageError):
                return "vote"  # the peers took different paths: start the round over
            if isinstance(exc, pccl.TooFewPeersError):
                time.sleep(ALONE_PAUSE)
                return "vote"
            return on_error
        except Exception as exc:  # anything else is a bug somewhere: record it, then start afresh
            self.events.write("unexpected", op=op, type=type(exc).__name__, message=str(exc),
                              traceback=traceback.format_exc())
            raise Rejoin() from exc

    def vote(self, comm: pccl.Communicator) -> str:
        pending = comm.are_peers_pending()
        if pending:
            comm.update_topology()
        self.events.write("vote", pending=pending, ring=comm.ring)
        return "sync"

    def sync(self, comm: pccl.Communicator, shared: pccl.SharedState) -> str:
        revision = shared.revision
        perturbed = self.maybe_perturb(comm, shared, revision)
        info = comm.sync_shared_state(shared)
        state = {k: shared[k].numpy() for k in ("step", "w", "m")}
        problem = V.state_problem(state, info.revision)
        self.events.write("sync", revision=info.revision, asked=revision, rx=info.rx_bytes,
                          perturbed=perturbed, hash=_state_hash(state), problem=problem)
        return "reduce"

    def maybe_perturb(self, comm: pccl.Communicator, shared: pccl.SharedState, revision: int) -> bool:
        """One peer (the lowest id of a big enough ring) spoils its copy so the vote must repair it."""
        ring = comm.ring
        if revision % PERTURB_EVERY or len(ring) < PERTURB_MIN_WORLD or comm.peer_id != min(ring):
            return False
        m = shared["m"]
        m[revision % m.numel()] += 1
        return True

    def reduce(self, comm: pccl.Communicator, shared: pccl.SharedState) -> str:
        step, me = shared.revision, comm.peer_id
        if comm.world_size < 2:
            time.sleep(ALONE_PAUSE)
            self.events.write("alone", step=step)
            return "vote"
        quantized = self.quantization is not None
        tensors = [torch.from_numpy(V.contribution(s, me, step, i, quantized)) for i, s in enumerate(self.specs)]
        info = comm.all_reduce_multiple_with_retry(tensors, max_in_flight=2, quantization=self.quantization)
        results = [t.numpy() for t in tensors]
        self.maybe_corrupt(results, step)
        checks = []
        for i, (spec, result) in enumerate(zip(self.specs, results)):
            if quantized:
                verdict = V.check_quantized(spec, result, step, i, me, self.cfg.max_world)
            else:
                verdict = V.check_exact(spec, result, step, i, me)
            checks.append({"participants": list(verdict.participants), "digest": V.digest(result),
                           "error": verdict.error, "max_error": verdict.max_error, "bound": verdict.bound})
        self.events.write("step", step=step, peer_id=me, world=info.world_size, checks=checks)
        return "vote"

    def maybe_corrupt(self, results: list[np.ndarray], step: int) -> None:
        """Test hook (``--corrupt-step``): change one element of a result, once, to prove the checks fail."""
        if self.cfg.corrupt_step is None or self.corrupted or step < self.cfg.corrupt_step:
            return
        self.corrupted = True
        results[0][V.SLOTS] += 1
        self.events.write("corrupted", step=step)


def _print_tasks(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        print(f"task {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _state_hash(state: dict[str, np.ndarray]) -> str:
    return "".join(V.digest(state[k])[:16] for k in sorted(state))


def parse_args(argv: list[str] | None = None) -> PeerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--master", required=True, help="HOST:PORT of the master")
    p.add_argument("--log", type=Path, required=True, help="JSONL event log to append to")
    p.add_argument("--stop-file", type=Path, required=True, help="leave the run once this file exists")
    p.add_argument("--p2p-port", type=int, default=0, help="port of this peer's p2p server (0: a free one)")
    p.add_argument("--advertise-port", type=int, default=None, help="port other peers dial (a proxy's)")
    p.add_argument("--quantize", choices=["uint8"], default=None, help="quantize the all-reduces")
    p.add_argument("--connections", type=int, default=2, help="TCP connections per neighbour link")
    p.add_argument("--leave-after", type=float, default=None, help="leave the run after this many seconds")
    p.add_argument("--corrupt-step", type=int, default=None, help="test hook: corrupt one result from this step")
    p.add_argument("--max-world", type=int, default=8, help="largest group the run may form")
    args = p.parse_args(argv)
    return PeerConfig(
        master=args.master, log=args.log, stop_file=args.stop_file, p2p_port=args.p2p_port,
        advertise_port=args.advertise_port, quantize=args.quantize, connections=args.connections,
        leave_after=args.leave_after, corrupt_step=args.corrupt_step, max_world=args.max_world,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # several peers share the machine's cores (DESIGN §5)
    return ChaosPeer(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
