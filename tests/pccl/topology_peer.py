"""A pccl peer for the topology integration tests: ``membership_peer.py`` plus
``{"cmd": "optimize_topology"}`` and ``{"cmd": "bandwidths"}`` (pairs as ``[sender,
receiver, bytes_per_s]``). Same JSON-lines protocol on stdin/stdout."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from membership_peer import execute as membership_execute
from membership_peer import info
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
    comm = Communicator(sys.argv[1], connections=2)
    print(json.dumps({"ok": True, "result": "started"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.monotonic()
        try:
            reply = {"ok": True, "result": execute(comm, cmd)}
        except Exception as exc:  # every error goes back to the test, which asserts on it
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        reply["seconds"] = time.monotonic() - t0
        print(json.dumps(reply), flush=True)
        if cmd["cmd"] == "close":
            break
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
