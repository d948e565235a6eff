"""All-reduce bus bandwidth: pccl's ring against torch.distributed Gloo, in one run.

For each world size W, W worker processes join both a Gloo process group and a pccl
run (one master per congestion setting). For every size the workers time Gloo and
pccl alternately, one operation each in turn, on the same tensor, so both see the
same machine load. Every worker gets cores/W torch threads, for both (DESIGN §5).
Each sample is the slowest rank's time from a common barrier; the table shows the
median. busbw = bytes / seconds * 2(W-1)/W, as nccl-tests define it. ``tx_bytes``
is what rank 0 sent (pccl: counted by the executor; Gloo: the ring's 2(W-1)/W share).

With ``--quantize`` each pccl setting is also timed with that quantization, and the
ratio table compares it with the unquantized run. With ``--wan RTT_MS`` the two
workers (world 2 only) run in the two network namespaces of an emulated link
(``python -m stress.wan``, root only; ``--rate-mbit`` caps each direction); rank 0
hosts the masters and the Gloo store there. ``--plot PATH`` draws busbw against size,
one panel per world size, one line per implementation. With ``--encrypt`` every pccl
setting is also timed with ``encrypt=True`` (AES-GCM, a fresh random secret in a 0600
file) in the same run; rows carry ``"encrypt"``, an extra table shows encrypted time /
plain time, and a single-thread AES-GCM figure on 1 MiB messages is printed.

examples:
  pccl bench allreduce --world 2,4 --sizes-mib 1,16,256 --compare-gloo --json ar.json --plot ar.png
  pccl bench allreduce --world 2 --sizes-mib 16 --out --congestion cubic,system --compare-gloo
  pccl bench allreduce --world 2,3 --sizes-mib 1,16,64 --encrypt --json enc.json
  sudo pccl bench allreduce --world 2 --sizes-mib 64 --quantize uint8 --wan 20 --rate-mbit 1000 --json q.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from pccl.bench.common import (
    add_plot_argument,
    check_plot,
    format_table,
    int_list,
    str_list,
    summarize,
    thread_env,
    threads_per_process,
    write_json,
    worker_or_cli,
    write_plot,
)
from pccl.progress import progress

COLUMNS = [
    ("impl", "impl", "s"),
    ("world", "world", "d"),
    ("mib", "MiB", "g"),
    ("seconds", "seconds", ".4f"),
    ("busbw_gbps", "busbw GB/s", ".3f"),
    ("tx_bytes", "tx bytes", "d"),
]
RATIO_COLUMNS = [
    ("impl", "impl", "s"),
    ("baseline", "vs", "s"),
    ("world", "world", "d"),
    ("mib", "MiB", "g"),
    ("speedup", "speedup", ".2f"),
]
WAN_MASTER_PORT = 48191  # inside the fresh namespaces nothing else listens
WAN_STORE_PORT = 48192
WAN_IFNAME = "wan0"  # stress.wan's device name in both namespaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=int_list, default=[2, 4], help="world sizes (default 2,4)")
    parser.add_argument("--sizes-mib", type=int_list, default=[1, 16, 256], help="tensor sizes in MiB (float32)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per size and impl (median reported)")
    parser.add_argument("--quantize", choices=["uint8", "uint4"], default=None,
                        help="also time pccl with this quantization (min_max)")
    parser.add_argument("--compare-gloo", action="store_true", help="also time torch.distributed Gloo")
    parser.add_argument("--out", action="store_true",
                        help="also time pccl with out= (no backup copy of the input; shows its cost)")
    parser.add_argument("--congestion", type=str_list, default=["cubic"],
                        help="pccl TCP congestion control(s) to time, e.g. cubic,system")
    parser.add_argument("--connections", type=int_list, default=[4],
                        help="TCP connections per pccl link; several (e.g. 1,4) are timed side by side")
    parser.add_argument("--wan", type=float, default=None, metavar="RTT_MS",
                        help="run world 2 over an emulated WAN link with this RTT (root; see stress.wan)")
    parser.add_argument("--rate-mbit", type=float, default=None, help="with --wan: rate cap per direction")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds per world")
    parser.add_argument("--json", dest="json_path", default=None, help="write rows to this JSON file")
    parser.add_argument("--backend-api", action="store_true",
                        help="also time dist.all_reduce through the torch.distributed backend 'pccl'")
    parser.add_argument("--encrypt", action="store_true",
                        help="also time every pccl setting with encrypt=True (AES-GCM) and report the overhead")
    add_plot_argument(parser, "bus bandwidth against size per world size")


# --- the worker process -------------------------------------------------------------------


def _join(comm: Any, world: int) -> None:
    """Vote newcomers in until the run has ``world`` peers (every accepted peer runs this loop,
    so they call the same votes in the same order)."""
    while comm.global_world_size < world:
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(0.01)


Impl = tuple[str, Any, Any, bool]  # name, Communicator (None: Gloo), quantization, out of place


def _impls(cfg: dict[str, Any], comms: dict[str, Any]) -> list[Impl]:
    """Everything to time, in the order it is timed."""
    import torch

    import pccl

    quant = None
    if cfg["quantize"] is not None:
        quant = pccl.Quantization(getattr(torch, cfg["quantize"]))
    impls: list[Impl] = [("gloo", None, None, False)] if cfg["gloo"] else []
    for name, comm in comms.items():
        impls.append((name, comm, None, False))
        if cfg["out"]:
            impls.append((f"{name}-out", comm, None, True))
        if quant is not None:
            impls.append((f"{name}-{cfg['quantize']}", comm, quant, False))
    return impls


def _settings(cfg: dict[str, Any]) -> list[tuple[str, str, int, bool]]:
    """(impl name, congestion control, connections, encrypt) of every pccl run to time."""
    many = len(cfg["connections"]) > 1
    plain = [(f"pccl-{cc}" + (f"-x{n}" if many else ""), cc, n) for cc in cfg["congestion"] for n in cfg["connections"]]
    out = []
    for name, cc, n in plain:
        out.append((name, cc, n, False))
        if cfg.get("encrypt"):
            out.append((f"{name}-enc", cc, n, True))
    return out


def _measure(cfg: dict[str, Any], rank: int, impls: list[Impl]) -> list[dict[str, Any]]:
    """Time every impl on every size, alternating one operation each; rows (rank 0's view)."""
    import torch
    import torch.distributed as dist

    world, rows = cfg["world"], []
    # Rank 0 alone shows progress: one step per timed operation, warm-up included.
    bar = progress(len(cfg["sizes"]) * (cfg["iters"] + 1) * len(impls), f"all-reduce world {world}",
                   unit="op", mode="auto" if rank == 0 else "off")
    for mib in cfg["sizes"]:
        numel = (mib << 20) // 4
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        out = torch.empty_like(tensor) if cfg["out"] else None
        samples: dict[str, list[float]] = {name: [] for name, *_ in impls}
        tx: dict[str, int] = {}
        for it in range(cfg["iters"] + 1):  # the first round warms buffers and connections up
            for name, comm, quant, out_of_place in impls:
                dist.barrier()
                start = time.perf_counter()
                if comm is None:
                    dist.all_reduce(tensor)
                elif out_of_place:
                    tx[name] = comm.all_reduce(tensor, out=out, quantization=quant).tx_bytes
                else:
                    tx[name] = comm.all_reduce(tensor, quantization=quant).tx_bytes
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if it:
                    samples[name].append(float(elapsed))
                if not out_of_place:
                    tensor.div_(world)  # keep the values bounded across in-place iterations
                bar.update(1, size=f"{mib} MiB")
        nbytes = numel * 4
        for name, comm, *_ in impls:
            seconds = summarize(samples[name])
            rows.append({
                "impl": name, "world": world, "mib": mib, "seconds": seconds,
                "busbw_gbps": nbytes / seconds * 2 * (world - 1) / world / 1e9,
                "tx_bytes": tx[name] if comm is not None else 2 * (world - 1) * nbytes // world,
            })
    bar.close()
    return rows


def _worker(cfg: dict[str, Any]) -> int:
    import torch
    import torch.distributed as dist

    import pccl

    rank, world = cfg["rank"], cfg["world"]
    torch.set_num_threads(cfg["threads"])
    masters = []
    if cfg["host_masters"]:  # WAN mode: rank 0 hosts the masters inside its namespace
        for (*_, enc), port in zip(_settings(cfg), cfg["master_ports"]):
            masters.append(pccl.Master(host=cfg["master_host"], port=port, **_secured(cfg, enc)))
            masters[-1].start()
    comms: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", init_method=cfg["store"], rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg["timeout"]))
        # Gloo's store is up once init returns everywhere: by then rank 0 has started the masters.
        for (name, cc, conns, enc), port in zip(_settings(cfg), cfg["master_ports"]):
            dist.barrier()  # rank 0 joins first and alone, then the others are voted in
            comm = pccl.Communicator(f"{cfg['master_host']}:{port}", connections=conns,
                                     congestion=None if cc == "system" else cc, **_secured(cfg, enc))
            comms[name] = comm
            if rank == 0:
                comm.connect(timeout=60)
                dist.barrier()
            else:
                dist.barrier()
                comm.connect(timeout=60)
            _join(comm, world)
        if cfg.get("backend_api"):
            comms["pccl-backend-api"] = _BackendApi(world)
        rows = _measure(cfg, rank, _impls(cfg, comms))
        if cfg.get("encrypt"):  # rows say whether their run was encrypted (only with --encrypt)
            encrypted = [name for name, *_, enc in _settings(cfg) if enc]
            for row in rows:
                row["encrypt"] = any(row["impl"] == n or row["impl"].startswith(n + "-") for n in encrypted)
        if rank == 0:
            write_json(cfg["result"], rows)
    finally:
        for comm in comms.values():
            comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        for master in masters:
            master.stop()
    return 0


# --- the parent ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(args: argparse.Namespace, world: int, result: str) -> dict[str, Any]:
    return {
        "world": world, "threads": threads_per_process(world), "sizes": args.sizes_mib,
        "iters": args.iters, "quantize": args.quantize, "gloo": args.compare_gloo, "out": args.out,
        "congestion": args.congestion, "connections": args.connections, "result": result,
        "timeout": args.timeout, "host_masters": False,
        "backend_api": getattr(args, "backend_api", False),
        "encrypt": getattr(args, "encrypt", False), "secret_file": os.path.join(os.path.dirname(result), "secret"),
    }


def _worker_cmd(cfg: dict[str, Any], rank: int) -> list[str]:
    return [sys.executable, "-m", "pccl.bench.allreduce", "--worker", json.dumps(dict(cfg, rank=rank))]


def _wait(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError(f"benchmark workers failed with exit codes {failed}")


def _run_loopback(args: argparse.Namespace, world: int, result: str) -> None:
    import pccl

    cfg = _config(args, world, result)
    masters = [pccl.Master(host="127.0.0.1", port=0, **_secured(cfg, enc)) for *_, enc in _settings(cfg)]
    for master in masters:
        master.start()
    try:
        cfg.update(master_host="127.0.0.1", master_ports=[m.port for m in masters],
                   store=f"tcp://127.0.0.1:{_free_port()}")
        # Thread limits reach the children before torch sizes its pools.
        env = dict(thread_env(cfg["threads"]), GLOO_SOCKET_IFNAME="lo")
        procs = [subprocess.Popen(_worker_cmd(cfg, r), env=env) for r in range(world)]
        _wait(procs, args.timeout)
    finally:
        for master in masters:
            master.stop()


def _run_wan(args: argparse.Namespace, world: int, result: str) -> None:
    if world != 2:
        raise SystemExit("--wan joins exactly two namespaces: use --world 2")
    cfg = _config(args, world, result)
    ports = [WAN_MASTER_PORT + 10 * i for i in range(len(_settings(cfg)))]
    cfg.update(master_host="{addr_b}", master_ports=ports, store=f"tcp://{{addr_b}}:{WAN_STORE_PORT}")
    wan = [sys.executable, "-m", "stress.wan", "--rtt", str(args.wan), "--timeout", str(args.timeout)]
    if args.rate_mbit is not None:
        wan += ["--rate-mbit", str(args.rate_mbit)]
    env = dict(thread_env(cfg["threads"]), GLOO_SOCKET_IFNAME=WAN_IFNAME)
    # stress.wan is driven through its command line (nothing in pccl imports stress);
    # rank 0 in namespace B hosts the masters, rank 1 in namespace A dials it.
    rank0 = _worker_cmd(dict(cfg, host_masters=True), 0)
    rank1 = _worker_cmd(cfg, 1)
    code = subprocess.run([*wan, "--", *rank1, ":::", *rank0], env=env).returncode
    if code != 0:
        raise RuntimeError(f"the WAN run failed with exit status {code}")


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speedups (baseline time / impl time): every pccl impl vs Gloo, and quantized vs plain pccl."""
    by_key = {(r["impl"], r["world"], r["mib"]): r["seconds"] for r in rows}
    out = []
    for r in rows:
        if r["impl"] == "gloo":
            continue
        plain, _, suffix = r["impl"].rpartition("-")
        baselines = ["gloo"] + ([plain] if suffix in ("uint8", "uint4", "out") else [])
        for base in baselines:
            ref = by_key.get((base, r["world"], r["mib"]))
            if ref is not None:
                out.append({"impl": r["impl"], "baseline": base, "world": r["world"], "mib": r["mib"],
                            "speedup": ref / r["seconds"]})
    return out


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write ``args.json_path`` (and ``args.plot``);
    returns the exit status.

    Raises:
        pccl.plot.PlotUnavailableError: ``--plot`` without matplotlib (before anything runs).
        RuntimeError: a worker process failed.
    """
    check_plot(args)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # One line per collective would cost the masters (in this process) time on every op.
        logging.getLogger("pccl.master").setLevel(logging.WARNING)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pccl-bench-ar-") as tmp:
        if getattr(args, "encrypt", False):
            _write_secret(os.path.join(tmp, "secret"))
        for world in args.world:
            result = os.path.join(tmp, f"world{world}.json")
            if args.wan is not None:
                _run_wan(args, world, result)
            else:
                _run_loopback(args, world, result)
            rows += json.loads(Path(result).read_text())
    mode = "loopback" if args.wan is None else f"wan rtt={args.wan} ms rate={args.rate_mbit} Mbit/s"
    print(f"all-reduce benchmark ({mode}), float32, median of {args.iters} after a warm-up, "
          f"{os.cpu_count()} cores, threads per worker = cores / world")
    print(format_table(rows, COLUMNS))
    ratios = ratio_rows(rows)
    if ratios:
        print()
        print(format_table(ratios, RATIO_COLUMNS))
    extra = _report_encryption(rows) if getattr(args, "encrypt", False) else {}
    if args.json_path:
        write_json(args.json_path, {"meta": {"mode": mode, "iters": args.iters, "cores": os.cpu_count(),
                                             "connections": args.connections},
                                    "rows": rows, "ratios": ratios, **extra})
    if getattr(args, "plot", None):
        from pccl import plot

        write_plot(args.plot, plot.allreduce_figure(rows, title=f"all-reduce bus bandwidth, {mode}"))
    return 0


# --- --encrypt -------------------------------------------------------------------------------

ENCRYPT_COLUMNS = [
    ("impl", "impl", "s"),
    ("world", "world", "d"),
    ("mib", "MiB", "g"),
    ("plain_s", "plain s", ".4f"),
    ("encrypted_s", "encrypted s", ".4f"),
    ("overhead", "encrypted / plain", ".2f"),
]


def _secured(cfg: dict[str, Any], encrypt: bool) -> dict[str, Any]:
    """Master / Communicator options of an encrypted setting (none for a plain one)."""
    return {"secret_file": cfg["secret_file"], "encrypt": True} if encrypt else {}


def _write_secret(path: str) -> None:
    """A fresh random secret, readable by this user only (``docs/security.md``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def encrypt_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Encrypted vs plain time of every encrypted row whose plain twin ran in the same run."""
    plain = {(r["impl"], r["world"], r["mib"]): r["seconds"] for r in rows if not r.get("encrypt")}
    out = []
    for r in rows:
        twin = r["impl"].replace("-enc", "", 1)
        ref = plain.get((twin, r["world"], r["mib"])) if r.get("encrypt") else None
        if ref is not None:
            out.append({"impl": twin, "world": r["world"], "mib": r["mib"], "plain_s": ref,
                        "encrypted_s": r["seconds"], "overhead": r["seconds"] / ref})
    return out


def aes_gcm_gbps(size: int = 1 << 20, rounds: int = 5, reps: int = 50) -> dict[str, float]:
    """Single-thread AES-256-GCM GB/s sealing and opening ``size``-byte messages (best of ``rounds``)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(secrets.token_bytes(32))
    plain, nonce, aad = bytearray(secrets.token_bytes(size)), bytes(12), bytes(48)
    sealed = bytearray(size + 16)
    best = {"encrypt": 0.0, "decrypt": 0.0}
    for _ in range(rounds):
        for name, fn in (("encrypt", lambda: aead.encrypt_into(nonce, plain, aad, sealed)),
                         ("decrypt", lambda: aead.decrypt_into(nonce, sealed, aad, plain))):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = max(best[name], size * reps / (time.perf_counter() - start) / 1e9)
    return {f"aes_gcm_{k}_gbps": v for k, v in best.items()}


def _report_encryption(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the overhead table and the AES-GCM figure; what goes into the JSON file."""
    overhead = encrypt_rows(rows)
    micro = aes_gcm_gbps()
    print()
    print(format_table(overhead, ENCRYPT_COLUMNS))
    print(f"AES-256-GCM on 1 MiB messages, one thread: encrypt {micro['aes_gcm_encrypt_gbps']:.2f} GB/s, "
          f"decrypt {micro['aes_gcm_decrypt_gbps']:.2f} GB/s")
    return {"encrypt_overhead": overhead, "aes_gcm": micro}


class _BackendApi:
    """Times ``dist.all_reduce`` on a process group of the backend "pccl" (``--backend-api``)."""

    def __init__(self, world: int) -> None:
        import torch.distributed as dist

        import pccl.distributed  # noqa: F401  (registers the backend)

        self.group = dist.new_group(backend="pccl")
        self.world = world

    def all_reduce(self, tensor: Any, out: Any = None, quantization: Any = None) -> Any:
        import torch.distributed as dist

        from collectives import ReduceInfo

        dist.all_reduce(tensor, group=self.group)
        nbytes = tensor.numel() * tensor.element_size()
        return ReduceInfo(self.world, 2 * (self.world - 1) * nbytes // self.world, 0)

    def close(self) -> None:
        pass  # destroy_process_group() tears the group down


if __name__ == "__main__":
    sys.exit(worker_or_cli(sys.argv[1:], "python -m pccl.bench.allreduce", __doc__, add_arguments, run, _worker))

