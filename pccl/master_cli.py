"""Run a pccl membership master until SIGINT or SIGTERM.

Peers connect with ``pccl.Communicator("HOST:PORT")``. Every join, accept, kick
(with its reason) and resolved vote is logged as one structured line.

examples:
  pccl master --port 48148
  pccl master --host 127.0.0.1 --port 0 --heartbeat-timeout 2
  pccl master --secret-file /etc/pccl/secret
  pccl master --secret-file /etc/pccl/secret --encrypt   (peers: Communicator(..., encrypt=True))
  pccl master --status-port 48149 --status-host 127.0.0.1   (then: pccl status 127.0.0.1:48149)

The status page (--status-port) is unauthenticated and read-only: it shows peer
addresses and kick reasons to anyone who can reach it, so keep it on loopback or
behind a firewall.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from pccl.errors import MasterConnectionError
from pccl.master import DEFAULT_PORT, MasterServer, read_secret_file
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
        help="file holding the shared secret every peer must prove (trailing newline ignored; chmod 600)",
    )
    parser.add_argument(
        "--encrypt", action="store_true",
        help="encrypt all traffic of the run with AES-GCM (needs --secret-file; every peer must set encrypt=True)",
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT,
        help=f"seconds of silence after which a peer is dropped (default {DEFAULT_HEARTBEAT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--status-port", type=int, default=None, metavar="PORT",
        help="also serve the read-only status page and status.json on this port (0 picks a free one; "
        "unauthenticated: keep it on loopback or behind a firewall)",
    )
    parser.add_argument(
        "--status-host", default=None, metavar="HOST",
        help="address of the status page (default: the --host address)",
    )


def read_secret(path: Path | None) -> bytes | None:
    """The secret stored in ``path`` (without its trailing newline), or None.

    Raises:
        InvalidUsageError: (a ValueError) the file cannot be read or is empty.
    """
    return None if path is None else read_secret_file(path)  # warns unless the file is 0600


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
    if args.encrypt and secret is None:
        log.error("--encrypt needs --secret-file: the encryption keys are derived from the secret")
        return 1
    if args.heartbeat_timeout <= 0:
        log.error("--heartbeat-timeout must be positive")
        return 1
    if args.status_port is not None and not 0 <= args.status_port < 65536:
        log.error("--status-port must be a TCP port (0..65535)")
        return 1
    if args.status_host is not None and args.status_port is None:
        log.error("--status-host needs --status-port")
        return 1
    server = MasterServer(
        args.host, args.port, secret=secret, heartbeat_timeout=args.heartbeat_timeout,
        status_port=args.status_port, status_host=args.status_host, encrypt=args.encrypt,
    )
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
