"""An in-memory stand-in for a fixed group of pccl Communicators, one per thread.

Only what DiLoCo calls is implemented. Every call is a rendezvous of all members (like the real
votes and collectives), so a DiLoCo that calls different operations on different peers
deadlocks the barrier instead of passing silently; the barrier has a timeout so that shows up
as an error. The mean is ``torch.stack(...).mean(0)`` in rank order: exactly what
:func:`training.simulate.simulate_diloco` computes, so results can be compared bit for bit.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Callable

import torch

from pccl import ReduceInfo, ReduceOp, SharedState, SyncInfo, SyncStrategy


class FakeGroup:
    """``size`` members; :meth:`comm` gives member ``rank``'s communicator."""

    def __init__(self, size: int, timeout: float = 30.0) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[Any] = [None] * size
        self.calls: list[list[str]] = [[] for _ in range(size)]

    def comm(self, rank: int) -> FakeComm:
        return FakeComm(self, rank)

    def exchange(self, rank: int, what: str, payload: Any, combine: Callable[[list[Any]], Any]) -> Any:
        self.calls[rank].append(what)
        self.slots[rank] = (what, payload)
        self.barrier.wait()
        kinds = {w for w, _ in self.slots}
        result = combine([p for _, p in self.slots]) if len(kinds) == 1 else None
        self.barrier.wait()  # nobody overwrites a slot before everyone combined
        if result is None:
            raise AssertionError(f"peers called different operations: {sorted(kinds)}")
        return result


class FakeComm:
    def __init__(self, group: FakeGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    @property
    def world_size(self) -> int:
        return self.group.size

    @property
    def peer_id(self) -> int:
        return self.rank

    def are_peers_pending(self) -> bool:
        return bool(self.group.exchange(self.rank, "pending", None, lambda _: False))

    def update_topology(self) -> None:
        raise AssertionError("nobody is ever pending in a fake group")

    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncInfo:
        digests = state.hashes(threads=1)
        payload = (strategy, state.revision, tuple(digests[k] for k in state.keys()),
                   {k: state[k].clone() for k in state.keys()})

        def elect(all_: list[Any]) -> Any:
            voters = [p for p in all_ if p[0] is not SyncStrategy.RECEIVE_ONLY]
            popular = Counter(p[2] for p in voters).most_common(1)[0][0]
            return next(p for p in voters if p[2] == popular), max(p[1] for p in voters)

        winner, revision = self.group.exchange(self.rank, f"sync:{strategy.name}", payload, elect)
        rx = 0
        if winner[2] != payload[2]:
            for k in state.keys():
                state[k].copy_(winner[3][k])
                rx += state[k].numel() * state[k].element_size()
        state.revision = revision
        return SyncInfo(tx_bytes=0, rx_bytes=rx, revision=revision)

    def all_reduce_multiple_with_retry(
        self, tensors: list[torch.Tensor], op: ReduceOp = ReduceOp.SUM, quantization: Any = None, **_: Any
    ) -> ReduceInfo:
        assert op is ReduceOp.AVG and quantization is None
        means = self.group.exchange(
            self.rank, "all_reduce", [t.clone() for t in tensors],
            lambda all_: [torch.stack(ts).mean(0) for ts in zip(*all_)],
        )
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        for t, m in zip(tensors, means):
            t.copy_(m)
        return ReduceInfo(self.group.size, nbytes, nbytes)
