"""Communicator API behaviour with in-process peers (each with its own loop thread) on 127.0.0.1.

Covers misuse (``InvalidUsageError`` with a message saying what to do), refusals with
reasons, link failures (``TopologyUpdateError``, then a successful retry), the
collective machinery (a real body passing bytes around the ring, descriptor checks,
aborts) and the master going away.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Iterator

import pytest

from parallel import in_parallel
from pccl import protocol as P
from pccl.communicator import Communicator, parse_address
from pccl.errors import (
    InvalidUsageError,
    MasterConnectionError,
    PeerLostError,
    TopologyUpdateError,
)
from pccl.master import Master
from pccl.peer_session import CollectiveContext
from transport.connection import open_connection

HB = 2.0


@pytest.fixture
def master() -> Iterator[Master]:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as m:
        yield m


@pytest.fixture
def make_comm() -> Iterator[Callable[..., Communicator]]:
    comms: list[Communicator] = []

    def make(address: str, **kwargs: Any) -> Communicator:
        comm = Communicator(address, connections=2, **kwargs)
        comms.append(comm)
        return comm

    yield make
    for comm in comms:
        comm.close()


def group_of(master: Master, make_comm: Callable[..., Communicator], n: int) -> list[Communicator]:
    """``n`` accepted peers of group 0."""
    comms = [make_comm(master.address) for _ in range(n)]
    comms[0].connect()
    if n > 1:
        results = in_parallel(*(c.connect for c in comms[1:]), lambda: _vote_when_pending(master, comms[0], n - 1))
        assert not [r for r in results if isinstance(r, Exception)], results
    return comms


def _vote_when_pending(master: Master, comm: Communicator, pending: int) -> None:
    while len(master.status()["pending"]) < pending:
        threading.Event().wait(0.01)
    comm.update_topology()


async def pass_ids(ctx: CollectiveContext) -> int:
    """Send this peer's id to NEXT, return what PREV sent."""
    if ctx.peers is None:
        return ctx.ring[ctx.rank]
    buf = bytearray(8)
    await asyncio.gather(
        ctx.peers.send_next(ctx.op_id, 0, memoryview(ctx.ring[ctx.rank].to_bytes(8, "little"))),
        ctx.peers.recv_prev(ctx.op_id, 0, memoryview(buf)),
    )
    return int.from_bytes(buf, "little")


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:48148") == ("10.0.0.1", 48148)
    assert parse_address("example.org") == ("example.org", 48148)
    assert parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(InvalidUsageError):
        parse_address("host:notaport")


@pytest.mark.timeout(30)
def test_misuse_raises_invalid_usage_with_advice(master: Master, make_comm: Callable[..., Communicator]) -> None:
    comm = make_comm(master.address)
    with pytest.raises(InvalidUsageError, match="call connect"):
        comm.update_topology()
    comm.connect()
    assert (comm.world_size, comm.global_world_size, comm.num_peer_groups, comm.largest_peer_group_size) == (1, 1, 1, 1)
    with pytest.raises(InvalidUsageError, match="already called"):
        comm.connect()
    comm.close()
    comm.close()  # idempotent
    with pytest.raises(InvalidUsageError, match="after close"):
        comm.update_topology()
    with pytest.raises(InvalidUsageError, match="after close"):
        _ = comm.world_size
    with pytest.raises(InvalidUsageError):
        Communicator(master.address, peer_group=-1)


@pytest.mark.timeout(30)
def test_membership_call_while_collective_in_flight(master: Master, make_comm: Callable[..., Communicator]) -> None:
    a, b = group_of(master, make_comm, 2)
    fut = a._collective_async(4, {"numel": 8}, pass_ids)  # b has not initiated: a waits
    with pytest.raises(InvalidUsageError, match=r"in flight; wait for them"):
        a.update_topology()
    with pytest.raises(InvalidUsageError, match="already in flight"):
        a._collective_blocking(4, {"numel": 8}, pass_ids)
    assert b._collective_blocking(4, {"numel": 8}, pass_ids) == a.peer_id
    assert fut.result(10) == b.peer_id
    a_ring = a.ring
    assert a_ring == b.ring == master.status()["rings"][0]


@pytest.mark.timeout(30)
def test_collective_passes_bytes_around_a_ring_of_three(master: Master, make_comm: Callable[..., Communicator]) -> None:
    comms = group_of(master, make_comm, 3)
    ring = master.status()["rings"][0]
    got = in_parallel(*(lambda c=c: c._collective_blocking(0, {"numel": 8}, pass_ids) for c in comms))
    expected = [ring[ring.index(c.peer_id) - 1] for c in comms]
    assert got == expected


