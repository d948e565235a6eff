"""The master's side of ``optimize_topology`` (sans-IO): measuring, solving, re-wiring (§5.12)."""

from __future__ import annotations

import math
from typing import Any

import pytest

import master_harness
from pccl import protocol as P
from pccl.bandwidth import probe_time_bound
from pccl.master_rings import ring_edges
from pccl.master_state import DEFAULT_PROBE_SECONDS, Bind, MasterState, PeerLost, Received, RegisterRequest, Send, Tick

TIMEOUT = 1000.0  # heartbeats are not what these tests are about


class Harness(master_harness.Harness):
    """A measuring master; peers register from distinct (non-loopback) addresses."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(TIMEOUT, measure_bandwidth=True, **kwargs)

    def register(self, group: int = 0, host: str | None = None, advertise: str | None = None) -> int:
        return super().register(group, host or f"10.0.0.{self._conn + 1}", advertise)

    def probes(self) -> dict[int, tuple[int, P.BandwidthProbe]]:
        """Probe requests received since the last call, by id (their sender is the addressee)."""
        out = {}
        for peer in list(self.inbox):
            for msg in self.take(peer, P.BandwidthProbe):
                out[msg.probe_id] = (peer, msg)
        return out

    def answer_all(self, rate: Any) -> dict[tuple[int, int], float]:
        """Answer every probe, batch after batch, with ``rate(src, dst)`` (None: a failure)."""
        seen: dict[tuple[int, int], float] = {}
        while True:
            batch = self.probes()
            if not batch:
                return seen
            senders = [src for src, _ in batch.values()]
            receivers = [msg.peer for _, msg in batch.values()]
            # At most one probe per sender and per receiver at a time.
            assert len(set(senders)) == len(senders) and len(set(receivers)) == len(receivers)
            for probe_id, (src, msg) in sorted(batch.items()):
                value = rate(src, msg.peer)
                if value is None:
                    self.send(src, P.BandwidthReport(probe_id, False, 0.0, "connection refused"))
                    seen[(src, msg.peer)] = 0.0
                else:
                    self.send(src, P.BandwidthReport(probe_id, True, value))
                    seen[(src, msg.peer)] = value


def _vote_all(h: Harness, peers: list[int]) -> None:
    for peer in peers:
        h.send(peer, P.Vote(P.OPTIMIZE_TOPOLOGY))


SLOW = {(1, 2), (2, 1), (3, 4), (4, 3)}


def _rates(src: int, dst: int) -> float:
    return 1e7 if (src, dst) in SLOW else 1e9 + src * 10 + dst  # distinct, so the matrix is checkable


def test_optimize_measures_every_pair_then_rewires_around_slow_pairs() -> None:
    h = Harness()
    peers = h.run_of(4)
    assert peers == [1, 2, 3, 4] and h.state.groups[0].ring == [1, 2, 3, 4]
    _vote_all(h, peers)
    assert h.state.round is not None and h.state.round.probes is not None and not h.state.round.linking
    first = h.probes()
    assert len(first) == 4  # the first offset: every peer sends once and receives once
    for probe_id, (src, msg) in first.items():
        assert msg.seconds == DEFAULT_PROBE_SECONDS
        assert (msg.host, msg.port) == (h.state.peers[msg.peer].host, h.state.peers[msg.peer].port)
        h.send(src, P.BandwidthReport(probe_id, True, _rates(src, msg.peer)))
    measured = h.answer_all(_rates)
    assert len(measured) == 8  # with the first batch: all 12 directed pairs
    assert h.state.bandwidth == {(a, b): _rates(a, b) for a in peers for b in peers if a != b}
    ring = h.state.groups[0].ring
    assert sorted(ring) == peers and not SLOW & set(ring_edges(ring))
    for peer in peers:
        (matrix,) = h.take(peer, P.Bandwidths)
        assert dict(zip(zip(matrix.senders, matrix.receivers), matrix.bytes_per_second)) == h.state.bandwidth
        assert h.take(peer, P.RingUpdate)[-1].ring == ring
    assert not any(h.take(p, P.VoteResult) for p in peers)  # not before the new links are ready
    h.ready_all()
    assert all(h.take(p, P.VoteResult) == [P.VoteResult(P.OPTIMIZE_TOPOLOGY, True)] for p in peers)
    assert h.state.round is None


def test_a_failed_measurement_is_an_unreachable_pair_not_a_failed_call() -> None:
    h = Harness()
    peers = h.run_of(3)
    _vote_all(h, peers)
    h.answer_all(lambda s, d: None if (s, d) == (1, 2) else 1e9)
    assert h.state.bandwidth[(1, 2)] == 0.0
    ring = h.state.groups[0].ring
    assert ring == [1, 3, 2]  # the only ring without 1 -> 2
    h.ready_all()
    assert all(h.take(p, P.VoteResult)[0].ok for p in peers)


def test_no_usable_ring_raises_topology_error_keeps_the_ring_and_a_retry_measures_again() -> None:
    h = Harness()
    peers = h.run_of(3)
    epoch = h.state.groups[0].epoch
    _vote_all(h, peers)
    h.answer_all(lambda s, d: None if s == 3 else 1e9)  # peer 3 cannot send anywhere
    assert h.state.groups[0].ring == [1, 2, 3] and h.state.groups[0].epoch == epoch
    for peer in peers:
        (result,) = h.take(peer, P.VoteResult)
        assert not result.ok and result.error == P.ERROR_TOPOLOGY and "unreachable" in result.reason
    assert h.state.round is None and not h.kicks
    # The retry measures exactly the failed pairs again.
    _vote_all(h, peers)
    retried = h.answer_all(lambda s, d: 5e8)
    assert set(retried) == {(3, 1), (3, 2)}
    assert all(h.take(p, P.VoteResult)[0].ok for p in peers)
    assert h.state.bandwidth[(3, 1)] == 5e8


def test_measurements_persist_and_only_missing_pairs_are_measured() -> None:
    h = Harness()
    peers = h.run_of(3)
    _vote_all(h, peers)
    h.answer_all(lambda s, d: 1e9 + s + d)
    h.ready_all()
    ring_before, epoch = list(h.state.groups[0].ring), h.state.groups[0].epoch
    for p in peers:
        h.take(p, P.VoteResult)
    _vote_all(h, peers)  # nothing missing: solved at once, same ring, no new epoch
    assert not h.probes()
    assert all(h.take(p, P.VoteResult)[0].ok for p in peers)
    assert h.state.groups[0].ring == ring_before and h.state.groups[0].epoch == epoch
    # Peer 2 leaves: its rows and columns go; a newcomer's pairs are all that is measured.
    h.send(2, P.Leave())
    assert all(2 not in pair for pair in h.state.bandwidth) and len(h.state.bandwidth) == 2
    new = h.register()
    h.send(1, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(3, P.Vote(P.UPDATE_TOPOLOGY))
    h.ready_all()
    _vote_all(h, [1, 3, new])
    measured = h.answer_all(lambda s, d: 2e9)
    assert set(measured) == {(1, new), (new, 1), (3, new), (new, 3)}
    assert h.state.bandwidth[(1, 3)] == 1e9 + 4  # kept from the first round


def test_a_peer_lost_while_measuring_is_dropped_and_the_round_completes() -> None:
    h = Harness()
    peers = h.run_of(4)
    _vote_all(h, peers)
    batch = h.probes()
    victim = 2
    for probe_id, (src, msg) in batch.items():
        if victim not in (src, msg.peer):
            h.send(src, P.BandwidthReport(probe_id, True, 1e9))
    h.feed(PeerLost(victim, "connection reset"))  # its own probes and those to it are dropped
    h.answer_all(lambda s, d: 1e9)
    assert all(victim not in pair for pair in h.state.bandwidth)
    assert len(h.state.bandwidth) == 6  # every pair of the three survivors
    h.ready_all()
    assert all(h.take(p, P.VoteResult)[0].ok for p in (1, 3, 4))
    assert victim not in h.state.groups[0].ring


def test_a_probe_without_report_expires_as_unreachable() -> None:
    h = Harness()
    peers = h.run_of(3)
    _vote_all(h, peers)
    batch = h.probes()
    silent = min(batch)
    src, msg = batch[silent]
    for probe_id, (s, m) in batch.items():
        if probe_id != silent:
            h.send(s, P.BandwidthReport(probe_id, True, 1e9))
    h.answer_all(lambda s, d: 1e9)  # everything else; the silent probe stays open
    assert h.state.round is not None and h.state.round.probes is not None
    h.now += probe_time_bound(DEFAULT_PROBE_SECONDS) + 2.5
    h.feed(Tick())
    assert h.state.bandwidth[(src, msg.peer)] == 0.0
    h.answer_all(lambda s, d: 1e9)
    h.ready_all()
    assert all(h.take(p, P.VoteResult)[0].ok for p in peers)
    # Its report, arriving late, is ignored (no kick, no change).
    h.send(src, P.BandwidthReport(silent, True, 5.0))
    assert not h.kicks and h.state.bandwidth[(src, msg.peer)] == 0.0


@pytest.mark.parametrize(
    "report, why",
    [
        (lambda pid, other: P.BandwidthReport(10_000, True, 1.0), "never existed"),
        (lambda pid, other: P.BandwidthReport(pid, True, math.nan), "impossible bandwidth"),
        (lambda pid, other: P.BandwidthReport(pid, True, -1.0), "impossible bandwidth"),
    ],
)
def test_illegal_reports_kick_their_sender(report: Any, why: str) -> None:
    h = Harness()
    peers = h.run_of(3)
    _vote_all(h, peers)
    batch = h.probes()
    pid = min(batch)
    src = batch[pid][0]
    h.send(src, report(pid, None))
    assert src in h.kicks and why in h.kicks[src].reason


def test_a_report_for_someone_elses_probe_kicks() -> None:
    h = Harness()
    peers = h.run_of(3)
    _vote_all(h, peers)
    batch = h.probes()
    pid = min(batch)
    src = batch[pid][0]
    other = next(p for p in peers if p != src)
    h.send(other, P.BandwidthReport(pid, True, 1.0))
    assert other in h.kicks and f"peer {src} runs" in h.kicks[other].reason


def test_groups_are_measured_within_themselves() -> None:
    h = Harness()
    a = h.register(0)
    h.ready_all()
    b, c, d = h.register(0), h.register(1), h.register(1)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.ready_all()
    _vote_all(h, [a, b, c, d])
    measured = h.answer_all(lambda s, dd: 1e9)
    assert set(measured) == {(a, b), (b, a), (c, d), (d, c)}
    for peer, group_pairs in ((a, {(a, b), (b, a)}), (c, {(c, d), (d, c)})):
        (matrix,) = h.take(peer, P.Bandwidths)
        assert set(zip(matrix.senders, matrix.receivers)) == group_pairs


def test_without_measuring_the_ring_is_kept() -> None:
    state = MasterState(TIMEOUT)  # the bare state machine: no measurement, no optimizer
    out = state.handle(0.0, RegisterRequest(1, P.Register(0, 5001), "10.0.0.1"))
    assert any(isinstance(a, Bind) for a in out)
    state.handle(0.0, Received(1, P.LinksReady(1)))
    out = state.handle(0.0, Received(1, P.Vote(P.OPTIMIZE_TOPOLOGY)))
    assert [a.msg for a in out if isinstance(a, Send)] == [P.VoteResult(P.OPTIMIZE_TOPOLOGY, True)]
