"""Bandwidth probes (``pccl.bandwidth``) over real TCP on 127.0.0.1 (§5.12)."""

from __future__ import annotations

import asyncio
import time
import warnings
from types import SimpleNamespace
from typing import Any, Coroutine, TypeVar

import pytest

from pccl import bandwidth as B
from pccl import protocol as P
from transport.errors import PeerLostError, ProtocolError
from transport.link import Link, connect_link
from transport.loop import new_event_loop
from transport.message import decode, encode
from transport.server import Server, start_server

T = TypeVar("T")
HOST = "127.0.0.1"


def arun(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run ``coro`` on a fresh event loop with a hard timeout; fail if it leaves sockets open."""
    loop = new_event_loop()

    async def leftovers() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(leftovers())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            loop.close()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaks, leaks


async def _receiver(handler: Any = None) -> tuple[Server, B.BandwidthServer]:
    bw = B.BandwidthServer()
    server = await start_server(HOST, 0, None, on_link=handler or bw.serve, role="p2p")
    return server, bw


async def _measure(port: int, seconds: float = 0.3, connections: int = 2, probe_id: int = 7) -> float:
    return await B.measure(HOST, port, probe_id=probe_id, seconds=seconds, peer_id=1, connections=connections,
                           secret=None, congestion=None)


class RateLimitedRelay:
    """A TCP relay whose client-to-server direction, all connections together, passes at most
    ``rate`` bytes/s (a token bucket with a small burst): the reference a probe must find."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.burst = 64 << 10
        self._tokens = float(self.burst)
        self._stamp = time.perf_counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _take(self, n: int) -> None:
        while True:
            now = time.perf_counter()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= n:
                self._tokens -= n
                return
            await asyncio.sleep((n - self._tokens) / self.rate)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(HOST, self.target_port)
        for task in (self._pipe(reader, up_w, True), self._pipe(up_r, writer, False)):
            t = asyncio.ensure_future(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, limited: bool) -> None:
        try:
            while data := await src.read(16 << 10):
                if limited:
                    await self._take(len(data))
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.mark.timeout(60)
def test_probe_finds_the_rate_of_a_limited_path() -> None:
    rate = 8e6  # bytes/s, enforced by the relay (the independent reference)

    async def main() -> float:
        server, _ = await _receiver()
        relay = RateLimitedRelay(server.port, rate)
        port = await relay.start()
        try:
            return await _measure(port, seconds=1.0, connections=2)
        finally:
            await relay.close()
            server.close()
            await server.wait_closed()

    measured = arun(main())
    assert 0.75 * rate <= measured <= 1.15 * rate, measured


def test_unlimited_loopback_is_far_faster_than_a_limited_path() -> None:
    async def main() -> float:
        server, bw = await _receiver()
        try:
            rate = await _measure(server.port, seconds=0.2, connections=3)
            assert not bw.busy
            return rate
        finally:
            server.close()
            await server.wait_closed()

    assert arun(main()) > 50e6  # loopback moves hundreds of MB/s even on a busy machine


def test_a_second_probe_waits_for_the_first_instead_of_overlapping() -> None:
    async def main() -> tuple[float, float, float]:
        server, _ = await _receiver()
        try:
            start = time.perf_counter()
            a, b = await asyncio.gather(_measure(server.port, 0.3, probe_id=1), _measure(server.port, 0.3, probe_id=2))
            return a, b, time.perf_counter() - start
        finally:
            server.close()
            await server.wait_closed()

    a, b, elapsed = arun(main())
    assert a > 0 and b > 0
    assert elapsed >= 0.6  # one after the other: two windows of 0.3 s


def test_unreachable_receiver_fails_quickly() -> None:
    async def main() -> None:
        server, _ = await _receiver()
        port = server.port
        server.close()
        await server.wait_closed()
        with pytest.raises(PeerLostError):
            await _measure(port)

    start = time.perf_counter()
    arun(main())
    assert time.perf_counter() - start < 5


def test_a_receiver_that_never_answers_is_given_up_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "START_TIMEOUT", 0.2)
    held: list[Link] = []

    async def main() -> None:
        server, _ = await _receiver(handler=held.append)  # accepts the link, never answers
        try:
            with pytest.raises(PeerLostError, match="did not start"):
                await _measure(server.port)
        finally:
            server.close()
            await server.wait_closed()

    start = time.perf_counter()
    arun(main())
    assert time.perf_counter() - start < 2 * 0.2 + 2.0
    assert held and held[0].closed


