"""A pccl peer for the topology integration tests: ``membership_peer.py`` plus
``{"cmd": "optimize_topology"}`` and ``{"cmd": "bandwidths"}`` (pairs as ``[sender,
receiver, bytes_per_s]``). Same JSON-lines protocol on stdin/stdout."""

from __future__ import annotations

import sys
from typing import Any

from membership_peer import execute as membership_execute
from membership_peer import info, serve
from pccl.communicator import Communicator


def execute(comm: Communicator, cmd: dict[str, Any]) -> Any:
    name = cmd["cmd"]
    if name == "optimize_topology":
        comm.optimize_topology()
        return {**info(comm), "bandwidths": sorted([a, b, v] for (a, b), v in comm.bandwidths.items())}
    if name == "bandwidths":
        return sorted([a, b, v] for (a, b), v in comm.bandwidths.items())
    return membership_execute(comm, cmd)


def main() -> int:
    return serve(Communicator(sys.argv[1], connections=2), execute)


if __name__ == "__main__":
    sys.exit(main())
