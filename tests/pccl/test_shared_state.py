"""SharedState without networking: validation, content hashing, checkpoints."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pccl.shared_state as ss
from pccl.errors import InvalidUsageError, SharedStateError
from pccl.shared_state import SharedState, SyncInfo, SyncStrategy, TensorInfo, hash_buffers, hash_bytes


def reference_hash(raw: bytes, chunk: int) -> bytes:
    """The documented digest, computed from plain ``bytes`` (independent of the module's views)."""
    if len(raw) <= chunk:
        return xxhash.xxh3_128(raw).digest()
    leaves = b"".join(xxhash.xxh3_128(raw[i : i + chunk]).digest() for i in range(0, len(raw), chunk))
    return xxhash.xxh3_128(struct.pack("<Q", len(raw)) + leaves).digest()


def raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


# ---------------------------------------------------------------- construction


def test_tensors_are_referenced_not_copied() -> None:
    w, b = torch.zeros(3, 4), torch.ones(5, dtype=torch.int64)
    state = SharedState({"w": w, "b": b}, revision=7)
    assert state["w"] is w and state["b"] is b
    assert state.keys() == ["w", "b"] and len(state) == 2 and "w" in state and list(state) == ["w", "b"]
    assert state.revision == 7 and state.nbytes == 3 * 4 * 4 + 5 * 8
    buf = state.receive_buffer("w")
    buf[:4] = np.float32(2.5).tobytes()
    assert w[0, 0].item() == 2.5


def test_allow_content_inequality_both_ways() -> None:
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    state = SharedState({"a": a, "b": b}, allow_content_inequality=["b"])
    assert [state.entries[k].allow_content_inequality for k in "ab"] == [False, True]
    state = SharedState([TensorInfo("a", a), TensorInfo("c", c, allow_content_inequality=True)])
    assert state.metas()["c"].allow_content_inequality and not state.metas()["a"].allow_content_inequality


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: SharedState({"w": torch.zeros(4, 4).t()}), "contiguous"),
        (lambda: SharedState({"": torch.zeros(1)}), "non-empty"),
        (lambda: SharedState({"w": [1.0]}), "torch.Tensor"),  # type: ignore[arg-type]
        (lambda: SharedState({"w": torch.zeros(1)}, allow_content_inequality=["x"]), "'x'"),
        (lambda: SharedState([TensorInfo("w", torch.zeros(1)), TensorInfo("w", torch.zeros(1))]), "duplicate"),
        (lambda: SharedState({"w": torch.zeros(1)}, revision=-1), "revision"),
        (lambda: SharedState({"w": torch.zeros(1)}, revision=True), "revision"),
        (lambda: SharedState({"w": torch.zeros(1)}, revision=2**64), "revision"),
        (lambda: SharedState({"w": torch.zeros(2, 2).to_sparse()}), "dense"),
    ],
)
def test_invalid_usage(make: object, needle: str) -> None:
    with pytest.raises(InvalidUsageError, match=needle):
        make()  # type: ignore[operator]


def test_overlapping_entries_refused() -> None:
    base = torch.zeros(10)
    with pytest.raises(InvalidUsageError, match="share memory"):
        SharedState({"a": base[:6], "b": base[4:]})
    SharedState({"a": base[:5], "b": base[5:]})  # adjacent is fine


def test_revision_setter_validates() -> None:
    state = SharedState({"w": torch.zeros(1)})
    state.revision = 3
    assert state.revision == 3
    with pytest.raises(InvalidUsageError):
        state.revision = 1.5  # type: ignore[assignment]


def test_strategy_values_and_sync_info() -> None:
    assert {s.value for s in SyncStrategy} == {"enforce_popular", "receive_only", "send_only"}
    assert SyncInfo(1, 2, 3) == SyncInfo(tx_bytes=1, rx_bytes=2, revision=3)


# ---------------------------------------------------------------- hashing


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool],
)
def test_hash_is_xxh3_128_of_raw_bytes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    t = (torch.randn(7, 13, generator=gen) * 50).to(dtype)
    digest = SharedState({"t": t}).hashes()["t"]
    assert digest == reference_hash(raw_bytes(t), ss.HASH_CHUNK)
    meta = SharedState({"t": t}).metas()["t"]
    expected = (str(dtype).removeprefix("torch."), (7, 13), t.numel() * t.element_size())
    assert (meta.dtype, meta.shape, meta.nbytes) == expected


def test_hash_sees_every_bit() -> None:
    t = torch.zeros(1000)
    state = SharedState({"t": t})
    before = state.hashes()["t"]
    t[999] = -0.0  # sign bit only: equal as floats, different as bytes
    assert state.hashes()["t"] != before
    t[999] = 0.0
    assert state.hashes()["t"] == before


def test_large_entry_tree_hash_matches_reference_threads_or_not() -> None:
    n = ss.HASH_CHUNK * 2 + 12345  # three leaves, the last one short
    data = np.random.default_rng(3).integers(0, 256, size=n, dtype=np.uint8)
    t = torch.from_numpy(data)
    ref = reference_hash(data.tobytes(), ss.HASH_CHUNK)
    state = SharedState({"big": t, "small": torch.arange(10)})
    assert state.hashes(threads=1)["big"] == ref
    assert state.hashes(threads=2)["big"] == ref
    assert hash_bytes(data.tobytes()) == ref


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    st.integers(1, 64),
    st.integers(1, 3),
)
def test_hash_buffers_equals_reference_for_any_chunking(
    monkeypatch: pytest.MonkeyPatch, blobs: list[bytes], chunk: int, threads: int
) -> None:
    monkeypatch.setattr(ss, "HASH_CHUNK", chunk)
    monkeypatch.setattr(ss, "_PARALLEL_MIN_BYTES", 0)
    buffers = {f"k{i}": memoryview(bytearray(b)) for i, b in enumerate(blobs)}
    got = hash_buffers(buffers, threads=threads)
    assert got == {f"k{i}": reference_hash(b, chunk) for i, b in enumerate(blobs)}


