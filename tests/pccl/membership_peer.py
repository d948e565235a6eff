"""A pccl peer in its own process, driven by JSON commands on stdin (one per line).

Each command is answered by one JSON line on stdout: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "PeerLostError", "message": "..."}``. Used by the
membership integration tests and the membership benchmark.

Commands: ``{"cmd": "connect", "timeout": s}``, ``{"cmd": "update_topology"}``,
``{"cmd": "are_peers_pending"}``, ``{"cmd": "info"}``,
``{"cmd": "loop_update_topology", "until_world": n}``,
``{"cmd": "ring_check", "tag": t}`` (each peer sends its id to NEXT and returns what
PREV sent), ``{"cmd": "hang_collective", "tag": t}`` (waits for data that never
comes, until the master aborts), ``{"cmd": "close"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from pccl.communicator import Communicator
from pccl.peer_session import CollectiveContext


async def ring_body(ctx: CollectiveContext) -> list[int]:
    """Send this peer's ring position to NEXT; return what PREV sent (8 little-endian bytes)."""
    if ctx.peers is None:
        return [ctx.ring[ctx.rank]]
    import asyncio

    out = ctx.ring[ctx.rank].to_bytes(8, "little")
    buf = bytearray(8)
    await asyncio.gather(
        ctx.peers.send_next(ctx.op_id, 0, memoryview(out)), ctx.peers.recv_prev(ctx.op_id, 0, memoryview(buf))
    )
    return [int.from_bytes(buf, "little")]


async def hang_body(ctx: CollectiveContext) -> None:
    """Wait for a transfer nobody sends: only an abort from the master ends this."""
    assert ctx.peers is not None
    await ctx.peers.recv_prev(ctx.op_id, 12345, memoryview(bytearray(8)))


def info(comm: Communicator) -> dict[str, Any]:
    return {
        "peer_id": comm.peer_id,
        "world_size": comm.world_size,
        "global_world_size": comm.global_world_size,
        "num_peer_groups": comm.num_peer_groups,
        "largest_peer_group_size": comm.largest_peer_group_size,
        "ring": comm.ring,
    }


def execute(comm: Communicator, cmd: dict[str, Any]) -> Any:
    name = cmd["cmd"]
    if name == "connect":
        comm.connect(timeout=cmd.get("timeout"))
        return info(comm)
    if name == "update_topology":
        comm.update_topology()
        return info(comm)
    if name == "are_peers_pending":
        return comm.are_peers_pending()
    if name == "info":
        return info(comm)
    if name == "loop_update_topology":
        rounds = 0
        while comm.world_size < cmd["until_world"]:
            comm.update_topology()
            rounds += 1
        return {"rounds": rounds, **info(comm)}
    if name == "ring_check":
        return comm._collective_blocking(cmd["tag"], {"kind": "ring_check", "numel": 8}, ring_body)
    if name == "hang_collective":
        return comm._collective_blocking(cmd["tag"], {"kind": "hang", "numel": 8}, hang_body)
    if name == "close":
        comm.close()
        return None
    raise ValueError(f"unknown command {name!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("master")
    parser.add_argument("--group", type=int, default=0)
    parser.add_argument("--secret", default=None)
    parser.add_argument("--advertise-host", default=None)
    args = parser.parse_args()
    comm = Communicator(args.master, peer_group=args.group, connections=2, secret=args.secret,
                        advertise_host=args.advertise_host)
    return serve(comm, execute)


def serve(comm: Communicator, run: Callable[[Communicator, dict[str, Any]], Any]) -> int:
    """Say "started", then answer one JSON command per stdin line with ``run`` until "close"."""
    print(json.dumps({"ok": True, "result": "started"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.monotonic()
        try:
            reply = {"ok": True, "result": run(comm, cmd)}
        except Exception as exc:  # every error goes back to the test, which asserts on it
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        reply["at"] = time.time()
        reply["seconds"] = time.monotonic() - t0
        print(json.dumps(reply), flush=True)
        if cmd["cmd"] == "close":
            break
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
