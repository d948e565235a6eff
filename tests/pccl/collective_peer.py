"""A pccl peer for the collective tests, in its own process, driven by JSON commands on stdin.

Each command gets one JSON line back: ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": "PeerLostError", "message": "..."}``, with ``"at"`` (wall clock when it ended).
Tensors live in the process under names; inputs are made by :func:`make_input` from
``(dtype, numel, seed, peer_id)``, so the test can rebuild every peer's input and compute its
own reference. Results go back as SHA-256 hashes of their bytes (to compare peers bit for bit)
and, when asked, as a ``torch.save`` file of the result tensors.

Commands (``spec`` = ``{"dtype", "numel", "seed"}`` plus, where it applies, ``"op"``,
``"quant": [bits, algorithm]``, ``"out": bool``, ``"tag"``):

- ``connect`` / ``update_topology`` / ``info`` / ``close``
- ``cases {"cases": [spec...], "dump": path|null}``: blocking all-reduces, one after the other
- ``start {"name", spec}``: ``all_reduce_async``; ``wait {"name", "dump"}``: its outcome
- ``reduce {"name", spec}``: one blocking all-reduce of a named tensor
- ``multi {"specs": [spec...], "op", "max_in_flight", "quant", "dump"}``: ``all_reduce_multiple_with_retry``
- ``stall {"ops": [{"tag", spec}...]}``: initiate collectives with the all-reduce descriptors whose
  bodies wait for data that never comes (a peer that is "in" the reduce but never sends)
- ``changed {"name"}``: whether a started operation has written into its tensor yet; ``gather`` / ``broadcast`` / ``reduce_scatter`` (see ``execute``)
- ``stats``: optimistic starts confirmed and dropped so far, and the bytes held on the ring links
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import sys
import time
from typing import Any

import numpy as np
import torch

import pccl
from pccl.collective_staging import descriptor
from pccl.peer_session import CollectiveContext

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.uint16, torch.uint32, torch.uint64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
    )
}  # fmt: skip
_NUMPY_INTS = {
    torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
    torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64,
}  # fmt: skip


def make_input(dtype: torch.dtype, numel: int, seed: int, peer: int) -> torch.Tensor:
    """Peer ``peer``'s input: floats uniform in [-4, 4), integers over their whole range."""
    rng = np.random.default_rng([seed, peer])
    if dtype.is_floating_point:
        return torch.from_numpy(rng.uniform(-4.0, 4.0, numel)).to(dtype)
    np_dtype = _NUMPY_INTS[dtype]
    info = np.iinfo(np_dtype)
    return torch.from_numpy(rng.integers(info.min, info.max, size=numel, dtype=np_dtype, endpoint=True))


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and length included)."""
    h = hashlib.sha256(f"{t.dtype}:{t.numel()}:".encode())
    if t.numel():  # an empty tensor may have stride 0, which refuses a byte view
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantization(spec: Any) -> pccl.Quantization | None:
    if not spec:
        return None
    bits, algorithm = spec
    return pccl.Quantization(torch.uint8 if bits == 8 else torch.uint4, algorithm)  # type: ignore[attr-defined]


def _info(info: pccl.ReduceInfo) -> list[int]:
    return [info.world_size, info.tx_bytes, info.rx_bytes]


class Peer:
    def __init__(self, comm: pccl.Communicator) -> None:
        self.comm = comm
        self.tensors: dict[str, torch.Tensor] = {}
        self.handles: dict[str, tuple[Any, dict[str, Any]]] = {}

    def _input(self, spec: dict[str, Any]) -> torch.Tensor:
        return make_input(DTYPES[spec["dtype"]], spec["numel"], spec["seed"], self.comm.peer_id)

    def _reduce_args(self, spec: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        args: dict[str, Any] = {"op": pccl.ReduceOp(spec.get("op", "sum")), "tag": spec.get("tag", 0),
                                "quantization": quantization(spec.get("quant"))}
        if spec.get("out"):
            args["out"] = torch.full_like(x, 7)
        return args

    def _outcome(self, x: torch.Tensor, before: str, args: dict[str, Any], info: Any) -> dict[str, Any]:
        result = args.get("out", x)
        return {"info": _info(info), "hash": digest(result), "input_unchanged": digest(x) == before}

    def cases(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        replies, dump = [], []
        for spec in cmd["cases"]:
            x = self._input(spec)
            before, args = digest(x), self._reduce_args(spec, x)
            info = self.comm.all_reduce(x, **args)
            replies.append(self._outcome(x, before, args, info))
            dump.append(args.get("out", x))
        if cmd.get("dump"):
            torch.save(dump, cmd["dump"])
        return replies

    def start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        x = self._input(cmd)
        args = self._reduce_args(cmd, x)
        before = digest(x)
        handle = self.comm.all_reduce_async(x, **args)
        self.tensors[cmd["name"]] = x
        self.handles[cmd["name"]] = (handle, {"x": x, "before": before, "args": args})
        return {"done": handle.done()}

    def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        handle, st = self.handles.pop(cmd["name"])
        try:
            info = handle.wait(cmd.get("timeout", 30))
        except pccl.PCCLError as exc:
            return {"error": type(exc).__name__, "message": str(exc), "input_unchanged": digest(st["x"]) == st["before"]}
        out = self._outcome(st["x"], st["before"], st["args"], info)
        if cmd.get("dump"):
            torch.save([st["args"].get("out", st["x"])], cmd["dump"])
        return out

    def reduce(self, cmd: dict[str, Any]) -> dict[str, Any]:
        x = self._input(cmd)
        self.tensors[cmd["name"]] = x
        before, args = digest(x), self._reduce_args(cmd, x)
        try:
            info = self.comm.all_reduce(x, **args)
        except pccl.PCCLError as exc:
            return {"error": type(exc).__name__, "message": str(exc), "input_unchanged": digest(x) == before,
                    "at": time.time()}
        return self._outcome(x, before, args, info)

    def multi(self, cmd: dict[str, Any]) -> dict[str, Any]:
        xs = [self._input(spec) for spec in cmd["specs"]]
        before = [digest(x) for x in xs]
        start = time.monotonic()
        try:
            info = self.comm.all_reduce_multiple_with_retry(
                xs, op=pccl.ReduceOp(cmd.get("op", "sum")), max_in_flight=cmd.get("max_in_flight", 4),
                quantization=quantization(cmd.get("quant")),
            )
            reply: dict[str, Any] = {"info": _info(info)}
        except pccl.PCCLError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        reply.update(seconds=time.monotonic() - start, hashes=[digest(x) for x in xs],
                     unchanged=[digest(x) == b for x, b in zip(xs, before)])
        if cmd.get("dump"):
            torch.save(xs, cmd["dump"])
        return reply

    def stall(self, cmd: dict[str, Any]) -> None:
        async def hang(ctx: CollectiveContext) -> None:
            assert ctx.peers is not None
            await ctx.peers.recv_prev(ctx.op_id, 10**6, memoryview(bytearray(8)))  # nobody sends this

        for spec in cmd["ops"]:
            x = make_input(DTYPES[spec["dtype"]], spec["numel"], spec["seed"], self.comm.peer_id)
            desc = descriptor("all_reduce", x, pccl.ReduceOp(spec.get("op", "sum")), quantization(spec.get("quant")))
            future: concurrent.futures.Future[Any] = self.comm._collective_async(spec["tag"], desc, hang)
            future.add_done_callback(lambda f: f.exception())  # its failure is expected; nobody waits

    def execute(self, cmd: dict[str, Any]) -> Any:
        name = cmd["cmd"]
        comm = self.comm
        if name == "connect":
            comm.connect(timeout=cmd.get("timeout", 30))
            return {"peer_id": comm.peer_id, "ring": comm.ring}
        if name == "update_topology":
            comm.update_topology()
            return {"ring": comm.ring}
        if name == "info":
            return {"peer_id": comm.peer_id, "ring": comm.ring, "world_size": comm.world_size}
        if name == "changed":  # has the running operation written into the named tensor yet?
            return digest(self.tensors[cmd["name"]]) != self.handles[cmd["name"]][1]["before"]
        if name == "gather":
            parts = comm.all_gather(self._input(cmd), tag=cmd.get("tag", 0))
            return [digest(p) for p in parts]
        if name == "broadcast":
            x = self._input(cmd)
            info = comm.broadcast(x, cmd["root"], tag=cmd.get("tag", 0))
            return {"info": _info(info), "hash": digest(x)}
        if name == "reduce_scatter":
            x = self._input(cmd)
            out = torch.empty(cmd["out_numel"], dtype=x.dtype)
            info = comm.reduce_scatter(x, out, pccl.ReduceOp(cmd.get("op", "sum")), tag=cmd.get("tag", 0))
            torch.save([out], cmd["dump"])
            return {"info": _info(info)}
        if name == "stats":
            return link_stats(comm)
        if name == "close":
            comm.close()
            return None
        return getattr(self, name)(cmd)


def link_stats(comm: pccl.Communicator) -> dict[str, int]:
    """Optimistic starts confirmed / dropped (``docs/protocol.md`` §5.6.2) and the early data
    held on the ring links (what a dropped attempt must not leave behind)."""
    session = comm._session
    assert session is not None and comm._thread is not None

    async def read() -> dict[str, int]:
        links = list(session.links.inbound.values()) + list(session.links.outbound.values())
        return {"confirmed": session.runner.confirmed, "dropped": session.runner.dropped,
                "held": sum(link.held_bytes for link in links)}

    return comm._thread.run(read())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("master")
    parser.add_argument("--group", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    peer = Peer(pccl.Communicator(args.master, peer_group=args.group, connections=2))
    print(json.dumps({"ok": True, "result": "started"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = {"ok": True, "result": peer.execute(cmd)}
        except Exception as exc:  # every error goes back to the test, which asserts on it
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        reply["at"] = time.time()
        print(json.dumps(reply), flush=True)
        if cmd["cmd"] == "close":
            break
    peer.comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
