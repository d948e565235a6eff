"""Shared-seed zeroth-order training on pccl (MeZO directions, one published byte per peer).

```python
zo = ZerothOrder(comm, model, loss_fn, lr=0.04, eps=1e-3, bits=8, seed=run_seed)
for batch in loader:
    zo.step(batch)          # the local loss; one all-gather of a few bytes per peer
```

**One step** (step counter ``t``, this peer's id ``p``)::

    z_p   = normal(seed(run_seed, t, p))           per parameter, named_parameters order,
                                                   one dedicated torch.Generator
    g_p   = (L(θ + εz_p) − L(θ − εz_p)) / 2ε       θ itself is never written (see below)
    ĝ_p   = dequantize(quantize(g_p))              what this peer publishes
    all-gather of (check byte, ĝ code) records     retried on PeerLostError
    for w in sorted(peer ids):  θ ← θ − (lr/W)·ĝ_w·z_w     z_w regenerated from its seed

Every peer, the sender included, applies the *dequantized* values in ascending peer-id order,
with the same float32 ops in the same order, so θ stays bit-identical without moving tensors.

**No in-place perturbation.** An in-place ``+ε, −2ε, +ε`` cycle does not give back θ's exact
float32 bits, which would break parity. The loss is evaluated with every parameter's storage
temporarily pointed at a scratch buffer holding ``θ ± εz`` (``p.data`` swapped, restored in a
``finally``); θ's memory is only written by the update. The scratch buffers (one per
parameter, together one parameter-sized temporary) are reused for the update's ``z_w``.
There is no optimizer state.

**One-byte code** (``bits=8``). Bit 7 is the sign, bits 0-6 a log-magnitude code ``c``:
``c = 0`` means 0, otherwise ``|ĝ| = 2 ** ((c − 64) / 8)``, i.e. magnitudes from
``2**-7.875`` (≈ 0.0041) to ``2**7.875`` (≈ 235) in steps of ``2**(1/8)`` (≈ 9 %); the code is
rounded in the log domain (relative error ≤ 4.4 %), larger magnitudes saturate, and magnitudes
below ``2**-7.9375`` become 0. ``bits=32`` publishes the float32 value unchanged.

**Wire record.** Each peer publishes ``[peer_id & 0xFF, payload]`` (2 bytes with ``bits=8``,
5 with ``bits=32``). The all-gather returns records in the ring order of the group it ran on;
the master may shrink the ring (a lost peer) between the call and the moment this peer reads
``comm.ring``, so the records are labelled with the ring read before or after the call,
whichever agrees with the check bytes (peer ids are never reused and only
``update_topology`` — called by this class alone — grows the ring).

**Churn.** θ and the step counter live in a :class:`pccl.SharedState`. Every ``sync_every``
steps (and in the constructor) the *membership phase* runs as in :mod:`training.diloco`:
``are_peers_pending`` → ``update_topology`` until nobody is pending, then an
``ENFORCE_POPULAR`` sync. A newcomer's constructor runs the same phase + sync, so it receives
the group's θ and step and from then on computes the same bits. A peer lost mid-step makes
the all-gather raise ``PeerLostError`` on every survivor; each survivor retries the same
step's all-gather with the same record on the shrunk ring, so the step's update sums exactly
the survivors' contributions everywhere (alone, a peer applies its own).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import xxhash

from pccl import (
    PeerLostError,
    SharedState,
    SharedStateError,
    SyncInfo,
    SyncStrategy,
    TooFewPeersError,
    TopologyUpdateError,
)

__all__ = ["LossFn", "StepInfo", "ZerothOrder", "dequantize", "direction_seed", "quantize", "theta_digest"]

log = logging.getLogger("training.zo")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

LOG_CENTER = 64  # code of magnitude 1
LOG_STEPS_PER_OCTAVE = 8  # codes per doubling of the magnitude


class ZOComm(Protocol):
    """The part of :class:`pccl.Communicator` ZerothOrder uses."""

    @property
    def world_size(self) -> int: ...

    @property
    def peer_id(self) -> int: ...

    @property
    def ring(self) -> list[int]: ...

    def are_peers_pending(self) -> bool: ...

    def update_topology(self) -> None: ...

    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = ...) -> SyncInfo: ...

    def all_gather(self, tensor: torch.Tensor, *, tag: int = 0) -> list[torch.Tensor]: ...


# ---------------------------------------------------------------------- quantizer and seeds


def quantize(g: float) -> int:
    """The one-byte code of ``g`` (module docstring: sign bit + 7-bit log code).

    Raises ``ValueError`` for a NaN (a diverged loss must not be published as a number).
    """
    if math.isnan(g):
        raise ValueError("cannot quantize NaN")
    sign = 0x80 if g < 0 else 0
    mag = abs(g)
    if mag == 0.0:
        return 0
    if math.isinf(mag):
        return sign | 127
    level = LOG_STEPS_PER_OCTAVE * math.log2(mag)  # code − LOG_CENTER, before rounding
    if level < 0.5 - LOG_CENTER:  # closer to 0 than to the smallest magnitude (log domain)
        return 0
    return sign | min(127, max(1, round(level) + LOG_CENTER))


def dequantize(code: int) -> float:
    """The value a one-byte ``code`` stands for (exact in float32). Raises ``ValueError`` outside 0..255."""
    if not 0 <= code <= 255:
        raise ValueError(f"a code is one byte, got {code}")
    c = code & 0x7F
    if c == 0:
        return 0.0
    mag = 2.0 ** ((c - LOG_CENTER) / LOG_STEPS_PER_OCTAVE)
    return float(np.float32(-mag if code & 0x80 else mag))


def direction_seed(run_seed: int, step: int, peer_id: int) -> int:
    """The 63-bit generator seed of ``peer_id``'s direction at ``step`` (all three ``>= 0``).

    Raises ``ValueError`` for a negative argument.
    """
    if run_seed < 0 or step < 0 or peer_id < 0:
        raise ValueError(f"need non-negative run_seed, step, peer_id; got {run_seed}, {step}, {peer_id}")
    state = np.random.SeedSequence([run_seed, step, peer_id]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def theta_digest(params: Sequence[torch.Tensor]) -> str:
    """XXH3-64 hex digest over the parameters' raw bytes, in order (for parity checks)."""
    h = xxhash.xxh3_64()
    for p in params:
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- the trainer