# ---------------------------------------------------------------- checkpoints


def _state(seed: int = 0) -> SharedState:
    gen = torch.Generator().manual_seed(seed)
    return SharedState(
        [
            TensorInfo("w", torch.randn(33, 17, generator=gen)),
            TensorInfo("h", torch.randn(5, generator=gen).to(torch.bfloat16)),
            TensorInfo("step", torch.tensor(41, dtype=torch.int64)),
            TensorInfo("mask", torch.rand(9, generator=gen) > 0.5),
            TensorInfo("empty", torch.zeros(0, 3)),
            TensorInfo("rng", torch.randint(0, 255, (16,), dtype=torch.uint8, generator=gen), True),
        ],
        revision=12,
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    src = _state(0)
    path = tmp_path / "ckpt.pccl"
    src.save(path)
    assert os.listdir(tmp_path) == ["ckpt.pccl"]  # no temp file left behind
    loaded = SharedState.load(path)
    assert loaded.revision == 12 and loaded.keys() == src.keys()
    for k in src.keys():
        assert loaded[k].dtype == src[k].dtype and loaded[k].shape == src[k].shape
        assert raw_bytes(loaded[k]) == raw_bytes(src[k])
    assert loaded.entries["rng"].allow_content_inequality and not loaded.entries["w"].allow_content_inequality


def test_load_into_writes_in_place(tmp_path: Path) -> None:
    src = _state(0)
    src.save(tmp_path / "c")
    dst = _state(1)
    ptrs = {k: dst[k].data_ptr() for k in dst.keys()}
    tensors = {k: dst[k] for k in dst.keys()}
    assert SharedState.load(tmp_path / "c", into=dst) is dst
    assert dst.revision == 12
    for k in dst.keys():
        assert dst[k] is tensors[k] and dst[k].data_ptr() == ptrs[k]
        assert raw_bytes(dst[k]) == raw_bytes(src[k])


def test_save_replaces_atomically_and_cleans_up_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c"
    _state(0).save(path)
    before = path.read_bytes()
    state = _state(1)
    real = SharedState.host_buffer
    calls = {"n": 0}

    def failing(self: SharedState, key: str) -> memoryview:
        calls["n"] += 1
        if calls["n"] > len(self) + 2:  # hashing reads every entry once; fail mid-write
            raise OSError("disk full")
        return real(self, key)

    monkeypatch.setattr(SharedState, "host_buffer", failing)
    with pytest.raises(OSError, match="disk full"):
        state.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c"]


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda s: SharedState({k: s[k] for k in s.keys() if k != "w"}), "has unexpected shared-state key 'w'"),
        (lambda s: SharedState({**{k: s[k] for k in s.keys()}, "x": torch.zeros(1)}), "lacks shared-state key 'x'"),
        (
            lambda s: SharedState({**{k: s[k] for k in s.keys()}, "w": torch.zeros(33, 17, dtype=torch.float64)}),
            "'w' has dtype float32",
        ),
        (lambda s: SharedState({**{k: s[k] for k in s.keys()}, "w": torch.zeros(17, 33)}), r"'w' has shape \[33, 17\]"),
    ],
)
def test_load_into_mismatch_names_key_and_touches_nothing(tmp_path: Path, mutate: object, needle: str) -> None:
    _state(0).save(tmp_path / "c")
    dst = mutate(_state(1))  # type: ignore[operator]
    dst.revision = 3
    before = {k: raw_bytes(dst[k]) for k in dst.keys()}
    with pytest.raises(SharedStateError, match=needle):
        SharedState.load(tmp_path / "c", into=dst)
    assert {k: raw_bytes(dst[k]) for k in dst.keys()} == before and dst.revision == 3


def test_corrupt_data_detected(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _state(0).save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last entry's 16 bytes
    path.write_bytes(bytes(data))
    dst = _state(1)
    dst.revision = 3
    with pytest.raises(SharedStateError, match="hash mismatch.*'rng'"):
        SharedState.load(path, into=dst)
    assert dst.revision == 3  # not adopted from the corrupt file


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _state(0).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(SharedStateError, match="truncated"):
        SharedState.load(path)
    path.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(SharedStateError, match="magic"):
        SharedState.load(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_random_headers_only_raise_shared_state_error(tmp_path: Path, junk: bytes, length: int) -> None:
    path = tmp_path / "junk"
    path.write_bytes(ss.FILE_MAGIC + struct.pack("<I", min(length, len(junk))) + junk)
    with pytest.raises(SharedStateError):
        SharedState.load(path)


# ---------------------------------------------------------------- CUDA staging


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_entries_staged_through_host(tmp_path: Path) -> None:
    cpu = torch.randn(1000, dtype=torch.float32)
    dev = cpu.to("cuda")
    state = SharedState({"w": dev})
    assert state.hashes()["w"] == reference_hash(raw_bytes(cpu), ss.HASH_CHUNK)
    state.save(tmp_path / "c")
    other = SharedState({"w": torch.zeros(1000, device="cuda")})
    SharedState.load(tmp_path / "c", into=other)
    assert torch.equal(other["w"].cpu(), cpu)
    buf = other.receive_buffer("w")
    buf[:4] = np.float32(9.0).tobytes()
    assert other["w"][0].item() != 9.0  # not on the device until committed
    other.commit_host_buffer("w")
    assert other["w"][0].item() == 9.0
