"""``pccl bench transport``: its reference pattern, its helpers, and whole runs."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from pccl.bench import common
from pccl.bench import transport as bench

ROW_KEYS = {"connections": int, "mib": float, "seconds": float, "gbps": float, "baseline_gbps": float}


def _reference_words(n: int) -> list[int]:
    # Independent of numpy: Python integers, reduced by hand.
    return [(i * 0x9E3779B97F4A7C15 + 0x0123456789ABCDEF) % 2**64 for i in range(n)]


def _reference_bytes(n: int) -> bytes:
    return b"".join(w.to_bytes(8, "little") for w in _reference_words(n))


def test_pattern_matches_reference_across_chunks(monkeypatch):
    monkeypatch.setattr(bench, "_CHUNK_WORDS", 7)  # many chunk boundaries in a small buffer
    words = np.empty(100, dtype=np.uint64)
    bench.fill_pattern(words)
    assert words.tolist() == _reference_words(100)
    expected = xxhash.xxh3_128_digest(_reference_bytes(100))
    assert bench.pattern_digest(800) == expected
    assert bench.pattern_digest(400) == xxhash.xxh3_128_digest(_reference_bytes(50))


def test_digest_catches_a_wrong_byte_and_swapped_stripes():
    data = bytearray(_reference_bytes(4096))
    good = bench.pattern_digest(len(data))
    assert xxhash.xxh3_128_digest(data) == good
    flipped = bytearray(data)
    flipped[12345] ^= 1
    assert xxhash.xxh3_128_digest(flipped) != good
    half = len(data) // 2
    swapped = data[half:] + data[:half]
    assert xxhash.xxh3_128_digest(swapped) != good


def test_common_helpers(tmp_path):
    assert common.int_list("1, 2,8") == [1, 2, 8]
    for bad in ("", "0", "1,x", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.int_list(bad)
    assert common.str_list("cubic, system") == ["cubic", "system"]
    assert common.summarize([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert common.summarize([3.0, 1.0], "min") == 1.0
    with pytest.raises(ValueError):
        common.summarize([])
    assert common.gbps(125_000_000, 1.0) == pytest.approx(1.0)
    assert common.threads_per_process(3, cores=16) == 5
    assert common.threads_per_process(4, cores=2) == 1
    assert common.thread_env(2, {"X": "1"}) == {"X": "1", "OMP_NUM_THREADS": "2",
                                                "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    table = common.format_table([{"a": 1, "b": 2.5}, {"a": 10}], [("a", "A", "d"), ("b", "bee", ".1f")])
    assert table.splitlines() == [" A  bee", "--  ---", " 1  2.5", "10    -"]
    out = tmp_path / "x.json"
    common.write_json(out, {"rows": [1]})
    assert json.loads(out.read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _check_rows(data: dict, connections: list[int], mib: float, repeat: int) -> None:
    rows = data["rows"]
    assert [r["connections"] for r in rows] == connections
    for row in rows:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert row["mib"] == mib
        assert row["verified"] is True
        assert len(row["samples"]) == repeat and len(row["baseline_samples"]) == repeat
        assert all(s > 0 for s in row["samples"] + row["baseline_samples"])
        # The reported figures follow from the raw samples (median of them).
        assert row["seconds"] == pytest.approx(float(np.median(row["samples"])))
        assert row["gbps"] == pytest.approx(mib * 2**20 * 8 / row["seconds"] / 1e9)
        base = float(np.median(row["baseline_samples"]))
        assert row["baseline_gbps"] == pytest.approx(mib * 2**20 * 8 / base / 1e9)
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0


@pytest.mark.timeout(120)
def test_bench_end_to_end_on_loopback(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "bench", "transport", "--connections", "1,2", "--size-mib", "8",
         "--repeat", "2", "--warmup-mib", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    _check_rows(data, [1, 2], 8.0, 2)
    assert data["meta"]["mode"] == "loopback"
    assert "Gbit/s" in done.stdout and "plain" in done.stdout


@pytest.mark.root
@pytest.mark.timeout(120)
def test_bench_end_to_end_over_wan(tmp_path):
    from stress.wan import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "bench", "transport", "--connections", "1,2", "--size-mib", "4",
         "--repeat", "1", "--warmup-mib", "1", "--wan", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    _check_rows(data, [1, 2], 4.0, 1)
    assert data["meta"]["mode"].startswith("wan")
    # Nothing can cross a 10 ms RTT link in less than one way's delay.
    assert all(s >= 0.005 for r in data["rows"] for s in r["samples"] + r["baseline_samples"])
