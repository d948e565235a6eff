"""WAN emulation: the delay queue alone, then real namespaces (root only)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stress import wan as wan_mod
from stress.delayline import DelayQueue
from stress.wan import WanError, WanLink, cleanup_stale, list_namespaces, unavailable_reason

REASON = unavailable_reason()
needs_root = pytest.mark.skipif(REASON is not None, reason=REASON or "")
PY = sys.executable

# A server in namespace B: accepts connections, reads each to EOF, answers with
# the byte count. It prints "listening" once bound, so clients never race it.
SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.socket(); srv.bind(("0.0.0.0", 5000)); srv.listen(16)
    print("listening", flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        total = 0
        while (n := conn.recv_into(buf)):
            total += n
        conn.sendall(str(total).encode()); conn.close()
""")

# Connect round trips from namespace A: prints each connect() time in ms.
CONNECT_TIMES = textwrap.dedent("""
    import socket, sys, time
    for _ in range(5):
        s = socket.socket(); t0 = time.monotonic()
        s.connect((sys.argv[1], 5000)); print((time.monotonic() - t0) * 1000.0)
        s.close()
""")

# Bulk send from namespace A: prints "<bytes acknowledged by the server> <seconds>".
BULK_SEND = textwrap.dedent("""
    import socket, sys, time
    size = int(sys.argv[2]); data = bytes(range(256)) * (size // 256)
    t0 = time.monotonic()
    s = socket.create_connection((sys.argv[1], 5000))
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    answer = s.recv(64); print(int(answer), time.monotonic() - t0)
""")


# -- the delay queue, no I/O -------------------------------------------------

arrivals = st.lists(st.tuples(st.floats(0, 0.01), st.integers(1, 2000)), max_size=60)


@given(arrivals, st.floats(0, 0.1), st.lists(st.floats(0, 0.2), max_size=10))
@settings(max_examples=200, deadline=None)
def test_delay_queue_releases_in_order_never_early(gaps, delay, probes):
    q = DelayQueue(delay, limit_bytes=1 << 30)
    now, sent = 0.0, []
    for i, (gap, size) in enumerate(gaps):
        now += gap
        packet = i.to_bytes(4, "big") * size
        assert q.push(now, packet)
        sent.append((now, packet))
    released: list[tuple[float, bytes]] = []
    for probe in sorted(now + p for p in probes) + [now + delay]:
        released += [(probe, pkt) for pkt in q.pop_due(probe)]
    assert [pkt for _, pkt in released] == [pkt for _, pkt in sent]  # all, in arrival order
    arrived = {pkt: t for t, pkt in sent}
    assert all(at >= arrived[pkt] + delay for at, pkt in released)
    assert q.queued_bytes == 0 and len(q) == 0 and q.next_due() is None
    assert q.forwarded_bytes == sum(len(p) for _, p in sent)


def test_delay_queue_holds_until_due_and_drops_beyond_limit():
    q = DelayQueue(delay=0.025, limit_bytes=100)
    assert q.push(1.0, b"a" * 60)
    assert not q.push(1.001, b"b" * 41)  # would exceed 100 queued bytes
    assert q.push(1.002, b"c" * 40)
    assert q.pop_due(1.0249) == []
    assert q.next_due() == pytest.approx(1.025)
    assert q.pop_due(1.025) == [b"a" * 60]
    assert q.queued_bytes == 40 and q.dropped_packets == 1
    assert q.pop_due(2.0) == [b"c" * 40]


def test_refuses_clearly_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(WanError, match="needs root"):
        WanLink(rtt_ms=10).open()


# -- real namespaces ---------------------------------------------------------

@contextlib.contextmanager
def _server(wan: WanLink) -> Iterator[None]:
    server = wan.popen_b([PY, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield
    finally:
        server.kill()
        server.communicate()


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


@needs_root
@pytest.mark.root
@pytest.mark.timeout(60)
def test_connect_round_trip_matches_rtt():
    with WanLink(rtt_ms=50) as wan, _server(wan):
        out = wan.run_a([PY, "-c", CONNECT_TIMES, wan.addr_b], capture_output=True, text=True, check=True)
        times = sorted(float(x) for x in out.stdout.split())
        assert len(times) == 5
        median = times[2]
        assert 45.0 <= median <= 80.0, times
        assert times[0] >= 45.0, times  # the delay line never releases early


@needs_root
@pytest.mark.root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("rtt_ms", [0.0, 10.0], ids=["veth", "delayline"])
def test_rate_cap_bounds_throughput(rtt_ms):
    rate_mbit, size = 40.0, 4 << 20
    with WanLink(rtt_ms=rtt_ms, rate_mbit=rate_mbit) as wan, _server(wan):
        out = wan.run_a([PY, "-c", BULK_SEND, wan.addr_b, str(size)], capture_output=True, text=True,
                        check=True)
        acked, seconds = out.stdout.split()
        assert int(acked) == size
        goodput = size / float(seconds)
        cap = rate_mbit * 1e6 / 8
        # A full token bucket lets its first `burst` bytes pass at line rate;
        # after that nothing beats the rate.
        burst = wan.tbf_burst_bytes
        assert burst is not None
        assert goodput <= cap * size / (size - burst), (goodput, cap)
        assert goodput >= 0.6 * cap, (goodput, cap)  # the cap is what limits, not the delay line


@needs_root
@pytest.mark.root
@pytest.mark.timeout(60)
def test_teardown_on_failure_leaves_nothing_behind():
    links_before = _root_links()
    with pytest.raises(RuntimeError, match="command failed"):
        with WanLink(rtt_ms=20, buffer_cap_bytes=4 << 20) as wan:
            ns = {wan.ns_a, wan.ns_b}
            assert ns <= set(list_namespaces())
            sysctl = wan.run_a(["sysctl", "-n", "net.ipv4.tcp_rmem"], capture_output=True, text=True)
            assert sysctl.stdout.split()[-1] == str(4 << 20)
            forwarder = wan.forwarder_pid
            assert forwarder is not None
            sleeper = wan.popen_b(["sleep", "60"])
            if wan.run_a(["false"]).returncode != 0:
                raise RuntimeError("command failed")
    assert not ns & set(list_namespaces())
    assert sleeper.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(forwarder, 0)
    assert _root_links() == links_before
    assert wan.forwarder_stats is not None


@needs_root
@pytest.mark.root
@pytest.mark.timeout(60)
def test_cli_tears_down_on_sigterm_and_reports_failures():
    failed = subprocess.run([PY, "-m", "stress.wan", "--rtt", "10", "--", "false", ":::", "sleep", "60"],
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1
    with subprocess.Popen([PY, "-m", "stress.wan", "--rtt", "10", "--", "sh", "-c", "echo up; sleep 60"],
                          stdout=subprocess.PIPE, text=True) as cli:
        try:
            assert cli.stdout is not None and cli.stdout.readline().strip() == "up"
            prefix = f"pwan{cli.pid}-"
            assert any(n.startswith(prefix) for n in list_namespaces())
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=20) == 128 + signal.SIGTERM
        finally:
            if cli.poll() is None:
                cli.kill()
    assert not any(n.startswith(prefix) for n in list_namespaces())


@needs_root
@pytest.mark.root
@pytest.mark.timeout(30)
def test_cleanup_stale_removes_only_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"pwan{dead.pid}-0bad00-a", f"pwan{os.getpid()}-0bad00-a"
    for name in (stale, live):
        wan_mod._run(["ip", "netns", "add", name])
    try:
        assert stale in cleanup_stale()
        names = set(list_namespaces())
        assert stale not in names and live in names
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
