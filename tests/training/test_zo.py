"""ZerothOrder in one process: quantizer, seeds, the update against a float64 reference, no in-place
perturbation, memory, and a threaded group of fake communicators (parity, churn in a step)."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pccl import PeerLostError, SharedState, SyncInfo, SyncStrategy
from training.zo import ZerothOrder, dequantize, direction_seed, quantize, theta_digest
from training.zo_peer import CharMLP, mlp_loss


class Group:
    """``size`` fake communicators (peer ids 10, 11, ...); all_gather is a barrier rendezvous."""

    def __init__(self, size: int) -> None:
        self.ids = [10 + i for i in range(size)]
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[Any] = [None] * size
        self.fail_next = False
        self.lost: int | None = None  # rank dropped at the next failure


class Comm:
    def __init__(self, group: Group, rank: int) -> None:
        self.group, self.rank = group, rank

    @property
    def world_size(self) -> int:
        return len(self.group.ids)

    @property
    def peer_id(self) -> int:
        return 10 + self.rank

    @property
    def ring(self) -> list[int]:
        return list(self.group.ids)

    def are_peers_pending(self) -> bool:
        return False

    def update_topology(self) -> None:
        raise AssertionError("never pending")

    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncInfo:
        return SyncInfo(0, 0, state.revision)

    def all_gather(self, tensor: torch.Tensor, *, tag: int = 0) -> list[torch.Tensor]:
        g = self.group
        barrier = g.barrier
        g.slots[self.rank] = tensor.clone()
        barrier.wait()
        failing = g.fail_next
        barrier.wait()
        if failing:
            if self.rank == 0:  # one member shrinks the ring for everyone, as the master would
                g.fail_next = False
                assert g.lost is not None
                g.ids.remove(10 + g.lost)
                g.barrier = threading.Barrier(len(g.ids), timeout=30)
            barrier.wait()
            raise PeerLostError("a peer was lost")
        out = [g.slots[i - 10] for i in g.ids]
        barrier.wait()
        return out

    def die(self) -> None:
        """This member is lost inside the current all-gather."""
        barrier = self.group.barrier
        self.group.fail_next = True
        for _ in range(3):
            barrier.wait()


def test_quantizer_codes() -> None:
    assert quantize(0.0) == 0 and dequantize(0) == 0.0
    assert dequantize(quantize(1.0)) == 1.0 and dequantize(quantize(-1.0)) == -1.0
    assert quantize(1e9) == 127 and quantize(-math.inf) == 0xFF
    assert quantize(1e-9) == 0
    assert dequantize(127) == pytest.approx(2**7.875)
    with pytest.raises(ValueError):
        quantize(math.nan)
    with pytest.raises(ValueError):
        dequantize(256)


@given(st.floats(min_value=2**-7.875, max_value=2**7.875), st.booleans())
def test_quantizer_relative_error_within_half_a_step(mag: float, negative: bool) -> None:
    g = -mag if negative else mag
    code = quantize(g)
    assert 0 <= code <= 255
    back = dequantize(code)
    assert math.copysign(1.0, back) == math.copysign(1.0, g)
    assert abs(math.log2(abs(back)) - math.log2(mag)) <= 1 / 16 + 1e-9  # half of 2**(1/8) in log2
    assert dequantize(quantize(back)) == back  # codes are fixed points


def test_direction_seeds_distinct_and_deterministic() -> None:
    seeds = {direction_seed(7, t, p) for t in range(50) for p in range(8)}
    assert len(seeds) == 400
    assert direction_seed(7, 3, 2) == direction_seed(7, 3, 2) != direction_seed(8, 3, 2)
    with pytest.raises(ValueError):
        direction_seed(-1, 0, 0)


class _Solo(Comm):
    def __init__(self) -> None:
        super().__init__(Group(1), 0)


def test_update_matches_float64_reference_and_theta_never_perturbed_in_place() -> None:
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    model = CharMLP(seed=3)
    theta0 = [p.detach().clone() for p in model.parameters()]
    storage = [p.detach() for p in model.parameters()]  # θ's own memory
    seen: list[float] = []

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        for s, t0 in zip(storage, theta0):  # θ's memory is untouched while perturbed losses run
            assert torch.equal(s, t0)
        assert not torch.equal(next(iter(m.parameters())), theta0[0])  # ...but the model sees θ ± εz
        loss = mlp_loss(m, batch)
        seen.append(float(loss))
        return loss

    batch = torch.randint(0, 128, (32, 4), generator=torch.Generator().manual_seed(1))
    zo = ZerothOrder(_Solo(), model, loss_fn, lr=0.05, eps=1e-3, bits=8, seed=5)
    loss = zo.step(batch)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was never used
    info = zo.last
    assert info is not None and info.contributors == (10,) and info.step == 0 and zo.step_count == 1
    assert loss == pytest.approx((seen[0] + seen[1]) / 2)
    # Independent reference in float64: regenerate z (same generator recipe) and apply.
    g = (seen[0] - seen[1]) / 2e-3
    assert info.grad == pytest.approx(g)
    ghat = info.published
    assert abs(math.log2(abs(ghat)) - math.log2(abs(g))) <= 1 / 16 + 1e-9
    gen = torch.Generator().manual_seed(direction_seed(5, 0, 10))
    for p, t0 in zip(model.parameters(), theta0):
        z = torch.empty_like(p).normal_(generator=gen).double().numpy()
        ref = t0.double().numpy() - 0.05 * ghat * z
        np.testing.assert_allclose(p.detach().double().numpy(), ref, rtol=0, atol=1e-6)
    assert [p.data_ptr() for p in model.parameters()] == [s.data_ptr() for s in storage]


def test_memory_one_parameter_sized_scratch_and_no_optimizer_state() -> None:
    model = CharMLP()
    zo = ZerothOrder(_Solo(), model, mlp_loss, lr=0.01, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert sum(b.numel() for b in zo._scratch) == n
    tensors = [v for v in vars(zo).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 1  # the step counter, nothing else


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ZerothOrder(_Solo(), CharMLP(), mlp_loss, lr=0.01, bits=4)
    with pytest.raises(ValueError):
        ZerothOrder(_Solo(), CharMLP().double(), mlp_loss, lr=0.01)


def _train_group(size: int, steps: int, bits: int, group: Group | None = None, lose_at: int | None = None,
                 ) -> list[tuple[str, list[tuple[int, ...]]]]:
    group = group or Group(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            torch.set_num_threads(1)
            model = CharMLP(seed=0)
            comm = Comm(group, rank)
            zo = ZerothOrder(comm, model, mlp_loss, lr=0.02, bits=bits, seed=9)
            gen = torch.Generator().manual_seed(rank)
            contributors = []
            for t in range(steps):
                if lose_at is not None and t == lose_at and group.lost == rank:
                    # This peer "dies" inside step t: the survivors' gather fails.
                    comm.die()
                    return
                zo.step(torch.randint(0, 128, (16, 4), generator=gen))
                assert zo.last is not None
                contributors.append(zo.last.contributors)
            results[rank] = (zo.digest(), contributors)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def test_group_stays_bit_identical_and_byte_differs_from_float() -> None:
    q8 = _train_group(3, 20, 8)
    f32 = _train_group(3, 20, 32)
    assert len({d for d, _ in q8}) == 1 and len({d for d, _ in f32}) == 1
    assert q8[0][0] != f32[0][0]
    assert all(c == (10, 11, 12) for c in q8[0][1])


def test_peer_lost_mid_step_is_left_out_on_every_survivor() -> None:
    group = Group(3)
    group.lost = 1
    res = _train_group(3, 10, 8, group=group, lose_at=4)
    survivors = [res[0], res[2]]
    assert res[1] is None
    assert survivors[0][0] == survivors[1][0]
    contributors = survivors[0][1]
    assert contributors == survivors[1][1]
    assert contributors[:4] == [(10, 11, 12)] * 4 and contributors[4:] == [(10, 12)] * 6


def test_labels_records_with_the_ring_that_matches() -> None:
    decoded = [(10, 0.5), (12, -1.0)]
    assert ZerothOrder._label(decoded, [10, 11, 12], [10, 12]) == [10, 12]
    assert ZerothOrder._label([(10, 0.5), (11, 1.0), (12, 2.0)], [10, 11, 12], [10, 12]) == [10, 11, 12]
    with pytest.raises(PeerLostError):
        ZerothOrder._label(decoded, [10, 11, 12, 13], [10])


def test_digest_changes_with_any_bit() -> None:
    a = [torch.zeros(4), torch.ones(3)]
    b = [torch.zeros(4), torch.ones(3)]
    b[1][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert theta_digest(a) != theta_digest(b) and theta_digest(a) == theta_digest([t.clone() for t in a])
