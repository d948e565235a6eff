"""Public API misuse: clear errors, and never a corrupted tensor on another peer.

Complements ``test_collectives_api.py`` (argument checks of ``all_reduce``, calls
before connect / after close of the collectives) and ``test_collectives.py``
(``all_reduce`` descriptor mismatches across processes). Here: the other entry points
(``all_gather``, ``broadcast``, ``reduce_scatter``, ``all_reduce_multiple_with_retry``,
``sync_shared_state``) with bad tensors and with peers that disagree, what the *other*
peer sees and holds afterwards, that the group works normally right after, and every
call after ``close()``. Peers are in-process Communicators on 127.0.0.1; every expected
value is computed here with numpy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

import pccl
from parallel import in_parallel
from pccl import InvalidUsageError, MasterConnectionError, PeerLostError, SharedStateError

HB = 2.0


@pytest.fixture(scope="module")
def master() -> Iterator[pccl.Master]:
    with pccl.Master("127.0.0.1", 0, heartbeat_timeout=HB) as m:
        yield m


@pytest.fixture(scope="module")
def groups() -> Iterator[int]:
    return itertools.count(300)


@pytest.fixture
def pair(master: pccl.Master, groups: Iterator[int]) -> Iterator[tuple[pccl.Communicator, pccl.Communicator]]:
    """Two accepted peers alone in a fresh group."""
    group = next(groups)
    a, b = (pccl.Communicator(master.address, peer_group=group, connections=1) for _ in range(2))
    a.connect(timeout=20)
    joiner = threading.Thread(target=b.connect, kwargs={"timeout": 20})
    joiner.start()
    while not a.are_peers_pending():
        pass  # a vote each time: returns once b registered
    a.update_topology()
    joiner.join(20)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def ints(peer: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(n, dtype=dtype) * 10 + peer


def assert_group_still_reduces(a: pccl.Communicator, b: pccl.Communicator) -> None:
    """A correct all-reduce right after the misuse: exact, on both peers."""
    xa, xb = ints(a.peer_id, 1000), ints(b.peer_id, 1000)
    expected = np.arange(1000) * 20 + a.peer_id + b.peer_id
    assert in_parallel(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb)) == [pccl.ReduceInfo(2, 8000, 8000)] * 2
    assert np.array_equal(xa.numpy(), expected) and np.array_equal(xb.numpy(), expected)


# -- bad tensors at the other entry points ----------------------------------------------------

NON_CONTIGUOUS = torch.zeros(4, 6)[:, ::2]

BAD_CALLS: list[tuple[str, Callable[[pccl.Communicator], Any], type[Exception], str]] = [
    ("gather non-contiguous", lambda c: c.all_gather(NON_CONTIGUOUS), InvalidUsageError, "not contiguous"),
    ("gather bool", lambda c: c.all_gather(torch.zeros(3, dtype=torch.bool)), InvalidUsageError, "torch.bool"),
    ("gather tag", lambda c: c.all_gather(torch.zeros(3), tag=-2), InvalidUsageError, "tag must be"),
    ("broadcast non-contiguous", lambda c: c.broadcast(NON_CONTIGUOUS, c.peer_id), InvalidUsageError,
     "not contiguous"),
    ("broadcast complex", lambda c: c.broadcast(torch.zeros(2, dtype=torch.complex64), c.peer_id),
     InvalidUsageError, "complex64"),
    ("scatter out non-contiguous", lambda c: c.reduce_scatter(torch.zeros(12), torch.zeros(4, 3)[:, 0]),
     InvalidUsageError, "out is not contiguous"),
    ("scatter out dtype", lambda c: c.reduce_scatter(torch.zeros(12), torch.zeros(6, dtype=torch.float64)),
     InvalidUsageError, "same dtype"),
    ("multi one non-contiguous", lambda c: c.all_reduce_multiple_with_retry([torch.zeros(3), NON_CONTIGUOUS]),
     InvalidUsageError, r"tensors\[1\] is not contiguous"),
    ("multi not a tensor",
     lambda c: c.all_reduce_multiple_with_retry([torch.zeros(3), [1.0]]),  # type: ignore[list-item]
     InvalidUsageError, r"tensors\[1\] must be a torch.Tensor"),
    ("multi quantized ints", lambda c: c.all_reduce_multiple_with_retry(
        [torch.zeros(3, dtype=torch.int32)], quantization=pccl.Quantization()), InvalidUsageError, "floating-point"),
    ("async non-contiguous", lambda c: c.all_reduce_async(NON_CONTIGUOUS), InvalidUsageError, "not contiguous"),
    ("async float8", lambda c: c.all_reduce_async(torch.zeros(3, dtype=torch.float8_e4m3fn)), InvalidUsageError,
     "float8"),
    ("sync not a state",
     lambda c: c.sync_shared_state({"w": torch.zeros(2)}),  # type: ignore[arg-type]
     InvalidUsageError, "SharedState"),
    ("sync bad strategy",
     lambda c: c.sync_shared_state(pccl.SharedState({"w": torch.zeros(2)}), "popular"),  # type: ignore[arg-type]
     InvalidUsageError, "SyncStrategy"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, call, error, message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_refused_before_anything_is_sent(
    pair: tuple[pccl.Communicator, pccl.Communicator], name: str, call: Callable[[pccl.Communicator], Any],
    error: type[Exception], message: str,
) -> None:
    a, b = pair
    with pytest.raises(error, match=message):
        call(a)
    # Nothing was started: the group carries on as if the call never happened.
    assert_group_still_reduces(a, b)


# -- peers that disagree ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel_b, dtype_b, key", [(1001, torch.int64, "numel"), (1000, torch.int32, "dtype")])
def test_all_gather_mismatch_fails_both_and_gathers_nothing(
    pair: tuple[pccl.Communicator, pccl.Communicator], numel_b: int, dtype_b: torch.dtype, key: str
) -> None:
    a, b = pair
    xa, xb = ints(a.peer_id, 1000), ints(b.peer_id, numel_b, dtype_b)
    got = in_parallel(lambda: a.all_gather(xa), lambda: b.all_gather(xb))
    assert all(isinstance(e, InvalidUsageError) and repr(key) in str(e) for e in got), got
    assert torch.equal(xa, ints(a.peer_id, 1000)) and torch.equal(xb, ints(b.peer_id, numel_b, dtype_b))
    assert_group_still_reduces(a, b)


@pytest.mark.timeout(60)
def test_broadcast_from_different_roots_fails_both_and_overwrites_nothing(
    pair: tuple[pccl.Communicator, pccl.Communicator],
) -> None:
    a, b = pair
    xa, xb = ints(a.peer_id, 500), ints(b.peer_id, 500)
    got = in_parallel(lambda: a.broadcast(xa, a.peer_id), lambda: b.broadcast(xb, b.peer_id))
    assert all(isinstance(e, InvalidUsageError) and "'root'" in str(e) for e in got), got
    assert torch.equal(xa, ints(a.peer_id, 500)) and torch.equal(xb, ints(b.peer_id, 500))
    assert_group_still_reduces(a, b)


@pytest.mark.timeout(60)
def test_multiple_with_retry_size_mismatch_is_detected_not_reduced(
    pair: tuple[pccl.Communicator, pccl.Communicator],
) -> None:
    a, b = pair
    ta = [ints(a.peer_id, 100), ints(a.peer_id, 200), ints(a.peer_id, 300)]
    tb = [ints(b.peer_id, 100), ints(b.peer_id, 201), ints(b.peer_id, 300)]  # tensor 1 is one element longer
    got = in_parallel(lambda: a.all_reduce_multiple_with_retry(ta, max_in_flight=1),
               lambda: b.all_reduce_multiple_with_retry(tb, max_in_flight=1))
    assert all(isinstance(e, InvalidUsageError) and "'numel'" in str(e) for e in got), got
    # Tensor 0 was reduced before the mismatch came up; 1 and 2 were never reduced.
    total = np.arange(100) * 20 + a.peer_id + b.peer_id
    assert np.array_equal(ta[0].numpy(), total) and np.array_equal(tb[0].numpy(), total)
    assert torch.equal(ta[1], ints(a.peer_id, 200)) and torch.equal(tb[1], ints(b.peer_id, 201))
    assert torch.equal(ta[2], ints(a.peer_id, 300)) and torch.equal(tb[2], ints(b.peer_id, 300))
    assert_group_still_reduces(a, b)


@pytest.mark.timeout(60)
def test_reduce_scatter_with_a_wrong_out_on_one_peer_fails_in_parallel(
    pair: tuple[pccl.Communicator, pccl.Communicator],
) -> None:
    a, b = pair
    xa, xb = ints(a.peer_id, 10), ints(b.peer_id, 10)
    out_a, out_b = torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)  # b's chunk has 5
    got = in_parallel(lambda: a.reduce_scatter(xa, out_a), lambda: b.reduce_scatter(xb, out_b))
    errors = {type(e) for e in got}
    assert all(isinstance(e, (InvalidUsageError, PeerLostError)) for e in got), got
    assert InvalidUsageError in errors and any("out has 4 elements" in str(e) for e in got), got
    assert torch.equal(xa, ints(a.peer_id, 10)) and torch.equal(xb, ints(b.peer_id, 10))
    assert_group_still_reduces(a, b)


@pytest.mark.timeout(60)
def test_shared_state_shape_mismatch_removes_one_peer_and_leaves_the_other_intact(
    pair: tuple[pccl.Communicator, pccl.Communicator],
) -> None:
    a, b = pair
    wa, wb = torch.arange(6, dtype=torch.float32), torch.arange(7, dtype=torch.float32)
    sa, sb = pccl.SharedState({"w": wa}, revision=3), pccl.SharedState({"w": wb}, revision=3)
    got = in_parallel(lambda: a.sync_shared_state(sa), lambda: b.sync_shared_state(sb))
    failed = [e for e in got if isinstance(e, Exception)]
    assert len(failed) == 1 and isinstance(failed[0], SharedStateError) and "'w'" in str(failed[0]), got
    assert torch.equal(wa, torch.arange(6.0)) and torch.equal(wb, torch.arange(7.0))
    survivor, removed = (a, b) if got[0] is not failed[0] else (b, a)
    with pytest.raises(SharedStateError):  # a removed peer's later calls say so too
        removed.all_reduce(torch.zeros(2))
    assert survivor.world_size == 1


# -- after close ------------------------------------------------------------------------------

AFTER_CLOSE: list[tuple[str, Callable[[pccl.Communicator], Any]]] = [
    ("are_peers_pending", lambda c: c.are_peers_pending()),
    ("update_topology", lambda c: c.update_topology()),
    ("optimize_topology", lambda c: c.optimize_topology()),
    ("sync_shared_state", lambda c: c.sync_shared_state(pccl.SharedState({"w": torch.zeros(2)}))),
    ("reduce_scatter", lambda c: c.reduce_scatter(torch.zeros(4), torch.zeros(2))),
    ("peer_id", lambda c: c.peer_id),
    ("ring", lambda c: c.ring),
    ("global_world_size", lambda c: c.global_world_size),
]


@pytest.mark.timeout(60)
def test_every_call_after_close_is_refused_and_says_so(pair: tuple[pccl.Communicator, pccl.Communicator]) -> None:
    a, b = pair
    a.close()
    for name, call in AFTER_CLOSE:
        with pytest.raises(InvalidUsageError, match="after close"):
            call(a)
    # The peer left; the other one is alone and says so instead of waiting.
    with pytest.raises(pccl.TooFewPeersError):
        b.all_reduce_multiple_with_retry([torch.zeros(2)])


@pytest.mark.timeout(60)
def test_closing_with_operations_in_flight_ends_each_with_an_error(
    pair: tuple[pccl.Communicator, pccl.Communicator],
) -> None:
    a, b = pair
    x, y = ints(a.peer_id, 100), ints(a.peer_id, 50)
    before_x, before_y = x.clone(), y.clone()
    handle = a.all_reduce_async(x, tag=1)  # b never joins in: both reduces wait for b
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        blocked = pool.submit(a.all_reduce, y)
        # A call whose coroutine outlives the session's own failure: only stopping the
        # loop ends it (the path by which a blocked caller used to get
        # asyncio.CancelledError, which `except Exception` does not catch).
        endless = pool.submit(a._blocking, "waiting", lambda session: asyncio.sleep(3600))
        while a._session is None or len(a._session.collectives) < 2:
            time.sleep(0.01)  # both reduces are in flight
        a.close()
        for wait in (handle.wait, blocked.result, endless.result):
            with pytest.raises(MasterConnectionError, match="closed"):
                wait(10)
    assert torch.equal(x, before_x) and torch.equal(y, before_y)  # restored, as after any failure
