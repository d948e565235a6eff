"""Emulated long-fat links between two network namespaces (root only).

``WanLink`` creates two fresh network namespaces and joins them with one link:

- ``rtt_ms > 0``: a tun device in each namespace and the userspace delay line
  of :mod:`stress.delayline` between them, holding every packet for RTT/2 each
  way (this kernel has no netem, so the kernel cannot add the delay itself);
- ``rtt_ms == 0``: a plain veth pair, nothing in userspace.

Optionally ``tc tbf`` caps the rate of each direction (at the sending side's
device) and per-namespace ``tcp_rmem``/``tcp_wmem`` caps bound the socket
buffers, which is what makes one TCP flow window-limited on a long link. Those
caps bound the kernel's buffer autotuning only: a socket that sets
SO_RCVBUF/SO_SNDBUF itself is bounded by ``net.core.rmem_max``/``wmem_max``
instead (doubled by the kernel), which are global, not per namespace.
Traffic only ever uses the two addresses inside the namespaces (198.18.0.0/15
is reserved for benchmark networks, RFC 2544). Names are unique per run, so
several links may exist at once; everything is torn down on exit, also when
the body raised, and SIGTERM/SIGHUP are turned into ``SystemExit`` while a
link is up so that the teardown runs then too.

    with WanLink(rtt_ms=50, buffer_cap_bytes=4 << 20) as wan:
        server = wan.popen_b(["python3", "-m", "http.server", "8000"])
        wan.run_a(["curl", "--retry-connrefused", "--retry", "5", f"http://{wan.addr_b}:8000/"])

Command line: ``python -m stress.wan --rtt 50 -- CMD_A ... ::: CMD_B ...`` runs
CMD_B in namespace B and CMD_A in namespace A; ``{addr_a}``, ``{addr_b}``,
``{ns_a}``, ``{ns_b}`` in the commands are replaced, and the environment
variables ``WAN_ADDR_A``/``WAN_ADDR_B`` are set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from stress import netns
from stress.netns import NetnsError as WanError  # the name this module's callers know
from stress.netns import list_namespaces  # noqa: F401 (re-exported)
from stress.netns import run_setup as _run

log = logging.getLogger(__name__)

ADDR_A = "198.18.0.1"
ADDR_B = "198.18.0.2"
IFNAME = "wan0"
# tun and veth both accept ~64 KiB frames; big packets keep the delay line's
# per-packet Python cost low enough for several Gbit/s.
MTU = 65000
_NAME_RE = re.compile(r"^pwan(\d+)-[0-9a-f]+-[ab]$")
_READY_TIMEOUT = 15.0
_STOP_GRACE = 3.0
_REPO_ROOT = Path(__file__).resolve().parent.parent


def unavailable_reason() -> str | None:
    """Why ``WanLink`` cannot work on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "WAN emulation needs Linux network namespaces"
    if os.geteuid() != 0:
        return "WAN emulation needs root (it creates network namespaces and tun devices); run as root"
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            return f"WAN emulation needs the `{tool}` command (iproute2 / procps)"
    if not os.path.exists("/dev/net/tun"):
        return "WAN emulation needs /dev/net/tun (tun driver) for the delay line"
    return None


def cleanup_stale() -> list[str]:
    """Delete namespaces left by WAN links whose owning process died (SIGKILL).

    Returns the names deleted. Links of live processes are left alone.

    Raises:
        WanError: ``ip`` failed.
    """
    return netns.cleanup_stale(_NAME_RE)


