"""The public surface is deliberate: adding or removing a name must show up here."""

from __future__ import annotations

import pccl

EXPECTED = {
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
}


def test_public_names_are_pinned() -> None:
    assert set(pccl.__all__) == EXPECTED
    for name in pccl.__all__:
        assert hasattr(pccl, name), name


def test_error_hierarchy() -> None:
    for name in ("PeerLostError", "TooFewPeersError", "MasterConnectionError", "TopologyUpdateError",
                 "SharedStateError", "AuthenticationError", "ProtocolError", "InvalidUsageError"):
        assert issubclass(getattr(pccl, name), pccl.PCCLError), name
    assert issubclass(pccl.InvalidUsageError, ValueError)


def test_lower_layers_do_not_import_pccl() -> None:
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    upward = re.compile(r"^\s*(from|import)\s+(pccl|training|stress)\b", re.M)
    for package in ("transport", "collectives"):
        for path in (root / package).glob("*.py"):
            assert not upward.search(path.read_text()), f"{path} imports an upper layer"
