"""Striped links: a pool of N connections to one peer carrying transfers and control messages.

One transfer — a ``(tag, seq)`` pair and one buffer — is cut into up to N
contiguous stripes sent concurrently, one per connection, each as DATA frames
carrying their byte offset; the receiver writes every frame straight into the
posted buffer (``docs/protocol.md`` §4). If any connection breaks, the whole
link aborts on both ends; an operation abandoned on one end can be aborted on
both ends without touching the rest of the link (ABORT_TAG, §4).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from transport.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    Connection,
    Inbox,
    open_connection,
)
from transport.errors import InvalidUsageError, PeerLostError, PeerUnreachableError, ProtocolError
from transport.frame import MAX_DATA_PAYLOAD, FrameHeader, FrameType, pack_header
from transport.handshake import PeerId, check_encrypt
from transport.loop import on_loop
from transport.message import Message, message

log = logging.getLogger(__name__)

DEFAULT_CONNECTIONS = 4
#: DATA frame size used by senders (≤ MAX_DATA_PAYLOAD); big enough that per-frame
#: Python work is noise, small enough that transfers interleave (§4).
DEFAULT_FRAME_SIZE = 4 * 1024 * 1024
#: Transfers smaller than this per stripe use fewer connections (§4).
MIN_STRIPE = 256 * 1024
#: Bytes of early data (arrived before its receive was posted) held per link (§4).
DEFAULT_SIDE_BUFFER_LIMIT = 1 << 30
#: Longest reason an ABORT_TAG frame carries (UTF-8 bytes); longer ones lose their middle (§4).
MAX_ABORT_REASON = 1024
_U64_MAX = (1 << 64) - 1


@message("transport.link_ready")
class LinkReady:
    """Sent by the accepting side on connection 0 once all N connections arrived (§4)."""

    link_id: int


class _Transfer:
    """Receive-side state of one ``(tag, seq)``."""

    __slots__ = ("total", "buffer", "waiter", "received", "frames", "held", "error")

    def __init__(self, total: int) -> None:
        self.total = total
        self.buffer: memoryview | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.frames = 0
        self.held: list[tuple[int, bytearray]] = []
        self.error: Exception | None = None  # set: frames are discarded, a new post fails


def _check_key(tag: int, seq: int) -> None:
    if not (0 <= tag <= _U64_MAX and 0 <= seq <= _U64_MAX):
        raise InvalidUsageError(f"tag and seq must be unsigned 64-bit integers, got {tag}, {seq}")


def _shorten(reason: str, limit: int = MAX_ABORT_REASON) -> bytes:
    """``reason`` as UTF-8 of at most ``limit`` bytes, keeping its start and its end.

    A failure relayed around a ring nests one reason in the next: the start names the
    latest hop, the end the original cause, so the middle is what goes. Characters
    UTF-8 cannot carry (lone surrogates) become ``?``.
    """
    data = reason.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    head = limit // 4
    tail = limit - head - 3
    return (data[:head].decode("utf-8", "ignore") + "…" + data[-tail:].decode("utf-8", "ignore")).encode("utf-8")


def _view(buffer: Any, *, writable: bool) -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise InvalidUsageError(f"expected a bytes-like buffer, got {type(buffer).__name__}") from exc
    if not view.c_contiguous:
        raise InvalidUsageError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise InvalidUsageError("recv_into needs a writable buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Link:
    """A pool of connections to one peer; see ``docs/architecture.md`` (transport.link).

    Attributes:
        link_id: random 64-bit id chosen by the connecting side.
        peer_id: the other side's declared id.
        connections: the pool, in index order.
        tx_bytes / rx_bytes: DATA payload bytes sent / received on this link.
        frame_size: DATA frame size used when sending.
        side_buffer_limit: early-data budget; beyond it reading pauses.
    """

    def __init__(
        self,
        connections: list[Connection],
        *,
        link_id: int,
        peer_id: PeerId,
        side_buffer_limit: int = DEFAULT_SIDE_BUFFER_LIMIT,
        frame_size: int = DEFAULT_FRAME_SIZE,
    ) -> None:
        if not connections:
            raise InvalidUsageError("a link needs at least one connection")
        if not 0 < frame_size <= MAX_DATA_PAYLOAD:
            raise InvalidUsageError(f"frame_size must be in 1..{MAX_DATA_PAYLOAD}")
        self._loop = asyncio.get_running_loop()
        self.link_id = link_id
        self.peer_id = peer_id
        self.connections = tuple(connections)
        self.frame_size = frame_size
        self.side_buffer_limit = side_buffer_limit
        self.tx_bytes = 0
        self.rx_bytes = 0
        self._transfers: dict[tuple[int, int], _Transfer] = {}
        self._inflight: dict[Connection, tuple[_Transfer, bytearray | None]] = {}
        self._forgotten: set[int] = set()
        self._peer_aborted: dict[int, str] = {}  # tags the peer aborted (ABORT_TAG), with its reason
        self._held_bytes = 0
        self._paused: set[Connection] = set()
        self._error: PeerLostError | None = None
        self._next_conn = 0
        self._inbox = Inbox(self._loop)
        for index, conn in enumerate(self.connections):
            conn.sink = self
            conn.inbox.move_to(self._inbox, conn)  # LINK_READY may already be queued
            conn.inbox = self._inbox
            conn.add_close_callback(self._make_on_lost(index))
        for conn in self.connections:  # the peer aborted tags before this Link existed (§4)
            early, conn.early_aborts = conn.early_aborts or [], None
            for tag, reason in early:
                self.tag_aborted(conn, tag, reason)

    def __repr__(self) -> str:
        return f"<Link {self.link_id:#x} to peer {self.peer_id!r}, {len(self.connections)} connections>"

    @property
    def closed(self) -> bool:
        """True once the link aborted or was closed."""
        return self._error is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of early data currently held in the side buffer."""
        return self._held_bytes

    def _make_on_lost(self, index: int) -> Callable[[Connection, PeerLostError], None]:
        def on_lost(conn: Connection, error: PeerLostError) -> None:
            abort = PeerLostError(f"link to peer {self.peer_id!r}: connection {index} lost: {error}")
            abort.__cause__ = error
            self.abort(abort)

        return on_lost

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._lost()

    def _lost(self) -> PeerLostError:
        assert self._error is not None
        error = PeerLostError(str(self._error))
        error.__cause__ = self._error.__cause__
        return error

    # --- sending (§4) ------------------------------------------------------------------

    async def send(self, tag: int, seq: int, buffer: Any) -> None:
        """Send ``buffer`` as transfer ``(tag, seq)``, striped over the pool.

        Returns when the kernel holds every byte, so the caller may reuse
        ``buffer``. If cancelled, frames already queued may still reference it.

        Raises:
            PeerLostError: the link aborted (a connection broke), ``tag`` was
                forgotten while sending, or the peer aborted ``tag``.
            InvalidUsageError: bad tag/seq, not a contiguous bytes-like buffer, or
                ``tag`` was forgotten here before the call.
        """
        _check_key(tag, seq)
        view = _view(buffer, writable=False)
        self._raise_if_closed()
        self._raise_if_forgotten(tag, seq)
        total = len(view)
        count = len(self.connections)
        stripes = max(1, min(count, -(-total // MIN_STRIPE)))
        first = self._next_conn
        self._next_conn = (first + stripes) % count
        bounds = [total * i // stripes for i in range(stripes + 1)]
        sends = [
            self._send_stripe(self.connections[(first + i) % count], tag, seq, view, bounds[i], bounds[i + 1])
            for i in range(stripes)
        ]
        try:
            if len(sends) == 1:
                await sends[0]
            else:
                await asyncio.gather(*sends)
        except PeerLostError:
            if self._error is not None:
                raise self._lost() from None  # say which link and connection failed
            raise

    async def _send_stripe(self, conn: Connection, tag: int, seq: int, view: memoryview, start: int, end: int) -> None:
        total = len(view)
        offset = start
        while True:
            size = min(self.frame_size, end - offset)
            await conn.drain()  # the previous frame is in the kernel: queue the next
            if self._error is not None:
                raise self._lost()
            if tag in self._forgotten:
                raise self._tag_gone(tag, seq)
            header = pack_header(FrameType.DATA, size, tag=tag, seq=seq, offset=offset, total=total)
            conn.write_frame(header, view[offset : offset + size])
            self.tx_bytes += size
            offset += size
            if offset >= end:
                break
        await conn.drain()

    # --- receiving (§4) ----------------------------------------------------------------

    async def recv_into(self, tag: int, seq: int, buffer: Any) -> None:
        """Receive transfer ``(tag, seq)`` straight into ``buffer`` (exactly ``len(buffer)`` bytes).

        Data that arrived earlier is copied in from the side buffer. If the call
        is cancelled, late frames of this transfer are dropped and ``buffer`` is
        no longer written.

        Raises:
            PeerLostError: the link aborted, ``tag`` was forgotten meanwhile, or the
                peer aborted ``tag``.
            ProtocolError: the sender's transfer size differs from ``len(buffer)``.
            InvalidUsageError: bad tag/seq, non-writable buffer, a receive for
                ``(tag, seq)`` is already posted, or ``tag`` was forgotten here.
        """
        _check_key(tag, seq)
        view = _view(buffer, writable=True)
        self._raise_if_closed()
        self._raise_if_forgotten(tag, seq)
        key = (tag, seq)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._transfers[key] = _Transfer(len(view))
        elif transfer.error is not None:
            raise transfer.error
        elif transfer.buffer is not None:
            raise InvalidUsageError(f"a receive for transfer {tag}/{seq} is already posted")
        elif transfer.total != len(view):
            self._drop_held(transfer)
            transfer.error = self._size_error(tag, seq, transfer.total, len(view))
            raise transfer.error
        transfer.buffer = view
        self._adopt_held(transfer)
        if self._complete(key, transfer):
            return
        waiter = transfer.waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                self._cancel_receive(key, transfer)
            raise

    def _size_error(self, tag: int, seq: int, sent: int, posted: int) -> ProtocolError:
        return ProtocolError(
            f"transfer {tag}/{seq} from peer {self.peer_id!r} carries {sent} bytes "
            f"but the receive buffer holds {posted}"
        )

    def _adopt_held(self, transfer: _Transfer) -> None:
        """Copy early data into the just-posted buffer, once (§4)."""
        assert transfer.buffer is not None
        for offset, chunk in transfer.held:
            transfer.buffer[offset : offset + len(chunk)] = chunk
            transfer.received += len(chunk)
        self._drop_held(transfer)

    def _drop_held(self, transfer: _Transfer) -> None:
        self._held_bytes -= sum(len(chunk) for _offset, chunk in transfer.held)
        transfer.held.clear()
        if self._paused and self._held_bytes < self.side_buffer_limit:
            paused, self._paused = self._paused, set()
            for conn in paused:
                conn.resume_reading("side-buffer")

    def _complete(self, key: tuple[int, int], transfer: _Transfer) -> bool:
        if transfer.received > transfer.total:
            raise ProtocolError(f"transfer {key[0]}/{key[1]} from peer {self.peer_id!r} received too many bytes")
        if transfer.buffer is None or transfer.frames == 0 or transfer.received != transfer.total:
            return False
        del self._transfers[key]
        if transfer.waiter is not None and not transfer.waiter.done():
            transfer.waiter.set_result(None)
        return True

    def _cancel_receive(self, key: tuple[int, int], transfer: _Transfer) -> None:
        transfer.waiter = None
        error = InvalidUsageError(f"the receive of transfer {key[0]}/{key[1]} was cancelled; its data is gone")
        self._fail_receive(key, transfer, error)

    def data_begin(self, conn: Connection, header: FrameHeader) -> memoryview | None:
        """DataSink: where the payload of one DATA frame goes (§4).

        Raises:
            ProtocolError: the frame contradicts earlier frames of its transfer.
        """
        self.rx_bytes += header.length
        if header.tag in self._forgotten:
            return None
        key = (header.tag, header.seq)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._transfers[key] = _Transfer(header.total)
        if transfer.error is not None:
            return None
        if transfer.total != header.total:
            if transfer.buffer is None:
                raise ProtocolError(f"frames of transfer {key[0]}/{key[1]} disagree on its size")
            self._fail_receive(key, transfer, self._size_error(key[0], key[1], header.total, transfer.total))
            return None
        end = header.offset + header.length
        if transfer.buffer is not None:
            self._inflight[conn] = (transfer, None)
            return transfer.buffer[header.offset : end]
        chunk = bytearray(header.length)
        self._held_bytes += header.length
        self._inflight[conn] = (transfer, chunk)
        return memoryview(chunk)

    def data_end(self, conn: Connection, header: FrameHeader) -> bool:
        """DataSink: a DATA frame is complete; False asks to pause ``conn`` (side buffer full)."""
        transfer, chunk = self._inflight.pop(conn)
        transfer.frames += 1
        if chunk is None:
            transfer.received += header.length
        elif transfer.buffer is not None:  # the receive was posted while this frame arrived
            transfer.buffer[header.offset : header.offset + len(chunk)] = chunk
            transfer.received += len(chunk)
            self._held_bytes -= len(chunk)
        elif transfer.error is None:
            transfer.held.append((header.offset, chunk))
        else:
            self._held_bytes -= len(chunk)
        self._complete((header.tag, header.seq), transfer)
        if self._held_bytes >= self.side_buffer_limit:
            self._paused.add(conn)
            return False
        return True

    def _fail_receive(self, key: tuple[int, int], transfer: _Transfer, error: Exception) -> None:
        """Fail a posted receive and stop writing into its buffer; later frames are dropped."""
        transfer.error = error
        if transfer.waiter is not None and not transfer.waiter.done():
            transfer.waiter.set_exception(error)
        transfer.waiter = None
        transfer.buffer = None
        for conn, (inflight, chunk) in list(self._inflight.items()):
            if inflight is transfer and chunk is None:
                conn.discard_current(*key)
                del self._inflight[conn]

    def _raise_if_forgotten(self, tag: int, seq: int) -> None:
        if tag in self._peer_aborted:  # the remote side's doing: the operation may be retried
            raise self._tag_gone(tag, seq)
        if tag in self._forgotten:
            raise InvalidUsageError(f"tag {tag} was forgotten on this link; use a fresh tag")

    def _tag_gone(self, tag: int, seq: int) -> PeerLostError:
        reason = self._peer_aborted.get(tag)
        if reason is None:
            return PeerLostError(f"transfer {tag}/{seq} with peer {self.peer_id!r} was forgotten")
        return PeerLostError(f"transfer {tag}/{seq}: peer {self.peer_id!r} aborted tag {tag}: {reason}")

    def forget(self, tag: int) -> None:
        """Drop everything of ``tag`` and refuse its late frames from now on.

        Pending receives of ``tag`` fail with PeerLostError; sends of it stop
        before their next frame. A forgotten tag stays refused on this link:
        use a fresh tag for every operation. The peer is not told (after a
        success it may still be receiving): use :meth:`abort_tag` on failure.
        Raises nothing; safe to call from any thread (it is then scheduled).
        """
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.forget, tag)
            return
        self._forget(tag, lambda key: PeerLostError(f"transfer {key[0]}/{key[1]} was forgotten"))

    def abort_tag(self, tag: int, reason: str) -> None:
        """Forget ``tag`` (see :meth:`forget`) and tell the peer to do the same (ABORT_TAG, §4).

        For an operation that failed or was cancelled, never after a success:
        the peer's pending and later sends and receives of ``tag`` then fail with
        PeerLostError naming ``tag`` and ``reason``. Nothing is sent when the tag
        was aborted by the peer or the link is down. Safe to call from any thread
        (it is then scheduled).

        Raises:
            InvalidUsageError: ``tag`` is not an unsigned 64-bit integer.
        """
        _check_key(tag, 0)
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.abort_tag, tag, reason)
            return
        self._forget(tag, lambda key: PeerLostError(f"transfer {key[0]}/{key[1]} was aborted: {reason}"))
        if tag in self._peer_aborted or self._error is not None:
            return
        payload = _shorten(reason)
        header = pack_header(FrameType.ABORT_TAG, len(payload), tag=tag)
        # On every connection: the first to arrive wins, however much data queues on the others.
        for conn in self.connections:
            try:
                conn.write_frame(header, payload)
            except PeerLostError:
                return  # the link is failing: the peer learns of that instead

    def tag_aborted(self, conn: Connection, tag: int, reason: str) -> None:
        """DataSink: the peer aborted ``tag`` (§4); forget it here, failing its transfers."""
        if tag in self._forgotten:
            return  # ended here already (or a copy of the same frame on another connection)
        log.debug("peer %r aborted tag %d on link %#x: %s", self.peer_id, tag, self.link_id, reason)
        self._peer_aborted[tag] = reason
        self._forget(tag, lambda key: self._tag_gone(*key))

    def _forget(self, tag: int, error: Callable[[tuple[int, int]], Exception]) -> None:
        self._forgotten.add(tag)
        for key in [k for k in self._transfers if k[0] == tag]:
            transfer = self._transfers.pop(key)
            self._drop_held(transfer)
            self._fail_receive(key, transfer, error(key))

    # --- control messages (§3) ----------------------------------------------------------

    async def send_message(self, msg: Message) -> None:
        """Send a control message on connection 0 (keeps messages in order).

        Raises:
            PeerLostError: the link aborted.
            InvalidUsageError: ``msg`` is not a valid declared message.
        """
        self._raise_if_closed()
        await self.connections[0].send_message(msg)

    async def recv_message(self) -> Message:
        """The next control message from the peer.

        Raises:
            PeerLostError: the link aborted and no message is left.
        """
        return await self._inbox.get()

    # --- lifetime -------------------------------------------------------------------

    def start_heartbeat(self, interval: float, timeout: float | None = None) -> None:
        """Heartbeats on every connection; see :meth:`Connection.start_heartbeat`."""
        for conn in self.connections:
            conn.start_heartbeat(interval, timeout)

    def abort(self, exc: BaseException | None = None) -> None:
        """Fail every pending and later operation with ``exc`` (a PeerLostError by
        default) and drop all connections at once, so the peer's link aborts too.
        Idempotent, raises nothing; safe to call from any thread (it is then scheduled)."""
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.abort, exc)
            return
        if self._error is not None:
            return
        if isinstance(exc, PeerLostError):
            error = exc
        else:
            error = PeerLostError(f"link to peer {self.peer_id!r} aborted{': ' + str(exc) if exc else ''}")
            error.__cause__ = exc
        log.info("link %#x to peer %r aborted: %s", self.link_id, self.peer_id, error)
        self._fail_all(error)
        for conn in self.connections:
            conn.abort(str(error), error)

    def _fail_all(self, error: PeerLostError) -> None:
        self._error = error
        for transfer in self._transfers.values():
            if transfer.waiter is not None and not transfer.waiter.done():
                transfer.waiter.set_exception(self._lost())
            transfer.buffer = None
        self._transfers.clear()
        self._inflight.clear()
        self._held_bytes = 0
        self._inbox.fail(self._lost)

    def close(self, reason: str = "") -> None:
        """Close gracefully: the peer sees CLOSE with ``reason`` and its link aborts.

        Pending operations fail with PeerLostError. Idempotent, raises nothing;
        safe to call from any thread (it is then scheduled).
        """
        if not on_loop(self._loop):
            self._loop.call_soon_threadsafe(self.close, reason)
            return
        if self._error is not None:
            return
        self._fail_all(PeerLostError(f"link to peer {self.peer_id!r} closed locally{': ' + reason if reason else ''}"))
        for conn in self.connections:
            conn.close(reason)

    async def wait_closed(self) -> None:
        """Wait until every socket of the pool is closed. Raises nothing."""
        await asyncio.gather(*(conn.wait_closed() for conn in self.connections))


# --- establishing links (§4) ----------------------------------------------------------


async def connect_link(
    host: str,
    port: int,
    *,
    connections: int = DEFAULT_CONNECTIONS,
    peer_id: PeerId,
    secret: bytes | None = None,
    role: str = "p2p",
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    congestion: str | None = "cubic",
    side_buffer_limit: int = DEFAULT_SIDE_BUFFER_LIMIT,
    frame_size: int = DEFAULT_FRAME_SIZE,
    encrypt: bool = False,
) -> Link:
    """Open a link of ``connections`` TCP connections to ``host:port`` (§4).

    Returns once the accepting side assembled the whole pool and answered
    LINK_READY, i.e. its ``on_link`` callback has the matching :class:`Link`.
    ``encrypt``: every connection seals its frames with AES-GCM (§2.1; needs ``secret``).

    Raises:
        PeerUnreachableError: a connection failed or the link was not ready within ``timeout``.
        AuthenticationError: refused by the server, wrong/missing secret, encryption
            settings that differ, version mismatch.
        ProtocolError: the server answered something else than LINK_READY.
        PeerLostError: the server dropped the connections while assembling.
        InvalidUsageError: ``connections`` out of range, ``encrypt`` without ``secret``.
    """
    if not 1 <= connections <= 256:
        raise InvalidUsageError(f"connections must be in 1..256, got {connections}")
    check_encrypt(encrypt, secret)
    link_id = secrets.randbits(64)
    results = await asyncio.gather(
        *(
            open_connection(
                host, port, role=role, peer_id=peer_id, secret=secret, timeout=timeout,
                congestion=congestion, link_id=link_id, index=i, pool_size=connections, encrypt=encrypt,
            )
            for i in range(connections)
        ),
        return_exceptions=True,
    )
    conns = [r for r in results if isinstance(r, Connection)]
    failures = [r for r in results if not isinstance(r, Connection)]
    if failures:
        for conn in conns:
            conn.abort("another connection of the link failed")
        raise failures[0]
    # Sinks are attached before LINK_READY arrives: the peer may send data right behind it.
    link = Link(conns, link_id=link_id, peer_id=conns[0].peer_id,
                side_buffer_limit=side_buffer_limit, frame_size=frame_size)
    try:
        async with asyncio.timeout(timeout):
            ready = await link._inbox.get()  # noqa: SLF001 - the first message is ours
    except TimeoutError as exc:
        link.abort(PeerUnreachableError(f"link to {host}:{port} not ready within {timeout} s"))
        raise PeerUnreachableError(f"link to {host}:{port} was not accepted within {timeout} s") from exc
    except BaseException:
        link.abort()
        raise
    if not isinstance(ready, LinkReady) or ready.link_id != link_id:
        link.abort(ProtocolError("expected LINK_READY"))
        raise ProtocolError(f"expected LINK_READY for link {link_id:#x}, got {ready!r}")
    return link
