"""Helpers of the collective integration tests: starting groups of peer processes, and
float64 / exact-integer references computed independently of the library.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from collective_peer import DTYPES, make_input  # noqa: F401  (DTYPES is re-exported for the tests)

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "collective_peer.py"


def _load_peer_process() -> Any:
    # conftest.py is pytest's, not an importable module: load it under a name of its own.
    spec = importlib.util.spec_from_file_location("pccl_tests_conftest", HERE / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeerProcess


PeerProcess = _load_peer_process()


def spawn(master: str, group: int = 0) -> Any:
    """A collective peer process (not yet connected)."""
    return PeerProcess([master, "--group", str(group)], script=PEER_SCRIPT)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy (waits for a state, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def start_groups(master: Any, sizes: dict[int, int]) -> dict[int, list[Any]]:
    """Spawn ``sizes[group]`` peers per group and get them all accepted by one vote.

    Returns group -> peers; each peer's ``peer_id`` attribute is set.
    """
    groups = {g: [spawn(master.address, g) for _ in range(n)] for g, n in sizes.items()}
    everyone = [p for peers in groups.values() for p in peers]
    first, rest = everyone[0], everyone[1:]
    first.peer_id = first.call("connect", timeout=60)["peer_id"]
    for peer in rest:
        peer.send("connect", timeout=60)
    wait_for(lambda: len(master.status()["pending"]) == len(rest), 60, "every peer to register")
    first.call("update_topology", timeout=60)
    for peer in rest:
        reply = peer.reply(60)
        assert reply["ok"], reply
        peer.peer_id = reply["result"]["peer_id"]
    return groups


def kill_all(peers: list[Any]) -> None:
    for peer in peers:
        peer.kill()


# -- references ------------------------------------------------------------------------------


def inputs(spec: dict[str, Any], peer_ids: list[int]) -> list[torch.Tensor]:
    """Every peer's input of ``spec``, rebuilt here."""
    return [make_input(DTYPES[spec["dtype"]], spec["numel"], spec["seed"], pid) for pid in peer_ids]


def int_reference(op: str, dtype: torch.dtype, xs: list[torch.Tensor]) -> list[int]:
    """Exact integer result with Python ints: SUM/PROD wrap modulo 2**bits, AVG divides the
    wrapped sum rounding toward zero (``docs/protocol.md`` §7.3)."""
    bits, world = dtype.itemsize * 8, len(xs)
    signed = dtype.is_signed

    def wrap(v: int) -> int:
        v %= 1 << bits
        return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

    out = []
    for vals in zip(*(x.tolist() for x in xs)):
        if op in ("sum", "avg"):
            s = wrap(sum(vals))
            out.append(s if op == "sum" else (abs(s) // world) * (1 if s >= 0 else -1))
        elif op == "prod":
            p = 1
            for v in vals:
                p *= v
            out.append(wrap(p))
        else:
            out.append(max(vals) if op == "max" else min(vals))
    return out


def float_reference(op: str, dtype: torch.dtype, xs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """float64 result and a per-element error bound for a reduction done in ``dtype``.

    Each of the world - 1 roundings of a partial result errs by at most u times its size;
    the AVG division adds one more; a product that falls into the subnormal range adds an
    absolute error of a few subnormal steps, scaled by the later factors (|x| < 4).
    """
    x64 = np.stack([x.double().numpy() for x in xs])  # exact: every dtype widens to float64
    world = len(xs)
    fi = torch.finfo(dtype)
    u, sub = fi.eps / 2, fi.tiny * fi.eps
    mag = np.abs(x64).sum(0)
    if op == "sum":
        return x64.sum(0), world * u * mag
    if op == "avg":
        ref = x64.sum(0) / world
        return ref, u * mag + u * np.abs(ref)
    if op == "prod":
        ref = x64.prod(0)
        return ref, 2 * world * u * np.abs(ref) + 4.0**world * sub
    ref = x64.max(0) if op == "max" else x64.min(0)
    return ref, np.zeros_like(ref)


def check_result(op: str, dtype: torch.dtype, xs: list[torch.Tensor], got: torch.Tensor) -> None:
    """Assert ``got`` is the reduction of ``xs`` (exact for integers, MAX and MIN)."""
    assert got.dtype == dtype and got.numel() == xs[0].numel()
    if not dtype.is_floating_point:
        if op in ("max", "min"):  # exact in numpy, and fast for big tensors
            stacked = np.stack([x.numpy() for x in xs])
            assert np.array_equal(got.numpy(), stacked.max(0) if op == "max" else stacked.min(0)), (op, dtype)
        else:
            assert got.tolist() == int_reference(op, dtype, xs), (op, dtype)
        return
    ref, tol = float_reference(op, dtype, xs)
    err = np.abs(got.double().numpy() - ref)
    assert np.all(err <= tol), (op, dtype, float(np.max(err - tol)) if err.size else 0.0)


def quantized_bound(op: str, bits: int, algorithm: str, dtype: torch.dtype, xs: list[torch.Tensor]) -> float:
    """Largest error of a quantized SUM/AVG (``docs/protocol.md`` §7.4).

    World - 1 hops each encode a partial sum, the owner encodes the result once more; one
    encoding errs by at most k * range / L, a partial sum's range is at most 2 * S (S = max
    over elements of sum_i |x_i|). AVG divides the hop errors by the world size. Slack: 1 %
    for compounding, and one rounding of the tensor's dtype per hop.
    """
    x64 = np.stack([x.double().numpy() for x in xs])
    world, levels = len(xs), (1 << bits) - 1
    k = 0.5 if algorithm == "min_max" else 1.0
    s_max = float(np.abs(x64).sum(0).max()) if x64.size else 0.0
    u_o = torch.finfo(dtype).eps / 2
    hops = 1.0 if op == "avg" else float(world)
    return 1.01 * k * 2 * s_max * hops / levels + 2 * world * u_o * s_max
