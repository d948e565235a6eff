"""The ring schedule: chunks and pieces partition the tensor, every transfer is matched, seqs unique."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectives.schedule import (
    Phase,
    ag_recv_chunk,
    ag_send_chunk,
    chunk_bounds,
    piece_bounds,
    piece_count,
    rs_recv_chunk,
    rs_send_chunk,
    transfer_seq,
)

sizes = st.integers(min_value=0, max_value=10_000)
worlds = st.integers(min_value=1, max_value=17)


@given(n=sizes, w=worlds)
def test_chunks_partition_the_range(n: int, w: int) -> None:
    bounds = [chunk_bounds(n, w, c) for c in range(w)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a0, b0), (a1, _) in zip(bounds, bounds[1:]):
        assert b0 == a1
    lengths = [b - a for a, b in bounds]
    assert min(lengths) >= 0 and max(lengths) - min(lengths) <= 1
    assert sum(lengths) == n


@given(
    start=st.integers(0, 1000),
    length=st.integers(0, 5000),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    piece_bytes=st.integers(1, 4096),
)
def test_pieces_partition_a_chunk_and_respect_the_size(start: int, length: int, itemsize: int, piece_bytes: int) -> None:
    pieces = piece_count(length, itemsize, piece_bytes)
    per_piece = max(1, piece_bytes // itemsize)
    assert pieces == (0 if length == 0 else (length + per_piece - 1) // per_piece)
    covered = start
    for p in range(pieces):
        a, b = piece_bounds(start, start + length, pieces, p)
        assert a == covered and b >= a
        assert b - a <= per_piece  # element-aligned and never above piece_bytes (or one element)
        covered = b
    assert covered == start + length


@given(n=sizes, w=worlds, itemsize=st.sampled_from([1, 2, 4, 8]), piece_bytes=st.integers(1, 512))
def test_shorter_chunks_reuse_the_longest_chunks_piece_count(n: int, w: int, itemsize: int, piece_bytes: int) -> None:
    longest = max(b - a for a, b in (chunk_bounds(n, w, c) for c in range(w)))
    pieces = piece_count(longest, itemsize, piece_bytes)
    per_piece = max(1, piece_bytes // itemsize)
    for c in range(w):
        a, b = chunk_bounds(n, w, c)
        for p in range(pieces):
            lo, hi = piece_bounds(a, b, pieces, p)
            assert hi - lo <= per_piece


@given(w=st.integers(2, 17))
def test_every_send_is_received_by_the_next_rank(w: int) -> None:
    for r in range(w):
        for s in range(w - 1):
            assert rs_send_chunk(r, s, w) == rs_recv_chunk((r + 1) % w, s, w)
            assert ag_send_chunk(r, s, w) == ag_recv_chunk((r + 1) % w, s, w)


@given(w=st.integers(2, 17))
def test_reduce_scatter_visits_each_chunk_once_and_ends_at_its_owner(w: int) -> None:
    for r in range(w):
        sent = Counter(rs_send_chunk(r, s, w) for s in range(w - 1))
        received = Counter(rs_recv_chunk(r, s, w) for s in range(w - 1))
        assert sent == Counter(c for c in range(w) if c != r)  # its own chunk stays home
        assert received == Counter(c for c in range(w) if c != (r - 1) % w)
        assert rs_recv_chunk(r, w - 2, w) == r  # the last arrival completes the owned chunk
        # What arrives at step s is what leaves at step s + 1: partial sums flow on.
        for s in range(w - 2):
            assert rs_recv_chunk(r, s, w) == rs_send_chunk(r, s + 1, w)
    # Each chunk is reduced at all w ranks: sent by w - 1 of them, received by w - 1 of them.
    for c in range(w):
        senders = [r for r in range(w) for s in range(w - 1) if rs_send_chunk(r, s, w) == c]
        assert sorted(senders) == sorted(r for r in range(w) if r != c)


@given(w=st.integers(2, 17))
def test_all_gather_brings_every_chunk_to_every_rank_once(w: int) -> None:
    for r in range(w):
        assert ag_send_chunk(r, 0, w) == r  # the owner starts with its final chunk
        received = [ag_recv_chunk(r, s, w) for s in range(w - 1)]
        assert sorted(received) == sorted(c for c in range(w) if c != r)
        for s in range(w - 2):
            assert ag_recv_chunk(r, s, w) == ag_send_chunk(r, s + 1, w)  # forwarded unchanged


@given(w=st.integers(1, 17), pieces=st.integers(1, 300))
def test_seqs_are_unique_within_an_operation(w: int, pieces: int) -> None:
    steps = max(1, w - 1)
    seqs = [transfer_seq(ph, s, p, w, pieces) for ph in Phase for s in range(steps) for p in range(pieces)]
    assert len(set(seqs)) == len(seqs)
    assert min(seqs) >= 0 and max(seqs) < 3 * w * pieces


@pytest.mark.parametrize(
    "call",
    [
        lambda: chunk_bounds(-1, 2, 0),
        lambda: chunk_bounds(5, 0, 0),
        lambda: chunk_bounds(5, 2, 2),
        lambda: piece_count(5, 0, 10),
        lambda: piece_bounds(5, 4, 1, 0),
        lambda: piece_bounds(0, 4, 2, 2),
        lambda: transfer_seq(Phase.ALL_GATHER, 3, 0, 3, 4),
        lambda: transfer_seq(Phase.ALL_GATHER, 0, 4, 3, 4),
    ],
)
def test_out_of_range_requests_are_refused(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]