class WanLink(netns.Namespaces):
    """Two fresh network namespaces joined by an emulated WAN link.

    Args:
        rtt_ms: round-trip time added by the delay line (RTT/2 each way); 0 joins
            the namespaces with a veth pair and no userspace hop.
        rate_mbit: ``tc tbf`` rate cap per direction in Mbit/s, or None for none.
        buffer_cap_bytes: upper bound of ``net.ipv4.tcp_rmem``/``tcp_wmem`` in both
            namespaces, or None to keep the kernel's defaults.
        congestion: default TCP congestion control of both namespaces, or None.
        queue_limit_bytes: bytes the delay line holds per direction before it
            drops packets (a router buffer; default large enough not to matter).

    Attributes ``ns_a``, ``ns_b``, ``addr_a``, ``addr_b`` name the two ends;
    ``forwarder_pid`` is the delay line's process while it runs;
    ``forwarder_stats`` holds its counters after ``close()``.

    Raises:
        ValueError: a negative RTT, a rate <= 0 or a buffer cap below 4096.
    """

    what = "WAN link"
    stale = _NAME_RE

    def __init__(self, rtt_ms: float = 50.0, rate_mbit: float | None = None,
                 buffer_cap_bytes: int | None = None, congestion: str | None = None,
                 queue_limit_bytes: int = 256 << 20) -> None:
        if rtt_ms < 0 or (rate_mbit is not None and rate_mbit <= 0):
            raise ValueError("rtt_ms must be >= 0 and rate_mbit > 0")
        if buffer_cap_bytes is not None and buffer_cap_bytes < 4096:
            raise ValueError("buffer_cap_bytes must be at least 4096")
        self.rtt_ms = rtt_ms
        self.rate_mbit = rate_mbit
        self.buffer_cap_bytes = buffer_cap_bytes
        self.congestion = congestion
        self.queue_limit_bytes = queue_limit_bytes
        super().__init__()
        token = f"pwan{os.getpid()}-{secrets.token_hex(3)}"
        self.ns_a = f"{token}-a"
        self.ns_b = f"{token}-b"
        self.addr_a = ADDR_A
        self.addr_b = ADDR_B
        self.ifname = IFNAME
        self.forwarder_stats: dict[str, int] | None = None
        self._forwarder: subprocess.Popen[str] | None = None

    # -- building and teardown (netns.Namespaces hooks) --------------------

    def unavailable(self) -> str | None:
        return unavailable_reason()

    def _build(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            self._add_namespace(ns)
        if self.rtt_ms > 0:
            self._start_forwarder()
        else:
            _run(["ip", "link", "add", IFNAME, "netns", self.ns_a, "type", "veth",
                  "peer", "name", IFNAME, "netns", self.ns_b])
        self._configure(self.ns_a, self.addr_a, self.addr_b)
        self._configure(self.ns_b, self.addr_b, self.addr_a)

    def _teardown_extra(self, problems: list[str]) -> None:
        self._stop_forwarder(problems)

    @property
    def forwarder_pid(self) -> int | None:
        """Process id of the delay line, or None (veth link, or closed)."""
        return None if self._forwarder is None else self._forwarder.pid

    @property
    def tbf_burst_bytes(self) -> int | None:
        """Token-bucket size of the rate cap: bytes that may pass at line rate after idle."""
        return None if self.rate_mbit is None else self._tbf_sizes()[0]

    # -- set-up steps -----------------------------------------------------

    def _start_forwarder(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p))
        self._forwarder = subprocess.Popen(
            [sys.executable, "-m", "stress.delayline", "--netns-a", self.ns_a, "--netns-b", self.ns_b,
             "--ifname", IFNAME, "--delay-ms", str(self.rtt_ms / 2.0),
             "--limit-bytes", str(self.queue_limit_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self._forwarder.stdout is not None
        ready, _, _ = select.select([self._forwarder.stdout], [], [], _READY_TIMEOUT)
        line = self._forwarder.stdout.readline().strip() if ready else ""
        if line != "ready":
            self._forwarder.kill()
            _, err = self._forwarder.communicate()
            raise WanError(f"delay line did not start: {err.strip() or 'no ready signal'}")

    def _configure(self, ns: str, local: str, peer: str) -> None:
        _run(["ip", "-n", ns, "link", "set", IFNAME, "mtu", str(MTU), "up"])
        _run(["ip", "-n", ns, "addr", "add", local, "peer", f"{peer}/32", "dev", IFNAME])
        if self.rate_mbit is not None:
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", IFNAME, "root", "tbf", *self._tbf_args()])
        settings = []
        if self.buffer_cap_bytes is not None:
            cap = self.buffer_cap_bytes
            settings += [f"net.ipv4.tcp_rmem=4096 {min(131072, cap)} {cap}",
                         f"net.ipv4.tcp_wmem=4096 {min(16384, cap)} {cap}"]
        if self.congestion is not None:
            settings.append(f"net.ipv4.tcp_congestion_control={self.congestion}")
        if settings:
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])

    def _tbf_sizes(self) -> tuple[int, int]:
        assert self.rate_mbit is not None
        rate_bytes = self.rate_mbit * 1e6 / 8
        # The bucket must hold one whole packet or big ones never pass; a few ms
        # of tokens keeps high rates from being bound by the qdisc's timer.
        burst = int(max(MTU + 1500, rate_bytes * 0.004))
        # Queue: about one round trip's worth of bytes at the rate, like a
        # router buffer sized to the bandwidth-delay product.
        limit = int(max(4 * MTU, rate_bytes * max(self.rtt_ms, 20.0) / 1000.0)) + burst
        return burst, limit

    def _tbf_args(self) -> list[str]:
        burst, limit = self._tbf_sizes()
        return ["rate", f"{self.rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]

    # -- running commands -------------------------------------------------

    def command_a(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside namespace A."""
        return self._in(self.ns_a, cmd)

    def command_b(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside namespace B."""
        return self._in(self.ns_b, cmd)

    def popen_a(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in namespace A (``subprocess.Popen`` keywords apply).

        It is stopped at teardown if still running. Raises: WanError if the link is not open.
        """
        return self._popen(self.command_a(cmd), kwargs)

    def popen_b(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in namespace B; see :meth:`popen_a`."""
        return self._popen(self.command_b(cmd), kwargs)

    def run_a(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` in namespace A to completion (``subprocess.run`` keywords apply).

        Raises: WanError if the link is not open; whatever ``subprocess.run`` raises.
        """
        return self._run_cmd(self.command_a(cmd), kwargs)

    def run_b(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` in namespace B; see :meth:`run_a`."""
        return self._run_cmd(self.command_b(cmd), kwargs)

    # -- teardown helpers -------------------------------------------------

    def _stop_forwarder(self, problems: list[str]) -> None:
        fwd, self._forwarder = self._forwarder, None
        if fwd is None:
            return
        try:
            # Closing its stdin is the stop request; it prints its counters.
            out, err = fwd.communicate(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            fwd.kill()
            out, err = fwd.communicate()
            problems.append("delay line did not stop when asked; killed")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if lines:
            self.forwarder_stats = json.loads(lines[-1])
            log.info("delay line counters: %s", self.forwarder_stats)
        if fwd.returncode not in (0, -signal.SIGKILL) and err.strip():
            problems.append(f"delay line exited with {fwd.returncode}: {err.strip()}")

# -- command line ---------------------------------------------------------

def _split_commands(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``OPTIONS -- CMD_A ... ::: CMD_B ...`` -> (options, CMD_A, CMD_B)."""
    if "--" not in argv:
        return argv, [], []
    i = argv.index("--")
    options, rest = argv[:i], argv[i + 1:]
    if ":::" in rest:
        j = rest.index(":::")
        return options, rest[:j], rest[j + 1:]
    return options, rest, []


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stress.wan [options] -- CMD_A ... [::: CMD_B ...]``; returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stress.wan", description=__doc__,
                                     usage="%(prog)s [options] -- CMD_A ... [::: CMD_B ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time in ms (0: veth)")
    parser.add_argument("--rate-mbit", type=float, default=None, help="tbf rate cap per direction")
    parser.add_argument("--buffer-cap", type=int, default=None, help="tcp_rmem/tcp_wmem max, bytes")
    parser.add_argument("--congestion", default=None, help="namespaces' default congestion control")
    parser.add_argument("--timeout", type=float, default=None, help="kill the commands after SECONDS")
    options, cmd_a, cmd_b = _split_commands(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(options)
    if not cmd_a and not cmd_b:
        parser.error("give a command: -- CMD_A ... [::: CMD_B ...]")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with WanLink(args.rtt, args.rate_mbit, args.buffer_cap, args.congestion) as wan:
            names = {"addr_a": wan.addr_a, "addr_b": wan.addr_b, "ns_a": wan.ns_a, "ns_b": wan.ns_b}
            env = dict(os.environ, WAN_ADDR_A=wan.addr_a, WAN_ADDR_B=wan.addr_b)

            # B first: it is usually the side that listens.
            procs = [wan.popen_b(netns.fill_placeholders(cmd_b, names), env=env)] if cmd_b else []
            if cmd_a:
                procs.append(wan.popen_a(netns.fill_placeholders(cmd_a, names), env=env))
            return netns.wait_all(procs, args.timeout)
    except WanError as exc:
        print(f"stress.wan: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
