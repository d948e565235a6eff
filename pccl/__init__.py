"""pccl: fault-tolerant peer-to-peer collective communication.

The public API (see README): ``Master``, ``Communicator``, ``SharedState``,
``ReduceOp``, ``Quantization``, ``SyncStrategy`` and the error hierarchy.
"""

from __future__ import annotations

from collectives.types import Quantization, ReduceInfo, ReduceOp
from pccl.communicator import Communicator
from pccl.errors import (
    AuthenticationError,
    InvalidUsageError,
    MasterConnectionError,
    PCCLError,
    PeerLostError,
    ProtocolError,
    SharedStateError,
    TooFewPeersError,
    TopologyUpdateError,
)
from pccl.master import Master
from pccl.shared_state import SharedState, SyncInfo, SyncStrategy, TensorInfo

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Communicator",
    "InvalidUsageError",
    "Master",
    "MasterConnectionError",
    "PCCLError",
    "PeerLostError",
    "ProtocolError",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "SharedState",
    "SharedStateError",
    "SyncInfo",
    "SyncStrategy",
    "TensorInfo",
    "TooFewPeersError",
    "TopologyUpdateError",
    "__version__",
]
