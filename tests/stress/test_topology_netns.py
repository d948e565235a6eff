"""Bandwidth-aware rings in network namespaces (root only): the mesh itself, then 4 peers
whose first ring crosses two rate-limited pairs, before and after ``optimize_topology``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pccl.bench.topology import run_benchmark
from pccl.master_rings import ring_edges
from stress.mesh import Mesh, parse_pairs, tbf_args, unavailable_reason
from stress.wan import list_namespaces

REASON = unavailable_reason()
needs_root = pytest.mark.skipif(REASON is not None, reason=REASON or "")
PY = sys.executable

# Namespace j: accept connections on port 5000, read each to EOF, answer the byte count.
SINK = textwrap.dedent("""
    import socket
    srv = socket.socket(); srv.bind(("0.0.0.0", 5000)); srv.listen(8)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        total = 0
        while (data := conn.recv(1 << 20)):
            total += len(data)
        conn.sendall(str(total).encode()); conn.close()
""")
# Namespace i: send SIZE bytes to ADDR, print Mbit/s as acknowledged by the sink.
SEND = textwrap.dedent("""
    import socket, sys, time
    size = int(sys.argv[2]); data = bytes(size)
    start = time.monotonic()
    s = socket.create_connection((sys.argv[1], 5000)); s.sendall(data); s.shutdown(socket.SHUT_WR)
    assert int(s.recv(64)) == size
    print(size * 8 / (time.monotonic() - start) / 1e6)
""")


def _mbit(mesh: Mesh, src: int, dst: int, size: int) -> float:
    out = mesh.run(src, [PY, "-c", SEND, mesh.addr(dst), str(size)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def _ours() -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"pmesh{os.getpid()}-")]


def test_mesh_arguments_are_checked() -> None:
    assert parse_pairs("1-2, 3-4") == [(1, 2), (3, 4)]
    with pytest.raises(ValueError):
        parse_pairs("1:2")
    with pytest.raises(ValueError):
        Mesh(1)
    with pytest.raises(ValueError):
        Mesh(3, slow={(2, 2): 10.0})
    assert tbf_args(100.0)[:2] == ["rate", "100.0mbit"]


@needs_root
@pytest.mark.root
@pytest.mark.timeout(120)
def test_mesh_limits_exactly_one_direction_of_one_pair() -> None:
    sinks: list[subprocess.Popen[str]] = []
    try:
        with Mesh(3, slow={(1, 2): 40.0}) as mesh:
            sinks += [mesh.popen(p, [PY, "-c", SINK], stdout=subprocess.PIPE, text=True) for p in (1, 2, 3)]
            for sink in sinks:
                assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
            limited = _mbit(mesh, 1, 2, 6 << 20)
            assert 30.0 <= limited <= 48.0  # tbf's 40 Mbit/s (a small bucket lets a little more through)
            assert _mbit(mesh, 2, 1, 64 << 20) > 4 * 40.0  # the reverse direction is a plain veth
            assert _mbit(mesh, 1, 3, 64 << 20) > 4 * 40.0  # and so is every other pair
            mesh.limit(1, 2, None)
            assert _mbit(mesh, 1, 2, 64 << 20) > 4 * 40.0
            assert len(_ours()) == 3
        assert not _ours()  # torn down, processes included
        assert all(sink.poll() is not None for sink in sinks)
    finally:
        for sink in sinks:
            if sink.stdout is not None:
                sink.stdout.close()


@needs_root
@pytest.mark.root
@pytest.mark.timeout(300)
def test_optimized_ring_avoids_slow_pairs_and_all_reduce_is_faster() -> None:
    rate_mbit = 100.0
    res = run_benchmark(peers=4, slow=[(1, 2), (3, 4)], rate_mbit=rate_mbit, mib=64.0, iters=1,
                        connections=2, mesh=True, timeout=240)
    slow = {tuple(p) for p in res["slow_pairs"]}
    assert slow == {(1, 2), (2, 1), (3, 4), (4, 3)}
    assert res["ring_before"] == [1, 2, 3, 4] and slow & set(ring_edges(res["ring_before"]))
    # After: the same peers, no slow pair, the same ring on every peer.
    assert sorted(res["ring_after"]) == [1, 2, 3, 4] and res["rings_agree"]
    assert not slow & set(ring_edges(res["ring_after"]))
    # The measured matrix: slow pairs at tbf's rate (the reference), every other pair far above.
    measured = {(a, b): v for a, b, v in res["bandwidth"]}
    assert len(measured) == 12
    limit = rate_mbit * 1e6 / 8
    for pair, value in measured.items():
        if pair in slow:
            assert 0.6 * limit <= value <= 1.2 * limit, (pair, value)
        else:
            assert value > 3 * limit, (pair, value)
    # The 64 MiB all-reduce (checked exact by every worker) is at least twice as fast.
    assert res["speedup"] >= 2.0, res
