"""Bandwidth-aware ring: all-reduce time before and after ``optimize_topology``.

N worker processes join one pccl run in the order of their ranks, so the first ring
is ``[1, 2, ..., N]``. With root, each worker lives in its own network namespace of
a full mesh (``python -m stress.mesh``: one veth pair per two peers) where the
``--slow`` pairs are rate-limited both ways with ``tc tbf``; the default slow pairs
``1-2,3-4`` lie on the first ring, so its slowest link is a slow one. Every worker
then times ``--iters`` all-reduces of ``--mib`` MiB float32 on the first ring, calls
``optimize_topology()`` (timed) and times the same all-reduces on the new ring.
Each sample is the slowest rank's time after a small all-reduce that lines the
ranks up; every result is checked exactly against the known sum (the inputs are
small integers). The table shows both rings, the measured bandwidth matrix and the
median times. Without root (or with ``--no-mesh``) the workers run on 127.0.0.1
with no slow links, which shows the cost of measuring and the noise of the choice.

``--plot PATH`` draws the bandwidth matrix and the two all-reduce times.

examples:
  pccl bench topology --json topo.json
  pccl bench topology --peers 4 --slow 1-2,3-4 --rate-mbit 50 --mib 64 --iters 2 --plot topo.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pccl.bench.common import (
    add_plot_argument,
    check_plot,
    format_table,
    thread_env,
    threads_per_process,
    write_json,
    worker_or_cli,
    write_plot,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The master's port in the mesh: rank 0's namespace is fresh, so the default port is free.
MASTER_PORT = 48148
_TURN_TIMEOUT = 60.0


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [(int(a), int(b)) for a, _, b in (p.partition("-") for p in text.split(",") if p.strip())]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected pairs like 1-2,3-4, got {text!r}") from exc
    if any(a == b for a, b in pairs):
        raise argparse.ArgumentTypeError(f"a slow pair needs two different peers: {text!r}")
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``pccl bench topology`` options."""
    parser.add_argument("--peers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--slow", type=_pairs, default=[(1, 2), (3, 4)],
                        help="peer pairs (by rank, 1-based) limited both ways (default 1-2,3-4)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="tbf rate of the slow pairs (default 100)")
    parser.add_argument("--mib", type=float, default=64.0, help="all-reduce size in MiB of float32 (default 64)")
    parser.add_argument("--iters", type=int, default=1, help="timed all-reduces per ring (default 1)")
    parser.add_argument("--connections", type=int, default=2, help="TCP connections per link (default 2)")
    parser.add_argument("--no-mesh", action="store_true", help="run on 127.0.0.1 even as root (no slow links)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after SECONDS (default 600)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this file")
    add_plot_argument(parser, "the measured bandwidth matrix and the all-reduce times before and after")


# --- the worker process ------------------------------------------------------------------


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def _join(cfg: dict[str, Any], out: Path) -> tuple[Any, Any]:
    """Connect in rank order (peer id = rank + 1): rank 0 hosts the master and lets the others in."""
    import pccl

    rank, host, port = cfg["rank"], cfg["master_host"], cfg["master_port"]
    master = None
    if rank == 0:
        master = pccl.Master(host=host, port=port)
        master.start()
    comm = pccl.Communicator(f"{host}:{port}", connections=cfg["connections"])
    if rank > 0:
        _wait_file(out / f"turn{rank}", _TURN_TIMEOUT)
        comm.connect(timeout=_TURN_TIMEOUT)
        return comm, None
    comm.connect(timeout=_TURN_TIMEOUT)
    assert master is not None
    for r in range(1, cfg["peers"]):
        (out / f"turn{r}").touch()
        deadline = time.monotonic() + _TURN_TIMEOUT
        while len(master.status()["pending"]) < r:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {r} did not register within {_TURN_TIMEOUT} s")
            time.sleep(0.01)
    comm.update_topology()
    return comm, master


def _timed(comm: Any, x: Any, expected: Any, backup: Any, iters: int) -> list[float]:
    """``iters`` all-reduces of ``x``, each after a one-element all-reduce that lines the ranks up."""
    import torch

    times = []
    for _ in range(iters):
        comm.all_reduce(torch.zeros(1))
        start = time.perf_counter()
        comm.all_reduce(x)
        times.append(time.perf_counter() - start)
        if not torch.equal(x, expected):
            raise AssertionError("the all-reduce result differs from the exact sum")
        x.copy_(backup)
    return times


def _worker(cfg: dict[str, Any]) -> int:
    import torch

    torch.set_num_threads(cfg["threads"])
    out = Path(cfg["dir"])
    comm, master = _join(cfg, out)
    try:
        n, world = int(cfg["mib"] * (1 << 20)) // 4, cfg["peers"]
        base = torch.arange(n, dtype=torch.float32) % 7
        x = base + comm.peer_id
        backup = x.clone()
        # Peer ids are 1..world: the exact sum (small integers, exact in float32).
        expected = base * world + world * (world + 1) // 2
        comm.all_reduce(torch.ones(1 << 18))  # warm-up: buffers and links
        ring_before = comm.ring
        before = _timed(comm, x, expected, backup, cfg["iters"])
        start = time.perf_counter()
        comm.optimize_topology()
        optimize_s = time.perf_counter() - start
        comm.all_reduce(torch.ones(1 << 18))  # warm-up of the new links
        after = _timed(comm, x, expected, backup, cfg["iters"])
        result = {
            "rank": cfg["rank"], "peer_id": comm.peer_id, "ring_before": ring_before, "ring_after": comm.ring,
            "before_s": before, "after_s": after, "optimize_s": optimize_s,
            "bandwidth": [[a, b, bw] for (a, b), bw in sorted(comm.bandwidths.items())],
        }
        comm.all_reduce(torch.zeros(1))  # everyone is done before the master goes
        write_json(out / f"rank{cfg['rank']}.json", result)
    finally:
        comm.close()
        if master is not None:
            master.stop()
    return 0


# --- the driver ----------------------------------------------------------------------------


def _worker_cmd(cfg: dict[str, Any], rank: int, master_host: str) -> list[str]:
    return [sys.executable, "-m", "pccl.bench.topology", "--worker",
            json.dumps(dict(cfg, rank=rank, master_host=master_host))]


def run_benchmark(
    peers: int = 4,
    slow: Sequence[tuple[int, int]] = ((1, 2), (3, 4)),
    rate_mbit: float = 100.0,
    mib: float = 64.0,
    iters: int = 1,
    connections: int = 2,
    mesh: bool = True,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the workers (in a namespace mesh when ``mesh``) and return the combined results.

    Raises:
        RuntimeError: a worker failed or the run timed out (its stderr is on ours).
        ValueError: fewer than 3 peers, or a slow pair outside ``1..peers``.
    """
    if peers < 3:
        raise ValueError("a ring can only be re-ordered with at least 3 peers")
    if any(not (1 <= a <= peers and 1 <= b <= peers) for a, b in slow):
        raise ValueError(f"slow pairs {list(slow)} must name peers 1..{peers}")
    threads = threads_per_process(peers)
    with tempfile.TemporaryDirectory(prefix="pccl-bench-topo-") as tmp:
        cfg = {"peers": peers, "mib": mib, "iters": iters, "connections": connections, "threads": threads,
               "dir": tmp, "master_port": MASTER_PORT}
        env = thread_env(threads)
        if mesh:
            spec = ",".join(f"{a}-{b}" for a, b in slow)
            cmd = [sys.executable, "-m", "stress.mesh", "--peers", str(peers), "--rate-mbit", str(rate_mbit),
                   "--timeout", str(timeout)] + (["--slow", spec] if slow else []) + ["--"]
            for rank in range(peers):
                cmd += _worker_cmd(cfg, rank, "{addr1}") + ([":::"] if rank < peers - 1 else [])
            code = subprocess.run(cmd, env=env, timeout=timeout + 30).returncode
        else:
            cfg["master_port"] = _free_port()
            procs = [subprocess.Popen(_worker_cmd(cfg, r, "127.0.0.1"), env=env) for r in range(peers)]
            code = _wait(procs, timeout)
        if code != 0:
            raise RuntimeError(f"the benchmark workers failed (exit status {code})")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(peers)]
    return _combine(ranks, slow if mesh else [], rate_mbit if mesh else None, mib, peers)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(procs: list[subprocess.Popen[Any]], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    code = 0
    for proc in procs:
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return 124
        code = code or rc
        if rc != 0:
            for p in procs:
                p.kill()
    return code


def _combine(ranks: list[dict[str, Any]], slow: Sequence[tuple[int, int]], rate_mbit: float | None,
             mib: float, peers: int) -> dict[str, Any]:
    """One result: rings and matrix from rank 0 (all ranks agree), the slowest rank's times."""
    first = ranks[0]
    ids = {r["rank"] + 1: r["peer_id"] for r in ranks}
    before = [max(r["before_s"][i] for r in ranks) for i in range(len(first["before_s"]))]
    after = [max(r["after_s"][i] for r in ranks) for i in range(len(first["after_s"]))]
    nbytes = int(mib * (1 << 20)) // 4 * 4
    busbw = 2 * (peers - 1) / peers * nbytes
    return {
        "peers": peers, "mib": mib, "rate_mbit": rate_mbit,
        "slow_pairs": sorted({p for a, b in slow for p in ((ids[a], ids[b]), (ids[b], ids[a]))}),
        "ring_before": first["ring_before"], "ring_after": first["ring_after"],
        "rings_agree": all(r["ring_after"] == first["ring_after"] for r in ranks),
        "bandwidth": first["bandwidth"],
        "before_s": before, "after_s": after,
        "before_busbw_gbs": busbw / statistics.median(before) / 1e9,
        "after_busbw_gbs": busbw / statistics.median(after) / 1e9,
        "speedup": statistics.median(before) / statistics.median(after),
        "optimize_s": max(r["optimize_s"] for r in ranks),
    }


def _report(res: dict[str, Any]) -> None:
    links = f"slow pairs {res['slow_pairs']} at {res['rate_mbit']:g} Mbit/s" if res["rate_mbit"] else "loopback"
    print(f"bandwidth-aware ring: {res['peers']} peers, {links}, all-reduce of {res['mib']:g} MiB float32")
    print(f"ring before: {res['ring_before']}    ring after: {res['ring_after']}    "
          f"optimize_topology: {res['optimize_s']:.2f} s")
    peers = sorted({a for a, _, _ in res["bandwidth"]} | {b for _, b, _ in res["bandwidth"]})
    bw = {(a, b): v for a, b, v in res["bandwidth"]}
    rows = [{"from": a, **{str(b): (bw.get((a, b), 0.0) / 1e6 if a != b else None) for b in peers}} for a in peers]
    print("\nmeasured bandwidth, MB/s (row sends to column)")
    print(format_table(rows, [("from", "from\\to", "d")] + [(str(b), str(b), ".0f") for b in peers]))
    print()
    print(format_table([
        {"ring": "before", "seconds": statistics.median(res["before_s"]), "busbw": res["before_busbw_gbs"]},
        {"ring": "after", "seconds": statistics.median(res["after_s"]), "busbw": res["after_busbw_gbs"]},
    ], [("ring", "ring", "s"), ("seconds", "median s", ".3f"), ("busbw", "busbw GB/s", ".3f")]))
    print(f"\nspeedup (before / after): {res['speedup']:.2f}x")


def topology_figure(res: dict[str, Any]) -> Figure:
    """Left: the measured bandwidth matrix (MB/s, log colour scale); right: the all-reduce time
    on the first and on the optimized ring. ``res`` is :func:`run_benchmark`'s result.

    Raises:
        pccl.plot.PlotUnavailableError: matplotlib is missing.
    """
    from pccl import plot

    plot.require()
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    peers = sorted({a for a, _, _ in res["bandwidth"]} | {b for _, b, _ in res["bandwidth"]})
    bw = {(a, b): v / 1e6 for a, b, v in res["bandwidth"]}
    grid = [[bw.get((a, b), float("nan")) if a != b else float("nan") for b in peers] for a in peers]
    positive = [v for row in grid for v in row if v > 0]
    image = left.imshow(grid, cmap="viridis", norm=LogNorm(min(positive), max(positive)) if positive else None)
    left.set_xticks(range(len(peers)), [str(p) for p in peers])
    left.set_yticks(range(len(peers)), [str(p) for p in peers])
    left.set_xlabel("receiver")
    left.set_ylabel("sender")
    for i, a in enumerate(peers):
        for j, b in enumerate(peers):
            if a != b:
                left.text(j, i, f"{bw.get((a, b), 0.0):.0f}", ha="center", va="center", color="w", fontsize="small")
    fig.colorbar(image, ax=left, label="MB/s")
    left.set_title("measured bandwidth")
    times = [statistics.median(res["before_s"]), statistics.median(res["after_s"])]
    labels = [f"before\n{res['ring_before']}", f"after\n{res['ring_after']}"]
    right.bar([0, 1], times, color=["C3", "C2"])
    for x, t in enumerate(times):
        right.annotate(f"{t:.3f} s", (x, t), textcoords="offset points", xytext=(0, 4), ha="center")
    right.set_xticks([0, 1], labels)
    right.set_ylabel("seconds")
    right.set_title(f"all-reduce of {res['mib']:g} MiB ({res['speedup']:.1f}x faster)")
    right.grid(True, axis="y", alpha=0.3)
    return fig


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write ``args.json_path`` (and ``args.plot``); returns
    the exit status.

    Raises:
        pccl.plot.PlotUnavailableError: ``--plot`` without matplotlib (before anything runs).
        RuntimeError: a worker failed or the run timed out.
    """
    check_plot(args)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pccl.master").setLevel(logging.WARNING)
    mesh = not args.no_mesh and sys.platform.startswith("linux") and os.geteuid() == 0
    if not mesh:
        print("(no namespace mesh: not root or --no-mesh; running on 127.0.0.1 without slow links)")
    res = run_benchmark(args.peers, args.slow, args.rate_mbit, args.mib, args.iters, args.connections,
                        mesh, args.timeout)
    _report(res)
    if args.json_path:
        write_json(args.json_path, res)
    if args.plot:
        write_plot(args.plot, topology_figure(res))
    return 0


if __name__ == "__main__":
    sys.exit(worker_or_cli(sys.argv[1:], "python -m pccl.bench.topology", __doc__, add_arguments, run, _worker))
