"""A TCP proxy with injectable faults, for chaos runs on 127.0.0.1.

A :class:`FaultProxy` listens on a port of its own and forwards every connection it
accepts to one target (in a chaos run: a peer's p2p server, which registered the
proxy's port with the master, so every link and shared-state transfer to that peer
passes through it). Faults, set or triggered from the proxy's event loop:

- **latency** (``proxy.latency`` seconds): every chunk is held that long before it is
  forwarded. Reading goes on meanwhile, so the delay lengthens the round trip without
  stopping the flow (like a long link, not a stalled one).
- **throttle** (``proxy.rate`` bytes/s): each direction of each connection forwards at
  most that many bytes per second.
- **reset**: both sockets of a connection are closed with a TCP reset (SO_LINGER 0).
- **truncate**: one direction forwards only part of a frame, then closes (FIN), so the
  receiver sees the stream end in the middle of a frame.
- **partition**: one connection goes silent both ways for a while: nothing is forwarded,
  and neither a FIN nor a reset from one side reaches the other until it ends (a path
  that drops every packet, then heals). What arrived meanwhile follows, then any close.
- **garbage**: invalid bytes are spliced into one direction at the next frame boundary
  (the 48-byte header of ``docs/protocol.md`` §2). Bytes go in *between* frames, never
  inside a payload: on a real network TCP's checksums keep payloads intact, and what a
  peer must survive is a stream that stops making sense, which pccl detects at the
  next header.

The frame bookkeeping (:class:`FrameTracker`) and the garbage (:func:`make_garbage`)
are pure and tested on their own; the proxy only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Literal
from transport.frame import PROTOCOL_VERSION

log = logging.getLogger("stress.proxy")

#: Size of a frame header and where its payload length sits (``docs/protocol.md`` §2).
HEADER_SIZE = 48
_LENGTH = struct.Struct("<Q")
_LENGTH_OFFSET = 40
_HEADER = struct.Struct("<2sBBHHQQQQQ")
_CONTROL = 6
#: Largest CONTROL payload a receiver accepts (§2); an "oversized" header claims more.
MAX_CONTROL_PAYLOAD = 16 << 20
#: Bytes read from a socket at once.
CHUNK = 256 * 1024
#: Bytes one direction may hold back (latency queue) before it stops reading.
QUEUE_LIMIT = 8 << 20

Direction = Literal["to_target", "to_client"]
DIRECTIONS: tuple[Direction, Direction] = ("to_target", "to_client")
GARBAGE_KINDS = ("noise", "bad_type", "oversized", "bad_control")


class FrameTracker:
    """Follows frame boundaries in one direction of a pccl byte stream (sans-IO).

    :meth:`advance` consumes the next bytes of the stream and returns the offsets in
    them where a frame starts. A stream that is not pccl frames simply yields
    boundaries that mean nothing; the tracker never raises.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._payload_left = 0

    @property
    def at_boundary(self) -> bool:
        """True when the next byte starts a frame."""
        return not self._header and self._payload_left == 0

    def advance(self, data: bytes | memoryview) -> list[int]:
        """Consume ``data``; the offsets in it where a new frame begins."""
        starts: list[int] = []
        i, n = 0, len(data)
        while i < n:
            if self._payload_left:
                step = min(self._payload_left, n - i)
                self._payload_left -= step
                i += step
                continue
            if not self._header:
                starts.append(i)
            take = min(HEADER_SIZE - len(self._header), n - i)
            self._header += data[i : i + take]
            i += take
            if len(self._header) == HEADER_SIZE:
                (self._payload_left,) = _LENGTH.unpack_from(self._header, _LENGTH_OFFSET)
                self._header.clear()
        return starts


