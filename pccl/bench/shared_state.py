"""Shared-state benchmark: content-hash throughput and catch-up time of a fresh peer.

Hash rows compare XXH3-128 (the hash pccl uses) in one thread and as pccl's chunked
tree over several threads, against CRC32 and BLAKE2b, on one large tensor and on the
same bytes split into many 1 MiB tensors (a model's parameter list). Catch-up rows time
a peer with a stale state fetching every entry from an up-to-date peer over loopback.

Each row is ``{"what", "mib", "seconds", "gbps"}`` with the best time of ``--repeats``;
``gbps`` here is GB/s, 10^9 *bytes* per second (the unit of the goals: hashing >= 10
GB/s, catch-up >= 1 GB/s), not the Gbit/s of the all-reduce benchmarks. ``--plot PATH``
draws every row as a bar, with the goals as lines.

examples:
  pccl bench shared-state --size-mib 1024 --json shared-state.json
  pccl bench shared-state --size-mib 256 --threads 1,2,4 --no-catch-up --plot hash.png
"""

from __future__ import annotations

import argparse
import hashlib
import time
import zlib
from typing import Any, Callable, TypedDict

import torch
import xxhash

from pccl.bench.common import add_plot_argument, check_plot, format_table, int_list, write_json, write_plot
from pccl.progress import Progress, progress
from pccl.shared_state import SharedState, byte_view, hash_buffers


class Row(TypedDict):
    """One line of the table / JSON output."""

    what: str
    mib: float
    seconds: float
    gbps: float


