"""A character-level corpus that needs no download: the running interpreter's standard library.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` /
``dist-packages`` left out) are read in sorted path order and concatenated, each file followed by
a newline, until ``max_bytes`` bytes are collected (the last file is cut). Every byte ``>= 128``
becomes :data:`REPLACEMENT` (ASCII SUB, which never occurs in Python source), so the vocabulary
is exactly the 128 ASCII codes and a token is a byte.

The stream is cut into blocks of ``block`` bytes (smaller for a small corpus) and every ``val_every``-th block goes to
validation, so both halves cover the same mix of modules (validation is not the alphabetical
tail) and the split is exactly ``1 / val_every`` whatever the file sizes.

Nothing here is global: :func:`load_corpus` returns a :class:`Corpus` that the caller keeps (the
in-memory cache is the object itself), and each :class:`BatchSampler` owns a seeded
``torch.Generator`` derived from ``(seed, worker)`` — the global RNG is never touched.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import xxhash

__all__ = [
    "DEFAULT_MAX_BYTES",
    "REPLACEMENT",
    "VOCAB_SIZE",
    "BatchSampler",
    "Corpus",
    "eval_windows",
    "load_corpus",
    "stdlib_sources",
    "worker_seed",
]

VOCAB_SIZE = 128
REPLACEMENT = 0x1A  # ASCII SUB: stands for every non-ASCII byte
DEFAULT_MAX_BYTES = 4 << 20  # 4 MiB: about a second to read, > 1 epoch never reached by the tests
_THIRD_PARTY = frozenset({"site-packages", "dist-packages"})


@dataclass(frozen=True)
class Corpus:
    """Train and validation token streams (``uint8`` tensors, values < 128).

    ``digest`` is a hex xxh3-64 of both streams; it names the corpus in caches and reports
    (it changes with the interpreter version, since the standard library does).
    """

    train: torch.Tensor
    val: torch.Tensor
    files: int
    digest: str

    @property
    def nbytes(self) -> int:
        """Total number of tokens (train + validation)."""
        return int(self.train.numel() + self.val.numel())


def stdlib_sources(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path relative to ``root``.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Third-party package directories
    are skipped; the order does not depend on the file system's listing order.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY and d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _to_tokens(raw: bytes) -> np.ndarray:
    tokens = np.frombuffer(raw, dtype=np.uint8).copy()
    tokens[tokens >= VOCAB_SIZE] = REPLACEMENT
    return tokens


def load_corpus(
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    val_every: int = 10,
    block: int = 32 << 10,
    root: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Read the corpus (see the module docstring) into memory.

    Raises:
        ValueError: ``max_bytes``, ``block`` or ``val_every`` is out of range, or the files
            found hold too little text to make both a train and a validation stream.
        OSError: a source file cannot be read.
    """
    if max_bytes <= 0 or block <= 0 or val_every < 2:
        raise ValueError(f"need max_bytes > 0, block > 0, val_every >= 2; got {max_bytes}, {block}, {val_every}")
    parts: list[bytes] = []
    total = files = 0
    for path in stdlib_sources(root):
        if total >= max_bytes:
            break
        text = path.read_bytes()[: max_bytes - total - 1] + b"\n"
        parts.append(text)
        total += len(text)
        files += 1
    stream = _to_tokens(b"".join(parts))
    # Small corpora get smaller blocks: at least 4 validation blocks spread over the stream.
    block = max(1, min(block, stream.size // (4 * val_every)))
    index = np.arange(stream.size) // block
    is_val = index % val_every == val_every - 1
    train, val = stream[~is_val], stream[is_val]
    if min(train.size, val.size) < 1024:
        raise ValueError(f"corpus too small: {train.size} train and {val.size} validation bytes")
    digest = xxhash.xxh3_64_hexdigest(train.tobytes() + b"\0" + val.tobytes())
    return Corpus(torch.from_numpy(train), torch.from_numpy(val), files, digest)


def worker_seed(seed: int, worker: int) -> int:
    """A 63-bit seed for ``worker``'s stream, well separated from every other ``(seed, worker)``."""
    if seed < 0 or worker < 0:
        raise ValueError(f"seed and worker must be >= 0, got {seed}, {worker}")
    state = np.random.SeedSequence([seed, worker]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class BatchSampler:
    """Random windows of ``context + 1`` tokens from one stream, for one worker.

    Each batch is a ``(batch_size, context + 1)`` int64 tensor: a model predicts column
    ``j + 1`` from columns ``<= j``. Workers with different indices draw from independent
    generators; the same ``(seed, worker)`` always yields the same batches.
    """

    def __init__(
        self, data: torch.Tensor, *, batch_size: int, context: int, seed: int = 0, worker: int = 0
    ) -> None:
        """Raises ``ValueError`` for a non-positive size or a stream shorter than one window."""
        if batch_size <= 0 or context <= 0:
            raise ValueError(f"batch_size and context must be positive, got {batch_size}, {context}")
        if data.dim() != 1 or data.numel() <= context + 1:
            raise ValueError(f"need a 1-D stream longer than {context + 1} tokens, got shape {tuple(data.shape)}")
        self.data = data
        self.batch_size = batch_size
        self.context = context
        self.generator = torch.Generator().manual_seed(worker_seed(seed, worker))
        self._offsets = torch.arange(context + 1)

    def next(self) -> torch.Tensor:
        """The next batch."""
        high = self.data.numel() - self.context - 1
        starts = torch.randint(0, high + 1, (self.batch_size, 1), generator=self.generator)
        return self.data[starts + self._offsets].long()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state, to resume the same stream from a checkpoint."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


def eval_windows(data: torch.Tensor, *, sequences: int, context: int) -> torch.Tensor:
    """``sequences`` windows of ``context + 1`` tokens at evenly spaced offsets (no randomness).

    Every evaluation of every model sees exactly these windows, so differences between
    runs are differences between models, not between samples.

    Raises ``ValueError`` if the stream is shorter than one window or ``sequences < 1``.
    """
    high = data.numel() - context - 1
    if high < 0 or sequences < 1:
        raise ValueError(f"cannot cut {sequences} windows of {context + 1} from {data.numel()} tokens")
    starts = torch.linspace(0, high, sequences, dtype=torch.float64).round().long().unsqueeze(1)
    return data[starts + torch.arange(context + 1)].long()