def make_garbage(kind: str, rng: random.Random) -> bytes:
    """Bytes no pccl reader may accept as the start of a frame (§2).

    - ``noise``: random bytes that do not start with the magic;
    - ``bad_type``: the magic and version, then a frame type that does not exist;
    - ``oversized``: a CONTROL header whose length is over the control limit;
    - ``bad_control``: a CONTROL frame whose payload is not msgpack (0xc1 is never used).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "noise":
        body = bytearray(rng.randbytes(rng.randint(1, 3 * HEADER_SIZE)))
        if body[0] == ord("P"):
            body[0] ^= 0xFF
        return bytes(body)
    if kind == "bad_type":
        frame_type = rng.choice([0, *range(11, 256)])
        return _HEADER.pack(b"PC", PROTOCOL_VERSION, frame_type, 0, 0, 0, 0, 0, 0, 0)
    if kind == "oversized":
        length = rng.randint(MAX_CONTROL_PAYLOAD + 1, 1 << 62)
        return _HEADER.pack(b"PC", PROTOCOL_VERSION, _CONTROL, 0, 0, 0, 0, 0, 0, length)
    if kind == "bad_control":
        payload = b"\xc1" + rng.randbytes(rng.randint(0, 63))
        return _HEADER.pack(b"PC", PROTOCOL_VERSION, _CONTROL, 0, 0, 0, 0, 0, 0, len(payload)) + payload
    raise ValueError(f"unknown garbage kind {kind!r}; one of {GARBAGE_KINDS}")


@dataclass
class ProxyStats:
    """What a proxy did, for the chaos report."""

    accepted: int = 0
    target_refused: int = 0
    bytes_forwarded: int = 0
    resets: int = 0
    partitions: int = 0
    truncations: int = 0
    garbage: int = 0
    garbage_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class _Armed:
    """A fault waiting for the right moment in one direction of a connection."""

    kind: Literal["truncate", "garbage"]
    garbage: bytes = b""
    label: str = ""  # the garbage kind, for the stats


_EOF = object()


class _Pipe:
    """One direction of a proxied connection: read, hold (latency), throttle, write."""

    def __init__(self, conn: ProxiedConnection, direction: Direction,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.tracker = FrameTracker()
        self.armed: _Armed | None = None
        self._queue: deque[tuple[float, object]] = deque()
        self._queued_bytes = 0
        self._changed = asyncio.Event()
        self._next_send = 0.0  # loop time before which a throttled pipe sends nothing more

    def _put(self, due: float, item: object) -> None:
        self._queue.append((due, item))
        if isinstance(item, (bytes, bytearray)):
            self._queued_bytes += len(item)
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.conn.proxy
        while True:
            while self._queued_bytes > QUEUE_LIMIT:
                await self._wait_change()
            data = await self.reader.read(CHUNK)
            if not data:
                self._put(loop.time(), _EOF)
                return
            pieces, stop = self._apply_armed(data)
            due = loop.time() + proxy.latency
            for piece in pieces:
                self._put(due, piece)
            if stop:
                self._put(due, _EOF)
                return

    def _apply_armed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Split ``data`` around an armed fault; (pieces to forward, stop after them)."""
        starts = self.tracker.advance(data)
        armed = self.armed
        if armed is None:
            return [data], False
        stats = self.conn.proxy.stats
        if armed.kind == "garbage" and starts:
            self.armed = None
            stats.garbage += 1
            stats.garbage_kinds[armed.label] = stats.garbage_kinds.get(armed.label, 0) + 1
            at = starts[0]
            return [data[:at], armed.garbage, data[at:]], False
        if armed.kind == "truncate" and len(data) > 1:
            boundaries = set(starts)
            first = self.conn.proxy.rng.randrange(1, len(data))
            for k in range(len(data) - 1):  # the first offset from ``first`` on that is inside a frame
                cut = 1 + (first - 1 + k) % (len(data) - 1)
                if cut not in boundaries:
                    self.armed = None
                    stats.truncations += 1
                    return [data[:cut]], True
        return [data], False

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.conn.proxy
        while True:
            while not self._queue:
                await self._wait_change()
            due, item = self._queue.popleft()
            if item is _EOF:
                await self.conn.flowing.wait()
                with contextlib.suppress(OSError, RuntimeError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                return
            assert isinstance(item, (bytes, bytearray))
            await self.conn.flowing.wait()  # partitioned: hold everything back
            self._queued_bytes -= len(item)
            self._changed.set()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            view = memoryview(item)
            while view:
                rate = proxy.rate
                # Throttled: slices of 20 ms worth of bytes, each sent no earlier than
                # the bytes before it allow, so no burst ever beats the rate.
                piece = view[: max(1024, int(rate / 50))] if rate else view
                if rate:
                    wait = self._next_send - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._next_send = max(loop.time(), self._next_send) + len(piece) / rate
                self.writer.write(piece)
                await self.writer.drain()
                proxy.stats.bytes_forwarded += len(piece)
                view = view[len(piece):]


class ProxiedConnection:
    """One client connection and its connection to the target."""

    def __init__(self, proxy: FaultProxy, cid: int) -> None:
        self.proxy = proxy
        self.id = cid
        self.pipes: dict[Direction, _Pipe] = {}
        self.ended = False  # reset or closed: no fault can act on it any more
        self.flowing = asyncio.Event()  # cleared while partitioned
        self.flowing.set()
        self._writers: list[asyncio.StreamWriter] = []

    async def run(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.append(client_w)
        try:
            target_r, target_w = await asyncio.open_connection(self.proxy.target_host, self.proxy.target_port)
        except OSError as exc:
            self.proxy.stats.target_refused += 1
            log.info("proxy %s: target refused connection %d: %s", self.proxy.name, self.id, exc)
            self.reset()
            return
        self._writers.append(target_w)
        self.pipes = {
            "to_target": _Pipe(self, "to_target", client_r, target_w),
            "to_client": _Pipe(self, "to_client", target_r, client_w),
        }
        tasks = [asyncio.ensure_future(coro) for pipe in self.pipes.values()
                 for coro in (pipe.read_loop(), pipe.write_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                await self.flowing.wait()  # a partitioned path carries no reset either
                self.reset()  # one side broke: the other must not wait for it
            else:
                await asyncio.wait(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    def reset(self) -> None:
        """Close both sockets with a TCP reset."""
        self.ended = True
        for writer in self._writers:
            if writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    def close(self) -> None:
        self.ended = True
        for writer in self._writers:
            writer.close()

    def arm(self, direction: Direction, armed: _Armed) -> None:
        self.pipes[direction].armed = armed


class FaultProxy:
    """Forward ``host:port`` (``port`` 0: a free one, see :attr:`port`) to ``target_host:target_port``.

    ``latency`` and ``rate`` apply to every connection while set; :meth:`reset`,
    :meth:`truncate` and :meth:`inject_garbage` act on one live connection chosen with the
    proxy's seeded RNG. Every method runs on the proxy's event loop.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0,
                 seed: int = 0, name: str = "") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.name = name or f"->{target_port}"
        self.rng = random.Random(seed)
        self.latency = 0.0
        self.rate: float | None = None
        self.stats = ProxyStats()
        self.connections: dict[int, ProxiedConnection] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._partitions: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._on_client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        self.stats.accepted += 1
        conn = ProxiedConnection(self, self._next_id)
        self.connections[conn.id] = conn
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels these handlers; asyncio's stream callback would
            # report a cancelled handler as an error, so it ends quietly instead.
            pass
        finally:
            self.connections.pop(conn.id, None)
            if task is not None:
                self._tasks.discard(task)

    def _pick(self) -> ProxiedConnection | None:
        live = [c for _, c in sorted(self.connections.items()) if c.pipes and not c.ended]
        return self.rng.choice(live) if live else None

    def _direction(self, direction: Direction | None) -> Direction:
        return direction if direction is not None else self.rng.choice(DIRECTIONS)

    def reset(self) -> int | None:
        """Reset one live connection; its id, or None if there is none."""
        conn = self._pick()
        if conn is None:
            return None
        self.stats.resets += 1
        conn.reset()
        return conn.id

    def truncate(self, direction: Direction | None = None) -> int | None:
        """Cut one direction of one live connection inside its next frame; the connection id or None."""
        conn = self._pick()
        if conn is None:
            return None
        conn.arm(self._direction(direction), _Armed("truncate"))
        return conn.id

    def inject_garbage(self, kind: str | None = None, direction: Direction | None = None) -> int | None:
        """Splice garbage into one direction of one live connection at its next frame boundary.

        Returns the connection id, or None if no connection is open.

        Raises:
            ValueError: unknown ``kind`` (see :data:`GARBAGE_KINDS`).
        """
        kind = kind or self.rng.choice(GARBAGE_KINDS)
        data = make_garbage(kind, self.rng)
        conn = self._pick()
        if conn is None:
            return None
        conn.arm(self._direction(direction), _Armed("garbage", data, kind))
        return conn.id

    def partition(self, seconds: float) -> int | None:
        """Cut one live connection off both ways for ``seconds``; its id, or None if none is open."""
        conn = self._pick()
        if conn is None:
            return None
        self.stats.partitions += 1
        conn.flowing.clear()
        self._partitions.append(asyncio.get_running_loop().call_later(seconds, conn.flowing.set))
        return conn.id

    def clear(self) -> None:
        """Remove latency and throttling and heal every partition."""
        self.latency, self.rate = 0.0, None
        for handle in self._partitions:
            handle.cancel()
        self._partitions.clear()
        for conn in self.connections.values():
            conn.flowing.set()

    async def close(self) -> None:
        """Stop listening and reset every connection. Raises nothing."""
        self.clear()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.reset()
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
