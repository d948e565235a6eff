"""The master: a thin asyncio server around :class:`~pccl.master_state.MasterState` (``docs/protocol.md`` §5).

Every peer connection is read by one task: its first message must be ``Register``;
every message after it becomes a ``Received`` event, a closed connection a
``PeerLost`` event, and a periodic timer feeds ``Tick``. The actions the state
returns are carried out at once (messages are queued on the connections without
waiting, so one slow peer never delays the others).

:class:`MasterServer` is the asyncio object (used by ``pccl master``);
:class:`Master` runs one in a background thread for blocking code and tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import stat
from typing import Any

from pccl import protocol as P
from pccl.errors import InvalidUsageError, MasterConnectionError
from pccl.master_state import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    Action,
    Bind,
    Event,
    Kick,
    Log,
    MasterState,
    PeerLost,
    Received,
    Refuse,
    RegisterRequest,
    Send,
    Tick,
)
from pccl.status import snapshot as status_snapshot
from pccl.status_http import StatusServer
from transport.connection import Connection
from transport.errors import PCCLError, PeerLostError
from transport.frame import FrameFlags, FrameType, pack_header
from transport.handshake import check_encrypt
from transport.loop import LoopThread
from transport.message import encode_payload
from transport.server import Server, start_server

log = logging.getLogger("pccl.master")

DEFAULT_PORT = 48148
# The clock is checked this often (at most): a silent peer is kicked within
# heartbeat_timeout + TICK_MAX seconds (§5.8).
TICK_MAX = 0.25


def _secret_bytes(secret: bytes | str | None) -> bytes | None:
    if secret is None or isinstance(secret, bytes):
        return secret
    return secret.encode("utf-8")


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The shared secret stored in ``path``, without its trailing newline (``docs/security.md``).

    Logs a warning when users other than the owner may read the file (make it 0600).

    Raises:
        InvalidUsageError: the file cannot be read or is empty.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().rstrip(b"\r\n")
    except OSError as exc:
        raise InvalidUsageError(f"cannot read the secret file {os.fspath(path)!r}: {exc}") from exc
    if not secret:
        raise InvalidUsageError(f"secret file {os.fspath(path)!r} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is accessible to other users (mode %o); chmod 600 it", path, mode & 0o777)
    return secret


def load_secret(
    secret: bytes | str | None, secret_file: str | os.PathLike[str] | None, encrypt: bool = False
) -> bytes | None:
    """The run's secret from ``secret`` or ``secret_file`` (not both), checked against ``encrypt``.

    Raises:
        InvalidUsageError: both given, the file is unreadable or empty, or
            ``encrypt`` without a secret.
    """
    if secret is not None and secret_file is not None:
        raise InvalidUsageError("pass secret= or secret_file=, not both")
    key = read_secret_file(secret_file) if secret_file is not None else _secret_bytes(secret)
    check_encrypt(encrypt, key)
    return key


def format_log(action: Log) -> str:
    """One structured log line: ``event key=value ...`` with JSON-encoded values."""
    fields = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in action.fields.items())
    return f"{action.event} {fields}".rstrip()


class MasterServer:
    """The master as an asyncio object; call :meth:`start` and :meth:`close` on its loop."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        *,
        secret: bytes | str | None = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        status_port: int | None = None,
        status_host: str | None = None,
        encrypt: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self._secret = load_secret(secret, None, encrypt)
        self._encrypt = encrypt  # every peer connection sealed with AES-GCM (docs/protocol.md §2.1)
        self.state = MasterState(heartbeat_timeout, measure_bandwidth=True)
        # The read-only status page (docs/protocol.md §8), on this loop; None: not served.
        self._status_port = status_port
        self._status_host = host if status_host is None else status_host
        self.status_server: StatusServer | None = None
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tokens = itertools.count(1)
        self._unbound: dict[int, Connection] = {}  # connection token -> connection
        self._bound: dict[int, Connection] = {}  # peer id -> connection
        self._closing = False

    async def start(self) -> None:
        """Bind and start serving; ``self.port`` is the bound port afterwards.

        Raises:
            MasterConnectionError: the address cannot be bound.
        """
        try:
            self._server = await start_server(
                self.host, self.port, self._on_connection, secret=self._secret, role="master", congestion=None,
                encrypt=self._encrypt,
            )
        except OSError as exc:
            raise MasterConnectionError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.port = self._server.port
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("listening host=%s port=%d heartbeat_timeout=%g", self.host, self.port, self.state.heartbeat_timeout)
        if self._status_port is not None:
            await self._start_status(self._status_port)

    async def _start_status(self, port: int) -> None:
        status = StatusServer(self.status_snapshot)
        try:
            await status.start(self._status_host, port)
        except MasterConnectionError:
            await self.close()
            raise
        self.status_server = status
        log.info("status page url=%s (unauthenticated, read-only)", status.url)

    def status_snapshot(self) -> dict[str, Any]:
        """What the status page shows (``pccl.status.snapshot``); call on the loop thread."""
        now = asyncio.get_running_loop().time()
        return status_snapshot(self.state, now, master=f"{self.host}:{self.port}")

    async def close(self) -> None:
        """Stop listening and close every peer connection (peers see the master go). Raises nothing."""
        if self._closing:
            return
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        if self.status_server is not None:
            await self.status_server.close()
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks) + ([self._ticker] if self._ticker is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("stopped")

    def status(self) -> dict[str, Any]:
        """A snapshot for tests and operators: peers, rings, kicks (call on the loop thread)."""
        st = self.state
        rnd = st.round
        return {
            "round": None if rnd is None else {"kind": rnd.kind, "voters": sorted(rnd.voters), "linking": rnd.linking},
            "collectives": {
                g: {t: sorted(c.participants()) for t, c in grp.collectives.items()} for g, grp in st.groups.items()
            },
            "accepted": st.accepted(),
            "pending": st.pending(),
            "rings": {g: list(grp.ring) for g, grp in st.groups.items()},
            "epochs": {g: grp.epoch for g, grp in st.groups.items()},
            "kicks": dict(st.kicks),
            "departures": dict(st.departures),
            "bandwidth": dict(st.bandwidth),  # (sender, receiver) -> bytes/s, docs/protocol.md §5.12
        }

    # -- event plumbing ---------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        now = asyncio.get_running_loop().time()
        # One message sent to several peers (a collective's start or outcome) is the same
        # object: it is encoded once per event, not once per recipient.
        frames: dict[int, tuple[bytes, bytes]] = {}
        for action in self.state.handle(now, event):
            self._perform(action, frames)

    def _perform(self, action: Action, frames: dict[int, tuple[bytes, bytes]]) -> None:
        if isinstance(action, Send):
            conn = self._bound.get(action.peer)
            if conn is not None:
                _write_frame(conn, _control_frame(action.msg, frames))
        elif isinstance(action, Bind):
            self._bound[action.peer] = self._unbound.pop(action.conn)
        elif isinstance(action, Kick):
            conn = self._bound.pop(action.peer, None)
            if conn is not None:
                _write(conn, P.Kicked(action.reason, action.error))
                conn.close(f"kicked: {action.reason}")
        elif isinstance(action, Refuse):
            conn = self._unbound.pop(action.conn, None)
            if conn is not None:
                _write(conn, P.Kicked(action.reason, P.ERROR_MASTER))
                conn.close(f"refused: {action.reason}")
        elif isinstance(action, Log):
            if log.isEnabledFor(logging.INFO):  # formatting costs more than the event itself
                log.info("%s", format_log(action))

    async def _tick_loop(self) -> None:
        period = min(TICK_MAX, self.state.heartbeat_timeout / 10)
        while True:
            await asyncio.sleep(period)
            self._feed(Tick())

    # -- connections --------------------------------------------------------------------

    def _on_connection(self, conn: Connection) -> None:
        if self._closing:
            conn.close("master closing")
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: Connection) -> None:
        # Transport heartbeats keep the peer's watchdog fed even while the state is idle (§5.8).
        conn.start_heartbeat(self.state.heartbeat_interval)
        token = next(self._tokens)
        peer = await self._register(conn, token)
        if peer is None:
            return
        try:
            while True:
                msg = await conn.recv_message()
                if self._bound.get(peer) is not conn:
                    return  # kicked: nothing more from this connection matters
                self._feed(Received(peer, msg))
        except PeerLostError as exc:
            if self._bound.get(peer) is conn:
                del self._bound[peer]
                self._feed(PeerLost(peer, str(exc)))

    async def _register(self, conn: Connection, token: int) -> int | None:
        """Read the Register message and feed it; the bound peer id, or None if refused."""
        try:
            async with asyncio.timeout(self.state.heartbeat_timeout):
                msg = await conn.recv_message()
        except (TimeoutError, PeerLostError) as exc:
            log.info(
                "refuse address=%s reason=%s",
                json.dumps(str(conn.peer_address)), json.dumps(f"no Register: {exc!r}"),
            )
            conn.close("expected a Register message")
            return None
        if not isinstance(msg, P.Register):
            reason = f"the first message must be Register, got {type(msg).__name__}"
            _write(conn, P.Kicked(reason, P.ERROR_MASTER))
            conn.close(reason)
            return None
        self._unbound[token] = conn
        observed = conn.peer_address[0] if isinstance(conn.peer_address, tuple) else str(conn.peer_address)
        self._feed(RegisterRequest(token, msg, observed))
        self._unbound.pop(token, None)
        for peer, bound in self._bound.items():
            if bound is conn:
                return peer
        return None