@pytest.mark.parametrize("chunk, seconds", [(B.MAX_CHUNK + 1, 0.2), (1 << 20, B.MAX_SECONDS + 1), (1 << 20, 0.0)])
def test_receiver_refuses_out_of_range_probes_with_a_reason(chunk: int, seconds: float) -> None:
    async def main() -> Any:
        server, _ = await _receiver()
        link = await connect_link(HOST, server.port, connections=1, peer_id=1, role=B.BANDWIDTH_ROLE)
        try:
            await link.send_message(B.ProbeStart(3, chunk, seconds))
            return await link.recv_message()
        finally:
            link.close()
            server.close()
            await server.wait_closed()

    answer = arun(main())
    assert isinstance(answer, B.ProbeResult) and not answer.ok and "out of range" in answer.reason


def test_receiver_drops_a_link_that_does_not_start_with_the_announcement() -> None:
    async def main() -> None:
        server, bw = await _receiver()
        link = await connect_link(HOST, server.port, connections=1, peer_id=1, role=B.BANDWIDTH_ROLE)
        try:
            await link.send_message(B.ProbeReady(3))  # the receiver's message, not the sender's
            with pytest.raises(PeerLostError):
                await link.recv_message()
            assert not bw.busy
        finally:
            link.close()
            server.close()
            await server.wait_closed()

    arun(main())


def test_answer_probe_reports_success_and_failure() -> None:
    async def main() -> tuple[P.BandwidthReport, P.BandwidthReport]:
        server, _ = await _receiver()
        # The RingLinks attributes a probe uses.
        links: Any = SimpleNamespace(peer_id=4, connections=2, secret=None, congestion=None, encrypt=False, timeout=5.0)
        try:
            good = await B.answer_probe(links, P.BandwidthProbe(11, 9, HOST, server.port, 0.2))
        finally:
            server.close()
            await server.wait_closed()
        bad = await B.answer_probe(links, P.BandwidthProbe(12, 9, HOST, server.port, 0.2))
        return good, bad

    good, bad = arun(main())
    assert good.probe_id == 11 and good.ok and good.bytes_per_second > 0
    assert bad.probe_id == 12 and not bad.ok and bad.bytes_per_second == 0 and bad.reason


def test_time_bound_covers_every_phase() -> None:
    assert B.probe_time_bound(0.5) == pytest.approx(
        B.CONNECT_TIMEOUT + 2 * B.START_TIMEOUT + 0.5 + B.FIRST_CHUNK_WAIT + B.RESULT_GRACE
    )
    assert B.probe_time_bound(1e6) == B.probe_time_bound(B.MAX_SECONDS)
    assert B.chunk_size(1) == B.MIN_CHUNK and B.chunk_size(1000) == B.MAX_CHUNK


@pytest.mark.parametrize(
    "msg",
    [
        P.BandwidthProbe(1, 2, "10.0.0.2", 4000, 0.5),
        P.BandwidthReport(1, True, 1.5e9),
        P.BandwidthReport(2, False, 0.0, "refused"),
        P.Bandwidths([1, 2], [2, 1], [1e9, 0.0]),
        B.ProbeStart(1, 1 << 20, 0.5),
        B.ProbeReady(1),
        B.ProbeResult(1, True, 10, 0.5),
    ],
)
def test_messages_round_trip_and_truncations_are_refused(msg: Any) -> None:
    assert decode(encode(msg)) == msg
    for cut in range(len(encode(msg))):
        try:
            decode(encode(msg)[:cut])
        except ProtocolError:
            continue  # a truncated payload is refused, never accepted as something else
        raise AssertionError(f"a truncated {type(msg).__name__} decoded")
