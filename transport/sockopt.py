"""TCP socket tuning shared by every pccl connection (``docs/protocol.md`` §1)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

log = logging.getLogger(__name__)

#: Socket buffer size asked for by default: None keeps the kernel's auto-tuning.
#: Setting SO_SNDBUF/SO_RCVBUF switches auto-tuning off and is capped at twice
#: net.core.{r,w}mem_max — about 416 KiB on a stock distribution, i.e. a ~66 Mbit/s
#: window at 50 ms RTT — while auto-tuning grows up to tcp_{r,w}mem's maximum.
BUFFER_SIZE: int | None = None
#: Keep-alive: first probe after this many idle seconds, then every KEEPINTVL, give up after KEEPCNT.
KEEPIDLE = 10
KEEPINTVL = 5
KEEPCNT = 3
#: Congestion control algorithms tried, in order, when "cubic" is asked for.
_FALLBACKS = {"cubic": ("cubic", "reno"), "reno": ("reno",)}


def tune(sock: Any, congestion: str | None = "cubic", buffer_size: int | None = BUFFER_SIZE) -> str | None:
    """Tune a TCP socket for bulk transfers; never fails because an option is refused.

    Sets TCP_NODELAY, SO_KEEPALIVE with short probe timers, SO_SNDBUF/SO_RCVBUF
    to ``buffer_size`` when that is larger than the current size (``None`` keeps
    the kernel's auto-tuning), and the per-socket congestion control: for
    ``"cubic"`` cubic, else reno, else whatever the system uses; another name
    is tried alone; ``None`` keeps the system default.

    ``sock`` is a ``socket.socket`` or an event loop's socket-like wrapper.
    Returns the congestion control algorithm in effect (``None`` if unknown).
    Raises nothing.
    """
    _set(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
        option = getattr(socket, name, None)
        if option is not None:
            _set(sock, socket.IPPROTO_TCP, option, value)
    if buffer_size:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            current = _get(sock, socket.SOL_SOCKET, option)
            if current is None or current < buffer_size:
                _set(sock, socket.SOL_SOCKET, option, buffer_size)
    return _set_congestion(sock, congestion)


def congestion_of(sock: Any) -> str | None:
    """The congestion control algorithm of ``sock``, or ``None`` where the OS does not say."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, 16)
    except (OSError, ValueError):
        return None
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace") or None


def _set_congestion(sock: Any, congestion: str | None) -> str | None:
    option = getattr(socket, "TCP_CONGESTION", None)
    if congestion is None or option is None:
        return congestion_of(sock)
    for name in _FALLBACKS.get(congestion, (congestion,)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, name.encode("ascii"))
            break
        except (OSError, ValueError):
            # Not built into this kernel or not allowed for unprivileged users:
            # try the next one, and in the end silently keep the system's.
            continue
    return congestion_of(sock)


def _set(sock: Any, level: int, option: int, value: int) -> None:
    try:
        sock.setsockopt(level, option, value)
    except (OSError, ValueError) as exc:
        log.debug("setsockopt(%s, %s, %s) refused: %s", level, option, value, exc)


def _get(sock: Any, level: int, option: int) -> int | None:
    try:
        value = sock.getsockopt(level, option)
    except (OSError, ValueError):
        return None
    return int(value)


#: tcp_info.tcpi_state of an established connection (Linux include/net/tcp_states.h).
_TCP_ESTABLISHED = 1
# (ValueError: uvloop's socket wrapper of an already closed descriptor.)


def peer_gone(sock: Any) -> bool:
    """True if the kernel says the connection is no longer established (FIN or RST seen).

    Lets a connection whose reading is paused notice its peer left: with reading
    paused the event loop no longer watches the socket. False where the OS does
    not say (non-Linux). Raises nothing.
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 8)
    except (OSError, ValueError):
        return True  # the socket itself is gone
    return bool(info) and info[0] != _TCP_ESTABLISHED


def reset_on_close(sock: Any) -> None:
    """Make the coming close() send RST and drop unsent data (SO_LINGER 0). Raises nothing.

    An aborted connection must look dead to the peer at once, even if the peer is
    not reading; a plain close would queue the FIN behind unsent bytes.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, ValueError) as exc:
        log.debug("SO_LINGER refused: %s", exc)


async def connect_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, congestion: str | None
) -> socket.socket:
    """A connected, tuned, non-blocking socket (options set before connect so the window scales)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            tune(sock, congestion)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last
