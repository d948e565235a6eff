"""Membership integration tests: real peer processes and a real master on 127.0.0.1.

Every fault is declared up front (which peer dies, how, when) and every test asserts
"errors, never hangs": each wait has a bound, and the per-test timeout backs it up.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable

import pytest

from pccl.master import Master

HB = 2.0  # heartbeat timeout of the masters in these tests (seconds)


def prev_of(ring: list[int], peer: int) -> int:
    """The peer ``peer`` receives from in ``ring`` (itself in a ring of one)."""
    return ring[ring.index(peer) - 1]


def ring_check(peers: list[Any], tag: int, timeout: float = 20) -> dict[int, list[int]]:
    """Run ``ring_check`` on all ``peers`` at once; peer id -> what it received."""
    for peer in peers:
        peer.send("ring_check", tag=tag)
    replies = [peer.reply(timeout) for peer in peers]
    assert all(r["ok"] for r in replies), replies
    ids = [peer.call("info")["peer_id"] for peer in peers]
    return {pid: r["result"] for pid, r in zip(ids, replies)}


def blocked_voters(master: Master, kind: str) -> list[int]:
    rnd = master.status()["round"]
    return rnd["voters"] if rnd is not None and rnd["kind"] == kind and not rnd["linking"] else []


@pytest.mark.timeout(60)
def test_peers_join_one_by_one_while_others_loop_update_topology(spawn_peer: Callable[..., Any]) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as master:
        waiting = [spawn_peer(master.address) for _ in range(4)]  # processes start in parallel
        peers = [waiting.pop(0)]
        first = peers[0].call("connect")
        assert (first["world_size"], first["global_world_size"]) == (1, 1)  # accepted at once
        for target in (2, 3, 4):
            # Everyone already in loops update_topology until the world has 4 peers.
            peers[-1].send("loop_update_topology", until_world=4)
            newcomer = waiting.pop(0)
            got = newcomer.call("connect", timeout=20)
            assert (got["world_size"], got["global_world_size"]) == (target, target)
            peers.append(newcomer)
        loops = [peer.reply(20) for peer in peers[:-1]]
        assert all(r["ok"] and r["result"]["world_size"] == 4 for r in loops), loops
        status = master.status()
        ring = status["rings"][0]
        assert sorted(ring) == [p.call("info")["peer_id"] for p in peers] == [1, 2, 3, 4]
        assert status["pending"] == [] and status["kicks"] == {}
        # Every peer is linked to its ring neighbours: each receives its PREV's id.
        got = ring_check(peers, tag=1)
        assert got == {pid: [prev_of(ring, pid)] for pid in ring}


@pytest.mark.timeout(60)
def test_two_peer_groups_have_separate_rings(spawn_peer: Callable[..., Any], wait_for: Any) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as master:
        a0 = spawn_peer(master.address, group=0)
        a0.call("connect")
        others = [spawn_peer(master.address, group=g) for g in (0, 1, 1)]
        for peer in others:
            peer.send("connect")
        wait_for(lambda: len(master.status()["pending"]) == 3, 20, "three pending peers")
        assert a0.call("update_topology")["global_world_size"] == 4
        infos = [r["result"] for r in (p.reply(20) for p in others)]
        everyone = [a0.call("info")] + infos
        for info in everyone:
            assert info["world_size"] == 2
            assert (info["global_world_size"], info["num_peer_groups"], info["largest_peer_group_size"]) == (4, 2, 2)
        rings = master.status()["rings"]
        by_group: dict[int, list[int]] = {0: [], 1: []}
        for group, info in zip((0, 0, 1, 1), everyone):
            by_group[group].append(info["peer_id"])
            assert info["ring"] == rings[group]
        assert {g: sorted(r) for g, r in rings.items()} == {g: sorted(ids) for g, ids in by_group.items()}
        # Collectives are per group: the same tag runs independently in each group.
        got = ring_check([a0, *others], tag=5)
        expected = {pid: [prev_of(ring, pid)] for ring in rings.values() for pid in ring}
        assert got == expected


@pytest.mark.timeout(60)
def test_sigkill_during_vote_is_dropped_and_the_round_completes(spawn_peer: Callable[..., Any], wait_for: Any) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=5.0) as master:
        peers = [spawn_peer(master.address) for _ in range(3)]
        peers[0].call("connect")
        for peer in peers[1:]:
            peer.send("connect")
        wait_for(lambda: len(master.status()["pending"]) == 2, 20, "two pending peers")
        peers[0].call("update_topology")
        assert [p.reply(20)["ok"] for p in peers[1:]] == [True, True]
        victim = peers[1]
        victim_id = victim.call("info")["peer_id"]
        voters = [peers[0], peers[2]]
        for peer in voters:
            peer.send("update_topology")
        wait_for(lambda: len(blocked_voters(master, "update_topology")) == 2, 20, "two blocked voters")
        killed_at = time.time()
        victim.signal(signal.SIGKILL)
        replies = [peer.reply(20) for peer in voters]
        assert all(r["ok"] and r["result"]["world_size"] == 2 for r in replies), replies
        # Connection loss is acted on at once, far below the 5 s heartbeat timeout.
        assert max(r["at"] for r in replies) - killed_at < 2.5
        assert victim_id in master.status()["departures"]
        ring = master.status()["rings"][0]
        assert ring_check(voters, tag=2) == {pid: [prev_of(ring, pid)] for pid in ring}


@pytest.mark.timeout(60)
def test_sigstopped_peer_is_dropped_within_heartbeat_timeout(spawn_peer: Callable[..., Any], wait_for: Any) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as master:
        peers = [spawn_peer(master.address) for _ in range(3)]
        peers[0].call("connect")
        for peer in peers[1:]:
            peer.send("connect")
        wait_for(lambda: len(master.status()["pending"]) == 2, 20, "two pending peers")
        peers[0].call("update_topology")
        assert [p.reply(20)["ok"] for p in peers[1:]] == [True, True]
        victim, survivors = peers[1], [peers[0], peers[2]]
        victim_id = victim.call("info")["peer_id"]
        # The survivors wait in a collective the stopped peer will never join.
        for peer in survivors:
            peer.send("hang_collective", tag=3)
        wait_for(lambda: len(master.status()["collectives"].get(0, {}).get(3, [])) == 2, 20, "two initiators")
        stopped_at = time.time()
        victim.signal(signal.SIGSTOP)
        replies = [peer.reply(HB + 10) for peer in survivors]
        assert [r["error"] for r in replies] == ["PeerLostError", "PeerLostError"], replies
        assert all(f"peer {victim_id}" in r["message"] and "silent" in r["message"] for r in replies)
        latency = max(r["at"] for r in replies) - stopped_at
        assert HB - 0.2 < latency < HB + 1.5, latency
        assert "heartbeat timeout" in master.status()["kicks"][victim_id]
        # The rest continue on the smaller ring.
        ring = master.status()["rings"][0]
        assert len(ring) == 2
        assert ring_check(survivors, tag=4) == {pid: [prev_of(ring, pid)] for pid in ring}
        # The stopped peer learns why once it runs again.
        victim.signal(signal.SIGCONT)
        victim.send("update_topology")
        reply = victim.reply(20)
        assert reply["error"] == "MasterConnectionError" and "heartbeat timeout" in reply["message"], reply


@pytest.mark.timeout(60)
def test_peer_killed_mid_collective_aborts_it_for_the_group(spawn_peer: Callable[..., Any], wait_for: Any) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=5.0) as master:
        peers = [spawn_peer(master.address) for _ in range(3)]
        peers[0].call("connect")
        for peer in peers[1:]:
            peer.send("connect")
        wait_for(lambda: len(master.status()["pending"]) == 2, 20, "two pending peers")
        peers[0].call("update_topology")
        assert [p.reply(20)["ok"] for p in peers[1:]] == [True, True]
        # All three start the op; each body waits for data nobody sends.
        for peer in peers:
            peer.send("hang_collective", tag=9)
        wait_for(lambda: len(master.status()["collectives"].get(0, {}).get(9, [])) == 3, 20, "the op to start")
        killed_at = time.time()
        peers[2].signal(signal.SIGKILL)
        replies = [peer.reply(20) for peer in peers[:2]]
        assert [r["error"] for r in replies] == ["PeerLostError", "PeerLostError"], replies
        assert max(r["at"] for r in replies) - killed_at < 2.5
        ring = master.status()["rings"][0]
        assert ring_check(peers[:2], tag=10) == {pid: [prev_of(ring, pid)] for pid in ring}


@pytest.mark.timeout(60)
def test_wrong_secret_is_refused(spawn_peer: Callable[..., Any]) -> None:
    with Master("127.0.0.1", 0, secret="correct horse", heartbeat_timeout=HB) as master:
        good = spawn_peer(master.address, secret="correct horse")
        assert good.call("connect")["world_size"] == 1
        bad = spawn_peer(master.address, secret="battery staple")
        bad.send("connect")
        reply = bad.reply(20)
        assert reply["error"] == "AuthenticationError", reply
        none = spawn_peer(master.address)
        none.send("connect")
        assert none.reply(20)["error"] == "AuthenticationError"
        assert master.status()["accepted"] == [1] and master.status()["pending"] == []
