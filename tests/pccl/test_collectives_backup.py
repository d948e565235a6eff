"""The in-place backup copied while the ring runs (``pccl.collective_staging.BackupFill``,
``docs/protocol.md`` §5.6.1): the copy order, the guard it gives the ring, the restore of what
was copied, and real peers that lose a member in the middle of a large in-place all-reduce.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from typing import Iterator

import pytest
import torch

from collective_helpers import kill_all, start_groups, wait_for
from collectives.schedule import chunk_bounds, piece_bounds, piece_count
from pccl.collective_staging import OVERLAP_MIN_BYTES, BackupFill, HostBuffers, fill_order, stage_in_place
from pccl.master import Master


@pytest.fixture
def copier() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


@pytest.mark.parametrize("world, n", [(1, 5), (2, 1_000_001), (3, 3_000_017), (4, 7)])
def test_blocks_cover_the_tensor_once_in_the_order_a_ring_writes_pieces(world: int, n: int) -> None:
    t = torch.empty(n, dtype=torch.float32)
    blocks = fill_order(t, world, piece_bytes=1 << 20)
    covered = sorted(blocks)
    assert covered[0][0] == 0 and covered[-1][1] == n
    assert all(a < b for a, b in blocks) and all(b == c for (_, b), (c, _) in zip(covered, covered[1:]))
    chunks = [chunk_bounds(n, world, c) for c in range(world)]
    pieces = piece_count(max(b - a for a, b in chunks), 4, 1 << 20)
    expected = [piece_bounds(a, b, pieces, p) for p in range(pieces) for a, b in chunks]
    assert blocks == [(a, b) for a, b in expected if b > a]


def test_the_guard_waits_for_the_copy_and_a_restore_undoes_every_write(
    copier: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gate = threading.Event()
    copier.submit(gate.wait)  # the fill queues behind this until the gate opens
    x = torch.arange(1000, dtype=torch.float64)
    original = x.clone()
    fill = BackupFill(x, torch.empty(1000, dtype=torch.float64), [(500, 1000), (0, 500)], copier)
    assert not fill.is_writable(0, 1) and not fill.is_writable(999, 1000) and fill.is_writable(7, 7)

    async def scenario() -> list[str]:
        order: list[str] = []

        async def wait(name: str, a: int, b: int) -> None:
            await fill.writable(a, b)
            order.append(name)

        waits = [asyncio.ensure_future(wait("tail", 600, 700)), asyncio.ensure_future(wait("both", 400, 600))]
        await asyncio.sleep(0.05)
        assert order == []  # nothing copied yet
        gate.set()
        await asyncio.wait_for(asyncio.gather(*waits), 10)
        return order

    assert asyncio.run(scenario()) == ["tail", "both"]  # the second block is copied last
    assert fill.is_writable(0, 1000)
    x.mul_(-3)  # the ring's writes
    fill.restore()
    assert torch.equal(x, original)


def test_a_fill_still_queued_is_cancelled_and_restores_nothing(copier: concurrent.futures.ThreadPoolExecutor) -> None:
    gate = threading.Event()
    copier.submit(gate.wait)
    x = torch.ones(100)
    fill = BackupFill(x, torch.full((100,), 9.0), [(0, 100)], copier)
    fill.restore()  # nothing was copied, so nothing may have been written: x stays as it is
    gate.set()
    assert torch.equal(x, torch.ones(100)) and fill.finish() == 0


def test_only_large_in_place_cpu_tensors_get_a_background_backup(copier: concurrent.futures.ThreadPoolExecutor) -> None:
    cache = HostBuffers()
    small = stage_in_place(torch.ones(1000), cache, lambda: cache, overlap=(copier, 2))
    big_t = torch.randn(OVERLAP_MIN_BYTES // 4)
    big = stage_in_place(big_t, cache, lambda: cache, overlap=(copier, 2))
    try:
        assert small.guard is None and small.src is not small.dst  # the ring reads the backup
        assert big.guard is not None and big.src is big.dst  # the ring runs in place
        asyncio.run(big.guard.writable(0, big_t.numel()))  # the whole backup is copied
        before = big_t.clone()
        big_t.zero_()
        big.failed()
        assert torch.equal(big_t, before)
    finally:
        small.release()
        big.release()


@pytest.mark.timeout(90)
def test_a_peer_lost_during_a_large_in_place_reduce_leaves_every_input_as_it_was() -> None:
    # 20 MiB float32: the survivors' backups are copied while their rings run.
    spec = {"op": "sum", "dtype": "float32", "numel": 5_000_011, "name": "big", "tag": 3, "seed": 3}
    assert spec["numel"] * 4 >= OVERLAP_MIN_BYTES
    with Master("127.0.0.1", 0, heartbeat_timeout=2.0) as master:
        peers = start_groups(master, {0: 3})[0]
        try:
            survivors, victim = peers[:2], peers[2]
            victim.call("stall", ops=[spec])  # in the operation, but never sends
            for peer in survivors:
                assert peer.call("start", **spec) == {"done": False}
            wait_for(lambda: any(p.call("changed", name="big") for p in survivors), 20, "the ring to write")
            victim.signal(signal.SIGKILL)
            outcomes = [p.call("wait", name="big", timeout=10) for p in survivors]
            assert [o.get("error") for o in outcomes] == ["PeerLostError"] * 2, outcomes
            assert all(o["input_unchanged"] for o in outcomes), outcomes
        finally:
            kill_all(peers)
