"""Aborting one tag on a link tells the peer (ABORT_TAG, docs/protocol.md §4).

The peer's pending and later transfers of that tag fail with PeerLostError naming the tag and
the reason, within 1 s; other tags and the link itself carry on; a plain forget sends nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tp_helpers import arun, conn_pair, link_pair
from transport.errors import InvalidUsageError, PeerLostError
from transport.frame import FrameType, pack_header
from transport.link import MAX_ABORT_REASON, Link, _shorten
from transport.message import message

MiB = 1 << 20


@message("test.abort_tag.marker")
class Marker:
    n: int


def payload(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def wire_bytes(link: Link) -> int:
    return sum(conn.tx_bytes for conn in link.connections)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a progress condition (the test needs bytes in flight first, not a race fix)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_abort_fails_the_peers_pending_receive_and_its_later_use() -> None:
    async def main() -> None:
        async with link_pair(3) as (client, remote):
            out = np.zeros(MiB, np.uint8)
            pending = asyncio.ensure_future(remote.recv_into(7, 0, out))
            other_out = np.zeros(2 * MiB, np.uint8)
            other = asyncio.ensure_future(remote.recv_into(8, 0, other_out))  # another tag, in flight
            await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            start = loop.time()
            client.abort_tag(7, "worker crashed")
            with pytest.raises(PeerLostError, match="aborted tag 7: worker crashed"):
                await asyncio.wait_for(pending, 1.0)
            assert loop.time() - start < 1.0
            assert not out.any()
            # Later use of the tag on the peer: the remote side's doing, so PeerLostError.
            with pytest.raises(PeerLostError, match="aborted tag 7: worker crashed"):
                await remote.recv_into(7, 1, bytearray(4))
            with pytest.raises(PeerLostError, match="aborted tag 7: worker crashed"):
                await remote.send(7, 2, b"late")
            # The aborting side refuses its own later use as a usage error, like forget.
            with pytest.raises(InvalidUsageError, match="forgotten"):
                await client.send(7, 3, b"x")
            # Other tags and the link are unaffected, in both directions.
            data = payload(len(other_out), 8)
            await asyncio.wait_for(asyncio.gather(client.send(8, 0, data), other), 5)
            assert np.array_equal(other_out, data)
            back = np.zeros(1000, np.uint8)
            await asyncio.gather(remote.send(9, 0, data[:1000]), client.recv_into(9, 0, back))
            assert np.array_equal(back, data[:1000])
            assert not client.closed and not remote.closed

    arun(main())


def test_abort_fails_the_peers_pending_send() -> None:
    async def main() -> None:
        limit = MiB
        async with link_pair(2, side_buffer_limit=limit) as (client, remote):
            client.frame_size = 256 * 1024
            # No receive is posted: the remote's side buffer fills and it stops reading, so the
            # 64 MiB send (more than the kernel buffers hold) blocks.
            send = asyncio.ensure_future(client.send(5, 0, payload(64 * MiB, 5)))
            await wait_until(lambda: remote.held_bytes >= limit)
            assert not send.done()
            loop = asyncio.get_running_loop()
            start = loop.time()
            remote.abort_tag(5, "receiver gave up")
            with pytest.raises(PeerLostError, match="aborted tag 5: receiver gave up"):
                await asyncio.wait_for(send, 1.0)
            assert loop.time() - start < 1.0
            assert remote.held_bytes == 0  # held data dropped, the rest read and discarded
            data = payload(3 * MiB, 6)
            out = np.zeros(len(data), np.uint8)
            await asyncio.wait_for(asyncio.gather(client.send(6, 0, data), remote.recv_into(6, 0, out)), 5)
            assert np.array_equal(out, data)

    arun(main())


def test_forget_after_success_sends_nothing_and_the_peer_keeps_the_tag() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            data = payload(MiB, 3)
            out = np.zeros(MiB, np.uint8)
            await asyncio.gather(client.send(3, 0, data), remote.recv_into(3, 0, out))
            before = wire_bytes(client)
            client.forget(3)
            assert wire_bytes(client) == before  # not a byte on the wire
            pending = asyncio.ensure_future(remote.recv_into(3, 1, bytearray(8)))
            await client.send_message(Marker(1))  # on connection 0, like everything before it
            assert await remote.recv_message() == Marker(1)
            assert not pending.done()  # the peer's tag was not aborted
            await remote.send(3, 2, b"still usable here")
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending

    arun(main())


def test_abort_from_another_thread_and_from_both_sides() -> None:
    async def main() -> None:
        async with link_pair(2) as (client, remote):
            pending = asyncio.ensure_future(remote.recv_into(11, 0, bytearray(16)))
            await asyncio.sleep(0)
            await asyncio.to_thread(client.abort_tag, 11, "from a worker thread")
            with pytest.raises(PeerLostError, match="aborted tag 11: from a worker thread"):
                await asyncio.wait_for(pending, 1.0)
            # Both ends abort the same tag at once: each ignores the other's notice.
            waits = [asyncio.ensure_future(link.recv_into(12, 0, bytearray(4))) for link in (client, remote)]
            await asyncio.sleep(0)
            client.abort_tag(12, "a")
            remote.abort_tag(12, "b")
            results = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 1.0)
            assert [str(r) for r in results] == ["transfer 12/0 was aborted: a", "transfer 12/0 was aborted: b"]
            await client.send_message(Marker(2))
            assert await remote.recv_message() == Marker(2)
            for link in (client, remote):
                with pytest.raises(InvalidUsageError, match="forgotten"):
                    await link.send(12, 1, b"x")
            with pytest.raises(InvalidUsageError, match="unsigned 64-bit"):
                client.abort_tag(-1, "bad tag")

    arun(main())


def test_abort_on_a_closed_link_only_forgets() -> None:
    async def main() -> None:
        async with link_pair(1) as (client, remote):
            client.close("done")
            before = wire_bytes(client)
            client.abort_tag(4, "too late")  # raises nothing, writes nothing
            assert wire_bytes(client) == before
            with pytest.raises(PeerLostError, match="peer closed the connection: done"):
                await asyncio.wait_for(remote.recv_into(4, 0, bytearray(1)), 2.0)

    arun(main())


def test_abort_tag_frame_on_a_plain_connection_is_a_protocol_error() -> None:
    async def main() -> None:
        async with conn_pair() as (_srv, client, remote):
            client.write_frame(pack_header(FrameType.ABORT_TAG, 0, tag=1))
            with pytest.raises(PeerLostError, match="no transfers"):
                await asyncio.wait_for(remote.recv_message(), 2.0)

    arun(main())


@given(st.text(st.characters(blacklist_characters="…"), max_size=3000))
@example("x" * (MAX_ABORT_REASON + 1))
@example("ü" * MAX_ABORT_REASON)  # two bytes each: every cut may split a character
@example("start " + "€" * 2000 + " origin")
@example("\ud800")  # a lone surrogate has no UTF-8 form
def test_shortened_reason_keeps_both_ends_within_the_limit(reason: str) -> None:
    data = _shorten(reason)
    reason = "".join("?" if "\ud800" <= c <= "\udfff" else c for c in reason)
    text = data.decode("utf-8")  # still valid UTF-8
    assert len(data) <= MAX_ABORT_REASON
    if len(reason.encode("utf-8")) <= MAX_ABORT_REASON:
        assert text == reason
        return
    head, tail = text.split("…")
    assert reason.startswith(head) and reason.endswith(tail)
    assert len(head.encode()) >= MAX_ABORT_REASON // 4 - 3  # at most one split character lost
    assert len(tail.encode()) >= MAX_ABORT_REASON * 3 // 4 - 6
