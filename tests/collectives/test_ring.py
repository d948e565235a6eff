"""The ring executor over an in-memory ring (sans-IO): results, bit-identity, bytes, failures.

References are float64 numpy (floats) or Python-int arithmetic wrapped to the dtype (integers),
computed from the inputs alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
import torch

from collectives.buffers import BufferPool
from collectives.quantize import encoded_size
from collectives.ring import ring_all_gather, ring_all_reduce, ring_broadcast, ring_reduce_scatter
from collectives.schedule import chunk_bounds, piece_bounds, piece_count
from collectives.types import FLOAT_DTYPES, INTEGER_DTYPES, Quantization, ReduceOp
from ring_fakes import FakeRing
from transport.errors import InvalidUsageError, PeerLostError

OPS = list(ReduceOp)


def _run(world: int, make: Callable[[FakeRing, int], Coroutine[Any, Any, Any]], seed: int = 0) -> tuple[list[Any], FakeRing]:
    ring = FakeRing(world, seed=seed)

    async def main() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(make(ring, r) for r in range(world))), 20)

    results = asyncio.run(main())
    assert ring.leftovers() == []  # every transfer sent was received, nothing left posted
    assert ring.aborts == []  # a success never tells the neighbours to abort
    return results, ring


def _inputs(dtype: torch.dtype, op: ReduceOp, world: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        if dtype.is_floating_point:
            if op is ReduceOp.PROD:  # stay near 1 so products neither overflow nor vanish
                x = 1.0 + 0.25 * torch.randn(n, generator=g, dtype=torch.float64)
            else:
                x = torch.randn(n, generator=g, dtype=torch.float64) * 100
            out.append(x.to(dtype))
        else:
            info = torch.iinfo(dtype)
            lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
            x = torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64)
            out.append(x.to(dtype) if dtype not in (torch.uint32, torch.uint64) else _via_bytes(x, dtype))
    return out


def _via_bytes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the low bytes of int64 values as an unsigned dtype (no torch casts needed)."""
    k = dtype.itemsize
    raw = x.numpy().astype("<i8").view(np.uint8).reshape(-1, 8)[:, :k].copy()
    return torch.from_numpy(raw.reshape(-1)).view(dtype).clone()


def _ints_of(t: torch.Tensor) -> list[int]:
    signed = t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    raw, k = t.view(torch.uint8).numpy().tobytes(), t.dtype.itemsize
    return [int.from_bytes(raw[i : i + k], "little", signed=signed) for i in range(0, len(raw), k)]


