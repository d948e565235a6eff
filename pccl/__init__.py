"""pccl: fault-tolerant peer-to-peer collective communication.

The public API (see README): ``Master``, ``Communicator``, ``SharedState``,
``ReduceOp``, ``Quantization``, ``SyncStrategy`` and the error hierarchy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from collectives.types import Quantization, ReduceInfo, ReduceOp
    from pccl.communicator import Communicator
    from pccl.master import Master
    from pccl.shared_state import SharedState, SyncInfo, SyncStrategy, TensorInfo

# Imported on first use, so that `import pccl` (and with it `pccl status`, `pccl --help`)
# does not pay for importing torch (~1.5 s) until something needs it.
_LAZY = {
    "Quantization": "collectives.types",
    "ReduceInfo": "collectives.types",
    "ReduceOp": "collectives.types",
    "Communicator": "pccl.communicator",
    "Master": "pccl.master",
    "SharedState": "pccl.shared_state",
    "SyncInfo": "pccl.shared_state",
    "SyncStrategy": "pccl.shared_state",
    "TensorInfo": "pccl.shared_state",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pccl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
