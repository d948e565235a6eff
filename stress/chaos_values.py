"""What the peers of a chaos run contribute, and how a result is checked (pure numpy, no pccl).

Every tensor a peer all-reduces starts with :data:`SLOTS` *indicator* elements: the
peer puts 1 in the slot of its own peer id and 0 elsewhere, so the SUM of a ring holds
1 exactly in the slots of the peers that took part. The rest of the tensor is
``f(peer, step, tensor, element)``, chosen so that the sum over any set of peers is
computable here exactly:

- ``float64`` / ``float32``: integers small enough that every partial sum is exact, so
  the order the ring adds them in cannot matter and the check is bit-exact;
- ``int64``: full-range 64-bit values, so the sum wraps around (two's complement,
  ``docs/protocol.md`` §7.3) and numpy's wrapping int64 sum is the reference;
- quantized runs (``float32`` / ``float64`` with 8-bit codes): values in [-1/2, 1/2] and a
  check against the error bound of ``docs/protocol.md`` §7.4; the indicator slots are
  recovered by rounding, which is exact as long as that bound stays below 1/2.

A result therefore reveals the set of peers it came from, and every element is checked
against a reference computed from that set. The shared state of the run is a closed-form
function of its revision (:func:`state_content`), so every synced state can be checked
too, not only compared between peers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

#: Indicator slots at the head of every tensor; peer ids must stay below this.
SLOTS = 1024
_U64_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a step: numpy dtype name and the number of data elements after the slots."""

    dtype: str
    data: int

    @property
    def numel(self) -> int:
        return SLOTS + self.data


#: What each step all-reduces (several concurrent tags), exact and quantized runs.
EXACT_SPECS = (TensorSpec("float64", 20_011), TensorSpec("int64", 60_013), TensorSpec("float32", 250_007))
QUANTIZED_SPECS = (TensorSpec("float32", 250_007), TensorSpec("float64", 30_011))


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one result: who took part, and what is wrong (None: nothing)."""

    participants: tuple[int, ...]
    error: str | None
    max_error: float = 0.0
    bound: float = 0.0


def _base(peer: int, step: int, index: int, n: int) -> np.ndarray:
    j = np.arange(n, dtype=np.int64)
    return peer * 1_000_003 + step * 7_919 + (index + 1) * 15_485_863 + j * 104_729


def data_values(spec: TensorSpec, peer: int, step: int, index: int, quantized: bool = False) -> np.ndarray:
    """The data part (after the slots) of peer ``peer``'s tensor ``index`` at ``step``."""
    base = _base(peer, step, index, spec.data)
    if quantized:
        return ((base % 2001 - 1000) / 2000.0).astype(spec.dtype)
    if spec.dtype == "float64":
        return (base % (1 << 21) - (1 << 20)).astype(np.float64)
    if spec.dtype == "float32":
        return (base % (1 << 17) - (1 << 16)).astype(np.float32)
    if spec.dtype == "int64":
        return (base.astype(np.uint64) * _U64_MIX).view(np.int64)
    raise ValueError(f"no contribution defined for dtype {spec.dtype}")


def contribution(spec: TensorSpec, peer: int, step: int, index: int, quantized: bool = False) -> np.ndarray:
    """Peer ``peer``'s whole tensor ``index`` at ``step``: indicator slots, then data.

    Raises:
        ValueError: ``peer`` does not fit in the indicator slots.
    """
    if not 0 <= peer < SLOTS:
        raise ValueError(f"peer id {peer} does not fit in {SLOTS} indicator slots")
    out = np.zeros(spec.numel, dtype=spec.dtype)
    out[peer] = 1
    out[SLOTS:] = data_values(spec, peer, step, index, quantized)
    return out