_GOAL_HASH_GBPS = 10.0
_GOAL_CATCHUP_GBPS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pccl bench shared-state``."""
    parser.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--threads", type=int_list, default=[1, 2], help="hash thread counts to try (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is kept (default 3)")
    parser.add_argument("--slow-hashes-mib", type=int, default=256, help="bytes for crc32/blake2b rows (default 256)")
    parser.add_argument("--no-catch-up", action="store_true", help="only measure hashing")
    parser.add_argument("--connections", type=int, default=4, help="connections per link for catch-up (default 4)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    add_plot_argument(parser, "every row's GB/s as a bar, with the goals")


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _row(what: str, nbytes: int, seconds: float, bar: Progress[Any] | None = None) -> Row:
    if bar is not None:
        bar.update(1, last=what)
    return {"what": what, "mib": nbytes / (1 << 20), "seconds": seconds, "gbps": nbytes / seconds / 1e9}


def hash_row_count(threads: list[int]) -> int:
    """How many rows :func:`hash_rows` returns."""
    return 3 + 2 * len(threads)


def hash_rows(
    size_mib: int, threads: list[int], repeats: int, slow_mib: int, bar: Progress[Any] | None = None
) -> list[Row]:
    """Measure hash throughput; returns one row per variant (``bar`` advances per row)."""
    nbytes = size_mib << 20
    # Pseudo-random content (cheap to make, not compressible by any trick of the hash).
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, generator=gen)
    view = byte_view(big)
    rows = [_row("xxh3-128, one call", nbytes, _best(lambda: xxhash.xxh3_128_digest(view), repeats), bar)]
    for n in threads:
        secs = _best(lambda: hash_buffers({"w": view}, threads=n), repeats)
        rows.append(_row(f"pccl hash, 1 tensor, {n} thread(s)", nbytes, secs, bar))
    params = {f"p{i}": t for i, t in enumerate(big.split((1 << 20) // 4))}
    state = SharedState(params)
    for n in threads:
        secs = _best(lambda: state.hashes(threads=n), repeats)
        rows.append(_row(f"pccl hash, {len(params)} x 1 MiB tensors, {n} thread(s)", nbytes, secs, bar))
    slow = view[: min(nbytes, slow_mib << 20)]
    rows.append(_row("crc32 (zlib)", len(slow), _best(lambda: zlib.crc32(slow), repeats), bar))
    rows.append(_row("blake2b", len(slow), _best(lambda: hashlib.blake2b(slow).digest(), 1), bar))
    return rows


def _catch_up_peer(master: str, fresh: bool, size_mib: int, connections: int, repeats: int, out: Any) -> None:
    """One benchmark peer (own process): join, then sync ``repeats`` times.

    The up-to-date peer advances its revision each round; the fresh one stays
    behind with zeroed tensors, so every round it fetches the whole state. It
    sends its sync times (seconds) and byte counts back through ``out``.
    """
    from pccl.communicator import Communicator

    torch.set_num_threads(1)  # two peers share this machine's cores
    chunk = 64 << 20
    sizes = [min(chunk, (size_mib << 20) - off) for off in range(0, size_mib << 20, chunk)]
    gen = torch.Generator().manual_seed(1)
    tensors = {
        f"p{i}": torch.zeros(n // 4, dtype=torch.float32) if fresh else torch.randn(n // 4, generator=gen)
        for i, n in enumerate(sizes)
    }
    state = SharedState(tensors, revision=0 if fresh else 1)
    with Communicator(master, connections=connections) as comm:
        comm.connect(timeout=60)
        while comm.global_world_size < 2:
            comm.update_topology()
        times, rx = [], []
        for r in range(repeats):
            if fresh:
                for t in tensors.values():
                    t.zero_()
            else:
                state.revision = r + 1
            start = time.perf_counter()
            info = comm.sync_shared_state(state)
            times.append(time.perf_counter() - start)
            rx.append(info.rx_bytes)
        out.send({"times": times, "rx": rx})


def catch_up_connections(connections: int) -> list[int]:
    """The connection counts :func:`catch_up_rows` measures, one row each."""
    return sorted({1, connections})


def catch_up_rows(size_mib: int, connections: int, repeats: int, bar: Progress[Any] | None = None) -> list[Row]:
    """Time a fresh peer catching up with an up-to-date one over loopback (two processes)."""
    import multiprocessing

    from pccl.master import Master

    ctx = multiprocessing.get_context("spawn")
    rows: list[Row] = []
    for conns in catch_up_connections(connections):
        with Master("127.0.0.1", 0) as master:
            pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
            procs = [
                ctx.Process(target=_catch_up_peer, args=(master.address, fresh, size_mib, conns, repeats, w))
                for fresh, (_, w) in zip((False, True), pipes)
            ]
            for p in procs:
                p.start()
            try:
                results = [r.recv() for r, _ in pipes]
            finally:
                for p in procs:
                    p.join(60)
                    if p.is_alive():
                        p.kill()
        fresh = results[1]
        assert all(rx >= size_mib << 20 for rx in fresh["rx"]), fresh
        rows.append(_row(f"catch-up of a fresh peer, {conns} connection(s)", size_mib << 20, min(fresh["times"]),
                         bar))
    return rows


_COLUMNS = [("what", "what", "<48"), ("mib", "MiB", ".0f"), ("seconds", "seconds", ".4f"), ("gbps", "GB/s", ".2f")]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON (and the plot) if asked. Returns the exit status.

    Raises:
        pccl.plot.PlotUnavailableError: ``--plot`` without matplotlib (before anything runs).
    """
    check_plot(args)
    total = hash_row_count(list(args.threads))
    if not args.no_catch_up:
        total += len(catch_up_connections(args.connections))
    with progress(total, "shared-state", unit="row") as bar:
        rows = hash_rows(args.size_mib, list(args.threads), args.repeats, args.slow_hashes_mib, bar)
        if not args.no_catch_up:
            rows += catch_up_rows(args.size_mib, args.connections, args.repeats, bar)
    print(format_table(rows, _COLUMNS))
    best_hash = max(r["gbps"] for r in rows if r["what"].startswith("pccl hash"))
    print(f"best pccl hash: {best_hash:.1f} GB/s (goal >= {_GOAL_HASH_GBPS:.0f})")
    catchup = [r["gbps"] for r in rows if r["what"].startswith("catch-up")]
    if catchup:
        print(f"catch-up: {max(catchup):.2f} GB/s (goal >= {_GOAL_CATCHUP_GBPS:.0f})")
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        from pccl import plot

        goals = {"hash goal": _GOAL_HASH_GBPS} | ({"catch-up goal": _GOAL_CATCHUP_GBPS} if catchup else {})
        write_plot(args.plot, plot.shared_state_figure(rows, goals, title=f"shared state, {args.size_mib} MiB"))
    return 0
