"""DiLoCo on pccl: inner steps locally, an outer round over the network every H steps.

```python
diloco = DiLoCo(comm, model, inner_optimizer, inner_steps=H)
for batch in loader:
    model(batch).loss.backward()
    diloco.step()            # inner step (and zero_grad) every call; outer round every H calls
diloco.flush()               # async mode: apply the last in-flight round
```

Everything the group must agree on lives in one :class:`pccl.SharedState` built from
:class:`training.outer.OuterState`: the outer parameters, the outer optimizer's state and the
round counter. It is synced (``ENFORCE_POPULAR``) at every round, so a newcomer starts from
the group's exact bits and any drift is outvoted and shows up as ``sync_rx_bytes > 0``.

**Membership phase** (the same code at construction and at every boundary, so a newcomer's
calls line up with those of the peers that accepted it): ``are_peers_pending()`` →
``update_topology()`` (retried on ``TopologyUpdateError``) until nobody is pending, then the
shared-state sync. A newcomer's ``connect()`` returns inside an existing peer's
``update_topology()``; its constructor then runs the same phase and sync. Founders (the group
is still at round 0) repeat phase + sync until the group has ``min_peers`` peers, so that all
of them train from the first round; a running group never waits for peers.

**Synchronous round** (boundary t)::

    Δ = θ_outer − θ_local;  Δ̄ = AVG all-reduce(Δ) with retry;  outer step;  round += 1
    membership phase;  sync shared state;  θ_local ← θ_outer

**Asynchronous round** (PCCL's order; the reduce of Δ_t overlaps the next H inner steps)::

    Δ_t = θ_outer − θ_local          (against θ_{t−1}: before the outer step)
    wait for the reduce of Δ_{t−1}   (nothing else may overlap a collective)
    membership phase → joined?
    round = t;  sync shared state (ENFORCE_POPULAR)
    outer step with Δ̄_{t−1}
    if joined: extra sync, SEND_ONLY (the newcomer: RECEIVE_ONLY) — the newcomer's first
               sync gave it θ_{t−1}; this one gives it θ_t, which only the old peers computed
    θ_local ← θ_outer;  start the reduce of Δ_t in the background

A newcomer in async mode joins a reduce that the others start right after the syncs; it has
trained nothing yet and contributes Δ = 0 (that one round's mean is diluted by its share).

A group that shrinks to one peer keeps training alone (its own Δ is the mean) and accepts
peers at the next boundary. ``TooFewPeersError`` from a reduce means exactly that.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

import torch
import xxhash

from pccl import (
    InvalidUsageError,
    Quantization,
    ReduceInfo,
    ReduceOp,
    SharedState,
    SharedStateError,
    SyncInfo,
    SyncStrategy,
    TooFewPeersError,
    TopologyUpdateError,
)
from training.outer import OptimizerFactory, OuterState, has_momentum

__all__ = ["Comm", "DiLoCo", "RoundInfo", "outer_digest"]

log = logging.getLogger("training.diloco")
T = TypeVar("T")


class Comm(Protocol):
    """The part of :class:`pccl.Communicator` DiLoCo uses (a wrapper may stand in for it)."""

    @property
    def world_size(self) -> int: ...

    def are_peers_pending(self) -> bool: ...

    def update_topology(self) -> None: ...

    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = ...) -> SyncInfo: ...

    def all_reduce_multiple_with_retry(
        self, tensors: list[torch.Tensor], *, op: ReduceOp = ..., quantization: Quantization | None = ...
    ) -> ReduceInfo: ...


@dataclass(frozen=True)
class RoundInfo:
    """What one outer round did, as seen by this peer.

    ``round``: rounds completed by the group (1 after the first). ``world_size``: peers in the
    group after the membership phase. ``reduce_world_size``: peers whose pseudo-gradients the
    applied mean averages (0 in async mode's first round, which applies nothing).
    ``reduce_tx_bytes`` / ``reduce_rx_bytes``: this peer's traffic for the pseudo-gradient
    reduce applied in this round (in async mode, the previous round's). ``sync_tx_bytes`` /
    ``sync_rx_bytes``: shared-state traffic (``sync_rx_bytes > 0`` means this peer's outer
    state was corrected). ``joined``: peers were accepted in this round. ``wait_seconds``: time
    blocked on the in-flight reduce (async) or spent in the reduce (sync). ``seconds``: the
    whole round's communication and outer step.
    """

    round: int
    world_size: int
    reduce_world_size: int
    reduce_tx_bytes: int
    reduce_rx_bytes: int
    sync_tx_bytes: int
    sync_rx_bytes: int
    joined: bool
    wait_seconds: float
    seconds: float


@dataclass
class _Reduced:
    """The outcome of one pseudo-gradient reduce (run inline or in the background thread)."""

    tensors: list[torch.Tensor]
    world_size: int = 1
    tx_bytes: int = 0
    rx_bytes: int = 0


class DiLoCo:
    """Wraps a model and its inner optimizer into DiLoCo over a connected ``comm``.

    ``outer_optimizer``: a callable from the outer parameters (a list of CPU tensors) to a
    torch optimizer; default SGD(lr 0.7, momentum 0.9, Nesterov). ``quantization``: passed to
    the pseudo-gradient all-reduce. ``asynchronous``: one-round-delayed outer update with the
    reduce overlapped (see the module docstring). ``min_peers``: founders wait (polling every
    ``poll_interval`` seconds) until the group has that many peers — use the run's starting
    size so that every founder trains from the first round; later the group never waits.
    ``retries``: attempts for ``update_topology`` and ``sync_shared_state`` before their error
    is raised.

    The constructor joins: membership phase, then the shared-state sync that hands this peer the
    group's outer state (a founder's own state when it is first) and copies it into ``model``.

    Raises:
        ValueError: ``inner_steps < 1``, ``min_peers < 1``, or a non-float parameter.
        pccl.SharedStateError, pccl.TopologyUpdateError: the join failed after ``retries``.
        pccl.MasterConnectionError: kicked, or the master is gone.
    Warns:
        RuntimeWarning: ``asynchronous=True`` with an outer optimizer that has momentum.
    """

    def __init__(
        self,
        comm: Comm,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        inner_steps: int,
        outer_optimizer: OptimizerFactory | None = None,
        quantization: Quantization | None = None,
        asynchronous: bool = False,
        *,
        min_peers: int = 1,
        poll_interval: float = 0.1,
        retries: int = 5,
    ) -> None:
        if inner_steps < 1 or min_peers < 1 or retries < 1:
            raise ValueError(f"need inner_steps, min_peers, retries >= 1; got {inner_steps}, {min_peers}, {retries}")
        self.comm = comm
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.quantization = quantization
        self.asynchronous = asynchronous
        self.min_peers = min_peers
        self.poll_interval = poll_interval
        self.retries = retries
        self._local = [p for _, p in model.named_parameters()]
        self.outer = OuterState(model.named_parameters(), outer_optimizer)
        if asynchronous and has_momentum(self.outer.optimizer):
            warnings.warn(
                "asynchronous DiLoCo with outer momentum: the one-round delay combined with momentum "
                "diverges on small models; prefer SGD without momentum (e.g. lr 0.7)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.state = SharedState(self.outer.shared_tensors(), revision=0)
        self._buffers = [[torch.empty_like(p) for p in self.outer.params] for _ in range(2 if asynchronous else 1)]
        self._next_buffer = 0
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diloco-reduce") if asynchronous else None
        )
        self._inflight: concurrent.futures.Future[_Reduced] | None = None
        self._ready: _Reduced | None = None  # async: a reduce already waited for, not applied yet
        self.inner_step = 0
        self.last_round: RoundInfo | None = None
        self.total_reduce_tx_bytes = 0
        self.total_sync_tx_bytes = 0
        self.all_reduces = 0
        self._join()

    # ------------------------------------------------------------------ public API

    @property
    def round(self) -> int:
        """Outer rounds the group has begun (the shared counter; 0 before the first)."""
        return int(self.outer.round.item())

    def step(self) -> RoundInfo | None:
        """One inner optimizer step (then ``zero_grad``); every ``inner_steps`` calls, an outer round.

        Returns the round's :class:`RoundInfo` when one ran, else ``None``.

        Raises:
            pccl.SharedStateError, pccl.TopologyUpdateError: after ``retries`` failed attempts.
            pccl.MasterConnectionError: kicked, or the master is gone.
            pccl.PCCLError: any other failure of the reduce that retrying cannot fix.
        """
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.inner_step += 1
        if self.inner_step % self.inner_steps:
            return None
        start = time.perf_counter()
        info = self._async_round(start) if self.asynchronous else self._sync_round(start)
        self.last_round = info
        return info

    def flush(self) -> float:
        """Async mode: wait for the in-flight reduce, apply it and copy ``θ_outer`` into the model.

        Call it on every peer after the same round (the end of training); a no-op in sync mode.
        Returns the seconds spent waiting for the reduce.
        """
        if not self.asynchronous:
            return 0.0
        t0 = time.perf_counter()
        reduced = self._wait_inflight()
        waited = time.perf_counter() - t0
        if reduced is not None:
            self.outer.step(reduced.tensors)
            self.outer.copy_to(self._local)
        return waited

    def close(self) -> None:
        """Stop the background reduce thread (waits for an in-flight reduce). Does not close ``comm``."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: outer state, inner step, and in async mode the reduced-but-unapplied mean."""
        pending = self._wait_inflight() if self.asynchronous else None
        self._ready = pending
        return {
            "outer": self.outer.state_dict(),
            "inner_step": self.inner_step,
            "inner_steps": self.inner_steps,
            "asynchronous": self.asynchronous,
            "pending": None if pending is None else [t.clone() for t in pending.tensors],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and copy ``θ_outer`` into the model.

        The shared-state revision is the group's and is kept: the next sync elects as usual,
        so load the same checkpoint on every peer at the same point (a lone peer loading an
        older one is outvoted and corrected).

        Raises ``ValueError`` if the checkpoint was taken with another ``inner_steps`` or mode,
        or does not fit the model.
        """
        if state["inner_steps"] != self.inner_steps or state["asynchronous"] != self.asynchronous:
            raise ValueError("checkpoint taken with a different inner_steps or asynchronous setting")
        self._wait_inflight()
        self.outer.load_state_dict(state["outer"])
        self.inner_step = int(state["inner_step"])
        pending = state["pending"]
        self._ready = None if pending is None else _Reduced([t.clone() for t in pending])
        self.outer.copy_to(self._local)

    # ------------------------------------------------------------------ rounds

    def _sync_round(self, start: float) -> RoundInfo:
        delta = self.outer.pseudo_gradient(self._local, out=self._buffers[0])
        t0 = time.perf_counter()
        reduced = self._reduce(delta)
        wait = time.perf_counter() - t0
        self.outer.step(reduced.tensors)
        self.outer.round += 1
        joined = self._membership()
        world = self.comm.world_size  # before the sync: after it, finished peers may already leave
        self.state.revision += 1
        sync = self._sync(SyncStrategy.ENFORCE_POPULAR)
        self.outer.copy_to(self._local)
        return self._info(reduced, [sync], joined, world, wait, start)

    def _async_round(self, start: float) -> RoundInfo:
        delta = self.outer.pseudo_gradient(self._local, out=self._take_buffer())  # against θ_{t-1}
        t0 = time.perf_counter()
        previous = self._wait_inflight()
        wait = time.perf_counter() - t0
        joined = self._membership()
        world = self.comm.world_size
        self.outer.round += 1
        self.state.revision += 1
        syncs = [self._sync(SyncStrategy.ENFORCE_POPULAR)]
        if previous is not None:
            self.outer.step(previous.tensors)
        if joined:
            self.state.revision += 1
            syncs.append(self._sync(SyncStrategy.SEND_ONLY))
        self.outer.copy_to(self._local)
        self._start_reduce(delta)
        return self._info(previous or _Reduced([], world_size=0), syncs, joined, world, wait, start)

    # ------------------------------------------------------------------ join and membership

    def _join(self) -> None:
        """Membership phase and first sync(s), mirroring what the accepting peers do.

        A newcomer to a running group (round >= 1 after its first sync) is done after one
        phase + sync, exactly the calls the group makes at a boundary. A founder (round 0)
        repeats phase + sync until the group has ``min_peers``; peers accepted meanwhile are
        founders too and join that loop on the same calls.
        """
        first = True
        while True:
            self._membership()
            if not first:
                self.state.revision += 1
            self._sync(SyncStrategy.ENFORCE_POPULAR)
            first = False
            if self.round >= 1 or self.comm.world_size >= self.min_peers:
                break
            time.sleep(self.poll_interval)
        joined_round = self.round
        if self.asynchronous and joined_round >= 1:
            # The group is inside an async boundary: it applies Δ̄_{t-1} now and syncs again.
            self.state.revision += 1
            self._sync(SyncStrategy.RECEIVE_ONLY)
        self.inner_step = joined_round * self.inner_steps
        self.outer.copy_to(self._local)
        if self.asynchronous and joined_round >= 1:
            zero = self._take_buffer()
            for z in zero:
                z.zero_()
            self._start_reduce(zero)
        log.info("joined at round %d (world size %d)", joined_round, self.comm.world_size)

    def _membership(self) -> bool:
        """Accept pending peers until none is pending; True if any update_topology ran."""
        joined = False
        while self.comm.are_peers_pending():
            self._retrying("update_topology", self.comm.update_topology, TopologyUpdateError)
            joined = True
        return joined

    def _sync(self, strategy: SyncStrategy) -> SyncInfo:
        info = self._retrying("sync_shared_state", lambda: self.comm.sync_shared_state(self.state, strategy),
                              SharedStateError)
        self.total_sync_tx_bytes += info.tx_bytes
        if info.rx_bytes:
            log.info("shared state: %d bytes received (%s, revision %d)", info.rx_bytes, strategy.name, info.revision)
        return info

    def _retrying(self, what: str, call: Callable[[], T], error: type[Exception]) -> T:
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except error as exc:
                if attempt == self.retries:
                    raise
                log.warning("%s failed (attempt %d of %d): %s", what, attempt, self.retries, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ reduce

    def _take_buffer(self) -> list[torch.Tensor]:
        buf = self._buffers[self._next_buffer]
        self._next_buffer = (self._next_buffer + 1) % len(self._buffers)
        return buf

    def _reduce(self, delta: Sequence[torch.Tensor]) -> _Reduced:
        """AVG all-reduce of ``delta`` in place, retried on lost peers; alone, ``delta`` is the mean."""
        tensors = list(delta)
        if self.comm.world_size < 2:
            return _Reduced(tensors)
        try:
            info: ReduceInfo = self.comm.all_reduce_multiple_with_retry(
                tensors, op=ReduceOp.AVG, quantization=self.quantization
            )
        except TooFewPeersError:
            log.info("alone after a lost peer: the round's mean is this peer's own pseudo-gradient")
            return _Reduced(tensors)
        self.all_reduces += 1
        self.total_reduce_tx_bytes += info.tx_bytes
        return _Reduced(tensors, info.world_size, info.tx_bytes, info.rx_bytes)

    def _start_reduce(self, delta: Sequence[torch.Tensor]) -> None:
        if self._ready is not None:
            raise InvalidUsageError("a reduced pseudo-gradient is still waiting to be applied")
        assert self._executor is not None and self._inflight is None
        self._inflight = self._executor.submit(self._reduce, delta)

    def _wait_inflight(self) -> _Reduced | None:
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        if self._inflight is None:
            return None
        future, self._inflight = self._inflight, None
        return future.result()

    def _info(
        self, reduced: _Reduced, syncs: Sequence[SyncInfo], joined: bool, world: int, wait: float, start: float
    ) -> RoundInfo:
        return RoundInfo(
            round=self.round,
            world_size=world,
            reduce_world_size=reduced.world_size,
            reduce_tx_bytes=reduced.tx_bytes,
            reduce_rx_bytes=reduced.rx_bytes,
            sync_tx_bytes=sum(s.tx_bytes for s in syncs),
            sync_rx_bytes=sum(s.rx_bytes for s in syncs),
            joined=joined,
            wait_seconds=wait,
            seconds=time.perf_counter() - start,
        )


def outer_digest(diloco: DiLoCo) -> str:
    """A hex digest of the outer parameters' bytes (bit-parity checks across peers)."""
    h = xxhash.xxh3_128()
    for p in diloco.outer.params:
        h.update(p.numpy().tobytes())
    return h.hexdigest()