def _int_reference(xs: list[torch.Tensor], op: ReduceOp, world: int) -> list[int]:
    dtype = xs[0].dtype
    bits, signed = dtype.itemsize * 8, dtype in (torch.int8, torch.int16, torch.int32, torch.int64)

    def wrap(v: int) -> int:
        v %= 1 << bits
        return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

    cols = list(zip(*(_ints_of(x) for x in xs)))
    out = []
    for col in cols:
        if op in (ReduceOp.SUM, ReduceOp.AVG):
            v = wrap(sum(col))
            if op is ReduceOp.AVG:
                v = wrap(abs(v) // world * (1 if v >= 0 else -1))
        elif op is ReduceOp.PROD:
            v = 1
            for c in col:
                v = wrap(v * c)
        else:
            v = max(col) if op is ReduceOp.MAX else min(col)
        out.append(v)
    return out


def _check_floats(result: torch.Tensor, xs: list[torch.Tensor], op: ReduceOp) -> None:
    world = len(xs)
    x64 = np.stack([x.double().numpy() for x in xs]) if xs[0].numel() else np.zeros((world, 0))
    got = result.double().numpy()
    u = torch.finfo(xs[0].dtype).eps / 2
    if op in (ReduceOp.MAX, ReduceOp.MIN):
        ref = x64.max(0) if op is ReduceOp.MAX else x64.min(0)
        np.testing.assert_array_equal(got, ref)
        return
    if op is ReduceOp.PROD:
        ref = x64.prod(0)
        tol = 2 * world * u * np.abs(ref) * 1.01
    else:
        ref = x64.sum(0)
        # w - 1 roundings of partial sums no larger than sum |x|, plus the rounding of the inputs' sum
        tol = world * u * np.abs(x64).sum(0)
        if op is ReduceOp.AVG:
            ref, tol = ref / world, tol / world + u * np.abs(ref / world)
    assert np.all(np.abs(got - ref) <= tol + 1e-300), np.abs(got - ref).max()


def _all_reduce(
    xs: list[torch.Tensor],
    op: ReduceOp,
    inplace: bool,
    quant: Quantization | None = None,
    piece_bytes: int = 96,
    seed: int = 0,
    window: int | None = 3,
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    world = len(xs)
    srcs = [x.clone() for x in xs]
    dsts = srcs if inplace else [torch.full_like(x, 7) for x in xs]

    async def one(ring: FakeRing, r: int) -> tuple[int, int]:
        return await ring_all_reduce(ring.peers(r), 5, srcs[r], dsts[r], op, quant, piece_bytes=piece_bytes, window=window)

    infos, _ = _run(world, one, seed)
    if not inplace:
        for s, x in zip(srcs, xs):
            assert torch.equal(s.view(torch.uint8), x.view(torch.uint8))  # src untouched
    raw = [d.view(torch.uint8).numpy().tobytes() for d in dsts]
    assert all(b == raw[0] for b in raw), "ranks disagree"  # bit-identical on every rank
    return dsts, infos


SIZES = [0, 1, 7, 1000]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("extra", ["zero", "one", "seven", "w-1", "w+1", "large"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_all_reduce_sizes_and_worlds(world: int, extra: str, inplace: bool) -> None:
    n = {"zero": 0, "one": 1, "seven": 7, "w-1": world - 1, "w+1": world + 1, "large": 3001}[extra]
    xs = _inputs(torch.float32, ReduceOp.SUM, world, n, seed=world * 100 + n)
    dsts, infos = _all_reduce(xs, ReduceOp.SUM, inplace, seed=n)
    _check_floats(dsts[0], xs, ReduceOp.SUM)
    for r, (tx, rx) in enumerate(infos):
        lengths = [b - a for a, b in (chunk_bounds(n, world, c) for c in range(world))]
        # reduce-scatter sends every chunk but its own, all-gather every chunk but the next rank's
        expected = 0 if world == 1 else 4 * (2 * n - lengths[r] - lengths[(r + 1) % world])
        assert tx == expected
        assert rx == (0 if world == 1 else 4 * (2 * n - lengths[r] - lengths[(r - 1) % world]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("world", [3, 4])
def test_all_reduce_every_op_and_dtype(dtype: torch.dtype, op: ReduceOp, world: int) -> None:
    n = 37 if world == 3 else 301
    xs = _inputs(dtype, op, world, n, seed=world)
    dsts, _ = _all_reduce(xs, op, inplace=world == 4, piece_bytes=48, seed=world)
    if dtype.is_floating_point:
        _check_floats(dsts[0], xs, op)
    else:
        assert _ints_of(dsts[0]) == _int_reference(xs, op, world)


@pytest.mark.parametrize("seed", range(6))
def test_in_place_equals_out_of_place_bit_for_bit(seed: int) -> None:
    xs = _inputs(torch.bfloat16, ReduceOp.AVG, 3, 2000, seed)
    a, _ = _all_reduce(xs, ReduceOp.AVG, inplace=True, seed=seed)
    b, _ = _all_reduce(xs, ReduceOp.AVG, inplace=False, seed=seed + 100)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))


def test_window_of_one_and_many_give_the_same_bits() -> None:
    xs = _inputs(torch.float16, ReduceOp.SUM, 4, 5000, 9)
    a, _ = _all_reduce(xs, ReduceOp.SUM, inplace=True, window=1)
    b, _ = _all_reduce(xs, ReduceOp.SUM, inplace=True, window=None, seed=3)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))


QUANTS = [Quantization(d, a) for d in (torch.uint8, torch.uint4) for a in ("min_max", "zero_point")]


@pytest.mark.parametrize("q", QUANTS, ids=lambda q: f"{q.algorithm}-{q.bits}")
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantized_all_reduce_is_bit_identical_and_within_bound(q: Quantization, world: int, dtype: torch.dtype) -> None:
    n = 1001
    xs = _inputs(dtype, ReduceOp.AVG, world, n, seed=world)
    dsts, infos = _all_reduce(xs, ReduceOp.AVG, inplace=world != 3, quant=q, piece_bytes=256, seed=world)
    x64 = np.stack([x.double().numpy() for x in xs])
    ref = x64.mean(0)
    # docs/protocol.md §7.4: world - 1 hops each encode a partial sum, the owner encodes the
    # average once more. A partial sum's range is at most 2 * S (S = max over elements of
    # sum_i |x_i|), one encoding errs by at most k * range / L: the hop errors, divided by world,
    # plus the final one, add up to k * 2 * S / L. Slack: 1 % for errors compounding, and one
    # rounding of the tensor's dtype per hop.
    levels = (1 << q.bits) - 1
    k = 0.5 if q.algorithm == "min_max" else 1.0
    s_max = np.abs(x64).sum(0).max()
    u_o = torch.finfo(dtype).eps / 2
    bound = 1.01 * k * 2 * s_max / levels + 2 * world * u_o * s_max
    err = np.abs(dsts[0].double().numpy() - ref).max()
    assert err <= bound
    assert err > 0.05 * k * 2 * s_max / levels  # it really was quantized
    # tx counts exactly the encoded pieces this rank sent: every chunk but its own in
    # reduce-scatter, every chunk but the next rank's in all-gather (§7.2, §7.4).
    chunks = [chunk_bounds(n, world, c) for c in range(world)]
    pieces = piece_count(max(b - a for a, b in chunks), xs[0].element_size(), 256)
    encoded = [
        sum(encoded_size(hi - lo, q) for lo, hi in (piece_bounds(a, b, pieces, p) for p in range(pieces)) if hi > lo)
        for a, b in chunks
    ]
    raw = 2 * n * xs[0].element_size() * (world - 1) / world
    for r, (tx, _) in enumerate(infos):
        assert tx == sum(encoded) - encoded[r] + sum(encoded) - encoded[(r + 1) % world]
        assert tx < raw * (0.4 if q.bits == 8 else 0.3) * (2 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_quantizing_integers_is_refused(dtype: torch.dtype) -> None:
    async def main() -> None:
        t = torch.zeros(4, dtype=dtype)
        await ring_all_reduce(FakeRing(2).peers(0), 0, t, t, ReduceOp.SUM, Quantization())

    with pytest.raises(InvalidUsageError, match="quantization=None"):
        asyncio.run(main())


def test_concurrent_operations_with_distinct_tags_share_a_pool() -> None:
    world = 3
    a = _inputs(torch.float32, ReduceOp.SUM, world, 4000, 1)
    b = _inputs(torch.float64, ReduceOp.MAX, world, 999, 2)
    pools = [BufferPool() for _ in range(world)]
    outs_a = [x.clone() for x in a]
    outs_b = [x.clone() for x in b]

    async def one(ring: FakeRing, r: int) -> None:
        peers = ring.peers(r)
        await asyncio.gather(
            ring_all_reduce(peers, 10, outs_a[r], outs_a[r], ReduceOp.SUM, piece_bytes=512, pool=pools[r]),
            ring_all_reduce(peers, 11, outs_b[r], outs_b[r], ReduceOp.MAX, piece_bytes=256, pool=pools[r]),
            ring_all_reduce(peers, 12, outs_a[r].clone(), torch.empty(4000), ReduceOp.SUM, Quantization(), pool=pools[r]),
        )

    _run(world, one, seed=4)
    _check_floats(outs_a[1], a, ReduceOp.SUM)
    _check_floats(outs_b[2], b, ReduceOp.MAX)
    first = [p.allocated_bytes for p in pools]
    _run(world, one, seed=5)  # a second round reuses the pooled buffers
    assert [p.allocated_bytes for p in pools] == first


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("quant", [None, Quantization()], ids=["plain", "uint8"])
@pytest.mark.parametrize("alias", [False, True], ids=["separate", "slice-of-src"])
def test_reduce_scatter(world: int, quant: Quantization | None, alias: bool) -> None:
    n = 1003
    xs = _inputs(torch.float32, ReduceOp.SUM, world, n, seed=world)
    srcs = [x.clone() for x in xs]
    outs: list[torch.Tensor] = []
    for r in range(world):
        a, b = chunk_bounds(n, world, r)
        outs.append(srcs[r][a:b] if alias else torch.empty(b - a))

    async def one(ring: FakeRing, r: int) -> tuple[int, int]:
        return await ring_reduce_scatter(ring.peers(r), 3, srcs[r], outs[r], ReduceOp.SUM, quant, piece_bytes=128, window=2)

    _run(world, one, seed=world)
    ref = np.stack([x.double().numpy() for x in xs]).sum(0)
    for r in range(world):
        a, b = chunk_bounds(n, world, r)
        if quant is None:
            _check_floats(outs[r], [x[a:b] for x in xs], ReduceOp.SUM)
        else:
            span = 2 * np.abs(np.stack([x.double().numpy() for x in xs])).sum(0).max()
            assert np.abs(outs[r].double().numpy() - ref[a:b]).max() <= world * 0.5 * span / 255 + 1e-3
        if not alias:
            assert torch.equal(srcs[r], xs[r])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("m", [0, 1, 777])
def test_all_gather(world: int, as_list: bool, m: int) -> None:
    xs = _inputs(torch.int16, ReduceOp.SUM, world, m, seed=m)
    if as_list:
        dsts: list[Any] = [[torch.zeros(m, dtype=torch.int16) for _ in range(world)] for _ in range(world)]
    else:
        dsts = [torch.zeros(world * m, dtype=torch.int16) for _ in range(world)]

    async def one(ring: FakeRing, r: int) -> tuple[int, int]:
        return await ring_all_gather(ring.peers(r), 8, xs[r], dsts[r], piece_bytes=64, window=2)

    infos, _ = _run(world, one, seed=m)
    expected = torch.cat(xs)
    for r in range(world):
        got = torch.cat(dsts[r]) if as_list else dsts[r]
        assert torch.equal(got, expected)
        assert infos[r] == (2 * m * (world - 1), 2 * m * (world - 1))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("root", [0, 1, 4])
def test_broadcast(world: int, root: int) -> None:
    root %= world
    xs = _inputs(torch.float64, ReduceOp.SUM, world, 1234, seed=root)
    ts = [x.clone() for x in xs]

    async def one(ring: FakeRing, r: int) -> tuple[int, int]:
        return await ring_broadcast(ring.peers(r), 2, ts[r], root, piece_bytes=1024)

    infos, _ = _run(world, one, seed=root)
    for r in range(world):
        assert torch.equal(ts[r], xs[root])
        hops = (r - root) % world
        assert infos[r] == ((8 * 1234 if hops < world - 1 else 0), (8 * 1234 if hops > 0 else 0))


@pytest.mark.parametrize("fail_after", [1, 5, 40])
@pytest.mark.parametrize("quant", [None, Quantization(torch.uint4)], ids=["plain", "uint4"])
def test_a_broken_link_fails_every_rank_and_leaves_src_alone(fail_after: int, quant: Quantization | None) -> None:
    world, n = 4, 3000
    xs = _inputs(torch.float32, ReduceOp.SUM, world, n, seed=fail_after)
    srcs = [x.clone() for x in xs]
    ring = FakeRing(world, seed=fail_after)
    ring.fail_after = fail_after  # then link 0 (rank 0 -> rank 1) breaks

    async def one(r: int) -> tuple[int, int]:
        return await ring_all_reduce(ring.peers(r), 1, srcs[r], torch.empty(n), ReduceOp.SUM, quant, piece_bytes=256)

    async def main() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in range(world)), return_exceptions=True), 10)

    results = asyncio.run(main())
    # Ranks 0 and 1 see the broken link; abort(tag) carries the failure on to ranks 2 and 3.
    assert all(isinstance(res, PeerLostError) for res in results), results
    assert sorted(rank for rank, _tag, _reason in ring.aborts) == list(range(world))
    assert all(tag == 1 and reason.startswith(f"rank {rank}: PeerLostError: ") for rank, tag, reason in ring.aborts)
    for s, x in zip(srcs, xs):
        assert torch.equal(s, x)
    for box in ring.links:
        assert not box.posted  # cancelled receives were withdrawn; nothing will write later


