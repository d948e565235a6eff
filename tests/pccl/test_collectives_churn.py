"""Peers lost in the middle of collectives: real processes on 127.0.0.1, faults declared up front.

Five peers; each step removes one while the others are inside an all-reduce. The victim
first initiates the same operation with a body that never sends (so the operation
certainly runs, and certainly cannot finish, when the fault hits); the test waits until a
survivor's tensor has really been written by the ring, then:

1. SIGKILL (5 -> 4): survivors raise ``PeerLostError`` within 1 s; tensors as before the call.
2. SIGSTOP (4 -> 3): the same within the heartbeat timeout, not before it.
3. SIGKILL during ``all_reduce_multiple_with_retry`` (3 -> 2): the retry completes on the
   smaller ring with the two survivors' reduction, bit-identical on both.
4. SIGKILL (2 -> 1): the last peer's retry raises ``TooFewPeersError``; tensors as before.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from collective_helpers import check_result, inputs, kill_all, start_groups, wait_for
from pccl.master import Master

HB = 2.0  # the master's heartbeat timeout
SPEC = {"op": "sum", "dtype": "float32", "numel": 3_000_001}


def started(master: Master, tag: int, members: int) -> bool:
    """Every member initiated ``tag`` (so the master started it: the links were ready)."""
    return len(master.status()["collectives"].get(0, {}).get(tag, [])) == members


def lose_peer_mid_reduce(
    master: Master, survivors: list[Any], victim: Any, tag: int, how: int
) -> tuple[float, list[Any]]:
    """Start an all-reduce everywhere, wait until it wrote into a survivor's tensor, then
    signal the victim. Returns the seconds from the signal until the last survivor's call
    ended, and the survivors' outcomes."""
    spec = dict(SPEC, name=f"t{tag}", tag=tag, seed=tag)
    victim.call("stall", ops=[spec])
    for peer in survivors:
        assert peer.call("start", **spec) == {"done": False}
    wait_for(lambda: started(master, tag, len(survivors) + 1), 20, "the operation to start")
    wait_for(lambda: any(p.call("changed", name=spec["name"]) for p in survivors), 20, "the ring to write")
    at = time.time()
    victim.signal(how)
    for peer in survivors:
        peer.send("wait", name=spec["name"], timeout=HB + 10)
    replies = [peer.reply(HB + 20) for peer in survivors]
    assert all(r["ok"] for r in replies), replies
    return max(r["at"] for r in replies) - at, [r["result"] for r in replies]


@pytest.mark.timeout(90)
def test_lost_peers_abort_restore_and_retry_down_to_too_few_peers(tmp_path: Path) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as master:
        peers = start_groups(master, {0: 5})[0]
        try:
            # 1. SIGKILL: the connection loss is seen at once.
            latency, outcomes = lose_peer_mid_reduce(master, peers[:4], peers[4], 1, signal.SIGKILL)
            assert [o.get("error") for o in outcomes] == ["PeerLostError"] * 4, outcomes
            assert all(o["input_unchanged"] for o in outcomes), outcomes
            assert latency < 1.0, latency

            # 2. SIGSTOP: only the heartbeat timeout reveals a silent peer.
            latency, outcomes = lose_peer_mid_reduce(master, peers[:3], peers[3], 2, signal.SIGSTOP)
            assert [o.get("error") for o in outcomes] == ["PeerLostError"] * 3, outcomes
            assert all(o["input_unchanged"] for o in outcomes), outcomes
            assert HB - 0.5 < latency < HB + 1.0, latency  # the last heartbeat may precede the stop by HB / 5
            # Its silent ring links may fail the operation a moment before the master's kick.
            kick = wait_for(lambda: master.status()["kicks"].get(peers[3].peer_id), HB, "the kick")
            assert "heartbeat timeout" in kick

            # 3. SIGKILL during the retrying reduce of several tensors: it completes on 2 peers.
            specs = [dict(SPEC, numel=n, seed=10 + i) for i, n in enumerate([1_000_003, 5, 2_000_001, 0, 999])]
            outcome = retry_with_victim(master, peers[:2], peers[2], specs, tmp_path / "retry.pt")
            assert [o["info"][0] for o in outcome] == [2, 2], outcome
            assert outcome[0]["hashes"] == outcome[1]["hashes"]
            for spec, got in zip(specs, torch.load(tmp_path / "retry.pt")):
                check_result("sum", torch.float32, inputs(spec, [p.peer_id for p in peers[:2]]), got)

            # 4. The last peer alone cannot reduce: TooFewPeersError, tensors as before.
            (alone,) = retry_with_victim(master, peers[:1], peers[1], specs, None)
            assert alone["error"] == "TooFewPeersError", alone
            assert all(alone["unchanged"]), alone
        finally:
            kill_all(peers)


def retry_with_victim(
    master: Master, survivors: list[Any], victim: Any, specs: list[dict[str, Any]], dump: Path | None
) -> list[Any]:
    """``all_reduce_multiple_with_retry`` on ``survivors`` while ``victim`` stalls its first
    two tags; SIGKILL the victim once both started. The survivors' results."""
    victim.call("stall", ops=[dict(s, tag=i) for i, s in enumerate(specs[:2])])
    for i, peer in enumerate(survivors):
        peer.send("multi", specs=specs, op="sum", max_in_flight=2, dump=str(dump) if dump and i == 0 else None)
    members = len(survivors) + 1
    wait_for(lambda: started(master, 0, members) and started(master, 1, members), 20, "two operations to start")
    victim.signal(signal.SIGKILL)
    replies = [peer.reply(HB + 20) for peer in survivors]
    assert all(r["ok"] for r in replies), replies
    return [r["result"] for r in replies]
