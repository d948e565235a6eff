"""The ring schedule as pure functions: who sends which elements to whom, and under which seq.

Nothing here touches a tensor or a socket; the executor in :mod:`collectives.ring` only moves the
bytes these functions name. The layout is described in ``docs/protocol.md`` §7.1–7.2.

Conventions:
- A tensor of ``n`` elements is cut into ``world_size`` contiguous *chunks*; chunk ``c`` is owned
  by rank ``c`` (the rank that computes its final value).
- Every chunk of one operation is cut into the same number of *pieces*, the unit of pipelining
  and of one transfer on the wire.
- Rank ``r`` sends to rank ``r + 1`` and receives from rank ``r - 1`` (mod ``world_size``).
"""

from __future__ import annotations

import enum

__all__ = [
    "DEFAULT_PIECE_BYTES",
    "Phase",
    "ag_recv_chunk",
    "ag_send_chunk",
    "chunk_bounds",
    "piece_bounds",
    "piece_count",
    "rs_recv_chunk",
    "rs_send_chunk",
    "transfer_seq",
]

# Measured on loopback (2 cores, W = 2 and 4, 16-256 MiB): 4 MiB pieces used 10-20 % less CPU
# per operation than 1 MiB ones (per-transfer Python and wake-up costs) and were as fast or
# faster; 256 KiB pieces were twice as slow, and much larger ones fill the pipeline late.
DEFAULT_PIECE_BYTES = 4 << 20


class Phase(enum.IntEnum):
    """The phase a transfer belongs to; part of its wire seq (``docs/protocol.md`` §7.2)."""

    REDUCE_SCATTER = 0
    ALL_GATHER = 1
    BROADCAST = 2


def chunk_bounds(n: int, world_size: int, chunk: int) -> tuple[int, int]:
    """Element range ``[start, end)`` of ``chunk`` when ``n`` elements are split over ``world_size``.

    The first ``n % world_size`` chunks get one element more than the others, so any ``n``
    (0 and 1 included) splits into ``world_size`` chunks whose lengths differ by at most one.

    Raises:
        ValueError: ``n < 0``, ``world_size < 1`` or ``chunk`` outside ``[0, world_size)``.
    """
    if n < 0 or world_size < 1 or not 0 <= chunk < world_size:
        raise ValueError(f"bad chunk request n={n} world_size={world_size} chunk={chunk}")
    base, extra = divmod(n, world_size)
    start = chunk * base + min(chunk, extra)
    return start, start + base + (1 if chunk < extra else 0)


def piece_count(max_len: int, itemsize: int, piece_bytes: int) -> int:
    """How many pieces a chunk of up to ``max_len`` elements is cut into.

    Each piece then holds at most ``max(1, piece_bytes // itemsize)`` elements. Every chunk of one
    operation uses the count of the longest chunk, so piece ``p`` of every chunk travels in step.

    Raises:
        ValueError: a negative length or a non-positive item size or piece size.
    """
    if max_len < 0 or itemsize < 1 or piece_bytes < 1:
        raise ValueError(f"bad piece request max_len={max_len} itemsize={itemsize} piece_bytes={piece_bytes}")
    per_piece = max(1, piece_bytes // itemsize)
    return -(-max_len // per_piece)


def piece_bounds(start: int, end: int, pieces: int, piece: int) -> tuple[int, int]:
    """Element range of ``piece`` when ``[start, end)`` is cut into ``pieces`` near-equal pieces.

    Pieces may be empty when the range is shorter than ``pieces``; empty pieces are not sent.

    Raises:
        ValueError: an inverted range, or ``piece`` outside ``[0, pieces)``.
    """
    if end < start or not 0 <= piece < pieces:
        raise ValueError(f"bad piece request [{start}, {end}) pieces={pieces} piece={piece}")
    lo, hi = chunk_bounds(end - start, pieces, piece)
    return start + lo, start + hi


def rs_send_chunk(rank: int, step: int, world_size: int) -> int:
    """Chunk that ``rank`` sends at reduce-scatter ``step`` (0 .. world_size-2).

    At step 0 it is the rank's own contribution; later it is the partial sum received the step
    before. Chosen so that the last chunk a rank receives is its own: chunk ``c`` is final at ``c``.
    """
    return (rank - step - 1) % world_size


def rs_recv_chunk(rank: int, step: int, world_size: int) -> int:
    """Chunk that ``rank`` receives (and reduces into) at reduce-scatter ``step``."""
    return (rank - step - 2) % world_size


def ag_send_chunk(rank: int, step: int, world_size: int) -> int:
    """Chunk that ``rank`` sends at all-gather ``step``: its own at step 0, then what it received."""
    return (rank - step) % world_size


def ag_recv_chunk(rank: int, step: int, world_size: int) -> int:
    """Chunk whose final value ``rank`` receives at all-gather ``step``."""
    return (rank - step - 1) % world_size


def transfer_seq(phase: Phase, step: int, piece: int, world_size: int, pieces: int) -> int:
    """Wire seq of one transfer: unique within one operation (one tag) and one direction.

    Layout: ``(phase * (world_size - 1) + step) * pieces + piece``; always below
    ``3 * world_size * pieces``.

    Raises:
        ValueError: ``step`` or ``piece`` out of range for the operation.
    """
    steps = max(1, world_size - 1)
    if not 0 <= step < steps or not 0 <= piece < pieces:
        raise ValueError(f"bad transfer phase={phase} step={step} piece={piece} of {world_size}x{pieces}")
    return (int(phase) * steps + step) * pieces + piece