def test_without_propagation_the_far_ranks_wait_for_their_caller() -> None:
    world, n = 4, 3000
    ring = FakeRing(world, seed=1, propagate=False)
    ring.fail_after = 3

    async def main() -> list[Any]:
        tasks = [
            asyncio.ensure_future(
                ring_all_reduce(ring.peers(r), 1, torch.ones(n), torch.empty(n), ReduceOp.SUM, piece_bytes=256)
            )
            for r in range(world)
        ]
        done, pending = await asyncio.wait(tasks, timeout=0.5)
        assert {tasks.index(t) for t in done} == {0, 1}  # only the link's two ends know
        for t in pending:  # what the Communicator does when the master reports the failure
            t.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], PeerLostError) and isinstance(results[1], PeerLostError)
    assert all(isinstance(res, asyncio.CancelledError) for res in results[2:])
    assert all(not box.posted for box in ring.links)


def test_cancelling_the_caller_withdraws_every_transfer() -> None:
    ring = FakeRing(3)

    async def main() -> None:
        x = torch.ones(5000)
        # only rank 0 runs: its receives can never complete
        task = asyncio.ensure_future(ring_all_reduce(ring.peers(0), 4, x, x, ReduceOp.SUM, piece_bytes=512))
        for _ in range(20):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert all(not box.posted for box in ring.links)
    assert 4 in ring.links[2].forgotten  # forget(tag) reached the link we receive from
    assert ring.aborts == [(0, 4, "rank 0: cancelled")]  # and the neighbours were told


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.zeros(4), torch.zeros(5)),
        lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.float64)),
        lambda: (torch.zeros(4, 2).t(), torch.zeros(2, 4)),
        lambda: (torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)),
        lambda: (torch.zeros(4, dtype=torch.complex64), torch.zeros(4, dtype=torch.complex64)),
    ],
)
def test_bad_arguments_are_refused_with_advice(make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
    src, dst = make()

    async def main() -> None:
        await ring_all_reduce(FakeRing(2).peers(0), 0, src, dst, ReduceOp.SUM)

    with pytest.raises(InvalidUsageError):
        asyncio.run(main())


def test_partly_overlapping_tensors_are_refused() -> None:
    base = torch.zeros(10)

    async def main() -> None:
        await ring_all_reduce(FakeRing(2).peers(0), 0, base[:6], base[4:], ReduceOp.SUM)

    with pytest.raises(InvalidUsageError, match="overlap"):
        asyncio.run(main())


def test_offloaded_reductions_give_the_same_bits() -> None:
    xs = _inputs(torch.float32, ReduceOp.SUM, 3, 5000, 21)
    results = []
    for offload in (False, True):
        outs = [x.clone() for x in xs]

        async def one(ring: FakeRing, r: int, outs: list[torch.Tensor] = outs, offload: bool = offload) -> tuple[int, int]:
            return await ring_all_reduce(ring.peers(r), 6, outs[r], outs[r], ReduceOp.SUM, piece_bytes=1024, offload=offload)

        _run(3, one, seed=2)
        results.append(outs[0].numpy().tobytes())
    assert results[0] == results[1]


def test_pieces_smaller_than_an_element_still_move_one_element_each() -> None:
    xs = _inputs(torch.float64, ReduceOp.SUM, 2, 9, 1)
    dsts, infos = _all_reduce(xs, ReduceOp.SUM, inplace=False, piece_bytes=1, window=2)
    _check_floats(dsts[0], xs, ReduceOp.SUM)


def test_reduce_scatter_and_all_gather_refuse_wrong_shapes() -> None:
    async def rs() -> None:
        await ring_reduce_scatter(FakeRing(3).peers(1), 0, torch.zeros(10), torch.zeros(4))  # chunk 1 has 3

    async def ag() -> None:
        await ring_all_gather(FakeRing(3).peers(0), 0, torch.zeros(4), torch.zeros(11))

    async def bcast() -> None:
        await ring_broadcast(FakeRing(3).peers(0), 0, torch.zeros(4), 3)

    for call in (rs, ag, bcast):
        with pytest.raises(InvalidUsageError):
            asyncio.run(call())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mib", [1, 12])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_scratch_stays_within_half_the_tensor(world: int, mib: int, inplace: bool) -> None:
    n = (mib << 20) // 4
    xs = [torch.ones(n) for _ in range(world)]
    dsts = xs if inplace else [torch.empty(n) for _ in range(world)]
    pools = [BufferPool() for _ in range(world)]

    async def one(ring: FakeRing, r: int) -> tuple[int, int]:
        return await ring_all_reduce(ring.peers(r), 1, xs[r], dsts[r], ReduceOp.SUM, pool=pools[r])

    _run(world, one)
    assert all(torch.equal(d, torch.full((n,), float(world))) for d in dsts)
    for pool in pools:
        assert pool.allocated_bytes <= (n * 4) // 2 if inplace else pool.allocated_bytes == 0