@dataclass(frozen=True)
class StepInfo:
    """What one step did on this peer.

    ``step``: the group's step index this update belongs to. ``loss``: ``(L+ + L−)/2``.
    ``grad``: this peer's projected gradient before quantization; ``published``: its
    dequantized value. ``contributors``: peer ids whose updates were applied, ascending.
    ``payload_bytes``: bytes of the record this peer published. ``retries``: all-gathers
    retried after a lost peer. ``synced``: a membership phase + sync ran before the step;
    ``sync_rx_bytes``: bytes it received (> 0 means this peer's θ was corrected).
    """

    step: int
    loss: float
    grad: float
    published: float
    contributors: tuple[int, ...]
    payload_bytes: int
    retries: int
    synced: bool
    sync_rx_bytes: int


class ZerothOrder:
    """Distributed MeZO with shared seeds over a connected ``comm`` (module docstring).

    ``loss_fn(model, batch)`` returns a scalar tensor; it is called twice per step under
    ``torch.no_grad``. ``bits``: 8 (one-byte log code) or 32 (float32). ``seed``: the run
    seed, the same on every peer. ``sync_every``: steps between membership phases + syncs
    (where newcomers are accepted and any drift is corrected). ``min_peers``: founders wait
    (polling every ``poll_interval`` s) until the group has that many peers. ``retries``:
    attempts for ``update_topology``, ``sync_shared_state`` and each step's all-gather.

    The constructor joins: membership phase, then the sync that hands this peer the group's
    θ and step counter.

    Raises:
        ValueError: bad ``bits``, ``lr``, ``eps``, ``sync_every``, ``min_peers``, ``retries``,
            or a non-float32 parameter.
        pccl.SharedStateError, pccl.TopologyUpdateError: the join failed after ``retries``.
        pccl.MasterConnectionError: kicked, or the master is gone.
    """

    def __init__(
        self,
        comm: ZOComm,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        lr: float,
        eps: float = 1e-3,
        bits: int = 8,
        seed: int = 0,
        sync_every: int = 16,
        min_peers: int = 1,
        poll_interval: float = 0.05,
        retries: int = 5,
    ) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if not (lr > 0 and eps > 0) or sync_every < 1 or min_peers < 1 or retries < 1:
            raise ValueError("need lr > 0, eps > 0, sync_every >= 1, min_peers >= 1, retries >= 1")
        self.comm, self.model, self.loss_fn = comm, model, loss_fn
        self.lr, self.eps, self.bits, self.seed = float(lr), float(eps), bits, seed
        self.sync_every, self.min_peers, self.poll_interval, self.retries = sync_every, min_peers, poll_interval, retries
        named = list(model.named_parameters())
        for name, p in named:
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise ValueError(f"parameter {name} must be contiguous float32, is {p.dtype}")
        self.params = [p for _, p in named]
        self._scratch = [torch.empty_like(p) for p in self.params]  # the one parameter-sized temporary
        self._step = torch.zeros(1, dtype=torch.int64)
        entries: dict[str, torch.Tensor] = {f"param.{n}": p.data for n, p in named}
        entries["zo.step"] = self._step
        self.state = SharedState(entries, revision=0)
        self._synced_at = -1
        self.last: StepInfo | None = None
        self.payload_bytes_total = 0
        self.gathers = 0
        self._join()

    # ------------------------------------------------------------------ public API

    @property
    def step_count(self) -> int:
        """Steps the group has applied (the shared counter)."""
        return int(self._step.item())

    def digest(self) -> str:
        """:func:`theta_digest` of the model's parameters."""
        return theta_digest(self.params)

    def step(self, batch: Any) -> float:
        """One zeroth-order step on ``batch``; returns the local loss ``(L+ + L−)/2``.

        Details of the step are in :attr:`last` (:class:`StepInfo`).

        Raises:
            ValueError: the loss is NaN.
            pccl.PeerLostError: the all-gather kept failing for ``retries`` attempts.
            pccl.SharedStateError, pccl.TopologyUpdateError: a sync boundary failed.
            pccl.MasterConnectionError: kicked, or the master is gone.
        """
        synced, rx = False, 0
        t = self.step_count
        if t % self.sync_every == 0 and self._synced_at != t:
            self._membership()
            self.state.revision += 1
            rx = self._sync().rx_bytes
            synced, t = True, self.step_count
            self._synced_at = t
        me = self.comm.peer_id
        loss_plus = self._perturbed_loss(batch, direction_seed(self.seed, t, me), self.eps)
        loss_minus = self._perturbed_loss(batch, direction_seed(self.seed, t, me), -self.eps)
        grad = (loss_plus - loss_minus) / (2.0 * self.eps)
        record = self._encode(me, grad)
        published = self._decode(record)[1]
        updates, retries = self._gather(record)
        self._apply(t, updates)
        self._step += 1
        self.payload_bytes_total += record.numel()
        loss = 0.5 * (loss_plus + loss_minus)
        self.last = StepInfo(t, loss, grad, published, tuple(p for p, _ in updates), record.numel(), retries,
                             synced, rx)
        return loss

    # ------------------------------------------------------------------ perturbation and update

    def _direction(self, seed: int) -> list[torch.Tensor]:
        """``z`` for ``seed`` written into the scratch buffers (per parameter, in order)."""
        gen = torch.Generator().manual_seed(seed)
        for buf in self._scratch:
            buf.normal_(generator=gen)
        return self._scratch

    @torch.no_grad()
    def _perturbed_loss(self, batch: Any, seed: int, scale: float) -> float:
        """``loss_fn`` at ``θ + scale·z`` with every parameter's storage swapped, θ untouched."""
        z = self._direction(seed)
        originals = [p.data for p in self.params]
        try:
            for p, buf, theta in zip(self.params, z, originals):
                buf.mul_(scale).add_(theta)
                p.data = buf
            loss = float(self.loss_fn(self.model, batch))
        finally:
            for p, theta in zip(self.params, originals):
                p.data = theta
        if math.isnan(loss):
            raise ValueError("the loss is NaN")
        return loss

    @torch.no_grad()
    def _apply(self, step: int, updates: Sequence[tuple[int, float]]) -> None:
        """θ ← θ − (lr/W)·Σ_w ĝ_w·z_w, peers in ascending id order, one float32 add per term."""
        world = len(updates)
        for peer, g in updates:
            if g == 0.0:
                continue
            alpha = -self.lr / world * g  # a Python float: identical on every peer
            for p, z in zip(self.params, self._direction(direction_seed(self.seed, step, peer))):
                p.add_(z, alpha=alpha)

    # ------------------------------------------------------------------ wire records

    def _encode(self, peer_id: int, grad: float) -> torch.Tensor:
        payload = bytes([quantize(grad)]) if self.bits == 8 else struct.pack("<f", grad)
        return torch.frombuffer(bytearray(bytes([peer_id & 0xFF]) + payload), dtype=torch.uint8)

    def _decode(self, record: torch.Tensor) -> tuple[int, float]:
        raw = bytes(record.tolist())
        value = dequantize(raw[1]) if self.bits == 8 else float(struct.unpack("<f", raw[1:5])[0])
        return raw[0], value

    def _gather(self, record: torch.Tensor) -> tuple[list[tuple[int, float]], int]:
        """Everyone's (peer id, ĝ), ascending by id; retried on a lost peer. Returns (updates, retries)."""
        me = self.comm.peer_id
        for attempt in range(self.retries):
            before = self.comm.ring
            if len(before) < 2:
                return [(me, self._decode(record)[1])], attempt
            try:
                gathered = self.comm.all_gather(record)
            except TooFewPeersError:
                return [(me, self._decode(record)[1])], attempt
            except PeerLostError as exc:
                log.info("all-gather lost a peer (attempt %d): %s", attempt + 1, exc)
                continue
            self.gathers += 1
            decoded = [self._decode(r) for r in gathered]
            ids = self._label(decoded, before, self.comm.ring)
            return sorted(zip(ids, (v for _, v in decoded))), attempt
        raise PeerLostError(f"the all-gather failed {self.retries} times")

    @staticmethod
    def _label(decoded: list[tuple[int, float]], before: list[int], after: list[int]) -> list[int]:
        checks = [c for c, _ in decoded]
        for ring in (after, before):
            if len(ring) == len(checks) and all((p & 0xFF) == c for p, c in zip(ring, checks)):
                return ring
        raise PeerLostError(f"cannot tell whose records came back (ring changed twice: {before} -> {after})")

    # ------------------------------------------------------------------ membership and sync

    def _join(self) -> None:
        """Membership phase + sync, as the group does at a boundary; founders wait for ``min_peers``."""
        first = True
        while True:
            self._membership()
            if not first:
                self.state.revision += 1
            self._sync()
            first = False
            if self.step_count >= 1 or self.comm.world_size >= self.min_peers:
                break
            time.sleep(self.poll_interval)
        self._synced_at = self.step_count
        log.info("joined at step %d (world size %d)", self.step_count, self.comm.world_size)

    def _membership(self) -> bool:
        joined = False
        while self.comm.are_peers_pending():
            self._retrying(self.comm.update_topology, TopologyUpdateError)
            joined = True
        return joined

    def _sync(self) -> SyncInfo:
        return self._retrying(lambda: self.comm.sync_shared_state(self.state, SyncStrategy.ENFORCE_POPULAR),
                              SharedStateError)

    def _retrying(self, call: Callable[[], Any], error: type[Exception]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except error as exc:
                if attempt == self.retries:
                    raise
                log.warning("attempt %d of %d failed: %s", attempt, self.retries, exc)
        raise AssertionError("unreachable")  # pragma: no cover
