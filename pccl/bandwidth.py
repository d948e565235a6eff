"""Measuring the directed bandwidth from this peer to another (``docs/protocol.md`` §5.12).

The master asks a peer (``pccl.bandwidth_probe``) to measure how fast it can send
to another peer. The sender opens a striped link of role :data:`BANDWIDTH_ROLE` to
the receiver's p2p server (as many connections as its ring links) and announces the
probe (``pccl.bandwidth_start``); once the receiver (:class:`BandwidthServer`) is
free it answers ``pccl.bandwidth_ready`` and the sender sends equal chunks back to
back. The receiver drops the chunks as they arrive and counts their bytes: from the
moment the first chunk's worth is in (so connection set-up and the first round
trips do not count) until ``seconds`` later. It answers ``pccl.bandwidth_result``
with the bytes and the time and waits for the sender to close the link. The sender
reports ``bytes / seconds`` to the master (``pccl.bandwidth_report``).

Every step is bounded: a probe never takes longer than :func:`probe_time_bound`. A
receiver measures one probe at a time (the master schedules it so); one that
arrives meanwhile waits for it, briefly. A link so slow that not one chunk arrives
within ``seconds + FIRST_CHUNK_WAIT`` is rated by what did arrive in that time (0
bytes: unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from pccl import protocol as P
from transport.errors import PCCLError, PeerLostError, ProtocolError
from transport.link import MIN_STRIPE, Link, connect_link
from transport.message import message

if TYPE_CHECKING:
    from pccl.ring_links import RingLinks

log = logging.getLogger("pccl.bandwidth")

BANDWIDTH_ROLE = "bandwidth"
# The only transfer tag of a probe link (one probe per link).
PROBE_TAG = 1
# Chunk bounds: big enough that per-chunk Python work is noise, small enough that a
# slow link still completes several chunks within a short probe.
MIN_CHUNK = MIN_STRIPE
MAX_CHUNK = 4 << 20
# The longest probe a receiver accepts, and the hard limits around each phase.
MAX_SECONDS = 10.0
CONNECT_TIMEOUT = 5.0
START_TIMEOUT = 3.0  # receiver: wait for a probe in progress; then for the announcement
FIRST_CHUNK_WAIT = 2.0  # receiver: extra time for the first chunk to arrive
RESULT_GRACE = 3.0  # sender: extra time for the result to come back
# How often the receiver reads the link's byte counter while it waits.
POLL_INTERVAL = 0.005
# DATA frame size on probe links: the byte counter moves once per frame, so small
# frames time a slow link finely (64 KiB: 1/50 of what 50 Mbit/s moves in 0.5 s).
PROBE_FRAME = 64 << 10


@message("pccl.bandwidth_start")
class ProbeStart:
    """Sender -> receiver, first on a probe link: chunks of ``chunk_bytes`` follow for ``seconds``."""

    probe_id: int
    chunk_bytes: int
    seconds: float


@message("pccl.bandwidth_ready")
class ProbeReady:
    """Receiver -> sender: measuring starts now; send the chunks (nothing is sent before, so
    no chunk waits in a buffer while another probe is measured)."""

    probe_id: int


@message("pccl.bandwidth_result")
class ProbeResult:
    """Receiver -> sender: ``nbytes`` arrived within ``seconds`` of measured time (``ok``), or why not."""

    probe_id: int
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    reason: str = ""


def chunk_size(connections: int) -> int:
    """Bytes per chunk: one full stripe per connection, within [MIN_CHUNK, MAX_CHUNK]."""
    return max(MIN_CHUNK, min(MAX_CHUNK, connections * MIN_STRIPE))


def probe_time_bound(seconds: float, connect_timeout: float = CONNECT_TIMEOUT) -> float:
    """The longest a sender spends on one probe of ``seconds`` (the master waits a bit more)."""
    return connect_timeout + 2 * START_TIMEOUT + min(seconds, MAX_SECONDS) + FIRST_CHUNK_WAIT + RESULT_GRACE


# --- sender -------------------------------------------------------------------------


async def measure(
    host: str,
    port: int,
    *,
    probe_id: int,
    seconds: float,
    peer_id: int,
    connections: int,
    secret: bytes | None,
    congestion: str | None,
    encrypt: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> float:
    """The bandwidth (bytes/s) from this peer to the p2p server at ``host:port``.

    Returns 0.0 when nothing crossed in time (a link too slow to use).

    Raises:
        PeerLostError: unreachable, the link broke, the receiver refused the probe
            or did not answer in time.
        AuthenticationError: the receiver refused our secret.
        ProtocolError: the receiver answered nonsense.
    """
    seconds = float(min(seconds, MAX_SECONDS))
    link = await connect_link(
        host, port, connections=connections, peer_id=peer_id, secret=secret, role=BANDWIDTH_ROLE,
        timeout=connect_timeout, congestion=congestion, encrypt=encrypt, frame_size=PROBE_FRAME,
    )
    try:
        chunk = chunk_size(connections)
        await link.send_message(ProbeStart(probe_id, chunk, seconds))
        result = await _answer(link, 2 * START_TIMEOUT, f"{host}:{port} did not start bandwidth probe {probe_id}")
        if isinstance(result, ProbeReady) and result.probe_id == probe_id:
            pump = asyncio.get_running_loop().create_task(_pump(link, chunk))
            try:
                result = await _answer(link, seconds + FIRST_CHUNK_WAIT + RESULT_GRACE,
                                       f"no result of bandwidth probe {probe_id} from {host}:{port} in time")
            finally:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
    finally:
        link.close("bandwidth probe finished")
    if not isinstance(result, ProbeResult) or result.probe_id != probe_id:
        raise ProtocolError(f"expected the result of bandwidth probe {probe_id}, got {result!r}")
    if not result.ok:
        raise PeerLostError(f"the receiver refused bandwidth probe {probe_id}: {result.reason}")
    if result.nbytes < 0 or not math.isfinite(result.seconds) or result.seconds < 0:
        raise ProtocolError(f"impossible bandwidth result {result!r}")
    if result.nbytes == 0 or result.seconds == 0:
        return 0.0
    return result.nbytes / result.seconds


async def _answer(link: Link, timeout: float, late: str) -> object:
    """The receiver's next message; PeerLostError(``late``) when none comes within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            return await link.recv_message()
    except TimeoutError as exc:
        raise PeerLostError(late) from exc


