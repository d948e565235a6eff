"""``optimize_topology`` end to end: peer processes, a real master, TCP on 127.0.0.1 (§5.12).

Loopback has no slow links, so these tests check the mechanics: every directed pair is
measured, every peer sees the same matrix and ring as the master, the new ring carries
data, measurements persist, and a membership change measures only the new pairs. The
re-ordering around slow links is shown in namespaces (``tests/stress/test_topology_netns.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import pccl
from collective_helpers import PeerProcess
from pccl.bench.topology import run_benchmark
from pccl.master_rings import ring_edges

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "topology_peer.py"


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _all(peers: list[Any], cmd: str, timeout: float = 60.0, **fields: Any) -> list[Any]:
    """Send ``cmd`` to every peer at once (a vote needs them all), then collect the results."""
    for peer in peers:
        peer.send(cmd, **fields)
    out = []
    for peer in peers:
        reply = peer.reply(timeout)
        assert reply["ok"], f"{cmd}: {reply}\n{peer.stderr}"
        out.append(reply["result"])
    return out


def _join(master: pccl.Master, n: int, procs: list[Any]) -> list[Any]:
    peers = [PeerProcess([master.address], script=SCRIPT) for _ in range(n)]
    procs += peers
    peers[0].call("connect", timeout=60)
    for peer in peers[1:]:
        peer.send("connect", timeout=60)
    _wait_for(lambda: len(master.status()["pending"]) == n - 1, 60, "every peer to register")
    peers[0].call("update_topology", timeout=60)
    for peer in peers[1:]:
        reply = peer.reply(60)
        assert reply["ok"], reply
    return peers


@pytest.fixture
def procs() -> Any:
    started: list[Any] = []
    yield started
    for proc in started:
        proc.kill()


def _matrix(rows: list[list[Any]]) -> dict[tuple[int, int], float]:
    return {(a, b): v for a, b, v in rows}


@pytest.mark.timeout(120)
def test_every_pair_is_measured_and_every_peer_agrees(procs: list[Any]) -> None:
    with pccl.Master(host="127.0.0.1", port=0) as master:
        peers = _join(master, 3, procs)
        results = _all(peers, "optimize_topology")
        ids = sorted(r["peer_id"] for r in results)
        matrices = [_matrix(r["bandwidths"]) for r in results]
        assert set(matrices[0]) == {(a, b) for a in ids for b in ids if a != b}
        assert all(v > 1e6 for v in matrices[0].values())  # loopback: far above 1 MB/s
        assert all(m == matrices[0] for m in matrices)
        assert master.status()["bandwidth"] == matrices[0]
        ring = results[0]["ring"]
        assert sorted(ring) == ids and all(r["ring"] == ring for r in results)
        assert master.status()["rings"][0] == ring
        # The ring the peers were told is the ring the data takes: each hears from its PREV.
        got = {r["peer_id"]: tuple(x) for r, x in zip(results, _all(peers, "ring_check", tag=1))}
        for prev, nxt in ring_edges(ring):
            assert got[nxt] == (prev,)
        # Nothing is missing now: a second call measures nothing and keeps ring and matrix.
        again = _all(peers, "optimize_topology")
        assert all(r["ring"] == ring and _matrix(r["bandwidths"]) == matrices[0] for r in again)


@pytest.mark.timeout(120)
def test_a_newcomer_is_measured_and_a_leaver_forgotten(procs: list[Any]) -> None:
    with pccl.Master(host="127.0.0.1", port=0) as master:
        peers = _join(master, 3, procs)
        first = _matrix(_all(peers, "optimize_topology")[0]["bandwidths"])
        gone = peers[2].call("info")["peer_id"]
        peers[2].call("close")
        _wait_for(lambda: gone not in master.status()["accepted"], 30, "the leaver to be removed")
        assert all(gone not in pair for pair in master.status()["bandwidth"])
        newcomer = PeerProcess([master.address], script=SCRIPT)
        procs.append(newcomer)
        newcomer.send("connect", timeout=60)
        _wait_for(lambda: len(master.status()["pending"]) == 1, 60, "the newcomer to register")
        _all(peers[:2], "update_topology")
        new_id = newcomer.reply(60)["result"]["peer_id"]
        results = _all([*peers[:2], newcomer], "optimize_topology")
        now = _matrix(results[0]["bandwidths"])
        kept = [p for p in first if gone not in p]
        assert {p: now[p] for p in kept} == {p: first[p] for p in kept}  # not measured again
        assert {p for p in now if new_id in p} == {p for p in now} - set(kept)
        assert all(now[p] > 0 for p in now)


@pytest.mark.timeout(180)
def test_all_reduce_results_are_exact_on_the_optimized_ring() -> None:
    # The benchmark's workers check every all-reduce against the exact sum, before and
    # after re-wiring; on loopback the ring may change or not (noise), the results may not.
    res = run_benchmark(peers=3, slow=(), mib=1.0, iters=1, mesh=False, timeout=150)
    assert res["rings_agree"] and sorted(res["ring_after"]) == sorted(res["ring_before"]) == [1, 2, 3]
    assert len(res["bandwidth"]) == 6 and all(v > 0 for _, _, v in res["bandwidth"])
    assert res["before_s"][0] > 0 and res["after_s"][0] > 0
