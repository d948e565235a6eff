"""The standard-library corpus and the per-worker batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    REPLACEMENT,
    VOCAB_SIZE,
    BatchSampler,
    eval_windows,
    load_corpus,
    stdlib_sources,
    worker_seed,
)


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    # Created out of order on purpose: the corpus must follow the sorted relative paths.
    _write(tmp_path, "zeta.py", b"z" * 2000)
    _write(tmp_path, "alpha.py", "a = 'caf\u00e9'\n".encode() + b"a" * 2000)
    _write(tmp_path, "pkg/mid.py", b"m" * 2000)
    _write(tmp_path, "site-packages/third.py", b"T" * 2000)
    _write(tmp_path, "dist-packages/other.py", b"D" * 2000)
    _write(tmp_path, "pkg/__pycache__/mid.cpython-311.py", b"C" * 2000)
    _write(tmp_path, "notes.txt", b"N" * 2000)
    for i in range(8):
        _write(tmp_path, f"pkg/sub/f{i}.py", bytes([ord("0") + i]) * 2000)
    return tmp_path


def test_sources_are_sorted_and_skip_third_party(tree: Path) -> None:
    rel = [p.relative_to(tree).as_posix() for p in stdlib_sources(tree)]
    assert rel == sorted(rel)
    assert rel[:2] == ["alpha.py", "pkg/mid.py"]
    assert not any(r.startswith(("site-packages", "dist-packages")) or "__pycache__" in r for r in rel)
    assert "notes.txt" not in rel and len(rel) == 11


def test_corpus_maps_non_ascii_and_splits_by_block(tree: Path) -> None:
    corpus = load_corpus(10**6, val_every=4, block=1000, root=tree)
    assert corpus.files == 11
    # Reference: the sorted files, each followed by a newline, non-ASCII bytes replaced.
    names = ["alpha.py", "pkg/mid.py"] + [f"pkg/sub/f{i}.py" for i in range(8)] + ["zeta.py"]
    raw = b"".join((tree / n).read_bytes() + b"\n" for n in names)
    stream = bytes(REPLACEMENT if b >= 128 else b for b in raw)
    blocks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    assert bytes(corpus.val.tolist()) == b"".join(blocks[3::4])
    assert bytes(corpus.train.tolist()) == b"".join(b for i, b in enumerate(blocks) if i % 4 != 3)
    # "é" is two UTF-8 bytes, each replaced by one REPLACEMENT token.
    assert bytes(corpus.train[:12].tolist()) == b"a = 'caf" + bytes([REPLACEMENT, REPLACEMENT]) + b"'\n"
    assert int(corpus.train.max()) < VOCAB_SIZE and corpus.train.dtype == torch.uint8
    assert corpus.nbytes == len(raw)


def test_corpus_is_cut_at_max_bytes(tree: Path) -> None:
    corpus = load_corpus(5000, val_every=2, block=500, root=tree)
    assert corpus.nbytes == 5000
    assert corpus.files == 3  # alpha (2013 bytes), mid (2001), then 986 bytes of f0
    assert corpus.val.numel() == 2500
    with pytest.raises(ValueError):
        load_corpus(1500, root=tree)  # too little for a validation stream
    with pytest.raises(ValueError):
        load_corpus(0, root=tree)


def test_real_corpus_is_deterministic_and_ascii() -> None:
    a = load_corpus(1 << 20)
    b = load_corpus(1 << 20)
    assert a.digest == b.digest and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.nbytes == 1 << 20
    assert int(a.train.max()) < VOCAB_SIZE and int(a.val.max()) < VOCAB_SIZE
    # Python source: the space is by far the most common character.
    counts = np.bincount(a.train.numpy(), minlength=VOCAB_SIZE)
    assert int(np.argmax(counts)) == ord(" ")
    assert abs(a.val.numel() / a.nbytes - 0.1) < 0.01


def test_sampler_windows_are_contiguous_and_seeded() -> None:
    data = (torch.arange(10_000) % 127).to(torch.uint8)
    before = torch.random.get_rng_state()
    s = BatchSampler(data, batch_size=8, context=16, seed=3, worker=1)
    batch = s.next()
    assert batch.shape == (8, 17) and batch.dtype == torch.int64
    diffs = (batch[:, 1:] - batch[:, :-1]) % 127
    assert bool((diffs == 1).all())  # each row is a contiguous slice of the stream
    again = BatchSampler(data, batch_size=8, context=16, seed=3, worker=1).next()
    assert torch.equal(batch, again)
    other = BatchSampler(data, batch_size=8, context=16, seed=3, worker=2).next()
    assert not torch.equal(batch, other)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG was never used


def test_sampler_resumes_from_state() -> None:
    data = torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    s = BatchSampler(data, batch_size=4, context=8, seed=0, worker=0)
    s.next()
    state = s.state_dict()
    expected = [s.next() for _ in range(3)]
    t = BatchSampler(data, batch_size=4, context=8, seed=5, worker=9)
    t.load_state_dict(state)
    assert all(torch.equal(e, t.next()) for e in expected)


def test_sampler_covers_the_whole_stream() -> None:
    data = torch.arange(100).to(torch.uint8)
    s = BatchSampler(data, batch_size=64, context=9, seed=0)
    starts = torch.cat([s.next()[:, 0] for _ in range(50)])
    assert int(starts.min()) == 0 and int(starts.max()) == 100 - 10


def test_worker_seeds_are_distinct() -> None:
    seeds = {worker_seed(s, w) for s in range(20) for w in range(20)}
    assert len(seeds) == 400
    assert all(0 <= x < 2**63 for x in seeds)
    with pytest.raises(ValueError):
        worker_seed(-1, 0)


def test_eval_windows_are_evenly_spaced() -> None:
    data = torch.arange(1000) % 128
    w = eval_windows(data, sequences=5, context=9)
    assert w.shape == (5, 10)
    # linspace(0, 990, 5) = 0, 247.5, 495, 742.5, 990, rounded half to even
    expected = torch.stack([data[s : s + 10] for s in (0, 248, 495, 742, 990)])
    assert torch.equal(w, expected)
    with pytest.raises(ValueError):
        eval_windows(data[:5], sequences=1, context=9)
