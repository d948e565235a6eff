"""The peer process of ``test_shared_state_sync.py``: one warm Communicator per run.

Run as a script; driven by JSON lines on stdin (one command each), it answers one JSON
line per command. Bit identity is reported as SHA-256 of each entry's raw bytes, a hash
the library does not use.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_tensor(dtype: str, shape: list[int], seed: int | None) -> Any:
    import torch

    dt = getattr(torch, dtype)
    if seed is None:
        return torch.zeros(shape, dtype=dt)
    gen = torch.Generator().manual_seed(seed)
    if dt.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dt)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dt)


def _digests(state: Any) -> dict[str, str]:
    from pccl.shared_state import byte_view

    return {k: hashlib.sha256(bytes(byte_view(state[k]))).hexdigest() for k in state.keys()}


def _arm_kill_after(limit: int) -> None:
    """Declared fault: SIGKILL this process once it queued ``limit`` bytes of DATA frames."""
    from transport import connection
    from transport.frame import FrameType, unpack_header

    real = connection.Connection.write_frame
    sent = [0]

    def write_frame(self: Any, header: bytes, payload: Any = None) -> None:
        if payload is not None and unpack_header(header).type == FrameType.DATA:
            sent[0] += len(payload)
            if sent[0] > limit:
                os.kill(os.getpid(), signal.SIGKILL)
        real(self, header, payload)

    connection.Connection.write_frame = write_frame  # type: ignore[method-assign]


def _arm_corrupt() -> None:
    """Declared fault: every entry this peer serves arrives with its first byte flipped."""
    from pccl import shared_state_sync

    async def send_one(self: Any, link: Any, tag: int, seq: int, key: str) -> None:
        data = bytearray(self.state.host_buffer(key))
        if data:
            data[0] ^= 0xFF
        await link.send(tag, seq, data)

    shared_state_sync.ShareServer._send_one = send_one  # type: ignore[method-assign]


def _execute(ctx: dict[str, Any], cmd: dict[str, Any]) -> Any:
    import torch

    from pccl.communicator import Communicator
    from pccl.shared_state import SharedState, SyncStrategy, TensorInfo

    name = cmd["cmd"]
    if name == "reset":  # a fresh Communicator (new master or group) in this warm process
        if ctx.get("comm") is not None:
            ctx["comm"].close()
        ctx.clear()
        ctx["comm"] = Communicator(cmd["master"], peer_group=cmd["group"], connections=2)
        return None
    comm: Communicator = ctx["comm"]
    if name == "join":
        if not ctx.get("connected"):
            comm.connect(timeout=60)
            ctx["connected"] = True
        while comm.global_world_size < cmd["world"]:  # membership votes are run-wide
            comm.update_topology()
        return {"peer_id": comm.peer_id, "world": comm.world_size}
    if name == "update":
        comm.update_topology()
        return comm.world_size
    if name == "state":
        spec, seed = cmd["spec"], cmd.get("seed")
        tolerant = set(cmd.get("tolerant", []))
        ctx["state"] = SharedState(
            [TensorInfo(k, make_tensor(d, s, seed), k in tolerant) for k, (d, s) in spec.items()],
            revision=cmd.get("revision", 0),
        )
        return _digests(ctx["state"])
    state = ctx["state"]
    if name == "fill":
        t = state[cmd["key"]]
        t.copy_(make_tensor(str(t.dtype).removeprefix("torch."), list(t.shape), cmd["seed"]))
        return _digests(state)
    if name == "step":  # a deterministic "training step": identical on every peer
        for k in state.keys():
            t = state[k]
            t.add_(make_tensor(str(t.dtype).removeprefix("torch."), list(t.shape), cmd["seed"]))
        return _digests(state)
    if name == "sync":
        if "revision" in cmd:
            state.revision = cmd["revision"]
        ptrs = {k: state[k].data_ptr() for k in state.keys()}
        info = comm.sync_shared_state(state, SyncStrategy[cmd.get("strategy", "ENFORCE_POPULAR")])
        assert ptrs == {k: state[k].data_ptr() for k in state.keys()}
        return {"tx": info.tx_bytes, "rx": info.rx_bytes, "revision": info.revision, "digests": _digests(state)}
    if name == "info":
        return {"revision": state.revision, "digests": _digests(state)}
    if name == "save":
        state.save(cmd["path"])
        return None
    if name == "load":
        SharedState.load(cmd["path"], into=state)
        return {"revision": state.revision, "digests": _digests(state)}
    if name == "arm":
        _arm_kill_after(cmd["bytes"])
        return None
    if name == "corrupt":
        _arm_corrupt()
        return None
    if name == "close":
        comm.close()
        return None
    raise ValueError(f"unknown command {name!r}")


def peer_main() -> None:
    import torch

    import pccl.communicator  # noqa: F401 - imported before "started": commands stay fast

    torch.set_num_threads(1)
    ctx: dict[str, Any] = {}
    print(json.dumps({"ok": True, "result": "started"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = {"cmd": cmd["cmd"], "ok": True, "result": _execute(ctx, cmd)}
        except Exception as exc:  # reported to the test, which asserts on it
            reply = {"cmd": cmd["cmd"], "ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)



if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    peer_main()