async def _pump(link: Link, chunk: int) -> None:
    """Send chunks back to back until cancelled or the link ends (the kernel keeps the pipe full)."""
    payload = bytes(chunk)
    seq = 0
    try:
        while True:
            await link.send(PROBE_TAG, seq, payload)
            seq += 1
    except PeerLostError:
        pass  # the receiver stopped listening: its result (or the link's end) says why


async def answer_probe(links: RingLinks, msg: P.BandwidthProbe) -> P.BandwidthReport:
    """Run the master's probe request with this peer's link settings; the report to send back.

    Raises nothing but cancellation: a failed measurement is a report with ``ok=False``.
    """
    assert links.peer_id is not None
    try:
        rate = await measure(
            msg.host, msg.port, probe_id=msg.probe_id, seconds=msg.seconds, peer_id=links.peer_id,
            connections=links.connections, secret=links.secret, congestion=links.congestion,
            encrypt=links.encrypt, connect_timeout=min(links.timeout, CONNECT_TIMEOUT),
        )
    except PCCLError as exc:  # unreachable, refused, lost, late, nonsense: the pair is unusable
        log.info("bandwidth probe %d to peer %d failed: %s", msg.probe_id, msg.peer, exc)
        return P.BandwidthReport(msg.probe_id, False, 0.0, f"{type(exc).__name__}: {exc}")
    log.info("bandwidth to peer %d: %.4g bytes/s", msg.peer, rate)
    return P.BandwidthReport(msg.probe_id, True, rate)