@pytest.mark.timeout(30)
def test_descriptor_mismatch_fails_everywhere_naming_the_difference(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    a, b = group_of(master, make_comm, 2)
    got = in_parallel(
        lambda: a._collective_blocking(1, {"kind": "all_reduce", "numel": 1024}, pass_ids),
        lambda: b._collective_blocking(1, {"kind": "all_reduce", "numel": 2048}, pass_ids),
    )
    for err in got:
        assert isinstance(err, InvalidUsageError)
        assert "'numel'" in str(err) and "1024" in str(err) and "2048" in str(err)
    # The same tag works again once the peers agree.
    assert in_parallel(*(lambda c=c: c._collective_blocking(1, {"numel": 8}, pass_ids) for c in (a, b))) == [
        b.peer_id, a.peer_id]


@pytest.mark.timeout(30)
def test_failing_body_fails_the_op_for_the_whole_group(master: Master, make_comm: Callable[..., Communicator]) -> None:
    a, b = group_of(master, make_comm, 2)

    async def broken(ctx: CollectiveContext) -> None:
        raise PeerLostError("link to the neighbour broke")

    async def waiting(ctx: CollectiveContext) -> None:
        assert ctx.peers is not None
        await ctx.peers.recv_prev(ctx.op_id, 7, memoryview(bytearray(4)))  # never sent

    got = in_parallel(lambda: a._collective_blocking(2, {}, broken), lambda: b._collective_blocking(2, {}, waiting))
    assert all(isinstance(e, PeerLostError) and "link to the neighbour broke" in str(e) for e in got), got
    # Links are re-checked after a failure; the next op runs normally.
    assert in_parallel(*(lambda c=c: c._collective_blocking(3, {}, pass_ids) for c in (a, b))) == [b.peer_id, a.peer_id]


@pytest.mark.timeout(30)
def test_are_peers_pending_is_the_same_answer_everywhere(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    a, b = group_of(master, make_comm, 2)
    assert in_parallel(a.are_peers_pending, b.are_peers_pending) == [False, False]
    c = make_comm(master.address)
    joined = threading.Thread(target=c.connect)
    joined.start()
    while not master.status()["pending"]:
        threading.Event().wait(0.01)
    assert in_parallel(a.are_peers_pending, b.are_peers_pending) == [True, True]
    assert in_parallel(a.update_topology, b.update_topology) == [None, None]
    joined.join(10)
    assert c.world_size == a.world_size == 3


@pytest.mark.timeout(30)
def test_peers_calling_different_operations_get_errors_not_a_hang(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    a, b = group_of(master, make_comm, 2)
    got = in_parallel(a.update_topology, b.are_peers_pending)
    assert all(isinstance(e, InvalidUsageError) and "same order" in str(e) for e in got), got
    got = in_parallel(a.update_topology, lambda: b._collective_blocking(0, {}, pass_ids))
    assert all(isinstance(e, InvalidUsageError) and "same order" in str(e) for e in got), got
    assert in_parallel(a.update_topology, b.update_topology) == [None, None]


@pytest.mark.timeout(30)
def test_loopback_and_remote_peers_are_not_mixed(master: Master, make_comm: Callable[..., Communicator]) -> None:
    make_comm(master.address).connect()
    remote = make_comm(master.address, advertise_host="10.11.12.13")
    with pytest.raises(MasterConnectionError, match="loopback.*advertise_host"):
        remote.connect()
    assert master.status()["pending"] == []


@pytest.mark.timeout(30)
def test_unreachable_newcomer_is_dropped_and_the_voter_may_retry(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    a = make_comm(master.address)
    a.connect()
    # 127.0.0.2 is loopback (so accepted as such) but nobody listens there.
    ghost = make_comm(master.address, advertise_host="127.0.0.2")
    got = in_parallel(ghost.connect, lambda: _vote_when_pending(master, a, 1))
    assert isinstance(got[0], TopologyUpdateError) and "could not connect" in str(got[0]), got
    assert isinstance(got[1], TopologyUpdateError) and "could not connect" in str(got[1]), got
    a.update_topology()  # the retry succeeds on the ring without the ghost
    assert a.world_size == 1 and master.status()["accepted"] == [a.peer_id]
    assert "could not connect" in next(iter(master.status()["kicks"].values()))


@pytest.mark.timeout(30)
def test_illegal_message_kicks_with_a_reason_the_peer_receives(master: Master) -> None:
    async def scenario() -> P.Kicked:
        conn = await open_connection("127.0.0.1", master.port, role="peer", peer_id=None)
        await conn.send_message(P.Register(0, 4242))
        assert isinstance(await conn.recv_message(), P.Welcome)
        await conn.send_message(P.CollectiveComplete(0, 99, True))  # an op that never started
        while True:
            msg = await conn.recv_message()
            if isinstance(msg, P.Kicked):
                conn.close()
                return msg

    kicked = asyncio.run(scenario())
    assert "op 99, which was never started" in kicked.reason
    assert "op 99" in master.status()["kicks"][1]


@pytest.mark.timeout(30)
def test_master_stopping_fails_blocked_calls(make_comm: Callable[..., Communicator]) -> None:
    master = Master("127.0.0.1", 0, heartbeat_timeout=HB)
    master.start()
    try:
        a, b = group_of(master, make_comm, 2)
        result: list[Any] = []
        blocked = threading.Thread(target=lambda: result.extend(in_parallel(a.update_topology)))
        blocked.start()
        while not (master.status()["round"] or {}).get("voters"):
            threading.Event().wait(0.01)
    finally:
        master.stop()
    blocked.join(HB + 5)
    assert isinstance(result[0], MasterConnectionError), result
    with pytest.raises(MasterConnectionError):
        b.update_topology()


@pytest.mark.timeout(30)
def test_unreachable_master_raises_master_connection_error(make_comm: Callable[..., Communicator]) -> None:
    with Master("127.0.0.1", 0) as gone:
        address = gone.address  # a port that was just closed again
    comm = make_comm(address)
    with pytest.raises(MasterConnectionError, match="cannot reach the master"):
        comm.connect()
    with pytest.raises(InvalidUsageError, match="connect failed"):
        comm.update_topology()


@pytest.mark.timeout(30)
def test_connect_timeout_leaves_the_run(
    master: Master, make_comm: Callable[..., Communicator], wait_for: Any
) -> None:
    make_comm(master.address).connect()  # accepted, but never votes
    late = make_comm(master.address)
    with pytest.raises(TimeoutError):
        late.connect(timeout=0.3)
    # It left instead of staying registered as a ghost.
    wait_for(lambda: master.status()["departures"] and not master.status()["pending"], 5, "the leave")
    assert list(master.status()["departures"].values()) == ["left the run"]
