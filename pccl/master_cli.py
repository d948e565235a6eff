"""Run a pccl membership master until SIGINT or SIGTERM.

Peers connect with ``pccl.Communicator("HOST:PORT")``. Every join, accept, kick
(with its reason) and resolved vote is logged as one structured line.

examples:
  pccl master --port 48148
  pccl master --host 127.0.0.1 --port 0 --heartbeat-timeout 2
  pccl master --secret-file /etc/pccl/secret
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from pccl.errors import MasterConnectionError
from pccl.master import DEFAULT_PORT, MasterServer
from pccl.master_state import DEFAULT_HEARTBEAT_TIMEOUT
from transport.loop import new_event_loop

log = logging.getLogger("pccl.master")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``pccl master`` options."""
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--secret-file", type=Path, default=None,
        help="file holding the shared secret every peer must prove (trailing newline ignored)",
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT,
        help=f"seconds of silence after which a peer is dropped (default {DEFAULT_HEARTBEAT_TIMEOUT:g})",
    )


def read_secret(path: Path | None) -> bytes | None:
    """The secret stored in ``path`` (without its trailing newline), or None.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty.
    """
    if path is None:
        return None
    secret = path.read_bytes().rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


async def serve(server: MasterServer, stop: asyncio.Event) -> None:
    """Start ``server``, wait for ``stop``, then close it.

    Raises:
        MasterConnectionError: the address cannot be bound.
    """
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pccl master``: 0 after a clean shutdown, 1 if it could not start."""
    try:
        secret = read_secret(args.secret_file)
    except (OSError, ValueError) as exc:
        log.error("cannot read the secret: %s", exc)
        return 1
    if args.heartbeat_timeout <= 0:
        log.error("--heartbeat-timeout must be positive")
        return 1
    server = MasterServer(args.host, args.port, secret=secret, heartbeat_timeout=args.heartbeat_timeout)
    loop = new_event_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("signal %s received, shutting down", signal.Signals(signum).name)
        stop.set()

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        loop.run_until_complete(serve(server, stop))
    except MasterConnectionError as exc:
        log.error("%s", exc)
        return 1
    finally:
        loop.close()
    return 0
