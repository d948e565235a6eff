"""A userspace delay line between two tun devices, for WAN emulation without netem.

This kernel has no ``sch_netem``, so latency is added in userspace: one process
owns a tun device in each of two network namespaces, reads every IP packet the
kernel routes into one of them, holds it for the one-way delay and writes it
into the other. ``stress.wan.WanLink`` starts it as
``python -m stress.delayline ...`` and talks to it over stdin/stdout:

- after both tun devices exist it prints ``ready`` on stdout;
- it exits when stdin reaches end of file (its owner closed it or died), on
  SIGTERM or SIGINT, and prints one JSON line of counters on the way out.

Speed comes from large packets, not clever Python: with a tun MTU of ~64 KiB a
3.5 Gbit/s stream is under 7,000 packets a second, and each wakeup drains every
readable packet before it sleeps again. The delay is the same for every packet
of one direction, so a FIFO ordered by arrival is also ordered by release time.
Packets leave up to about a millisecond late, never early: epoll's timeout
counts whole milliseconds, rounded up.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Deque, Sequence

# <linux/if_tun.h>, <sched.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
# Read size: one whole packet of the largest MTU a tun device accepts.
MAX_PACKET = 65536
# Packets read from one device per wakeup before the other gets its turn, so
# one busy direction cannot starve the other's releases (its ACKs).
READ_BATCH = 64


class DelayLineError(RuntimeError):
    """The delay line could not be set up (no tun support, unknown namespace)."""


@dataclass
class DelayQueue:
    """Packets of one direction waiting for their release time (sans-IO).

    ``push`` stamps a packet with ``now + delay``; ``pop_due`` hands back, in
    arrival order, every packet whose time has come. Beyond ``limit_bytes``
    queued bytes new packets are dropped, like a router's full buffer.
    """

    delay: float
    limit_bytes: int
    queued_bytes: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped_packets: int = 0
    _queue: Deque[tuple[float, bytes]] = field(default_factory=collections.deque, repr=False)

    def push(self, now: float, packet: bytes) -> bool:
        """Queue ``packet`` that arrived at ``now``; False when it was dropped."""
        if self.queued_bytes + len(packet) > self.limit_bytes:
            self.dropped_packets += 1
            return False
        self._queue.append((now + self.delay, packet))
        self.queued_bytes += len(packet)
        return True

    def pop_due(self, now: float) -> list[bytes]:
        """Remove and return the packets due at ``now``, oldest first."""
        queue = self._queue
        due: list[bytes] = []
        while queue and queue[0][0] <= now:
            due.append(queue.popleft()[1])
        size = sum(map(len, due))
        self.queued_bytes -= size
        self.forwarded_packets += len(due)
        self.forwarded_bytes += size
        return due

    def next_due(self) -> float | None:
        """Release time of the oldest queued packet, or None when empty."""
        return self._queue[0][0] if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)


def _setns(fd: int, what: str) -> None:
    """Move the calling thread into the network namespace open at ``fd``.

    Raises:
        DelayLineError: setns(2) failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise DelayLineError(f"setns({what}) failed: {os.strerror(ctypes.get_errno())}")


