"""Striped TCP transfer (``transport.link``) against a plain blocking socket.

One buffer of ``--size-mib`` MiB goes from a sender process to a receiver
process, over a plain socket (``sendall`` / ``recv_into``) and over a striped
link of N connections, for each N of ``--connections``. Both are tuned alike:
the plain sockets get the same ``transport.sockopt.tune`` (congestion control,
buffer sizes) as the links' sockets. Per row, after one warm-up transfer on
each, ``--repeat`` rounds alternate one plain and one link transfer, so that
machine noise hits both alike; the table shows the **median** of each.

A transfer's time runs from the sender's first send call to the moment the
receiver holds the last byte: both processes are on this machine and read the
same CLOCK_MONOTONIC (network namespaces do not change it). The receiver checks
every transfer's content against a deterministic pattern (xxh3-128 of the whole
buffer, outside the timed part) and poisons its buffer before the next one.

With ``--wan RTT_MS`` the two processes run in the two network namespaces of
an emulated long-fat link (``python -m stress.wan``, root only) with
``--buffer-cap`` on the namespaces' TCP buffer autotuning. ``--plot PATH`` draws
throughput against connections, link and plain socket side by side.

examples:
  pccl bench transport --connections 1,2,4,8 --size-mib 1024 --json transport.json
  pccl bench transport --size-mib 8 --repeat 2 --json t.json --plot transport.png
  sudo pccl bench transport --connections 1,8 --wan 50 --buffer-cap 4194304 --json wan.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import xxhash

from pccl.bench.common import (
    add_plot_argument,
    check_plot,
    format_table,
    gbps,
    int_list,
    str_list,
    summarize,
    thread_env,
    write_json,
    write_plot,
)
from pccl.progress import Progress, progress
from transport.link import Link, connect_link
from transport.loop import LoopThread
from transport.server import Server, start_server
from transport.sockopt import congestion_of, tune

log = logging.getLogger(__name__)

# Pattern word i is (i * _MUL + _ADD) mod 2**64: every 8-byte word differs, so a
# misplaced stripe changes the hash. The poison never equals a pattern word in range.
_MUL = np.uint64(0x9E3779B97F4A7C15)
_ADD = np.uint64(0x0123456789ABCDEF)
_POISON = np.uint64(0xA5A5A5A5A5A5A5A5)
_CHUNK_WORDS = 1 << 21  # 16 MiB of pattern generated at a time
WAN_CONTROL_PORT = 48190  # fixed inside the fresh namespaces, where nothing else listens
_CONNECT_DEADLINE = 30.0
_STEP_TIMEOUT = 600.0
TAG = 1


# -- buffers ------------------------------------------------------------------

def fill_pattern(words: np.ndarray) -> None:
    """Write the reference pattern into the uint64 array ``words``."""
    for start in range(0, len(words), _CHUNK_WORDS):
        end = min(start + _CHUNK_WORDS, len(words))
        index = np.arange(start, end, dtype=np.uint64)
        np.multiply(index, _MUL, out=index)
        np.add(index, _ADD, out=words[start:end])


def pattern_digest(nbytes: int) -> bytes:
    """xxh3-128 of the first ``nbytes`` (a multiple of 8) of the pattern, built chunk by chunk."""
    digest = xxhash.xxh3_128()
    chunk = np.empty(_CHUNK_WORDS, dtype=np.uint64)
    for start in range(0, nbytes // 8, _CHUNK_WORDS):
        n = min(_CHUNK_WORDS, nbytes // 8 - start)
        index = np.arange(start, start + n, dtype=np.uint64)
        np.multiply(index, _MUL, out=index)
        np.add(index, _ADD, out=chunk[:n])
        digest.update(chunk[:n].data.cast("B"))
    return digest.digest()


def _mib_bytes(mib: float) -> int:
    return max(8, int(mib * (1 << 20)) // 8 * 8)


# -- control channel: JSON lines on a plain TCP connection ---------------------

class Control:
    """Request/reply messages between the two workers (one JSON object per line)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rwb")

    def send(self, **message: Any) -> None:
        self._file.write(json.dumps(message).encode() + b"\n")
        self._file.flush()

    def recv(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("the other benchmark worker closed the control connection")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"receiver failed: {reply['error']}")
        return reply

    def call(self, **message: Any) -> dict[str, Any]:
        self.send(**message)
        return self.recv()

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def _listen(host: str, port: int, congestion: str | None, *, tuned: bool = True) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if tuned:  # accepted sockets inherit buffer sizes and congestion control, as in transport.server
        tune(srv, congestion)
    srv.bind((host, port))
    srv.listen(16)
    return srv


