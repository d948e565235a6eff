"""The root of pccl's error hierarchy and the errors the transport raises.

Every error is defined in the lowest layer that raises it, so imports only go
downward; users import them all from :mod:`pccl` (``pccl/errors.py`` re-exports).
"""

from __future__ import annotations


class PCCLError(Exception):
    """Root of every error pccl raises on purpose."""


class ProtocolError(PCCLError):
    """A peer sent bytes that break the wire protocol; that connection is closed."""


class AuthenticationError(PCCLError):
    """The handshake failed: wrong or missing secret, replayed nonce, or version mismatch."""


class PeerLostError(PCCLError):
    """An operation was aborted because a peer vanished; the caller may retry it."""


class InvalidUsageError(PCCLError, ValueError):
    """The caller used the API wrongly; the message says what to do instead."""


class PeerUnreachableError(PeerLostError):
    """A connection to a peer could not be established (refused, unreachable, timed out)."""
