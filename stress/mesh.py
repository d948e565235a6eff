"""A full mesh of network namespaces with per-pair rate limits (root only).

``Mesh(peers=4)`` creates one fresh network namespace per peer and a veth pair
between every two of them, so each directed pair of peers has a link of its own:
``tc tbf`` on one device slows exactly one direction of one pair, which is what a
bandwidth-aware ring must discover and route around. Peer ``i`` (1-based) has the
address ``198.18.1.i`` on every one of its links (point-to-point routes, no
bridge): any process in namespace ``i`` reaches peer ``j`` at ``198.18.1.j`` over
the pair's own link. Traffic only ever uses these addresses inside the namespaces
(198.18.0.0/15 is reserved for benchmark networks, RFC 2544).

Names are unique per run; everything is torn down on exit, also when the body
raised, and SIGTERM/SIGHUP become ``SystemExit`` while a mesh is up so that the
teardown runs then too (as :mod:`stress.wan` does).

    with Mesh(peers=4, slow={(1, 2): 50, (2, 1): 50}) as mesh:
        server = mesh.popen(2, ["python3", "-m", "http.server", "8000"])
        mesh.run(1, ["curl", "--retry-connrefused", "--retry", "5", f"http://{mesh.addr(2)}:8000/"])

Command line: ``python -m stress.mesh --peers 3 --slow 1-2,2-3 --rate-mbit 50 --
CMD_1 ... ::: CMD_2 ... ::: CMD_3 ...`` runs CMD_i in namespace i (slow pairs are
limited both ways); ``{addr1}``, ``{addr2}``, ... and ``{ns1}``, ... in the commands
are replaced, and ``MESH_ADDR_1``, ... are set in their environment.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from typing import Any, Mapping, Sequence

from stress import netns
from stress.netns import NetnsError
from stress.netns import run_setup as _run

log = logging.getLogger(__name__)

ADDR_PREFIX = "198.18.1."
MAX_PEERS = 32
# The internet's MTU. A tbf queue of ~20 ms then holds dozens of packets, so a drop is
# repaired by fast retransmit; with 64 KiB packets the queue held five, tail drops ended in
# 200 ms retransmission timeouts, and one such stall cost a 0.5 s bandwidth probe 40 %.
# (veth still moves ~64 KiB GSO packets between unlimited peers.)
MTU = 1500
_NAME_RE = re.compile(r"^pmesh(\d+)-[0-9a-f]+-\d+$")


def unavailable_reason() -> str | None:
    """Why ``Mesh`` cannot work on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the namespace mesh needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the namespace mesh needs root (it creates network namespaces and veth pairs); run as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the namespace mesh needs the `{tool}` command (iproute2)"
    return None


def cleanup_stale() -> list[str]:
    """Delete mesh namespaces whose owning process died (SIGKILL); returns the names deleted.

    Raises:
        NetnsError: ``ip`` failed.
    """
    return netns.cleanup_stale(_NAME_RE)