def _control_frame(msg: Any, frames: dict[int, tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """``msg`` as a CONTROL frame (header, payload), encoded once per object (§3)."""
    frame = frames.get(id(msg))
    if frame is None:
        payload, compressed = encode_payload(msg)
        flags = FrameFlags.COMPRESSED if compressed else FrameFlags.NONE
        frame = frames[id(msg)] = (pack_header(FrameType.CONTROL, len(payload), flags=flags), payload)
    return frame


def _write_frame(conn: Connection, frame: tuple[bytes, bytes]) -> None:
    """Queue an encoded frame on ``conn``; a broken connection is reported by its reader task instead."""
    try:
        conn.write_frame(*frame)
    except PeerLostError:
        pass


def _write(conn: Connection, msg: Any) -> None:
    """Queue ``msg`` on ``conn``; a broken connection is reported by its reader task instead."""
    try:
        conn.write_message(msg)
    except PeerLostError:
        pass


class Master:
    """A membership master running in a background thread.

    ``with pccl.Master(host, port=0) as master: ...`` serves until the block ends;
    ``master.port`` is the bound port. ``heartbeat_timeout``: seconds of silence
    after which a peer is dropped (§5.8). ``status_port`` (0: a free one) also serves
    the read-only status page on ``status_host`` (default: ``host``; §8), at
    ``master.status_url``; it is unauthenticated, so keep it on loopback or behind a
    firewall. ``secret_file``: read the secret from this file instead (0600; see
    ``docs/security.md``). ``encrypt``: every peer must connect with
    ``encrypt=True`` and all traffic of the run is AES-GCM encrypted (needs a secret).

    Raises:
        InvalidUsageError: ``encrypt`` without a secret, both ``secret`` and
            ``secret_file``, or an unreadable secret file.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        secret: bytes | str | None = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        status_port: int | None = None,
        status_host: str | None = None,
        *,
        secret_file: str | os.PathLike[str] | None = None,
        encrypt: bool = False,
    ) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive")
        self.host = host
        self._port = port
        self._secret = load_secret(secret, secret_file, encrypt)
        self._encrypt = encrypt
        self._heartbeat_timeout = heartbeat_timeout
        self._status = (status_port, status_host)
        self._thread: LoopThread | None = None
        self._server: MasterServer | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one until :meth:`start`)."""
        return self._server.port if self._server is not None else self._port

    @property
    def address(self) -> str:
        """``host:port`` to give to Communicators (``127.0.0.1`` when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"{host}:{self.port}"

    @property
    def status_url(self) -> str | None:
        """``http://host:port/`` of the status page once started with a ``status_port``, else None."""
        status = self._server.status_server if self._server is not None else None
        return status.url if status is not None else None

    def start(self) -> None:
        """Bind and serve in a background thread.

        Raises:
            MasterConnectionError: the address cannot be bound.
            InvalidUsageError: already started.
        """
        if self._thread is not None:
            raise InvalidUsageError("Master.start() called twice; create another Master instead")
        thread = LoopThread("pccl-master")
        server = MasterServer(
            self.host, self._port, secret=self._secret, heartbeat_timeout=self._heartbeat_timeout,
            status_port=self._status[0], status_host=self._status[1], encrypt=self._encrypt,
        )
        try:
            thread.run(server.start())
        except BaseException:
            thread.stop()
            raise
        self._thread, self._server = thread, server

    def stop(self) -> None:
        """Close every connection and stop the thread. Idempotent; raises nothing."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return
        self._thread = None
        try:
            thread.run(server.close())
        except PCCLError as exc:  # closing must not fail the caller
            log.warning("master close: %s", exc)
        thread.stop()

    def status(self) -> dict[str, Any]:
        """Accepted/pending peers, rings, epochs and kick reasons, for tests and operators.

        Raises:
            InvalidUsageError: the master is not running.
        """
        if self._thread is None or self._server is None:
            raise InvalidUsageError("Master.status() needs a running master; call start() first")
        server = self._server

        async def snapshot() -> dict[str, Any]:
            return server.status()

        return self._thread.run(snapshot())

    def __enter__(self) -> Master:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