def _plain_connect(host: str, port: int, congestion: str | None) -> tuple[socket.socket, str | None]:
    """A blocking socket tuned before connect, as ``transport.connection`` does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tune(sock, congestion)
    sock.connect((host, port))
    return sock, congestion_of(sock)


def _connect_retry(host: str, port: int, deadline: float) -> socket.socket:
    """Connect, retrying while the peer is not listening yet (it starts in parallel)."""
    while True:
        try:
            return socket.create_connection((host, port), timeout=5.0)
        except (ConnectionRefusedError, socket.timeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cc(congestion: str) -> str | None:
    return None if congestion == "system" else congestion


def _system_congestion() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


# -- striped links ------------------------------------------------------------

async def _link_server(host: str, congestion: str | None, links: asyncio.Queue[Link]) -> Server:
    """A transport server handing every assembled link to ``links``."""
    return await start_server(host, 0, None, on_link=links.put_nowait, congestion=congestion)


async def _close_link(link: Link) -> None:
    # Links belong to their event loop: close them from it, never from another thread.
    link.close()
    await link.wait_closed()


# -- receiver worker ------------------------------------------------------------

class Receiver:
    """Serves one sender: posts receives, times their completion, checks content."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.lt = LoopThread("bench-recv")
        self.words = np.empty(0, dtype=np.uint64)
        self.digests: dict[int, bytes] = {}
        self.plain_srv: socket.socket | None = None
        self.plain: socket.socket | None = None
        self.server: Server | None = None
        self.link: Link | None = None
        self.links: asyncio.Queue[Link] | None = None

    def handle(self, ctl: Control, msg: dict[str, Any]) -> bool:
        """Act on one request; False when the sender said goodbye."""
        op = msg["op"]
        if op == "bye":
            ctl.send(ok=True)
            return False
        if op == "alloc":
            self.words = np.empty(msg["bytes"] // 8, dtype=np.uint64)
            self.words.fill(_POISON)  # touch every page before anything is timed
            ctl.send(ok=True, congestion_default=_system_congestion())
        elif op == "open_plain":
            self.plain_srv = _listen(self.host, 0, _cc(msg["congestion"]))
            self.plain_srv.settimeout(_CONNECT_DEADLINE)
            ctl.send(port=self.plain_srv.getsockname()[1])
            self.plain, _ = self.plain_srv.accept()
            self.plain.settimeout(None)
        elif op == "open_link":
            ctl.send(port=self._open_link(_cc(msg["congestion"])))
            self.link = self.lt.run(self._next_link(), timeout=_STEP_TIMEOUT)
            ctl.send(ok=True)
        elif op == "transfer":
            self._transfer(ctl, msg["via"], msg["bytes"], msg["seq"])
        elif op == "close":
            self._close()
            ctl.send(ok=True)
        else:
            raise ValueError(f"unknown request {op!r}")
        return True

    def _open_link(self, congestion: str | None) -> int:
        async def start() -> Server:
            self.links = asyncio.Queue()
            return await _link_server(self.host, congestion, self.links)

        self.server = self.lt.run(start(), timeout=_STEP_TIMEOUT)
        return int(self.server.port)

    async def _next_link(self) -> Link:
        assert self.links is not None
        return await self.links.get()

    def _transfer(self, ctl: Control, via: str, nbytes: int, seq: int) -> None:
        view = self.words.data.cast("B")[:nbytes]
        self.words[: nbytes // 8].fill(_POISON)
        if nbytes not in self.digests:
            self.digests[nbytes] = pattern_digest(nbytes)
        if via == "plain":
            assert self.plain is not None
            ctl.send(ready=True)
            received = 0
            while received < nbytes:
                n = self.plain.recv_into(view[received:])
                if n == 0:
                    raise ConnectionError("plain sender closed mid-transfer")
                received += n
            t_done = time.monotonic()
        else:
            link = self.link
            assert link is not None

            async def recv() -> float:
                await link.recv_into(TAG, seq, view)
                return time.monotonic()

            pending = self.lt.submit(recv())
            ctl.send(ready=True)
            t_done = pending.result(_STEP_TIMEOUT)
            received = nbytes
        ok = xxhash.xxh3_128_digest(view) == self.digests[nbytes]
        ctl.send(t_done=t_done, received=received, ok=ok)

    def _close(self) -> None:
        if self.plain is not None:
            self.plain.close()
            self.plain = None
        if self.plain_srv is not None:
            self.plain_srv.close()
            self.plain_srv = None
        if self.link is not None:
            link, self.link = self.link, None
            self.lt.run(_close_link(link), timeout=30)
        if self.server is not None:
            server, self.server = self.server, None

            async def stop(server: Server = server) -> None:
                server.close()
                await server.wait_closed()

            self.lt.run(stop(), timeout=30)

    def stop(self) -> None:
        self._close()
        self.lt.stop()


def receiver_main(host: str, port: int) -> int:
    """Receiver process: listen for the sender's control connection and serve it."""
    srv = _listen(host, port, None, tuned=False)
    if port == 0:  # the orchestrator reads the ephemeral port from here
        print(f"port {srv.getsockname()[1]}", flush=True)
    srv.settimeout(_CONNECT_DEADLINE)
    conn, _ = srv.accept()
    conn.settimeout(None)
    srv.close()
    ctl = Control(conn)
    receiver = Receiver(host)
    try:
        while True:
            msg = ctl.recv()
            try:
                if not receiver.handle(ctl, msg):
                    return 0
            except Exception as exc:
                ctl.send(error=f"{type(exc).__name__}: {exc}")
                raise
    finally:
        receiver.stop()
        ctl.close()


# -- sender worker ----------------------------------------------------------------

class Sender:
    """Drives the run: opens plain sockets and links, sends, collects timings."""

    def __init__(self, ctl: Control, host: str, nbytes: int, warmup_bytes: int, repeat: int,
                 bar: Progress[Any] | None = None) -> None:
        self.ctl, self.host = ctl, host
        self.bar = bar
        self.nbytes, self.warmup_bytes, self.repeat = nbytes, warmup_bytes, repeat
        self.lt = LoopThread("bench-send")
        self.words = np.empty(nbytes // 8, dtype=np.uint64)
        fill_pattern(self.words)
        self.view = self.words.data.cast("B")
        self.seq = 0

    def row(self, congestion: str, connections: int) -> dict[str, Any]:
        """Measure one table row.

        A plain socket and a link of ``connections`` connections are open side
        by side; after one warm-up transfer on each, ``repeat`` rounds of one
        plain and one link transfer alternate, so machine noise hits both alike.
        Returns the samples and the congestion control in effect on each.
        """
        cc = _cc(congestion)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.ctl.call, op="close")
            port = self.ctl.call(op="open_plain", congestion=congestion)["port"]
            sock, plain_cc = _plain_connect(self.host, port, cc)
            cleanup.callback(sock.close)
            port = self.ctl.call(op="open_link", congestion=congestion)["port"]
            link = self.lt.run(connect_link(self.host, port, connections=connections, peer_id="bench-sender",
                                            congestion=cc), timeout=_STEP_TIMEOUT)
            cleanup.callback(lambda: self.lt.run(_close_link(link), timeout=30))
            self.ctl.recv()  # the receiver has the assembled link too

            def send_plain(view: memoryview) -> float:
                t0 = time.monotonic()
                sock.sendall(view)
                return t0

            async def send_link(view: memoryview) -> float:
                t0 = time.monotonic()
                await link.send(TAG, self.seq, view)
                return t0

            send = {"plain": send_plain, "link": lambda v: self.lt.run(send_link(v), timeout=_STEP_TIMEOUT)}
            samples: dict[str, list[float]] = {"plain": [], "link": []}
            for i in range(self.repeat + 1):
                for via in ("plain", "link"):
                    seconds = self._one(via, send[via], self.nbytes if i else self.warmup_bytes)
                    if i:  # round 0 is the warm-up
                        samples[via].append(seconds)
                    if self.bar is not None:
                        self.bar.update(1, cc=congestion, conns=connections)
        return {"samples": samples["link"], "baseline_samples": samples["plain"],
                "link_congestion": ",".join(sorted({str(c.congestion) for c in link.connections})),
                "baseline_congestion": plain_cc}

    def _one(self, via: str, send: Callable[[memoryview], float], nbytes: int) -> float:
        """One transfer; its seconds. Raises RuntimeError unless the receiver got it intact."""
        self.seq += 1
        self.ctl.call(op="transfer", via=via, bytes=nbytes, seq=self.seq)  # waits for "ready"
        t0 = send(self.view[:nbytes])
        done = self.ctl.recv()
        if done["received"] != nbytes or not done["ok"]:
            raise RuntimeError(f"{via} transfer {self.seq}: received {done['received']} of {nbytes} "
                               f"bytes, content {'ok' if done['ok'] else 'WRONG'}")
        return float(done["t_done"]) - t0

    def stop(self) -> None:
        self.lt.stop()


def sender_main(args: argparse.Namespace) -> int:
    """Sender process: run every configuration, write the rows to ``args.result``."""
    deadline = time.monotonic() + _CONNECT_DEADLINE
    ctl = Control(_connect_retry(args.host, args.port, deadline))
    ctl.sock.settimeout(None)
    nbytes = _mib_bytes(args.size_mib)
    warmup = min(nbytes, _mib_bytes(args.warmup_mib))
    info = ctl.call(op="alloc", bytes=nbytes)
    # One step per transfer: plain and link, warm-up included, for every row.
    bar: Progress[Any] = progress(len(args.congestion) * len(args.connections) * (args.repeat + 1) * 2,
                                  "transport", unit="transfer")
    sender = Sender(ctl, args.host, nbytes, warmup, args.repeat, bar)
    rows: list[dict[str, Any]] = []
    try:
        for congestion in args.congestion:
            for n in args.connections:
                row = sender.row(congestion, n)
                seconds = summarize(row["samples"])
                rows.append({"connections": n, "mib": nbytes / (1 << 20), "seconds": seconds,
                             "gbps": gbps(nbytes, seconds),
                             "baseline_gbps": gbps(nbytes, summarize(row["baseline_samples"])),
                             # _one() raised unless every transfer arrived intact
                             "congestion": congestion, "verified": True, **row})
        ctl.call(op="bye")
        bar.close()
    finally:
        bar.close(failed=True)  # no-op after a clean close
        sender.stop()
        ctl.close()
    meta = {"statistic": f"median of {args.repeat}", "warmup_mib": warmup / (1 << 20),
            "sender_congestion_default": _system_congestion(),
            "receiver_congestion_default": info.get("congestion_default")}
    write_json(args.result, {"rows": rows, "meta": meta})
    return 0


# -- orchestration: ``pccl bench transport`` ------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pccl bench transport``."""
    parser.add_argument("--connections", type=int_list, default=[1, 2, 4, 8],
                        help="connections per link to measure, e.g. 1,2,4,8")
    parser.add_argument("--size-mib", type=float, default=1024.0, help="bytes per transfer, in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="timed transfers per row (median shown)")
    parser.add_argument("--warmup-mib", type=float, default=64.0,
                        help="size of the untimed warm-up transfer per row (at most --size-mib)")
    parser.add_argument("--congestion", type=str_list, default=["cubic"],
                        help="congestion control for both the links and the baseline, comma-separated; "
                             "'system' keeps the system default (default: cubic)")
    parser.add_argument("--wan", type=float, default=None, metavar="RTT_MS",
                        help="run over an emulated WAN link with this RTT (root; see stress.wan)")
    parser.add_argument("--buffer-cap", type=int, default=4 << 20,
                        help="with --wan: tcp_rmem/tcp_wmem maximum in the namespaces (bytes)")
    parser.add_argument("--rate-mbit", type=float, default=None, help="with --wan: rate cap per direction")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after SECONDS")
    parser.add_argument("--json", required=True, help="write the rows to this JSON file")
    add_plot_argument(parser, "throughput against connections (striped link and plain socket)")


def _worker_cmd(role: str, args: argparse.Namespace, host: str, port: int, result: str) -> list[str]:
    cmd = [sys.executable, "-m", "pccl.bench.transport", role, "--host", host, "--port", str(port)]
    if role == "send":
        cmd += ["--result", result, "--size-mib", str(args.size_mib), "--repeat", str(args.repeat),
                "--warmup-mib", str(args.warmup_mib),
                "--connections", ",".join(map(str, args.connections)),
                "--congestion", ",".join(args.congestion)]
    return cmd


def _run_loopback(args: argparse.Namespace, result: str, env: dict[str, str]) -> int:
    with subprocess.Popen(_worker_cmd("recv", args, "127.0.0.1", 0, result), env=env,
                          stdout=subprocess.PIPE, text=True) as receiver:
        try:
            assert receiver.stdout is not None
            line = receiver.stdout.readline().split()
            if len(line) != 2 or line[0] != "port":
                raise RuntimeError("the receiver did not start")
            sender = subprocess.run(_worker_cmd("send", args, "127.0.0.1", int(line[1]), result),
                                    env=env, timeout=args.timeout)
            receiver.wait(timeout=60)
        finally:
            if receiver.poll() is None:
                receiver.kill()
    return sender.returncode or (receiver.returncode or 0)


def _run_wan(args: argparse.Namespace, result: str, env: dict[str, str]) -> int:
    # stress.wan is driven through its command line: nothing in pccl imports stress.
    wan = [sys.executable, "-m", "stress.wan", "--rtt", str(args.wan), "--timeout", str(args.timeout),
           "--buffer-cap", str(args.buffer_cap)]
    if args.rate_mbit is not None:
        wan += ["--rate-mbit", str(args.rate_mbit)]
    send = _worker_cmd("send", args, "{addr_b}", WAN_CONTROL_PORT, result)
    recv = _worker_cmd("recv", args, "{addr_b}", WAN_CONTROL_PORT, result)
    return subprocess.run([*wan, "--", *send, ":::", *recv], env=env).returncode


COLUMNS = [("congestion", "cc", "s"), ("connections", "conns", "d"), ("mib", "MiB", ".0f"),
           ("seconds", "seconds", ".3f"), ("gbps", "Gbit/s", ".2f"),
           ("baseline_gbps", "plain Gbit/s", ".2f"), ("vs_plain", "x plain", ".2f"),
           ("vs_one", "x 1 conn", ".2f"), ("link_congestion", "link cc", "s"),
           ("baseline_congestion", "plain cc", "s")]


def _sizes_mib(rows: list[dict[str, Any]]) -> str:
    """The transfer size of ``rows`` in MiB, as text (all rows of one run share it)."""
    return ",".join(sorted({f"{r['mib']:g}" for r in rows}))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``args.json`` (and ``args.plot``); returns the
    exit status.

    Raises:
        pccl.plot.PlotUnavailableError: ``--plot`` without matplotlib (before anything runs).
    """
    check_plot(args)
    env = thread_env(1)
    with tempfile.TemporaryDirectory(prefix="pccl-bench-") as tmp:
        result = os.path.join(tmp, "rows.json")
        code = _run_wan(args, result, env) if args.wan is not None else _run_loopback(args, result, env)
        if code != 0 or not os.path.exists(result):
            print(f"pccl bench transport: failed (exit status {code})", file=sys.stderr)
            return code or 1
        data = json.loads(Path(result).read_text())
    meta = data["meta"]
    meta.update(mode="loopback" if args.wan is None else f"wan rtt={args.wan} ms",
                buffer_cap=None if args.wan is None else args.buffer_cap)
    one = {r["congestion"]: r["gbps"] for r in data["rows"] if r["connections"] == 1}
    table = [dict(r, vs_plain=r["gbps"] / r["baseline_gbps"],
                  vs_one=r["gbps"] / one[r["congestion"]] if r["congestion"] in one else None)
             for r in data["rows"]]
    print(f"transport benchmark, {meta['mode']}, {meta['statistic']} after a "
          f"{meta['warmup_mib']:.0f} MiB warm-up; default congestion control: "
          f"sender {meta['sender_congestion_default']}, receiver {meta['receiver_congestion_default']}")
    print(format_table(table, COLUMNS))
    write_json(args.json, data)
    if args.plot:
        from pccl import plot

        title = f"striped link vs plain socket ({meta['mode']}, {_sizes_mib(table)} MiB per transfer)"
        write_plot(args.plot, plot.transport_figure(table, title=title))
    return 0


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pccl.bench.transport")
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--result")
    parser.add_argument("--size-mib", type=float, default=1024.0)
    parser.add_argument("--warmup-mib", type=float, default=64.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int_list, default=[1])
    parser.add_argument("--congestion", type=str_list, default=["cubic"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.role == "recv":
        return receiver_main(args.host, args.port)
    return sender_main(args)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
