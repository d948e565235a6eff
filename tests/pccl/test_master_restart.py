"""The master-restart recipe of ``docs/fault-tolerance.md`` ("Master lost"), end to end.

Three in-process peers on 127.0.0.1 train a shared tensor; the master stops; every call
raises ``MasterConnectionError`` and leaves the peers' tensors as they were; a new master
starts on the same port, the peers join it with new Communicators and carry on from the
state they hold. One peer resumes from an older checkpoint and is corrected by the first
sync. Every expected value is computed here with numpy.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pytest
import torch

import pccl
from parallel import in_parallel
from pccl import MasterConnectionError

PEERS = 3


def on_all(calls: list[Callable[[], Any]], timeout: float = 30) -> list[Any]:
    """Run one blocking call per peer at once; their results (an exception is raised here)."""
    out = in_parallel(*calls, timeout=timeout)
    for result in out:
        if isinstance(result, Exception):
            raise result
    return out


def join(address: str) -> list[pccl.Communicator]:
    """PEERS Communicators accepted into one run (every accepted peer takes part in the votes)."""
    comms = [pccl.Communicator(address, connections=1) for _ in range(PEERS)]

    def enter(i: int) -> None:
        time.sleep(0.1 * i)  # the first peer founds the run alone
        comms[i].connect(timeout=20)
        while comms[i].global_world_size < PEERS:
            if comms[i].are_peers_pending():
                comms[i].update_topology()
            else:
                time.sleep(0.01)

    on_all([lambda i=i: enter(i) for i in range(PEERS)])
    return comms


def train_round(comms: list[pccl.Communicator], weights: list[torch.Tensor], step: int) -> np.ndarray:
    """All-reduce one gradient per peer, apply it to every peer's copy; the float64 reference."""
    grads = [torch.arange(16, dtype=torch.float64) * (c.peer_id + step) for c in comms]
    expected = np.arange(16, dtype=np.float64) * sum(c.peer_id + step for c in comms)
    on_all([lambda c=c, g=g: c.all_reduce(g) for c, g in zip(comms, grads)])
    for g in grads:
        np.testing.assert_array_equal(g.numpy(), expected)
    for w, g in zip(weights, grads):
        w.add_(g, alpha=0.01)
    return expected


def sync(comms: list[pccl.Communicator], states: list[pccl.SharedState]) -> list[pccl.SyncInfo]:
    return on_all([lambda c=c, s=s: c.sync_shared_state(s) for c, s in zip(comms, states)])


@pytest.mark.timeout(120)
def test_peers_carry_on_from_their_state_after_the_master_is_restarted() -> None:
    first = pccl.Master("127.0.0.1", 0, heartbeat_timeout=2.0)
    first.start()
    port = first.port
    comms = join(f"127.0.0.1:{port}")
    weights = [torch.zeros(16, dtype=torch.float64) for _ in comms]
    states = [pccl.SharedState({"w": w}, revision=1) for w in weights]
    reference = np.zeros(16)
    older: torch.Tensor | None = None
    try:
        for step in range(3):
            if step == 2:
                older = weights[2].clone()  # peer 2's checkpoint will be this one, a round old
            reference += 0.01 * train_round(comms, weights, step)
            for state in states:
                state.revision = 1 + step
            assert {info.revision for info in sync(comms, states)} == {1 + step}
        first.stop()
        # The run pauses: every call fails, nothing is touched.
        before = [w.clone() for w in weights]
        for comm, w in zip(comms, weights):
            with pytest.raises(MasterConnectionError):
                comm.all_reduce(w)
        assert all(torch.equal(w, b) for w, b in zip(weights, before))
    finally:
        for comm in comms:
            comm.close()
        first.stop()
    np.testing.assert_allclose(weights[0].numpy(), reference, rtol=0, atol=1e-12)

    # Peer 2 resumes from its older checkpoint (revision 2); the others from revision 3.
    assert older is not None
    weights[2].copy_(older)
    second = pccl.Master("127.0.0.1", port, heartbeat_timeout=2.0)
    second.start()
    comms = join(f"127.0.0.1:{port}")
    try:
        states = [pccl.SharedState({"w": w}, revision=(3 if i < 2 else 2) + 1) for i, w in enumerate(weights)]
        infos = sync(comms, states)
        assert [info.revision for info in infos] == [4, 4, 4]
        assert infos[2].rx_bytes == 16 * 8 and infos[0].rx_bytes == infos[1].rx_bytes == 0
        assert all(torch.equal(w, weights[0]) for w in weights)  # bit-identical again
        reference += 0.01 * train_round(comms, weights, 3)  # and training goes on
        np.testing.assert_allclose(weights[2].numpy(), reference, rtol=0, atol=1e-12)
    finally:
        for comm in comms:
            comm.close()
        second.stop()
