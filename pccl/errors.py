"""Every error pccl raises, importable from one place.

Each error is defined in the lowest layer that raises it (see DESIGN: imports only
go downward); this module re-exports them and defines the API-level ones.
"""

from __future__ import annotations

from transport.errors import (
    AuthenticationError,
    InvalidUsageError,
    PCCLError,
    PeerLostError,
    ProtocolError,
)


class TooFewPeersError(PCCLError):
    """The operation needs at least two peers in the group and fewer are left."""


class MasterConnectionError(PCCLError):
    """The master could not be reached, refused us, or went away."""


class TopologyUpdateError(PCCLError):
    """A topology change (accepting peers, re-wiring the ring) failed; it may be retried."""


class SharedStateError(PCCLError):
    """Shared-state synchronisation failed or was refused (revision, keys, hash)."""


__all__ = [
    "AuthenticationError",
    "InvalidUsageError",
    "MasterConnectionError",
    "PCCLError",
    "PeerLostError",
    "ProtocolError",
    "SharedStateError",
    "TooFewPeersError",
    "TopologyUpdateError",
]