def digest(a: np.ndarray) -> str:
    """A short hash of an array's dtype, size and bytes (to compare peers bit for bit)."""
    h = hashlib.sha256(f"{a.dtype}:{a.size}:".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def reference(spec: TensorSpec, participants: tuple[int, ...], step: int, index: int) -> np.ndarray:
    """The exact SUM of the data parts of ``participants`` (wrapping for int64)."""
    parts = [data_values(spec, p, step, index) for p in participants]
    if spec.dtype == "int64":
        total = np.zeros(spec.data, dtype=np.int64)
        for part in parts:
            total += part  # numpy integer arrays wrap around, as the ring's int64 SUM does
        return total
    # Exact in float64: every value is an integer far below 2**53.
    return np.sum(np.stack([p.astype(np.float64) for p in parts]), axis=0).astype(spec.dtype)


def check_exact(spec: TensorSpec, result: np.ndarray, step: int, index: int, me: int) -> Verdict:
    """Check an unquantized SUM result bit for bit against the set of peers it reveals."""
    slots = result[:SLOTS]
    participants = tuple(int(p) for p in np.flatnonzero(slots == 1))
    stray = np.flatnonzero((slots != 0) & (slots != 1))
    if stray.size:
        k = int(stray[0])
        return Verdict(participants, f"indicator slot {k} holds {slots[k]!r}, not 0 or 1")
    problem = _membership_problem(participants, me)
    if problem:
        return Verdict(participants, problem)
    expected = reference(spec, participants, step, index)
    wrong = np.flatnonzero(result[SLOTS:] != expected)
    if wrong.size:
        j = int(wrong[0])
        return Verdict(participants, f"{wrong.size} element(s) differ from the reference of peers "
                                     f"{list(participants)}; first at {j}: {result[SLOTS + j]!r} != {expected[j]!r}")
    return Verdict(participants, None)


def _membership_problem(participants: tuple[int, ...], me: int) -> str | None:
    if me not in participants:
        return f"this peer ({me}) is missing from the participants {list(participants)}"
    if len(participants) < 2:
        return f"a reduce of {len(participants)} peer(s) succeeded (needs 2)"
    return None


def quantized_bound(world: int, s_max: float, dtype: str, bits: int = 8, algorithm: str = "min_max") -> float:
    """Largest error of a quantized SUM over ``world`` peers (``docs/protocol.md`` §7.4).

    ``s_max`` bounds the magnitude of every partial sum (the largest sum of absolute
    values over the peers). One encoding of a range of at most ``2 s_max`` errs by at
    most ``k·step + 8·u_c·M + u_o·(M + k·step) + 4·tiny`` with ``M = s_max``; an
    all-reduce makes ``world`` encodings (``world − 1`` partial results and the owner's
    final one) and ``world − 1`` additions in the tensor's dtype.
    """
    levels = (1 << bits) - 1
    k = 0.5 if algorithm == "min_max" else 1.0
    compute = np.float64 if dtype == "float64" else np.float32
    u_c = float(np.finfo(compute).eps) / 2
    u_o = float(np.finfo(np.dtype(dtype)).eps) / 2
    tiny = float(np.finfo(compute).smallest_subnormal)
    step = 2 * s_max / levels
    one = k * step + 8 * u_c * s_max + u_o * (s_max + k * step) + 4 * tiny
    return (world * one + world * u_o * s_max) * (1 + 1e-9)


def check_quantized(spec: TensorSpec, result: np.ndarray, step: int, index: int, me: int,
                    max_world: int) -> Verdict:
    """Check a quantized SUM result against the §7.4 bound for the set of peers it reveals."""
    slots = result[:SLOTS].astype(np.float64)
    # Before the participants are known, bound with the largest world the run may have.
    slot_bound = quantized_bound(max_world, 0.5 * max_world + 1, spec.dtype)
    if slot_bound >= 0.5:
        return Verdict((), f"worlds up to {max_world} make the indicator unrecoverable (bound {slot_bound:.3f})")
    rounded = np.rint(slots)
    participants = tuple(int(p) for p in np.flatnonzero(rounded == 1))
    bad = np.flatnonzero(((rounded != 0) & (rounded != 1)) | (np.abs(slots - rounded) > slot_bound))
    if bad.size:
        k = int(bad[0])
        return Verdict(participants, f"indicator slot {k} holds {slots[k]!r}, not within {slot_bound:.3g} of 0 or 1")
    problem = _membership_problem(participants, me)
    if problem:
        return Verdict(participants, problem)
    parts = np.stack([data_values(spec, p, step, index, True).astype(np.float64) for p in participants])
    ref = parts.sum(axis=0)
    s_max = max(1.0, float(np.abs(parts).sum(axis=0).max()))
    bound = quantized_bound(len(participants), s_max, spec.dtype)
    err = np.abs(result[SLOTS:].astype(np.float64) - ref)
    worst = float(err.max()) if err.size else 0.0
    if not np.all(err <= bound):  # NaN fails too
        j = int(np.argmax(~(err <= bound)))
        return Verdict(participants, f"element {j} is off by {err[j]!r}, over the §7.4 bound {bound:.4g} "
                                     f"for peers {list(participants)}", worst, bound)
    return Verdict(participants, None, worst, bound)


# -- shared state --------------------------------------------------------------------------

STATE_W = 4096
STATE_M = 65_536


def state_content(revision: int) -> dict[str, np.ndarray]:
    """The run's shared state at ``revision``, in closed form."""
    k = np.arange(STATE_W, dtype=np.int64)
    j = np.arange(STATE_M, dtype=np.int64)
    return {
        "step": np.array([revision], dtype=np.int64),
        "w": ((revision * 7_919 + k * 104_729) % 1_000_003).astype(np.float64),
        "m": ((revision * 31 + j * 17) % 4093).astype(np.float32),
    }


def advance_state(state: dict[str, np.ndarray]) -> None:
    """Step a state from revision r to r + 1 in place (what every peer does after a step)."""
    state["step"] += 1
    state["w"][:] = (state["w"] + 7_919) % 1_000_003
    state["m"][:] = (state["m"] + 31) % 4093


def state_problem(state: dict[str, np.ndarray], revision: int) -> str | None:
    """None if ``state`` is exactly the content of ``revision``, else what differs."""
    expected = state_content(revision)
    for key, want in expected.items():
        got = state[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"key {key!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        wrong = np.flatnonzero(got != want)
        if wrong.size:
            i = int(wrong[0])
            return f"key {key!r} differs from revision {revision} in {wrong.size} element(s), first at {i}"
    return None