def open_tun(ifname: str) -> int:
    """Create tun device ``ifname`` in the current network namespace.

    The device lives as long as the returned (non-blocking) descriptor: when
    this process exits, the kernel removes it.

    Raises:
        DelayLineError: /dev/net/tun is missing, not permitted, or the name is taken.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DelayLineError(f"cannot open /dev/net/tun: {exc}") from exc
    ifreq = struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        raise DelayLineError(f"TUNSETIFF {ifname}: {exc}") from exc
    return fd


def open_tun_in_netns(netns: str, ifname: str) -> int:
    """Create tun device ``ifname`` inside named namespace ``netns`` (see ``ip netns``).

    The calling thread enters the namespace to create the device and goes back
    to its own namespace before returning; the descriptor stays bound to the
    device, wherever the process itself lives.

    Raises:
        DelayLineError: as :func:`open_tun`, or the namespace does not exist.
    """
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DelayLineError(f"cannot open network namespace {netns!r}: {exc}") from exc
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, netns)
        try:
            return open_tun(ifname)
        finally:
            _setns(home, "the original namespace")
    finally:
        os.close(home)
        os.close(target)


def _drain(fd: int, queue: DelayQueue, now: float) -> bool:
    """Queue up to READ_BATCH packets from ``fd``; True if more may be waiting."""
    read = os.read
    for _ in range(READ_BATCH):
        try:
            packet = read(fd, MAX_PACKET)
        except BlockingIOError:
            return False
        except OSError as exc:
            # EIO/EBADFD: the device went down; nothing more to read from it now.
            if exc.errno in (errno.EIO, errno.EBADFD):
                return False
            raise
        queue.push(now, packet)
    return True


def _release(fd: int, queue: DelayQueue, now: float) -> int:
    """Write the due packets of ``queue`` into ``fd``; return how many were lost."""
    lost = 0
    write = os.write
    for packet in queue.pop_due(now):
        try:
            write(fd, packet)
        except OSError:
            # The receiving stack refused it (device down, backlog full): the
            # packet is lost on the wire, which TCP handles like any loss.
            lost += 1
    return lost


def forward(fd_a: int, fd_b: int, delay: float, limit_bytes: int, control_fd: int) -> dict[str, int]:
    """Move packets a->b and b->a with ``delay`` seconds each way until stopped.

    Stops when ``control_fd`` becomes readable or hangs up (its writer closed
    it) or the process gets SIGTERM. Returns the counters of both directions.
    """
    a_to_b = DelayQueue(delay, limit_bytes)
    b_to_a = DelayQueue(delay, limit_bytes)
    started, cpu_started = time.monotonic(), time.process_time()
    routes = {fd_a: (a_to_b, fd_b), fd_b: (b_to_a, fd_a)}
    poller = select.epoll()
    for fd in (fd_a, fd_b, control_fd):
        poller.register(fd, select.EPOLLIN)
    lost = 0
    pending: set[int] = set()  # devices with packets left over after a full batch
    try:
        while True:  # leaves by break, or by KeyboardInterrupt on SIGTERM
            due = [t for t in (a_to_b.next_due(), b_to_a.next_due()) if t is not None]
            timeout = 0.0 if pending else (max(0.0, min(due) - time.monotonic()) if due else -1.0)
            events = poller.poll(timeout)
            now = time.monotonic()
            ready = pending | {fd for fd, _ in events}
            if control_fd in ready:
                break
            pending = set()
            for fd in ready:
                queue, _ = routes[fd]
                if _drain(fd, queue, now):
                    pending.add(fd)
            now = time.monotonic()
            lost += _release(fd_b, a_to_b, now) + _release(fd_a, b_to_a, now)
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
    return {
        "a_to_b_packets": a_to_b.forwarded_packets,
        "a_to_b_bytes": a_to_b.forwarded_bytes,
        "b_to_a_packets": b_to_a.forwarded_packets,
        "b_to_a_bytes": b_to_a.forwarded_bytes,
        "dropped_packets": a_to_b.dropped_packets + b_to_a.dropped_packets,
        "lost_on_write": lost,
        "wall_ms": round((time.monotonic() - started) * 1000),
        "cpu_ms": round((time.process_time() - cpu_started) * 1000),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress.delayline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--netns-a", required=True, help="named network namespace of side A")
    parser.add_argument("--netns-b", required=True, help="named network namespace of side B")
    parser.add_argument("--ifname", default="wan0", help="tun device name in both namespaces")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT/2)")
    parser.add_argument("--limit-bytes", type=int, default=256 << 20,
                        help="per-direction queue limit; beyond it packets are dropped")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m stress.delayline``; returns the exit status."""
    args = _parse(argv)
    # SIGTERM leaves through the same path as a closed stdin, so counters get printed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        fd_a = open_tun_in_netns(args.netns_a, args.ifname)
        fd_b = open_tun_in_netns(args.netns_b, args.ifname)
    except DelayLineError as exc:
        print(f"delayline: {exc}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    try:
        stats = forward(fd_a, fd_b, args.delay_ms / 1000.0, args.limit_bytes, sys.stdin.fileno())
    finally:
        os.close(fd_a)
        os.close(fd_b)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
