"""Async TCP transport: framing, zero-copy receive, handshake + auth, striped links.

The wire format is in ``docs/protocol.md`` §1-4; the interfaces other layers use
are in ``docs/architecture.md`` (transport/).
"""

from transport.connection import Connection, open_connection
from transport.errors import (
    AuthenticationError,
    InvalidUsageError,
    PCCLError,
    PeerLostError,
    PeerUnreachableError,
    ProtocolError,
)
from transport.link import Link, connect_link
from transport.loop import LoopThread, new_event_loop
from transport.message import Message, decode, encode, encode_payload, message
from transport.server import Server, start_server

__all__ = [
    "AuthenticationError",
    "Connection",
    "InvalidUsageError",
    "Link",
    "LoopThread",
    "Message",
    "PCCLError",
    "PeerLostError",
    "PeerUnreachableError",
    "ProtocolError",
    "Server",
    "connect_link",
    "decode",
    "encode",
    "encode_payload",
    "message",
    "new_event_loop",
    "open_connection",
    "start_server",
]