def tbf_args(rate_mbit: float, mtu: int = MTU) -> list[str]:
    """``tc tbf`` parameters for ``rate_mbit``: a bucket of one packet or 4 ms of tokens, a
    queue of about 20 ms at the rate (a modest router buffer)."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = int(max(mtu + 1500, rate_bytes * 0.004))
    limit = int(max(4 * mtu, rate_bytes * 0.020)) + burst
    return ["rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


class Mesh(netns.Namespaces):
    """``peers`` fresh network namespaces, every two joined by their own veth pair.

    Args:
        peers: number of namespaces (2..32), numbered 1..peers.
        slow: ``(sender, receiver) -> Mbit/s`` rate caps applied at creation
            (:meth:`limit` changes them later).

    Raises:
        ValueError: a peer count out of range, or a slow pair that is not two
            different peers of the mesh, or a rate <= 0.
    """

    def __init__(self, peers: int, slow: Mapping[tuple[int, int], float] | None = None) -> None:
        if not 2 <= peers <= MAX_PEERS:
            raise ValueError(f"peers must be in 2..{MAX_PEERS}, got {peers}")
        self.peers = peers
        self.slow = dict(slow or {})
        for pair, rate in self.slow.items():
            self._check_pair(*pair)
            if rate <= 0:
                raise ValueError(f"rate for {pair} must be > 0, got {rate}")
        self.token = f"pmesh{os.getpid()}-{secrets.token_hex(3)}"
        self.limits: dict[tuple[int, int], float] = {}
        super().__init__()

    # -- names ---------------------------------------------------------------

    def ns(self, peer: int) -> str:
        """Namespace name of ``peer`` (1-based)."""
        self._check_peer(peer)
        return f"{self.token}-{peer}"

    def addr(self, peer: int) -> str:
        """The address of ``peer`` on all its links."""
        self._check_peer(peer)
        return f"{ADDR_PREFIX}{peer}"

    @staticmethod
    def device(towards: int) -> str:
        """Name of the device that leads to peer ``towards`` (in any other peer's namespace)."""
        return f"m{towards}"

    def _check_peer(self, peer: int) -> None:
        if not 1 <= peer <= self.peers:
            raise ValueError(f"no peer {peer} in a mesh of {self.peers}")

    def _check_pair(self, src: int, dst: int) -> None:
        self._check_peer(src)
        self._check_peer(dst)
        if src == dst:
            raise ValueError(f"a pair needs two different peers, got {src} twice")

    # -- building and teardown (netns.Namespaces hooks) ----------------------

    what = "mesh"
    stale = _NAME_RE

    def unavailable(self) -> str | None:
        return unavailable_reason()

    def _build(self) -> None:
        for peer in range(1, self.peers + 1):
            self._add_namespace(self.ns(peer))
        for a in range(1, self.peers + 1):
            for b in range(a + 1, self.peers + 1):
                self._link(a, b)
        self._open = True  # limit() needs an open mesh
        for (src, dst), rate in sorted(self.slow.items()):
            self.limit(src, dst, rate)

    def _teardown_extra(self, problems: list[str]) -> None:
        self.limits.clear()

    def _link(self, a: int, b: int) -> None:
        _run(["ip", "link", "add", self.device(b), "netns", self.ns(a), "type", "veth",
              "peer", "name", self.device(a), "netns", self.ns(b)])
        for here, there in ((a, b), (b, a)):
            ns, dev = self.ns(here), self.device(there)
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up"])
            _run(["ip", "-n", ns, "addr", "add", self.addr(here), "peer", f"{self.addr(there)}/32", "dev", dev])

    def limit(self, src: int, dst: int, rate_mbit: float | None) -> None:
        """Cap the direction ``src -> dst`` at ``rate_mbit`` (tbf at ``src``'s device); None lifts it.

        Raises:
            NetnsError: the mesh is not open, or ``tc`` failed.
            ValueError: not a pair of the mesh, or a rate <= 0.
        """
        self._require_open()
        self._check_pair(src, dst)
        ns, dev = self.ns(src), self.device(dst)
        if rate_mbit is None:
            if self.limits.pop((src, dst), None) is not None:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])
            return
        if rate_mbit <= 0:
            raise ValueError(f"rate must be > 0, got {rate_mbit}")
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", *tbf_args(rate_mbit)])
        self.limits[(src, dst)] = rate_mbit

    # -- running commands ----------------------------------------------------

    def command(self, peer: int, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside ``peer``'s namespace."""
        return self._in(self.ns(peer), cmd)

    def popen(self, peer: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``peer``'s namespace (``subprocess.Popen`` keywords apply).

        It is stopped at teardown if still running. Raises: NetnsError if the mesh is not open.
        """
        return self._popen(self.command(peer, cmd), kwargs)

    def run(self, peer: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` in ``peer``'s namespace to completion (``subprocess.run`` keywords apply).

        Raises: NetnsError if the mesh is not open; whatever ``subprocess.run`` raises.
        """
        return self._run_cmd(self.command(peer, cmd), kwargs)


# -- command line ---------------------------------------------------------


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"1-2,3-4"`` -> ``[(1, 2), (3, 4)]``.

    Raises:
        ValueError: not of that form.
    """
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, sep, b = part.partition("-")
        if not sep:
            raise ValueError(f"expected pairs like 1-2,3-4, got {text!r}")
        pairs.append((int(a), int(b)))
    return pairs


def _split(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """``OPTIONS -- CMD_1 ... ::: CMD_2 ...`` -> (options, [CMD_1, CMD_2, ...])."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    cmds: list[list[str]] = [[]]
    for arg in argv[i + 1:]:
        if arg == ":::":
            cmds.append([])
        else:
            cmds[-1].append(arg)
    return argv[:i], [c for c in cmds if c]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stress.mesh [options] -- CMD_1 ... [::: CMD_2 ...]``; returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stress.mesh", description=__doc__,
                                     usage="%(prog)s [options] -- CMD_1 ... [::: CMD_2 ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=None, help="namespaces (default: one per command)")
    parser.add_argument("--slow", type=parse_pairs, default=[], help="pairs limited both ways, e.g. 1-2,3-4")
    parser.add_argument("--rate-mbit", type=float, default=50.0, help="tbf rate of the slow pairs")
    parser.add_argument("--timeout", type=float, default=None, help="kill the commands after SECONDS")
    options, cmds = _split(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(options)
    if not cmds:
        parser.error("give commands: -- CMD_1 ... [::: CMD_2 ...]")
    peers = args.peers or len(cmds)
    if len(cmds) > peers:
        parser.error(f"{len(cmds)} commands for {peers} namespaces")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    slow = {p: args.rate_mbit for a, b in args.slow for p in ((a, b), (b, a))}
    try:
        with Mesh(peers, slow) as mesh:
            names = {f"addr{i}": mesh.addr(i) for i in range(1, peers + 1)}
            names.update({f"ns{i}": mesh.ns(i) for i in range(1, peers + 1)})
            env = dict(os.environ, **{f"MESH_ADDR_{i}": mesh.addr(i) for i in range(1, peers + 1)})

            procs = [mesh.popen(i, netns.fill_placeholders(cmd, names), env=env)
                     for i, cmd in enumerate(cmds, start=1)]
            return netns.wait_all(procs, args.timeout)
    except (NetnsError, ValueError) as exc:
        print(f"stress.mesh: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
