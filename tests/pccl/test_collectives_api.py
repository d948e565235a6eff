"""The collective API's argument checks, a group of one, async handles, the host-buffer cache
and the retry rule, with an in-process master and Communicators (real TCP on 127.0.0.1)."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pccl
from pccl import InvalidUsageError, MasterConnectionError, PeerLostError, ReduceInfo, ReduceOp, TooFewPeersError
from pccl.collective_retry import reduce_multiple_with_retry
from pccl.collective_staging import HostBuffers
from pccl.communicator import Communicator
from pccl.master import Master
from collective_helpers import wait_for


@pytest.fixture(scope="module")
def master() -> Iterator[Master]:
    with Master("127.0.0.1", 0, heartbeat_timeout=5.0) as m:
        yield m


@pytest.fixture(autouse=True)
def _run_empty_afterwards(master: Master) -> Iterator[None]:
    """Each test starts with no accepted peer, so its first peer is accepted at once (§5.3)."""
    yield
    wait_for(lambda: not master.status()["accepted"], 20, "the test's peers to leave the run")


@pytest.fixture(scope="module")
def groups() -> Iterator[int]:
    return itertools.count(100)


@pytest.fixture
def alone(master: Master, groups: Iterator[int]) -> Iterator[Communicator]:
    """A connected Communicator alone in a group of its own (the only peer of the run)."""
    comm = Communicator(master.address, peer_group=next(groups), connections=1)
    comm.connect(timeout=20)
    yield comm
    comm.close()


BAD_CALLS: list[tuple[str, Callable[[Communicator], Any], str]] = [
    ("non-contiguous", lambda c: c.all_reduce(torch.zeros(4, 4).t()), "not contiguous"),
    ("bool", lambda c: c.all_reduce(torch.zeros(3, dtype=torch.bool)), "dtype torch.bool"),
    ("complex", lambda c: c.all_reduce(torch.zeros(3, dtype=torch.complex64)), "dtype torch.complex64"),
    ("not a tensor", lambda c: c.all_reduce([1.0, 2.0]), "must be a torch.Tensor"),  # type: ignore[arg-type]
    ("op", lambda c: c.all_reduce(torch.zeros(3), op="sum"), "pccl.ReduceOp"),  # type: ignore[arg-type]
    ("out shape", lambda c: c.all_reduce(torch.zeros(3), out=torch.zeros(4)), "out must match"),
    ("out dtype", lambda c: c.all_reduce(torch.zeros(3), out=torch.zeros(3, dtype=torch.float64)), "out must match"),
    ("out overlaps", lambda c: (lambda t: c.all_reduce(t[:3], out=t[1:]))(torch.zeros(4)), "partly overlaps"),
    ("tag negative", lambda c: c.all_reduce(torch.zeros(3), tag=-1), "tag must be an int"),
    ("tag too big", lambda c: c.all_reduce(torch.zeros(3), tag=2**63), "tag must be an int"),
    ("tag bool", lambda c: c.all_reduce(torch.zeros(3), tag=True), "tag must be an int"),
    ("quantize ints", lambda c: c.all_reduce(torch.zeros(3, dtype=torch.int32),
                                             quantization=pccl.Quantization()), "floating-point"),
    ("quantization type", lambda c: c.all_reduce(torch.zeros(3), quantization="uint8"), "pccl.Quantization"),  # type: ignore[arg-type]
    ("async tag", lambda c: c.all_reduce_async(torch.zeros(3), tag="a"), "tag must be an int"),  # type: ignore[arg-type]
    ("max_in_flight", lambda c: c.all_reduce_multiple_with_retry([torch.zeros(3)], max_in_flight=0), "max_in_flight"),
    ("shared memory", lambda c: (lambda t: c.all_reduce_multiple_with_retry([t[:5], t[4:]]))(torch.zeros(9)),
     "share memory"),
    ("root", lambda c: c.broadcast(torch.zeros(3), root_peer=10**6), "not in the group"),
    ("root type", lambda c: c.broadcast(torch.zeros(3), root_peer="1"), "root_peer"),  # type: ignore[arg-type]
    ("scatter size", lambda c: c.reduce_scatter(torch.zeros(6), torch.zeros(5)), "owns 6 of 6"),
    ("scatter overlap", lambda c: (lambda t: c.reduce_scatter(t, t[:6]))(torch.zeros(6)), "separate tensor"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, call, message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_arguments_raise_invalid_usage_naming_the_problem(
    alone: Communicator, name: str, call: Callable[[Communicator], Any], message: str
) -> None:
    with pytest.raises(InvalidUsageError, match=message):
        call(alone)
    # The refusal left nothing behind: the same tag works right after.
    assert alone.all_reduce(torch.ones(2)) == ReduceInfo(1, 0, 0)


@pytest.mark.timeout(30)
def test_calls_before_connect_and_after_close_are_refused(master: Master) -> None:
    comm = Communicator(master.address, peer_group=7, connections=1)
    with pytest.raises(InvalidUsageError, match="before connect"):
        comm.all_reduce(torch.zeros(2))
    comm.connect(timeout=20)
    comm.close()
    for call in (lambda: comm.all_reduce(torch.zeros(2)), lambda: comm.all_gather(torch.zeros(2)),
                 lambda: comm.all_reduce_multiple_with_retry([torch.zeros(2)]),
                 lambda: comm.broadcast(torch.zeros(2), 1), lambda: comm.all_reduce_async(torch.zeros(2))):
        with pytest.raises(InvalidUsageError, match="after close"):
            call()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", list(ReduceOp))
def test_a_group_of_one_reduces_to_its_own_input(alone: Communicator, op: ReduceOp) -> None:
    x = torch.arange(-5, 6, dtype=torch.int16)
    assert alone.all_reduce(x, op=op) == ReduceInfo(1, 0, 0)
    assert x.tolist() == list(range(-5, 6))
    out = torch.zeros_like(x)
    alone.all_reduce(x, op=op, out=out, quantization=None)
    assert out.tolist() == list(range(-5, 6))
    f = torch.linspace(-1, 1, 9, dtype=torch.bfloat16)
    alone.all_reduce_async(f, op=op, quantization=pccl.Quantization(torch.uint4)).wait(10)
    assert torch.equal(f, torch.linspace(-1, 1, 9, dtype=torch.bfloat16))  # nothing to quantize alone


@pytest.mark.timeout(30)
def test_a_group_of_one_gathers_and_broadcasts_itself_but_cannot_retry_reduce(alone: Communicator) -> None:
    x = torch.tensor([[1.5, 2.5]], dtype=torch.float64)
    (got,) = alone.all_gather(x)
    assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()
    assert alone.broadcast(x, alone.peer_id) == ReduceInfo(1, 0, 0)
    out = torch.zeros(2, dtype=torch.float64)
    alone.reduce_scatter(x.view(-1), out)
    assert out.tolist() == [1.5, 2.5]
    ts = [torch.ones(3), torch.full((2,), 2.0)]
    with pytest.raises(TooFewPeersError, match="at least 2 peers"):
        alone.all_reduce_multiple_with_retry(ts)
    assert [t.tolist() for t in ts] == [[1.0, 1.0, 1.0], [2.0, 2.0]]


@pytest.mark.timeout(30)
def test_async_handle_waits_with_a_timeout_until_the_group_joins(master: Master) -> None:
    comms = [Communicator(master.address, peer_group=50, connections=1) for _ in range(2)]
    try:
        comms[0].connect(timeout=20)
        joining = threading.Thread(target=comms[1].connect, kwargs={"timeout": 20})
        joining.start()
        wait_for(lambda: master.status()["pending"], 20, "the second peer to register")
        comms[0].update_topology()
        joining.join()
        x0, x1 = torch.full((1001,), 1.0), torch.full((1001,), 2.0)
        h0 = comms[0].all_reduce_async(x0, tag=9)
        with pytest.raises(TimeoutError):
            h0.wait(timeout=0.05)  # the other member has not joined the operation yet
        assert not h0.done() and h0.tag == 9
        with pytest.raises(InvalidUsageError, match="tag 9 is already in flight"):
            comms[0].all_reduce(torch.zeros(1), tag=9)
        info1 = comms[1].all_reduce_async(x1, tag=9).wait(20)
        assert h0.wait(20).world_size == info1.world_size == 2
        assert h0.done() and x0.eq(3.0).all() and x1.eq(3.0).all()
        # Closing with an operation in flight ends it with MasterConnectionError, input restored.
        h = comms[0].all_reduce_async(x0, tag=10)
        comms[0].close()
        with pytest.raises(MasterConnectionError, match="closed"):
            h.wait(20)
        assert x0.eq(3.0).all()
    finally:
        for comm in comms:
            comm.close()


def test_host_buffers_reuse_the_best_fit_and_keep_only_a_few() -> None:
    cache = HostBuffers()
    small, big = cache.take(100), cache.take(1 << 20)
    assert small.numel() == 64 * 1024 and big.numel() == 1 << 20
    cache.give(big)
    cache.give(small)
    assert cache.take(1000).data_ptr() == small.data_ptr()  # the smallest that fits
    assert cache.take(1000).data_ptr() == big.data_ptr()
    many = [cache.take(64 * 1024 * (i + 1)) for i in range(10)]
    for buf in many:
        cache.give(buf)
    assert cache.cached_bytes() == sum(64 * 1024 * (i + 1) for i in range(2, 10))  # the 8 largest
    cache.clear()
    assert cache.cached_bytes() == 0


def _done(value: ReduceInfo | BaseException) -> concurrent.futures.Future[ReduceInfo]:
    f: concurrent.futures.Future[ReduceInfo] = concurrent.futures.Future()
    if isinstance(value, BaseException):
        f.set_exception(value)
    else:
        f.set_result(value)
    return f


@settings(max_examples=200, deadline=None)
@given(failures=st.lists(st.integers(0, 3), min_size=1, max_size=12), window=st.integers(1, 5))
def test_retry_keeps_the_lowest_unfinished_in_flight_and_retries_until_all_succeed(
    failures: list[int], window: int
) -> None:
    attempts = [0] * len(failures)
    succeeded: set[int] = set()

    def start(i: int) -> concurrent.futures.Future[ReduceInfo]:
        # Every member must pick the same operations: i is among the `window` lowest unfinished.
        assert i in [j for j in range(len(failures)) if j not in succeeded][:window]
        attempts[i] += 1
        if attempts[i] <= failures[i]:
            return _done(PeerLostError("lost"))
        succeeded.add(i)
        return _done(ReduceInfo(5 - attempts[i], 10 * i, i))

    info = reduce_multiple_with_retry(len(failures), window, start)
    assert attempts == [f + 1 for f in failures]
    assert info == ReduceInfo(5 - max(attempts), sum(10 * i for i in range(len(failures))), sum(range(len(failures))))


def test_retry_stops_at_the_first_other_error_after_the_running_ones_ended() -> None:
    started: list[int] = []
    pending = concurrent.futures.Future()  # type: concurrent.futures.Future[ReduceInfo]

    def start(i: int) -> concurrent.futures.Future[ReduceInfo]:
        started.append(i)
        if i == 0:
            return pending
        if i == 1:
            threading.Timer(0.05, lambda: pending.set_result(ReduceInfo(2, 1, 1))).start()
            return _done(TooFewPeersError("alone"))
        raise AssertionError("nothing starts after the error")

    with pytest.raises(TooFewPeersError, match="alone"):
        reduce_multiple_with_retry(4, 2, start)
    assert started == [0, 1] and pending.done()  # it waited for operation 0 before raising