# --- receiver ------------------------------------------------------------------------


class BandwidthServer:
    """The receiving end of probes: the p2p server's handler for :data:`BANDWIDTH_ROLE` links.

    Probes are measured one at a time. The master starts a receiver's next probe as
    soon as the previous sender reported, which can be a moment before that sender's
    link is gone here, so a probe that arrives while another is measured waits for
    it (up to :data:`START_TIMEOUT`) instead of being refused.
    """

    def __init__(self) -> None:
        self._measuring = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """A probe is being measured."""
        return self._measuring.locked()

    async def serve(self, link: Link) -> None:
        """Answer one probe on ``link``, then close it. Raises nothing (failures close the link)."""
        try:
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    await self._measuring.acquire()
            except TimeoutError:
                link.close("busy: another bandwidth probe is being measured")
                return
            try:
                answer = await self._measure(link)
                await link.send_message(answer)
            finally:
                self._measuring.release()
            # The sender closes once it has the result; closing first could reset the
            # connection under the result while chunks are still arriving.
            try:
                async with asyncio.timeout(RESULT_GRACE):
                    await link.wait_closed()
            except TimeoutError:
                pass
        except (PeerLostError, ProtocolError, TimeoutError) as exc:
            log.info("bandwidth probe from peer %r ended: %r", link.peer_id, exc)
        finally:
            link.close("bandwidth probe over")

    async def _measure(self, link: Link) -> ProbeResult:
        async with asyncio.timeout(START_TIMEOUT):
            start = await link.recv_message()
        if not isinstance(start, ProbeStart):
            raise ProtocolError(f"a bandwidth link must start with ProbeStart, got {type(start).__name__}")
        if not (MIN_CHUNK <= start.chunk_bytes <= MAX_CHUNK and 0 < start.seconds <= MAX_SECONDS):
            reason = f"chunks of {start.chunk_bytes} bytes for {start.seconds} s are out of range"
            return ProbeResult(start.probe_id, False, reason=reason)
        await link.send_message(ProbeReady(start.probe_id))
        nbytes, seconds = await _receive(link, start.chunk_bytes, start.seconds)
        return ProbeResult(start.probe_id, True, nbytes, seconds)


async def _receive(link: Link, chunk: int, seconds: float) -> tuple[int, float]:
    """Count the bytes arriving for ``seconds`` once the first ``chunk`` bytes are in; ``(bytes, seconds)``.

    The tag is forgotten first, so every chunk is dropped as it arrives (nothing is
    copied or buffered) and only the link's byte counter moves: receives posted per
    chunk would fall behind a fast sender and time the bookkeeping instead of the link.

    Raises:
        PeerLostError: the link broke.
    """
    link.forget(PROBE_TAG)
    base = link.rx_bytes
    began = time.perf_counter()
    hard_stop = began + seconds + FIRST_CHUNK_WAIT
    now = began
    while link.rx_bytes - base < chunk and now < hard_stop:
        await _tick(link)
        now = time.perf_counter()
    if link.rx_bytes - base < chunk:
        # Not even one chunk in time: what did arrive gives a (low) estimate.
        return link.rx_bytes - base, hard_stop - began
    first, counted = now, link.rx_bytes
    stop = min(first + seconds, hard_stop)
    while now < stop:
        await _tick(link, stop - now)
        now = time.perf_counter()
    log.debug("probe: %d bytes in %.3f s after the first chunk", link.rx_bytes - counted, now - first)
    return link.rx_bytes - counted, now - first


async def _tick(link: Link, limit: float = POLL_INTERVAL) -> None:
    """Let the link receive for a moment. Raises PeerLostError if it broke."""
    if link.closed:
        raise PeerLostError(f"bandwidth link from peer {link.peer_id!r} broke during the probe")
    await asyncio.sleep(min(limit, POLL_INTERVAL))
